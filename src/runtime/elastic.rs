//! The elastic controller: memory signals in, a target step of the EQM trajectory out.
//!
//! The trajectory runs from step 0 = QM(n_up), the largest footprint, to the last step =
//! QM(n_low), each step swapping one module to fewer bits, so footprints never increase
//! along it. The controller never touches a GPU or a browser API: the host feeds it signals
//! with explicit timestamps (`performance.now()` in the browser, a scripted clock in tests),
//! calls [`Elastic::decide`] between tokens, performs the swap it asks for (keeping the KV
//! cache and the conversation) and reports [`Elastic::swapped`] or [`Elastic::swap_failed`].
//!
//! # Policy
//! * **What fits.** A step's cost is its model footprint plus the overheads (KV cache and
//!   activations, updated as the context grows). The *effective budget* is the smaller of the
//!   app-set budget and the heap signal's cap; a step fits when its cost is at most
//!   `effective budget x (1 - headroom)` and strictly below any OOM ceiling. With no limit
//!   known, everything fits and the host runs step 0.
//! * **Down at once.** When the current step stops fitting, the next decision jumps straight
//!   to the largest step that fits, however many steps down that is. So after a step down for
//!   the budget, `footprint + overheads <= budget x (1 - headroom)` always holds.
//! * **Heap pressure.** A `performance.memory` reading `used / limit` above `high_water` caps
//!   the cost at `current cost - (used - high_water x limit)`: shrink by what the heap is over
//!   the mark (plus the headroom). The cap is recomputed on every reading, so it relaxes as
//!   the heap empties and does not move when a swap alone changes the heap. Below `low_water`
//!   memory counts as free; between the marks nothing moves.
//! * **Up slowly.** A step up needs: memory free (heap below `low_water`, or no heap signal),
//!   the next step fitting with the extra `up_margin`, both for `up_delay_ms` without
//!   interruption, and no fault in the last `fault_cooldown_ms`. It then moves to the largest
//!   step that fits with the margin, growing the cost by at most `max_up_growth` (at least one
//!   step), and the delay starts again from the completed swap. The margin (bytes) and the
//!   delay (time) are the hysteresis: a budget that oscillates faster than the delay, or
//!   within the margin, moves the model down once and then not at all.
//! * **Faults.** An OOM, a failed swap or a lost device make the cost that failed (the
//!   current step's, or the attempted step's for a failed swap) a *ceiling*: the next
//!   decision goes at least one step below it, and no step up reaches it until memory has
//!   stayed free for `ceiling_clear_ms`, doubled for each further fault (up to 16x).
//! * **Speed** (the paper's future work: compute as a second elastic resource). With a
//!   minimum decode speed set, each speed reading at a step caps the *footprint* at
//!   `footprint x measured / minimum` (decode streams every weight byte once per token, so
//!   speed goes as bytes per token); a step fits only under that cap too, and a step up needs
//!   the cap with the up-margin. A reading is kept with the footprint it was measured at, so it
//!   stays meaningful after a move, and the next reading at the new step corrects the model.
//!   The memory budget still binds: a step must satisfy both.
//! * **Floor.** If even the last step does not fit, the controller moves to (or stays at) the
//!   last step with reason `BelowFloor` and `Stats::below_floor`; it never panics.
//!
//! Every decision is a pure function of the state and `now`; asking twice without new
//! signals gives the same answer, and a step up already decided is repeated (not recomputed)
//! until the host reports it, unless it no longer fits.

use crate::runtime::{Decision, Policy, Reason, Stats};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy)]
struct Ceiling {
    bytes: u64,
    cause: Reason,
}

#[derive(Debug, Clone, Copy)]
struct SpeedReading {
    tok_s: f64,
    footprint: u64,
}

#[derive(Debug, Clone, Copy)]
struct HeapReading {
    ratio: f64,
    cap: u64,
}

