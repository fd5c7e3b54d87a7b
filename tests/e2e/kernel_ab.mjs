// A/B of the CPU backend's wasm kernel in headless Chromium: the same microbenchmark the
// browser benchmark runs (`benchDotKernel`: one token's matrix-vector product streaming a
// weight matrix of a given size), for two or more builds in one page, alternated, best of the
// rounds. Node's V8 is not Chromium's (stop 50: a change that made 2-bit rows 27% faster in
// Node gained 1% on a 90 MB stream in Chromium 156), so kernel changes are measured here.
//
//   node tests/e2e/kernel_ab.mjs DIR_A DIR_B [...]
//
// Each DIR is `wasm-bindgen --target web --out-name flexquant` output of the library, e.g.
//   CARGO_TARGET_DIR=target/web cargo build --release --target wasm32-unknown-unknown --lib
//   wasm-bindgen --target web --out-dir /tmp/b --out-name flexquant \
//     target/web/wasm32-unknown-unknown/release/flexquant.wasm
// Environment: SIZES_MB (default "8,90"), BITS (default "2,3,4,5,6,8"), ROUNDS (default 4).
// KERNEL=attention measures one layer's attention instead (`benchAttention`: million
// query-key pairs per second over a cache of POSITIONS tokens, default "256,1500", for
// QUERIES query tokens, default "1,64", the cache as KV, default "f16,int8").
// The page is cross-origin isolated, so `performance.now()` is not coarsened to 0.1 ms.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const dirs = process.argv.slice(2);
if (dirs.length < 2) {
  console.error('usage: node tests/e2e/kernel_ab.mjs DIR_A DIR_B [...] (wasm-bindgen --target web outputs)');
  process.exit(2);
}
for (const d of dirs) {
  for (const f of ['flexquant.js', 'flexquant_bg.wasm']) {
    if (!fs.existsSync(path.join(d, f))) {
      console.error(`${d}: no ${f} (expected wasm-bindgen --target web --out-name flexquant output)`);
      process.exit(2);
    }
  }
}
const list = (v, d) => (v ?? d).split(',').map(Number);
const sizes = list(process.env.SIZES_MB, '8,90').map((mb) => mb * 1e6);
const bits = list(process.env.BITS, '2,3,4,5,6,8');
const rounds = Number(process.env.ROUNDS ?? 4);
const kernel = process.env.KERNEL ?? 'dot';
if (!['dot', 'attention'].includes(kernel)) {
  console.error(`KERNEL=${kernel}: expected dot or attention`);
  process.exit(2);
}
// Each case: a label and the expression (on module m) whose value is a rate, higher is better.
const cases = kernel === 'dot'
  ? sizes.flatMap((size) => bits.map((b) => [`${size / 1e6} MB, ${b} bits`, `m.benchDotKernel(${size}, ${b}, 3)`]))
  : list(process.env.POSITIONS, '256,1500').flatMap((p) => list(process.env.QUERIES, '1,64').flatMap((q) =>
    (process.env.KV ?? 'f16,int8').split(',').map((kv) => [`${p} keys, ${q}q, ${kv}`,
      `${p * q * 9 / 1e3} / m.benchAttention(${p}, ${q}, ${kv === 'int8'}, 3)`])));
const unit = kernel === 'dot' ? 'GB/s of weight bytes' : 'million query-key pairs per second';

const page = `<!doctype html><script type="module">
const ms = [];
for (let i = 0; i < ${dirs.length}; i++) {
  const m = await import('./b' + i + '/flexquant.js');
  await m.default();
  ms.push(m);
}
const best = ms.map(() => ({}));
const cases = [${cases.map(([k, e]) => `[${JSON.stringify(k)}, (m) => ${e}]`).join(', ')}];
for (let round = 0; round < ${rounds}; round++)
  for (const [k, rate] of cases)
    ms.forEach((m, i) => {
      best[i][k] = Math.max(best[i][k] ?? 0, rate(m));
    });
window.result = { isolated: crossOriginIsolated, best };
</script>`;

const types = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };
const server = http.createServer((req, res) => {
  const url = decodeURIComponent(req.url.split('?')[0]);
  const headers = {
    'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Embedder-Policy': 'require-corp',
  };
  let body;
  const m = url.match(/^\/b(\d+)\/([\w.]+)$/);
  if (url === '/') body = page;
  else if (m && dirs[m[1]] && fs.existsSync(path.join(dirs[m[1]], m[2]))) body = fs.readFileSync(path.join(dirs[m[1]], m[2]));
  if (body === undefined) {
    res.writeHead(404, headers);
    return res.end();
  }
  res.writeHead(200, { ...headers, 'Content-Type': types[path.extname(url)] ?? 'text/html' });
  res.end(body);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-quic'],
});
try {
  const tab = await browser.newPage();
  tab.on('pageerror', (e) => console.error('page error:', e.message));
  await tab.goto(`http://127.0.0.1:${server.address().port}/`);
  await tab.waitForFunction(() => window.result, null, { timeout: 900_000 });
  const { isolated, best } = await tab.evaluate(() => window.result);
  console.log(`${unit}, best of ${rounds} rounds (cross-origin isolated: ${isolated})`);
  console.log(['case'.padEnd(22), ...dirs.map((_, i) => `build ${i}`.padStart(8)), ...dirs.slice(1).map((_, i) => `${i + 1}/0`.padStart(6))].join(' '));
  for (const k of Object.keys(best[0])) {
    const row = best.map((b) => b[k].toFixed(2).padStart(8));
    const ratios = best.slice(1).map((b) => (b[k] / best[0][k]).toFixed(2).padStart(6));
    console.log([k.padEnd(22), ...row, ...ratios].join(' '));
  }
  dirs.forEach((d, i) => console.log(`build ${i}: ${d}`));
} finally {
  await browser.close();
  server.close();
}
