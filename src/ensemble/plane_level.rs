//! One level of a bit-plane module held as its planes (`planes`): what the plane-reading
//! kernels take (`cpu::kernel::matmul_planes`, qlinear.wgsl with planes), and what a step down
//! shortens in place: the `k - 1`-bit level is the first `k - 1` planes and its own grid, so
//! dropping the last plane frees its memory and reads nothing but the lower level's deltas.
//!
//! Planes are held contiguously, `[k][rows][plane_row_words]` (in the file they are
//! interleaved with the lower levels' deltas), and the grid is the level's own `(scale, zero)`
//! f16 pairs, `[rows][groups]`, as in the packed format.

use crate::ensemble::format::{check_grid, get_code, PackedMatrix, PackedShape};
use crate::ensemble::planes::PlaneShape;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct PlaneLevel {
    /// The packed shape of this level (`bits` = the planes held).
    pub shape: PackedShape,
    /// `[bits][rows][plane_row_words]`: plane 0 holds each code's most significant bit, bit
    /// `c % 32` of word `c / 32` of a row being column `c` (padded columns 0).
    pub planes: Vec<u32>,
    /// `pack2x16float(scale, zero)` per group, `[rows][groups]`.
    pub scales: Vec<u32>,
}

/// u32 words of one plane's row: one bit per (padded) column.
pub fn plane_row_words(s: &PackedShape) -> usize {
    s.groups_per_row() * s.group / 32
}

impl PlaneLevel {
    /// u32 words of one plane.
    pub fn plane_words(&self) -> usize {
        self.shape.rows * plane_row_words(&self.shape)
    }

    /// Level `k` of a bit-plane file (`bytes`: the file or a prefix holding level `k`).
    pub fn from_file(shape: &PlaneShape, bytes: &[u8], k: u32, what: &str) -> Result<Self> {
        let packed = shape.level_shape(k)?;
        check_prefix(shape, bytes, k, what)?;
        let pw = shape.plane_words();
        let mut planes = Vec::with_capacity(k as usize * pw);
        for j in 0..k {
            let at = 4 * shape.plane_at(j);
            planes.extend(
                bytes[at..at + 4 * pw]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap())),
            );
        }
        let level = PlaneLevel {
            shape: packed,
            planes,
            scales: shape.level_scales(bytes, k),
        };
        level.check_scales(what)?;
        Ok(level)
    }

    /// This level shortened to lower level `k` of the same file: the last planes dropped (and
    /// their memory freed), the grid replaced by `k`'s. `bytes` needs only `k`'s prefix.
    pub fn step_down(
        &mut self,
        shape: &PlaneShape,
        bytes: &[u8],
        k: u32,
        what: &str,
    ) -> Result<()> {
        let packed = shape.level_shape(k)?;
        if k >= self.shape.bits {
            return Err(Error::input(format!(
                "{what}: a step down from {} bits to {k}",
                self.shape.bits
            )));
        }
        check_prefix(shape, bytes, k, what)?;
        let scales = shape.level_scales(bytes, k);
        let prev = std::mem::replace(&mut self.scales, scales);
        let prev_shape = std::mem::replace(&mut self.shape, packed);
        if let Err(e) = self.check_scales(what) {
            (self.scales, self.shape) = (prev, prev_shape);
            return Err(e);
        }
        self.planes.truncate(k as usize * shape.plane_words());
        self.planes.shrink_to_fit();
        Ok(())
    }

    fn check_scales(&self, what: &str) -> Result<()> {
        check_grid(&self.scales, what)
    }

    /// The planes of a packed matrix (tests, and the kernels' parity checks).
    pub fn from_packed(m: &PackedMatrix) -> Self {
        let s = m.shape;
        let (k, prw, wpr) = (s.bits as usize, plane_row_words(&s), s.words_per_row());
        let pw = s.rows * prw;
        let mut planes = vec![0u32; k * pw];
        for r in 0..s.rows {
            let row = &m.codes[r * wpr..(r + 1) * wpr];
            for c in 0..s.cols {
                let code = get_code(row, c, s.bits);
                for j in 0..k {
                    if code >> (k - 1 - j) & 1 == 1 {
                        planes[j * pw + r * prw + c / 32] |= 1 << (c % 32);
                    }
                }
            }
        }
        PlaneLevel {
            shape: s,
            planes,
            scales: m.scales.clone(),
        }
    }

    /// The same level in the packed format: per block of 32 columns, each plane's bytes
    /// spread to every `k`-th bit by a table and or-ed into the block's `k` words.
    pub fn to_packed(&self) -> PackedMatrix {
        let s = self.shape;
        let (k, prw, wpr) = (s.bits as usize, plane_row_words(&s), s.words_per_row());
        let pw = self.plane_words();
        let spread: Vec<u64> = (0..256u64)
            .map(|v| (0..8).fold(0, |acc, i| acc | ((v >> i) & 1) << (i * k)))
            .collect();
        let mut codes = vec![0u32; s.code_words()];
        for r in 0..s.rows {
            for b in 0..prw {
                // The block's 32 codes, k bits each: k * 32 <= 256 bits, built 8 codes (one
                // byte of every plane word, 8k <= 64 bits) at a time in one u64, then placed.
                let mut block = [0u64; 5];
                for m in 0..4 {
                    let mut seg = 0u64;
                    for j in 0..k {
                        let byte = self.planes[j * pw + r * prw + b] >> (8 * m) & 255;
                        seg |= spread[byte as usize] << (k - 1 - j);
                    }
                    let at = 8 * m * k;
                    block[at / 64] |= seg << (at % 64);
                    if at % 64 != 0 {
                        block[at / 64 + 1] |= seg >> (64 - at % 64);
                    }
                }
                let out = &mut codes[r * wpr + b * k..r * wpr + (b + 1) * k];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = (block[i / 2] >> (32 * (i % 2))) as u32;
                }
            }
        }
        PackedMatrix {
            shape: s,
            codes,
            scales: self.scales.clone(),
        }
    }
}

fn check_prefix(shape: &PlaneShape, bytes: &[u8], k: u32, what: &str) -> Result<()> {
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
    Ok(())
}
