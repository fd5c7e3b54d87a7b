//! The model on the GPU: base buffers (embedding and head, norms, RoPE table), one buffer
//! per module in the packed format, the KV cache and the activations, plus the list of
//! dispatches that make one forward pass.
//!
//! The embedding (and an untied head) is the ensemble's base shard as it is: the packed format
//! at 8 bits (`ensemble::base`), so the bytes on the device are the bytes the manifest counts
//! and the head is one more dequantizing matmul (`qlinear.wgsl` at 8 bits).
//!
//! A swap (`set_module`) happens between tokens: it uploads the new version into a new buffer
//! inside an out-of-memory error scope, rebuilds the one bind group that reads the module,
//! and only then drops the old buffer. The KV cache and the tokens stay.

use crate::ensemble::base::{Base, BASE_BITS};
use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::gpu::alloc::{Allocator, GpuBuffer};
use crate::gpu::buffers::{
    activation_sizes, attention_ranges, base_sizes, create_kv, create_kv_layer, kv_layer_bytes,
    table_shape, topk_chunks, Activations, BaseBuffers,
};
use crate::gpu::device::{Gpu, Requirements};
use crate::gpu::error::{GpuError, GpuResult};
use crate::gpu::graph::{
    folds_norms, param_slots, qlinear_params, Builder, Dispatch, Graph, Grid, ModuleIo, Op, Slot,
    SlotBinding,
};
use crate::gpu::kernels::{
    self, kernel_param_bytes, step_bytes, Kernel, Kernels, PARAM_SLOT, TT, WG,
};
use crate::gpu::kv_convert;
use crate::model::config::LlamaConfig;
use crate::model::weights::{ModuleId, ModuleKind};
use crate::runtime::backend::{kv_grown, kv_shrunk, KvFormat};
use crate::runtime::generate::check_watch;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// Positions the KV cache may hold (it grows to them as the conversation does).
    pub context: usize,
    /// Tokens per prefill dispatch (activations are sized for this many).
    pub max_batch: usize,
    /// Rows of logits kept: 1 for generation; more lets perplexity score a chunk at once.
    pub logit_rows: usize,
    /// Candidates the GPU returns per generated token (greedy needs 1).
    pub top_k: u32,
    /// Decode folds each RMSNorm into the matvecs that read its output (`MatvecNorm`): 61
    /// dispatches fewer per token on a 30-layer model, for some more work in each of those
    /// matvecs. `None`: on GPUs, where a token's time goes to its dispatches, not on CPU
    /// adapters (lavapipe decoded 10-15% slower folded: its dispatches are cheap next to
    /// the loads the folded matvecs add). Prefill runs the norms either way.
    pub fuse_norm: Option<bool>,
    /// Decode runs a layer's Q, K and V in one dispatch and its gate and up projections in
    /// another (`MatvecQkv`, `MatvecGlu`, `graph::GROUPS`): 90 dispatches fewer per token on a
    /// 30-layer model, each matrix's codes decoded at their own bit-width, for a branch per
    /// load in those kernels. `None`: as `fuse_norm`, on GPUs and not on CPU adapters.
    pub fuse_modules: Option<bool>,
    /// How the KV cache stores keys and values.
    pub kv_format: KvFormat,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            context: 2048,
            max_batch: 64,
            logit_rows: 1,
            top_k: 40,
            fuse_norm: None,
            fuse_modules: None,
            kv_format: KvFormat::F16,
        }
    }
}

/// Bytes the model holds on the device, by kind; computed from shapes, not from the
/// allocator, so that comparing the two catches leaks and double counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Footprint {
    pub base: u64,
    pub modules: u64,
    pub kv_cache: u64,
    pub activations: u64,
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.base + self.modules + self.kv_cache + self.activations
    }
}

/// What the head computes after the layers.
#[derive(Clone, Copy, PartialEq)]
enum Head {
    /// Top-k of the last token's logits.
    TopK,
    /// Logits of every token of the call (rows of the logits buffer).
    AllLogits,
    /// Negative log-likelihood of each token's target.
    Nll,
    /// Only fill the KV cache.
    None,
}

pub struct Model {
    gpu: Arc<Gpu>,
    kernels: Kernels,
    alloc: Allocator,
    config: LlamaConfig,
    opts: ModelOptions,
    params: GpuBuffer,
    step: GpuBuffer,
    base: BaseBuffers,
    /// `[k, v]` per layer, `kv_positions` positions each (empty after `release_kv`).
    kv: Vec<[GpuBuffer; 2]>,
    /// Positions the KV cache has room for (grown as the conversation needs, up to the context).
    kv_positions: usize,
    act: Activations,
    modules: Vec<Slot>,
    /// Columns per group of the base's embedding and head.
    base_group: usize,
    /// Tokens whose logits `step` reads back besides the top-k (`Backend::watch`).
    watched: Vec<u32>,
    /// `Backend::log_z` of the last `step`.
    log_z: f32,
    graph: Graph,
    len: usize,
    /// Host seconds the last chunk spent before its submission (encoding it, unless it was
    /// prepared): `bench gpu` splits a token's time into this, the GPU's work and the wait.
    encode_seconds: f64,
    /// The next one-token step's commands, encoded while the GPU runs the current one (they
    /// depend on the graph, not on the token or position, which go in through buffers).
    /// Dropped whenever a bind group or the watched tokens change.
    prepared: Option<wgpu::CommandBuffer>,
}

