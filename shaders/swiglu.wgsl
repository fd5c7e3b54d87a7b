// SwiGLU: gate = silu(gate) * up, in place.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
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
