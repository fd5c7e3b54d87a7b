// The trajectory curve: perplexity against footprint for the EQMs the builder evaluated,
// every step as a tick on the footprint axis, and the EQM running now marked live.

import { svg, formatBytes } from './format.js';

const W = 400, H = 220;
const M = { l: 40, r: 10, t: 12, b: 30 };

export class TrajectoryChart {
  constructor(svgEl, descEl) {
    this.el = svgEl;
    this.desc = descEl;
    this.points = [];
    this.el.setAttribute('viewBox', `0 0 ${W} ${H}`);
  }

  /** `points`: engine.trajectory() rows. */
  setTrajectory(points) {
    this.points = points || [];
    // One scale for the whole curve: held-out perplexity when the builder measured any step on
    // held-out text, else the calibration one (a full-preset build records calibration ppl at
    // every step and held-out at every 30th: mixed, the curve zigzagged between the two).
    this.scale = this.points.some((p) => p.heldoutPpl != null) ? 'heldoutPpl' : 'calibPpl';
    const rated = this.points.filter((p) => this.ppl(p) != null);
    this.rated = rated.length ? rated : null;
    const fs = this.points.map((p) => p.footprintBytes);
    this.fmin = Math.min(...fs);
    this.fmax = Math.max(...fs);
    if (this.rated) {
      const ps = this.rated.map((p) => this.ppl(p));
      this.ymin = Math.min(...ps);
      this.ymax = Math.max(...ps);
    } else {
      this.ymin = 0;
      this.ymax = Math.max(1, this.points.length - 1);
    }
    if (this.ymax - this.ymin < 1e-9) { this.ymin -= 1; this.ymax += 1; }
    if (this.fmax - this.fmin < 1) { this.fmin -= 1; this.fmax += 1; }
    // Perplexity explodes at the last bits: a log axis keeps the rest of the curve readable.
    this.log = Boolean(this.rated) && this.ymin > 0 && this.ymax / this.ymin > 4;
    const pad = (this.g(this.ymax) - this.g(this.ymin)) * 0.08;
    this.gmin = this.g(this.ymin) - pad;
    this.gmax = this.g(this.ymax) + pad;
  }

  /** A point's perplexity on the chart's scale (null when not measured on it). */
  ppl(p) { return p[this.scale] ?? null; }

  x(f) { return M.l + (f - this.fmin) / (this.fmax - this.fmin) * (W - M.l - M.r); }
  g(v) { return this.log ? Math.log10(v) : v; }
  y(v) { return H - M.b - (this.g(v) - this.gmin) / (this.gmax - this.gmin) * (H - M.t - M.b); }

  /** Perplexity at a footprint, interpolated between evaluated steps (null when none). */
  pplAt(f) {
    if (!this.rated) return null;
    const r = [...this.rated].sort((a, b) => a.footprintBytes - b.footprintBytes);
    if (f <= r[0].footprintBytes) return this.ppl(r[0]);
    for (let i = 1; i < r.length; i++) {
      if (f <= r[i].footprintBytes) {
        const a = r[i - 1], b = r[i];
        const t = (f - a.footprintBytes) / (b.footprintBytes - a.footprintBytes || 1);
        return this.ppl(a) + t * (this.ppl(b) - this.ppl(a));
      }
    }
    return this.ppl(r[r.length - 1]);
  }

  /** Redraws with the current step and the largest footprint the budget allows (or null). */
  render(step, budgetBytes) {
    const g = this.el;
    g.replaceChildren();
    if (!this.points.length) return;
    // axes
    g.append(svg('line', { class: 'axis', x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b }));
    g.append(svg('line', { class: 'axis', x1: M.l, y1: M.t, x2: M.l, y2: H - M.b }));
    g.append(svg('text', { x: M.l, y: H - 16 }, formatBytes(this.fmin)));
    g.append(svg('text', { x: W - M.r, y: H - 16, 'text-anchor': 'end' }, formatBytes(this.fmax)));
    g.append(svg('text', { x: (W + M.l) / 2, y: H - 4, 'text-anchor': 'middle' }, 'model footprint'));
    const ylab = this.rated ? `${this.scale === 'heldoutPpl' ? 'held-out' : 'calibration'} perplexity${this.log ? ' (log)' : ''}` : 'step';
    const yfmt = (v) => this.rated ? v.toFixed(v < 100 ? 1 : 0) : Math.round(v).toString();
    g.append(svg('text', { x: M.l - 4, y: this.y(this.ymax) + 4, 'text-anchor': 'end' }, yfmt(this.ymax)));
    g.append(svg('text', { x: M.l - 4, y: this.y(this.ymin) + 4, 'text-anchor': 'end' }, yfmt(this.ymin)));
    g.append(svg('text', { x: 12, y: (H - M.b + M.t) / 2, transform: `rotate(-90 12 ${(H - M.b + M.t) / 2})`, 'text-anchor': 'middle' }, ylab));
    // every step: a tick on the footprint axis (how fine the trajectory is)
    const ticks = this.points.map((p) => `M${this.x(p.footprintBytes).toFixed(1)} ${H - M.b}v4`).join('');
    g.append(svg('path', { class: 'axis', d: ticks }));
    // the curve
    const rows = this.rated || this.points;
    const yv = (p) => this.rated ? this.ppl(p) : p.step;
    const d = rows.map((p, i) => `${i ? 'L' : 'M'}${this.x(p.footprintBytes).toFixed(1)} ${this.y(yv(p)).toFixed(1)}`).join('');
    g.append(svg('path', { class: 'curve', d }));
    if (rows.length <= 80) for (const p of rows) g.append(svg('circle', { class: 'curve-pts', cx: this.x(p.footprintBytes), cy: this.y(yv(p)), r: 2 }));
    // the model budget, when it is inside the plotted range
    if (budgetBytes != null && budgetBytes >= this.fmin && budgetBytes <= this.fmax) {
      const bx = this.x(budgetBytes);
      g.append(svg('line', { class: 'budget-line', x1: bx, y1: M.t, x2: bx, y2: H - M.b }));
      g.append(svg('text', { x: bx - 3, y: H - M.b - 4, 'text-anchor': 'end', class: 'budget-label' }, 'budget'));
    }
    // the current EQM
    const cur = this.points.find((p) => p.step === step) || this.points[0];
    const cx = this.x(cur.footprintBytes);
    const cv = this.rated ? this.pplAt(cur.footprintBytes) : cur.step;
    const cy = this.y(cv);
    g.append(svg('line', { class: 'current-line', x1: cx, y1: M.t, x2: cx, y2: H - M.b }));
    const dot = svg('circle', { class: 'current', cx, cy, r: 6, 'data-step': cur.step });
    dot.append(svg('title', {}, `step ${cur.step}`));
    g.append(dot);
    const label = `step ${cur.step}/${this.points.length - 1}`;
    const right = cx > W / 2;
    g.append(svg('text', { x: cx + (right ? -9 : 9), y: Math.max(M.t + 10, cy - 8), 'text-anchor': right ? 'end' : 'start', class: 'current-label' }, label));
    g.dataset.step = String(cur.step);
    const pv = this.rated ? `, perplexity about ${this.pplAt(cur.footprintBytes).toFixed(2)}` : '';
    this.desc.textContent = `Running step ${cur.step} of ${this.points.length - 1} (${formatBytes(cur.footprintBytes)}${pv}). ` +
      `The trajectory spans ${formatBytes(this.fmax)} (step 0, all modules at the most bits) to ${formatBytes(this.fmin)} in ${this.points.length - 1} one-module steps.`;
  }
}
