//! The dense linear algebra GPTQ needs, in f32 on top of the `gemm` crate: strided matrix
//! products, a symmetric rank-k accumulation (`XᵀX`), a blocked Cholesky factorisation and a
//! blocked triangular inverse. Matrices are at most a few thousand wide (1536 for the demo
//! model), so blocking the O(n³) parts into GEMMs is what keeps GPTQ fast on 2 cores; the
//! unblocked remainders are O(n² · block).
//!
//! f32 like the GPTQ reference implementation (PyTorch, fp32 Cholesky): the 1% damping keeps
//! the Hessians well conditioned, and a failed factorisation is reported, not hidden.

use rayon::prelude::*;

/// Column-block width of the Cholesky and triangular-inverse panels.
const NB: usize = 64;
/// Block width of the symmetric `XᵀX` accumulation (only blocks on or above the diagonal are
/// computed, so narrower blocks skip more work but make smaller GEMMs).
const SYRK_BLOCK: usize = 192;

/// A read-only strided view of an f32 matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A contiguous row-major matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View::strided(data, rows, cols, cols)
    }
    /// Row-major with row stride `rs` (a sub-matrix of a wider one).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    fn last(&self) -> usize {
        (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
    }
}

/// `dst[m][n] = (accumulate ? dst : 0) + beta · a · b` with `dst` row-major, row stride `dst_rs`.
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    beta: f32,
    a: View,
    b: View,
    parallel: bool,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.last() < a.data.len() && b.last() < b.data.len(),
        "matmul: view out of bounds"
    );
    assert!((m - 1) * dst_rs + n <= dst.len(), "matmul: dst too short");
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every element gemm reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// `s += xᵀx` for rows `x` (`[t][d]`) into the upper triangle (and diagonal) of `s` (`[d][d]`);
/// call `mirror_upper` before reading the lower triangle.
pub fn syrk_upper(s: &mut [f32], x: &[f32], d: usize) {
    let t = x.len() / d;
    if t == 0 {
        return;
    }
    for i0 in (0..d).step_by(SYRK_BLOCK) {
        let bi = SYRK_BLOCK.min(d - i0);
        for j0 in (i0..d).step_by(SYRK_BLOCK) {
            let bj = SYRK_BLOCK.min(d - j0);
            let a = View {
                data: &x[i0..],
                rows: bi,
                cols: t,
                rs: 1,
                cs: d,
            };
            let b = View::strided(&x[j0..], t, bj, d);
            matmul(&mut s[i0 * d + j0..], d, true, 1.0, a, b, true);
        }
    }
}

/// Copies the upper triangle of a symmetric `[n][n]` matrix onto its lower triangle.
pub fn mirror_upper(s: &mut [f32], n: usize) {
    for i in 0..n {
        for j in 0..i {
            s[i * n + j] = s[j * n + i];
        }
    }
}

