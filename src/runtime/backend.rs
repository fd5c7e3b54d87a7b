//! What the runtime needs from a model on some device: run tokens into a KV cache and return
//! the next token's top candidates, swap one module version between tokens, and say what it
//! holds. The WebGPU engine (`gpu::Model`) and the CPU reference (`runtime::reference`)
//! implement it; a packed CPU backend will.

use crate::ensemble::base::Base;
use crate::ensemble::format::PackedMatrix;
use crate::model::config::LlamaConfig;
use crate::model::weights::ModuleId;
use crate::runtime::session::TokenLogprob;
use std::sync::Arc;

/// Bytes of one scale of an int8 KV cache.
pub const KV_SCALE_BYTES: u64 = 4;

/// The largest scale of an int8 KV cache: an infinite value saturates at it, and code x scale
/// / 127 never rounds past `f32::MAX`, so the cache always reads back finite.
pub const KV_SCALE_MAX: f32 = 1e38;

/// Elements per scale of an int8 KV cache (llama.cpp's `q8_0` block), or the whole head where
/// head_dim is not a multiple of it. Measured on the demo model (held-out Austen, 1,024-token
/// windows, step 0): +0.07% perplexity against an f16 cache with groups of 32, +0.18% with a
/// scale per head of 64.
pub const KV_GROUP: usize = 32;

/// How the KV cache stores keys and values (both backends, the same bytes); `"f16"` or
/// `"int8"` in JSON and JS (the browser's `kvCache` option).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// f16, rounded to nearest (llama.cpp's and WebLLM's default): 2 bytes per element.
    #[default]
    F16,
    /// int8 codes in groups of `KV_GROUP` with an f32 scale each (llama.cpp's `q8_0`): 1.125
    /// bytes per element, +0.07% held-out perplexity on the demo model.
    Int8,
}

impl KvFormat {
    pub const NAMES: [&'static str; 2] = ["f16", "int8"];

    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F16 => "f16",
            KvFormat::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for KvFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvFormat::F16),
            "int8" => Ok(KvFormat::Int8),
            _ => Err(format!(
                "KV cache format {s:?}: expected one of {:?}",
                Self::NAMES
            )),
        }
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the app asks of the KV cache (the browser's `kvCache` option, the CLI's `--kv-cache`):
/// a format kept throughout, or `auto`: f16 until memory runs short, then int8 (the controller
/// converts the held cache, `Backend::convert_kv`, before it steps the weights down: 0.56x the
/// cache's bytes for +0.07% perplexity on the demo model, cheaper than any weight step; the
/// default). A cache allocated again (`resetChat`) starts in f16.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvChoice {
    F16,
    Int8,
    #[default]
    Auto,
}

impl KvChoice {
    pub const NAMES: [&'static str; 3] = ["f16", "int8", "auto"];

    /// The format the cache is allocated in.
    pub fn start(self) -> KvFormat {
        match self {
            KvChoice::Int8 => KvFormat::Int8,
            KvChoice::F16 | KvChoice::Auto => KvFormat::F16,
        }
    }

    /// The smallest format the cache may be in (`auto`: converted under pressure).
    pub fn smallest(self) -> KvFormat {
        match self {
            KvChoice::F16 => KvFormat::F16,
            KvChoice::Int8 | KvChoice::Auto => KvFormat::Int8,
        }
    }
}

impl From<KvFormat> for KvChoice {
    fn from(f: KvFormat) -> Self {
        match f {
            KvFormat::F16 => KvChoice::F16,
            KvFormat::Int8 => KvChoice::Int8,
        }
    }
}

impl std::str::FromStr for KvChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvChoice::F16),
            "int8" => Ok(KvChoice::Int8),
            "auto" => Ok(KvChoice::Auto),
            _ => Err(format!("KV cache {s:?}: expected one of {:?}", Self::NAMES)),
        }
    }
}

impl std::fmt::Display for KvChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::NAMES[*self as usize])
    }
}

/// The KV cache's layout, the same bytes on both backends (`cpu::kv`, `shaders/rope.wgsl`):
/// per position and KV head, the head's `head_dim` elements in order, as f16 (little-endian)
/// or as int8 codes followed by one f32 scale (little-endian) per `group` elements. An int8
/// element is its code / 127 x its group's scale, the scale the group's largest magnitude
/// (symmetric absmax). Attention runs in f32 on both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub format: KvFormat,
    pub head_dim: usize,
    /// Elements per scale (int8).
    pub group: usize,
}

