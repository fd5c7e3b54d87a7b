// Two tabs of the same site (one browser profile, so one Cache API) loading the same ensemble
// at the same time: both load, both answer, and a third tab afterwards loads everything from
// the cache the two filled together (no shard fetched again).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { requireOrSkip, serve, launch, waitReady, send, waitAnswer, setMaxTokens, shardRequests } from './helpers.mjs';

const SITE = process.env.FLEXQUANT_E2E_SITE;

describe('tabs', { concurrency: false }, () => {
  it('two tabs loading the same ensemble at once both work', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const server = await serve(SITE);
    const browser = await launch();
    try {
      const tabs = await Promise.all([0, 1].map(() => browser.context.newPage()));
      await Promise.all(tabs.map((p) => p.goto(server.url)));
      await Promise.all(tabs.map((p) => waitReady(p)));
      for (const p of tabs) await setMaxTokens(p, 6, 0);
      await Promise.all(tabs.map((p, i) => send(p, i ? 'Tell me a story.' : 'Hello there!')));
      const answers = await Promise.all(tabs.map((p) => waitAnswer(p)));
      for (const a of answers) {
        assert.notEqual(a.finish, 'error', JSON.stringify(a));
        assert.ok(a.tokens >= 1, JSON.stringify(a));
      }
      const errors = await Promise.all(tabs.map((p) => p.evaluate(() => window.flexquantPage.errors)));
      assert.deepEqual(errors, [[], []], JSON.stringify(errors));

      // Everything either tab stored is whole: a third tab loads without fetching a shard.
      const before = shardRequests(server.requests).length;
      const third = await browser.context.newPage();
      await third.goto(server.url);
      await waitReady(third);
      const fetched = shardRequests(server.requests).slice(before).map((r) => r.path);
      assert.deepEqual(fetched, [], 'the third tab fetched shards the cache should hold');
      const st = await third.evaluate(() => window.flexquantPage.engine.stats());
      assert.equal(st.loadedFromCache, true, JSON.stringify(st));
    } finally {
      await browser.close();
      server.close();
    }
  });
});
