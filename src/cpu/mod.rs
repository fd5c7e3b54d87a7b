//! The packed CPU backend: runs an EQM's shards as shipped (codes and f16 scales, no f32 copy
//! of any weight) with int16 activations and integer dot products, in wasm (simd128, Web Worker
//! threads where the page allows) and natively (AVX2 when the CPU has it, threads).
//!
//! - `act`: activations as int16 blocks in each bit-width's lane order.
//! - `kernel`: packed codes x int16 blocks (simd128, AVX2, portable); `avx2`: the x86 row
//!   loop and code unpacking; `planes`: the same from bit planes.
//! - `attention`: causal grouped-query attention over the KV cache (widened to f32); `kv`:
//!   the cache's f16 values (stored rounded, widened exactly).
//! - `model`: `CpuModel`, the forward pass; `backend`: it as a `runtime::Backend`.
//! - `prefetch`: decode asks for weight rows ahead of the kernel.
//! - `par`: regions on `pool` (spinning threads: std natively, Web Workers in wasm) or a loop;
//!   `width`: how many of the pool's threads a token uses (measured).

pub mod act;
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
pub mod backend;
pub mod kernel;
pub mod kv;
pub mod model;
pub mod par;
pub mod planes;
#[cfg_attr(
    all(target_arch = "wasm32", not(feature = "threads")),
    allow(dead_code)
)]
pub mod pool;
pub mod prefetch;
pub mod probe;
pub mod width;

pub use backend::CpuFactory;
pub use model::CpuModel;
