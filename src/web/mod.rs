//! The browser runtime (wasm32 only): it adapts browser APIs and signals to `ensemble`,
//! `gpu` and `runtime`, and holds no model or policy logic of its own.
//!
//! - `error`: the typed errors JS sees (`FlexQuantError` with a `code`).
//! - `fetch`: `fetch` with streamed progress, on the window or in a worker.
//! - `store`: the Cache API (only verified files are stored; the completion marker last).
//! - `loader`: manifest and files by URL relative to the manifest, cache first, verified.
//! - `api`: the options, requests, stats and chunks JS exchanges with the engine (serde).
//! - `backend`: WebGPU or the packed CPU backend as one `runtime::Backend`.
//! - `support`: what the browser offers (`Engine.checkSupport()`) and `auto`'s choice.
//! - `bench`: the kernel microbenchmark the browser benchmark page calls.
//! - `digest`: sha256 by SubtleCrypto (the sha2 crate where it is missing).
//! - `events`: what `onProgress` / `onEvent` receive.
//! - `engine`: the wasm-bindgen `Engine`: options, chat token by token, and between tokens
//!   the signals and `runtime::Elastic`'s decision.
//! - `session_io`: a conversation and its KV cache as a JS object (`exportSession` /
//!   `importSession`), carried to another engine of the same ensemble.
//! - `threads`: wasm threads for the CPU backend (the `threads` option, the threaded build's
//!   Web Worker pool).
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
pub mod session_io;
pub mod store;
pub mod support;
pub mod threads;
mod trajectory;

pub use engine::Engine;
pub use error::{Code, WebError};

pub use crate::runtime::clock::now_ms;
use wasm_bindgen::JsValue;

/// Resolves after `ms` milliseconds (setTimeout, in a window or a worker).
pub(crate) async fn sleep(ms: i32) {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        let g = js_sys::global();
        if let Ok(f) = js_sys::Reflect::get(&g, &"setTimeout".into()) {
            let f: js_sys::Function = wasm_bindgen::JsCast::unchecked_into(f);
            let _ = f.call2(&g, &resolve, &ms.into());
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(p).await;
}

/// `fut`'s output, or `None` when `ms` milliseconds pass first (`None`: no limit). The timer
/// is cleared either way (a download sets one per chunk).
pub(crate) async fn within<F: std::future::Future>(fut: F, ms: Option<u32>) -> Option<F::Output> {
    use futures_util::future::{select, Either};
    let Some(ms) = ms else {
        return Some(fut.await);
    };
    let g = js_sys::global();
    let id = std::rc::Rc::new(std::cell::Cell::new(JsValue::UNDEFINED));
    let p = js_sys::Promise::new(&mut |resolve, _| {
        if let Ok(f) = js_sys::Reflect::get(&g, &"setTimeout".into()) {
            let f: js_sys::Function = wasm_bindgen::JsCast::unchecked_into(f);
            id.set(
                f.call2(&g, &resolve, &ms.into())
                    .unwrap_or(JsValue::UNDEFINED),
            );
        }
    });
    let timer = wasm_bindgen_futures::JsFuture::from(p);
    futures_util::pin_mut!(fut);
    let out = match select(fut, timer).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    };
    if let Ok(f) = js_sys::Reflect::get(&g, &"clearTimeout".into()) {
        let f: js_sys::Function = wasm_bindgen::JsCast::unchecked_into(f);
        let _ = f.call1(&g, &id.take());
    }
    out
}

/// `fut`'s output, or `None` once `signal` aborts first (at once if it already has). The
/// future is dropped then: its downloads are aborted (`fetch::AbortOnDrop`) and what it built
/// is freed.
pub(crate) async fn until_aborted<F: std::future::Future>(
    fut: F,
    signal: &web_sys::AbortSignal,
) -> Option<F::Output> {
    use futures_util::future::{select, Either};
    if signal.aborted() {
        return None;
    }
    let listener = std::cell::RefCell::new(None::<js_sys::Function>);
    let p = js_sys::Promise::new(&mut |resolve, _| {
        let _ = signal.add_event_listener_with_callback("abort", &resolve);
        *listener.borrow_mut() = Some(resolve);
    });
    let aborted = wasm_bindgen_futures::JsFuture::from(p);
    futures_util::pin_mut!(fut);
    let out = match select(fut, aborted).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    };
    if let Some(f) = listener.take() {
        let _ = signal.remove_event_listener_with_callback("abort", &f);
    }
    out
}

/// The panic hook: the message and stack on the console (console_error_panic_hook), and the
/// message in `globalThis.__flexquantPanic` so the JS wrapper can put it in the `internal`
/// error it raises (a panic aborts the wasm call with a bare `RuntimeError: unreachable`), and
/// `globalThis.__flexquantOnPanic(message)` called if the wrapper set it.
pub fn set_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            console_error_panic_hook::hook(info);
            let g = js_sys::global();
            let msg: wasm_bindgen::JsValue = info.to_string().into();
            let _ = js_sys::Reflect::set(&g, &"__flexquantPanic".into(), &msg);
            // A panic inside an async call aborts wasm-bindgen's task queue, not the call: its
            // promise would never settle. The wrapper's callback rejects the calls in flight.
            if let Ok(f) = js_sys::Reflect::get(&g, &"__flexquantOnPanic".into()) {
                if let Some(f) = wasm_bindgen::JsCast::dyn_ref::<js_sys::Function>(&f) {
                    let _ = f.call1(&wasm_bindgen::JsValue::NULL, &msg);
                }
            }
        }));
    });
}
