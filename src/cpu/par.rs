//! Data parallelism where there are threads: rayon natively, a plain loop in wasm (one thread
//! always works in the browser; see the README on wasm threads).

/// Calls `f(index, chunk)` for every `chunk`-sized piece of `data`, in parallel natively.
pub fn chunks_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
    #[cfg(target_arch = "wasm32")]
    for (i, c) in data.chunks_mut(chunk).enumerate() {
        f(i, c)
    }
}

/// Threads the CPU backend computes with.
pub fn threads() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    return rayon::current_num_threads();
    #[cfg(target_arch = "wasm32")]
    1
}
