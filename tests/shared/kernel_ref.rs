//! Reference results shared by the native kernel tests (tests/native/gpu_kernels.rs) and the
//! browser's (tests/web.rs), included by both with `#[path]`.

/// The fused kernels' outputs from each matrix's rows (its product and the sum of its terms'
/// magnitudes, in f64): Q, K and V's products as they are; for the gate and up projections
/// (`glu`), SwiGLU's silu(gate) * up into one output, with the magnitude its rounding scales by.
pub fn fused_want(glu: bool, sums: Vec<Vec<(f64, f64)>>) -> Vec<Vec<(f64, f64)>> {
    if !glu {
        return sums;
    }
    let rows = sums[0].iter().zip(&sums[1]);
    vec![rows
        .map(|(&(gs, ga), &(us, ua))| {
            let silu = gs / (1.0 + (-gs).exp());
            (silu * us, (silu.abs() + ga) * ua + 1e-3)
        })
        .collect()]
}
