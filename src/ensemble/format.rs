//! The packed weight format shared by the CPU path, the ensemble shards and the WGSL kernels.
//!
//! Group-wise asymmetric uniform quantization along the input dimension: a weight row of `cols`
//! values is cut into groups of `group` values (32, 64 or 128), and each group stores
//! `value = scale * code + zero` with `code` in `0 ..= 2^bits - 1` and `scale`, `zero` as f16
//! (the form of ggml's Q4_1, the demo model's source format).
//!
//! Codes: each row is a little-endian bitstream of u32 words, LSB first; code `i` of the row
//! occupies bits `i*bits .. (i+1)*bits`. Because a group is a multiple of 32 values, every 32
//! codes fill exactly `bits` words, so rows and groups always start on a word boundary. For
//! bits 2, 4 and 8 no code straddles two words; for 3, 5 and 6 some do, and the decoder ORs in
//! the next word (`(w[j] >> s) | (w[j+1] << (32 - s))`): one extra load, no per-weight table,
//! the same code for every bit-width (the shaders specialise on `bits` as a constant).
//! Columns past `cols` (when `cols` is not a multiple of `group`) hold code 0 and are ignored.
//!
//! Scales and zeros: one u32 per group, `pack2x16float(scale, zero)` (scale in the low half),
//! row-major `[rows][groups]`, so WGSL reads them with `unpack2x16float`.
//!
//! Byte layout of a module (shard body): `codes` (rows * words_per_row u32) then `scales`
//! (rows * groups u32), all little-endian.

use crate::error::{Error, Result};
use half::f16;
use serde::{Deserialize, Serialize};

/// Bit-widths the library offers, high to low.
pub const BITS: [u32; 6] = [8, 6, 5, 4, 3, 2];
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];
/// The most weights one packed matrix may have (2^31: 2 GiB of 8-bit codes).
pub const MAX_WEIGHTS: u64 = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PackedShape {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group: usize,
}

impl PackedShape {
    pub fn new(rows: usize, cols: usize, bits: u32, group: usize) -> Result<Self> {
        if !BITS.contains(&bits) {
            return Err(Error::input(format!(
                "{bits}-bit codes are not supported (choose from {BITS:?})"
            )));
        }
        if !GROUP_SIZES.contains(&group) {
            return Err(Error::input(format!(
                "group size {group} is not supported (choose from {GROUP_SIZES:?})"
            )));
        }
        if rows == 0 || cols == 0 || rows > 1 << 20 || cols > 1 << 20 {
            return Err(Error::input(format!(
                "matrix shape {rows}x{cols} is out of range"
            )));
        }
        // At most 2^31 weights, so that every size derived from the shape (codes, scales,
        // bytes) fits a 32-bit usize: wasm32 must not wrap on a hostile manifest.
        if rows as u64 * cols as u64 > MAX_WEIGHTS {
            return Err(Error::input(format!(
                "matrix shape {rows}x{cols} has more than {MAX_WEIGHTS} weights"
            )));
        }
        Ok(PackedShape {
            rows,
            cols,
            bits,
            group,
        })
    }
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }
    pub fn words_per_row(&self) -> usize {
        self.groups_per_row() * self.group / 32 * self.bits as usize
    }
    pub fn code_words(&self) -> usize {
        self.rows * self.words_per_row()
    }
    pub fn scale_words(&self) -> usize {
        self.rows * self.groups_per_row()
    }
    /// Exact storage and GPU footprint of the module in bytes.
    pub fn bytes(&self) -> usize {
        4 * (self.code_words() + self.scale_words())
    }
    pub fn max_code(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}

/// One module version: a matrix in the packed format.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    pub shape: PackedShape,
    pub codes: Vec<u32>,
    /// `pack2x16float(scale, zero)` per group.
    pub scales: Vec<u32>,
}

pub fn pack_scale_zero(scale: f32, zero: f32) -> u32 {
    f16::from_f32(scale).to_bits() as u32 | (f16::from_f32(zero).to_bits() as u32) << 16
}

pub fn unpack_scale_zero(w: u32) -> (f32, f32) {
    (
        f16::from_bits(w as u16).to_f32(),
        f16::from_bits((w >> 16) as u16).to_f32(),
    )
}

/// Writes `code` at position `i` of a row's bitstream.
fn put_code(row: &mut [u32], i: usize, bits: u32, code: u32) {
    let bit = i * bits as usize;
    let (j, s) = (bit / 32, (bit % 32) as u32);
    row[j] |= code << s;
    if s + bits > 32 {
        row[j + 1] |= code >> (32 - s);
    }
}

