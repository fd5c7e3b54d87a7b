// Shared by the main-thread engine (index.js) and the worker proxy (worker.js): the error
// class and the OpenAI-style chat API over two primitives, start(request) and next().

export class FlexQuantError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'FlexQuantError';
    this.code = code;
    for (const k of ['url', 'file', 'status']) if (extra[k] != null) this[k] = extra[k];
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
  return { code: f.code, message: f.message, url: f.url, file: f.file, status: f.status };
}

/** `engine.chat.completions.create` over `start(request)` and `next()` (a chunk or null). */
export function chatApi(start, next) {
  async function* chunks() {
    for (;;) {
      const c = await next();
      if (c == null) return;
      yield c;
    }
  }
  async function create(request = {}) {
    const { stream, ...req } = request;
    await start(req);
    if (stream) return chunks();
    let content = '';
    let last = null;
    for await (const c of chunks()) {
      content += c.choices[0].delta.content ?? '';
      last = c;
    }
    return {
      id: last.id, object: 'chat.completion', created: last.created, model: last.model,
      choices: [{ index: 0, message: { role: 'assistant', content },
        finish_reason: last.choices[0].finish_reason }],
      usage: last.usage,
    };
  }
  return { completions: { create } };
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
