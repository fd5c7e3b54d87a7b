// Browser benchmark (./build.sh bench -> target/bench/browser.json): tests/web/bench-page.html
// in headless Chromium, served with the npm test project by tests/web/server.py.
// Usage: node bench_browser.mjs SERVER_URL OUT.json NAME=MANIFEST_PATH...
import { writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const [server, out, ...targets] = process.argv.slice(2);
if (!server || !out || !targets.length) throw new Error('usage: node bench_browser.mjs SERVER_URL OUT.json NAME=PATH...');
const ARGS = ['--enable-unsafe-webgpu', '--headless=new', '--no-sandbox',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];

const browser = await chromium.launch({ executablePath: process.env.FLEXQUANT_CHROMIUM || '/usr/bin/chromium', args: ARGS });
const report = { browser: browser.version(), ensembles: {} };
try {
  for (const t of targets) {
    const [name, path] = t.split('=');
    const page = await browser.newPage();
    const logs = [];
    page.on('console', (m) => logs.push(m.text()));
    await page.goto(`${server}/npm/bench.html?manifest=${encodeURIComponent(server + path)}`);
    await page.waitForFunction(() => window.__result, null, { timeout: 900_000 });
    const r = await page.evaluate(() => window.__result);
    if (r.error) throw new Error(`${name}: ${r.error}\n${logs.join('\n')}`);
    report.ensembles[name] = r;
    console.log(`${name}: ${JSON.stringify(r)}`);
    await page.close();
  }
  // Parallel downloads against latency: the first (largest available) ensemble.
  const [name, path] = targets[0].split('=');
  const page = await browser.newPage();
  await page.goto(`${server}/npm/bench-latency.html?manifest=${encodeURIComponent(server + path)}`);
  await page.waitForFunction(() => window.__result, null, { timeout: 900_000 });
  const r = await page.evaluate(() => window.__result);
  if (r.error) throw new Error(`downloads (${name}): ${r.error}`);
  report.downloads = { ensemble: name, ...r };
  console.log(`downloads (${name}): ${JSON.stringify(r)}`);
  await page.close();
} finally {
  await browser.close();
}
// Top-level keys from the first (largest available) ensemble, the rest under `ensembles`.
const first = report.ensembles[targets[0].split('=')[0]];
const keys = ['adapter', 'cold_load_s', 'cold_load_bytes', 'warm_load_s', 'decode_tok_s', 'swap_latency_tokens', 'recovery_vs_warm'];
const top = Object.fromEntries(keys.map((k) => [k, first[k]]));
top.cold_download_vs_single_file = report.downloads.cold_download_vs_single_file;
top.cold_load_latency_ratio = report.downloads.cold_load_latency_ratio;
// The WebGPU engine against the read-everything kernel on the browser's adapter (issue 18).
top.webgpu_adapter = first.webgpu?.adapter ?? null;
top.webgpu_decode_tok_s = first.webgpu?.decode_tok_s ?? null;
top.webgpu_read_kernel_gbs = first.webgpu?.read_kernel_gbs ?? null;
top.webgpu_decode_vs_read_kernel = first.webgpu?.decode_vs_read_kernel ?? null;
writeFileSync(out, JSON.stringify({ ensemble: targets[0].split('=')[0], ...top, ...report }, null, 1) + '\n');
console.log(`wrote ${out}`);
