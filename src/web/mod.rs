//! The browser runtime (wasm32 only): it adapts browser APIs and signals to `ensemble`,
//! `gpu` and `runtime`, and holds no model or policy logic of its own.
//!
//! - `error`: the typed errors JS sees (`FlexQuantError` with a `code`).
//! - `fetch`: `fetch` with streamed progress, on the window or in a worker.
//! - `store`: the Cache API (only verified files are stored; the completion marker last).
//! - `loader`: manifest and files by URL relative to the manifest, cache first, verified.
//! - `api`: the options, requests, stats and chunks JS exchanges with the engine (serde).
//! - `backend`: WebGPU or the packed CPU backend as one `runtime::Backend`, and `auto`'s probe.
//! - `bench`: the kernel microbenchmark the browser benchmark page calls.
//! - `digest`: sha256 by SubtleCrypto (the sha2 crate where it is missing).
//! - `events`: what `onProgress` / `onEvent` receive.
//! - `engine`: the wasm-bindgen `Engine`: options, chat token by token, and between tokens
//!   the signals and `runtime::Elastic`'s decision.
//! - `trajectory`: the browser's side of `runtime::walk` (which loads steps, swaps, prefetches
//!   and rebuilds after a device loss): the loader as its byte source, the device hooks, the
//!   walk's events as JS events.

pub mod api;
pub mod backend;
pub mod bench;
pub mod cache_admin;
pub mod digest;
pub mod engine;
pub mod error;
pub mod events;
pub mod fetch;
pub mod loader;
pub mod store;
mod trajectory;

pub use engine::Engine;
pub use error::{Code, WebError};

pub use crate::runtime::clock::now_ms;
