// The elasticity panel: live stats, the trajectory curve with the current EQM, the memory time
// chart, the swap log, and the memory controls (budget, simulated pressure, device loss).
//
// Budget model: the slider sets what the whole page may use; the model is given that minus the
// memory the page's simulated pressure holds (`engine.setMemoryBudget`). The engine also reads
// the real JS heap (`performance.memory`, forwarded by the package's worker proxy) and shrinks
// on its own when the heap nears its limit.

import { $, formatBytes, formatSeconds, errorText } from './format.js';
import { TrajectoryChart } from './trajectory-chart.js';
import { TimeChart } from './time-chart.js';
import { SwapLog } from './swap-log.js';
import { Pressure, heapReading } from './pressure.js';

// runtime::Policy's defaults: a step fits in budget x (1 - headroom); a step up needs the
// extra up_margin too.
const HEADROOM = 0.10;
const UP_MARGIN = 0.05;
const PIN = 1.02; // the pinned budget's slack over what step 0 needs
const MB = 1e6;
const UNLIMITED = 1000;

export class ElasticPanel {
  constructor(engine, hooks = {}) {
    this.engine = engine;
    this.hooks = hooks;
    this.traj = new TrajectoryChart($('trajectory'), $('trajectory-desc'));
    this.time = new TimeChart($('timechart'));
    this.log = new SwapLog($('swaplog'));
    this.pressure = new Pressure();
    this.total = null; // the page's total budget in bytes, null = unlimited
    this.stats = null;
    this.points = [];
    this.slider = $('budget');
    this.pressureAt = null; // when the last pressure/budget change was made (page latency)
  }

  async init(trajectory, stats) {
    this.points = trajectory;
    this.traj.setTrajectory(trajectory);
    this.stats = stats;
    const fs = trajectory.map((p) => p.footprintBytes);
    const f0 = Math.max(...fs), fn = Math.min(...fs);
    const ov = stats.overheadBytes || 0;
    // The slider spans from below the smallest step's need to well above the largest's.
    this.lo = (fn + ov) / (1 - HEADROOM) * 0.9;
    this.hi = (f0 + ov) / (1 - HEADROOM - UP_MARGIN) * 1.3;
    this.total = stats.budgetBytes ?? null;
    this.syncSlider();
    // Default pressure: what takes the model to the middle of its trajectory under the budget
    // the first pressure pins (or the budget set now).
    const mid = trajectory[Math.floor(trajectory.length / 2)].footprintBytes;
    const total = this.total ?? this.fullNeed() * PIN;
    const mb = Math.max(0.01, (total - (mid + ov) / (1 - HEADROOM)) / MB);
    $('pressure-mb').value = mb >= 10 ? Math.round(mb) : mb.toFixed(2);
    this.slider.addEventListener('input', () => this.onSlider());
    $('pressure').addEventListener('click', () => this.addPressure());
    $('release').addEventListener('click', () => this.releasePressure());
    $('device-loss').addEventListener('click', () => this.deviceLoss());
    $('min-speed').addEventListener('change', () => this.setMinSpeed());
    $('max-ppl').addEventListener('change', () => this.setMaxPerplexity());
    $('controls').disabled = false;
    this.render();
    this.timer = setInterval(() => this.poll(), 1000);
  }

  sliderToBytes(v) {
    return v >= UNLIMITED ? null : this.lo + (this.hi - this.lo) * (v / UNLIMITED);
  }

  syncSlider() {
    this.slider.value = this.total == null ? UNLIMITED : Math.round(Math.min(UNLIMITED - 1, Math.max(0, (this.total - this.lo) / (this.hi - this.lo) * UNLIMITED)));
    $('budget-out').textContent = this.total == null ? 'unlimited' : formatBytes(this.total);
    this.slider.setAttribute('aria-valuetext', $('budget-out').textContent);
  }

  modelBudget() {
    return this.total == null ? null : Math.max(0, this.total - this.pressure.bytes);
  }

  onSlider() {
    this.pinned = false;
    this.total = this.sliderToBytes(Number(this.slider.value));
    $('budget-out').textContent = this.total == null ? 'unlimited' : formatBytes(this.total);
    this.slider.setAttribute('aria-valuetext', $('budget-out').textContent);
    clearTimeout(this.sliderTimer);
    this.sliderTimer = setTimeout(() => this.applyBudget('budget'), 150);
  }

