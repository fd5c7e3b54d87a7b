//! `y = W · x` straight from the packed codes (no f32 copy of any weight), with `x` as int16
//! blocks (`act::Q16`). For one weight group of `group` codes, scale `s` and zero `z`:
//!
//! `Σ (s·c + z)·x = s · d · (c · q) + z · Σ x`
//!
//! where `c · q` is an integer dot product over the group (in blocks of 32 codes). Per block the kernel pulls the codes
//! out of their words with whole-vector masks and shifts (the activations are already in that
//! lane order), widens them to i16 and multiplies-adds pairs into i32 lanes; the f32 work is one
//! convert and one multiply-add per group, and the lanes are summed once per row.
//!
//! Three builds of the same row loop: wasm `simd128` intrinsics (the browser), AVX2 natively
//! where the CPU has it (`cpu::avx2`, chosen at run time), and the portable loop elsewhere.
//! Prefill tiles up to four tokens per row so each block is unpacked once for all four.

use crate::cpu::act::{lane_order, BLOCK, Q16};
use crate::cpu::{par, prefetch};
use crate::ensemble::format::PackedMatrix;

/// Tokens that share one unpacking of a weight block.
const TILE: usize = 4;
/// Output rows per parallel task: about 8 tasks per thread that computes (taken dynamically,
/// so one that got ahead takes more), 8 to `max` rows each, so that small matrices (192 rows
/// for K and V here) are shared evenly too; all rows at once on one thread.
fn row_chunk(rows: usize, max: usize) -> usize {
    match par::active_threads() {
        1 => rows.max(1),
        n => rows.div_ceil(8 * n).next_multiple_of(8).clamp(8, max),
    }
}

/// An f16 bit pattern as f32: exact for every finite value (the exponent rebias by a power-of-
/// two multiply also renormalises subnormals). Scales and zeros are checked finite at load.
#[inline(always)]
pub fn f16_to_f32(h: u32) -> f32 {
    let v = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000); // 2^112
    if h & 0x8000 != 0 {
        -v
    } else {
        v
    }
}

/// A matrix the row loops read: packed codes here, bit planes in `cpu::planes`.
pub trait RowDot: Sync {
    fn rows(&self) -> usize;
    fn groups_per_row(&self) -> usize;
    /// Row `r` against activation rows `t0 .. t0 + N`.
    fn row<const N: usize>(&self, a: &Q16, r: usize, t0: usize) -> [f32; N];
    /// Bytes of one row (codes and scales).
    fn row_bytes(&self) -> usize;
    /// Asks for row `r`'s weights (`prefetch::lines`); nothing past the last row.
    fn prefetch_row(&self, r: usize);
}

impl RowDot for PackedMatrix {
    fn rows(&self) -> usize {
        self.shape.rows
    }
    fn groups_per_row(&self) -> usize {
        self.shape.groups_per_row()
    }
    fn row<const N: usize>(&self, a: &Q16, r: usize, t0: usize) -> [f32; N] {
        row::<N>(self, a, r, t0)
    }
    fn row_bytes(&self) -> usize {
        self.shape.bytes() / self.shape.rows.max(1)
    }
    fn prefetch_row(&self, r: usize) {
        if r < self.shape.rows {
            let (words, scales, _) = row_of(self, r);
            prefetch::lines(words);
            prefetch::lines(scales);
        }
    }
}

/// `out[t][rows] = W · a[t]` for every activation row `t` of `a` (quantized for `m`'s shape).
pub fn matmul(m: &PackedMatrix, a: &Q16, out: &mut [f32]) {
    matmul_rows(m, a, out)
}

