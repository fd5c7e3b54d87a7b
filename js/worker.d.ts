import type { EngineApi, EngineOptions } from './index.js';
export { FlexQuantError } from './index.js';

/** The main-thread proxy of an Engine in a Web Worker (EngineApi's members, merged). */
export interface WorkerEngine extends EngineApi {}
export declare class WorkerEngine {}

/** Starts an Engine in a module Web Worker (default: the package's worker-entry.js). */
export declare function CreateWorkerEngine(
  manifestUrl: string | URL,
  options?: Omit<EngineOptions, 'wasmUrl'>,
  worker?: Worker,
): Promise<WorkerEngine>;