  async applyBudget(why) {
    this.pressureAt = { t: performance.now(), why, step: this.stats && this.stats.step };
    try {
      await this.engine.setMemoryBudget(this.modelBudget());
    } catch (e) {
      this.hooks.onError?.(e);
    }
    this.poll();
  }

  /** The budget under which step 0 fits and may be stepped up to (headroom + up margin), with
   * `overhead` (KV cache, activations: the KV cache grows with the conversation). */
  fullNeed(overhead = this.stats.overheadBytes || 0) {
    const f0 = Math.max(...this.points.map((p) => p.footprintBytes));
    return (f0 + overhead) / (1 - HEADROOM - UP_MARGIN);
  }

  async addPressure() {
    const mb = Math.max(0.01, Math.min(4096, Number($('pressure-mb').value) || 1));
    if (this.total == null) {
      // With no limit set, pin the budget to what the full model needs (step 0, with the
      // controller's margin for stepping up), so the memory held next comes out of the
      // model's share and releasing it lets the model grow back to the top.
      this.total = this.fullNeed() * PIN;
      this.pinned = true;
      this.syncSlider();
    }
    const before = heapReading();
    $('pressure').disabled = true;
    await new Promise((r) => setTimeout(r, 0)); // let the button repaint before the allocation
    this.pressure.add(mb * MB);
    $('pressure').disabled = false;
    $('release').disabled = false;
    const state = () => {
      const after = heapReading();
      const moved = before && after ? ` (JS heap ${formatBytes(before.used)} → ${formatBytes(after.used)})` : '';
      $('pressure-state').textContent = `The page holds ${formatBytes(this.pressure.bytes)} of JS memory${moved}; the model may use ${formatBytes(this.modelBudget())}.`;
    };
    state();
    setTimeout(state, 300); // performance.memory refreshes at most every 50 ms
    this.log.note(`pressure: holding ${formatBytes(this.pressure.bytes)}`);
    await this.applyBudget('pressure');
  }

  async releasePressure() {
    this.pressure.release();
    if (this.pinned) {
      // The budget was pinned only for the pressure (the user set none): releasing it goes
      // back to no limit, so the model grows back to the top and stays there as the
      // conversation's KV cache grows (a budget kept at what step 0 needed at the release
      // made a longer chat walk the model down and then leave out older messages).
      this.total = null;
      this.pinned = false;
      this.syncSlider();
    }
    $('release').disabled = true;
    $('pressure-state').textContent = 'Released: the page holds no extra memory (the garbage collector frees it on its next cycle). The model grows back after memory has stayed free for a few seconds.';
    this.log.note('pressure released');
    await this.applyBudget('release');
  }

  async deviceLoss() {
    const b = $('device-loss');
    b.disabled = true;
    this.deviceLossAt = performance.now();
    try {
      await this.engine.simulateDeviceLoss();
    } catch (e) {
      this.hooks.onError?.(e);
    } finally {
      b.disabled = false;
      this.poll();
    }
  }

  /** An engine event: swaps, device loss and recovery land in the log and the chart. */
  onEvent(e) {
    this.events = (this.events || 0) + 1;
    if (e.type === 'swap') {
      // The latency a user sees: from the budget change (pressure, release, slider) to the
      // completed swap; a step up waits out the runtime's hysteresis on purpose.
      if (this.pressureAt) {
        e.pageLatencyMs = performance.now() - this.pressureAt.t;
        this.pressureAt = null;
      }
      this.log.add(e);
      this.eventStep = { step: e.to, at: performance.now() };
      if (this.stats) { this.stats.step = e.to; this.stats.footprintBytes = e.footprintBytes ?? this.stats.footprintBytes; }
      this.render();
      this.poll();
    } else if (e.type === 'device-lost') {
      this.log.note(`GPU device lost at step ${e.step}: ${e.message || ''}`, 'down');
    } else if (e.type === 'recovered') {
      this.eventStep = { step: e.to, at: performance.now() };
      this.log.note(`recovered in ${formatSeconds((e.ms || 0) / 1000)}: step ${e.from} → ${e.to}, ${e.reprefilledTokens ?? 0} tokens re-read`, 'up');
      this.poll();
    } else if (e.type === 'below-floor') {
      // The deepest step allowed: the quality floor's when one is set, else the trajectory's end.
      const floor = $('max-ppl').value !== '' ? 'the quality floor' : 'the smallest EQM';
      this.log.note(`the budget is below ${floor} (step ${e.step}): staying there`, 'down');
    } else if (e.type === 'error') {
      this.log.note(`error: ${errorText(e.error)}`, 'down');
    }
  }

