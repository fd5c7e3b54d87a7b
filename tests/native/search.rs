//! The tree search and pruning on a synthetic model whose damage is known exactly.

use flexquant::build::prune::{intermediate_versions, prune, usage};
use flexquant::build::search::{search, Available, Evaluator, Move, SearchOptions};
use flexquant::quant::eqm::Eqm;
use flexquant::Result;

/// Modules of three sizes; damage of module m at b bits is `c_m * 2^(n_up - b)`, so the true
/// best order is known: lowest damage per byte saved first.
struct Synthetic {
    size: Vec<u64>,
    c: Vec<f64>,
    evals: usize,
}

impl Synthetic {
    fn new(n: usize) -> Self {
        Synthetic {
            size: (0..n).map(|m| [1000, 4000, 8000][m % 3]).collect(),
            c: (0..n)
                .map(|m| 0.001 * (1 + (m * 7919) % 13) as f64)
                .collect(),
            evals: 0,
        }
    }
    fn damage(&self, m: usize, b: u32) -> f64 {
        self.c[m] * ((1u32 << (8 - b)) - 1) as f64
    }
    fn ppl(&self, e: &Eqm) -> f64 {
        10.0 * e
            .bits
            .iter()
            .enumerate()
            .map(|(m, &b)| 1.0 + self.damage(m, b))
            .product::<f64>()
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
