//! Scoring quantized models against the float one: perplexity plus each position's top-1
//! token (for agreement), the prefix-caching evaluator the builder and the single-swap check
//! share, and the paper's single-swap check.
//!
//! Windows are non-overlapping (`eval::windows` with stride = ctx), so the perplexities equal
//! `eval::perplexity(w, tokens, ctx, ctx)`.

use crate::error::{Error, Result};
use crate::model::eval::{
    check_window, cross_entropy_of_rows, nll_of_rows, probs_of_rows, windows,
};
use crate::model::forward::{self, KvCache};
use crate::model::ops::{self, Rope};
use crate::model::weights::{ModuleId, Weights};
use crate::quant::eqm::{Eqm, EqmModel};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Logit rows materialised at once (bounds memory at this x vocab floats).
const LOGIT_CHUNK: usize = 128;

#[derive(Debug, Clone)]
pub struct Scores {
    pub nll_sum: f64,
    /// Predicted (argmax) next token of every scored position.
    pub top1: Vec<u32>,
}

impl Scores {
    pub fn ppl(&self) -> f64 {
        (self.nll_sum / self.top1.len() as f64).exp()
    }
    /// Fraction of positions where both models predict the same next token.
    pub fn agreement(&self, other: &Scores) -> f64 {
        let same = self
            .top1
            .iter()
            .zip(&other.top1)
            .filter(|(a, b)| a == b)
            .count();
        same as f64 / self.top1.len().max(1) as f64
    }
}

fn check(w: &Weights, tokens: &[u32], ctx: usize) -> Result<()> {
    check_window(ctx, ctx, w.config.max_position_embeddings)?;
    if tokens.len() < 2 {
        return Err(Error::input("scoring needs at least 2 tokens"));
    }
    Ok(())
}

/// Scores every token of `tokens` but the first, in windows of `ctx`.
pub fn score(w: &Weights, tokens: &[u32], ctx: usize) -> Result<Scores> {
    check(w, tokens, ctx)?;
    let (h, vocab) = (w.config.hidden_size, w.config.vocab_size);
    let mut cache = KvCache::new(w, ctx);
    let mut s = Scores {
        nll_sum: 0.0,
        top1: Vec::with_capacity(tokens.len()),
    };
    for (begin, end, first) in windows(tokens.len(), ctx, ctx) {
        cache.clear();
        let x = forward::hidden(w, &tokens[begin..end], &mut cache)?;
        let rows = &x[(first - 1 - begin) * h..(end - 1 - begin) * h];
        for (r, tg) in rows
            .chunks(LOGIT_CHUNK * h)
            .zip(tokens[first..end].chunks(LOGIT_CHUNK))
        {
            let lg = forward::logits(w, r);
            let part: Vec<(f64, u32)> = lg
                .par_chunks_exact(vocab)
                .zip(tg.par_iter())
                .map(|(row, &t)| {
                    let nll = ops::log_sum_exp(row) - row[t as usize] as f64;
                    (nll, ops::argmax(row) as u32)
                })
                .collect();
            for (nll, top) in part {
                s.nll_sum += nll;
                s.top1.push(top);
            }
        }
    }
    Ok(s)
}

/// Perplexity of many EQMs on the same tokens, fast (the builder's calibration ppl, the
/// single-swap check, held-out figures).
///
/// The tokens are cut into windows of `ctx` (`eval::windows` with stride = ctx: each window
/// scores all but its first token), and every layer runs all windows at once
/// (`forward::layer_seqs`: one GEMM per module). A swap in layer `l` changes nothing before
/// layer `l`, so the residual stream entering every layer is kept for the recently evaluated
/// EQMs; an EQM restarts from the kept one that agrees with it on the most leading layers and
/// runs only the layers from its first difference on. The first EQM evaluated (the reference
/// every single swap starts from) is never evicted.
pub struct PrefixEval {
    /// The windows, in order; all `ctx` long but the last.
    seqs: Vec<Vec<u32>>,
    cache: Vec<Acts>,
    /// EQMs whose activations are kept (0: none).
    pub cache_limit: usize,
    /// Forward passes run, in whole-model equivalents (a run from layer l counts (L-l)/L).
    pub forward_equivalents: f64,
    /// A reference model's next-token distribution at every scored position, windows in
    /// order (`score_against`): each position then scores the cross-entropy against it
    /// instead of the NLL of the text's next token.
    reference: Option<Arc<Vec<f32>>>,
}

/// Summed NLL and scored tokens of each window of a perplexity: the windows are the units
/// of its sampling noise (`build::domains::chord_excess`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowNll {
    pub sums: Vec<f64>,
    pub counts: Vec<usize>,
}

