//! Elastic Quantization Models: one bit-width per module, evaluated on the CPU by pulling each
//! module's version out of the library ("fake quant": the dequantized f32 of exactly the packed
//! codes the GPU would read).
//!
//! Base precision: the embedding (which is also the head when tied, as in the demo model) is
//! stored at `BASE_BITS` = 8 bits in the same packed format as the modules (group = the
//! library's group), so the GPU's dequantizing matmul serves the logits too; an untied head is
//! stored the same way; norms stay f32. Every EQM (and every footprint) includes this base.
//! 8-bit rather than f16 because the embedding is 21% of the demo model's weights: at f16 it
//! would be larger than all 210 modules at 3 bits, flattening the footprint range the
//! elastic trajectory can span, while 8 bits is near-lossless (the demo model's source
//! embedding is itself 8-bit Q8_0).
//!
//! Dequantized modules are cached (shared `Arc`s), so building the `Weights` of another EQM
//! costs only the modules not seen before, and EQM evaluation runs at the float model's speed.

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::weights::{Layout, Linear, ModuleId, Weights};
use crate::quant::library::Library;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

pub use crate::ensemble::base::BASE_BITS;

/// An EQM: `bits[ModuleId::index()]` for every module.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Eqm {
    pub bits: Vec<u32>,
}

impl Eqm {
    /// Every module at `bits` (a static quantized model, QM(bits) in the paper).
    pub fn uniform(modules: usize, bits: u32) -> Self {
        Eqm {
            bits: vec![bits; modules],
        }
    }
    pub fn get(&self, id: ModuleId) -> u32 {
        self.bits[id.index()]
    }
    pub fn set(&mut self, id: ModuleId, bits: u32) {
        self.bits[id.index()] = bits;
    }
    pub fn module_ids(&self) -> impl Iterator<Item = ModuleId> {
        (0..self.bits.len()).map(ModuleId::from_index)
    }
}

/// Bytes of the base (embedding and untied head at `BASE_BITS`, norms f32) for `group`.
pub fn base_bytes(c: &LlamaConfig, group: usize) -> usize {
    crate::ensemble::base::base_bytes(c, group).unwrap_or(0)
}

/// `w` with the embedding (and an untied head) rounded to the base precision: what every
/// EQM runs with.
pub fn with_base_precision(w: &Weights, group: usize) -> Result<Weights> {
    let mut base = w.clone();
    crate::quant::weights::rtn_base(w, group)?.apply_to(&mut base);
    Ok(base)
}

/// Bytes of the unquantized model stored as f16 (the "float" row of the static table).
pub fn f16_bytes(c: &LlamaConfig) -> usize {
    2 * c.param_count()
}

/// How an EQM's matrices are laid out: every use runs many tokens at once (perplexities).
const EVAL_LAYOUT: Layout = Layout::Columns;

/// A library together with the model's base weights: makes the `Weights` of any EQM.
pub struct EqmModel {
    pub library: Library,
    /// The float weights with the embedding (and head) at base precision; modules are float
    /// until replaced per EQM.
    base: Weights,
    cache: Mutex<HashMap<(usize, u32), Linear>>,
}

impl EqmModel {
    /// `weights` must be the float model the library was built from (`model_sha256` of it).
    pub fn new(library: Library, weights: &Weights, model_sha256: &str) -> Result<Self> {
        let info = &library.manifest.model;
        if info.sha256 != model_sha256 || info.config != weights.config {
            return Err(Error::input(format!(
                "{}: the library was built from {} (sha256 {}), not this model (sha256 {model_sha256})",
                library.dir.display(),
                info.source,
                info.sha256
            )));
        }
        let mut base = with_base_precision(weights, library.manifest.group)?;
        // The head in the evaluator's layout (a tied one copied out of the embedding).
        let head = match &base.lm_head {
            Some(h) => h.clone(),
            None => Linear {
                rows: base.config.vocab_size,
                cols: base.config.hidden_size,
                w: base.embed.clone(),
                layout: Layout::Rows,
            },
        };
        base.lm_head = Some(head.in_layout(EVAL_LAYOUT));
        Ok(EqmModel {
            library,
            base,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn modules(&self) -> usize {
        self.library.module_count()
    }

    pub fn uniform(&self, bits: u32) -> Eqm {
        Eqm::uniform(self.modules(), bits)
    }

    pub fn base_bytes(&self) -> usize {
        base_bytes(&self.base.config, self.library.manifest.group)
    }

    /// Exact footprint of an EQM: base plus each module's packed version.
    pub fn footprint(&self, eqm: &Eqm) -> Result<usize> {
        let mut total = self.base_bytes();
        for id in eqm.module_ids() {
            total += self.library.version(id, eqm.get(id))?.bytes;
        }
        Ok(total)
    }

    fn check(&self, eqm: &Eqm) -> Result<()> {
        if eqm.bits.len() != self.modules() {
            return Err(Error::input(format!(
                "EQM has {} modules, the model has {}",
                eqm.bits.len(),
                self.modules()
            )));
        }
        for id in eqm.module_ids() {
            self.library.version(id, eqm.get(id))?;
        }
        Ok(())
    }

    /// The f32 weights of `eqm` (dequantizing, in parallel, only modules not cached yet).
    pub fn weights(&self, eqm: &Eqm) -> Result<Weights> {
        self.check(eqm)?;
        let missing: Vec<(usize, u32)> = {
            let cache = self.cache.lock().unwrap();
            let mut m: Vec<_> = eqm
                .bits
                .iter()
                .enumerate()
                .map(|(i, &b)| (i, b))
                .filter(|k| !cache.contains_key(k))
                .collect();
            m.dedup();
            m
        };
        let loaded: Vec<((usize, u32), Linear)> = missing
            .par_iter()
            .map(|&(i, b)| {
                let p = self.library.load(ModuleId::from_index(i), b)?;
                let lin = Linear::new(p.shape.rows, p.shape.cols, p.dequantize_par())
                    .in_layout(EVAL_LAYOUT);
                Ok(((i, b), lin))
            })
            .collect::<Result<_>>()?;
        let mut cache = self.cache.lock().unwrap();
        cache.extend(loaded);
        let mut w = self.base.clone();
        for (i, &b) in eqm.bits.iter().enumerate() {
            w.modules[i] = cache[&(i, b)].clone();
        }
        Ok(w)
    }

    /// Drops the dequantized modules (about 4 bytes per weight per bit-width used).
    pub fn clear_cache(&self) {
        self.cache.lock().unwrap().clear();
    }
}
