//! Keeping the allocator's idle memory bounded (glibc only; a no-op elsewhere).
//!
//! glibc's malloc gives each thread that allocates under contention its own arena, up to eight
//! per core, and keeps memory freed in an arena for reuse instead of returning it to the
//! kernel. The relay frees most of what it allocates (request bodies, sync messages, saves) on
//! tokio's worker and blocking threads, so with the default settings its RSS crept up with
//! every new arena and never came back: in the soak benchmark, writers alone took it from 11 to
//! 38 MiB in three minutes while the documents held about 1.3 MiB. Two arenas and a periodic
//! `malloc_trim` keep it flat. `MALLOC_ARENA_MAX` in the environment still wins.

use std::time::Duration;

/// How often freed memory is handed back to the kernel.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Call first thing in `main`, before any thread is started.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Returns the free memory at the top of every arena (and whole free pages inside them) to
/// the kernel.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory that is free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_EVERY`] on the current Tokio runtime, from a blocking thread (a trim of
/// a large heap takes a moment).
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}

/// What the allocator holds: bytes in use by the program and bytes free inside its heap (kept
/// for reuse, not yet returned to the kernel). `None` where the allocator cannot tell.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeapUsage {
    pub in_use: u64,
    pub free: u64,
}

pub fn heap_usage() -> Option<HeapUsage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters (glibc 2.33 or later).
        let info = unsafe { libc::mallinfo2() };
        Some(HeapUsage {
            in_use: (info.uordblks + info.hblkhd) as u64,
            free: info.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}
