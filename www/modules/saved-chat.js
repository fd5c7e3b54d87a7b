// The conversation kept across reloads and visits: the messages the page shows and the
// engine's session (its KV cache as bytes, `engine.exportSession()`), in IndexedDB under the
// ensemble's URL. A reload shows the conversation again and the next answer reads only its new
// tokens (`importSession`) instead of the whole conversation. One tab owns the saved
// conversation (a Web Lock held while the page is open): a second tab of the same page starts
// its own chat and keeps nothing, so two tabs never overwrite each other's conversation.
// The messages and the session are two records (stores `conversations` and `sessions`, same
// key), so that saving an answer writes the session once and never reads or rewrites the old
// one (format 1 kept both in one record: every save read it and wrote it twice).

const DB = 'flexquant-chat';
const STORE = 'conversations';
const SESSIONS = 'sessions';
/** The record's layout; a record of another is dropped (1: the session inside it, still read). */
const FORMAT = 2;
/** Sessions past this are kept as text only: the next answer reads the conversation again. */
const MAX_SESSION_BYTES = 256 << 20;
/** How long a new page waits for the lock that the page it replaces (a reload) still holds. */
const CLAIM_WAIT_MS = 3000;

const done = (r) => new Promise((resolve, reject) => {
  r.onsuccess = () => resolve(r.result);
  r.onerror = () => reject(r.error);
});

function openDb() {
  const r = indexedDB.open(DB, 2);
  r.onupgradeneeded = () => {
    for (const name of [STORE, SESSIONS]) {
      if (!r.result.objectStoreNames.contains(name)) r.result.createObjectStore(name);
    }
  };
  return done(r);
}

/** The record as the page can use it, or `null` when it is not one (another layout, garbled). */
function valid(rec) {
  if (!rec || ![1, FORMAT].includes(rec.format) || !Array.isArray(rec.messages)) return null;
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

  /**
   * One transaction over both stores: `f(conversations, sessions)` makes its requests and
   * returns the request whose result is wanted, or a list of them (their results).
   */
  async run(f) {
    if (!(await this.owner)) return null;
    const db = await openDb();
    try {
      const tx = db.transaction([STORE, SESSIONS], 'readwrite');
      const complete = new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onabort = () => reject(tx.error); });
      complete.catch(() => {}); // a failed request rejects below already
      const req = f(tx.objectStore(STORE), tx.objectStore(SESSIONS));
      const r = await (Array.isArray(req) ? Promise.all(req.map(done)) : done(req));
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
      const [rec, session] = (await this.run((c, s) => [c.get(this.url), s.get(this.url)])) ?? [];
      if (rec != null && !valid(rec)) {
        await this.clear();
        return null;
      }
      return rec == null ? null : { ...rec, session: rec.format === 1 ? rec.session ?? null : session ?? null };
    } catch (e) {
      this.fail(e);
      return null;
    }
  }

  /**
   * Saves `state` ({system, messages, skipped}) with the engine's session, after whatever save
   * is still running. The messages go first, beside the session saved before (its tokens a
   * prefix of this conversation: the engine reuses what matches), so a reload during the export
   * loses nothing; then the session replaces the old one. One the engine cannot export (or too
   * big) leaves the old one: the next answer after a reload reads the rest again.
   */
  save(state, engine) {
    this.queue = this.queue.then(async () => {
      if (!this.enabled() || !(await this.owner)) return;
      const t0 = performance.now();
      try {
        await this.run((c) => c.put({ format: FORMAT, savedAt: Date.now(), ...state }, this.url));
        let session = null;
        try {
          session = await engine.exportSession();
          if (session.kv.byteLength > MAX_SESSION_BYTES) session = null;
        } catch { /* text only */ }
        if (session) await this.run((c, s) => s.put(session, this.url));
        this.saves++;
        this.lastSaved = { messages: state.messages.length, tokens: session ? session.tokens.length : 0,
          kvBytes: session ? session.kv.byteLength : 0, ms: performance.now() - t0 };
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
    this.queue = this.queue.then(() => this.run((c, s) => [c.delete(this.url), s.delete(this.url)]).catch((e) => this.fail(e)));
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
