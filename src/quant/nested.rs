//! Nested module versions: one stored `n_up`-bit code per weight whose top `k` bits are the
//! `k`-bit version, for every `k` from `n_up` down to `n_low`, each level with its own
//! per-group `(scale, zero)` (f16). One set of codes serves every bit-width, so a step down
//! needs no other copy of the module: it drops low bits (as Any-Precision LLM, Park et al.
//! 2024, does with non-uniform codebooks; Matryoshka Quantization, Nair et al. 2025, slices
//! int8 codes with training).
//!
//! Two ways to choose the codes:
//! - **Truncate**: GPTQ at `n_up`; a lower level's codes are the top bits
//!   (`c >> (n_up - k)`) and its `(scale, zero)` are refitted to the codes: the pair per
//!   group that minimises the module's output error on the calibration inputs
//!   (`refit_level`).
//! - **Upscale** (Any-Precision LLM's incremental upscaling, on uniform grids): GPTQ at
//!   `n_low` first; each extra bit is then chosen by a GPTQ pass whose only choices for a
//!   weight are the two children `2p`, `2p + 1` of its parent code `p`, on the parent's grid
//!   halved (`gptq::Grid::Children`). The lowest level is exactly independent GPTQ's.
//!
//! Either way `level(k).code(r, c) == level(n_up).code(r, c) >> (n_up - k)` bit-exactly
//! (`ensemble::planes::check_nested`), and each level is an ordinary `PackedMatrix` of its bit-width, so the
//! search, the engines and the shards take it as they take an independent version.

use crate::ensemble::format::{PackedMatrix, PackedShape, BITS};
use crate::ensemble::planes::{coarse_grid, delta, delta_bytes, level_params, widen};
use crate::error::{Error, Result};
use crate::quant::gptq::{self, GptqConfig, Grid, Prepared};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Nesting {
    Truncate,
    Upscale,
}

impl Nesting {
    pub fn name(self) -> &'static str {
        match self {
            Nesting::Truncate => "truncate",
            Nesting::Upscale => "upscale",
        }
    }
}

/// One nested level: its packed matrix and `‖(W - Q) X‖²` where GPTQ's bookkeeping gives it
/// (the GPTQ passes; `None` for truncated levels, whose error the caller measures).
pub struct Level {
    pub packed: PackedMatrix,
    pub output_error: Option<f64>,
}

/// The nested versions of one `[rows][cols]` module at every bit-width of `bits` (any order;
/// returned high to low). `h`: the module input's `Σ x xᵀ` (`[cols][cols]`, dead inputs with
/// zero rows), what the truncated levels' scales and zeros are refitted to (`refit_level`).
#[allow(clippy::too_many_arguments)]
pub fn nested_gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    p: &Prepared,
    h: &[f32],
    bits: &[u32],
    group: usize,
    cfg: &GptqConfig,
    nesting: Nesting,
    what: &str,
) -> Result<Vec<Level>> {
    let mut bits = bits.to_vec();
    bits.sort_unstable_by(|a, b| b.cmp(a));
    bits.dedup();
    let (Some(&top), Some(&low)) = (bits.first(), bits.last()) else {
        return Err(Error::input(format!("{what}: no bit-widths to nest")));
    };
    if let Some(b) = bits.iter().find(|b| !BITS.contains(b)) {
        return Err(Error::input(format!(
            "{what}: {b}-bit codes are not supported (choose from {BITS:?})"
        )));
    }
    if h.len() != cols * cols {
        return Err(Error::input(format!(
            "{what}: a Hessian of {} values for {cols} columns",
            h.len()
        )));
    }
    let pack = |b: u32, c: &[u8], prm: &[(f32, f32)]| -> Result<PackedMatrix> {
        Ok(PackedMatrix::from_codes(
            PackedShape::new(rows, cols, b, group)?,
            c,
            prm,
        ))
    };
    let mut out = Vec::with_capacity(bits.len());
    match nesting {
        Nesting::Truncate => {
            let t = gptq::gptq_codes(w, rows, cols, p, top, group, cfg, Grid::Fitted, what)?;
            let err = t.output_error(w, cols, group, p);
            for &b in &bits {
                if b == top {
                    out.push(Level {
                        packed: pack(b, &t.codes, &t.params)?,
                        output_error: Some(err),
                    });
                    continue;
                }
                let shift = top - b;
                let codes: Vec<u8> = t.codes.iter().map(|&c| c >> shift).collect();
                let params = refit_level(w, cols, group, h, &codes, &t.params, shift);
                out.push(Level {
                    packed: pack(b, &codes, &params)?,
                    output_error: None,
                });
            }
        }
        Nesting::Upscale => {
            let mut cur = gptq::gptq_codes(w, rows, cols, p, low, group, cfg, Grid::Fitted, what)?;
            for b in low..=top {
                if b > low {
                    let grid = Grid::Children {
                        codes: &cur.codes,
                        params: &cur.params,
                    };
                    cur = gptq::gptq_codes(w, rows, cols, p, b, group, cfg, grid, what)?;
                }
                if bits.contains(&b) {
                    out.push(Level {
                        packed: pack(b, &cur.codes, &cur.params)?,
                        output_error: Some(cur.output_error(w, cols, group, p)),
                    });
                }
            }
            out.reverse();
        }
    }
    Ok(out)
}

