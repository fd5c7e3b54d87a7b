//! Data parallelism for the CPU backend's many small regions (a decode token runs ~240 matrix
//! products of 0.05-0.1 ms each): `cpu::pool`'s spinning threads, natively (started on first
//! use, as many as rayon's threads) and in the threaded wasm build (on Web Workers, once the
//! engine started it); a plain loop otherwise (one thread always works in the browser; see the
//! README on threads). Natively, a region started inside one of rayon's workers runs there
//! alone: its caller is already one of several parallel tasks.

use crate::cpu::pool::Pool;

#[cfg(all(target_arch = "wasm32", feature = "threads"))]
static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();

/// Makes the CPU backend's kernels use `pool` from now on (once; `Err` gives it back when a
/// pool is already in use).
#[cfg(all(target_arch = "wasm32", feature = "threads"))]
pub fn use_pool(pool: Pool) -> Result<(), Pool> {
    POOL.set(pool)
}

/// The pool regions run on, if any.
fn pool() -> Option<&'static Pool> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
        if rayon::current_thread_index().is_some() {
            return None;
        }
        Some(POOL.get_or_init(|| {
            // A worker that could not be started is never waited for (regions do not need it).
            Pool::new(rayon::current_num_threads().max(1) - 1, |f| {
                let _ = std::thread::Builder::new()
                    .name("flexquant-cpu".into())
                    .spawn(f);
            })
        }))
    }
    #[cfg(all(target_arch = "wasm32", feature = "threads"))]
    return POOL.get();
    #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
    None
}

/// Calls `f(index, chunk)` for every `chunk`-sized piece of `data`, in parallel where there are
/// threads. Each piece is computed by one thread whichever it is, so the results do not depend
/// on the number of threads.
pub fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if let Some(pool) = pool() {
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
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c)
    }
}

/// The start of a slice whose disjoint chunks go to different threads.
struct Base<T>(*mut T);

unsafe impl<T: Send> Sync for Base<T> {}

impl<T> Base<T> {
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// Runs one decode token's `step`; on the pool, on the thread count it measured fastest (see
/// `cpu::width`).
pub fn token<R>(step: impl FnOnce() -> R) -> R {
    match pool() {
        Some(pool) => pool.token(step),
        None => step(),
    }
}

/// Runs a prefill `step`; on the pool, on the thread count the last decode tokens chose.
pub fn prefill<R>(step: impl FnOnce() -> R) -> R {
    match pool() {
        Some(pool) => pool.prefill(step),
        None => step(),
    }
}

/// Whether the pool's decode tokens choose their thread count (on by default) or use all
/// (nothing to choose without a pool).
pub fn set_adaptive(on: bool) {
    if let Some(pool) = pool() {
        pool.set_adaptive(on);
    }
}

/// Threads the CPU backend's last decode token computed with (at most `threads()`).
pub fn active_threads() -> usize {
    pool().map_or(1, Pool::active_threads)
}

/// Threads the CPU backend computes with at most.
pub fn threads() -> usize {
    pool().map_or(1, Pool::threads)
}
