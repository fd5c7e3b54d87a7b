//! `flexquant build` (the ensemble) and `flexquant report` (its report, redone from the record).

use super::quant::{build_library, CalibArgs, NestingArg, DEFAULT_GROUP};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use flexquant::build::evaluator::CalibScore;
use flexquant::build::pipeline::{build_ensemble, BuildSettings, Inputs};
use flexquant::build::search::{Slope, Ties};
use flexquant::ensemble::pack;
use flexquant::quant::eqm::EqmModel;
use flexquant::quant::library::{self, Library, Method};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
pub enum Preset {
    /// Sensitivity-guided (branch 1: the output-error proxy orders the swaps; calibration ppl
    /// recorded every 25 steps): a few minutes on 2 cores.
    Fast,
    /// Wider search (branch 3), held-out text every 30 steps on 2,048 tokens per domain, and
    /// for `--nested none` the pruning ablation (0, 25, 50 and 75%; a nested ensemble is one
    /// file per module whatever is pruned, and pruning saved it 3% of storage per 25% at +4-7
    /// ppl at QM(3), so it is not run there unless `--ablation` asks).
    Full,
}

#[derive(Args)]
pub struct BuildArgs {
    #[arg(long)]
    model: PathBuf,
    /// Calibration text, or a mix `SOURCE[:WEIGHT],...` (see `flexquant quantize --calib`):
    /// the library's GPTQ and the trajectory search both calibrate on it.
    #[arg(long)]
    calib: String,
    /// Held-out text for the report's perplexities; repeat it for more domains (the first is
    /// the main one: the static comparison, the ablation and the manifest's per-step ppl; every
    /// one gets float, static-QM and EQM figures, named after its file: `brown-heldout.txt`
    /// is `brown`).
    #[arg(long, required = true)]
    heldout: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "fast")]
    preset: Preset,
    #[arg(long, default_value_t = 4)]
    n_up: u32,
    #[arg(long, default_value_t = 2)]
    n_low: u32,
    /// Candidates per kept path scored by calibration ppl (default: from the preset).
    #[arg(long)]
    branch: Option<usize>,
    /// Paths kept per step (default: from the preset).
    #[arg(long)]
    stem: Option<usize>,
    /// Search freely instead of level by level (by default the trajectory passes through every
    /// static QM of the ladder and the search orders the swaps between them).
    #[arg(long)]
    unstaged: bool,
    /// How a round's candidates are scored. `lazy` (default): a candidate measured in an
    /// earlier round is re-measured only when it would be chosen (CELF), about half the
    /// calibration forwards of `exact`, which measures every candidate every round.
    #[arg(long, value_enum, default_value = "lazy")]
    scoring: Scoring,
    /// The line a candidate's damage per byte is drawn on: from QM(n_up) (`from-start`) or
    /// from its parent (`marginal`); see `build::search::Slope`.
    #[arg(long, value_enum, default_value = "marginal")]
    slope: SlopeArg,
    /// A swap that lowers the calibration ppl: `zero` damage (default; such swaps tie and the
    /// larger saving goes first) or `as-measured` (a gain, ranked first when divided by a small
    /// module's bytes); see `build::search::SearchOptions::floor_damage`.
    #[arg(long, value_enum, default_value = "zero")]
    gains: GainsArg,
    /// Swaps of equal damage per byte (with `--gains zero`, every swap that did not raise the
    /// calibration ppl): `larger-saving` first, or the smaller `output-error` increase per
    /// byte first (the quantizer's, on all its calibration tokens); see
    /// `build::search::Ties`.
    #[arg(long, value_enum, default_value = "larger-saving")]
    ties: TiesArg,
    /// What an EQM's calibration score is: the perplexity of the calibration text's `tokens`
    /// (default, the paper's), or `float`: the cross-entropy against the float model's
    /// next-token distribution at each position (its KL divergence plus a constant), which no
    /// swap can lower and which does not depend on the token the text holds next; see
    /// `build::evaluator::CalibScore`.
    #[arg(long, value_enum, default_value = "tokens")]
    calib_score: CalibScoreArg,
    /// Calibration tokens every candidate EQM is scored on in the search (default: 256 for
    /// both presets), taken as evenly spaced windows over the `--calib` mix: more tokens, less
    /// noise in which swap looks cheapest, proportionally more search time.
    #[arg(long)]
    search_tokens: Option<usize>,
    /// Tokens of the measured sensitivities: the `first` of the search's own calibration
    /// tokens (default), or calibration windows `between` the search's, so the candidates
    /// and the choice among them are not fitted to the same tokens. Measured on the demo
    /// (full 4 -> 2): `between`, with 43-token windows, ranked swaps far worse (Spearman 0.20
    /// against 0.68) and raised the held-out curve 6-13%; longer windows are untried.
    #[arg(long, value_enum, default_value = "first")]
    sensitivity_windows: SensitivityWindows,
    /// Fraction of intermediate module versions pruned from the shipped ensemble. Default 0:
    /// on the demo model every 25% pruned costs 2.5-4.5 held-out ppl at QM(3)'s footprint for
    /// 7% less storage (the full preset's ablation), and the browser downloads only the
    /// shards of the steps it uses, so the stored total matters less than accuracy.
    #[arg(long, default_value_t = 0.0)]
    prune: f64,
    /// Prune rates searched besides `--prune` for the report's pruning ablation, comma-separated
    /// (e.g. `0,0.25,0.5,0.75`; `none` for no ablation). Default: from the preset.
    #[arg(long)]
    ablation: Option<String>,
    /// Module library to use (built there if missing or not matching).
    #[arg(long)]
    library: Option<PathBuf>,
    #[arg(long, default_value = "gptq")]
    method: Method,
    #[arg(long, default_value_t = DEFAULT_GROUP)]
    group: usize,
    #[command(flatten)]
    calib_opts: CalibArgs,
    /// How the versions of a module relate. `truncate` (default): one code per weight whose
    /// top k bits are the k-bit version, shipped as one bit-plane file per module, so the
    /// ensemble stores little more than QM(n_up) and a step down downloads nothing; measured on
    /// the demo model (README): QM(4) unchanged, QM(3) +5-14% ppl, QM(2) 5-7x better than
    /// independent GPTQ. `none`: every bit-width quantized independently, a file per version.
    /// `upscale` is for `flexquant quantize` only (measured worse, and its grids do not fit
    /// the bit-plane files).
    #[arg(long, value_enum, default_value = "truncate")]
    nested: NestingArg,
    /// Pack the shipped files (base, tokenizer, module versions) into files of at most about
    /// this many MB, so a cold load makes a few requests (see `flexquant pack`); 0 writes one
    /// file each.
    #[arg(long, default_value_t = pack::DEFAULT_PACK_MB)]
    pack_mb: f64,
    #[arg(long)]
    out: PathBuf,
}

