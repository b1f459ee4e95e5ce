//! The periodic check of every hot document against the store: what repairs drift the
//! fan-out missed (a dropped message, a node that published and died, a cluster running
//! without Redis). Each check is one query of the document's chunk keys; only a document
//! whose chunks differ is read back (`Command::Refresh`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::doc::Documents;

/// Checks every hot document every `every` until shutdown.
pub fn spawn(docs: Documents, every: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate: nothing is hot yet
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            for id in docs.hot_ids() {
                docs.refresh(&id, false).await;
            }
        }
    });
}
