//! CPU reference forward pass of the Llama family, f32, batched prefill and KV-cached decode.
//!
//! Reads top to bottom like the architecture diagram: embed -> N x (RMSNorm, attention with
//! RoPE and grouped-query heads, residual, RMSNorm, SwiGLU MLP, residual) -> RMSNorm -> head.
//! Each step is a public function so callers (evaluation, the ensemble search) can run a range
//! of layers on cached activations.

use crate::error::{Error, Result};
use crate::model::ops::{self, Rope};
use crate::model::weights::{Linear, ModuleId, ModuleKind, Weights};
use crate::runtime::backend::{KvFormat, KvLayout};
use rayon::prelude::*;

/// Query rows per attention task: bounds the score buffer at QUERY_BLOCK x context.
const QUERY_BLOCK: usize = 64;

/// Keys and values of every layer for positions `0..len`.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
    /// Keys and values rounded as they are stored, as the backends keep them
    /// (`KvCache::stored_as`).
    stored_as: Option<KvLayout>,
}

impl KvCache {
    pub fn new(w: &Weights, capacity: usize) -> Self {
        let c = &w.config;
        let capacity = capacity.min(c.max_position_embeddings);
        let kv_dim = c.kv_dim();
        KvCache {
            k: vec![Vec::with_capacity(capacity * kv_dim); c.num_hidden_layers],
            v: vec![Vec::with_capacity(capacity * kv_dim); c.num_hidden_layers],
            len: 0,
            capacity,
            kv_dim,
            stored_as: None,
        }
    }
    /// A cache whose keys and values are rounded as they are stored to what the backends keep
    /// in `format` (`runtime::backend::KvLayout`: f16 to nearest, or int8: each group's
    /// elements to the nearest of 255 levels in +-its largest magnitude), written here on its
    /// own from the layout's description: the reference the backends' parity tests compare
    /// with. Still f32 in memory.
    pub fn stored_as(w: &Weights, capacity: usize, format: KvFormat) -> Self {
        KvCache {
            stored_as: Some(KvLayout::of(&w.config, format)),
            ..KvCache::new(w, capacity)
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Forgets positions `n..`, e.g. to rewind to a shared prefix.
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len);
        for l in 0..self.k.len() {
            self.k[l].truncate(n * self.kv_dim);
            self.v[l].truncate(n * self.kv_dim);
        }
        self.len = n;
    }
    /// Declares positions `0..n` valid after running layers by hand with `layer`.
    pub fn set_len(&mut self, n: usize) {
        assert!(n <= self.capacity && self.k.iter().all(|k| k.len() >= n * self.kv_dim));
        self.len = n;
    }
    pub fn clear(&mut self) {
        self.truncate(0)
    }
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.capacity * self.kv_dim * 4
    }
}

/// Token embeddings `[t][hidden]`.
pub fn embed(w: &Weights, tokens: &[u32]) -> Result<Vec<f32>> {
    let h = w.config.hidden_size;
    let mut x = Vec::with_capacity(tokens.len() * h);
    for &t in tokens {
        let t = t as usize;
        if t >= w.config.vocab_size {
            return Err(Error::input(format!(
                "token id {t} is outside the vocabulary of {}",
                w.config.vocab_size
            )));
        }
        x.extend_from_slice(&w.embed[t * h..(t + 1) * h]);
    }
    Ok(x)
}

/// Which positions a layer's rows hold.
pub enum Rows<'a> {
    /// One sequence at positions `pos0..`, its keys and values written into `cache` at `pos0..`
    /// (the caller sets the cache length afterwards).
    Cached { pos0: usize, cache: &'a mut KvCache },
    /// Independent sequences of `seq_len` rows each, every one at positions `0..seq_len`
    /// (windows scored at once; no cache kept).
    Sequences { seq_len: usize },
}

/// Called before each stage of a layer with the modules that read one input and that input's
/// rows (`[t][cols]`); returns the weights to apply, one per module, in the same order. GPTQ
/// quantizes against the input it is shown; plain runs return the layer's own modules.
pub type Stage<'a> = dyn FnMut(&[ModuleKind], &[f32]) -> Result<Vec<Linear>> + 'a;

/// Runs layer `l` on `x` (`[t][hidden]`, positions `pos0..`) in place, writing this layer's
/// keys and values into the cache at `pos0..` (the caller sets the cache length afterwards).
pub fn layer(w: &Weights, l: usize, x: &mut [f32], pos0: usize, cache: &mut KvCache, rope: &Rope) {
    layer_staged(
        w,
        l,
        x,
        Rows::Cached { pos0, cache },
        rope,
        &mut own_modules(w, l),
    )
    .expect("a layer's own modules always fit it")
}

