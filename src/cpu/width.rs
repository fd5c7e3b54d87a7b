//! How many of the pool's threads a decode token uses: the faster count, measured now and then.
//!
//! More threads are not always faster. With another process keeping one of 2 cores busy, a
//! 2-thread engine decoded at 0.65x one thread (a worker spinning between the matrix products
//! takes CPU share from the engine's own thread). Which count is faster depends on what else
//! the machine runs, which changes while the engine runs, so it is measured: a *probe* times
//! [`PROBE_TOKENS`] tokens at each candidate count (all threads, all but one, half, a quarter,
//! ... one), then the fastest is used until the next probe. All but one is there for the
//! common case of one busy core on a machine with many: a pool that shares a core with another
//! process waits for that core's thread at every product, and half the threads leaves most
//! of the free cores idle. Below the fastest count, fewer threads only get slower: a probe
//! stops going down once a count is [`PRUNE`] times slower than the fastest so far. Probes
//! come after an interval that doubles while they keep confirming the choice, and at once
//! when the chosen count's tokens get [`DRIFT`] times slower than when it was chosen (load
//! arrived). Each row is computed by one thread whatever the count, so the answer does not
//! depend on it; only time does.

/// Tokens timed per candidate in a probe.
pub const PROBE_TOKENS: usize = 2;
/// Tokens between probes after a probe changed the choice (the interval then doubles).
const FIRST_INTERVAL: usize = 32;
/// Most tokens between probes while all threads are chosen (load arriving shows as drift).
const MAX_INTERVAL_ALL: usize = 512;
/// Most tokens between probes while fewer are chosen (load leaving shows only in a probe).
const MAX_INTERVAL_FEWER: usize = 128;
/// Chosen-count tokens this much slower than at the choice start a probe at once.
pub const DRIFT: f64 = 1.3;
/// Tokens whose median is compared with the reference for drift.
const RECENT: usize = 4;
/// Another count replaces the chosen one only when this much faster (noise is not a reason
/// to move).
const HYSTERESIS: f64 = 0.9;
/// A probe skips the counts below one that was already this much slower than the fastest
/// so far, and below it (fewer threads only get slower there; on 8 cores a one-thread token
/// costs ~8 tokens' time, and probing it every 128 tokens cost ~10% of the decode).
const PRUNE: f64 = 1.5;

/// The thread-count choice of one pool.
#[derive(Debug, Clone)]
pub struct Width {
    /// Thread counts tried, most first: `max`, `max - 1`, `max / 2`, `max / 4`, ..., 1.
    candidates: Vec<usize>,
    /// Index of the chosen count in `candidates`.
    chosen: usize,
    /// Token time (ms) of the chosen count when it was chosen, lowered when it gets faster.
    reference: f64,
    recent: Vec<f64>,
    since_probe: usize,
    interval: usize,
    /// The probe under way: the candidate now timed and every candidate's times so far.
    probe: Option<(usize, Vec<Vec<f64>>)>,
    probes: u64,
}

impl Width {
    /// A choice among 1..=`max` threads; the first tokens probe.
    pub fn new(max: usize) -> Width {
        let max = max.max(1);
        let mut candidates = vec![max];
        if max > 2 {
            candidates.push(max - 1);
        }
        let mut half = max / 2;
        while half >= 1 {
            if half < *candidates.last().unwrap() {
                candidates.push(half);
            }
            half /= 2;
        }
        let n = candidates.len();
        Width {
            candidates,
            chosen: 0,
            reference: f64::INFINITY,
            recent: Vec::new(),
            since_probe: 0,
            interval: FIRST_INTERVAL,
            probe: (n > 1).then(|| (0, vec![Vec::new(); n])),
            probes: 0,
        }
    }

    /// Threads the next token runs on.
    pub fn threads(&self) -> usize {
        match &self.probe {
            Some((at, _)) => self.candidates[*at],
            None => self.candidates[self.chosen],
        }
    }

    /// The count chosen by the last probe (what runs between probes).
    pub fn chosen(&self) -> usize {
        self.candidates[self.chosen]
    }

    /// Probes finished so far.
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// The token just run on `threads()` threads took `ms`.
    pub fn record(&mut self, ms: f64) {
        if let Some((at, times)) = &mut self.probe {
            times[*at].push(ms);
            if times[*at].len() == PROBE_TOKENS {
                // The chosen count first (its time now is the fair comparison), then the rest.
                *at = next_candidate(times).unwrap_or(usize::MAX);
                if *at == usize::MAX {
                    let times = std::mem::take(times);
                    self.finish_probe(&times);
                }
            }
            return;
        }
        if self.candidates.len() == 1 {
            return;
        }
        self.since_probe += 1;
        self.recent.push(ms);
        if self.recent.len() > RECENT {
            self.recent.remove(0);
        }
        let now = (self.recent.len() == RECENT).then(|| median(&self.recent));
        if self.since_probe >= self.interval || now.is_some_and(|t| t > self.reference * DRIFT) {
            self.start_probe();
        } else if let Some(t) = now {
            self.reference = self.reference.min(t);
        }
    }