/// Reads the code at position `i` of a row's bitstream (the decoder the shaders mirror).
pub fn get_code(row: &[u32], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    let (j, s) = (bit / 32, (bit % 32) as u32);
    let mut v = row[j] >> s;
    if s + bits > 32 {
        v |= row[j + 1] << (32 - s);
    }
    v & ((1u32 << bits) - 1)
}

impl PackedMatrix {
    /// Packs integer codes `[rows][cols]` with per-group `(scale, zero)` `[rows][groups]`.
    pub fn from_codes(shape: PackedShape, codes: &[u8], scale_zero: &[(f32, f32)]) -> Self {
        assert_eq!(codes.len(), shape.rows * shape.cols);
        assert_eq!(scale_zero.len(), shape.scale_words());
        let wpr = shape.words_per_row();
        let mut words = vec![0u32; shape.code_words()];
        for (r, row) in words.chunks_exact_mut(wpr).enumerate() {
            for (i, &c) in codes[r * shape.cols..(r + 1) * shape.cols]
                .iter()
                .enumerate()
            {
                debug_assert!(c as u32 <= shape.max_code());
                put_code(row, i, shape.bits, c as u32);
            }
        }
        PackedMatrix {
            shape,
            codes: words,
            scales: scale_zero
                .iter()
                .map(|&(s, z)| pack_scale_zero(s, z))
                .collect(),
        }
    }

    pub fn code(&self, r: usize, c: usize) -> u32 {
        let wpr = self.shape.words_per_row();
        get_code(&self.codes[r * wpr..(r + 1) * wpr], c, self.shape.bits)
    }

    /// The f32 matrix these codes mean ("fake quant"): exactly what the GPU kernels compute
    /// per weight, `scale * code + zero` in f32 from the f16 scale and zero.
    pub fn dequantize(&self) -> Vec<f32> {
        let s = self.shape;
        let mut out = vec![0f32; s.rows * s.cols];
        for (r, o) in out.chunks_exact_mut(s.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// `dequantize` split over threads (row-parallel; identical result).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn dequantize_par(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let s = self.shape;
        let mut out = vec![0f32; s.rows * s.cols];
        out.par_chunks_exact_mut(s.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// Row `r` of `dequantize` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let s = self.shape;
        let (wpr, gpr) = (s.words_per_row(), s.groups_per_row());
        let row = &self.codes[r * wpr..(r + 1) * wpr];
        for (c, o) in out[..s.cols].iter_mut().enumerate() {
            let (scale, zero) = unpack_scale_zero(self.scales[r * gpr + c / s.group]);
            *o = scale * get_code(row, c, s.bits) as f32 + zero;
        }
    }

    /// Shard body: codes then scales, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.shape.bytes());
        for w in self.codes.iter().chain(&self.scales) {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(shape: PackedShape, bytes: &[u8], what: &str) -> Result<Self> {
        if bytes.len() != shape.bytes() {
            return Err(Error::format(
                what,
                format!(
                    "{} bytes, expected {} for {shape:?}",
                    bytes.len(),
                    shape.bytes()
                ),
            ));
        }
        let words = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let (codes, scales) = bytes.split_at(4 * shape.code_words());
        let m = PackedMatrix {
            shape,
            codes: words(codes),
            scales: words(scales),
        };
        m.check_scales(what)?;
        Ok(m)
    }

    /// Every group's scale and zero finite, scales >= 0 (what the kernels assume).
    pub fn check_scales(&self, what: &str) -> Result<()> {
        check_grid(&self.scales, what)
    }
}

/// `PackedMatrix::check_scales` on grid words of any layout that holds them (`plane_level`).
pub fn check_grid(scales: &[u32], what: &str) -> Result<()> {
    for (i, &w) in scales.iter().enumerate() {
        let (s, z) = unpack_scale_zero(w);
        if !(s.is_finite() && z.is_finite() && s >= 0.0) {
            return Err(Error::format(
                what,
                format!("group {i} has scale {s}, zero {z}"),
            ));
        }
    }
    Ok(())
}

/// Checks a matrix before quantizing it: finite, and within f16 range so that the f16 scale
/// and zero can represent its groups (a larger value would become an infinite zero point).
pub fn check_quantizable(w: &[f32], what: &str) -> Result<()> {
    check_finite(w, what)?;
    let max = f16::MAX.to_f32();
    match w.iter().position(|v| v.abs() > max) {
        Some(i) => Err(Error::input(format!(
            "{what}: element {i} is {}, outside the f16 range (±{max}) of the packed scale and zero",
            w[i]
        ))),
        None => Ok(()),
    }
}

/// Checks a float matrix before quantizing it; NaN or Inf would otherwise become garbage codes.
pub fn check_finite(w: &[f32], what: &str) -> Result<()> {
    match w.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::input(format!(
            "{what}: element {i} is {} — cannot quantize non-finite weights",
            w[i]
        ))),
        None => Ok(()),
    }
}