/// Runs layer `l` on `x`, independent sequences of `seq_len` rows (`rope` from position 0):
/// one GEMM per module over all of them.
pub fn layer_seqs(w: &Weights, l: usize, x: &mut [f32], seq_len: usize, rope: &Rope) {
    layer_staged(
        w,
        l,
        x,
        Rows::Sequences { seq_len },
        rope,
        &mut own_modules(w, l),
    )
    .expect("a layer's own modules always fit it")
}

/// The stage that applies layer `l`'s own modules (`Linear` clones share their weights).
fn own_modules(
    w: &Weights,
    l: usize,
) -> impl FnMut(&[ModuleKind], &[f32]) -> Result<Vec<Linear>> + '_ {
    move |kinds, _| {
        Ok(kinds
            .iter()
            .map(|&kind| w.module(ModuleId { layer: l, kind }).clone())
            .collect())
    }
}

/// The decoder layer, the one place it is written: RMSNorm, q/k/v, RoPE, grouped-query
/// attention, o and the residual, RMSNorm, SwiGLU and the residual, in four stages (the inputs
/// of {q, k, v}, {o}, {gate, up}, {down}), each applying the weights `stage` returns for it.
pub fn layer_staged(
    w: &Weights,
    l: usize,
    x: &mut [f32],
    rows: Rows,
    rope: &Rope,
    stage: &mut Stage,
) -> Result<()> {
    let c = &w.config;
    let (h, hd, f) = (c.hidden_size, c.head_dim(), c.intermediate_size);
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let t = x.len() / h;
    let mut run = |kinds: &[ModuleKind], input: &[f32]| -> Result<Vec<Linear>> {
        let lins = stage(kinds, input)?;
        if lins.len() != kinds.len() {
            return Err(Error::input("stage returned the wrong number of modules"));
        }
        Ok(lins)
    };

    let mut xn = vec![0f32; t * h];
    ops::rmsnorm(x, &w.norms[l].attn_norm, c.rms_norm_eps, &mut xn);
    let qkv = run(&[ModuleKind::Q, ModuleKind::K, ModuleKind::V], &xn)?;
    let mut q = vec![0f32; t * q_dim];
    let mut k = vec![0f32; t * kv_dim];
    let mut v = vec![0f32; t * kv_dim];
    ops::linear(&xn, t, &qkv[0], &mut q);
    ops::linear(&xn, t, &qkv[1], &mut k);
    ops::linear(&xn, t, &qkv[2], &mut v);
    let att = match rows {
        Rows::Cached { pos0, cache } => {
            rope.apply(&mut q, c.num_attention_heads);
            rope.apply(&mut k, c.n_kv_heads());
            cache.k[l].truncate(pos0 * cache.kv_dim);
            cache.v[l].truncate(pos0 * cache.kv_dim);
            match cache.stored_as {
                Some(l) if l.format == KvFormat::Int8 => {
                    for g in k.chunks_mut(l.group).chain(v.chunks_mut(l.group)) {
                        let m = g
                            .iter()
                            .map(|x| x.abs())
                            .fold(0f32, f32::max)
                            .min(crate::runtime::backend::KV_SCALE_MAX);
                        if m > 0.0 {
                            g.iter_mut()
                                .for_each(|x| *x = (*x / m * 127.0).round() / 127.0 * m);
                        }
                    }
                }
                Some(_) => k.iter_mut().chain(v.iter_mut()).for_each(|x| {
                    *x = half::f16::from_bits(crate::model::math::f16_bits(*x)).to_f32()
                }),
                None => {}
            }
            cache.k[l].extend_from_slice(&k);
            cache.v[l].extend_from_slice(&v);
            attention(c, &q, &cache.k[l], &cache.v[l], pos0, t, hd)
        }
        Rows::Sequences { seq_len } => {
            assert_eq!(t % seq_len, 0, "layer_staged: rows are not whole sequences");
            let mut att = Vec::with_capacity(t * q_dim);
            for s in 0..t / seq_len {
                let qs = &mut q[s * seq_len * q_dim..(s + 1) * seq_len * q_dim];
                let ks = &mut k[s * seq_len * kv_dim..(s + 1) * seq_len * kv_dim];
                let vs = &v[s * seq_len * kv_dim..(s + 1) * seq_len * kv_dim];
                rope.apply(qs, c.num_attention_heads);
                rope.apply(ks, c.n_kv_heads());
                att.extend(attention(c, qs, ks, vs, 0, seq_len, hd));
            }
            att
        }
    };

    let o_w = run(&[ModuleKind::O], &att)?;
    let mut o = vec![0f32; t * h];
    ops::linear(&att, t, &o_w[0], &mut o);
    for (a, b) in x.iter_mut().zip(&o) {
        *a += b;
    }

    ops::rmsnorm(x, &w.norms[l].ffn_norm, c.rms_norm_eps, &mut xn);
    let gu = run(&[ModuleKind::Gate, ModuleKind::Up], &xn)?;
    let mut gate = vec![0f32; t * f];
    let mut up = vec![0f32; t * f];
    ops::linear(&xn, t, &gu[0], &mut gate);
    ops::linear(&xn, t, &gu[1], &mut up);
    for (g, u) in gate.iter_mut().zip(&up) {
        *g = ops::silu(*g) * u;
    }
    drop(up);
    let down = run(&[ModuleKind::Down], &gate)?;
    ops::linear(&gate, t, &down[0], &mut o);
    for (a, b) in x.iter_mut().zip(&o) {
        *a += b;
    }
    Ok(())
}

