//! The bit-plane layout of a nested module (`quant::nested`): every level's codes are the top
//! bits of the highest level's, so one file holds them all, and a `k`-bit level is a prefix of
//! its bytes.
//!
//! Plane `j` holds bit `top - 1 - j` of every code (plane 0 the most significant), one bit per
//! column, in rows of `groups * group / 32` u32 words (LSB first, padded columns 0): `k`
//! planes are exactly as many bytes as the `k`-bit packed codes. Each level has its own
//! per-group `(scale, zero)` (`pack2x16float`, `[rows][groups]`, as in `format`).
//!
//! File layout, levels ascending (`levels = [2, 3, 4]` for a 4 -> 2 span):
//!
//! ```text
//! planes 0 .. levels[0]        scales of levels[0]
//! planes levels[0] .. levels[1] scales of levels[1]
//! ...
//! planes .. top                scales of top
//! ```
//!
//! so the bytes of level `k` are the prefix up to its scales (`PlaneShape::prefix_bytes`): a
//! step down drops the tail, a step up reads the next segment. All little-endian.

use crate::ensemble::format::{get_code, PackedMatrix, PackedShape};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlaneShape {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// The bit-widths stored, ascending; the last is the top level.
    pub levels: Vec<u32>,
}

impl PlaneShape {
    pub fn new(rows: usize, cols: usize, group: usize, levels: &[u32]) -> Result<Self> {
        if levels.is_empty() || levels.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::input(format!(
                "bit-plane levels {levels:?} must be distinct and ascending"
            )));
        }
        for &b in levels {
            // Validates rows, cols, group and the bit-width as the packed format does.
            PackedShape::new(rows, cols, b, group)?;
        }
        Ok(PlaneShape {
            rows,
            cols,
            group,
            levels: levels.to_vec(),
        })
    }

    pub fn top(&self) -> u32 {
        *self.levels.last().expect("levels are not empty")
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    /// u32 words of one plane's row.
    pub fn plane_row_words(&self) -> usize {
        self.groups_per_row() * self.group / 32
    }

    pub fn plane_words(&self) -> usize {
        self.rows * self.plane_row_words()
    }

    pub fn scale_words(&self) -> usize {
        self.rows * self.groups_per_row()
    }

    /// The packed shape of level `k`.
    pub fn level_shape(&self, k: u32) -> Result<PackedShape> {
        self.check_level(k)?;
        PackedShape::new(self.rows, self.cols, k, self.group)
    }

    fn check_level(&self, k: u32) -> Result<()> {
        if self.levels.contains(&k) {
            Ok(())
        } else {
            Err(Error::input(format!(
                "{k}-bit level is not stored (levels {:?})",
                self.levels
            )))
        }
    }

    /// Bytes of the file prefix that holds level `k`: its `k` planes and the scales of every
    /// level up to it.
    pub fn prefix_bytes(&self, k: u32) -> Result<usize> {
        self.check_level(k)?;
        let below = self.levels.iter().filter(|&&l| l <= k).count();
        Ok(4 * (k as usize * self.plane_words() + below * self.scale_words()))
    }

    /// Bytes of the whole file (the top level's prefix).
    pub fn bytes(&self) -> usize {
        self.prefix_bytes(self.top())
            .expect("the top level is stored")
    }

    /// Byte offset of level `k`'s scales.
    fn scales_at(&self, k: u32) -> usize {
        self.prefix_bytes(k).expect("checked level") - 4 * self.scale_words()
    }
}

