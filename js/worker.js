// The main-thread proxy of an Engine running in a Web Worker (worker-entry.js): the same API,
// every method async. It polls performance.memory (workers lack it) and forwards it.
//
// WebAssembly memory never shrinks: on the CPU backend the model lives in the worker's wasm
// heap, so after a budget cut the heap keeps its high-water mark. When a budget falls below the
// heap by more than RELEASE_MARGIN, the proxy re-creates the worker at the new budget (from the
// Cache API: no download) once no answer is running, and emits a `released` event with the heap
// before and after. The conversation's KV cache goes along as bytes (exportSession /
// importSession), so the next answer runs only its new tokens.
import { FlexQuantError, answerApi, errorData, pollHeap } from './common.js';

export { FlexQuantError };

/** A budget this much below the wasm heap re-creates the worker (see above). */
const RELEASE_MARGIN = 0.25;
/** How long a release waits for the background cache writes and prefetch to finish. */
const RELEASE_WAIT_MS = 30_000;

export class WorkerEngine {
  constructor(worker, options = {}, spawn = null) {
    this._calls = new Map();
    this._next = 0;
    this._onEvent = options.onEvent;
    this._onProgress = options.onProgress;
    this._spawn = spawn;
    this._budget = options.budgetBytes ?? null;
    this._minSpeed = options.minTokensPerSecond ?? null;
    this._maxPerplexity = options.maxPerplexity ?? null;
    this._answering = false;
    this._releaseDue = false;
    this._autoRelease = options.autoRelease ?? true;
    this._attach(worker);
    const api = answerApi({ startChat: (req) => this.startChat(req), startCompletion: (req) => this.startCompletion(req) },
      () => this.nextChunk(), () => this.interruptGenerate());
    this.chat = api.chat;
    this.completions = api.completions;
    this._stopHeap = pollHeap(options.heapPollMs ?? 1000, (u, l) => this.reportHeap(u, l));
  }

  _attach(worker) {
    this._worker = worker;
    worker.onmessage = ({ data }) => {
      if (data.event) {
        if (data.event.type === 'progress') this._onProgress?.(data.event);
        this._onEvent?.(data.event);
        return;
      }
      const c = this._calls.get(data.id);
      if (!c) return;
      this._calls.delete(data.id);
      if (data.error) {
        const err = new FlexQuantError(data.error.code, data.error.message, data.error);
        if (data.crashed) this._fail(err);
        c.reject(err);
      } else c.resolve(data.result);
    };
    worker.onerror = (e) => this._fail(new FlexQuantError('internal', `worker error: ${e.message ?? e}`));
  }

  /**
   * The worker's engine crashed (a panic) or the worker died: its memory is given back
   * (terminated), every call in flight and every later call rejects with `err`, and `unload`
   * resolves. Create a new engine.
   */
  _fail(err) {
    if (this._crashed) return;
    this._crashed = err;
    this._stopHeap?.();
    this._worker.terminate();
    for (const c of this._calls.values()) c.reject(err);
    this._calls.clear();
  }

  _call(method, args = [], transfer = []) {
    // While the worker is being re-created, calls wait for the new engine.
    if (this._releasing) return this._releasing.then(() => this._post(method, args, transfer));
    return this._post(method, args, transfer);
  }

  _post(method, args = [], transfer = []) {
    if (this._crashed) return method === 'unload' ? Promise.resolve(null) : Promise.reject(this._crashed);
    if (this._unloaded) {
      return Promise.reject(new FlexQuantError('unloaded', 'the engine was unloaded (its worker is gone)'));
    }
    const id = this._next++;
    return new Promise((resolve, reject) => {
      this._calls.set(id, { resolve, reject });
      this._worker.postMessage({ id, method, args }, transfer);
    });
  }

  startChat(request) { return this._start('startChat', request); }
  startCompletion(request) { return this._start('startCompletion', request); }
  _start(method, request) {
    this._answering = true;
    return this._call(method, [request]).catch((e) => { this._answering = false; throw e; });
  }
  async nextChunk() {
    let c;
    try {
      c = await this._call('nextChunk');
    } catch (e) {
      this._answering = false;
      throw e;
    }
    if (c == null) {
      this._answering = false;
      if (this._releaseDue) await this._maybeRelease();
    }
    return c;
  }
  interruptGenerate() { this._call('interruptGenerate').catch(() => {}); }
  resetChat() { return this._call('resetChat'); }
  exportSession() { return this._call('exportSession'); }
  /** The session's KV bytes are transferred to the worker (`session.kv` is detached after). */
  importSession(session) {
    return this._call('importSession', [session], session?.kv?.buffer ? [session.kv.buffer] : []);
  }
  async setMemoryBudget(bytes) {
    const before = this._budget;
    this._budget = bytes ?? null;
    await this._call('setMemoryBudget', [this._budget]);
    // Only a cut can leave the heap far above what the model may use.
    if (this._budget != null && (before == null || this._budget < before)) {
      this._releaseDue = true;
      if (!this._answering) await this._maybeRelease();
    }
  }
  setMinTokensPerSecond(tokensPerSecond) {
    this._minSpeed = tokensPerSecond ?? null;
    return this._call('setMinTokensPerSecond', [this._minSpeed]);
  }

  setMaxPerplexity(maxPerplexity) {
    this._maxPerplexity = maxPerplexity ?? null;
    return this._call('setMaxPerplexity', [this._maxPerplexity]);
  }

