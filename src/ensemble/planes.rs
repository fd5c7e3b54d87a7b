//! The bit-plane layout of a nested module (`quant::nested`): every level's codes are the top
//! bits of the highest level's, so one file holds them all, and a `k`-bit level is a prefix of
//! its bytes.
//!
//! Plane `j` holds bit `top - 1 - j` of every code (plane 0 the most significant), one bit per
//! column, in rows of `groups * group / 32` u32 words (LSB first, padded columns 0): `k`
//! planes are exactly as many bytes as the `k`-bit packed codes.
//!
//! Each level has its own per-group `(scale, zero)`. The top level's are f16 pairs
//! (`pack2x16float`, `[rows][groups]`, as in `format`). A lower level's are stored relative to
//! the top level's grid coarsened by `2^shift` (scale `s · 2^shift`, zero at the middle of the
//! merged bins): the scale times `1 + ds/128` and the zero moved by `dz/64` coarse steps
//! (`level_params`). A level 1 or 2 bits below the top stores `ds` and `dz` as two signed
//! bytes per group; a level further down as one byte, two signed nibbles counting 4 units each
//! (`narrow`: the scale within 0.75..1.22x, the zero within -0.5..0.44 coarse steps). Exact
//! f32 arithmetic, then f16 rounding, so every platform decodes the same parameters. With
//! groups of 64 a lower level adds 0.25 or 0.125 bit per weight (an 8 -> 2 module stores its
//! five lower grids in 0.75 bit instead of 1.25). Measured (README): one byte lost nothing
//! at 3 or more bits below the top, but 8-9% output error 1 and 2 bits below.
//!
//! Manifest version 3 stored two bytes for every lower level; version 4 as above, and plane
//! files of version 3 are refused with a message to rebuild (`manifest::PLANES_VERSION`).
//!
//! File layout, levels ascending (`levels = [2, 3, 4]` for a 4 -> 2 span):
//!
//! ```text
//! scales of the top level
//! planes 0 .. levels[0]          deltas of levels[0]   (1 or 2 bytes per group, padded to a word)
//! planes levels[0] .. levels[1]  deltas of levels[1]
//! ...
//! planes .. top
//! ```
//!
//! so the bytes of level `k` are the prefix up to its deltas (`PlaneShape::prefix_bytes`): a
//! step down drops the tail, a step up reads the next segment. All little-endian.

use crate::ensemble::format::{
    get_code, pack_scale_zero, unpack_scale_zero, PackedMatrix, PackedShape,
};
use crate::ensemble::plane_level::PlaneLevel;
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

    /// u32 words of lower level `k`'s deltas (`delta_bytes` per group, padded to a word).
    pub fn delta_words(&self, k: u32) -> usize {
        (self.rows * self.groups_per_row() * delta_bytes(self.top() - k)).div_ceil(4)
    }

    /// Delta words of the lower levels below `k` (`inclusive`: and `k` itself if it is not the
    /// top).
    fn lower_up_to(&self, k: u32, inclusive: bool) -> usize {
        let top = self.top();
        self.levels
            .iter()
            .filter(|&&l| l != top && (l < k || (inclusive && l == k)))
            .map(|&l| self.delta_words(l))
            .sum()
    }

    /// Bytes of the file prefix that holds level `k`: the top level's scales, `k` planes and
    /// the deltas of every lower level up to `k`.
    pub fn prefix_bytes(&self, k: u32) -> Result<usize> {
        self.check_level(k)?;
        Ok(4 * (self.scale_words() + k as usize * self.plane_words() + self.lower_up_to(k, true)))
    }

    /// Bytes of the whole file (the top level's prefix).
    pub fn bytes(&self) -> usize {
        self.prefix_bytes(self.top())
            .expect("the top level is stored")
    }

    /// Word offset of plane `j`.
    pub(crate) fn plane_at(&self, j: u32) -> usize {
        // Plane j follows planes 0..j and the deltas of every lower level l <= j.
        self.scale_words() + j as usize * self.plane_words() + self.lower_up_to(j + 1, false)
    }

    /// Level `k`'s `(scale, zero)` words, `[rows][groups]`: the top level's as stored, a lower
    /// level's from its deltas (`level_params`). `bytes` must hold `k`'s prefix.
    pub(crate) fn level_scales(&self, bytes: &[u8], k: u32) -> Vec<u32> {
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let top = self.top();
        if k == top {
            return (0..self.scale_words()).map(word).collect();
        }
        let d0 = 4 * self.deltas_at(k);
        (0..self.scale_words())
            .map(|i| {
                let d = match delta_bytes(top - k) {
                    1 => widen(bytes[d0 + i]),
                    _ => u16::from_le_bytes([bytes[d0 + 2 * i], bytes[d0 + 2 * i + 1]]),
                };
                let (s, z) = level_params(unpack_scale_zero(word(i)), top - k, d);
                pack_scale_zero(s, z)
            })
            .collect()
    }

    /// Word offset of lower level `k`'s deltas (right after its last plane).
    fn deltas_at(&self, k: u32) -> usize {
        self.scale_words() + k as usize * self.plane_words() + self.lower_up_to(k, false)
    }
}

