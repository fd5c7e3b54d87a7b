//! `flexquant bench backends --ensemble DIR`: the packed CPU backend natively on a built
//! ensemble, written to `OUT_DIR/backends.json` (the browser half, `tests/e2e/bench_backends.mjs`,
//! adds its figures to the same file). Decode speed at step 0, the QM(3)-sized step and the
//! last step; the bytes each token streams; a plain memory copy measured in the same run, so
//! the bandwidth ratio survives a noisy machine; and one budget swap of ~90 modules in tokens.

use super::engine::{open_ensemble, BackendKind, Engine, SourceArgs};
use anyhow::{Context, Result};
use flexquant::cpu::{CpuFactory, CpuModel};
use flexquant::runtime::backend::KvFormat;
use flexquant::runtime::walk::Running;
use flexquant::runtime::{ByteSource, Decision, Factory};
use rayon::prelude::*;
use serde_json::json;
use std::path::Path;
use std::time::Instant;

const PROMPT_TOKENS: usize = 64;
const DECODE_TOKENS: usize = 128;
/// Modules one budget swap moves (the "~90 modules").
const SWAP_MODULES: usize = 90;

/// Bytes per second of a parallel `copy_from_slice` of 256 MB (best of 5), and on one thread.
fn copy_gbs() -> (f64, f64) {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = |par: bool| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                if par {
                    dst.par_chunks_mut(8 << 20)
                        .zip(src.par_chunks(8 << 20))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                } else {
                    dst.copy_from_slice(&src);
                }
                std::hint::black_box(&dst);
                n as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    (best(true), best(false))
}

/// Prefill of the prompt, then greedy decode: tokens per second of each.
fn speed(model: &mut CpuModel, prompt: &[u32]) -> Result<(f64, f64)> {
    model.truncate(0);
    let t = Instant::now();
    let mut next = model.step(prompt)?[0].0;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..DECODE_TOKENS {
        next = model.step(&[next])?[0].0;
    }
    Ok((prefill, DECODE_TOKENS as f64 / t.elapsed().as_secs_f64()))
}

/// The packed and the plane-reading kernels on the same matrices (`cpu::probe`), per
/// bit-width: 8 MB of weights, one token, best of 7 passes.
fn plane_kernel() -> Result<Vec<serde_json::Value>> {
    use flexquant::cpu::probe::{dot_kernel_gbs, Layout};
    let now = flexquant::runtime::clock::now_ms;
    let mut rows = Vec::new();
    for bits in [8, 6, 5, 4, 3, 2] {
        let packed = dot_kernel_gbs(8e6, bits, Layout::Packed, 7, now)?;
        let planes = dot_kernel_gbs(8e6, bits, Layout::Planes, 7, now)?;
        eprintln!("[{bits}-bit kernel: packed {packed:.2} GB/s, planes {planes:.2} GB/s]");
        rows.push(
            json!({"bits": bits, "packed_gbs": packed, "planes_gbs": planes,
            "planes_vs_packed": planes / packed}),
        );
    }
    Ok(rows)
}

