//! The native integration tests, one test binary (one link of wgpu, tokenizers and plotters
//! instead of one per file), one module per area. `cargo test --test native MODULE::` runs one
//! area, e.g. `cargo test --release --test native gpu_kernels::`.
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod gpu_util;
#[path = "../shared/kernel_ref.rs"]
mod kernel_ref;

mod bad_input;
mod builder;
mod builder_real;
mod chat_template;
mod cpu;
mod elastic;
mod fuzz_found;
mod gpu_demo;
mod gpu_kernels;
mod gpu_model;
mod gpu_session;
mod hostile;
mod manifest;
mod model_real;
mod model_tiny;
mod nested;
mod quant;
mod quant_real;
mod reference;
mod request_fields;
mod search;
mod structured;
mod text;
mod walk;
