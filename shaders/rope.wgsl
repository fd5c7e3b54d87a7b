// Rotary position embedding, Hugging Face's rotate-half form: element i of a head pairs with
// i + head_dim/2. cos/sin come from a table the host computes in f64 (as the CPU path does):
// f32 angles at position ~2000 would be off by ~1e-4 rad.
// One dispatch rotates a token's query heads in place (rows by token), and stores its new keys
// (rotated) and values into the KV cache (rows by absolute position) in f16: one fewer dispatch
// per layer than a call for each.
//
// The cache's layout: per position, per KV head, `head_dim / 2` words; word i holds elements i
// (low half) and i + head_dim/2 (high half), the two a rotation pairs, so each thread writes
// whole words. Values are clamped to f16's finite range (pack2x16float leaves overflow
// undefined), as the CPU backend's cache does (`cpu::kv::store`).

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> table: array<f32>;
// The call's new keys and values, f32 rows of `p.kv_stride` by token (the K and V matvecs').
@group(0) @binding(3) var<storage, read> k_new: array<f32>;
@group(0) @binding(4) var<storage, read> v_new: array<f32>;
@group(0) @binding(5) var<storage, read_write> q: array<f32>;
@group(0) @binding(6) var<storage, read_write> kc: array<u32>;
@group(0) @binding(7) var<storage, read_write> vc: array<u32>;

const F16_MAX: f32 = 65504.0;

fn pack(v: vec2<f32>) -> u32 {
    return pack2x16float(clamp(v, vec2(-F16_MAX), vec2(F16_MAX)));
}

// Dispatch (ceil((q_heads + 2 * k_heads) * head_dim / 2 / 64), n_tokens): one thread per pair:
// the queries', then the keys', then the values'.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.head_dim / 2u;
    let t = gid.y;
    let q_pairs = p.q_heads * half;
    let kv_pairs = p.k_heads * half;
    if (gid.x >= q_pairs + 2u * kv_pairs || t >= step.n_tokens) {
        return;
    }
    let pos = step.pos0 + t;
    let i = gid.x % half;
    if (gid.x >= q_pairs + kv_pairs) {
        // A value pair: stored as it is.
        let j = gid.x - q_pairs - kv_pairs;
        let row = t * p.kv_stride + (j / half) * p.head_dim;
        vc[pos * kv_pairs + j] = pack(vec2(v_new[row + i], v_new[row + i + half]));
        return;
    }
    let c_i = pos * half + i;
    let c = table[c_i];
    let s = table[p.sin_base + c_i];
    if (gid.x < q_pairs) {
        let row = t * p.q_stride + (gid.x / half) * p.head_dim;
        let x0 = q[row + i];
        let x1 = q[row + i + half];
        q[row + i] = x0 * c - x1 * s;
        q[row + i + half] = x1 * c + x0 * s;
    } else {
        let j = gid.x - q_pairs;
        let row = t * p.kv_stride + (j / half) * p.head_dim;
        let x0 = k_new[row + i];
        let x1 = k_new[row + i + half];
        kc[pos * kv_pairs + j] = pack(vec2(x0 * c - x1 * s, x1 * c + x0 * s));
    }
}
