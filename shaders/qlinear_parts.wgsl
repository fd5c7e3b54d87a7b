// Several matrices' one-token products in one dispatch (decode), appended to qlinear.wgsl:
// Q, K and V (`PARTS` 3: each matrix a run of workgroups, in order, each into its own
// output) or the gate and up projections (`GLU`: each workgroup computes the same rows of
// both and stores silu(gate) * up, SwiGLU's product, where the gate's rows go). The host
// (src/gpu/kernels.rs `qlinear_parts_source`) prepends `parts`, every matrix's Params
// (binding 0), and the private `part` and `p`, the matrix this workgroup is on and its
// Params (`use_part`), which `wl`, `block_codes` (switching on the matrix and `p.bits` once
// per block of 32 codes, to a decoder reading that matrix's array), `y_get` and
// `y_set` follow. A token's dispatches are what a GPU's decode waits on for a small model,
// not its bytes (README, "What limits each"): this spares two per layer for Q, K and V and
// one for the gate and up projections.
@compute @workgroup_size(64)
fn matvec_parts(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let per_wg = WG / TPR * RPT;
    var first = 0u;
    var k = 0u;
    loop {
        if (GLU || k + 1u >= PARTS) {
            break;
        }
        let n = (parts[k].rows + per_wg - 1u) / per_wg;
        if (wg.x < first + n) {
            break;
        }
        first += n;
        k += 1u;
    }
    use_part(k);
    matvec_rows(wg.x - first, li);
}
