//! Scoring quantized models against the float one: perplexity plus each position's top-1
//! token (for agreement), and the paper's single-swap check with cached layer prefixes.
//!
//! Windows are non-overlapping (`eval::windows` with stride = ctx), so the perplexities equal
//! `eval::perplexity(w, tokens, ctx, ctx)`.

use crate::error::{Error, Result};
use crate::model::eval::{check_window, nll_of_rows, windows};
use crate::model::forward::{self, KvCache};
use crate::model::ops::{self, Rope};
use crate::model::weights::{ModuleId, Weights};
use crate::quant::eqm::{Eqm, EqmModel};
use rayon::prelude::*;
use serde::Serialize;

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

/// Perplexity of models that equal a reference model in their first layers: the reference's
/// input to every layer is cached per window, so a model that differs from layer `l` on only
/// re-runs layers `l..` (half the layers on average for a single-module swap).
pub struct PrefixEval {
    tokens: Vec<u32>,
    ctx: usize,
    /// `[window][layer]` hidden states entering the layer.
    inputs: Vec<Vec<Vec<f32>>>,
    pub reference_ppl: f64,
}

impl PrefixEval {
    pub fn new(reference: &Weights, tokens: &[u32], ctx: usize) -> Result<Self> {
        check(reference, tokens, ctx)?;
        let mut e = PrefixEval {
            tokens: tokens.to_vec(),
            ctx,
            inputs: Vec::new(),
            reference_ppl: 0.0,
        };
        let mut nll = 0.0;
        for (begin, end, first) in windows(tokens.len(), ctx, ctx) {
            let mut x = forward::embed(reference, &tokens[begin..end])?;
            let mut per_layer = Vec::new();
            nll += e.finish(
                reference,
                0,
                &mut x,
                (begin, end, first),
                Some(&mut per_layer),
            );
            e.inputs.push(per_layer);
        }
        e.reference_ppl = (nll / e.scored() as f64).exp();
        Ok(e)
    }

    /// Tokens scored (the first of every window is not).
    fn scored(&self) -> usize {
        windows(self.tokens.len(), self.ctx, self.ctx)
            .iter()
            .map(|(_, end, first)| end - first)
            .sum()
    }

    /// Runs layers `from..` on `x` (one window's hidden states) and returns its NLL sum.
    fn finish(
        &self,
        w: &Weights,
        from: usize,
        x: &mut [f32],
        (begin, end, first): (usize, usize, usize),
        mut record: Option<&mut Vec<Vec<f32>>>,
    ) -> f64 {
        let c = &w.config;
        let rope = Rope::new(c.rope_theta, c.head_dim(), 0, end - begin);
        let mut cache = KvCache::new(w, self.ctx);
        for l in from..c.num_hidden_layers {
            if let Some(r) = record.as_deref_mut() {
                r.push(x.to_vec());
            }
            forward::layer(w, l, x, 0, &mut cache, &rope);
        }
        forward::final_norm(w, x);
        let h = c.hidden_size;
        nll_of_rows(
            w,
            &x[(first - 1 - begin) * h..(end - 1 - begin) * h],
            &self.tokens[first..end],
        )
    }

    /// Perplexity of `w`, which must equal the reference in layers `..from` and in the
    /// embedding (not checked: the caller knows what it changed).
    pub fn ppl_from(&self, w: &Weights, from: usize) -> Result<f64> {
        let mut nll = 0.0;
        for (inputs, bounds) in
            self.inputs
                .iter()
                .zip(windows(self.tokens.len(), self.ctx, self.ctx))
        {
            let mut x = inputs[from].clone();
            nll += self.finish(w, from, &mut x, bounds, None);
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
    let prefix = PrefixEval::new(&model.weights(&base)?, tokens, ctx)?;
    let n = model.modules();
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let id = ModuleId::from_index(i);
        let mut eqm: Eqm = base.clone();
        eqm.set(id, to);
        let ppl = prefix.ppl_from(&model.weights(&eqm)?, id.layer)?;
        entries.push(SwapEntry {
            module: id.to_string(),
            layer: id.layer,
            kind: id.kind.name().into(),
            ppl,
            delta: ppl - prefix.reference_ppl,
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
        base_ppl: prefix.reference_ppl,
        delta_min: q(0.0),
        delta_median: q(0.5),
        delta_p90: q(0.9),
        delta_max: q(1.0),
        entries,
    })
}
