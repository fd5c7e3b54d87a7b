// Shared by the main-thread engine (index.js) and the worker proxy (worker.js): the error
// class and the OpenAI-style chat API over two primitives, start(request) and next().

// The fields an error may carry besides code and message (index.d.ts `FlexQuantError`).
const FIELDS = ['url', 'file', 'status', 'promptTokens', 'contextTokens'];

export class FlexQuantError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'FlexQuantError';
    this.code = code;
    for (const k of FIELDS) if (extra[k] != null) this[k] = extra[k];
  }
}

/** Any thrown value as a FlexQuantError (the wasm side throws Errors with a `code`). */
export function toFlexQuantError(e) {
  if (e instanceof FlexQuantError) return e;
  if (e && typeof e === 'object' && typeof e.code === 'string') {
    return new FlexQuantError(e.code, e.message ?? String(e), e);
  }
  return new FlexQuantError('internal', e?.message ?? String(e));
}

/** Plain-data form of an error (to cross postMessage). */
export function errorData(e) {
  const f = toFlexQuantError(e);
  return { code: f.code, message: f.message, ...Object.fromEntries(FIELDS.map((k) => [k, f[k]])) };
}

/**
 * `engine.chat.completions.create` and `engine.completions.create` over `startChat(request)`,
 * `startCompletion(request)`, `next()` (a chunk or null) and `interrupt()`. Requests of both
 * take turns, first come first served: a second `create` waits until the running answer has
 * ended (it never interleaves with it). `signal` (an AbortSignal) ends the answer after the
 * current token (`finish_reason: 'abort'`; while the prompt is read, after the current piece
 * of it, with no text), or rejects a request still waiting with code `'aborted'`. Leaving a stream early (`break`) interrupts and ends the turn.
 */
export function answerApi({ startChat, startCompletion }, next, interrupt) {
  let turn = Promise.resolve();
  const aborted = () => new FlexQuantError('aborted', 'the request was aborted before it started');

  /** Waits for the previous answer to end; resolves to a function that ends this turn. */
  async function takeTurn(signal) {
    let done;
    const mine = new Promise((r) => { done = r; });
    const before = turn;
    turn = before.then(() => mine);
    await before;
    if (signal?.aborted) { done(); throw aborted(); }
    return done;
  }

  async function* chunks(signal, end, includeUsage) {
    const onAbort = () => interrupt();
    signal?.addEventListener('abort', onAbort);
    let finished = false;
    try {
      for (;;) {
        const c = await next();
        if (c == null) { finished = true; return; }
        yield c;
        if (includeUsage && c.usage) {
          // OpenAI's `stream_options.include_usage`: one more chunk, no choices, the usage.
          yield { id: c.id, object: c.object, created: c.created, model: c.model, choices: [],
            usage: c.usage };
        }
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (!finished) {
        // The caller left early (or a chunk failed): stop the answer and run it to its end so
        // the engine is free for the next turn (and for swaps between tokens).
        interrupt();
        try { while ((await next()) != null); } catch { /* the error was the caller's */ }
      }
      end();
    }
  }

  /** Starts `request` with `start`: the stream of its chunks, or (not streaming) all of them. */
  async function begin(start, request) {
    const { stream, signal, ...req } = request;
    if (signal?.aborted) throw aborted();
    const end = await takeTurn(signal);
    // An abort while the prompt is read stops it after the piece being read (the answer then
    // ends with 'abort' and no text).
    const onAbort = () => interrupt();
    signal?.addEventListener('abort', onAbort);
    try {
      await start(req);
    } catch (e) {
      end();
      throw e;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    const all = chunks(signal, end, !!stream && req.stream_options?.include_usage === true);
    return { req, stream: !!stream, all };
  }

  async function chatCreate(request = {}) {
    const { req, stream, all } = await begin(startChat, request);
    if (stream) return all;
    // One choice per index (`n` answers come one after the other); with `logprobs: true`,
    // each token's entry gathered from its chunk.
    const choices = [];
    let last = null;
    for await (const c of all) {
      const ch = c.choices[0];
      const into = (choices[ch.index] ??= { index: ch.index, message: { role: 'assistant', content: '' },
        finish_reason: null, ...(req.logprobs === true ? { logprobs: { content: [] } } : {}) });
      into.message.content += ch.delta.content ?? '';
      // A function call (tools): its first delta has the id, type and name, the others more
      // of its arguments' text.
      for (const d of ch.delta.tool_calls ?? []) {
        const calls = (into.message.tool_calls ??= []);
        if (d.id) calls[d.index] = { id: d.id, type: d.type, function: { name: d.function.name, arguments: '' } };
        calls[d.index].function.arguments += d.function.arguments ?? '';
      }
      if (into.logprobs && ch.logprobs) into.logprobs.content.push(...ch.logprobs.content);
      if (ch.finish_reason) into.finish_reason = ch.finish_reason;
      last = c;
    }
    // OpenAI's shape: an answer that is only a call has `content: null`.
    for (const ch of choices) if (ch.message.tool_calls && ch.message.content === '') ch.message.content = null;
    return {
      id: last.id, object: 'chat.completion', created: last.created, model: last.model,
      choices, usage: last.usage,
    };
  }

  /**
   * A text completion: the same chunks' `text` joined per choice; with `logprobs` (a count),
   * each chunk's token appended to the choice's parallel lists.
   */
  async function textCreate(request = {}) {
    const { req, stream, all } = await begin(startCompletion, request);
    if (stream) return all;
    const choices = [];
    let last = null;
    const lists = () => ({ tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] });
    for await (const c of all) {
      const ch = c.choices[0];
      const into = (choices[ch.index] ??= { index: ch.index, text: '', finish_reason: null,
        logprobs: req.logprobs != null ? lists() : null });
      into.text += ch.text;
      if (into.logprobs && ch.logprobs) for (const k in into.logprobs) into.logprobs[k].push(...ch.logprobs[k]);
      if (ch.finish_reason) into.finish_reason = ch.finish_reason;
      last = c;
    }
    return { id: last.id, object: 'text_completion', created: last.created, model: last.model, choices, usage: last.usage };
  }

  return { chat: { completions: { create: chatCreate } }, completions: { create: textCreate } };
}

/** Reads performance.memory every `ms` and hands it to `report(used, limit)`; returns a stop function. */
export function pollHeap(ms, report) {
  const mem = () => globalThis.performance?.memory;
  if (!(ms > 0) || !mem()) return () => {};
  const t = setInterval(() => {
    const m = mem();
    if (m) report(m.usedJSHeapSize, m.jsHeapSizeLimit);
  }, ms);
  return () => clearInterval(t);
}