impl Model {
    /// What the device must offer for this model (the base sized at the smallest group, 32,
    /// an upper bound for any group).
    pub fn requirements(c: &LlamaConfig, o: &ModelOptions) -> Requirements {
        let widest_module = ModuleKind::ALL
            .iter()
            .map(|k| {
                let (r, cols) = k.shape(c);
                PackedShape::new(r, cols, 8, 32).map_or(0, |s| s.bytes() as u64)
            })
            .max()
            .unwrap_or(0);
        let max_binding = base_sizes(c, o, 32)
            .iter()
            .map(|x| x.1)
            .chain(activation_sizes(c, o).iter().map(|x| x.1))
            .chain([kv_layer_bytes(c, o), widest_module])
            .max()
            .unwrap_or(0);
        let rows = ModuleKind::ALL
            .iter()
            .map(|k| k.shape(c).0)
            .max()
            .unwrap_or(0);
        let max_workgroups = [
            rows.div_ceil(WG as usize),
            c.vocab_size.div_ceil(WG as usize),
            o.max_batch,
            c.num_attention_heads,
        ]
        .into_iter()
        .max()
        .unwrap_or(1) as u32;
        Requirements {
            max_binding,
            max_workgroups,
        }
    }

    fn check_shapes(c: &LlamaConfig, o: &ModelOptions) -> GpuResult<()> {
        let bad = |m: String| Err(GpuError::Input(m));
        // The kernels read activations as vec4.
        for (name, v) in [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("q_dim", c.q_dim()),
        ] {
            if !v.is_multiple_of(4) {
                return bad(format!("{name} {v} must be a multiple of 4"));
            }
        }
        if c.head_dim() > 256 || !c.head_dim().is_multiple_of(8) {
            return bad(format!(
                "head_dim {} must be a multiple of 8 (the KV cache's int8 words) of at most 256 \
                 (the kernels' limit)",
                c.head_dim()
            ));
        }
        if o.top_k == 0 || o.top_k > kernels::MAX_TOP_K {
            return bad(format!(
                "top_k {} must be in 1..={}",
                o.top_k,
                kernels::MAX_TOP_K
            ));
        }
        if topk_chunks(c) * o.top_k as u64 > kernels::TOPK_CHUNK as u64 {
            return bad(format!(
                "vocabulary {} is too large for one top-k merge at k = {}",
                c.vocab_size, o.top_k
            ));
        }
        if o.context == 0 || o.context > c.max_position_embeddings {
            return bad(format!(
                "context {} must be in 1..={}",
                o.context, c.max_position_embeddings
            ));
        }
        if o.max_batch == 0 || o.logit_rows == 0 || o.logit_rows > o.max_batch {
            return bad(format!(
                "max_batch {} and logit_rows {} must be >= 1 with logit_rows <= max_batch",
                o.max_batch, o.logit_rows
            ));
        }
        Ok(())
    }

    /// Checks that `m` may stand for module `id` of this config.
    fn check_module(c: &LlamaConfig, id: ModuleId, m: &PackedMatrix) -> GpuResult<()> {
        let (r, cols) = id.kind.shape(c);
        let s = m.shape;
        let reason = if (s.rows, s.cols) != (r, cols) {
            format!("shape {}x{}, the model needs {r}x{cols}", s.rows, s.cols)
        } else if m.codes.len() != s.code_words() || m.scales.len() != s.scale_words() {
            format!(
                "{} code and {} scale words, the shape needs {} and {}",
                m.codes.len(),
                m.scales.len(),
                s.code_words(),
                s.scale_words()
            )
        } else {
            return Ok(());
        };
        Err(GpuError::Module {
            module: id.to_string(),
            reason,
        })
    }

