//! Perplexity over a long text with a sliding window.
//!
//! Window: `ctx` tokens starting every `stride` tokens (Hugging Face's recipe). Each token is
//! scored at most once, in the first window that reaches it, conditioned on everything before
//! it inside that window. `stride == ctx` gives non-overlapping windows (cheapest: each token is
//! run once; the first token of each window has no context and is not scored); `stride < ctx`
//! gives every scored token at least `ctx - stride` tokens of context at the cost of
//! `ctx / stride` times the compute.

use crate::error::{Error, Result};
use crate::model::forward::{self, KvCache};
use crate::model::ops;
use crate::model::weights::Weights;
use rayon::prelude::*;
use serde::Serialize;

/// Rows of logits materialised at once (bounds memory at this x vocab floats).
const LOGIT_CHUNK: usize = 128;

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub nll_sum: f64,
    /// Tokens scored.
    pub count: usize,
    /// Tokens in the text.
    pub tokens: usize,
    pub ctx: usize,
    pub stride: usize,
    pub seconds: f64,
}

/// The windows `(begin, end, first_scored)` of the recipe above.
pub fn windows(n: usize, ctx: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + ctx).min(n);
        let first = prev_end.max(begin + 1);
        if first < end {
            out.push((begin, end, first));
        }
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

pub fn check_window(ctx: usize, stride: usize, max_ctx: usize) -> Result<()> {
    if ctx < 2 || ctx > max_ctx {
        return Err(Error::input(format!(
            "--ctx {ctx} must be between 2 and the model's context of {max_ctx}"
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(Error::input(format!(
            "--stride {stride} must be between 1 and --ctx {ctx}"
        )));
    }
    Ok(())
}

/// Negative log-likelihood of `targets[i]` under logits row `i` of `hidden` rows.
pub fn nll_of_rows(w: &Weights, hidden: &[f32], targets: &[u32]) -> f64 {
    let (h, vocab) = (w.config.hidden_size, w.config.vocab_size);
    let mut nll = 0.0;
    for (rows, tg) in hidden
        .chunks(LOGIT_CHUNK * h)
        .zip(targets.chunks(LOGIT_CHUNK))
    {
        let lg = forward::logits(w, rows);
        nll += lg
            .par_chunks_exact(vocab)
            .zip(tg.par_iter())
            .map(|(row, &t)| ops::log_sum_exp(row) - row[t as usize] as f64)
            .sum::<f64>();
    }
    nll
}

/// Cross-entropy of logits row `i` of `hidden` rows against `probs` row `i` (a reference
/// model's next-token distribution, `vocab` floats per row): the KL divergence from the
/// reference plus the reference's own entropy, summed over the rows. Unlike the NLL of the
/// text's tokens, it has no sampling noise from which token the text happened to hold.
pub fn cross_entropy_of_rows(w: &Weights, hidden: &[f32], probs: &[f32]) -> f64 {
    let (h, vocab) = (w.config.hidden_size, w.config.vocab_size);
    assert_eq!(
        hidden.len() / h * vocab,
        probs.len(),
        "one distribution per row"
    );
    let mut ce = 0.0;
    for (rows, p) in hidden
        .chunks(LOGIT_CHUNK * h)
        .zip(probs.chunks(LOGIT_CHUNK * vocab))
    {
        let lg = forward::logits(w, rows);
        ce += lg
            .par_chunks_exact(vocab)
            .zip(p.par_chunks_exact(vocab))
            .map(|(row, p)| {
                let expected: f64 = p.iter().zip(row).map(|(&p, &z)| p as f64 * z as f64).sum();
                ops::log_sum_exp(row) - expected
            })
            .sum::<f64>();
    }
    ce
}

/// The next-token distribution (softmax of the logits) of every row of `hidden`.
pub fn probs_of_rows(w: &Weights, hidden: &[f32]) -> Vec<f32> {
    let (h, vocab) = (w.config.hidden_size, w.config.vocab_size);
    let mut out = Vec::with_capacity(hidden.len() / h * vocab);
    for rows in hidden.chunks(LOGIT_CHUNK * h) {
        let mut lg = forward::logits(w, rows);
        lg.par_chunks_exact_mut(vocab).for_each(|row| {
            let lse = ops::log_sum_exp(row) as f32;
            row.iter_mut().for_each(|z| *z = (*z - lse).exp());
        });
        out.extend_from_slice(&lg);
    }
    out
}

/// Perplexity of `tokens`; `progress(done, total)` is called after every window.
pub fn perplexity(
    w: &Weights,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let h = w.config.hidden_size;
    let mut cache = KvCache::new(w, ctx);
    let max = w.config.max_position_embeddings;
    perplexity_with(tokens, ctx, stride, max, &mut progress, |win, skip| {
        cache.clear();
        let x = forward::hidden(w, win, &mut cache)?;
        // Row r predicts token r + 1 of the window.
        let rows = &x[(skip - 1) * h..(win.len() - 1) * h];
        Ok(nll_of_rows(w, rows, &win[skip..]))
    })
}

/// The recipe above over any model: `nll(window, skip)` returns the summed negative
/// log-likelihood of `window[skip..]`, each token conditioned on the window before it.
pub fn perplexity_with<E: From<Error>>(
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    max_ctx: usize,
    progress: &mut dyn FnMut(usize, usize),
    mut nll: impl FnMut(&[u32], usize) -> std::result::Result<f64, E>,
) -> std::result::Result<Perplexity, E> {
    check_window(ctx, stride, max_ctx)?;
    if tokens.len() < 2 {
        return Err(Error::input(format!(
            "text has {} tokens; perplexity needs at least 2",
            tokens.len()
        ))
        .into());
    }
    let start = std::time::Instant::now();
    let wins = windows(tokens.len(), ctx, stride);
    let (mut nll_sum, mut count) = (0.0, 0);
    for (i, &(begin, end, first)) in wins.iter().enumerate() {
        nll_sum += nll(&tokens[begin..end], first - begin)?;
        count += end - first;
        progress(i + 1, wins.len());
    }
    Ok(Perplexity {
        ppl: (nll_sum / count as f64).exp(),
        nll_sum,
        count,
        tokens: tokens.len(),
        ctx,
        stride,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_every_token_at_most_once() {
        for (n, ctx, stride) in [(10, 4, 4), (10, 4, 2), (10, 4, 3), (3, 8, 8), (100, 16, 5)] {
            let mut scored = vec![0; n];
            let mut prev_end = 0;
            let mut starts_without_context = 0;
            for (b, e, f) in windows(n, ctx, stride) {
                assert!(e - b <= ctx && b < f && f <= e);
                if b >= prev_end {
                    starts_without_context += 1; // token b has no context in its window
                }
                prev_end = e;
                for s in &mut scored[f..e] {
                    *s += 1;
                }
            }
            assert!(
                scored.iter().all(|&c| c <= 1),
                "{n} {ctx} {stride}: {scored:?}"
            );
            let unscored = scored.iter().filter(|&&c| c == 0).count();
            assert_eq!(
                unscored, starts_without_context,
                "{n} {ctx} {stride}: {scored:?}"
            );
        }
    }
}
