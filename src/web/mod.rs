//! The browser runtime (wasm32 only): it adapts browser APIs and signals to `ensemble`,
//! `gpu` and `runtime`, and holds no model or policy logic of its own.
//!
//! - `error`: the typed errors JS sees (`FlexQuantError` with a `code`).
//! - `fetch`: `fetch` with streamed progress, on the window or in a worker.
//! - `store`: the Cache API (only verified files are stored; the completion marker last).
//! - `loader`: manifest and files by URL relative to the manifest, cache first, verified.
//! - `events`: what `onProgress` / `onEvent` receive.
//! - `engine`: the wasm-bindgen `Engine`: options, chat token by token, and between tokens
//!   the signals and `runtime::Elastic`'s decision.
//! - `trajectory`: executing those decisions: load a step, swap, prefetch, rebuild after a
//!   device loss.

pub mod engine;
pub mod error;
pub mod events;
pub mod fetch;
pub mod loader;
pub mod store;
mod trajectory;

pub use engine::Engine;
pub use error::{Code, WebError};

/// Milliseconds on the page's monotonic clock (`performance.now()`), window or worker.
pub fn now_ms() -> f64 {
    use wasm_bindgen::JsCast;
    js_sys::Reflect::get(&js_sys::global(), &"performance".into())
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .map_or_else(js_sys::Date::now, |p| p.now())
}
