//! A conversation on any backend: prefill, then one token per `next` call, streamed to the
//! caller as it comes. The conversation's tokens stay in the KV cache between turns (and across
//! module swaps); a new turn prefills only what differs from them.

use crate::error::Error;
use crate::runtime::backend::{Backend, KvFormat};
use crate::runtime::clock::now_seconds;
use crate::runtime::generate::{sample, GenStats, Rng, Sampling, StopReason};
use crate::runtime::json_constraint::{JsonConstraint, Lead};

pub struct Session<B: Backend> {
    pub model: B,
    tokens: Vec<u32>,
    /// The running turn's watched tokens (`Sampling::watched`), set again on a new model.
    watched: Vec<u32>,
}

/// One answer being generated, token by token (`Session::start`, then `Session::next` until
/// it returns `None`). Between two `next` calls the caller may swap modules or even replace
/// the model (`Session::replace_model`): the turn only holds the last candidates and the
/// sampled token that has not been run yet.
pub struct Turn {
    sampling: Sampling,
    rng: Rng,
    stop: Vec<u32>,
    cand: Vec<(u32, f32)>,
    /// Sampled and returned, not yet in the KV cache.
    pending: Option<u32>,
    /// JSON mode and logprobs (`TurnOptions`).
    opts: TurnOptions,
    /// The log-probabilities of the token `next` returned last, when asked for.
    pub logprob: Option<TokenLogprob>,
    /// With `TurnOptions::prompt_logprobs`: each prompt token's log-probability given the
    /// tokens before it (`None` for the first, which has none), else empty.
    pub prompt_logprobs: Vec<Option<TokenLogprob>>,
    pub out: Vec<u32>,
    pub stats: GenStats,
    decode_start: f64,
}

impl Turn {
    /// Where the answer stands against its JSON constraint (JSON mode or a tool call): JSON,
    /// text, or not known yet; `None` without one.
    pub fn lead(&self) -> Option<&Lead> {
        self.opts.json.as_ref().map(JsonConstraint::lead)
    }

    pub fn is_done(&self) -> bool {
        self.stats.stopped_by.is_some()
    }
    /// Ends the turn early (an interrupt).
    pub fn stop(&mut self, why: StopReason) {
        if !self.is_done() {
            self.finish(why);
        }
    }
    fn finish(&mut self, why: StopReason) {
        self.stats.stopped_by = Some(why);
        self.stats.generated = self.out.len();
        self.stats.decode_seconds = now_seconds() - self.decode_start;
    }
}

/// What a turn does besides sampling.
#[derive(Debug, Clone, Default)]
pub struct TurnOptions {
    /// JSON mode: only tokens that keep the answer a JSON object's prefix are drawn.
    pub json: Option<JsonConstraint>,
    /// OpenAI's `logprobs`: each token's log-probability and this many most likely
    /// alternatives (`top_logprobs`, at most `MAX_TOP_LOGPROBS`) in `Turn::logprob`.
    pub logprobs: Option<usize>,
    /// The prompt's tokens scored too (`Turn::prompt_logprobs`, `logprobs` alternatives each;
    /// OpenAI's legacy `echo` with `logprobs`, `Backend::step_scored`): the prompt runs from
    /// the start, none of the KV cache reused, since every position's logits are needed.
    pub prompt_logprobs: bool,
}

/// Most alternatives `TurnOptions::logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token's log-probability under the model (before temperature, penalties,
/// bias and JSON mode: its logit minus `Backend::log_z`) and the most likely tokens at its
/// position with theirs, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// Token `id` among `cand` (a `step`'s candidates, best first, watched ones after them)
    /// with the `n` best, as log-probabilities (`log_z`: `Backend::log_z`). NaN when `id` is
    /// not among them (it is when watched).
    pub fn of(id: u32, cand: &[(u32, f32)], log_z: f32, n: usize) -> Self {
        let raw = cand.iter().find(|c| c.0 == id).map_or(f32::NAN, |c| c.1);
        TokenLogprob {
            id,
            logprob: raw - log_z,
            top: cand[..n.min(cand.len())]
                .iter()
                .map(|&(t, l)| (t, l - log_z))
                .collect(),
        }
    }
}

