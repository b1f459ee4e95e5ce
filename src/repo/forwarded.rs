//! Changes a repo socket handed to document owners and has not yet seen become durable.
//!
//! A repo peer's changes are merged by the owner after the socket moved on (the owner answers
//! with sync messages, not with an ack), so on shutdown the socket must wait for them itself:
//! otherwise the server could flush and exit between "forwarded" and "persisted".

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::oneshot;

use crate::doc::WriteOutcome;
use crate::error::RelayError;

type Durable = oneshot::Receiver<Result<WriteOutcome, RelayError>>;

#[derive(Default)]
pub struct Forwarded {
    pending: Vec<Durable>,
}

impl Forwarded {
    /// Keeps `durable`, forgetting the ones that already resolved (so a long-lived socket keeps
    /// only what is still in flight).
    pub fn push(&mut self, durable: Durable) {
        self.pending
            .retain_mut(|rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        self.pending.push(durable);
    }

    /// Forwarded changes not known to be durable yet.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pending.len()
    }

    /// Waits, at most `limit`, until every forwarded change is durable or failed.
    pub async fn wait(&mut self, limit: Duration) {
        if self.pending.is_empty() {
            return;
        }
        let all = join_all(self.pending.drain(..));
        match tokio::time::timeout(limit, all).await {
            Ok(results) => {
                let failed = results.iter().filter(|r| !matches!(r, Ok(Ok(_)))).count();
                if failed > 0 {
                    tracing::debug!(failed, "forwarded repo changes that did not persist");
                }
            }
            Err(_) => tracing::warn!(?limit, "forwarded repo changes still not durable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> WriteOutcome {
        WriteOutcome {
            created: false,
            heads: Vec::new(),
            etag: String::new(),
            applied: 1,
            pending: 0,
            total: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resolved_receivers_are_pruned_and_the_rest_awaited() {
        let mut f = Forwarded::default();
        let (done, rx) = oneshot::channel();
        f.push(rx);
        done.send(Ok(outcome())).unwrap();
        let (failed, rx) = oneshot::channel();
        f.push(rx);
        assert_eq!(f.len(), 1, "the resolved one is gone");
        drop(failed);
        let (later, rx) = oneshot::channel();
        f.push(rx);
        assert_eq!(f.len(), 1, "a dropped reply counts as resolved");
        let waiting = tokio::spawn(async move {
            f.wait(Duration::from_secs(3)).await;
            f
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        later.send(Ok(outcome())).unwrap();
        assert_eq!(waiting.await.unwrap().len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let mut f = Forwarded::default();
        let (_never, rx) = oneshot::channel();
        f.push(rx);
        let began = tokio::time::Instant::now();
        f.wait(Duration::from_secs(3)).await;
        assert_eq!(began.elapsed(), Duration::from_secs(3));
        assert_eq!(f.len(), 0);
    }
}
