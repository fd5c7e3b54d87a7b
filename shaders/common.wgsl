// Prepended to every kernel (src/gpu/kernels.rs). Binding 0 is the kernel's own parameters;
// binding 1 is what changes from one forward call to the next, written once per call.
struct Step {
    n_tokens: u32, // tokens in this call (1 when decoding)
    pos0: u32,     // absolute position of the first of them (= KV cache length before)
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(1) var<uniform> step: Step;

// Two values as the f16 words of the KV cache (`runtime::backend::KvLayout`), clamped to f16's
// finite range, which pack2x16float leaves undefined past (F16_MAX: prepended by the host,
// `kernels::shared_constants`).
fn pack_f16(v: vec2<f32>) -> u32 {
    return pack2x16float(clamp(v, vec2(-F16_MAX), vec2(F16_MAX)));
}
