//! The model's device buffers, each created under its name and counted by the allocator: the
//! base (embedding and head, norms, RoPE table), the KV cache and the activations. Their sizes
//! follow from the config and options alone (`base_sizes`, `activation_sizes`), which is what
//! `Model::footprint` and `Model::requirements` read.

use crate::ensemble::base::{Base, BASE_BITS};
use crate::ensemble::format::PackedShape;
use crate::gpu::alloc::{Allocator, GpuBuffer};
use crate::gpu::error::{GpuError, GpuResult};
use crate::gpu::graph::param_slots;
use crate::gpu::kernels::{self, PARAM_SLOT};
use crate::gpu::model::ModelOptions;
use crate::model::config::LlamaConfig;
use crate::runtime::backend::KvFormat;
use crate::runtime::generate::MAX_WATCHED;

/// The packed shape of the embedding (and of an untied head).
pub(crate) fn table_shape(c: &LlamaConfig, group: usize) -> GpuResult<PackedShape> {
    PackedShape::new(c.vocab_size, c.hidden_size, BASE_BITS, group)
        .map_err(|e| GpuError::Input(format!("embedding: {e}")))
}

pub(crate) fn topk_chunks(c: &LlamaConfig) -> u64 {
    (c.vocab_size as u64).div_ceil(kernels::TOPK_CHUNK as u64)
}

/// Ranges attention cuts a cache of `o.context` positions into (`kernels::ATTENTION_SPLIT_KEYS`
/// keys each): fixed per model, so a token's commands do not depend on its position (those
/// dispatched follow the allocated cache: `attention_ranges`).
pub(crate) fn attention_splits(o: &ModelOptions) -> u32 {
    (o.context as u32)
        .div_ceil(kernels::ATTENTION_SPLIT_KEYS)
        .max(1)
}

/// Ranges attention is dispatched over while the cache has room for `kv_positions` positions:
/// the others start past every query's keys (and `combine` does not read them), so a short
/// conversation's attention costs what its cache holds, not the whole context.
pub(crate) fn attention_ranges(o: &ModelOptions, kv_positions: usize) -> u32 {
    (kv_positions as u32)
        .div_ceil(kernels::ATTENTION_SPLIT_KEYS)
        .clamp(1, attention_splits(o))
}

/// Bytes of one layer's keys (or values) at the most (the cache grows to `o.context`
/// positions; `rope.wgsl`).
pub(crate) fn kv_layer_bytes(c: &LlamaConfig, o: &ModelOptions) -> u64 {
    crate::runtime::backend::kv_layer_bytes(c, o.kv_format, o.context)
}

