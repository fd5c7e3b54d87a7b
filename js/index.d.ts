// Types of the flexquant browser API (see API.md).

export type ErrorCode =
  | 'manifest-not-found' | 'http' | 'network' | 'manifest-invalid' | 'manifest-version'
  | 'hash-mismatch' | 'truncated' | 'quota-exceeded' | 'webgpu-unavailable' | 'out-of-memory'
  | 'device-lost' | 'unloaded' | 'busy' | 'aborted' | 'unsupported' | 'context-length'
  | 'non-finite-logits' | 'input' | 'internal';

export declare class FlexQuantError extends Error {
  readonly name: 'FlexQuantError';
  readonly code: ErrorCode;
  readonly url?: string;
  readonly file?: string;
  readonly status?: number;
  /** `context-length`: the prompt's tokens (the conversation as the model would read it). */
  readonly promptTokens?: number;
  /** `context-length`: the tokens the context holds (the engine's `context` option). */
  readonly contextTokens?: number;
}

export interface ProgressEvent {
  type: 'progress';
  phase: 'download' | 'upload' | 'ready' | 'prefetch' | 'swap';
  file?: string;
  loadedBytes?: number;
  totalBytes?: number;
  filesDone?: number;
  filesTotal?: number;
  etaSeconds?: number | null;
  fromCache?: number;
  step?: number;
}

export interface SwapEvent {
  type: 'swap';
  from: number;
  to: number;
  module: string;
  bits: number;
  modules: { module: string; fromBits: number; toBits: number }[];
  ms: number;
  reason: string;
  footprintBytes: number;
  tokenIndex: number | null;
}

export interface BackendEvent { type: 'backend'; backend: 'webgpu' | 'cpu'; reason: string; label: string }
/** The worker engine re-created its worker to give back wasm memory (see worker.d.ts). */
export interface ReleasedEvent { type: 'released'; ms: number; step: number; fromStep: number; wasmMemoryBytesBefore: number; wasmMemoryBytesAfter: number; networkBytes: number; /** Conversation tokens whose KV cache moved to the new worker (0: the next answer runs them again). */ keptTokens: number }
export interface DeviceLostEvent { type: 'device-lost'; step: number; message: string }
export interface RecoveredEvent { type: 'recovered'; from: number; to: number; ms: number; reprefilledTokens: number }
export interface ErrorEvent { type: 'error'; error: { code: ErrorCode; message: string; file?: string | null; url?: string | null } }
/** The engine works, but not as the app may assume (`chat-template-fallback`: the model has no chat template; prompts are ChatML). */
export interface WarningEvent { type: 'warning'; code: 'chat-template-fallback' | 'threads' | 'tool-schema-loose' | 'schema-loose' | 'session-not-kept' | string; message: string }
/**
 * The controller holds at the quality floor (`maxPerplexity`) although even that step does not
 * fit the budget: `step` is where it holds, `costBytes` what that step needs (model + KV cache),
 * `budgetBytes` the budget it misses. Once per episode; the app decides what to do.
 */
export interface BelowFloorEvent { type: 'below-floor'; step: number | null; floorStep: number | null; budgetBytes: number | null; costBytes: number | null }
/**
 * With `kvCache: 'auto'`: the controller converted the held KV cache (f16 -> int8) instead of
 * stepping the weights down for memory, the conversation kept.
 */
export interface KvCacheEvent { type: 'kv-cache'; from: KvCacheFormat; to: KvCacheFormat; bytesBefore: number; bytesAfter: number; tokenIndex: number | null }
/**
 * A long prompt is being read: `doneTokens` of its `totalTokens` are in the KV cache
 * (`reusedTokens` of them were there from the conversation before). After each piece but the
 * last; the first answer token follows the last piece.
 */
export interface PrefillEvent { type: 'prefill'; doneTokens: number; totalTokens: number; reusedTokens: number }
export type EngineEvent = ProgressEvent | BackendEvent | SwapEvent | ReleasedEvent | DeviceLostEvent | RecoveredEvent | ErrorEvent | WarningEvent | BelowFloorEvent | KvCacheEvent | PrefillEvent;

/** runtime::Policy (snake_case, every field optional). */
export interface Policy {
  headroom?: number;
  up_margin?: number;
  up_delay_ms?: number;
  max_up_growth?: number;
  high_water?: number;
  low_water?: number;
  fault_cooldown_ms?: number;
  ceiling_clear_ms?: number;
}

