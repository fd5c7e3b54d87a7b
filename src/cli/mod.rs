//! Subcommands. Each file holds one command family; this one holds the argument types.

mod bench;
mod bench_backends;
mod bench_gpu;
mod bench_quant;
mod build;
mod calib;
mod engine;
mod eval;
mod fuzz;
mod generate;
mod info;
mod quant;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use flexquant::runtime::{Sampling, StopText, DEFAULT_CONTEXT};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "flexquant",
    version,
    about = "FlexQuant: elastic mixed-precision LLM ensembles"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Config, parameter count and bytes per module of a model.
    Info {
        /// A .gguf file or a Hugging Face model directory.
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a model, or of a built ensemble at a step, over a text file.
    Eval(eval::EvalArgs),
    /// Generate a continuation (or a chat answer with --chat) for one prompt, streaming, with a
    /// model file or a built ensemble (--ensemble DIR [--step N | --budget MB] [--backend]).
    Generate(generate::GenerateArgs),
    /// Interactive chat in the terminal (one line per message; empty line or EOF ends); on an
    /// ensemble, `/budget MB` walks the trajectory live.
    Chat(generate::ChatArgs),
    /// Decode the installed text packages into calibration / held-out text files.
    Corpus {
        /// The text cache made by `build.sh setup` (holds deb/ and brown/).
        #[arg(long)]
        cache: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write chat-shaped calibration or held-out text: prompts about passages of the given
    /// texts, answered by the model itself (float), in its chat template.
    ChatCorpus(calib::ChatCorpusArgs),
    /// Write the deterministic tiny random-weight model (Hugging Face format).
    TinyModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Build a FlexQuant ensemble (library, search, pruning, package, report).
    Build(build::BuildArgs),
    /// Pack an ensemble's files into a few (in place): a cold load in the browser then makes
    /// a few requests instead of one per file.
    Pack {
        dir: PathBuf,
        /// About this many MB per pack.
        #[arg(long, default_value_t = flexquant::ensemble::pack::DEFAULT_PACK_MB)]
        pack_mb: f64,
    },
    /// Redo the report of an ensemble directory from its build record.
    Report { dir: PathBuf },
    /// Benchmarks; write machine-readable JSON reports.
    Bench(bench::BenchArgs),
    /// Quantize every module at every bit-width into a module library directory.
    Quantize(quant::QuantizeArgs),
    /// Fuzz every reader of untrusted input with mutations of real files (`./build.sh fuzz`).
    Fuzz(fuzz::FuzzArgs),
    /// Table (JSON, Markdown, plot) of the float and every uniform-bit-width quantized model.
    EvalStatic(quant::EvalStaticArgs),
}

/// Sampling options shared by generate and chat; the defaults are the browser's
/// (`Sampling::chat`, `DEFAULT_CONTEXT`).
#[derive(Args, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = Sampling::chat().max_tokens,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = Sampling::chat().temperature)]
    temperature: f32,
    #[arg(long, default_value_t = Sampling::chat().top_p)]
    top_p: f32,
    /// Candidates sampled from (0: all 40 the backend returns).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Subtracted from a token's logit once per time it is already in the answer ([-2, 2]).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Subtracted from a token's logit if it is already in the answer ([-2, 2]).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// `ID=BIAS` added to a token's logit (repeatable; BIAS in [-100, 100]).
    #[arg(long = "logit-bias", value_parser = parse_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// End the answer where this text appears (not shown; repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// JSON mode (the browser's `response_format: {type: "json_object"}`): the answer is one
    /// JSON object and ends when it closes.
    #[arg(long)]
    json_object: bool,
    /// JSON mode held to the JSON Schema in this file (the browser's `response_format:
    /// {type: "json_schema"}`; the subset js/API.md lists).
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
    /// Context size (tokens) of the KV cache.
    #[arg(long, default_value_t = DEFAULT_CONTEXT)]
    context: usize,
}

fn parse_bias(s: &str) -> std::result::Result<(u32, f32), String> {
    let (id, b) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected ID=BIAS, e.g. 1234=-100"))?;
    let id = id
        .parse()
        .map_err(|_| format!("`{s}`: `{id}` is not a token id"))?;
    let b = b
        .parse()
        .map_err(|_| format!("`{s}`: `{b}` is not a number"))?;
    Ok((id, b))
}

impl SamplingArgs {
    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_tokens: self.max_tokens,
            seed: self.seed,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.clone(),
        }
    }

    /// The sampling settings and the stop sequences, checked.
    fn checked(&self) -> Result<(Sampling, StopText)> {
        let s = self.sampling();
        s.validate()?;
        Ok((s, StopText::new(self.stop.clone())?))
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { model, json } => info::run(&model, json),
        Cmd::Eval(a) => eval::run(a),
        Cmd::Generate(a) => generate::run_generate(a),
        Cmd::Chat(a) => generate::run_chat(a),
        Cmd::Corpus { cache, out } => {
            let files = flexquant::text::write_corpora(&cache, &out)?;
            println!("{files:#?}");
            Ok(())
        }
        Cmd::ChatCorpus(a) => calib::run_chat_corpus(a),
        Cmd::TinyModel { out, seed } => {
            flexquant::model::tiny::write_tiny_model(&out, seed)?;
            println!("wrote tiny model to {}", out.display());
            Ok(())
        }
        Cmd::Bench(a) => bench::run(a),
        Cmd::Build(a) => build::run_build(a),
        Cmd::Report { dir } => build::run_report(&dir),
        Cmd::Pack { dir, pack_mb } => build::run_pack(&dir, pack_mb),
        Cmd::Quantize(a) => quant::run_quantize(a),
        Cmd::Fuzz(a) => fuzz::run(a),
        Cmd::EvalStatic(a) => quant::eval_static(&a).map(|_| ()),
    }
}

/// Loads a model with a spinner (the demo model takes a few seconds to dequantize).
pub fn load_model(path: &std::path::Path) -> Result<flexquant::model::load::LoadedModel> {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(format!("loading {}", path.display()));
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    let m = flexquant::model::load::load(path);
    pb.finish_and_clear();
    Ok(m?)
}

/// Reads a UTF-8 text file, naming the file in errors.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = flexquant::error::read_capped(path, 1 << 30)?;
    let s = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
    if s.trim().is_empty() {
        anyhow::bail!("{}: the text is empty", path.display());
    }
    Ok(s)
}
