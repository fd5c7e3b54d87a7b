//! `y = W · x` straight from a module's bit planes (`ensemble::plane_level`), so a step down
//! of a nested module is dropping its last plane: no codes repacked.
//!
//! Per block of 32 columns the kernel reads one word per plane and builds each code
//! most-significant plane first (`c = 2c + bit`); the activations are in column order (bit `i`
//! of a plane word is column `i` of the block). Then the same integer dot product and per-group
//! f32 step as the packed kernels (`kernel::row_with`). Building a code takes two operations per
//! plane where the packed kernels cut it out of its word with one or two, so this kernel does
//! more work per weight for the same bytes read (measured in `flexquant bench cpu`,
//! `planes_vs_packed`).

use crate::cpu::act::{BLOCK, Q16};
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
use crate::cpu::kernel::row_simd128_with;
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
use crate::cpu::kernel::row_with;
use crate::cpu::kernel::{dispatch_row, matmul_rows, RowDot};
use crate::cpu::prefetch;
use crate::ensemble::plane_level::{plane_row_words, PlaneLevel};

/// Column order: lane `i` of a block is its column `i`.
pub const PLANE_LANES: [usize; BLOCK] = {
    let mut o = [0; BLOCK];
    let mut i = 0;
    while i < BLOCK {
        o[i] = i;
        i += 1;
    }
    o
};

/// Row `r`'s grid words, the word offset of its first block in plane 0, the words per plane
/// and the 32-column blocks per group.
#[inline(always)]
fn row_of(m: &PlaneLevel, r: usize) -> (&[u32], usize, usize, usize) {
    let gpr = m.shape.groups_per_row();
    (
        &m.scales[r * gpr..(r + 1) * gpr],
        r * plane_row_words(&m.shape),
        m.plane_words(),
        m.shape.group / BLOCK,
    )
}

/// `x` (`[rows][cols]`) quantized for `m`'s plane-reading kernel.
pub fn quantize_for(m: &PlaneLevel, x: &[f32], rows: usize) -> Q16 {
    Q16::quantize_in(x, rows, &m.shape, &PLANE_LANES)
}

/// `out[t][rows] = W · a[t]` for every activation row of `a` (`quantize_for(m, ..)`).
pub fn matmul_planes(m: &PlaneLevel, a: &Q16, out: &mut [f32]) {
    matmul_rows(m, a, out)
}

/// The codes of one block from its `K` plane words (plane 0 the most significant bit), lane by
/// lane (the portable form; the SIMD builds below do the same per 8 or 16 lanes at once).
#[inline(always)]
pub fn unpack_planes<const K: usize>(words: &[u32; K], out: &mut [i16; BLOCK]) {
    for (i, o) in out.iter_mut().enumerate() {
        let mut c = 0u32;
        for w in words {
            c = (c << 1) | (w >> i & 1);
        }
        *o = c as i16;
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
#[inline(always)]
fn row_portable<const K: usize, const N: usize>(
    m: &PlaneLevel,
    a: &Q16,
    r: usize,
    t0: usize,
) -> [f32; N] {
    let (scales, base, pw, bpg) = row_of(m, r);
    row_with::<N>(scales, bpg, a, t0, |b, codes| {
        let words: [u32; K] = std::array::from_fn(|j| m.planes[j * pw + base + b]);
        unpack_planes::<K>(&words, codes)
    })
}

/// The row loop with AVX2: per plane and 16 lanes, the word's 16-bit half broadcast, masked by
/// each lane's bit and compared (`-1` where set), the codes doubled and the mask subtracted;
/// then the packed kernels' `vpmaddwd` dot products (`avx2::row_avx2_with`).
///
/// # Safety
/// AVX2 must be available. Reads inside `m.planes`, `m.scales` and `a` for row `r` and
/// activation rows `t0 .. t0 + N` (`a` quantized for `m.shape`, checked by `matmul_rows`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const K: usize, const N: usize>(
    m: &PlaneLevel,
    a: &Q16,
    r: usize,
    t0: usize,
) -> [f32; N] {
    use core::arch::x86_64::*;
    let (scales, base, pw, bpg) = row_of(m, r);
    let bit = _mm256_setr_epi16(
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
        2048,
        4096,
        8192,
        16384,
        i16::MIN,
    );
    crate::cpu::avx2::row_avx2_with::<N>(scales, bpg, a, t0, |b| {
        let (mut c0, mut c1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for j in 0..K {
            let w = *m.planes.get_unchecked(j * pw + base + b);
            let lo = _mm256_set1_epi16(w as i16);
            let hi = _mm256_set1_epi16((w >> 16) as i16);
            let m0 = _mm256_cmpeq_epi16(_mm256_and_si256(lo, bit), bit);
            let m1 = _mm256_cmpeq_epi16(_mm256_and_si256(hi, bit), bit);
            c0 = _mm256_sub_epi16(_mm256_add_epi16(c0, c0), m0);
            c1 = _mm256_sub_epi16(_mm256_add_epi16(c1, c1), m1);
        }
        [c0, c1]
    })
}

/// The row loop with wasm simd128: as `row_avx2`, per 8 lanes (four i16x8 per block), then
/// the packed kernel's dot products and f32 steps (`kernel::row_simd128_with`).
///
/// # Safety
/// simd128 must be enabled; reads as `row_avx2`.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn row_simd128<const K: usize, const N: usize>(
    m: &PlaneLevel,
    a: &Q16,
    r: usize,
    t0: usize,
) -> [f32; N] {
    use core::arch::wasm32::*;
    let (scales, base, pw, bpg) = row_of(m, r);
    let bit = i16x8(1, 2, 4, 8, 16, 32, 64, 128);
    row_simd128_with::<N>(scales, bpg, a, t0, |b| {
        let mut c = [i16x8_splat(0); 4];
        for j in 0..K {
            let w = *m.planes.get_unchecked(j * pw + base + b);
            for (v, cv) in c.iter_mut().enumerate() {
                let byte = i16x8_splat((w >> (8 * v) & 255) as i16);
                let set = i16x8_eq(v128_and(byte, bit), bit);
                *cv = i16x8_sub(i16x8_add(*cv, *cv), set);
            }
        }
        c
    })
}

impl RowDot for PlaneLevel {
    fn rows(&self) -> usize {
        self.shape.rows
    }
    fn groups_per_row(&self) -> usize {
        self.shape.groups_per_row()
    }
    fn row<const N: usize>(&self, a: &Q16, r: usize, t0: usize) -> [f32; N] {
        dispatch_row!(
            self.shape.bits,
            row_simd128,
            row_avx2,
            row_portable,
            (self, a, r, t0)
        )
    }
    fn row_bytes(&self) -> usize {
        4 * (plane_row_words(&self.shape) * self.shape.bits as usize + self.shape.groups_per_row())
    }
    fn prefetch_row(&self, r: usize) {
        if r < self.shape.rows {
            let (scales, base, pw, _) = row_of(self, r);
            let n = plane_row_words(&self.shape);
            for j in 0..self.shape.bits as usize {
                prefetch::lines(&self.planes[j * pw + base..j * pw + base + n]);
            }
            prefetch::lines(scales);
        }
    }
}