export interface EngineOptions {
  onProgress?: (p: ProgressEvent) => void;
  onEvent?: (e: EngineEvent) => void;
  /** 'auto' (default): WebGPU unless it is missing or a CPU emulation; then the CPU backend. */
  backend?: 'auto' | 'webgpu' | 'cpu';
  /**
   * Threads of the CPU backend (1..64, or 'auto': `checkSupport().threads.autoThreads`), at
   * most `navigator.hardwareConcurrency`. More than one only in a worker engine
   * (CreateWorkerEngine) of a cross-origin isolated page; elsewhere one thread runs. Fewer
   * than asked for is a 'threads' warning event.
   */
  threads?: number | 'auto';
  /**
   * true (default): each decode token runs on the thread count measured fastest now (all,
   * half, ... one; re-measured now and then and when tokens slow down), since other work on
   * the cores can make more threads slower. false: always `threads`.
   */
  adaptThreads?: boolean;
  /** Slowest acceptable decode (tokens/s): the model steps down while slower, up with headroom. */
  minTokensPerSecond?: number;
  /** Quality floor: never step to an EQM whose (held-out) perplexity is above this. */
  maxPerplexity?: number;
  /** App memory budget in bytes for model + KV cache + activations. */
  budgetBytes?: number;
  /** KV-cache positions (default 4096, at most the model's). */
  context?: number;
  /**
   * How the KV cache stores keys and values: 'auto' (default): f16 until memory runs short,
   * then the held cache goes to int8 before the weights step down (a `kv-cache` event; a new
   * chat starts in f16 again); 'f16' throughout (2 bytes per element); or 'int8' throughout
   * (codes in groups of 32 with a scale each: 0.56x the bytes, +0.07% perplexity on the demo).
   */
  kvCache?: KvCacheChoice;
  /** Cache API bucket (default 'flexquant'). */
  cacheName?: string;
  /** false: never use the Cache API. */
  useCache?: boolean;
  /** At most this many bytes of this ensemble in the Cache API; past it files are used uncached (a 'quota-exceeded' error event). */
  cacheQuotaBytes?: number;
  /** Downloads at a time (1..32; default 12). */
  parallelDownloads?: number;
  /**
   * How long a download may go without data (headers, then each chunk) before it is aborted and
   * retried (3 retries), then given up as a `network` error (ms; default 30000, 0 = no limit).
   */
  stallTimeoutMs?: number;
  /**
   * Prompt tokens read between two looks at the event loop, where an abort or a budget is
   * taken in and a `prefill` event is sent (default: as many as take about 250 ms).
   */
  prefillChunkTokens?: number;
  /**
   * Aborting it while the engine loads stops the load (its downloads too; a worker engine's
   * worker ends) and `create` rejects with code `aborted`. Files already verified stay cached.
   */
  signal?: AbortSignal;
  policy?: Policy;
  /** How often performance.memory is read (ms; 0 = never). Default 1000. */
  heapPollMs?: number;
  /** Where flexquant_bg.wasm is (default: next to the package's wasm/flexquant.js). */
  wasmUrl?: string | URL;
}

/** A call the model made, as it comes back in `message.tool_calls` and is sent back in the conversation. */
export interface ToolCall { id: string; type: 'function'; function: { name: string; /** The arguments object as JSON text. */ arguments: string } }

export type ChatMessage =
  | { role: 'system' | 'user'; content: string }
  | { role: 'assistant'; content: string | null; tool_calls?: ToolCall[] }
  /** A call's result, for the call `tool_call_id` names. */
  | { role: 'tool'; content: string; tool_call_id: string };

/** A function the model may call: `parameters` is a JSON Schema, enforced while the call is written (js/API.md). */
export interface ChatTool {
  type: 'function';
  function: { name: string; description?: string; parameters?: Record<string, unknown>; strict?: boolean | null };
}

export type ToolChoice = 'none' | 'auto' | 'required' | { type: 'function'; function: { name: string } };

