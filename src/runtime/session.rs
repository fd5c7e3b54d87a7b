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

/// How many prompt tokens `Session::read` takes at a time: a fixed count, or as many as take
/// about `TARGET_S` at the speed of the pieces read so far (a long prompt then stops, reports
/// and answers pressure a few times a second whatever the backend's speed).
#[derive(Debug, Clone)]
pub struct PrefillPace {
    fixed: Option<usize>,
    tokens_per_s: Option<f64>,
}

impl PrefillPace {
    /// Seconds a piece aims at.
    pub const TARGET_S: f64 = 0.25;
    /// Bounds of a piece (`MIN` keeps what each piece adds, a turn of the event loop and a look
    /// by the controller, small against it; `FIRST` before any speed is known).
    pub const MIN: usize = 32;
    pub const FIRST: usize = 32;
    pub const MAX: usize = 1024;

    /// `fixed`: always that many tokens (at least 1); `None`: paced by time.
    pub fn new(fixed: Option<usize>) -> Self {
        PrefillPace {
            fixed: fixed.map(|n| n.max(1)),
            tokens_per_s: None,
        }
    }

    /// Tokens the next piece takes.
    pub fn next(&self) -> usize {
        match (self.fixed, self.tokens_per_s) {
            (Some(n), _) => n,
            (None, None) => Self::FIRST,
            (None, Some(r)) => ((r * Self::TARGET_S) as usize).clamp(Self::MIN, Self::MAX),
        }
    }

    /// A piece of `tokens` took `seconds`.
    pub fn record(&mut self, tokens: usize, seconds: f64) {
        if tokens >= Self::MIN && seconds > 0.0 {
            self.tokens_per_s = Some(tokens as f64 / seconds);
        }
    }
}

/// A turn's prompt being read into the KV cache (`Session::begin`, then `Session::read` until
/// it returns the turn). A long prompt read in pieces lets the caller act between them: stop
/// it, show how far it got, answer memory pressure.
pub struct Prefill {
    prompt: Vec<u32>,
    /// Prompt tokens in the KV cache: the reused prefix, then what `read` ran.
    done: usize,
    /// The prefix the KV cache held already.
    shared: usize,
    /// With `TurnOptions::prompt_logprobs`: the entries of the tokens read so far.
    scored: Vec<Option<TokenLogprob>>,
    sampling: Sampling,
    stop: Vec<u32>,
    opts: TurnOptions,
    /// Time spent in `read`.
    seconds: f64,
}

impl Prefill {
    /// Prompt tokens in the KV cache (the reused prefix included).
    pub fn done(&self) -> usize {
        self.done
    }
    /// The prompt's length.
    pub fn total(&self) -> usize {
        self.prompt.len()
    }
    /// Prompt tokens the KV cache held before (not run again).
    pub fn reused(&self) -> usize {
        self.shared
    }

    /// The turn after the whole prompt: `cand` the first answer token's candidates.
    fn turn(&mut self, cand: Vec<(u32, f32)>) -> Turn {
        Turn {
            sampling: self.sampling.clone(),
            rng: Rng::new(self.sampling.seed),
            stop: std::mem::take(&mut self.stop),
            cand,
            pending: None,
            opts: std::mem::take(&mut self.opts),
            logprob: None,
            prompt_logprobs: std::mem::take(&mut self.scored),
            out: Vec::new(),
            stats: GenStats {
                prompt_tokens: self.prompt.len(),
                prefilled: self.done - self.shared,
                prefill_seconds: self.seconds,
                ..Default::default()
            },
            decode_start: now_seconds(),
        }
    }