/// The number of cached tokens a new prompt can keep: their common prefix, leaving at least
/// the prompt's last token to run (it produces the first answer token's logits).
pub fn reusable_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len().saturating_sub(1))
}

impl<B: Backend> Session<B> {
    pub fn new(model: B) -> Self {
        Session {
            model,
            tokens: Vec::new(),
            watched: Vec::new(),
        }
    }

    /// The tokens in the KV cache (the conversation so far, as run).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets the conversation and frees its KV cache.
    pub fn reset(&mut self) {
        self.tokens.clear();
        self.model.release_kv();
    }

    /// The conversation's tokens that the KV cache holds, its bytes handed to `out`
    /// (`Backend::read_kv`): with `import` on a model of the same weights, the conversation
    /// goes on there without being run again.
    pub async fn export(&self, out: &mut dyn FnMut(&[u8])) -> Result<&[u32], B::Error> {
        let held = self.model.len();
        let Some(tokens) = self.tokens.get(..held) else {
            let m = format!(
                "the KV cache holds {held} positions, the conversation {} tokens",
                self.tokens.len()
            );
            return Err(Error::input(m).into());
        };
        self.model.read_kv(out).await?;
        Ok(tokens)
    }

    /// Replaces the conversation by `tokens` whose KV cache, in `format`, `fill` writes
    /// (`Backend::write_kv`, `export`'s bytes). On error the conversation is as it was.
    pub async fn import(
        &mut self,
        tokens: &[u32],
        format: KvFormat,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), B::Error> {
        self.model.write_kv(format, tokens.len(), fill).await?;
        self.tokens = tokens.to_vec();
        Ok(())
    }

    /// Puts another model (e.g. rebuilt on a new device) under the conversation and runs the
    /// conversation's tokens into its KV cache; returns how many were run.
    pub async fn replace_model(&mut self, model: B) -> Result<usize, B::Error> {
        self.model = model;
        self.model.truncate(0);
        self.model.watch(&self.watched)?;
        self.restore_cache().await
    }

    /// Runs the conversation's tokens that the KV cache no longer holds back into it (a new
    /// model, or a cache given up under the session: a format conversion the device refused
    /// and could not undo); returns how many were run. `start` and `next` call it, so a
    /// conversation never runs on a cache that lost its positions.
    pub async fn restore_cache(&mut self) -> Result<usize, B::Error> {
        let held = self.model.len().min(self.tokens.len());
        self.model.truncate(held);
        if held < self.tokens.len() {
            self.model.prefill(&self.tokens[held..]).await?;
        }
        Ok(self.tokens.len() - held)
    }

    /// Prefills `prompt` (the whole conversation so far; the cached common prefix is reused)
    /// and returns the turn that `next` continues.
    pub async fn start(
        &mut self,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
    ) -> Result<Turn, B::Error> {
        self.start_with(prompt, s, stop, TurnOptions::default())
            .await
    }

