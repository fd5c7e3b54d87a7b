// Rotary position embedding, Hugging Face's rotate-half form: element i of a head pairs with
// i + head_dim/2. cos/sin come from a table the host computes in f64 (as the CPU path does):
// f32 angles at position ~2000 would be off by ~1e-4 rad.
// One dispatch rotates a token's query heads in place (rows by token), and stores its new keys
// (rotated) and values into the KV cache (rows by absolute position) in int8: one fewer
// dispatch per layer than a call for each.
//
// The cache's layout (`runtime::backend::KvLayout`, the CPU backend's bytes): per position,
// per KV head, the head's elements in order, as f16 (word i holds elements 2i, 2i+1, the first
// in the low half; clamped to f16's finite range, which pack2x16float leaves undefined past)
// or, when `p.kv_int8`, as `head_dim / 4` words of int8 codes (word w holds elements 4w..4w+3,
// the first in the low byte) then one scale (f32 bits) per `p.kv_group` elements: element =
// code / 127 x its group's scale, the scale the group's largest magnitude (`pack4x8snorm` of
// the value over the scale). A thread stores elements 4w..4w+3 of a head's first half and of
// its second half, the four pairs a rotation mixes, as whole words; in int8 each thread finds
// the largest magnitude of its two groups itself, so no thread waits on another. Needs
// head_dim % 8 == 0 (the engine checks it).

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> table: array<f32>;
// The call's new keys and values, f32 rows of `p.kv_stride` by token (the K and V matvecs').
@group(0) @binding(3) var<storage, read> k_new: array<f32>;
@group(0) @binding(4) var<storage, read> v_new: array<f32>;
@group(0) @binding(5) var<storage, read_write> q: array<f32>;
@group(0) @binding(6) var<storage, read_write> kc: array<u32>;
@group(0) @binding(7) var<storage, read_write> vc: array<u32>;

// `pack_f16` (common.wgsl) and KV_MAX (prepended by the host: `kernels::shared_constants`).

// Element i of the head whose values start at `row` of the new keys (`is_k`, rotated at
// position `pos`) or values (as they are), and its rotation partner i + head_dim/2.
fn pair(is_k: bool, row: u32, i: u32, pos: u32) -> vec2<f32> {
    let half = p.head_dim / 2u;
    if (!is_k) {
        return vec2(v_new[row + i], v_new[row + i + half]);
    }
    let x0 = k_new[row + i];
    let x1 = k_new[row + i + half];
    let c_i = pos * half + i;
    let c = table[c_i];
    let s = table[p.sin_base + c_i];
    return vec2(x0 * c - x1 * s, x1 * c + x0 * s);
}

// The largest magnitude of group g of the head (rotated keys, or values), at most KV_MAX (an
// infinite value saturates, the cache stays finite).
fn group_max(is_k: bool, row: u32, g: u32, pos: u32) -> f32 {
    let half = p.head_dim / 2u;
    var m = 0.0;
    for (var e = g * p.kv_group; e < (g + 1u) * p.kv_group; e++) {
        let v = pair(is_k, row, e % half, pos);
        m = max(m, abs(select(v.x, v.y, e >= half)));
    }
    return min(m, KV_MAX);
}

// Dispatch (ceil((q_heads * head_dim / 2 + 2 * k_heads * head_dim / 8) / 64), n_tokens): a
// thread per query pair, then one per four key pairs, then one per four value pairs.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.head_dim / 2u;
    let quarter = p.head_dim / 8u; // threads per head of keys or values
    let t = gid.y;
    let q_pairs = p.q_heads * half;
    let kv_quads = p.k_heads * quarter;
    if (gid.x >= q_pairs + 2u * kv_quads || t >= step.n_tokens) {
        return;
    }
    let pos = step.pos0 + t;
    if (gid.x < q_pairs) {
        let i = gid.x % half;
        let row = t * p.q_stride + (gid.x / half) * p.head_dim;
        let c_i = pos * half + i;
        let c = table[c_i];
        let s = table[p.sin_base + c_i];
        let x0 = q[row + i];
        let x1 = q[row + i + half];
        q[row + i] = x0 * c - x1 * s;
        q[row + i + half] = x1 * c + x0 * s;
        return;
    }
    let j = gid.x - q_pairs;
    let is_k = j < kv_quads;
    let jj = select(j - kv_quads, j, is_k);
    let head = jj / quarter;
    let w = jj % quarter; // this thread's elements: 4w..4w+3 and half + 4w..half + 4w+3
    let row = t * p.kv_stride + head * p.head_dim;
    var lo: vec4<f32>;
    var hi: vec4<f32>;
    for (var d = 0u; d < 4u; d++) {
        let e = pair(is_k, row, 4u * w + d, pos);
        lo[d] = e.x;
        hi[d] = e.y;
    }
    if (p.kv_int8 == 0u) {
        let hw = p.head_dim / 2u; // words per head
        let at = (pos * p.k_heads + head) * hw;
        let wlo = at + 2u * w;
        let whi = at + hw / 2u + 2u * w;
        if (is_k) {
            kc[wlo] = pack_f16(lo.xy);
            kc[wlo + 1u] = pack_f16(lo.zw);
            kc[whi] = pack_f16(hi.xy);
            kc[whi + 1u] = pack_f16(hi.zw);
        } else {
            vc[wlo] = pack_f16(lo.xy);
            vc[wlo + 1u] = pack_f16(lo.zw);
            vc[whi] = pack_f16(hi.xy);
            vc[whi + 1u] = pack_f16(hi.zw);
        }
        return;
    }
    let g_lo = 4u * w / p.kv_group;
    let g_hi = (half + 4u * w) / p.kv_group;
    let m_lo = group_max(is_k, row, g_lo, pos);
    let m_hi = group_max(is_k, row, g_hi, pos);
    let code_lo = pack4x8snorm(lo * select(0.0, 1.0 / m_lo, m_lo > 0.0));
    let code_hi = pack4x8snorm(hi * select(0.0, 1.0 / m_hi, m_hi > 0.0));
    let words = p.head_dim / 4u;
    let at = (pos * p.k_heads + head) * (words + p.head_dim / p.kv_group);
    // The thread holding a group's first element writes its scale.
    let scale_lo = (4u * w) % p.kv_group == 0u;
    let scale_hi = (half + 4u * w) % p.kv_group == 0u;
    if (is_k) {
        kc[at + w] = code_lo;
        kc[at + quarter + w] = code_hi;
        if (scale_lo) {
            kc[at + words + g_lo] = bitcast<u32>(m_lo);
        }
        if (scale_hi) {
            kc[at + words + g_hi] = bitcast<u32>(m_hi);
        }
    } else {
        vc[at + w] = code_lo;
        vc[at + quarter + w] = code_hi;
        if (scale_lo) {
            vc[at + words + g_lo] = bitcast<u32>(m_lo);
        }
        if (scale_hi) {
            vc[at + words + g_hi] = bitcast<u32>(m_hi);
        }
    }
}
