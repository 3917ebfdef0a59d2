//! The agent's heap: handing freed memory back to the kernel after the few moments that free a
//! lot at once. glibc's allocator keeps what is freed for later allocations; after a burst of
//! short-lived allocations (the kernel's BTF parsed at start, thousands of cgroups ending in one
//! sample) much of it would otherwise stay resident for the agent's whole life.

/// Cgroups forgotten in one sample from which the freed heap is handed back: a mass deletion, not
/// the few pods a host ends now and then (malloc_trim walks the whole heap).
pub const MASS_FORGET: usize = 64;

/// Hands the heap's free pages back to the kernel.
pub fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
