//! Round-to-nearest quantization and the per-group quantizer both RTN and GPTQ use.

use crate::ensemble::format::{
    check_quantizable, pack_scale_zero, unpack_scale_zero, PackedMatrix, PackedShape,
};
use crate::error::Result;

/// Range shrink factors tried by the clipping search: clipping a few outliers often lowers
/// the squared error of the whole group at low bit-widths.
const CLIP_GRID: [f32; 6] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75];

/// `(scale, zero)` of one group, already rounded to f16 (what the packed format stores), so
/// codes chosen with them reproduce exactly what the kernels decode.
pub fn group_params(vals: &[f32], maxq: u32, clip_search: bool) -> (f32, f32) {
    let lo = vals.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let grid: &[f32] = if clip_search {
        &CLIP_GRID
    } else {
        &CLIP_GRID[..1]
    };
    let mut best = (f32::INFINITY, (0.0, 0.0));
    for &f in grid {
        let (a, b) = (lo * f, hi * f);
        let (a, b) = (a.min(0.0).max(lo).min(a), b);
        let p = rounded(a, b, maxq);
        let err: f32 = vals
            .iter()
            .map(|&v| {
                let d = dequant(quant(v, p, maxq), p) - v;
                d * d
            })
            .sum();
        if err < best.0 {
            best = (err, p);
        }
    }
    best.1
}

fn rounded(lo: f32, hi: f32, maxq: u32) -> (f32, f32) {
    let scale = ((hi - lo) / maxq as f32).max(0.0);
    unpack_scale_zero(pack_scale_zero(scale, lo))
}

pub fn quant(v: f32, (scale, zero): (f32, f32), maxq: u32) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    ((v - zero) / scale).round().clamp(0.0, maxq as f32) as u8
}

pub fn dequant(q: u8, (scale, zero): (f32, f32)) -> f32 {
    scale * q as f32 + zero
}

/// RTN: each group quantized independently.
pub fn quantize_rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
    clip_search: bool,
    what: &str,
) -> Result<PackedMatrix> {
    let shape = PackedShape::new(rows, cols, bits, group)?;
    check_quantizable(w, what)?;
    let (maxq, gpr) = (shape.max_code(), shape.groups_per_row());
    let mut codes = vec![0u8; rows * cols];
    let mut params = vec![(0f32, 0f32); rows * gpr];
    type Row<'a> = (usize, (&'a mut [u8], &'a mut [(f32, f32)]));
    let row = |(r, (codes, params)): Row| {
        for (g, p) in params.iter_mut().enumerate() {
            let (c0, c1) = (g * group, ((g + 1) * group).min(cols));
            let vals = &w[r * cols + c0..r * cols + c1];
            *p = group_params(vals, maxq, clip_search);
            for (code, &v) in codes[c0..c1].iter_mut().zip(vals) {
                *code = quant(v, *p, maxq);
            }
        }
    };
    // Rows are independent: split them over threads where there are threads.
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        codes
            .par_chunks_mut(cols)
            .zip(params.par_chunks_mut(gpr))
            .enumerate()
            .for_each(row);
    }
    #[cfg(target_arch = "wasm32")]
    codes
        .chunks_mut(cols)
        .zip(params.chunks_mut(gpr))
        .enumerate()
        .for_each(row);
    Ok(PackedMatrix::from_codes(shape, &codes, &params))
}