/// `matmul` for any matrix the row loops read.
pub fn matmul_rows<M: RowDot>(m: &M, a: &Q16, out: &mut [f32]) {
    let (rows, t) = (m.rows(), a.rows);
    assert_eq!(out.len(), rows * t, "matmul output size");
    assert_eq!(
        a.groups,
        m.groups_per_row(),
        "activations quantized for another shape"
    );
    if t == 1 {
        // Decode: the weights stream from memory once each. Asking for the rows ~2 kB ahead
        // of the one computed: the demo's 90 MB of 4-bit weights ran at 2.3 GB/s through the
        // wasm kernel without (4.2 for 8 MB, cached), 3.5 with; 8-bit 3.4 -> 5.0 GB/s.
        let chunk = row_chunk(rows, 256);
        let ahead = prefetch::AHEAD_BYTES.div_ceil(m.row_bytes().max(1));
        par::chunks_mut(out, chunk, |c, o| {
            for (i, y) in o.iter_mut().enumerate() {
                let r = c * chunk + i;
                m.prefetch_row(r + ahead);
                *y = m.row::<1>(a, r, 0)[0];
            }
        });
        return;
    }
    // Rows in parallel, `[rows][t]` per task, then transposed.
    let mut rt = vec![0f32; rows * t];
    let chunk = row_chunk(rows, 64);
    par::chunks_mut(&mut rt, chunk * t, |c, o| {
        for (i, ys) in o.chunks_exact_mut(t).enumerate() {
            let r = c * chunk + i;
            let mut t0 = 0;
            while t0 + TILE <= t {
                ys[t0..t0 + TILE].copy_from_slice(&m.row::<TILE>(a, r, t0));
                t0 += TILE;
            }
            for (k, y) in ys[t0..].iter_mut().enumerate() {
                *y = m.row::<1>(a, r, t0 + k)[0];
            }
        }
    });
    for (r, ys) in rt.chunks_exact(t).enumerate() {
        for (k, y) in ys.iter().enumerate() {
            out[k * rows + r] = *y;
        }
    }
}

/// Calls the row loop `$f::<BITS, N>($args)` for a run-time bit-width (every width the format
/// has) in the best build for this target: `$simd` in wasm with simd128, `$avx2` where the CPU
/// has AVX2 and FMA, else `$portable`. Shared by the packed and the plane-reading kernels.
macro_rules! dispatch_row {
    ($bits:expr, $simd:ident, $avx2:ident, $portable:ident, ($($arg:expr),*)) => {{
        macro_rules! by_bits {
            ($f:ident) => {
                match $bits {
                    2 => $f::<2, N>($($arg),*),
                    3 => $f::<3, N>($($arg),*),
                    4 => $f::<4, N>($($arg),*),
                    5 => $f::<5, N>($($arg),*),
                    6 => $f::<6, N>($($arg),*),
                    8 => $f::<8, N>($($arg),*),
                    b => unreachable!("{b}-bit codes passed PackedShape validation"),
                }
            };
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            // SAFETY: simd128 is enabled for this build; the loop reads in bounds (see there).
            unsafe { by_bits!($simd) }
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { by_bits!($avx2) };
        }
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        by_bits!($portable)
    }};
}
pub(crate) use dispatch_row;

/// Row `r` of `W` against activation rows `t0 .. t0 + N`.
#[inline]
fn row<const N: usize>(m: &PackedMatrix, a: &Q16, r: usize, t0: usize) -> [f32; N] {
    dispatch_row!(
        m.shape.bits,
        row_simd128,
        row_avx2,
        row_portable,
        (m, a, r, t0)
    )
}

/// Row `r`'s code words and packed scale/zero words, and the 32-code blocks per group.
#[inline(always)]
fn row_of(m: &PackedMatrix, r: usize) -> (&[u32], &[u32], usize) {
    let s = m.shape;
    let (wpr, gpr) = (s.words_per_row(), s.groups_per_row());
    (
        &m.codes[r * wpr..(r + 1) * wpr],
        &m.scales[r * gpr..(r + 1) * gpr],
        s.group / BLOCK,
    )
}

