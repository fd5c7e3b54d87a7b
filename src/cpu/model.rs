//! The packed CPU backend's model: the base shard and one packed version per module held as
//! shipped (codes and f16 scales; nothing dequantized but the embedding row of each token), an
//! f16 or int8 KV cache (`cpu::kv`) that grows with the conversation (`runtime::backend::kv_grown`),
//! and the forward pass of `model::forward` with every projection through
//! `kernel::matmul`.

use crate::cpu::act::Q16;
use crate::cpu::attention::{attention, Cached};
use crate::cpu::kernel::matmul;
use crate::ensemble::base::{base_bytes, Base};
use crate::ensemble::format::PackedMatrix;
use crate::error::{Error, Result};
use crate::model::math::{rmsnorm, silu, Rope};
use crate::model::weights::{ModuleId, ModuleKind};
use crate::model::LlamaConfig;
use crate::runtime::backend::{kv_layer_bytes, kv_shrunk, KvFormat, KvLayout, Scored};
use crate::runtime::TokenLogprob;
use std::sync::Arc;

/// Final-normed hidden rows turned into logits at once (bounds memory at this x vocab floats).
const LOGIT_CHUNK: usize = 64;

pub struct CpuModel {
    config: LlamaConfig,
    /// Shared with the walk that loaded it (no second copy of the embedding).
    base: Arc<Base>,
    /// `ModuleId::index()` order.
    modules: Vec<PackedMatrix>,
    /// How the cache stores keys and values.
    kv: KvLayout,
    /// `[layer]` the cache's bytes (`cpu::kv`): `capacity` positions of `kv.layer_bytes(1)`.
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    len: usize,
    /// Positions allocated (grown as the conversation needs, up to `context`).
    capacity: usize,
    /// Positions the cache may hold.
    context: usize,
    top_k: usize,
    /// Tokens whose logits `step` returns besides the top candidates.
    watched: Vec<u32>,
    /// `Backend::log_z` of the last `step`.
    log_z: f32,
    /// Bytes this model may hold (`None`: as much as the allocator gives).
    budget: Option<u64>,
}

/// `v` lengthened with zeros to `n` bytes, or an out-of-memory error naming `what` (wasm
/// memory can run out); on error `v` is as it was.
fn grow_zeroed(v: &mut Vec<u8>, n: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(n.saturating_sub(v.len()))
        .map_err(|_| Error::OutOfMemory {
            what: what.into(),
            requested: n as u64,
            budget: None,
        })?;
    v.resize(n, 0);
    Ok(())
}

impl CpuModel {
    /// The EQM of `base` and `modules` with a KV cache in `kv_format` of up to `context`
    /// positions (clamped to the model's maximum; one block allocated now, more as the
    /// conversation grows), refusing to hold more than `budget` bytes.
    pub fn new(
        config: &LlamaConfig,
        base: Arc<Base>,
        modules: Vec<PackedMatrix>,
        context: usize,
        kv_format: KvFormat,
        budget: Option<u64>,
    ) -> Result<Self> {
        let want = config.num_hidden_layers * ModuleKind::ALL.len();
        if modules.len() != want {
            return Err(Error::input(format!(
                "{} module versions given, the model has {want}",
                modules.len()
            )));
        }
        for (i, m) in modules.iter().enumerate() {
            let id = ModuleId::from_index(i);
            let (rows, cols) = id.kind.shape(config);
            if (m.shape.rows, m.shape.cols) != (rows, cols) {
                return Err(Error::input(format!(
                    "module {id}: {}x{} codes, the model needs {rows}x{cols}",
                    m.shape.rows, m.shape.cols
                )));
            }
        }
        let context = context.clamp(1, config.max_position_embeddings);
        let layers = config.num_hidden_layers;
        if context
            .checked_mul(config.kv_dim())
            .is_none_or(|n| n > isize::MAX as usize / 2)
        {
            return Err(Error::OutOfMemory {
                what: "the KV cache".into(),
                requested: kv_layer_bytes(config, kv_format, context),
                budget: None,
            });
        }
        let mut model = CpuModel {
            config: config.clone(),
            base,
            modules,
            kv: KvLayout::of(config, kv_format),
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
            capacity: 0,
            context,
            top_k: crate::runtime::generate::TOP_K,
            watched: Vec::new(),
            log_z: f32::NAN,
            budget,
        };
        let need = model.weight_bytes();
        if let Some(b) = budget.filter(|&b| need > b) {
            return Err(Error::OutOfMemory {
                what: "the model".into(),
                requested: need,
                budget: Some(b),
            });
        }
        model.reserve_kv(1)?;
        Ok(model)
    }

