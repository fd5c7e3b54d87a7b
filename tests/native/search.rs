//! The tree search and pruning on a synthetic model whose damage is known exactly.

use flexquant::build::prune::{intermediate_versions, prune, usage};
use flexquant::build::search::{search, Available, Evaluator, Move, SearchOptions};
use flexquant::quant::eqm::Eqm;
use flexquant::Result;

/// Modules of three sizes; damage of module m at b bits is `c_m * 2^(n_up - b)`, so the true
/// best order is known: lowest damage per byte saved first. `additive` is another model.
struct Synthetic {
    size: Vec<u64>,
    c: Vec<f64>,
    /// Damages that add: small modules (1,000 bytes at 8 bits) and large ones (8,000), where
    /// a large module costs less per byte saved but more in absolute ppl, in both stages of
    /// 4 -> 2.
    additive: bool,
    evals: usize,
}

impl Synthetic {
    fn new(n: usize) -> Self {
        Synthetic {
            size: (0..n).map(|m| [1000, 4000, 8000][m % 3]).collect(),
            c: (0..n)
                .map(|m| 0.001 * (1 + (m * 7919) % 13) as f64)
                .collect(),
            additive: false,
            evals: 0,
        }
    }
    fn additive(n: usize) -> Self {
        Synthetic {
            size: (0..n).map(|m| [1000, 8000][m % 2]).collect(),
            c: vec![],
            additive: true,
            evals: 0,
        }
    }
    fn damage(&self, m: usize, b: u32) -> f64 {
        if !self.additive {
            return self.c[m] * ((1u32 << (8 - b)) - 1) as f64;
        }
        let (d3, d2) = if self.size[m] > 1000 {
            (0.16, 1.6)
        } else {
            (0.03, 0.3)
        };
        match b {
            4 => 0.0,
            3 => d3,
            _ => d3 + d2,
        }
    }
    fn ppl(&self, e: &Eqm) -> f64 {
        let d = e.bits.iter().enumerate().map(|(m, &b)| self.damage(m, b));
        if self.additive {
            10.0 + d.sum::<f64>()
        } else {
            10.0 * d.map(|x| 1.0 + x).product::<f64>()
        }
    }
}

impl Evaluator for Synthetic {
    fn bytes(&self, m: usize, bits: u32) -> u64 {
        self.size[m] * bits as u64 / 8
    }
    fn sensitivity(&mut self, e: &Eqm, moves: &[Move]) -> Result<Vec<f64>> {
        Ok(moves
            .iter()
            .map(|mv| {
                let d = self.damage(mv.module, mv.to) - self.damage(mv.module, e.bits[mv.module]);
                d / (self.bytes(mv.module, mv.from) - self.bytes(mv.module, mv.to)) as f64
            })
            .collect())
    }
    fn calib_ppl(&mut self, eqms: &[Eqm]) -> Result<Vec<f64>> {
        self.evals += eqms.len();
        Ok(eqms.iter().map(|e| self.ppl(e)).collect())
    }
}

fn check_trajectory(t: &flexquant::build::search::Trajectory, avail: &Available) {
    let mut e = avail.start();
    assert!(t.steps[0].swap.is_none());
    for w in t.steps.windows(2) {
        assert!(
            w[1].footprint < w[0].footprint,
            "footprint must fall every step"
        );
    }
    for s in &t.steps[1..] {
        let mv = s.swap.unwrap();
        assert_eq!(e.bits[mv.module], mv.from);
        assert!(mv.to < mv.from, "one-way");
        assert!(avail.bits[mv.module].contains(&mv.to));
        e.bits[mv.module] = mv.to;
    }
    assert_eq!(e, avail.end());
    assert_eq!(t.steps.len(), avail.steps() + 1);
}

