//! CPU reference forward pass of the Llama family, f32, batched prefill and KV-cached decode.
//!
//! Reads top to bottom like the architecture diagram: embed -> N x (RMSNorm, attention with
//! RoPE and grouped-query heads, residual, RMSNorm, SwiGLU MLP, residual) -> RMSNorm -> head.
//! Each step is a public function so callers (evaluation, the ensemble search) can run a range
//! of layers on cached activations.

use crate::error::{Error, Result};
use crate::model::ops::{self, Rope};
use crate::model::weights::{ModuleId, ModuleKind, Weights};
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

/// Runs layer `l` on `x` (`[t][hidden]`, positions `pos0..`) in place, writing this layer's
/// keys and values into the cache at `pos0..` (the caller sets the cache length afterwards).
pub fn layer(w: &Weights, l: usize, x: &mut [f32], pos0: usize, cache: &mut KvCache, rope: &Rope) {
    layer_tapped(w, l, x, pos0, cache, rope, &mut |_, _| {})
}

/// The input rows (`[t][cols]`) each module of a layer sees; GPTQ collects its Hessians and the
/// builder its output-error proxies from these.
pub type Tap<'a> = dyn FnMut(ModuleKind, &[f32]) + 'a;

/// `layer`, calling `tap(kind, input)` with the input of every module before it is applied.
pub fn layer_tapped(
    w: &Weights,
    l: usize,
    x: &mut [f32],
    pos0: usize,
    cache: &mut KvCache,
    rope: &Rope,
    tap: &mut Tap,
) {
    let c = &w.config;
    let (h, hd) = (c.hidden_size, c.head_dim());
    let t = x.len() / h;
    let m = |kind| w.module(ModuleId { layer: l, kind });
    let mut xn = vec![0f32; t * h];
    ops::rmsnorm(x, &w.norms[l].attn_norm, c.rms_norm_eps, &mut xn);

    tap(ModuleKind::Q, &xn);
    tap(ModuleKind::K, &xn);
    tap(ModuleKind::V, &xn);
    let mut q = vec![0f32; t * c.q_dim()];
    let mut k = vec![0f32; t * c.kv_dim()];
    let mut v = vec![0f32; t * c.kv_dim()];
    ops::linear(&xn, t, m(ModuleKind::Q), &mut q);
    ops::linear(&xn, t, m(ModuleKind::K), &mut k);
    ops::linear(&xn, t, m(ModuleKind::V), &mut v);
    rope.apply(&mut q, c.num_attention_heads);
    rope.apply(&mut k, c.n_kv_heads());
    cache.k[l].truncate(pos0 * cache.kv_dim);
    cache.v[l].truncate(pos0 * cache.kv_dim);
    cache.k[l].extend_from_slice(&k);
    cache.v[l].extend_from_slice(&v);

    let att = attention(c, &q, &cache.k[l], &cache.v[l], pos0, t, hd);
    tap(ModuleKind::O, &att);
    let mut o = vec![0f32; t * h];
    ops::linear(&att, t, m(ModuleKind::O), &mut o);
    for (a, b) in x.iter_mut().zip(&o) {
        *a += b;
    }

    ops::rmsnorm(x, &w.norms[l].ffn_norm, c.rms_norm_eps, &mut xn);
    let f = c.intermediate_size;
    tap(ModuleKind::Gate, &xn);
    tap(ModuleKind::Up, &xn);
    let mut gate = vec![0f32; t * f];
    let mut up = vec![0f32; t * f];
    ops::linear(&xn, t, m(ModuleKind::Gate), &mut gate);
    ops::linear(&xn, t, m(ModuleKind::Up), &mut up);
    for (g, u) in gate.iter_mut().zip(&up) {
        *g = ops::silu(*g) * u;
    }
    tap(ModuleKind::Down, &gate);
    ops::linear(&gate, t, m(ModuleKind::Down), &mut o);
    for (a, b) in x.iter_mut().zip(&o) {
        *a += b;
    }
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
                let mut sum = 0f32;
                for e in live.iter_mut() {
                    *e = (*e * scale - mx).exp();
                    sum += *e;
                }
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
