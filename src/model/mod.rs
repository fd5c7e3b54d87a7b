//! The model: configuration, weight loading (GGUF, safetensors), tokenizer, chat template and
//! the CPU reference forward pass.

pub mod chat;
pub mod config;
#[cfg(not(target_arch = "wasm32"))]
pub mod eval;
pub mod gguf;
pub mod load;
pub mod math;
#[cfg(not(target_arch = "wasm32"))]
pub mod ops;
pub mod tokenizer;
pub mod weights;

#[cfg(not(target_arch = "wasm32"))]
pub mod forward;
#[cfg(not(target_arch = "wasm32"))]
pub mod tiny;

pub use config::LlamaConfig;
pub use weights::{Linear, ModuleId, ModuleKind, Weights};
