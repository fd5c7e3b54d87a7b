//! `flexquant bench gpu`: decode and prefill speed of the GPU engine on one adapter, written
//! to `gpu.json`. Every figure comes from the same run on the same adapter, so the ratios
//! (bandwidth, mixed vs uniform, swap vs token) hold even on a noisy shared machine.
//!
//! Models: uniform `n_up`, uniform `n_low`, a middle EQM (every other module at `n_low`, the
//! point halfway along a trajectory) and the uniform model nearest to it in footprint; every
//! module RTN-quantized (the kernels' speed does not depend on how codes were chosen).

use anyhow::Result;
use clap::Args;
use flexquant::ensemble::format::{PackedShape, BITS};
use flexquant::gpu::probe::{copy_seconds, read_kernel};
use flexquant::gpu::{Gpu, Model, ModelOptions};
use flexquant::model::weights::LayerNorms;
use flexquant::model::{Linear, ModuleId, Weights};
use flexquant::quant::weights::{gpu_model, rtn_modules};
use flexquant::runtime::backend::KvFormat;
use flexquant::runtime::DEFAULT_CONTEXT;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Clone)]
pub struct GpuBenchArgs {
    /// Tokens decoded per model in `bench gpu` (after 2 warm-up tokens).
    #[arg(long, default_value_t = 8)]
    pub gpu_decode_tokens: usize,
    /// Prompt tokens prefilled in `bench gpu`.
    #[arg(long, default_value_t = 64)]
    pub gpu_prefill_tokens: usize,
    /// The span measured: step 0 is uniform n_up, the last step uniform n_low (the demo
    /// ensemble's 4 -> 2 by default).
    #[arg(long, default_value_t = 4)]
    pub n_up: u32,
    #[arg(long, default_value_t = 2)]
    pub n_low: u32,
    /// Cached positions before the long-context decode measurement (0: skip it): attention
    /// reads the whole cache per token, the other kernels do not.
    #[arg(long, default_value_t = 1024)]
    pub gpu_long_context: usize,
    /// Random weights of the demo model's shapes instead of --model/--text (speed does not
    /// depend on the values): for a machine that has a GPU but not the model file.
    #[arg(long)]
    pub gpu_synthetic: bool,
}

/// SmolLM2-135M's shapes with random weights.
fn synthetic() -> Weights {
    let mut c = flexquant::model::tiny::tiny_config();
    (c.hidden_size, c.intermediate_size, c.num_hidden_layers) = (576, 1536, 30);
    (c.num_attention_heads, c.num_key_value_heads, c.head_dim) = (9, Some(3), Some(64));
    (
        c.vocab_size,
        c.tie_word_embeddings,
        c.max_position_embeddings,
    ) = (49152, true, 2048);
    let mut rng = flexquant::runtime::generate::Rng::new(1);
    let mut rand = |n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * s).collect()
    };
    let h = c.hidden_size;
    let modules = (0..c.num_hidden_layers * 7)
        .map(|i| {
            let (r, k) = ModuleId::from_index(i).kind.shape(&c);
            Linear::new(r, k, rand(r * k, 1.0 / (k as f32).sqrt()))
        })
        .collect();
    Weights {
        embed: rand(c.vocab_size * h, 1.0).into(),
        norms: vec![
            LayerNorms {
                attn_norm: vec![1.0; h],
                ffn_norm: vec![1.0; h]
            };
            c.num_hidden_layers
        ],
        modules,
        final_norm: vec![1.0; h],
        lm_head: None,
        config: c,
    }
}

struct Timed {
    bits: Vec<u32>,
    token_s: f64,
}

fn model(gpu: &Arc<Gpu>, w: &Weights, bits: &[u32], opts: ModelOptions) -> Result<Model> {
    let modules = rtn_modules(w, |id| bits[id.index()], 32)?;
    Ok(pollster::block_on(gpu_model(
        gpu.clone(),
        w,
        &modules,
        opts,
    ))?)
}

/// Seconds per decoded token (greedy, top-1 back to the host each step).
fn decode_seconds(g: &mut Model, prompt: &[u32], n: usize) -> Result<f64> {
    Ok(decode_split(g, prompt, n)?.0)
}

