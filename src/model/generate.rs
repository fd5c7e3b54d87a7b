//! Sampling and the generation loop of the CPU path, with a KV cache kept across turns.

use crate::error::{Error, Result};
use crate::model::forward::{self, KvCache};
use crate::model::ops;
use crate::model::tokenizer::{StreamDecoder, Tokenizer};
use crate::model::weights::Weights;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: 256,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(format!(
                "temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if self.max_tokens == 0 {
            return Err(Error::input("max_tokens must be at least 1"));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, seedable, good enough to draw tokens reproducibly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Greedy at temperature 0, else nucleus sampling over the softmax at `temperature`.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        return ops::argmax(logits) as u32;
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - m) / p.temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|x| x.1).sum();
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0f32;
    let mut n = 0;
    for &(_, q) in &probs {
        kept += q;
        n += 1;
        if kept >= p.top_p * total {
            break;
        }
    }
    let mut r = rng.next_f32() * kept;
    for &(id, q) in &probs[..n] {
        r -= q;
        if r <= 0.0 {
            return id;
        }
    }
    probs[n - 1].0
}

#[derive(Debug, Clone, Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the cache).
    pub prefilled: usize,
    pub generated: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub stopped_by: &'static str,
}

/// A conversation's state: the tokens in the KV cache. A new turn re-uses the longest common
/// prefix and prefills only the rest.
pub struct Session<'a> {
    pub weights: &'a Weights,
    pub tokenizer: &'a Tokenizer,
    cache: KvCache,
    tokens: Vec<u32>,
}

impl<'a> Session<'a> {
    pub fn new(weights: &'a Weights, tokenizer: &'a Tokenizer, context: usize) -> Self {
        Session {
            weights,
            tokenizer,
            cache: KvCache::new(weights, context),
            tokens: Vec::new(),
        }
    }

    pub fn context(&self) -> usize {
        self.cache.capacity()
    }

    /// Generates after `prompt` (the whole context so far), calling `on_text` with each new
    /// piece of text; `on_text` returns false to stop early.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<(Vec<u32>, GenStats)> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::input("the prompt is empty"));
        }
        if prompt.len() >= self.context() {
            return Err(Error::input(format!(
                "the prompt has {} tokens; the context holds {} (leave room for the answer)",
                prompt.len(),
                self.context()
            )));
        }
        let shared = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.cache.truncate(shared);
        self.tokens.truncate(shared);
        let t0 = std::time::Instant::now();
        let mut logits = forward::forward_last(self.weights, &prompt[shared..], &mut self.cache)?;
        self.tokens.extend_from_slice(&prompt[shared..]);
        let prefill_seconds = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let mut rng = Rng::new(params.seed);
        let mut out = Vec::new();
        let mut dec = StreamDecoder::default();
        let mut stopped_by = "max_tokens";
        loop {
            let id = sample(&logits, params, &mut rng);
            if self.tokenizer.stop.contains(&id) {
                stopped_by = "eos";
                break;
            }
            out.push(id);
            let piece = dec.step(self.tokenizer, id)?;
            if !piece.is_empty() && !on_text(&piece) {
                stopped_by = "caller";
                break;
            }
            if out.len() >= params.max_tokens {
                break;
            }
            if self.cache.len() + 1 > self.context() {
                stopped_by = "context";
                break;
            }
            logits = forward::forward_last(self.weights, &[id], &mut self.cache)?;
            self.tokens.push(id);
        }
        let stats = GenStats {
            prompt_tokens: prompt.len(),
            prefilled: prompt.len() - shared,
            generated: out.len(),
            prefill_seconds,
            decode_seconds: t1.elapsed().as_secs_f64(),
            stopped_by,
        };
        Ok((out, stats))
    }
}