#[test]
fn search_orders_swaps_and_ends_at_n_low() {
    let n = 12;
    let avail = Available::uniform(n, &[8, 6, 5, 4, 3, 2]);
    for (branch, stem) in [(1, 1), (3, 1), (3, 2), (4, 4)] {
        let mut ev = Synthetic::new(n);
        let opts = SearchOptions {
            branch,
            stem,
            record_every: 1,
            staged: false,
            lazy: false,
            slope: Default::default(),
            floor_damage: false,
            ties: Default::default(),
        };
        let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
        check_trajectory(&t, &avail);
        assert_eq!(t.evaluations, ev.evals);
        // The curve stays at or below the straight line between its end points (convex-ish):
        // the search takes cheap swaps first.
        let (f0, p0) = (t.steps[0].footprint as f64, t.steps[0].calib_ppl);
        let last = t.steps.last().unwrap();
        let (f1, p1) = (last.footprint as f64, last.calib_ppl);
        for s in &t.steps {
            let line = p0 + (p1 - p0) * (f0 - s.footprint as f64) / (f0 - f1);
            assert!(
                s.calib_ppl <= line + 1e-9,
                "branch {branch} stem {stem}: above the chord"
            );
        }
        eprintln!(
            "branch {branch} stem {stem}: {} evaluations, final ppl {:.3}",
            t.evaluations, p1
        );
    }
}

#[test]
fn pruning_drops_versions_and_search_jumps() {
    let n = 12;
    let avail = Available::uniform(n, &[8, 6, 5, 4, 3, 2]);
    let mut ev = Synthetic::new(n);
    let opts = SearchOptions {
        branch: 3,
        stem: 1,
        record_every: 1,
        staged: false,
        lazy: false,
        slope: Default::default(),
        floor_damage: false,
        ties: Default::default(),
    };
    let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
    let u = usage(&t, &avail.start(), &avail);
    assert_eq!(u.len(), n * 4);
    let total: usize = intermediate_versions(&avail);
    for rate in [0.0, 0.25, 0.5, 0.75] {
        let pruned = prune(&avail, &t, &avail.start(), rate).unwrap();
        let kept = intermediate_versions(&pruned);
        assert_eq!(kept, total - (rate * total as f64).floor() as usize);
        assert!(pruned
            .bits
            .iter()
            .all(|b| b[0] == 8 && *b.last().unwrap() == 2));
        let mut ev = Synthetic::new(n);
        let t2 = search(&mut ev, &pruned, 500, opts, |_, _, _| {}).unwrap();
        check_trajectory(&t2, &pruned);
        if rate > 0.0 {
            assert!(t2.steps.iter().any(|s| s
                .swap
                .is_some_and(|m| m.from - m.to > 1 && !(m.from == 8 && m.to == 6))));
        }
    }
    assert!(prune(&avail, &t, &avail.start(), 1.0).is_err());
    assert!(prune(&avail, &t, &avail.start(), -0.1).is_err());
}

#[test]
fn bad_options_are_rejected() {
    let avail = Available::uniform(3, &[4, 3, 2]);
    let mut ev = Synthetic::new(3);
    for (b, s) in [(0, 1), (1, 0)] {
        let e = search(
            &mut ev,
            &avail,
            0,
            SearchOptions {
                branch: b,
                stem: s,
                record_every: 1,
                staged: false,
                lazy: false,
                slope: Default::default(),
                floor_damage: false,
                ties: Default::default(),
            },
            |_, _, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("must both be at least 1"));
    }
}

