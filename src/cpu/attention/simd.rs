//! The inner loops of `cpu::attention` in wasm simd128, where the portable loops compile to
//! a scalar `exp` per key and a horizontal sum per key and query. Scores four keys at a time
//! (their sums transposed into one vector), `exp` four lanes at a time (the same operations as
//! `math::exp`, so the same bits), values weighed sixteen lanes at a time.

use crate::model::math;
use core::arch::wasm32::*;

/// Loads four floats at `p`.
///
/// # Safety
/// `p .. p + 4` must be readable.
#[inline(always)]
unsafe fn load(p: *const f32) -> v128 {
    v128_load(p as *const v128)
}

/// The four lane sums of `a`, `b`, `c`, `d`, in that order.
#[inline(always)]
fn transpose_sum(a: v128, b: v128, c: v128, d: v128) -> v128 {
    let ab = f32x4_add(
        i32x4_shuffle::<0, 4, 1, 5>(a, b),
        i32x4_shuffle::<2, 6, 3, 7>(a, b),
    );
    let cd = f32x4_add(
        i32x4_shuffle::<0, 4, 1, 5>(c, d),
        i32x4_shuffle::<2, 6, 3, 7>(c, d),
    );
    f32x4_add(
        i32x4_shuffle::<0, 1, 4, 5>(ab, cd),
        i32x4_shuffle::<2, 3, 6, 7>(ab, cd),
    )
}

/// `q`'s dot products times `scale` with the first keys of `keys` (`[s.len()][q.len()]`), four
/// keys at a time, into `s`; returns how many it scored (0 unless `q.len()` is a multiple of
/// 8).
pub fn score(q: &[f32], keys: &[f32], scale: f32, s: &mut [f32]) -> usize {
    let hd = q.len();
    if !hd.is_multiple_of(8) || hd == 0 {
        return 0;
    }
    let n = s.len().min(keys.len() / hd) / 4 * 4;
    let scale = f32x4_splat(scale);
    for j in (0..n).step_by(4) {
        let mut acc = [f32x4_splat(0.0); 8];
        for d in (0..hd).step_by(8) {
            // SAFETY: d + 8 <= hd = q.len(), and keys j .. j + 4 of `keys` hold `hd` floats
            // each (j + 4 <= n <= keys.len() / hd).
            unsafe {
                let (qa, qb) = (load(q.as_ptr().add(d)), load(q.as_ptr().add(d + 4)));
                for (k, a) in acc.chunks_exact_mut(2).enumerate() {
                    let kp = keys.as_ptr().add((j + k) * hd + d);
                    a[0] = f32x4_add(a[0], f32x4_mul(qa, load(kp)));
                    a[1] = f32x4_add(a[1], f32x4_mul(qb, load(kp.add(4))));
                }
            }
        }
        let sums = transpose_sum(
            f32x4_add(acc[0], acc[1]),
            f32x4_add(acc[2], acc[3]),
            f32x4_add(acc[4], acc[5]),
            f32x4_add(acc[6], acc[7]),
        );
        // SAFETY: j + 4 <= n <= s.len().
        unsafe { v128_store(s.as_mut_ptr().add(j) as *mut v128, f32x4_mul(sums, scale)) };
    }
    n
}

/// `math::exp` of four lanes: the same operations in the same order, so the same bits.
#[inline(always)]
fn exp4(x: v128) -> v128 {
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = f32x4_mul(x, f32x4_splat(std::f32::consts::LOG2_E));
    let (lo, hi) = (f32x4_splat(-126.0), f32x4_splat(127.0));
    let t = v128_bitselect(lo, t, f32x4_lt(t, lo));
    let t = v128_bitselect(hi, t, f32x4_gt(t, hi));
    let r = f32x4_add(t, f32x4_splat(ROUND));
    let n = f32x4_sub(r, f32x4_splat(ROUND));
    let k = i32x4_sub(r, u32x4_splat(ROUND.to_bits()));
    let y = f32x4_sub(
        f32x4_sub(x, f32x4_mul(n, f32x4_splat(LN2_HI))),
        f32x4_mul(n, f32x4_splat(LN2_LO)),
    );
    let c = |v: f32| f32x4_splat(v);
    let mut p = f32x4_add(c(1.0 / 120.0), f32x4_mul(y, c(1.0 / 720.0)));
    for k in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = f32x4_add(c(k), f32x4_mul(y, p));
    }
    let scale = i32x4_shl(i32x4_add(k, i32x4_splat(127)), 23);
    let e = f32x4_mul(p, scale);
    let e = v128_bitselect(f32x4_splat(0.0), e, f32x4_lt(x, c(-87.3)));
    v128_bitselect(c(f32::INFINITY), e, f32x4_ge(x, c(88.37)))
}

/// Each `e` of `s` becomes `exp(e - m)`; returns their sum, added in eight lanes (lane
/// `i % 8` takes element `i`) and then in lane order, as the portable loop adds them.
pub fn exp_sum(s: &mut [f32], m: f32) -> f32 {
    let n = s.len() / 8 * 8;
    let (m4, mut lo, mut hi) = (f32x4_splat(m), f32x4_splat(0.0), f32x4_splat(0.0));
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= s.len().
        unsafe {
            let p = s.as_mut_ptr().add(i);
            let a = exp4(f32x4_sub(load(p), m4));
            let b = exp4(f32x4_sub(load(p.add(4)), m4));
            v128_store(p as *mut v128, a);
            v128_store(p.add(4) as *mut v128, b);
            lo = f32x4_add(lo, a);
            hi = f32x4_add(hi, b);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe {
        v128_store(lanes.as_mut_ptr() as *mut v128, lo);
        v128_store(lanes.as_mut_ptr().add(4) as *mut v128, hi);
    }
    for (i, e) in s[n..].iter_mut().enumerate() {
        *e = math::exp(*e - m);
        lanes[i] += *e;
    }
    lanes.iter().sum()
}

/// `acc += sum_j w[j] * values[j]` (`values`: `[w.len()][acc.len()]`), sixteen lanes of
/// `acc` in registers at a time, keys in order (the portable loop's sums); returns how many
/// lanes of `acc` it did (a multiple of 16).
pub fn weigh_values(w: &[f32], values: &[f32], acc: &mut [f32]) -> usize {
    let hd = acc.len();
    let done = hd / 16 * 16;
    if values.len() < w.len() * hd {
        return 0;
    }
    for c in (0..done).step_by(16) {
        let mut a = [f32x4_splat(0.0); 4];
        for (j, &wj) in w.iter().enumerate() {
            let wj = f32x4_splat(wj);
            // SAFETY: key j's values start at j * hd and c + 16 <= hd (j < w.len(), checked
            // above that `values` holds them all).
            unsafe {
                let v = values.as_ptr().add(j * hd + c);
                for (i, a) in a.iter_mut().enumerate() {
                    *a = f32x4_add(*a, f32x4_mul(wj, load(v.add(4 * i))));
                }
            }
        }
        for (i, a) in a.into_iter().enumerate() {
            // SAFETY: c + 16 <= done <= acc.len().
            unsafe {
                let o = acc.as_mut_ptr().add(c + 4 * i);
                v128_store(o as *mut v128, f32x4_add(load(o), a));
            }
        }
    }
    done
}
