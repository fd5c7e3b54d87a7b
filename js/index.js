// flexquant: the main-thread engine. See API.md (shipped as README in the package).
import { FlexQuantError, toFlexQuantError, answerApi, pollHeap } from './common.js';

export { FlexQuantError };

// The package holds two builds of the wasm: wasm/ (one thread, runs everywhere) and wasm-mt/
// (shared memory: the CPU backend's rows on a pool of workers, src/web/threads.rs). The first
// use in a realm picks one: the threaded build only where it can run, in a Web Worker (the
// main thread may not wait on Atomics) of a cross-origin isolated page, unless `threads: 1`.
// A threaded build that fails to load falls back to the other (the engine then says why in a
// `threads` warning when threads were asked for).
let wasmReady = null;
function initWasm(wasmUrl, threaded = false) {
  const load = async (threads) => {
    const m = threads ? await import('./wasm-mt/flexquant.js') : await import('./wasm/flexquant.js');
    await m.default(wasmUrl ? { module_or_path: wasmUrl } : undefined);
    return m;
  };
  wasmReady ??= threaded
    ? load(true).catch((e) => {
      console.warn('flexquant: the threaded wasm did not load, using the one-thread build:', e);
      return load(false);
    })
    : load(false);
  return wasmReady;
}

/** Whether this realm can run the threaded build (see initWasm). */
const threadsPossible = () => typeof WorkerGlobalScope !== 'undefined' &&
  globalThis.crossOriginIsolated === true && typeof SharedArrayBuffer === 'function';

// Calls into wasm now running, each with a way to reject it. A panic inside an async call
// happens on wasm-bindgen's task queue, not in the call, so its promise would never settle:
// the panic hook (src/web/mod.rs) calls this, and every call in flight fails as `internal`.
const inFlight = new Set();
globalThis.__flexquantOnPanic = (why) => { for (const c of [...inFlight]) c(why); };

export class Engine {
  /**
   * Loads the ensemble whose manifest is at `manifestUrl` (absolute, or relative to the page).
   * Options: onProgress, onEvent, budgetBytes, context, cacheName, useCache, cacheQuotaBytes,
   * policy, threads, heapPollMs, wasmUrl.
   */
  static async create(manifestUrl, options = {}) {
    const { heapPollMs = 1000, wasmUrl, ...opts } = options;
    try {
      const wasm = await initWasm(wasmUrl, !wasmUrl && opts.threads !== 1 && threadsPossible());
      const base = globalThis.location?.href;
      const url = base ? new URL(manifestUrl, base).href : String(manifestUrl);
      return new Engine(await wasm.Engine.create(url, opts), heapPollMs);
    } catch (e) {
      throw toFlexQuantError(e);
    }
  }

  /**
   * Which backend `backend: 'auto'` would pick in this browser and why, loading nothing:
   * `{ backend: 'webgpu'|'cpu', reason, adapter, emulatedGpu, crossOriginIsolated }`.
   */
  static async checkSupport(options = {}) {
    return (await initWasm(options.wasmUrl)).checkSupport();
  }

  /**
   * What the ensemble needs, from its manifest alone (no GPU, nothing cached): trajectory
   * (footprint, perplexity, mean bits per step), KV bytes per token, the least and most memory
   * for `options.context` positions, download sizes.
   */
  static async inspect(manifestUrl, options = {}) {
    return Engine._static(options, (w) => w.inspectEnsemble(Engine._url(manifestUrl), options));
  }

  /** Which steps of the ensemble load offline from the cache (`cacheName`), and the bytes cached. */
  static async cached(manifestUrl, options = {}) {
    return Engine._static(options, (w) => w.cachedEnsemble(Engine._url(manifestUrl), options));
  }

  /** Deletes the ensemble (every version of its files) from the cache; resolves to the entries deleted. */
  static async deleteCached(manifestUrl, options = {}) {
    return Engine._static(options, (w) => w.deleteCachedEnsemble(Engine._url(manifestUrl), options));
  }

  static _url(manifestUrl) {
    const base = globalThis.location?.href;
    return base ? new URL(manifestUrl, base).href : String(manifestUrl);
  }

