//! Causal grouped-query attention read straight from the KV cache's stored bytes (f16 or int8,
//! `cpu::kv`), tiled as flash attention is: a task takes a block of query tokens, one KV head
//! (and the query heads that share it) and a range of keys; it widens `TILE` keys and values
//! at a time into a scratch that stays in L1, scores every query of the block against them and
//! keeps a running softmax (max, sum and weighted values). A decode token's keys are split in
//! ranges of `SPLIT` so that a long cache is read by several threads; the ranges' partial
//! softmaxes are combined at the end (flash decoding).
//!
//! The cache used to be widened to f32 whole, per layer and token, before attention read it
//! three times (once per query head of a group): at 1,529 cached positions a decode token wrote
//! and re-read 70 MB for that, which made attention ~35% of the token (README, stop 45).

use crate::cpu::{kv, par};
use crate::model::math::exp;
use crate::model::LlamaConfig;
use crate::runtime::backend::KvLayout;
use std::ops::Range;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd;

/// Keys (and values) widened at a time: 2 x 64 x 64 f32 = 32 KB at a head of 64.
const TILE: usize = 64;
/// Query tokens per task: each widened tile serves `QUERY_BLOCK` x group queries.
const QUERY_BLOCK: usize = 16;
/// Keys per task when a call has few query tokens (decode): 1,529 cached keys are 6 tasks per
/// KV head. Larger calls (prefill) have enough tasks from their query blocks, and one range.
const SPLIT: usize = 256;
/// Query tokens up to which keys are split.
const SPLIT_BELOW: usize = 4;

thread_local! {
    /// A task's widened tile of keys then values (`2 x TILE x head_dim`), reused.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The cache one layer holds: keys and values for positions `0..` as stored (`layout`, `row`
/// bytes per position: every KV head's `layout.head_bytes()` in order).
pub struct Cached<'a> {
    pub k: &'a [u8],
    pub v: &'a [u8],
    pub layout: &'a KvLayout,
}

/// A running softmax over some keys for one query: its largest score `m`, the sum `l` of
/// `exp(score - m)` and the values weighted by them (`acc`, `head_dim`).
struct Partial<'a> {
    m: &'a mut f32,
    l: &'a mut f32,
    acc: &'a mut [f32],
}

impl<'a> Partial<'a> {
    /// An empty softmax in `w` (`[m, l, acc..]`).
    fn new(w: &'a mut [f32]) -> Self {
        let (ml, acc) = w.split_at_mut(2);
        let (m, l) = ml.split_at_mut(1);
        m[0] = f32::NEG_INFINITY;
        l[0] = 0.0;
        acc.fill(0.0);
        Partial {
            m: &mut m[0],
            l: &mut l[0],
            acc,
        }
    }

    /// Takes in the scores `s` (scaled; overwritten with their weights) of keys whose widened
    /// values are `values` (`[s.len()][head_dim]`).
    fn add(&mut self, s: &mut [f32], values: &[f32]) {
        let mt = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let m = self.m.max(mt);
        let correction = if *self.m == f32::NEG_INFINITY {
            0.0
        } else {
            exp(*self.m - m)
        };
        let sum = exp_sum(s, m);
        *self.l = *self.l * correction + sum;
        *self.m = m;
        if correction != 1.0 {
            self.acc.iter_mut().for_each(|a| *a *= correction);
        }
        weigh_values(s, values, self.acc);
    }
}

/// Lanes the inner loops keep in registers (two SSE / wasm SIMD vectors, one AVX vector).
const LANES: usize = 8;

