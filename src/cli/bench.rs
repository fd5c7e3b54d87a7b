//! `flexquant bench cpu`: speed of the CPU reference path, written as JSON. Every figure is
//! measured in the same run so ratios (forward vs plain GEMM) survive a noisy shared machine.

use anyhow::Result;
use clap::Args;
use flexquant::model::forward::{self, KvCache};
use flexquant::model::{ops, ModuleKind, Weights};
use std::path::PathBuf;
use std::time::Instant;

/// The benchmarks (each writes `OUT_DIR/NAME.json`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The CPU reference path: forward vs plain GEMM, perplexity.
    Cpu,
    /// The quantization library: RTN/GPTQ time and quality per bit-width.
    Quant,
    /// The WebGPU engine natively (lavapipe here): decode, prefill, swaps, bandwidth.
    Gpu,
    /// The packed CPU backend on `--ensemble` (decode, prefill, microkernel, swaps).
    Backends,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum)]
    which: Which,
    /// A built ensemble (for `backends`).
    #[arg(long)]
    ensemble: Option<PathBuf>,
    #[arg(long)]
    model: PathBuf,
    /// Held-out text file.
    #[arg(long)]
    text: PathBuf,
    /// Held-out tokens for the perplexity figure (a fixed prefix of the text).
    #[arg(long, default_value_t = 16384)]
    heldout_tokens: usize,
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    #[command(flatten)]
    quant: super::bench_quant::QuantBenchArgs,
    #[command(flatten)]
    gpu: super::bench_gpu::GpuBenchArgs,
}

/// Matmul FLOPs of one prefill of `t` tokens with logits for the last token only.
fn prefill_flops(w: &Weights, t: usize) -> f64 {
    let c = &w.config;
    let lin: usize = ModuleKind::ALL
        .iter()
        .map(|k| k.shape(c).0 * k.shape(c).1)
        .sum();
    let att = c.num_hidden_layers * c.num_attention_heads * c.head_dim() * t * (t + 1); // QK + PV, causal
    2.0 * (c.num_hidden_layers * lin * t + c.vocab_size * c.hidden_size) as f64 + 2.0 * att as f64
}

/// The same matmul shapes as a prefill, as plain GEMMs on random data.
fn plain_gemm_seconds(w: &Weights, t: usize) -> f64 {
    let c = &w.config;
    let x = vec![0.5f32; t * c.intermediate_size.max(c.q_dim())];
    let start = Instant::now();
    for _ in 0..c.num_hidden_layers {
        for k in ModuleKind::ALL {
            let (r, cols) = k.shape(c);
            let mut out = vec![0f32; t * r];
            ops::gemm_nt(
                t,
                r,
                cols,
                &x,
                cols,
                &w.module(flexquant::model::ModuleId { layer: 0, kind: k }).w,
                cols,
                &mut out,
                r,
                true,
            );
            std::hint::black_box(&out);
        }
    }
    start.elapsed().as_secs_f64()
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.which {
        Which::Quant => return super::bench_quant::run(&a.model, &a.text, &a.out_dir, &a.quant),
        Which::Gpu => return super::bench_gpu::run(&a.model, &a.text, &a.out_dir, &a.gpu),
        Which::Backends => {
            let Some(e) = &a.ensemble else {
                anyhow::bail!("bench backends needs --ensemble DIR (a built ensemble)");
            };
            return super::bench_backends::run(e, &a.text, &a.out_dir);
        }
        Which::Cpu => {}
    }
    let m = super::load_model(&a.model)?;
    let w = &m.weights;
    let text = super::read_text(&a.text)?;
    let ids = m.tokenizer.encode(&text)?;
    if ids.len() < a.heldout_tokens.max(a.prefill_tokens + 1) {
        anyhow::bail!("{}: only {} tokens", a.text.display(), ids.len());
    }
    let t = a.prefill_tokens;
    let mut cache = KvCache::new(w, t + a.decode_tokens + 1);
    // Warm up (page in weights, spin up the thread pool), then take the best of 3.
    forward::forward_last(w, &ids[..t], &mut cache)?;
    let mut prefill = f64::MAX;
    let mut gemm = f64::MAX;
    for _ in 0..3 {
        cache.clear();
        let s = Instant::now();
        forward::forward_last(w, &ids[..t], &mut cache)?;
        prefill = prefill.min(s.elapsed().as_secs_f64());
        gemm = gemm.min(plain_gemm_seconds(w, t));
    }
    let flops = prefill_flops(w, t);
    let lin_flops = prefill_flops(w, t)
        - 2.0 * (w.config.vocab_size * w.config.hidden_size) as f64
        - 2.0
            * (w.config.num_hidden_layers
                * w.config.num_attention_heads
                * w.config.head_dim()
                * t
                * (t + 1)) as f64;

    let mut next = ids[t];
    let s = Instant::now();
    for _ in 0..a.decode_tokens {
        let lg = forward::forward_last(w, &[next], &mut cache)?;
        next = ops::argmax(&lg) as u32;
    }
    let decode = s.elapsed().as_secs_f64();

    let pb = indicatif::ProgressBar::new(0);
    let r = flexquant::model::eval::perplexity(w, &ids[..a.heldout_tokens], 512, 512, |d, n| {
        pb.set_length(n as u64);
        pb.set_position(d as u64);
    })?;
    pb.finish_and_clear();

    let forward_gflops = flops / prefill / 1e9;
    let gemm_gflops = lin_flops / gemm / 1e9;
    let report = serde_json::json!({
        "model": m.source,
        "threads": rayon::current_num_threads(),
        "prefill_tokens": t,
        "prefill_tok_s": t as f64 / prefill,
        "decode_tok_s": a.decode_tokens as f64 / decode,
        "forward_gflops": forward_gflops,
        "gemm_gflops": gemm_gflops,
        "forward_vs_gemm": forward_gflops / gemm_gflops,
        "heldout_ppl": r.ppl,
        "heldout_tokens": r.tokens,
        "heldout_ctx": r.ctx,
        "heldout_seconds": r.seconds,
    });
    std::fs::create_dir_all(&a.out_dir)?;
    let path = a.out_dir.join("cpu.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", path.display());
    Ok(())
}