impl KvLayout {
    pub fn of(c: &LlamaConfig, format: KvFormat) -> Self {
        let head_dim = c.head_dim();
        let group = match head_dim.is_multiple_of(KV_GROUP) {
            true => KV_GROUP,
            false => head_dim.max(1),
        };
        KvLayout {
            format,
            head_dim,
            group,
        }
    }

    /// Scales per head (0 in f16).
    pub fn groups(&self) -> usize {
        match self.format {
            KvFormat::F16 => 0,
            KvFormat::Int8 => self.head_dim / self.group,
        }
    }

    /// Bytes of one stored head.
    pub fn head_bytes(&self) -> usize {
        match self.format {
            KvFormat::F16 => 2 * self.head_dim,
            KvFormat::Int8 => self.head_dim + KV_SCALE_BYTES as usize * self.groups(),
        }
    }

    /// Bytes of one layer's keys (or values) for `positions` positions (in u64: on wasm32 the
    /// usize product of a hostile config could wrap).
    pub fn layer_bytes(&self, c: &LlamaConfig, positions: usize) -> u64 {
        positions as u64 * c.n_kv_heads() as u64 * self.head_bytes() as u64
    }

    /// Bytes of a KV cache of `positions` positions (keys and values, every layer).
    pub fn cache_bytes(&self, c: &LlamaConfig, positions: usize) -> u64 {
        2 * c.num_hidden_layers as u64 * self.layer_bytes(c, positions)
    }
}

/// The parts `Backend::read_kv` hands out and `write_kv` fills, in order, and the bytes of
/// each: every layer's keys then its values, `positions` positions of `format` each.
pub fn kv_parts(c: &LlamaConfig, format: KvFormat, positions: usize) -> (usize, u64) {
    (
        2 * c.num_hidden_layers,
        kv_layer_bytes(c, format, positions),
    )
}

/// Bytes of one layer's keys (or values) for `positions` positions in `format`.
pub fn kv_layer_bytes(c: &LlamaConfig, format: KvFormat, positions: usize) -> u64 {
    KvLayout::of(c, format).layer_bytes(c, positions)
}

/// Bytes of a KV cache of `positions` positions in `format` (keys and values, every layer).
pub fn kv_cache_bytes(c: &LlamaConfig, format: KvFormat, positions: usize) -> u64 {
    KvLayout::of(c, format).cache_bytes(c, positions)
}

/// Bytes of the KV cache a model holds at load for a context of `context` positions (its first
/// block: the cache grows with the conversation), which the controller counts before a model
/// exists (then what the model holds).
pub fn kv_cache_bytes_at_load(c: &LlamaConfig, format: KvFormat, context: usize) -> u64 {
    kv_cache_bytes(c, format, kv_grown(0, 1, context))
}

/// KV-cache positions of a chat when the caller does not say (browser and CLI alike), at most
/// the model's. The cache grows with the conversation (`kv_grown`), so a long context costs
/// only the conversations that use it: 4,096 positions are 94 MB in f16 on the demo model
/// (53 MB in int8), a 100-token exchange one block (2.9 MB).
pub const DEFAULT_CONTEXT: usize = 4096;

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

/// The positions a cache holding `held` shrinks to when a new request needs only `needed` (its
/// prompt, the cached prefix included): what `kv_grown` allocates from nothing, when that is at
/// most half of `held` (a smaller gain is not worth the copy and would churn).
pub fn kv_shrunk(held: usize, needed: usize, context: usize) -> Option<usize> {
    let fit = kv_grown(0, needed, context);
    (fit.saturating_mul(2) <= held).then_some(fit)
}

