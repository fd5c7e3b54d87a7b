//! Asking for weight rows before the kernel reaches them. Decode streams every weight once per
//! token, far more than the caches hold; the hardware prefetchers alone leave the kernel waiting
//! on memory for much of each row (measured in `kernel::matmul_rows`). Natively this is
//! `prefetcht0`; wasm has no prefetch instruction, so there it is a plain load of one word per
//! 64-byte line, which the CPU overlaps with the rows in between.

/// Bytes ahead of the row being computed that decode asks for (measured: 1.5-10 kB were alike
/// on a 90 MB stream; see `matmul_rows`).
pub const AHEAD_BYTES: usize = 2048;

/// Words per 64-byte cache line.
const LINE_WORDS: usize = 16;

/// Brings the cache lines of `words` toward the core.
#[inline(always)]
pub fn lines(words: &[u32]) {
    let mut k = 0;
    while k < words.len() {
        one(&words[k]);
        k += LINE_WORDS;
    }
}

#[inline(always)]
fn one(w: &u32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; any address is allowed and this one is a live reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(w as *const u32 as *const i8);
    }
    #[cfg(target_arch = "wasm32")]
    // SAFETY: a read of a live reference; volatile so that the unused load is kept.
    unsafe {
        core::ptr::read_volatile(w);
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "wasm32")))]
    let _ = w;
}
