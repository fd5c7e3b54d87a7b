use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file (e.g. .cache/text/austen-heldout.txt).
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Window step in tokens (default: ctx, i.e. non-overlapping windows).
    #[arg(long)]
    stride: Option<usize>,
    /// Evaluate only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gpu: super::gpu::GpuArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let m = super::load_model(&a.model)?;
    let text = super::read_text(&a.text)?;
    let mut ids = m.tokenizer.encode(&text)?;
    if let Some(n) = a.max_tokens {
        ids.truncate(n);
    }
    let stride = a.stride.unwrap_or(a.ctx);
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} windows, ETA {eta}",
    )?);
    pb.set_message(format!("ppl over {} tokens", ids.len()));
    let progress = |d: usize, n: usize| {
        pb.set_length(n as u64);
        pb.set_position(d as u64);
    };
    let r = if a.gpu.gpu {
        // Logits for up to 64 rows at a time; the NLL of each comes back, not the logits.
        let opts = flexquant::gpu::ModelOptions {
            context: a.ctx,
            max_batch: 64,
            logit_rows: 64,
            top_k: 1,
        };
        let mut model = a.gpu.model(&m, opts)?;
        let f = flexquant::gpu::session::perplexity(&mut model, &ids, a.ctx, stride, progress);
        pollster::block_on(f)?
    } else {
        flexquant::model::eval::perplexity(&m.weights, &ids, a.ctx, stride, progress)?
    };
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "ppl {:.4} over {} scored tokens ({} in text, ctx {}, stride {}) in {:.1} s ({:.0} tok/s)",
            r.ppl,
            r.count,
            r.tokens,
            r.ctx,
            r.stride,
            r.seconds,
            r.tokens as f64 / r.seconds
        );
    }
    Ok(())
}
