//! `flexquant quantize` (build a module library) and `flexquant eval-static` (the static-model
//! table: float and every uniform bit-width x method).

use anyhow::{Context, Result};
use clap::Args;
use flexquant::model::load::LoadedModel;
use flexquant::quant::calib::CalibSettings;
use flexquant::quant::gptq::GptqConfig;
use flexquant::quant::library::{self, BuildInput, BuildOptions, Manifest, Method, ModelInfo};
use std::path::{Path, PathBuf};

/// Default group size: see `flexquant::quant::static_table` for the measurement behind it.
pub const DEFAULT_GROUP: usize = flexquant::quant::static_table::DEFAULT_GROUP;

#[derive(Args, Clone)]
pub struct QuantizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text, or a mix of texts with weights: `SOURCE[:WEIGHT],...` (e.g.
    /// `.cache/text/austen-calib.txt:0.5,.cache/text/brown-calib.txt:0.5`); each source gets
    /// its share of the calibration sequences.
    #[arg(long)]
    pub calib: String,
    #[arg(long, value_delimiter = ',', default_value = "8,6,5,4,3,2")]
    pub bits: Vec<u32>,
    /// rtn or gptq.
    #[arg(long, default_value = "gptq")]
    pub method: Method,
    #[arg(long, default_value_t = DEFAULT_GROUP)]
    pub group: usize,
    #[command(flatten)]
    pub calib_opts: CalibArgs,
    /// Nested versions (GPTQ): `truncate` or `upscale` (see `flexquant build --nested`);
    /// `none`: every bit-width quantized independently.
    #[arg(long, value_enum, default_value = "none")]
    pub nested: NestingArg,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// How the versions of a module relate (`flexquant::quant::nested`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NestingArg {
    /// Every bit-width quantized independently (a file per version).
    None,
    /// GPTQ at the highest bit-width; each lower one is its top bits, with scales refitted to
    /// the module's output error.
    Truncate,
    /// GPTQ at the lowest bit-width; each extra bit chosen by GPTQ between the two children.
    Upscale,
}

impl NestingArg {
    pub fn nesting(self) -> Option<flexquant::quant::nested::Nesting> {
        use flexquant::quant::nested::Nesting;
        match self {
            NestingArg::None => None,
            NestingArg::Truncate => Some(Nesting::Truncate),
            NestingArg::Upscale => Some(Nesting::Upscale),
        }
    }
}

/// Calibration and quantizer settings (shared with the bench). Defaults chosen by measurement:
/// see `flexquant::quant::library` (calibration mode, tokens) and `gptq` (act-order, clipping).
#[derive(Args, Clone)]
pub struct CalibArgs {
    /// Calibration sequences (evenly spaced over the calibration text).
    #[arg(long, default_value_t = 32)]
    pub sequences: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// GPTQ: calibrate each bit-width on the activations of its own quantized model, layer by
    /// layer (the GPTQ paper), instead of on the float model's (one stream per bit-width: about
    /// 6x the calibration compute for the same tokens).
    #[arg(long)]
    pub sequential: bool,
    /// GPTQ: process columns in their original order instead of decreasing Hessian diagonal.
    #[arg(long)]
    pub no_act_order: bool,
    /// Use each group's plain min/max range instead of searching a clipped one (RTN and GPTQ).
    #[arg(long)]
    pub no_clip_search: bool,
    /// GPTQ damping, as a fraction of the mean Hessian diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub percdamp: f32,
}

/// Builds a library with a progress bar; returns its manifest.
#[allow(clippy::too_many_arguments)]
pub fn build_library(
    m: &LoadedModel,
    model_path: &Path,
    mix: &super::calib::Mix,
    method: Method,
    bits: &[u32],
    group: usize,
    nesting: Option<flexquant::quant::nested::Nesting>,
    a: &CalibArgs,
    out: &Path,
    force: bool,
) -> Result<Manifest> {
    let settings = CalibSettings {
        sequences: a.sequences,
        seq_len: a.seq_len,
    };
    let (tokens, sources) = mix.sample(settings)?;
    let input = BuildInput {
        weights: &m.weights,
        model: ModelInfo {
            source: m.source.clone(),
            sha256: library::model_sha256(model_path)?,
            config: m.weights.config.clone(),
        },
        // File names, never paths: the manifest that carries this record is published with
        // the ensemble (the sha256 identifies the texts).
        calib_text: mix.name(),
        calib_sha256: mix.sha256(),
        calib_sources: sources,
        calib_tokens: &tokens,
    };
    let opts = BuildOptions {
        method,
        bits: bits.to_vec(),
        group,
        calib: settings,
        sequential: a.sequential,
        gptq: GptqConfig {
            percdamp: a.percdamp,
            act_order: !a.no_act_order,
            clip_search: !a.no_clip_search,
            ..GptqConfig::default()
        },
        rtn_clip_search: !a.no_clip_search,
        nesting,
    };
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} layer passes, {elapsed} elapsed, ETA {eta}",
    )?);
    let nested = nesting.map_or(String::new(), |n| format!(" nested ({})", n.name()));
    pb.set_message(format!("{}{nested} g{group} {bits:?}", method.name()));
    let manifest = library::build(&input, &opts, out, force, &mut |d, n| {
        pb.set_length(n as u64);
        pb.set_position(d as u64);
    })
    .with_context(|| format!("building the library in {}", out.display()))?;
    pb.finish_and_clear();
    Ok(manifest)
}

