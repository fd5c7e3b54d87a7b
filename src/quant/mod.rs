//! Quantizers (RTN, GPTQ), the packed format they produce, the module library on disk, and
//! the mixed-precision models (EQMs) built from it.

pub mod format;
pub mod rtn;

#[cfg(not(target_arch = "wasm32"))]
pub mod calib;
#[cfg(not(target_arch = "wasm32"))]
pub mod eqm;
#[cfg(not(target_arch = "wasm32"))]
pub mod evaluate;
#[cfg(not(target_arch = "wasm32"))]
pub mod gptq;
#[cfg(not(target_arch = "wasm32"))]
pub mod library;
#[cfg(not(target_arch = "wasm32"))]
pub mod linalg;
#[cfg(not(target_arch = "wasm32"))]
pub mod plot;
#[cfg(not(target_arch = "wasm32"))]
pub mod static_table;
