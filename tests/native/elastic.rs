//! The elastic controller under scripted signal sequences with an explicit clock: a simulated
//! host asks `decide` between tokens (every 50 ms), performs every move at once (or fails it
//! where a test says so) and reports back, while the test drives budget, heap and faults.

use flexquant::runtime::{Decision, Elastic, Policy, Reason};

const MB: u64 = 1 << 20;
const TOKEN_MS: f64 = 50.0;
const OVERHEADS: u64 = 100 * MB;

/// 21 steps, 2000 MB (QM(n_up)) down to 1000 MB (QM(n_low)) in 50 MB swaps; with the
/// overheads a step costs 2100 - 50 s MB.
fn trajectory() -> Vec<u64> {
    (0..21).map(|s| (2000 - 50 * s) * MB).collect()
}

struct Host {
    ctl: Elastic,
    now: f64,
    /// Every move with the time it was decided.
    moves: Vec<(f64, Decision)>,
}

impl Host {
    fn new() -> Host {
        Host::with(Policy::default())
    }

    fn with(policy: Policy) -> Host {
        let ctl = Elastic::new(trajectory(), OVERHEADS, policy).unwrap();
        Host {
            ctl,
            now: 0.0,
            moves: Vec::new(),
        }
    }

    /// Loads the initial step at t = 0.
    fn started(mut self) -> Host {
        self.token();
        self
    }

    fn step(&self) -> usize {
        self.ctl.current().expect("a step is loaded")
    }

    fn cost(&self, step: usize) -> u64 {
        self.ctl.cost(step)
    }

    /// One token: advance the clock, ask, perform the move, report it.
    fn token(&mut self) -> Decision {
        self.now += TOKEN_MS;
        let d = self.ctl.decide(self.now);
        if d.is_move() {
            self.ctl.swapped(d.target(), self.now).unwrap();
            self.moves.push((self.now, d));
        }
        d
    }

    /// Tokens for `ms`, calling `signal(ctl, now)` before each.
    fn run(&mut self, ms: f64, mut signal: impl FnMut(&mut Elastic, f64)) -> Vec<Decision> {
        let end = self.now + ms;
        let mut out = Vec::new();
        while self.now + TOKEN_MS <= end + 1e-9 {
            signal(&mut self.ctl, self.now + TOKEN_MS);
            out.push(self.token());
        }
        out
    }

    fn ups(&self) -> Vec<(f64, usize, usize)> {
        self.moves
            .iter()
            .filter_map(|&(t, d)| match d {
                Decision::StepUp { from, to, .. } => Some((t, from, to)),
                _ => None,
            })
            .collect()
    }

    /// Sign changes between consecutive swaps (loads excluded).
    fn direction_changes(&self) -> usize {
        let dirs: Vec<bool> = self
            .moves
            .iter()
            .filter_map(|(_, d)| match d {
                Decision::StepDown { .. } => Some(false),
                Decision::StepUp { .. } => Some(true),
                _ => None,
            })
            .collect();
        dirs.windows(2).filter(|w| w[0] != w[1]).count()
    }
}

fn usable(budget: u64) -> u64 {
    (budget as f64 * (1.0 - Policy::default().headroom)).floor() as u64
}

/// Deterministic pseudo-random numbers in [0, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---- validation ----

#[test]
fn invalid_trajectories_are_rejected() {
    let err = Elastic::new(vec![], 0, Policy::default()).unwrap_err();
    assert!(err.to_string().contains("trajectory"), "{err}");
    let err = Elastic::new(vec![300, 200, 250, 100], 0, Policy::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("step 2") && msg.contains("must not increase"),
        "{msg}"
    );
    // Equal neighbours are fine: a swap may not change the byte count.
    assert!(Elastic::new(vec![300, 300, 200], 0, Policy::default()).is_ok());
}

#[test]
fn invalid_policies_are_rejected() {
    let bad = [
        Policy {
            headroom: 1.0,
            ..Policy::default()
        },
        Policy {
            headroom: 0.5,
            up_margin: 0.5,
            ..Policy::default()
        },
        Policy {
            low_water: 0.9,
            high_water: 0.8,
            ..Policy::default()
        },
        Policy {
            up_delay_ms: f64::NAN,
            ..Policy::default()
        },
        Policy {
            max_up_growth: 0.0,
            ..Policy::default()
        },
    ];
    for p in bad {
        let err = Elastic::new(trajectory(), 0, p).unwrap_err();
        assert!(err.to_string().contains("elastic policy"), "{err}");
    }
}

