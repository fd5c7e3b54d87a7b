//! Calibration for the quantizers: which tokens, and the layer-by-layer pass that shows each
//! module the inputs it sees in a (partly) quantized model.
//!
//! Calibration data: `sequences` windows of `seq_len` tokens, evenly spaced over the tokenized
//! calibration text (deterministic, and spread over all of it rather than one chapter).
//!
//! `layer_staged` runs one transformer layer on *all* calibration rows at once, in four stages
//! — the inputs of {q, k, v}, {o}, {gate, up}, {down} — and before each stage asks the caller
//! which weights to apply to that input. The caller sees the exact input rows (to build the
//! Hessian), quantizes the modules, and returns the version this stream should continue with.
//! That is GPTQ's "true sequential" order (later modules of a layer see the outputs of the
//! already-quantized earlier ones) at the cost of a single forward per layer, and with one
//! large GEMM per module over all calibration rows instead of one per sequence.

use crate::error::{Error, Result};
use crate::model::forward;
use crate::model::ops::{self, Rope};
use crate::model::weights::{Linear, ModuleKind, Weights};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibSettings {
    pub sequences: usize,
    pub seq_len: usize,
}

impl CalibSettings {
    pub fn tokens(&self) -> usize {
        self.sequences * self.seq_len
    }
}

/// The calibration tokens: `sequences` windows of `seq_len`, evenly spaced over `ids`,
/// concatenated (`[sequences * seq_len]`).
pub fn sample(ids: &[u32], s: CalibSettings) -> Result<Vec<u32>> {
    if s.sequences == 0 || s.seq_len < 2 {
        return Err(Error::input(format!(
            "calibration needs at least 1 sequence of at least 2 tokens (got {} x {})",
            s.sequences, s.seq_len
        )));
    }
    if ids.len() < s.tokens() {
        return Err(Error::input(format!(
            "calibration text has {} tokens; {} sequences of {} need {}",
            ids.len(),
            s.sequences,
            s.seq_len,
            s.tokens()
        )));
    }
    let room = ids.len() - s.seq_len;
    let step = if s.sequences > 1 {
        room / (s.sequences - 1)
    } else {
        0
    };
    Ok((0..s.sequences)
        .flat_map(|i| ids[i * step..i * step + s.seq_len].iter().copied())
        .collect())
}

/// Called before each stage of a layer with the modules that read one input and that input's
/// rows (`[t][cols]`); returns the weights to apply, one per module, in the same order.
pub type Stage<'a> = dyn FnMut(&[ModuleKind], &[f32]) -> Result<Vec<Linear>> + 'a;

/// Runs layer `l` on `x` (`[sequences * seq_len][hidden]`, independent sequences each at
/// positions `0..seq_len`) in place; `rope` covers positions `0..seq_len`.
pub fn layer_staged(
    w: &Weights,
    l: usize,
    x: &mut [f32],
    seq_len: usize,
    rope: &Rope,
    stage: &mut Stage,
) -> Result<()> {
    let c = &w.config;
    let (h, hd, f) = (c.hidden_size, c.head_dim(), c.intermediate_size);
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let t = x.len() / h;
    assert_eq!(t % seq_len, 0, "layer_staged: rows are not whole sequences");
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
    let mut att = Vec::with_capacity(t * q_dim);
    for s in 0..t / seq_len {
        let (qs, ks, vs) = (
            &mut q[s * seq_len * q_dim..(s + 1) * seq_len * q_dim],
            &mut k[s * seq_len * kv_dim..(s + 1) * seq_len * kv_dim],
            &v[s * seq_len * kv_dim..(s + 1) * seq_len * kv_dim],
        );
        rope.apply(qs, c.num_attention_heads);
        rope.apply(ks, c.n_kv_heads());
        att.extend(forward::attention(c, qs, ks, vs, 0, seq_len, hd));
    }

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
