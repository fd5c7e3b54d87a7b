//! A microbenchmark exported for the browser benchmark page: the CPU backend's integer dot
//! product alone (no model, no attention), streaming a weight matrix of a given size once per
//! call, to set the decode speed against the kernel's own ceiling in the same page.

use crate::cpu::probe::{dot_kernel_gbs, Layout};
use crate::web::error::WebError;
use wasm_bindgen::prelude::*;

/// GB/s of packed weight bytes (codes and scales) through `kernel::matmul` for one token
/// (`cpu::probe::dot_kernel_gbs`: a `bits`-bit matrix of 576 columns holding `bytes`, best of
/// `reps` passes).
#[wasm_bindgen(js_name = benchDotKernel)]
pub fn bench_dot_kernel(bytes: f64, bits: u32, reps: u32) -> Result<f64, JsValue> {
    dot_kernel_gbs(
        bytes,
        bits,
        Layout::Packed,
        reps,
        crate::runtime::clock::now_ms,
    )
    .map_err(|e| WebError::from(e).to_js())
}

/// `benchDotKernel` for the same matrix held as bit planes (`cpu::planes`).
#[wasm_bindgen(js_name = benchPlaneKernel)]
pub fn bench_plane_kernel(bytes: f64, bits: u32, reps: u32) -> Result<f64, JsValue> {
    dot_kernel_gbs(
        bytes,
        bits,
        Layout::Planes,
        reps,
        crate::runtime::clock::now_ms,
    )
    .map_err(|e| WebError::from(e).to_js())
}

/// Milliseconds of one layer's attention on the CPU backend after `positions` cached tokens,
/// for `queries` query tokens (1: a decode token), the cache as int8 or f16
/// (`cpu::probe::attention_ms`, best of `reps`).
#[wasm_bindgen(js_name = benchAttention)]
pub fn bench_attention(positions: u32, queries: u32, int8: bool, reps: u32) -> f64 {
    use crate::runtime::backend::KvFormat;
    let format = if int8 { KvFormat::Int8 } else { KvFormat::F16 };
    crate::cpu::probe::attention_ms(
        positions as usize,
        queries as usize,
        format,
        reps,
        crate::runtime::clock::now_ms,
    )
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
        max_workgroups: probe::read_dispatch_per_thread((bytes / 16) as u32, 8).0[0],
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
