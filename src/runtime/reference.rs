//! The CPU reference as a backend: the f32 forward (`model::forward`) over the weights an EQM's
//! codes mean ("fake quant"), so it runs exactly the model every other backend is checked
//! against, and evaluates any EQM of a built ensemble. Slow and memory-hungry (f32 weights):
//! the yardstick, not the product.

use crate::ensemble::base::{base_bytes, to_linear, Base};
use crate::ensemble::format::PackedMatrix;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::forward::{self, KvCache};
use crate::model::weights::{ModuleId, Weights};
use crate::runtime::backend::{Backend, Factory};
use crate::runtime::generate::{check_watch, top_k, with_watched};
use std::sync::Arc;

pub use crate::runtime::generate::TOP_K;

pub struct Reference {
    pub weights: Weights,
    cache: KvCache,
    /// Bits per module (32: a float module, as in the unquantized model).
    bits: Vec<u32>,
    /// Bytes of what this model stands for as shipped: packed modules and base (f32 for a
    /// float model), so that budgets mean the same on every backend; the f32 copy it computes
    /// with is not counted.
    weight_bytes: Vec<u64>,
    base_bytes: u64,
    top_k: usize,
    watched: Vec<u32>,
    /// `Backend::log_z` of the last `step`.
    log_z: f32,
}

impl Reference {
    /// The model `weights` as they are (a float model: `eqm_bits` reports 32) with a KV cache of
    /// `context` positions.
    pub fn new(weights: Weights, context: usize) -> Self {
        let cache = KvCache::new(&weights, context);
        let bits = vec![32; weights.modules.len()];
        let weight_bytes = weights
            .modules
            .iter()
            .map(|m| 4 * m.w.len() as u64)
            .collect();
        let w = &weights;
        let base_floats = w.embed.len()
            + w.lm_head.as_ref().map_or(0, |h| h.w.len())
            + w.norms.len() * 2 * w.config.hidden_size
            + w.final_norm.len();
        Reference {
            base_bytes: 4 * base_floats as u64,
            weights,
            cache,
            bits,
            weight_bytes,
            top_k: TOP_K,
            watched: Vec::new(),
            log_z: f32::NAN,
        }
    }

    /// The EQM of `base` and `modules`.
    pub fn from_base(
        config: &LlamaConfig,
        base: &Base,
        modules: &[PackedMatrix],
        context: usize,
    ) -> Self {
        let mut r = Self::new(base.to_weights(config, modules), context);
        r.bits = modules.iter().map(|m| m.shape.bits).collect();
        r.weight_bytes = modules.iter().map(|m| m.shape.bytes() as u64).collect();
        r.base_bytes = base_bytes(config, base.embed.shape.group).unwrap_or(0) as u64;
        r
    }

    /// Candidates per token (`usize::MAX`: the whole vocabulary).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }
}

impl Backend for Reference {
    type Error = Error;

    fn context(&self) -> usize {
        self.cache.capacity()
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn truncate(&mut self, n: usize) {
        self.cache.truncate(n);
    }
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<(u32, f32)>> {
        let logits = forward::forward_last(&self.weights, tokens, &mut self.cache)?;
        self.log_z = crate::model::math::log_sum_exp(&logits) as f32;
        Ok(with_watched(
            top_k(&logits, self.top_k),
            &self.watched,
            &logits,
        ))
    }
    fn log_z(&self) -> f32 {
        self.log_z
    }
    fn watch(&mut self, ids: &[u32]) -> Result<()> {
        check_watch(ids, self.weights.config.vocab_size)?;
        self.watched = ids.to_vec();
        Ok(())
    }
    async fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        forward::hidden(&self.weights, tokens, &mut self.cache).map(|_| ())
    }
    async fn set_module(&mut self, id: ModuleId, m: PackedMatrix) -> Result<()> {
        self.weights.set_module(id, to_linear(&m))?;
        self.bits[id.index()] = m.shape.bits;
        self.weight_bytes[id.index()] = m.shape.bytes() as u64;
        Ok(())
    }
    fn eqm_bits(&self) -> Vec<u32> {
        self.bits.clone()
    }
    fn held_bytes(&self) -> u64 {
        self.base_bytes + self.weight_bytes.iter().sum::<u64>() + self.cache.bytes() as u64
    }
    fn kv_cache_bytes(&self) -> u64 {
        self.cache.bytes() as u64
    }
    #[cfg(not(target_arch = "wasm32"))]
    async fn perplexity(
        &mut self,
        tokens: &[u32],
        ctx: usize,
        stride: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<crate::model::eval::Perplexity> {
        self.cache.clear();
        crate::model::eval::perplexity(&self.weights, tokens, ctx, stride, progress)
    }
    fn is_out_of_memory(_: &Error) -> bool {
        false
    }
}

/// Makes reference models with a KV cache of `context` positions.
pub struct ReferenceFactory {
    pub context: usize,
}

impl Factory for ReferenceFactory {
    type Model = Reference;
    async fn create(
        &self,
        config: &LlamaConfig,
        base: &Arc<Base>,
        modules: Vec<PackedMatrix>,
    ) -> Result<Reference> {
        Ok(Reference::from_base(config, base, &modules, self.context))
    }
    fn label(&self) -> String {
        "reference (CPU, f32)".into()
    }
}
