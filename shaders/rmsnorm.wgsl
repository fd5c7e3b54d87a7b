// RMSNorm of each token row: y = x / sqrt(mean(x^2) + eps) * g. One workgroup per row; with
// `last_only`, one workgroup normalizes the call's last row into row 0 (what the head needs
// to pick the next token).

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    var row = wg.x;
    var out = wg.x * p.n;
    if (p.last_only != 0u) {
        row = step.n_tokens - 1u;
        out = 0u;
    }
    let base = row * p.n;
    var ss = 0.0;
    for (var i = li; i < p.n; i += 64u) {
        let v = x[base + i];
        ss += v * v;
    }
    red[li] = ss;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(red[0] / f32(p.n) + p.eps);
    for (var i = li; i < p.n; i += 64u) {
        y[out + i] = x[base + i] * inv * g[i];
    }
}