/// A step down of every nested module of the ensemble by one level, two ways: held as planes
/// (`PlaneLevel::step_down`: drop the last plane, read the level's grid) and as packed codes
/// (`planes::decode_level` of the lower level from the cached file, what the CPU backend does).
/// Seconds for all modules, or null for an ensemble without bit-plane files.
fn step_down_seconds<S: ByteSource>(source: &S) -> Result<serde_json::Value>
where
    S::Error: std::fmt::Display,
{
    use flexquant::ensemble::plane_level::PlaneLevel;
    use flexquant::ensemble::planes::{decode_level, PlaneShape};
    let m = source.manifest();
    let mut seen = std::collections::HashSet::new();
    let (mut modules, mut planes_s, mut packed_s) = (0, 0.0, 0.0);
    for v in &m.modules {
        let Some(levels) = v.levels.as_ref().filter(|l| l.len() > 1) else {
            continue;
        };
        if !seen.insert(v.file.file.clone()) {
            continue;
        }
        let (rows, cols) = v.kind.shape(&m.config);
        let shape = PlaneShape::new(rows, cols, m.quantizer.group_size, levels)?;
        let bytes = pollster::block_on(source.files(std::slice::from_ref(&v.file), "bench"))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .remove(0);
        let (top, k) = (shape.top(), levels[levels.len() - 2]);
        let what = &v.file.file;
        let mut level = PlaneLevel::from_file(&shape, &bytes, top, what)?;
        let t = Instant::now();
        level.step_down(&shape, &bytes, k, what)?;
        planes_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(decode_level(&shape, &bytes, k, what)?);
        packed_s += t.elapsed().as_secs_f64();
        modules += 1;
    }
    if modules == 0 {
        return Ok(serde_json::Value::Null);
    }
    Ok(json!({"modules": modules, "planes_seconds": planes_s, "repack_seconds": packed_s}))
}

/// The context the KV cache parts measure at: 1,024 positions (the product's default context
/// until stop 46, now `DEFAULT_CONTEXT`, 4,096), kept so their figures compare across runs and a
/// run stays minutes long.
const KV_BENCH_CONTEXT: usize = 1024;

/// The KV cache's formats compared at step 0 on `KV_BENCH_CONTEXT` positions: the
/// cache's bytes when full, decode speed early and late in a conversation (64 tokens after a
/// 16-token prompt, and after a prompt filling most of the context: their ratio is what
/// attention over a long cache costs), and held-out perplexity over two windows of the
/// context. Runs alternate (f16, int8, three times each): speeds are the best of each format's
/// three.
fn kv_formats(ensemble: &Path, ids: &[u32]) -> Result<serde_json::Value> {
    use flexquant::runtime::Backend;
    let ctx = KV_BENCH_CONTEXT;
    anyhow::ensure!(
        ids.len() >= 2 * ctx,
        "the text has {} tokens, not {}",
        ids.len(),
        2 * ctx
    );
    let mut rows = serde_json::Map::new();
    let rounds = [KvFormat::F16, KvFormat::Int8].repeat(3);
    for (round, format) in rounds.into_iter().enumerate() {
        let mut e = open_step0(ensemble, ctx, format)?;
        let model = &mut e.run.session.model;
        let mut decode_after = |prompt: &[u32]| -> Result<f64> {
            model.truncate(0);
            let mut next = model.step(prompt)?[0].0;
            let t = Instant::now();
            for _ in 0..64 {
                next = model.step(&[next])?[0].0;
            }
            Ok(64.0 / t.elapsed().as_secs_f64())
        };
        let early = decode_after(&ids[..16])?;
        let decode = decode_after(&ids[..ctx - 64 - 1])?;
        let kv_full = flexquant::runtime::backend::kv_cache_bytes(model.config(), format, ctx);
        let row = rows.entry(format.name()).or_insert(json!({}));
        for (key, v) in [("decode_tok_s_early", early), ("decode_tok_s_late", decode)] {
            row[key] = json!(row[key].as_f64().unwrap_or(0.0).max(v));
        }
        row["kv_cache_bytes_full"] = json!(kv_full);
        if round < 2 {
            let p =
                pollster::block_on(model.perplexity(&ids[..2 * ctx], ctx, ctx, &mut |_, _| {}))?;
            row["heldout_ppl"] = json!(p.ppl);
        }
        eprintln!(
            "[KV cache {format}: decode {early:.1} tok/s at 16 positions, {decode:.1} at {}, full cache {:.1} MB]",
            ctx - 1,
            kv_full as f64 / 1e6
        );
    }
    let (f16, int8) = (&rows["f16"], &rows["int8"]);
    let r = |k: &str| int8[k].as_f64().unwrap_or(0.0) / f16[k].as_f64().unwrap_or(1.0);
    let late_vs_early = |row: &serde_json::Value| {
        row["decode_tok_s_late"].as_f64().unwrap_or(0.0)
            / row["decode_tok_s_early"].as_f64().unwrap_or(1.0)
    };
    let report = json!({
        "context": ctx,
        "f16_late_vs_early": late_vs_early(f16),
        "int8_late_vs_early": late_vs_early(int8),
        "int8_kv_bytes_vs_f16": r("kv_cache_bytes_full"),
        "int8_decode_vs_f16": r("decode_tok_s_late"),
        "int8_ppl_vs_f16": r("heldout_ppl"),
        "by_format": rows,
    });
    eprintln!("[KV cache int8 against f16: {report}]");
    Ok(report)
}

