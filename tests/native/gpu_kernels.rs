//! Per-kernel parity with a CPU reference on random shapes (llama.cpp's test-backend-ops
//! style): every WGSL kernel, every bit-width, sizes that are not multiples of the workgroup
//! size or of 32 columns.
//!
//! Error measure: for an output that is a sum, `|gpu - cpu| / sum |terms|`, the size of f32
//! rounding relative to the magnitudes summed; bound `NORM_ERR` (f32 epsilon is 6e-8, so this
//! allows ~100 roundings of the largest term and catches any wrong weight, which moves the
//! result by about 1/cols >= 1e-4 of that sum).

use crate::gpu_util::{f32s, gpu, kernels_for, u32s};
use crate::kernel_ref;
use flexquant::ensemble::format::BITS;
use flexquant::ensemble::plane_level::PlaneLevel;
use flexquant::gpu::kernels::{self, Kernel, Kernels};
use flexquant::gpu::params::*;
use flexquant::gpu::probe;
use flexquant::quant::rtn::quantize_rtn;
use flexquant::runtime::backend::{KvFormat, KvLayout};
use flexquant::runtime::generate::Rng;

const NORM_ERR: f64 = 1e-5;

fn rand_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// max over outputs of |got - want| / scale, where scale is the sum of |terms|.
fn norm_err(got: &[f32], want: &[f64], scale: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .zip(scale)
        .map(|((g, w), s)| (*g as f64 - w).abs() / s.max(1e-30))
        .fold(0.0, f64::max)
}

/// Shapes (rows, cols, group): rows not a multiple of 64, cols not a multiple of 32 or of the
/// group, and the demo model's shapes.
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 32, 32),
    (67, 100, 64),
    (130, 160, 64),
    (192, 576, 32),
    (65, 1000, 128),
    (576, 1536, 128),
];

#[test]
fn qlinear_matvec_and_matmul_match_dequantized_cpu() {
    let Some(gpu) = gpu() else { return };
    // Every matvec variant: a row per thread, 2 and 4 rows per thread (CPU adapters), a row
    // shared by 4, 16 or 32 threads and 4 or 2 rows shared by 4 or 16 (GPUs), their sums
    // through workgroup memory and, where the adapter's subgroups hold the row, by subgroup
    // shuffles; each reading packed codes and bit planes.
    let lanes = gpu.subgroup_lanes();
    for (tpr, rpt) in [
        (1, 1),
        (1, 2),
        (1, 4),
        (4, 1),
        (16, 1),
        (32, 1),
        (4, 4),
        (16, 2),
    ] {
        for sg in [false, true] {
            if sg && !(tpr > 1 && lanes.is_some_and(|l| l >= tpr)) {
                if tpr > 1 {
                    eprintln!("no subgroups of {tpr} lanes on {} ({lanes:?}): the subgroup variant of {tpr} threads per row is not run", gpu.adapter_name());
                }
                continue;
            }
            let mut k = Kernels::with_variant(tpr, rpt, sg).unwrap();
            qlinear_variant_matches(gpu, &mut k);
        }
    }
}

