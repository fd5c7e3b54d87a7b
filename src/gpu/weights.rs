//! From CPU `Weights` to what the GPU model holds, and back: RTN module versions for an EQM
//! given as bits per module, the f16 base tensors, and the f32 weights whose CPU forward is
//! exactly what the GPU computes (the parity reference).

use crate::error::Result;
use crate::model::weights::{Linear, ModuleId, Weights};
use crate::quant::format::PackedMatrix;
use crate::quant::rtn::quantize_rtn;
use half::f16;

/// Quantizes every module with RTN at `bits(id)` and `group` columns per group: the GPU model
/// of an EQM before the quantization library (GPTQ versions) is available.
pub fn rtn_modules(
    w: &Weights,
    bits: impl Fn(ModuleId) -> u32 + Sync,
    group: usize,
) -> Result<Vec<PackedMatrix>> {
    let one = |id: ModuleId| {
        let m = w.module(id);
        quantize_rtn(
            &m.w,
            m.rows,
            m.cols,
            bits(id),
            group,
            false,
            &id.to_string(),
        )
    };
    let ids: Vec<ModuleId> = w.module_ids().collect();
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        ids.par_iter().map(|&id| one(id)).collect()
    }
    #[cfg(target_arch = "wasm32")]
    ids.iter().map(|&id| one(id)).collect()
}

/// f32 values as f16 pairs in u32 words (`pack2x16float` order: element 2i in the low half).
pub fn f16_pairs(v: &[f32]) -> Vec<u32> {
    v.chunks(2)
        .map(|p| {
            let lo = f16::from_f32(p[0]).to_bits() as u32;
            let hi = p.get(1).map_or(0, |x| f16::from_f32(*x).to_bits() as u32);
            lo | hi << 16
        })
        .collect()
}

fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| f16::from_f32(*x).to_f32()).collect()
}

/// The weights the GPU model computes with: `modules` dequantized ("fake quant") and the
/// embedding and head rounded to f16, everything else as in `w`. The CPU forward of these is
/// the GPU's reference up to f32 rounding.
pub fn reference_weights(w: &Weights, modules: &[PackedMatrix]) -> Weights {
    let mut r = w.clone();
    for (i, m) in modules.iter().enumerate() {
        r.modules[i] = Linear::new(m.shape.rows, m.shape.cols, m.dequantize());
    }
    r.embed = round_f16(&w.embed).into();
    if let Some(h) = &w.lm_head {
        r.lm_head = Some(Linear::new(h.rows, h.cols, round_f16(&h.w)));
    }
    r
}