/// The controller under a budget that a long conversation's f16 cache outgrows: 1.17x step
/// 0's weights (the demo: 105 MB), a prompt filling most of the context, one decision between
/// tokens. Where the model lands with the cache kept in f16, and with `auto` (the cache to
/// int8 before a weight step): `auto_steps_vs_f16` is how many trajectory steps (of bits)
/// the conversion kept.
fn kv_auto(ensemble: &Path, ids: &[u32]) -> Result<serde_json::Value> {
    use flexquant::runtime::backend::KvChoice;
    use flexquant::runtime::{Backend, Sampling};
    let mut rows = serde_json::Map::new();
    let mut budget_mb = 0.0;
    for choice in [KvChoice::F16, KvChoice::Auto] {
        let m = flexquant::runtime::dir::DirSource::open(ensemble)?
            .manifest()
            .clone();
        budget_mb = m.trajectory[0].footprint_bytes as f64 * 1.17 / 1e6;
        let s = SourceArgs {
            model: None,
            ensemble: Some(ensemble.into()),
            step: None,
            budget: Some(budget_mb),
            max_perplexity: None,
            backend: Some(BackendKind::Cpu),
            kv_cache: choice,
        };
        let f = CpuFactory {
            context: KV_BENCH_CONTEXT,
            kv_format: choice.start(),
            budget: None,
        };
        let mut e = open_ensemble(&s, ensemble, f, KV_BENCH_CONTEXT)?;
        let at_load = e.run.step;
        let prompt = &ids[..KV_BENCH_CONTEXT - 64 - 1];
        let greedy = Sampling {
            max_tokens: 1,
            ..Sampling::default()
        };
        pollster::block_on(e.run.session.start(prompt, &greedy, &[]))?;
        e.between_tokens(Some(0));
        let model = &e.run.session.model;
        rows.insert(
            choice.to_string(),
            json!({"step_at_load": at_load, "step": e.run.step,
                "mean_bits": mean_bits(&m.bits_at(e.run.step)),
                "kv_cache": model.kv_format(), "kv_cache_bytes": Backend::kv_cache_bytes(model)}),
        );
    }
    let step = |k: &str| rows[k]["step"].as_i64().unwrap_or(0);
    let report = json!({
        "budget_mb": budget_mb,
        "prompt_tokens": KV_BENCH_CONTEXT - 64 - 1,
        "auto_steps_vs_f16": step("f16") - step("auto"),
        "by_choice": rows,
    });
    eprintln!("[KV cache auto under a budget: {report}]");
    Ok(report)
}

/// The ensemble at step 0 on the CPU backend, its KV cache in `kv_format`.
fn open_step0(ensemble: &Path, context: usize, kv_format: KvFormat) -> Result<Engine<CpuFactory>> {
    let s = SourceArgs {
        model: None,
        ensemble: Some(ensemble.into()),
        step: Some(0),
        budget: None,
        max_perplexity: None,
        backend: Some(BackendKind::Cpu),
        kv_cache: kv_format.into(),
    };
    let f = CpuFactory {
        context,
        kv_format,
        budget: None,
    };
    open_ensemble(&s, ensemble, f, context)
        .with_context(|| format!("loading {}", ensemble.display()))
}