impl WindowNll {
    pub fn ppl(&self) -> f64 {
        let n: usize = self.counts.iter().sum();
        (self.sums.iter().sum::<f64>() / n.max(1) as f64).exp()
    }
}

/// Residual stream entering layer `l` (index `l`), and leaving the last layer (index L), of
/// every window concatenated.
struct Acts {
    eqm: Eqm,
    layers: Vec<Arc<Vec<f32>>>,
}

impl PrefixEval {
    pub fn new(tokens: &[u32], ctx: usize, cache_limit: usize) -> Result<Self> {
        if ctx < 2 || tokens.len() < 2 {
            return Err(Error::input(format!(
                "perplexity of {} tokens in windows of {ctx}: needs at least 2 of each",
                tokens.len()
            )));
        }
        Ok(PrefixEval {
            seqs: tokens.chunks(ctx).map(|c| c.to_vec()).collect(),
            cache: Vec::new(),
            cache_limit,
            forward_equivalents: 0.0,
            reference: None,
        })
    }

    /// Scores every position against `w`'s next-token distribution there (cross-entropy:
    /// the KL divergence from `w` plus `w`'s entropy) instead of the text's next token, so a
    /// perplexity is `exp` of the mean cross-entropy. Runs `w` once; the kept activations of
    /// earlier EQMs are dropped (their scores were of the other kind).
    pub fn score_against(&mut self, w: &Weights) -> Result<()> {
        let mut x = self.embed(w)?;
        self.run(w, 0, &mut x, None);
        self.forward_equivalents += 1.0;
        let h = w.config.hidden_size;
        forward::final_norm(w, &mut x);
        let mut probs = Vec::new();
        let mut row = 0;
        for seq in &self.seqs {
            probs.extend(probs_of_rows(w, &x[row * h..(row + seq.len() - 1) * h]));
            row += seq.len();
        }
        self.cache.clear();
        self.reference = Some(Arc::new(probs));
        Ok(())
    }

    /// Scores against distributions `score_against` computed on the same windows.
    pub fn referenced(mut self, probs: Arc<Vec<f32>>) -> Self {
        self.reference = Some(probs);
        self
    }