/// `(scale, zero)` of a truncated level, per row: the pair per group that minimises the
/// row's output error `(w - q)ᵀ H (w - q)` for the fixed codes, `q = scale_g · code + zero_g`
/// on group `g`'s columns. A linear least-squares problem in 2 unknowns per group, solved
/// exactly (f64 Cholesky of the `2G x 2G` normal equations): the compensation GPTQ would make
/// with the codes, reduced to what a group's two parameters can express. Then put in the form
/// the bit-plane file stores (`planes::level_params`: relative to the top level's grid
/// coarsened by `2^shift`, in two bytes per group 1 or 2 bits below the top, the scale within
/// 0..2x of it, and in one byte further down, the scale within 0.75..1.22x, then refined by
/// `descend`; never negative). A row whose system is singular or whose stored solution is worse keeps the
/// coarsened grid (`scale · 2^shift`, zero at the middle of the merged bins).
fn refit_level(
    w: &[f32],
    cols: usize,
    group: usize,
    h: &[f32],
    codes: &[u8],
    top: &[(f32, f32)],
    shift: u32,
) -> Vec<(f32, f32)> {
    use rayon::prelude::*;
    let groups = cols.div_ceil(group);
    let range = |g: usize| g * group..((g + 1) * group).min(cols);
    // Σ_{i∈g, j∈k} H_ij: the ones-ones block, the same for every row.
    let mut ones = vec![0f64; groups * groups];
    for i in 0..cols {
        for (j, &v) in h[i * cols..(i + 1) * cols].iter().enumerate() {
            ones[(i / group) * groups + j / group] += v as f64;
        }
    }
    w.par_chunks_exact(cols)
        .zip(codes.par_chunks_exact(cols))
        .zip(top.par_chunks_exact(groups))
        .flat_map_iter(|((wr, cr), tr)| {
            let coarse = vec![0u16; groups];
            // H w and, per group k, H[:, k] c[k] (H is symmetric: rows of H).
            let mut hw = vec![0f32; cols];
            let mut hc = vec![0f32; groups * cols];
            for j in 0..cols {
                let hj = &h[j * cols..(j + 1) * cols];
                crate::quant::linalg::axpy(&mut hw, wr[j], hj);
                let c = cr[j] as f32;
                if c != 0.0 {
                    crate::quant::linalg::axpy(&mut hc[(j / group) * cols..][..cols], c, hj);
                }
            }
            // Normal equations in θ = (scale_0, zero_0, scale_1, zero_1, ...).
            let n = 2 * groups;
            let (mut a, mut b) = (vec![0f64; n * n], vec![0f64; n]);
            for g in 0..groups {
                for j in range(g) {
                    b[2 * g] += cr[j] as f64 * hw[j] as f64;
                    b[2 * g + 1] += hw[j] as f64;
                }
                for k in 0..groups {
                    let v = &hc[k * cols..(k + 1) * cols];
                    let (mut cc, mut oc) = (0f64, 0f64);
                    for j in range(g) {
                        cc += cr[j] as f64 * v[j] as f64;
                        oc += v[j] as f64;
                    }
                    a[2 * g * n + 2 * k] = cc;
                    // (ones of g)ᵀ H (codes of k)
                    a[(2 * g + 1) * n + 2 * k] = oc;
                    a[2 * k * n + 2 * g + 1] = oc;
                    a[(2 * g + 1) * n + 2 * k + 1] = ones[g * groups + k];
                }
            }
            let whw: f64 = wr.iter().zip(&hw).map(|(x, y)| *x as f64 * *y as f64).sum();
            let err = |d: &[u16]| {
                let t: Vec<f64> = d
                    .iter()
                    .zip(tr)
                    .flat_map(|(&d, &top)| {
                        let (s, z) = level_params(top, shift, d);
                        [s as f64, z as f64]
                    })
                    .collect();
                let at: Vec<f64> = (0..n)
                    .map(|i| (0..n).map(|j| a[i * n + j] * t[j]).sum())
                    .collect();
                whw - 2.0 * dot64(&t, &b) + dot64(&t, &at)
            };
            // Each group's fit rounded to the stored form (`planes::level_params`: the scale a
            // multiple 1 + ds/128 of the coarsened grid's, so never negative, the zero moved by
            // dz/64 of its step; multiples of 4 in one byte).
            let narrow = delta_bytes(shift) == 1;
            let solved = solve_spd(&a, &b, n).map(|t| {
                t.chunks_exact(2)
                    .zip(tr)
                    .map(|(p, &top)| {
                        let (cs, cz) = coarse_grid(top, shift);
                        let step = if narrow { 4.0 } else { 1.0 };
                        let q = |x: f64| {
                            if x.is_finite() {
                                ((x / step).round() * step) as i32
                            } else {
                                0
                            }
                        };
                        let (ds, dz) = if cs > 0.0 {
                            (
                                q((p[0] / cs as f64 - 1.0) * 128.0),
                                q((p[1] - cz as f64) / cs as f64 * 64.0),
                            )
                        } else {
                            (0, 0)
                        };
                        if narrow {
                            delta(ds.clamp(-32, 28), dz.clamp(-32, 28))
                        } else {
                            delta(ds, dz)
                        }
                    })
                    .collect::<Vec<u16>>()
            });
            let start = match solved {
                Some(p) if err(&p) < err(&coarse) => p,
                _ => coarse,
            };
            if narrow {
                descend(&a, &b, n, tr, shift, start)
            } else {
                start
                    .iter()
                    .zip(tr)
                    .map(|(&d, &t)| level_params(t, shift, d))
                    .collect()
            }
        })
        .collect()
}

