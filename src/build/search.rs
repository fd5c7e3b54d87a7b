//! The tree search that orders the EQM trajectory (FlexQuant §3): from QM(n_up), repeatedly
//! lower one module to its next lower available bit-width until QM(n_low).
//!
//! Each round, every kept path (`stem` of them) proposes its `branch` best moves by
//! sensitivity (a cheap damage estimate); those candidate EQMs are scored by calibration
//! perplexity and the best `stem` survive.
//!
//! Score: the candidates of one round sit at different footprints (a gate/up/down module saves
//! 8x the bytes of a k/v module), so ranking by perplexity alone would always take the smallest
//! swaps first and bunch the trajectory's footprint steps. We rank by damage per byte saved
//! ([`Slope`]): either since QM(n_up), `(ppl - ppl_0) / (bytes_0 - bytes)`, the slope of the
//! straight line from the trajectory's start, or since the candidate's parent (the marginal
//! slope, the convex hull's greedy order). Ties go to the larger saving. Among surviving paths that end in the same EQM (all end at QM(n_low)) the one with
//! the smallest area under its ppl-vs-footprint curve is reported.

use crate::error::{Error, Result};
use crate::quant::eqm::Eqm;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Move {
    /// `ModuleId::index()`
    pub module: usize,
    pub from: u32,
    pub to: u32,
}

