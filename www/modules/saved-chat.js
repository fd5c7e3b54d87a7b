// The conversation kept across reloads and visits: the messages the page shows and the
// engine's session (its KV cache as bytes, `engine.exportSession()`), in IndexedDB under the
// ensemble's URL. A reload shows the conversation again and the next answer reads only its new
// tokens (`importSession`) instead of the whole conversation. One tab owns the saved
// conversation (a Web Lock held while the page is open): a second tab of the same page starts
// its own chat and keeps nothing, so two tabs never overwrite each other's conversation.

const DB = 'flexquant-chat';
const STORE = 'conversations';
/** The record's layout; a record of another is dropped. */
const FORMAT = 1;
/** Sessions past this are kept as text only: the next answer reads the conversation again. */
const MAX_SESSION_BYTES = 256 << 20;
/** How long a new page waits for the lock that the page it replaces (a reload) still holds. */
const CLAIM_WAIT_MS = 3000;

const done = (r) => new Promise((resolve, reject) => {
  r.onsuccess = () => resolve(r.result);
  r.onerror = () => reject(r.error);
});

function openDb() {
  const r = indexedDB.open(DB, 1);
  r.onupgradeneeded = () => r.result.createObjectStore(STORE);
  return done(r);
}

/** The record as the page can use it, or `null` when it is not one (another layout, garbled). */
function valid(rec) {
  if (!rec || rec.format !== FORMAT || !Array.isArray(rec.messages)) return null;
  const ok = rec.messages.every((m) => m && ['user', 'assistant'].includes(m.role) && typeof m.content === 'string');
  if (!ok || !Number.isInteger(rec.skipped) || rec.skipped < 0 || rec.skipped > rec.messages.length) return null;
  if (rec.system != null && typeof rec.system !== 'string') return null;
  return rec;
}

export class SavedChat {
  /**
   * Starts claiming the conversation of the ensemble at `url` (the lock is asked for now, while
   * the model loads). `enabled()` says whether the user lets the page keep it.
   */
  constructor(url, enabled, onError = () => {}) {
    this.url = url;
    this.enabled = enabled;
    this.onError = onError; // called once, with the reason, when keeping it fails
    this.saves = 0;
    this.error = null;
    this.queue = Promise.resolve();
    this.owner = this.claim();
  }

  /** Whether this tab got the lock (false: another tab of this page owns the conversation). */
  async claim() {
    if (!('indexedDB' in globalThis)) return false;
    if (!navigator.locks) return true; // no way to tell tabs apart: the last one saved wins
    const signal = AbortSignal.timeout(CLAIM_WAIT_MS);
    return new Promise((resolve) => {
      navigator.locks.request(`flexquant-chat ${this.url}`, { signal }, () => {
        resolve(true);
        return new Promise(() => {}); // held until the page goes away
      }).catch(() => resolve(false));
    });
  }

  async run(f) {
    if (!(await this.owner)) return null;
    const db = await openDb();
    try {
      const tx = db.transaction(STORE, 'readwrite');
      const complete = new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onabort = () => reject(tx.error); });
      complete.catch(() => {}); // a failed request rejects below already
      const r = await done(f(tx.objectStore(STORE)));
      await complete;
      return r;
    } finally {
      db.close();
    }
  }

  /** The saved conversation, or null (none, not ours, not allowed, or unreadable: then dropped). */
  async load() {
    if (!this.enabled()) return null;
    try {
      const rec = await this.run((s) => s.get(this.url));
      if (rec != null && !valid(rec)) {
        await this.clear();
        return null;
      }
      return rec ?? null;
    } catch (e) {
      this.fail(e);
      return null;
    }
  }

  /**
   * Saves `state` ({system, messages, skipped}) with the engine's session, after whatever save
   * is still running. The messages go first, with the session saved before (its tokens a prefix
   * of this conversation: the engine reuses what matches), so a reload during the export loses
   * nothing; then the session. One the engine cannot export (or too big) is left out: the next
   * answer after a reload reads the conversation again.
   */
  save(state, engine) {
    this.queue = this.queue.then(async () => {
      if (!this.enabled() || !(await this.owner)) return;
      const put = (session) => this.run((s) => s.put({ format: FORMAT, savedAt: Date.now(), ...state, session }, this.url));
      try {
        const before = valid(await this.run((s) => s.get(this.url)));
        await put(before?.session ?? null);
        let session = null;
        try {
          session = await engine.exportSession();
          if (session.kv.byteLength > MAX_SESSION_BYTES) session = null;
        } catch { /* text only */ }
        if (session) await put(session);
        this.saves++;
        this.lastSaved = { messages: state.messages.length, tokens: session ? session.tokens.length : 0, kvBytes: session ? session.kv.byteLength : 0 };
      } catch (e) {
        this.fail(e); // quota, private mode: the chat goes on unsaved
      }
    });
    return this.queue;
  }

  fail(e) {
    if (this.error == null) this.onError(String(e?.message ?? e));
    this.error = String(e?.message ?? e);
  }

  /** Forgets the saved conversation (a new chat, or the user turned keeping it off). */
  clear() {
    this.queue = this.queue.then(() => this.run((s) => s.delete(this.url)).catch((e) => this.fail(e)));
    return this.queue;
  }
}

/**
 * Puts the conversation `saved` kept back into `chat`, and its KV cache into `engine`, so the
 * next answer reads only its new tokens. Returns what came back ({messages, keptTokens,
 * savedAt, reason: why the cache did not, or null}), or null when there was nothing to restore.
 */
export async function restoreChat(saved, chat, engine) {
  const rec = await saved.load();
  if (!rec || !rec.messages.length) return null;
  chat.restore(rec);
  let keptTokens = 0;
  let reason = null;
  if (!rec.session) {
    reason = 'its KV cache was not saved';
  } else {
    try {
      await engine.importSession(rec.session);
      keptTokens = rec.session.tokens.length;
    } catch (e) {
      reason = e?.message ?? String(e); // another ensemble version, no room: text only
    }
  }
  return { messages: rec.messages.length, keptTokens, savedAt: rec.savedAt, reason };
}