/// In-place Cholesky `A = L Lᵀ` of a symmetric positive-definite `[n][n]` matrix (row-major;
/// only the lower triangle is read and `L` is written there; the upper triangle is scratch).
/// On a non-positive pivot returns its index.
pub fn cholesky_lower(a: &mut [f32], n: usize) -> std::result::Result<(), usize> {
    for k0 in (0..n).step_by(NB) {
        let kb = NB.min(n - k0);
        // Diagonal block, unblocked; it already holds every update from earlier panels.
        for j in k0..k0 + kb {
            let row_j = j * n;
            let d = a[row_j + j] as f64
                - a[row_j + k0..row_j + j]
                    .iter()
                    .map(|&v| v as f64 * v as f64)
                    .sum::<f64>();
            if !(d > 0.0 && d.is_finite()) {
                return Err(j);
            }
            let d = d.sqrt() as f32;
            a[row_j + j] = d;
            for i in j + 1..k0 + kb {
                let s = dot(&a[i * n + k0..i * n + j], &a[row_j + k0..row_j + j]);
                a[i * n + j] = (a[i * n + j] - s) / d;
            }
        }
        let r0 = k0 + kb;
        if r0 == n {
            break;
        }
        // Panel below the block: L21 = A21 · L11⁻ᵀ, a forward substitution per row.
        let (top, bottom) = a.split_at_mut(r0 * n);
        let l11 = &top[k0 * n..];
        bottom.par_chunks_mut(n).for_each(|row| {
            for j in 0..kb {
                let lj = &l11[j * n + k0..j * n + k0 + j];
                let s = dot(&row[k0..k0 + j], lj);
                row[k0 + j] = (row[k0 + j] - s) / l11[j * n + k0 + j];
            }
        });
        // Trailing update A22 -= L21 L21ᵀ; the panel is copied out so A22 can be written.
        let m = n - r0;
        let panel: Vec<f32> = (r0..n)
            .flat_map(|i| a[i * n + k0..i * n + k0 + kb].iter().copied())
            .collect();
        let p = View::new(&panel, m, kb);
        matmul(&mut a[r0 * n + r0..], n, true, -1.0, p, p.t(), true);
    }
    Ok(())
}

/// `L⁻¹` of a lower-triangular `[n][n]` matrix (row-major; the upper triangle of `l` is
/// ignored). Recursive halving, `[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹ B A⁻¹, C⁻¹]]`, so the
/// O(n³) work is two large GEMMs per level.
pub fn invert_lower(l: &[f32], n: usize) -> Vec<f32> {
    let mut x = vec![0f32; n * n];
    invert_rec(l, n, 0, n, &mut x);
    x
}

/// Inverts the diagonal block `o..o+m` of `l` into the same block of `x` (both stride `ld`).
fn invert_rec(l: &[f32], ld: usize, o: usize, m: usize, x: &mut [f32]) {
    if m <= NB {
        // Forward substitution of L X = I inside the block.
        for r in 0..m {
            let row = (o + r) * ld + o;
            x[row + r] = 1.0;
            for p in 0..r {
                let lrp = l[row + p];
                if lrp != 0.0 {
                    for c in 0..=p {
                        x[row + c] -= lrp * x[(o + p) * ld + o + c];
                    }
                }
            }
            let inv = 1.0 / l[row + r];
            for c in 0..=r {
                x[row + c] *= inv;
            }
        }
        return;
    }
    let h = (m / 2).div_ceil(NB) * NB;
    invert_rec(l, ld, o, h, x);
    invert_rec(l, ld, o + h, m - h, x);
    let k = m - h;
    // T = B · A⁻¹, then X21 = -C⁻¹ · T (into a buffer: C⁻¹ shares rows with X21).
    let mut t = vec![0f32; k * h];
    let b = View::strided(&l[(o + h) * ld + o..], k, h, ld);
    let ainv = View::strided(&x[o * ld + o..], h, h, ld);
    matmul(&mut t, h, false, 1.0, b, ainv, true);
    let mut x21 = vec![0f32; k * h];
    let cinv = View::strided(&x[(o + h) * ld + o + h..], k, k, ld);
    matmul(&mut x21, h, false, -1.0, cinv, View::new(&t, k, h), true);
    for r in 0..k {
        let dst = (o + h + r) * ld + o;
        x[dst..dst + h].copy_from_slice(&x21[r * h..(r + 1) * h]);
    }
}

