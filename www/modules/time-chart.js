// A time chart of the last few minutes: the model's memory budget, the page's JS heap and the
// model footprint. Log scale when they differ by orders of magnitude (a tiny model next to a
// browser heap), linear otherwise.

import { svg, formatBytes } from './format.js';

const W = 400, H = 160;
const M = { l: 44, r: 8, t: 10, b: 18 };
const SERIES = [['budget', 's-budget'], ['heap', 's-heap'], ['footprint', 's-foot']];

export class TimeChart {
  constructor(svgEl, windowSeconds = 120) {
    this.el = svgEl;
    this.window = windowSeconds * 1000;
    this.samples = [];
    this.el.setAttribute('viewBox', `0 0 ${W} ${H}`);
  }

  /** `s`: { t: ms, budget, heap, footprint } (bytes, any may be null). */
  add(s) {
    this.samples.push(s);
    const cut = s.t - this.window;
    while (this.samples.length > 2 && this.samples[0].t < cut) this.samples.shift();
  }

  render() {
    const g = this.el;
    g.replaceChildren();
    const ss = this.samples;
    if (!ss.length) return;
    const vals = ss.flatMap((s) => SERIES.map(([k]) => s[k])).filter((v) => v != null && v > 0);
    if (!vals.length) return;
    let lo = Math.min(...vals), hi = Math.max(...vals);
    const log = hi / lo > 20;
    if (log) { lo = lo / 1.5; hi = hi * 1.5; } else { lo = 0; hi = hi * 1.1; }
    const f = log ? Math.log10 : (v) => v;
    const t1 = ss[ss.length - 1].t, t0 = t1 - this.window;
    const x = (t) => M.l + (t - t0) / this.window * (W - M.l - M.r);
    const y = (v) => H - M.b - (f(v) - f(lo)) / (f(hi) - f(lo)) * (H - M.t - M.b);
    g.append(svg('line', { class: 'axis', x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b }));
    g.append(svg('line', { class: 'axis', x1: M.l, y1: M.t, x2: M.l, y2: H - M.b }));
    g.append(svg('text', { x: M.l - 3, y: M.t + 8, 'text-anchor': 'end' }, formatBytes(hi)));
    g.append(svg('text', { x: M.l - 3, y: H - M.b, 'text-anchor': 'end' }, log ? formatBytes(lo) : '0'));
    g.append(svg('text', { x: M.l, y: H - 4 }, `-${Math.round(this.window / 1000)} s`));
    g.append(svg('text', { x: W - M.r, y: H - 4, 'text-anchor': 'end' }, log ? 'now (log scale)' : 'now'));
    for (const [k, cls] of SERIES) {
      let d = '';
      let pen = false;
      for (const s of ss) {
        let v = s[k];
        if (v == null) { pen = false; continue; }
        v = Math.max(v, lo); // a budget of 0 sits on the axis
        d += `${pen ? 'L' : 'M'}${x(s.t).toFixed(1)} ${y(v).toFixed(1)}`;
        pen = true;
      }
      if (d) g.append(svg('path', { class: cls, d }));
    }
  }
}