/// Codes of one 32-code block (`BITS` words) as i16 in lane order (`act::lane_input`).
#[inline(always)]
pub fn unpack<const BITS: u32>(w: &[u32], out: &mut [i16; BLOCK]) {
    match BITS {
        // Whole-word masks and shifts (SWAR), then a byte -> i16 widening the compiler
        // vectorises: the lane orders are those of `act::lane_input`.
        8 => {
            let bytes: &[u8] = bytemuck::cast_slice(&w[..8]);
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = b as i16;
            }
        }
        4 => {
            let bytes: &[u8] = bytemuck::cast_slice(&w[..4]);
            let (lo, hi) = out.split_at_mut(16);
            for ((l, h), &b) in lo.iter_mut().zip(hi).zip(bytes) {
                *l = (b & 15) as i16;
                *h = (b >> 4) as i16;
            }
        }
        2 => {
            let bytes: &[u8] = bytemuck::cast_slice(&w[..2]);
            for (s, o) in out.chunks_exact_mut(8).enumerate() {
                for (v, &b) in o.iter_mut().zip(bytes) {
                    *v = ((b >> (2 * s)) & 3) as i16;
                }
            }
        }
        _ => {
            // 3, 5, 6 bits, in order: 8 codes fill exactly BITS bytes, so chunk c of 8 codes
            // is bytes `BITS c .. BITS (c + 1)`, read as one little-endian u64 (zero-extended:
            // nothing past the block is read) and cut with constant shifts.
            let bytes: &[u8] = bytemuck::cast_slice(&w[..BITS as usize]);
            let (nb, mask) = (BITS as usize, (1u64 << BITS) - 1);
            let mut codes = [0i16; BLOCK];
            for (c, o) in codes.chunks_exact_mut(8).enumerate() {
                let mut buf = [0u8; 8];
                buf[..nb].copy_from_slice(&bytes[nb * c..nb * (c + 1)]);
                let x = u64::from_le_bytes(buf);
                for (k, v) in o.iter_mut().enumerate() {
                    *v = ((x >> (nb * k)) & mask) as i16;
                }
            }
            // Into lane order (identity for 5 bits; see `act::lane_input`).
            let order: [usize; BLOCK] = const { lane_order(BITS) };
            for (o, &i) in out.iter_mut().zip(&order) {
                *o = codes[i];
            }
        }
    }
}

/// The row loop in plain Rust (the compiler vectorises the 32-lane dot product).
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
#[inline(always)]
fn row_portable<const BITS: u32, const N: usize>(
    m: &PackedMatrix,
    a: &Q16,
    r: usize,
    t0: usize,
) -> [f32; N] {
    let (words, scales, bpg) = row_of(m, r);
    let wpb = BITS as usize;
    row_with::<N>(scales, bpg, a, t0, |b, codes| {
        unpack::<BITS>(&words[b * wpb..(b + 1) * wpb], codes)
    })
}

/// One row against activation rows `t0 .. t0 + N`, given the row's grid words and a function
/// that writes block `b`'s 32 codes in `a`'s lane order: integer dot products per block, one
/// f32 multiply-add per group.
#[inline(always)]
pub fn row_with<const N: usize>(
    scales: &[u32],
    blocks_per_group: usize,
    a: &Q16,
    t0: usize,
    mut block: impl FnMut(usize, &mut [i16; BLOCK]),
) -> [f32; N] {
    let bpg = blocks_per_group;
    let mut acc = [0f32; N];
    let mut codes = [0i16; BLOCK];
    for (g, &sz) in scales.iter().enumerate() {
        let mut isum = [0i32; N];
        for b in g * bpg..(g + 1) * bpg {
            block(b, &mut codes);
            for (n, is) in isum.iter_mut().enumerate() {
                let at = (t0 + n) * a.blocks + b;
                let q = &a.q[at * BLOCK..(at + 1) * BLOCK];
                *is += codes
                    .iter()
                    .zip(q)
                    .map(|(&c, &x)| c as i32 * x as i32)
                    .sum::<i32>();
            }
        }
        let (scale, zero) = (f16_to_f32(sz & 0xffff), f16_to_f32(sz >> 16));
        for (n, y) in acc.iter_mut().enumerate() {
            let ag = (t0 + n) * a.groups + g;
            *y += scale * (isum[n] as f32 * a.d[ag]) + zero * a.sums[ag];
        }
    }
    acc
}

/// The row loop with AVX2: each block's codes cut with SSE (`avx2::unpack`), the dot
/// products with `vpmaddwd` (`avx2::row_avx2_with`).
///
/// # Safety
/// AVX2 and FMA must be available. Reads `BITS` words per block inside row `r` of `m.codes`
/// and 32 i16 per block inside `a.q` (`a` was quantized for `m.shape`, checked by `matmul`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const BITS: u32, const N: usize>(
    m: &PackedMatrix,
    a: &Q16,
    r: usize,
    t0: usize,
) -> [f32; N] {
    let (words, scales, bpg) = row_of(m, r);
    let wpb = BITS as usize;
    crate::cpu::avx2::row_avx2_with::<N>(scales, bpg, a, t0, |b| {
        crate::cpu::avx2::unpack::<BITS>(words[b * wpb..(b + 1) * wpb].as_ptr() as *const u8)
    })
}