    /// The reference distributions, when scoring against them.
    pub fn reference(&self) -> Option<&Arc<Vec<f32>>> {
        self.reference.as_ref()
    }

    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len()).sum()
    }

    /// The windows.
    pub fn seqs(&self) -> &[Vec<u32>] {
        &self.seqs
    }

    /// Tokens scored (the first of every window is not).
    fn scored(&self) -> usize {
        self.seqs.iter().map(|s| s.len() - 1).sum()
    }

    /// Runs layers `from..` of `w` on `x` (the residual entering `from`, every window), pushing
    /// the residual leaving each layer to `out` when given.
    fn run(
        &self,
        w: &Weights,
        from: usize,
        x: &mut [f32],
        mut out: Option<&mut Vec<Arc<Vec<f32>>>>,
    ) {
        let c = &w.config;
        let h = c.hidden_size;
        // Runs of equal-length windows (all but maybe the last) share one GEMM per module.
        let full = self.seqs[0].len();
        let n_full = self.seqs.iter().take_while(|s| s.len() == full).count();
        let split = n_full * full * h;
        let rope = Rope::new(c.rope_theta, c.head_dim(), 0, full);
        let rest = self
            .seqs
            .get(n_full)
            .map(|s| (s.len(), Rope::new(c.rope_theta, c.head_dim(), 0, s.len())));
        for l in from..c.num_hidden_layers {
            let (a, b) = x.split_at_mut(split);
            forward::layer_seqs(w, l, a, full, &rope);
            if let Some((len, rope)) = &rest {
                forward::layer_seqs(w, l, b, *len, rope);
            }
            if let Some(o) = out.as_deref_mut() {
                o.push(Arc::new(x.to_vec()));
            }
        }
    }

    /// Summed NLL of every window from the residual leaving the last layer.
    fn nll(&self, w: &Weights, last: &[f32]) -> f64 {
        self.window_nlls(w, last).sums.iter().sum()
    }

    /// Each window's summed NLL from the residual leaving the last layer.
    fn window_nlls(&self, w: &Weights, last: &[f32]) -> WindowNll {
        let h = w.config.hidden_size;
        let mut x = last.to_vec();
        forward::final_norm(w, &mut x);
        let vocab = w.config.vocab_size;
        let mut out = WindowNll::default();
        let (mut row, mut scored) = (0, 0);
        for seq in &self.seqs {
            let rows = &x[row * h..(row + seq.len() - 1) * h];
            out.sums.push(match &self.reference {
                Some(p) => cross_entropy_of_rows(
                    w,
                    rows,
                    &p[scored * vocab..(scored + seq.len() - 1) * vocab],
                ),
                None => nll_of_rows(w, rows, &seq[1..]),
            });
            out.counts.push(seq.len() - 1);
            row += seq.len();
            scored += seq.len() - 1;
        }
        out
    }

    /// Embeddings of every window, after checking the windows fit the model's context.
    fn embed(&self, w: &Weights) -> Result<Vec<f32>> {
        check_window(
            self.seqs[0].len(),
            self.seqs[0].len(),
            w.config.max_position_embeddings,
        )?;
        Ok(self
            .seqs
            .iter()
            .map(|s| forward::embed(w, s))
            .collect::<Result<Vec<_>>>()?
            .concat())
    }

    /// Perplexity of `w`, every layer run, nothing kept (the float model, one-off figures).
    pub fn ppl_of(&mut self, w: &Weights) -> Result<f64> {
        Ok(self.window_nlls_of(w)?.ppl())
    }

    /// Each window's NLL under `w`, every layer run, nothing kept (held-out figures with
    /// their standard errors).
    pub fn window_nlls_of(&mut self, w: &Weights) -> Result<WindowNll> {
        let mut x = self.embed(w)?;
        self.run(w, 0, &mut x, None);
        self.forward_equivalents += 1.0;
        Ok(self.window_nlls(w, &x))
    }

    /// Perplexity of `eqm`, reusing the best kept prefix of layers.
    pub fn ppl(&mut self, model: &EqmModel, eqm: &Eqm) -> Result<f64> {
        let w = model.weights(eqm)?;
        let nl = w.config.num_hidden_layers;
        let first_diff = |a: &Eqm| {
            (0..eqm.bits.len())
                .find(|&m| a.bits[m] != eqm.bits[m])
                .map_or(nl, |m| ModuleId::from_index(m).layer)
        };
        let best = self
            .cache
            .iter()
            .enumerate()
            .map(|(i, a)| (first_diff(&a.eqm), i))
            .max();
        let (l0, mut layers) = match best {
            Some((l0, i)) => (l0, self.cache[i].layers[..=l0].to_vec()),
            None => (0, vec![Arc::new(self.embed(&w)?)]),
        };
        if l0 < nl {
            let mut x = layers[l0].to_vec();
            self.run(&w, l0, &mut x, Some(&mut layers));
        }
        self.forward_equivalents += (nl - l0) as f64 / nl as f64;
        let nll = self.nll(&w, &layers[nl]);
        if self.cache_limit > 0 {
            self.cache.push(Acts {
                eqm: eqm.clone(),
                layers,
            });
            if self.cache.len() > self.cache_limit {
                // Keep the first (the reference), drop the oldest after it.
                self.cache.remove(if self.cache_limit > 1 { 1 } else { 0 });
            }
        }
        Ok((nll / self.scored() as f64).exp())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SwapEntry {
    pub module: String,
    pub layer: usize,
    pub kind: String,
    pub ppl: f64,
    pub delta: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SingleSwap {
    pub from_bits: u32,
    pub to_bits: u32,
    pub tokens: usize,
    pub ctx: usize,
    pub base_ppl: f64,
    pub entries: Vec<SwapEntry>,
    pub delta_min: f64,
    pub delta_median: f64,
    pub delta_p90: f64,
    pub delta_max: f64,
}

/// The paper's single-swap check: in QM(`from`), replace each module in turn by its `to`-bit
/// version and measure the perplexity change.
pub fn single_swap(
    model: &EqmModel,
    from: u32,
    to: u32,
    tokens: &[u32],
    ctx: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SingleSwap> {
    let base = model.uniform(from);
    let mut prefix = PrefixEval::new(tokens, ctx, 2)?;
    let base_ppl = prefix.ppl(model, &base)?;
    let n = model.modules();
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let id = ModuleId::from_index(i);
        let mut eqm: Eqm = base.clone();
        eqm.set(id, to);
        let ppl = prefix.ppl(model, &eqm)?;
        entries.push(SwapEntry {
            module: id.to_string(),
            layer: id.layer,
            kind: id.kind.name().into(),
            ppl,
            delta: ppl - base_ppl,
        });
        progress(i + 1, n);
    }
    let mut d: Vec<f64> = entries.iter().map(|e| e.delta).collect();
    d.sort_by(f64::total_cmp);
    let q = |p: f64| d[((d.len() - 1) as f64 * p).round() as usize];
    Ok(SingleSwap {
        from_bits: from,
        to_bits: to,
        tokens: tokens.len(),
        ctx,
        base_ppl,
        delta_min: q(0.0),
        delta_median: q(0.5),
        delta_p90: q(0.9),
        delta_max: q(1.0),
        entries,
    })
}
