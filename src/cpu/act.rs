//! Activations as integer blocks (llama.cpp's Q16 idea, at 16 bits): each run of 32 inputs
//! becomes 32 integers in `-32767..=32767` and one f32 scale `d = max|x| / 32767`, so a packed
//! weight block times an activation block is an integer dot product and one multiply by `d`.
//!
//! Why 16 bits and not llama.cpp's 8: the kernels widen the codes to i16 for the i16 dot product
//! (wasm's `i32x4.dot_i16x8_s`, AVX2's `vpmaddwd`) anyway, so i16 activations cost the same
//! instructions, and their rounding (2^-16 of the block's max) is negligible where int8's
//! (2^-8) moved the demo model's logits by ~10 % (SmolLM2 has outlier channels). Sums stay in
//! i32: 128 products of a code <= 255 and |q| <= 32767 are < 2^30.
//!
//! The integers are in the weight bit-width's *lane order*: the order in which the kernels pull codes out of a block's words
//! with whole-vector shifts and masks (for 4 bits: the low nibbles of 16 bytes, then the high
//! ones). Permuting the activations once per matrix call is what lets the kernels skip
//! re-ordering the weights on every row.
//!
//! The zero points need `Σ x` over each weight group; that is kept exact (f32, not from the
//! integers).

use crate::ensemble::format::PackedShape;

/// Inputs per activation block (and codes per weight block: a group is 1, 2 or 4 blocks).
pub const BLOCK: usize = 32;
/// The largest integer of a block (its max |x| maps to it).
const QMAX: f32 = 32767.0;

/// The input index (within its block) held by lane `lane` for `bits`-bit weights.
pub const fn lane_input(bits: u32, lane: usize) -> usize {
    match bits {
        // byte j of the block = code 2j (low nibble) | code 2j+1 (high nibble)
        4 => {
            if lane < 16 {
                2 * lane
            } else {
                2 * (lane - 16) + 1
            }
        }
        // byte j = codes 4j .. 4j+3 at shifts 0, 2, 4, 6; lanes 8s..8s+8 are shift s
        2 => 4 * (lane % 8) + lane / 8,
        // 3 bytes = codes 8j .. 8j+7 (triplet j); u16 lane t < 4 holds triplet t's codes 0-3,
        // lane 4 + t its codes 4-7, and vector k the k-th of each (`kernel::pairs_table`)
        3 => 8 * (lane % 4) + 4 * ((lane % 8) / 4) + lane / 8,
        // 3 bytes = codes 4j .. 4j+3 (triplet j); vectors 0-1 hold triplets 0-3, 2-3 triplets
        // 4-7: u16 lane t < 4 holds triplet t's codes 0-1, lane 4 + t its codes 2-3, and the
        // vectors of a pair the first and the second of each (`kernel::pairs_table`)
        6 => 16 * (lane / 16) + 4 * (lane % 4) + 2 * ((lane % 8) / 4) + (lane / 8) % 2,
        _ => lane,
    }
}

/// `lane_input` for every lane of a block.
pub const fn lane_order(bits: u32) -> [usize; BLOCK] {
    let mut o = [0; BLOCK];
    let mut l = 0;
    while l < BLOCK {
        o[l] = lane_input(bits, l);
        l += 1;
    }
    o
}

/// `rows` activation vectors quantized for one packed matrix: one scale per weight group, so
/// a group's integer dot products add up in i32 before one conversion to f32.
pub struct Q16 {
    pub rows: usize,
    /// Blocks of 32 per row (`groups * group / 32`; inputs past `cols` are zero).
    pub blocks: usize,
    pub groups: usize,
    /// `[rows][blocks * 32]`, each block of 32 in the lane order of `bits`.
    pub q: Vec<i16>,
    /// `[rows][groups]`: the scale of each group's integers.
    pub d: Vec<f32>,
    /// `[rows][groups]`: `Σ x` over each weight group.
    pub sums: Vec<f32>,
}

impl Q16 {
    /// Quantizes `x` (`[rows][shape.cols]`) for matrices of `shape`'s bits and group.
    pub fn quantize(x: &[f32], rows: usize, shape: &PackedShape) -> Q16 {
        Self::quantize_in(x, rows, shape, &lane_order(shape.bits))
    }

    /// `quantize` with each block in the lane order `order` (`order[lane]` = input index).
    pub fn quantize_in(x: &[f32], rows: usize, shape: &PackedShape, order: &[usize; BLOCK]) -> Q16 {
        let (cols, group) = (shape.cols, shape.group);
        assert_eq!(x.len(), rows * cols, "activation size");
        let groups = shape.groups_per_row();
        let blocks = groups * group / BLOCK;
        let mut q = vec![0i16; rows * blocks * BLOCK];
        let mut d = vec![0f32; rows * groups];
        let mut sums = vec![0f32; rows * groups];
        let mut buf = vec![0f32; group];
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            for g in 0..groups {
                let lo = (g * group).min(cols);
                let hi = ((g + 1) * group).min(cols);
                buf.fill(0.0);
                buf[..hi - lo].copy_from_slice(&xr[lo..hi]);
                let amax = buf.iter().fold(0f32, |m, v| m.max(v.abs()));
                let inv = if amax > 0.0 { QMAX / amax } else { 0.0 };
                d[r * groups + g] = amax / QMAX;
                sums[r * groups + g] = buf.iter().sum::<f32>();
                let qg = &mut q[(r * blocks + g * group / BLOCK) * BLOCK..][..group];
                for (qb, xb) in qg.chunks_exact_mut(BLOCK).zip(buf.chunks_exact(BLOCK)) {
                    for (lane, o) in qb.iter_mut().enumerate() {
                        *o = (xb[order[lane]] * inv).round() as i16;
                    }
                }
            }
        }
        Q16 {
            rows,
            blocks,
            groups,
            q,
            d,
            sums,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_orders_are_permutations() {
        for bits in [2, 3, 4, 5, 6, 8] {
            let mut seen = [false; BLOCK];
            for l in 0..BLOCK {
                seen[lane_input(bits, l)] = true;
            }
            assert!(seen.iter().all(|s| *s), "{bits}");
        }
    }

    #[test]
    fn dequantized_blocks_are_close() {
        let shape = PackedShape::new(1, 70, 4, 32).unwrap();
        let x: Vec<f32> = (0..70)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3)
            .collect();
        let a = Q16::quantize(&x, 1, &shape);
        assert_eq!((a.blocks, a.groups), (3, 3));
        for (i, &xi) in x.iter().enumerate() {
            let (b, pos) = (i / BLOCK, i % BLOCK);
            let lane = (0..BLOCK).find(|&l| lane_input(4, l) == pos).unwrap();
            let v = a.q[b * BLOCK + lane] as f32 * a.d[b];
            assert!((v - xi).abs() <= a.d[b] * 0.5 + 1e-6, "{i}: {v} vs {xi}");
        }
        let s: f32 = x[64..].iter().sum();
        assert!((a.sums[2] - s).abs() < 1e-5);
    }
}
