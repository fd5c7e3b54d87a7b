// Embedding lookup: x[t] = embed[tokens[t]], the table stored as f16 pairs.

struct Params {
    hidden: u32,  // even
    vocab: u32,
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read> tokens: array<u32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

// Dispatch (ceil(hidden / 128), n_tokens): one thread per pair of values.
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let t = gid.y;
    let half = p.hidden / 2u;
    if (j >= half || t >= step.n_tokens) {
        return;
    }
    // The host validates ids; clamping keeps a bad one from reading another row's memory.
    let tok = min(tokens[t], p.vocab - 1u);
    let v = unpack2x16float(table[tok * half + j]);
    x[t * p.hidden + 2u * j] = v.x;
    x[t * p.hidden + 2u * j + 1u] = v.y;
}
