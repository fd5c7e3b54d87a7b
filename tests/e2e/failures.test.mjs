// What the user sees when things go wrong: a damaged shard on the server (clear message, the
// chat keeps working at its step), a browser without WebGPU or outside a secure context (it
// says why and runs on the CPU), a page that insists on WebGPU without it (a clear message).

import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { requireOrSkip, serve, launch, until, waitReady, send, waitAnswer, setMaxTokens, step, shot, shardRequests } from './helpers.mjs';

const SITE = process.env.FLEXQUANT_E2E_SITE;

/** The page in a fresh browser with `init` run before its scripts, loaded; then `body(page)`. */
async function onReadyPage(init, body) {
  const server = await serve(SITE);
  const browser = await launch({ viewport: { width: 800, height: 600 } });
  try {
    const page = await browser.context.newPage();
    await page.addInitScript(init);
    await page.goto(server.url);
    await waitReady(page);
    await body(page);
  } finally {
    await browser.close();
    server.close();
  }
}

describe('failures the page explains', { concurrency: false }, () => {
  it('a corrupt shard on the server: a clear message, the chat keeps working at its step', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const server = await serve(SITE, { subPath: 'corrupt/site', copy: true });
    const browser = await launch();
    try {
      // Damage the module version only the last trajectory step uses (same size, other bytes),
      // as a broken upload would: loading at step 0 does not need it, shrinking to the end does.
      const manifest = JSON.parse(readFileSync(join(server.dir, 'ensemble', 'manifest.json'), 'utf8'));
      const last = manifest.trajectory[manifest.trajectory.length - 1].swap;
      const v = manifest.modules.find((m) => m.layer === last.layer && m.kind === last.kind && m.bits === last.to_bits);
      // A file in a pack (manifest version 2) is damaged inside its pack.
      const path = join(server.dir, 'ensemble', v.pack ? v.pack.pack : v.file);
      const from = v.pack ? v.pack.offset : 0;
      const bytes = readFileSync(path);
      for (let i = from; i < from + v.bytes; i += 7) bytes[i] ^= 0x5a;
      rmSync(path);
      writeFileSync(path, bytes);
      const lastStep = manifest.trajectory.length - 1;

      const page = await browser.context.newPage();
      await page.goto(server.url);
      await waitReady(page);
      await setMaxTokens(page, 12);
      // Pressure: the model must shrink to the end of the trajectory, which needs the bad file.
      await page.locator('#pressure-mb').fill('8');
      await page.locator('#pressure').click();
      await until(page, 'an error naming the damaged file', (f) => {
        const n = document.getElementById('notice');
        return n && !n.hidden && n.dataset.kind === 'error' && n.textContent.includes(f);
      }, v.file, 90_000);
      const notice = await page.locator('#notice').textContent();
      assert.match(notice, /damaged/, notice);
      assert.match(notice, /keeps running at step \d+/, notice);
      const errs = await page.evaluate(() => window.flexquantPage.errors);
      assert.ok(errs.some((e) => e.code === 'hash-mismatch' || e.code === 'truncated'), JSON.stringify(errs));
      // The model did not take the damaged version: it made every move before it (the step
      // next to the last), the panel shows that step (it polls stats), and it still answers.
      // The error can come first: a swap's files download in parallel, and the damaged one may
      // fail before the moves ahead of it are made.
      await until(page, 'every move before the damaged shard', (want) =>
        window.flexquantPage.engine.stats().step === want, lastStep - 1, 30_000).catch(() => {});
      const st = await page.evaluate(() => window.flexquantPage.engine.stats());
      assert.equal(st.step, lastStep - 1, 'every move before the damaged shard, not the one that needs it');
      await until(page, 'the panel to show the step reached', (want) =>
        document.querySelector('.elastic').dataset.step === String(want), st.step, 10_000);
      assert.equal(await step(page), st.step);
      await send(page, 'Are you still there?');
      const a = await waitAnswer(page);
      assert.notEqual(a.finish, 'error', JSON.stringify(a));
      assert.ok(a.tokens >= 1);
      await shot(page, 'corrupt-shard');
    } finally {
      await browser.close();
      server.close();
    }
  });

  it('a wrong ?model= address: a clear message', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const server = await serve(SITE);
    const browser = await launch({ viewport: { width: 800, height: 600 } });
    try {
      const page = await browser.context.newPage();
      await page.goto(server.url + '?model=./nowhere/manifest.json');
      await until(page, 'the error message', () => !document.getElementById('fatal').hidden);
      const text = await page.locator('#fatal').textContent();
      assert.match(text, /Model not found/);
      assert.match(text, /nowhere\/manifest\.json/);
      assert.ok(server.requests.some((r) => r.path === '/apps/flexquant/nowhere/manifest.json' && r.status === 404));
      await shot(page, 'model-not-found');
    } finally {
      await browser.close();
      server.close();
    }
  });

  it('without WebGPU: the page runs on the CPU backend, says so, and answers', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const server = await serve(SITE);
    const browser = await launch({ viewport: { width: 800, height: 600 }, webgpu: false });
    try {
      const page = await browser.context.newPage();
      await page.goto(server.url);
      await waitReady(page);
      const info = await page.evaluate(() => ({ backend: window.flexquantPage.backend, line: document.getElementById('model-line').textContent }));
      assert.equal(info.backend, 'cpu', JSON.stringify(info));
      assert.match(info.line, /CPU \(cpu \(packed/, info.line);
      const notes = await page.locator('#notice').textContent();
      assert.match(notes, /Running on the CPU \(no WebGPU adapter/, notes);
      // checkSupport said so before the load, in words the user can act on.
      const support = await page.evaluate(() => window.flexquantPage.support);
      assert.deepEqual([support.backend, support.webgpu, support.gpu], ['cpu', true, null], JSON.stringify(support));
      const line = await page.locator('#support-line').textContent();
      assert.match(line, /^No WebGPU adapter\. The browser has WebGPU but found no usable graphics adapter .* runs on the CPU backend/, line);
      await setMaxTokens(page, 8);
      await send(page, 'Hello!');
      const a = await waitAnswer(page);
      assert.notEqual(a.finish, 'error', JSON.stringify(a));
      assert.ok(a.usage && a.usage.completion_tokens >= 1, JSON.stringify(a));
      await shot(page, 'no-webgpu');
      // A page that insists on WebGPU cannot run here: it says why, and loads no model file.
      await page.close();
      const mark = server.requests.length;
      const forced = await browser.context.newPage();
      await forced.goto(server.url + '?backend=webgpu');
      await until(forced, 'the error message', () => !document.getElementById('fatal').hidden);
      const text = await forced.locator('#fatal').textContent();
      assert.match(text, /^No WebGPU adapter/, text);
      const fetched = shardRequests(server.requests.slice(mark));
      assert.deepEqual(fetched, [], JSON.stringify(fetched));
    } finally {
      await browser.close();
      server.close();
    }
  });

  it('without IndexedDB (private mode, storage denied): the chat answers, keeps nothing, and says so', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    // What a browser that refuses storage does: opening a database fails.
    const init = () => {
      IDBFactory.prototype.open = function () { throw new DOMException('storage is denied here', 'SecurityError'); };
    };
    await onReadyPage(init, async (page) => {
      await setMaxTokens(page, 6);
      await send(page, 'Hello!');
      const a = await waitAnswer(page);
      assert.notEqual(a.finish, 'error', JSON.stringify(a));
      await until(page, 'the page to say the conversation is not kept', () =>
        [...document.querySelectorAll('#messages li.event')].some((li) => /does not let the page keep the conversation \(.*storage is denied here.*\): a reload loses it/.test(li.textContent)));
      assert.equal(await page.evaluate(() => window.flexquantPage.savedChat.saves), 0);
      // It goes on answering.
      await send(page, 'Again?');
      assert.notEqual((await waitAnswer(page)).finish, 'error');
    });
  });

  it('a site whose storage is nearly full: before the load the page says the model will not stay cached, then runs', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    // What the browser reports when other data of the site fill its quota but for 1 kB.
    const init = () => {
      StorageManager.prototype.estimate = async () => ({ quota: 50e6, usage: 50e6 - 1000 });
    };
    await onReadyPage(init, async (page) => {
      const r = await page.evaluate(() => ({ lines: window.flexquantPage.storageLines, need: window.flexquantPage.inspection.firstLoadBytes }));
      assert.ok(r.need > 1000, JSON.stringify(r));
      assert.match(r.lines[0], /^50\.0 MB of 50\.0 MB used by this site; only 1\.00 KB left for the \d[\d.]* [KMG]?B to start: the model will run but not stay cached/, JSON.stringify(r.lines));
      await setMaxTokens(page, 4);
      await send(page, 'Hello!');
      assert.notEqual((await waitAnswer(page)).finish, 'error');
    });
  });

  it('an insecure context (http:// on a host that is not local): the page says why and runs on the CPU, uncached', async (t) => {
    if (await requireOrSkip(t, SITE)) return;
    const server = await serve(SITE);
    // The same server under a name that is not localhost: not a secure context, so no WebGPU,
    // no Cache API and no SubtleCrypto.
    const browser = await launch({ viewport: { width: 800, height: 600 }, args: ['--host-resolver-rules=MAP flexquant.test 127.0.0.1'] });
    try {
      const page = await browser.context.newPage();
      await page.goto(server.url.replace('127.0.0.1', 'flexquant.test'));
      await waitReady(page);
      const r = await page.evaluate(() => ({ secure: window.isSecureContext, support: window.flexquantPage.support,
        backend: window.flexquantPage.backend, line: document.getElementById('support-line').textContent,
        cache: document.getElementById('req-cache').textContent, canDelete: !document.getElementById('delete-cache').disabled }));
      assert.equal(r.secure, false);
      assert.deepEqual([r.support.secureContext, r.support.webgpu, r.support.backend, r.backend], [false, false, 'cpu', 'cpu'], JSON.stringify(r.support));
      assert.match(r.line, /^This page needs a secure context\. WebGPU and the browser cache are only available over https:\/\/ .* runs on the CPU backend/, r.line);
      assert.match(r.cache, /^Not cached/, r.cache);
      const notice = await page.locator('#notice').textContent();
      assert.match(notice, /downloaded .* \(the browser cache is unavailable here, so the next visit downloads it again\)/, notice);
      assert.equal(r.canDelete, false);
      await setMaxTokens(page, 6);
      await send(page, 'Hello!');
      const a = await waitAnswer(page);
      assert.notEqual(a.finish, 'error', JSON.stringify(a));
      await shot(page, 'insecure-context');
    } finally {
      await browser.close();
      server.close();
    }
  });
});
