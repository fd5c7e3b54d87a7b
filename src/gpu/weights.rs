//! From CPU `Weights` to what the GPU model holds, and back: RTN module versions for an EQM
//! given as bits per module, and the f32 weights whose CPU forward is exactly what the GPU
//! computes (the parity reference).

use crate::ensemble::base::Base;
use crate::error::Result;
use crate::model::weights::{Linear, ModuleId, Weights};
use crate::quant::format::PackedMatrix;
use crate::quant::rtn::quantize_rtn;

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

/// The weights the GPU model computes with: `modules` dequantized ("fake quant") and the
/// base (embedding and head at 8 bits, `Base::from_weights` with the modules' group) as its
/// codes mean, everything else as in `w`. The CPU forward of these is the GPU's reference up
/// to f32 rounding.
pub fn reference_weights(w: &Weights, modules: &[PackedMatrix]) -> Result<Weights> {
    let mut r = w.clone();
    for (i, m) in modules.iter().enumerate() {
        r.modules[i] = Linear::new(m.shape.rows, m.shape.cols, m.dequantize());
    }
    let group = modules.first().map_or(64, |m| m.shape.group);
    Base::from_weights(w, group)?.apply_to(&mut r);
    Ok(r)
}
