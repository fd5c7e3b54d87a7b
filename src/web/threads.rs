//! Wasm threads for the CPU backend (`threads` option, `checkSupport().threads`).
//!
//! The package holds two builds: `wasm/` (one thread, runs everywhere) and `wasm-mt/` (feature
//! `threads`: shared memory, std built with atomics). The JS wrapper loads the threaded one
//! only where it can run: in a Web Worker (rows are waited for with `Atomics.wait`, which a
//! page's main thread may not call) of a cross-origin isolated page (COOP/COEP: without them
//! there is no `SharedArrayBuffer`). Here the engine then starts Web Workers sharing this
//! module's memory (wasm-bindgen-rayon), once the CPU backend runs, each running a
//! `cpu::pool` worker, and `cpu::par` splits the matrix rows over them and the engine's thread
//! (each row is computed by one thread, so the answer is the same for any number of threads).

use crate::web::api::get;
use serde::{Deserialize, Serialize};

/// Most threads `auto` starts: past the cores of a laptop the rows get too few to share.
pub const AUTO_MAX: u32 = 8;
/// Most threads an app may ask for.
pub const MAX: u32 = 64;

/// The `threads` option: `'auto'` (default) or a count, 1 meaning one thread.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(try_from = "serde_json::Value")]
pub enum ThreadsOption {
    #[default]
    Auto,
    Count(u32),
}

impl TryFrom<serde_json::Value> for ThreadsOption {
    type Error = String;
    fn try_from(v: serde_json::Value) -> Result<Self, String> {
        match &v {
            serde_json::Value::String(s) if s == "auto" => Ok(ThreadsOption::Auto),
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(k @ 1..) if k <= MAX as u64 => Ok(ThreadsOption::Count(k as u32)),
                _ => Err(format!("{n} is not a thread count (1..={MAX}, or 'auto')")),
            },
            _ => Err(format!("{v} is not a thread count (1..={MAX}, or 'auto')")),
        }
    }
}

/// What wasm threads this browser offers an engine in a Web Worker (`checkSupport().threads`).
#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ThreadSupport {
    /// Whether a worker engine here can run the CPU backend on several threads.
    pub available: bool,
    /// The threads `threads: 'auto'` starts in a worker engine here (1 when not available).
    pub auto_threads: u32,
    /// `navigator.hardwareConcurrency`.
    pub hardware_concurrency: u32,
    pub reason: String,
}

/// Whether this global is a Web Worker's.
fn in_worker() -> bool {
    !get(&js_sys::global(), "WorkerGlobalScope").is_undefined()
}

/// What the page offers, wherever it is asked (the main thread included: it says what a
/// worker engine would get).
pub fn support() -> ThreadSupport {
    let g = js_sys::global();
    let cores = get(&get(&g, "navigator"), "hardwareConcurrency")
        .as_f64()
        .map_or(1, |c| c.clamp(1.0, 1024.0) as u32);
    let why_not = if !get(&g, "crossOriginIsolated").is_truthy() {
        Some("the page is not cross-origin isolated (serve it with COOP: same-origin and COEP: require-corp, or register the package's coi-serviceworker.js)")
    } else if get(&g, "SharedArrayBuffer").is_undefined() {
        Some("this browser has no SharedArrayBuffer")
    } else {
        None
    };
    let auto_threads = if why_not.is_some() {
        1
    } else {
        cores.min(AUTO_MAX)
    };
    ThreadSupport {
        available: why_not.is_none(),
        auto_threads,
        hardware_concurrency: cores,
        reason: why_not.map_or_else(
            || format!("{auto_threads} threads in a worker engine by default ({cores} reported cores, at most {AUTO_MAX})"),
            str::to_string,
        ),
    }
}

/// How many threads an engine asked for `option` runs here, and why not more when fewer than
/// asked for (the warning the app gets): one where threads cannot run, at most the reported
/// cores otherwise.
pub fn plan(option: ThreadsOption) -> (u32, Option<String>) {
    let want = match option {
        ThreadsOption::Count(1) => return (1, None),
        ThreadsOption::Count(k) => Some(k),
        ThreadsOption::Auto => None,
    };
    let s = support();
    let why_not = if !in_worker() {
        Some("the engine runs on the page's main thread, which may not wait on other threads (use CreateWorkerEngine)".to_string())
    } else if !s.available {
        Some(s.reason)
    } else if !cfg!(feature = "threads") {
        Some("the one-thread build of the wasm is loaded".to_string())
    } else {
        None
    };
    match (want, why_not) {
        // The pool's threads spin while they wait for each other: more of them than cores
        // only wait (3 threads on 2 cores decoded no faster than one here).
        (Some(k), None) if k > s.hardware_concurrency => (
            s.hardware_concurrency,
            Some(format!(
                "options.threads: {k} asked for, running {}: the browser reports {} cores, and more threads than cores only wait on each other",
                s.hardware_concurrency, s.hardware_concurrency
            )),
        ),
        (Some(k), None) => (k, None),
        (None, None) => (s.auto_threads, None),
        (Some(k), Some(why)) => (
            1,
            Some(format!(
                "options.threads: {k} asked for, running one thread: {why}"
            )),
        ),
        (None, Some(_)) => (1, None),
    }
}

/// Starts `threads - 1` Web Workers sharing this module's memory (wasm-bindgen-rayon's
/// `initThreadPool`), each running a `cpu::pool` worker; the engine's own thread is the last
/// one. Once per wasm instance (a second engine in the same worker reuses it). `Err(why)` when
/// the workers did not start within `timeout_ms`: the backend then runs on one thread.
#[cfg(feature = "threads")]
pub async fn start_pool(threads: u32, timeout_ms: i32) -> Result<(), String> {
    use futures_util::future::{select, Either};
    use std::sync::atomic::{AtomicBool, Ordering};
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let workers = threads as usize - 1;
    let start = wasm_bindgen_futures::JsFuture::from(wasm_bindgen_rayon::init_thread_pool(workers));
    let timeout = crate::web::sleep(timeout_ms);
    futures_util::pin_mut!(start, timeout);
    match select(start, timeout).await {
        Either::Left((Ok(_), _)) => {
            // Each rayon worker runs one pool worker's loop for good.
            let pool = crate::cpu::pool::Pool::new(workers, rayon::spawn);
            let _ = crate::cpu::par::use_pool(pool);
            Ok(())
        }
        Either::Left((Err(e), _)) => Err(format!(
            "the thread pool did not start: {}",
            crate::web::WebError::js_text(&e)
        )),
        Either::Right(_) => Err(format!(
            "the thread pool's {workers} workers did not start within {timeout_ms} ms"
        )),
    }
}

/// The one-thread build has no pool.
#[cfg(not(feature = "threads"))]
pub async fn start_pool(_threads: u32, _timeout_ms: i32) -> Result<(), String> {
    Ok(())
}
