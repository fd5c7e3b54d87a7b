//! Causal grouped-query attention read straight from the KV cache's stored bytes (f16 or int8,
//! `cpu::kv`), tiled as flash attention is: a task takes a block of query tokens, one KV head
//! (and the query heads that share it) and a range of keys; it widens `TILE` keys and values
//! at a time into a scratch that stays in L1, scores every query of the block against them and
//! keeps a running softmax (max, sum and weighted values). A decode token's keys are split in
//! ranges of `SPLIT` so that a long cache is read by several threads; the ranges' partial
//! softmaxes are combined at the end (flash decoding).
//!
//! An int8 cache's keys are not widened to f32: each query is rounded once per task to i16 per
//! group of the cache's layout (`max|q| / 32767` a scale, as `cpu::act` does for activations),
//! the keys' codes widened to i16, and a score is an integer dot product per group
//! (`i32x4.dot_i16x8_s` in wasm, `pmaddwd` natively) times the two scales.
//!
//! The cache used to be widened to f32 whole, per layer and token, before attention read it
//! three times (once per query head of a group): at 1,529 cached positions a decode token wrote
//! and re-read 70 MB for that, which made attention ~35% of the token (README, stop 45).

use crate::cpu::{kv, par};
use crate::model::math::exp;
use crate::model::LlamaConfig;
use crate::runtime::backend::{KvFormat, KvLayout};
use std::ops::Range;

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
    /// A task's widened tile of keys then values (`2 x TILE x head_dim`), reused. With an int8
    /// cache the keys' part holds their scales (`TILE x groups`).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// With an int8 cache: a tile of keys' codes as i16 (`TILE x head_dim`), then the task's
    /// queries rounded to i16 (`Plan::queries x head_dim`).
    static SCRATCH_I16: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest i16 a query element rounds to (its group's max |q|).
const Q_MAX: f32 = 32767.0;

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
        for e in s.iter_mut() {
            *e = exp(*e - m);
        }
        let mut lanes = [0f32; LANES];
        for c in s.chunks(LANES) {
            lanes.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
        let sum: f32 = lanes.iter().sum();
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

/// `q`'s dot products with a tile's keys (`keys`: `[s.len()][head_dim]`), times `scale`, into
/// `s`; `LANES` partial sums in registers per key.
fn score(q: &[f32], keys: &[f32], scale: f32, s: &mut [f32]) {
    for (e, kj) in s.iter_mut().zip(keys.chunks_exact(q.len())) {
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

/// `q` (`head_dim`) rounded to i16 per group of `group` into `codes`, each group's scale
/// (`max|q| / Q_MAX`) into `scales`.
fn round_query(q: &[f32], group: usize, codes: &mut [i16], scales: &mut [f32]) {
    for ((g, c), d) in q.chunks(group).zip(codes.chunks_mut(group)).zip(scales) {
        let m = g.iter().fold(0f32, |a, v| a.max(v.abs()));
        *d = m / Q_MAX;
        let inv = if m > 0.0 { Q_MAX / m } else { 0.0 };
        c.iter_mut()
            .zip(g)
            .for_each(|(c, &v)| *c = (v * inv).round() as i16);
    }
}

/// Scores against int8 keys: `q` rounded (`round_query`: codes, per-group scales `qd`), the
/// tile's codes as i16 (`keys`: `[s.len()][head_dim]`) and their per-group scales
/// (`kd`: `[s.len()][groups]`, the stored scale / 127), times `scale`, into `s`. A group's
/// sum stays in i32: at most 512 products of |q| <= 32767 and |k| <= 127 (`attention` checks).
fn score_int8(q: &[i16], qd: &[f32], keys: &[i16], kd: &[f32], scale: f32, s: &mut [f32]) {
    let (hd, groups) = (q.len(), qd.len());
    let group = hd / groups;
    for (j, e) in s.iter_mut().enumerate() {
        let (kj, dj) = (&keys[j * hd..][..hd], &kd[j * groups..][..groups]);
        let mut sum = 0f32;
        for g in 0..groups {
            let at = g * group;
            let dot = dot_i16(&q[at..at + group], &kj[at..at + group]);
            sum += dot as f32 * qd[g] * dj[g];
        }
        *e = sum * scale;
    }
}

/// `sum a[i] * b[i]` in i32: 8 at a time (wasm: `i32x4.dot_i16x8_s`; elsewhere `LANES` partial
/// sums, which x86 vectorizes as `pmaddwd`), then the tail (none where head_dim is a multiple
/// of 8, as the WebGPU engine requires).
#[inline(always)]
fn dot_i16(a: &[i16], b: &[i16]) -> i32 {
    let n = a.len() - a.len() % 8;
    let tail: i32 = a[n..]
        .iter()
        .zip(&b[n..])
        .map(|(&x, &y)| x as i32 * y as i32)
        .sum();
    let (a, b) = (&a[..n], &b[..n]);
    tail + {
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        {
            use core::arch::wasm32::*;
            let mut acc = i32x4_splat(0);
            for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
                // SAFETY: each chunk is 8 i16 = 16 bytes; v128_load needs no alignment.
                let (x, y) = unsafe {
                    (
                        v128_load(x.as_ptr() as *const v128),
                        v128_load(y.as_ptr() as *const v128),
                    )
                };
                acc = i32x4_add(acc, i32x4_dot_i16x8(x, y));
            }
            i32x4_extract_lane::<0>(acc)
                + i32x4_extract_lane::<1>(acc)
                + i32x4_extract_lane::<2>(acc)
                + i32x4_extract_lane::<3>(acc)
        }
        #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
        {
            let mut acc = [0i32; LANES];
            for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
                for i in 0..LANES {
                    acc[i] += x[i] as i32 * y[i] as i32;
                }
            }
            acc.iter().sum::<i32>()
        }
    }
}

/// `acc += sum_j w[j] * values[j]` (`values`: `[w.len()][acc.len()]`), `LANES` of `acc` at a
/// time in registers.
fn weigh_values(w: &[f32], values: &[f32], acc: &mut [f32]) {
    let hd = acc.len();
    let mut chunks = acc.chunks_exact_mut(LANES);
    for (c, out) in chunks.by_ref().enumerate() {
        let mut a = [0f32; LANES];
        for (&wj, vj) in w.iter().zip(values.chunks_exact(hd)) {
            let v = &vj[c * LANES..][..LANES];
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
    // An int8 group's integer sum fits in i32 (`score_int8`).
    assert!(
        cache.layout.group <= 512,
        "an int8 KV group of {}",
        cache.layout.group
    );
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
    let queries = tokens.len() * p.group;
    let mut parts: Vec<Partial> = out
        .chunks_exact_mut(p.width())
        .take(queries)
        .map(Partial::new)
        .collect();
    let query = |qi: usize| {
        let (tok, g) = (tokens.start + qi / p.group, qi % p.group);
        (tok, &q[(tok * p.nh + head * p.group + g) * hd..][..hd])
    };
    let layout = cache.layout;
    let int8 = layout.format == KvFormat::Int8;
    let (group, groups) = (layout.group, layout.groups());
    SCRATCH.with_borrow_mut(|scratch| {
        SCRATCH_I16.with_borrow_mut(|scratch16| {
            scratch.resize(2 * TILE * hd, 0.0);
            let (kt, vt) = scratch.split_at_mut(TILE * hd);
            // int8: the tile's key codes, then the queries rounded once for the whole task.
            scratch16.resize(if int8 { (TILE + queries) * hd } else { 0 }, 0);
            let (kc, q16) = scratch16.split_at_mut(if int8 { TILE * hd } else { 0 });
            let mut qd = vec![0f32; if int8 { queries * groups } else { 0 }];
            if int8 {
                for qi in 0..queries {
                    let d = &mut qd[qi * groups..][..groups];
                    round_query(query(qi).1, group, &mut q16[qi * hd..][..hd], d);
                }
            }
            let mut s = [0f32; TILE];
            for start in keys.clone().step_by(TILE) {
                let n = TILE.min(keys.end - start);
                for j in 0..n {
                    let at = |heads| stored(heads, layout, p.kvh, head, start + j);
                    let (k, v) = (at(cache.k), at(cache.v));
                    if int8 {
                        let d = &mut kt[j * groups..][..groups];
                        key_codes(k, layout, &mut kc[j * hd..][..hd], d);
                    } else {
                        kv::widen_head(k, layout, &mut kt[j * hd..][..hd]);
                    }
                    kv::widen_head(v, layout, &mut vt[j * hd..][..hd]);
                }
                for (qi, part) in parts.iter_mut().enumerate() {
                    let (tok, qh) = query(qi);
                    // Keys this query sees in the tile (causal).
                    let seen = (p.pos0 + tok + 1).saturating_sub(start).min(n);
                    if seen == 0 {
                        continue;
                    }
                    if int8 {
                        let (codes, d) = (&q16[qi * hd..][..hd], &qd[qi * groups..][..groups]);
                        score_int8(codes, d, kc, kt, scale, &mut s[..seen]);
                    } else {
                        score(qh, kt, scale, &mut s[..seen]);
                    }
                    part.add(&mut s[..seen], &vt[..seen * hd]);
                }
            }
        })
    });
}

/// The stored head `head` (of `heads` per position) of position `pos`.
#[inline(always)]
fn stored<'b>(all: &'b [u8], layout: &KvLayout, heads: usize, head: usize, pos: usize) -> &'b [u8] {
    let hb = layout.head_bytes();
    &all[(pos * heads + head) * hb..][..hb]
}

/// An int8 stored head's codes as i16 into `codes`, its group scales (as `kv::widen_head`
/// applies them: the stored scale / 127) into `scales`.
#[inline(always)]
fn key_codes(stored: &[u8], layout: &KvLayout, codes: &mut [i16], scales: &mut [f32]) {
    let (c, s) = stored.split_at(layout.head_dim);
    codes
        .iter_mut()
        .zip(c)
        .for_each(|(o, &b)| *o = b as i8 as i16);
    for (d, b) in scales.iter_mut().zip(s.chunks_exact(4)) {
        *d = f32::from_le_bytes(b.try_into().expect("a 4-byte scale")) / 127.0;
    }
}
