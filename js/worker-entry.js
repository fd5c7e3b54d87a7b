// The module worker script: runs an Engine and answers the proxy's calls (worker.js).
import { Engine } from './index.js';
import { errorData } from './common.js';

let engine = null;
const post = (m) => self.postMessage(m);

// Read-ahead: once a chunk is posted, the next one is computed while the page handles it, so
// the answer does not wait a message round trip per token (~2 ms of a ~25 ms token measured
// on the CPU backend). One chunk at most; it is handed to the next `nextChunk` call.
let ahead = null;
// Calls that only set a flag or pass a reading may run beside it; the others wait for it to
// settle (they would find the engine busy) and leave it for `nextChunk`.
const BESIDE_AHEAD = new Set(['nextChunk', 'interruptGenerate', 'reportHeap']);

const methods = {
  async create(url, opts) {
    engine = await Engine.create(url, { ...opts, heapPollMs: 0, onEvent: (e) => post({ event: e }) });
  },
  startChat: (req) => engine.startChat(req),
  startCompletion: (req) => engine.startCompletion(req),
  nextChunk: () => {
    const next = ahead ?? engine.nextChunk();
    ahead = null;
    return next;
  },
  interruptGenerate: () => engine.interruptGenerate(),
  resetChat: () => engine.resetChat(),
  exportSession: () => engine.exportSession(),
  importSession: (s) => engine.importSession(s),
  setMemoryBudget: (b) => engine.setMemoryBudget(b),
  setMinTokensPerSecond: (t) => engine.setMinTokensPerSecond(t),
  setMaxPerplexity: (p) => engine.setMaxPerplexity(p),
  reportHeap: (used, limit) => engine.reportHeap(used, limit),
  stats: () => engine.stats(),
  trajectory: () => engine.trajectory(),
  tokenize: (text) => engine.tokenize(text),
  detokenize: (tokens) => engine.detokenize(tokens),
  simulateDeviceLoss: () => engine.simulateDeviceLoss(),
  simulatePanic: (opts) => engine.simulatePanic(opts),
  unload: () => engine.unload(),
};

// A panic inside an async call surfaces twice: as the call's `internal` rejection (index.js)
// and as an uncaught RuntimeError from wasm-bindgen's task queue. The rejection says more and
// arrives with its call's id; keep the bare RuntimeError from reaching the proxy's onerror.
self.addEventListener('error', (e) => {
  if (e.error instanceof WebAssembly.RuntimeError && globalThis.__flexquantPanic) e.preventDefault();
});

self.onmessage = async ({ data: { id, method, args } }) => {
  try {
    if (!methods[method]) throw new Error(`unknown method ${method}`);
    if (method !== 'create' && !engine) throw Object.assign(new Error('the engine is not created'), { code: 'unloaded' });
    if (ahead && !BESIDE_AHEAD.has(method)) await ahead.catch(() => {});
    const result = (await methods[method](...args)) ?? null;
    // An exported session's KV bytes move to the page rather than being copied.
    const transfer = method === 'exportSession' && result ? [result.kv.buffer] : [];
    self.postMessage({ id, result }, transfer);
    if (method === 'nextChunk' && result !== null && !ahead) {
      // Its error, if any, reaches the next `nextChunk` call.
      ahead = engine.nextChunk();
      ahead.catch(() => {});
    }
  } catch (e) {
    // `crashed`: a panic left the engine failed; the proxy terminates this worker.
    post({ id, error: errorData(e), crashed: Boolean(engine?.crashed) });
  }
};