export interface ChatRequest {
  messages: ChatMessage[];
  stream?: boolean;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  /** At most 40 (the candidates a backend returns per token). */
  top_k?: number;
  max_completion_tokens?: number;
  seed?: number;
  /** Up to 16 strings: the answer ends where one first appears (not shown; finish_reason 'stop'). */
  stop?: string | string[] | null;
  /** In [-2, 2]: subtracted from a token's logit per time it is already in the answer. */
  frequency_penalty?: number;
  /** In [-2, 2]: subtracted from a token's logit if it is already in the answer. */
  presence_penalty?: number;
  /** Token id -> bias in [-100, 100], added to its logit (at most 300 entries). */
  logit_bias?: Record<string, number> | null;
  /** include_usage: one more chunk after the last, with `choices: []` and the usage. */
  stream_options?: { include_usage?: boolean } | null;
  /** Accepted and ignored (one model per engine). */
  model?: string;
  user?: string;
  /**
   * 1-8 answers, generated one after the other from the same prompt (each with seed + its
   * index); streamed as chunks with `choices[0].index` 0, then 1, ...; `usage` counts them all.
   */
  n?: number;
  /**
   * `json_object`: JSON mode, the answer is one JSON object (tokens that would leave one are
   * never drawn; the answer ends when the object closes, finish_reason 'stop'). `json_schema`:
   * an object that follows `schema` (the subset js/API.md lists; other keywords are rejected
   * with code 'unsupported', naming where they are).
   */
  response_format?:
    | { type: 'text' }
    | { type: 'json_object' }
    | { type: 'json_schema'; json_schema: { name?: string; description?: string; strict?: boolean; schema: Record<string, unknown> } }
    | null;
  /**
   * Each token's log-probability under the model (before temperature, penalties, bias and
   * JSON mode) in `choices[].logprobs`, with `top_logprobs` (0..20) most likely alternatives.
   */
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  /**
   * Functions the model may call (at most 128). A call comes back in `message.tool_calls`
   * (streamed: `delta.tool_calls`, the name first, then the arguments as they are written)
   * with finish_reason 'tool_calls'; its arguments follow the function's `parameters`.
   */
  tools?: ChatTool[] | null;
  /** 'auto' (the default with tools): a call or text; 'required': a call; a named function: a call to it; 'none': text. */
  tool_choice?: ToolChoice | null;
  /** `false`: an answer makes one call at most (by default up to 8, one after the other). */
  parallel_tool_calls?: boolean | null;
  /** Ends the answer after the current token (finish_reason 'abort'); a request still waiting for its turn rejects with code 'aborted'. */
  signal?: AbortSignal;
  /** Generate max_tokens even past the end-of-turn token (benchmarks). */
  ignore_eos?: boolean;
}

/**
 * `engine.completions.create`: OpenAI's (legacy) text completion. The `prompt` is continued as
 * it is (no chat template); the sampling, length, stop and `n` fields are the chat request's.
 * Fields it does not take (`messages`, `tools`, `response_format`, `top_logprobs`, `suffix`,
 * `best_of`, ...) reject with code 'unsupported' naming the field.
 */
export interface CompletionRequest {
  /**
   * What to continue: a string, a list of strings (up to 64, each answered `n` times: choice
   * `index` = prompt * n + answer), token ids of this model (`tokenize`), or a list of those.
   */
  prompt: string | number[] | (string | number[])[];
  /**
   * Each choice's text starts with its prompt; with `logprobs`, the prompt's tokens come scored
   * first in `choices[].logprobs` (`max_tokens: 0`: the prompt alone).
   */
  echo?: boolean | null;
  /** Each token's log-probability with this many alternatives (0..5) in `choices[].logprobs`. */
  logprobs?: number | null;
  stream?: boolean;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  seed?: number;
  stop?: string | string[] | null;
  frequency_penalty?: number;
  presence_penalty?: number;
  logit_bias?: Record<string, number> | null;
  stream_options?: { include_usage?: boolean } | null;
  model?: string;
  user?: string;
  n?: number;
  signal?: AbortSignal;
  ignore_eos?: boolean;
}

export interface CompletionChunk {
  id: string;
  object: 'text_completion';
  created: number;
  model: string;
  /** Empty in the extra usage chunk of `stream_options.include_usage`. */
  choices: { index: number; text: string; finish_reason: FinishReason | null; logprobs: CompletionLogprobs | null }[];
  usage?: Usage;
}

/**
 * A text completion's `choices[].logprobs` (with `logprobs: N`): parallel lists, one entry per
 * token (one per chunk when streaming; with `echo`, the prompt's tokens first): its text, its
 * log-probability, the N most likely tokens at its position with theirs (the token itself among
 * them), and where it starts in the choice's text (characters). The prompt's first token has
 * null for both (nothing precedes it).
 */
export interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: (Record<string, number> | null)[];
  text_offset: number[];
}

export interface Completion {
  id: string;
  object: 'text_completion';
  created: number;
  model: string;
  choices: { index: number; text: string; finish_reason: FinishReason; logprobs: CompletionLogprobs | null }[];
  usage: Usage;
}

export interface Completions {
  create(request: CompletionRequest & { stream: true }): Promise<AsyncIterable<CompletionChunk>>;
  create(request: CompletionRequest & { stream?: false }): Promise<Completion>;
}

/** What `startChat` resolves to once the prompt is prefilled. */
export interface Started { promptTokens: number }

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** Prompt tokens the KV cache already held (the prefix shared with the conversation before; OpenAI's field). */
  prompt_tokens_details: { cached_tokens: number };
  extra: { prefill_tokens_per_s: number | null; decode_tokens_per_s: number | null; step: number; swaps: number };
}

export type FinishReason = 'stop' | 'length' | 'abort' | 'tool_calls';

/** `delta.tool_calls[]`: a call's first delta has its id, type and name; the others more of its arguments' JSON text. */
export interface ToolCallDelta { index: number; id?: string; type?: 'function'; function: { name?: string; arguments: string } }

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  /** Empty in the extra usage chunk of `stream_options.include_usage`. */
  choices: { index: number; delta: { role?: 'assistant'; content?: string; tool_calls?: ToolCallDelta[] }; finish_reason: FinishReason | null; logprobs?: ChatLogprobs }[];
  usage?: Usage;
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: { index: number; message: { role: 'assistant'; content: string | null; tool_calls?: ToolCall[] }; finish_reason: FinishReason; logprobs?: ChatLogprobs }[];
  usage: Usage;
}

/** A token: its text (its bytes as UTF-8, lossy where a character is split), log-probability and bytes. */
export interface TopLogprob { token: string; logprob: number; bytes: number[] }

/** A generated token's entry: itself and the `top_logprobs` most likely tokens at its position. */
export interface ContentLogprob { token: string; logprob: number; bytes: number[]; top_logprobs: TopLogprob[] }

/** `choices[].logprobs` with `logprobs: true`: one entry per token (per chunk when streaming). */
export interface ChatLogprobs { content: ContentLogprob[] }

export interface Stats {
  step: number;
  steps: number;
  targetStep: number | null;
  footprintBytes: number | null;
  overheadBytes: number;
  gpuAllocatedBytes: number;
  gpuBuffers: number;
  budgetBytes: number | null;
  effectiveBudgetBytes: number | null;
  heapRatio: number | null;
  tokensPerSecond: number | null;
  prefillTokensPerSecond: number | null;
  minTokensPerSecond: number | null;
  /** The quality floor as a step (the deepest the controller may go). */
  floorStep: number | null;
  measuredTokensPerSecond: number | null;
  speedCapBytes: number | null;
  swaps: number;
  swapsDown: number;
  swapsUp: number;
  deviceLosses: number;
  ooms: number;
  swapFailures: number;
  adapter: string;
  /** Threads the CPU backend computes with at most (1 on WebGPU). */
  threads: number;
  /** Threads the last decode token ran on (see `adaptThreads`). */
  threadsActive: number;
  backend: 'webgpu' | 'cpu';
  backendReason: string;
  heldBytes: number;
  /** Bytes of the KV cache now: grows in blocks of 128 positions with the conversation; `resetChat` frees it. */
  kvCacheBytes: number;
  /** How the KV cache stores keys and values now (the `kvCache` option; with 'auto', the format it is in). */
  kvCache: KvCacheFormat;
  wasmMemoryBytes: number;
  loadedFromCache: boolean;
  networkBytes: number;
  cacheBytes: number;
  prefetching: boolean;
  contextTokens: number;
  /** Positions the KV cache may hold (it grows to them as used): the prompt plus the answer must fit. */
  contextLength: number;
  /** Bits of every module, ModuleId order (layer-major: q k v o gate up down). */
  bits: number[];
  lastReason: string | null;
  lastSwapReason: string | null;
  modelName: string;
  unloaded: boolean;
}

export interface TrajectoryPoint {
  step: number;
  footprintBytes: number;
  calibPpl: number | null;
  heldoutPpl: number | null;
  module: string | null;
  fromBits: number | null;
  toBits: number | null;
}