    /// Makes room for `needed` positions (`runtime::backend::kv_grown`), the cached ones kept.
    /// On error the cache holds what it held.
    pub fn reserve_kv(&mut self, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let positions = crate::runtime::backend::kv_grown(self.capacity, needed, self.context);
        let what = || format!("the KV cache for {positions} positions");
        let c = &self.config;
        let extra = self.kv.cache_bytes(c, positions) - self.kv.cache_bytes(c, self.capacity);
        if let Some(b) = self.budget.filter(|&b| self.held_bytes() + extra > b) {
            return Err(Error::OutOfMemory {
                what: what(),
                requested: self.held_bytes() + extra,
                budget: Some(b),
            });
        }
        let n = self.kv.layer_bytes(c, positions) as usize;
        for cache in self.k.iter_mut().chain(&mut self.v) {
            grow_zeroed(cache, n, &what())?;
        }
        self.capacity = positions;
        Ok(())
    }

    /// Stores the KV cache as `to` from now on (`Backend::convert_kv`): every layer's cached
    /// positions re-encoded into a cache of the same positions. A larger cache (int8 -> f16)
    /// beyond the model's budget is refused with `OutOfMemory`; on error nothing changed.
    pub fn convert_kv(&mut self, to: KvFormat) -> Result<()> {
        if to == self.kv.format {
            return Ok(());
        }
        let (c, from) = (&self.config, self.kv);
        let new = KvLayout::of(c, to);
        let (held, after) = (
            self.kv.cache_bytes(c, self.capacity),
            new.cache_bytes(c, self.capacity),
        );
        let what = || format!("the KV cache in {to}");
        if let Some(b) = self
            .budget
            .filter(|&b| after > held && self.held_bytes() + after - held > b)
        {
            return Err(Error::OutOfMemory {
                what: what(),
                requested: self.held_bytes() + after - held,
                budget: Some(b),
            });
        }
        let (row, cached) = (from.layer_bytes(c, 1) as usize, self.len);
        let n = new.layer_bytes(c, self.capacity) as usize;
        let mut converted = Vec::with_capacity(self.k.len() + self.v.len());
        for cache in self.k.iter().chain(&self.v) {
            let mut out = Vec::new();
            grow_zeroed(&mut out, n, &what())?;
            let x = crate::cpu::kv::widened(&cache[..cached * row], &from);
            let written = new.layer_bytes(c, cached) as usize;
            crate::cpu::kv::store(&x, &new, &mut out[..written]);
            converted.push(out);
        }
        let v = converted.split_off(self.k.len());
        (self.k, self.v, self.kv) = (converted, v, new);
        Ok(())
    }

    /// Gives back the cache's room beyond `needed` positions (`Backend::shrink_kv`).
    pub fn shrink_kv(&mut self, needed: usize) {
        let needed = needed.max(self.len);
        let Some(positions) = kv_shrunk(self.capacity, needed, self.context) else {
            return;
        };
        let n = self.kv.layer_bytes(&self.config, positions) as usize;
        for cache in self.k.iter_mut().chain(&mut self.v) {
            cache.truncate(n);
            cache.shrink_to_fit();
        }
        self.capacity = positions;
    }