/// What `Backend::step_scored` returns: the last step's candidates (as `step`'s), and every
/// token after the first with its log-probability and alternatives.
pub type Scored = (Vec<(u32, f32)>, Vec<TokenLogprob>);

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
    /// How the KV cache stores keys and values now (`None`: in f32, the reference).
    fn kv_format(&self) -> Option<KvFormat> {
        None
    }
    /// Stores the KV cache as `to` from now on, the cached positions re-encoded (int8 holds
    /// 0.56x f16's bytes: the controller's first move under memory pressure when the app asked
    /// for `KvChoice::Auto`). On error the model is as before.
    async fn convert_kv(&mut self, to: KvFormat) -> Result<(), Self::Error> {
        Err(crate::Error::input(format!("this backend keeps its KV cache in f32, not {to}")).into())
    }
    /// Gives back the KV cache's room beyond what `needed` positions take when it holds at least
    /// twice that (`kv_shrunk`), the cached positions kept: a request unrelated to the previous
    /// one does not keep the earlier conversation's high-water mark. The default keeps it.
    async fn shrink_kv(&mut self, needed: usize) -> Result<(), Self::Error> {
        let _ = needed;
        Ok(())
    }
    /// The cached positions' keys and values as `KvLayout` bytes in `kv_format`, handed to
    /// `out` one part at a time: each layer's keys, then its values, layer by layer
    /// (`kv_parts`). With `write_kv` it carries a conversation to another model of the same
    /// weights without running it again (the browser's worker re-created to give its memory
    /// back). The default: this backend cannot.
    async fn read_kv(&self, out: &mut dyn FnMut(&[u8])) -> Result<(), Self::Error> {
        let _ = out;
        Err(crate::Error::Unsupported("this backend cannot read its KV cache out".into()).into())
    }
    /// Replaces the KV cache by `positions` positions in `format`, each part (`read_kv`'s
    /// order, `kv_parts` bytes each) filled by `fill`. A cache beyond the context or the
    /// model's budget is refused; on error the cache is as it was.
    async fn write_kv(
        &mut self,
        format: KvFormat,
        positions: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), Self::Error> {
        let _ = (format, positions, fill);
        Err(crate::Error::Unsupported("this backend cannot take a KV cache in".into()).into())
    }
    /// Runs `tokens` after the cached ones and returns the next token's top candidates
    /// `(token, logit)`, best first, then the watched tokens (`watch`) that are not among
    /// them, in `watch` order.
    async fn step(&mut self, tokens: &[u32]) -> Result<Vec<(u32, f32)>, Self::Error>;
    /// `step`, with every token after the first scored: entry `i` is `tokens[i + 1]`'s
    /// log-probability after `tokens[..=i]` with the `n` most likely tokens there (OpenAI's
    /// legacy `echo` with `logprobs`). `watched` is the list `watch` set; it is set again after.
    /// The default runs the tokens one at a time, each step also watching the next token (so
    /// its logit comes back outside the top candidates): as slow as decoding them.
    async fn step_scored(
        &mut self,
        tokens: &[u32],
        n: usize,
        watched: &[u32],
    ) -> Result<Scored, Self::Error> {
        let len = self.len();
        let mut scored = Vec::with_capacity(tokens.len().saturating_sub(1));
        let mut cand = Vec::new();
        let mut failed = None;
        for (i, &t) in tokens.iter().enumerate() {
            let next = tokens.get(i + 1).copied();
            let mut w = watched.to_vec();
            w.extend(next);
            let r = match self.watch(&w) {
                Ok(()) => self.step(&[t]).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(c) => cand = c,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(next) = next {
                scored.push(TokenLogprob::of(next, &cand, self.log_z(), n));
            }
        }
        let back = self.watch(watched);
        if let Some(e) = failed {
            self.truncate(len);
            return Err(e);
        }
        back.map(|()| (cand, scored))
    }
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
    /// Whether `set_module` cannot fail (no budget to exceed, no device to refuse an
    /// allocation): the walk then moves each module of a jump once, straight to its last
    /// version, where it otherwise passes through every trajectory step so that a failure
    /// stops at one.
    fn swaps_cannot_fail(&self) -> bool {
        false
    }
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
        assert_eq!(kv_shrunk(1024, 10, 1024), Some(KV_BLOCK));
        assert_eq!(kv_shrunk(1024, 300, 1024), Some(3 * KV_BLOCK));
        assert_eq!(
            kv_shrunk(512, 257, 1024),
            None,
            "384 is more than half of 512"
        );
        assert_eq!(kv_shrunk(256, 128, 1024), Some(KV_BLOCK));
        assert_eq!(kv_shrunk(128, 1, 1024), None, "one block stays");
        assert_eq!(kv_shrunk(40, 1, 40), None, "a context shorter than a block");
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
