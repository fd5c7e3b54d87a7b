// The backends benchmark's browser half (./build.sh bench backends): adds to
// target/bench/backends.json (written by `flexquant bench backends`, the native half) the
// packed CPU backend in headless Chromium (tests/web/bench-backends.html) and its peer, npm
// @wllama/wllama on the demo GGUF (tests/web/bench-wllama.html) at 1 and 2 threads, all in
// one run, with the same prompt and token count; then both on one thread after a long prompt
// (LONG_PROMPT_FILE, ~1,400 tokens), where attention over the cache weighs.
// Usage: node bench_backends.mjs SERVER_URL BACKENDS.json DEMO_MANIFEST_PATH GGUF_PATH PROMPT_FILE LONG_PROMPT_FILE
import { readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';

const [server, out, manifest, gguf, promptFile, longFile] = process.argv.slice(2);
if (!longFile) throw new Error('usage: node bench_backends.mjs SERVER_URL OUT.json MANIFEST GGUF PROMPT_FILE LONG_PROMPT_FILE');
const report = JSON.parse(readFileSync(out, 'utf8'));
const prompt = readFileSync(promptFile, 'utf8');
const longPrompt = readFileSync(longFile, 'utf8');
const steps = report.decode_tok_s_by_step.map((r) => r.step);
const ARGS = ['--headless=new', '--no-sandbox', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'];

const browser = await chromium.launch({ executablePath: process.env.FLEXQUANT_CHROMIUM || '/usr/bin/chromium', args: ARGS });
async function run(path, params) {
  const page = await browser.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(m.text()));
  const qs = new URLSearchParams({ prompt, tokens: '128', ...params });
  await page.goto(`${server}${path}?${qs}`);
  await page.waitForFunction(() => window.__result, null, { timeout: 900_000 });
  const r = await page.evaluate(() => window.__result);
  await page.close();
  if (r.error) throw new Error(`${path}: ${r.error}\n${logs.slice(-20).join('\n')}`);
  return r;
}
try {
  const fq = await run('/npm/bench-backends.html', { manifest: server + manifest, steps: steps.join(',') });
  console.log(`flexquant cpu: ${JSON.stringify(fq)}`);
  // The same thread runs while another process keeps one core busy (a second tab, a build):
  // spinning pool workers on cores others want only wait (see the README, "Threads").
  const busy = spawn('sh', ['-c', 'while :; do :; done'], { stdio: 'ignore' });
  let loaded;
  try {
    loaded = (await run('/npm/bench-backends.html', { manifest: server + manifest, only: 'threads' })).threaded;
  } finally {
    busy.kill('SIGKILL');
  }
  console.log(`flexquant cpu, one core busy: ${JSON.stringify(loaded)}`);
  const wl = {};
  for (const threads of [1, 2]) {
    wl[threads] = await run('/npm/bench-wllama.html', { model: server + gguf, threads: String(threads) });
    console.log(`wllama ${threads}t: ${JSON.stringify(wl[threads])}`);
  }
  // A long conversation, one thread each (the main-thread engine, wllama with room for it).
  const long = {
    browser_cpu: (await run('/npm/bench-backends.html', { manifest: server + manifest, only: 'long', prompt: longPrompt })).long,
    wllama_1t: await run('/npm/bench-wllama.html', { model: server + gguf, threads: '1', ctx: '2048', prompt: longPrompt }),
  };
  console.log(`long prompt: ${JSON.stringify(long)}`);
  report.browser = browser.version();
  report.browser_cpu = fq;
  report.wllama = wl;
  for (const row of report.decode_tok_s_by_step) {
    row.browser_tok_s = fq.decode_by_step.find((r) => r.step === row.step)?.decode_tok_s ?? null;
  }
  Object.assign(report, {
    browser_cpu_decode_tok_s: fq.browser_cpu_decode_tok_s,
    browser_cpu_prefill_tok_s: fq.browser_cpu_prefill_tok_s,
    wllama_decode_tok_s_1t: wl[1].decode_tok_s,
    wllama_decode_tok_s_2t: wl[2].decode_tok_s,
    wllama_prefill_tok_s_1t: wl[1].prefill_tok_s,
    wllama_2t_cross_origin_isolated: wl[2].cross_origin_isolated,
    // Same thread count: the main-thread engine (one thread) against wllama on one.
    ratio_vs_wllama: fq.browser_cpu_decode_tok_s / wl[fq.threads].decode_tok_s,
    prefill_ratio_vs_wllama: fq.browser_cpu_prefill_tok_s / wl[fq.threads].prefill_tok_s,
    // Worker engines on 1 and 2 threads (the threaded build), and against wllama on 2.
    browser_cpu_by_threads: fq.threaded,
    browser_cpu_decode_tok_s_2t: fq.threaded[2].decode_tok_s,
    browser_cpu_prefill_tok_s_2t: fq.threaded[2].prefill_tok_s,
    threads_decode_speedup: fq.threaded[2].decode_tok_s / fq.threaded[1].decode_tok_s,
    threads_prefill_speedup: fq.threaded[2].prefill_tok_s / fq.threaded[1].prefill_tok_s,
    // The same with one core kept busy by another process (below 1: threads cost speed).
    browser_cpu_by_threads_one_core_busy: loaded,
    threads_decode_speedup_one_core_busy: loaded[2].decode_tok_s / loaded[1].decode_tok_s,
    // Both again with every token pinned to 2 threads (`adaptThreads: false`).
    threads_decode_speedup_pinned: fq.threaded['2_pinned'].decode_tok_s / fq.threaded[1].decode_tok_s,
    threads_decode_speedup_one_core_busy_pinned: loaded['2_pinned'].decode_tok_s / loaded[1].decode_tok_s,
    ratio_vs_wllama_2t: fq.threaded[2].decode_tok_s / wl[2].decode_tok_s,
    prefill_ratio_vs_wllama_2t: fq.threaded[2].prefill_tok_s / wl[2].prefill_tok_s,
    browser_microkernel_gbs: fq.browser_microkernel_gbs,
    browser_vs_microkernel: fq.browser_vs_microkernel,
    // The plane-reading kernel against the packed one per bit-width (cpu::probe).
    browser_plane_kernel: fq.browser_plane_kernel,
    cpu_swap_tokens: fq.cpu_swap_tokens,
    // The worker engine re-created at the last step's budget, against its warm load.
    release_vs_warm: fq.release_vs_warm,
    wasm_memory_before_release: fq.wasm_memory_before_release,
    wasm_memory_after_release: fq.wasm_memory_after_release,
    // What giving memory back gives: the re-created worker's wasm heap at the last step
    // against the warm worker's at step 0 (1: nothing).
    release_wasm_ratio: fq.wasm_memory_after_release / fq.wasm_memory_before_release,
    // A worker engine's wasm heap after a cold load (its prefetching done) against a warm
    // load's at the same step (1: downloads leave nothing behind in the heap).
    wasm_memory_cold_load: fq.wasm_memory_cold_load,
    cold_vs_warm_wasm_ratio: fq.cold_vs_warm_wasm_ratio,
    // Warm worker engines at each step's budget: heap against held bytes; and the last one
    // after walking back up to step 0.
    wasm_memory_by_step: fq.wasm_memory_by_step,
    wasm_memory_after_walk_up: fq.wasm_memory_after_walk_up,
    // After a ~1,400-token prompt, one thread each: decode and prefill against wllama, and
    // each against its own short-prompt speed (1: attention over the cache costs nothing).
    long_context: long,
    long_context_prompt_tokens: long.browser_cpu.prompt_tokens,
    long_context_decode_ratio_vs_wllama: long.browser_cpu.decode_tok_s / long.wllama_1t.decode_tok_s,
    long_context_prefill_ratio_vs_wllama: long.browser_cpu.prefill_tok_s / long.wllama_1t.prefill_tok_s,
    long_vs_short_decode: long.browser_cpu.decode_tok_s / fq.browser_cpu_decode_tok_s,
    // The long text scored (echo + logprobs, every position's head) against reading it.
    prompt_scoring_vs_prefill: long.browser_cpu.scoring_tok_s / long.browser_cpu.prefill_tok_s,
    // The long prompt read in pieces (Stop and pressure reach it between them) against read in
    // one call; and how long a stop 2 s into it took to end the answer.
    prefill_pieces_vs_whole: long.browser_cpu.prefill_pieces_vs_whole,
    prefill_pieces_vs_whole_2t: long.browser_cpu.prefill_pieces_vs_whole_2t,
    stop_during_prefill_ms: long.browser_cpu.stop_during_prefill_ms,
    wllama_long_vs_short_decode: long.wllama_1t.decode_tok_s / wl[1].decode_tok_s,
  });
} finally {
  await browser.close();
}
writeFileSync(out, JSON.stringify(report, null, 1) + '\n');
console.log(`wrote ${out}`);
