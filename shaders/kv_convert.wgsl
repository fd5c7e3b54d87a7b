// Re-encodes cached keys (or values) of one layer from one format of the KV cache to the other
// (`runtime::backend::KvLayout`, written by rope.wgsl): f16 -> int8 when the cache gives up
// precision for memory (`Model::convert_kv`), int8 -> f16 when such a conversion is undone.
// The bytes are those the CPU backend's `cpu::kv::store` writes for the same values: an int8
// group's scale is its largest magnitude (at most KV_MAX), each element pack4x8snorm of the
// value over it, as rope.wgsl stores them; f16 clamps to its finite range (`pack_f16`).
// Converting on the device spares the host a read-back of the whole cache.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

// Words of one stored head in f16, and in int8 (codes then one scale per group).
fn f16_words() -> u32 {
    return p.head_dim / 2u;
}
fn int8_words() -> u32 {
    return p.head_dim / 4u + p.head_dim / p.kv_group;
}

// Element pair w (elements 2w, 2w + 1) of an f16 head starting at word `at` of `src`.
fn f16_pair(at: u32, w: u32) -> vec2<f32> {
    return unpack2x16float(src[at + w]);
}

// Dispatch (x, y) workgroups of 64 with x * y * 64 >= p.heads * groups per head: a thread per
// group of `p.kv_group` elements of a stored head (x at most 65535, so y carries the rest).
@compute @workgroup_size(64)
fn kv_convert(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) n: vec3<u32>) {
    let groups = p.head_dim / p.kv_group;
    let i = gid.x + gid.y * n.x * 64u;
    if (i >= p.heads * groups) {
        return;
    }
    let head = i / groups;
    let g = i % groups;
    let quads = p.kv_group / 4u; // code words of a group
    if (p.to_int8 == 1u) {
        let at = head * f16_words() + g * p.kv_group / 2u;
        var m = 0.0;
        for (var w = 0u; w < p.kv_group / 2u; w++) {
            let v = abs(f16_pair(at, w));
            m = max(m, max(v.x, v.y));
        }
        m = min(m, KV_MAX);
        let inv = select(0.0, 1.0 / m, m > 0.0);
        let out = head * int8_words();
        for (var w = 0u; w < quads; w++) {
            let v = vec4(f16_pair(at, 2u * w), f16_pair(at, 2u * w + 1u));
            dst[out + g * quads + w] = pack4x8snorm(v * inv);
        }
        dst[out + p.head_dim / 4u + g] = bitcast<u32>(m);
        return;
    }
    let at = head * int8_words();
    let scale = bitcast<f32>(src[at + p.head_dim / 4u + g]);
    let out = head * f16_words() + g * p.kv_group / 2u;
    for (var w = 0u; w < quads; w++) {
        let v = scale * unpack4x8snorm(src[at + g * quads + w]);
        dst[out + 2u * w] = pack_f16(v.xy);
        dst[out + 2u * w + 1u] = pack_f16(v.zw);
    }
}
