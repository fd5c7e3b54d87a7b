//! What `generate`, `chat` and `eval` run: a model file on the CPU reference (float), or a
//! built ensemble as shipped (its GPTQ shards, verified) on a backend, at a fixed step or
//! walked live by the elastic controller under a budget.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use flexquant::cpu::CpuFactory;
use flexquant::gpu::{GpuFactory, ModelOptions};
use flexquant::model::tokenizer::Tokenizer;
use flexquant::runtime::backend::KvChoice;
use flexquant::runtime::dir::DirSource;
use flexquant::runtime::reference::{Reference, ReferenceFactory};
use flexquant::runtime::walk::{Event, Running};
use flexquant::runtime::{Backend, ByteSource, Elastic, Factory, Policy, Session, Walk};
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The packed CPU backend: the shards as shipped, int16 activations, SIMD integer dot
    /// products, all cores (the default for an ensemble).
    Cpu,
    /// The CPU fake-quant f32 forward (slow; exactly the model the builder evaluated).
    Reference,
    /// The WGSL engine on wgpu (Vulkan/Metal/DX12; lavapipe without a GPU).
    Gpu,
}

#[derive(Args, Clone)]
pub struct SourceArgs {
    /// A model file (.gguf) or Hugging Face directory, run as it is (float) on the reference.
    #[arg(
        long,
        required_unless_present = "ensemble",
        conflicts_with = "ensemble"
    )]
    pub model: Option<PathBuf>,
    /// A built ensemble directory (manifest.json + shards), run as shipped.
    #[arg(long)]
    pub ensemble: Option<PathBuf>,
    /// Trajectory step to run (0 = QM(n_up), the largest); default: the controller's choice.
    #[arg(long, requires = "ensemble", conflicts_with = "budget")]
    pub step: Option<usize>,
    /// Memory budget in MB (model + KV cache + activations): the controller picks the largest
    /// step that fits and walks the trajectory when it changes (`/budget MB` in the chat).
    #[arg(long, requires = "ensemble")]
    pub budget: Option<f64>,
    /// Quality floor: the controller never steps below the deepest step whose held-out
    /// perplexity (measured, or interpolated in footprint) is at most this, whatever the budget
    /// (the browser's `maxPerplexity`).
    #[arg(long, requires = "ensemble", conflicts_with = "step")]
    pub max_perplexity: Option<f64>,
    /// Where the ensemble runs [default: cpu] (a model file always runs on the reference).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// How the KV cache stores keys and values: f16, int8 in groups of 32 with a scale each
    /// (0.56x the bytes, +0.07% perplexity on the demo model), or auto: f16 until memory runs
    /// short under --budget, then int8 before the weights step down; the CPU and GPU backends
    /// (the reference keeps f32).
    #[arg(long, default_value_t = KvChoice::Auto, value_parser = |s: &str| s.parse::<KvChoice>())]
    pub kv_cache: KvChoice,
}

/// Bytes from a budget in MB (1 MB = 10^6 bytes, as the reports print them).
pub fn budget_bytes(mb: f64) -> Result<u64> {
    if !(mb.is_finite() && mb > 0.0) {
        bail!("budget {mb} MB: must be a positive number of MB");
    }
    Ok((mb * 1e6) as u64)
}

/// A model with its tokenizer, ready to generate; for an ensemble, the walk that moves it.
pub struct Engine<F: Factory> {
    pub run: Running<F::Model>,
    pub tokenizer: Tokenizer,
    pub walk: Option<Walk<DirSource, F>>,
    /// Whether the controller moves the model between tokens (a budget was given).
    pub elastic: bool,
    pub label: String,
}

/// Prints what the walk does, on stderr (stdout carries the answer).
fn print_event(e: Event<'_, anyhow::Error>) {
    match e {
        Event::Upload { step, total_bytes } => {
            eprintln!(
                "[loading step {step}: {:.1} MB of modules]",
                total_bytes as f64 / 1e6
            )
        }
        Event::Swap {
            from,
            to,
            modules,
            ms,
            reason,
            footprint_bytes,
            ..
        } => {
            eprintln!(
                "[swap step {from} -> {to} ({reason}): {} in {ms:.0} ms, {:.1} MB]",
                swapped_modules(&modules),
                footprint_bytes as f64 / 1e6
            );
        }
        Event::DeviceLost { step } => eprintln!("[device lost at step {step}]"),
        Event::Recovered { from, to, ms, .. } => {
            eprintln!("[recovered: step {from} -> {to} in {ms:.0} ms]")
        }
        Event::KvConverted {
            from,
            to,
            bytes_before,
            bytes_after,
            ..
        } => eprintln!(
            "[KV cache {from} -> {to}: {:.1} -> {:.1} MB]",
            bytes_before as f64 / 1e6,
            bytes_after as f64 / 1e6
        ),
        Event::Warning(e) => eprintln!("[warning: {e:#}]"),
    }
}