/// `--scoring`: see `build::search`'s module docs.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scoring {
    Lazy,
    Exact,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SensitivityWindows {
    Between,
    First,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GainsArg {
    Zero,
    AsMeasured,
}

#[derive(Clone, Copy, ValueEnum)]
enum CalibScoreArg {
    Tokens,
    Float,
}

#[derive(Clone, Copy, ValueEnum)]
enum TiesArg {
    LargerSaving,
    OutputError,
}

#[derive(Clone, Copy, ValueEnum)]
enum SlopeArg {
    FromStart,
    Marginal,
}

fn settings(a: &BuildArgs) -> Result<BuildSettings> {
    let nested = a.nested.nesting().is_some();
    let (branch, stem, calib_tokens, heldout_tokens, every, sens, samples, ablation) =
        match a.preset {
            Preset::Fast => (1, 1, 256, 1024, 60, 128, 0, vec![]),
            Preset::Full if nested => (3, 1, 256, 2048, 30, 128, 30, vec![]),
            Preset::Full => (3, 1, 256, 2048, 30, 128, 30, vec![0.0, 0.25, 0.5, 0.75]),
        };
    let ablation = match a.ablation.as_deref().map(str::trim) {
        None => ablation,
        Some("none") | Some("") => vec![],
        Some(list) => list
            .split(',')
            .map(|r| {
                r.trim()
                    .parse::<f64>()
                    .with_context(|| format!("--ablation: '{r}' is not a prune rate"))
            })
            .collect::<Result<Vec<f64>>>()?,
    };
    Ok(BuildSettings {
        n_up: a.n_up,
        n_low: a.n_low,
        branch: a.branch.unwrap_or(branch),
        stem: a.stem.unwrap_or(stem),
        staged: !a.unstaged,
        lazy: a.scoring == Scoring::Lazy,
        sensitivity_between: a.sensitivity_windows == SensitivityWindows::Between,
        slope: match a.slope {
            SlopeArg::FromStart => Slope::FromStart,
            SlopeArg::Marginal => Slope::Marginal,
        },
        floor_damage: a.gains == GainsArg::Zero,
        ties: match a.ties {
            TiesArg::LargerSaving => Ties::LargerSaving,
            TiesArg::OutputError => Ties::OutputError,
        },
        calib_score: match a.calib_score {
            CalibScoreArg::Tokens => CalibScore::Tokens,
            CalibScoreArg::Float => CalibScore::Float,
        },
        ablation_branch: 1,
        prune: a.prune,
        ablation,
        calib_tokens: a.search_tokens.unwrap_or(calib_tokens),
        seq_len: 256,
        heldout_tokens,
        heldout_every: every,
        sensitivity_tokens: sens,
        correlation_samples: samples,
        pack_bytes: pack::mb_to_bytes(a.pack_mb)?,
    })
}

/// The library at `dir` if it was made from this model with these settings, else a new one.
fn library_for(
    a: &BuildArgs,
    m: &flexquant::model::load::LoadedModel,
    mix: &super::calib::Mix,
    dir: &Path,
    bits: &[u32],
) -> Result<Library> {
    let sha = library::model_sha256(&a.model)?;
    if let Ok(lib) = Library::open(dir) {
        let man = &lib.manifest;
        let c = &man.calibration;
        if man.model.sha256 == sha
            && man.method == a.method
            && man.nesting == a.nested.nesting()
            && man.group == a.group
            && bits.iter().all(|b| man.bits.contains(b))
            // A nested library's lower grids are stored relative to its top level, so it
            // packages only ensembles that start there.
            && (man.nesting.is_none() || man.bits.iter().max() == bits.iter().max())
            && c.text_sha256 == mix.sha256()
            && (c.sequences, c.seq_len) == (a.calib_opts.sequences, a.calib_opts.seq_len)
        {
            return Ok(lib);
        }
        eprintln!(
            "{}: library does not match (model, method, nesting, group, bits or calibration); rebuilding",
            dir.display()
        );
    }
    build_library(
        m,
        &a.model,
        mix,
        a.method,
        bits,
        a.group,
        a.nested.nesting(),
        &a.calib_opts,
        dir,
        true,
    )?;
    Ok(Library::open(dir)?)
}

fn model_stem(model: &Path) -> &str {
    model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
}

pub fn run_build(a: BuildArgs) -> Result<()> {
    let s = settings(&a)?;
    let bits: Vec<u32> = flexquant::ensemble::format::BITS
        .iter()
        .copied()
        .filter(|&b| b <= a.n_up && b >= a.n_low)
        .collect();
    // Every setting checked before any work (the library's own bits again once it exists).
    s.validate(&bits)?;
    if a.nested == NestingArg::Upscale {
        anyhow::bail!(
            "--nested upscale: its levels' grids are not derived from the top level's, so they \
             cannot be shipped as bit-plane files; build with --nested truncate (the default) \
             or none (`flexquant quantize --nested upscale` makes such a library for tables)"
        );
    }
    let m = super::load_model(&a.model)?;
    // Named after the model too: two models' ensembles built side by side (the tiny test model's
    // and the demo's, in one cache directory) must not take turns overwriting one library.
    let lib_dir = a.library.clone().unwrap_or_else(|| {
        a.out.with_file_name(format!(
            "library-{}-{}{}-g{}",
            model_stem(&a.model),
            a.method.name(),
            a.nested
                .nesting()
                .map_or(String::new(), |n| format!("-nested-{}", n.name())),
            a.group
        ))
    });
    let mix = super::calib::Mix::load(&a.calib, &m)?;
    let lib = library_for(&a, &m, &mix, &lib_dir, &bits)?;
    let sha = library::model_sha256(&a.model)?;
    let em = EqmModel::new(lib, &m.weights, &sha)?;
    let mut heldout = Vec::new();
    for p in &a.heldout {
        let name = flexquant::quant::static_table::domain_name(&p.to_string_lossy());
        anyhow::ensure!(
            heldout.iter().all(|(n, _)| *n != name),
            "--heldout {}: a second held-out text named '{name}'",
            p.display()
        );
        let ids = m
            .tokenizer
            .encode(&super::read_text(p)?)
            .with_context(|| format!("tokenizing {}", p.display()))?;
        heldout.push((name, ids));
    }
    // Calibration windows spread over each source's text (not its first pages only). A mix of
    // more sources than the search has windows (the fast preset has one): shorter windows,
    // one per source, that the search reads back to back (its windows keep their length, so
    // held-out figures stay comparable across mixes).
    let k = mix.sources.len();
    let windows = (s.calib_tokens / s.seq_len).max(k);
    let (calib_ids, calib_sources) = mix.sample(flexquant::quant::calib::CalibSettings {
        sequences: windows,
        seq_len: s.calib_tokens.div_ceil(windows),
    })?;
    // The measured sensitivities read windows halfway between those (same shares), so the
    // search's candidates and its choice among them are not fitted to the same tokens.
    let sens_windows = (s.sensitivity_tokens / s.seq_len).max(k);
    let sens_len = s.sensitivity_tokens.div_ceil(sens_windows).max(2);
    let sens_ids = match a.sensitivity_windows {
        SensitivityWindows::Between if s.sensitivity_tokens > 0 => {
            let sources: Vec<(&[u32], f64)> = mix
                .sources
                .iter()
                .map(|(r, ids)| (ids.as_slice(), r.weight))
                .collect();
            Some(flexquant::quant::calib::sample_mix_between(
                &sources,
                flexquant::quant::calib::CalibSettings {
                    sequences: sens_windows,
                    seq_len: sens_len,
                },
            )?)
        }
        _ => None,
    };
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{prefix:>16} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ETA {eta})",
    )?);
    let name = format!("{}-{}to{}", model_stem(&a.model), a.n_up, a.n_low);
    let inputs = Inputs {
        model: &m,
        eqm: &em,
        calib_ids: &calib_ids,
        calib_sources: &calib_sources,
        sensitivity_ids: sens_ids.as_deref().map(|ids| (ids, sens_len)),
        heldout: &heldout,
        name,
    };
    let mut phase = String::new();
    // Without a terminal (CI logs) the bar is hidden: print a line every 10% instead.
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = std::time::Instant::now();
    let rec = build_ensemble(&inputs, &s, &a.out, &mut |p, d, n, ppl| {
        if p != phase {
            phase = p.to_string();
            pb.reset();
            pb.set_prefix(phase.clone());
        }
        if plain && n > 0 && (d * 10 / n != (d.saturating_sub(1)) * 10 / n || d == n) {
            // Phases without a perplexity (the sensitivity study) report NaN: not printed.
            let ppl = if ppl.is_finite() {
                format!(", calib ppl {ppl:.3}")
            } else {
                String::new()
            };
            eprintln!(
                "{p}: {d}/{n}{ppl}, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        pb.set_length(n as u64);
        pb.set_position(d as u64);
        if ppl.is_finite() {
            pb.set_message(format!("calib ppl {ppl:.3}"));
        }
    })
    .with_context(|| format!("building the ensemble in {}", a.out.display()))?;
    pb.finish_and_clear();
    println!("{}", std::fs::read_to_string(a.out.join("report.md"))?);
    println!(
        "ensemble written to {} in {:.0} s",
        a.out.display(),
        rec.build_seconds
    );
    Ok(())
}

pub fn run_report(dir: &Path) -> Result<()> {
    let f = flexquant::build::report::rewrite(dir)?;
    println!("{}", serde_json::to_string_pretty(&f)?);
    println!(
        "wrote {}/report.json, report.md, trajectory.svg/png, storage.svg/png (and domains.svg/png with several held-out texts)",
        dir.display()
    );
    Ok(())
}

/// `flexquant pack DIR`: packs an ensemble built with one file per module version (what
/// builders before packs wrote, or `--pack-mb 0`), or repacks one at another size or from an
/// older layout, in place.
/// The new manifest is written (atomically) before the replaced files are removed, so an
/// interrupted run leaves a valid ensemble.
pub fn run_pack(dir: &Path, pack_mb: f64) -> Result<()> {
    let mut m = flexquant::runtime::dir::read_manifest(dir)?;
    let target = pack::mb_to_bytes(pack_mb)?;
    anyhow::ensure!(target > 0, "--pack-mb 0: nothing to pack");
    let replaced = pack::pack_files(dir, &mut m, target)?;
    flexquant::ensemble::Manifest::from_bytes(
        "manifest.json (as written)",
        m.to_json().as_bytes(),
    )?;
    let tmp = dir.join("manifest.json.tmp");
    std::fs::write(&tmp, m.to_json()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("manifest.json"))
        .with_context(|| format!("replacing {}/manifest.json", dir.display()))?;
    pack::remove_replaced(&replaced)?;
    println!(
        "{}: base, tokenizer and {} module versions in {} packs ({} bytes)",
        dir.display(),
        m.modules.len(),
        m.packs.len(),
        m.packs.iter().map(|p| p.bytes).sum::<u64>()
    );
    Ok(())
}
