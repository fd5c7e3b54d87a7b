// Prepended to every kernel (src/gpu/kernels.rs). Binding 0 is the kernel's own parameters;
// binding 1 is what changes from one forward call to the next, written once per call.
struct Step {
    n_tokens: u32, // tokens in this call (1 when decoding)
    pos0: u32,     // absolute position of the first of them (= KV cache length before)
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(1) var<uniform> step: Step;
