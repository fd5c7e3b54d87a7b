// Shared plumbing of the end-to-end tests: a plain `python3 -m http.server` (no Range support)
// serving a site under a sub-path, headless Chromium with WebGPU through playwright-core, and
// small waits on what the page shows.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, cpSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const CHROMIUM = process.env.FLEXQUANT_CHROMIUM || '/usr/bin/chromium';
export const OUT = process.env.FLEXQUANT_E2E_OUT || new URL('../../target/e2e', import.meta.url).pathname;
export const REQUIRE = process.env.FLEXQUANT_REQUIRE_BROWSER === '1';
export const ARGS = [
  '--enable-unsafe-webgpu', '--headless=new', '--no-sandbox',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--no-first-run', '--disable-quic',
];

/** Why these tests cannot run here, or null. Under FLEXQUANT_REQUIRE_BROWSER=1 a reason fails. */
export async function missing(site) {
  if (!existsSync(CHROMIUM)) return `${CHROMIUM} not found (apt-get install chromium)`;
  try { await import('playwright-core'); } catch { return 'playwright-core not installed (npm ci in tests/e2e)'; }
  if (!site) return 'no site given (FLEXQUANT_E2E_SITE: run through ./build.sh e2e)';
  if (!existsSync(join(site, 'index.html'))) return `${site}/index.html missing (./build.sh site DIR)`;
  if (!existsSync(join(site, 'flexquant', 'worker.js'))) return `${site}/flexquant/worker.js missing (the npm package)`;
  if (!existsSync(join(site, 'ensemble', 'manifest.json'))) return `${site}/ensemble/manifest.json missing`;
  return null;
}

/** Skips (locally) or fails (FLEXQUANT_REQUIRE_BROWSER=1) when the browser or site is missing. */
export async function requireOrSkip(t, site) {
  const why = await missing(site);
  if (!why) return false;
  if (REQUIRE) throw new Error(`end-to-end test cannot run: ${why}`);
  t.skip(why);
  return true;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
  });
}

/**
 * Serves a fresh root with `site` linked (or copied, `copy: true`) at `/<subPath>/`.
 * `requests` lists every path the server answered, with its status (python's access log);
 * `isolated: true` sends COOP/COEP as well.
 */
export async function serve(site, { subPath = 'apps/flexquant', copy = false, isolated = false } = {}) {
  const root = mkdtempSync(join(tmpdir(), 'fq-e2e-root-'));
  const dir = join(root, subPath);
  mkdirSync(join(dir, '..'), { recursive: true });
  if (copy) cpSync(site, dir, { recursive: true }); else symlinkSync(site, dir);
  const port = await freePort();
  // `isolated`: the same server sending COOP/COEP (tests/web/serve_isolated.py, what
  // `./build.sh demo` serves with): the page is cross-origin isolated, wasm threads run.
  const py = isolated
    ? ['-u', new URL('../web/serve_isolated.py', import.meta.url).pathname, String(port), root]
    : ['-u', '-m', 'http.server', String(port), '--bind', '127.0.0.1', '--directory', root];
  const proc = spawn('python3', py, { stdio: ['ignore', 'pipe', 'pipe'] });
  const requests = [];
  let buf = '';
  const onData = (d) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 1);
      const m = /"(GET|HEAD|POST) (\S+) HTTP\/[\d.]+" (\d+)/.exec(line);
      if (m) requests.push({ method: m[1], path: decodeURIComponent(m[2]), status: Number(m[3]) });
    }
  };
  proc.stdout.on('data', onData);
  proc.stderr.on('data', onData);
  const url = `http://127.0.0.1:${port}/${subPath}/`;
  for (let i = 0; i < 100; i++) {
    try { const r = await fetch(url); if (r.ok) break; } catch { /* not up yet */ }
    await sleep(100);
  }
  return {
    url, root, dir, requests,
    close() { proc.kill(); rmSync(root, { recursive: true, force: true }); },
  };
}

/** A fresh Chromium profile (so a fresh Cache API), with WebGPU unless `webgpu: false` (then
 * as Chrome on Linux ships: `navigator.gpu` exists, `requestAdapter()` gives null); `args`
 * adds command-line switches. */
export async function launch({ viewport = { width: 1280, height: 900 }, webgpu = true, args: extra = [],
  serviceWorkers = 'block' } = {}) {
  const { chromium } = await import('playwright-core');
  const profile = mkdtempSync(join(tmpdir(), 'fq-e2e-profile-'));
  const args = [...(webgpu ? ARGS : ARGS.filter((a) => a !== '--enable-unsafe-webgpu')), ...extra];
  // Service workers are blocked unless a test allows them: on a plain host the chat page
  // registers one and reloads once to get threads (www/modules/isolation.js), which
  // threads.test.mjs tests; the other tests see a browser without them (one thread).
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args, viewport, serviceWorkers,
  });
  const log = [];
  context.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  context.on('weberror', (e) => log.push(`[pageerror] ${e.error()}`));
  return {
    context, log, profile,
    async close() { await context.close(); rmSync(profile, { recursive: true, force: true }); },
  };
}

