// The chat page on a host that sends COOP/COEP (tests/web/serve_isolated.py, what
// `./build.sh demo` serves with): the page is cross-origin isolated, so its worker engine loads
// the threaded build and the CPU backend runs on threads, and answers as it does on one thread
// from a plain static host. On a plain host with service workers allowed, the page isolates
// itself (coi-serviceworker.js, one reload at the first visit) and gets the same threads.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { requireOrSkip, serve, launch, waitReady, send, waitAnswer, setMaxTokens } from './helpers.mjs';

const SITE = process.env.FLEXQUANT_E2E_SITE;

/** What the page shows about isolation and threads. */
const info = (page) => page.evaluate(() => ({
  isolated: crossOriginIsolated, cores: navigator.hardwareConcurrency, isolation: window.flexquantPage.isolation,
  line: document.getElementById('model-line').textContent,
  support: document.getElementById('support-line').textContent,
}));

/**
 * Loads the page from `server` on the CPU backend (service workers blocked unless
 * `serviceWorkers: 'allow'`), answers one prompt greedily; `then(page)` runs before closing.
 */
async function answer(server, { serviceWorkers = 'block', then = null } = {}) {
  const browser = await launch({ webgpu: false, serviceWorkers });
  try {
    const page = await browser.context.newPage();
    // How many times the page itself was loaded (navigations of its main frame, reloads too).
    page.loads = 0;
    page.on('framenavigated', (f) => { if (f === page.mainFrame()) page.loads++; });
    await page.goto(server.url);
    await waitReady(page);
    const seen = await info(page);
    await setMaxTokens(page, 24, 0);
    await send(page, 'Tell me about the sea.');
    const done = await waitAnswer(page);
    // The panel shows the stats of its next poll (every second) after the answer.
    await page.waitForFunction(() => /tok\/s/.test(document.getElementById('st-speed').textContent));
    const speed = await page.evaluate(() => document.getElementById('st-speed').textContent);
    return { ...seen, answer: done, speed, ...(then ? await then(page) : {}) };
  } finally {
    await browser.close();
  }
}


describe('chat page on a cross-origin isolated host', { concurrency: false }, () => {
  it('runs the CPU backend on threads and answers as on one thread', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const runs = {};
    for (const isolated of [true, false]) {
      const server = await serve(SITE, { isolated });
      try {
        runs[isolated] = await answer(server);
      } finally {
        server.close();
      }
    }
    const [on, off] = [runs.true, runs.false];
    const threads = Math.min(on.cores, 8);
    assert.equal(on.isolated, true);
    assert.match(on.line, new RegExp(`CPU \\(cpu \\(packed .*, ${threads} threads\\)\\)`), on.line);
    assert.match(on.support, new RegExp(`runs on the CPU backend \\(wasm SIMD\\) instead, on ${threads} threads`), on.support);
    // The speed line says how many threads the last token ran on (measured fastest now).
    console.log(`# speed line: ${on.speed} / ${off.speed}`);
    if (threads > 1) assert.match(on.speed, new RegExp(`tok/s · [1-${threads}] of ${threads} threads$`), on.speed);
    assert.doesNotMatch(off.speed, /threads/, off.speed);
    assert.equal(off.isolated, false);
    assert.match(off.line, /, 1 threads\)\)/, off.line);
    assert.match(off.support, /on one thread \(the page is not cross-origin isolated/, off.support);
    for (const r of [on, off]) assert.ok(r.answer.tokens >= 1 && !r.answer.error, JSON.stringify(r.answer).slice(0, 300));
    assert.equal(on.answer.tokens, off.answer.tokens);
    assert.equal(on.answer.answer, off.answer.answer, 'the threaded page answered differently');
    console.log(`# ${threads} threads on an isolated host: ${JSON.stringify(on.answer.answer.slice(0, 60))}, as on one thread`);
  });

  it('isolates itself on a plain static host through its service worker, with one reload', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const server = await serve(SITE);
    try {
      const r = await answer(server, {
        serviceWorkers: 'allow',
        // A later visit: already under the service worker, no further reload.
        then: async (page) => {
          const first = page.loads;
          await page.reload();
          await waitReady(page);
          const again = await info(page);
          const laterVisitLoads = page.loads - first;
          // Opting out: `?coi=0` unregisters the service worker and, since the worker still
          // controls that load, reloads once without it; a later visit is plain, no reload.
          let before = page.loads;
          await page.goto(`${server.url}?coi=0`);
          await waitReady(page);
          const firstLoads = page.loads - before;
          const regs = await page.evaluate(async () => (await navigator.serviceWorker.getRegistrations()).length);
          before = page.loads;
          await page.reload();
          await waitReady(page);
          return { firstVisitLoads: first, again, laterVisitLoads,
            optOut: { regs, firstLoads, loads: page.loads - before, ...(await info(page)) } };
        },
      });
      const threads = Math.min(r.cores, 8);
      assert.equal(r.isolated, true, JSON.stringify(r.isolation));
      assert.deepEqual(r.isolation, { isolated: true });
      assert.equal(r.firstVisitLoads, 2, 'the first visit should load the page twice (one reload)');
      assert.equal(r.laterVisitLoads, 1, 'a later visit should not reload again');
      assert.equal(r.again.isolated, true);
      assert.match(r.line, new RegExp(`, ${threads} threads\\)\\)`), r.line);
      assert.match(r.support, new RegExp(`on ${threads} threads`), r.support);
      assert.equal(r.optOut.regs, 0, 'the service worker should be unregistered with ?coi=0');
      assert.equal(r.optOut.firstLoads, 2, 'the first visit with ?coi=0 should reload once, out of the service worker');
      assert.equal(r.optOut.loads, 1, 'a later visit with ?coi=0 should not reload');
      assert.equal(r.optOut.isolated, false);
      assert.deepEqual(r.optOut.isolation, { isolated: false, reason: 'its service worker is turned off (?coi=0)' });
      assert.match(r.optOut.support, /on one thread \(the page is not cross-origin isolated.*; its service worker is turned off/, r.optOut.support);
      // Every response of the site came through the service worker and is usable (the model
      // loaded, the answer is the isolated host's).
      const plain = await answer(server);
      assert.equal(plain.isolated, false);
      assert.match(plain.isolation.reason, /no service worker/, JSON.stringify(plain.isolation));
      assert.match(plain.support, /on one thread \(the page is not cross-origin isolated.*; this browser gives the page no service worker/, plain.support);
      assert.equal(r.answer.answer, plain.answer.answer, 'the self-isolated page answered differently');
      console.log(`# plain static host: isolated by the service worker, ${threads} threads, page loads ${r.firstVisitLoads} + ${r.laterVisitLoads}`);
    } finally {
      server.close();
    }
  });
});
