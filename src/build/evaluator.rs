//! Calibration perplexity of many EQMs, fast.
//!
//! A swap in layer `l` changes nothing before layer `l`, so the residual stream entering every
//! layer is kept for the recently evaluated EQMs; a candidate restarts from the cached EQM that
//! agrees with it on the most leading layers (its parent, usually) and runs only the layers from
//! its first difference on. With candidates spread uniformly over 30 layers this halves the
//! work. Each EQM's `Weights` comes from `EqmModel`, which shares dequantized modules.
//!
//! Sensitivity (the cheap damage estimate the search ranks moves by) is the increase of the
//! module's relative output error `‖(W − Q)X‖² / ‖WX‖²` on calibration inputs (recorded by the
//! quantizer in the library) per byte saved: free to compute. `rank_correlation` measures how
//! well it, and a small-token loss probe, predict the real calibration ppl change.

use crate::build::search::{Evaluator, Move};
use crate::error::Result;
use crate::model::eval::nll_of_rows;
use crate::model::forward::{self, KvCache};
use crate::model::ops::Rope;
use crate::model::weights::{ModuleId, Weights};
use crate::quant::eqm::{Eqm, EqmModel};
use std::sync::Arc;

/// Residual stream entering layer `l` (index `l`), and leaving the last layer (index L), for
/// every calibration sequence concatenated.
struct Acts {
    eqm: Eqm,
    layers: Vec<Arc<Vec<f32>>>,
}

pub struct CalibEvaluator<'a> {
    pub model: &'a EqmModel,
    seqs: Vec<Vec<u32>>,
    cache: Vec<Acts>,
    /// EQMs whose activations are kept (the candidate pool of one search round).
    pub cache_limit: usize,
    /// Forward passes run, in whole-model equivalents (a run from layer l counts (L-l)/L).
    pub forward_equivalents: f64,
    /// Measured single-swap sensitivities, when `measure_single_swaps` has run.
    pub single: Option<SingleSwaps>,
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
    /// `tokens` is cut into `seqs` sequences of `seq_len` (each evaluated from position 0).
    pub fn new(model: &'a EqmModel, tokens: &[u32], seq_len: usize, cache_limit: usize) -> Self {
        let seqs = tokens.chunks_exact(seq_len).map(|c| c.to_vec()).collect();
        CalibEvaluator {
            model,
            seqs,
            cache: Vec::new(),
            cache_limit: cache_limit.max(1),
            forward_equivalents: 0.0,
            single: None,
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
        let seq_len = self.seqs[0].len().min(tokens);
        let all: Vec<u32> = self.seqs.concat();
        let mut sub = CalibEvaluator::new(self.model, &all[..tokens.min(all.len())], seq_len, 2);
        let start_ppl = sub.ppl(&start)?;
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
            ppl.push((m, b, sub.ppl(&e)?));
            progress(i + 1, moves.len());
        }
        self.forward_equivalents += sub.forward_equivalents;
        self.single = Some(SingleSwaps {
            tokens: sub.tokens(),
            start_ppl,
            n_up: start.bits[0],
            ppl,
        });
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len()).sum()
    }

    fn layers(&self) -> usize {
        self.model.library.config().num_hidden_layers
    }

    /// Runs `w` from layer `l0` on `input` (the residual entering `l0`), returning the new
    /// residuals entering layers `l0+1..=L`.
    fn run_from(&self, w: &Weights, l0: usize, input: &[f32]) -> Vec<Arc<Vec<f32>>> {
        let c = &w.config;
        let h = c.hidden_size;
        let mut kv = KvCache::new(w, self.seqs[0].len());
        let rope = Rope::new(c.rope_theta, c.head_dim(), 0, self.seqs[0].len());
        let mut x = input.to_vec();
        let mut out = Vec::new();
        let per_seq = self.seqs[0].len() * h;
        for l in l0..c.num_hidden_layers {
            for xs in x.chunks_mut(per_seq) {
                forward::layer(w, l, xs, 0, &mut kv, &rope);
            }
            out.push(Arc::new(x.clone()));
        }
        out
    }

    fn nll(&self, w: &Weights, last: &[f32]) -> f64 {
        let h = w.config.hidden_size;
        let per_seq = self.seqs[0].len() * h;
        let mut total = 0.0;
        for (xs, seq) in last.chunks(per_seq).zip(&self.seqs) {
            let mut x = xs.to_vec();
            forward::final_norm(w, &mut x);
            total += nll_of_rows(w, &x[..(seq.len() - 1) * h], &seq[1..]);
        }
        total
    }

    fn count(&self) -> usize {
        self.seqs.iter().map(|s| s.len() - 1).sum()
    }

    /// Calibration ppl of one EQM, reusing the best cached prefix of layers.
    pub fn ppl(&mut self, eqm: &Eqm) -> Result<f64> {
        let w = self.model.weights(eqm)?;
        let nl = self.layers();
        let first_diff = |a: &Eqm| {
            (0..nl)
                .find(|&l| (0..7).any(|k| a.bits[l * 7 + k] != eqm.bits[l * 7 + k]))
                .unwrap_or(nl)
        };
        let best = self
            .cache
            .iter()
            .enumerate()
            .map(|(i, a)| (first_diff(&a.eqm), i))
            .max();
        let (l0, mut layers) = match best {
            Some((l0, i)) => (l0, self.cache[i].layers[..=l0].to_vec()),
            None => {
                let emb: Vec<f32> = self
                    .seqs
                    .iter()
                    .map(|s| forward::embed(&w, s))
                    .collect::<Result<Vec<_>>>()?
                    .concat();
                (0, vec![Arc::new(emb)])
            }
        };
        if l0 < nl {
            let input = layers[l0].clone();
            layers.extend(self.run_from(&w, l0, &input));
        }
        self.forward_equivalents += (nl - l0) as f64 / nl as f64;
        let nll = self.nll(&w, &layers[nl]);
        self.cache.push(Acts {
            eqm: eqm.clone(),
            layers,
        });
        if self.cache.len() > self.cache_limit {
            self.cache.remove(0);
        }
        Ok((nll / self.count() as f64).exp())
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
        self.cache_limit = self.cache_limit.max(eqms.len() + 1);
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
