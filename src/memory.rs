//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps the pages freed in the middle of its heaps: after a backlog drains,
//! the store's freed SQLite pages would stay resident for good. `malloc_trim(3)` hands every
//! whole free page back. It walks the heaps (milliseconds for a large one), so it is called
//! after the store gave a lot back, not on a timer.

/// Returns the allocator's whole free pages to the system (Linux with glibc; elsewhere a
/// no-op). Safe to call from any thread at any time.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_pages() {
    // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc documents it as
    // thread-safe (it takes each arena's lock in turn).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_pages() {}
