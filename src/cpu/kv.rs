//! The CPU backend's KV cache (`runtime::backend::KvLayout`; the WebGPU engine's cache has
//! the same bytes, `shaders/rope.wgsl`): per position and KV head, `head_dim` elements as f16
//! (the default: the demo model's 1,024-token cache 23.6 MB instead of f32's 47.2, held-out
//! perplexity moved by < 0.01%), or as int8 codes then one f32 scale per group of 32 elements,
//! the group's largest magnitude, each element the nearest of 255 levels in [-scale, scale]
//! (llama.cpp's `q8_0`: 13.3 MB, +0.07% perplexity). Values are rounded to nearest when
//! written and widened to f32 a tile at a time by attention (`widen_head`, `cpu::attention`),
//! in loops the compiler vectorises.

use crate::runtime::backend::{KvFormat, KvLayout, KV_SCALE_BYTES, KV_SCALE_MAX};

const SCALE: usize = KV_SCALE_BYTES as usize;

/// `x` in [-1, 1] as the nearest of the 255 levels (WGSL's `pack4x8snorm`).
#[inline(always)]
fn code(x: f32) -> u8 {
    (x.clamp(-1.0, 1.0) * 127.0).round_ties_even() as i8 as u8
}

/// An f16 bit pattern as f32, exact for every finite value, in four vector operations: sign-
/// extended and shifted left by 13, the sign lands on bit 31 (copies of it on bits 28-30,
/// masked off) and the exponent and mantissa below it; the power-of-two multiply then rebiases
/// the exponent (and renormalises subnormals).
#[inline(always)]
pub fn widen_f16(h: u16) -> f32 {
    let bits = (((h as i16 as i32) << 13) as u32) & 0x8fff_e000;
    f32::from_bits(bits) * f32::from_bits(0x7780_0000) // 2^112
}

/// Heads of `head_dim` values (`x`, one after another) into `out` (`KvLayout`). Never stores
/// what reads back non-finite: f16 clamps to its finite range; an int8 scale saturates at
/// `KV_SCALE_MAX` (a NaN becomes 0).
pub fn store(x: &[f32], l: &KvLayout, out: &mut [u8]) {
    if l.format == KvFormat::F16 {
        for (o, &v) in out.chunks_exact_mut(2).zip(x) {
            o.copy_from_slice(&crate::model::math::f16_bits(v).to_le_bytes());
        }
        return;
    }
    for (o, h) in out
        .chunks_exact_mut(l.head_bytes())
        .zip(x.chunks_exact(l.head_dim))
    {
        let (codes, scales) = o.split_at_mut(l.head_dim);
        let groups = codes.chunks_mut(l.group).zip(h.chunks(l.group));
        for ((codes, g), scale) in groups.zip(scales.chunks_exact_mut(SCALE)) {
            let m = g.iter().fold(0f32, |a, v| a.max(v.abs())).min(KV_SCALE_MAX);
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            for (c, &v) in codes.iter_mut().zip(g) {
                *c = code(v * inv);
            }
            scale.copy_from_slice(&m.to_le_bytes());
        }
    }
}

/// One stored head widened into `out` (`head_dim` values).
#[inline(always)]
pub fn widen_head(stored: &[u8], l: &KvLayout, out: &mut [f32]) {
    if l.format == KvFormat::F16 {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        let done = simd::widen_f16s(stored, out);
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        let done = 0;
        for (o, h) in out[done..]
            .iter_mut()
            .zip(stored[2 * done..].chunks_exact(2))
        {
            *o = widen_f16(u16::from_le_bytes([h[0], h[1]]));
        }
        return;
    }
    let (codes, scales) = stored.split_at(l.head_dim);
    let groups = out.chunks_mut(l.group).zip(codes.chunks(l.group));
    for ((o, codes), scale) in groups.zip(scales.chunks_exact(SCALE)) {
        let s = f32::from_le_bytes(scale.try_into().expect("a 4-byte scale")) / 127.0;
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        let done = simd::widen_i8s(codes, s, o);
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        let done = 0;
        for (o, &c) in o[done..].iter_mut().zip(&codes[done..]) {
            *o = (c as i8) as f32 * s;
        }
    }
}

/// `widen_f16` and the int8 widening in wasm simd128, a vector at a time.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::*;

    /// Widens the first `8 * k` f16 values of `stored` into `out` (as many whole groups of 8
    /// as both hold); returns how many it widened.
    pub fn widen_f16s(stored: &[u8], out: &mut [f32]) -> usize {
        let n = (out.len().min(stored.len() / 2)) / 8 * 8;
        let mask = u32x4_splat(0x8fff_e000);
        let scale = f32x4_splat(f32::from_bits(0x7780_0000));
        let one = |h: v128| f32x4_mul(v128_and(i32x4_shl(h, 13), mask), scale);
        for i in (0..n).step_by(8) {
            // SAFETY: bytes 2i .. 2i + 16 of `stored` and floats i .. i + 8 of `out` are in
            // bounds (i + 8 <= n); wasm loads and stores need no alignment.
            unsafe {
                let h = v128_load(stored.as_ptr().add(2 * i) as *const v128);
                let o = out.as_mut_ptr().add(i) as *mut v128;
                v128_store(o, one(i32x4_extend_low_i16x8(h)));
                v128_store(o.add(1), one(i32x4_extend_high_i16x8(h)));
            }
        }
        n
    }

    /// `codes` (int8) times `s` into `out`, 16 at a time (as many whole groups of 16 as both
    /// hold); returns how many it widened.
    pub fn widen_i8s(codes: &[u8], s: f32, out: &mut [f32]) -> usize {
        let n = out.len().min(codes.len()) / 16 * 16;
        let s = f32x4_splat(s);
        let four = |c: v128| f32x4_mul(f32x4_convert_i32x4(c), s);
        for i in (0..n).step_by(16) {
            // SAFETY: bytes i .. i + 16 of `codes` and floats i .. i + 16 of `out` are in
            // bounds (i + 16 <= n); wasm loads and stores need no alignment.
            unsafe {
                let c = v128_load(codes.as_ptr().add(i) as *const v128);
                let (lo, hi) = (i16x8_extend_low_i8x16(c), i16x8_extend_high_i8x16(c));
                let o = out.as_mut_ptr().add(i) as *mut v128;
                v128_store(o, four(i32x4_extend_low_i16x8(lo)));
                v128_store(o.add(1), four(i32x4_extend_high_i16x8(lo)));
                v128_store(o.add(2), four(i32x4_extend_low_i16x8(hi)));
                v128_store(o.add(3), four(i32x4_extend_high_i16x8(hi)));
            }
        }
        n
    }
}