/// `MatvecQkv` and `MatvecGlu` (several matrices in one dispatch, each decoded at its own
/// bit-width at run time) against the dequantized matrices in f64, for every matvec variant
/// (as `qlinear_matvec_and_matmul_match_dequantized_cpu`), with and without the norm folded
/// in: ragged columns, row counts that end mid-workgroup, mixed bit-widths and groups.
#[test]
fn qlinear_parts_match_dequantized_cpu() {
    let Some(gpu) = gpu() else { return };
    let lanes = gpu.subgroup_lanes();
    for (tpr, rpt, sg) in [
        (1, 1, false),
        (1, 4, false),
        (16, 1, false),
        (32, 1, false),
        (4, 4, false),
        (16, 1, true),
        (32, 1, true),
    ] {
        if sg && lanes.is_none_or(|l| l < tpr) {
            eprintln!("no subgroups of {tpr} lanes on {} ({lanes:?}): the fused subgroup variant of {tpr} threads per row is not run", gpu.adapter_name());
            continue;
        }
        let mut k = Kernels::with_variant(tpr, rpt, sg).unwrap();
        let mut rng = Rng::new(7);
        // (bits, group) of Q, K and V; the gate and up take the first two. Every bit-width.
        let cases: [[(u32, usize); 3]; 3] = [
            [(8, 32), (3, 64), (5, 32)],
            [(2, 64), (6, 32), (4, 64)],
            [(4, 32), (4, 32), (4, 32)],
        ];
        for (case, members) in cases.iter().enumerate() {
            for norm in [false, true] {
                for (glu, rows) in [(false, [67usize, 19, 130]), (true, [75, 75, 0])] {
                    let cols = if case == 1 { 100 } else { 192 };
                    let parts = if glu { 2 } else { 3 };
                    parts_match(
                        gpu,
                        &mut k,
                        &mut rng,
                        &members[..parts],
                        &rows,
                        cols,
                        norm,
                        glu,
                    );
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn parts_match(
    gpu: &flexquant::gpu::Gpu,
    k: &mut Kernels,
    rng: &mut Rng,
    members: &[(u32, usize)],
    rows: &[usize],
    cols: usize,
    norm: bool,
    glu: bool,
) {
    let eps = 1e-5f32;
    let x = rand_vec(rng, cols, 2.0);
    let g: Vec<f32> = rand_vec(rng, cols, 0.5).iter().map(|v| 1.0 + v).collect();
    // The input the matrices see: x, or RMSNorm(x) * g.
    let xn: Vec<f64> = if norm {
        let ms = x.iter().map(|v| *v as f64 * *v as f64).sum::<f64>() / cols as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        x.iter()
            .zip(&g)
            .map(|(a, b)| *a as f64 * inv * *b as f64)
            .collect()
    } else {
        x.iter().map(|v| *v as f64).collect()
    };
    let mut params = QlinearPartsParams::default();
    let mut words = Vec::new();
    // Per member: each row's product and the sum of its terms' magnitudes.
    let mut sums: Vec<Vec<(f64, f64)>> = Vec::new();
    for (i, (&(bits, group), &r)) in members.iter().zip(rows).enumerate() {
        let w = rand_vec(rng, r * cols, 1.0);
        let m = quantize_rtn(&w, r, cols, bits, group, false, "test").unwrap();
        let deq = m.dequantize();
        sums.push(
            (0..r)
                .map(|row| {
                    let terms = deq[row * cols..(row + 1) * cols].iter().zip(&xn);
                    let t: Vec<f64> = terms.map(|(a, b)| *a as f64 * b).collect();
                    (t.iter().sum(), t.iter().map(|v| v.abs()).sum())
                })
                .collect(),
        );
        params.parts[i] = QlinearParams {
            eps,
            ..QlinearParams::dense(m.shape)
        };
        words.push(
            m.codes
                .iter()
                .chain(&m.scales)
                .copied()
                .collect::<Vec<u32>>(),
        );
    }
    let per_wg = k.matvec_rows_per_workgroup();
    let wgs = |r: usize| (r as u32).div_ceil(per_wg);
    let (kernel, grid) = match glu {
        true => (Kernel::MatvecGlu { norm }, wgs(rows[0])),
        false => (
            Kernel::MatvecQkv { norm },
            rows.iter().map(|&r| wgs(r)).sum(),
        ),
    };
    let mut inputs: Vec<Vec<u8>> = words
        .iter()
        .map(|w| bytemuck::cast_slice(w).to_vec())
        .collect();
    inputs.push(bytes(&x));
    if norm {
        inputs.push(bytes(&g));
    }
    let outputs: Vec<Vec<u8>> = match glu {
        true => vec![bytes(&vec![9f32; rows[0]])],
        false => rows.iter().map(|&r| bytes(&vec![9f32; r])).collect(),
    };
    let ins: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
    let outs: Vec<&[u8]> = outputs.iter().map(|v| v.as_slice()).collect();
    let out = pollster::block_on(probe::run(
        gpu,
        k,
        kernel,
        &params,
        (1, 0),
        &ins,
        &outs,
        [grid, 1, 1],
    ))
    .unwrap();
    // Each output's rows: Q, K and V's products; SwiGLU's silu(gate) * up.
    let want = kernel_ref::fused_want(glu, sums);
    for (i, (got, want)) in out.iter().zip(&want).enumerate() {
        let (w, scale): (Vec<f64>, Vec<f64>) = want.iter().copied().unzip();
        let e = norm_err(&f32s(got), &w, &scale);
        assert!(
            e < NORM_ERR,
            "{kernel:?} output {i} of {members:?} over {cols} columns, {}: normalized error {e:.2e}",
            k.variant_name()
        );
    }
}

/// Each case stores in one of two modes, alternating so that every kernel meets both: add
/// into y (the residual stream) and SwiGLU (y holds the gate and becomes silu(gate) * W x).
fn qlinear_variant_matches(gpu: &flexquant::gpu::Gpu, k: &mut Kernels) {
    let mut rng = Rng::new(1);
    let mut case = 0usize;
    for &bits in &BITS {
        for &(rows, cols, group) in &SHAPES {
            case += 1;
            let w = rand_vec(&mut rng, rows * cols, 1.0);
            let m = quantize_rtn(&w, rows, cols, bits, group, false, "test").unwrap();
            let deq = m.dequantize();
            // The packed codes, and the same matrix as bit planes (the plane-reading kernels).
            let level = PlaneLevel::from_packed(&m);
            let layouts = [
                (
                    false,
                    m.codes
                        .iter()
                        .chain(&m.scales)
                        .copied()
                        .collect::<Vec<u32>>(),
                    QlinearParams::dense(m.shape),
                ),
                (
                    true,
                    level.planes.iter().chain(&level.scales).copied().collect(),
                    QlinearParams::planes(&level),
                ),
            ];
            for ((planes, words, dense), n_tokens) in layouts
                .iter()
                .flat_map(|l| [1usize, 3, 11].map(move |n| (l, n)))
            {
                case += 1;
                let swiglu = case.is_multiple_of(2);
                let x = rand_vec(&mut rng, n_tokens * cols, 1.0);
                let y0 = if swiglu {
                    rand_vec(&mut rng, n_tokens * rows, 3.0)
                } else {
                    vec![1f32; n_tokens * rows]
                };
                let (want, scale): (Vec<f64>, Vec<f64>) = (0..n_tokens)
                    .flat_map(|t| (0..rows).map(move |r| (t, r)))
                    .map(|(t, r)| {
                        let row = &deq[r * cols..(r + 1) * cols];
                        let xr = &x[t * cols..(t + 1) * cols];
                        let s: f64 = row.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let a: f64 = row
                            .iter()
                            .zip(xr)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let g = y0[t * rows + r] as f64;
                        let silu = g / (1.0 + (-g).exp());
                        match swiglu {
                            true => (silu * s, silu.abs() * a + 1e-3),
                            false => (s + 1.0, a + 1.0), // the kernel adds into y = 1
                        }
                    })
                    .unzip();
                let params = QlinearParams {
                    accumulate: if swiglu { 2 } else { 1 },
                    ..*dense
                };
                let (kernel, grid) = if n_tokens == 1 {
                    let per_wg = k.matvec_rows_per_workgroup();
                    let kernel = match planes {
                        true => Kernel::PlaneMatvec(bits),
                        false => Kernel::Matvec(bits),
                    };
                    (kernel, [(rows as u32).div_ceil(per_wg), 1, 1])
                } else {
                    let g = [
                        (rows as u32).div_ceil(kernels::WG),
                        (n_tokens as u32).div_ceil(kernels::TT),
                        1,
                    ];
                    let kernel = match planes {
                        true => Kernel::PlaneMatmul(bits),
                        false => Kernel::Matmul(bits),
                    };
                    (kernel, g)
                };
                let out = pollster::block_on(probe::run(
                    gpu,
                    k,
                    kernel,
                    &params,
                    (n_tokens as u32, 0),
                    &[bytemuck::cast_slice(words), &bytes(&x)],
                    &[&bytes(&y0)],
                    grid,
                ))
                .unwrap();
                let e = norm_err(&f32s(&out[0]), &want, &scale);
                assert!(
                    e < NORM_ERR,
                    "{kernel:?} {rows}x{cols} group {group}, {n_tokens} tokens, {}, swiglu {swiglu}: normalized error {e:.2e}",
                    k.variant_name()
                );
                if n_tokens == 1 && !planes {
                    matvec_norm_matches(gpu, k, &mut rng, bits, &deq, words, &params, &y0);
                }
            }
        }
    }
}

/// `MatvecNorm` (decode's RMSNorm folded into the matvec) against the dequantized matrix
/// times RMSNorm(x) * g, computed in f64, in the store mode of `params`.
#[allow(clippy::too_many_arguments)]
fn matvec_norm_matches(
    gpu: &flexquant::gpu::Gpu,
    k: &mut Kernels,
    rng: &mut Rng,
    bits: u32,
    deq: &[f32],
    words: &[u32],
    params: &QlinearParams,
    y0: &[f32],
) {
    let (rows, cols) = (params.rows as usize, params.cols as usize);
    let eps = 1e-5f32;
    // A residual stream of a size RMSNorm matters for, and weights around 1.
    let x = rand_vec(rng, cols, 4.0);
    let g: Vec<f32> = rand_vec(rng, cols, 0.5).iter().map(|v| 1.0 + v).collect();
    let ms = x.iter().map(|v| *v as f64 * *v as f64).sum::<f64>() / cols as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    let xn: Vec<f64> = x
        .iter()
        .zip(&g)
        .map(|(a, b)| *a as f64 * inv * *b as f64)
        .collect();
    let (want, scale): (Vec<f64>, Vec<f64>) = (0..rows)
        .map(|r| {
            let row = &deq[r * cols..(r + 1) * cols];
            let s: f64 = row.iter().zip(&xn).map(|(a, b)| *a as f64 * b).sum();
            let a: f64 = row
                .iter()
                .zip(&xn)
                .map(|(a, b)| (*a as f64 * b).abs())
                .sum();
            let y = y0[r] as f64;
            match params.accumulate {
                2 => {
                    let silu = y / (1.0 + (-y).exp());
                    (silu * s, silu.abs() * a + 1e-3)
                }
                _ => (s + y, a + y.abs()),
            }
        })
        .unzip();
    let params = QlinearParams { eps, ..*params };
    let kernel = Kernel::MatvecNorm(bits);
    let per_wg = k.matvec_rows_per_workgroup();
    let out = pollster::block_on(probe::run(
        gpu,
        k,
        kernel,
        &params,
        (1, 0),
        &[bytemuck::cast_slice(words), &bytes(&x), &bytes(&g)],
        &[&bytes(y0)],
        [(rows as u32).div_ceil(per_wg), 1, 1],
    ))
    .unwrap();
    let e = norm_err(&f32s(&out[0]), &want, &scale);
    assert!(
        e < NORM_ERR,
        "{kernel:?} {rows}x{cols}, {}, accumulate {}: normalized error {e:.2e}",
        k.variant_name(),
        params.accumulate
    );
}

fn run<P: KernelParams>(
    kernel: Kernel,
    params: &P,
    step: (u32, u32),
    inputs: &[&[u8]],
    outputs: &[&[u8]],
    grid: [u32; 3],
) -> Vec<Vec<u8>> {
    let gpu = gpu().unwrap();
    let mut k = kernels_for(gpu);
    pollster::block_on(probe::run(
        gpu, &mut k, kernel, params, step, inputs, outputs, grid,
    ))
    .unwrap()
}

#[test]
fn embed_lookup_of_the_8bit_table_matches_cpu() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(3);
    // 132 columns: not a multiple of the group, so the last group is ragged.
    for (vocab, hidden, group) in [(300usize, 132usize, 64usize), (50, 64, 32)] {
        let table = rand_vec(&mut rng, vocab * hidden, 1.0);
        let q = quantize_rtn(&table, vocab, hidden, 8, group, false, "embedding").unwrap();
        let deq = q.dequantize();
        let tokens: Vec<u32> = vec![0, vocab as u32 - 1, 17, 17, 5];
        let want: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| deq[t as usize * hidden..(t as usize + 1) * hidden].to_vec())
            .collect();
        let s = q.shape;
        let x = vec![0f32; tokens.len() * hidden];
        let params = EmbedParams {
            hidden: hidden as u32,
            vocab: vocab as u32,
            words_per_row: s.words_per_row() as u32,
            groups_per_row: s.groups_per_row() as u32,
            group: group as u32,
            scale_base: s.code_words() as u32,
        };
        let out = run(
            Kernel::Embed,
            &params,
            (tokens.len() as u32, 0),
            &[&q.to_bytes(), bytemuck::cast_slice(&tokens)],
            &[&bytes(&x)],
            [(hidden as u32 / 4).div_ceil(64), tokens.len() as u32, 1],
        );
        let got = f32s(&out[0]);
        let e = common_max_abs(&got, &want);
        assert!(
            e < 1e-6,
            "embedding {vocab}x{hidden} g{group}: max err {e:.2e}"
        );
    }
}

#[test]
fn rmsnorm_matches_cpu() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(4);
    for (n, t) in [(64usize, 1usize), (576, 5), (100, 3), (7, 2)] {
        let x = rand_vec(&mut rng, n * t, 3.0);
        let g = rand_vec(&mut rng, n, 1.0);
        let eps = 1e-5f32;
        let mut want = vec![0f32; n * t];
        flexquant::model::ops::rmsnorm(&x, &g, eps, &mut want);
        let y = vec![0f32; n * t];
        let out = run(
            Kernel::RmsNorm,
            &RmsNormParams {
                n: n as u32,
                eps,
                last_only: 0,
            },
            (t as u32, 0),
            &[&bytes(&g), &bytes(&x)],
            &[&bytes(&y)],
            [t as u32, 1, 1],
        );
        let got = f32s(&out[0]);
        // Each output is one product chain; the error is in the 1/sqrt of a sum of n squares.
        let want64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
        let scale: Vec<f64> = want.iter().map(|v| v.abs() as f64 + 1e-6).collect();
        let e = norm_err(&got, &want64, &scale);
        assert!(e < NORM_ERR, "rmsnorm n {n}: {e:.2e}");
        // last_only: one workgroup normalizes the last row into row 0 (the head's input).
        let out = run(
            Kernel::RmsNorm,
            &RmsNormParams {
                n: n as u32,
                eps,
                last_only: 1,
            },
            (t as u32, 0),
            &[&bytes(&g), &bytes(&x)],
            &[&bytes(&y)],
            [1, 1, 1],
        );
        let got = f32s(&out[0]);
        let last = (t - 1) * n..t * n;
        let e = norm_err(&got[..n], &want64[last.clone()], &scale[last]);
        assert!(e < NORM_ERR, "rmsnorm last_only n {n} t {t}: {e:.2e}");
    }
}

/// The KV cache (`rope.wgsl`, the CPU backend's bytes: `cpu::kv`) of rows of heads of `hd`,
/// as u32 words.
fn to_cache(x: &[f32], l: &KvLayout) -> Vec<u32> {
    let hd = l.head_dim;
    let mut b = vec![0u8; x.len() / hd * l.head_bytes()];
    flexquant::cpu::kv::store(x, l, &mut b);
    b.chunks(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

/// `to_cache`'s values (the CPU backend's reading of them).
fn from_cache(w: &[u32], l: &KvLayout) -> Vec<f32> {
    flexquant::cpu::kv::widened(bytemuck::cast_slice(w), l)
}

/// The cache's layout for heads of `hd` (`KvLayout::of` a model's config).
fn layout(hd: usize, format: KvFormat) -> KvLayout {
    let c = flexquant::model::LlamaConfig {
        head_dim: Some(hd),
        ..flexquant::model::tiny::tiny_config()
    };
    KvLayout::of(&c, format)
}

/// One dispatch rotates the call's query rows (by token) and stores its new keys (rotated) and
/// values into the int8 cache rows of their absolute positions, leaving the other rows alone.
#[test]
fn rope_matches_cpu_and_stores_keys_and_values_in_f16_and_int8() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(5);
    // int8: a head of 16 has one scale; of 64, two groups of 32.
    for hd in [16usize, 64] {
        for format in [KvFormat::F16, KvFormat::Int8] {
            rope_stores(&mut rng, &layout(hd, format));
        }
    }
}

fn rope_stores(rng: &mut Rng, kv: &KvLayout) {
    let (heads, kv_heads, ctx, theta) = (3usize, 2usize, 40usize, 10000.0f32);
    let hd = kv.head_dim;
    let kv_dim = kv_heads * hd;
    // Words of the cache per position.
    let row = kv_heads * kv.head_bytes() / 4;
    let table_rope = flexquant::model::ops::Rope::new(theta, hd, 0, ctx);
    let table: Vec<f32> = table_rope
        .cos
        .iter()
        .chain(&table_rope.sin)
        .copied()
        .collect();
    for (pos0, t) in [(0usize, 4usize), (7, 3), (33, 1)] {
        let q = rand_vec(rng, t * heads * hd, 1.0);
        // New keys and values, two of them far beyond f16's range (int8 has no overflow).
        let mut k_new = rand_vec(rng, t * kv_dim, 1.0);
        let mut v_new = rand_vec(rng, t * kv_dim, 1.0);
        v_new[1] = 1e6;
        k_new[kv_dim - 1] = -3e5;
        let kc = to_cache(&rand_vec(rng, ctx * kv_dim, 1.0), kv);
        let vc = to_cache(&rand_vec(rng, ctx * kv_dim, 1.0), kv);
        let rope = flexquant::model::ops::Rope::new(theta, hd, pos0, t);
        let mut want_q = q.clone();
        rope.apply(&mut want_q, heads);
        let mut rotated = k_new.clone();
        rope.apply(&mut rotated, kv_heads);
        let rows = pos0 * row..(pos0 + t) * row;
        let params = RopeParams {
            q_stride: (heads * hd) as u32,
            kv_stride: kv_dim as u32,
            q_heads: heads as u32,
            k_heads: kv_heads as u32,
            head_dim: hd as u32,
            sin_base: (ctx * hd / 2) as u32,
            kv_group: kv.group as u32,
            kv_int8: (kv.format == KvFormat::Int8) as u32,
        };
        let out = run(
            Kernel::Rope,
            &params,
            (t as u32, pos0 as u32),
            &[&bytes(&table), &bytes(&k_new), &bytes(&v_new)],
            &[
                &bytes(&q),
                bytemuck::cast_slice(&kc),
                bytemuck::cast_slice(&vc),
            ],
            [
                ((heads * hd / 2 + 2 * kv_heads * hd / 8) as u32).div_ceil(64),
                t as u32,
                1,
            ],
        );
        let e = common_max_abs(&f32s(&out[0]), &want_q);
        assert!(
            e < 1e-6,
            "rope queries hd {hd} pos0 {pos0}: max abs error {e:.2e}"
        );
        for (name, got, want, cache) in [("K", &out[1], &rotated, &kc), ("V", &out[2], &v_new, &vc)]
        {
            let got = u32s(got);
            // Rows outside the call's positions are left bit for bit.
            let outside = (0..got.len()).filter(|i| !rows.contains(i));
            assert!(
                outside.clone().all(|i| got[i] == cache[i]),
                "rope {name} cache hd {hd} pos0 {pos0}: a row outside the call's positions changed"
            );
            // Each group's scale is its largest magnitude, and every element within half a
            // level of it (the CPU's rounding, `cpu::kv::store`).
            let got = from_cache(&got[rows.clone()], kv);
            if kv.format == KvFormat::F16 {
                // Within f16's rounding (half an ulp, 2^-11 relative), clamped to its range.
                for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                    let w = w.clamp(-65504.0, 65504.0);
                    assert!(
                        (g - w).abs() <= w.abs() * 2f32.powi(-11) + 1e-7,
                        "rope {name} f16 cache hd {hd} pos0 {pos0}, element {i}: {g} for {w}"
                    );
                }
                continue;
            }
            let groups = got.chunks(kv.group).zip(want.chunks(kv.group));
            for (h, (g, w)) in groups.enumerate() {
                let m = w.iter().fold(0f32, |a, v| a.max(v.abs()));
                let gm = g.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(
                    (gm - m).abs() <= m * 1e-5,
                    "rope {name} hd {hd} pos0 {pos0} group {h}: {gm} for {m}"
                );
                for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                    assert!(
                        (g - w).abs() <= m / 254.0 * 1.001 + 1e-6,
                        "rope {name} cache hd {hd} pos0 {pos0}, group {h} element {i}: {g} for {w}"
                    );
                }
            }
        }
    }
}

/// `kv_convert.wgsl` writes the bytes the CPU backend's `cpu::kv::store` writes for the values
/// it reads: f16 -> int8 with each group's scale bit for bit and every code the CPU's (or, where
/// the value sits on a level's midpoint, its neighbour), int8 -> f16 within f16's rounding; the
/// words past the converted heads are left alone. Heads of 64 (two groups of 32 each) and 40
/// (one group), a group of zeros and values at f16's largest.
#[test]
fn kv_convert_matches_the_cpu_cache_bytes() {
    use flexquant::gpu::kv_convert;
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(11);
    for hd in [64usize, 40] {
        let (l16, l8) = (layout(hd, KvFormat::F16), layout(hd, KvFormat::Int8));
        let c = flexquant::model::LlamaConfig {
            head_dim: Some(hd),
            ..flexquant::model::tiny::tiny_config()
        };
        // 70 positions of the tiny config's KV heads: more than one workgroup of groups.
        let positions = 70;
        let n = positions * c.n_kv_heads() * hd;
        let mut x = rand_vec(&mut rng, n, 2.0);
        x[..l8.group].fill(0.0);
        x[l8.group] = 65504.0;
        x[2 * l8.group + 1] = -65504.0;
        let spare = 37; // words past the converted heads, left as they are
        for to in [KvFormat::Int8, KvFormat::F16] {
            let (from_l, to_l) = match to {
                KvFormat::Int8 => (&l16, &l8),
                KvFormat::F16 => (&l8, &l16),
            };
            let src = to_cache(&x, from_l);
            let want = to_cache(&from_cache(&src, from_l), to_l);
            let mut dst = vec![0xdead_beefu32; want.len() + spare];
            let p = kv_convert::params(&c, to, positions);
            let out = run(
                Kernel::KvConvert,
                &p,
                (1, 0),
                &[bytemuck::cast_slice(&src)],
                &[bytemuck::cast_slice(&dst)],
                kv_convert::grid(&p),
            );
            let got = u32s(&out[0]);
            assert!(
                got[want.len()..].iter().all(|&w| w == 0xdead_beef),
                "kv_convert to {to:?} hd {hd}: wrote past the converted heads"
            );
            dst.truncate(want.len());
            let got = &got[..want.len()];
            if to == KvFormat::F16 {
                let (g, w) = (from_cache(got, to_l), from_cache(&src, from_l));
                for (i, (&g, &w)) in g.iter().zip(&w).enumerate() {
                    assert!(
                        (g - w).abs() <= w.abs() * 2f32.powi(-11) + 1e-7,
                        "kv_convert to f16 hd {hd}, element {i}: {g} for {w}"
                    );
                }
                continue;
            }
            let words = l8.head_bytes() / 4;
            let code_words = hd / 4;
            let mut ties = 0;
            for (h, (g, w)) in got.chunks(words).zip(want.chunks(words)).enumerate() {
                assert_eq!(
                    g[code_words..],
                    w[code_words..],
                    "kv_convert to int8 hd {hd}, head {h}: scales"
                );
                let codes = |ws: &[u32]| -> Vec<i8> {
                    bytemuck::cast_slice::<u32, i8>(&ws[..code_words]).to_vec()
                };
                for (i, (a, b)) in codes(g).into_iter().zip(codes(w)).enumerate() {
                    assert!(
                        (a as i32 - b as i32).abs() <= 1,
                        "kv_convert to int8 hd {hd}, head {h} element {i}: code {a} for {b}"
                    );
                    ties += (a != b) as usize;
                }
            }
            assert!(
                ties * 1000 <= n,
                "kv_convert to int8 hd {hd}: {ties} of {n} codes a level off the CPU's"
            );
        }
    }
    // A cache too large for one row of workgroups spreads over y.
    let p = KvConvertParams {
        heads: 3_000_000,
        head_dim: 64,
        kv_group: 32,
        to_int8: 1,
    };
    let g = kv_convert::grid(&p);
    assert!(g[0] <= 65535 && g[0] * g[1] * 64 >= 6_000_000, "{g:?}");
}

fn common_max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn attention_matches_cpu_over_the_cache() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(6);
    // (heads, kv heads, head_dim, pos0, tokens): GQA groups 1..3, cache lengths across tiles;
    // int8 with one scale per head (8, 16) and with groups of 32 (64).
    let cases = [
        (4usize, 2usize, 16usize, 0usize, 5usize),
        (9, 3, 64, 70, 1),
        (2, 2, 8, 0, 1),
        (6, 2, 32, 130, 3),
    ];
    let formats = [KvFormat::F16, KvFormat::Int8];
    for ((nh, nkv, hd, pos0, t), format) in cases.into_iter().flat_map(|c| formats.map(|f| (c, f)))
    {
        let kv = layout(hd, format);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let n = pos0 + t;
        let q = rand_vec(&mut rng, t * q_dim, 1.0);
        // The cache as stored; the reference reads the same rounded values.
        let kc_words = to_cache(&rand_vec(&mut rng, n * kv_dim, 1.0), &kv);
        let vc_words = to_cache(&rand_vec(&mut rng, n * kv_dim, 1.0), &kv);
        let (kc, vc) = (from_cache(&kc_words, &kv), from_cache(&vc_words, &kv));
        let scale = 1.0 / (hd as f64).sqrt();
        let mut want = vec![0f64; t * q_dim];
        for i in 0..t {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let visible = pos0 + i + 1;
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..hd)
                            .map(|d| {
                                q[i * q_dim + h * hd + d] as f64
                                    * kc[j * kv_dim + kvh * hd + d] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    want[i * q_dim + h * hd + d] = (0..visible)
                        .map(|j| e[j] / z * vc[j * kv_dim + kvh * hd + d] as f64)
                        .sum();
                }
            }
        }
        // One range of the cache (the result straight to `out`); ranges of 64 keys with one past
        // the end (partials, then `combine`); and ranges of 64 keys for a longer context, only
        // those the cache holds dispatched (as the engine does while its cache is short), the
        // others' partials left as NaN: `combine` must not read them.
        let one = (n as u32).div_ceil(64) * 64;
        let held = (n as u32).div_ceil(64);
        for (split_keys, splits, dispatched) in [
            (one, 1u32, 1u32),
            (64, held + 1, held + 1),
            (64, held + 3, held),
        ] {
            let params = AttentionParams {
                group: (nh / nkv) as u32,
                head_dim: hd as u32,
                q_stride: q_dim as u32,
                kv_stride: (nkv * kv.head_bytes() / 4) as u32,
                scale: scale as f32,
                n_heads: nh as u32,
                split_keys,
                splits,
                kv_group: kv.group as u32,
                kv_int8: (format == KvFormat::Int8) as u32,
            };
            let out0 = vec![0f32; t * q_dim];
            let part0 = vec![f32::NAN; t * nh * splits as usize * (hd + 2)];
            let inputs = [
                &bytes(&q)[..],
                bytemuck::cast_slice(&kc_words),
                bytemuck::cast_slice(&vc_words),
            ];
            let mut out = run(
                Kernel::Attention,
                &params,
                (t as u32, pos0 as u32),
                &inputs,
                &[&bytes(&out0), &bytes(&part0)],
                [nh as u32, t as u32, dispatched],
            );
            if splits > 1 {
                out = run(
                    Kernel::AttentionCombine,
                    &params,
                    (t as u32, pos0 as u32),
                    &inputs,
                    &[&out[0], &out[1]],
                    [nh as u32, t as u32, 1],
                );
            }
            // Outputs are convex combinations of values in [-1, 1]: compare against that scale.
            let ones = vec![1.0f64; want.len()];
            let e = norm_err(&f32s(&out[0]), &want, &ones);
            assert!(
                e < NORM_ERR,
                "attention {format} {nh}/{nkv} heads of {hd}, pos0 {pos0}, {t} tokens, {dispatched} of {splits} ranges of {split_keys}: {e:.2e}"
            );
        }
    }
}

