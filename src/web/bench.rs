//! A microbenchmark exported for the browser benchmark page: the CPU backend's integer dot
//! product alone (no model, no attention), streaming a weight matrix of a given size once per
//! call, to set the decode speed against the kernel's own ceiling in the same page.

use crate::cpu::act::Q16;
use crate::cpu::kernel::matmul;
use crate::ensemble::format::{PackedMatrix, PackedShape};
use crate::web::error::WebError;
use wasm_bindgen::prelude::*;

/// GB/s of packed weight bytes (codes and scales) through `kernel::matmul` for one token:
/// a `bits`-bit matrix of 576 columns (the demo model's width), group 64, with enough rows for
/// `bytes`, streamed `reps` times after one warm-up pass (best pass).
#[wasm_bindgen(js_name = benchDotKernel)]
pub fn bench_dot_kernel(bytes: f64, bits: u32, reps: u32) -> Result<f64, JsValue> {
    let cols = 576;
    let row = PackedShape::new(1, cols, bits, 64)
        .map_err(|e| WebError::from(e).to_js())?
        .bytes();
    let rows = ((bytes / row as f64) as usize).max(1);
    let shape = PackedShape::new(rows, cols, bits, 64).map_err(|e| WebError::from(e).to_js())?;
    let m = PackedMatrix {
        shape,
        codes: (0..shape.code_words())
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect(),
        scales: vec![0x2c00_3c00; shape.scale_words()], // (1.0, 0.0625) in f16
    };
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let a = Q16::quantize(&x, 1, &shape);
    let mut y = vec![0f32; rows];
    let now = crate::runtime::clock::now_ms;
    matmul(&m, &a, &mut y);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = now();
        matmul(&m, &a, &mut y);
        best = best.min(now() - t);
    }
    std::hint::black_box(&y);
    Ok(shape.bytes() as f64 / (best.max(1e-3) / 1e3) / 1e9)
}

/// The WebGPU read-everything yardstick in this browser (`gpu::probe::read_kernel`): GB/s of
/// reading `bytes` once and reducing them, best of `reps` runs in either access pattern, on a
/// device of its own. `{ adapter, readKernelGbs, variant }`; the benchmark page sets the
/// WebGPU engine's decode speed against it.
#[wasm_bindgen(js_name = benchReadKernel)]
pub async fn bench_read_kernel(bytes: f64, reps: u32) -> Result<JsValue, JsValue> {
    use crate::gpu::{probe, Gpu, Requirements};
    let bytes = (bytes.max(16.0) as u64).div_ceil(16) * 16;
    let req = Requirements {
        max_binding: bytes,
        max_workgroups: probe::read_dispatch((bytes / 16) as u32).0[0],
    };
    let gpu = Gpu::new(req).await.map_err(|e| WebError::from(e).to_js())?;
    let mut kernels = crate::gpu::Kernels::new(&gpu);
    let r = probe::read_kernel(&gpu, &mut kernels, bytes, reps.max(1) as usize).await;
    let out = serde_json::json!({
        "adapter": gpu.adapter_name(),
        "readKernelGbs": r.bytes_per_s / 1e9,
        "variant": r.variant,
        "bytes": bytes,
    });
    gpu.device.destroy();
    Ok(crate::web::events::to_js(&out))
}
