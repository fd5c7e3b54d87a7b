//! Causal grouped-query attention over the KV cache (widened to f32 per layer, `cpu::kv`), one
//! (token, head) pair per task.

use crate::cpu::par;
use crate::model::LlamaConfig;

/// Attention of `t` queries (`q`: `[t][q_dim]`, absolute positions `pos0..`) over the cached
/// keys and values (`[positions][kv_dim]`, positions `0 .. pos0 + t` filled) into `out`
/// (`[t][q_dim]`).
pub fn attention(c: &LlamaConfig, q: &[f32], k: &[f32], v: &[f32], pos0: usize, out: &mut [f32]) {
    let (nh, hd, kv_dim) = (c.num_attention_heads, c.head_dim(), c.kv_dim());
    let group = nh / c.n_kv_heads();
    let scale = 1.0 / (hd as f32).sqrt();
    par::chunks_mut(out, hd, |i, o| {
        let (tok, h) = (i / nh, i % nh);
        let kvh = h / group;
        let qh = &q[i * hd..(i + 1) * hd];
        let keys = pos0 + tok + 1;
        let mut s: Vec<f32> = (0..keys)
            .map(|j| {
                let kj = &k[j * kv_dim + kvh * hd..][..hd];
                crate::model::math::dot(qh, kj) * scale
            })
            .collect();
        let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for e in &mut s {
            *e = crate::model::math::exp(*e - mx);
        }
        let sum: f32 = s.iter().sum();
        o.fill(0.0);
        for (j, &w) in s.iter().enumerate() {
            let vj = &v[j * kv_dim + kvh * hd..][..hd];
            let w = w / sum;
            for (a, b) in o.iter_mut().zip(vj) {
                *a += w * b;
            }
        }
    });
}