/// The top-k and the softmax's normaliser (for logprobs) against sorting and log-sum-exp.
#[test]
fn topk_matches_sorting_on_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(8);
    for (n, k) in [(259usize, 5u32), (49152, 40), (10000, 1), (4097, 64)] {
        let mut logits = rand_vec(&mut rng, n, 10.0);
        logits[n / 2] = logits[3]; // a tie: the lower index wins
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let want: Vec<u32> = order[..k as usize].iter().map(|&i| i as u32).collect();
        let chunks = (n as u32).div_ceil(kernels::TOPK_CHUNK);
        // The candidates, then each chunk's softmax (max, sum) pair.
        let cand = vec![0u32; 2 * ((chunks * k) + chunks) as usize];
        let c = run(
            Kernel::TopK { from_logits: true },
            &TopKParams {
                n: n as u32,
                k,
                base: 0,
            },
            (1, 0),
            &[&bytes(&logits)],
            &[bytemuck::cast_slice(&cand)],
            [chunks, 1, 1],
        );
        let top = vec![0u32; 2 * k as usize + 1];
        let r = run(
            Kernel::TopK { from_logits: false },
            &TopKParams {
                n: chunks * k,
                k,
                base: 0,
            },
            (1, 0),
            &[&c[0]],
            &[bytemuck::cast_slice(&top)],
            [1, 1, 1],
        );
        let out = u32s(&r[0]);
        let got: Vec<u32> = out[..2 * k as usize].chunks(2).map(|p| p[1]).collect();
        assert_eq!(got, want, "top-{k} of {n}");
        assert_eq!(f32::from_bits(out[0]), logits[want[0] as usize]);
        // log(sum exp(logit)) over all n, as the CPU computes it in f64.
        let log_z = f32::from_bits(out[2 * k as usize]) as f64;
        let cpu = flexquant::model::math::log_sum_exp(&logits);
        assert!(
            (log_z - cpu).abs() < 1e-4 * cpu.abs().max(1.0),
            "{log_z} vs {cpu}"
        );
    }
}

