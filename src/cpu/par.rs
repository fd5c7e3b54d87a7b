//! Data parallelism where there are threads: rayon natively; in wasm, the threaded build's
//! spinning pool (`cpu::pool` on Web Workers, once the engine started it) and a plain loop
//! otherwise (one thread always works in the browser; see the README on threads).

#[cfg(all(target_arch = "wasm32", feature = "threads"))]
static POOL: std::sync::OnceLock<crate::cpu::pool::Pool> = std::sync::OnceLock::new();

/// Makes the CPU backend's kernels use `pool` from now on (once; `Err` gives it back when a
/// pool is already in use).
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
pub fn use_pool(pool: crate::cpu::pool::Pool) -> Result<(), crate::cpu::pool::Pool> {
    POOL.set(pool)
}

/// Calls `f(index, chunk)` for every `chunk`-sized piece of `data`, in parallel where there are
/// threads. Each piece is computed by one thread whichever it is, so the results do not depend
/// on the number of threads.
pub fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    if let Some(pool) = POOL.get() {
        let (len, base) = (data.len(), Base(data.as_mut_ptr()));
        pool.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            // Chunk `i` is handed to exactly one thread, and chunks do not overlap.
            let c =
                unsafe { std::slice::from_raw_parts_mut(base.at(start), chunk.min(len - start)) };
            f(i, c)
        });
        return;
    }
    #[cfg(target_arch = "wasm32")]
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c)
    }
}

/// The start of a slice whose disjoint chunks go to different threads.
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
struct Base<T>(*mut T);

#[cfg(all(target_arch = "wasm32", feature = "threads"))]
unsafe impl<T: Send> Sync for Base<T> {}

#[cfg(all(target_arch = "wasm32", feature = "threads"))]
impl<T> Base<T> {
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// Runs one decode token's `step`; on the pool, on the thread count it measured fastest (see
/// `cpu::width`).
pub fn token<R>(step: impl FnOnce() -> R) -> R {
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    if let Some(pool) = POOL.get() {
        return pool.token(step);
    }
    step()
}

/// Runs a prefill `step`; on the pool, on the thread count the last decode tokens chose.
pub fn prefill<R>(step: impl FnOnce() -> R) -> R {
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    if let Some(pool) = POOL.get() {
        return pool.prefill(step);
    }
    step()
}

/// Whether the pool's decode tokens choose their thread count (on by default) or use all
/// (nothing to choose without a pool).
pub fn set_adaptive(on: bool) {
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    if let Some(pool) = POOL.get() {
        pool.set_adaptive(on);
    }
    let _ = on;
}

/// Threads the CPU backend's last decode token computed with (at most `threads()`).
pub fn active_threads() -> usize {
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    if let Some(pool) = POOL.get() {
        return pool.active_threads();
    }
    threads()
}

/// Threads the CPU backend computes with at most.
pub fn threads() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    return rayon::current_num_threads();
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    if let Some(pool) = POOL.get() {
        return pool.threads();
    }
    #[cfg(target_arch = "wasm32")]
    1
}