    /// Uploads the model: the ensemble's `base` (8-bit embedding and head, norms) and
    /// `modules[ModuleId::index()]`, one packed version per module (an EQM).
    pub async fn from_base(
        gpu: Arc<Gpu>,
        config: &LlamaConfig,
        base_tensors: &Base,
        modules: &[PackedMatrix],
        opts: ModelOptions,
    ) -> GpuResult<Model> {
        let c = config.clone();
        let bt = base_tensors;
        let base_group = bt.embed.shape.group;
        Self::check_shapes(&c, &opts)?;
        let table = table_shape(&c, base_group)?;
        let heads = std::iter::once(&bt.embed).chain(&bt.lm_head);
        for (name, m) in ["embedding", "lm_head"].into_iter().zip(heads) {
            if m.shape != table
                || m.codes.len() != table.code_words()
                || m.scales.len() != table.scale_words()
            {
                return Err(GpuError::Input(format!(
                    "{name}: shape {}x{} at {} bits, the model needs {}x{} at {BASE_BITS}",
                    m.shape.rows, m.shape.cols, m.shape.bits, table.rows, table.cols
                )));
            }
        }
        let n_norms = bt.norms.len();
        if n_norms != c.num_hidden_layers
            || bt
                .norms
                .iter()
                .flat_map(|n| [&n.attn_norm, &n.ffn_norm])
                .chain([&bt.final_norm])
                .any(|g| g.len() != c.hidden_size)
        {
            return Err(GpuError::Input(format!(
                "base norms: {n_norms} layers of norms of the wrong shape for {} layers of {}",
                c.num_hidden_layers, c.hidden_size
            )));
        }
        gpu.check(Self::requirements(&c, &opts))?;
        if modules.len() != c.num_hidden_layers * 7 {
            return Err(GpuError::Input(format!(
                "{} module versions for {} modules",
                modules.len(),
                c.num_hidden_layers * 7
            )));
        }
        for (i, m) in modules.iter().enumerate() {
            Self::check_module(&c, ModuleId::from_index(i), m)?;
        }
        let alloc = Allocator::new(&gpu.device);
        let mut kernels = crate::gpu::variant::kernels_for_adapter(&gpu).await;
        let q = &gpu.queue;
        let uniform = wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST;
        let params = alloc
            .create("params", param_slots(&c, &opts) * PARAM_SLOT, uniform)
            .await?;
        let step = alloc.create("step", 16, uniform).await?;
        let base = BaseBuffers::upload(&alloc, q, &c, &opts, bt).await?;
        let kv_positions = kv_grown(0, 1, opts.context);
        let kv = create_kv(&alloc, &c, opts.kv_format, kv_positions).await?;
        let act = Activations::create(&alloc, &c, &opts).await?;
        let mut module_bufs = Vec::new();
        for (i, m) in modules.iter().enumerate() {
            let what = ModuleId::from_index(i).to_string();
            let storage = wgpu::BufferUsages::empty();
            module_bufs.push(alloc.upload(q, &what, &m.to_bytes(), storage).await?);
            kernels.prepare(&gpu, Kernel::Matvec(m.shape.bits));
            kernels.prepare(&gpu, Kernel::Matmul(m.shape.bits));
        }
        let mut b = Builder {
            gpu: &gpu,
            kernels: &mut kernels,
            params: &params,
            step: &step,
            blocks: Vec::new(),
        };
        let ranges = attention_ranges(&opts, kv_positions);
        let (graph, slots) = b.graph(
            &c,
            &opts,
            table,
            &base,
            &kv,
            &act,
            modules,
            module_bufs,
            ranges,
        );
        let blocks: Vec<u8> = b.blocks.concat();
        q.write_buffer(&params.buffer, 0, &blocks);

        Ok(Model {
            gpu,
            kernels,
            alloc,
            config: c,
            opts,
            params,
            step,
            base,
            kv,
            kv_positions,
            act,
            modules: slots,
            base_group,
            watched: Vec::new(),
            log_z: f32::NAN,
            graph,
            len: 0,
            encode_seconds: 0.0,
            prepared: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
    /// Positions in the KV cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets positions `n..` (rewind to a shared prefix); the cached keys stay valid.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Positions the KV cache has room for now.
    pub fn kv_positions(&self) -> usize {
        self.kv_positions
    }

    /// Makes room for `needed` positions (`runtime::backend::kv_grown`): a larger cache with
    /// the cached positions copied in, bound in place of the old one (`resize_kv`, a layer at a
    /// time). On error the model runs as before.
    pub async fn reserve_kv(&mut self, needed: usize) -> GpuResult<()> {
        if needed <= self.kv_positions {
            return Ok(());
        }
        let positions = kv_grown(self.kv_positions, needed, self.opts.context);
        self.resize_kv(positions).await
    }

    /// Gives back the cache's room beyond `needed` positions (`Backend::shrink_kv`), as a
    /// growth does: a smaller cache, the cached positions copied in, the old one freed.
    pub async fn shrink_kv(&mut self, needed: usize) -> GpuResult<()> {
        let needed = needed.max(self.len);
        match kv_shrunk(self.kv_positions, needed, self.opts.context) {
            Some(positions) => self.resize_kv(positions).await,
            None => Ok(()),
        }
    }

    /// Stores the cache as `to` from now on (`Backend::convert_kv`): a layer at a time
    /// (`convert_layer`: the cache plus one layer in the new format, where it held both whole
    /// caches until stop 46), then the KV ops' parameters rewritten. On error the model runs as
    /// before (the layers converted so far converted back, keeping the new format's rounding).
    pub async fn convert_kv(&mut self, to: KvFormat) -> GpuResult<()> {
        if to == self.opts.kv_format {
            return Ok(());
        }
        if self.kv.is_empty() {
            // Released: the next call allocates the cache in the new format.
            self.opts.kv_format = to;
            self.graph
                .write_kv_params(&self.gpu, &self.params, &self.config, &self.opts);
            return Ok(());
        }
        let from = self.opts.kv_format;
        for l in 0..self.kv.len() {
            if let Err(e) = self.convert_layer(l, to).await {
                // Back to `from`, the layers converted so far (their values keep the rounding
                // of `to`); should that fail too, the cache is given up and the next one is
                // allocated as `to` (the session runs the conversation into it again:
                // `Session::restore_cache`).
                for b in 0..l {
                    if self.convert_layer(b, from).await.is_err() {
                        self.release_kv();
                        self.opts.kv_format = to;
                        self.graph.write_kv_params(
                            &self.gpu,
                            &self.params,
                            &self.config,
                            &self.opts,
                        );
                        return Err(e);
                    }
                }
                self.bind_kv(self.kv_positions);
                return Err(e);
            }
        }
        self.opts.kv_format = to;
        self.graph
            .write_kv_params(&self.gpu, &self.params, &self.config, &self.opts);
        self.bind_kv(self.kv_positions);
        Ok(())
    }

    /// The cached positions' keys and values, layer by layer (`Backend::read_kv`), read back
    /// from the device a buffer at a time.
    pub async fn read_kv(&self, out: &mut dyn FnMut(&[u8])) -> GpuResult<()> {
        let (c, format) = (&self.config, self.opts.kv_format);
        let n = crate::runtime::backend::kv_layer_bytes(c, format, self.len);
        if n == 0 {
            for _ in 0..2 * c.num_hidden_layers {
                out(&[]);
            }
            return Ok(());
        }
        for b in self.kv.iter().flatten() {
            out(&self.read_bytes(&b.buffer, n).await?);
        }
        Ok(())
    }

    /// Replaces the KV cache by `positions` positions in `format` filled by `fill`
    /// (`Backend::write_kv`): a new cache is allocated (the old one kept until it is whole,
    /// so a refusal changes nothing), each part written to the device as it is filled.
    pub async fn write_kv(
        &mut self,
        format: KvFormat,
        positions: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> GpuResult<()> {
        let c = &self.config;
        if positions > self.opts.context {
            return Err(GpuError::Input(format!(
                "a KV cache of {positions} positions is more than the context's {}",
                self.opts.context
            )));
        }
        let room = crate::runtime::backend::kv_grown(0, positions.max(1), self.opts.context);
        let kv = create_kv(&self.alloc, c, format, room).await?;
        let mut part =
            vec![0u8; crate::runtime::backend::kv_layer_bytes(c, format, positions) as usize];
        for b in kv.iter().flatten() {
            fill(&mut part);
            if !part.is_empty() {
                self.gpu.queue.write_buffer(&b.buffer, 0, &part);
            }
        }
        let changed = format != self.opts.kv_format;
        (self.kv, self.len, self.opts.kv_format) = (kv, positions, format);
        if changed {
            let (gpu, params) = (&self.gpu, &self.params);
            self.graph
                .write_kv_params(gpu, params, &self.config, &self.opts);
        }
        self.bind_kv(room);
        Ok(())
    }

    /// Layer `l`'s cached positions re-encoded from `from` to `to` on the device
    /// (`kv_convert`: the bytes the RoPE kernel would have written) into new keys and values
    /// that replace the layer's (the old ones freed once the conversion has run). A conversion
    /// goes a layer at a time, so it holds the cache plus one layer in the new format.
    async fn convert_layer(&mut self, l: usize, to: KvFormat) -> GpuResult<()> {
        let c = &self.config;
        let new = create_kv_layer(&self.alloc, c, to, self.kv_positions, l).await?;
        let (gpu, kernels, step) = (&self.gpu, &mut self.kernels, &self.step.buffer);
        kv_convert::submit(gpu, kernels, step, c, to, self.len, &self.kv[l], &new);
        self.kv[l] = new;
        Ok(())
    }

    /// A cache of `positions` (at least `len`) bound in place of the old one, the cached
    /// positions copied in, one layer at a time: each layer's keys and values are allocated,
    /// copied into and bound before the old ones are freed, so a resize holds the cache plus
    /// one layer's (not two caches: with 4,096 positions on the demo 97 MB, not 164 MB when the
    /// last growth is from 3,072). A refused allocation stops there: the layers resized so far
    /// keep their new size and the model runs on the positions every layer has room for
    /// (before a growth, the old ones), holding what its buffers hold; a later growth resizes
    /// the rest.
    async fn resize_kv(&mut self, positions: usize) -> GpuResult<()> {
        let (c, format) = (&self.config, self.opts.kv_format);
        if self.kv.is_empty() {
            self.kv = create_kv(&self.alloc, c, format, positions).await?;
            self.bind_kv(positions);
            return Ok(());
        }
        let cached = crate::runtime::backend::kv_layer_bytes(c, format, self.len);
        let want = crate::runtime::backend::kv_layer_bytes(c, format, positions);
        let mut result = Ok(());
        let mut resized = 0;
        for l in 0..self.kv.len() {
            if self.kv[l][0].bytes() == want {
                // Resized by a growth the device refused partway.
                resized += 1;
                continue;
            }
            let new = match create_kv_layer(&self.alloc, c, format, positions, l).await {
                Ok(new) => new,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if cached > 0 {
                let mut enc = self.gpu.device.create_command_encoder(&Default::default());
                for (old, new) in self.kv[l].iter().zip(&new) {
                    enc.copy_buffer_to_buffer(&old.buffer, 0, &new.buffer, 0, cached);
                }
                self.gpu.queue.submit([enc.finish()]);
            }
            // The old layer is freed once the copy submitted above has run.
            self.kv[l] = new;
            resized += 1;
        }
        let room = match resized == self.kv.len() {
            true => positions,
            false => positions.min(self.kv_positions),
        };
        self.bind_kv(room);
        result
    }

    /// The KV ops bound to `self.kv`, attention dispatched over `positions` positions.
    fn bind_kv(&mut self, positions: usize) {
        let at = SlotBinding {
            gpu: &self.gpu,
            params: &self.params,
            step: &self.step,
        };
        let (rope, act) = (&self.base.rope, &self.act);
        let ranges = attention_ranges(&self.opts, positions);
        let combined = self.graph.combines();
        self.graph
            .rebind_kv(&at, &mut self.kernels, rope, act, &self.kv, ranges);
        if combined != self.graph.combines() {
            // Attention writes its output itself over one range, partials over several.
            let (gpu, params) = (&self.gpu, &self.params);
            (self.graph).write_kv_params(gpu, params, &self.config, &self.opts);
        }
        // Commands prepared with the old cache's bind groups go with it.
        self.prepared = None;
        self.kv_positions = positions;
    }

    /// Bytes the KV cache's buffers hold (after a resize the device refused partway, more
    /// than its positions need).
    pub fn kv_held_bytes(&self) -> u64 {
        self.kv.iter().flatten().map(|b| b.bytes()).sum()
    }

    /// Forgets every position and frees the KV cache (`Backend::release_kv`); the next call
    /// that runs tokens allocates and binds a new one.
    pub fn release_kv(&mut self) {
        self.len = 0;
        self.prepared = None;
        self.kv.clear();
        self.kv_positions = 0;
    }
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }
    /// Caps the bytes this model may hold; a swap beyond it fails with `OutOfMemory`.
    pub fn set_budget(&mut self, bytes: Option<u64>) {
        self.alloc.set_budget(bytes);
    }
    pub fn module_shape(&self, id: ModuleId) -> PackedShape {
        self.modules[id.index()].shape
    }
    /// Bits of every module, in `ModuleId::index()` order: the EQM this model runs.
    pub fn eqm_bits(&self) -> Vec<u32> {
        self.modules.iter().map(|s| s.shape.bits).collect()
    }

    /// Bytes of the buffers this model holds, counted from the buffers themselves.
    pub fn held_bytes(&self) -> u64 {
        let held = [&self.params, &self.step]
            .into_iter()
            .chain(self.base.all())
            .chain(self.kv.iter().flatten())
            .chain(self.act.all())
            .chain(self.modules.iter().map(|s| &s.buffer));
        held.map(|b| b.bytes()).sum()
    }

    pub fn footprint(&self) -> Footprint {
        let (c, o) = (&self.config, &self.opts);
        Footprint {
            base: base_sizes(c, o, self.base_group).iter().map(|x| x.1).sum(),
            modules: self.modules.iter().map(|s| s.shape.bytes() as u64).sum(),
            kv_cache: self.kv_held_bytes(),
            activations: activation_sizes(c, o).iter().map(|x| x.1).sum(),
        }
    }

    /// Replaces module `id` with another version (another bit-width or group) between tokens.
    /// On any error the model is exactly as before.
    pub async fn set_module(&mut self, id: ModuleId, m: &PackedMatrix) -> GpuResult<()> {
        if id.layer >= self.config.num_hidden_layers {
            return Err(GpuError::Input(format!("no module {id} in this model")));
        }
        Self::check_module(&self.config, id, m)?;
        let gpu = self.gpu.clone();
        let buffer = self
            .alloc
            .upload(
                &gpu.queue,
                &id.to_string(),
                &m.to_bytes(),
                wgpu::BufferUsages::empty(),
            )
            .await?;
        let bits = m.shape.bits;
        let param_slot = self.modules[id.index()].param_slot;
        let io = ModuleIo {
            gpu: &gpu,
            params: &self.params,
            step: &self.step,
            act: &self.act,
            norms: folds_norms(&gpu, &self.opts).then_some(&self.base.norms[id.layer]),
        };
        let (bind_group, norm_bind_group) =
            io.bind_groups(&mut self.kernels, id.kind, bits, param_slot, &buffer);
        let params = qlinear_params(m.shape, id.kind, &self.config);
        gpu.queue.write_buffer(
            &self.params.buffer,
            param_slot * PARAM_SLOT,
            &kernel_param_bytes(Kernel::Matvec(bits), &params),
        );
        // The old buffer is dropped (and destroyed) here, after its replacement is in place;
        // commands prepared with its bind group go with it.
        self.prepared = None;
        self.modules[id.index()] = Slot {
            shape: m.shape,
            buffer,
            bind_group,
            norm_bind_group,
            param_slot,
        };
        // Its group's fused dispatch, over the new buffer and its bit-width.
        let g = &mut self.graph.groups;
        if let Some(g) = g.iter_mut().find(|g| g.members().any(|i| i == id.index())) {
            let bytes = g.param_bytes(&self.modules, &self.config);
            gpu.queue
                .write_buffer(&self.params.buffer, g.param_slot * PARAM_SLOT, &bytes);
            if g.fused.is_some() {
                io.fuse_group(&mut self.kernels, g, &self.modules);
            }
        }
        Ok(())
    }

    /// `set_module` from a shard body (codes then scales, little-endian).
    pub async fn set_module_bytes(
        &mut self,
        id: ModuleId,
        bits: u32,
        group: usize,
        bytes: &[u8],
    ) -> GpuResult<()> {
        let (r, c) = id.kind.shape(&self.config);
        let shape = PackedShape::new(r, c, bits, group)?;
        let m = PackedMatrix::from_bytes(shape, bytes, &id.to_string())?;
        self.set_module(id, &m).await
    }

    fn check_tokens(&self, tokens: &[u32]) -> GpuResult<()> {
        if tokens.is_empty() {
            return Err(GpuError::Input("no tokens to run".into()));
        }
        if let Some(t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(GpuError::Input(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if self.len + tokens.len() > self.opts.context {
            return Err(GpuError::Input(format!(
                "{} tokens after {} cached exceed the context of {} tokens",
                tokens.len(),
                self.len,
                self.opts.context
            )));
        }
        Ok(())
    }

    /// Checks `tokens` and makes room for them in the KV cache.
    async fn admit(&mut self, tokens: &[u32]) -> GpuResult<()> {
        self.check_tokens(tokens)?;
        self.reserve_kv(self.len + tokens.len()).await
    }

    fn dispatch(&self, pass: &mut wgpu::ComputePass, d: &Dispatch, n: u32) {
        match d {
            Dispatch::Fixed(op) => self.op(pass, op, n),
            Dispatch::Combine(op) => {
                if self.graph.combines() {
                    self.op(pass, op, n)
                }
            }
            // Decode folds it into the matvecs after it.
            Dispatch::Norm(op) => {
                if n > 1 {
                    self.op(pass, op, n)
                }
            }
            Dispatch::Module(i) => self.dispatch_module(pass, *i, n),
            Dispatch::Group(g) => {
                let g = &self.graph.groups[*g];
                match (&g.fused, n) {
                    (Some(bind_group), 1) => {
                        let per_wg = self.kernels.matvec_rows_per_workgroup();
                        let grid = Grid::Fixed([g.workgroups(&self.modules, per_wg), 1, 1]);
                        let kernel = g.kernel(self.folds_norms());
                        self.encode(pass, kernel, bind_group, grid, n);
                    }
                    _ => {
                        for i in g.members() {
                            self.dispatch_module(pass, i, n);
                        }
                    }
                }
            }
        }
    }

    /// Module `i` (its slot) at its current version: a matvec in decode, with the norm before
    /// it where norms are folded; a matmul in prefill.
    fn dispatch_module(&self, pass: &mut wgpu::ComputePass, i: usize, n: u32) {
        let s = &self.modules[i];
        let (rows, bits) = (s.shape.rows as u32, s.shape.bits);
        let per_wg = self.kernels.matvec_rows_per_workgroup();
        let matvec = Grid::Fixed([rows.div_ceil(per_wg), 1, 1]);
        let (kernel, bind_group, grid) = match (n, &s.norm_bind_group) {
            (1, Some(bg)) => (Kernel::MatvecNorm(bits), bg, matvec),
            (1, None) => (Kernel::Matvec(bits), &s.bind_group, matvec),
            _ => (
                Kernel::Matmul(bits),
                &s.bind_group,
                Grid::Tiled(rows.div_ceil(WG)),
            ),
        };
        self.encode(pass, kernel, bind_group, grid, n);
    }

    fn op(&self, pass: &mut wgpu::ComputePass, op: &Op, n: u32) {
        self.encode(pass, op.kernel, &op.bind_group, op.grid, n);
    }

    fn encode(
        &self,
        pass: &mut wgpu::ComputePass,
        kernel: Kernel,
        bind_group: &wgpu::BindGroup,
        grid: Grid,
        n: u32,
    ) {
        let [x, y, z] = match grid {
            Grid::Fixed(g) => g,
            Grid::PerToken(x) => [x, n, 1],
            Grid::Tiled(x) => [x, n.div_ceil(TT), 1],
            Grid::Rows => [n, 1, 1],
            Grid::PerTokenZ(x, z) => [x, n, z],
        };
        pass.set_pipeline(self.kernels.pipeline(kernel));
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(x, y, z);
    }

    /// Runs `tokens` (at most `max_batch`) at positions `len..` through the layers and `head`,
    /// and submits; the KV cache grows by `tokens.len()`.
    fn run_chunk(&mut self, tokens: &[u32], targets: &[u32], head: Head) {
        let started = crate::runtime::clock::now_seconds();
        let n = tokens.len() as u32;
        let q = &self.gpu.queue;
        q.write_buffer(&self.step.buffer, 0, &step_bytes(n, self.len as u32));
        q.write_buffer(&self.act.tokens.buffer, 0, bytemuck::cast_slice(tokens));
        if !targets.is_empty() {
            q.write_buffer(&self.act.targets.buffer, 0, bytemuck::cast_slice(targets));
        }
        let commands = match self.prepared.take() {
            Some(c) if n == 1 && head == Head::TopK => c,
            other => {
                self.prepared = other;
                self.encode_chunk(n, head)
            }
        };
        self.gpu.queue.submit([commands]);
        self.len += tokens.len();
        self.encode_seconds = crate::runtime::clock::now_seconds() - started;
    }

    /// Encodes the next one-token step's commands unless they are ready (call after a
    /// submission, so that the encoding overlaps the GPU's work).
    fn prepare_next_step(&mut self) {
        if self.prepared.is_none() {
            self.prepared = Some(self.encode_chunk(1, Head::TopK));
        }
    }

    /// The commands of a chunk of `n` tokens with `head`, and the copies of what comes back.
    fn encode_chunk(&self, n: u32, head: Head) -> wgpu::CommandBuffer {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            self.op(&mut pass, &self.graph.embed, n);
            for d in &self.graph.layers {
                self.dispatch(&mut pass, d, n);
            }
            let g = &self.graph;
            match (head, &g.head_last_norm) {
                // One token: its final norm folded into the head.
                (Head::TopK, Some(op)) if n == 1 => self.op(&mut pass, op, n),
                (Head::TopK, _) => {
                    self.op(&mut pass, &g.final_norm_last, n);
                    self.op(&mut pass, &g.head_last, n);
                }
                (Head::AllLogits | Head::Nll, _) => self.op(&mut pass, &g.final_norm, n),
                (Head::None, _) => {}
            }
            match head {
                Head::TopK => {
                    self.op(&mut pass, &self.graph.topk[0], n);
                    self.op(&mut pass, &self.graph.topk[1], n);
                    if !self.watched.is_empty() {
                        self.op(&mut pass, &self.graph.gather, n);
                    }
                }
                Head::AllLogits => self.op(&mut pass, &self.graph.head_all, n),
                Head::Nll => {
                    self.op(&mut pass, &self.graph.head_all, n);
                    self.op(&mut pass, &self.graph.nll, n);
                }
                Head::None => {}
            }
        }
        let rb = &self.act.readback.buffer;
        match head {
            Head::TopK => {
                // The candidates, log(sum exp(logit)) and the watched logits, in one copy.
                let bytes = 8 * self.opts.top_k as u64 + 4 + 4 * self.watched.len() as u64;
                enc.copy_buffer_to_buffer(&self.act.topk.buffer, 0, rb, 0, bytes);
            }
            Head::Nll => enc.copy_buffer_to_buffer(&self.act.nll.buffer, 0, rb, 0, 4 * n as u64),
            _ => {}
        }
        enc.finish()
    }

    /// Whether decode folds the norms into the matvecs (`ModelOptions::fuse_norm`).
    pub fn folds_norms(&self) -> bool {
        self.graph.head_last_norm.is_some()
    }

    /// Whether decode runs each group of modules in one dispatch (`ModelOptions::
    /// fuse_modules`).
    pub fn fuses_modules(&self) -> bool {
        self.graph.groups.iter().any(|g| g.fused.is_some())
    }

    /// Kernel dispatches of one generated token (embedding, layers, final norm, head, top-k,
    /// the watched tokens' gather when there are any; where norms are folded, neither the
    /// layers' norms nor the final one; where modules are fused, one per group of them;
    /// attention's combine passes only while the cache holds more than one range).
    pub fn dispatches_per_token(&self) -> usize {
        let norms = |d: &&Dispatch| matches!(d, Dispatch::Norm(_));
        let folded = self.graph.layers.iter().filter(norms).count();
        let combine = |d: &&Dispatch| matches!(d, Dispatch::Combine(_));
        let skipped = match self.graph.combines() {
            true => 0,
            false => self.graph.layers.iter().filter(combine).count(),
        };
        let head = if self.graph.head_last_norm.is_some() {
            1
        } else {
            2
        };
        let gather = !self.watched.is_empty() as usize;
        // A group fused is one dispatch, else one per member.
        let groups: usize = (self.graph.groups.iter())
            .map(|g| match g.fused {
                Some(_) => 1,
                None => g.members().count(),
            })
            .sum();
        let grouped = self.graph.groups.len();
        self.graph.layers.len() - grouped + groups - folded - skipped + 1 + head + 2 + gather
    }

    /// Host seconds the last chunk spent before its submission (little when it was prepared).
    pub fn encode_seconds(&self) -> f64 {
        self.encode_seconds
    }

    /// Seconds per token when `tokens` are decoded one at a time without waiting for each
    /// result (each submitted as soon as it is encoded, one wait at the end): the throughput
    /// the adapter and the encoder allow together, without a round trip per token. A
    /// benchmark's figure: the tokens are given, not sampled. The cache grows by `tokens`.
    pub async fn pipelined_seconds(&mut self, tokens: &[u32]) -> GpuResult<f64> {
        self.admit(tokens).await?;
        let t = crate::runtime::clock::now_seconds();
        for &tok in tokens {
            self.run_chunk(&[tok], &[], Head::TopK);
            self.prepare_next_step();
        }
        self.gpu.finished().await;
        Ok((crate::runtime::clock::now_seconds() - t) / tokens.len().max(1) as f64)
    }

    /// Runs `tokens` through every layer in chunks of `max_batch`, `head` on the last chunk.
    async fn run(&mut self, tokens: &[u32], head: Head) -> GpuResult<usize> {
        self.admit(tokens).await?;
        let chunks: Vec<&[u32]> = tokens.chunks(self.opts.max_batch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let h = if i + 1 == chunks.len() {
                head
            } else {
                Head::None
            };
            self.run_chunk(chunk, &[], h);
        }
        Ok(chunks.last().map_or(0, |c| c.len()))
    }

    /// Runs `tokens` after the cached ones and returns the top-k `(token, logit)` of the next
    /// token, best first: the only bytes that come back per generated token.
    pub async fn step(&mut self, tokens: &[u32]) -> GpuResult<Vec<(u32, f32)>> {
        self.run(tokens, Head::TopK).await?;
        self.prepare_next_step();
        let k = self.opts.top_k as usize;
        let bytes = 8 * k + 4 + 4 * self.watched.len();
        let b = self
            .gpu
            .read(&self.act.readback.buffer, bytes as u64)
            .await?;
        let w: &[u32] = bytemuck::cast_slice(&b);
        let top = w[..2 * k]
            .chunks_exact(2)
            .filter(|p| (p[1] as usize) < self.config.vocab_size)
            .map(|p| (p[1], f32::from_bits(p[0])))
            .collect::<Vec<_>>();
        self.log_z = f32::from_bits(w[2 * k]);
        let extra: Vec<(u32, f32)> = self
            .watched
            .iter()
            .zip(&w[2 * k + 1..])
            .filter(|(id, _)| !top.iter().any(|c| c.0 == **id))
            .map(|(&id, &l)| (id, f32::from_bits(l)))
            .collect();
        Ok(top.into_iter().chain(extra).collect())
    }

    /// See `Backend::log_z`.
    pub fn log_z(&self) -> f32 {
        self.log_z
    }

    /// See `Backend::watch`.
    pub fn watch(&mut self, ids: &[u32]) -> GpuResult<()> {
        check_watch(ids, self.config.vocab_size).map_err(|e| GpuError::Input(e.to_string()))?;
        if self.watched != ids {
            // The gather kernel reads the count, then the ids; the prepared commands copy
            // the old list's length back.
            let words: Vec<u32> = std::iter::once(ids.len() as u32)
                .chain(ids.iter().copied())
                .collect();
            self.gpu.queue.write_buffer(
                &self.act.watched_ids.buffer,
                0,
                bytemuck::cast_slice(&words),
            );
            self.watched = ids.to_vec();
            self.prepared = None;
        }
        Ok(())
    }

    /// Runs `tokens` and returns the logits of the last one (tests and debugging; a whole
    /// vocabulary comes back).
    pub async fn logits_last(&mut self, tokens: &[u32]) -> GpuResult<Vec<f32>> {
        self.run(tokens, Head::TopK).await?;
        let v = 4 * self.config.vocab_size as u64;
        self.read_buffer(&self.act.logits.buffer, v).await
    }

    /// Runs `tokens` (at most `logit_rows` in one call) and returns all their logits
    /// `[t][vocab]`.
    pub async fn logits_all(&mut self, tokens: &[u32]) -> GpuResult<Vec<f32>> {
        if tokens.len() > self.opts.logit_rows {
            return Err(GpuError::Input(format!(
                "{} tokens, but logits are kept for {} rows",
                tokens.len(),
                self.opts.logit_rows
            )));
        }
        self.admit(tokens).await?;
        self.run_chunk(tokens, &[], Head::AllLogits);
        let bytes = 4 * (tokens.len() * self.config.vocab_size) as u64;
        self.read_buffer(&self.act.logits.buffer, bytes).await
    }

    /// Runs `tokens` and returns, for each, the negative log-likelihood of `targets[i]` (the
    /// token that follows it), computed on the GPU. Chunks of `logit_rows` tokens.
    pub async fn nll(&mut self, tokens: &[u32], targets: &[u32]) -> GpuResult<Vec<f32>> {
        if targets.len() != tokens.len() {
            return Err(GpuError::Input("one target per token".into()));
        }
        self.check_tokens(targets)
            .map_err(|_| GpuError::Input("bad target ids".into()))?;
        self.admit(tokens).await?;
        let mut out = Vec::with_capacity(tokens.len());
        let rows = self.opts.logit_rows;
        for (tk, tg) in tokens.chunks(rows).zip(targets.chunks(rows)) {
            self.run_chunk(tk, tg, Head::Nll);
            let b = self
                .gpu
                .read(&self.act.readback.buffer, 4 * tk.len() as u64)
                .await?;
            out.extend_from_slice(bytemuck::cast_slice(&b));
        }
        Ok(out)
    }

    /// Copies a device buffer of f32 to the host.
    async fn read_buffer(&self, src: &wgpu::Buffer, bytes: u64) -> GpuResult<Vec<f32>> {
        let b = self.read_bytes(src, bytes).await?;
        Ok(bytemuck::cast_slice(&b).to_vec())
    }

    /// Copies a device buffer to the host through a transient staging buffer.
    async fn read_bytes(&self, src: &wgpu::Buffer, bytes: u64) -> GpuResult<Vec<u8>> {
        let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        self.gpu.queue.submit([enc.finish()]);
        let b = self.gpu.read(&staging, bytes).await?;
        staging.destroy();
        Ok(b)
    }

    /// Runs `tokens` into the KV cache without computing logits (a prompt prefix).
    pub async fn prefill(&mut self, tokens: &[u32]) -> GpuResult<()> {
        self.run(tokens, Head::None).await.map(|_| ())
    }
}
