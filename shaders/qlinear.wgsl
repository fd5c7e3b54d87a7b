// Fused dequantize + linear layer over the packed format of src/quant/format.rs:
// y[t][r] (+)= sum_c (scale * code + zero) * x[t][c].
// `matvec` serves decode (one token); `matmul` serves prefill, where each thread dequantizes a
// block of weights once and applies it to TT tokens.
//
// The host prepends (src/gpu/kernels.rs `qlinear_source`): `reduce_row(acc, li)` (the sum of a
// row's TPR partial sums, valid in its first lane: through workgroup memory, or subgroup
// shuffles where the adapter has them); `wl(i)`, word i of the matrix (its scales); and
// `block_codes(r, b)`, the 32 codes of row r's block b as floats, generated per bit-width and
// layout, read with one load per word and decoded with constant shifts, so neither a
// per-weight branch nor a repeated load of the same word is left (each storage load costs
// far more than arithmetic on CPU adapters such as lavapipe). Packed codes: `bits` words per
// block. Bit planes (ensemble/plane_level.rs): one word per plane and block, planes
// p.plane_words apart, codes built from one bit of each. The kernels of several matrices in
// one dispatch (qlinear_parts.wgsl) define these over their matrices instead, the bit-width
// read at run time (`p.bits`).

// Threads sharing weight rows in `matvec` (a power of two <= 64). 1 suits CPU adapters (one
// row per SIMD lane, no barrier); GPUs want several so that a row is read together.
override TPR: u32 = 1u;
// Rows each group of TPR threads computes in `matvec`: 1, 2 or 4. Each block of x is loaded
// once for RPT rows instead of once per row (x is read 8 bytes per weight byte at 4 bits, more
// than the weights themselves): on CPU adapters the SIMD lanes are the workgroup's threads;
// on GPUs it spares the load units.
override RPT: u32 = 1u;

const WG: u32 = 64u;
const TT: u32 = 4u;

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host; so
// are the bindings of x and y (`y_get`, `y_set`), `NORM`, `GLU` and `gv(i)`. With `NORM`,
// `matvec` is RMSNorm and the matrix-vector product in one dispatch (decode): x is the
// residual stream, `gv(i)` the norm's weights x[4i .. 4i+4] are multiplied by, and the row's
// sum is scaled by 1 / rms(x), whose sum of squares the row's threads gather from the very
// loads of x they make for the product (together they read all of x). With `GLU` (the gate
// and up projections in one dispatch, qlinear_parts.wgsl), each row is
// silu(gate row . x) * (up row . x).

fn scale_zero(r: u32, b: u32) -> vec2<f32> {
    return unpack2x16float(wl(p.scale_base + r * p.groups_per_row + b / p.group_blocks));
}

// x[4i .. 4i+4] of a row whose first vec4 is `row`, zero past `cols` (the ragged last block):
// a clamped load and a select rather than a branch.
fn xv(row: u32, i: u32) -> vec4<f32> {
    let n = p.cols / 4u;
    return select(vec4<f32>(0.0), x[row + min(i, n - 1u)], i < n);
}

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

// `p.accumulate`: 0 writes y, 1 adds to it (the residual stream), 2 is SwiGLU: y holds the
// gate projection and becomes silu(gate) * v (the up projection writing into the gate).
fn store(t: u32, r: u32, v: f32) {
    let i = p.y_base + t * p.y_stride + r;
    if (p.accumulate == 1u) {
        y_set(i, y_get(i) + v);
    } else if (p.accumulate == 2u) {
        let g = y_get(i);
        y_set(i, silu(g) * v);
    } else {
        y_set(i, v);
    }
}

var<workgroup> partial: array<f32, WG>;

// Row r's block b against the block's x (x0..x7) whose sum is xs:
// sum (s*q + z) x = s * sum(q x) + z * sum(x), one multiply per weight.
fn row_block(r: u32, b: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
             x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>, xs: f32) -> f32 {
    let q = block_codes(r, b);
    let d = dot(q[0], x0) + dot(q[1], x1) + dot(q[2], x2) + dot(q[3], x3)
        + dot(q[4], x4) + dot(q[5], x5) + dot(q[6], x6) + dot(q[7], x7);
    let sz = scale_zero(r, b);
    return sz.x * d + sz.y * xs;
}

// The partial sums of rows r0 .. r0 + RPT (unused lanes 0) and, with NORM, of x's squares,
// reduced over the row's TPR threads (valid in its first lane).
struct RowSums {
    a: vec4<f32>,
    ss: f32,
}

