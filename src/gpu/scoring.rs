//! A prompt scored on the GPU (`Backend::step_scored`, OpenAI's legacy `echo` with
//! `logprobs`): its positions run `logit_rows` at a time with the head on every row, each
//! token's log-probability computed on the device (`nll`: 4 bytes back per position) or, when
//! alternatives are asked for, the rows' logits read back and ranked on the host; the last
//! token then runs as a decode step (the first answer token's candidates). Stepping the prompt
//! one token at a time instead costs a decode step per token.

use crate::gpu::error::{GpuError, GpuResult};
use crate::gpu::model::Model;
use crate::runtime::backend::Scored;
use crate::runtime::TokenLogprob;

impl Model {
    /// See `Backend::step_scored` (the watched tokens are the model's own, `watch`). On error
    /// the cache is as it was.
    pub async fn step_scored(&mut self, tokens: &[u32], n: usize) -> GpuResult<Scored> {
        let Some((&last, body)) = tokens.split_last() else {
            return Err(GpuError::Input("no tokens to score".into()));
        };
        let len = self.len();
        let r = match self.score(body, &tokens[1..], n).await {
            Ok(scored) => self.step(&[last]).await.map(|cand| (cand, scored)),
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.truncate(len);
        }
        r
    }

    /// Runs `tokens`, scoring `next[i]` after each `tokens[i]`.
    async fn score(
        &mut self,
        tokens: &[u32],
        next: &[u32],
        n: usize,
    ) -> GpuResult<Vec<TokenLogprob>> {
        let (rows, vocab) = (self.options().logit_rows, self.config().vocab_size);
        let mut out = Vec::with_capacity(tokens.len());
        for (piece, next) in tokens.chunks(rows).zip(next.chunks(rows)) {
            if n == 0 {
                let nll = self.nll(piece, next).await?;
                let each = next.iter().zip(nll).map(|(&id, l)| TokenLogprob {
                    id,
                    logprob: -l,
                    top: Vec::new(),
                });
                out.extend(each);
                continue;
            }
            let logits = self.logits_all(piece).await?;
            let each = logits.chunks_exact(vocab).zip(next);
            out.extend(each.map(|(row, &id)| TokenLogprob::of_row(id, row, n)));
        }
        Ok(out)
    }
}
