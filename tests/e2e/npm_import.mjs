// The npm import test: the page tests/web/npm-page.html, inside a temporary project where the
// packed tarball (target/pkg/flexquant-VERSION.tgz) is npm-installed, served by
// tests/web/server.py under /npm/. Run by `./build.sh test` (test_browser): node npm_import.mjs URL
import assert from 'node:assert/strict';
import { loadDeclarations, check } from './dts-check.mjs';
import { pageResult } from './helpers.mjs';

const server = process.argv[2];
if (!server) throw new Error('usage: node npm_import.mjs SERVER_URL (./build.sh test starts the server)');

{
  const { result: r, logs } = await pageResult(`${server}/npm/index.html?manifest=${encodeURIComponent(`${server}/tiny/manifest.json`)}`, { timeout: 240_000 });
  try {
    assert.equal(r.error, undefined, r.error);
    for (const k of ['main', 'worker']) {
      const x = r[k];
      assert.ok(x.usage.completion_tokens >= 1 && x.usage.completion_tokens <= 8, JSON.stringify(x.usage));
      assert.ok(['stop', 'length'].includes(x.finish), x.finish);
      assert.equal(x.usage.total_tokens, x.usage.prompt_tokens + x.usage.completion_tokens);
      assert.equal(x.stats.step, 0);
      assert.ok(x.stats.heldBytes > 0, JSON.stringify(x.stats));
      // backend 'auto': the CPU backend on SwiftShader, WebGPU on a real GPU.
      assert.ok(['cpu', 'webgpu'].includes(x.stats.backend), x.stats.backend);
      if (x.stats.backend === 'webgpu') assert.ok(x.stats.gpuAllocatedBytes > 0);
    }
    assert.ok(r.main.chunks >= r.main.usage.completion_tokens + 1, 'one chunk per token plus the final one');
    assert.ok(r.main.progress.includes('download') && r.main.progress.includes('ready'), r.main.progress.join());
    assert.equal(r.main.unloadedBytes, 0, 'unload frees every GPU buffer');
    assert.ok(r.main.steps > 1);
    assert.equal(r.worker.object, 'chat.completion');
    assert.equal(r.worker.text, r.main.text, 'greedy: the worker and the main thread agree');
    // A text completion: 6 tokens past the prompt, the same streamed or not.
    assert.deepEqual([r.completion.object, r.completion.finish, r.completion.tokens], ['text_completion', 'length', 6], JSON.stringify(r.completion));
    assert.ok(r.completion.text.length > 0 && r.completion.text === r.completion.streamedText, JSON.stringify(r.completion));
    // Through the worker (at the step its release left it at: another model, other text).
    // Legacy logprobs: one entry per token, 2 alternatives (+ the token when not among them:
    // greedy, it is the first), offsets in characters of the text; three streamed chunks with
    // one each (tests/web/completions.rs checks each offset against the streamed text).
    const clp = r.completionLogprobs;
    assert.deepEqual([clp.entries, clp.tokens, clp.clpChunks, clp.greedyIsTop, clp.offsetsInText], [4, 4, 3, true, true], JSON.stringify(clp));
    assert.ok(clp.top.every((n) => n >= 1 && n <= 3), JSON.stringify(clp));
    assert.deepEqual(r.echo, { promptThenCompletion: true }, JSON.stringify(r.echo));
    assert.deepEqual(r.promptList, { choices: '0,1,2,3', sameAsAlone: true, promptTokens: true, roundTrip: true }, JSON.stringify(r.promptList));
    assert.deepEqual(r.echoScored, { entries: 2, promptText: true, firstNull: true, scoredRest: true, sameAsGenerated: true }, JSON.stringify(r.echoScored));
    const wcomp = r.worker.completion;
    assert.deepEqual([wcomp.object, wcomp.finish, wcomp.tokens], ['text_completion', 'length', 6], JSON.stringify(wcomp));
    assert.ok(wcomp.text.length > 0, JSON.stringify(wcomp));
    assert.deepEqual([r.includeUsage.choices, r.includeUsage.finish], [0, 'length'], JSON.stringify(r.includeUsage));
    assert.ok(r.includeUsage.tokens === 6, JSON.stringify(r.includeUsage));
    assert.match(r.panic.first, /^internal: the engine crashed: .*simulated panic/s, JSON.stringify(r.panic));
    assert.match(r.panic.after, /^internal: the engine crashed/, JSON.stringify(r.panic));
    assert.match(r.panic.chat, /^internal: the engine crashed/, JSON.stringify(r.panic));
    assert.equal(r.panic.unload, 'ok');
    assert.match(r.panic.async, /^internal: the engine crashed: .*simulated panic in an async call/s, JSON.stringify(r.panic));
    assert.match(r.panic.asyncAfter, /^internal: the engine crashed/, JSON.stringify(r.panic));
    assert.equal(r.panic.crashed, true);
    const wa = r.workerAbort;
    assert.match(wa.load, /^aborted: loading .*manifest\.json was aborted \(options\.signal\)/, JSON.stringify(wa));
    assert.match(wa.before, /^aborted: /, JSON.stringify(wa));
    // A progress event already posted may still arrive; the terminated worker sends no more.
    assert.ok(wa.progressAfter <= 1, JSON.stringify(wa));
    const wp = r.workerPanic;
    assert.match(wp.first, /^internal: the engine crashed: .*simulated panic in an async call/s, JSON.stringify(wp));
    assert.deepEqual([wp.crashed, wp.unload], [true, 'ok'], JSON.stringify(wp));
    assert.match(wp.after, /^internal: the engine crashed/, JSON.stringify(wp));
    const ins = r.inspect;
    assert.equal(ins.trajectory.length, r.main.steps, JSON.stringify(ins).slice(0, 300));
    assert.equal(ins.kvBytes, 256 * ins.kvBytesPerToken);
    assert.ok(ins.minTotalBytes < ins.maxTotalBytes && ins.firstLoadBytes <= ins.downloadBytes, JSON.stringify(ins).slice(0, 300));
    assert.equal(ins.trajectory[0].meanBits, ins.nUp);
    assert.deepEqual(r.evicted, { stale: true, otherKept: true, otherKeptAfterDelete: true });
    const cb = r.cachedBefore, ca = r.cachedAfter;
    assert.ok(cb.manifestCached && cb.completeSteps.includes(0) && cb.cachedBytes > 0, JSON.stringify(cb).slice(0, 300));
    assert.ok(r.deleted >= cb.cachedFiles + 1, `deleted ${r.deleted}`);
    assert.deepEqual([ca.manifestCached, ca.cachedFiles, ca.completeSteps.length], [false, 0, 0], JSON.stringify(ca).slice(0, 300));
    const cc = r.concurrency;
    assert.deepEqual(cc.par, cc.seq, `Promise.all mixed the answers: ${JSON.stringify(cc)}`);
    assert.equal(cc.afterBreak, cc.seq[0], 'the engine answers normally after a stream left early');
    assert.equal(cc.abortFinish, 'abort', JSON.stringify(cc));
    assert.equal(cc.waiting, 'aborted', JSON.stringify(cc));
    assert.equal(r.afterUnload, 'unloaded', 'a call on an unloaded worker engine');
    assert.equal(r.support.backend, r.main.stats.backend, `checkSupport vs what auto ran: ${JSON.stringify(r.support)}`);
    // The worker engine gave its wasm memory back after the budget cut, from the cache.
    const rel = r.release;
    assert.ok(rel.event, `no released event: ${JSON.stringify(rel)}`);
    assert.equal(rel.event.networkBytes, 0, JSON.stringify(rel.event));
    assert.ok(r.releaseStep > 0);
    assert.equal(rel.stats.step, r.releaseStep, JSON.stringify(rel.stats));
    assert.ok(rel.answer.prompt_tokens > r.worker.usage.prompt_tokens && rel.answer.completion_tokens >= 1, JSON.stringify(rel.answer));
    // The conversation's KV cache went along: the follow-up found at least the first prompt cached.
    assert.ok(rel.event.keptTokens > r.worker.usage.prompt_tokens, JSON.stringify(rel.event));
    assert.ok(rel.answer.prompt_tokens_details.cached_tokens >= r.worker.usage.prompt_tokens, JSON.stringify(rel.answer));
    const ses = r.session;
    assert.ok(ses.tokens > ses.firstPrompt && ses.kvBytes > 0 && ses.imported === ses.tokens, JSON.stringify(ses));
    assert.deepEqual(ses.texts[1], ses.texts[0], 'the same follow-up on the engine the session moved to');
    assert.ok(ses.cached[0] >= ses.firstPrompt && ses.cached[1] === ses.cached[0], JSON.stringify(ses));
    assert.match(ses.otherModel, /^input: importSession: the session comes from another model/, ses.otherModel);
    assert.match(ses.cut, /^input: importSession: kv holds \d+ bytes; \d+ positions in f16 take \d+/, ses.cut);
    assert.ok(ses.held > ses.tokens && ses.afterReject === ses.held, `a refused session keeps the conversation: ${JSON.stringify(ses)}`);
    assert.ok(r.worker.events.includes('progress'), r.worker.events.join());
    assert.deepEqual([r.missing.instance, r.missing.code], [true, 'manifest-not-found'], JSON.stringify(r.missing));
    assert.equal(r.unsupported, 'unsupported');
    // context-length carries both counts, on the main thread and through the worker.
    for (const e of [r.tooLong, r.workerTooLong]) {
      assert.equal(e.code, 'context-length', JSON.stringify(e));
      assert.ok(e.contextTokens > 0 && e.promptTokens > e.contextTokens, JSON.stringify(e));
    }
    assert.equal(r.tools.name, 'w', JSON.stringify(r.tools));
    assert.ok(['c', 'f'].includes(r.tools.args.u), JSON.stringify(r.tools));
    assert.deepEqual([r.tools.id, r.tools.finish, r.tools.content, r.tools.streamed], [true, 'tool_calls', null, 'w']);
    // n: three answers of 4 tokens, indexed 0-2, counted together; different seeds, different text.
    assert.deepEqual([r.n.indices, r.n.finish, r.n.tokens], [[0, 1, 2], ['length', 'length', 'length'], 12], JSON.stringify(r.n));
    assert.ok(r.n.distinct >= 2, JSON.stringify(r.n));
    // logprobs: an entry per token, 3 alternatives each, the greedy token the first of them.
    assert.deepEqual(r.logprobs, { entries: 4, tokens: 4, lpChunks: 3, top: [3, 3, 3, 3], greedyIsTop: true }, JSON.stringify(r.logprobs));
    assert.ok(r.belowFloor.floorStep != null && r.belowFloor.lastReason === 'below_floor', JSON.stringify(r.belowFloor));
    checkDeclarations(r);
  } catch (e) {
    console.error(logs.join('\n'));
    throw e;
  }
  console.log(`npm import test passed: concurrency ${JSON.stringify(r.concurrency)}, main ${JSON.stringify(r.main.text)} (${r.main.usage.completion_tokens} tokens), ` +
    `worker ${JSON.stringify(r.worker.text)}, release ${r.release.event.wasmMemoryBytesBefore} -> ${r.release.event.wasmMemoryBytesAfter} wasm bytes in ${Math.round(r.release.event.ms)} ms keeping ${r.release.event.keptTokens} tokens (follow-up: ${r.release.answer.prompt_tokens_details.cached_tokens} of ${r.release.answer.prompt_tokens} cached), ` +
    `session moved: ${r.session.tokens} tokens, ${r.session.kvBytes} KV bytes, follow-up ${r.session.cached.join('/')} cached, backend ${r.main.stats.backend} (${r.main.stats.backendReason}), ${r.main.stats.adapter}`);
}