// TPR threads share RPT rows (rows g * RPT .. g * RPT + RPT of lane group g), each thread
// taking every TPR-th block, so each block of x is loaded once for RPT rows; the group's
// partial sums are then added (`reduce_row`). Rows past the last repeat it (clamped loads).
// The accumulators are named scalars (see `matmul`).
fn row_sums(r0: u32, lane: u32, li: u32) -> RowSums {
    let last = p.rows - 1u;
    let r1 = min(r0 + 1u, last);
    let r2 = min(r0 + 2u, last);
    let r3 = min(r0 + 3u, last);
    let blocks = (p.cols + 31u) / 32u;
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    // With NORM: this thread's part of the sum of squares of x.
    var ss = 0.0;
    if (r0 < p.rows) {
        for (var b = lane; b < blocks; b += TPR) {
            let i = 8u * b;
            var x0 = xv(0u, i);
            var x1 = xv(0u, i + 1u);
            var x2 = xv(0u, i + 2u);
            var x3 = xv(0u, i + 3u);
            var x4 = xv(0u, i + 4u);
            var x5 = xv(0u, i + 5u);
            var x6 = xv(0u, i + 6u);
            var x7 = xv(0u, i + 7u);
            if (NORM) {
                ss += dot(x0, x0) + dot(x1, x1) + dot(x2, x2) + dot(x3, x3)
                    + dot(x4, x4) + dot(x5, x5) + dot(x6, x6) + dot(x7, x7);
                x0 *= gv(i);
                x1 *= gv(i + 1u);
                x2 *= gv(i + 2u);
                x3 *= gv(i + 3u);
                x4 *= gv(i + 4u);
                x5 *= gv(i + 5u);
                x6 *= gv(i + 6u);
                x7 *= gv(i + 7u);
            }
            let xs = dot(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, vec4<f32>(1.0));
            a0 += row_block(r0, b, x0, x1, x2, x3, x4, x5, x6, x7, xs);
            if (RPT > 1u) {
                a1 += row_block(r1, b, x0, x1, x2, x3, x4, x5, x6, x7, xs);
            }
            if (RPT > 2u) {
                a2 += row_block(r2, b, x0, x1, x2, x3, x4, x5, x6, x7, xs);
                a3 += row_block(r3, b, x0, x1, x2, x3, x4, x5, x6, x7, xs);
            }
        }
    }
    if (TPR > 1u) {
        a0 = reduce_row(a0, li);
        if (RPT > 1u) {
            a1 = reduce_row(a1, li);
        }
        if (RPT > 2u) {
            a2 = reduce_row(a2, li);
            a3 = reduce_row(a3, li);
        }
        if (NORM) {
            ss = reduce_row(ss, li);
        }
    }
    return RowSums(vec4<f32>(a0, a1, a2, a3), ss);
}

// The rows of workgroup `wgx` of a one-token product of ceil(rows / (64 / TPR * RPT))
// workgroups. Rows past the last are not stored.
fn matvec_rows(wgx: u32, li: u32) {
    let lane = li % TPR;
    let r0 = (wgx * (WG / TPR) + li / TPR) * RPT;
    let s = row_sums(r0, lane, li);
    // 1 / rms(x) (RMSNorm's scale, common to every weight of the row), 1 without NORM.
    var inv = 1.0;
    if (NORM) {
        inv = 1.0 / sqrt(s.ss / f32(p.cols) + p.eps);
    }
    var v = s.a * inv;
    if (GLU) {
        // v holds the gate's rows; the up projection's, same rows of the second matrix.
        use_part(1u);
        let u = row_sums(r0, lane, li);
        use_part(0u);
        v = vec4<f32>(silu(v.x), silu(v.y), silu(v.z), silu(v.w)) * u.a * inv;
    }
    if (lane != 0u || r0 >= p.rows) {
        return;
    }
    store(0u, r0, v.x);
    if (RPT > 1u && r0 + 1u < p.rows) {
        store(0u, r0 + 1u, v.y);
    }
    if (RPT > 2u && r0 + 2u < p.rows) {
        store(0u, r0 + 2u, v.z);
    }
    if (RPT > 2u && r0 + 3u < p.rows) {
        store(0u, r0 + 3u, v.w);
    }
}

// One token, one matrix: dispatch (ceil(rows / (64 / TPR * RPT)), 1, 1).
@compute @workgroup_size(64)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    matvec_rows(wg.x, li);
}

// The 32 dequantized weights `wq` of a block against x[xr][8i .. 8i+32].
fn dot_block(wq: array<vec4<f32>, 8>, xr: u32, i: u32) -> f32 {
    return dot(wq[0], xv(xr, i)) + dot(wq[1], xv(xr, i + 1u)) + dot(wq[2], xv(xr, i + 2u))
        + dot(wq[3], xv(xr, i + 3u)) + dot(wq[4], xv(xr, i + 4u)) + dot(wq[5], xv(xr, i + 5u))
        + dot(wq[6], xv(xr, i + 6u)) + dot(wq[7], xv(xr, i + 7u));
}

// TT tokens per thread, one row per thread: dispatch (ceil(rows / 64), ceil(n_tokens / TT)).
// The accumulators are named scalars, not an array: CPU adapters keep a dynamically indexed
// array in memory, which costs more than the arithmetic.
@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    let t0 = gid.y * TT;
    if (r >= p.rows || t0 >= step.n_tokens) {
        return;
    }
    let nt = min(TT, step.n_tokens - t0);
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    let blocks = (p.cols + 31u) / 32u;
    let row4 = p.x_stride / 4u;
    let xr = t0 * row4;
    for (var b = 0u; b < blocks; b++) {
        let sz = scale_zero(r, b);
        let q = block_codes(r, b);
        var wq: array<vec4<f32>, 8>;
        for (var j = 0u; j < 8u; j++) {
            wq[j] = sz.x * q[j] + sz.y;
        }
        let i = 8u * b;
        a0 += dot_block(wq, xr, i);
        if (nt > 1u) {
            a1 += dot_block(wq, xr + row4, i);
        }
        if (nt > 2u) {
            a2 += dot_block(wq, xr + 2u * row4, i);
        }
        if (nt > 3u) {
            a3 += dot_block(wq, xr + 3u * row4, i);
        }
    }
    store(t0, r, a0);
    if (nt > 1u) {
        store(t0 + 1u, r, a1);
    }
    if (nt > 2u) {
        store(t0 + 2u, r, a2);
    }
    if (nt > 3u) {
        store(t0 + 3u, r, a3);
    }
}
