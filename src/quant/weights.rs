//! From CPU `Weights` to what a backend holds, and back: the ensemble's base (the one place it
//! is quantized), RTN module versions for an EQM given as bits per module, and the f32 weights
//! whose CPU forward is exactly what the GPU computes (the parity reference).

use crate::ensemble::base::{Base, BASE_BITS};
use crate::ensemble::format::PackedMatrix;
use crate::error::Result;
use crate::gpu::{Gpu, GpuError, GpuResult, Model, ModelOptions};
use crate::model::weights::{Linear, ModuleId, Weights};
use crate::quant::rtn::quantize_rtn;
use std::sync::Arc;

/// The base of `w`: embedding and untied head quantized with RTN at `BASE_BITS` and `group`
/// columns per group (the one place this happens: the ensemble's base shard, the builder's EQM
/// evaluation and the GPU model all use it), norms as they are.
pub fn rtn_base(w: &Weights, group: usize) -> Result<Base> {
    let c = &w.config;
    let embed = quantize_rtn(
        &w.embed,
        c.vocab_size,
        c.hidden_size,
        BASE_BITS,
        group,
        false,
        "embedding",
    )?;
    let lm_head = match &w.lm_head {
        Some(h) => Some(quantize_rtn(
            &h.w, h.rows, h.cols, BASE_BITS, group, false, "lm_head",
        )?),
        None => None,
    };
    Ok(Base {
        embed,
        norms: w.norms.clone(),
        final_norm: w.final_norm.clone(),
        lm_head,
    })
}

/// The GPU model of `modules` (one packed version per module) with the base made from `w`
/// (`rtn_base`, the group of the first module); `w`'s f32 modules are not used.
pub async fn gpu_model(
    gpu: Arc<Gpu>,
    w: &Weights,
    modules: &[PackedMatrix],
    opts: ModelOptions,
) -> GpuResult<Model> {
    let group = modules.first().map_or(64, |m| m.shape.group);
    let base = rtn_base(w, group).map_err(|e| GpuError::Input(e.to_string()))?;
    Model::from_base(gpu, &w.config, &base, modules, opts).await
}

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
    use rayon::prelude::*;
    ids.par_iter().map(|&id| one(id)).collect()
}

/// The weights the GPU model computes with: `modules` dequantized ("fake quant") and the
/// base (embedding and head at 8 bits, `rtn_base` with the modules' group) as its
/// codes mean, everything else as in `w`. The CPU forward of these is the GPU's reference up
/// to f32 rounding.
pub fn reference_weights(w: &Weights, modules: &[PackedMatrix]) -> Result<Weights> {
    let mut r = w.clone();
    for (i, m) in modules.iter().enumerate() {
        r.modules[i] = Linear::new(m.shape.rows, m.shape.cols, m.dequantize());
    }
    let group = modules.first().map_or(64, |m| m.shape.group);
    rtn_base(w, group)?.apply_to(&mut r);
    Ok(r)
}
