// Rotary position embedding, Hugging Face's rotate-half form: element i of a head pairs with
// i + head_dim/2. cos/sin come from a table the host computes in f64 (as the CPU path does):
// f32 angles at position ~2000 would be off by ~1e-4 rad.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;

// Dispatch (ceil(n_heads * head_dim / 2 / 64), n_tokens): one thread per rotated pair.
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.head_dim / 2u;
    let t = gid.y;
    if (gid.x >= p.n_heads * half || t >= step.n_tokens) {
        return;
    }
    let h = gid.x / half;
    let i = gid.x % half;
    let pos = step.pos0 + t;
    let row = p.base + (p.pos_rows * step.pos0 + t) * p.row_stride + h * p.head_dim;
    let c = table[pos * half + i];
    let s = table[p.sin_base + pos * half + i];
    let x0 = v[row + i];
    let x1 = v[row + i + half];
    v[row + i] = x0 * c - x1 * s;
    v[row + i + half] = x1 * c + x0 * s;
}