/// Seconds per decoded token and, of them, the host's encoding and submission.
fn decode_split(g: &mut Model, prompt: &[u32], n: usize) -> Result<(f64, f64)> {
    g.truncate(0);
    let mut next = pollster::block_on(g.step(prompt))?[0].0;
    for _ in 0..2 {
        next = pollster::block_on(g.step(&[next]))?[0].0;
    }
    let mut encode = 0.0;
    let t = Instant::now();
    for _ in 0..n {
        next = pollster::block_on(g.step(&[next]))?[0].0;
        encode += g.encode_seconds();
    }
    Ok((t.elapsed().as_secs_f64() / n as f64, encode / n as f64))
}

/// Decode with a fusion of dispatches against the same model without, alternated twice, the
/// best of each: each RMSNorm folded into the matvecs after it (`ModelOptions::fuse_norm`), or
/// a layer's Q, K and V and its gate and up projections each in one dispatch
/// (`fuse_modules`); both defaults depend on the adapter.
struct Fused {
    /// Whether this adapter's models fuse so by default.
    by_default: bool,
    dispatches: usize,
    dispatches_unfused: usize,
    token_s: f64,
    token_s_unfused: f64,
}

impl Fused {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "dispatches": self.dispatches,
            "dispatches_unfused": self.dispatches_unfused,
            "seconds_per_token": self.token_s,
            "seconds_per_token_unfused": self.token_s_unfused,
            "speedup": self.token_s_unfused / self.token_s,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn fused_figures(
    what: &str,
    gpu: &Arc<Gpu>,
    w: &Weights,
    bits: &[u32],
    with: impl Fn(bool) -> ModelOptions,
    prompt: &[u32],
    a: &GpuBenchArgs,
    by_default: bool,
) -> Result<Fused> {
    let (mut fused, mut unfused) = (
        model(gpu, w, bits, with(true))?,
        model(gpu, w, bits, with(false))?,
    );
    let (mut f, mut u) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        f = f.min(decode_seconds(&mut fused, prompt, a.gpu_decode_tokens)?);
        u = u.min(decode_seconds(&mut unfused, prompt, a.gpu_decode_tokens)?);
    }
    eprintln!(
        "  {what}: {:.3} ms/token ({} dispatches) against {:.3} ({})",
        f * 1e3,
        fused.dispatches_per_token(),
        u * 1e3,
        unfused.dispatches_per_token()
    );
    Ok(Fused {
        by_default,
        dispatches: fused.dispatches_per_token(),
        dispatches_unfused: unfused.dispatches_per_token(),
        token_s: f,
        token_s_unfused: u,
    })
}

fn module_bytes(w: &Weights, bits: &[u32]) -> u64 {
    let c = &w.config;
    (0..bits.len())
        .map(|i| {
            let (r, k) = ModuleId::from_index(i).kind.shape(c);
            PackedShape::new(r, k, bits[i], 32).map_or(0, |s| s.bytes() as u64)
        })
        .sum()
}

