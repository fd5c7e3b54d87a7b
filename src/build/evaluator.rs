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
use crate::quant::eqm::{Eqm, EqmModel};
use crate::quant::evaluate::PrefixEval;

pub struct CalibEvaluator<'a> {
    pub model: &'a EqmModel,
    eval: PrefixEval,
    /// Measured single-swap sensitivities, when `measure_single_swaps` has run.
    pub single: Option<SingleSwaps>,
    /// Forward passes of the single-swap measurement, in whole-model equivalents.
    single_forwards: f64,
}

/// Calibration ppl of QM(n_up) with one module lowered, for every module and lower bit-width,
/// on a small token budget: the "measured" sensitivity.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SingleSwaps {
    pub tokens: usize,
    pub start_ppl: f64,
    pub n_up: u32,
    /// `(module, bits, ppl)`
    pub ppl: Vec<(usize, u32, f64)>,
}

impl SingleSwaps {
    fn get(&self, module: usize, bits: u32) -> Option<f64> {
        if bits == self.n_up {
            return Some(self.start_ppl);
        }
        self.ppl
            .iter()
            .find(|e| e.0 == module && e.1 == bits)
            .map(|e| e.2)
    }
}

impl<'a> CalibEvaluator<'a> {
    /// `tokens` is cut into sequences of `seq_len` (each evaluated from position 0; a shorter
    /// remainder is dropped); the activations of `cache_limit` EQMs are kept.
    pub fn new(model: &'a EqmModel, tokens: &[u32], seq_len: usize, cache_limit: usize) -> Self {
        let whole = tokens.len() / seq_len * seq_len;
        CalibEvaluator {
            model,
            eval: PrefixEval::new(&tokens[..whole], seq_len, cache_limit.max(1))
                .expect("calibration of at least one sequence of 2 tokens"),
            single: None,
            single_forwards: 0.0,
        }
    }

    /// Fills `single` from the first `tokens` calibration tokens; `progress(done, total)`.
    pub fn measure_single_swaps(
        &mut self,
        avail: &crate::build::search::Available,
        tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let start = avail.start();
        let all: Vec<u32> = self.eval.seqs().concat();
        let tokens = tokens.min(all.len());
        let seq_len = self.eval.seqs()[0].len().min(tokens);
        let mut sub = PrefixEval::new(&all[..tokens / seq_len * seq_len], seq_len, 2)?;
        let start_ppl = sub.ppl(self.model, &start)?;
        let moves: Vec<(usize, u32)> = avail
            .bits
            .iter()
            .enumerate()
            .flat_map(|(m, l)| l[1..].iter().map(move |&b| (m, b)))
            .collect();
        let mut ppl = Vec::with_capacity(moves.len());
        for (i, &(m, b)) in moves.iter().enumerate() {
            let mut e = start.clone();
            e.bits[m] = b;
            ppl.push((m, b, sub.ppl(self.model, &e)?));
            progress(i + 1, moves.len());
        }
        self.single_forwards += sub.forward_equivalents;
        self.single = Some(SingleSwaps {
            tokens: sub.tokens(),
            start_ppl,
            n_up: start.bits[0],
            ppl,
        });
        Ok(())
    }

    /// Forward passes run, in whole-model equivalents (a run from layer l counts (L-l)/L).
    pub fn forward_equivalents(&self) -> f64 {
        self.eval.forward_equivalents + self.single_forwards
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

    /// Damage per byte saved: the measured single-swap ppl increase when available, else the
    /// increase of the module's relative output error.
    fn sensitivity(&mut self, _eqm: &Eqm, moves: &[Move]) -> Result<Vec<f64>> {
        moves
            .iter()
            .map(|m| {
                let measured = self
                    .single
                    .as_ref()
                    .and_then(|s| Some(s.get(m.module, m.to)? - s.get(m.module, m.from)?));
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
