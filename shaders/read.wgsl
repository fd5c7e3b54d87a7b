// The yardstick of decode speed (issue 18): read every word of a buffer once and reduce it, the
// least any decode kernel must do with a model step's weights. Each thread sums `vec4<u32>`
// words, either interleaved with its neighbours (thread t reads t, t + threads, ...: what a
// GPU coalesces) or from one contiguous run of its own (what a CPU adapter's SIMD lanes and
// caches prefer; `CONTIGUOUS`); the workgroup then adds its threads' sums and writes one word.
// Sums wrap (u32), so the result can be checked exactly against the host.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> data: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> sums: array<u32>;

override CONTIGUOUS: bool = false;

var<workgroup> part: array<u32, 64>;

// Dispatch (workgroups, 1, 1); `sums` has one word per workgroup.
@compute @workgroup_size(64)
fn read_all(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
) {
    var acc = vec4<u32>(0u);
    if (CONTIGUOUS) {
        let start = gid.x * p.run;
        let end = min(start + p.run, p.n_vec4);
        for (var i = start; i < end; i++) {
            acc += data[i];
        }
    } else {
        // Four independent loads in flight per iteration (GPUs need many to cover latency).
        let t = p.threads;
        var i = gid.x;
        var a1 = vec4<u32>(0u);
        var a2 = vec4<u32>(0u);
        var a3 = vec4<u32>(0u);
        for (; i + 3u * t < p.n_vec4; i += 4u * t) {
            acc += data[i];
            a1 += data[i + t];
            a2 += data[i + 2u * t];
            a3 += data[i + 3u * t];
        }
        for (; i < p.n_vec4; i += t) {
            acc += data[i];
        }
        acc += a1 + a2 + a3;
    }
    part[li] = acc.x + acc.y + acc.z + acc.w;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (li < s) {
            part[li] += part[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        sums[wg.x] = part[0];
    }
}
