//! Generation on the GPU path: prefill, then one token per step with only the top-k
//! candidates read back, streamed to the caller as they come. The conversation's tokens stay
//! in the KV cache between turns (and across module swaps); a new turn prefills only what
//! differs from them.

use crate::gpu::error::{GpuError, GpuResult};
use crate::gpu::model::Model;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass, taken over the model's top-k candidates.
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the cache).
    pub prefilled: usize,
    pub generated: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub stopped_by: &'static str,
}

/// A conversation on a GPU model.
pub struct Session {
    pub model: Model,
    tokens: Vec<u32>,
    rng: u64,
}

/// One answer being generated, token by token (`Session::start`, then `Session::next` until
/// it returns `None`). Between two `next` calls the caller may swap modules or even replace
/// the model (`Session::replace_model`): the turn only holds the last candidates and the
/// sampled token that has not been run yet.
pub struct Turn {
    sampling: Sampling,
    stop: Vec<u32>,
    cand: Vec<(u32, f32)>,
    /// Sampled and returned, not yet in the KV cache.
    pending: Option<u32>,
    pub out: Vec<u32>,
    pub stats: GenStats,
    decode_start: f64,
    done: bool,
}

impl Turn {
    pub fn is_done(&self) -> bool {
        self.done
    }
    /// Ends the turn early (an interrupt); `stopped_by` names why.
    pub fn stop(&mut self, stopped_by: &'static str) {
        if !self.done {
            self.finish(stopped_by);
        }
    }
    fn finish(&mut self, stopped_by: &'static str) {
        self.done = true;
        self.stats.stopped_by = stopped_by;
        self.stats.generated = self.out.len();
        self.stats.decode_seconds = now() - self.decode_start;
    }
}

impl Session {
    pub fn new(model: Model) -> Self {
        Session {
            model,
            tokens: Vec::new(),
            rng: 0,
        }
    }

