//! Generation, shared by the CPU reference and every backend: sampling settings (validated),
//! the RNG, sampling over a backend's top candidates, stop reasons and stats. The conversation
//! loop itself (prefix reuse, one token per call) is `runtime::session`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the next token is drawn. Greedy at `temperature` 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass, taken over the candidates.
    pub top_p: f32,
    /// Candidates sampled from, best first (0: all the backend returns, `TOP_K`).
    pub top_k: usize,
    pub max_tokens: usize,
    pub seed: u64,
    /// OpenAI's penalties on tokens already in this answer: `frequency_penalty` times their
    /// count plus `presence_penalty` once, subtracted from their logits. In [-2, 2].
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`, in [-100, 100]). A
    /// token with a positive bias is *watched*: its logit comes back with the candidates even
    /// when it is not among them (`Backend::watch`), so the bias is exact.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: 256,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl Sampling {
    /// The defaults of a chat answer where the request does not say (the browser's and the
    /// CLI's): OpenAI-like temperature 0.7, nucleus 0.95, 256 tokens.
    pub fn chat() -> Self {
        Sampling {
            temperature: 0.7,
            top_p: 0.95,
            ..Sampling::default()
        }
    }

    /// Rejects settings that cannot mean what the caller wanted, naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if self.top_k > TOP_K {
            return Err(Error::input(format!(
                "top_k {} is more than the {TOP_K} candidates a backend returns per token",
                self.top_k
            )));
        }
        for (name, p) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&p) {
                return Err(Error::input(format!("{name} {p} must be in [-2, 2]")));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(Error::input(format!(
                "logit_bias has {} entries, at most {MAX_LOGIT_BIAS} are allowed",
                self.logit_bias.len()
            )));
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(Error::input(format!(
                "logit_bias[{id}] = {b} must be in [-100, 100]"
            )));
        }
        Ok(())
    }

    /// Tokens whose logits must come back even outside the top candidates: those with a
    /// positive bias (a negative bias or a penalty only lowers a logit, so a token outside
    /// the candidates stays outside).
    pub fn watched(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .logit_bias
            .iter()
            .filter(|(_, b)| *b > 0.0)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// `cand` (top candidates, then any watched tokens outside them) with the logit bias and
    /// the penalties for the tokens of `answer` applied, best first again. Exact whenever the
    /// tokens sampled from stay at or above the lowest top candidate, which the penalties'
    /// range all but guarantees with 40 candidates.
    pub fn adjust(&self, cand: &[(u32, f32)], answer: &[u32]) -> Vec<(u32, f32)> {
        let mut out = cand.to_vec();
        let penalized = self.frequency_penalty != 0.0 || self.presence_penalty != 0.0;
        if self.logit_bias.is_empty() && !penalized {
            return out;
        }
        for c in &mut out {
            if let Some((_, b)) = self.logit_bias.iter().find(|(id, _)| *id == c.0) {
                c.1 += b;
            }
            if penalized {
                let n = answer.iter().filter(|&&t| t == c.0).count();
                if n > 0 {
                    c.1 -= self.frequency_penalty * n as f32 + self.presence_penalty;
                }
            }
        }
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// Most `logit_bias` entries a request may give (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced a stop token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The KV cache is full.
    Context,
    /// The caller ended it (an interrupt or a callback returning false).
    Caller,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::Context => "context",
            StopReason::Caller => "caller",
        }
    }

    /// The OpenAI `finish_reason`.
    pub fn finish_reason(self) -> &'static str {
        match self {
            StopReason::Eos => "stop",
            StopReason::Caller => "abort",
            StopReason::MaxTokens | StopReason::Context => "length",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run (the rest came from the KV cache).
    pub prefilled: usize,
    pub generated: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// `None` while the answer runs.
    pub stopped_by: Option<StopReason>,
}

impl GenStats {
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        (self.generated > 1 && self.decode_seconds > 0.0)
            .then(|| self.generated as f64 / self.decode_seconds)
    }
    pub fn prefill_tokens_per_s(&self) -> Option<f64> {
        (self.prefilled > 0 && self.prefill_seconds > 0.0)
            .then(|| self.prefilled as f64 / self.prefill_seconds)
    }
}

/// SplitMix64: tiny, seedable, good enough to draw tokens reproducibly.
#[derive(Debug, Clone)]
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

/// Candidates returned per token by every backend, so that sampling at a temperature draws
/// from the same set on each.
pub const TOP_K: usize = 40;

/// `top` (best first) followed by the logits of the `watched` tokens not among them: what
/// `Backend::step` returns.
pub fn with_watched(mut top: Vec<(u32, f32)>, watched: &[u32], logits: &[f32]) -> Vec<(u32, f32)> {
    let extra: Vec<(u32, f32)> = watched
        .iter()
        .filter(|id| !top.iter().any(|c| c.0 == **id))
        .filter_map(|&id| logits.get(id as usize).map(|&l| (id, l)))
        .collect();
    top.extend(extra);
    top
}

/// Most tokens a backend watches: the logit biases' and JSON mode's (`json_mode`).
pub const MAX_WATCHED: usize = MAX_LOGIT_BIAS + 128;

/// Checks a watch list against the vocabulary and its size limit.
pub fn check_watch(ids: &[u32], vocab: usize) -> Result<()> {
    if ids.len() > MAX_WATCHED {
        return Err(Error::input(format!(
            "{} watched tokens, at most {MAX_WATCHED}",
            ids.len()
        )));
    }
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::input(format!(
            "logit_bias: token {id} is not in the vocabulary ({vocab} tokens)"
        ))),
        None => Ok(()),
    }
}

/// The `k` largest finite logits `(token, logit)`, best first (ties: the lower id first, as
/// the GPU top-k kernel orders them). One pass keeping the `k` best in order: no
/// vocabulary-sized copy (it runs for every token, and for every prompt position scored).
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k.min(logits.len()) + 1);
    if k == 0 {
        return best;
    }
    for (i, &l) in logits.iter().enumerate() {
        // Ids come in ascending order, so an equal logit ranks below every kept one.
        let full = best.len() == k;
        if !l.is_finite() || full && l <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|c| c.1 >= l);
        best.insert(at, (i as u32, l));
        if full {
            best.pop();
        }
    }
    best
}

/// Draws a token from `cand` (best first): the first at temperature 0, else nucleus sampling
/// over the softmax of the candidates at `s.temperature`. Candidates that are not finite are
/// never drawn; none at all is `Error::NonFiniteLogits` (`tokens`: the sequence length so far,
/// for the message).
pub fn sample(cand: &[(u32, f32)], s: &Sampling, rng: &mut Rng, tokens: usize) -> Result<u32> {
    let keep = if s.top_k == 0 { usize::MAX } else { s.top_k };
    let cand: Vec<(u32, f32)> = cand
        .iter()
        .copied()
        .filter(|c| c.1.is_finite())
        .take(keep)
        .collect();
    let Some(&(best, m)) = cand.first() else {
        return Err(Error::NonFiniteLogits { tokens });
    };
    if s.temperature == 0.0 || cand.len() == 1 {
        return Ok(best);
    }
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
    let mut r = rng.next_f32() * kept;
    for (c, q) in cand.iter().zip(&p).take(n) {
        r -= q;
        if r <= 0.0 {
            return Ok(c.0);
        }
    }
    Ok(cand[n - 1].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_equals_the_first_k_of_the_whole_row_sorted() {
        let mut rng = Rng::new(7);
        for len in [0, 1, 5, 64, 1000] {
            // Few distinct values (many ties), and some that are not finite.
            let row: Vec<f32> = (0..len)
                .map(|_| match (rng.next_f32() * 12.0) as u32 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    v => v as f32 * 0.5 - 2.0,
                })
                .collect();
            let mut all: Vec<(u32, f32)> = (0..len as u32)
                .zip(row.iter().copied())
                .filter(|c| c.1.is_finite())
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for k in [0, 1, 3, 40, 999, 2000] {
                let want = &all[..k.min(all.len())];
                assert_eq!(top_k(&row, k), want, "len {len}, k {k}");
            }
        }
    }

    #[test]
    fn bias_and_penalties_reorder_candidates() {
        let cand = [(5, 3.0), (7, 2.5), (9, 1.0), (2, -4.0)];
        let s = Sampling {
            logit_bias: vec![(9, 2.0), (2, 100.0)],
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Sampling::default()
        };
        // 5 appears twice in the answer: 3.0 - 2 * 0.5 - 0.25 = 1.75.
        let got = s.adjust(&cand, &[5, 5, 1]);
        assert_eq!(got, vec![(2, 96.0), (9, 3.0), (7, 2.5), (5, 1.75)]);
        assert_eq!(s.watched(), vec![2, 9]);
        assert_eq!(sample(&got, &s, &mut Rng::new(1), 0).unwrap(), 2);
        let nan = [(0, f32::NAN), (1, f32::INFINITY), (2, f32::NEG_INFINITY)];
        assert!(matches!(
            sample(&nan, &s, &mut Rng::new(1), 7),
            Err(Error::NonFiniteLogits { tokens: 7 })
        ));
        // Nothing asked: unchanged.
        assert_eq!(Sampling::default().adjust(&cand, &[5]), cand.to_vec());
    }

    #[test]
    fn out_of_range_penalties_and_biases_are_rejected() {
        let bad = [
            Sampling {
                frequency_penalty: 2.5,
                ..Sampling::default()
            },
            Sampling {
                presence_penalty: f32::NAN,
                ..Sampling::default()
            },
            Sampling {
                logit_bias: vec![(1, 101.0)],
                ..Sampling::default()
            },
            Sampling {
                logit_bias: vec![(1, 1.0); MAX_LOGIT_BIAS + 1],
                ..Sampling::default()
            },
        ];
        for s in bad {
            assert!(s.validate().is_err(), "{s:?}");
        }
        assert!(check_watch(&[10], 10).is_err());
        assert_eq!(
            with_watched(vec![(3, 1.0)], &[3, 0], &[0.5, 0.0, 0.0, 1.0]),
            vec![(3, 1.0), (0, 0.5)]
        );
    }
}
