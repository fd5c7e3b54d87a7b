// The swap log: every move along the trajectory, newest first, with which modules changed
// bit-width, when, how long it took and why.

import { el, formatClock } from './format.js';

const REASONS = { // runtime::Reason (snake_case), in words
  initial: 'initial load',
  budget: 'over the budget',
  heap_pressure: 'JS heap pressure',
  out_of_memory: 'out of memory',
  swap_failed: 'a swap failed',
  device_lost: 'device lost',
  below_floor: 'budget below the deepest EQM allowed',
  quality_floor: 'back up to the quality floor',
  memory_free: 'memory free again',
  too_slow: 'decoding below the minimum speed',
};

export class SwapLog {
  constructor(tbody, maxRows = 200) {
    this.tbody = tbody;
    this.max = maxRows;
    this.rows = [];
  }

  /** `e`: a `swap` event of the engine. */
  add(e) {
    const down = e.to > e.from;
    const mods = (e.modules && e.modules.length ? e.modules : [{ module: e.module, toBits: e.bits }]);
    const shown = mods.slice(0, 6).map((m) => `${m.module} → ${m.toBits} bit`).join(', ') +
      (mods.length > 6 ? ` and ${mods.length - 6} more` : '');
    const tok = e.tokenIndex != null ? ` (after token ${e.tokenIndex})` : '';
    const tr = el('tr', { class: down ? 'down' : 'up', 'data-from': e.from, 'data-to': e.to },
      el('td', { text: formatClock(new Date()) }),
      el('td', { text: `${e.from} → ${e.to}` }),
      el('td', { class: 'mods', text: `${shown}${tok}` }),
      el('td', { text: (e.ms != null ? `${Math.round(e.ms)} ms` : '–') + (e.pageLatencyMs != null ? ` (${Math.round(e.pageLatencyMs)} ms after the change)` : '') }),
      el('td', { text: REASONS[e.reason] || String(e.reason || '') }));
    this.tbody.prepend(tr);
    this.rows.push(e);
    while (this.tbody.children.length > this.max) this.tbody.lastChild.remove();
  }

  /** A row for something that is not a swap (device loss, recovery, a failed download). */
  note(text, cls = '') {
    const tr = el('tr', { class: cls },
      el('td', { text: formatClock(new Date()) }),
      el('td', { colSpan: 4, text }));
    this.tbody.prepend(tr);
  }
}