/// The walk over `dir` with `factory`, loaded at `step` (or the controller's step under
/// `budget`).
pub fn open_ensemble<F: Factory>(
    s: &SourceArgs,
    dir: &std::path::Path,
    factory: F,
    context: usize,
) -> Result<Engine<F>>
where
    <F::Model as Backend>::Error: Send + Sync + 'static,
{
    let source = DirSource::open(dir)?;
    let m = source.manifest();
    let tokenizer = m.tokenizer(
        &source
            .files(std::slice::from_ref(&m.tokenizer), "tokenizer")
            .block()?[0],
    )?;
    let footprints: Vec<u64> = m.trajectory.iter().map(|t| t.footprint_bytes).collect();
    let kv =
        flexquant::runtime::backend::kv_cache_bytes_at_load(&m.config, s.kv_cache.start(), context);
    let mut elastic = Elastic::new(footprints, kv, Policy::default())?;
    if let Some(step) = s.step {
        if step >= m.trajectory.len() {
            bail!(
                "--step {step}: {} has steps 0..{}",
                dir.display(),
                m.trajectory.len() - 1
            );
        }
    }
    if let Some(mb) = s.budget {
        elastic.set_budget(budget_bytes(mb)?);
    }
    if let Some(max) = s.max_perplexity {
        let floor = m
            .floor_for_perplexity(max)
            .map_err(|e| anyhow::anyhow!("--max-perplexity {max}: {e}"))?;
        elastic.set_floor(Some(floor))?;
        eprintln!(
            "quality floor: step {floor} (held-out perplexity {:.2} <= {max})",
            m.step_perplexity()[floor].unwrap_or(f64::NAN)
        );
    }
    let walk = Walk::new(source, factory, elastic, Box::new(print_event));
    walk.set_kv_choice(s.kv_cache);
    let run = match s.step {
        Some(step) => walk.load_at(Some(step)).block()?,
        None => walk.load().block()?,
    };
    let label = walk.factory.label();
    Ok(Engine {
        run,
        tokenizer,
        elastic: s.budget.is_some(),
        walk: Some(walk),
        label,
    })
}

/// A model file as it is, on the reference.
pub fn open_model(path: &std::path::Path, context: usize) -> Result<Engine<ReferenceFactory>> {
    let m = super::load_model(path)?;
    let context = context.min(m.weights.config.max_position_embeddings);
    Ok(Engine {
        run: Running {
            session: Session::new(Reference::new(m.weights, context)),
            step: 0,
        },
        tokenizer: m.tokenizer,
        walk: None,
        elastic: false,
        label: format!("{} (float, CPU reference)", m.source),
    })
}

/// Runs `job` on the engine `s` asks for.
pub fn with_engine<J: Job>(s: &SourceArgs, context: usize, job: J) -> Result<()> {
    match (&s.model, &s.ensemble) {
        (Some(p), _) => {
            if let Some(b) = s.backend.filter(|&b| b != BackendKind::Reference) {
                let name = b.to_possible_value().expect("no skipped variants");
                bail!("--backend {} runs a built ensemble: give --ensemble DIR (build one with `flexquant build`)", name.get_name());
            }
            job.run(open_model(p, context)?)
        }
        (None, Some(dir)) => {
            let c = DirSource::open(dir)?
                .manifest()
                .config
                .max_position_embeddings;
            let context = context.min(c);
            match s.backend.unwrap_or(BackendKind::Cpu) {
                BackendKind::Cpu => {
                    let f = CpuFactory {
                        context,
                        kv_format: s.kv_cache.start(),
                        budget: None,
                    };
                    job.run(open_ensemble(s, dir, f, context)?)
                }
                BackendKind::Reference => {
                    let f = ReferenceFactory { context };
                    job.run(open_ensemble(s, dir, f, context)?)
                }
                BackendKind::Gpu => {
                    let f = GpuFactory::new(ModelOptions {
                        context,
                        kv_format: s.kv_cache.start(),
                        ..Default::default()
                    });
                    job.run(open_ensemble(s, dir, f, context)?)
                }
            }
        }
        (None, None) => bail!("give --model FILE or --ensemble DIR"),
    }
}

