//! How many uploads may be validated at once, by the memory they need.
//!
//! Loading an upload strictly builds a scratch document: about twice its decoded size in
//! memory. Validations take a share of `--validation-memory` for that long; past it they
//! queue (one needing more than all of it runs alone), so a burst of large uploads costs a
//! bounded amount of memory instead of one scratch document each.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RelayError;

/// Memory is counted in KiB: a semaphore holds at most `u32::MAX` permits.
const UNIT: u64 = 1024;
/// Scratch memory per decoded byte while an upload is loaded.
const SCRATCH_FACTOR: u64 = 2;

/// Limits on uploads being validated.
#[derive(Debug)]
pub struct UploadGate {
    max_decoded: u64,
    capacity: u32,
    memory: Arc<Semaphore>,
}

/// Held while one upload is validated.
#[derive(Debug)]
pub struct ValidationPermit {
    _held: OwnedSemaphorePermit,
}

impl UploadGate {
    /// `max_decoded`: the largest decoded size of one upload; `memory`: scratch memory all
    /// validations together may use.
    pub fn new(max_decoded: u64, memory: u64) -> Self {
        let capacity = u32::try_from((memory / UNIT).max(1)).unwrap_or(u32::MAX);
        Self {
            max_decoded,
            capacity,
            memory: Arc::new(Semaphore::new(capacity as usize)),
        }
    }

    /// The largest decoded size one upload may have (413 past it).
    pub fn max_decoded(&self) -> u64 {
        self.max_decoded
    }

    /// Waits until validating an upload of `decoded` bytes fits in the memory bound.
    pub async fn admit(&self, decoded: u64) -> Result<ValidationPermit, RelayError> {
        let units = decoded.saturating_mul(SCRATCH_FACTOR).div_ceil(UNIT).max(1);
        let units = u32::try_from(units).unwrap_or(u32::MAX).min(self.capacity);
        self.memory
            .clone()
            .acquire_many_owned(units)
            .await
            .map(|held| ValidationPermit { _held: held })
            .map_err(|_| RelayError::ShuttingDown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn validations_queue_past_the_memory_bound() {
        let gate = UploadGate::new(1 << 20, 4 * UNIT * SCRATCH_FACTOR);
        // 8 units; `a` takes 6 (twice its size), `b` the last 2, so nothing else fits.
        let a = gate.admit(3 * UNIT).await.unwrap();
        let b = gate.admit(UNIT).await.unwrap();
        let waiting = gate.admit(UNIT);
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        drop(a);
        assert!(futures_util::poll!(waiting.as_mut()).is_ready());
        drop(b);
        // More than everything runs alone instead of never.
        assert!(gate.admit(1 << 40).await.is_ok());
    }
}
