//! Data parallelism where there are threads: rayon natively; in wasm, rayon over Web Workers
//! in the threaded build (feature `threads`, once `initThreadPool` has started the pool) and a
//! plain loop otherwise (one thread always works in the browser; see the README on threads).

#[cfg(all(target_arch = "wasm32", feature = "threads"))]
use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads of the Web Worker pool once started (0: none, the loop runs on the caller).
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
static POOL_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Records that `initThreadPool(threads)` resolved: rayon's global pool exists from now on.
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
pub fn pool_started(threads: usize) {
    POOL_THREADS.store(threads, Ordering::SeqCst);
}

/// Whether rayon's pool can be used: always natively; in wasm only once it was started (asking
/// rayon before would make it spawn threads itself, which wasm cannot).
#[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
fn pooled() -> bool {
    #[cfg(target_arch = "wasm32")]
    return POOL_THREADS.load(Ordering::Relaxed) > 1;
    #[cfg(not(target_arch = "wasm32"))]
    true
}

/// Calls `f(index, chunk)` for every `chunk`-sized piece of `data`, in parallel where there are
/// threads. Each piece is computed by one thread whichever it is, so the results do not depend
/// on the number of threads.
pub fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if pooled() {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    }
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c)
    }
}

/// Threads the CPU backend computes with.
pub fn threads() -> usize {
    #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
    if pooled() {
        return rayon::current_num_threads();
    }
    1
}
