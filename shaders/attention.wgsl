// Causal grouped-query attention of one query (token t, head h) over the KV cache. The cache is
// cut into `p.splits` ranges of `p.split_keys` keys (flash-decoding): one workgroup per
// (head, token, range), dispatch (n_heads, n_tokens, splits), so a long cache is read by many
// workgroups at once instead of one per head. Keys are visited in tiles of 64 with an online
// softmax (running max and sum), so any context length fits in fixed workgroup memory. With one
// range the result goes straight to `out`; with several, each writes its partial (max, sum,
// unnormalized values) to `part` and `combine` merges them.
// The cache (`rope.wgsl`): per position and KV head, the head's elements in order as f16
// pairs, or (`p.kv_int8`) as int8 codes four to a word then a scale per `p.kv_group` elements.
// A thread accumulates the values of four dims: 4w..4w+3.

const TILE: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<u32>;
@group(0) @binding(4) var<storage, read> vc: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// [token][head][range] x (max, sum, head_dim values).
@group(0) @binding(6) var<storage, read_write> part: array<f32>;

var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> score: array<f32, TILE>;
var<workgroup> prob: array<f32, TILE>;

// Words of one head in the cache.
fn head_words() -> u32 {
    if (p.kv_int8 == 1u) {
        return p.head_dim / 4u + p.head_dim / p.kv_group;
    }
    return p.head_dim / 2u;
}

fn q4(w: u32) -> vec4<f32> {
    return vec4(qs[4u * w], qs[4u * w + 1u], qs[4u * w + 2u], qs[4u * w + 3u]);
}

// The query (`qs`) dotted with the cached key whose head starts at word `kb`.
fn key_dot(kb: u32) -> f32 {
    let words = p.head_dim / 4u;
    var dotp = 0.0;
    if (p.kv_int8 == 0u) {
        for (var w = 0u; w < words; w++) {
            let k = vec4(unpack2x16float(kc[kb + 2u * w]), unpack2x16float(kc[kb + 2u * w + 1u]));
            dotp += dot(q4(w), k);
        }
        return dotp;
    }
    let group_words = p.kv_group / 4u;
    for (var g = 0u; g < p.head_dim / p.kv_group; g++) {
        var dg = 0.0;
        for (var w = g * group_words; w < (g + 1u) * group_words; w++) {
            dg += dot(q4(w), unpack4x8snorm(kc[kb + w]));
        }
        dotp += dg * bitcast<f32>(kc[kb + words + g]);
    }
    return dotp;
}

// Dims 4w..4w+3 of the cached value whose head starts at word `vb`.
fn value4(vb: u32, w: u32) -> vec4<f32> {
    if (p.kv_int8 == 0u) {
        return vec4(unpack2x16float(vc[vb + 2u * w]), unpack2x16float(vc[vb + 2u * w + 1u]));
    }
    let scale = bitcast<f32>(vc[vb + p.head_dim / 4u + 4u * w / p.kv_group]);
    return scale * unpack4x8snorm(vc[vb + w]);
}

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let split = wg.z;
    let hd = p.head_dim;
    let words = hd / 4u; // four elements each: int8 codes (the scales follow), f16 pairs of pairs
    let kv_off = (h / p.group) * head_words();
    let qb = t * p.q_stride + h * hd;
    for (var d = li; d < hd; d += TILE) {
        qs[d] = q[qb + d];
    }
    workgroupBarrier();
    let visible = step.pos0 + t + 1u; // keys this query sees
    let start = split * p.split_keys;
    let n = min(visible, start + p.split_keys); // this range's keys end here
    var m = -3.0e38;
    var l = 0.0;
    // Dims 4li..4li+3 (the thread's word li < words; MAX_HEAD_DIM / 4 == TILE).
    var acc = vec4(0.0);
    for (var k0 = start; k0 < n; k0 += TILE) {
        let key = k0 + li;
        var s = -3.0e38;
        if (key < n) {
            let kb = key * p.kv_stride + kv_off;
            s = key_dot(kb) * p.scale;
        }
        score[li] = s;
        workgroupBarrier();
        var mt = m;
        for (var j = 0u; j < TILE; j++) {
            mt = max(mt, score[j]);
        }
        prob[li] = select(0.0, exp(s - mt), key < n);
        let corr = exp(m - mt);
        m = mt;
        l *= corr;
        acc *= corr;
        workgroupBarrier();
        let kn = min(TILE, n - k0);
        for (var j = 0u; j < kn; j++) {
            let pj = prob[j];
            l += pj;
            let vb = (k0 + j) * p.kv_stride + kv_off;
            if (li < words) {
                acc += pj * value4(vb, li);
            }
        }
        workgroupBarrier();
    }
    if (p.splits == 1u) {
        if (li < words) {
            for (var d = 0u; d < 4u; d++) {
                out[qb + 4u * li + d] = acc[d] / l;
            }
        }
        return;
    }
    // A range past the visible keys leaves (max, sum) = (-3e38, 0): it weighs nothing.
    let pb = ((t * p.n_heads + h) * p.splits + split) * (hd + 2u);
    if (li == 0u) {
        part[pb] = m;
        part[pb + 1u] = l;
    }
    if (li < words) {
        for (var d = 0u; d < 4u; d++) {
            part[pb + 2u + 4u * li + d] = acc[d];
        }
    }
}

// Merges the ranges' partials of one query: dispatch (n_heads, n_tokens). Only the ranges that
// start before the query's visible keys are read: the engine dispatches attention over the
// ranges its cache holds now (it grows), and the partials of the others may be stale.
@compute @workgroup_size(64)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let hd = p.head_dim;
    let row = hd + 2u;
    let pb = (t * p.n_heads + h) * p.splits * row;
    let visible = step.pos0 + t + 1u;
    let ranges = min(p.splits, (visible + p.split_keys - 1u) / p.split_keys);
    var mx = -3.0e38;
    for (var s = 0u; s < ranges; s++) {
        mx = max(mx, part[pb + s * row]);
    }
    var l = 0.0;
    for (var s = 0u; s < ranges; s++) {
        l += part[pb + s * row + 1u] * exp(part[pb + s * row] - mx);
    }
    let qb = t * p.q_stride + h * hd;
    for (var d = li; d < hd; d += TILE) {
        var v = 0.0;
        for (var s = 0u; s < ranges; s++) {
            v += part[pb + s * row + 2u + d] * exp(part[pb + s * row] - mx);
        }
        out[qb + d] = v / l;
    }
}
