//! Perplexity on the GPU path, with the sliding windows of the CPU path (`model::eval`).

use crate::gpu::error::GpuResult;
use crate::gpu::model::Model;

/// Perplexity over `tokens` with `model::eval`'s windows, each token's NLL computed on the
/// GPU. Needs `logit_rows` > 1 to be quick.
pub async fn perplexity(
    model: &mut Model,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> GpuResult<crate::model::eval::Perplexity> {
    let max = model.options().context;
    crate::model::eval::perplexity_with(tokens, ctx, stride, max, progress, |w, skip| {
        model.truncate(0);
        // Positions before skip - 1 only fill the cache; rows skip-1.. predict skip...
        if skip > 1 {
            pollster::block_on(model.prefill(&w[..skip - 1]))?;
        }
        let nll = pollster::block_on(model.nll(&w[skip - 1..w.len() - 1], &w[skip..]))?;
        Ok(nll.iter().map(|v| *v as f64).sum::<f64>())
    })
}
