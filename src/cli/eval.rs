//! `eval`: perplexity of a model file (float, CPU reference) or of a built ensemble at a step
//! (as shipped, on the reference or the GPU) over a text. On an ensemble the windows default
//! to the builder's (`build-record.json`: its sequence length and held-out token count), so
//! the figure is the one the builder recorded for that step.

use super::engine::open_ensemble;
use super::engine::{with_engine, BackendKind, Block, Engine, Job, SourceArgs};
use anyhow::{Context, Result};
use clap::Args;
use flexquant::cpu::CpuFactory;
use flexquant::gpu::{GpuFactory, ModelOptions};
use flexquant::runtime::reference::ReferenceFactory;
use flexquant::runtime::{Backend, Factory};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// UTF-8 text file (e.g. .cache/text/austen-heldout.txt).
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (default: 512, or the ensemble builder's).
    #[arg(long)]
    ctx: Option<usize>,
    /// Window step in tokens (default: ctx, i.e. non-overlapping windows).
    #[arg(long)]
    stride: Option<usize>,
    /// Evaluate only the first N tokens of the text (default: all, or the ensemble builder's
    /// held-out count).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    json: bool,
}

/// `(seq_len, heldout_tokens)` the builder of the ensemble in `dir` measured with.
fn builder_windows(dir: &Path) -> Option<(usize, usize)> {
    let text = std::fs::read_to_string(dir.join(flexquant::build::report::RECORD_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let s = v.get("settings")?;
    Some((
        s.get("seq_len")?.as_u64()? as usize,
        s.get("heldout_tokens")?.as_u64()? as usize,
    ))
}

struct Eval {
    a: EvalArgs,
    ctx: usize,
    max_tokens: Option<usize>,
}

impl Job for Eval {
    fn run<F: Factory>(self, mut e: Engine<F>) -> Result<()>
    where
        <F::Model as Backend>::Error: Send + Sync + 'static,
    {
        let a = &self.a;
        eprintln!("[{}]", e.describe());
        let text = super::read_text(&a.text)?;
        let mut ids = e.tokenizer.encode(&text)?;
        if let Some(n) = self.max_tokens {
            ids.truncate(n);
        }
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} windows, ETA {eta}",
        )?);
        pb.set_message(format!("ppl over {} tokens", ids.len()));
        let mut progress = |d: usize, n: usize| {
            pb.set_length(n as u64);
            pb.set_position(d as u64);
        };
        let stride = a.stride.unwrap_or(self.ctx);
        let model = &mut e.run.session.model;
        let r = model
            .perplexity(&ids, self.ctx, stride, &mut progress)
            .block()?;
        pb.finish_and_clear();
        let recorded = e
            .walk
            .as_ref()
            .and_then(|w| w.manifest().trajectory[e.run.step].heldout_ppl);
        if a.json {
            let mut v = serde_json::to_value(&r)?;
            v["step"] = e.run.step.into();
            v["recorded_heldout_ppl"] = serde_json::json!(recorded);
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "ppl {:.4} over {} scored tokens ({} in text, ctx {}, stride {}) in {:.1} s ({:.0} tok/s){}",
                r.ppl,
                r.count,
                r.tokens,
                r.ctx,
                r.stride,
                r.seconds,
                r.tokens as f64 / r.seconds,
                recorded.map_or(String::new(), |p| format!("; the builder recorded {p:.4}"))
            );
        }
        Ok(())
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    let record = a.source.ensemble.as_deref().and_then(builder_windows);
    let ctx = a.ctx.or(record.map(|r| r.0)).unwrap_or(512);
    let max_tokens = a.max_tokens.or(record.map(|r| r.1));
    let s = a.source.clone();
    let Some(dir) = s.ensemble.clone() else {
        return with_engine(&s, ctx, Eval { a, ctx, max_tokens });
    };
    let job = Eval { a, ctx, max_tokens };
    let loading = || format!("loading {}", dir.display());
    // The reference by default: the builder's figures exactly.
    match s.backend.unwrap_or(BackendKind::Reference) {
        BackendKind::Gpu => {
            // Logits for up to 64 rows at a time; the NLL of each comes back, not the logits.
            let f = GpuFactory::new(ModelOptions {
                context: ctx,
                max_batch: 64,
                logit_rows: 64,
                top_k: 1,
                kv_format: s.kv_cache.start(),
                ..Default::default()
            });
            job.run(open_ensemble(&s, &dir, f, ctx).with_context(loading)?)
        }
        BackendKind::Cpu => {
            let f = CpuFactory {
                context: ctx,
                kv_format: s.kv_cache.start(),
                budget: None,
            };
            job.run(open_ensemble(&s, &dir, f, ctx).with_context(loading)?)
        }
        BackendKind::Reference => {
            let f = ReferenceFactory { context: ctx };
            job.run(open_ensemble(&s, &dir, f, ctx).with_context(loading)?)
        }
    }
}
