// Causal grouped-query attention of one query (token t, head h) over the KV cache. The cache is
// cut into `p.splits` ranges of `p.split_keys` keys (flash-decoding): one workgroup per
// (head, token, range), dispatch (n_heads, n_tokens, splits), so a long cache is read by many
// workgroups at once instead of one per head. Keys are visited in tiles of 64 with an online
// softmax (running max and sum), so any context length fits in fixed workgroup memory. With one
// range the result goes straight to `out`; with several, each writes its partial (max, sum,
// unnormalized values) to `part` and `combine` merges them.
// The cache holds f16 pairs (`rope.wgsl`): per position and KV head, word i holds elements i and
// i + head_dim/2. A thread accumulates the values of whole words: dims j and j + head_dim/2.

const TILE: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;
const PAIRS_PER_THREAD: u32 = MAX_HEAD_DIM / 2u / TILE;

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

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let split = wg.z;
    let hd = p.head_dim;
    let half = hd / 2u;
    let kv_off = (h / p.group) * half; // words
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
    // Dims j (lo) and j + half (hi) for the thread's words j = li + i * TILE.
    var lo: array<f32, PAIRS_PER_THREAD>;
    var hi: array<f32, PAIRS_PER_THREAD>;
    for (var k0 = start; k0 < n; k0 += TILE) {
        let key = k0 + li;
        var s = -3.0e38;
        if (key < n) {
            let kb = key * p.kv_stride + kv_off;
            var dotp = 0.0;
            for (var d = 0u; d < half; d++) {
                let kv = unpack2x16float(kc[kb + d]);
                dotp += qs[d] * kv.x + qs[d + half] * kv.y;
            }
            s = dotp * p.scale;
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
        for (var i = 0u; i < PAIRS_PER_THREAD; i++) {
            lo[i] *= corr;
            hi[i] *= corr;
        }
        workgroupBarrier();
        let kn = min(TILE, n - k0);
        for (var j = 0u; j < kn; j++) {
            let pj = prob[j];
            l += pj;
            let vb = (k0 + j) * p.kv_stride + kv_off;
            for (var i = 0u; i < PAIRS_PER_THREAD; i++) {
                let d = li + i * TILE;
                if (d < half) {
                    let v = unpack2x16float(vc[vb + d]);
                    lo[i] += pj * v.x;
                    hi[i] += pj * v.y;
                }
            }
        }
        workgroupBarrier();
    }
    if (p.splits == 1u) {
        for (var i = 0u; i < PAIRS_PER_THREAD; i++) {
            let d = li + i * TILE;
            if (d < half) {
                out[qb + d] = lo[i] / l;
                out[qb + d + half] = hi[i] / l;
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
    for (var i = 0u; i < PAIRS_PER_THREAD; i++) {
        let d = li + i * TILE;
        if (d < half) {
            part[pb + 2u + d] = lo[i];
            part[pb + 2u + d + half] = hi[i];
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
