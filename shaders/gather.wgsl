// The logits of the watched tokens (`Backend::watch`: logit bias, JSON mode) written after
// the top-k's results, so that one copy brings both back instead of one copy per token:
// dst[p.base + i] = logits[ids[1 + i]] for i < ids[0] (the count, then the ids, written by
// the host when the list changes). Dispatch: enough 64-thread groups for the longest list.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> logits: array<u32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < ids[0]) {
        dst[p.base + i] = logits[ids[1u + i]];
    }
}