#[derive(Debug, Clone)]
pub struct Elastic {
    footprints: Vec<u64>,
    overheads: u64,
    policy: Policy,
    budget: Option<u64>,
    heap: Option<HeapReading>,
    min_tok_s: Option<f64>,
    speed: Option<SpeedReading>,
    /// The app's quality floor: the deepest step it accepts (`None`: the last step).
    floor: Option<usize>,
    ceiling: Option<Ceiling>,
    /// Faults so far; each doubles the time before a ceiling is lifted.
    faults: u32,
    last_fault_ms: Option<f64>,
    /// Since when memory has been free (heap low, no fault): lifts the ceiling.
    free_since: Option<f64>,
    /// Since when a step up has been possible: gates it.
    ready_since: Option<f64>,
    current: Option<usize>,
    /// A step up decided but not yet reported done.
    pending_up: Option<usize>,
    last: Option<Decision>,
    last_move_reason: Option<Reason>,
    counts: Counts,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    swaps_down: u64,
    swaps_up: u64,
    steps_down: u64,
    steps_up: u64,
    ooms: u64,
    swap_failures: u64,
    device_losses: u64,
}

impl Elastic {
    /// `footprints[s]`: model bytes of trajectory step `s`, non-increasing; `overheads`: KV
    /// cache plus activations in bytes.
    pub fn new(footprints: Vec<u64>, overheads: u64, policy: Policy) -> Result<Self> {
        policy.validate()?;
        if footprints.is_empty() {
            return Err(Error::format(
                "trajectory",
                "no steps: it needs at least QM(n_up)",
            ));
        }
        if let Some(s) = (1..footprints.len()).find(|&s| footprints[s] > footprints[s - 1]) {
            return Err(Error::format(
                "trajectory",
                format!(
                    "step {s} has a footprint of {} bytes, more than step {}'s {} bytes: \
                     footprints must not increase from QM(n_up) to QM(n_low)",
                    footprints[s],
                    s - 1,
                    footprints[s - 1]
                ),
            ));
        }
        Ok(Elastic {
            footprints,
            overheads,
            policy,
            budget: None,
            heap: None,
            min_tok_s: None,
            speed: None,
            floor: None,
            ceiling: None,
            faults: 0,
            last_fault_ms: None,
            free_since: None,
            ready_since: None,
            current: None,
            pending_up: None,
            last: None,
            last_move_reason: None,
            counts: Counts::default(),
        })
    }

