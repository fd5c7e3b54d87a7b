// The first-load view: a progress bar with bytes, files and time left, and whether the bytes
// came from the network or from the browser's cache.
//
// The engine reports the first load as one running total (tokenizer, base and the starting
// step's files; a fallback to a deeper step adds a second); the view adds the totals up, and
// until the first event it runs to what `Engine.inspect` says step 0 needs.

import { $, formatBytes, formatSeconds } from './format.js';

export class LoaderView {
  constructor() {
    this.box = $('loader');
    this.bar = $('load-bar');
    this.text = $('load-text');
    this.source = $('load-source');
    this.started = performance.now();
    this.groups = new Map();
    this.expected = null; // bytes step 0 needs (Engine.inspect's firstLoadBytes)
    this.totals = null;
    this.seen = []; // every progress line shown (the tests read it)
  }

  show() {
    this.box.hidden = false;
    this.started = performance.now();
  }

  /** What loading step 0 costs (`Engine.inspect`'s answer), until the engine says. */
  expect(inspection) {
    this.expected = inspection?.firstLoadBytes ?? null;
  }

  /** `p`: a progress object of the engine. */
  update(p) {
    if (p.phase === 'prefetch') return; // background work after the model is ready
    if (p.phase === 'download') {
      // One running total per download call (the first load is one call; a fallback to a
      // deeper step adds another).
      const key = `${p.filesTotal}|${p.totalBytes}`;
      const g = this.groups.get(key) || { loaded: 0, files: 0, cached: 0, total: p.totalBytes || 0, filesTotal: p.filesTotal || 0 };
      g.loaded = Math.max(g.loaded, p.loadedBytes || 0);
      g.files = Math.max(g.files, p.filesDone || 0);
      g.cached = Math.max(g.cached, p.fromCache || 0);
      this.groups.set(key, g);
    }
    const sum = (k) => [...this.groups.values()].reduce((s, g) => s + g[k], 0);
    const loaded = sum('loaded');
    const cached = sum('cached');
    const files = sum('files');
    const total = Math.max(this.groups.size ? sum('total') : this.expected ?? 0, loaded);
    const filesTotal = Math.max(sum('filesTotal'), files);
    const frac = p.phase === 'ready' || p.phase === 'upload' ? 1 : total ? Math.min(1, loaded / total) : 0;
    this.totals = { loaded, total, cached, files, filesTotal };
    this.bar.value = frac;
    this.bar.textContent = `${Math.round(frac * 100)}%`;
    const phase = { manifest: 'Reading the manifest', download: 'Loading', upload: 'Preparing the model', ready: 'Ready' }[p.phase] || p.phase;
    const parts = [`${phase}: ${formatBytes(loaded)} of ${formatBytes(total)} (${Math.round(frac * 100)}%)`];
    if (filesTotal) parts.push(`${files} of ${filesTotal} files`);
    const elapsed = (performance.now() - this.started) / 1000;
    if (p.phase === 'download' && loaded > 0 && loaded < total) {
      parts.push(`about ${formatSeconds(elapsed * (total - loaded) / loaded)} left`);
    }
    this.text.textContent = parts.join(' · ');
    this.box.dataset.phase = p.phase;
    this.seen.push(this.text.textContent);
    if (cached > 0 && cached >= loaded) {
      this.source.textContent = 'Loading from the browser cache: nothing is downloaded.';
      this.source.className = 'load-source cached';
    } else if (cached > 0) {
      this.source.textContent = `${formatBytes(cached)} from the browser cache, the rest from the network.`;
      this.source.className = 'load-source';
    } else {
      this.source.textContent = p.file ? `Downloading ${p.file}` : 'Downloading from the network.';
      this.source.className = 'load-source';
    }
  }

  /** Hides the bar; returns the summary line for the notice. `cacheable`: the Cache API exists. */
  done(stats, cacheable = true) {
    const secs = (performance.now() - this.started) / 1000;
    this.box.hidden = true;
    const bytes = this.totals ? this.totals.loaded : stats.footprintBytes;
    const later = cacheable ? 'now cached for the next visit' : 'the browser cache is unavailable here, so the next visit downloads it again';
    const from = stats.loadedFromCache
      ? 'loaded from the browser cache (nothing downloaded)'
      : `downloaded ${formatBytes(bytes)} (${later})`;
    return { seconds: secs, text: `Model ready in ${formatSeconds(secs)}: ${from}.` };
  }
}
