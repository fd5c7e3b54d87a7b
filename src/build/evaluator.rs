//! Calibration perplexity of many EQMs, fast.
//!
//! `quant::evaluate::PrefixEval` keeps the residual stream entering every layer for the
//! recently evaluated EQMs; a candidate restarts from the kept EQM that agrees with it on the
//! most leading layers (its parent, usually) and runs only the layers from its first difference
//! on. With candidates spread uniformly over 30 layers this halves the work. Each EQM's
//! `Weights` comes from `EqmModel`, which shares dequantized modules.
//!
//! Sensitivity (the cheap damage estimate the search ranks moves by) is the increase of the
//! module's relative output error `‖(W − Q)X‖² / ‖WX‖²` on calibration inputs (recorded by the
//! quantizer in the library) per byte saved: free to compute. `rank_correlation` measures how
//! well it, and a small-token loss probe, predict the real calibration ppl change.

use crate::build::search::{Evaluator, Move};
use crate::error::Result;
use crate::model::weights::ModuleId;
use crate::model::weights::Weights;
use crate::quant::eqm::{Eqm, EqmModel};
use crate::quant::evaluate::PrefixEval;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

pub struct CalibEvaluator<'a> {
    pub model: &'a EqmModel,
    eval: PrefixEval,
    /// The float model, when scores are cross-entropies against it (`CalibScore::Float`).
    reference: Option<&'a Weights>,
    /// Measured single-swap sensitivities, when `measure_single_swaps` has run.
    pub measured: Option<Measured>,
}

/// What an EQM's calibration score (its "calibration ppl") measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CalibScore {
    /// The perplexity of the calibration text's own next tokens (the paper's).
    #[default]
    Tokens,
    /// `exp` of the mean cross-entropy against the float model's next-token distribution at
    /// every calibration position (the KL divergence from the float model plus its entropy):
    /// always at least the float model's own, so no swap scores a gain, and free of the noise
    /// of which token the text happens to hold next.
    Float,
}

/// The "measured" sensitivity: the calibration-ppl change of a single swap on a small token
/// budget, by `(module, from, to)`. Each move is measured from the EQM the search stands on
/// when it first ranks that move: in a staged search, the static QM that starts the move's
/// stage (QM(3) for a 3 -> 2 move, not QM(n_up)), so the interactions with every module already
/// lowered are in the estimate. The same number of evaluations as measuring every move from
/// QM(n_up) once.
pub struct Measured {
    tokens: Vec<u32>,
    seq_len: usize,
    /// The float model's distributions on `tokens` (`CalibScore::Float`).
    reference: Option<Arc<Vec<f32>>>,
    pub deltas: HashMap<(usize, u32, u32), f64>,
    /// Calibration-ppl evaluations spent (the bases included).
    pub evaluations: usize,
    forwards: f64,
}

impl Measured {
    /// Measures the moves of `moves` not measured yet, each from `base`.
    fn measure(
        &mut self,
        model: &EqmModel,
        base: &Eqm,
        moves: &[Move],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let key = |m: &Move| (m.module, m.from, m.to);
        let missing: Vec<&Move> = moves
            .iter()
            .filter(|m| !self.deltas.contains_key(&key(m)))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // Module order: each swap reruns only the layers from its own on (the base is kept).
        let mut sub = PrefixEval::new(&self.tokens, self.seq_len, 2)?;
        if let Some(r) = &self.reference {
            sub = sub.referenced(r.clone());
        }
        let p0 = sub.ppl(model, base)?;
        for (i, mv) in missing.iter().enumerate() {
            let mut e = base.clone();
            e.bits[mv.module] = mv.to;
            let d = sub.ppl(model, &e)? - p0;
            self.deltas.insert(key(mv), d);
            progress(i + 1, missing.len());
        }
        self.evaluations += missing.len() + 1;
        self.forwards += sub.forward_equivalents;
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }
}

impl<'a> CalibEvaluator<'a> {
    /// `tokens` is cut into sequences of `seq_len` (each evaluated from position 0; a shorter
    /// remainder is dropped); the activations of `cache_limit` EQMs are kept. Scores are
    /// perplexities of the tokens (`CalibScore::Tokens`).
    pub fn new(model: &'a EqmModel, tokens: &[u32], seq_len: usize, cache_limit: usize) -> Self {
        let whole = tokens.len() / seq_len * seq_len;
        CalibEvaluator {
            model,
            eval: PrefixEval::new(&tokens[..whole], seq_len, cache_limit.max(1))
                .expect("calibration of at least one sequence of 2 tokens"),
            reference: None,
            measured: None,
        }
    }

