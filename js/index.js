// flexquant: the main-thread engine. See API.md (shipped as README in the package).
import init, {
  Engine as WasmEngine, checkSupport as wasmCheckSupport, inspectEnsemble, cachedEnsemble,
  deleteCachedEnsemble,
} from './wasm/flexquant.js';
import { FlexQuantError, toFlexQuantError, chatApi, pollHeap } from './common.js';

export { FlexQuantError };

let wasmReady = null;
function initWasm(wasmUrl) {
  wasmReady ??= init(wasmUrl ? { module_or_path: wasmUrl } : undefined);
  return wasmReady;
}

export class Engine {
  /**
   * Loads the ensemble whose manifest is at `manifestUrl` (absolute, or relative to the page).
   * Options: onProgress, onEvent, budgetBytes, context, cacheName, useCache, cacheQuotaBytes,
   * policy, heapPollMs, wasmUrl.
   */
  static async create(manifestUrl, options = {}) {
    const { heapPollMs = 1000, wasmUrl, ...opts } = options;
    try {
      await initWasm(wasmUrl);
      const base = globalThis.location?.href;
      const url = base ? new URL(manifestUrl, base).href : String(manifestUrl);
      return new Engine(await WasmEngine.create(url, opts), heapPollMs);
    } catch (e) {
      throw toFlexQuantError(e);
    }
  }

  /**
   * Which backend `backend: 'auto'` would pick in this browser and why, loading nothing:
   * `{ backend: 'webgpu'|'cpu', reason, adapter, emulatedGpu, crossOriginIsolated }`.
   */
  static async checkSupport(options = {}) {
    await initWasm(options.wasmUrl);
    return wasmCheckSupport();
  }

  /**
   * What the ensemble needs, from its manifest alone (no GPU, nothing cached): trajectory
   * (footprint, perplexity, mean bits per step), KV bytes per token, the least and most memory
   * for `options.context` positions, download sizes.
   */
  static async inspect(manifestUrl, options = {}) {
    return Engine._static(options, () => inspectEnsemble(Engine._url(manifestUrl), options));
  }

  /** Which steps of the ensemble load offline from the cache (`cacheName`), and the bytes cached. */
  static async cached(manifestUrl, options = {}) {
    return Engine._static(options, () => cachedEnsemble(Engine._url(manifestUrl), options));
  }

  /** Deletes the ensemble (every version of its files) from the cache; resolves to the entries deleted. */
  static async deleteCached(manifestUrl, options = {}) {
    return Engine._static(options, () => deleteCachedEnsemble(Engine._url(manifestUrl), options));
  }

  static _url(manifestUrl) {
    const base = globalThis.location?.href;
    return base ? new URL(manifestUrl, base).href : String(manifestUrl);
  }

  static async _static(options, f) {
    try {
      await initWasm(options.wasmUrl);
      return await f();
    } catch (e) {
      throw toFlexQuantError(e);
    }
  }

  constructor(inner, heapPollMs) {
    this._inner = inner;
    this._queue = Promise.resolve();
    this.chat = chatApi((req) => this.startChat(req), () => this.nextChunk(), () => this.interruptGenerate());
    this._stopHeap = pollHeap(heapPollMs, (used, limit) => this.reportHeap(used, limit));
  }

  /** Runs engine calls one after another (tokens, swaps, recovery never overlap). */
  _run(f) {
    const p = this._queue.then(f);
    this._queue = p.catch(() => {});
    return p.catch((e) => { throw toFlexQuantError(e); });
  }

  /** Low level (chat.completions.create uses these): prefill a conversation... */
  startChat(request) { return this._run(() => this._inner.startChat(request)); }
  /** ...then take its chunks one by one (null after the final chunk). */
  nextChunk() { return this._run(() => this._inner.nextChunk()); }

  interruptGenerate() { this._inner.interrupt(); }
  resetChat() { return this._run(() => this._inner.resetChat()).then(() => {}); }
  setMinTokensPerSecond(tokensPerSecond) {
    return this._run(() => this._inner.setMinTokensPerSecond(tokensPerSecond ?? null)).then(() => {});
  }
  setMaxPerplexity(maxPerplexity) {
    return this._run(() => this._inner.setMaxPerplexity(maxPerplexity ?? null)).then(() => {});
  }
  setMemoryBudget(bytes) {
    return this._run(() => this._inner.setMemoryBudget(bytes ?? null)).then(() => {});
  }
  reportHeap(used, limit) {
    this._inner.reportHeap(used, limit);
    this._run(() => this._inner.rebalance()).catch(() => {});
  }
  async stats() { return this._inner.stats(); }
  async trajectory() { return this._inner.trajectory(); }
  simulateDeviceLoss() { return this._run(() => this._inner.simulateDeviceLoss()).then(() => {}); }
  unload() {
    this._stopHeap();
    return this._run(() => this._inner.unload()).then(() => {});
  }
}
