//! CPU kernels of the reference forward: GEMM through the `gemm` crate, everything else plain
//! loops that the compiler vectorises. All f32.

use crate::model::weights::{Layout, Linear};
use rayon::prelude::*;

/// Row counts at or below this use the row-parallel mat-vec path (decode); GEMM packing does
/// not pay off for a handful of rows.
const MATVEC_MAX_ROWS: usize = 4;

/// `out[m][n] = a[m][k] · b[n][k]ᵀ` with arbitrary row strides (elements) for `a`, `b`, `out`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    out: &mut [f32],
    out_rs: usize,
    parallel: bool,
) {
    assert!(
        n == 0 || b.len() >= (n - 1) * b_rs + k,
        "gemm_nt: b too short"
    );
    // SAFETY: rhs (p, j) = b[j * b_rs + p], in bounds by the assert above.
    unsafe { gemm_raw(m, n, k, a, a_rs, b.as_ptr(), 1, b_rs, out, out_rs, parallel) }
}

/// `out[m][n] = a[m][k] · b[k][n]` with arbitrary row strides for `a`, `b`, `out`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    out: &mut [f32],
    out_rs: usize,
    parallel: bool,
) {
    assert!(
        k == 0 || b.len() >= (k - 1) * b_rs + n,
        "gemm_nn: b too short"
    );
    // SAFETY: rhs (p, j) = b[p * b_rs + j], in bounds by the assert above.
    unsafe { gemm_raw(m, n, k, a, a_rs, b.as_ptr(), b_rs, 1, out, out_rs, parallel) }
}

/// # Safety
/// `b` must be valid for every `p * b_rs + j * b_cs` with `p < k`, `j < n`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    out: &mut [f32],
    out_rs: usize,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || a.len() >= (m - 1) * a_rs + k, "gemm: a too short");
    assert!(out.len() >= (m - 1) * out_rs + n, "gemm: out too short");
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // Computed as outᵀ[n][m] = bᵀ[n][k] · aᵀ[k][m], which the `gemm` crate (column-major at
    // heart) runs 5-20% faster on this model's shapes than out = a · b: `a`'s rows become
    // unit-stride columns of its right operand, and the output is written column by column.
    // SAFETY: dst (j, i) at i*out_rs + j and rhs (p, i) at i*a_rs + p are bounded by the
    // asserts above; lhs (j, p) = b[p * b_rs + j * b_cs] by the caller's contract.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            out.as_mut_ptr(),
            out_rs as isize,
            1,
            false,
            b,
            b_rs as isize,
            b_cs as isize,
            a.as_ptr(),
            a_rs as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `out[m][w.rows] = x[m][w.cols] · Wᵀ`
pub fn linear(x: &[f32], m: usize, w: &Linear, out: &mut [f32]) {
    match w.layout {
        Layout::Rows => matmul_nt(x, m, &w.w, w.rows, w.cols, out),
        Layout::Columns => gemm_nn(
            m, w.rows, w.cols, x, w.cols, &w.w, w.rows, out, w.rows, true,
        ),
    }
}

/// `out[m][n] = x[m][k] · w[n][k]ᵀ` for contiguous operands.
pub fn matmul_nt(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(out.len(), m * n);
    if m <= MATVEC_MAX_ROWS {
        // Decode: split the weight rows across threads, each reads its rows once for all m.
        out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
            let xi = &x[i * k..(i + 1) * k];
            o.par_chunks_mut(256).enumerate().for_each(|(c, oc)| {
                for (j, y) in oc.iter_mut().enumerate() {
                    let r = c * 256 + j;
                    *y = dot(xi, &w[r * k..(r + 1) * k]);
                }
            });
        });
    } else {
        gemm_nt(m, n, k, x, k, w, k, out, n, true);
    }
}

pub use crate::model::math::{argmax, dot, log_sum_exp, rmsnorm, silu, Rope};
