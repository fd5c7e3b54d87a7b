// The wasm threads test: tests/web/threads-page.html in the npm test project, served with
// COOP/COEP (tests/web/server.py --isolated). Run by `./build.sh test` (test_browser):
// node threads.mjs SERVER_URL
import assert from 'node:assert/strict';
import { loadDeclarations, check } from './dts-check.mjs';
import { pageResult } from './helpers.mjs';

const server = process.argv[2];
if (!server) throw new Error('usage: node threads.mjs SERVER_URL (./build.sh test starts the server)');

{
  // No WebGPU: the CPU backend is what threads speed up.
  const { result: r, logs } = await pageResult(`${server}/npm/threads-page.html?manifest=${encodeURIComponent(`${server}/tiny/manifest.json`)}`, { webgpu: false });
  try {
    assert.equal(r.error, undefined, r.error);
    assert.equal(r.isolated, true, 'the page is not cross-origin isolated (server.py --isolated)');
    const s = r.support.threads;
    assert.equal(s.available, true, JSON.stringify(s));
    assert.equal(s.autoThreads, Math.min(s.hardwareConcurrency, 8), JSON.stringify(s));
    // Each row is computed by one thread: the same greedy answer on 1, 2, auto and too many
    // threads and on the main thread's one-thread build.
    const two = Math.min(2, s.hardwareConcurrency);
    const runs = { worker1: 1, worker2: two, worker2Pinned: two, workerAuto: s.autoThreads, workerMany: s.hardwareConcurrency, main: 1 };
    for (const [k, threads] of Object.entries(runs)) {
      const x = r[k];
      assert.equal(x.tokens, 48, `${k}: ${JSON.stringify(x).slice(0, 300)}`);
      assert.equal(x.text, r.worker1.text, `${k} answered differently from one thread`);
      assert.equal(x.stats.threads, threads, `${k}: ${x.stats.adapter}`);
      // Adaptive engines' tokens run on as many threads as measured fastest: 1..threads.
      assert.ok(x.stats.threadsActive >= 1 && x.stats.threadsActive <= threads, `${k}: ${x.stats.threadsActive} active`);
      assert.ok(x.stats.adapter.includes(`${threads} threads`), `${k}: ${x.stats.adapter}`);
      assert.equal(x.stats.backend, 'cpu');
    }
    assert.equal(r.worker2Pinned.stats.threadsActive, two, 'adaptThreads: false ran fewer threads');
    assert.equal(r.badAdapt.code, 'input', JSON.stringify(r.badAdapt));
    assert.match(r.badAdapt.message, /adaptThreads/, JSON.stringify(r.badAdapt));
    assert.deepEqual([r.worker1.warnings, r.workerAuto.warnings], [[], []]);
    assert.equal(r.worker2.warnings.length, two === 2 ? 0 : 1, JSON.stringify(r.worker2.warnings));
    assert.equal(r.workerMany.warnings.length, 1, JSON.stringify(r.workerMany.warnings));
    assert.match(r.workerMany.warnings[0].message,
      new RegExp(`options\\.threads: ${s.hardwareConcurrency + 1} asked for, running ${s.hardwareConcurrency}: the browser reports`));
    // The main thread may not wait on other threads: one thread, and a warning saying why.
    assert.equal(r.main.warnings.length, 1, JSON.stringify(r.main.warnings));
    assert.equal(r.main.warnings[0].code, 'threads');
    assert.match(r.main.warnings[0].message, /options\.threads: 2 asked for, running one thread: .*main thread/);
    // Read-ahead: calls mid-answer answer, an abort after the 5th chunk ends the answer within
    // one more token (then the final chunk), and the engine then answers as before.
    const ra = r.readAhead;
    console.log(`# read-ahead: ${JSON.stringify(ra).slice(0, 120)}`);
    assert.equal(ra.finish, 'abort', JSON.stringify(ra));
    assert.ok(ra.chunks >= 6 && ra.chunks <= 7, `aborted after chunk 5, ${ra.chunks} chunks came`);
    assert.equal(ra.midStatsThreads, two, JSON.stringify(ra));
    assert.equal(ra.budget, 'ok', JSON.stringify(ra));
    assert.equal(ra.again, r.worker1.text, 'after the abort the worker engine answered differently');
    assert.equal(r.bad.code, 'input', JSON.stringify(r.bad));
    assert.match(r.bad.message, /^options\.threads: 0 is not a thread count \(1\.\.=64, or 'auto'\)$/, JSON.stringify(r.bad));
    const decls = loadDeclarations(['index.d.ts', 'worker.d.ts'].map((f) => new URL(`../../js/${f}`, import.meta.url).pathname));
    const problems = [...check(decls, 'Support', r.support), ...check(decls, 'Stats', r.worker2.stats),
      ...check(decls, 'EngineEvent', r.main.warnings[0])];
    assert.deepEqual(problems, [], 'js/index.d.ts disagrees with the threaded build');
    // The pool's workers start without wasm-bindgen's deprecation warning (build.sh
    // fix_rayon_helper); the console here includes the workers'.
    assert.deepEqual(logs.filter((l) => /deprecated/.test(l)), [], 'a console warning about deprecated parameters');
  } catch (e) {
    console.error(logs.join('\n'));
    throw e;
  }
  console.log(`threads test passed: ${r.worker2.stats.adapter}; auto ${r.workerAuto.stats.threads} of ` +
    `${r.support.threads.hardwareConcurrency} cores; answer ${JSON.stringify(r.worker1.text.slice(0, 60))} on every build`);
}