/// The top level's grid `(scale, zero)` coarsened by `2^shift`: scale times `2^shift`, zero at
/// the middle of the merged bins (unrounded f32; what a lower level's delta is relative to).
pub fn coarse_grid((s, z): (f32, f32), shift: u32) -> (f32, f32) {
    let m = (1u32 << shift) as f32;
    (s * m, z + s * ((m - 1.0) / 2.0))
}

/// Bytes per group of a lower level's delta `shift` bits below the top: 2 up to 2 bits below,
/// then 1 (`narrow`).
pub fn delta_bytes(shift: u32) -> usize {
    if shift <= 2 {
        2
    } else {
        1
    }
}

/// A delta `ds | dz << 8` (i8 each) from its two fields, clamped.
pub fn delta(ds: i32, dz: i32) -> u16 {
    (ds.clamp(-128, 127) as i8 as u8 as u16) | ((dz.clamp(-128, 127) as i8 as u8 as u16) << 8)
}

/// The one-byte form of a delta: `ds/4` and `dz/4` as signed nibbles (low, high), when both
/// fields are multiples of 4 within -32..=28.
pub fn narrow(d: u16) -> Option<u8> {
    let field = |x: u8| {
        let v = x as i8 as i32;
        (v % 4 == 0 && (-32..=28).contains(&v)).then_some((v / 4) as u8 & 15)
    };
    Some(field(d as u8)? | field((d >> 8) as u8)? << 4)
}

/// The delta a one-byte form stands for.
pub fn widen(b: u8) -> u16 {
    let nibble = |x: u8| ((x << 4) as i8 >> 4) as i32 * 4;
    delta(nibble(b & 15), nibble(b >> 4))
}

/// The `(scale, zero)` of a level `shift` bits below the top, from the top level's `(scale,
/// zero)` and the delta `d` (`ds` in the low byte, `dz` in the high byte, both i8): the
/// coarsened grid, scale times `1 + ds/128`, zero moved by `dz/64` coarse steps, rounded to
/// f16. `d = 0` is the coarsened grid itself.
pub fn level_params(top: (f32, f32), shift: u32, d: u16) -> (f32, f32) {
    let (cs, cz) = coarse_grid(top, shift);
    let (ds, dz) = (d as u8 as i8 as f32, (d >> 8) as u8 as i8 as f32);
    let scale = cs * (1.0 + ds / 128.0);
    let zero = cz + cs * (dz / 64.0);
    unpack_scale_zero(pack_scale_zero(scale, zero))
}