/**
 * Opens `url` in a fresh headless Chromium (WebGPU unless `webgpu: false`), waits for the
 * page's `window.__result` and returns it with the page's console lines; the browser is closed.
 */
export async function pageResult(url, { webgpu = true, timeout = 300_000 } = {}) {
  const { chromium } = await import('playwright-core');
  const args = webgpu ? ARGS : ARGS.filter((a) => a !== '--enable-unsafe-webgpu');
  const browser = await chromium.launch({ executablePath: CHROMIUM, args });
  try {
    const page = await browser.newPage();
    const logs = [];
    page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`[pageerror] ${e}`));
    await page.goto(url);
    await page.waitForFunction(() => window.__result, null, { timeout });
    return { result: await page.evaluate(() => window.__result), logs };
  } finally {
    await browser.close();
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Waits until `fn` (run in the page) is truthy; on timeout the error says what was awaited.
 * An async `fn` is polled here: Playwright's `waitForFunction` takes its Promise for a truthy
 * value and returns at once (microsoft/playwright#29132), which made such waits no-ops.
 */
export async function until(page, what, fn, arg, timeout = 60_000) {
  try {
    if (fn.constructor.name !== 'AsyncFunction') return await page.waitForFunction(fn, arg, { timeout, polling: 100 });
    const end = Date.now() + timeout;
    for (;;) {
      const v = await page.evaluate(fn, arg);
      if (v) return v;
      if (Date.now() > end) throw new Error('timeout');
      await sleep(100);
    }
  } catch (e) {
    const state = await page.evaluate(() => {
      const p = window.flexquantPage || {};
      return { state: p.state, fatal: p.fatal, tokens: p.chat && p.chat.tokens, busy: p.busy, step: document.querySelector('.elastic')?.dataset.step, notice: document.getElementById('notice')?.textContent, events: (p.events || []).slice(-8).map((e) => e.type + (e.type === 'swap' ? ` ${e.from}->${e.to}` : '')) };
    }).catch(() => ({}));
    const why = /timeout/i.test(String(e?.message)) ? `timed out after ${timeout} ms` : `failed (${e?.message})`;
    throw new Error(`${why} waiting for ${what}; page: ${JSON.stringify(state)}`);
  }
}

export async function waitReady(page, timeout = 120_000) {
  await until(page, 'the model to be ready', () => window.flexquantPage && (window.flexquantPage.state === 'ready' || window.flexquantPage.state === 'failed'), null, timeout);
  const fatal = await page.evaluate(() => window.flexquantPage.fatal);
  if (fatal) throw new Error(`page failed to load the model: ${fatal}`);
}

/** Types into the message box and sends with Enter (the keyboard path a user takes). */
export async function send(page, text) {
  const n = await page.evaluate(() => window.flexquantPage.answers || 0);
  await page.locator('#prompt').fill(text);
  await page.locator('#prompt').press('Enter');
  await until(page, 'the answer to start', (k) => window.flexquantPage.busy === true || (window.flexquantPage.answers || 0) > k, n, 30_000);
  page.__answers = n;
}

/** Waits for the answer to the last `send` and returns what the page recorded of it. */
export async function waitAnswer(page, timeout = 180_000) {
  await until(page, 'the answer to finish', (k) => (window.flexquantPage.answers || 0) > k && !window.flexquantPage.busy, page.__answers ?? 0, timeout);
  return page.evaluate(() => window.flexquantPage.lastAnswer);
}

export async function setMaxTokens(page, n, temperature) {
  await page.locator('details.settings summary').click();
  await page.locator('#max-tokens').fill(String(n));
  if (temperature != null) await page.locator('#temperature').fill(String(temperature));
  await page.locator('details.settings summary').click();
}

/** Moves the page's budget slider to "unlimited" (as a user would) and waits until the engine has no budget. */
export async function unlimitedBudget(page) {
  await page.locator('#budget').fill('1000');
  await until(page, 'no memory budget', async () => (await window.flexquantPage.engine.stats()).budgetBytes == null);
}

export async function step(page) {
  return Number(await page.evaluate(() => document.querySelector('.elastic').dataset.step));
}

export async function shot(page, name, opts = {}) {
  mkdirSync(OUT, { recursive: true });
  await page.screenshot({ path: join(OUT, `${name}.png`), fullPage: true, ...opts });
}

/** Shard files (everything the ensemble serves but the manifest) among `requests`. */
export function shardRequests(requests) {
  return requests.filter((r) => r.path.includes('/ensemble/') && !r.path.endsWith('/manifest.json'));
}