#[test]
fn host_reports_outside_the_trajectory_are_errors() {
    let mut ctl = Elastic::new(trajectory(), 0, Policy::default()).unwrap();
    assert!(ctl.swapped(21, 0.0).is_err());
    assert!(ctl.swap_failed(99, 0.0).is_err());
    assert_eq!(ctl.current(), None);
}

// ---- steady state ----

#[test]
fn loads_the_largest_step_that_fits() {
    let mut h = Host::new().started();
    assert_eq!(
        h.moves[0].1,
        Decision::Load {
            to: 0,
            reason: Reason::Initial
        }
    );
    assert_eq!(
        h.token(),
        Decision::Hold {
            step: 0,
            reason: Reason::AtTop
        }
    );

    let mut h = Host::new();
    h.ctl.set_budget(2000 * MB); // usable with margin: 1700 MB -> step 8
    let h = h.started();
    assert_eq!(h.step(), 8);
    assert!(h.cost(8) <= (2000.0 * 0.85) as u64 * MB);
}

/// The app's quality floor: squeezed, the controller stops at the floor step and says
/// `BelowFloor` (the budget is not met; the app decides); a floor set while the model is
/// below it brings it back up; clearing it lets the walk go deeper again.
#[test]
fn a_quality_floor_is_never_crossed() {
    let mut h = Host::new().started();
    h.ctl.set_floor(Some(8)).unwrap();
    assert!(h.ctl.set_floor(Some(21)).is_err());
    h.ctl.set_budget(1500 * MB);
    assert_eq!(
        h.token(),
        Decision::StepDown {
            from: 0,
            to: 8,
            reason: Reason::BelowFloor
        }
    );
    for _ in 0..20 {
        assert_eq!(
            h.token(),
            Decision::Hold {
                step: 8,
                reason: Reason::BelowFloor
            }
        );
    }
    let s = h.ctl.stats();
    assert!(s.below_floor && !s.fits);
    assert_eq!(s.floor_step, Some(8));

    h.ctl.set_floor(None).unwrap();
    let d = h.token();
    assert!(matches!(d, Decision::StepDown { from: 8, to, .. } if h.cost(to) <= 1500 * MB));
    let deep = h.step();
    h.ctl.set_floor(Some(5)).unwrap();
    assert_eq!(
        h.token(),
        Decision::StepUp {
            from: deep,
            to: 5,
            reason: Reason::QualityFloor
        }
    );
    assert_eq!(h.ctl.stats().floor_step, Some(5));
}

#[test]
fn budget_below_the_smallest_step_stays_at_the_floor() {
    let mut h = Host::new();
    h.ctl.set_budget(500 * MB);
    let mut h = h.started();
    assert_eq!(
        h.moves[0].1,
        Decision::Load {
            to: 20,
            reason: Reason::BelowFloor
        }
    );
    for _ in 0..100 {
        assert_eq!(
            h.token(),
            Decision::Hold {
                step: 20,
                reason: Reason::BelowFloor
            }
        );
    }
    let s = h.ctl.stats();
    assert!(s.below_floor && !s.fits);
    assert_eq!(s.last_reason, Some(Reason::BelowFloor));

    // From the top, a budget collapse goes straight to the floor in one move.
    let mut h = Host::new().started();
    h.ctl.set_budget(100 * MB);
    assert_eq!(
        h.token(),
        Decision::StepDown {
            from: 0,
            to: 20,
            reason: Reason::BelowFloor
        }
    );
}

#[test]
fn growing_context_steps_down_for_the_budget() {
    let mut h = Host::new();
    h.ctl.set_budget(2600 * MB); // usable 2340 MB: the top (2100) fits
    let mut h = h.started();
    assert_eq!(h.step(), 0);
    h.ctl.set_overheads(400 * MB); // the top now costs 2400
    let d = h.token();
    assert_eq!(
        d,
        Decision::StepDown {
            from: 0,
            to: 2,
            reason: Reason::Budget
        }
    );
    assert!(h.cost(2) <= usable(2600 * MB));
}

