import type { EngineApi, EngineOptions, Chat, ChatRequest, ChatCompletionChunk, Stats, TrajectoryPoint } from './index.js';
export { FlexQuantError } from './index.js';

export declare class WorkerEngine implements EngineApi {
  readonly chat: Chat;
  interruptGenerate(): void;
  resetChat(): Promise<void>;
  setMemoryBudget(bytes: number | null): Promise<void>;
  reportHeap(usedJSHeapSize: number, jsHeapSizeLimit: number): void;
  stats(): Promise<Stats>;
  trajectory(): Promise<TrajectoryPoint[]>;
  simulateDeviceLoss(): Promise<void>;
  unload(): Promise<void>;
  startChat(request: ChatRequest): Promise<unknown>;
  nextChunk(): Promise<ChatCompletionChunk | null>;
}

/** Starts an Engine in a module Web Worker (default: the package's worker-entry.js). */
export declare function CreateWorkerEngine(
  manifestUrl: string | URL,
  options?: Omit<EngineOptions, 'wasmUrl'>,
  worker?: Worker,
): Promise<WorkerEngine>;
