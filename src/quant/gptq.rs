//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers", 2022): quantize a weight matrix one input column at a time and
//! spread each column's rounding error over the columns not yet quantized, so that the
//! *output* error `‖W X - Q X‖²` on calibration inputs `X` stays small.
//!
//! As in the reference implementation:
//! - `H = 2/N · Σ x xᵀ` over the N calibration rows the module saw;
//! - dead inputs (`H_ii = 0`: never active in calibration) get `H_ii = 1` and zero weights;
//! - damping `percdamp · mean(diag H)` on the diagonal (0.01);
//! - the error propagation uses `U = cholesky(H⁻¹, upper)`;
//! - columns are processed in blocks of 128 with lazy batch updates: inside a block each column
//!   updates the rest of the block at once, the columns after the block get the block's errors
//!   in one GEMM at its end;
//! - optional act-order: columns in decreasing `H_ii`, so the inputs that matter most are
//!   quantized first, while the most freedom remains to compensate their error.
//!
//! Group parameters and act-order: the packed format stores groups of *consecutive original
//! columns* (no per-column group index, which would cost the shaders a gather). So groups stay
//! static in original order, and a group's `(scale, zero)` is chosen when GPTQ first reaches
//! any of its columns in processing order, from that group's *current* weights — every update
//! made so far included, also the lazy updates still pending for columns after the current
//! block. Without act-order a group is reached at its first column and lies inside one block
//! (groups of 32..128 divide the default block of 128), which is the reference behaviour. The
//! parameters come from `rtn::group_params` (f16-rounded), so every code GPTQ picks decodes to
//! exactly the value it accounted for: the packed matrix *is* GPTQ's result.
//!
//! Defaults, measured on the demo model (QM(3), group 64, held-out ppl, float 22.37): act-order
//! 38.6 vs 75.5 without; the per-group clipping search (`rtn::group_params`, an MSE grid over
//! the range as GPTQ's `mse` option) 33.7 vs 38.6 without, and at 2 bits 1399 vs 1.2e6.
//!
//! Rows are independent in GPTQ (the error of row r only moves along row r), so the matrix is
//! split into row chunks quantized in parallel, each with its own lazy-update GEMMs.

use crate::ensemble::format::{check_finite, check_quantizable, PackedMatrix, PackedShape};
use crate::error::{Error, Result};
use crate::quant::linalg::{self, View};
use crate::quant::rtn::{dequant, group_params, quant};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GptqConfig {
    /// Diagonal damping as a fraction of the mean diagonal of `H`.
    pub percdamp: f32,
    /// Columns per lazy-update block.
    pub block: usize,
    pub act_order: bool,
    /// Search a clipped range per group (see `rtn::group_params`) instead of plain min/max.
    pub clip_search: bool,
}

impl Default for GptqConfig {
    fn default() -> Self {
        GptqConfig {
            percdamp: 0.01,
            block: 128,
            act_order: true,
            clip_search: true,
        }
    }
}

/// Calibration rows with more than this many times the median row energy are scaled down to
/// it before they enter a Hessian. Attention-sink tokens (the first of each sequence) carry
/// massive activations into some modules: in the demo model's L28.down, 8 of 2048 rows hold
/// 95% of `‖X‖²`, so the plain objective fits those few tokens almost exactly (relative error
/// 0.0008) at twice RTN's error on every other token (0.108 vs 0.054) — and that single 3-bit
/// module costs +2.2 held-out ppl in the 8-bit model (RTN's: +0.25). Capped at 10x the median:
/// 0.0082 on ordinary tokens, 0.036 on the sinks (RTN 0.040), +0.06 ppl. Modules without such
/// outliers are unaffected (L24.down: within ±0.03 ppl of uncapped for caps of 3, 10, 30).
pub const ROW_ENERGY_CAP: f32 = 10.0;

/// `Σ x xᵀ` over the calibration rows one module input saw (full symmetric `[dim][dim]`).
#[derive(Debug, Clone)]
pub struct Hessian {
    pub dim: usize,
    pub sum: Vec<f32>,
    pub samples: usize,
}