// ---- budget ----

#[test]
fn never_above_budget_after_a_step_down() {
    let mut h = Host::new().started();
    let mut rng = Lcg(7);
    let mut budget = 0;
    let mut downs = 0;
    for tick in 0..20_000 {
        if tick % 7 == 0 {
            budget = (600.0 + 2200.0 * rng.next()) as u64 * MB;
            h.ctl.set_budget(budget);
        }
        let d = h.token();
        if let Decision::StepDown { to, reason, .. } = d {
            downs += 1;
            if reason == Reason::BelowFloor {
                assert_eq!(to, 20);
                assert!(h.cost(20) > usable(budget));
            } else {
                assert_eq!(reason, Reason::Budget);
                assert!(h.cost(to) <= usable(budget), "{d:?} at budget {budget}");
                // ...and it went no further than needed.
                assert!(to == 0 || h.cost(to - 1) > usable(budget), "{d:?}");
            }
        }
        // Between tokens the host always runs a step that fits, or the floor.
        let s = h.ctl.stats();
        assert!(s.fits || s.below_floor, "{s:?}");
    }
    assert!(
        downs > 10,
        "the walk should have forced step downs ({downs})"
    );
}

#[test]
fn fast_oscillating_budget_moves_down_once() {
    let mut h = Host::new().started();
    // 1 s at 2600 MB (the top fits), 1 s at 1500 MB (step 15): faster than the 3 s delay.
    h.run(60_000.0, |ctl, now| {
        let high = ((now / 1000.0) as u64).is_multiple_of(2);
        ctl.set_budget(if high { 2600 } else { 1500 } * MB);
    });
    assert_eq!(h.direction_changes(), 0, "{:?}", h.moves);
    assert_eq!(h.moves.len(), 2, "{:?}", h.moves); // load, one step down
    assert_eq!(h.step(), 15);
}

#[test]
fn jittering_budget_does_not_oscillate() {
    let mut h = Host::new();
    let mut rng = Lcg(42);
    h.ctl.set_budget(2000 * MB);
    h.token();
    // +-3% around 2000 MB every 100 ms for five minutes.
    h.run(300_000.0, |ctl, now| {
        if (now as u64).is_multiple_of(100) {
            ctl.set_budget(((0.97 + 0.06 * rng.next()) * 2000.0) as u64 * MB);
        }
    });
    assert!(h.direction_changes() <= 1, "{:?}", h.moves);
    assert!(h.moves.len() <= 3, "{:?}", h.moves);
}

#[test]
fn slow_oscillating_budget_is_followed_with_bounded_moves() {
    let mut h = Host::new().started();
    // 10 s high, 10 s low, for 200 s: 10 cycles; following is right, thrashing is not.
    h.run(200_000.0, |ctl, now| {
        let high = ((now / 10_000.0) as u64).is_multiple_of(2);
        ctl.set_budget(if high { 2600 } else { 1500 } * MB);
    });
    assert!(h.direction_changes() <= 2 * 10, "{:?}", h.moves);
    let ups = h.ups();
    assert!(!ups.is_empty());
    for w in ups.windows(2) {
        // Consecutive ups are a delay apart (unless a down lies between them).
        let between = h
            .moves
            .iter()
            .any(|(t, d)| *t > w[0].0 && *t < w[1].0 && matches!(d, Decision::StepDown { .. }));
        assert!(between || w[1].0 - w[0].0 >= 3_000.0, "{w:?}");
    }
}

