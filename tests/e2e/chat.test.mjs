// The chat page end to end, on the tiny ensemble (fast enough for SwiftShader on 2 cores): what
// the model needs before it loads (Engine.inspect, Engine.cached; deleting the cached model),
// load with progress, a streamed answer, a swap down under pressure mid-answer and back up,
// device loss mid-answer, a reload served from the Cache API, the phone-width layout.
// Every check reads what the page shows or what the server saw; nothing is stubbed.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  missing, REQUIRE, serve, launch, until, waitReady, send, waitAnswer, setMaxTokens, step, shot,
  shardRequests, sleep, unlimitedBudget,
} from './helpers.mjs';

const SITE = process.env.FLEXQUANT_E2E_SITE;
const times = {};

describe('chat page on the tiny ensemble', { concurrency: false }, () => {
  let server, browser, page, skip = null;

  before(async () => {
    skip = await missing(SITE);
    if (skip && REQUIRE) throw new Error(`end-to-end tests cannot run: ${skip}`);
    if (skip) return;
    server = await serve(SITE);
    browser = await launch();
    page = await browser.context.newPage();
  });

  after(async () => {
    if (browser) {
      if (process.env.FLEXQUANT_E2E_VERBOSE) console.log(browser.log.join('\n'));
      await browser.close();
    }
    server?.close();
    if (Object.keys(times).length) console.log(`# page timings: ${JSON.stringify(times)}`);
  });

  it('loads the model under a sub-path with visible progress, then reports where it came from', async (t) => {
    if (skip) return t.skip(skip);
    const seen = [];
    const onReq = (r) => seen.push(r.url());
    browser.context.on('request', onReq);
    const t0 = Date.now();
    await page.goto(server.url, { waitUntil: 'commit' });
    // The loader shows bytes and files while the shards stream in.
    await until(page, 'the progress bar to show bytes and files', () => {
      const t = document.getElementById('load-text')?.textContent || '';
      return (/files/.test(t) && /B of /.test(t)) || window.flexquantPage?.state === 'ready';
    });
    await shot(page, 'loading');
    await waitReady(page);
    times.first_load_s = (Date.now() - t0) / 1000;
    times.first_load_page_s = await page.evaluate(() => window.flexquantPage.metrics.loadSeconds);
    // What the loader showed while loading: bytes, files, time left, growing to the total.
    const lines = await page.evaluate(() => window.flexquantPage.progress);
    const loading = lines.filter((l) => /^Loading: .* of .* \(\d+%\) · \d+ of \d+ files/.test(l));
    assert.ok(loading.length >= 2, `progress lines: ${JSON.stringify(lines)}`);
    assert.ok(lines.some((l) => /left/.test(l)), `no time left shown: ${JSON.stringify(lines)}`);
    const ev = await page.evaluate(() => window.flexquantPage.progressEvents);
    const last = ev.filter((p) => p.phase === 'download').pop();
    assert.ok(last && last.filesDone === last.filesTotal && last.loadedBytes === last.totalBytes, JSON.stringify(last));
    assert.equal(last.fromCache, 0);
    const notice = await page.locator('#notice').textContent();
    assert.match(notice, /downloaded .* cached for the next visit/, notice);
    assert.equal(await page.evaluate(() => window.flexquantPage.metrics.loadedFromCache), false);
    // Every file came from under the sub-path, fetched in full (python's server has no Range).
    const shards = shardRequests(server.requests);
    assert.ok(shards.length >= 3, `shards fetched: ${JSON.stringify(server.requests)}`);
    assert.ok(server.requests.every((r) => r.path.startsWith('/apps/flexquant/')), JSON.stringify(server.requests));
    assert.ok(shards.every((r) => r.status === 200), JSON.stringify(shards));
    browser.context.off('request', onReq);
    // The panel shows the trajectory with the current EQM (step 0 without a budget).
    assert.equal(await step(page), 0);
    assert.equal(await page.locator('#trajectory circle.current').getAttribute('data-step'), '0');
    await shot(page, 'ready');
  });

  it('showed what the model needs before loading it, and what the cache holds after', async (t) => {
    if (skip) return t.skip(skip);
    const r = await page.evaluate(async () => {
      const p = window.flexquantPage;
      const text = (id) => document.getElementById(id).textContent;
      return { ins: p.inspection, support: p.support, lines: p.cacheLines, stats: await p.engine.stats(),
        trajectory: await p.engine.trajectory(), download: text('req-download'), memory: text('req-memory'),
        quality: text('req-quality'), supportLine: text('support-line') };
    });
    const { ins, stats } = r;
    // Engine.inspect's numbers are the running engine's: same steps, context and footprints.
    assert.equal(ins.trajectory.length, stats.steps);
    assert.equal(ins.context, stats.contextLength);
    assert.equal(ins.maxTotalBytes - ins.kvBytes, r.trajectory[0].footprintBytes);
    assert.equal(ins.minTotalBytes - ins.minKvBytes, r.trajectory.at(-1).footprintBytes);
    assert.ok(ins.minKvBytes < ins.kvBytes, 'auto: the least memory has the cache in int8');
    assert.ok(ins.firstLoadBytes > 0 && ins.firstLoadBytes <= ins.downloadBytes, JSON.stringify(ins).slice(0, 300));
    // ...and the page shows them.
    assert.match(r.download, /^\d[\d.]* [KMG]?B to start \(step 0\); \d[\d.]* [KMG]?B with every step$/, r.download);
    assert.match(r.memory, new RegExp(`for a ${ins.context}-token context \\(weights .* KV cache \\d.* in f16, \\d.* once int8 under pressure\\)$`), r.memory);
    // The KV cache choice the page asked for (`?kv=`, default auto) is the engine's; auto
    // starts in f16.
    assert.equal(ins.kvCache, 'auto');
    assert.equal(stats.kvCache, 'f16');
    assert.match(r.quality, new RegExp(`^${stats.steps} EQMs from ${ins.nUp} to ${ins.nLow} bits; perplexity \\d`), r.quality);
    // checkSupport chose what ran, and the page said why.
    assert.equal(r.support.backend, stats.backend, JSON.stringify(r.support));
    assert.ok(r.support.secureContext && r.support.webgpu, JSON.stringify(r.support));
    if (r.support.backend === 'cpu') assert.match(r.supportLine, /CPU emulation.*runs on the CPU backend/, r.supportLine);
    else assert.match(r.supportLine, /^WebGPU on /, r.supportLine);
    // A fresh profile: nothing cached before the load; after it step 0 loads offline.
    assert.equal(r.lines[0].state, 'starting', JSON.stringify(r.lines));
    assert.match(r.lines[0].text, /^Not cached/, JSON.stringify(r.lines));
    await until(page, 'the cache status after the load', () => (window.flexquantPage.cached?.completeSteps || []).includes(0));
    const c = await page.evaluate(() => window.flexquantPage.cached);
    assert.ok(c.manifestCached && c.cachedBytes > 0 && c.cachedFiles <= c.files, JSON.stringify(c).slice(0, 300));
    const line = await page.locator('#req-cache').textContent();
    assert.match(line, new RegExp(`^${c.completeSteps.length} of ${stats.steps} steps load offline \\(`), line);
    assert.equal(await page.locator('#delete-cache').isDisabled(), false);
    // What the browser lets the site store, as the engine reports it and as the page sees it.
    const seen = await page.evaluate(async () => ({ est: await navigator.storage.estimate(), persisted: await navigator.storage.persisted(),
      line: document.getElementById('req-storage').textContent, keep: !document.getElementById('keep-cache').hidden }));
    // Chromium's quota follows the free disk space, which moves between the two reads.
    assert.ok(Math.abs(c.storage.quotaBytes - seen.est.quota) < 0.01 * seen.est.quota, `${JSON.stringify(c.storage)} against ${seen.est.quota}`);
    assert.ok(c.storage.usageBytes > 0 && c.storage.usageBytes < c.storage.quotaBytes, JSON.stringify(c.storage));
    assert.equal(c.storage.persisted, seen.persisted);
    assert.match(seen.line, /^\d[\d.]* [KMG]?B of \d[\d.]* [KMG]?B used by this site; /, seen.line);
    assert.match(seen.line, seen.persisted ? /kept when storage runs low$/ : /the browser may evict the cached model when storage runs low$/, seen.line);
    assert.equal(seen.keep, !seen.persisted);
    if (seen.keep) {
      // Asking: the page reports what the browser answered (headless Chromium declines).
      await page.locator('#keep-cache').click();
      await until(page, 'the answer to the persistence request', () => window.flexquantPage.persistAsked != null);
      const after = await page.evaluate(async () => ({ asked: window.flexquantPage.persistAsked, persisted: await navigator.storage.persisted(),
        note: document.getElementById('req-cache-note').textContent }));
      assert.equal(after.asked, after.persisted);
      assert.match(after.note, after.asked ? /^The browser will keep the cached model/ : /^The browser declined/, after.note);
    }
  });

  it('answers a prompt with streamed tokens', async (t) => {
    if (skip) return t.skip(skip);
    await setMaxTokens(page, 48);
    // Record the answer's text as it grows, to see it arrive piece by piece.
    await page.evaluate(() => {
      window.__growth = [];
      new MutationObserver(() => {
        const m = [...document.querySelectorAll('.msg.assistant .text')].pop();
        if (m) window.__growth.push(m.textContent.length);
      }).observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
    });
    // The tiny model is random: it may end an answer at once, or say only tokens that show
    // nothing (a partial UTF-8 byte, a space the page trims); ask again until it says something.
    let a;
    for (let attempt = 0; attempt < 4; attempt++) {
      await send(page, attempt ? 'Please say more.' : 'Hello! Who are you?');
      await until(page, 'some streamed text', () => window.flexquantPage.chat.tokens >= 2 || !window.flexquantPage.busy);
      if (attempt === 0) await shot(page, 'streaming');
      a = await waitAnswer(page);
      if (a.pieces >= 2) break;
    }
    assert.notEqual(a.finish, 'error', JSON.stringify(a));
    assert.ok(a.tokens >= 1 && a.answer.length > 0, `answer: ${JSON.stringify(a)}`);
    const growth = await page.evaluate(() => [...new Set(window.__growth)].filter((n) => n > 0));
    // Two tokens that showed text must show as two steps; a token may show nothing (a partial
    // UTF-8 byte), so counting tokens alone is not enough.
    if (a.pieces >= 2) assert.ok(growth.length >= 2, `the answer appeared at once, not streamed: ${growth} (${JSON.stringify(a)})`);
    else t.diagnostic(`the random model showed text in ${a.pieces} piece(s) over 4 attempts: streaming not checked`);
    assert.ok(a.usage && a.usage.completion_tokens >= a.tokens, JSON.stringify(a.usage));
    const text = await page.locator('.msg.assistant').last().locator('.text').textContent();
    assert.equal(text, a.answer);
  });

  it('JSON mode in the settings holds the answer to a JSON object', async (t) => {
    if (skip) return t.skip(skip);
    const toggle = async (on) => {
      await page.locator('details.settings summary').click();
      await page.locator('#json-mode').setChecked(on);
      await page.locator('details.settings summary').click();
    };
    await setMaxTokens(page, 24);
    await toggle(true);
    await send(page, 'Describe yourself as a JSON object.');
    const a = await waitAnswer(page);
    await toggle(false);
    assert.notEqual(a.finish, 'error', JSON.stringify(a));
    // The tiny model is random: its object may still be open after 24 tokens; it starts as one.
    assert.match(a.answer, /^\s*\{/, JSON.stringify(a));
    if (a.finish === 'stop') assert.equal(typeof JSON.parse(a.answer), 'object');
  });

  it('swaps down within a few tokens under memory pressure, and the answer continues', async (t) => {
    if (skip) return t.skip(skip);
    // A fresh conversation, so long answers stay within the tiny model's 512-token context.
    await page.locator('#new-chat').click();
    await setMaxTokens(page, 400, 1);
    // 8 MB: far more than the tiny model, so the JS heap visibly moves and the model goes to
    // the end of its trajectory (the default size would move it to the middle).
    await page.locator('#pressure-mb').fill('8');
    let swap = null, clicked = null, answer = null;
    for (let attempt = 0; attempt < 6 && !swap; attempt++) {
      // Each attempt in a fresh conversation: retries must not fill the 512-token context.
      if (attempt) await page.locator('#new-chat').click();
      const nEvents = await page.evaluate(() => window.flexquantPage.events.length);
      // Click from the page itself at the third streamed piece, reading the token count in the
      // same step: on a fast machine the tiny model's whole answer takes less than a poll.
      await page.evaluate(() => {
        const p = window.flexquantPage;
        window.__clicked = null;
        p.chat.hooks.onToken = (n) => {
          if (n !== 3) return;
          p.chat.hooks.onToken = null;
          const heap = performance.memory.usedJSHeapSize;
          document.getElementById('pressure').click();
          window.__clicked = { tokens: p.chat.tokens, at: performance.now(), heap };
        };
      });
      await send(page, 'Tell me a long story about a lighthouse keeper.');
      await until(page, 'the pressure or the end of the answer', () => window.__clicked || !window.flexquantPage.busy);
      clicked = await page.evaluate(() => { window.flexquantPage.chat.hooks.onToken = null; return window.__clicked; });
      if (!clicked) { await waitAnswer(page); continue; } // ended before the click: again
      const found = await until(page, 'a swap down', (n) => window.flexquantPage.events.slice(n).find((e) => e.type === 'swap' && e.to > e.from), nEvents, 60_000);
      swap = await found.jsonValue();
      await shot(page, 'pressure');
      answer = await waitAnswer(page);
      if (answer.tokens <= swap.tokens) {
        // The answer happened to end (end of text, or the context) right at the swap: not a
        // test of continuing.
        swap = null;
        await page.locator('#release').click();
        await until(page, 'step 0 again', () => document.querySelector('.elastic').dataset.step === '0', null, 90_000);
      }
    }
    assert.ok(swap, 'no swap down happened during an answer');
    times.pressure_to_swap_ms = Math.round(swap.at - clicked.at);
    times.swap_ms = Math.round(swap.ms);
    times.pressure_to_swap_tokens = (swap.tokenIndex ?? swap.tokens) - clicked.tokens;
    // Within a few tokens of the pressure, between tokens, during this answer.
    assert.ok(swap.tokens - clicked.tokens <= 3, `swap ${swap.tokens - clicked.tokens} tokens after the pressure`);
    assert.ok(swap.tokenIndex == null || swap.tokenIndex - clicked.tokens <= 3, JSON.stringify(swap));
    // The page really holds memory: performance.memory moved.
    const heapNow = await page.evaluate(() => performance.memory.usedJSHeapSize);
    const held = await page.evaluate(() => window.flexquantPage.panel.pressure.bytes);
    assert.ok(held >= 1e6 && heapNow - clicked.heap >= held * 0.8, `heap ${clicked.heap} -> ${heapNow}, held ${held}`);
    // The answer went on after the swap and ended normally.
    assert.ok(answer.tokens > swap.tokens, `no token after the swap: ${JSON.stringify(answer)} ${JSON.stringify(swap)}`);
    assert.notEqual(answer.finish, 'error');
    // The panel shows the new point; the log has the swap.
    const s = await step(page);
    assert.ok(s > 0, `step ${s}`);
    assert.equal(await page.locator('#trajectory circle.current').getAttribute('data-step'), String(s));
    assert.ok(await page.locator('#swaplog tr.down').count() >= 1);
    const st = await page.evaluate(() => window.flexquantPage.engine.stats());
    assert.equal(st.step, s);
    assert.ok(st.footprintBytes < (await page.evaluate(() => window.flexquantPage.panel.points[0].footprintBytes)));
    await shot(page, 'pressure-after');
  });

  it('climbs back up when the pressure is released', async (t) => {
    if (skip) return t.skip(skip);
    const before = await step(page);
    assert.ok(before > 0);
    const t0 = Date.now();
    await page.locator('#release').click();
    await until(page, 'the model back at step 0', () => document.querySelector('.elastic').dataset.step === '0', null, 90_000);
    times.release_to_top_s = (Date.now() - t0) / 1000;
    assert.ok(await page.locator('#swaplog tr.up').count() >= 1, 'no swap up in the log');
    const st = await page.evaluate(() => window.flexquantPage.engine.stats());
    assert.equal(st.step, 0);
    assert.ok(st.swapsUp >= 1);
    await shot(page, 'released');
  });

  it('recovers from a device loss mid-answer with the conversation intact', async (t) => {
    if (skip) return t.skip(skip);
    // No budget from the tests before: the budget pinned when the pressure was released is
    // what step 0 needed then, and this conversation's KV cache outgrows it (the model would
    // step down to its last step and the page then leave out the older half of the
    // conversation, which is what this test checks does not happen on a device loss).
    await unlimitedBudget(page);
    // Short answers: the whole conversation must fit the tiny model's 512-token context (its
    // random bytes can come back as 3-byte replacement characters).
    await setMaxTokens(page, 60, 1);
    let first, nEvents, busy = false;
    for (let attempt = 0; attempt < 3 && !busy; attempt++) {
      // A new conversation each try: an answer that ended before the loss would otherwise stay
      // in it, and three of them can outgrow the context.
      await page.locator('#new-chat').click();
      await send(page, 'Describe the sea at night.');
      first = await waitAnswer(page);
      assert.notEqual(first.finish, 'error', JSON.stringify(first));
      nEvents = await page.evaluate(() => window.flexquantPage.events.length);
      // Click "device loss" from inside the page at the third token: the CPU backend answers
      // the tiny model faster than a test can poll.
      await page.evaluate(() => {
        window.__lossClicked = false;
        const p = window.flexquantPage;
        const obs = new MutationObserver(() => {
          if (p.busy && p.chat.tokens >= 3) {
            obs.disconnect();
            window.__lossClicked = true;
            document.getElementById('device-loss').click();
          }
        });
        obs.observe(document.getElementById('messages'), { subtree: true, childList: true, characterData: true });
        window.__lossObserver = obs;
      });
      await send(page, 'And in the morning?');
      await until(page, 'the device loss or the end of the answer', () => window.__lossClicked || !window.flexquantPage.busy);
      busy = await page.evaluate(() => { window.__lossObserver.disconnect(); return window.__lossClicked; });
      if (!busy) await waitAnswer(page);
    }
    assert.ok(busy, 'every answer ended before the device loss could be triggered');
    const ev = await (await until(page, 'recovery', (n) => window.flexquantPage.events.slice(n).find((e) => e.type === 'recovered'), nEvents, 120_000)).jsonValue();
    times.device_loss_recovery_ms = Math.round(ev.ms);
    const types = await page.evaluate((n) => window.flexquantPage.events.slice(n).map((e) => e.type), nEvents);
    assert.ok(types.includes('device-lost'), types.join());
    assert.ok(ev.reprefilledTokens > 0, JSON.stringify(ev));
    await shot(page, 'device-loss');
    const a = await waitAnswer(page);
    assert.notEqual(a.finish, 'error', `the answer broke on the device loss: ${JSON.stringify(a)}`);
    assert.ok(a.tokens >= 3, JSON.stringify(a));
    // Everything said before is still on the page, and the model still has it: the next
    // prompt is the whole conversation (more tokens than the first exchange alone).
    const users = await page.locator('.msg.user .text').allTextContents();
    assert.deepEqual(users, ['Describe the sea at night.', 'And in the morning?']);
    await setMaxTokens(page, 24, 1);
    await send(page, 'Thank you.');
    const b = await waitAnswer(page);
    assert.notEqual(b.finish, 'error', JSON.stringify(b));
    // (Byte-level tokens: every character of the later user messages is at least one token.
    // The random model's answers may hold invalid UTF-8 that does not survive as text, so
    // they are not counted.)
    const later = users.slice(1).join('').length + 'Thank you.'.length;
    assert.ok(b.usage && b.usage.prompt_tokens >= first.usage.prompt_tokens + later, `prompt ${b.usage && b.usage.prompt_tokens} tokens after a first prompt of ${first.usage.prompt_tokens}: the conversation was lost`);
    const metas = await page.locator('.msg .meta').allTextContents();
    assert.equal(await page.evaluate(() => window.flexquantPage.chat.skipped || 0), 0, `part of the conversation was left out: ${JSON.stringify(metas)}`);
    await shot(page, 'after-recovery');
  });

  it('leaves out the older half of a conversation that outgrows the context, then keeps the prefix', async (t) => {
    if (skip) return t.skip(skip);
    // No budget (as the test before leaves it): the context, not memory, is what fills here.
    await unlimitedBudget(page);
    await page.locator('#new-chat').click();
    // ~100 tokens per exchange: the tiny model's 512-token context fills after a few.
    await setMaxTokens(page, 16, 1);
    const turns = [];
    for (let i = 0; i < 12; i++) {
      await send(page, `${i}: Tell me more about the old house by the river and who lived there.`);
      const a = await waitAnswer(page);
      assert.notEqual(a.finish, 'error', JSON.stringify(a));
      const skipped = await page.evaluate(() => window.flexquantPage.chat.skipped);
      turns.push({ skipped, prompt: a.usage.prompt_tokens, cached: a.usage.prompt_tokens_details.cached_tokens });
    }
    const drops = turns.filter((x, i) => x.skipped > (i ? turns[i - 1].skipped : 0)).length;
    const first = turns.findIndex((x) => x.skipped > 0);
    const log = JSON.stringify(turns);
    assert.ok(first > 0 && drops >= 2, `the context filled at least twice: ${log}`);
    // Half of what the model saw goes at a time, so later turns can drop nothing (here every
    // other turn: an exchange is a fifth of the context; measured drops 4 of the last 8)...
    assert.ok(drops < turns.length - first, `a drop every turn: ${log}`);
    turns.forEach((x, i) => {
      if (i === 0) return;
      const dropped = x.skipped > turns[i - 1].skipped;
      assert.equal(x.skipped % 2, 0, log);
      // ...and those reuse the whole prompt before as a cached prefix (as the engine counts
      // it: prompt_tokens_details.cached_tokens); a turn that drops exchanges starts over.
      if (dropped) assert.ok(x.cached < x.prompt / 2, `turn ${i} dropped and kept its prefix? ${log}`);
      else assert.ok(x.cached >= turns[i - 1].prompt, `turn ${i} lost its prefix: ${log}`);
    });
    const notes = await page.locator('.msg .meta', { hasText: 'did not see the oldest' }).count();
    assert.equal(notes, drops, `one note per drop: ${log}`);
  });

  it('leaves out the older half of the conversation when its KV cache pushes the model below the quality floor', async (t) => {
    if (skip) return t.skip(skip);
    // An f16 cache (`?kv=f16`: `auto` would first go to int8, and the 512-token context would
    // fill before an int8 cache tips this budget), the floor at step 0's perplexity, and a
    // budget that holds the floor step with 2.5 blocks of the cache (the runtime's 10%
    // headroom counted): the third block, a few exchanges in, does not fit.
    const p2 = await browser.context.newPage();
    const turns = [];
    let setup;
    try {
      await p2.goto(`${server.url}?kv=f16`, { waitUntil: 'commit' });
      await waitReady(p2);
      await setMaxTokens(p2, 16, 1);
      setup = await p2.evaluate(async () => {
        const e = window.flexquantPage.engine;
        const [ins, traj] = [window.flexquantPage.inspection, await e.trajectory()];
        await e.setMaxPerplexity(ins.trajectory[0].perplexity);
        const s = await e.stats();
        const need = traj[s.floorStep].footprintBytes + s.overheadBytes + 2.5 * 128 * ins.kvBytesPerToken;
        const budget = Math.ceil(need / 0.9);
        await e.setMemoryBudget(budget);
        return { budget, floorStep: s.floorStep, overhead: s.overheadBytes, perToken: ins.kvBytesPerToken };
      });
      for (let i = 0; i < 8; i++) {
        const before = await p2.evaluate(() => window.flexquantPage.engine.stats());
        await send(p2, `${i}: Tell me more about the old house by the river and who lived there.`);
        const a = await waitAnswer(p2);
        assert.notEqual(a.finish, 'error', JSON.stringify(a));
        const r = await p2.evaluate(async () => ({ skipped: window.flexquantPage.chat.skipped,
          stats: await window.flexquantPage.engine.stats() }));
        turns.push({ skipped: r.skipped, reasonBefore: before.lastReason, kvBefore: before.kvCacheBytes,
          kv: r.stats.kvCacheBytes, step: r.stats.step, reason: r.stats.lastReason, prompt: a.usage.prompt_tokens });
      }
      const log = JSON.stringify({ setup, turns });
      // The model never went below its floor...
      assert.ok(turns.every((x) => x.step <= setup.floorStep), log);
      // ...the conversation's cache took it over the budget, and each turn that started there
      // left out half of what the model saw, started a smaller cache and ended within the
      // budget; no other turn left anything out (the context never filled).
      const cuts = turns.filter((x, i) => x.skipped > (i ? turns[i - 1].skipped : 0));
      assert.ok(cuts.length >= 1, `no cut: ${log}`);
      turns.forEach((x, i) => {
        const cut = x.skipped > (i ? turns[i - 1].skipped : 0);
        assert.equal(cut, x.reasonBefore === 'below_floor', `turn ${i}: ${log}`);
        if (!cut) return;
        assert.ok(x.kv < x.kvBefore, `turn ${i} kept its cache: ${log}`);
        assert.notEqual(x.reason, 'below_floor', `turn ${i} still below: ${log}`);
      });
      const notes = await p2.locator('.msg .meta', { hasText: 'Memory is short' }).count();
      assert.equal(notes, cuts.length, `one note per cut: ${log}`);
      console.log(`# memory cuts: ${log}`);
    } finally {
      await p2.close();
    }
  });

  it('stops an answer with the Stop button, and Escape', async (t) => {
    if (skip) return t.skip(skip);
    await page.locator('#new-chat').click();
    await setMaxTokens(page, 400, 1);
    for (const how of ['button', 'escape']) {
      let stopped = null;
      const finishes = [];
      for (let attempt = 0; attempt < 8 && !stopped; attempt++) {
        // Stop from the page itself at the third streamed piece: the tiny model answers 400
        // tokens in ~0.2 s on a fast machine (1,845 tok/s measured in CI), less than a test's
        // poll and round trip, so a check from here may find every answer already over.
        await page.evaluate((how) => {
          const chat = window.flexquantPage.chat;
          chat.hooks.onToken = (n) => {
            if (n !== 3) return;
            chat.hooks.onToken = null;
            if (how === 'button') document.getElementById('stop').click();
            else document.dispatchEvent(new KeyboardEvent('keydown', { key: 'Escape', bubbles: true }));
          };
        }, how);
        await send(page, 'Count to a thousand.');
        const a = await waitAnswer(page);
        await page.evaluate(() => { window.flexquantPage.chat.hooks.onToken = null; });
        finishes.push(`${a.finish} after ${a.tokens}`);
        // The answer may end by itself (an end token among the first pieces) before the stop
        // reaches the worker: again.
        if (a.finish === 'abort') stopped = a;
        await page.locator('#new-chat').click();
      }
      assert.ok(stopped, `every answer ended before ${how === 'button' ? 'Stop' : 'Escape'}: ${finishes.join(', ')}`);
      assert.equal(stopped.finish, 'abort', JSON.stringify(stopped));
      assert.ok(stopped.tokens < 400, JSON.stringify(stopped));
    }
  });

  it('is usable at phone width', async (t) => {
    if (skip) return t.skip(skip);
    await page.setViewportSize({ width: 390, height: 844 });
    await sleep(300);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 0, `horizontal overflow of ${overflow}px at 390px`);
    await shot(page, 'phone', { fullPage: true });
    // Keyboard: Tab from the message box reaches Send; the slider and buttons are labelled.
    for (const id of ['prompt', 'budget', 'pressure-mb', 'temperature', 'top-p', 'max-tokens', 'system']) {
      const label = await page.evaluate((i) => document.querySelector(`label[for="${i}"]`)?.textContent, id);
      assert.ok(label && label.trim(), `#${id} has no label`);
    }
    await page.setViewportSize({ width: 1280, height: 900 });
  });

  it('loads from the Cache API on reload, fetching no shard over the network', async (t) => {
    if (skip) return t.skip(skip);
    const mark = server.requests.length;
    const seen = [];
    const onReq = (r) => seen.push(r.url());
    browser.context.on('request', onReq);
    const t0 = Date.now();
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    times.warm_load_s = (Date.now() - t0) / 1000;
    times.warm_load_page_s = await page.evaluate(() => window.flexquantPage.metrics.loadSeconds);
    browser.context.off('request', onReq);
    const fetched = shardRequests(server.requests.slice(mark));
    assert.deepEqual(fetched, [], `shards fetched again: ${JSON.stringify(fetched)}`);
    const seenShards = seen.filter((u) => u.includes('/ensemble/') && !u.endsWith('/manifest.json'));
    assert.deepEqual(seenShards, [], `browser requested shards: ${seenShards}`);
    assert.equal(await page.evaluate(() => window.flexquantPage.metrics.loadedFromCache), true);
    const ev = await page.evaluate(() => window.flexquantPage.progressEvents.filter((p) => p.phase === 'download'));
    assert.ok(ev.length && ev.every((p) => p.fromCache >= p.loadedBytes), JSON.stringify(ev));
    assert.ok((await page.evaluate(() => window.flexquantPage.progress)).length > 0);
    assert.match(await page.locator('#notice').textContent(), /loaded from the browser cache/);
    // Before the load the page already said the model was cached, step 0 included.
    const lines = await page.evaluate(() => window.flexquantPage.cacheLines);
    assert.equal(lines[0].state, 'starting', JSON.stringify(lines));
    assert.match(lines[0].text, /^[1-9]\d* of \d+ steps load offline/, JSON.stringify(lines));
    await shot(page, 'reload-cached');
    await setMaxTokens(page, 16);
    await send(page, 'Hello again.');
    const a = await waitAnswer(page);
    assert.notEqual(a.finish, 'error');
  });

  it('keeps the conversation across a reload: the messages come back and the next answer reads only its new tokens', async (t) => {
    if (skip) return t.skip(skip);
    // Every answer is saved when it ends (messages and the engine's exported session).
    await until(page, 'the last answer to be saved', () => window.flexquantPage.savedChat.saves >= window.flexquantPage.answers);
    const before = await page.evaluate(() => ({ messages: window.flexquantPage.chat.state().messages,
      saved: window.flexquantPage.savedChat.lastSaved, error: window.flexquantPage.savedChat.error,
      answerTokens: window.flexquantPage.lastAnswer.usage.completion_tokens }));
    assert.equal(before.error, null);
    assert.ok(before.messages.length >= 2 && before.saved.messages === before.messages.length, JSON.stringify(before));
    assert.ok(before.saved.tokens > 0 && before.saved.kvBytes > 0, JSON.stringify(before.saved));
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    const r = await page.evaluate(() => ({ restored: window.flexquantPage.restored, messages: window.flexquantPage.chat.state().messages,
      shown: [...document.querySelectorAll('#messages li.msg[data-role]')].map((li) => li.dataset.role),
      note: [...document.querySelectorAll('#messages li.event')].map((li) => li.textContent).join(' | ') }));
    assert.deepEqual(r.messages, before.messages);
    assert.deepEqual(r.shown, before.messages.map((m) => m.role));
    assert.equal(r.restored.reason, null, JSON.stringify(r.restored));
    assert.equal(r.restored.keptTokens, before.saved.tokens);
    assert.match(r.note, new RegExp(`^Restored the conversation of .* \\(${before.messages.length} messages\\); the model goes on from its KV cache \\(${before.saved.tokens} tokens\\)`), r.note);
    // The next turn sends the whole conversation again; all of it up to the last answer's
    // tokens is in the restored cache (a fresh engine would have 0 cached).
    await setMaxTokens(page, 8);
    await send(page, 'Thanks, and one more thing.');
    const a = await waitAnswer(page);
    assert.notEqual(a.finish, 'error', JSON.stringify(a));
    const cached = a.usage.prompt_tokens_details.cached_tokens;
    assert.ok(cached > 0 && cached <= r.restored.keptTokens && cached >= r.restored.keptTokens - before.answerTokens,
      `${cached} tokens cached of ${r.restored.keptTokens} restored (last answer ${before.answerTokens} tokens)`);
    // "New chat" forgets it: the next reload starts empty.
    await page.locator('#new-chat').click();
    await until(page, 'the saved conversation to be gone', async () => {
      const db = await new Promise((res, rej) => { const q = indexedDB.open('flexquant-chat'); q.onsuccess = () => res(q.result); q.onerror = rej; });
      const n = await new Promise((res) => { const q = db.transaction('conversations').objectStore('conversations').count(); q.onsuccess = () => res(q.result); });
      db.close();
      return n === 0;
    });
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    assert.equal(await page.evaluate(() => window.flexquantPage.restored), null);
    assert.equal(await page.locator('#messages li.msg[data-role]').count(), 0);
  });

  it('brings back a saved conversation of another ensemble version as text only, drops a garbled one, and keeps nothing when turned off', async (t) => {
    if (skip) return t.skip(skip);
    await setMaxTokens(page, 4);
    await send(page, 'Hello.');
    await waitAnswer(page);
    await until(page, 'the answer to be saved', () => window.flexquantPage.savedChat.saves >= window.flexquantPage.answers);
    // What a redeploy leaves behind: the session of another base shard under the same URL.
    const edit = (how) => page.evaluate(async (how) => {
      const db = await new Promise((res, rej) => { const q = indexedDB.open('flexquant-chat'); q.onsuccess = () => res(q.result); q.onerror = rej; });
      const store = (name) => db.transaction(name, 'readwrite').objectStore(name);
      const get = (name, key) => new Promise((res) => { const q = store(name).get(key); q.onsuccess = () => res(q.result); });
      const put = (name, key, rec) => new Promise((res) => { const q = store(name).put(rec, key); q.onsuccess = res; });
      const [key] = await new Promise((res) => { const q = store('conversations').getAllKeys(); q.onsuccess = () => res(q.result); });
      const rec = await get('conversations', key);
      if (how === 'format-1') {
        // What the page saved before the session got a store of its own.
        Object.assign(rec, { format: 1, session: await get('sessions', key) });
        await put('conversations', key, rec);
        await new Promise((res) => { const q = store('sessions').delete(key); q.onsuccess = res; });
      } else if (how === 'other-base') {
        const session = await get('sessions', key);
        session.base = '0'.repeat(64);
        await put('sessions', key, session);
      } else {
        rec.messages = [{ role: 'user', content: 42 }];
        await put('conversations', key, rec);
      }
      db.close();
      return rec.messages.length;
    }, how);
    // A conversation saved by the page before (format 1: one record) still comes back whole.
    const kept = await page.evaluate(() => window.flexquantPage.savedChat.lastSaved.tokens);
    await edit('format-1');
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    const old = await page.evaluate(() => window.flexquantPage.restored);
    assert.equal(old.reason, null, JSON.stringify(old));
    assert.equal(old.keptTokens, kept);
    await send(page, 'And then?');
    await waitAnswer(page);
    await until(page, 'the answer to be saved', () => window.flexquantPage.savedChat.saves >= window.flexquantPage.answers);
    const n = await edit('other-base');
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    const r = await page.evaluate(() => ({ restored: window.flexquantPage.restored, messages: window.flexquantPage.chat.state().messages.length,
      note: [...document.querySelectorAll('#messages li.event')].map((li) => li.textContent).join(' | ') }));
    assert.equal(r.messages, n);
    assert.equal(r.restored.keptTokens, 0);
    assert.match(r.restored.reason, /base/, JSON.stringify(r.restored));
    assert.match(r.note, /the model reads it again with the next message/, r.note);
    // The conversation goes on (read again from its text: nothing cached).
    await send(page, 'Go on.');
    const a = await waitAnswer(page);
    assert.notEqual(a.finish, 'error', JSON.stringify(a));
    assert.equal(a.usage.prompt_tokens_details.cached_tokens, 0);
    await until(page, 'the answer to be saved', () => window.flexquantPage.savedChat.saves >= window.flexquantPage.answers);
    await edit('garbled');
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    assert.equal(await page.evaluate(() => window.flexquantPage.restored), null);
    assert.equal(await page.locator('#messages li.msg[data-role]').count(), 0);
    // Keeping it off: nothing is saved; on again: the conversation so far is.
    const count = () => page.evaluate(async () => {
      const db = await new Promise((res, rej) => { const q = indexedDB.open('flexquant-chat'); q.onsuccess = () => res(q.result); q.onerror = rej; });
      const n = await new Promise((res) => { const q = db.transaction('conversations').objectStore('conversations').count(); q.onsuccess = () => res(q.result); });
      db.close();
      return n;
    });
    await page.locator('details.settings summary').click();
    await page.locator('#remember-chat').uncheck();
    await send(page, 'Not to be kept.');
    await waitAnswer(page);
    const saves = await page.evaluate(() => window.flexquantPage.savedChat.saves);
    assert.equal(saves, 0);
    assert.equal(await count(), 0);
    await page.locator('#remember-chat').check();
    await page.locator('details.settings summary').click();
    await until(page, 'the conversation to be saved', () => window.flexquantPage.savedChat.saves === 1);
    assert.equal(await count(), 1);
  });

  it('deletes the cached model on request; the chat goes on and the next visit downloads it', async (t) => {
    if (skip) return t.skip(skip);
    await until(page, 'the delete button', () => !document.getElementById('delete-cache').disabled);
    const before = await page.evaluate(() => window.flexquantPage.cached);
    assert.ok(before.cachedFiles > 0, JSON.stringify(before).slice(0, 300));
    await page.locator('#delete-cache').click();
    await until(page, 'the cache to be empty', () => document.getElementById('requirements').dataset.cached === 'no' &&
      window.flexquantPage.deleted != null, null, 90_000);
    const r = await page.evaluate(async () => {
      const c = await caches.open('flexquant');
      return { deleted: window.flexquantPage.deleted, cached: window.flexquantPage.cached,
        line: document.getElementById('req-cache').textContent, note: document.getElementById('req-cache-note').textContent,
        disabled: document.getElementById('delete-cache').disabled,
        left: (await c.keys()).map((k) => k.url).filter((u) => u.includes('/ensemble/')) };
    });
    // Seen in the Cache API itself, not only through the engine's report.
    assert.deepEqual(r.left, [], `cache entries left: ${r.left}`);
    assert.ok(r.deleted >= before.cachedFiles + 1, `deleted ${r.deleted} of ${before.cachedFiles} files + the manifest`);
    assert.deepEqual([r.cached.manifestCached, r.cached.cachedFiles, r.cached.completeSteps.length], [false, 0, 0]);
    assert.match(r.line, /^Not cached/, r.line);
    assert.match(r.note, new RegExp(`^Deleted ${r.deleted} cached entries: the next visit downloads the model again`), r.note);
    assert.equal(r.disabled, true);
    // The running model keeps what it holds.
    await setMaxTokens(page, 8);
    await send(page, 'Still there?');
    assert.notEqual((await waitAnswer(page)).finish, 'error');
    await shot(page, 'cache-deleted');
    const mark = server.requests.length;
    await page.reload({ waitUntil: 'commit' });
    await waitReady(page);
    assert.ok(shardRequests(server.requests.slice(mark)).length >= 3, JSON.stringify(server.requests.slice(mark)));
    assert.equal(await page.evaluate(() => window.flexquantPage.metrics.loadedFromCache), false);
    assert.match(await page.locator('#notice').textContent(), /downloaded .* cached for the next visit/);
  });

  it('shows how far it read a long prompt, and Stop reaches it before the first token (?prefill=8)', async (t) => {
    if (skip) return t.skip(skip);
    const p2 = await browser.context.newPage();
    try {
      await p2.goto(`${server.url}?prefill=8`, { waitUntil: 'commit' });
      await waitReady(p2);
      await setMaxTokens(p2, 8);
      // What the answer shows at each `prefill` event; Stop pressed at the third, from the page
      // itself (the tiny model reads 8 tokens in well under a test's round trip).
      await p2.evaluate(() => {
        const chat = window.flexquantPage.chat;
        const reading = chat.reading.bind(chat);
        window.seenReading = [];
        chat.reading = (e) => {
          reading(e);
          window.seenReading.push(chat.reader.body.textContent);
          if (window.seenReading.length === 3) document.getElementById('stop').click();
        };
      });
      // The tiny model's tokens are nearly characters: ~280 tokens, in its 512-token context.
      await send(p2, 'The fox ran through the quiet woods at dawn. '.repeat(6));
      const a = await waitAnswer(p2);
      const seen = await p2.evaluate(() => window.seenReading);
      assert.equal(a.finish, 'abort', JSON.stringify(a));
      assert.equal(a.tokens, 0, JSON.stringify(a));
      assert.match(seen[0], /^Reading the prompt… 8 of (\d+) tokens$/, seen.join(' | '));
      const total = Number(seen[0].match(/of (\d+)/)[1]);
      // The stop reaches the worker a message later: a few more pieces may be read, not all.
      assert.ok(seen.length >= 3 && 8 * seen.length < total - 8, `${seen.length} pieces of ${total} tokens`);
      assert.equal(await p2.evaluate(() => [...document.querySelectorAll('.msg.assistant .text')].at(-1).textContent), '(no text)');
      // The next answer reads on from where the stopped prompt got to.
      await p2.evaluate(() => { window.flexquantPage.chat.reading = () => {}; });
      await send(p2, 'Go on.');
      const b = await waitAnswer(p2);
      assert.notEqual(b.finish, 'error', JSON.stringify(b));
      assert.ok(b.usage.prompt_tokens_details.cached_tokens >= 8 * seen.length, JSON.stringify(b.usage));
    } finally {
      await p2.close();
    }
  });

  it('keeps the KV cache in int8 with ?kv=int8: the requirements, the panel and the engine say so, and it answers', async (t) => {
    if (skip) return t.skip(skip);
    const p2 = await browser.context.newPage();
    try {
      await p2.goto(`${server.url}?kv=int8`, { waitUntil: 'commit' });
      await waitReady(p2);
      const r = await p2.evaluate(async () => ({ ins: window.flexquantPage.inspection,
        stats: await window.flexquantPage.engine.stats(), memory: document.getElementById('req-memory').textContent }));
      assert.equal(r.ins.kvCache, 'int8');
      assert.equal(r.stats.kvCache, 'int8');
      // The first tab owns the saved conversation: this one starts its own and keeps nothing.
      assert.deepEqual(await p2.evaluate(async () => [await window.flexquantPage.savedChat.owner, window.flexquantPage.restored]), [false, null]);
      assert.match(r.memory, / in int8\)$/, r.memory);
      // Same model and context as the default page (whose cache starts in f16): int8 holds fewer
      // bytes per token.
      const f16 = await page.evaluate(() => window.flexquantPage.inspection.kvBytesPerToken);
      assert.ok(r.ins.kvBytesPerToken < f16, `${r.ins.kvBytesPerToken} against ${f16}`);
      await until(p2, 'the panel to show the format', () => / \(int8\) · /.test(document.getElementById('st-kv').textContent));
      await setMaxTokens(p2, 8);
      await send(p2, 'Hello?');
      assert.notEqual((await waitAnswer(p2)).finish, 'error');
    } finally {
      await p2.close();
    }
  });
});
