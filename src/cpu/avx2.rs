//! The packed and plane-reading row loops with AVX2 (x86_64 CPUs that have AVX2 and FMA,
//! chosen at run time by `kernel::dispatch_row`).
//!
//! Packed codes are cut out of their words with SSE the way the wasm simd128 build does it
//! (the same layouts: `kernel::chunk_layout`, `kernel::pairs_table`), eight lanes
//! per vector, in `act::lane_input`'s order; then two 16-lane `vpmaddwd` per block and token.
//! The portable loop left the 2-, 3-, 5- and 6-bit unpacking to the compiler, which did not
//! vectorise it: those widths decoded 2-4x slower than 4 and 8 bits per code.

use crate::cpu::act::{BLOCK, Q16};
use crate::cpu::kernel::{chunk_layout, f16_to_f32, pairs_table, second_view};
use core::arch::x86_64::*;

/// One row against activation rows `t0 .. t0 + N`, given the row's grid words and a function
/// that returns block `b`'s 32 codes as two i16x16 in `a`'s lane order: the packed and the
/// plane-reading kernels' shared integer dot products and per-group f32 steps.
///
/// # Safety
/// AVX2 must be available; `a` holds rows `t0 .. t0 + N` of 32-lane blocks for these groups.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_avx2_with<const N: usize>(
    scales: &[u32],
    bpg: usize,
    a: &Q16,
    t0: usize,
    block: impl FnMut(usize) -> [__m256i; 2],
) -> [f32; N] {
    // The blocks of a group as a constant, so that the loop over them unrolls (as
    // `kernel::row_simd128_with`).
    match bpg {
        1 => groups_avx2::<N, 1>(scales, a, t0, block),
        2 => groups_avx2::<N, 2>(scales, a, t0, block),
        4 => groups_avx2::<N, 4>(scales, a, t0, block),
        b => unreachable!("{b} blocks per group passed PackedShape validation"),
    }
}

/// `row_avx2_with` for `BPG` blocks per group.
///
/// # Safety
/// As `row_avx2_with`.
#[target_feature(enable = "avx2,fma")]
unsafe fn groups_avx2<const N: usize, const BPG: usize>(
    scales: &[u32],
    a: &Q16,
    t0: usize,
    mut block: impl FnMut(usize) -> [__m256i; 2],
) -> [f32; N] {
    let bpg = BPG;
    let mut acc = [0f32; N];
    for (g, &sz) in scales.iter().enumerate() {
        let mut isum = [_mm256_setzero_si256(); N];
        for b in g * bpg..(g + 1) * bpg {
            let [c0, c1] = block(b);
            for (n, is) in isum.iter_mut().enumerate() {
                let at = (t0 + n) * a.blocks + b;
                let q = a.q[at * BLOCK..(at + 1) * BLOCK].as_ptr() as *const __m256i;
                let d0 = _mm256_madd_epi16(c0, _mm256_loadu_si256(q));
                let d1 = _mm256_madd_epi16(c1, _mm256_loadu_si256(q.add(1)));
                *is = _mm256_add_epi32(*is, _mm256_add_epi32(d0, d1));
            }
        }
        let (scale, zero) = (f16_to_f32(sz & 0xffff), f16_to_f32(sz >> 16));
        for (n, y) in acc.iter_mut().enumerate() {
            let ag = (t0 + n) * a.groups + g;
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, isum[n]);
            let isum: i32 = lanes.iter().sum();
            *y += scale * (isum as f32 * a.d[ag]) + zero * a.sums[ag];
        }
    }
    acc
}

/// Block `b`'s 32 codes of `BITS` bits (`4 * BITS` bytes at `p`) as two i16x16 in lane order.
///
/// # Safety
/// AVX2 must be available and `p` valid for `4 * BITS` bytes; nothing past them is read.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn unpack<const BITS: u32>(p: *const u8) -> [__m256i; 2] {
    let c = match BITS {
        8 => {
            let (v0, v1) = (load(p, 0), load(p, 16));
            [widen_lo(v0), widen_hi(v0), widen_lo(v1), widen_hi(v1)]
        }
        4 => {
            let v = load(p, 0);
            let lo = _mm_and_si128(v, _mm_set1_epi8(15));
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
            [widen_lo(lo), widen_hi(lo), widen_lo(hi), widen_hi(hi)]
        }
        2 => {
            // The 8 bytes widened to u16 lanes once, then cut (the simd128 build's way).
            let w = widen_lo(_mm_loadl_epi64(p as *const __m128i));
            let m3 = _mm_set1_epi16(3);
            [
                _mm_and_si128(w, m3),
                _mm_and_si128(_mm_srli_epi16::<2>(w), m3),
                _mm_and_si128(_mm_srli_epi16::<4>(w), m3),
                _mm_srli_epi16::<6>(w),
            ]
        }
        3 | 6 => pairs::<BITS>(p),
        _ => straddling::<BITS>(p),
    };
    [_mm256_set_m128i(c[1], c[0]), _mm256_set_m128i(c[3], c[2])]
}