#[test]
fn returns_to_the_top_when_pressure_ends() {
    let policy = Policy::default();
    let mut h = Host::new();
    h.ctl.set_budget(1200 * MB);
    let mut h = h.started();
    assert_eq!(h.step(), 20);
    h.ctl.clear_budget();
    let freed = h.now;
    h.run(30_000.0, |_, _| {});
    assert_eq!(h.step(), 0);
    let ups = h.ups();
    assert!(ups.len() >= 2, "{ups:?}");
    assert!(ups[0].0 - freed >= policy.up_delay_ms, "{ups:?}");
    for w in ups.windows(2) {
        assert!(w[1].0 - w[0].0 >= policy.up_delay_ms, "{ups:?}");
    }
    for &(_, from, to) in &ups {
        let grown = h.cost(to) as f64 / h.cost(from) as f64;
        assert!(
            to + 1 == from || grown <= 1.0 + policy.max_up_growth,
            "{ups:?}"
        );
    }
    assert!(ups.last().unwrap().0 - freed <= (ups.len() as f64 + 1.0) * policy.up_delay_ms);
    let s = h.ctl.stats();
    assert_eq!((s.swaps_up, s.steps_up), (ups.len() as u64, 20));
    assert_eq!(
        h.token(),
        Decision::Hold {
            step: 0,
            reason: Reason::AtTop
        }
    );
}

#[test]
fn a_decided_step_up_is_repeated_until_done_or_unneeded() {
    let mut h = Host::new();
    h.ctl.set_budget(1500 * MB);
    let mut h = h.started();
    h.ctl.set_budget(2600 * MB);
    h.run(2_900.0, |_, _| {});
    let now = h.now + 200.0;
    let d = h.ctl.decide(now);
    // Loaded with the up-margin: 1500 MB x 0.85 -> step 17 (1250 MB).
    assert!(matches!(d, Decision::StepUp { from: 17, .. }), "{d:?}");
    assert_eq!(h.ctl.decide(now + 50.0), d);
    // The budget drops before the swap is done: the up is called off, the current step fits.
    h.ctl.set_budget(1400 * MB);
    assert_eq!(
        h.ctl.decide(now + 100.0),
        Decision::Hold {
            step: 17,
            reason: Reason::NoRoom
        }
    );
}

// ---- heap ----

const LIMIT: u64 = 4000 * MB;

/// The heap the page would report: other allocations plus the model as loaded.
fn heap_used(ctl: &Elastic, other: u64) -> u64 {
    other + ctl.current().map_or(0, |s| ctl.cost(s))
}

#[test]
fn heap_pressure_spike_steps_down_at_once_and_back_after_the_delay() {
    let policy = Policy::default();
    let mut h = Host::new().started();
    let calm = |ctl: &mut Elastic, now| ctl.heap(heap_used(ctl, 500 * MB), LIMIT, now);
    h.run(5_000.0, calm);
    assert_eq!(h.step(), 0);

    // 1 s of 2000 MB extra: ratio (2000 + 2100) / 4000 > 0.9.
    let spike_start = h.now;
    let other = 2000 * MB;
    h.ctl.heap(heap_used(&h.ctl, other), LIMIT, h.now);
    let d = h.token();
    let Decision::StepDown {
        from: 0,
        to,
        reason: Reason::HeapPressure,
    } = d
    else {
        panic!("{d:?}")
    };
    // The heap estimate is back under the high-water mark, with the headroom.
    let cap = policy.high_water * LIMIT as f64 - other as f64;
    assert!((h.cost(to) as f64) <= cap * (1.0 - policy.headroom));
    assert!(other + h.cost(to) <= (policy.high_water * LIMIT as f64) as u64);
    let during = h.run(1_000.0, |ctl, now| {
        ctl.heap(heap_used(ctl, other), LIMIT, now)
    });
    assert!(during.iter().all(|d| !d.is_move()), "{during:?}");
    assert_eq!(h.moves.len(), 2);

    let end = h.now;
    h.run(20_000.0, calm);
    assert_eq!(h.step(), 0);
    let ups = h.ups();
    assert!(
        ups[0].0 - end >= policy.up_delay_ms,
        "{ups:?} after {spike_start}"
    );
    assert_eq!(h.direction_changes(), 1);
}

