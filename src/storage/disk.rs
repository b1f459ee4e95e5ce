//! The disk-space watermark: free space on the data dir's file system, read with `statvfs`.
//!
//! sled 0.34 does not survive running out of space (see docs/storage.md: after ENOSPC it
//! refuses every write, and once space returns its next write hangs, until the process
//! restarts), so the relay must never drive it there. Every write is checked here first: it is
//! refused while the free space, less what the write may take, would be under the watermark.
//!
//! A write of `n` bytes needs `--min-free-disk` + 3·n + 1 MiB free: sled takes up to 2.5
//! times what is written (measured, see `WRITE_FACTOR`), and its log grows by 512 KiB segments.
//!
//! The reading is cached and refreshed at most once a second (or at once after a failed
//! write), so a write costs an uncontended lock, not a system call. Between two readings the
//! bytes admitted are subtracted from the last one, so a burst of writes inside one second
//! cannot overshoot the watermark by more than the sizes it was told of.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{FaultSwitch, StoreError};

/// Longest a reading is trusted.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// A write is assumed to take this many times its size on disk. Measured with sled 0.34 on
/// tmpfs, one insert + flush of a value of 10 KB took 25 KiB, of 100 KB 152 KiB, of 200 KB
/// 497 KiB (its log, blob files and tree nodes); its segment cleaner also copies live data
/// before it frees a segment.
const WRITE_FACTOR: u64 = 3;

/// Room kept on top of the watermark and the write itself: sled grows its log file by
/// segments of 512 KiB, so usage moves in steps a write's size does not show.
const SLACK: u64 = 1 << 20;

/// The default watermark on large file systems.
pub const DEFAULT_MIN_FREE: u64 = 256 << 20;
/// The default watermark as a share of the file system, for small ones (in percent).
pub const DEFAULT_MIN_FREE_PERCENT: u64 = 5;

/// How much space must stay free (`--min-free-disk`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    /// 256 MiB or 5% of the file system, whichever is smaller.
    Default,
    Bytes(u64),
    /// A share of the file system's size, in percent.
    Percent(f64),
}

impl MinFree {
    /// The watermark in bytes on a file system of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Default => DEFAULT_MIN_FREE.min(total / 100 * DEFAULT_MIN_FREE_PERCENT),
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// One `statvfs` reading.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    free: u64,
    total: u64,
    /// Bytes admitted since the reading.
    admitted: u64,
}

/// What the last reading says, for `/_/ready` and the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskReport {
    pub free: u64,
    pub min_free: u64,
}

impl DiskReport {
    /// Too little room for any write (the watermark plus sled's segment slack).
    pub fn is_low(&self) -> bool {
        self.free < self.min_free.saturating_add(SLACK)
    }
}

/// The data dir's file system and its watermark.
pub struct DiskSpace {
    path: PathBuf,
    min_free: MinFree,
    last: Mutex<Option<Reading>>,
    /// Whether the last reading was under the watermark (kept across invalidations, so each
    /// crossing is logged once).
    was_low: Mutex<Option<bool>>,
    /// Tests: the switch's `disk-full` mode reads as no free space.
    faults: Option<Arc<FaultSwitch>>,
}

impl DiskSpace {
    pub fn new(path: &Path, min_free: MinFree) -> Self {
        Self {
            path: path.to_path_buf(),
            min_free,
            last: Mutex::new(None),
            was_low: Mutex::new(None),
            faults: None,
        }
    }

    /// The same, with `disk-full` injected by `faults` (tests only).
    pub fn with_faults(mut self, faults: Arc<FaultSwitch>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Checks that a write of `bytes` leaves the watermark free, without counting it.
    pub fn check(&self, bytes: u64) -> Result<(), StoreError> {
        self.reserve(bytes, false)
    }

    /// Checks a write of `bytes` and counts it against the current reading.
    pub fn admit(&self, bytes: u64) -> Result<(), StoreError> {
        self.reserve(bytes, true)
    }

    /// The next check reads the disk again (after a failed write).
    pub fn invalidate(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = None;
        }
    }

    /// The current reading (refreshed when stale); `None` when the disk cannot be read.
    pub fn report(&self) -> Option<DiskReport> {
        let mut last = self.last.lock().ok()?;
        let r = self.fresh(&mut last)?;
        Some(DiskReport {
            free: r.free.saturating_sub(r.admitted),
            min_free: self.min_free.bytes(r.total),
        })
    }