    /// `start` with JSON mode (its watched tokens join the sampling's) or logprobs.
    pub async fn start_with(
        &mut self,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
        opts: TurnOptions,
    ) -> Result<Turn, B::Error> {
        s.validate()?;
        if opts.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::input(format!(
                "top_logprobs {} is more than {MAX_TOP_LOGPROBS}",
                opts.logprobs.unwrap_or(0)
            ))
            .into());
        }
        let context = self.model.context();
        if prompt.is_empty() {
            return Err(Error::input("the prompt is empty").into());
        }
        if prompt.len() >= context {
            return Err(Error::ContextLength {
                tokens: prompt.len(),
                context,
            }
            .into());
        }
        let mut watched = s.watched();
        if let Some(j) = &opts.json {
            watched.extend(j.watched());
            // Where the answer may end (free text, after a call), its end is always a candidate.
            watched.extend_from_slice(stop);
            watched.sort_unstable();
            watched.dedup();
        }
        self.model.watch(&watched)?;
        self.watched = watched;
        let scored = opts.logprobs.filter(|_| opts.prompt_logprobs);
        let shared = match scored {
            Some(_) => 0,
            None => reusable_prefix(&self.tokens, prompt).min(self.model.len()),
        };
        self.model.truncate(shared);
        self.tokens.truncate(shared);
        self.model.shrink_kv(prompt.len()).await?;
        let t0 = now_seconds();
        let (cand, prompt_logprobs) = match scored {
            Some(n) => {
                let (cand, scored) = self.model.step_scored(prompt, n, &self.watched).await?;
                let first = std::iter::once(None);
                (cand, first.chain(scored.into_iter().map(Some)).collect())
            }
            None => (self.model.step(&prompt[shared..]).await?, Vec::new()),
        };
        self.tokens.extend_from_slice(&prompt[shared..]);
        let stats = GenStats {
            prompt_tokens: prompt.len(),
            prefilled: prompt.len() - shared,
            prefill_seconds: now_seconds() - t0,
            ..Default::default()
        };
        Ok(Turn {
            sampling: s.clone(),
            rng: Rng::new(s.seed),
            stop: stop.to_vec(),
            cand,
            pending: None,
            opts,
            logprob: None,
            prompt_logprobs,
            out: Vec::new(),
            stats,
            decode_start: now_seconds(),
        })
    }

    /// The next token of the turn, or `None` when it has ended (`turn.stats.stopped_by`
    /// says why). On an error the turn can be retried with `next` (after `replace_model` if
    /// the device was lost).
    pub async fn next(&mut self, turn: &mut Turn) -> Result<Option<u32>, B::Error> {
        if turn.is_done() {
            return Ok(None);
        }
        if turn.sampling.max_tokens == 0 {
            // The prompt alone (scored: `TurnOptions::prompt_logprobs`).
            turn.finish(StopReason::MaxTokens);
            return Ok(None);
        }
        if let Some(id) = turn.pending {
            if self.model.len() + 1 > self.model.context() {
                turn.finish(StopReason::Context);
                return Ok(None);
            }
            self.restore_cache().await?;
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
        let mut cand = turn.sampling.adjust(&turn.cand, &turn.out);
        let between_calls = turn.opts.json.as_ref().is_some_and(|j| j.between_calls());
        if let Some(j) = turn.opts.json.as_ref().filter(|_| !between_calls) {
            cand = j.allowed(&cand, self.tokens.len())?;
        }
        let id = sample(&cand, &turn.sampling, &mut turn.rng, self.tokens.len())?;
        // After a whole call the model's own draw decides: another call's opening (or
        // whitespace toward it) goes on; text, which cannot follow calls, ends the answer.
        if between_calls && !turn.opts.json.as_ref().is_some_and(|j| j.takes(id)) {
            turn.finish(StopReason::Eos);
            return Ok(None);
        }
        if turn.stop.contains(&id) {
            turn.finish(StopReason::Eos);
            return Ok(None);
        }
        // The candidates come best first (watched tokens after them: n < TOP_K).
        let log_z = self.model.log_z();
        turn.logprob = (turn.opts.logprobs).map(|n| TokenLogprob::of(id, &turn.cand, log_z, n));
        turn.out.push(id);
        turn.stats.generated = turn.out.len();
        // JSON mode ends the answer with the object (a stop token is never allowed before).
        if turn.opts.json.as_mut().is_some_and(|j| j.advance(id)) {
            turn.finish(StopReason::Eos);
        } else if turn.out.len() >= turn.sampling.max_tokens {
            turn.finish(StopReason::MaxTokens);
        } else {
            turn.pending = Some(id);
        }
        Ok(Some(id))
    }

    /// Generates after `prompt` (the whole conversation so far), calling `on_token(id)` with
    /// each new token until a stop token, `max_tokens`, the context, or `on_token` returning
    /// false.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenStats), B::Error> {
        let mut turn = self.start(prompt, s, stop).await?;
        while let Some(id) = self.next(&mut turn).await? {
            if !on_token(id) {
                turn.stop(StopReason::Caller);
            }
        }
        Ok((turn.out, turn.stats))
    }
}