/// The delta, storable `shift` bits below the top (`delta_bytes`), that `level_params` turns
/// into `want` (the f16 pair exactly), if there is one.
pub fn level_delta(top: (f32, f32), shift: u32, want: (f32, f32)) -> Option<u16> {
    let (cs, cz) = coarse_grid(top, shift);
    let step = if delta_bytes(shift) == 1 { 4 } else { 1 };
    let guess = |x: f32| {
        if x.is_finite() {
            (x / step as f32).round().clamp(-128.0, 127.0) as i32 * step
        } else {
            0
        }
    };
    let (gs, gz) = if cs > 0.0 {
        (
            guess((want.0 / cs - 1.0) * 128.0),
            guess((want.1 - cz) / cs * 64.0),
        )
    } else {
        (0, 0)
    };
    let target = pack_scale_zero(want.0, want.1);
    let near = |g: i32| {
        (-2..=2)
            .map(move |i| g + i * step)
            .filter(|v| (-128..=127).contains(v))
    };
    for ds in near(gs) {
        for dz in near(gz) {
            let d = delta(ds, dz);
            if step == 4 && narrow(d).is_none() {
                continue;
            }
            let p = level_params(top, shift, d);
            if pack_scale_zero(p.0, p.1) == target {
                return Some(d);
            }
        }
    }
    None
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

/// The bit-plane file of nested `levels` (one module, any order): `check_nested` must hold,
/// and every lower level's `(scale, zero)` must be expressible relative to the top level's
/// (`level_delta`; `quant::nested` makes them so).
pub fn encode(levels: &[&PackedMatrix], what: &str) -> Result<(PlaneShape, Vec<u8>)> {
    check_nested(levels, what)?;
    let mut sorted: Vec<&PackedMatrix> = levels.to_vec();
    sorted.sort_by_key(|m| m.shape.bits);
    let Some(&top) = sorted.last() else {
        return Err(Error::input(format!("{what}: no levels to store")));
    };
    let bits: Vec<u32> = sorted.iter().map(|m| m.shape.bits).collect();
    let shape = PlaneShape::new(top.shape.rows, top.shape.cols, top.shape.group, &bits)?;
    let t = top.shape.bits;
    // The top level's planes, contiguous (`[t][rows][plane_row_words]`); the file interleaves
    // the lower levels' deltas between them.
    let planes = PlaneLevel::from_packed(top).planes;
    let mut out: Vec<u8> = Vec::with_capacity(shape.bytes());
    out.extend(top.scales.iter().flat_map(|w| w.to_le_bytes()));
    let mut done = 0usize;
    for m in &sorted {
        let k = m.shape.bits as usize;
        let words = &planes[done * shape.plane_words()..k * shape.plane_words()];
        out.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        done = k;
        if m.shape.bits == t {
            continue;
        }
        let shift = t - m.shape.bits;
        let mut deltas = Vec::with_capacity(4 * shape.delta_words(m.shape.bits));
        for (i, (&tw, &lw)) in top.scales.iter().zip(&m.scales).enumerate() {
            let d = level_delta(unpack_scale_zero(tw), shift, unpack_scale_zero(lw)).ok_or_else(
                || {
                    Error::format(
                        what,
                        format!(
                            "{}-bit level, group {i}: its scale and zero are not expressible \
                             relative to the {t}-bit level's",
                            m.shape.bits
                        ),
                    )
                },
            )?;
            match narrow(d) {
                Some(b) if delta_bytes(shift) == 1 => deltas.push(b),
                _ => deltas.extend(d.to_le_bytes()),
            }
        }
        deltas.resize(4 * shape.delta_words(m.shape.bits), 0);
        out.extend(deltas);
    }
    debug_assert_eq!(out.len(), shape.bytes());
    Ok((shape, out))
}

/// Level `k` of a bit-plane file, in the packed format the engines read. `bytes` may be the
/// whole file or any prefix that holds level `k` (`PlaneShape::prefix_bytes`).
pub fn decode_level(shape: &PlaneShape, bytes: &[u8], k: u32, what: &str) -> Result<PackedMatrix> {
    Ok(PlaneLevel::from_file(shape, bytes, k, what)?.to_packed())
}