/// The row loop with wasm simd128: per block, four i16x8 code vectors and four
/// `i32x4.dot_i16x8_s`; per token an f32x4 accumulator, summed across lanes once per row.
///
/// # Safety
/// simd128 must be enabled. Reads `BITS` words per block inside row `r` of `m.codes` and 32
/// i16 per block inside `a.q` (`a` was quantized for `m.shape`, checked by `matmul`).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn row_simd128<const BITS: u32, const N: usize>(
    m: &PackedMatrix,
    a: &Q16,
    r: usize,
    t0: usize,
) -> [f32; N] {
    use core::arch::wasm32::*;
    let (words, scales, bpg) = row_of(m, r);
    let wpb = BITS as usize;
    // Blocks are read through a pointer (no bounds check per block: +8-19% measured).
    assert_eq!(words.len(), scales.len() * bpg * wpb, "a row's code words");
    let muls = straddling_muls::<BITS>();
    row_simd128_with::<N>(scales, bpg, a, t0, |b| {
        let p = words.as_ptr().add(b * wpb);
        match BITS {
            8 => {
                let v0 = v128_load(p as *const v128);
                let v1 = v128_load(p.add(4) as *const v128);
                [
                    u16x8_extend_low_u8x16(v0),
                    u16x8_extend_high_u8x16(v0),
                    u16x8_extend_low_u8x16(v1),
                    u16x8_extend_high_u8x16(v1),
                ]
            }
            4 => {
                let v = v128_load(p as *const v128);
                let m15 = u8x16_splat(15);
                let lo = v128_and(v, m15);
                // Codes are cut with u16 shifts and one mask (here and at 2 bits): V8 lowers a
                // u8 shift to a u16 shift plus a mask of its own, so u8 shifts were masked
                // twice (Chromium 156, `tests/e2e/kernel_ab.mjs`: 4 bits +3-7% cached, 2 bits
                // +27%; on a 90 MB stream 2 bits +1-18%).
                let hi = v128_and(u16x8_shr(v, 4), m15);
                [
                    u16x8_extend_low_u8x16(lo),
                    u16x8_extend_high_u8x16(lo),
                    u16x8_extend_low_u8x16(hi),
                    u16x8_extend_high_u8x16(hi),
                ]
            }
            2 => {
                // The 8 bytes widened to u16 lanes once, then cut with u16 shifts and masks;
                // the last needs no mask (nothing above the byte).
                let w = u16x8_extend_low_u8x16(v128_load64_zero(p as *const u64));
                let m3 = u16x8_splat(3);
                [
                    v128_and(w, m3),
                    v128_and(u16x8_shr(w, 2), m3),
                    v128_and(u16x8_shr(w, 4), m3),
                    u16x8_shr(w, 6),
                ]
            }
            // 3 and 6 bits: two u16 windows per 3 bytes (see `pairs`); 5 bits: each code's
            // u16 window, shifted per lane by a multiply (see `straddling`).
            3 | 6 => pairs::<BITS>(p as *const u8),
            _ => straddling::<BITS>(p as *const u8, &muls),
        }
    })
}

/// One row against activation rows `t0 .. t0 + N` with wasm simd128, given the row's grid
/// words and a function that returns block `b`'s codes as four i16x8 in `a`'s lane order: four
/// `i32x4.dot_i16x8_s` per block and token, per token an f32x4 accumulator summed across lanes
/// once per row. Shared by the packed and the plane-reading kernels (the same f32 steps, so
/// the same outputs).
///
/// # Safety
/// simd128 must be enabled; `a` holds rows `t0 .. t0 + N` of 32-lane blocks for these groups.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
pub unsafe fn row_simd128_with<const N: usize>(
    scales: &[u32],
    bpg: usize,
    a: &Q16,
    t0: usize,
    block: impl FnMut(usize) -> [core::arch::wasm32::v128; 4],
) -> [f32; N] {
    // Activation blocks are read through a pointer (no bounds check per block and token).
    assert!(
        scales.len() * bpg <= a.blocks && (t0 + N) * a.blocks * BLOCK <= a.q.len(),
        "activations for this row's blocks and tokens"
    );
    // The blocks of a group as a constant: the loop over them unrolled measured 13-31% faster
    // at 2, 4 and 8 bits (group 64, Node's V8).
    match bpg {
        1 => groups_simd128::<N, 1>(scales, a, t0, block),
        2 => groups_simd128::<N, 2>(scales, a, t0, block),
        4 => groups_simd128::<N, 4>(scales, a, t0, block),
        b => unreachable!("{b} blocks per group passed PackedShape validation"),
    }
}

