//! Perplexity on the GPU path, with the sliding windows of the CPU path (`model::eval`).

use crate::gpu::error::{GpuError, GpuResult};
use crate::gpu::model::Model;

/// Perplexity over `tokens` with the sliding windows of the CPU path (`model::eval`), each
/// token's NLL computed on the GPU. Needs `logit_rows` > 1 to be quick.
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
