//! The broker's own heap: glibc keeps freed memory for reuse, so a burst of
//! large request bodies would stay in the broker's RSS long after the
//! requests ended. [`pin_mmap_threshold`] makes every large allocation a
//! private mapping (returned to the kernel when freed), and [`trim`] hands
//! back the free pages of the small-allocation heaps.
//!
//! Other C libraries (musl) return memory on their own; there both calls do
//! nothing.

/// Allocations at or above `bytes` are served by `mmap` and unmapped when
/// freed. Setting it also turns off glibc's dynamic threshold, which would
/// otherwise rise to the largest block freed (up to 32 MiB) and keep later
/// bodies of that size on the heap. Returns whether glibc took the setting.
pub fn pin_mmap_threshold(bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(value) = libc::c_int::try_from(bytes) else {
            return false;
        };
        // SAFETY: mallopt only changes a tunable of the allocator; it takes
        // plain integers and is safe to call at any time from any thread.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = bytes;
        false
    }
}

/// Returns the free pages of every malloc arena to the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' own locks; it is documented as
    // safe to call from any thread while others allocate.
    unsafe {
        libc::malloc_trim(0);
    }
}