export interface Chat {
  completions: {
    create(request: ChatRequest & { stream: true }): Promise<AsyncIterable<ChatCompletionChunk>>;
    create(request: ChatRequest & { stream?: false }): Promise<ChatCompletion>;
  };
}

/**
 * A conversation and its KV cache's bytes (`exportSession`): `importSession` on an
 * engine of the same ensemble goes on from it without running it again.
 */
export interface ExportedSession {
  format: 'flexquant-session';
  version: number;
  /** The ensemble's model name and the sha256 of its base shard (what importSession checks). */
  model: string;
  base: string;
  kvCache: KvCacheFormat;
  /** The conversation's tokens the KV cache holds. */
  tokens: Uint32Array;
  /** The KV cache: each layer's keys then its values, tokens.length positions each (API.md). */
  kv: Uint8Array;
}

export interface EngineApi {
  readonly chat: Chat;
  /** Text completions: a prompt continued as it is (see CompletionRequest). */
  readonly completions: Completions;
  interruptGenerate(): void;
  resetChat(): Promise<void>;
  /** The conversation and its KV cache's bytes (either backend: the same layout on both). */
  exportSession(): Promise<ExportedSession>;
  /**
   * Replaces the conversation by an exported one (a running answer ends), checked against this
   * ensemble; rejects with `input` naming what disagrees (or `out-of-memory`, `context-length`), the conversation then as it was. Through
   * a worker engine the session's `kv` is transferred (detached here).
   */
  importSession(session: ExportedSession): Promise<void>;
  setMemoryBudget(bytes: number | null): Promise<void>;
  /** The slowest decode the app accepts: below it the model steps down the trajectory. */
  setMinTokensPerSecond(tokensPerSecond: number | null): Promise<void>;
  /** Quality floor: the controller never steps below the deepest step within it (null: none). */
  setMaxPerplexity(maxPerplexity: number | null): Promise<void>;
  reportHeap(usedJSHeapSize: number, jsHeapSizeLimit: number): void;
  stats(): Promise<Stats>;
  trajectory(): Promise<TrajectoryPoint[]>;
  /** `text` as this model's token ids (what `completions.create` takes as a `prompt` of ids). */
  tokenize(text: string): Promise<number[]>;
  /** Token ids back to text; an id outside the vocabulary rejects with `input`. */
  detokenize(tokens: ArrayLike<number>): Promise<string>;
  simulateDeviceLoss(): Promise<void>;
  /**
   * Panics inside wasm (tests): rejects with code internal; the engine is then cleanly failed.
   * `async: true` panics after an await (on wasm-bindgen's task queue), which rejects too.
   */
  simulatePanic(options?: { async?: boolean }): Promise<void>;
  /** True once a panic left the engine cleanly failed (every call rejects with `internal`). */
  readonly crashed: boolean;
  unload(): Promise<void>;
  /** Low level: prefill a conversation, then take chunks with nextChunk() until null. */
  startChat(request: ChatRequest): Promise<Started>;
  /** Low level: prefill a text completion's prompt; its chunks are CompletionChunks. */
  startCompletion(request: CompletionRequest): Promise<Started>;
  nextChunk(): Promise<ChatCompletionChunk | CompletionChunk | null>;
}

/** `Engine.checkSupport`: what this browser offers, and which backend `auto` picks. */
export interface Support {
  backend: 'webgpu' | 'cpu';
  reason: string;
  /** The WebGPU adapter's label (e.g. 'google swiftshader (fallback)'), null without one. */
  adapter: string | null;
  /** The adapter emulates a GPU on the CPU (fallback, SwiftShader, llvmpipe, lavapipe). */
  emulatedGpu: boolean;
  /** COOP/COEP are set: SharedArrayBuffer, hence wasm threads. */
  crossOriginIsolated: boolean;
  /** What threads a worker engine's CPU backend gets here. */
  threads: ThreadSupport;
  /** https:// or localhost: WebGPU, the Cache API and SubtleCrypto need it. */
  secureContext: boolean;
  /** `navigator.gpu` exists. */
  webgpu: boolean;
  /** What the adapter offers; null without an adapter. */
  gpu: GpuOffer | null;
}

export interface ThreadSupport {
  /** Whether a worker engine here can run the CPU backend on several threads. */
  available: boolean;
  /** Threads `threads: 'auto'` starts in a worker engine here (1 when not available). */
  autoThreads: number;
  /** `navigator.hardwareConcurrency`. */
  hardwareConcurrency: number;
  /** Why not, or how many. */
  reason: string;
}

