// The conversation: messages as the engine sees them (the whole list each turn, OpenAI style),
// their rendering, and the streamed answer with a stop button.

import { $, el, errorText, formatSeconds } from './format.js';

/**
 * Messages to leave out of what the model sees, for memory: at least half of the `seen`
 * messages before the new one (whole exchanges) when the engine holds below its floor
 * (`stats.lastReason` 'below_floor': even the deepest step allowed does not fit the budget) and
 * its KV cache is more than the excess, so that a smaller cache can make it fit; 0 otherwise (a
 * budget below the floor step itself is the app's to raise: forgetting would not help).
 */
export function cutForMemory(stats, seen) {
  if (!stats || stats.lastReason !== 'below_floor' || seen < 2) return 0;
  const cost = (stats.footprintBytes ?? 0) + (stats.overheadBytes ?? 0);
  const budget = stats.effectiveBudgetBytes ?? stats.budgetBytes;
  if (budget == null || !(stats.kvCacheBytes > cost - budget)) return 0;
  // At least half: the kept messages and the new ones then fit for a while (keeping the
  // larger half of three exchanges, the next turn would be over again).
  return olderHalf(seen, Math.ceil);
}

/** The older half of `seen` messages in whole exchanges of two (at least one), rounded down or up. */
function olderHalf(seen, round = Math.floor) {
  return 2 * Math.max(1, round(seen / 4));
}