#[test]
fn staged_search_passes_through_every_static_qm() {
    let n = 12;
    let ladder = [8, 6, 5, 4, 3, 2];
    let avail = Available::uniform(n, &ladder);
    for (branch, stem) in [(1, 1), (3, 2)] {
        let mut ev = Synthetic::new(n);
        let opts = SearchOptions {
            branch,
            stem,
            record_every: 1,
            staged: true,
            lazy: false,
            slope: Default::default(),
            floor_damage: false,
            ties: Default::default(),
        };
        let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
        check_trajectory(&t, &avail);
        let eqms = t.eqms(&avail.start());
        for b in ladder {
            let at = eqms.iter().position(|e| *e == Eqm::uniform(n, b));
            let level = ladder.iter().position(|&x| x == b).unwrap();
            assert_eq!(
                at,
                Some(level * n),
                "QM({b}) is step {} of the trajectory",
                level * n
            );
        }
    }
    // Pruned: a module without its 3-bit version waits at 4 bits until the floor reaches 2.
    let mut pruned = avail.clone();
    pruned.bits[0].retain(|&b| b != 3);
    let opts = SearchOptions {
        branch: 2,
        stem: 1,
        record_every: 1,
        staged: true,
        lazy: false,
        slope: Default::default(),
        floor_damage: false,
        ties: Default::default(),
    };
    let t = search(&mut Synthetic::new(n), &pruned, 500, opts, |_, _, _| {}).unwrap();
    check_trajectory(&t, &pruned);
    let jump = t
        .steps
        .iter()
        .position(|s| s.swap.is_some_and(|m| m.module == 0 && m.to == 2))
        .unwrap();
    let eqms = t.eqms(&pruned.start());
    assert!(eqms[jump - 1].bits[1..].iter().all(|&b| b <= 3));
    assert!(eqms[..jump].iter().all(|e| e.bits[0] >= 4));
}

/// Lazy scoring: every chosen step's ppl is a real measurement, the trajectory is as good as
/// the exact search's (area under the curve within 0.5%), for far fewer measurements.
#[test]
fn lazy_search_measures_less_and_keeps_the_curve() {
    let n = 24;
    let avail = Available::uniform(n, &[8, 6, 5, 4, 3, 2]);
    for (branch, stem, staged) in [(3, 1, true), (3, 1, false), (4, 2, true)] {
        let run = |lazy: bool| {
            let mut ev = Synthetic::new(n);
            let opts = SearchOptions {
                branch,
                stem,
                record_every: 1,
                staged,
                lazy,
                slope: Default::default(),
                floor_damage: false,
                ties: Default::default(),
            };
            let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
            check_trajectory(&t, &avail);
            assert_eq!(t.evaluations, ev.evals);
            let eqms = t.eqms(&avail.start());
            for (s, e) in t.steps.iter().zip(&eqms) {
                assert_eq!(
                    s.calib_ppl,
                    ev.ppl(e),
                    "a recorded ppl is not a measurement"
                );
            }
            let area: f64 = t
                .steps
                .windows(2)
                .map(|w| {
                    (w[0].footprint - w[1].footprint) as f64 * (w[0].calib_ppl + w[1].calib_ppl)
                })
                .sum();
            (t.evaluations, area)
        };
        let (exact_evals, exact_area) = run(false);
        let (lazy_evals, lazy_area) = run(true);
        eprintln!(
            "branch {branch} stem {stem} staged {staged}: exact {exact_evals} evaluations, \
             lazy {lazy_evals}; area ratio {:.5}",
            lazy_area / exact_area
        );
        assert!(
            (lazy_evals as f64) < 0.75 * exact_evals as f64,
            "lazy {lazy_evals} vs exact {exact_evals}"
        );
        assert!(
            lazy_area <= exact_area * 1.005,
            "{lazy_area} vs {exact_area}"
        );
    }
}