impl Hessian {
    pub fn new(dim: usize) -> Self {
        Hessian {
            dim,
            sum: vec![0.0; dim * dim],
            samples: 0,
        }
    }

    pub fn from_rows(x: &[f32], dim: usize) -> Self {
        let mut h = Hessian::new(dim);
        h.add(x);
        h
    }

    /// Like `from_rows`, but rows whose energy `‖x‖²` exceeds `ROW_ENERGY_CAP` times the median
    /// row's are scaled down to that cap (see there for why).
    pub fn from_rows_capped(x: &[f32], dim: usize) -> Self {
        let energy: Vec<f32> = x.chunks_exact(dim).map(|r| linalg::dot(r, r)).collect();
        let mut sorted = energy.clone();
        sorted.sort_by(f32::total_cmp);
        let cap = ROW_ENERGY_CAP * sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        if energy.iter().all(|&e| e <= cap) {
            return Hessian::from_rows(x, dim);
        }
        let scaled: Vec<f32> = x
            .par_chunks_exact(dim)
            .zip(energy.par_iter())
            .flat_map_iter(|(r, &e)| {
                let s = if e > cap { (cap / e).sqrt() } else { 1.0 };
                r.iter().map(move |v| v * s)
            })
            .collect();
        Hessian::from_rows(&scaled, dim)
    }

    /// Adds rows `x` (`[t][dim]`).
    pub fn add(&mut self, x: &[f32]) {
        assert_eq!(x.len() % self.dim, 0, "Hessian::add: ragged rows");
        linalg::syrk_upper(&mut self.sum, x, self.dim);
        linalg::mirror_upper(&mut self.sum, self.dim);
        self.samples += x.len() / self.dim;
    }

    /// `‖M X‖²` summed over the rows: `tr(M Σxxᵀ Mᵀ)` for `M` `[rows][dim]`.
    pub fn output_energy(&self, m: &[f32]) -> f64 {
        let n = self.dim;
        let rows = m.len() / n;
        let mut mh = vec![0f32; rows * n];
        let s = View::new(&self.sum, n, n);
        linalg::matmul(&mut mh, n, false, 1.0, View::new(m, rows, n), s, true);
        mh.par_chunks(n)
            .zip(m.par_chunks(n))
            .map(|(a, b)| linalg::dot(a, b) as f64)
            .sum()
    }

    /// `‖(W - Q) X‖² / ‖W X‖²`: the module's relative output error on these inputs.
    pub fn relative_error(&self, w: &[f32], q: &[f32]) -> f64 {
        let d: Vec<f32> = w.iter().zip(q).map(|(a, b)| a - b).collect();
        let e = self.output_energy(w);
        if e > 0.0 {
            self.output_energy(&d) / e
        } else {
            0.0
        }
    }
}

/// What every module reading the same input shares (q/k/v, gate/up, and every bit-width):
/// the processing order and `U = cholesky(H⁻¹, upper)` of the damped, permuted Hessian.
pub struct Prepared {
    pub dim: usize,
    /// `perm[i]` = original column processed `i`-th.
    perm: Vec<usize>,
    /// Inverse of `perm`.
    pos: Vec<usize>,
    dead: Vec<bool>,
    u: Vec<f32>,
    /// `H = scale · Σxxᵀ`.
    scale: f32,
    /// Absolute damping added to the diagonal.
    damp_abs: f32,
    /// Damping actually used, as a fraction of mean(diag H) (more than `percdamp` only when
    /// the f32 factorisation failed and was retried).
    pub damp: f32,
    pub dead_columns: usize,
}

/// Damping retries: each multiplies the damping by 10.
const DAMP_RETRIES: usize = 3;

