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

/// What the allocator reports (glibc's `mallinfo2`). Not resident memory: `allocated`
/// counts every byte malloc handed out, including large allocations the program reserved but
/// never touched (sled reserves buffers up front): a relay at 7 MiB RSS reported 27.6 MiB
/// allocated. [`rss`] is what the process really holds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HeapUsage {
    /// Bytes handed out by malloc and not yet freed (small blocks plus mmap'ed large blocks),
    /// including reserved pages the program never touched.
    pub allocated: u64,
    /// The same figure under its former name, kept for readers of `/_/stats` that use it.
    pub in_use: u64,
    /// Bytes free inside malloc's heap (kept for reuse, not yet returned to the kernel).
    pub free: u64,
}

pub fn heap_usage() -> Option<HeapUsage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters (glibc 2.33 or later).
        let info = unsafe { libc::mallinfo2() };
        let allocated = (info.uordblks + info.hblkhd) as u64;
        Some(HeapUsage {
            allocated,
            in_use: allocated,
            free: info.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// The process's resident memory in bytes (`VmRSS` of `/proc/self/status`): what it really
/// holds in RAM. `None` where there is no such file (not Linux) or it cannot be read.
pub fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// `VmRSS:  1234 kB` → 1234 × 1024.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => kib.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\trelay\nVmPeak:\t  99 kB\nVmRSS:\t    7168 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(7168 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: lots kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_size() {
        assert!(rss().is_some_and(|b| b > 0));
    }
}