    /// The tokens in the KV cache (the conversation so far, as run).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets the conversation.
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.model.truncate(0);
    }

    /// Puts another model (e.g. rebuilt on a new device) under the conversation and runs the
    /// conversation's tokens into its KV cache; returns how many were run.
    pub fn replace_model(&mut self, model: Model) -> GpuResult<usize> {
        self.model = model;
        self.model.truncate(0);
        if !self.tokens.is_empty() {
            self.model.prefill(&self.tokens)?;
        }
        Ok(self.tokens.len())
    }

    /// Prefills `prompt` (the whole conversation so far; the cached common prefix is reused)
    /// and returns the turn that `next` continues.
    pub async fn start(&mut self, prompt: &[u32], s: &Sampling, stop: &[u32]) -> GpuResult<Turn> {
        let context = self.model.options().context;
        if prompt.is_empty() || prompt.len() >= context {
            return Err(GpuError::Input(format!(
                "the prompt has {} tokens; it must be 1..{context} (leave room for the answer)",
                prompt.len()
            )));
        }
        let shared = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.model.truncate(shared);
        self.tokens.truncate(shared);
        self.rng = s.seed;
        let t0 = now();
        let cand = self.model.step(&prompt[shared..]).await?;
        self.tokens.extend_from_slice(&prompt[shared..]);
        let stats = GenStats {
            prompt_tokens: prompt.len(),
            prefilled: prompt.len() - shared,
            prefill_seconds: now() - t0,
            ..Default::default()
        };
        Ok(Turn {
            sampling: *s,
            stop: stop.to_vec(),
            cand,
            pending: None,
            out: Vec::new(),
            stats,
            decode_start: now(),
            done: false,
        })
    }

    /// The next token of the turn, or `None` when it has ended (`turn.stats.stopped_by`
    /// says why: "eos", "max_tokens", "context" or what `Turn::stop` was given). On an error
    /// the turn can be retried with `next` (after `replace_model` if the device was lost).
    pub async fn next(&mut self, turn: &mut Turn) -> GpuResult<Option<u32>> {
        if turn.done {
            return Ok(None);
        }
        if let Some(id) = turn.pending {
            if self.model.len() + 1 > self.model.options().context {
                turn.finish("context");
                return Ok(None);
            }
            // `step` leaves the model's length as it was on error, so a retry is exact.
            let len = self.model.len();
            match self.model.step(&[id]).await {
                Ok(c) => turn.cand = c,
                Err(e) => {
                    self.model.truncate(len);
                    return Err(e);
                }
            }
            self.tokens.push(id);
            turn.pending = None;
        }
        let id = self.sample(&turn.cand, &turn.sampling);
        if turn.stop.contains(&id) {
            turn.finish("eos");
            return Ok(None);
        }
        turn.out.push(id);
        turn.stats.generated = turn.out.len();
        if turn.out.len() >= turn.sampling.max_tokens {
            turn.finish("max_tokens");
        } else {
            turn.pending = Some(id);
        }
        Ok(Some(id))
    }

    /// Generates after `prompt` (the whole conversation so far), calling `on_token(id)` with
    /// each new token until `stop`, `max_tokens`, the context, or `on_token` returning false.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> GpuResult<(Vec<u32>, GenStats)> {
        let mut turn = self.start(prompt, s, stop).await?;
        while let Some(id) = self.next(&mut turn).await? {
            if !on_token(id) {
                turn.stop("caller");
            }
        }
        Ok((turn.out, turn.stats))
    }

    /// Greedy at temperature 0; else nucleus sampling over the softmax of the candidates.
    fn sample(&mut self, cand: &[(u32, f32)], s: &Sampling) -> u32 {
        if s.temperature == 0.0 || cand.len() == 1 {
            return cand[0].0;
        }
        let m = cand[0].1;
        let p: Vec<f32> = cand
            .iter()
            .map(|c| ((c.1 - m) / s.temperature).exp())
            .collect();
        let total: f32 = p.iter().sum();
        let mut kept = 0.0;
        let mut n = 0;
        for q in &p {
            kept += q;
            n += 1;
            if kept >= s.top_p * total {
                break;
            }
        }
        let mut r = self.next_f32() * kept;
        for (c, q) in cand.iter().zip(&p).take(n) {
            r -= q;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[n - 1].0
    }

    /// SplitMix64, as the CPU path's sampler.
    fn next_f32(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Seconds on a monotonic clock natively; in wasm32 (no `Instant`) the wall clock in ms
/// resolution, enough for tokens/s.
fn now() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
    }
    #[cfg(target_arch = "wasm32")]
    {
        js_sys::Date::now() / 1000.0
    }
}

/// Perplexity over `tokens` with the sliding windows of the CPU path (`model::eval`), each
/// token's NLL computed on the GPU. Needs `logit_rows` > 1 to be quick.
#[cfg(not(target_arch = "wasm32"))]
pub async fn perplexity(
    model: &mut Model,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    mut progress: impl FnMut(usize, usize),
) -> GpuResult<crate::model::eval::Perplexity> {
    use crate::model::eval::{check_window, windows, Perplexity};
    check_window(ctx, stride, model.options().context)?;
    if tokens.len() < 2 {
        return Err(GpuError::Input("perplexity needs at least 2 tokens".into()));
    }
    let start = std::time::Instant::now();
    let wins = windows(tokens.len(), ctx, stride);
    let (mut nll_sum, mut count) = (0.0, 0);
    for (i, &(begin, end, first)) in wins.iter().enumerate() {
        model.truncate(0);
        // Positions before first - 1 only fill the cache; rows first-1..end-1 predict first..end.
        if first - 1 > begin {
            model.prefill(&tokens[begin..first - 1])?;
        }
        let nll = model
            .nll(&tokens[first - 1..end - 1], &tokens[first..end])
            .await?;
        nll_sum += nll.iter().map(|v| *v as f64).sum::<f64>();
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