/// (name, bytes) of every activation buffer (`Activations::create` finds each by its name).
pub(crate) fn activation_sizes(c: &LlamaConfig, o: &ModelOptions) -> [(&'static str, u64); 16] {
    let b = o.max_batch as u64;
    let f = |n: usize| 4 * b * n as u64;
    let k = o.top_k as u64;
    [
        ("x", f(c.hidden_size)),
        ("xn", f(c.hidden_size)),
        ("q", f(c.q_dim())),
        // The K and V projections' rows, before RoPE stores them into the f16 cache.
        ("new keys", f(c.kv_dim())),
        ("new values", f(c.kv_dim())),
        ("att", f(c.q_dim())),
        ("gate", f(c.intermediate_size)),
        // Per token, head and range of the cache: (max, sum, head_dim values).
        (
            "attention partials",
            match attention_splits(o) {
                1 => 4,
                s => 4 * b * (c.num_attention_heads * (c.head_dim() + 2)) as u64 * s as u64,
            },
        ),
        ("logits", 4 * o.logit_rows as u64 * c.vocab_size as u64),
        ("tokens", 4 * b),
        ("targets", 4 * b),
        ("nll", 4 * b),
        // Each chunk's k candidates, then its softmax (max, sum) pair (topk.wgsl).
        ("top-k candidates", 8 * (k + 1) * topk_chunks(c)),
        // The k candidates, log(sum exp(logit)), then the watched tokens' logits.
        ("top-k", 8 * k + 4 + 4 * MAX_WATCHED as u64),
        // The count, then the ids (`gather.wgsl`).
        ("watched ids", 4 * (1 + MAX_WATCHED as u64)),
        ("readback", (8 * k + 4 + 4 * MAX_WATCHED as u64).max(4 * b)),
    ]
}

/// (name, bytes) of every base buffer: the parameter and step uniforms, then `BaseBuffers`.
pub(crate) fn base_sizes(c: &LlamaConfig, o: &ModelOptions, group: usize) -> Vec<(String, u64)> {
    let h = c.hidden_size as u64;
    let table = table_shape(c, group).map_or(0, |s| s.bytes() as u64);
    let mut v = vec![
        ("params".to_string(), param_slots(c, o) * PARAM_SLOT),
        ("step".to_string(), 16),
        ("embedding".to_string(), table),
    ];
    if !c.tie_word_embeddings {
        v.push(("lm_head".to_string(), table));
    }
    for l in 0..c.num_hidden_layers {
        v.push((format!("L{l}.attn_norm"), 4 * h));
        v.push((format!("L{l}.ffn_norm"), 4 * h));
    }
    v.push(("final_norm".to_string(), 4 * h));
    v.push(("rope".to_string(), 4 * (o.context * c.head_dim()) as u64));
    v
}

/// cos then sin, `[context][head_dim / 2]` each, computed in f64 like the CPU path.
fn rope_table(c: &LlamaConfig, context: usize) -> Vec<f32> {
    let hd = c.head_dim();
    let half = hd / 2;
    let angle = |p: usize, i: usize| {
        let inv_freq = (c.rope_theta as f64).powf(-(2.0 * i as f64) / hd as f64);
        p as f64 * inv_freq
    };
    let mut t = Vec::with_capacity(context * hd);
    for f in [f64::cos, f64::sin] {
        for p in 0..context {
            for i in 0..half {
                t.push(f(angle(p, i)) as f32);
            }
        }
    }
    t
}

/// The ensemble's base on the device.
pub(crate) struct BaseBuffers {
    pub embed: GpuBuffer,
    /// An untied head (tied models read `embed`).
    pub lm_head: Option<GpuBuffer>,
    /// `[attn_norm, ffn_norm]` per layer.
    pub norms: Vec<[GpuBuffer; 2]>,
    pub final_norm: GpuBuffer,
    pub rope: GpuBuffer,
}

impl BaseBuffers {
    /// Uploads `bt` (checked against `c` by the caller, but for the head's tying).
    pub async fn upload(
        alloc: &Allocator,
        q: &wgpu::Queue,
        c: &LlamaConfig,
        o: &ModelOptions,
        bt: &Base,
    ) -> GpuResult<BaseBuffers> {
        let storage = wgpu::BufferUsages::empty();
        match (&bt.lm_head, c.tie_word_embeddings) {
            (Some(_), true) => return Err(GpuError::Input("tied config with an lm_head".into())),
            (None, false) => {
                return Err(GpuError::Input("untied config without an lm_head".into()))
            }
            _ => {}
        }
        let embed = alloc
            .upload(q, "embedding", &bt.embed.to_bytes(), storage)
            .await?;
        let lm_head = match &bt.lm_head {
            Some(h) => Some(alloc.upload(q, "lm_head", &h.to_bytes(), storage).await?),
            None => None,
        };
        let mut norms = Vec::new();
        for (l, n) in bt.norms.iter().enumerate() {
            let attn = format!("L{l}.attn_norm");
            let ffn = format!("L{l}.ffn_norm");
            norms.push([
                alloc
                    .upload(q, &attn, bytemuck::cast_slice(&n.attn_norm), storage)
                    .await?,
                alloc
                    .upload(q, &ffn, bytemuck::cast_slice(&n.ffn_norm), storage)
                    .await?,
            ]);
        }
        let final_norm = alloc
            .upload(
                q,
                "final_norm",
                bytemuck::cast_slice(&bt.final_norm),
                storage,
            )
            .await?;
        let rope = alloc
            .upload(
                q,
                "rope",
                bytemuck::cast_slice(&rope_table(c, o.context)),
                storage,
            )
            .await?;
        Ok(BaseBuffers {
            embed,
            lm_head,
            norms,
            final_norm,
            rope,
        })
    }

    /// The table the head reads: the untied head, else the embedding.
    pub fn head(&self) -> &GpuBuffer {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    pub fn all(&self) -> impl Iterator<Item = &GpuBuffer> {
        [&self.embed]
            .into_iter()
            .chain(&self.lm_head)
            .chain(self.norms.iter().flatten())
            .chain([&self.final_norm, &self.rope])
    }
}

/// The KV cache: `[k, v]` per layer, `positions` positions each in `format`.
pub(crate) async fn create_kv(
    alloc: &Allocator,
    c: &LlamaConfig,
    format: KvFormat,
    positions: usize,
) -> GpuResult<Vec<[GpuBuffer; 2]>> {
    let mut kv = Vec::new();
    for l in 0..c.num_hidden_layers {
        kv.push(create_kv_layer(alloc, c, format, positions, l).await?);
    }
    Ok(kv)
}

/// Layer `l`'s keys and values for `positions` positions in `format`.
pub(crate) async fn create_kv_layer(
    alloc: &Allocator,
    c: &LlamaConfig,
    format: KvFormat,
    positions: usize,
    l: usize,
) -> GpuResult<[GpuBuffer; 2]> {
    let bytes = crate::runtime::backend::kv_layer_bytes(c, format, positions);
    // COPY_SRC: a cache that grows is copied into the larger one.
    let st =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    Ok([
        alloc.create(&format!("L{l}.k_cache"), bytes, st).await?,
        alloc.create(&format!("L{l}.v_cache"), bytes, st).await?,
    ])
}

/// Buffers sized by `max_batch` tokens (and `logit_rows` rows of logits).
pub(crate) struct Activations {
    pub x: GpuBuffer,
    pub xn: GpuBuffer,
    pub q: GpuBuffer,
    pub k_new: GpuBuffer,
    pub v_new: GpuBuffer,
    pub att: GpuBuffer,
    pub gate: GpuBuffer,
    /// Attention's partials over ranges of the cache (`attention_splits`).
    pub att_part: GpuBuffer,
    pub logits: GpuBuffer,
    pub tokens: GpuBuffer,
    pub targets: GpuBuffer,
    pub nll: GpuBuffer,
    pub cand: GpuBuffer,
    pub topk: GpuBuffer,
    pub watched_ids: GpuBuffer,
    pub readback: GpuBuffer,
}

impl Activations {
    pub async fn create(
        alloc: &Allocator,
        c: &LlamaConfig,
        o: &ModelOptions,
    ) -> GpuResult<Activations> {
        let sizes = activation_sizes(c, o);
        let make = |name: &'static str| {
            let bytes = sizes
                .iter()
                .find(|s| s.0 == name)
                .expect("a named activation")
                .1;
            let usage = if name == "readback" {
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST
            } else {
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC
            };
            alloc.create(name, bytes, usage)
        };
        Ok(Activations {
            x: make("x").await?,
            xn: make("xn").await?,
            q: make("q").await?,
            k_new: make("new keys").await?,
            v_new: make("new values").await?,
            att: make("att").await?,
            gate: make("gate").await?,
            att_part: make("attention partials").await?,
            logits: make("logits").await?,
            tokens: make("tokens").await?,
            targets: make("targets").await?,
            nll: make("nll").await?,
            cand: make("top-k candidates").await?,
            topk: make("top-k").await?,
            watched_ids: make("watched ids").await?,
            readback: make("readback").await?,
        })
    }

    pub fn all(&self) -> [&GpuBuffer; 16] {
        [
            &self.x,
            &self.xn,
            &self.q,
            &self.k_new,
            &self.v_new,
            &self.att,
            &self.gate,
            &self.att_part,
            &self.logits,
            &self.tokens,
            &self.targets,
            &self.nll,
            &self.cand,
            &self.topk,
            &self.watched_ids,
            &self.readback,
        ]
    }
}