#[inline(always)]
unsafe fn load(p: *const u8, at: usize) -> __m128i {
    _mm_loadu_si128(p.add(at) as *const __m128i)
}

#[inline(always)]
unsafe fn widen_lo(v: __m128i) -> __m128i {
    _mm_cvtepu8_epi16(v)
}

#[inline(always)]
unsafe fn widen_hi(v: __m128i) -> __m128i {
    _mm_cvtepu8_epi16(_mm_srli_si128::<8>(v))
}

/// 5 bits (codes straddle bytes): each code's u16 window gathered by a byte shuffle, shifted
/// left per lane by a multiply so that the code ends at the top bit (the bits above it fall
/// out), then right by `16 - BITS` (the simd128 build's `straddling`).
#[inline(always)]
unsafe fn straddling<const BITS: u32>(p: *const u8) -> [__m128i; 4] {
    let second = const { second_view::<BITS>() };
    let (v0, v1) = (load(p, 0), load(p, second));
    let chunk = |v: __m128i, (idx, mul): ([u8; 16], [u16; 8])| {
        let idx = _mm_loadu_si128(idx.as_ptr() as *const __m128i);
        let mul = _mm_loadu_si128(mul.as_ptr() as *const __m128i);
        let top = _mm_mullo_epi16(_mm_shuffle_epi8(v, idx), mul);
        _mm_srl_epi16(top, _mm_cvtsi32_si128(16 - BITS as i32))
    };
    [
        chunk(v0, const { chunk_layout::<BITS>(0, 0) }),
        chunk(v0, const { chunk_layout::<BITS>(1, 0) }),
        chunk(v1, const { chunk_layout::<BITS>(2, second_view::<BITS>()) }),
        chunk(v1, const { chunk_layout::<BITS>(3, second_view::<BITS>()) }),
    ]
}

/// 3 and 6 bits: every 3 bytes become two u16 lanes (`kernel::pairs_table`), the first four
/// shifted left by 4, so uniform shifts (and masks but for the top code) cut the codes,
/// already i16 (the simd128 build's `pairs`). Reads the block's `4 * BITS` bytes only.
#[inline(always)]
unsafe fn pairs<const BITS: u32>(p: *const u8) -> [__m128i; 4] {
    const FROM_0: [u8; 16] = pairs_table(0);
    const FROM_4: [u8; 16] = pairs_table(4);
    let windows = |v: __m128i, idx: &[u8; 16]| {
        let w = _mm_shuffle_epi8(v, _mm_loadu_si128(idx.as_ptr() as *const __m128i));
        _mm_blend_epi16::<0b0000_1111>(w, _mm_slli_epi16::<4>(w))
    };
    let m = _mm_set1_epi16((1 << BITS) - 1);
    let cut = |w: __m128i, k: u32| {
        let s = 4 + BITS * k;
        let v = _mm_srl_epi16(w, _mm_cvtsi32_si128(s as i32));
        match s + BITS == 16 {
            true => v,
            false => _mm_and_si128(v, m),
        }
    };
    if BITS == 3 {
        // 12 bytes: codes 8j..8j+7 in bytes 3j..3j+2.
        let lo = _mm_loadl_epi64(p as *const __m128i);
        let v = _mm_insert_epi32::<2>(lo, (p.add(8) as *const i32).read_unaligned());
        let w = windows(v, &FROM_0);
        [cut(w, 0), cut(w, 1), cut(w, 2), cut(w, 3)]
    } else {
        // 24 bytes: codes 4j..4j+3 in bytes 3j..3j+2; groups 0-3 from the first 16 bytes,
        // 4-7 from the 16 starting at byte 8.
        let (a, b) = (windows(load(p, 0), &FROM_0), windows(load(p, 8), &FROM_4));
        [cut(a, 0), cut(a, 1), cut(b, 0), cut(b, 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SSE cut equals the portable unpacking (`kernel::unpack`), lane for lane, for every
    /// width and every code value.
    #[test]
    fn unpack_matches_the_portable_unpack() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: this CPU has no AVX2+FMA (the portable loop runs instead)");
            return;
        }
        fn check<const BITS: u32>() {
            for seed in 0..64u32 {
                let words: Vec<u32> = (0..BITS)
                    .map(|i| (seed * 31 + i).wrapping_mul(2_654_435_761) ^ (seed << 7))
                    .collect();
                let mut want = [0i16; BLOCK];
                crate::cpu::kernel::unpack::<BITS>(&words, &mut want);
                let mut got = [0i16; BLOCK];
                // SAFETY: AVX2 checked above; `words` holds the block's 4 * BITS bytes.
                unsafe {
                    let [c0, c1] = unpack::<BITS>(words.as_ptr() as *const u8);
                    _mm256_storeu_si256(got.as_mut_ptr() as *mut __m256i, c0);
                    _mm256_storeu_si256(got.as_mut_ptr().add(16) as *mut __m256i, c1);
                }
                assert_eq!(got, want, "{BITS} bits, seed {seed}");
            }
        }
        check::<2>();
        check::<3>();
        check::<4>();
        check::<5>();
        check::<6>();
        check::<8>();
    }
}