pub fn prepare(h: &Hessian, cfg: &GptqConfig, what: &str) -> Result<Prepared> {
    let n = h.dim;
    if h.samples == 0 {
        return Err(Error::input(format!("{what}: no calibration rows")));
    }
    check_finite(&h.sum, &format!("{what}: calibration Hessian"))?;
    let scale = 2.0 / h.samples as f32;
    let dead: Vec<bool> = (0..n).map(|i| h.sum[i * n + i] == 0.0).collect();
    let diag = |i: usize| {
        if dead[i] {
            1.0
        } else {
            scale * h.sum[i * n + i]
        }
    };
    let mut perm: Vec<usize> = (0..n).collect();
    if cfg.act_order {
        // Stable, so ties keep the original order.
        perm.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
    }
    let mut pos = vec![0; n];
    for (i, &c) in perm.iter().enumerate() {
        pos[c] = i;
    }
    let mean_diag = (0..n).map(|i| diag(i) as f64).sum::<f64>() / n as f64;
    let mut rel = cfg.percdamp;
    for _ in 0..=DAMP_RETRIES {
        let damp_abs = (rel as f64 * mean_diag) as f32;
        let entry = |i: usize, j: usize| {
            let (a, b) = (perm[i], perm[j]);
            if a == b {
                diag(a) + damp_abs
            } else {
                scale * h.sum[a * n + b]
            }
        };
        if let Ok(u) = linalg::chol_inverse_upper(entry, n) {
            return Ok(Prepared {
                dim: n,
                perm,
                pos,
                dead_columns: dead.iter().filter(|&&d| d).count(),
                dead,
                u,
                scale,
                damp_abs,
                damp: rel,
            });
        }
        rel *= 10.0;
    }
    Err(Error::input(format!(
        "{what}: the calibration Hessian is not positive definite even with damping {rel}"
    )))
}

/// One quantized module and its output error.
pub struct Quantized {
    pub packed: PackedMatrix,
    /// `‖(W - Q) X‖²` summed over the calibration rows (the undamped objective, in the units
    /// of `Hessian::output_energy`), from GPTQ's own bookkeeping: with `e` the scaled errors
    /// of each step, `W - Q = e U` row by row, so `tr((W-Q) H' (W-Q)ᵀ) = Σ e²` for the damped
    /// `H'`; the damping and dead-column terms are subtracted exactly.
    pub output_error: f64,
}

/// How GPTQ chooses each weight's code.
#[derive(Clone, Copy)]
pub enum Grid<'a> {
    /// A uniform grid per group, fitted (`rtn::group_params`) to the group's current weights
    /// when GPTQ first reaches it: plain GPTQ.
    Fitted,
    /// Nested upscaling (`quant::nested`): each code is one of the two children `2p`, `2p + 1`
    /// of its parent code `p` one bit shorter, on the parent group's grid halved
    /// (`child_params`). `codes` `[rows][cols]`, `params` `[rows][groups]` of the parent.
    Children {
        codes: &'a [u8],
        params: &'a [(f32, f32)],
    },
}

/// A parent group's grid split in two: child `2p` decodes to the lower half of parent code
/// `p`'s bin, `2p + 1` to the upper half (`s/2 · 2p + z - s/4 = s p + z - s/4`). Rounded to
/// f16 like every stored parameter.
pub fn child_params((scale, zero): (f32, f32)) -> (f32, f32) {
    use crate::ensemble::format::{pack_scale_zero, unpack_scale_zero};
    unpack_scale_zero(pack_scale_zero(scale / 2.0, zero - scale / 4.0))
}

/// Codes (original column order, `[rows][cols]`), f16-rounded group parameters
/// (`[rows][groups]`) and `Σ e²` of one GPTQ pass.
pub struct Codes {
    pub codes: Vec<u8>,
    pub params: Vec<(f32, f32)>,
    sq_err: f64,
}

/// Per-call constants of the row-chunk worker.
struct Ctx<'a> {
    p: &'a Prepared,
    group: usize,
    groups: usize,
    maxq: u32,
    block: usize,
    clip: bool,
}