fn mean_bits(bits: &[u32]) -> f64 {
    bits.iter().map(|&b| b as f64).sum::<f64>() / bits.len() as f64
}

pub fn run(ensemble: &Path, text: &Path, out_dir: &Path) -> Result<()> {
    let context = PROMPT_TOKENS + DECODE_TOKENS + 1;
    let mut e = open_step0(ensemble, context, KvFormat::F16)?;
    let walk = e.walk.take().expect("an ensemble has a walk");
    let m = walk.source.manifest().clone();
    let ids = e.tokenizer.encode(&super::read_text(text)?)?;
    anyhow::ensure!(ids.len() > PROMPT_TOKENS, "{}: too short", text.display());
    let prompt = &ids[..PROMPT_TOKENS];
    let last = m.trajectory.len() - 1;
    let qm3 = (0..=last)
        .min_by(|&a, &b| {
            let d = |s| (mean_bits(&m.bits_at(s)) - 3.0).abs();
            d(a).total_cmp(&d(b))
        })
        .unwrap_or(last);
    let (copy, copy_1t) = copy_gbs();
    eprintln!("[copy: {copy:.2} GB/s on all threads, {copy_1t:.2} on one]");

    let go = |run: &mut Running<CpuModel>, to: usize| -> Result<f64> {
        let d = Decision::move_to(run.step, to);
        let t = Instant::now();
        pollster::block_on(walk.execute(run, d, None))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut rows = Vec::new();
    let mut swap = None;
    for step in [0, qm3, last] {
        go(&mut e.run, step)?;
        let (prefill, decode) = speed(&mut e.run.session.model, prompt)?;
        let bytes = m.trajectory[step].footprint_bytes;
        eprintln!(
            "[step {step}: {:.1} MB, {:.2} bits/module: prefill {prefill:.1} tok/s, decode {decode:.1} tok/s]",
            bytes as f64 / 1e6,
            mean_bits(&m.bits_at(step))
        );
        rows.push(json!({"step": step, "footprint_bytes": bytes,
            "mean_bits": mean_bits(&m.bits_at(step)),
            "native_tok_s": decode, "native_prefill_tok_s": prefill, "browser_tok_s": null}));
        if step == 0 {
            // One budget swap of ~90 modules, then back, timed against a decode token.
            let to = SWAP_MODULES.min(last);
            let secs = go(&mut e.run, to)?;
            swap = Some(json!({"modules": to, "seconds": secs, "tokens": secs * decode}));
            go(&mut e.run, 0)?;
        }
    }
    let kv = kv_formats(ensemble, &ids)?;
    let kv_auto = kv_auto(ensemble, &ids)?;
    let plane_kernel = plane_kernel()?;
    let step_down = step_down_seconds(&walk.source)?;
    eprintln!("[one level down, every nested module: {step_down}]");
    let top = &rows[0];
    let decode0 = top["native_tok_s"].as_f64().unwrap_or(0.0);
    let bytes0 = m.trajectory[0].footprint_bytes as f64;
    let report = json!({
        "ensemble": ensemble.display().to_string(),
        "backend": walk.factory.label(),
        "threads": flexquant::cpu::par::threads(),
        "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": DECODE_TOKENS,
        "native_decode_tok_s": decode0,
        "native_prefill_tok_s": top["native_prefill_tok_s"],
        "native_bytes_per_token": bytes0,
        "copy_gbs": copy,
        "copy_gbs_1t": copy_1t,
        "native_bandwidth_ratio": decode0 * bytes0 / (copy * 1e9),
        "decode_tok_s_by_step": rows,
        "native_swap": swap,
        "cpu_swap_tokens_native": swap.as_ref().map(|s| s["tokens"].clone()),
        "plane_kernel": plane_kernel,
        "nested_step_down": step_down,
        "kv_formats": kv,
        "kv_auto": kv_auto,
    });
    std::fs::create_dir_all(out_dir)?;
    let out = out_dir.join("backends.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
