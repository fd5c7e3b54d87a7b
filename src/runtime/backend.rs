//! What the runtime needs from a model on some device: run tokens into a KV cache and return
//! the next token's top candidates, swap one module version between tokens, and say what it
//! holds. The WebGPU engine (`gpu::Model`) and the CPU reference (`runtime::reference`)
//! implement it; a packed CPU backend will.

use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::model::config::LlamaConfig;
use crate::model::weights::ModuleId;
use std::sync::Arc;

/// Bytes of one cached key or value element: both backends keep the KV cache in f16
/// (`cpu::kv`, `shaders/rope.wgsl`) and compute attention in f32.
pub const KV_ELEMENT_BYTES: u64 = 2;

/// Bytes of one layer's keys (or values) for `positions` positions (in u64: on wasm32 the
/// usize product of a hostile config could wrap).
pub fn kv_layer_bytes(c: &LlamaConfig, positions: usize) -> u64 {
    KV_ELEMENT_BYTES * positions as u64 * c.kv_dim() as u64
}

/// Bytes of a KV cache of `positions` positions (keys and values, every layer).
pub fn kv_cache_bytes(c: &LlamaConfig, positions: usize) -> u64 {
    2 * c.num_hidden_layers as u64 * kv_layer_bytes(c, positions)
}

/// Bytes of the KV cache a model holds at load for a context of `context` positions (its first
/// block: the cache grows with the conversation), which the controller counts before a model
/// exists (then what the model holds).
pub fn kv_cache_bytes_at_load(c: &LlamaConfig, context: usize) -> u64 {
    kv_cache_bytes(c, kv_grown(0, 1, context))
}

/// Both backends allocate their KV cache in whole blocks of this many positions (the WebGPU
/// engine's attention range, `gpu::kernels::ATTENTION_SPLIT_KEYS`, is as long).
pub const KV_BLOCK: usize = 128;

/// Positions to allocate so that `needed` fit a cache now holding `held` positions that may
/// hold at most `context`: the cache grows with the conversation rather than being allocated
/// for the whole context at load, in whole blocks and by at least a quarter of itself (so the
/// copies of a long conversation add up to a few times its cache, not its square).
pub fn kv_grown(held: usize, needed: usize, context: usize) -> usize {
    let want = needed.max(held.saturating_add(held / 4)).max(1);
    want.div_ceil(KV_BLOCK)
        .saturating_mul(KV_BLOCK)
        .min(context)
}

/// A model at one EQM with its KV cache. Every method leaves the model as it was on error.
// Futures of the browser backend are not `Send`; nothing here needs them to be.
#[allow(async_fn_in_trait)]
pub trait Backend {
    type Error: std::error::Error + From<crate::Error>;

    /// Positions the KV cache may hold (the context; the cache grows to it as used).
    fn context(&self) -> usize;
    /// Positions in the KV cache now.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets positions `n..` (rewind to a shared prefix); the memory stays allocated.
    fn truncate(&mut self, n: usize);
    /// Forgets every position and frees the KV cache's memory (a new conversation); the next
    /// `step` allocates what it needs.
    fn release_kv(&mut self) {
        self.truncate(0);
    }
    /// Runs `tokens` after the cached ones and returns the next token's top candidates
    /// `(token, logit)`, best first, then the watched tokens (`watch`) that are not among
    /// them, in `watch` order.
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<(u32, f32)>, Self::Error>;
    /// `log Σ exp(logit)` over the whole vocabulary at the last `step`: a token's
    /// log-probability is its logit minus this (OpenAI's `logprobs`).
    fn log_z(&self) -> f32;
    /// Tokens whose logits `step` also returns when they are not among the top candidates (at
    /// most `generate::MAX_WATCHED`; replaces the previous list).
    fn watch(&mut self, ids: &[u32]) -> Result<(), Self::Error>;
    /// Runs `tokens` into the KV cache without computing logits.
    async fn prefill(&mut self, tokens: &[u32]) -> Result<(), Self::Error>;
    /// Replaces module `id` with another version between tokens.
    async fn set_module(&mut self, id: ModuleId, m: PackedMatrix) -> Result<(), Self::Error>;
    /// Bits of every module in `ModuleId::index()` order: the EQM this model runs.
    fn eqm_bits(&self) -> Vec<u32>;
    /// Bytes this model holds (weights, KV cache, activations).
    fn held_bytes(&self) -> u64;
    /// Bytes of its KV cache now (it grows with the conversation).
    fn kv_cache_bytes(&self) -> u64;
    /// Whether `e` is an allocation refused for lack of memory (the walk then stays at, or
    /// steps below, the last good step).
    fn is_out_of_memory(e: &Self::Error) -> bool;
    /// Perplexity of `tokens` in windows of `ctx` every `stride` (`model::eval`'s recipe);
    /// `progress(done, total)` after every window. Uses (and clears) the KV cache.
    #[cfg(not(target_arch = "wasm32"))]
    async fn perplexity(
        &mut self,
        tokens: &[u32],
        ctx: usize,
        stride: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<crate::model::eval::Perplexity, Self::Error>;
    /// Whether the first swap to a new bit-width is slow (shader compilation), so the walk
    /// compiles every width the ensemble holds at load.
    fn warms_kernels(&self) -> bool {
        false
    }
}

/// Makes models: a new device (after a loss, a new one) and the model of an EQM on it. The
/// module versions are given by value and the base shared: a CPU model keeps them (no second
/// copy in memory).
#[allow(async_fn_in_trait)]
pub trait Factory {
    type Model: Backend;
    async fn create(
        &self,
        config: &LlamaConfig,
        base: &Arc<Base>,
        modules: Vec<PackedMatrix>,
    ) -> Result<Self::Model, <Self::Model as Backend>::Error>;
    /// A label for stats and events, e.g. the adapter's name.
    fn label(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_grows_in_blocks_by_a_quarter_at_least_up_to_the_context() {
        assert_eq!(kv_grown(0, 1, 1024), KV_BLOCK);
        assert_eq!(kv_grown(0, 300, 1024), 3 * KV_BLOCK);
        assert_eq!(kv_grown(128, 129, 1024), 256);
        assert_eq!(kv_grown(1024, 1025, 8192), 1280);
        assert_eq!(kv_grown(0, 1, 40), 40, "a context shorter than a block");
        assert_eq!(kv_grown(896, 1000, 1000), 1000, "never past the context");
        // A conversation growing a token at a time copies a few times its final cache (the
        // quarter), not its square.
        let context = 32_768;
        let (mut held, mut copied) = (0, 0);
        for needed in 1..=context {
            if needed > held {
                copied += held;
                held = kv_grown(held, needed, context);
            }
        }
        assert_eq!(held, context);
        assert!(copied <= 5 * context, "copied {copied} positions");
    }
}