    /// The cached positions' keys and values, layer by layer (`Backend::read_kv`).
    pub fn read_kv(&self, out: &mut dyn FnMut(&[u8])) {
        let n = self.kv.layer_bytes(&self.config, self.len) as usize;
        for (k, v) in self.k.iter().zip(&self.v) {
            out(&k[..n]);
            out(&v[..n]);
        }
    }

    /// Replaces the KV cache by `positions` positions in `format` filled by `fill`
    /// (`Backend::write_kv`): the new cache is allocated beside the old one, so on error
    /// (beyond the context, the budget or the allocator) nothing changed.
    pub fn write_kv(
        &mut self,
        format: KvFormat,
        positions: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<()> {
        if positions > self.context {
            return Err(Error::ContextLength {
                tokens: positions,
                context: self.context,
            });
        }
        let (c, layout) = (&self.config, KvLayout::of(&self.config, format));
        let capacity = crate::runtime::backend::kv_grown(0, positions.max(1), self.context);
        let what = || format!("the KV cache for {positions} positions in {format}");
        let need = self.weight_bytes() + layout.cache_bytes(c, capacity);
        if let Some(b) = self.budget.filter(|&b| need > b) {
            return Err(Error::OutOfMemory {
                what: what(),
                requested: need,
                budget: Some(b),
            });
        }
        let (n, room) = (
            layout.layer_bytes(c, positions) as usize,
            layout.layer_bytes(c, capacity) as usize,
        );
        let mut caches = Vec::with_capacity(2 * self.k.len());
        for _ in 0..2 * self.k.len() {
            let mut cache = Vec::new();
            grow_zeroed(&mut cache, room, &what())?;
            fill(&mut cache[..n]);
            caches.push(cache);
        }
        // Filled in `read_kv`'s order: each layer's keys, then its values.
        let (mut k, mut v, mut parts) = (Vec::new(), Vec::new(), caches.into_iter());
        while let (Some(keys), Some(values)) = (parts.next(), parts.next()) {
            k.push(keys);
            v.push(values);
        }
        (self.k, self.v, self.kv) = (k, v, layout);
        (self.len, self.capacity) = (positions, capacity);
        Ok(())
    }

    /// Forgets every position and frees the KV cache (`Backend::release_kv`).
    pub fn release_kv(&mut self) {
        self.len = 0;
        self.capacity = 0;
        for cache in self.k.iter_mut().chain(&mut self.v) {
            *cache = Vec::new();
        }
    }

    /// Candidates per token (`usize::MAX`: the whole vocabulary).
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = k.max(1);
        self
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn weight_bytes(&self) -> u64 {
        let base = base_bytes(&self.config, self.base.embed.shape.group).unwrap_or(0) as u64;
        base + self
            .modules
            .iter()
            .map(|m| m.shape.bytes() as u64)
            .sum::<u64>()
    }

    /// Bytes of the KV cache, counted from the caches themselves (a growth that failed
    /// half-way leaves some longer).
    pub fn kv_bytes(&self) -> u64 {
        let bytes: usize = self.k.iter().chain(&self.v).map(Vec::len).sum();
        bytes as u64
    }

    pub fn held_bytes(&self) -> u64 {
        self.weight_bytes() + self.kv_bytes()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Caps the bytes this model may hold from now on (a growth or conversion beyond it fails
    /// with `OutOfMemory`).
    pub fn set_budget(&mut self, bytes: Option<u64>) {
        self.budget = bytes;
    }

    /// Whether a budget caps what this model may hold.
    pub fn has_budget(&self) -> bool {
        self.budget.is_some()
    }

    /// How the KV cache stores keys and values.
    pub fn kv_format(&self) -> KvFormat {
        self.kv.format
    }

    /// Positions the KV cache may hold.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Positions the KV cache has room for now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    pub fn eqm_bits(&self) -> Vec<u32> {
        self.modules.iter().map(|m| m.shape.bits).collect()
    }

    /// Replaces module `id` with version `m` (between tokens; the KV cache stays). The old
    /// version's memory is freed here.
    pub fn set_module(&mut self, id: ModuleId, m: PackedMatrix) -> Result<()> {
        let i = id.index();
        let old = self
            .modules
            .get(i)
            .ok_or_else(|| Error::input(format!("module {id} is not in this model")))?;
        if (old.shape.rows, old.shape.cols) != (m.shape.rows, m.shape.cols) {
            return Err(Error::input(format!(
                "module {id}: {}x{} codes, the model needs {}x{}",
                m.shape.rows, m.shape.cols, old.shape.rows, old.shape.cols
            )));
        }
        let after = self.held_bytes() - old.shape.bytes() as u64 + m.shape.bytes() as u64;
        if let Some(b) = self.budget.filter(|&b| after > b) {
            return Err(Error::OutOfMemory {
                what: format!("module {id} at {} bits", m.shape.bits),
                requested: after,
                budget: Some(b),
            });
        }
        self.modules[i] = m;
        Ok(())
    }

    fn module(&self, layer: usize, kind: ModuleKind) -> &PackedMatrix {
        &self.modules[ModuleId { layer, kind }.index()]
    }

    /// `y = W x` for each module of `kinds` (one layer's modules reading the same input `x`,
    /// `t` rows), quantizing `x` once per distinct bit-width.
    fn project(&self, layer: usize, kinds: &[ModuleKind], x: &[f32], t: usize) -> Vec<Vec<f32>> {
        let mut q16: Option<(u32, Q16)> = None;
        kinds
            .iter()
            .map(|&kind| {
                let m = self.module(layer, kind);
                if q16.as_ref().is_none_or(|(b, _)| *b != m.shape.bits) {
                    q16 = Some((m.shape.bits, Q16::quantize(x, t, &m.shape)));
                }
                let (_, a) = q16.as_ref().expect("set above");
                let mut y = vec![0f32; t * m.shape.rows];
                matmul(m, a, &mut y);
                y
            })
            .collect()
    }

    /// Runs `tokens` after the cached positions through every layer; returns the final-normed
    /// hidden states `[t][hidden]`.
    pub fn hidden(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let (h, t, pos0) = (c.hidden_size, tokens.len(), self.len);
        if t == 0 {
            return Err(Error::input("no tokens to run"));
        }
        if pos0 + t > self.context {
            return Err(Error::input(format!(
                "{t} tokens after {pos0} cached exceed the context of {} tokens",
                self.context
            )));
        }
        let mut x = vec![0f32; t * h];
        for (&tok, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
            if tok as usize >= c.vocab_size {
                return Err(Error::input(format!(
                    "token id {tok} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            self.base.embed.dequantize_row(tok as usize, row);
        }
        self.reserve_kv(pos0 + t)?;
        let rope = Rope::new(c.rope_theta, c.head_dim(), pos0, t);
        let (layout, row) = (self.kv, self.kv.layer_bytes(&c, 1) as usize);
        let mut xn = vec![0f32; t * h];
        let mut att = vec![0f32; t * c.q_dim()];
        for l in 0..c.num_hidden_layers {
            use ModuleKind::*;
            rmsnorm(&x, &self.base.norms[l].attn_norm, c.rms_norm_eps, &mut xn);
            let [mut q, mut k, v]: [Vec<f32>; 3] = self
                .project(l, &[Q, K, V], &xn, t)
                .try_into()
                .expect("three projections");
            rope.apply(&mut q, c.num_attention_heads);
            rope.apply(&mut k, c.n_kv_heads());
            let span = pos0 * row..(pos0 + t) * row;
            crate::cpu::kv::store(&k, &layout, &mut self.k[l][span.clone()]);
            crate::cpu::kv::store(&v, &layout, &mut self.v[l][span]);
            let cached = (pos0 + t) * row;
            let cache = Cached {
                k: &self.k[l][..cached],
                v: &self.v[l][..cached],
                layout: &layout,
            };
            attention(&c, &q, &cache, pos0, &mut att);
            let o = self.project(l, &[O], &att, t).remove(0);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            rmsnorm(&x, &self.base.norms[l].ffn_norm, c.rms_norm_eps, &mut xn);
            let [mut gate, up]: [Vec<f32>; 2] = self
                .project(l, &[Gate, Up], &xn, t)
                .try_into()
                .expect("two projections");
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = silu(*g) * u);
            let down = self.project(l, &[Down], &gate, t).remove(0);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        self.len = pos0 + t;
        rmsnorm(&x, &self.base.final_norm, c.rms_norm_eps, &mut xn);
        Ok(xn)
    }

    /// Logits `[rows][vocab]` of final-normed hidden rows (the LM head, or the tied embedding).
    pub fn logits(&self, xn: &[f32]) -> Vec<f32> {
        let head = self.base.lm_head.as_ref().unwrap_or(&self.base.embed);
        let rows = xn.len() / self.config.hidden_size;
        let a = Q16::quantize(xn, rows, &head.shape);
        let mut out = vec![0f32; rows * head.shape.rows];
        matmul(head, &a, &mut out);
        out
    }

    /// The next token's top candidates after `tokens`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<(u32, f32)>> {
        let xn = self.hidden(tokens)?;
        let h = self.config.hidden_size;
        let logits = self.logits(&xn[xn.len() - h..]);
        Ok(self.candidates(&logits))
    }

    /// The next token's candidates from the last position's logits (`step`'s answer); sets
    /// `log_z`.
    fn candidates(&mut self, logits: &[f32]) -> Vec<(u32, f32)> {
        use crate::runtime::generate::{top_k, with_watched};
        self.log_z = crate::model::math::log_sum_exp(logits) as f32;
        with_watched(top_k(logits, self.top_k), &self.watched, logits)
    }

    /// `step` with every token after the first scored (`Backend::step_scored`): one pass
    /// over the prompt, the head run on every position in chunks of `LOGIT_CHUNK` rows.
    pub fn step_scored(&mut self, tokens: &[u32], n: usize) -> Result<Scored> {
        let xn = self.hidden(tokens)?;
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut scored = Vec::with_capacity(tokens.len() - 1);
        let mut cand = Vec::new();
        for (c, rows) in xn.chunks(LOGIT_CHUNK * h).enumerate() {
            let lg = self.logits(rows);
            for (j, row) in lg.chunks_exact(vocab).enumerate() {
                let Some(&next) = tokens.get(c * LOGIT_CHUNK + j + 1) else {
                    cand = self.candidates(row);
                    continue;
                };
                scored.push(TokenLogprob::of_row(next, row, n));
            }
        }
        Ok((cand, scored))
    }

    /// See `Backend::log_z`.
    pub fn log_z(&self) -> f32 {
        self.log_z
    }

    /// See `Backend::watch`.
    pub fn watch(&mut self, ids: &[u32]) -> Result<()> {
        crate::runtime::generate::check_watch(ids, self.config.vocab_size)?;
        self.watched = ids.to_vec();
        Ok(())
    }

    /// Summed negative log-likelihood of `targets[i]` after `inputs[..=i]` (run after the
    /// cached positions).
    pub fn nll(&mut self, inputs: &[u32], targets: &[u32]) -> Result<f64> {
        let xn = self.hidden(inputs)?;
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut nll = 0.0;
        for (rows, tg) in xn.chunks(LOGIT_CHUNK * h).zip(targets.chunks(LOGIT_CHUNK)) {
            let lg = self.logits(rows);
            for (row, &t) in lg.chunks_exact(vocab).zip(tg) {
                nll += crate::model::math::log_sum_exp(row) - row[t as usize] as f64;
            }
        }
        Ok(nll)
    }
}