  static async _static(options, f) {
    try {
      return await f(await initWasm(options.wasmUrl));
    } catch (e) {
      throw toFlexQuantError(e);
    }
  }

  constructor(inner, heapPollMs) {
    this._inner = inner;
    this._queue = Promise.resolve();
    const api = answerApi({ startChat: (req) => this.startChat(req), startCompletion: (req) => this.startCompletion(req) },
      () => this.nextChunk(), () => this.interruptGenerate());
    this.chat = api.chat;
    this.completions = api.completions;
    this._stopHeap = pollHeap(heapPollMs, (used, limit) => this.reportHeap(used, limit));
  }

  /** Runs engine calls one after another (tokens, swaps, recovery never overlap). */
  _run(f) {
    const p = this._queue.then(() => this._guard(f));
    this._queue = p.catch(() => {});
    return p;
  }

  /**
   * Calls into wasm; a panic there (a bug) aborts the call with a WebAssembly.RuntimeError and
   * leaves the instance unusable: it becomes an `internal` error with the panic's message, and
   * every later call fails the same way at once (`unload` resolves: there is nothing left to
   * call). Create a new engine.
   */
  async _guard(f) {
    if (this._crashed) {
      if (f !== this._unloadCall) throw this._crashed;
      // The engine's state died with the panic, but its GPU device is held apart: destroying
      // it gives the GPU memory back (best effort; the CPU backend has none).
      try { this._inner.destroyDevice(); } catch { /* no device, or the instance is gone */ }
      return undefined;
    }
    let crash;
    const crashed = new Promise((_, reject) => { crash = (why) => reject(this._crash(why)); });
    crashed.catch(() => {});
    inFlight.add(crash);
    try {
      return await Promise.race([f(), crashed]);
    } catch (e) {
      if (e instanceof WebAssembly.RuntimeError) throw this._crash(globalThis.__flexquantPanic ?? e.message);
      throw toFlexQuantError(e);
    } finally {
      inFlight.delete(crash);
    }
  }

  /** Marks the engine cleanly failed after a panic; the error every later call rejects with. */
  _crash(why) {
    this._crashed ??= new FlexQuantError('internal', `the engine crashed: ${why} (create a new engine)`);
    this._stopHeap();
    return this._crashed;
  }

  /** Low level (chat.completions.create uses these): prefill a conversation... */
  startChat(request) { return this._run(() => this._inner.startChat(request)); }
  /** Low level (completions.create uses it): prefill a text completion's prompt. */
  startCompletion(request) { return this._run(() => this._inner.startCompletion(request)); }
  /** ...then take its chunks one by one (null after the final chunk). */
  nextChunk() { return this._run(() => this._inner.nextChunk()); }

  interruptGenerate() { this._inner.interrupt(); }
  resetChat() { return this._run(() => this._inner.resetChat()).then(() => {}); }
  /**
   * The conversation and its KV cache's bytes (either backend): `importSession` on an engine of
   * the same ensemble goes on from it without running it again (see API.md).
   */
  exportSession() { return this._run(() => this._inner.exportSession()); }
  /** Replaces the conversation by an exported one; refused (another ensemble, wrong sizes, no room) the conversation stays as it was. */
  importSession(session) { return this._run(() => this._inner.importSession(session)).then(() => {}); }
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
  stats() { return this._guard(() => this._inner.stats()); }
  trajectory() { return this._guard(() => this._inner.trajectory()); }
  tokenize(text) { return this._guard(async () => this._inner.tokenize(String(text))); }
  detokenize(tokens) { return this._guard(async () => this._inner.detokenize(Uint32Array.from(tokens))); }
  /** Panics inside wasm, as a bug would (tests of the crash handling); `async`: after an await. */
  simulatePanic({ async = false } = {}) {
    return this._guard(() => (async ? this._inner.simulatePanicAsync() : this._inner.simulatePanic()));
  }
  /** Whether a panic left this engine cleanly failed (every call rejects with `internal`). */
  get crashed() { return Boolean(this._crashed); }
  simulateDeviceLoss() { return this._run(() => this._inner.simulateDeviceLoss()).then(() => {}); }
  unload() {
    this._stopHeap();
    this._unloadCall ??= () => this._inner.unload();
    return this._run(this._unloadCall).then(() => {});
  }
}