pub fn run(model_path: &Path, text: &Path, out_dir: &Path, a: &GpuBenchArgs) -> Result<()> {
    let (w, ids, source) = if a.gpu_synthetic {
        let w = synthetic();
        let v = w.config.vocab_size as u32;
        let ids: Vec<u32> = (0..a.gpu_prefill_tokens as u32 + 8)
            .map(|i| i * 7919 % v)
            .collect();
        (w, ids, "synthetic (SmolLM2-135M shapes)".to_string())
    } else {
        let m = super::load_model(model_path)?;
        let ids = m.tokenizer.encode(&super::read_text(text)?)?;
        (m.weights, ids, m.source)
    };
    if ids.len() < a.gpu_prefill_tokens + 8 {
        anyhow::bail!("{}: only {} tokens", text.display(), ids.len());
    }
    let m = &w;
    let c = &w.config;
    let n = w.modules.len();
    // The configuration the browser and the CLI decode with: their default context, which
    // fixes attention's ranges (a combine pass per layer past 128 positions, at every token),
    // and the 40 candidates the top-k returns. Until stop 42 the benchmark ran a context of
    // its own tokens (one range) and one candidate, so neither cost was in its figures.
    let opts = ModelOptions {
        context: DEFAULT_CONTEXT
            .max(a.gpu_prefill_tokens + a.gpu_decode_tokens + 16)
            .min(c.max_position_embeddings),
        max_batch: 64,
        logit_rows: 1,
        ..Default::default()
    };
    let gpu = Arc::new(Gpu::new_blocking(Model::requirements(c, &opts))?);
    let adapter = gpu.adapter_name();
    eprintln!("bench gpu on {adapter}");
    let prompt = &ids[..4];

    let up = vec![a.n_up; n];
    let low = vec![a.n_low; n];
    let mid: Vec<u32> = (0..n)
        .map(|i| if i % 2 == 0 { a.n_low } else { a.n_up })
        .collect();
    let mid_bytes = module_bytes(m, &mid);
    let nearest = BITS
        .iter()
        .map(|&b| vec![b; n])
        .min_by_key(|u| module_bytes(m, u).abs_diff(mid_bytes))
        .unwrap();
    let mut timed: Vec<Timed> = Vec::new();
    let mut mid_extra = None;
    let mut up_split = None;
    for bits in [&up, &mid, &low, &nearest] {
        if let Some(t) = timed.iter().find(|t| &t.bits == bits) {
            eprintln!("  (same EQM as measured: {:.3} s/token)", t.token_s);
            timed.push(Timed {
                bits: bits.clone(),
                token_s: t.token_s,
            });
            continue;
        }
        let mut g = model(&gpu, m, bits, opts)?;
        let (token_s, encode_s) = decode_split(&mut g, prompt, a.gpu_decode_tokens)?;
        if bits == &up {
            // Where step 0's token time goes: the host encoding its dispatches (above) and the
            // throughput without a round trip per token.
            g.truncate(0);
            pollster::block_on(g.step(prompt))?;
            let pipelined = pollster::block_on(
                g.pipelined_seconds(&ids[4..(4 + a.gpu_decode_tokens).min(ids.len())]),
            )?;
            let dispatches = g.dispatches_per_token();
            let norms = fused_figures(
                "norms folded into the matvecs",
                &gpu,
                m,
                bits,
                |fuse| ModelOptions {
                    fuse_norm: Some(fuse),
                    ..opts
                },
                prompt,
                a,
                g.folds_norms(),
            )?;
            // Q, K, V and gate, up in one dispatch each, over mixed bit-widths as often as
            // not (the mixed model's).
            let modules = fused_figures(
                "modules fused (mixed bit-widths)",
                &gpu,
                m,
                &mid,
                |fuse| ModelOptions {
                    fuse_modules: Some(fuse),
                    ..opts
                },
                prompt,
                a,
                g.fuses_modules(),
            )?;
            up_split = Some((token_s, encode_s, pipelined, dispatches, [norms, modules]));
        }
        eprintln!(
            "  {:.2} MB of modules: {:.3} s/token",
            module_bytes(m, bits) as f64 / 1e6,
            token_s
        );
        if bits == &mid {
            mid_extra = Some(mid_figures(&gpu, m, &mut g, &ids, a, token_s)?);
        }
        timed.push(Timed {
            bits: bits.clone(),
            token_s,
        });
    }
    let (prefill_tok_s, swap_s, bandwidth_ratio, bytes_per_token) = mid_extra.unwrap();
    let tok_s = |i: usize| 1.0 / timed[i].token_s;
    // The yardstick over as many bytes as step 0 reads per token; each model's decode speed
    // as a fraction of it.
    let head = 2 * (c.vocab_size * c.hidden_size) as u64;
    let token_bytes = |bits: &[u32]| module_bytes(m, bits) + head;
    let mut kernels = pollster::block_on(flexquant::gpu::variant::kernels_for_adapter(&gpu));
    let choice = flexquant::gpu::variant::chosen(&gpu);
    let read = pollster::block_on(read_kernel(&gpu, &mut kernels, token_bytes(&up), 5));
    let vs_read = |i: usize| token_bytes(&timed[i].bits) as f64 * tok_s(i) / read.bytes_per_s;
    let qm3 = vec![3; n];
    let qm3_tok_s = if [&up, &low].contains(&&qm3) || nearest == qm3 {
        let i = timed.iter().position(|t| t.bits == qm3).unwrap();
        tok_s(i)
    } else {
        let mut g = model(&gpu, m, &qm3, opts)?;
        1.0 / decode_seconds(&mut g, prompt, a.gpu_decode_tokens)?
    };
    // Decode after a long prompt: what attention over a full cache costs per token.
    let long = long_context_tok_s(&gpu, m, &up, &ids, opts, a)?;
    let long_report = long.map(|l| {
        eprintln!(
            "  decode after {} cached positions: {:.1} tokens/s ({:.2} of a short context's); its cache to int8 in {:.1} ms, back to f16 in {:.1} ms",
            l.context,
            l.tok_s,
            l.tok_s / tok_s(0),
            l.to_int8_s * 1e3,
            l.to_f16_s * 1e3
        );
        serde_json::json!({"context": l.context, "decode_tok_s": l.tok_s,
            "vs_short_context": l.tok_s / tok_s(0),
            "kv_convert": {"positions": l.cached, "to_int8_seconds": l.to_int8_s,
                "to_f16_seconds": l.to_f16_s}})
    });
    // The adapter's cost per dispatch: times a token's dispatches, the floor of its time.
    let (token_s, encode_s, pipelined_s, dispatches, fused) = up_split.unwrap();
    let split = (token_s, encode_s);
    let dispatch_s = pollster::block_on(flexquant::gpu::probe::dispatch_seconds(
        &gpu,
        &mut kernels,
        256,
    ));
    eprintln!(
        "  step 0: {:.3} ms/token, {:.3} ms encoding {dispatches} dispatches, {:.2} us per dispatch on the adapter, {:.3} ms/token pipelined",
        split.0 * 1e3,
        split.1 * 1e3,
        dispatch_s * 1e6,
        pipelined_s * 1e3
    );
    // The matvec kernel alone on matrices several times a token's module, against the read
    // kernel over as many bytes.
    let roof_bytes: u64 = if gpu.info.device_type == wgpu::DeviceType::Cpu {
        16 << 20
    } else {
        96 << 20
    };
    let roof_read = pollster::block_on(read_kernel(&gpu, &mut kernels, roof_bytes, 5));
    let mut roofline = Vec::new();
    for bits in BITS {
        let (bytes, s) = pollster::block_on(flexquant::gpu::probe::matvec_roofline(
            &gpu,
            &mut kernels,
            bits,
            roof_bytes,
            3,
        ))?;
        let gbs = bytes as f64 / s / 1e9;
        eprintln!(
            "  {bits}-bit matvec over {:.1} MB: {gbs:.1} GB/s",
            bytes as f64 / 1e6
        );
        roofline.push(
            serde_json::json!({"bits": bits, "bytes": bytes, "matvec_seconds": s,
            "matvec_gbs": gbs, "vs_read_kernel": bytes as f64 / s / roof_read.bytes_per_s}),
        );
    }
    // Every variant the probe times, on the 4-bit matrix of the roofline.
    let mut by_variant = Vec::new();
    for (t, r, sg) in flexquant::gpu::variant::candidates(&gpu) {
        let mut k = flexquant::gpu::Kernels::with_variant(t, r, sg).map_err(anyhow::Error::msg)?;
        let (bytes, s) = pollster::block_on(flexquant::gpu::probe::matvec_roofline(
            &gpu, &mut k, 4, roof_bytes, 3,
        ))?;
        let gbs = bytes as f64 / s / 1e9;
        eprintln!("  4-bit matvec, {}: {gbs:.1} GB/s", k.variant_name());
        by_variant.push(
            serde_json::json!({"variant": k.variant_name(), "threads_per_row": t,
            "rows_per_thread": r, "subgroups": sg, "matvec_gbs": gbs,
            "vs_read_kernel": bytes as f64 / s / roof_read.bytes_per_s}),
        );
    }
    // The plane-reading matvec against the packed one on the same matrices (4 MB at 4 bits).
    let mut plane_kernel = Vec::new();
    for bits in [8, 6, 5, 4, 3, 2] {
        let (packed_s, planes_s) = pollster::block_on(
            flexquant::gpu::probe::plane_vs_packed_matvec(&gpu, &mut kernels, bits, 8192, 5),
        )?;
        eprintln!("  {bits}-bit matvec: packed {packed_s:.2e} s, planes {planes_s:.2e} s");
        plane_kernel.push(serde_json::json!({"bits": bits, "rows": 8192, "cols": 576,
            "packed_seconds": packed_s, "planes_seconds": planes_s,
            "planes_vs_packed": packed_s / planes_s}));
    }
    let adapter_report = serde_json::json!({
        "adapter": adapter,
        "device_type": format!("{:?}", gpu.info.device_type),
        "backend": format!("{:?}", gpu.info.backend),
        "model": source,
        "n_up": a.n_up,
        "n_low": a.n_low,
        "variant": kernels.variant_name(),
        "variant_chosen_by": choice.as_ref().map(|c| c.by),
        "variant_probe_seconds": choice.map(|c| c.timings.iter()
            .map(|t| serde_json::json!({"threads_per_row": t.0, "rows_per_thread": t.1, "subgroups": t.2, "token_matvec_seconds": t.3}))
            .collect::<Vec<_>>()),
        "read_kernel_gbs": read.bytes_per_s / 1e9,
        "read_kernel_variant": read.variant,
        "read_kernel_bytes": token_bytes(&up),
        "decode_tokens": a.gpu_decode_tokens,
        "long_context_step_0": long_report,
        "token_split_step_0": {
            "seconds_per_token": split.0,
            "encode_seconds": split.1,
            "dispatches": dispatches,
            "adapter_seconds_per_dispatch": dispatch_s,
            "dispatch_floor_seconds": dispatch_s * dispatches as f64,
            "pipelined_seconds_per_token": pipelined_s,
            "norms_folded": fused[0].by_default,
            "fused_norms": fused[0].json(),
            "modules_fused": fused[1].by_default,
            "fused_modules": fused[1].json(),
        },
        "matvec_roofline": {"read_kernel_gbs": roof_read.bytes_per_s / 1e9, "by_bits": roofline,
            "by_variant_4_bits": by_variant},
        "decode_tok_s": {"step_0": tok_s(0), "qm3": qm3_tok_s, "last_step": tok_s(2)},
        "decode_vs_read_kernel": vs_read(0),
        "decode_vs_read_kernel_by_model": {"step_0": vs_read(0), "mid": vs_read(1), "last_step": vs_read(2)},
        "decode_tok_s_n_up": tok_s(0),
        "decode_tok_s_mid": tok_s(1),
        "decode_tok_s_n_low": tok_s(2),
        "mid_module_bytes": mid_bytes,
        "nearest_uniform_bits": nearest[0],
        "nearest_uniform_module_bytes": module_bytes(m, &nearest),
        "decode_tok_s_nearest_uniform": tok_s(3),
        "mixed_vs_uniform": tok_s(1) / tok_s(3),
        "weight_bytes_per_token": bytes_per_token,
        "bandwidth_ratio": bandwidth_ratio,
        "swap_seconds": swap_s,
        "swap_vs_token": swap_s / timed[1].token_s,
        "prefill_tokens": a.gpu_prefill_tokens,
        "context": opts.context,
        "top_k": opts.top_k,
        "prefill_tok_s": prefill_tok_s,
        "plane_kernel": plane_kernel,
    });
    eprintln!(
        "  read kernel {:.2} GB/s ({}); decode at step 0 is {:.3} of it",
        read.bytes_per_s / 1e9,
        read.variant,
        vs_read(0)
    );
    // One object per adapter: an earlier gpu.json's other adapters (a real GPU measured on
    // another machine) are kept, this adapter's entry replaced.
    let path = out_dir.join("gpu.json");
    let mut adapters: Vec<serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("adapters").and_then(|a| a.as_array()).cloned())
        .unwrap_or_default();
    adapters.retain(|x| x["adapter"] != adapter_report["adapter"]);
    adapters.push(adapter_report);
    let report = serde_json::json!({ "adapters": adapters });
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", path.display());
    Ok(())
}