/// Marginal slopes trace the lower convex hull: in a staged search every step lies at or below
/// the chord between the static QMs around it. Ranking by the slope from QM(n_up) does not:
/// early in a stage, where the slope so far is the gentler one of the stage before, it ranks by
/// absolute damage and takes the small modules first.
#[test]
fn marginal_slope_keeps_every_step_below_the_static_chord() {
    use flexquant::build::search::Slope;
    let n = 12;
    let ladder = [4, 3, 2];
    let avail = Available::uniform(n, &ladder);
    let above = |slope: Slope, lazy: bool| {
        let mut ev = Synthetic::additive(n);
        let opts = SearchOptions {
            branch: 3,
            stem: 1,
            record_every: 1,
            staged: true,
            lazy,
            slope,
            floor_damage: false,
            ties: Default::default(),
        };
        let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
        check_trajectory(&t, &avail);
        // Static QM(b) is step level * n (staged); the chord joins consecutive ones.
        let mut above = 0;
        for level in 0..ladder.len() - 1 {
            let (a, b) = (&t.steps[level * n], &t.steps[(level + 1) * n]);
            for s in &t.steps[level * n..(level + 1) * n] {
                let x = (a.footprint - s.footprint) as f64 / (a.footprint - b.footprint) as f64;
                if s.calib_ppl > a.calib_ppl + x * (b.calib_ppl - a.calib_ppl) + 1e-9 {
                    above += 1;
                }
            }
        }
        above
    };
    for lazy in [false, true] {
        assert_eq!(above(Slope::Marginal, lazy), 0, "lazy {lazy}");
    }
    let from_start = above(Slope::FromStart, false);
    eprintln!("from-start: {from_start} steps above the static chord");
    assert!(
        from_start > 0,
        "the additive model no longer tells the two apart"
    );
}

/// The defaults' search (staged, lazy, marginal slope; branch 3, stem 1, every step
/// recorded) with `floor_damage` and `ties` as given.
fn staged_marginal(floor_damage: bool, ties: flexquant::build::search::Ties) -> SearchOptions {
    SearchOptions {
        branch: 3,
        stem: 1,
        record_every: 1,
        staged: true,
        lazy: true,
        slope: flexquant::build::search::Slope::Marginal,
        floor_damage,
        ties,
    }
}

/// Points of a `(footprint, ppl)` curve strictly above the straight line from its first point
/// to its last.
fn above_end_chord(curve: &[(u64, f64)]) -> usize {
    let ((f0, p0), (f1, p1)) = (curve[0], *curve.last().unwrap());
    curve
        .iter()
        .filter(|(f, p)| *p > p0 + (p1 - p0) * (f0 - f) as f64 / (f0 - f1) as f64 + 1e-9)
        .count()
}

/// A model whose calibration text flatters some swaps: the measured damage of a swap is its
/// true damage plus a gain for every large module and every other small one, as fitting a few
/// calibration tokens does. Ranked as measured, the small modules' gains, divided by few
/// bytes, go first, and the true curve (the held-out text's, here) rises above the static
/// chord; counted as no damage (`floor_damage`), the gains tie and the larger savings go first,
/// and the true curve stays at or below it.
#[test]
fn calibration_gains_count_as_no_damage_so_larger_savings_go_first() {
    struct Flattered {
        inner: Synthetic,
    }
    impl Flattered {
        fn gain(m: usize) -> f64 {
            match (m % 2, m % 4) {
                (1, _) => 0.2,
                (_, 0) => 0.05,
                _ => 0.0,
            }
        }
        fn measured(&self, e: &Eqm) -> f64 {
            let gains: f64 = (0..e.bits.len())
                .filter(|&m| e.bits[m] < 4)
                .map(Self::gain)
                .sum();
            self.inner.ppl(e) - gains
        }
    }
    impl Evaluator for Flattered {
        fn bytes(&self, m: usize, bits: u32) -> u64 {
            self.inner.bytes(m, bits)
        }
        fn sensitivity(&mut self, e: &Eqm, moves: &[Move]) -> Result<Vec<f64>> {
            Ok(moves
                .iter()
                .map(|mv| {
                    let mut after = e.clone();
                    after.bits[mv.module] = mv.to;
                    let saved = self.bytes(mv.module, mv.from) - self.bytes(mv.module, mv.to);
                    (self.measured(&after) - self.measured(e)) / saved as f64
                })
                .collect())
        }
        fn calib_ppl(&mut self, eqms: &[Eqm]) -> Result<Vec<f64>> {
            Ok(eqms.iter().map(|e| self.measured(e)).collect())
        }
    }
    let n = 12;
    let avail = Available::uniform(n, &[4, 3]);
    let above_true_chord = |floor_damage: bool| {
        let mut ev = Flattered {
            inner: Synthetic::additive(n),
        };
        let opts = staged_marginal(floor_damage, Default::default());
        let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
        check_trajectory(&t, &avail);
        let mut e = avail.start();
        let truth: Vec<(u64, f64)> = t
            .steps
            .iter()
            .map(|s| {
                if let Some(mv) = s.swap {
                    e.bits[mv.module] = mv.to;
                }
                (s.footprint, ev.inner.ppl(&e))
            })
            .collect();
        above_end_chord(&truth)
    };
    let as_measured = above_true_chord(false);
    assert!(
        as_measured > 0,
        "the flattered model no longer shows the effect"
    );
    assert_eq!(
        above_true_chord(true),
        0,
        "as measured: {as_measured} above"
    );
}