#[test]
fn nll_matches_cpu_log_softmax() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(9);
    let (vocab, t) = (49152usize, 3usize);
    let logits = rand_vec(&mut rng, vocab * t, 15.0);
    let targets: Vec<u32> = vec![0, 49151, 1234];
    let want: Vec<f64> = (0..t)
        .map(|i| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            flexquant::model::ops::log_sum_exp(row) - row[targets[i] as usize] as f64
        })
        .collect();
    let nll0 = vec![0f32; t];
    let out = run(
        Kernel::Nll,
        &NllParams {
            vocab: vocab as u32,
        },
        (t as u32, 0),
        &[&bytes(&logits), bytemuck::cast_slice(&targets)],
        &[&bytes(&nll0)],
        [t as u32, 1, 1],
    );
    // Relative to the magnitude of the log-sum-exp (~ the largest logit).
    let scale: Vec<f64> = want.iter().map(|_| 15.0).collect();
    let e = norm_err(&f32s(&out[0]), &want, &scale);
    assert!(e < NORM_ERR, "nll: {e:.2e}");
}

/// The read-everything yardstick reads every word exactly once in both access patterns: the
/// workgroups' sums add up (wrapping) to the host's sum of the words, on sizes that are not
/// multiples of a workgroup's reach, one workgroup's, and many.
#[test]
fn read_kernel_reads_every_word_once() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(5);
    for n_vec4 in [1u32, 67, 4096, 4097, 300_001] {
        let words: Vec<u32> = (0..n_vec4 * 4)
            .map(|_| (rng.next_f32() * u32::MAX as f32) as u32)
            .collect();
        let want = words.iter().fold(0u32, |a, &w| a.wrapping_add(w));
        for (contiguous, per_thread) in [(false, 64), (false, 8), (true, 64)] {
            let (grid, params) = probe::read_dispatch_per_thread(n_vec4, per_thread);
            let out = run(
                Kernel::Read { contiguous },
                &params,
                (0, 0),
                &[bytemuck::cast_slice(&words)],
                &[&vec![0u8; grid[0] as usize * 4]],
                grid,
            );
            let got = u32s(&out[0]).iter().fold(0u32, |a, &w| a.wrapping_add(w));
            assert_eq!(
                got, want,
                "{n_vec4} words, contiguous {contiguous}, {per_thread} per thread"
            );
        }
    }
}