export interface GpuOffer {
  /** `adapter.info.isFallbackAdapter`. */
  fallback: boolean;
  /** `shader-f16`: the f16 kernels (f32 otherwise). */
  f16: boolean;
  /** `subgroups`: subgroup reductions (workgroup memory otherwise). */
  subgroups: boolean;
  limits: {
    maxBufferSize: number;
    maxStorageBufferBindingSize: number;
    maxStorageBuffersPerShaderStage: number;
    maxComputeInvocationsPerWorkgroup: number;
    maxComputeWorkgroupStorageSize: number;
  };
}

export interface StepInfo {
  step: number;
  footprintBytes: number;
  /** Held-out perplexity (calibration when the builder measured no step on held-out text: one scale for the whole trajectory); interpolated in footprint where not measured. */
  perplexity: number | null;
  measured: boolean;
  meanBits: number;
}

/** How the KV cache stores keys and values (`stats().kvCache`). */
export type KvCacheFormat = 'f16' | 'int8';
/** The `kvCache` option: a format kept throughout, or 'auto' (f16, int8 under pressure). */
export type KvCacheChoice = KvCacheFormat | 'auto';

/** `Engine.inspect`: what an ensemble needs, from its manifest alone. */
export interface Inspection {
  name: string;
  layers: number;
  hiddenSize: number;
  vocabSize: number;
  maxContext: number;
  nUp: number;
  nLow: number;
  groupSize: number;
  trajectory: StepInfo[];
  /** The KV cache choice these totals are for (`inspect`'s `kvCache`, default 'auto'). */
  kvCache: KvCacheChoice;
  /** KV cache bytes per position (keys and values, every layer; both backends), in the format the cache starts in. */
  kvBytesPerToken: number;
  context: number;
  /** The KV cache of `context` positions in the format it starts in (f16 for 'auto'). */
  kvBytes: number;
  /** That cache in the smallest format it may take ('auto': int8). */
  minKvBytes: number;
  /** Smallest step's footprint plus `minKvBytes`; largest step's plus `kvBytes`. */
  minTotalBytes: number;
  maxTotalBytes: number;
  /** Every file once; and what the first load fetches (step 0, base, tokenizer). */
  downloadBytes: number;
  firstLoadBytes: number;
}

/** `Engine.cached`: what the Cache API holds of an ensemble. */
export interface CacheReport {
  url: string;
  cacheName: string | null;
  manifestCached: boolean;
  files: number;
  cachedFiles: number;
  totalBytes: number;
  cachedBytes: number;
  /** Steps whose every file is cached: they load offline. */
  completeSteps: number[];
  /** What the browser lets this origin store (`navigator.storage`); null where it does not say. */
  storage: StorageReport;
}

export interface StorageReport {
  /** Bytes the origin may use in all (Cache API, IndexedDB, ...): `estimate().quota`. */
  quotaBytes: number | null;
  /** Bytes it uses now: `estimate().usage`. */
  usageBytes: number | null;
  /**
   * `persisted()`: the browser keeps the origin's data under storage pressure; false: it may
   * evict it (cached models included). `navigator.storage.persist()` asks for it.
   */
  persisted: boolean | null;
}

export interface CacheOptions {
  cacheName?: string;
  useCache?: boolean;
  wasmUrl?: string | URL;
}

/** The engine on this thread (the members are EngineApi's, by declaration merging). */
export interface Engine extends EngineApi {}
export declare class Engine {
  static create(manifestUrl: string | URL, options?: EngineOptions): Promise<Engine>;
  /** Which backend `auto` would pick here and why, loading nothing. */
  static checkSupport(options?: { wasmUrl?: string | URL }): Promise<Support>;
  /** What the ensemble needs (no GPU, nothing loaded or cached). */
  static inspect(manifestUrl: string | URL, options?: { context?: number; kvCache?: KvCacheChoice; wasmUrl?: string | URL }): Promise<Inspection>;
  /** Which steps load offline from the cache, and the bytes cached. */
  static cached(manifestUrl: string | URL, options?: CacheOptions): Promise<CacheReport>;
  /** Deletes every version of the ensemble's files from the cache; the entries deleted. */
  static deleteCached(manifestUrl: string | URL, options?: CacheOptions): Promise<number>;
}
