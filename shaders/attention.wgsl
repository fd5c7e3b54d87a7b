// Causal grouped-query attention of one query (token t, head h) over the KV cache, one
// workgroup each: dispatch (n_heads, n_tokens). Keys are visited in tiles of 64 with an online
// softmax (running max and sum), so any context length fits in fixed workgroup memory.

const TILE: u32 = 64u;
const MAX_HEAD_DIM: u32 = 256u;
const DIMS_PER_THREAD: u32 = MAX_HEAD_DIM / TILE;

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<f32>;
@group(0) @binding(4) var<storage, read> vc: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> qs: array<f32, MAX_HEAD_DIM>;
var<workgroup> score: array<f32, TILE>;
var<workgroup> prob: array<f32, TILE>;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wg.x;
    let t = wg.y;
    let hd = p.head_dim;
    let kv_off = (h / p.group) * hd;
    let qb = t * p.q_stride + h * hd;
    for (var d = li; d < hd; d += TILE) {
        qs[d] = q[qb + d];
    }
    workgroupBarrier();
    let n = step.pos0 + t + 1u; // keys this query sees
    var m = -3.0e38;
    var l = 0.0;
    var acc: array<f32, DIMS_PER_THREAD>;
    for (var k0 = 0u; k0 < n; k0 += TILE) {
        let key = k0 + li;
        var s = -3.0e38;
        if (key < n) {
            let kb = key * p.kv_stride + kv_off;
            var dotp = 0.0;
            for (var d = 0u; d < hd; d++) {
                dotp += qs[d] * kc[kb + d];
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
        for (var i = 0u; i < DIMS_PER_THREAD; i++) {
            acc[i] *= corr;
        }
        workgroupBarrier();
        let kn = min(TILE, n - k0);
        for (var j = 0u; j < kn; j++) {
            let pj = prob[j];
            l += pj;
            let vb = (k0 + j) * p.kv_stride + kv_off;
            for (var i = 0u; i < DIMS_PER_THREAD; i++) {
                let d = li + i * TILE;
                if (d < hd) {
                    acc[i] += pj * vc[vb + d];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < DIMS_PER_THREAD; i++) {
        let d = li + i * TILE;
        if (d < hd) {
            out[qb + d] = acc[i] / l;
        }
    }
}