/// Something to do with an engine, whatever its backend.
pub trait Job {
    fn run<F: Factory>(self, e: Engine<F>) -> Result<()>
    where
        <F::Model as Backend>::Error: Send + Sync + 'static;
}

impl<F: Factory> Engine<F>
where
    <F::Model as Backend>::Error: Send + Sync + 'static,
{
    /// Between tokens: the controller's decision, executed (when a budget drives it). A failed
    /// swap is reported and the answer goes on at the step reached.
    pub fn between_tokens(&mut self, token_index: Option<usize>) {
        if !self.elastic {
            return;
        }
        if let Some(w) = &self.walk {
            if let Err(e) = w.between_tokens(&mut self.run, token_index).block() {
                eprintln!("[swap failed: {e:#}]");
            }
        }
    }

    /// A turn's prompt read into the KV cache in pieces, the controller looking between them (a
    /// budget is met before the first token); a prompt longer than one piece shows a progress
    /// bar on stderr.
    pub fn read_prompt(
        &mut self,
        ids: &[u32],
        s: &flexquant::runtime::Sampling,
        stop: &[u32],
        opts: flexquant::runtime::TurnOptions,
    ) -> Result<flexquant::runtime::Turn> {
        let mut p = self.run.session.begin(ids, s, stop, opts).block()?;
        // Pieces of 256: nothing here waits on a stop, and natively on 2 threads smaller ones
        // read slower (1,475 tokens with a CI run beside: 32 at a time 34.9 s, 64 29.5 s, 256
        // 27.0 s, in one call 26.9 s).
        const PIECE: usize = 256;
        let mut bar: Option<indicatif::ProgressBar> = None;
        loop {
            if let Some(turn) = self.run.session.read(&mut p, PIECE).block()? {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                return Ok(turn);
            }
            let b = bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(p.total() as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "reading the prompt [{bar:30}] {pos}/{len} tokens, ETA {eta}",
                ) {
                    b.set_style(style);
                }
                b
            });
            b.set_position(p.done() as u64);
            self.between_tokens(None);
        }
    }

    /// Sets (`Some`) or clears the budget and moves to the step that fits now.
    pub fn set_budget(&mut self, bytes: Option<u64>) -> Result<()> {
        let w = self
            .walk
            .as_ref()
            .context("budgets need an ensemble (--ensemble DIR)")?;
        match bytes {
            Some(b) => w.elastic.borrow_mut().set_budget(b),
            None => w.elastic.borrow_mut().clear_budget(),
        }
        self.elastic = true;
        self.between_tokens(None);
        Ok(())
    }

    /// "step 12 of 210, 4.1 bits/module on average, 62.3 MB".
    pub fn describe(&self) -> String {
        let bits = self.run.session.model.eqm_bits();
        let avg = bits.iter().sum::<u32>() as f64 / bits.len().max(1) as f64;
        match &self.walk {
            Some(w) => {
                let m = w.manifest();
                format!(
                    "step {} of {} ({avg:.2} bits/module, {:.1} MB) on {}",
                    self.run.step,
                    m.trajectory.len() - 1,
                    m.trajectory[self.run.step].footprint_bytes as f64 / 1e6,
                    self.label
                )
            }
            None => self.label.clone(),
        }
    }
}

/// Runs a future to completion on this thread (the native backends never wait on I/O).
pub trait Block: std::future::Future + Sized {
    fn block(self) -> Self::Output {
        pollster::block_on(self)
    }
}
impl<T: std::future::Future> Block for T {}

/// The modules of a swap as the chat page's swap log lists them: the first `SHOWN`, then how
/// many more (a jump along a full-preset trajectory moves hundreds).
fn swapped_modules(modules: &[flexquant::runtime::walk::Moved]) -> String {
    const SHOWN: usize = 6;
    let mut text: Vec<String> = modules
        .iter()
        .take(SHOWN)
        .map(|m| format!("{} {}->{}", m.module, m.from_bits, m.to_bits))
        .collect();
    if modules.len() > SHOWN {
        text.push(format!("and {} more", modules.len() - SHOWN));
    }
    text.join(", ")
}
