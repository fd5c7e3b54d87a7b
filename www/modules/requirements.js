// "What the model needs", shown before it loads: the download, the memory range for the
// engine's context (`Engine.inspect`), what the browser cache holds of it (`Engine.cached`)
// and a control to delete that (`Engine.deleteCached`). The numbers are the engine's; the view
// only formats them.

import { $, formatBytes } from './format.js';
import { supportLine } from './support.js';

// The KV cache at the context: its bytes in the format it starts in, and with 'auto' what it
// comes to once converted under pressure.
const kvLine = (ins) => (ins.kvCache === 'auto'
  ? `${formatBytes(ins.kvBytes)} in f16, ${formatBytes(ins.minKvBytes)} once int8 under pressure`
  : `${formatBytes(ins.kvBytes)} in ${ins.kvCache}`);

const ppl = (p) => (p == null ? '?' : p.toFixed(p < 100 ? 1 : 0));

export class RequirementsView {
  /** `Engine`: the package's class (static methods only); `url`: the manifest. */
  constructor(Engine, url, page, kvCache) {
    this.Engine = Engine;
    this.url = url;
    this.kvCache = kvCache; // the engine's `kvCache` option: the totals are for it
    this.page = page; // window.flexquantPage: the tests read what the view saw
    this.engine = null;
    this.box = $('requirements');
    this.button = $('delete-cache');
    this.button.addEventListener('click', () => this.deleteCached().catch((e) => this.say(`Could not delete: ${e.message}`)));
    this.keep = $('keep-cache');
    this.keep.addEventListener('click', () => this.persist().catch((e) => this.say(`Could not ask: ${e.message}`)));
  }

  showSupport(support) {
    $('support-line').textContent = supportLine(support);
    this.box.hidden = false;
  }

  /** Reads the manifest through the engine (no GPU, nothing loaded); rejects as inspect does. */
  async inspect() {
    const ins = await this.Engine.inspect(this.url, { kvCache: this.kvCache });
    this.page.inspection = ins;
    const t = ins.trajectory;
    const first = t[0], last = t[t.length - 1];
    $('req-download').textContent = `${formatBytes(ins.firstLoadBytes)} to start (step 0); ${formatBytes(ins.downloadBytes)} with every step`;
    $('req-memory').textContent = `${formatBytes(ins.minTotalBytes)} to ${formatBytes(ins.maxTotalBytes)} for a ${ins.context}-token context (weights ${formatBytes(last.footprintBytes)} to ${formatBytes(first.footprintBytes)}, KV cache ${kvLine(ins)})`;
    $('req-quality').textContent = `${t.length} EQMs from ${ins.nUp} to ${ins.nLow} bits; perplexity ${ppl(first.perplexity)} to ${ppl(last.perplexity)}`;
    this.box.hidden = false;
    return ins;
  }

  /** What the browser cache holds of the model now. */
  async refreshCache() {
    const c = await this.Engine.cached(this.url);
    this.page.cached = c;
    const steps = this.page.inspection?.trajectory.length;
    const any = c.manifestCached || c.cachedFiles > 0;
    $('req-cache').textContent = !any
      ? 'Not cached: loading downloads it.'
      : `${c.completeSteps.length}${steps ? ` of ${steps}` : ''} steps load offline (${formatBytes(c.cachedBytes)} of ${formatBytes(c.totalBytes)} cached, ${c.cachedFiles} of ${c.files} files)`;
    this.box.dataset.cached = any ? 'yes' : 'no';
    this.showStorage(c.storage, any);
    (this.page.cacheLines ??= []).push({ state: this.page.state, text: $('req-cache').textContent });
    this.button.disabled = !any;
    return c;
  }

  /**
   * What the browser lets this site store, and whether it keeps it under storage pressure;
   * before the first load, whether the model will fit in what is left.
   */
  showStorage(st, cached) {
    const canAsk = !!navigator.storage?.persist;
    this.keep.hidden = st.persisted !== false || !canAsk;
    if (st.quotaBytes == null) {
      $('req-storage').textContent = 'The browser does not say how much this site may store.';
      return;
    }
    const free = st.quotaBytes - (st.usageBytes ?? 0);
    const need = this.page.inspection?.firstLoadBytes;
    const parts = [`${formatBytes(st.usageBytes)} of ${formatBytes(st.quotaBytes)} used by this site`];
    if (!cached && need != null && free < need) parts.push(`only ${formatBytes(free)} left for the ${formatBytes(need)} to start: the model will run but not stay cached`);
    if (st.persisted === true) parts.push('kept when storage runs low');
    else if (st.persisted === false) parts.push('the browser may evict the cached model when storage runs low');
    $('req-storage').textContent = parts.join('; ');
    (this.page.storageLines ??= []).push(parts.join('; '));
    this.box.dataset.persisted = String(st.persisted);
  }

  /** Asks the browser to keep this site's data (a user's click: Firefox asks them). */
  async persist() {
    this.keep.disabled = true;
    const granted = await navigator.storage.persist();
    await this.refreshCache();
    this.say(granted
      ? 'The browser will keep the cached model when storage runs low.'
      : 'The browser declined: it may still evict the cached model when storage runs low (Chrome grants this to sites you bookmark, install or use often).');
    this.keep.disabled = false;
    this.page.persistAsked = granted; // last: the tests read the note once this is set
  }

  /** After the load: the cache status now, and again when the background prefetch ends. */
  async attach(engine) {
    this.engine = engine;
    await this.refreshCache();
    if (await this.waitPrefetch()) await this.refreshCache();
  }

  /** Waits while the engine fills the cache in the background; true if it had to wait. */
  async waitPrefetch() {
    let waited = false;
    for (let i = 0; this.engine && i < 600; i++) {
      const s = await this.engine.stats().catch(() => null);
      if (!s || !s.prefetching) break;
      waited = true;
      await new Promise((r) => setTimeout(r, 500));
    }
    return waited;
  }

  /** Deletes every cached file of the model (the running model keeps what it holds). */
  async deleteCached() {
    this.button.disabled = true;
    this.say('Deleting…');
    // The engine's background prefetch would put files back right after.
    await this.waitPrefetch();
    const n = await this.Engine.deleteCached(this.url);
    this.page.deleted = n;
    await this.refreshCache();
    this.say(`Deleted ${n} cached entries: the next visit downloads the model again${this.engine ? ' (the running model stays in memory)' : ''}.`);
  }

  say(text) {
    $('req-cache-note').textContent = text;
  }
}