    /// The prompt given up before its end (`why`: the caller's interrupt): an ended turn with
    /// no answer. What was read stays in the KV cache.
    pub fn abandon(mut self, why: StopReason) -> Turn {
        let mut t = self.turn(Vec::new());
        t.finish(why);
        t
    }
}

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
    /// Token `id` scored from a whole logits row: its log-softmax there and the row's `n`
    /// best (a scored prompt's entry, `Backend::step_scored`).
    pub fn of_row(id: u32, row: &[f32], n: usize) -> Self {
        let log_z = crate::model::math::log_sum_exp(row) as f32;
        TokenLogprob {
            id,
            logprob: row[id as usize] - log_z,
            top: crate::runtime::generate::top_k(row, n)
                .iter()
                .map(|&(t, l)| (t, l - log_z))
                .collect(),
        }
    }

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

    /// `start` with JSON mode (its watched tokens join the sampling's) or logprobs: `begin`,
    /// then the whole prompt read in one `read`.
    pub async fn start_with(
        &mut self,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
        opts: TurnOptions,
    ) -> Result<Turn, B::Error> {
        let mut p = self.begin(prompt, s, stop, opts).await?;
        loop {
            if let Some(turn) = self.read(&mut p, usize::MAX).await? {
                return Ok(turn);
            }
        }
    }

    /// Checks a turn's prompt and request, keeps the cached common prefix (none when the
    /// prompt is scored) and returns the prompt to `read` into the KV cache.
    pub async fn begin(
        &mut self,
        prompt: &[u32],
        s: &Sampling,
        stop: &[u32],
        opts: TurnOptions,
    ) -> Result<Prefill, B::Error> {
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
        Ok(Prefill {
            prompt: prompt.to_vec(),
            done: shared,
            shared,
            scored: scored.map(|_| vec![None]).unwrap_or_default(),
            sampling: s.clone(),
            stop: stop.to_vec(),
            opts,
            seconds: 0.0,
        })
    }

    /// Reads at most `max` more tokens of `p`'s prompt into the KV cache; the read that
    /// reaches its last token returns the turn (the first answer token's candidates come from
    /// it). Between two reads the caller may swap modules, replace the model or give up the
    /// prompt (`Prefill::abandon`): what was read stays in the conversation, and a later
    /// prompt that starts with it reuses it. A scored prompt's entries come out the same read
    /// at once or in pieces: each piece also watches the token after it, whose entry its last
    /// position gives.
    pub async fn read(&mut self, p: &mut Prefill, max: usize) -> Result<Option<Turn>, B::Error> {
        self.restore_cache().await?;
        let t0 = now_seconds();
        let rest = &p.prompt[p.done..];
        let scored = p.opts.logprobs.filter(|_| p.opts.prompt_logprobs);
        let max = max.max(1);
        let last = rest.len() <= max;
        let piece = if last { rest } else { &rest[..max] };
        let cand = match (scored, last) {
            (None, true) => Some(self.model.step(piece).await?),
            (None, false) => {
                self.model.prefill(piece).await?;
                None
            }
            (Some(n), true) => {
                let (cand, s) = self.model.step_scored(piece, n, &self.watched).await?;
                p.scored.extend(s.into_iter().map(Some));
                Some(cand)
            }
            (Some(n), false) => {
                let next = rest[max];
                let mut w = self.watched.clone();
                w.push(next);
                self.model.watch(&w)?;
                let len = self.model.len();
                let r = self.model.step_scored(piece, n, &w).await;
                let back = self.model.watch(&self.watched);
                let (cand, s) = match r.and_then(|r| back.map(|()| r)) {
                    Ok(r) => r,
                    Err(e) => {
                        self.model.truncate(len);
                        return Err(e);
                    }
                };
                p.scored.extend(s.into_iter().map(Some));
                let log_z = self.model.log_z();
                p.scored.push(Some(TokenLogprob::of(next, &cand, log_z, n)));
                None
            }
        };
        self.tokens.extend_from_slice(piece);
        p.done += piece.len();
        p.seconds += now_seconds() - t0;
        Ok(cand.map(|cand| p.turn(cand)))
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

#[cfg(test)]
mod tests {
    use super::PrefillPace;

    #[test]
    fn prefill_pieces_aim_at_a_quarter_second_within_bounds() {
        assert_eq!(
            PrefillPace::new(Some(0)).next(),
            1,
            "a fixed count of at least one"
        );
        let mut p = PrefillPace::new(None);
        assert_eq!(p.next(), PrefillPace::FIRST);
        p.record(64, 1.0); // 64 tokens/s: 16 in a quarter second, below the floor
        assert_eq!(p.next(), PrefillPace::MIN);
        p.record(200, 0.5); // 400 tokens/s: 100
        assert_eq!(p.next(), 100);
        p.record(8, 10.0); // a piece under MIN says little: ignored
        assert_eq!(p.next(), 100);
        p.record(1024, 0.01); // ~100k tokens/s (a GPU that only queued the work)
        assert_eq!(p.next(), PrefillPace::MAX);
    }
}