export class Chat {
  /**
   * `engine`: the worker engine; `settings`: Settings; `hooks.onToken(n)`: called per streamed
   * piece with the number of pieces so far in this answer; `hooks.onBusy(bool)`;
   * `hooks.onAnswer(answer)` after each answer; `hooks.onReset()` when a new chat starts.
   */
  constructor(engine, settings, hooks = {}) {
    this.engine = engine;
    this.settings = settings;
    this.hooks = hooks;
    this.list = $('messages');
    this.live = $('live');
    this.prompt = $('prompt');
    this.send = $('send');
    this.stop = $('stop');
    this.newChat = $('new-chat');
    this.messages = [];
    // Messages at the start of the conversation the model no longer sees (its context).
    this.skipped = 0;
    this.busy = false;
    this.system = null;
    this.tokens = 0;
    $('composer').addEventListener('submit', (e) => { e.preventDefault(); this.submit(); });
    this.prompt.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.submit(); }
    });
    this.prompt.addEventListener('input', () => this.updateButtons());
    this.stop.addEventListener('click', () => this.interrupt());
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && this.busy) this.interrupt(); });
    this.newChat.addEventListener('click', () => this.reset());
    this.renderEmpty();
  }

  enable() {
    this.prompt.disabled = false;
    this.updateButtons();
    this.prompt.focus();
  }

  updateButtons() {
    this.send.disabled = this.busy || !this.prompt.value.trim() || this.prompt.disabled;
    this.stop.disabled = !this.busy;
    this.newChat.disabled = this.busy || this.prompt.disabled;
  }

  renderEmpty() {
    if (!this.list.children.length) this.list.append(el('li', { class: 'empty', text: 'Say hello to start a conversation.' }));
  }

  addBubble(role, text) {
    this.list.querySelector('.empty')?.remove();
    const who = { user: 'You', assistant: 'Assistant', system: 'System' }[role] || role;
    const body = el('span', { class: 'text', text });
    const li = el('li', { class: `msg ${role}`, 'data-role': role }, el('span', { class: 'who', text: who }), body);
    this.list.append(li);
    this.scroll();
    return li;
  }

  /** A line in the conversation that is not a message (a swap, a device loss, an error). */
  event(text, cls = '') {
    this.list.querySelector('.empty')?.remove();
    this.list.append(el('li', { class: `msg event ${cls}`, role: 'note', text }));
    this.scroll();
  }

  scroll() {
    const l = this.list;
    if (l.scrollHeight - l.scrollTop - l.clientHeight < 120) l.scrollTop = l.scrollHeight;
  }

  async submit() {
    const text = this.prompt.value.trim();
    if (!text || this.busy || this.prompt.disabled) return;
    const s = this.settings.values();
    const system = s.system || null;
    if (system !== this.system && this.messages.length) {
      await this.reset();
      this.event('The system prompt changed: a new chat started.');
    }
    this.system = system;
    this.prompt.value = '';
    this.messages.push({ role: 'user', content: text });
    this.addBubble('user', text);
    await this.generate(s);
  }

  async generate(s) {
    this.busy = true;
    this.tokens = 0;
    this.swapsDuring = 0;
    this.hooks.onBusy?.(true);
    this.updateButtons();
    const li = this.addBubble('assistant', '');
    li.classList.add('streaming');
    li.setAttribute('aria-busy', 'true');
    const body = li.querySelector('.text');
    // Until the first token: how far the engine got reading a long prompt (`reading`).
    this.reader = { body, answered: false };
    let answer = '';
    let pending = '';
    let finish = null;
    let usage = null;
    let error = null;
    let pieces = 0; // tokens that showed text (a piece is '' while a UTF-8 character is incomplete)
    const t0 = performance.now();
    const flushLive = (all) => {
      // Announce whole sentences, not every token.
      const cut = all ? pending.length : Math.max(pending.lastIndexOf('. '), pending.lastIndexOf('\n'), pending.lastIndexOf('? '), pending.lastIndexOf('! ')) + 1;
      if (cut > 0) { this.live.append(document.createTextNode(pending.slice(0, cut))); pending = pending.slice(cut); }
    };
    // The whole conversation goes to the engine each turn (it reuses the KV cache of the common
    // prefix). When it no longer fits the model's context, the oldest exchanges are left out
    // of what the model sees (the page keeps showing them) and the user is told: half of those
    // it saw at a time (llama.cpp's context shift discards half too), and the later turns
    // start from the same exchange, so the prompt keeps its prefix and only the new messages
    // are prefilled until the context fills again (dropping one exchange per turn would change
    // the prefix, and prefill the whole context again, every turn).
    let skip = this.skipped;
    // Memory works the same way: when the model holds at its quality floor (or the last step)
    // and still does not fit the budget, and the KV cache of the conversation is what tips it
    // over, at least the older half of what the model saw is left out, so the cache shrinks and
    // the model keeps its quality instead of the conversation pushing it below (`memoryCut`).
    let memoryCut = 0;
    try {
      memoryCut = cutForMemory(await this.engine.stats().catch(() => null), this.messages.length - skip - 1);
      // The prompt's prefix changes either way: the cache starts again, holding only what the
      // kept messages need (a request that shares no prefix would shrink it only by half).
      if (memoryCut) await this.engine.resetChat();
      skip += memoryCut;
      for (;;) {
        const history = this.messages.slice(skip);
        const messages = this.system ? [{ role: 'system', content: this.system }, ...history] : history;
        try {
          const stream = await this.engine.chat.completions.create({
            messages, stream: true, temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens,
            ...(s.json_mode ? { response_format: { type: 'json_object' } } : {}),
          });
          this.live.textContent = '';
          for await (const chunk of stream) {
            const c = chunk.choices && chunk.choices[0];
            if (!c) continue;
            const piece = c.delta && c.delta.content;
            if (typeof piece === 'string') {
              // One chunk per token; a piece may be '' while a UTF-8 character is incomplete.
              this.tokens++;
              this.hooks.onToken?.(this.tokens);
            }
            if (piece) {
              this.reader.answered = true;
              pieces++;
              answer += piece;
              pending += piece;
              body.classList.remove('reading');
              body.textContent = answer;
              flushLive(false);
              this.scroll();
            }
            if (c.finish_reason) { finish = c.finish_reason; usage = chunk.usage || null; }
          }
          break;
        } catch (e) {
          const tooLong = e && e.code === 'context-length';
          if (!tooLong || this.tokens > 0 || this.messages.length - skip <= 1) throw e;
          skip += olderHalf(this.messages.length - skip - 1);
        }
      }
      if (skip > this.skipped) {
        const why = skip - this.skipped > memoryCut ? 'The conversation is longer than the model\'s context' : 'Memory is short (the model holds at its quality floor)';
        this.skipped = skip;
        li.append(el('span', { class: 'meta', text: `${why}: it did not see the oldest ${skip / 2} exchange${skip === 2 ? '' : 's'}.` }));
      }
    } catch (e) {
      error = e;
      li.classList.add('error');
      li.append(el('span', { class: 'meta', role: 'alert', text: `The answer stopped: ${errorText(e)}` }));
      finish = 'error';
    } finally {
      flushLive(true);
      li.classList.remove('streaming');
      li.removeAttribute('aria-busy');
      li.dataset.finish = finish || 'unknown';
      // Whatever was generated stays in the conversation, so the next turn continues it.
      this.messages.push({ role: 'assistant', content: answer });
      const secs = (performance.now() - t0) / 1000;
      const meta = [];
      if (usage) {
        meta.push(`${usage.completion_tokens} tokens in ${formatSeconds(secs)}`);
        const x = usage.extra || {};
        if (x.decode_tokens_per_s) meta.push(`${x.decode_tokens_per_s.toFixed(1)} tok/s`);
        if (x.step != null) meta.push(`ended at step ${x.step}`);
      }
      if (this.swapsDuring) meta.push(`${this.swapsDuring} swap${this.swapsDuring === 1 ? '' : 's'} during the answer`);
      if (finish === 'abort') meta.push('stopped');
      if (finish === 'length') meta.push('max tokens reached');
      if (meta.length) li.append(el('span', { class: 'meta', text: meta.join(' · ') }));
      body.classList.remove('reading');
      if (!answer && finish !== 'error') body.textContent = '(no text)';
      this.busy = false;
      this.hooks.onBusy?.(false);
      const refocus = document.activeElement === this.stop;
      this.updateButtons();
      if (refocus) this.prompt.focus(); // the Stop button just got disabled under the focus
      this.hooks.onAnswer?.({ answer, finish, usage, seconds: secs, tokens: this.tokens, pieces, error: error && { code: error.code, message: errorText(error) } });
    }
  }

  interrupt() {
    if (this.busy) this.engine.interruptGenerate();
  }

  /** A `prefill` event: a long prompt is being read; shown in the answer until its first token. */
  reading(e) {
    const r = this.busy && this.reader;
    if (!r || r.answered) return;
    const n = (x) => x.toLocaleString('en-US');
    r.body.textContent = `Reading the prompt… ${n(e.doneTokens)} of ${n(e.totalTokens)} tokens`;
    r.body.classList.add('reading');
  }

  /** What a reload needs to show and go on with this conversation (`SavedChat`). */
  state() {
    return { system: this.system, messages: this.messages.map(({ role, content }) => ({ role, content })), skipped: this.skipped };
  }

  /**
   * Shows a saved conversation (`state()` of an earlier page) and makes it this chat's: the
   * next message continues it. The engine's KV cache is the caller's to restore.
   */
  restore({ system, messages, skipped }) {
    this.system = system ?? null;
    this.messages = messages.map(({ role, content }) => ({ role, content }));
    this.skipped = skipped;
    this.list.replaceChildren();
    for (const m of this.messages) this.addBubble(m.role, m.content || '(no text)');
    this.renderEmpty();
  }

  async reset() {
    if (this.busy) return;
    await this.engine.resetChat();
    this.messages = [];
    this.skipped = 0;
    this.list.replaceChildren();
    this.live.textContent = '';
    this.renderEmpty();
    this.prompt.focus();
    this.hooks.onReset?.();
  }
}