/// The matvec variant probe times every candidate on this adapter, picks the fastest, and
/// answers later loads from its cache.
#[test]
fn matvec_variant_probe_picks_the_fastest_candidate_once() {
    use flexquant::gpu::variant::{candidates, chosen, kernels_for_adapter};
    let Some(gpu) = gpu() else { return };
    if ["FLEXQUANT_GPU_TPR", "FLEXQUANT_GPU_RPT", "FLEXQUANT_GPU_SG"]
        .iter()
        .any(|v| std::env::var(v).is_ok())
    {
        eprintln!("SKIP: FLEXQUANT_GPU_TPR/RPT/SG set, so no probe runs");
        return;
    }
    let k = pollster::block_on(kernels_for_adapter(gpu));
    let c = chosen(gpu).expect("a choice cached for the adapter");
    assert_eq!(c.by, "probe");
    assert_eq!(c.timings.len(), candidates(gpu).len());
    assert!(
        c.timings.iter().all(|t| t.3.is_finite() && t.3 > 0.0),
        "{c:?}"
    );
    let fastest = c.timings.iter().min_by(|a, b| a.3.total_cmp(&b.3)).unwrap();
    assert_eq!(
        (k.tpr, k.rpt, k.subgroups),
        (fastest.0, fastest.1, fastest.2)
    );
    let again = pollster::block_on(kernels_for_adapter(gpu));
    assert_eq!(
        (again.tpr, again.rpt, again.subgroups),
        (k.tpr, k.rpt, k.subgroups)
    );
    assert_eq!(chosen(gpu), Some(c));
    eprintln!(
        "matvec variant probe on {}: {:?}",
        gpu.adapter_name(),
        chosen(gpu)
    );
}