/// `row_simd128_with` for `BPG` blocks per group.
///
/// # Safety
/// As `row_simd128_with`, whose assert covers the reads.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn groups_simd128<const N: usize, const BPG: usize>(
    scales: &[u32],
    a: &Q16,
    t0: usize,
    mut block: impl FnMut(usize) -> [core::arch::wasm32::v128; 4],
) -> [f32; N] {
    use core::arch::wasm32::*;
    let bpg = BPG;
    let mut acc = [f32x4_splat(0.0); N];
    let mut zacc = [0f32; N];
    for (g, &sz) in scales.iter().enumerate() {
        let mut isum = [i32x4_splat(0); N];
        for b in g * bpg..(g + 1) * bpg {
            let c = block(b);
            for (n, is) in isum.iter_mut().enumerate() {
                let at = (t0 + n) * a.blocks + b;
                let q = a.q.as_ptr().add(at * BLOCK) as *const v128;
                *is = i32x4_add(
                    *is,
                    i32x4_add(
                        i32x4_add(
                            i32x4_dot_i16x8(c[0], v128_load(q)),
                            i32x4_dot_i16x8(c[1], v128_load(q.add(1))),
                        ),
                        i32x4_add(
                            i32x4_dot_i16x8(c[2], v128_load(q.add(2))),
                            i32x4_dot_i16x8(c[3], v128_load(q.add(3))),
                        ),
                    ),
                );
            }
        }
        let (scale, zero) = (f16_to_f32(sz & 0xffff), f16_to_f32(sz >> 16));
        for n in 0..N {
            let ag = (t0 + n) * a.groups + g;
            let f = f32x4_splat(scale * a.d[ag]);
            acc[n] = f32x4_add(acc[n], f32x4_mul(f32x4_convert_i32x4(isum[n]), f));
            zacc[n] += zero * a.sums[ag];
        }
    }
    std::array::from_fn(|n| {
        let v = acc[n];
        f32x4_extract_lane::<0>(v)
            + f32x4_extract_lane::<1>(v)
            + f32x4_extract_lane::<2>(v)
            + f32x4_extract_lane::<3>(v)
            + zacc[n]
    })
}

/// The u16 windows and per-lane multipliers that pull 8 codes of `BITS` bits out of a block
/// (see `straddling`): for chunk `c` (codes `8c .. 8c + 8`), byte indices into the vector the
/// chunk is read from, and `2^(16 - BITS - s)` per code (its window shifted left until the
/// code ends at bit 15).
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "wasm32", target_feature = "simd128")
))]
pub(crate) const fn chunk_layout<const BITS: u32>(c: usize, base: usize) -> ([u8; 16], [u16; 8]) {
    let mut idx = [0u8; 16];
    let mut mul = [0u16; 8];
    let mut k = 0;
    while k < 8 {
        let bit = BITS as usize * (8 * c + k);
        let (b, s) = (bit / 8 - base, bit % 8);
        idx[2 * k] = b as u8;
        // The byte above is needed only when the code crosses into it; else any in-range byte
        // (it is shifted out or masked).
        idx[2 * k + 1] = if s + BITS as usize > 8 {
            b as u8 + 1
        } else {
            b as u8
        };
        mul[k] = 1 << (16 - BITS as usize - s);
        k += 1;
    }
    (idx, mul)
}

/// `pairs`' byte shuffle of 12 bytes (four 3-byte groups) starting at byte `first` of the
/// vector into u16 lanes: lane `t < 4` = bytes `3t, 3t + 1` of group `t` (3 bits: its codes
/// 0-3 at bits 0-11; 6 bits: codes 0-1 at 0-11), lane `4 + t` = bytes `3t + 1, 3t + 2` (codes
/// 4-7 at bits 4-15; codes 2-3 at 4-15).
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "wasm32", target_feature = "simd128")
))]
pub(crate) const fn pairs_table(first: u8) -> [u8; 16] {
    let mut idx = [0u8; 16];
    let mut t = 0;
    while t < 4 {
        let b = first + 3 * t as u8;
        (idx[2 * t], idx[2 * t + 1]) = (b, b + 1);
        (idx[8 + 2 * t], idx[8 + 2 * t + 1]) = (b + 1, b + 2);
        t += 1;
    }
    idx
}

