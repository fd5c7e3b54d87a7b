// Rotary position embedding, Hugging Face's rotate-half form: element i of a head pairs with
// i + head_dim/2. cos/sin come from a table the host computes in f64 (as the CPU path does):
// f32 angles at position ~2000 would be off by ~1e-4 rad.
// One dispatch rotates a token's query heads (rows by token) and its key heads in the K cache
// (rows by absolute position): one fewer dispatch per layer than a call for each.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> q: array<f32>;
@group(0) @binding(4) var<storage, read_write> k: array<f32>;

// Dispatch (ceil((q_heads + k_heads) * head_dim / 2 / 64), n_tokens): one thread per pair.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.head_dim / 2u;
    let t = gid.y;
    let q_pairs = p.q_heads * half;
    if (gid.x >= q_pairs + p.k_heads * half || t >= step.n_tokens) {
        return;
    }
    let pos = step.pos0 + t;
    let c_i = pos * half + gid.x % half;
    let c = table[c_i];
    let s = table[p.sin_base + c_i];
    let i = gid.x % half;
    if (gid.x < q_pairs) {
        let row = t * p.q_stride + (gid.x / half) * p.head_dim;
        let x0 = q[row + i];
        let x1 = q[row + i + half];
        q[row + i] = x0 * c - x1 * s;
        q[row + i + half] = x1 * c + x0 * s;
    } else {
        let row = pos * p.k_stride + ((gid.x - q_pairs) / half) * p.head_dim;
        let x0 = k[row + i];
        let x1 = k[row + i + half];
        k[row + i] = x0 * c - x1 * s;
        k[row + i + half] = x1 * c + x0 * s;
    }
}