  /** Re-creates the worker when the budget is well below its wasm heap (CPU backend only). */
  async _maybeRelease() {
    this._releaseDue = false;
    if (!this._autoRelease || !this._spawn || this._budget == null) return;
    const s = await this.stats();
    // Only once the model fits the budget (a swap that failed, e.g. on a bad shard, leaves it
    // above: a new worker would fail the same way).
    if (s.backend === 'cpu' && s.heldBytes <= this._budget &&
        s.wasmMemoryBytes > this._budget * (1 + RELEASE_MARGIN)) {
      try {
        await this.releaseMemory();
      } catch (e) {
        // An answer started while the release waited for the cache writes: after it ends.
        if (e?.code !== 'busy') throw e;
        this._releaseDue = true;
      }
    }
  }

  /**
   * Gives the wasm heap back: a new worker loads the engine at the current budget from the
   * cache, the old one is terminated. Resolves to the `released` event (also sent to onEvent).
   */
  async releaseMemory() {
    if (!this._spawn) throw new FlexQuantError('input', 'releaseMemory needs the default worker (CreateWorkerEngine without a worker argument)');
    if (this._answering) throw new FlexQuantError('busy', 'an answer is running (release after it ends)');
    if (this._releasing) return this._releasing;
    const t0 = performance.now();
    // The first load's files are written to the Cache API in the background, then the steps
    // below are prefetched (`prefetching`): a worker terminated before that ends leaves the new
    // one (and the next page load) to download them again.
    for (const end = t0 + RELEASE_WAIT_MS; performance.now() < end;) {
      if (!(await this.stats()).prefetching) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    if (this._releasing) return this._releasing;
    if (this._answering) throw new FlexQuantError('busy', 'an answer is running (release after it ends)');
    const before = await this.stats();
    let done;
    this._releasing = new Promise((r) => { done = r; });
    // The conversation goes along as its KV cache's bytes, so the next answer runs only its
    // new tokens; if that fails, the next answer runs the whole conversation again.
    let session = null, keptTokens = 0, sessionError = null;
    try {
      session = await this._post('exportSession');
    } catch (e) {
      sessionError = e;
    }
    try {
      await this._post('unload');
      this._worker.terminate();
      this._attach(this._spawn());
      const opts = { ...this._opts, budgetBytes: this._budget, minTokensPerSecond: this._minSpeed,
        maxPerplexity: this._maxPerplexity };
      try {
        await this._post('create', [this._url, opts]);
      } catch (e) {
        // The new worker could not load at the budget: load without it (what was running
        // before came from the cache), then let the engine swap down as it would have.
        this._onEvent?.({ type: 'error', error: errorData(e) });
        this._worker.terminate();
        this._attach(this._spawn());
        await this._post('create', [this._url, { ...opts, budgetBytes: null }]);
        await this._post('setMemoryBudget', [this._budget]);
      }
      if (session?.tokens.length) {
        try {
          await this._post('importSession', [session], [session.kv.buffer]);
          keptTokens = session.tokens.length;
        } catch (e) {
          sessionError = e;
        }
      }
      if (sessionError) this._onEvent?.({ type: 'warning', code: 'session-not-kept', message: `the conversation's KV cache was not carried to the new worker (the next answer runs it again): ${sessionError.message}` });
    } finally {
      this._releasing = null;
      done();
    }
    const after = await this.stats();
    const event = { type: 'released', ms: performance.now() - t0, step: after.step, fromStep: before.step,
      wasmMemoryBytesBefore: before.wasmMemoryBytes, wasmMemoryBytesAfter: after.wasmMemoryBytes,
      networkBytes: after.networkBytes, keptTokens };
    this._onEvent?.(event);
    return event;
  }
  reportHeap(used, limit) { this._call('reportHeap', [used, limit]).catch(() => {}); }
  stats() { return this._call('stats'); }
  trajectory() { return this._call('trajectory'); }
  tokenize(text) { return this._call('tokenize', [text]); }
  detokenize(tokens) { return this._call('detokenize', [Array.from(tokens)]); }
  simulateDeviceLoss() { return this._call('simulateDeviceLoss'); }
  simulatePanic(options = {}) { return this._call('simulatePanic', [options]); }
  /** Whether a panic (or the worker's death) left this engine cleanly failed. */
  get crashed() { return Boolean(this._crashed); }
  async unload() {
    this._stopHeap();
    await this._call('unload');
    this._worker.terminate();
    this._unloaded = true;
  }
}

/**
 * Starts an Engine in a module worker and returns its proxy. `worker` defaults to
 * `new Worker(new URL('./worker-entry.js', import.meta.url), { type: 'module' })`.
 */
export async function CreateWorkerEngine(manifestUrl, options = {}, worker) {
  const spawn = worker ? null : () => new Worker(new URL('./worker-entry.js', import.meta.url), { type: 'module' });
  worker ??= spawn();
  const e = new WorkerEngine(worker, options, spawn);
  // `signal` cannot cross postMessage: an abort ends the worker itself (its downloads with it).
  const { onEvent, onProgress, heapPollMs, autoRelease, signal, ...opts } = options;
  const base = globalThis.location?.href;
  const url = base ? new URL(manifestUrl, base).href : String(manifestUrl);
  e._url = url;
  e._opts = opts;
  const aborted = () => new FlexQuantError('aborted',
    `loading ${url} was aborted (options.signal): its downloads stopped; files already verified stay cached for the next load`);
  let onAbort = null;
  try {
    if (signal?.aborted) throw aborted();
    const created = e._call('create', [url, opts]);
    await (signal ? Promise.race([created, new Promise((_, reject) => {
      onAbort = () => reject(aborted());
      signal.addEventListener('abort', onAbort, { once: true });
    })]) : created);
  } catch (err) {
    e._stopHeap();
    worker.terminate();
    throw err;
  } finally {
    if (onAbort) signal.removeEventListener('abort', onAbort);
  }
  return e;
}