    fn reserve(&self, bytes: u64, count: bool) -> Result<(), StoreError> {
        let Ok(mut last) = self.last.lock() else {
            return Ok(());
        };
        // A file system that cannot be read is not a reason to refuse writes (the write will
        // tell); `fresh` logged it.
        let Some(r) = self.fresh(&mut last) else {
            return Ok(());
        };
        let min = self.min_free.bytes(r.total);
        let free = r.free.saturating_sub(r.admitted);
        let need = bytes.saturating_mul(WRITE_FACTOR);
        if free < min.saturating_add(need).saturating_add(SLACK) {
            return Err(StoreError::no_space(format!(
                "{} free on {}, and the relay keeps {} free (--min-free-disk) plus room for \
                 the write; nothing was stored. Writes resume once space is freed",
                mib(free),
                self.path.display(),
                mib(min)
            )));
        }
        if count {
            if let Some(r) = last.as_mut() {
                r.admitted = r.admitted.saturating_add(need);
            }
        }
        Ok(())
    }

    /// The reading under the lock, read again when missing or older than a second.
    fn fresh(&self, last: &mut Option<Reading>) -> Option<Reading> {
        if let Some(r) = last.filter(|r| r.at.elapsed() < REFRESH_EVERY) {
            return Some(r);
        }
        match statvfs(&self.path) {
            Ok((mut free, total)) => {
                if self
                    .faults
                    .as_ref()
                    .is_some_and(|f| f.current() == super::Fault::DiskFull)
                {
                    free = 0;
                }
                let r = Reading {
                    at: Instant::now(),
                    free,
                    total,
                    admitted: 0,
                };
                self.log_transition(&r);
                *last = Some(r);
                Some(r)
            }
            Err(e) => {
                if last.is_some() {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read the free disk space; the watermark is not enforced until it can");
                }
                *last = None;
                None
            }
        }
    }

    fn low(&self, r: &Reading) -> bool {
        r.free < self.min_free.bytes(r.total).saturating_add(SLACK)
    }

    fn log_transition(&self, now: &Reading) {
        let low = self.low(now);
        let min = self.min_free.bytes(now.total);
        let Ok(mut was_low) = self.was_low.lock() else {
            return;
        };
        let before = was_low.replace(low);
        match (before, low) {
            (Some(false) | None, true) => tracing::warn!(
                free = %mib(now.free),
                min_free = %mib(min),
                path = %self.path.display(),
                "free disk space is under --min-free-disk: writes are refused (507) until space is freed"
            ),
            (Some(true), false) => tracing::info!(
                free = %mib(now.free),
                min_free = %mib(min),
                "free disk space is back over --min-free-disk: writes accepted again"
            ),
            _ => {}
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Free bytes (for unprivileged users) and total bytes of the file system holding `path`.
#[cfg(unix)]
// The fields' types differ between platforms (u32 on some): the casts are not always no-ops.
#[allow(clippy::unnecessary_cast)]
fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `s` points to writable memory of the right size.
    let rc = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let s = unsafe { s.assume_init() };
    let frsize = s.f_frsize as u64;
    Ok((
        (s.f_bavail as u64).saturating_mul(frsize),
        (s.f_blocks as u64).saturating_mul(frsize),
    ))
}

#[cfg(not(unix))]
fn statvfs(_path: &Path) -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "free disk space is only read on unix",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Fault, StoreErrorKind};

    #[test]
    fn the_default_is_the_smaller_of_256_mib_and_5_percent() {
        assert_eq!(MinFree::Default.bytes(16 << 20), (16 << 20) / 100 * 5);
        assert_eq!(MinFree::Default.bytes(1 << 40), 256 << 20);
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
        assert_eq!(MinFree::Bytes(7).bytes(1 << 40), 7);
    }

    #[test]
    fn writes_are_refused_under_the_watermark_and_counted_between_readings() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskSpace::new(dir.path(), MinFree::Bytes(0));
        // Every check below uses this one reading (they take well under a second).
        let free = disk.report().unwrap().free;
        assert!(disk.check(1).is_ok());
        let err = disk.check(free).unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::NoSpace);
        // Admitted bytes count until the next reading: half the free space twice is too much.
        let half = free / (2 * WRITE_FACTOR) + 1;
        assert!(disk.admit(half).is_ok());
        assert!(disk.admit(half).is_err());
        let high = DiskSpace::new(dir.path(), MinFree::Bytes(u64::MAX));
        assert!(high.check(0).is_err());
        assert!(high.report().unwrap().is_low());
    }

    #[test]
    fn injected_disk_full_reads_as_no_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let switch = FaultSwitch::new();
        let disk = DiskSpace::new(dir.path(), MinFree::Bytes(1)).with_faults(switch.clone());
        assert!(disk.check(0).is_ok());
        switch.set(Fault::DiskFull);
        disk.invalidate();
        assert!(disk.check(0).is_err());
        assert_eq!(disk.report().unwrap().free, 0);
    }
}