pub fn run_quantize(a: QuantizeArgs) -> Result<()> {
    let m = super::load_model(&a.model)?;
    let mix = super::calib::Mix::load(&a.calib, &m)?;
    let manifest = build_library(
        &m,
        &a.model,
        &mix,
        a.method,
        &a.bits,
        a.group,
        a.nested.nesting(),
        &a.calib_opts,
        &a.out,
        a.force,
    )?;
    let bytes: Vec<(u32, usize)> = manifest
        .bits
        .iter()
        .map(|&b| {
            let total = manifest
                .modules
                .iter()
                .flat_map(|e| e.versions.iter().filter(move |v| v.bits == b))
                .map(|v| v.bytes)
                .sum();
            (b, total)
        })
        .collect();
    println!(
        "wrote {} ({} modules x {:?} bits, {} g{}) in {:.1} s",
        a.out.display(),
        manifest.modules.len(),
        manifest.bits,
        manifest.method.name(),
        manifest.group,
        manifest.seconds
    );
    for (b, total) in bytes {
        println!("  {b}-bit modules: {:.2} MB", total as f64 / 1e6);
    }
    Ok(())
}

#[derive(Args, Clone)]
pub struct EvalStaticArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Module libraries to tabulate (e.g. one RTN and one GPTQ); repeat the flag.
    #[arg(long = "library", required = true)]
    pub libraries: Vec<PathBuf>,
    /// Held-out text (e.g. .cache/text/austen-heldout.txt); repeat the flag for more domains
    /// (`brown-heldout.txt`, `chat-heldout.txt`): each gets its column, named by the file
    /// (`-heldout.txt` dropped). The first is the main table's.
    #[arg(long, required = true)]
    pub heldout: Vec<PathBuf>,
    /// Calibration text, for the calibration perplexity.
    #[arg(long)]
    pub calib: PathBuf,
    /// Held-out tokens evaluated (a prefix of the text).
    #[arg(long, default_value_t = 8192)]
    pub heldout_tokens: usize,
    /// Calibration tokens evaluated (a prefix of the text).
    #[arg(long, default_value_t = 2048)]
    pub calib_tokens: usize,
    /// Window length (non-overlapping windows).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Also run the single-swap check: in QM(FROM), each module alone at TO bits.
    #[arg(long)]
    pub single_swap: bool,
    /// FROM,TO bit-widths of the single-swap check.
    #[arg(long, value_delimiter = ',', default_value = "8,3")]
    pub swap_bits: Vec<u32>,
    /// Held-out tokens per single-swap evaluation.
    #[arg(long, default_value_t = 1024)]
    pub swap_tokens: usize,
    #[arg(long, default_value = "target/reports")]
    pub out_dir: PathBuf,
}

/// The first `n` tokens of `text` (tokenizing only as much of it as needed).
pub fn prefix_tokens(
    tok: &flexquant::model::tokenizer::Tokenizer,
    text: &str,
    n: usize,
    what: &Path,
) -> Result<Vec<u32>> {
    let mut budget = n * 8;
    loop {
        let mut end = budget.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut ids = tok.encode(&text[..end])?;
        if ids.len() > n {
            ids.truncate(n);
            return Ok(ids);
        }
        if end == text.len() {
            if ids.len() < n {
                anyhow::bail!(
                    "{}: only {} tokens, {n} requested",
                    what.display(),
                    ids.len()
                );
            }
            return Ok(ids);
        }
        budget *= 2;
    }
}

pub fn eval_static(a: &EvalStaticArgs) -> Result<flexquant::quant::static_table::StaticReport> {
    use flexquant::quant::eqm::EqmModel;
    use flexquant::quant::evaluate::single_swap;
    use flexquant::quant::static_table::{self, EvalText};
    let m = super::load_model(&a.model)?;
    let sha = library::model_sha256(&a.model)?;
    let models: Vec<EqmModel> = a
        .libraries
        .iter()
        .map(|d| {
            let lib = library::Library::open(d)?;
            EqmModel::new(lib, &m.weights, &sha)
        })
        .collect::<flexquant::Result<_>>()?;
    let text = |p: &Path, n: usize| -> Result<EvalText> {
        Ok(EvalText {
            name: p.display().to_string(),
            tokens: prefix_tokens(&m.tokenizer, &super::read_text(p)?, n, p)?,
        })
    };
    let domains = a
        .heldout
        .iter()
        .map(|p| text(p, a.heldout_tokens))
        .collect::<Result<Vec<_>>>()?;
    let heldout = &domains[0];
    let calib = text(&a.calib, a.calib_tokens)?;
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let refs: Vec<&EqmModel> = models.iter().collect();
    let mut report = static_table::evaluate(
        &m.source,
        &m.weights,
        &refs,
        &domains,
        &calib,
        a.ctx,
        &mut |what| pb.set_message(format!("evaluating {what}")),
    )?;
    pb.finish_and_clear();
    if a.single_swap {
        let [from, to] = a.swap_bits[..] else {
            anyhow::bail!("--swap-bits takes two bit-widths, FROM,TO");
        };
        let lib = models
            .iter()
            .find(|e| e.library.manifest.method == Method::Gptq)
            .unwrap_or(&models[0]);
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(indicatif::ProgressStyle::with_template(
            "single swaps [{bar:30}] {pos}/{len} modules, ETA {eta}",
        )?);
        let n = a.swap_tokens.min(heldout.tokens.len());
        report.single_swap = Some(single_swap(
            lib,
            from,
            to,
            &heldout.tokens[..n],
            a.ctx,
            &mut |d, t| {
                pb.set_length(t as u64);
                pb.set_position(d as u64);
            },
        )?);
        pb.finish_and_clear();
    }
    let files = static_table::write_report(&report, &a.out_dir)?;
    print!("{}", static_table::markdown(&report));
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(report)
}
