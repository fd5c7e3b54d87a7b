import type { EngineApi, EngineOptions, ReleasedEvent } from './index.js';
export { FlexQuantError } from './index.js';

/** The main-thread proxy of an Engine in a Web Worker (EngineApi's members, merged). */
export interface WorkerEngine extends EngineApi {
  /** Re-creates the worker at the current budget (from the cache) to give back wasm memory. */
  releaseMemory(): Promise<ReleasedEvent>;
}
export declare class WorkerEngine {}

/** Starts an Engine in a module Web Worker (default: the package's worker-entry.js). */
export declare function CreateWorkerEngine(
  manifestUrl: string | URL,
  /** autoRelease (default true): re-create the worker after a budget cut well below its wasm heap. */
  options?: Omit<EngineOptions, 'wasmUrl'> & { autoRelease?: boolean },
  worker?: Worker,
): Promise<WorkerEngine>;
