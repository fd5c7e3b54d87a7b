//! The WGSL inference engine on wgpu: the same Rust and shaders natively (Vulkan, Metal, DX12;
//! in CI mesa's lavapipe) and in the browser (WebGPU).
//!
//! - `device`: adapter and device with the limits the model needs.
//! - `alloc`: every buffer counted, so the runtime knows the footprint exactly.
//! - `kernels`: pipelines over shaders/*.wgsl, one per kernel and bit-width.
//! - `params`: each kernel's parameter struct, shared by the engine, its tests and the WGSL.
//! - `model`: the model on the GPU: decode, prefill and `set_module` swaps between tokens,
//!   over `buffers` (base, one buffer per module, the KV cache, activations) and `graph` (the
//!   dispatches of a forward pass, with their parameter slots and bind groups).
//! - `backend`: the model as a `runtime::Backend` (generation and the trajectory walk run on
//!   it), and `GpuFactory`, which makes one on a new device.
//! - `perplexity`: held-out perplexity on the GPU path (native).
//! - `kv_convert`: the KV cache re-encoded in the other format on the device.
//! - `scoring`: a prompt's tokens scored with the head on every position (`echo` + `logprobs`).
//! - `probe`: one kernel on host data (the parity tests, the yardstick, the variant probe).
//! - `variant`: which `matvec` variant an adapter runs, chosen by a timed probe at first load.

pub mod alloc;
mod backend;
mod buffers;
pub mod device;
pub mod error;
mod graph;
pub mod kernels;
pub mod kv_convert;
pub mod params;
#[cfg(not(target_arch = "wasm32"))]
pub mod perplexity;
pub mod probe;
mod scoring;
pub mod variant;

pub use alloc::{Allocator, GpuBuffer};
pub use device::{Gpu, Requirements};
pub use error::{GpuError, GpuResult};
pub use kernels::{Kernel, Kernels};
pub mod model;

pub use backend::GpuFactory;
pub use model::{Footprint, Model, ModelOptions};
