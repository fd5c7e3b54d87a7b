//! `flexquant bench quant`: time to build the whole module library (GPTQ, every bit-width),
//! EQM evaluation speed relative to the float model, and the static-model table.
//!
//! Writes `OUT/quant.json` and `OUT/static.json` (the table's rows), plus the full report in
//! `target/reports/static.{json,md,svg,png}`.

use super::quant::{build_library, eval_static, prefix_tokens, CalibArgs, EvalStaticArgs};
use anyhow::{Context, Result};
use clap::Args;
use flexquant::ensemble::format::BITS;
use flexquant::model::eval::perplexity;
use flexquant::quant::eqm::{Eqm, EqmModel};
use flexquant::quant::library::{self, Library, Method};
use flexquant::quant::static_table::DEFAULT_GROUP;
use flexquant::runtime::generate::Rng;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Clone)]
pub struct QuantBenchArgs {
    /// quant: calibration text (required for `bench quant`).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// quant: the libraries are built in DIR-gptq and DIR-rtn.
    #[arg(long, default_value = "target/bench/library")]
    library_dir: PathBuf,
    /// quant: held-out tokens of the static table.
    #[arg(long, default_value_t = 8192)]
    static_heldout_tokens: usize,
    /// quant: calibration tokens of the static table.
    #[arg(long, default_value_t = 2048)]
    static_calib_tokens: usize,
    /// quant: held-out tokens of the EQM-vs-float evaluation timing.
    #[arg(long, default_value_t = 2048)]
    ratio_tokens: usize,
    /// quant: held-out tokens per single-swap evaluation (0 skips the single-swap check).
    #[arg(long, default_value_t = 512)]
    swap_tokens: usize,
    #[command(flatten)]
    calib_opts: CalibArgs,
}

/// CPU seconds of this process (all threads) from /proc (Linux; `None` elsewhere). With wall
/// time it shows how much a shared machine slowed a measurement down.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of the line (utime, stime) are 12 and 13 after the command name, in
    // USER_HZ = 100 ticks per second.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, Option<f64>)> {
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let v = f()?;
    let cpu = match (c0, cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok((v, t0.elapsed().as_secs_f64(), cpu))
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub fn run(model: &Path, heldout: &Path, out_dir: &Path, a: &QuantBenchArgs) -> Result<()> {
    let calib = a
        .calib
        .as_deref()
        .context("bench quant needs --calib (the calibration text)")?;
    let m = super::load_model(model)?;
    let mix = super::calib::Mix::load(&calib.to_string_lossy(), &m)?;
    let (gptq_dir, rtn_dir) = (
        sibling(&a.library_dir, "-gptq"),
        sibling(&a.library_dir, "-rtn"),
    );
    let build = |method, dir: &Path| {
        timed(|| {
            build_library(
                &m,
                model,
                &mix,
                method,
                &BITS,
                DEFAULT_GROUP,
                None,
                &a.calib_opts,
                dir,
                true,
            )
        })
    };
    let (gptq, library_seconds, library_cpu) = build(Method::Gptq, &gptq_dir)?;
    println!("GPTQ library: {library_seconds:.1} s wall, {library_cpu:?} s CPU");
    let (_, rtn_seconds, _) = build(Method::Rtn, &rtn_dir)?;

    // EQM evaluation vs float on the same tokens: a random mixed EQM, built cold (every module
    // read from disk and dequantized) and warm (modules cached).
    let text = super::read_text(heldout)?;
    let tokens = prefix_tokens(&m.tokenizer, &text, a.ratio_tokens, heldout)?;
    let sha = library::model_sha256(model)?;
    let em = EqmModel::new(Library::open(&gptq_dir)?, &m.weights, &sha)?;
    let mut rng = Rng::new(11);
    let eqm = Eqm {
        bits: (0..em.modules())
            .map(|_| BITS[(rng.next_f32() * BITS.len() as f32) as usize % BITS.len()])
            .collect(),
    };
    let ppl = |w: &flexquant::model::Weights| perplexity(w, &tokens, 512, 512, |_, _| {});
    let mut float_s = f64::MAX;
    let mut warm_s = f64::MAX;
    let (_, cold_s, _) = timed(|| Ok(ppl(&em.weights(&eqm)?)?))?;
    for _ in 0..2 {
        float_s = float_s.min(timed(|| Ok(ppl(&m.weights)?))?.1);
        warm_s = warm_s.min(timed(|| Ok(ppl(&em.weights(&eqm)?)?))?.1);
    }
    drop(em);

    let report = eval_static(&EvalStaticArgs {
        model: model.to_path_buf(),
        libraries: vec![rtn_dir.clone(), gptq_dir.clone()],
        // The second domain beside it when `flexquant corpus` wrote it.
        heldout: std::iter::once(heldout.to_path_buf())
            .chain(Some(heldout.with_file_name("brown-heldout.txt")).filter(|p| p.exists()))
            .collect(),
        calib: calib.to_path_buf(),
        heldout_tokens: a.static_heldout_tokens,
        calib_tokens: a.static_calib_tokens,
        ctx: 512,
        single_swap: a.swap_tokens > 0,
        swap_bits: vec![8, 3],
        swap_tokens: a.swap_tokens,
        out_dir: PathBuf::from("target/reports"),
    })?;

    std::fs::create_dir_all(out_dir)?;
    let rows: Vec<serde_json::Value> = report
        .rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "bits": r.bits, "method": r.method, "group": r.group, "bytes": r.bytes,
                "heldout_ppl": r.heldout_ppl, "calib_ppl": r.calib_ppl,
                "top1_agreement": r.top1_agreement,
            })
        })
        .collect();
    let static_path = out_dir.join("static.json");
    std::fs::write(&static_path, serde_json::to_string_pretty(&rows)?)?;
    let swap = report.single_swap.as_ref().map(|s| {
        serde_json::json!({
            "from_bits": s.from_bits, "to_bits": s.to_bits, "tokens": s.tokens,
            "base_ppl": s.base_ppl, "delta_min": s.delta_min, "delta_median": s.delta_median,
            "delta_p90": s.delta_p90, "delta_max": s.delta_max,
        })
    });
    let q = serde_json::json!({
        "model": m.source,
        "threads": rayon::current_num_threads(),
        "library_seconds": library_seconds,
        "library_cpu_seconds": library_cpu,
        "library_timing": gptq.timing,
        "library_method": "gptq",
        "group": gptq.group,
        "bits": gptq.bits,
        "calibration": gptq.calibration,
        "gptq": gptq.gptq,
        "rtn_library_seconds": rtn_seconds,
        "eqm_eval_ratio": cold_s / float_s,
        "eqm_eval_ratio_warm": warm_s / float_s,
        "eqm_eval_tokens": tokens.len(),
        "float_eval_seconds": float_s,
        "eqm_eval_seconds_cold": cold_s,
        "eqm_eval_seconds_warm": warm_s,
        "single_swap": swap,
    });
    let path = out_dir.join("quant.json");
    std::fs::write(&path, serde_json::to_string_pretty(&q)?)?;
    println!("{}", serde_json::to_string_pretty(&q)?);
    println!("wrote {} and {}", path.display(), static_path.display());
    Ok(())
}