#[test]
fn slow_leak_only_steps_down_and_keeps_the_heap_under_the_mark() {
    let policy = Policy::default();
    let mut h = Host::new().started();
    let mut other = 500 * MB;
    // 100 MB/s of leaked JS memory, one reading every 500 ms, for 40 s.
    let mut readings = Vec::new();
    h.run(40_000.0, |ctl, now| {
        if (now as u64).is_multiple_of(500) {
            other += 50 * MB;
            ctl.heap(heap_used(ctl, other), LIMIT, now);
            readings.push(other);
        }
    });
    assert!(h.ups().is_empty(), "{:?}", h.moves);
    assert!(h.moves.len() > 3, "{:?}", h.moves);
    let mark = (policy.high_water * LIMIT as f64) as u64;
    for &(t, d) in &h.moves[1..] {
        let Decision::StepDown { to, reason, .. } = d else {
            panic!("{d:?}")
        };
        let other_then = readings[(t / 500.0) as usize - 1];
        if reason == Reason::HeapPressure {
            assert!(other_then + h.cost(to) <= mark, "{d:?} at {t}");
        } else {
            assert_eq!((reason, to), (Reason::BelowFloor, 20));
        }
    }
    assert_eq!(h.step(), 20);
    assert!(h.ctl.stats().below_floor);
}

#[test]
fn oscillating_heap_moves_down_once_then_recovers() {
    let mut h = Host::new().started();
    // Alternating 500 ms above the high-water mark and 500 ms calm, for 30 s.
    h.run(30_000.0, |ctl, now| {
        let other = if ((now / 500.0) as u64).is_multiple_of(2) {
            2000
        } else {
            200
        } * MB;
        ctl.heap(heap_used(ctl, other), LIMIT, now);
    });
    assert_eq!(h.moves.len(), 2, "{:?}", h.moves);
    h.run(30_000.0, |ctl, now| {
        ctl.heap(heap_used(ctl, 200 * MB), LIMIT, now)
    });
    assert_eq!(h.step(), 0);
    assert_eq!(h.direction_changes(), 1);
}

#[test]
fn heap_between_the_marks_holds() {
    let mut h = Host::new();
    h.ctl.set_budget(1500 * MB);
    let mut h = h.started();
    h.ctl.clear_budget();
    assert_eq!(h.step(), 17);
    // (1700 + 1250) / 4000 = 0.74: between the marks, so nothing moves either way.
    let d = h.run(20_000.0, |ctl, now| {
        ctl.heap(heap_used(ctl, 1700 * MB), LIMIT, now)
    });
    assert!(d.iter().all(|d| *d
        == Decision::Hold {
            step: 17,
            reason: Reason::HeapBusy
        }));
}

// ---- faults ----

#[test]
fn oom_steps_down_at_least_one_step() {
    let mut h = Host::new().started();
    h.ctl.oom(h.now);
    assert_eq!(
        h.token(),
        Decision::StepDown {
            from: 0,
            to: 1,
            reason: Reason::OutOfMemory
        }
    );
    // Equal footprints: the step down skips the whole plateau.
    let mut ctl = Elastic::new(vec![1000, 900, 900, 900, 800], 10, Policy::default()).unwrap();
    ctl.swapped(1, 0.0).unwrap();
    ctl.oom(1.0);
    assert_eq!(
        ctl.decide(2.0),
        Decision::StepDown {
            from: 1,
            to: 4,
            reason: Reason::OutOfMemory
        }
    );
    assert_eq!(ctl.stats().ooms, 1);
}

#[test]
fn oom_during_a_swap_then_recovery() {
    let policy = Policy::default();
    let mut h = Host::new().started();
    h.ctl.set_budget(1500 * MB);
    h.now += TOKEN_MS;
    let d = h.ctl.decide(h.now);
    assert_eq!(
        d,
        Decision::StepDown {
            from: 0,
            to: 15,
            reason: Reason::Budget
        }
    );
    // Allocating step 15's modules fails: the host rolls back and stays at 0.
    h.ctl.swap_failed(15, h.now).unwrap();
    let fault = h.now;
    let ceiling = h.cost(15);
    let d = h.token();
    assert_eq!(
        d,
        Decision::StepDown {
            from: 0,
            to: 16,
            reason: Reason::SwapFailed
        }
    );
    assert_eq!(h.ctl.stats().oom_ceiling_bytes, Some(ceiling));

    // Pressure ends; the failed size is not reached until the ceiling clears.
    h.ctl.clear_budget();
    let d = h.run(policy.ceiling_clear_ms - 2.0 * TOKEN_MS, |_, _| {});
    assert!(d.iter().all(|d| *d
        == Decision::Hold {
            step: 16,
            reason: Reason::Ceiling
        }));
    h.run(30_000.0, |_, _| {});
    assert_eq!(h.step(), 0);
    let first_up = h.ups()[0].0;
    assert!(first_up - fault >= policy.ceiling_clear_ms + policy.up_delay_ms);
    let s = h.ctl.stats();
    assert_eq!((s.swap_failures, s.oom_ceiling_bytes), (1, None));
}

