// Negative log-likelihood of each row's target under softmax(logits): log sum exp - logit.
// Perplexity then needs 4 bytes per token back, not the vocabulary.

// `p`: the kernel's Params, generated from src/gpu/params.rs and prepended by the host.
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;
@group(0) @binding(4) var<storage, read_write> nll: array<f32>;

var<workgroup> red: array<f32, 256>;

// One workgroup per row: dispatch (n_tokens).
@compute @workgroup_size(256)
fn nll_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let base = wg.x * p.vocab;
    var mx = -3.4e38;
    for (var i = li; i < p.vocab; i += 256u) {
        mx = max(mx, logits[base + i]);
    }
    red[li] = mx;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var i = li; i < p.vocab; i += 256u) {
        sum += exp(logits[base + i] - mx);
    }
    red[li] = sum;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let tg = min(targets[wg.x], p.vocab - 1u);
        nll[wg.x] = log(red[0]) + mx - logits[base + tg];
    }
}
