//! The elastic controller's tunables. Every knob exists to stop one failure mode; its doc says
//! which. Times are milliseconds on the host's clock (`performance.now()` in the browser).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Fraction of the effective budget kept free: a step fits when
    /// `footprint + overheads <= effective_budget * (1 - headroom)`. Why: the footprint is
    /// exact but the rest of the process (allocator slack, driver buffers, the page itself)
    /// is not, and an OOM costs far more than a slightly smaller model.
    pub headroom: f64,
    /// Extra fraction of the budget a step *up* must leave free on top of `headroom`. Why: a
    /// byte-level hysteresis band, so a budget or heap estimate jittering around a step's
    /// boundary cannot pull the model down and push it back up again.
    pub up_margin: f64,
    /// How long memory must have stayed free (heap below `low_water`, and the next step up
    /// fitting with `up_margin`) before a step up, and again after each step up. Why: pressure
    /// comes in bursts (a tab opening, a GC cycle); growing on the first quiet reading would
    /// swap up and down with every burst.
    pub up_delay_ms: f64,
    /// One step up may grow `footprint + overheads` by at most this fraction (at least one
    /// trajectory step always). Why: a swap up holds old and new module versions at once, so
    /// the bound caps the transient peak and the size of a probe that might OOM; being a
    /// fraction it is independent of how fine the trajectory is (returning from QM(n_low) to
    /// QM(n_up) takes a handful of moves, not one per module).
    pub max_up_growth: f64,
    /// JS-heap pressure (`usedJSHeapSize / jsHeapSizeLimit`) above which the model shrinks by
    /// enough bytes to bring the estimate back under this mark.
    pub high_water: f64,
    /// Heap pressure below which memory counts as free. Between the two marks nothing moves:
    /// the gap is the heap's hysteresis band.
    pub low_water: f64,
    /// After an OOM, a failed swap or a lost device, no step up at all for this long. Why: right
    /// after a failure the allocator's state is unknown (fragmentation, other tabs, a device
    /// being recreated); probing it again at once invites a second failure.
    pub fault_cooldown_ms: f64,
    /// A failed footprint is a ceiling the controller never steps up to; the ceiling is lifted
    /// once memory has stayed free this long, doubled for every further fault (up to 16x). Why:
    /// the failure may have been transient, but a device that keeps failing at one size must be
    /// retried ever more rarely, not in a loop.
    pub ceiling_clear_ms: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            headroom: 0.10,
            up_margin: 0.05,
            up_delay_ms: 3_000.0,
            max_up_growth: 0.25,
            high_water: 0.90,
            low_water: 0.70,
            fault_cooldown_ms: 10_000.0,
            ceiling_clear_ms: 30_000.0,
        }
    }
}

impl Policy {
    /// Rejects settings under which the controller would be meaningless (nothing ever fits,
    /// the hysteresis bands inverted, non-finite times).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| {
            Err(Error::input(format!(
                "elastic policy: `{field}` {why} (headroom {}, up_margin {}, low_water {}, \
                 high_water {})",
                self.headroom, self.up_margin, self.low_water, self.high_water
            )))
        };
        if !(0.0..1.0).contains(&self.headroom) {
            return bad("headroom", "must be in [0, 1)");
        }
        if !(self.up_margin >= 0.0 && self.headroom + self.up_margin < 1.0) {
            return bad("up_margin", "must be >= 0 with headroom + up_margin < 1");
        }
        if !(self.low_water > 0.0 && self.low_water < self.high_water && self.high_water <= 1.0) {
            return bad(
                "low_water/high_water",
                "must satisfy 0 < low_water < high_water <= 1",
            );
        }
        if self.max_up_growth.is_nan() || self.max_up_growth <= 0.0 {
            return bad("max_up_growth", "must be > 0");
        }
        for (field, ms) in [
            ("up_delay_ms", self.up_delay_ms),
            ("fault_cooldown_ms", self.fault_cooldown_ms),
            ("ceiling_clear_ms", self.ceiling_clear_ms),
        ] {
            if !(ms.is_finite() && ms >= 0.0) {
                return bad(field, "must be a finite number of milliseconds >= 0");
            }
        }
        Ok(())
    }
}
