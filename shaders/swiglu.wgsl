// SwiGLU: gate = silu(gate) * up, in place.

struct Params {
    n: u32,  // features per token
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> up: array<f32>;
@group(0) @binding(3) var<storage, read_write> gate: array<f32>;

// Dispatch (ceil(n / 64), n_tokens).
@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= p.n || gid.y >= step.n_tokens) {
        return;
    }
    let i = gid.y * p.n + gid.x;
    let g = gate[i];
    gate[i] = g / (1.0 + exp(-g)) * up[i];
}