/// GPTQ of one `[rows][cols]` matrix at `bits` with groups of `group`, given the prepared
/// Hessian of its input.
#[allow(clippy::too_many_arguments)]
pub fn quantize_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    p: &Prepared,
    bits: u32,
    group: usize,
    cfg: &GptqConfig,
    what: &str,
) -> Result<Quantized> {
    let shape = PackedShape::new(rows, cols, bits, group)?;
    let c = gptq_codes(w, rows, cols, p, bits, group, cfg, Grid::Fitted, what)?;
    let output_error = c.output_error(w, cols, group, p);
    Ok(Quantized {
        packed: PackedMatrix::from_codes(shape, &c.codes, &c.params),
        output_error,
    })
}

/// The GPTQ pass behind `quantize_gptq`, on any grid and any code width of 1..=8 bits (nested
/// upscaling passes through widths the packed format does not store, such as 7).
#[allow(clippy::too_many_arguments)]
pub fn gptq_codes(
    w: &[f32],
    rows: usize,
    cols: usize,
    p: &Prepared,
    bits: u32,
    group: usize,
    cfg: &GptqConfig,
    grid: Grid,
    what: &str,
) -> Result<Codes> {
    if w.len() != rows * cols || cols != p.dim {
        return Err(Error::input(format!(
            "{what}: {rows}x{cols} weights ({} values) do not match a Hessian of dim {}",
            w.len(),
            p.dim
        )));
    }
    if !(1..=8).contains(&bits) || group == 0 || !group.is_multiple_of(32) {
        return Err(Error::input(format!(
            "{what}: {bits}-bit codes in groups of {group} (1 to 8 bits, groups of 32k)"
        )));
    }
    check_quantizable(w, what)?;
    if cfg.block == 0 {
        return Err(Error::input("GPTQ block size must be at least 1"));
    }
    let mut wp = vec![0f32; rows * cols];
    for (dst, src) in wp.chunks_exact_mut(cols).zip(w.chunks_exact(cols)) {
        for (d, &c) in dst.iter_mut().zip(&p.perm) {
            *d = if p.dead[c] { 0.0 } else { src[c] };
        }
    }
    let ctx = Ctx {
        p,
        group,
        groups: cols.div_ceil(group),
        maxq: (1u32 << bits) - 1,
        block: cfg.block,
        clip: cfg.clip_search,
    };
    if let Grid::Children { codes, params } = grid {
        if codes.len() != rows * cols || params.len() != rows * ctx.groups {
            return Err(Error::input(format!(
                "{what}: parent codes do not match a {rows}x{cols} matrix"
            )));
        }
    }
    let chunk = rows.div_ceil(4 * rayon::current_num_threads()).max(8);
    let mut codes = vec![0u8; rows * cols];
    let mut params = vec![(0f32, 0f32); rows * ctx.groups];
    let sq_err: f64 = wp
        .par_chunks_mut(chunk * cols)
        .zip(codes.par_chunks_mut(chunk * cols))
        .zip(params.par_chunks_mut(chunk * ctx.groups))
        .enumerate()
        .map(|(k, ((wc, cc), pc))| {
            let grid = match grid {
                Grid::Fitted => Grid::Fitted,
                Grid::Children { codes, params } => {
                    let r0 = k * chunk;
                    let r1 = (r0 + chunk).min(rows);
                    Grid::Children {
                        codes: &codes[r0 * cols..r1 * cols],
                        params: &params[r0 * ctx.groups..r1 * ctx.groups],
                    }
                }
            };
            quantize_rows(&ctx, grid, wc, cc, pc)
        })
        .sum();
    Ok(Codes {
        codes,
        params,
        sq_err,
    })
}

impl Codes {
    /// `‖(W - Q) X‖²` from GPTQ's own bookkeeping (see `Quantized::output_error`): the
    /// damping (λ‖ΔW‖²) and dead-column (1 · ΔW²) terms of Σe² undone, in W's dead-zeroed form.
    pub fn output_error(&self, w: &[f32], cols: usize, group: usize, p: &Prepared) -> f64 {
        let groups = cols.div_ceil(group);
        let (mut damp_part, mut dead_part) = (0f64, 0f64);
        for (r, wr) in w.chunks_exact(cols).enumerate() {
            for (c, &wv) in wr.iter().enumerate() {
                let q = dequant(
                    self.codes[r * cols + c],
                    self.params[r * groups + c / group],
                );
                let d = if p.dead[c] { -q } else { wv - q } as f64;
                damp_part += d * d;
                if p.dead[c] {
                    dead_part += d * d;
                }
            }
        }
        let undamped = self.sq_err - p.damp_abs as f64 * damp_part - dead_part;
        undamped.max(0.0) / p.scale as f64
    }
}