/// Every stored head of `stored` widened (tests and checks; attention widens tiles).
pub fn widened(stored: &[u8], l: &KvLayout) -> Vec<f32> {
    let mut out = vec![0f32; stored.len() / l.head_bytes() * l.head_dim];
    let heads = stored.chunks_exact(l.head_bytes());
    for (h, o) in heads.zip(out.chunks_exact_mut(l.head_dim)) {
        widen_head(h, l, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(head_dim: usize, group: usize) -> KvLayout {
        KvLayout {
            format: KvFormat::Int8,
            head_dim,
            group,
        }
    }

    #[test]
    fn widen_f16_is_exact_for_every_finite_f16() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h);
            if want.is_finite() {
                assert_eq!(widen_f16(h).to_bits(), want.to_f32().to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn f16_store_rounds_to_nearest_and_never_overflows() {
        let x = [0.1f32, -2.71, 1e-6, 7e4, -1e9, 0.0, 65504.0, 3.0];
        let l = KvLayout {
            format: KvFormat::F16,
            head_dim: 4,
            group: 4,
        };
        let mut s = vec![0u8; 2 * l.head_bytes()];
        store(&x, &l, &mut s);
        let back = widened(&s, &l);
        for (&v, &b) in x.iter().zip(&back) {
            assert!(b.is_finite(), "{v} -> {b}");
            let want = v.clamp(-crate::model::math::F16_MAX, crate::model::math::F16_MAX);
            // Half an f16 ulp: 2^-11 relative for normal values, 2^-25 absolute below them.
            assert!((b - want).abs() <= want.abs() * 4.9e-4 + 3e-8, "{v} -> {b}");
        }
    }

    #[test]
    fn store_keeps_each_value_within_half_a_level_of_its_groups_largest() {
        #[rustfmt::skip]
        let x = [
            0.1f32, -2.71, 1e-6, 0.5, -0.25, 0.0, 2.0, 1.0, // head 0
            7e4, -1e9, 3.0, 0.0, 1e9, -5.0, 6e8, 1.0, // head 1: no overflow (f16 would)
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, // head 2: all zero
        ];
        for l in [layout(8, 8), layout(8, 4), layout(8, 2)] {
            let mut s = vec![0u8; 3 * l.head_bytes()];
            store(&x, &l, &mut s);
            let back = widened(&s, &l);
            for (g, (want, got)) in x.chunks(l.group).zip(back.chunks(l.group)).enumerate() {
                let m = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (&w, &b) in want.iter().zip(got) {
                    assert!(b.is_finite(), "{l:?} group {g}: {w} -> {b}");
                    assert!(
                        (b - w).abs() <= m / 254.0 * 1.0001,
                        "{l:?} group {g}: {w} -> {b}"
                    );
                }
                // The largest magnitude comes back exactly (code +-127).
                assert!(got.iter().any(|b| b.abs() == m), "{l:?} group {g}: {got:?}");
            }
        }
    }

    #[test]
    fn store_never_reads_back_non_finite() {
        let x = [f32::INFINITY, 1.0, f32::NAN, -3.0];
        let l = layout(4, 4);
        let mut s = vec![0u8; l.head_bytes()];
        store(&x, &l, &mut s);
        let back = widened(&s, &l);
        assert!(back.iter().all(|v| v.is_finite()), "{back:?}");
        assert!(
            (back[0] - KV_SCALE_MAX).abs() <= KV_SCALE_MAX * 1e-6,
            "{back:?}"
        );
        assert_eq!(back[2], 0.0);
    }

    #[test]
    fn the_layout_is_codes_then_one_little_endian_scale_per_group() {
        let l = layout(64, 32);
        assert_eq!(l.head_bytes(), 64 + 2 * 4);
        let x: Vec<f32> = (0..64).map(|i| if i < 32 { 1.0 } else { -0.5 }).collect();
        let mut s = vec![0u8; l.head_bytes()];
        store(&x, &l, &mut s);
        assert!(s[..32].iter().all(|&c| c == 127) && s[32..64].iter().all(|&c| c == 129));
        assert_eq!(s[64..68], 1f32.to_le_bytes());
        assert_eq!(s[68..72], 0.5f32.to_le_bytes());
    }
}
