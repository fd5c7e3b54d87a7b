//! `--calib`: the calibration mix, loaded (each source read and tokenized, its sha256 taken)
//! and sampled into windows. Sources are text files, named in the records by file name only.

use anyhow::{Context, Result};
use clap::Args;
use flexquant::model::load::LoadedModel;
use flexquant::quant::calib::{self, CalibSettings};
use flexquant::quant::library::{self, CalibSource};
use std::path::Path;

/// A loaded calibration mix: each source's record (its `sequences` not yet set) and tokens.
pub struct Mix {
    pub sources: Vec<(CalibSource, Vec<u32>)>,
}

impl Mix {
    /// Reads and tokenizes every source of `spec` (`calib::parse_mix`).
    pub fn load(spec: &str, m: &LoadedModel) -> Result<Mix> {
        let mut sources = Vec::new();
        for e in calib::parse_mix(spec)? {
            let path = Path::new(&e.source);
            let text = super::read_text(path)?;
            let ids = m
                .tokenizer
                .encode(&text)
                .with_context(|| format!("tokenizing {}", path.display()))?;
            let name = path
                .file_name()
                .map_or_else(|| e.source.clone(), |n| n.to_string_lossy().into());
            sources.push((
                CalibSource {
                    name,
                    sha256: library::file_sha256(path)?,
                    tokens: ids.len(),
                    weight: e.weight,
                    sequences: 0,
                },
                ids,
            ));
        }
        Ok(Mix { sources })
    }

    /// The calibration tokens for `s`, and the sources' records with their windows counted.
    pub fn sample(&self, s: CalibSettings) -> Result<(Vec<u32>, Vec<CalibSource>)> {
        let weights: Vec<f64> = self.sources.iter().map(|x| x.0.weight).collect();
        let shares = calib::allot(&weights, s.sequences)?;
        let inputs: Vec<(&[u32], f64)> = self
            .sources
            .iter()
            .map(|(r, ids)| (ids.as_slice(), r.weight))
            .collect();
        let tokens = calib::sample_mix(&inputs, s)?;
        let records = self
            .sources
            .iter()
            .zip(shares)
            .map(|((r, _), n)| CalibSource {
                sequences: n,
                ..r.clone()
            })
            .collect();
        Ok((tokens, records))
    }

    fn records(&self) -> Vec<CalibSource> {
        self.sources.iter().map(|x| x.0.clone()).collect()
    }

    /// The mix by names (`CalibSource::mix_name`).
    pub fn name(&self) -> String {
        CalibSource::mix_name(&self.records())
    }

    /// The mix's identity (`CalibSource::mix_sha256`).
    pub fn sha256(&self) -> String {
        CalibSource::mix_sha256(&self.records())
    }
}

#[derive(Args)]
pub struct ChatCorpusArgs {
    #[arg(long)]
    model: std::path::PathBuf,
    /// Texts the prompts' passages come from (comma-separated; e.g. the corpora's calibration
    /// splits for a calibration set, their held-out splits for a held-out set).
    #[arg(long, value_delimiter = ',', required = true)]
    prompts: Vec<std::path::PathBuf>,
    #[arg(long, default_value_t = 32)]
    conversations: usize,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    out: std::path::PathBuf,
}

/// `flexquant chat-corpus`: `text::chat` with a progress bar, written atomically.
pub fn run_chat_corpus(a: ChatCorpusArgs) -> Result<()> {
    use flexquant::text::chat::{self, ChatSettings};
    let m = super::load_model(&a.model)?;
    let texts = a
        .prompts
        .iter()
        .map(|p| super::read_text(p))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let prompts = chat::prompts(&refs, a.conversations, a.seed)?;
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "answering [{bar:30}] {pos}/{len} conversations, {elapsed} elapsed, ETA {eta}",
    )?);
    let settings = ChatSettings {
        conversations: a.conversations,
        max_answer_tokens: a.max_tokens,
        seed: a.seed,
    };
    let text = chat::generate(&m.weights, &m.tokenizer, &prompts, settings, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    let tmp = a.out.with_extension("tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}: {} conversations, {} bytes",
        a.out.display(),
        prompts.len(),
        text.len()
    );
    Ok(())
}
