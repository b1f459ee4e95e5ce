//! Counters of the document layer, for `/_/stats` (benchmarks read batch sizes from it) and,
//! recorded at the same place, the Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

#[derive(Default, Debug)]
pub(super) struct Stats {
    batches: AtomicU64,
    batched_writes: AtomicU64,
    apply_micros: AtomicU64,
    persists: AtomicU64,
    persist_micros: AtomicU64,
    loads: AtomicU64,
    compactions: AtomicU64,
    overflows: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct StatsSnapshot {
    pub batches: u64,
    pub batched_writes: u64,
    pub apply_micros: u64,
    pub persists: u64,
    pub persist_micros: u64,
    pub loads: u64,
    pub compactions: u64,
    /// Idle documents dropped from memory to stay within the budget.
    pub evictions: u64,
    /// Estimated memory of the hot documents, in bytes.
    pub hot_bytes: u64,
    /// Events dropped for full subscriber queues (each followed by a catch-up).
    pub subscriber_overflows: u64,
    pub hot_documents: u64,
}

impl Stats {
    pub(super) fn batch(&self, writes: usize, apply: Duration) {
        if writes > 0 {
            metrics::histogram!(crate::metrics::BATCH_WRITES).record(writes as f64);
            metrics::histogram!(crate::metrics::APPLY_SECONDS).record(apply.as_secs_f64());
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.batched_writes
                .fetch_add(writes as u64, Ordering::Relaxed);
            self.apply_micros
                .fetch_add(apply.as_micros() as u64, Ordering::Relaxed);
        }
    }
    pub(super) fn persisted(&self, took: Duration) {
        metrics::histogram!(crate::metrics::PERSIST_SECONDS).record(took.as_secs_f64());
        self.persists.fetch_add(1, Ordering::Relaxed);
        self.persist_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
    pub(super) fn loaded(&self) {
        metrics::counter!(crate::metrics::LOADED).increment(1);
        self.loads.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn evicted(&self) {
        metrics::counter!(crate::metrics::EVICTED).increment(1);
        self.evictions.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn overflowed(&self) {
        metrics::counter!(crate::metrics::OVERFLOWS).increment(1);
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn compacted(&self) {
        metrics::counter!(crate::metrics::COMPACTIONS).increment(1);
        self.compactions.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters, with the registry's figures of hot documents.
    pub(super) fn snapshot(&self, hot_documents: u64, hot_bytes: u64) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            batches: get(&self.batches),
            batched_writes: get(&self.batched_writes),
            apply_micros: get(&self.apply_micros),
            persists: get(&self.persists),
            persist_micros: get(&self.persist_micros),
            loads: get(&self.loads),
            compactions: get(&self.compactions),
            evictions: get(&self.evictions),
            hot_bytes,
            subscriber_overflows: get(&self.overflows),
            hot_documents,
        }
    }
}