#[test]
fn failed_step_up_is_not_retried_until_the_ceiling_clears() {
    let policy = Policy::default();
    let mut h = Host::new();
    h.ctl.set_budget(1500 * MB);
    let mut h = h.started();
    h.ctl.clear_budget();
    // Run until the first step up is decided, and fail it.
    let (failed, fault) = loop {
        h.now += TOKEN_MS;
        if let Decision::StepUp { to, .. } = h.ctl.decide(h.now) {
            h.ctl.swap_failed(to, h.now).unwrap();
            break (to, h.now);
        }
    };
    let ceiling = h.cost(failed);
    let clears = fault + policy.ceiling_clear_ms;
    let mut max_cost_before = 0;
    h.run(60_000.0, |ctl, now| {
        if now < clears {
            if let Some(s) = ctl.current() {
                max_cost_before = max_cost_before.max(ctl.cost(s));
            }
        }
    });
    assert!(max_cost_before < ceiling, "{max_cost_before} vs {ceiling}");
    let ups = h.ups();
    assert!(ups[0].0 - fault >= policy.fault_cooldown_ms, "{ups:?}");
    assert!(ups
        .iter()
        .any(|&(t, _, to)| t >= clears && h.cost(to) >= ceiling));
    assert_eq!(h.step(), 0);
}

#[test]
fn repeated_faults_back_off_the_ceiling() {
    let policy = Policy::default();
    let mut h = Host::new().started();
    // Two OOMs at the same size: the second ceiling lasts twice as long.
    h.ctl.oom(h.now);
    h.token();
    h.run(policy.ceiling_clear_ms + 10_000.0, |_, _| {});
    assert_eq!(h.step(), 0);
    h.ctl.oom(h.now);
    let fault = h.now;
    h.token();
    h.run(2.0 * policy.ceiling_clear_ms + 10_000.0, |_, _| {});
    assert_eq!(h.step(), 0);
    let last_up = h.ups().last().unwrap().0;
    assert!(last_up - fault >= 2.0 * policy.ceiling_clear_ms);
}

#[test]
fn device_loss_goes_down_a_step_and_recovers() {
    let mut h = Host::new();
    h.ctl.set_budget(2400 * MB); // usable with margin 2040 -> step 2
    let mut h = h.started();
    assert_eq!(h.step(), 2);
    h.ctl.device_lost(h.now);
    // The host rebuilds at the target from its cache.
    assert_eq!(
        h.token(),
        Decision::StepDown {
            from: 2,
            to: 3,
            reason: Reason::DeviceLost
        }
    );
    let s = h.ctl.stats();
    assert_eq!((s.device_losses, s.oom_ceiling_bytes), (1, Some(h.cost(2))));
    h.run(60_000.0, |_, _| {});
    assert_eq!(h.step(), 2);

    // At the floor there is nothing lower: stay, say so, do not panic.
    let mut h = Host::new();
    h.ctl.set_budget(1000 * MB);
    let mut h = h.started();
    h.ctl.device_lost(h.now);
    assert_eq!(
        h.token(),
        Decision::Hold {
            step: 20,
            reason: Reason::BelowFloor
        }
    );
}

// ---- UI ----

