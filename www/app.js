// The chat page: asks the engine what this browser offers and what the model needs, loads the
// ensemble in a worker with visible progress, then wires the conversation and the elasticity
// panel to the engine's events.

import { $, el, errorText, formatBytes } from './modules/format.js';
import { manifestUrl, createEngine, engineClass } from './modules/engine-client.js';
import { supportNote } from './modules/support.js';
import { crossOriginIsolation } from './modules/isolation.js';
import { RequirementsView } from './modules/requirements.js';
import { LoaderView } from './modules/loader.js';
import { Chat } from './modules/chat.js';
import { Settings } from './modules/settings.js';
import { ElasticPanel } from './modules/elastic-panel.js';
import { SavedChat, restoreChat } from './modules/saved-chat.js';

// What the page saw, for people debugging and for the end-to-end tests.
const page = (window.flexquantPage = { state: 'starting', events: [], metrics: {}, errors: [] });

function fatal(title, detail) {
  page.state = 'failed';
  page.fatal = `${title}: ${detail}`;
  const box = $('fatal');
  box.replaceChildren(el('h2', { text: title }), el('p', { text: detail }));
  box.hidden = false;
  box.tabIndex = -1;
  box.focus();
  $('loader').hidden = true;
  document.querySelector('main.layout').hidden = true; // nothing there can work now
  document.body.dataset.state = 'failed';
}

let noticeKey = null;
let noticeCount = 0;
function notice(text, kind = 'info') {
  const box = $('notice');
  // The same error again (a swap retried) counts up instead of stacking.
  if (kind === 'error' && text === noticeKey) noticeCount++; else { noticeKey = text; noticeCount = 1; }
  box.textContent = noticeCount > 1 ? `${text} (×${noticeCount})` : text;
  box.className = `notice ${kind}`;
  box.dataset.kind = kind;
  box.hidden = false;
}

function errorMessage(err) {
  const e = err || {};
  const what = e.file || e.url;
  switch (e.code) {
    case 'hash-mismatch':
      return `A model file from the server is damaged: ${e.file || what || 'a shard'} does not match its checksum in the manifest. It was not used or cached.`;
    case 'truncated':
      return `A model file from the server is incomplete: ${e.file || what || 'a shard'} (${e.message}). It was not used or cached.`;
    case 'network':
    case 'http':
      return `Could not download a model file${what ? ` (${what})` : ''}: ${e.message}.`;
    case 'quota-exceeded':
      return `The browser cache is full, so the model is not cached for the next visit: ${e.message}.`;
    case 'out-of-memory':
      return `Out of memory: ${e.message}.`;
    default:
      return errorText(e);
  }
}

/** `?backend=auto|webgpu|cpu` (default auto: WebGPU unless missing or a CPU emulation). */
function backendChoice() {
  const b = new URLSearchParams(location.search).get('backend');
  return ['auto', 'webgpu', 'cpu'].includes(b) ? b : 'auto';
}

/**
 * `?kv=f16|int8|auto`: how the KV cache stores keys and values (default auto: f16, converted to
 * int8 before the weights step down for memory; int8 is 0.56x the bytes).
 */
function kvCacheChoice() {
  const k = new URLSearchParams(location.search).get('kv');
  return ['f16', 'int8', 'auto'].includes(k) ? k : 'auto';
}

/**
 * `?prefill=N`: prompt tokens the engine reads between two looks at Stop and memory pressure
 * (default: about a quarter of a second's worth).
 */
function prefillChoice() {
  const n = Number(new URLSearchParams(location.search).get('prefill'));
  return Number.isInteger(n) && n > 0 ? n : undefined;
}