/// Causal grouped-query attention of `t` new queries (absolute positions `pos0..`) over all
/// cached keys; returns `[t][q_dim]`.
pub fn attention(
    c: &crate::model::LlamaConfig,
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos0: usize,
    t: usize,
    hd: usize,
) -> Vec<f32> {
    let (nh, q_dim, kv_dim) = (c.num_attention_heads, c.q_dim(), c.kv_dim());
    let group = nh / c.n_kv_heads();
    let scale = 1.0 / (hd as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..nh)
        .flat_map(|h| (0..t).step_by(QUERY_BLOCK).map(move |r| (h, r)))
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(h, r0)| {
            let rows = QUERY_BLOCK.min(t - r0);
            let keys = pos0 + r0 + rows; // the last query sees this many keys
            let kvh = h / group;
            let mut s = vec![0f32; rows * keys];
            ops::gemm_nt(
                rows,
                keys,
                hd,
                &q[r0 * q_dim + h * hd..],
                q_dim,
                &kc[kvh * hd..],
                kv_dim,
                &mut s,
                keys,
                false,
            );
            for (i, row) in s.chunks_exact_mut(keys).enumerate() {
                let visible = pos0 + r0 + i + 1;
                let live = &mut row[..visible];
                let mx = live
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &b| a.max(b * scale));
                for e in live.iter_mut() {
                    *e = crate::model::math::exp(*e * scale - mx);
                }
                let sum: f32 = live.iter().sum();
                for e in live.iter_mut() {
                    *e /= sum;
                }
                row[visible..].fill(0.0);
            }
            let mut out = vec![0f32; rows * hd];
            ops::gemm_nn(
                rows,
                hd,
                keys,
                &s,
                keys,
                &vc[kvh * hd..],
                kv_dim,
                &mut out,
                hd,
                false,
            );
            out
        })
        .collect();
    let mut att = vec![0f32; t * q_dim];
    for (&(h, r0), part) in tasks.iter().zip(&parts) {
        for (i, o) in part.chunks_exact(hd).enumerate() {
            let base = (r0 + i) * q_dim + h * hd;
            att[base..base + hd].copy_from_slice(o);
        }
    }
    att
}

/// Final RMSNorm, in place.
pub fn final_norm(w: &Weights, x: &mut [f32]) {
    let src = x.to_vec();
    ops::rmsnorm(&src, &w.final_norm, w.config.rms_norm_eps, x);
}

/// Logits `[rows][vocab]` of already final-normed hidden states.
pub fn logits(w: &Weights, xn: &[f32]) -> Vec<f32> {
    let (h, vocab) = (w.config.hidden_size, w.config.vocab_size);
    let rows = xn.len() / h;
    let mut out = vec![0f32; rows * vocab];
    match &w.lm_head {
        Some(head) => ops::linear(xn, rows, head, &mut out),
        None => ops::matmul_nt(xn, rows, &w.embed, vocab, h, &mut out),
    }
    out
}

/// Runs `tokens` at positions `cache.len()..` through every layer and returns the final-normed
/// hidden states `[t][hidden]`; the cache grows by `tokens.len()`.
pub fn hidden(w: &Weights, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let pos0 = cache.len;
    if tokens.is_empty() {
        return Err(Error::input("no tokens to run"));
    }
    if pos0 + tokens.len() > cache.capacity {
        return Err(Error::input(format!(
            "{} tokens after {pos0} cached exceed the context of {} tokens",
            tokens.len(),
            cache.capacity
        )));
    }
    let c = &w.config;
    let mut x = embed(w, tokens)?;
    let rope = Rope::new(c.rope_theta, c.head_dim(), pos0, tokens.len());
    for l in 0..c.num_hidden_layers {
        layer(w, l, &mut x, pos0, cache, &rope);
    }
    cache.len = pos0 + tokens.len();
    final_norm(w, &mut x);
    Ok(x)
}

/// Logits of the last token only (decode and generation).
pub fn forward_last(w: &Weights, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let x = hidden(w, tokens, cache)?;
    let h = w.config.hidden_size;
    Ok(logits(w, &x[x.len() - h..]))
}

/// Logits of every token `[t][vocab]`.
pub fn forward_all(w: &Weights, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let x = hidden(w, tokens, cache)?;
    Ok(logits(w, &x))
}