/// Each `e` of `s` becomes `exp(e - m)`; returns their sum (`LANES` partial sums, then in
/// lane order).
fn exp_sum(s: &mut [f32], m: f32) -> f32 {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return simd::exp_sum(s, m);
    #[allow(unreachable_code)]
    {
        for e in s.iter_mut() {
            *e = exp(*e - m);
        }
        let mut lanes = [0f32; LANES];
        for c in s.chunks(LANES) {
            lanes.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
        lanes.iter().sum()
    }
}

/// `q`'s dot products with a tile's keys (`keys`: `[s.len()][head_dim]`), times `scale`, into
/// `s`; `LANES` partial sums in registers per key.
fn score(q: &[f32], keys: &[f32], scale: f32, s: &mut [f32]) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    let done = simd::score(q, keys, scale, s);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let done = 0;
    let keys = &keys[done * q.len()..];
    for (e, kj) in s[done..].iter_mut().zip(keys.chunks_exact(q.len())) {
        let mut a = [0f32; LANES];
        let (qc, kc) = (q.chunks_exact(LANES), kj.chunks_exact(LANES));
        let rest: f32 = qc
            .remainder()
            .iter()
            .zip(kc.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in qc.zip(kc) {
            for i in 0..LANES {
                a[i] += x[i] * y[i];
            }
        }
        *e = (a.iter().sum::<f32>() + rest) * scale;
    }
}

/// `acc += sum_j w[j] * values[j]` (`values`: `[w.len()][acc.len()]`), `LANES` of `acc` at a
/// time in registers.
fn weigh_values(w: &[f32], values: &[f32], acc: &mut [f32]) {
    let hd = acc.len();
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    let start = simd::weigh_values(w, values, acc);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    let start = 0;
    let mut chunks = acc[start..].chunks_exact_mut(LANES);
    for (c, out) in chunks.by_ref().enumerate() {
        let mut a = [0f32; LANES];
        for (&wj, vj) in w.iter().zip(values.chunks_exact(hd)) {
            let v = &vj[start + c * LANES..][..LANES];
            for i in 0..LANES {
                a[i] += wj * v[i];
            }
        }
        out.iter_mut().zip(a).for_each(|(o, a)| *o += a);
    }
    let done = hd - chunks.into_remainder().len();
    for (j, &wj) in w.iter().enumerate() {
        let vj = &values[j * hd..][..hd];
        for d in done..hd {
            acc[d] += wj * vj[d];
        }
    }
}

/// How a call's work is cut: tasks of (block of query tokens, KV head, range of keys).
struct Plan {
    nh: usize,
    kvh: usize,
    hd: usize,
    group: usize,
    pos0: usize,
    t: usize,
    /// Query tokens per task.
    block: usize,
    /// Keys per range, and ranges.
    split: usize,
    splits: usize,
}

impl Plan {
    fn new(c: &LlamaConfig, t: usize, pos0: usize) -> Self {
        let (nh, kvh) = (c.num_attention_heads, c.n_kv_heads());
        let split = if t <= SPLIT_BELOW { SPLIT } else { pos0 + t };
        Plan {
            nh,
            kvh,
            hd: c.head_dim(),
            group: nh / kvh,
            pos0,
            t,
            block: QUERY_BLOCK.min(t),
            split,
            splits: (pos0 + t).div_ceil(split),
        }
    }

    /// Floats per partial: `[m, l, acc (head_dim)]`.
    fn width(&self) -> usize {
        self.hd + 2
    }

    /// Floats of partials per task: one per query (token, head of the group) of its block.
    fn per_task(&self) -> usize {
        self.block * self.group * self.width()
    }

    fn tasks(&self) -> usize {
        self.t.div_ceil(self.block) * self.kvh * self.splits
    }

    /// Task `i`'s query tokens, KV head and keys.
    fn task(&self, i: usize) -> (Range<usize>, usize, Range<usize>) {
        let (b, rest) = (i / (self.kvh * self.splits), i % (self.kvh * self.splits));
        let (head, range) = (rest / self.splits, rest % self.splits);
        let tokens = b * self.block..((b + 1) * self.block).min(self.t);
        let keys = range * self.split..((range + 1) * self.split).min(self.pos0 + tokens.end);
        (tokens, head, keys)
    }

    /// Where the partial of query head `h` of token `tok` over key range `range` starts.
    fn partial_at(&self, tok: usize, h: usize, range: usize) -> usize {
        let (head, g) = (h / self.group, h % self.group);
        let task = ((tok / self.block) * self.kvh + head) * self.splits + range;
        let query = (tok % self.block) * self.group + g;
        task * self.per_task() + query * self.width()
    }
}

/// Attention of `t` queries (`q`: `[t][q_dim]`, roped, absolute positions `pos0..`) over the
/// cached keys and values (positions `0 .. pos0 + t` stored) into `out` (`[t][q_dim]`).
pub fn attention(c: &LlamaConfig, q: &[f32], cache: &Cached, pos0: usize, out: &mut [f32]) {
    let p = Plan::new(c, q.len() / c.q_dim(), pos0);
    let mut partials = vec![0f32; p.tasks() * p.per_task()];
    par::chunks_mut(&mut partials, p.per_task(), |i, parts| {
        attend(&p, q, cache, p.task(i), parts)
    });
    // Each (token, head)'s ranges combined (flash decoding's reduction).
    par::chunks_mut(out, p.hd, |i, o| {
        let (tok, h) = (i / p.nh, i % p.nh);
        let at = |range: usize| &partials[p.partial_at(tok, h, range)..][..p.width()];
        let live = (0..p.splits).filter(|&r| r * p.split < pos0 + tok + 1);
        let m = live.clone().fold(f32::NEG_INFINITY, |a, r| a.max(at(r)[0]));
        o.fill(0.0);
        let mut l = 0.0;
        for r in live {
            let w = at(r);
            let f = exp(w[0] - m);
            l += w[1] * f;
            o.iter_mut().zip(&w[2..]).for_each(|(a, b)| *a += f * b);
        }
        let inv = 1.0 / l;
        o.iter_mut().for_each(|a| *a *= inv);
    });
}

/// One task: the queries of `tokens` on KV head `head` over `keys`, into `out` (their
/// partials, `Plan::per_task`), a widened tile of keys and values at a time.
fn attend(
    p: &Plan,
    q: &[f32],
    cache: &Cached,
    (tokens, head, keys): (Range<usize>, usize, Range<usize>),
    out: &mut [f32],
) {
    let hd = p.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut parts: Vec<Partial> = out
        .chunks_exact_mut(p.width())
        .take(tokens.len() * p.group)
        .map(Partial::new)
        .collect();
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.resize(2 * TILE * hd, 0.0);
        let (kt, vt) = scratch.split_at_mut(TILE * hd);
        let mut s = [0f32; TILE];
        for start in keys.clone().step_by(TILE) {
            let n = TILE.min(keys.end - start);
            for j in 0..n {
                let pos = start + j;
                widen(
                    cache.k,
                    cache.layout,
                    p.kvh,
                    head,
                    pos,
                    &mut kt[j * hd..][..hd],
                );
                widen(
                    cache.v,
                    cache.layout,
                    p.kvh,
                    head,
                    pos,
                    &mut vt[j * hd..][..hd],
                );
            }
            for (qi, part) in parts.iter_mut().enumerate() {
                let (tok, g) = (tokens.start + qi / p.group, qi % p.group);
                // Keys this query sees in the tile (causal).
                let seen = (p.pos0 + tok + 1).saturating_sub(start).min(n);
                if seen == 0 {
                    continue;
                }
                let qh = &q[(tok * p.nh + head * p.group + g) * hd..][..hd];
                score(qh, kt, scale, &mut s[..seen]);
                part.add(&mut s[..seen], &vt[..seen * hd]);
            }
        }
    });
}

/// The stored head `head` (of `heads` per position) of position `j` widened into `out`.
#[inline(always)]
fn widen(stored: &[u8], layout: &KvLayout, heads: usize, head: usize, j: usize, out: &mut [f32]) {
    let hb = layout.head_bytes();
    let at = (j * heads + head) * hb;
    kv::widen_head(&stored[at..at + hb], layout, out);
}
