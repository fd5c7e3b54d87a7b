// The chat page on a host that sends COOP/COEP (tests/web/serve_isolated.py, what
// `./build.sh demo` serves with): the page is cross-origin isolated, so its worker engine loads
// the threaded build and the CPU backend runs on threads, and answers as it does on one thread
// from a plain static host.

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { requireOrSkip, serve, launch, waitReady, send, waitAnswer, setMaxTokens } from './helpers.mjs';

const SITE = process.env.FLEXQUANT_E2E_SITE;

/** Loads the page from `server` on the CPU backend, answers one prompt greedily. */
async function answer(server) {
  const browser = await launch({ webgpu: false });
  try {
    const page = await browser.context.newPage();
    await page.goto(server.url);
    await waitReady(page);
    const info = await page.evaluate(() => ({
      isolated: crossOriginIsolated, cores: navigator.hardwareConcurrency,
      line: document.getElementById('model-line').textContent,
      support: document.getElementById('support-line').textContent,
    }));
    await setMaxTokens(page, 24, 0);
    await send(page, 'Tell me about the sea.');
    return { ...info, answer: await waitAnswer(page) };
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
    assert.equal(off.isolated, false);
    assert.match(off.line, /, 1 threads\)\)/, off.line);
    assert.match(off.support, /on one thread \(the page is not cross-origin isolated/, off.support);
    for (const r of [on, off]) assert.ok(r.answer.tokens >= 1 && !r.answer.error, JSON.stringify(r.answer).slice(0, 300));
    assert.equal(on.answer.tokens, off.answer.tokens);
    assert.equal(on.answer.answer, off.answer.answer, 'the threaded page answered differently');
    console.log(`# ${threads} threads on an isolated host: ${JSON.stringify(on.answer.answer.slice(0, 60))}, as on one thread`);
  });
});
