// Top-k of a logits row on the GPU, so a decoded token costs 8*k bytes of readback instead of
// the vocabulary. Order: larger value first, ties to the lower index (the CPU's argmax).
// Stage 1 (FROM_LOGITS): each workgroup takes a chunk of CHUNK logits and writes its top k as
// (value bits, index) pairs. Stage 2: one workgroup merges those candidates into the final k.
// Each of the k rounds picks the best item strictly after the previous pick, so nothing has
// to be marked.

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

@compute @workgroup_size(256)
fn topk(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
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
}