/**
 * The real objects the page collected against js/index.d.ts and js/worker.d.ts, both ways (a
 * declared field never returned, a returned field never declared; optional fields may be
 * absent), and every event kind this run provokes seen at least once.
 */
function checkDeclarations(r) {
  const files = ['index.d.ts', 'worker.d.ts'].map((f) => new URL(`../../js/${f}`, import.meta.url).pathname);
  const decls = loadDeclarations(files);
  const problems = new Set();
  for (const [type, values] of Object.entries(r.samples)) {
    assert.ok(decls[type], `the page sampled ${type}, which js/index.d.ts does not declare`);
    for (const v of values) for (const p of check(decls, type, v)) problems.add(p);
  }
  assert.deepEqual([...problems], [], `js/*.d.ts disagrees with what the engine returned:\n  ${[...problems].join('\n  ')}`);
  const want = ['Support', 'Inspection', 'CacheReport', 'Stats', 'TrajectoryPoint', 'Started', 'ChatCompletion',
    'ChatCompletionChunk', 'EngineEvent', 'FlexQuantError', 'ExportedSession'];
  assert.deepEqual(want.filter((t) => !r.samples[t]?.length), [], 'types with no sample');
  const kinds = ['backend', 'below-floor', 'device-lost', 'error', 'progress/download', 'progress/ready',
    'progress/upload', 'recovered', 'released', 'swap'];
  assert.deepEqual(kinds.filter((k) => !r.eventKinds.includes(k)), [], `event kinds seen: ${r.eventKinds}`);
  const n = Object.values(r.samples).reduce((s, v) => s + v.length, 0);
  console.log(`declarations agree with ${n} real objects (${Object.keys(r.samples).length} types; events ${r.eventKinds.join(', ')})`);
}