async function main() {
  const url = manifestUrl();
  $('model-url').textContent = url;
  // On a static host without COOP/COEP this registers a service worker and reloads once (so
  // the CPU backend gets threads); nothing loads before that.
  page.isolation = await crossOriginIsolation();
  // The engine decides what runs here (`auto`'s choice): without a usable WebGPU the model runs
  // on the CPU backend (wasm SIMD), a note, not a failure, unless the page insists on WebGPU.
  let Engine, support;
  try {
    Engine = await engineClass();
    support = await Engine.checkSupport();
  } catch (e) {
    return fatal('This browser cannot run the engine', errorMessage(e));
  }
  // Why the page could not isolate itself, beside the engine's why-one-thread.
  const t = support.threads;
  if (t && !t.available && page.isolation.reason) {
    support = { ...support, threads: { ...t, reason: `${t.reason}; ${page.isolation.reason}` } };
  }
  page.support = support;
  const note = supportNote(support);
  if (note) page.supportNote = `${note.title}: ${note.detail}`;
  if (backendChoice() === 'webgpu' && !support.gpu) return fatal(note.title, note.detail);

  // What the model needs and what the cache holds, read while the model loads (waiting for it
  // first cost a manifest round trip before the load's own; a missing model is the load's
  // error below).
  const requirements = new RequirementsView(Engine, url, page, kvCacheChoice());
  page.requirements = requirements;
  requirements.showSupport(support);
  const loader = new LoaderView();
  const needs = requirements.inspect()
    .then((ins) => { loader.expect(ins); return requirements.refreshCache(); })
    .catch((e) => { if (e?.code !== 'manifest-not-found') $('req-download').textContent = errorMessage(e); });

  const settings = new Settings();
  // This tab's claim on the conversation kept from the last visit, settled while the model loads.
  const saved = new SavedChat(url, () => settings.values().remember_chat,
    (why) => chat?.event(`This browser does not let the page keep the conversation (${why}): a reload loses it.`));
  page.savedChat = saved;
  page.progress = loader.seen;
  page.progressEvents = [];
  loader.show();
  let panel = null;
  let chat = null;
  const t0 = performance.now();

  const onEvent = (e) => {
    if (e.type === 'progress') return;
    const rec = { ...e, at: performance.now(), tokens: chat ? chat.tokens : 0, busy: chat ? chat.busy : false };
    panel?.onEvent(e);
    rec.pageLatencyMs = e.pageLatencyMs;
    page.events.push(rec);
    if (e.type === 'swap') {
      if (chat && chat.busy) chat.swapsDuring++;
      const down = e.to > e.from;
      const m = e.modules && e.modules.length > 1 ? `${e.modules.length} modules` : `${e.module} → ${e.bits} bit`;
      chat?.event(`${down ? 'Shrank' : 'Grew'} to step ${e.to} (${m}, ${formatBytes(e.footprintBytes)}) in ${Math.round(e.ms)} ms`, down ? 'swap-down' : 'swap-up');
    } else if (e.type === 'prefill') {
      chat?.reading(e);
    } else if (e.type === 'kv-cache') {
      chat?.event(`KV cache ${e.from} → ${e.to} (${formatBytes(e.bytesBefore)} → ${formatBytes(e.bytesAfter)}) instead of a smaller model`, 'swap-down');
    } else if (e.type === 'released') {
      const mb = (b) => formatBytes(b);
      chat?.event(`Gave back wasm memory: ${mb(e.wasmMemoryBytesBefore)} → ${mb(e.wasmMemoryBytesAfter)} (a new worker at step ${e.step}, from the cache, in ${Math.round(e.ms)} ms, ${e.keptTokens} conversation tokens kept)`, 'swap-down');
    } else if (e.type === 'device-lost') {
      notice(`The GPU device was lost (${e.message || 'no reason given'}); recovering from the cache…`, 'error');
      chat?.event('GPU device lost: recovering…', 'device-lost');
    } else if (e.type === 'recovered') {
      notice(`Recovered from the device loss in ${Math.round(e.ms)} ms at step ${e.to}; the conversation is intact (${e.reprefilledTokens ?? 0} tokens re-read).`);
      chat?.event(`Recovered at step ${e.to} in ${Math.round(e.ms)} ms`, 'recovered');
      page.metrics.recoveryMs = e.ms;
    } else if (e.type === 'error') {
      page.errors.push(e.error);
      const step = panel && panel.stats ? ` The model keeps running at step ${panel.stats.step}.` : '';
      notice(errorMessage(e.error) + step, 'error');
    }
  };

  let engine;
  try {
    engine = await createEngine(url, { backend: backendChoice(), kvCache: kvCacheChoice(), prefillChunkTokens: prefillChoice(), onProgress: (p) => { page.progressEvents.push(p); loader.update(p); }, onEvent });
  } catch (e) {
    if (e && e.code === 'webgpu-unavailable') return fatal('WebGPU cannot run this model here', e.message);
    if (e && e.code === 'manifest-not-found') return fatal('Model not found', `${e.message}. Check the ?model= address.`);
    return fatal('The model could not be loaded', errorMessage(e));
  }
  page.engine = engine;
  await needs; // long done: the load reads the same manifest and more
  const [stats, trajectory] = await Promise.all([engine.stats(), engine.trajectory()]);
  const summary = loader.done(stats, 'caches' in globalThis);
  page.metrics.loadSeconds = (performance.now() - t0) / 1000;
  page.metrics.loadedFromCache = stats.loadedFromCache;
  page.backend = stats.backend;
  const onCpu = stats.backend === 'cpu';
  notice(onCpu ? `${summary.text} Running on the CPU (${stats.backendReason}).` : summary.text, 'ok');
  const where = onCpu ? `CPU (${stats.adapter})` : `WebGPU on ${stats.adapter}`;
  $('model-line').textContent = `${stats.modelName} · ${stats.steps} EQMs from ${formatBytes(trajectory[0].footprintBytes)} to ${formatBytes(trajectory[trajectory.length - 1].footprintBytes)} · ${where}`;
  $('model-line').title = `Backend: ${stats.backend} — ${stats.backendReason}`;

  chat = new Chat(engine, settings, {
    onBusy: (b) => { page.busy = b; },
    onAnswer: (a) => {
      page.lastAnswer = a;
      page.answers = (page.answers || 0) + 1;
      saved.save(chat.state(), engine);
    },
    onReset: () => saved.clear(),
  });
  $('remember-chat').addEventListener('change', (e) => {
    if (!e.target.checked) saved.clear();
    else if (chat.messages.length && !chat.busy) saved.save(chat.state(), engine);
  });
  panel = new ElasticPanel(engine, { onError: (e) => notice(errorMessage(e), 'error') });
  page.panel = panel;
  page.chat = chat;
  await panel.init(trajectory, stats);
  page.restored = await restoreChat(saved, chat, engine);
  const r = page.restored;
  if (r) {
    const when = new Date(r.savedAt).toLocaleString();
    chat.event(r.keptTokens
      ? `Restored the conversation of ${when} (${r.messages} messages); the model goes on from its KV cache (${r.keptTokens} tokens)`
      : `Restored the conversation of ${when} (${r.messages} messages); the model reads it again with the next message (${r.reason})`);
  }
  chat.enable();
  page.state = 'ready';
  document.body.dataset.state = 'ready';
  requirements.attach(engine).catch((e) => requirements.say(errorMessage(e)));
  addEventListener('pagehide', () => { panel.stop(); engine.unload().catch(() => {}); });
}

main().catch((e) => fatal('The page failed', errorText(e)));