/// The upper-triangular `U` with `Uᵀ U = H⁻¹` (what GPTQ calls `cholesky(H⁻¹, upper=True)`),
/// from one Cholesky and one triangular inverse: with `J` the reversal permutation and
/// `J H J = L Lᵀ`, `U = J L⁻¹ J` (then `Uᵀ U = J L⁻ᵀ L⁻¹ J = (J L Lᵀ J)⁻¹ = H⁻¹`).
/// `h(i, j)` gives the entries of `H` (read for `j <= i` only), so callers can permute and
/// damp on the fly. On a non-positive pivot returns its index in `H`.
pub fn chol_inverse_upper(
    h: impl Fn(usize, usize) -> f32 + Sync,
    n: usize,
) -> std::result::Result<Vec<f32>, usize> {
    let mut a = vec![0f32; n * n];
    a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row[..=i].iter_mut().enumerate() {
            *v = h(n - 1 - j, n - 1 - i);
        }
    });
    cholesky_lower(&mut a, n).map_err(|j| n - 1 - j)?;
    let m = invert_lower(&a, n);
    let mut u = a;
    u.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row[..i].fill(0.0);
        for (j, v) in row.iter_mut().enumerate().skip(i) {
            *v = m[(n - 1 - i) * n + (n - 1 - j)];
        }
    });
    Ok(u)
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::model::ops::dot(a, b)
}

/// `y += alpha · x`
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::generate::Rng;

    fn random(n: usize, m: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n * m).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    fn naive_mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// A well-conditioned SPD matrix `XᵀX / t + I`, via `syrk_upper` itself.
    fn spd(n: usize, rng: &mut Rng) -> Vec<f32> {
        let t = n + 17;
        let x = random(t, n, rng);
        let mut s = vec![0f32; n * n];
        syrk_upper(&mut s, &x, n);
        mirror_upper(&mut s, n);
        let xt: Vec<f32> = (0..n * t).map(|i| x[(i % t) * n + i / t]).collect();
        let want = naive_mm(&xt, &x, n, t, n);
        let err = s
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-3, "syrk error {err}");
        for (i, v) in s.iter_mut().enumerate() {
            *v /= t as f32;
            if i % (n + 1) == 0 {
                *v += 1.0;
            }
        }
        s
    }

    #[test]
    fn cholesky_and_inverse_reconstruct() {
        let mut rng = Rng::new(3);
        for n in [1, 5, 64, 65, 130, 200] {
            let h = spd(n, &mut rng);
            let mut l = h.clone();
            cholesky_lower(&mut l, n).unwrap();
            for i in 0..n {
                for j in i + 1..n {
                    l[i * n + j] = 0.0;
                }
            }
            let lt: Vec<f32> = (0..n * n).map(|i| l[(i % n) * n + i / n]).collect();
            let llt = naive_mm(&l, &lt, n, n, n);
            let e = llt
                .iter()
                .zip(&h)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(e < 1e-4, "n {n}: |LLᵀ - H| = {e}");

            let u = chol_inverse_upper(|i, j| h[i * n + j], n).unwrap();
            let ut: Vec<f32> = (0..n * n).map(|i| u[(i % n) * n + i / n]).collect();
            let hinv = naive_mm(&ut, &u, n, n, n);
            let id = naive_mm(&hinv, &h, n, n, n);
            for i in 0..n {
                for j in 0..n {
                    assert!(j >= i || u[i * n + j] == 0.0, "U is not upper");
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (id[i * n + j] - want).abs() < 1e-3,
                        "n {n}: UᵀU·H at {i},{j}"
                    );
                }
            }
        }
    }

    #[test]
    fn cholesky_reports_indefinite_pivot() {
        let mut a = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky_lower(&mut a, 2), Err(1));
    }

    #[test]
    fn strided_matmul_matches_naive() {
        let mut rng = Rng::new(9);
        let (m, k, n) = (7, 33, 5);
        let a = random(m, k, &mut rng);
        let b = random(k, n, &mut rng);
        let want = naive_mm(&a, &b, m, k, n);
        let mut c = vec![1f32; m * n];
        matmul(
            &mut c,
            n,
            true,
            2.0,
            View::new(&a, m, k),
            View::new(&b, k, n),
            false,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (1.0 + 2.0 * y)).abs() < 1e-4);
        }
        // Transposed view of bᵀ stored row-major.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(
            &mut c,
            n,
            false,
            1.0,
            View::new(&a, m, k),
            View::new(&bt, n, k).t(),
            true,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-4);
        }
    }
}