/// Step 0 after `--gpu-long-context` cached positions.
struct LongContext {
    context: usize,
    /// Decode tokens/s there.
    tok_s: f64,
    /// Positions cached after the decode, and the seconds to convert them (every layer's keys
    /// and values, `Model::convert_kv`) to int8 and back to f16.
    cached: usize,
    to_int8_s: f64,
    to_f16_s: f64,
}

/// Decode speed of step 0 after `--gpu-long-context` cached positions (the text's tokens,
/// repeated as needed), and what converting that cache between formats takes; `None` when
/// that is 0.
fn long_context_tok_s(
    gpu: &Arc<Gpu>,
    m: &Weights,
    bits: &[u32],
    ids: &[u32],
    opts: ModelOptions,
    a: &GpuBenchArgs,
) -> Result<Option<LongContext>> {
    let max = m.config.max_position_embeddings;
    let ctx = a
        .gpu_long_context
        .min(max.saturating_sub(a.gpu_decode_tokens + 16));
    if ctx == 0 {
        return Ok(None);
    }
    let opts = ModelOptions {
        context: ctx + a.gpu_decode_tokens + 16,
        ..opts
    };
    let mut g = model(gpu, m, bits, opts)?;
    let prompt: Vec<u32> = ids.iter().copied().cycle().take(ctx).collect();
    let token_s = decode_seconds(&mut g, &prompt, a.gpu_decode_tokens)?;
    let mut convert = |to| -> Result<f64> {
        let t = Instant::now();
        pollster::block_on(g.convert_kv(to))?;
        gpu.wait();
        Ok(t.elapsed().as_secs_f64())
    };
    let to_int8_s = convert(KvFormat::Int8)?;
    let to_f16_s = convert(KvFormat::F16)?;
    Ok(Some(LongContext {
        context: ctx,
        tok_s: 1.0 / token_s,
        cached: g.len(),
        to_int8_s,
        to_f16_s,
    }))
}