/// What the search needs from the model: sizes, a cheap damage estimate and calibration ppl.
pub trait Evaluator {
    fn bytes(&self, module: usize, bits: u32) -> u64;
    /// Damage estimate of each move applied alone to `eqm` (lower is safer).
    fn sensitivity(&mut self, eqm: &Eqm, moves: &[Move]) -> Result<Vec<f64>>;
    /// Calibration perplexity of each EQM.
    fn calib_ppl(&mut self, eqms: &[Eqm]) -> Result<Vec<f64>>;
    /// A second damage estimate per byte saved, quieter than a few calibration tokens, that
    /// orders moves of equal damage when `SearchOptions::ties` is `Ties::OutputError`
    /// (lower first).
    fn tie_key(&self, _mv: &Move) -> f64 {
        0.0
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SearchOptions {
    pub branch: usize,
    pub stem: usize,
    /// With `branch == stem == 1` there is nothing to choose between, so calibration ppl is
    /// only recorded every this many steps (and at the end); other steps record NaN.
    pub record_every: usize,
    /// Lower the modules one ladder level at a time: no module goes below the next static
    /// bit-width until every module that can has reached it, so the trajectory passes through
    /// each static QM(b) of the ladder (see [`Floor`]).
    #[serde(default)]
    pub staged: bool,
    /// Lazy scoring (see [`search`]): a candidate measured on an earlier parent of its path
    /// is not measured again unless it would be chosen; then it is, and the round is re-ranked.
    #[serde(default)]
    pub lazy: bool,
    /// What a candidate's damage per byte is measured against (see [`Slope`]).
    #[serde(default)]
    pub slope: Slope,
    /// A move that lowers the calibration ppl (or its measured sensitivity) counts as no
    /// damage: fewer bits cannot make a module better except by fitting the few calibration
    /// tokens, and dividing such a gain by a small module's bytes put small modules that
    /// happened to fit them first in every stage (in the full 8 -> 2 demo build, 93-103 of each
    /// stage's 210 steps lowered the calibration ppl, up to 0.8 for one V module, and the
    /// held-out curve rose above the static chord early in stages). Such moves tie, and the
    /// larger saving goes first.
    #[serde(default)]
    pub floor_damage: bool,
    /// How moves of equal damage per byte are ordered (see [`Ties`]).
    #[serde(default)]
    pub ties: Ties,
}

/// The order of moves of equal damage per byte. With `floor_damage` that is every move whose
/// calibration ppl did not rise: in the near-lossless stages (8 -> 6, 6 -> 5) about half of
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ties {
    /// The larger saving first.
    #[default]
    LargerSaving,
    /// The smaller `Evaluator::tie_key` first (the module's relative output error increase
    /// per byte saved, measured by the quantizer on all its calibration tokens), then the
    /// larger saving.
    OutputError,
}

/// The straight line a candidate is ranked by: its ppl against bytes saved, drawn from
/// QM(n_up) (`FromStart`) or from the candidate's parent (`Marginal`).
///
/// From the start, a round's ranking is roughly by `Δppl − k·Δbytes` with `k` the slope so far:
/// early in a stage, where `k` is still the gentler slope of the stage before, that is nearly
/// the absolute damage, so small modules go first even when a large one costs less per byte,
/// and the curve bends upwards above the chord between the static QMs. The marginal slope
/// `Δppl / Δbytes` is the greedy order of the curve's lower convex hull when damages add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slope {
    #[default]
    FromStart,
    Marginal,
}

impl SearchOptions {
    pub fn validate(&self) -> Result<()> {
        if self.branch == 0 || self.stem == 0 {
            return Err(Error::input(format!(
                "--branch {} and --stem {} must both be at least 1",
                self.branch, self.stem
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrajStep {
    pub swap: Option<Move>,
    pub footprint: u64,
    /// NaN where not measured (JSON null).
    #[serde(deserialize_with = "f64_or_nan")]
    pub calib_ppl: f64,
}

fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trajectory {
    pub steps: Vec<TrajStep>,
    /// Calibration-ppl evaluations spent (the search's budget).
    pub evaluations: usize,
    pub sensitivity_evaluations: usize,
}

impl Trajectory {
    /// The EQM at each step, starting from `start`.
    pub fn eqms(&self, start: &Eqm) -> Vec<Eqm> {
        let mut e = start.clone();
        self.steps
            .iter()
            .map(|s| {
                if let Some(m) = s.swap {
                    e.bits[m.module] = m.to;
                }
                e.clone()
            })
            .collect()
    }
}

/// Bit-widths each module may take, high to low (`[n_up, ..., n_low]`; pruning removes
/// intermediate ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Available {
    pub bits: Vec<Vec<u32>>,
}

impl Available {
    pub fn uniform(modules: usize, ladder: &[u32]) -> Self {
        Available {
            bits: vec![ladder.to_vec(); modules],
        }
    }
    pub fn next_lower(&self, module: usize, bits: u32) -> Option<u32> {
        self.bits[module].iter().copied().find(|&b| b < bits)
    }
    pub fn start(&self) -> Eqm {
        Eqm {
            bits: self.bits.iter().map(|b| b[0]).collect(),
        }
    }
    pub fn end(&self) -> Eqm {
        Eqm {
            bits: self.bits.iter().map(|b| *b.last().unwrap()).collect(),
        }
    }
    /// Swaps needed from QM(n_up) to QM(n_low).
    pub fn steps(&self) -> usize {
        self.bits.iter().map(|b| b.len() - 1).sum()
    }
}

/// The lowest bit-width a staged search may move a module to, lowered one ladder level once
/// no module can move without going below it.
struct Floor {
    /// Every bit-width in `Available`, high to low.
    levels: Vec<u32>,
    at: usize,
}

impl Floor {
    fn new(avail: &Available, staged: bool) -> Self {
        let mut levels: Vec<u32> = avail.bits.iter().flatten().copied().collect();
        levels.sort_unstable_by(|a, b| b.cmp(a));
        levels.dedup();
        let at = if staged {
            1.min(levels.len() - 1)
        } else {
            levels.len() - 1
        };
        Floor { levels, at }
    }
    fn bits(&self) -> u32 {
        self.levels[self.at]
    }
    /// Lowers the floor until some path has a legal move (or the floor is at the bottom).
    fn settle(&mut self, avail: &Available, paths: &[Path]) {
        while self.at + 1 < self.levels.len()
            && paths
                .iter()
                .all(|p| legal_moves(avail, &p.eqm, self.bits()).is_empty())
        {
            self.at += 1;
        }
    }
}

/// Every one-level-down move of `eqm` that stays at or above `floor` bits.
pub fn legal_moves(avail: &Available, eqm: &Eqm, floor: u32) -> Vec<Move> {
    (0..eqm.bits.len())
        .filter_map(|m| {
            let from = eqm.bits[m];
            avail
                .next_lower(m, from)
                .filter(|&to| to >= floor)
                .map(|to| Move {
                    module: m,
                    from,
                    to,
                })
        })
        .collect()
}

#[derive(Clone)]
struct Path {
    eqm: Eqm,
    steps: Vec<TrajStep>,
    footprint: u64,
    /// Area under ppl-vs-footprint so far (trapezoids), to pick among finished paths.
    area: f64,
    /// Lazy search: the calibration ppl of moves measured on an earlier EQM of this path.
    seen: HashMap<Move, Seen>,
}

/// A move's candidate measured on an earlier parent: its ppl, the parent's, and the round.
#[derive(Clone, Copy)]
struct Seen {
    ppl: f64,
    parent_ppl: f64,
    round: usize,
}

/// Rounds after which a lazily kept measurement is taken again even when not chosen, so a
/// pessimistic stale estimate cannot keep a good move out for long.
const LAZY_MAX_AGE: usize = 16;

impl Path {
    fn ppl(&self) -> f64 {
        self.steps.last().unwrap().calib_ppl
    }
    /// Lazy search's estimate of `mv` from here: its stale ppl shifted by how much the
    /// parent's ppl moved since (moves in different modules add, to first order); NaN
    /// when not measured, too old, or the parent's ppl is unknown.
    fn estimate(&self, mv: &Move, round: usize) -> f64 {
        match self.seen.get(mv) {
            Some(s) if round - s.round <= LAZY_MAX_AGE => s.ppl + (self.ppl() - s.parent_ppl),
            _ => f64::NAN,
        }
    }
}

/// The key that orders equal damages (`Ties`): 0 for every move with `LargerSaving`.
fn tie_key(ev: &impl Evaluator, ties: Ties, mv: &Move) -> f64 {
    match ties {
        Ties::LargerSaving => 0.0,
        Ties::OutputError => ev.tie_key(mv),
    }
}

pub fn footprint(ev: &impl Evaluator, eqm: &Eqm, base_bytes: u64) -> u64 {
    base_bytes
        + eqm
            .bits
            .iter()
            .enumerate()
            .map(|(i, &b)| ev.bytes(i, b))
            .sum::<u64>()
}

/// Runs the search; `progress(step, total, ppl)` after every round.
pub fn search(
    ev: &mut impl Evaluator,
    avail: &Available,
    base_bytes: u64,
    opts: SearchOptions,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Trajectory> {
    opts.validate()?;
    let start = avail.start();
    let f0 = footprint(ev, &start, base_bytes);
    let ppl0 = ev.calib_ppl(std::slice::from_ref(&start))?[0];
    let mut evaluations = 1;
    let mut sensitivity_evaluations = 0;
    let mut paths = vec![Path {
        eqm: start.clone(),
        steps: vec![TrajStep {
            swap: None,
            footprint: f0,
            calib_ppl: ppl0,
        }],
        footprint: f0,
        area: 0.0,
        seen: HashMap::new(),
    }];
    let total = avail.steps();
    let mut floor = Floor::new(avail, opts.staged);
    for round in 0..total {
        floor.settle(avail, &paths);
        // Propose: each path's `branch` safest moves.
        let mut cands: Vec<(usize, Move, Eqm)> = Vec::new();
        for (pi, p) in paths.iter().enumerate() {
            let moves = legal_moves(avail, &p.eqm, floor.bits());
            let mut ranked: Vec<(f64, Move)> = if moves.len() <= opts.branch {
                moves.iter().map(|&m| (0.0, m)).collect()
            } else {
                sensitivity_evaluations += moves.len();
                let s = ev.sensitivity(&p.eqm, &moves)?;
                s.into_iter().zip(moves).collect()
            };
            if opts.floor_damage {
                for r in &mut ranked {
                    r.0 = r.0.max(0.0);
                }
            }
            // Safest first; ties by `opts.ties`.
            let saved = |m: &Move| ev.bytes(m.module, m.from) - ev.bytes(m.module, m.to);
            let tie = |m: &Move| tie_key(ev, opts.ties, m);
            ranked.sort_by(|a, b| {
                a.0.total_cmp(&b.0)
                    .then(tie(&a.1).total_cmp(&tie(&b.1)))
                    .then(saved(&b.1).cmp(&saved(&a.1)))
            });
            for &(_, mv) in ranked.iter().take(opts.branch) {
                let mut e = p.eqm.clone();
                e.bits[mv.module] = mv.to;
                if !cands.iter().any(|c| c.2 == e) {
                    cands.push((pi, mv, e));
                }
            }
        }
        // Score by calibration perplexity: every candidate measured, or (lazy) only the new
        // ones and then the stale ones that rank among the `stem` best, until those are fresh.
        let skip = cands.len() == 1
            && paths.len() == 1
            && (round + 1) % opts.record_every.max(1) != 0
            && round + 1 != total;
        let mut ppls: Vec<f64> = cands
            .iter()
            .map(|(pi, mv, _)| match opts.lazy && !skip {
                true => paths[*pi].estimate(mv, round),
                false => f64::NAN,
            })
            .collect();
        let mut fresh = vec![skip; cands.len()];
        let mut need: Vec<usize> = (0..cands.len())
            .filter(|&i| !skip && ppls[i].is_nan())
            .collect();
        let scored = loop {
            if !need.is_empty() {
                let eqms: Vec<Eqm> = need.iter().map(|&i| cands[i].2.clone()).collect();
                evaluations += eqms.len();
                for (&i, p) in need.iter().zip(ev.calib_ppl(&eqms)?) {
                    let (pi, mv, _) = cands[i];
                    let parent_ppl = paths[pi].ppl();
                    paths[pi].seen.insert(
                        mv,
                        Seen {
                            ppl: p,
                            parent_ppl,
                            round,
                        },
                    );
                    ppls[i] = p;
                    fresh[i] = true;
                }
            }
            let mut scored: Vec<(f64, f64, u64, usize)> = cands
                .iter()
                .zip(&ppls)
                .enumerate()
                .map(|(i, ((pi, mv, _), &ppl))| {
                    let p = &paths[*pi];
                    let f = p.footprint - ev.bytes(mv.module, mv.from) + ev.bytes(mv.module, mv.to);
                    let (damage, saved) = match opts.slope {
                        Slope::FromStart => (ppl - ppl0, f0 - f),
                        Slope::Marginal => (ppl - p.ppl(), p.footprint - f),
                    };
                    let damage = match opts.floor_damage {
                        true => damage.max(0.0),
                        false => damage,
                    };
                    let slope = damage / saved.max(1) as f64;
                    (slope, tie_key(ev, opts.ties, mv), f, i)
                })
                .collect();
            scored.sort_by(|a, b| {
                a.0.total_cmp(&b.0)
                    .then(a.1.total_cmp(&b.1))
                    .then(a.2.cmp(&b.2))
            });
            need = scored
                .iter()
                .take(opts.stem)
                .map(|s| s.3)
                .filter(|&i| !fresh[i])
                .collect();
            if need.is_empty() {
                break scored;
            }
        };
        let mut next = Vec::with_capacity(opts.stem);
        for &(_, _, f, i) in scored.iter().take(opts.stem) {
            let (pi, mv, ref e) = cands[i];
            let p = &paths[pi];
            let last = p.steps.last().unwrap();
            let mut steps = p.steps.clone();
            let mut seen = p.seen.clone();
            seen.retain(|m, _| m.module != mv.module);
            steps.push(TrajStep {
                swap: Some(mv),
                footprint: f,
                calib_ppl: ppls[i],
            });
            next.push(Path {
                eqm: e.clone(),
                area: p.area + (last.footprint - f) as f64 * (last.calib_ppl + ppls[i]) / 2.0,
                steps,
                footprint: f,
                seen,
            });
        }
        paths = next;
        progress(round + 1, total, paths[0].steps.last().unwrap().calib_ppl);
    }
    let best = paths
        .into_iter()
        .min_by(|a, b| a.area.total_cmp(&b.area))
        .expect("at least one path");
    debug_assert_eq!(best.eqm, avail.end());
    Ok(Trajectory {
        steps: best.steps,
        evaluations,
        sensitivity_evaluations,
    })
}