    pub fn steps(&self) -> usize {
        self.footprints.len()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Model bytes of `step` (panics if out of range, like indexing).
    pub fn footprint(&self, step: usize) -> u64 {
        self.footprints[step]
    }

    /// What `step` costs with the current overheads.
    pub fn cost(&self, step: usize) -> u64 {
        self.footprints[step].saturating_add(self.overheads)
    }

    // ---- signals ----

    /// The app's memory budget for model plus overheads.
    pub fn set_budget(&mut self, bytes: u64) {
        self.budget = Some(bytes);
    }

    pub fn clear_budget(&mut self) {
        self.budget = None;
    }

    /// KV cache plus activations; grows with the context, shrinks on a new conversation.
    pub fn set_overheads(&mut self, bytes: u64) {
        self.overheads = bytes;
    }

    /// A `performance.memory` reading (`usedJSHeapSize`, `jsHeapSizeLimit`). Ignored when the
    /// limit is 0 (the browser hides it).
    pub fn heap(&mut self, used: u64, limit: u64, now_ms: f64) {
        if limit == 0 {
            return;
        }
        let current = self.current.map_or(0, |s| self.cost(s)) as f64;
        let room = self.policy.high_water * limit as f64 - used as f64;
        self.heap = Some(HeapReading {
            ratio: used as f64 / limit as f64,
            cap: (current + room).max(0.0) as u64,
        });
        self.observe(now_ms);
    }

    /// The app's minimum decode speed in tokens/s (`None`: no speed constraint).
    pub fn set_min_speed(&mut self, tok_s: Option<f64>, now_ms: f64) -> Result<()> {
        if let Some(t) = tok_s.filter(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(Error::input(format!(
                "minimum speed {t} tokens/s: must be a positive number"
            )));
        }
        self.min_tok_s = tok_s;
        self.observe(now_ms);
        Ok(())
    }

    /// The app's quality floor: the controller never steps below `step` (`None`: down to
    /// the last step). Under a budget the floor step does not fit, it holds there with
    /// `Reason::BelowFloor`; a model below a new floor steps up to it (`Reason::QualityFloor`).
    pub fn set_floor(&mut self, step: Option<usize>) -> Result<()> {
        if let Some(s) = step {
            self.check_step(s)?;
        }
        self.floor = step;
        Ok(())
    }

    /// The deepest step the controller may use: the quality floor, else the last step.
    pub fn deepest(&self) -> usize {
        self.floor.unwrap_or(self.steps() - 1)
    }

    /// A decode-speed reading (tokens/s, smoothed by the host over several tokens) at the
    /// current step. Ignored before a step is loaded or when not a positive number.
    pub fn speed(&mut self, tok_s: f64, now_ms: f64) {
        let Some(c) = self.current else { return };
        if tok_s.is_finite() && tok_s > 0.0 {
            self.speed = Some(SpeedReading {
                tok_s,
                footprint: self.footprints[c],
            });
            self.observe(now_ms);
        }
    }

    /// The largest footprint expected to decode at the minimum speed.
    fn speed_cap(&self) -> Option<u64> {
        let (min, r) = (self.min_tok_s?, self.speed?);
        Some((r.footprint as f64 * r.tok_s / min) as u64)
    }

    fn fast_enough(&self, step: usize, margin: f64) -> bool {
        self.speed_cap()
            .is_none_or(|cap| self.footprints[step] as f64 * (1.0 + margin) <= cap as f64)
    }

    /// WebGPU out-of-memory outside a swap (e.g. growing the KV cache). Report the grown
    /// overheads first if that is what failed.
    pub fn oom(&mut self, now_ms: f64) {
        self.counts.ooms += 1;
        self.fault(self.current, Reason::OutOfMemory, now_ms);
    }

    /// The GPU device was lost. The host rebuilds at the next decision's target.
    pub fn device_lost(&mut self, now_ms: f64) {
        self.counts.device_losses += 1;
        self.fault(self.current, Reason::DeviceLost, now_ms);
    }

    /// The host completed a load or swap and now runs `step`.
    pub fn swapped(&mut self, step: usize, now_ms: f64) -> Result<()> {
        self.check_step(step)?;
        if let Some(prev) = self.current {
            if step > prev {
                self.counts.swaps_down += 1;
                self.counts.steps_down += (step - prev) as u64;
            } else if step < prev {
                self.counts.swaps_up += 1;
                self.counts.steps_up += (prev - step) as u64;
                // The new size must prove itself quiet before the next move up.
                self.ready_since = None;
            }
        }
        self.current = Some(step);
        self.pending_up = None;
        self.observe(now_ms);
        Ok(())
    }

    /// Going to `step` failed with out-of-memory; the host is still at the step it last
    /// reported with `swapped` (it rolls back a partial swap).
    pub fn swap_failed(&mut self, step: usize, now_ms: f64) -> Result<()> {
        self.check_step(step)?;
        self.counts.swap_failures += 1;
        self.fault(Some(step), Reason::SwapFailed, now_ms);
        Ok(())
    }

    // ---- decision ----

    /// Where the host should be now. Call between tokens.
    pub fn decide(&mut self, now_ms: f64) -> Decision {
        self.observe(now_ms);
        let d = self.choose(now_ms);
        self.pending_up = match d {
            Decision::StepUp { to, .. } => Some(to),
            _ => None,
        };
        if d.is_move() {
            self.last_move_reason = Some(d.reason());
        }
        self.last = Some(d);
        d
    }

    fn choose(&self, now_ms: f64) -> Decision {
        let last = self.deepest();
        let Some(c) = self.current else {
            // Load with the up-margin, so a jittering budget does not force a swap at once.
            let to = (0..=last)
                .find(|&s| self.fits_up(s))
                .or_else(|| (0..=last).find(|&s| self.fits(s)));
            return match to {
                Some(to) => Decision::Load {
                    to,
                    reason: Reason::Initial,
                },
                None => Decision::Load {
                    to: last,
                    reason: Reason::BelowFloor,
                },
            };
        };
        if c > last {
            return Decision::StepUp {
                from: c,
                to: last,
                reason: Reason::QualityFloor,
            };
        }
        if !self.fits(c) {
            return match (c + 1..=last).find(|&s| self.fits(s)) {
                Some(to) => Decision::StepDown {
                    from: c,
                    to,
                    reason: self.binding(c),
                },
                None if c < last => Decision::StepDown {
                    from: c,
                    to: last,
                    reason: self.floor_reason(),
                },
                None => Decision::Hold {
                    step: c,
                    reason: self.floor_reason(),
                },
            };
        }
        if let Some(to) = self.pending_up.filter(|&p| p < c && self.fits(p)) {
            return Decision::StepUp {
                from: c,
                to,
                reason: Reason::MemoryFree,
            };
        }
        let hold = |reason| Decision::Hold { step: c, reason };
        if c == 0 {
            return hold(Reason::AtTop);
        }
        if !self.heap_free() {
            return hold(Reason::HeapBusy);
        }
        if !self.fits_up(c - 1) {
            let cost = self.cost(c - 1);
            let margin = self.policy.up_margin;
            return hold(if !self.within(cost, margin) {
                Reason::NoRoom
            } else if !self.under_ceiling(cost) {
                Reason::Ceiling
            } else {
                Reason::SpeedBound
            });
        }
        if self
            .last_fault_ms
            .is_some_and(|t| now_ms - t < self.policy.fault_cooldown_ms)
        {
            return hold(Reason::Cooldown);
        }
        if !self
            .ready_since
            .is_some_and(|t| now_ms - t >= self.policy.up_delay_ms)
        {
            return hold(Reason::Settling);
        }
        // Costs grow toward step 0, so the steps that fit form a run ending at c - 1.
        let growth_cap = self.cost(c) as f64 * (1.0 + self.policy.max_up_growth);
        let mut to = c - 1;
        while to > 0 && self.fits_up(to - 1) && self.cost(to - 1) as f64 <= growth_cap {
            to -= 1;
        }
        Decision::StepUp {
            from: c,
            to,
            reason: Reason::MemoryFree,
        }
    }

    // ---- state ----

    pub fn stats(&self) -> Stats {
        let c = &self.counts;
        Stats {
            steps: self.steps(),
            current_step: self.current,
            target_step: self.last.map(|d| d.target()),
            footprint_bytes: self.current.map(|s| self.footprints[s]),
            overhead_bytes: self.overheads,
            budget_bytes: self.budget,
            heap_cap_bytes: self.heap.map(|h| h.cap),
            heap_ratio: self.heap.map(|h| h.ratio),
            effective_budget_bytes: self.effective_budget(),
            usable_bytes: self.usable(0.0),
            oom_ceiling_bytes: self.ceiling.map(|k| k.bytes),
            min_tok_s: self.min_tok_s,
            speed_tok_s: self.speed.map(|r| r.tok_s),
            speed_cap_bytes: self.speed_cap(),
            fits: self.current.is_some_and(|s| self.fits(s)),
            below_floor: !self.fits_memory(self.deepest()),
            floor_step: self.floor,
            last_reason: self.last.map(|d| d.reason()),
            last_move_reason: self.last_move_reason,
            swaps_down: c.swaps_down,
            swaps_up: c.swaps_up,
            steps_down: c.steps_down,
            steps_up: c.steps_up,
            ooms: c.ooms,
            swap_failures: c.swap_failures,
            device_losses: c.device_losses,
        }
    }

    /// min(app budget, heap cap); `None` when neither is known.
    pub fn effective_budget(&self) -> Option<u64> {
        match (self.budget, self.heap.map(|h| h.cap)) {
            (Some(b), Some(h)) => Some(b.min(h)),
            (b, h) => b.or(h),
        }
    }

    /// The effective budget less the headroom and `margin` (both fractions of it).
    fn usable(&self, margin: f64) -> Option<u64> {
        let keep = 1.0 - self.policy.headroom - margin;
        self.effective_budget()
            .map(|b| (b as f64 * keep).floor() as u64)
    }

    fn within(&self, cost: u64, margin: f64) -> bool {
        self.usable(margin).is_none_or(|u| cost <= u)
    }

    fn under_ceiling(&self, cost: u64) -> bool {
        self.ceiling.is_none_or(|k| cost < k.bytes)
    }

    fn fits(&self, step: usize) -> bool {
        self.fits_memory(step) && self.fast_enough(step, 0.0)
    }

    fn fits_memory(&self, step: usize) -> bool {
        let cost = self.cost(step);
        self.within(cost, 0.0) && self.under_ceiling(cost)
    }

    /// Why the last step is where the model must be when no step fits: memory (`BelowFloor`),
    /// or only the speed (`TooSlow`: the smallest step is the fastest there is).
    fn floor_reason(&self) -> Reason {
        if self.fits_memory(self.deepest()) {
            Reason::TooSlow
        } else {
            Reason::BelowFloor
        }
    }

    fn fits_up(&self, step: usize) -> bool {
        let cost = self.cost(step);
        let margin = self.policy.up_margin;
        self.within(cost, margin) && self.under_ceiling(cost) && self.fast_enough(step, margin)
    }

    fn heap_free(&self) -> bool {
        self.heap.is_none_or(|h| h.ratio < self.policy.low_water)
    }

    /// The constraint step `c` breaks, for the step-down reason.
    fn binding(&self, c: usize) -> Reason {
        match self.ceiling {
            Some(k) if self.cost(c) >= k.bytes => k.cause,
            _ if self.within(self.cost(c), 0.0) && !self.fast_enough(c, 0.0) => Reason::TooSlow,
            _ => match (self.budget, self.heap) {
                (Some(b), Some(h)) if h.cap < b => Reason::HeapPressure,
                (None, Some(_)) => Reason::HeapPressure,
                _ => Reason::Budget,
            },
        }
    }

    /// Advances the timers to `now` and lifts a ceiling whose time has come.
    fn observe(&mut self, now_ms: f64) {
        let free = self.heap_free();
        self.free_since = if free {
            self.free_since.or(Some(now_ms))
        } else {
            None
        };
        if let (Some(_), Some(since)) = (self.ceiling, self.free_since) {
            let backoff = f64::from(1u32 << self.faults.saturating_sub(1).min(4));
            if now_ms - since >= self.policy.ceiling_clear_ms * backoff {
                self.ceiling = None;
            }
        }
        let ready = free && self.current.is_some_and(|c| c > 0 && self.fits_up(c - 1));
        self.ready_since = if ready {
            self.ready_since.or(Some(now_ms))
        } else {
            None
        };
    }

    fn fault(&mut self, step: Option<usize>, cause: Reason, now_ms: f64) {
        if let Some(cost) = step.map(|s| self.cost(s)) {
            if self.ceiling.is_none_or(|k| cost < k.bytes) {
                self.ceiling = Some(Ceiling { bytes: cost, cause });
            }
        }
        self.faults = self.faults.saturating_add(1);
        self.last_fault_ms = Some(now_ms);
        self.free_since = None;
        self.ready_since = None;
        self.pending_up = None;
        self.observe(now_ms);
    }

    fn check_step(&self, step: usize) -> Result<()> {
        if step >= self.steps() {
            return Err(Error::input(format!(
                "elastic: step {step} is outside the trajectory (steps 0..{})",
                self.steps()
            )));
        }
        Ok(())
    }
}