#[test]
fn stats_and_decisions_serialize_for_the_ui() {
    let mut h = Host::new().started();
    h.ctl.set_budget(1500 * MB);
    h.token();
    let s = serde_json::to_value(h.ctl.stats()).unwrap();
    assert_eq!(s["current_step"], 15);
    assert_eq!(s["target_step"], 15);
    assert_eq!(s["budget_bytes"], 1500 * MB);
    assert_eq!(s["effective_budget_bytes"], 1500 * MB);
    assert_eq!(s["last_move_reason"], "budget");
    assert_eq!(s["swaps_down"], 1);
    assert_eq!(s["steps_down"], 15);
    assert_eq!(s["ooms"], 0);
    let d = serde_json::to_value(h.moves[1].1).unwrap();
    assert_eq!(
        d,
        serde_json::json!({"action": "step_down", "from": 0, "to": 15, "reason": "budget"})
    );
    let p: Policy = serde_json::from_str(r#"{"up_delay_ms": 5000}"#).unwrap();
    assert_eq!(p.up_delay_ms, 5000.0);
    assert_eq!(p.headroom, Policy::default().headroom);
    assert_eq!(
        Reason::BelowFloor.to_string(),
        "even the deepest step allowed does not fit the budget"
    );
}

// ---- speed: compute as a second elastic resource ----

/// A machine whose decode streams `gbs` GB/s of weights: tokens/s at `step` (plus noise).
fn speed_at(ctl: &Elastic, step: usize, gbs: f64, noise: f64) -> f64 {
    gbs * 1e9 / ctl.footprint(step) as f64 * (1.0 + noise)
}

#[test]
fn too_slow_steps_down_until_fast_enough_and_back_up_when_the_machine_frees() {
    let mut h = Host::new().started();
    assert_eq!(h.step(), 0);
    // 20 GB/s over 2000 MB at step 0: ~9.5 tokens/s; the app wants 12.
    h.ctl.set_min_speed(Some(12.0), h.now).unwrap();
    let mut rng = Lcg(7);
    let mut gbs = 20.0;
    h.run(3_000.0, |ctl, now| {
        let s = ctl.current().unwrap();
        ctl.speed(speed_at(ctl, s, gbs, 0.02 * (rng.next() - 0.5)), now)
    });
    let s = h.step();
    assert!(s > 0, "stepped down for speed");
    let speed = speed_at(&h.ctl, s, gbs, 0.0);
    assert!(speed >= 12.0 * 0.99, "{speed} tokens/s at step {s}");
    assert!(
        speed_at(&h.ctl, s - 2, gbs, 0.0) < 12.0,
        "not further down than needed: step {s}"
    );
    let down = h
        .moves
        .iter()
        .filter(|(_, d)| matches!(d, Decision::StepDown { .. }))
        .count();
    assert!(down <= 2, "{down} moves down: {:?}", h.moves);
    assert_eq!(h.ctl.stats().last_move_reason, Some(Reason::TooSlow));
    // Noise of a few percent does not move it again (the up-margin is the hysteresis).
    let before = h.moves.len();
    h.run(10_000.0, |ctl, now| {
        let s = ctl.current().unwrap();
        ctl.speed(speed_at(ctl, s, gbs, 0.04 * (rng.next() - 0.5)), now)
    });
    assert_eq!(h.moves.len(), before, "{:?}", &h.moves[before..]);
    assert_eq!(h.ctl.decide(h.now).reason(), Reason::SpeedBound);
    // The machine frees up (another tab stopped): back to the top after the delay.
    gbs = 40.0;
    h.run(10_000.0, |ctl, now| {
        let s = ctl.current().unwrap();
        ctl.speed(speed_at(ctl, s, gbs, 0.0), now)
    });
    assert_eq!(h.step(), 0, "{:?}", h.moves);
    // The memory budget still binds: a budget below step 0 holds it down whatever the speed.
    h.ctl.set_budget(usable_inverse(h.cost(5)));
    h.run(500.0, |ctl, now| {
        let s = ctl.current().unwrap();
        ctl.speed(speed_at(ctl, s, gbs, 0.0), now)
    });
    assert_eq!(h.step(), 5);
    assert_eq!(h.ctl.stats().last_move_reason, Some(Reason::Budget));
    // No minimum: speed readings change nothing.
    h.ctl.set_min_speed(None, h.now).unwrap();
    assert!(h.ctl.set_min_speed(Some(-1.0), h.now).is_err());
    assert!(h.ctl.set_min_speed(Some(f64::NAN), h.now).is_err());
}

/// The smallest budget under which a step of cost `cost` fits.
fn usable_inverse(cost: u64) -> u64 {
    (cost as f64 / (1.0 - Policy::default().headroom)).ceil() as u64 + 1
}
