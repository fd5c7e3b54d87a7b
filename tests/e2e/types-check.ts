// Compile-time check of the npm package's type declarations (js/*.d.ts): the calls a page
// makes must type-check under --strict. Run by build.sh (test_e2e) with tsc --noEmit; never executed.
import { Engine, FlexQuantError } from '../../js/index.js';
import { CreateWorkerEngine, WorkerEngine } from '../../js/worker.js';
async function main() {
  const e = await Engine.create('./m.json', { budgetBytes: 1e8, parallelDownloads: 4,
    prefillChunkTokens: 32, signal: new AbortController().signal,
    onEvent: (ev) => {
      if (ev.type === 'below-floor') { const c: number | null = ev.costBytes; void c; }
      if (ev.type === 'prefill') { const left: number = ev.totalTokens - ev.doneTokens + ev.reusedTokens * 0; void left; }
    } });
  const sup = await Engine.checkSupport(); const f16: boolean | undefined = sup.gpu?.f16; void f16;
  const ins = await Engine.inspect('./m.json', { context: 512 }); const lo: number = ins.minTotalBytes; void lo;
  await e.chat.completions.create({ messages: [], response_format: { type: 'text' }, tools: null });
  await e.chat.completions.create({ messages: [], response_format: { type: 'json_object' } });
  const r = await e.chat.completions.create({ messages: [], logprobs: true, top_logprobs: 2,
    response_format: { type: 'json_schema', json_schema: { name: 'x', strict: true, schema: { type: 'object' } } } });
  const lp: number | undefined = r.choices[0].logprobs?.content[0]?.top_logprobs[0]?.logprob; void lp;
  // Function calling: the call, its result sent back.
  const called = await e.chat.completions.create({ messages: [{ role: 'user', content: 'Weather?' }], tool_choice: 'required',
    tools: [{ type: 'function', function: { name: 'w', parameters: { type: 'object' } } }] });
  const call = called.choices[0].message.tool_calls?.[0];
  if (call) {
    const args: string = call.function.arguments; void args;
    await e.chat.completions.create({ messages: [{ role: 'assistant', content: null, tool_calls: [call] },
      { role: 'tool', tool_call_id: call.id, content: '18' }], tool_choice: { type: 'function', function: { name: 'w' } } });
  }
  // @ts-expect-error: a tool result names its call.
  await e.chat.completions.create({ messages: [{ role: 'tool', content: '18' }] });
  // @ts-expect-error: the runtime rejects other formats, so the types do too.
  await e.chat.completions.create({ messages: [], response_format: { type: 'xml' } });
  const stream = await e.chat.completions.create({ messages: [{ role: 'user', content: 'hi' }], stream: true });
  for await (const c of stream) { const s: string | undefined = c.choices[0].delta.content; void s; }
  const st = await e.stats(); const n: number = st.contextLength; void n;
  const t = await e.completions.create({ prompt: 'Once', logprobs: 2, max_tokens: 3 });
  const tlp = t.choices[0].logprobs;
  if (tlp) { const first: number = (tlp.token_logprobs[0] ?? 0) + tlp.text_offset[0]; const alt: Record<string, number> | null = tlp.top_logprobs[0]; void first; void alt; }
  await e.completions.create({ prompt: 'Once', echo: true });
  await e.completions.create({ prompt: ['Once', await e.tokenize('upon')], n: 2 });
  const back: string = await e.detokenize(new Uint32Array([1, 2])); void back;
  // @ts-expect-error: a prompt is text or token ids
  await e.completions.create({ prompt: [{ text: 'Once' }] });
  const scored = (await e.completions.create({ prompt: 'Once', echo: true, logprobs: 0, max_tokens: 0 })).choices[0].logprobs;
  // @ts-expect-error: a prompt's first token has no log-probability (null)
  if (scored) { const lp: number = scored.token_logprobs[0]; void lp; }
  // @ts-expect-error: a text completion's logprobs is a count (chat's is a boolean)
  await e.completions.create({ prompt: 'Once', logprobs: true });
  const w: WorkerEngine = await CreateWorkerEngine('./m.json', { signal: AbortSignal.timeout(60_000) });
  await w.setMemoryBudget(null); await w.unload();
  try { await e.unload(); } catch (err) { if (err instanceof FlexQuantError) console.log(err.code); }
}
void main;