    /// Scores by `score`: with `CalibScore::Float`, cross-entropies against `float` (run once
    /// on the calibration tokens here, and on the measured sensitivities' tokens there).
    pub fn scored_by(mut self, score: CalibScore, float: &'a Weights) -> Result<Self> {
        if score == CalibScore::Float {
            self.eval.score_against(float)?;
            self.reference = Some(float);
        }
        Ok(self)
    }

    /// Switches on the measured sensitivity on the first `tokens` calibration tokens and
    /// measures the first level's moves from QM(n_up) (the search measures the later levels'
    /// at their stage's start); `progress(done, total)`.
    pub fn measure_single_swaps(
        &mut self,
        avail: &crate::build::search::Available,
        tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let all: Vec<u32> = self.eval.seqs().concat();
        let tokens = tokens.min(all.len());
        let seq_len = self.eval.seqs()[0].len().min(tokens);
        self.measure_single_swaps_on(avail, &all[..tokens / seq_len * seq_len], seq_len, progress)
    }

    /// `measure_single_swaps` on other tokens, in windows of `seq_len`: tokens the search's
    /// calibration ppl does not read, so the candidates it is offered and the choice among
    /// them do not fit the same noise.
    pub fn measure_single_swaps_on(
        &mut self,
        avail: &crate::build::search::Available,
        tokens: &[u32],
        seq_len: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let start = avail.start();
        let reference = match self.reference {
            Some(w) => {
                let mut e = PrefixEval::new(tokens, seq_len, 0)?;
                e.score_against(w)?;
                e.reference().cloned()
            }
            None => None,
        };
        let mut ms = Measured {
            tokens: tokens.to_vec(),
            seq_len,
            reference,
            deltas: HashMap::new(),
            evaluations: 0,
            forwards: 0.0,
        };
        let moves = crate::build::search::legal_moves(avail, &start, 0);
        ms.measure(self.model, &start, &moves, progress)?;
        self.measured = Some(ms);
        Ok(())
    }

    /// Forward passes run, in whole-model equivalents (a run from layer l counts (L-l)/L).
    pub fn forward_equivalents(&self) -> f64 {
        self.eval.forward_equivalents + self.measured.as_ref().map_or(0.0, |m| m.forwards)
    }

    /// Calibration ppl of one EQM, reusing the best cached prefix of layers.
    pub fn ppl(&mut self, eqm: &Eqm) -> Result<f64> {
        self.eval.ppl(self.model, eqm)
    }

    /// Relative output error of a module version, from the library.
    pub fn output_error(&self, module: usize, bits: u32) -> Result<f64> {
        Ok(self
            .model
            .library
            .version(ModuleId::from_index(module), bits)?
            .rel_output_error)
    }
}

impl Evaluator for CalibEvaluator<'_> {
    fn bytes(&self, module: usize, bits: u32) -> u64 {
        self.model
            .library
            .version(ModuleId::from_index(module), bits)
            .map(|v| v.bytes as u64)
            .unwrap_or(u64::MAX / 4)
    }

    /// Damage per byte saved: the measured single-swap ppl increase when switched on (moves
    /// not measured yet are measured from `eqm`), else the increase of the module's relative
    /// output error.
    fn sensitivity(&mut self, eqm: &Eqm, moves: &[Move]) -> Result<Vec<f64>> {
        if let Some(ms) = self.measured.as_mut() {
            ms.measure(self.model, eqm, moves, &mut |_, _| {})?;
        }
        moves
            .iter()
            .map(|m| {
                let measured = self
                    .measured
                    .as_ref()
                    .and_then(|s| s.deltas.get(&(m.module, m.from, m.to)).copied());
                let d = match measured {
                    Some(d) => d,
                    None => {
                        self.output_error(m.module, m.to)? - self.output_error(m.module, m.from)?
                    }
                };
                let saved = (self.bytes(m.module, m.from) - self.bytes(m.module, m.to)).max(1);
                Ok(d / saved as f64)
            })
            .collect()
    }

    /// The increase of the module's relative output error per byte saved.
    fn tie_key(&self, m: &Move) -> f64 {
        let err = |b| self.output_error(m.module, b).unwrap_or(f64::INFINITY);
        let saved = self.bytes(m.module, m.from) - self.bytes(m.module, m.to);
        (err(m.to) - err(m.from)) / saved.max(1) as f64
    }

    fn calib_ppl(&mut self, eqms: &[Eqm]) -> Result<Vec<f64>> {
        // The candidates, the reference and the parent they came from.
        self.eval.cache_limit = self.eval.cache_limit.max(eqms.len() + 2);
        eqms.iter().map(|e| self.ppl(e)).collect()
    }
}

/// Spearman rank correlation of two equally long samples.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(x: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        for (rank, &i) in idx.iter().enumerate() {
            r[i] = rank as f64;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x - mean) * (y - mean))
        .sum();
    let var: f64 = ra.iter().map(|x| (x - mean) * (x - mean)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}
