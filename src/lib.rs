//! FlexQuant: an elastic ensemble of mixed-precision quantized models (arXiv 2501.07139).
//!
//! Data flows one way: weights -> `quant` -> `build` -> ensemble files -> `gpu`/`runtime` ->
//! tokens. See the README's architecture section.

#[cfg(not(target_arch = "wasm32"))]
pub mod build;
pub mod cpu;
pub mod ensemble;
pub mod error;
pub mod fuzz;
pub mod gpu;
pub mod model;
#[cfg(not(target_arch = "wasm32"))]
pub mod quant;
pub mod runtime;
#[cfg(not(target_arch = "wasm32"))]
pub mod text;
#[cfg(target_arch = "wasm32")]
pub mod web;

pub use error::{Error, Result};