/// `straddling`'s per-lane multipliers of the four chunks, hidden from the optimiser
/// (`black_box`, once per row; zeros for the widths that do not straddle). Seen as constants,
/// LLVM turns the multiply by `2^(16 - BITS - s)` and the shift right into a per-lane variable
/// shift, which wasm lacks, so it cut every lane out alone (7 extract / shift / replace
/// triples per 8 codes: 5-bit rows ran at 1.1-1.3 GB/s in Chromium, 2-9 GB/s the others).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn straddling_muls<const BITS: u32>() -> [core::arch::wasm32::v128; 4] {
    let mul = |c, base| as_v128(chunk_layout::<BITS>(c, base)).1;
    let second = second_view::<BITS>();
    match BITS {
        2 | 3 | 4 | 6 | 8 => [core::arch::wasm32::u64x2_splat(0); 4],
        _ => core::hint::black_box([mul(0, 0), mul(1, 0), mul(2, second), mul(3, second)]),
    }
}

/// One block of codes that straddle bytes (5 bits: the only width `pairs` does not cover;
/// `4 * BITS` bytes at `p`) as four i16x8 in code order, reading only inside the block. Per 8
/// codes: gather each code's u16 window (`swizzle`), shift it left per lane by a multiply so
/// that the code ends at bit 15 (the bits above it fall out of the lane), shift right by
/// `16 - BITS`: no mask (without it, 5-bit rows ran 10-17% faster in Chromium 156). `muls`:
/// `straddling_muls`.
///
/// # Safety
/// `p` must be valid for `4 * BITS` bytes.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn straddling<const BITS: u32>(
    p: *const u8,
    muls: &[core::arch::wasm32::v128; 4],
) -> [core::arch::wasm32::v128; 4] {
    use core::arch::wasm32::*;
    // Two views covering the block: chunks 0-1 read the first 16 bytes, chunks 2-3 the 16
    // ending at the block's end.
    let second = const { second_view::<BITS>() };
    let (v0, v1) = (
        v128_load(p as *const v128),
        v128_load(p.add(second) as *const v128),
    );
    // The byte indices as v128 constants (`v128.const`, no loads).
    let chunk =
        |v: v128, idx: v128, mul: v128| u16x8_shr(i16x8_mul(i8x16_swizzle(v, idx), mul), 16 - BITS);
    [
        chunk(v0, const { as_v128(chunk_layout::<BITS>(0, 0)).0 }, muls[0]),
        chunk(v0, const { as_v128(chunk_layout::<BITS>(1, 0)).0 }, muls[1]),
        chunk(
            v1,
            const { as_v128(chunk_layout::<BITS>(2, second_view::<BITS>())).0 },
            muls[2],
        ),
        chunk(
            v1,
            const { as_v128(chunk_layout::<BITS>(3, second_view::<BITS>())).0 },
            muls[3],
        ),
    ]
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
const fn as_v128(
    (idx, mul): ([u8; 16], [u16; 8]),
) -> (core::arch::wasm32::v128, core::arch::wasm32::v128) {
    // SAFETY: both are 16 plain bytes.
    unsafe {
        (
            core::mem::transmute::<[u8; 16], core::arch::wasm32::v128>(idx),
            core::mem::transmute::<[u16; 8], core::arch::wasm32::v128>(mul),
        )
    }
}

/// One block of 3- or 6-bit codes as four i16x8 in `act::lane_input`'s order. Every 3 bytes
/// hold a whole number of codes (8 of 3 bits, 4 of 6) and become two u16 lanes
/// (`pairs_table`), the first four lanes shifted left by 4 so that both halves hold their
/// codes at the same bits (`4 + BITS k`); uniform shifts (and masks but for the top code) cut
/// them, already i16: 12-14 operations per block where u32 lanes narrowed to i16 took 22-23
/// (no per-lane shift, no multiply).
///
/// # Safety
/// `p` must be valid for `4 * BITS` bytes; nothing past them is read.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
unsafe fn pairs<const BITS: u32>(p: *const u8) -> [core::arch::wasm32::v128; 4] {
    use core::arch::wasm32::*;
    const fn table(first: u8) -> v128 {
        let i = pairs_table(first);
        u8x16(
            i[0], i[1], i[2], i[3], i[4], i[5], i[6], i[7], i[8], i[9], i[10], i[11], i[12], i[13],
            i[14], i[15],
        )
    }
    const FROM_0: v128 = table(0);
    const FROM_4: v128 = table(4);
    // Lanes 0-3 shifted left by 4, lanes 4-7 as they are.
    let windows = |v: v128, idx: v128| {
        let w = i8x16_swizzle(v, idx);
        v128_bitselect(i16x8_shl(w, 4), w, u64x2(u64::MAX, 0))
    };
    let m = u16x8_splat((1 << BITS) - 1);
    let cut = |w: v128, k: u32| {
        let s = 4 + BITS * k;
        match s + BITS == 16 {
            true => u16x8_shr(w, s),
            false => v128_and(u16x8_shr(w, s), m),
        }
    };
    if BITS == 3 {
        // 12 bytes: codes 8j..8j+7 in bytes 3j..3j+2.
        let v = v128_load32_lane::<2>(v128_load64_zero(p as *const u64), p.add(8) as *mut u32);
        let w = windows(v, FROM_0);
        [cut(w, 0), cut(w, 1), cut(w, 2), cut(w, 3)]
    } else {
        // 24 bytes: codes 4j..4j+3 in bytes 3j..3j+2; groups 0-3 from the first 16 bytes,
        // 4-7 from the 16 ending at the block's end.
        let a = windows(v128_load(p as *const v128), FROM_0);
        let b = windows(v128_load(p.add(8) as *const v128), FROM_4);
        [cut(a, 0), cut(a, 1), cut(b, 0), cut(b, 1)]
    }
}

/// Where the second 16-byte view of a block starts (0 where the block is not longer).
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "wasm32", target_feature = "simd128")
))]
pub(crate) const fn second_view<const BITS: u32>() -> usize {
    (4 * BITS as usize).saturating_sub(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::act::lane_input;
    use crate::ensemble::format::{get_code, PackedShape};

    #[test]
    fn unpack_matches_the_format_decoder_in_lane_order() {
        for bits in [2u32, 3, 4, 5, 6, 8] {
            let shape = PackedShape::new(1, 64, bits, 32).unwrap();
            let codes: Vec<u8> = (0..64).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let m = PackedMatrix::from_codes(shape, &codes, &[(1.0, 0.0); 2]);
            let mut out = [0i16; BLOCK];
            for b in 0..2 {
                let w = &m.codes[b * bits as usize..];
                match bits {
                    2 => unpack::<2>(w, &mut out),
                    3 => unpack::<3>(w, &mut out),
                    4 => unpack::<4>(w, &mut out),
                    5 => unpack::<5>(w, &mut out),
                    6 => unpack::<6>(w, &mut out),
                    _ => unpack::<8>(w, &mut out),
                }
                for (lane, &c) in out.iter().enumerate() {
                    let i = b * BLOCK + lane_input(bits, lane);
                    assert_eq!(
                        c as u32,
                        get_code(&m.codes, i, bits),
                        "{bits} bits lane {lane}"
                    );
                }
            }
        }
    }

    #[test]
    fn prefetching_reads_inside_every_row_and_nothing_past_the_last() {
        use crate::ensemble::plane_level::PlaneLevel;
        for bits in [2u32, 3, 4, 5, 6, 8] {
            let shape = PackedShape::new(5, 128, bits, 64).unwrap();
            let codes: Vec<u8> = (0..5 * 128).map(|i| (i % (1 << bits)) as u8).collect();
            let m = PackedMatrix::from_codes(shape, &codes, &[(1.0, 0.0); 10]);
            let p = PlaneLevel::from_packed(&m);
            assert_eq!(m.row_bytes() * 5, shape.bytes(), "{bits} bits packed");
            let plane_bytes = 4 * (p.planes.len() + p.scales.len());
            assert_eq!(p.row_bytes() * 5, plane_bytes, "{bits} bits planes");
            for r in 0..9 {
                m.prefetch_row(r);
                p.prefetch_row(r);
            }
        }
    }

    #[test]
    fn f16_conversion_is_exact() {
        for h in (0u32..0x7c00).chain(0x8000..0xfc00) {
            let want = half::f16::from_bits(h as u16).to_f32();
            assert_eq!(f16_to_f32(h).to_bits(), want.to_bits(), "{h:#x}");
        }
    }
}