/// Checks that `levels` (one module, any order) nest: every level's code is the top bits of
/// the highest level's, at every weight, with the same rows, columns and group. Names the
/// first weight that is not.
pub fn check_nested(levels: &[&PackedMatrix], what: &str) -> Result<()> {
    let Some(top) = levels.iter().max_by_key(|m| m.shape.bits) else {
        return Ok(());
    };
    let s = top.shape;
    let (twpr, twords) = (s.words_per_row(), &top.codes);
    for m in levels {
        if (m.shape.rows, m.shape.cols, m.shape.group) != (s.rows, s.cols, s.group) {
            return Err(Error::format(
                what,
                format!(
                    "{}-bit level has another shape than the top level",
                    m.shape.bits
                ),
            ));
        }
        let (shift, wpr) = (s.bits - m.shape.bits, m.shape.words_per_row());
        for r in 0..s.rows {
            let (row, trow) = (
                &m.codes[r * wpr..(r + 1) * wpr],
                &twords[r * twpr..(r + 1) * twpr],
            );
            for c in 0..s.cols {
                if get_code(row, c, m.shape.bits) != get_code(trow, c, s.bits) >> shift {
                    return Err(Error::format(
                        what,
                        format!(
                            "{}-bit code at row {r}, column {c} is not the top bits of the \
                             {}-bit code",
                            m.shape.bits, s.bits
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The bit-plane file of nested `levels` (one module, any order; `check_nested` must hold).
pub fn encode(levels: &[&PackedMatrix], what: &str) -> Result<(PlaneShape, Vec<u8>)> {
    check_nested(levels, what)?;
    let mut sorted: Vec<&PackedMatrix> = levels.to_vec();
    sorted.sort_by_key(|m| m.shape.bits);
    let Some(top) = sorted.last() else {
        return Err(Error::input(format!("{what}: no levels to store")));
    };
    let bits: Vec<u32> = sorted.iter().map(|m| m.shape.bits).collect();
    let shape = PlaneShape::new(top.shape.rows, top.shape.cols, top.shape.group, &bits)?;
    let (t, prw) = (top.shape.bits, shape.plane_row_words());
    let mut planes = vec![0u32; t as usize * shape.plane_words()];
    let twpr = top.shape.words_per_row();
    for r in 0..shape.rows {
        let trow = &top.codes[r * twpr..(r + 1) * twpr];
        for c in 0..shape.cols {
            let code = get_code(trow, c, t);
            for j in 0..t as usize {
                if code >> (t as usize - 1 - j) & 1 == 1 {
                    planes[j * shape.plane_words() + r * prw + c / 32] |= 1 << (c % 32);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(shape.bytes());
    let mut done = 0usize;
    for m in &sorted {
        let k = m.shape.bits as usize;
        let words = &planes[done * shape.plane_words()..k * shape.plane_words()];
        out.extend(words.iter().chain(&m.scales).flat_map(|w| w.to_le_bytes()));
        done = k;
    }
    debug_assert_eq!(out.len(), shape.bytes());
    Ok((shape, out))
}

/// Level `k` of a bit-plane file, in the packed format the engines read. `bytes` may be the
/// whole file or any prefix that holds level `k` (`PlaneShape::prefix_bytes`).
pub fn decode_level(shape: &PlaneShape, bytes: &[u8], k: u32, what: &str) -> Result<PackedMatrix> {
    let ps = shape.level_shape(k)?;
    let need = shape.prefix_bytes(k)?;
    if bytes.len() < need {
        return Err(Error::format(
            what,
            format!(
                "{} bytes, the {k}-bit level needs the first {need}",
                bytes.len()
            ),
        ));
    }
    let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    // Plane j starts after the planes before it and the scales of every level below it.
    let mut plane_at = Vec::with_capacity(k as usize);
    let mut offset = 0usize;
    for j in 0..k {
        plane_at.push(offset / 4);
        offset += 4 * shape.plane_words();
        if shape.levels.contains(&(j + 1)) && j + 1 < k {
            offset += 4 * shape.scale_words();
        }
    }
    let (prw, wpr) = (shape.plane_row_words(), ps.words_per_row());
    let mut codes = vec![0u32; ps.code_words()];
    for r in 0..shape.rows {
        let row = &mut codes[r * wpr..(r + 1) * wpr];
        for w in 0..prw {
            let bitsets: Vec<u32> = plane_at.iter().map(|&p| word(p + r * prw + w)).collect();
            for i in 0..32 {
                let code = bitsets
                    .iter()
                    .fold(0u32, |acc, &b| (acc << 1) | (b >> i & 1));
                let bit = (w * 32 + i) * k as usize;
                let (j, s) = (bit / 32, (bit % 32) as u32);
                row[j] |= code << s;
                if s + k > 32 {
                    row[j + 1] |= code >> (32 - s);
                }
            }
        }
    }
    let s0 = shape.scales_at(k) / 4;
    let scales: Vec<u32> = (0..shape.scale_words()).map(|i| word(s0 + i)).collect();
    let packed = PackedMatrix {
        shape: ps,
        codes,
        scales,
    };
    packed.check_scales(what)?;
    Ok(packed)
}
