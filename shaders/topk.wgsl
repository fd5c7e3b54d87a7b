// Top-k of a logits row on the GPU, so a decoded token costs 8*k bytes of readback instead of
// the vocabulary. Order: larger value first, ties to the lower index (the CPU's argmax).
// Stage 1 (FROM_LOGITS): each workgroup takes a chunk of CHUNK logits and writes its top k as
// (value bits, index) pairs. Stage 2: one workgroup merges those candidates into the final k.
// Each of the k rounds picks the best item strictly after the previous pick, so nothing has
// to be marked.
// The softmax's normaliser comes along: stage 1 writes each chunk's (max, sum of
// exp(logit - max)) after all chunks' candidates, at pair `chunks * k + chunk`; stage 2 folds
// them into log(sum exp(logit)) at dst[2k] (logprobs: a token's logit minus it).

override FROM_LOGITS: bool = true;

const WG: u32 = 256u;
const ITEMS: u32 = 16u;
const CHUNK: u32 = WG * ITEMS;

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

var<workgroup> red_v: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;

fn better(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return av > bv || (av == bv && ai < bi);
}

fn item(j: u32) -> vec2<u32> {
    if (FROM_LOGITS) {
        return vec2<u32>(src[p.base + j], j);
    }
    return vec2<u32>(src[2u * j], src[2u * j + 1u]);
}

// The workgroup's reduction of `v` by max (`take_max`) or sum, valid in every thread.
fn reduce(v: f32, li: u32, take_max: bool) -> f32 {
    red_v[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (li < s) {
            red_v[li] = select(red_v[li] + red_v[li + s], max(red_v[li], red_v[li + s]), take_max);
        }
        workgroupBarrier();
    }
    let r = red_v[0];
    workgroupBarrier();
    return r;
}

// Stage 1: this chunk's (max, sum of exp(logit - max)).
fn chunk_norm(c0: u32, li: u32) -> vec2<f32> {
    var m = -3.4e38;
    for (var t = 0u; t < ITEMS; t++) {
        let j = c0 + t * WG + li;
        if (j < p.n) {
            m = max(m, bitcast<f32>(src[p.base + j]));
        }
    }
    let cm = reduce(m, li, true);
    var z = 0.0;
    for (var t = 0u; t < ITEMS; t++) {
        let j = c0 + t * WG + li;
        if (j < p.n) {
            z += exp(bitcast<f32>(src[p.base + j]) - cm);
        }
    }
    return vec2<f32>(cm, reduce(z, li, false));
}

// Stage 2: log(sum exp(logit)) from the chunks' pairs after the p.n candidates.
fn log_z() -> f32 {
    let chunks = p.n / p.k;
    var m = -3.4e38;
    for (var c = 0u; c < chunks; c++) {
        m = max(m, bitcast<f32>(src[2u * (p.n + c)]));
    }
    var z = 0.0;
    for (var c = 0u; c < chunks; c++) {
        let o = 2u * (p.n + c);
        z += bitcast<f32>(src[o + 1u]) * exp(bitcast<f32>(src[o]) - m);
    }
    return m + log(z);
}

@compute @workgroup_size(256)
fn topk(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let c0 = wg.x * CHUNK;
    var prev_v = 3.4e38;
    var prev_i = 0u;
    for (var round = 0u; round < p.k; round++) {
        var best_v = -3.4e38;
        var best_i = 0xffffffffu;
        for (var m = 0u; m < ITEMS; m++) {
            let j = c0 + m * WG + li;
            if (j < p.n) {
                let it = item(j);
                let v = bitcast<f32>(it.x);
                if (better(prev_v, prev_i, v, it.y) && better(v, it.y, best_v, best_i)) {
                    best_v = v;
                    best_i = it.y;
                }
            }
        }
        red_v[li] = best_v;
        red_i[li] = best_i;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (li < s && better(red_v[li + s], red_i[li + s], red_v[li], red_i[li])) {
                red_v[li] = red_v[li + s];
                red_i[li] = red_i[li + s];
            }
            workgroupBarrier();
        }
        prev_v = red_v[0];
        prev_i = red_i[0];
        if (li == 0u) {
            let o = 2u * (wg.x * p.k + round);
            dst[o] = bitcast<u32>(prev_v);
            dst[o + 1u] = prev_i;
        }
        workgroupBarrier();
    }
    if (FROM_LOGITS) {
        let n = chunk_norm(c0, li);
        if (li == 0u) {
            let o = 2u * (nwg.x * p.k + wg.x);
            dst[o] = bitcast<u32>(n.x);
            dst[o + 1u] = bitcast<u32>(n.y);
        }
    } else if (li == 0u) {
        dst[2u * p.k] = bitcast<u32>(log_z());
    }
}
