// The output head: logits[t][r] = sum_c head[r][c] * x[t][c], with the head (the tied
// embedding or an untied lm_head) stored as f16 pairs read by unpack2x16float, so no shader-f16
// feature is needed (the browser's SwiftShader has none). TT tokens per thread, in named
// accumulators (see qlinear.wgsl's matmul).

const TT: u32 = 4u;

struct Params {
    rows: u32,
    cols: u32,       // a multiple of 4
    x_stride: u32,   // a multiple of 4
    y_stride: u32,
    last_only: u32,  // 1: only the last token of the call, into row 0 (generation)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> w: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Dispatch (ceil(rows / 64), ceil(n / TT)).
@compute @workgroup_size(64)
fn dense(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    var first = 0u;
    var n = step.n_tokens;
    if (p.last_only != 0u) {
        first = step.n_tokens - 1u;
        n = 1u;
    }
    let t0 = gid.y * TT;
    if (r >= p.rows || t0 >= n) {
        return;
    }
    let nt = min(TT, n - t0);
    let c4 = p.cols / 4u;
    let s4 = p.x_stride / 4u;
    let x0 = (first + t0) * s4;
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    for (var c = 0u; c < c4; c++) {
        let pair = w[r * c4 + c];
        let wv = vec4<f32>(unpack2x16float(pair.x), unpack2x16float(pair.y));
        a0 += dot(wv, x[x0 + c]);
        if (nt > 1u) {
            a1 += dot(wv, x[x0 + s4 + c]);
        }
        if (nt > 2u) {
            a2 += dot(wv, x[x0 + 2u * s4 + c]);
        }
        if (nt > 3u) {
            a3 += dot(wv, x[x0 + 3u * s4 + c]);
        }
    }
    y[t0 * p.y_stride + r] = a0;
    if (nt > 1u) {
        y[(t0 + 1u) * p.y_stride + r] = a1;
    }
    if (nt > 2u) {
        y[(t0 + 2u) * p.y_stride + r] = a2;
    }
    if (nt > 3u) {
        y[(t0 + 3u) * p.y_stride + r] = a3;
    }
}