/// Prefill speed, one swap step, and weight bandwidth vs a plain copy, on the middle EQM.
fn mid_figures(
    gpu: &Arc<Gpu>,
    m: &Weights,
    g: &mut Model,
    ids: &[u32],
    a: &GpuBenchArgs,
    token_s: f64,
) -> Result<(f64, f64, f64, u64)> {
    g.truncate(0);
    let t = Instant::now();
    pollster::block_on(g.step(&ids[..a.gpu_prefill_tokens]))?;
    let prefill_tok_s = a.gpu_prefill_tokens as f64 / t.elapsed().as_secs_f64();

    // One trajectory step: an MLP module of the middle layer to n_low (upload, bind group,
    // free), timed until the device has the new version.
    let layer = m.config.num_hidden_layers / 2;
    let id = ModuleId {
        layer,
        kind: flexquant::model::ModuleKind::Up,
    };
    let lin = m.module(id);
    let version = flexquant::quant::rtn::quantize_rtn(
        &lin.w, lin.rows, lin.cols, a.n_low, 32, false, "swap",
    )?;
    let t = Instant::now();
    pollster::block_on(g.set_module(id, &version))?;
    // The upload is staged until the next submission: submit nothing to flush it, then wait.
    gpu.queue.submit(std::iter::empty());
    gpu.wait();
    let swap_s = t.elapsed().as_secs_f64();

    // Bytes a decoded token must read: every module and the f16 head.
    let c = &m.config;
    let bytes = g.footprint().modules + 2 * (c.vocab_size * c.hidden_size) as u64;
    let copy = pollster::block_on(copy_seconds(gpu, bytes, 3));
    Ok((prefill_tok_s, swap_s, copy / token_s, bytes))
}
