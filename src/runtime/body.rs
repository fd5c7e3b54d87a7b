//! How a download's buffer grows: never past what the manifest declares (`cap`), never more
//! than twice what has arrived. A hostile manifest that declares a 4 GiB file then reserves
//! nothing up front; a true file ends with capacity exactly its size (wasm memory never
//! shrinks, so every byte reserved and not used is paid for the page's lifetime).

/// The capacity to reserve when `incoming` bytes arrive on top of `have` (a result below
/// `have + incoming` means the body is over `cap`: the caller stops there).
pub fn next_capacity(have: usize, incoming: usize, cap: u64) -> usize {
    let need = have.saturating_add(incoming);
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    // Doubling (amortized linear copying), clamped to the declared size.
    need.max(have.saturating_mul(2)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_doubling_up_to_the_declared_size_only() {
        // A 4 GiB declaration and 100 bytes arriving reserve about 100 bytes, not 1 GiB.
        assert_eq!(next_capacity(0, 100, 4 << 30), 100);
        assert_eq!(next_capacity(100, 100, 4 << 30), 200);
        assert_eq!(next_capacity(1000, 10, 4 << 30), 2000);
        // A true file of 1500 bytes ends at capacity 1500 exactly.
        assert_eq!(next_capacity(1000, 10, 1500), 1500);
        // Over the cap: less than what is needed, so the caller refuses the body.
        assert!(next_capacity(1500, 1, 1500) < 1501);
    }
}