/// Where the calibration tokens see no damage at all (every swap ties at zero, as about half of
/// the 8 -> 6 and 6 -> 5 swaps do on the demo model), the order of the ties is the curve:
/// larger savings first puts the large modules first, and when those cost more per byte the
/// true curve rises above the static chord; ordered by a quieter per-byte estimate
/// (`Ties::OutputError`, the quantizer's output error), the cheaper small modules go first and
/// it stays at or below the chord.
#[test]
fn ties_ordered_by_output_error_keep_a_blind_calibration_below_the_chord() {
    use flexquant::build::search::Ties;
    /// Small modules (1,000 bytes at 8 bits) cost 0.01 ppl for 125 bytes saved, large ones
    /// (8,000) 0.16 for 1,000: twice as much per byte. The calibration ppl never moves.
    struct Blind {
        size: Vec<u64>,
    }
    impl Blind {
        fn damage(&self, m: usize, b: u32) -> f64 {
            match (b, self.size[m] > 1000) {
                (4, _) => 0.0,
                (_, true) => 0.16,
                (_, false) => 0.01,
            }
        }
        fn truth(&self, e: &Eqm) -> f64 {
            10.0 + (0..e.bits.len())
                .map(|m| self.damage(m, e.bits[m]))
                .sum::<f64>()
        }
    }
    impl Evaluator for Blind {
        fn bytes(&self, m: usize, bits: u32) -> u64 {
            self.size[m] * bits as u64 / 8
        }
        fn sensitivity(&mut self, _: &Eqm, moves: &[Move]) -> Result<Vec<f64>> {
            Ok(vec![0.0; moves.len()])
        }
        fn calib_ppl(&mut self, eqms: &[Eqm]) -> Result<Vec<f64>> {
            Ok(vec![10.0; eqms.len()])
        }
        /// The true damage per byte, off by up to 30% (a proxy, not the truth).
        fn tie_key(&self, mv: &Move) -> f64 {
            let saved = self.bytes(mv.module, mv.from) - self.bytes(mv.module, mv.to);
            let off = 1.0 + 0.1 * (mv.module % 4) as f64;
            self.damage(mv.module, mv.to) / saved as f64 * off
        }
    }
    let n = 12;
    let avail = Available::uniform(n, &[4, 3]);
    let above_true_chord = |ties: Ties| {
        let mut ev = Blind {
            size: (0..n).map(|m| [1000, 8000][m % 2]).collect(),
        };
        let opts = staged_marginal(true, ties);
        let t = search(&mut ev, &avail, 500, opts, |_, _, _| {}).unwrap();
        check_trajectory(&t, &avail);
        let truth: Vec<(u64, f64)> = t
            .eqms(&avail.start())
            .iter()
            .zip(&t.steps)
            .map(|(e, s)| (s.footprint, ev.truth(e)))
            .collect();
        above_end_chord(&truth)
    };
    let larger_saving = above_true_chord(Ties::LargerSaving);
    assert!(
        larger_saving > 0,
        "the blind model no longer shows the effect"
    );
    assert_eq!(
        above_true_chord(Ties::OutputError),
        0,
        "larger savings first: {larger_saving} above"
    );
}
