// The main-thread proxy of an Engine running in a Web Worker (worker-entry.js): the same API,
// every method async. It polls performance.memory (workers lack it) and forwards it.
import { FlexQuantError, chatApi, pollHeap } from './common.js';

export { FlexQuantError };

export class WorkerEngine {
  constructor(worker, options = {}) {
    this._worker = worker;
    this._calls = new Map();
    this._next = 0;
    this._onEvent = options.onEvent;
    this._onProgress = options.onProgress;
    worker.onmessage = ({ data }) => {
      if (data.event) {
        if (data.event.type === 'progress') this._onProgress?.(data.event);
        this._onEvent?.(data.event);
        return;
      }
      const c = this._calls.get(data.id);
      if (!c) return;
      this._calls.delete(data.id);
      if (data.error) c.reject(new FlexQuantError(data.error.code, data.error.message, data.error));
      else c.resolve(data.result);
    };
    worker.onerror = (e) => {
      const err = new FlexQuantError('internal', `worker error: ${e.message ?? e}`);
      for (const c of this._calls.values()) c.reject(err);
      this._calls.clear();
    };
    this.chat = chatApi((req) => this.startChat(req), () => this.nextChunk());
    this._stopHeap = pollHeap(options.heapPollMs ?? 1000, (u, l) => this.reportHeap(u, l));
  }

  _call(method, args = []) {
    const id = this._next++;
    return new Promise((resolve, reject) => {
      this._calls.set(id, { resolve, reject });
      this._worker.postMessage({ id, method, args });
    });
  }

  startChat(request) { return this._call('startChat', [request]); }
  nextChunk() { return this._call('nextChunk'); }
  interruptGenerate() { this._call('interruptGenerate').catch(() => {}); }
  resetChat() { return this._call('resetChat'); }
  setMemoryBudget(bytes) { return this._call('setMemoryBudget', [bytes ?? null]); }
  setMinTokensPerSecond(tokensPerSecond) { return this._call('setMinTokensPerSecond', [tokensPerSecond ?? null]); }
  reportHeap(used, limit) { this._call('reportHeap', [used, limit]).catch(() => {}); }
  stats() { return this._call('stats'); }
  trajectory() { return this._call('trajectory'); }
  simulateDeviceLoss() { return this._call('simulateDeviceLoss'); }
  async unload() {
    this._stopHeap();
    await this._call('unload');
    this._worker.terminate();
  }
}

/**
 * Starts an Engine in a module worker and returns its proxy. `worker` defaults to
 * `new Worker(new URL('./worker-entry.js', import.meta.url), { type: 'module' })`.
 */
export async function CreateWorkerEngine(manifestUrl, options = {}, worker) {
  worker ??= new Worker(new URL('./worker-entry.js', import.meta.url), { type: 'module' });
  const e = new WorkerEngine(worker, options);
  const { onEvent, onProgress, heapPollMs, ...opts } = options;
  const base = globalThis.location?.href;
  const url = base ? new URL(manifestUrl, base).href : String(manifestUrl);
  try {
    await e._call('create', [url, opts]);
  } catch (err) {
    e._stopHeap();
    worker.terminate();
    throw err;
  }
  return e;
}
