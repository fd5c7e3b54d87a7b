// Embedding lookup: x[t] = dequantize(embed[tokens[t]]), the table in the packed format of
// src/quant/format.rs at 8 bits (the base shard's): row r's codes are words
// r * words_per_row .. (4 codes per word, lowest byte first), its (scale, zero) pairs follow
// all codes as pack2x16float words, one per group.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read> tokens: array<u32>;
@group(0) @binding(4) var<storage, read_write> x: array<vec4<f32>>;

// Dispatch (ceil(hidden / 256), n_tokens): one thread per word (4 values).
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let t = gid.y;
    let quads = p.hidden / 4u;
    if (j >= quads || t >= step.n_tokens) {
        return;
    }
    // The host validates ids; clamping keeps a bad one from reading another row's memory.
    let tok = min(tokens[t], p.vocab - 1u);
    let word = table[tok * p.words_per_row + j];
    let q = vec4<f32>(vec4<u32>(word, word >> 8u, word >> 16u, word >> 24u) & vec4<u32>(255u));
    let sz = unpack2x16float(table[p.scale_base + tok * p.groups_per_row + (4u * j) / p.group]);
    x[t * quads + j] = sz.x * q + vec4<f32>(sz.y);
}
