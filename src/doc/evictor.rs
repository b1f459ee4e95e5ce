//! Keeping hot documents within `--memory-budget`: every owner publishes a [`Gauge`] after
//! each turn; the evictor asks the least recently used idle owners to leave (they reload on
//! demand) until the estimate is back under 90% of the budget.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::api::Command;

/// Least time between two runs of the evictor.
const EVICT_PAUSE: Duration = Duration::from_millis(10);
/// The evictor's periodic check.
const EVICT_EVERY: Duration = Duration::from_millis(200);

/// What the evictor needs to know about one owner, updated by the owner after every turn.
#[derive(Default, Debug)]
pub(super) struct Gauge {
    pub(super) bytes: AtomicU64,
    /// Milliseconds since the process started, at the owner's last turn.
    pub(super) last_used: AtomicU64,
    /// Has subscribers, repo peers or work in flight: never evicted.
    pub(super) pinned: AtomicBool,
}

impl Gauge {
    pub(super) fn update(&self, bytes: u64, pinned: bool) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.pinned.store(pinned, Ordering::Relaxed);
        self.touch();
    }

    pub(super) fn touch(&self) {
        self.last_used.store(uptime_ms(), Ordering::Relaxed);
    }
}

fn uptime_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// One hot owner as the evictor sees it.
pub(super) struct Candidate {
    pub(super) gauge: Arc<Gauge>,
    pub(super) tx: mpsc::Sender<Command>,
}

/// Estimated memory of the given owners.
pub(super) fn total_bytes<'a>(gauges: impl Iterator<Item = &'a Gauge>) -> u64 {
    gauges.map(|g| g.bytes.load(Ordering::Relaxed)).sum()
}

/// Asks the least recently used idle owners to leave until the estimate is back under 90% of
/// the budget. Owners decide for themselves (they may have become busy).
pub(super) fn evict_over_budget(owners: Vec<Candidate>, budget: u64) {
    let total = total_bytes(owners.iter().map(|c| &*c.gauge));
    if total <= budget {
        return;
    }
    let mut idle: Vec<(u64, u64, mpsc::Sender<Command>)> = owners
        .into_iter()
        .filter(|c| !c.gauge.pinned.load(Ordering::Relaxed))
        .map(|c| {
            (
                c.gauge.last_used.load(Ordering::Relaxed),
                c.gauge.bytes.load(Ordering::Relaxed),
                c.tx,
            )
        })
        .collect();
    idle.sort_unstable_by_key(|(used, _, _)| *used);
    let target = budget / 10 * 9;
    let mut projected = total;
    for (_, bytes, tx) in idle {
        if projected <= target {
            break;
        }
        if tx.try_send(Command::Evict).is_ok() {
            projected = projected.saturating_sub(bytes);
        }
    }
    tracing::debug!(total, budget, projected, "evicting idle documents");
}

/// Runs the evictor: a few times a second, and soon after owners start (at most every
/// EVICT_PAUSE, so a burst of new documents costs a few checks, not one per document).
/// `owners` lists the hot owners, or returns `None` once the registry is gone (then it stops).
pub(super) fn spawn(
    owner_started: Arc<Notify>,
    budget: u64,
    owners: impl Fn() -> Option<Vec<Candidate>> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVICT_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = owner_started.notified() => {}
            }
            let Some(candidates) = owners() else {
                return;
            };
            evict_over_budget(candidates, budget);
            tokio::time::sleep(EVICT_PAUSE).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(bytes: u64, last_used: u64, pinned: bool) -> (Candidate, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(1);
        let gauge = Arc::new(Gauge::default());
        gauge.bytes.store(bytes, Ordering::Relaxed);
        gauge.last_used.store(last_used, Ordering::Relaxed);
        gauge.pinned.store(pinned, Ordering::Relaxed);
        (Candidate { gauge, tx }, rx)
    }

    fn evicted(rx: &mut mpsc::Receiver<Command>) -> bool {
        matches!(rx.try_recv(), Ok(Command::Evict))
    }

    #[test]
    fn least_recently_used_idle_owners_leave_until_under_budget() {
        let (old, mut old_rx) = owner(40, 1, false);
        let (pinned, mut pinned_rx) = owner(40, 0, true);
        let (mid, mut mid_rx) = owner(40, 2, false);
        let (new, mut new_rx) = owner(40, 3, false);
        // 160 estimated against a budget of 100: down to 90 takes two idle owners.
        evict_over_budget(vec![old, pinned, mid, new], 100);
        assert!(evicted(&mut old_rx) && evicted(&mut mid_rx));
        assert!(!evicted(&mut pinned_rx), "pinned owners stay");
        assert!(!evicted(&mut new_rx), "the most recent stays");
    }

    #[test]
    fn nothing_leaves_under_budget() {
        let (a, mut a_rx) = owner(40, 1, false);
        evict_over_budget(vec![a], 100);
        assert!(!evicted(&mut a_rx));
    }
}