  async poll() {
    if (this.polling) return;
    this.polling = true;
    try {
      for (let i = 0; i < 3; i++) {
        const seen = this.events;
        const s = await this.engine.stats();
        // An event that arrived meanwhile may be newer than these stats: ask again.
        if (seen !== this.events) continue;
        // stats().step can trail a swap or recovery event by a token (the engine updates it
        // when the token in flight completes): the event's step wins for a few seconds.
        const ev = this.eventStep;
        if (ev && s.step !== ev.step && performance.now() - ev.at < 5000) s.step = ev.step;
        else this.eventStep = null;
        this.stats = s;
        this.hooks.onStats?.(s);
        break;
      }
    } catch { /* engine busy recovering: keep the last stats */ } finally {
      this.polling = false;
    }
    this.pressure.touch();
    const h = heapReading();
    // The model's line is what the budget counts: weights plus KV cache and activations.
    this.time.add({ t: performance.now(), budget: this.modelBudget(), heap: h && h.used, footprint: this.stats && this.stats.footprintBytes + (this.stats.overheadBytes || 0) });
    this.render();
  }

  /** The minimum-speed field: empty or 0 clears it. */
  async setMinSpeed() {
    const v = Number($('min-speed').value);
    try {
      await this.engine.setMinTokensPerSecond(Number.isFinite(v) && v > 0 ? v : null);
    } catch (e) {
      this.hooks.onError?.(e);
    }
  }

  /** The quality-floor field: empty clears it. */
  async setMaxPerplexity() {
    const v = Number($('max-ppl').value);
    try {
      await this.engine.setMaxPerplexity($('max-ppl').value !== '' && Number.isFinite(v) ? v : null);
    } catch (e) {
      this.hooks.onError?.(e);
    }
  }

  render() {
    const s = this.stats;
    if (!s) return;
    // The budget on the footprint axis: the largest footprint it leaves room for.
    const mbud = this.modelBudget();
    this.traj.render(s.step, mbud == null ? null : mbud * (1 - HEADROOM) - (s.overheadBytes || 0));
    this.time.render();
    const h = heapReading();
    $('st-step').textContent = `${s.step} / ${s.steps - 1}`;
    $('st-footprint').textContent = formatBytes(s.footprintBytes);
    $('st-kv').textContent = `${formatBytes(s.kvCacheBytes)} (${s.kvCache}) · ${s.contextTokens} of ${s.contextLength} tokens`;
    const mb = this.modelBudget();
    const floor = Math.min(...this.points.map((p) => p.footprintBytes)) + (s.overheadBytes || 0);
    $('st-budget').textContent = mb == null ? 'unlimited' : formatBytes(mb) + (mb * (1 - HEADROOM) < floor ? ' (below the smallest EQM)' : '');
    $('st-heap').textContent = h ? `${formatBytes(h.used)} of ${formatBytes(h.limit)}` : 'not reported';
    const speed = s.measuredTokensPerSecond ?? s.tokensPerSecond;
    // The CPU backend's tokens run on as many of its threads as measured fastest now.
    const threads = s.backend === 'cpu' && s.threads > 1 ? ` · ${s.threadsActive} of ${s.threads} threads` : '';
    $('st-speed').textContent = (speed ? `${speed.toFixed(1)} tok/s` : '–') +
      (s.minTokensPerSecond ? ` (min ${s.minTokensPerSecond})` : '') + threads;
    $('st-speed').title = threads ? 'Each token runs on the number of threads measured fastest now: fewer when other work keeps the cores busy.' : '';
    $('st-swaps').textContent = `${s.swaps} (${s.swapsDown}↓ ${s.swapsUp}↑)`;
    document.querySelector('.elastic').dataset.step = String(s.step);
  }

  stop() {
    clearInterval(this.timer);
  }
}
