//! Decode speed as the controller's second signal: tokens per second over the last tokens
//! generated at one trajectory step, measured between tokens so that prefill, idle time and
//! swaps never count.

use std::collections::VecDeque;

/// Tokens in the window a rate is taken over.
const WINDOW: usize = 16;
/// Tokens needed at one step before a rate is reported (a few tokens of noise otherwise move
/// the model).
const MIN_TOKENS: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct SpeedMeter {
    /// When each of the last tokens finished, all at `step`.
    times: VecDeque<f64>,
    step: Option<usize>,
}

impl SpeedMeter {
    /// A token of an answer finished at `now_ms`, the model at `step`; `index` is the number
    /// of tokens of this answer before it (0: the first, right after the prefill, which only
    /// starts the clock). Returns the rate once `MIN_TOKENS` tokens ran at this step.
    pub fn token(&mut self, step: usize, index: usize, now_ms: f64) -> Option<f64> {
        if index == 0 || self.step != Some(step) {
            self.times.clear();
            self.step = Some(step);
        }
        self.times.push_back(now_ms);
        if self.times.len() > WINDOW + 1 {
            self.times.pop_front();
        }
        let n = self.times.len() - 1;
        let span = self.times.back()? - self.times.front()?;
        (n >= MIN_TOKENS && span > 0.0).then(|| n as f64 / (span / 1000.0))
    }

    /// Forget the window (a swap or a pause in between: the next token starts a new one).
    pub fn restart(&mut self) {
        self.times.clear();
        self.step = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_enough_tokens_at_one_step() {
        let mut m = SpeedMeter::default();
        let mut last = None;
        for i in 0..20 {
            last = m.token(3, i, 100.0 + 50.0 * i as f64);
            if i < MIN_TOKENS {
                assert_eq!(last, None, "token {i}");
            }
        }
        assert!((last.unwrap() - 20.0).abs() < 1e-9, "{last:?}");
        // A new step starts over.
        assert_eq!(m.token(4, 20, 2000.0), None);
    }
}
