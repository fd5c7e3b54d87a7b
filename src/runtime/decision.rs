//! What the controller tells the host (`Decision`, `Reason`) and shows the UI (`Stats`).
//! All serializable, so the wasm layer hands them to JS unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why the controller decided what it did. Reasons for moves down name the constraint that
/// the current step broke; holds say what keeps the model from growing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Nothing loaded yet: the largest step that fits.
    Initial,
    /// The app-set budget (or grown KV cache/activations) no longer leaves the headroom.
    Budget,
    /// The JS heap went above the high-water mark.
    HeapPressure,
    /// WebGPU reported out-of-memory outside a swap.
    OutOfMemory,
    /// A swap failed (out-of-memory while allocating the new step).
    SwapFailed,
    /// The GPU device was lost: rebuild at a lower step.
    DeviceLost,
    /// Decode is slower than the app's minimum speed: a smaller step streams fewer bytes per
    /// token.
    TooSlow,
    /// Even the deepest step allowed (the last one, or the app's quality floor) does not fit:
    /// the controller stays there; the app should tell the user or free memory.
    BelowFloor,
    /// Step up: the model is below the app's new quality floor.
    QualityFloor,
    /// Step up: memory stayed free for the policy's delay.
    MemoryFree,
    /// Hold: already at step 0, the largest model.
    AtTop,
    /// Hold: the next step up does not fit the budget with headroom and up-margin.
    NoRoom,
    /// Hold: the next step up would reach a footprint that failed before.
    Ceiling,
    /// Hold: the next step up would decode slower than the minimum speed (with the margin).
    SpeedBound,
    /// Hold: the JS heap is not below the low-water mark.
    HeapBusy,
    /// Hold: a fault happened less than the cooldown ago.
    Cooldown,
    /// Hold: memory is free, but not yet for the policy's delay.
    Settling,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Initial => "initial load: the largest step that fits",
            Reason::Budget => "over the memory budget",
            Reason::HeapPressure => "JS heap above the high-water mark",
            Reason::OutOfMemory => "GPU out of memory",
            Reason::SwapFailed => "swap failed: GPU out of memory",
            Reason::DeviceLost => "GPU device lost",
            Reason::TooSlow => "decoding slower than the minimum speed",
            Reason::BelowFloor => "even the deepest step allowed does not fit the budget",
            Reason::QualityFloor => "below the app's quality floor",
            Reason::MemoryFree => "memory stayed free",
            Reason::AtTop => "at the largest step",
            Reason::NoRoom => "no room for the next step up",
            Reason::Ceiling => "the next step up failed before",
            Reason::SpeedBound => "the next step up would be slower than the minimum speed",
            Reason::HeapBusy => "JS heap not below the low-water mark",
            Reason::Cooldown => "cooling down after a failure",
            Reason::Settling => "waiting for memory to stay free",
        })
    }
}

/// The controller's answer to `decide`. Steps index the trajectory: 0 is QM(n_up), the
/// largest; the last is QM(n_low). `target()` is where the host should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    /// Stay at `step`.
    Hold { step: usize, reason: Reason },
    /// Nothing is loaded yet: load `to`.
    Load { to: usize, reason: Reason },
    /// Swap down to the smaller `to` now (possibly several steps).
    StepDown {
        from: usize,
        to: usize,
        reason: Reason,
    },
    /// Swap up to the larger `to`.
    StepUp {
        from: usize,
        to: usize,
        reason: Reason,
    },
}

impl Decision {
    /// A move from `from` to `to` as the controller would ask for it on a budget change
    /// (down: `Budget`; up: `MemoryFree`): for hosts and tests that go to a given step.
    pub fn move_to(from: usize, to: usize) -> Decision {
        if to > from {
            Decision::StepDown {
                from,
                to,
                reason: Reason::Budget,
            }
        } else {
            Decision::StepUp {
                from,
                to,
                reason: Reason::MemoryFree,
            }
        }
    }

    pub fn target(&self) -> usize {
        match *self {
            Decision::Hold { step, .. } => step,
            Decision::Load { to, .. }
            | Decision::StepDown { to, .. }
            | Decision::StepUp { to, .. } => to,
        }
    }

    pub fn reason(&self) -> Reason {
        match *self {
            Decision::Hold { reason, .. }
            | Decision::Load { reason, .. }
            | Decision::StepDown { reason, .. }
            | Decision::StepUp { reason, .. } => reason,
        }
    }

    /// Whether the host has work to do (load or swap).
    pub fn is_move(&self) -> bool {
        !matches!(self, Decision::Hold { .. })
    }
}

/// A snapshot for the UI. Byte fields are `None` where no such limit is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of steps in the trajectory.
    pub steps: usize,
    /// The step the host last reported loaded.
    pub current_step: Option<usize>,
    /// The last decision's target.
    pub target_step: Option<usize>,
    /// Model bytes of the current step.
    pub footprint_bytes: Option<u64>,
    /// KV cache and activations.
    pub overhead_bytes: u64,
    /// App-set budget.
    pub budget_bytes: Option<u64>,
    /// The heap signal's estimate of how large `footprint + overheads` may be.
    pub heap_cap_bytes: Option<u64>,
    /// Last `usedJSHeapSize / jsHeapSizeLimit`.
    pub heap_ratio: Option<f64>,
    /// min(budget, heap cap).
    pub effective_budget_bytes: Option<u64>,
    /// effective budget x (1 - headroom): what `footprint + overheads` must not exceed.
    pub usable_bytes: Option<u64>,
    /// `footprint + overheads` known to fail; steps at or above it are not used.
    pub oom_ceiling_bytes: Option<u64>,
    /// The app's minimum decode speed (tokens/s), if set.
    pub min_tok_s: Option<f64>,
    /// The last decode speed reported, and the footprint it was measured at.
    pub speed_tok_s: Option<f64>,
    /// The largest footprint expected to decode at `min_tok_s` (speed scales as bytes per
    /// token: `footprint x measured / minimum`).
    pub speed_cap_bytes: Option<u64>,
    /// The current step fits (false while a step down is due, or below the floor).
    pub fits: bool,
    /// Even the deepest step allowed (the last, or the quality floor) does not fit.
    pub below_floor: bool,
    /// The app's quality floor (the deepest step it accepts), if set.
    pub floor_step: Option<usize>,
    pub last_reason: Option<Reason>,
    /// Reason of the last move (load, down or up).
    pub last_move_reason: Option<Reason>,
    /// Completed swaps in each direction, and trajectory steps moved by them.
    pub swaps_down: u64,
    pub swaps_up: u64,
    pub steps_down: u64,
    pub steps_up: u64,
    pub ooms: u64,
    pub swap_failures: u64,
    pub device_losses: u64,
}