/// GPTQ of a chunk of rows: `wc` in processing (permuted) column order, updated in place;
/// `cc` receives codes in original column order, `pc` the group parameters. Returns `Σ e²`.
fn quantize_rows(c: &Ctx, grid: Grid, wc: &mut [f32], cc: &mut [u8], pc: &mut [(f32, f32)]) -> f64 {
    let (n, b, u) = (c.p.dim, c.block, &c.p.u);
    let r = wc.len() / n;
    let mut err = vec![0f32; r * b];
    let mut have = vec![false; c.groups];
    let mut vals = Vec::with_capacity(c.group);
    let (mut late, mut ug, mut corr) = (Vec::new(), Vec::new(), Vec::new());
    let mut sq_err = 0f64;
    for i1 in (0..n).step_by(b) {
        let i2 = (i1 + b).min(n);
        for i in i1..i2 {
            let g = c.p.perm[i] / c.group;
            if !have[g] {
                have[g] = true;
                if let Grid::Children { params, .. } = grid {
                    for rr in 0..r {
                        pc[rr * c.groups + g] = child_params(params[rr * c.groups + g]);
                    }
                } else {
                    let cols = g * c.group..((g + 1) * c.group).min(n);
                    // Columns of the group after this block still miss the lazy update from the
                    // block's columns so far: `err[:, i1..i] · U[i1..i, late]`, as one small GEMM.
                    late.clear();
                    late.extend(cols.clone().map(|col| c.p.pos[col]).filter(|&p| p >= i2));
                    let k = i - i1;
                    if k > 0 && !late.is_empty() {
                        ug.clear();
                        for j in i1..i {
                            ug.extend(late.iter().map(|&p| u[j * n + p]));
                        }
                        corr.resize(r * late.len(), 0.0);
                        let e = View::strided(&err, r, k, b);
                        linalg::matmul(
                            &mut corr,
                            late.len(),
                            false,
                            1.0,
                            e,
                            View::new(&ug, k, late.len()),
                            false,
                        );
                    }
                    for rr in 0..r {
                        vals.clear();
                        let mut t = 0;
                        for col in cols.clone() {
                            let p = c.p.pos[col];
                            let mut v = wc[rr * n + p];
                            if p >= i2 && k > 0 {
                                v -= corr[rr * late.len() + t];
                                t += 1;
                            }
                            vals.push(v);
                        }
                        pc[rr * c.groups + g] = group_params(&vals, c.maxq, c.clip);
                    }
                }
            }
            let d = u[i * n + i];
            let urow = &u[i * n + i + 1..i * n + i2];
            for rr in 0..r {
                let row = &mut wc[rr * n..rr * n + i2];
                let prm = pc[rr * c.groups + g];
                let col = c.p.perm[i];
                let q = match grid {
                    Grid::Fitted => quant(row[i], prm, c.maxq),
                    Grid::Children { codes, .. } => {
                        let parent = 2 * codes[rr * n + col];
                        quant(row[i], prm, c.maxq).clamp(parent, parent + 1)
                    }
                };
                cc[rr * n + col] = q;
                let e = (row[i] - dequant(q, prm)) / d;
                err[rr * b + i - i1] = e;
                sq_err += e as f64 * e as f64;
                linalg::axpy(&mut row[i + 1..], -e, urow);
            }
        }
        if i2 < n {
            let e = View::strided(&err, r, i2 - i1, b);
            let ub = View::strided(&u[i1 * n + i2..], i2 - i1, n - i2, n);
            linalg::matmul(&mut wc[i2..], n, true, -1.0, e, ub, false);
        }
    }
    sq_err
}