/// Rounding the least-squares grid to one byte per group (`planes::narrow`) independently loses
/// much of the fit (the scale and zero errors of neighbouring groups do not cancel), so each
/// group's byte is then chosen among all 256 by the row's exact objective `θᵀAθ - 2θᵀb`, the
/// other groups fixed, sweeping the row until nothing improves (at most 4 sweeps): coordinate
/// descent from the rounded solution, never worse than it. Returns each group's `(scale, zero)`.
fn descend(
    a: &[f64],
    b: &[f64],
    n: usize,
    top: &[(f32, f32)],
    shift: u32,
    mut d: Vec<u16>,
) -> Vec<(f32, f32)> {
    let params = |g: usize, d: u16| {
        let (s, z) = level_params(top[g], shift, d);
        (s as f64, z as f64)
    };
    let mut t: Vec<f64> = (0..d.len())
        .flat_map(|g| {
            let (s, z) = params(g, d[g]);
            [s, z]
        })
        .collect();
    // r = Aθ - b: half the objective's gradient.
    let mut r: Vec<f64> = (0..n)
        .map(|i| dot64(&a[i * n..(i + 1) * n], &t) - b[i])
        .collect();
    for _ in 0..4 {
        let mut moved = false;
        for (g, dg) in d.iter_mut().enumerate() {
            let (i, j) = (2 * g, 2 * g + 1);
            let (ss, sz, zz) = (a[i * n + i], a[i * n + j], a[j * n + j]);
            let (mut best, mut gain) = (*dg, -1e-12 * (ss + zz).abs());
            for c in (0..=255u8).map(widen) {
                let (s, z) = params(g, c);
                let (ds, dz) = (s - t[i], z - t[j]);
                let delta = 2.0 * (ds * r[i] + dz * r[j])
                    + ds * ds * ss
                    + 2.0 * ds * dz * sz
                    + dz * dz * zz;
                if delta < gain {
                    (best, gain) = (c, delta);
                }
            }
            if best != *dg {
                let (s, z) = params(g, best);
                let (ds, dz) = (s - t[i], z - t[j]);
                for (k, rk) in r.iter_mut().enumerate() {
                    *rk += a[k * n + i] * ds + a[k * n + j] * dz;
                }
                (t[i], t[j], *dg) = (s, z, best);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    d.iter()
        .enumerate()
        .map(|(g, &c)| level_params(top[g], shift, c))
        .collect()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `A x = b` for a symmetric positive semi-definite `n x n` `A`, by Cholesky with a relative
/// ridge of 1e-9 of the mean diagonal (zero rows: dead inputs, groups past the codes' range);
/// `None` if it still fails.
fn solve_spd(a: &[f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    let mean = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
    let ridge = 1e-9 * mean.max(f64::MIN_POSITIVE);
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut v = a[i * n + j] + if i == j { ridge } else { 0.0 };
            for k in 0..j {
                v -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if v <= 0.0 {
                    return None;
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    let mut y = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            y[i] -= l[i * n + k] * y[k];
        }
        y[i] /= l[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            y[i] -= l[k * n + i] * y[k];
        }
        y[i] /= l[i * n + i];
    }
    Some(y)
}