    fn start_probe(&mut self) {
        let n = self.candidates.len();
        self.probe = Some((self.chosen, vec![Vec::new(); n]));
    }

    fn finish_probe(&mut self, times: &[Vec<f64>]) {
        let mean = |i: usize| mean(&times[i]);
        let best = (0..times.len())
            .filter(|&i| !times[i].is_empty())
            .min_by(|&a, &b| mean(a).total_cmp(&mean(b)))
            .unwrap_or(self.chosen);
        let confirmed = best == self.chosen || mean(best) > mean(self.chosen) * HYSTERESIS;
        let max = if confirmed { self.chosen } else { best };
        let cap = if max == 0 {
            MAX_INTERVAL_ALL
        } else {
            MAX_INTERVAL_FEWER
        };
        self.interval = if confirmed {
            (self.interval * 2).min(cap)
        } else {
            FIRST_INTERVAL
        };
        self.chosen = max;
        self.reference = mean(max);
        self.recent.clear();
        self.since_probe = 0;
        self.probe = None;
        self.probes += 1;
    }
}

/// The next candidate a probe times (indices run from most threads to fewest), or `None` when
/// it is over: the first not yet timed, except those below a count that was already [`PRUNE`]
/// times slower than the fastest so far and had fewer threads than it.
fn next_candidate(times: &[Vec<f64>]) -> Option<usize> {
    let done = |i: usize| times[i].len() == PROBE_TOKENS;
    let best = (0..times.len())
        .filter(|&i| done(i))
        .min_by(|&a, &b| mean(&times[a]).total_cmp(&mean(&times[b])))?;
    let slow = |j: usize| done(j) && j > best && mean(&times[j]) > mean(&times[best]) * PRUNE;
    (0..times.len()).find(|&i| !done(i) && !(best + 1..i).any(slow))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `tokens` tokens whose time on `t` threads is `cost(token, t)`; returns the total
    /// time and the threads each token ran on.
    fn run(
        w: &mut Width,
        tokens: std::ops::Range<usize>,
        cost: impl Fn(usize, usize) -> f64,
    ) -> (f64, Vec<usize>) {
        let (mut total, mut on) = (0.0, Vec::new());
        for i in tokens {
            let t = w.threads();
            let ms = cost(i, t);
            w.record(ms);
            total += ms;
            on.push(t);
        }
        (total, on)
    }

    /// This machine's figures (ms per token): idle 2 threads 15, one 22.4; with one core busy,
    /// 2 threads 38.8, one 25.3.
    fn idle(_: usize, t: usize) -> f64 {
        if t == 2 {
            15.0
        } else {
            22.4
        }
    }
    fn busy(_: usize, t: usize) -> f64 {
        if t == 2 {
            38.8
        } else {
            25.3
        }
    }

    #[test]
    fn candidates_are_all_all_but_one_then_halves_down_to_one() {
        assert_eq!(Width::new(16).candidates, vec![16, 15, 8, 4, 2, 1]);
        assert_eq!(Width::new(8).candidates, vec![8, 7, 4, 2, 1]);
        assert_eq!(Width::new(6).candidates, vec![6, 5, 3, 1]);
        assert_eq!(Width::new(4).candidates, vec![4, 3, 2, 1]);
        assert_eq!(Width::new(3).candidates, vec![3, 2, 1]);
        assert_eq!(Width::new(2).candidates, vec![2, 1]);
        let mut one = Width::new(1);
        assert_eq!(one.threads(), 1);
        one.record(10.0);
        assert_eq!((one.threads(), one.probes()), (1, 0));
    }

    #[test]
    fn idle_keeps_every_thread_and_probes_rarely() {
        let mut w = Width::new(2);
        let (total, on) = run(&mut w, 0..2000, idle);
        assert_eq!(w.chosen(), 2);
        let fewer = on.iter().filter(|&&t| t == 1).count();
        // Probes at 0, 32, 64, 128, 256, 512, then every 512 tokens: one-thread tokens only there.
        assert!(fewer <= 9 * PROBE_TOKENS, "{fewer} one-thread tokens");
        assert!(total / (2000.0 * 15.0) < 1.01, "{}", total / 30000.0);
    }

    #[test]
    fn one_busy_core_moves_to_one_thread_within_a_probe() {
        let mut w = Width::new(2);
        let (_, on) = run(&mut w, 0..1000, busy);
        assert!(on[2 * PROBE_TOKENS..].iter().filter(|&&t| t == 2).count() <= 8 * PROBE_TOKENS);
        let (total, _) = run(&mut w, 1000..2000, busy);
        // Probes of 2 threads every 128 tokens at most cost a few percent against one thread.
        assert!(total / (1000.0 * 25.3) < 1.03, "{}", total / 25300.0);
    }

    /// 8 cores, one kept busy by another process: a token's work `W` spread over `t`
    /// threads, where on all 8 one thread shares its core and every product waits for it (the
    /// 2-core figures above: 2.6x the 2-thread time).
    fn busy_of_eight(_: usize, t: usize) -> f64 {
        let w = 160.0;
        if t == 8 {
            w / 8.0 * 2.6
        } else {
            w / t as f64
        }
    }

    #[test]
    fn one_busy_core_of_eight_leaves_out_only_that_one() {
        let mut w = Width::new(8);
        run(&mut w, 0..200, busy_of_eight);
        assert_eq!(w.chosen(), 7);
        // Against the halving candidates alone (4 threads): 7 is 1.75x faster here.
        let (total, _) = run(&mut w, 200..1200, busy_of_eight);
        assert!(
            total / (1000.0 * 160.0 / 7.0) < 1.05,
            "{}",
            total / (1000.0 * 160.0 / 7.0)
        );
        // Idle, all 8 are faster again: found by the next probe.
        run(
            &mut w,
            1200..1200 + MAX_INTERVAL_FEWER + 5 * PROBE_TOKENS,
            |_, t| 160.0 / t as f64,
        );
        assert_eq!(w.chosen(), 8);
    }

    #[test]
    fn on_eight_idle_cores_probes_skip_the_slow_small_counts() {
        let mut w = Width::new(8);
        let (total, on) = run(&mut w, 0..3000, |_, t| 160.0 / t as f64);
        assert_eq!(w.chosen(), 8);
        // 4 threads were 2x slower than 8: 2 and 1 are never timed.
        assert!(
            on.iter().all(|&t| t >= 4),
            "{:?}",
            on.iter().filter(|&&t| t < 4).count()
        );
        assert!(total / (3000.0 * 20.0) < 1.01, "{}", total / 60000.0);
    }

    #[test]
    fn half_the_cores_busy_finds_half_the_threads_past_a_plateau() {
        // 8 cores, 4 kept busy: 8 and 7 threads both wait for threads sharing cores.
        let cost = |_: usize, t: usize| if t > 4 { 52.0 } else { 160.0 / t as f64 };
        let mut w = Width::new(8);
        run(&mut w, 0..100, cost);
        assert_eq!(w.chosen(), 4);
    }

    #[test]
    fn follows_load_arriving_and_leaving() {
        let mut w = Width::new(2);
        let load = |i: usize, t: usize| {
            if (500..1500).contains(&i) {
                busy(i, t)
            } else {
                idle(i, t)
            }
        };
        run(&mut w, 0..500, load);
        assert_eq!(w.chosen(), 2);
        // Arriving: the 2-thread tokens drift past `DRIFT` within `RECENT` tokens.
        run(&mut w, 500..500 + RECENT + 2 * PROBE_TOKENS, load);
        assert_eq!(w.chosen(), 1);
        run(&mut w, 510..1500, load);
        assert_eq!(w.chosen(), 1);
        // Leaving: found by the next probe, at most `MAX_INTERVAL_FEWER` tokens on.
        run(
            &mut w,
            1500..1500 + MAX_INTERVAL_FEWER + 2 * PROBE_TOKENS,
            load,
        );
        assert_eq!(w.chosen(), 2);
    }

    #[test]
    fn a_slowly_growing_context_does_not_move_it() {
        // Tokens get slower as the context grows (attention), on both counts alike.
        let mut w = Width::new(4);
        let grow = |i: usize, t: usize| (1.0 + i as f64 / 1000.0) * 40.0 / (t as f64).sqrt();
        let (_, on) = run(&mut w, 0..3000, grow);
        assert_eq!(w.chosen(), 4);
        let fewer = on.iter().filter(|&&t| t < 4).count();
        assert!(fewer < 60, "{fewer} tokens on fewer threads");
    }

    #[test]
    fn noise_alone_does_not_move_it() {
        // Two counts within 3% of each other, tokens jittering by +-10%: the choice may start
        // either way but stays put once made.
        let mut w = Width::new(2);
        let mut seed = 7u64;
        let mut jitter = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            0.9 + 0.2 * (seed >> 40) as f64 / (1u64 << 24) as f64
        };
        let mut changes = 0;
        let mut last = w.chosen();
        for i in 0..3000 {
            let t = w.threads();
            let base = if t == 2 { 20.0 } else { 20.5 };
            let _ = i;
            w.record(base * jitter());
            if w.chosen() != last {
                changes += 1;
                last = w.chosen();
            }
        }
        assert!(changes <= 4, "{changes} changes");
    }
}
