//! Webhooks (`--webhook URL`): after a document changes, or is deleted, a signed `POST` tells
//! an HTTP receiver, debounced per document. docs/webhooks.md is the contract.
//!
//! The document owners see this module as their `doc::Observer`, and its calls only ever
//! touch the in-memory queue under a mutex held for a map update: a slow, failing or hanging
//! receiver never holds up a write. The queue is bounded in documents (`--webhook-queue`);
//! past it a new document's calls are dropped and counted, never waited for.
//!
//! - `debounce.rs` (sans-IO): which calls are due and when the next one is;
//! - `payload.rs`: the JSON body; `sign.rs`: its `X-Relay-Signature`;
//! - `deliver.rs`: the `POST`, its retries and their backoff;
//! - `throttle.rs`: warnings at most once per interval.
//!
//! One dispatcher task sleeps until the earliest due call (or until an event brings one
//! sooner, or a delivery ends) and starts deliveries, at most [`IN_FLIGHT`] at once and one per
//! document, so a document's calls arrive in order. At shutdown, after the owners have made
//! their last writes durable, [`Webhook::finish`] sends every waiting call at once, without
//! its debounce, and waits for them within what is left of the grace period.

mod debounce;
mod deliver;
mod payload;
mod sign;
mod throttle;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use automerge::ChangeHash;
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::doc::Observer;
use crate::id::DocId;
use debounce::{Admission, Call, CallKind, Debouncer, Timing};
use deliver::{Deliverer, Outcome};
use sign::Secret;
use throttle::Throttle;

/// Calls being delivered at once (each to a different document). A hanging receiver holds
/// this many; the rest wait in the queue.
const IN_FLIGHT: usize = 8;
/// Least time between two warnings of one kind (dropped calls, calls given up).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What `--webhook*` configure.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub url: String,
    /// Required: every call is signed.
    pub secret_file: Option<PathBuf>,
    pub debounce: Duration,
    pub max_wait: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Documents whose calls may wait or be in flight at once.
    pub queue: usize,
    /// Bound of one attempt.
    pub timeout: Duration,
}

/// The webhook sender: the documents' observer, and the tasks that deliver.
pub struct Webhook {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Debouncer>,
    /// Wakes the dispatcher: a call due sooner than it sleeps to, or a delivery slot freed.
    wake: Notify,
    /// Told when the queue empties (shutdown waits for it).
    idle: Notify,
    capacity: usize,
    dropped: Mutex<Throttle>,
    gave_up: Mutex<Throttle>,
    secret: Secret,
    deliverer: Deliverer,
    /// Ends the dispatcher once shutdown is done with it.
    stop: CancellationToken,
}

impl Webhook {
    /// Reads the secret, checks the URL and starts the dispatcher. Fails on a missing or empty
    /// secret or a bad URL (the server refuses to start: a misconfigured webhook would
    /// otherwise lose every call silently).
    pub fn start(settings: WebhookSettings) -> Result<Arc<Self>, String> {
        let Some(secret_file) = &settings.secret_file else {
            return Err(
                "--webhook needs --webhook-secret-file FILE: every call is signed \
                 (X-Relay-Signature) so that the receiver can tell it comes from this relay"
                    .into(),
            );
        };
        let secret = Secret::read(secret_file)?;
        let deliverer = Deliverer::new(&settings.url, settings.timeout, settings.retries)?;
        tracing::info!(
            receiver = %deliverer.origin(),
            debounce_ms = settings.debounce.as_millis() as u64,
            max_wait_ms = settings.max_wait.as_millis() as u64,
            retries = settings.retries,
            queue = settings.queue,
            "webhook calls enabled"
        );
        let timing = Timing {
            debounce: settings.debounce,
            max_wait: settings.max_wait,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Debouncer::new(timing, settings.queue)),
            wake: Notify::new(),
            idle: Notify::new(),
            capacity: settings.queue,
            dropped: Mutex::new(Throttle::new(WARN_EVERY)),
            gave_up: Mutex::new(Throttle::new(WARN_EVERY)),
            secret,
            deliverer,
            stop: CancellationToken::new(),
        });
        // Shown from the start, not only after the first call.
        metrics::counter!("relay_webhook_deliveries_total").increment(0);
        metrics::counter!("relay_webhook_dropped_total").increment(0);
        metrics::gauge!("relay_webhook_queue").set(0.0);
        tokio::spawn(dispatch(shared.clone()));
        Ok(Arc::new(Self { shared }))
    }

    /// Shutdown, once the owners are closed: sends every waiting call now and waits for the
    /// deliveries until `deadline`; what is left then is abandoned (and logged).
    pub async fn finish(&self, deadline: tokio::time::Instant) {
        let waiting = {
            let mut queue = self.shared.lock();
            queue.close();
            queue.len()
        };
        if waiting > 0 {
            tracing::info!(
                documents = waiting,
                "sending the waiting webhook calls before exiting"
            );
        }
        self.shared.wake.notify_one();
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let left = self.shared.lock().len();
            if left == 0 {
                break;
            }
            tokio::select! {
                _ = &mut idle => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        documents = left,
                        "webhook calls not delivered within the shutdown grace period: abandoned"
                    );
                    break;
                }
            }
        }
        self.shared.stop.cancel();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Debouncer> {
        // Nothing panics while holding it; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the queue (and its gauge, under the same lock, so it never goes stale).
    fn update<T>(&self, f: impl FnOnce(&mut Debouncer) -> T) -> T {
        let mut queue = self.lock();
        let out = f(&mut queue);
        metrics::gauge!("relay_webhook_queue").set(queue.len() as f64);
        out
    }

    /// After an event: wake the dispatcher if it must, or count a drop.
    fn admitted(&self, id: &DocId, admission: Admission) {
        match admission {
            Admission::Queued { sooner: true } => self.wake.notify_one(),
            Admission::Queued { sooner: false } => {}
            Admission::Dropped => {
                metrics::counter!("relay_webhook_dropped_total").increment(1);
                let line = self
                    .dropped
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .hit(Instant::now());
                if let Some(dropped) = line {
                    tracing::warn!(
                        doc = %id,
                        dropped,
                        capacity = self.capacity,
                        "webhook queue full (--webhook-queue documents waiting): calls dropped"
                    );
                }
            }
        }
    }
}

impl Observer for Webhook {
    fn changed(&self, id: &DocId, heads: &[ChangeHash], applied: usize) {
        let (now, at) = (Instant::now(), SystemTime::now());
        let admission = self
            .shared
            .update(|q| q.changed(id, heads, applied, now, at));
        self.shared.admitted(id, admission);
    }

    fn deleted(&self, id: &DocId) {
        let (now, at) = (Instant::now(), SystemTime::now());
        let admission = self.shared.update(|q| q.deleted(id, now, at));
        self.shared.admitted(id, admission);
    }
}

/// Starts the due calls while delivery slots are free; sleeps until the next is due, an event
/// brings one sooner, or a delivery ends.
async fn dispatch(shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let free = slots.available_permits();
        let (calls, next) = {
            let mut queue = shared.lock();
            let calls = queue.take_due(Instant::now(), free);
            // With every slot taken, only a finished delivery can start the next call.
            let next = (calls.len() < free).then(|| queue.next_due()).flatten();
            (calls, next)
        };
        for call in calls {
            // Free (no more calls were taken than slots were free); never closed.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(send(shared.clone(), call, permit));
        }
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = due => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Delivers one call, then frees its slot and lets its document's next call be scheduled.
async fn send(shared: Arc<Shared>, call: Call, permit: OwnedSemaphorePermit) {
    let body = match &call.kind {
        CallKind::Changed { heads, changes, at } => {
            payload::changed(call.id.as_str(), heads, *changes, *at)
        }
        CallKind::Deleted { at } => payload::deleted(call.id.as_str(), *at),
    };
    let outcome = match body {
        Ok(body) => {
            let signature = shared.secret.signature(&body);
            shared
                .deliverer
                .deliver(Bytes::from(body), &signature)
                .await
        }
        Err(e) => {
            tracing::error!(doc = %call.id, error = %e, "cannot encode a webhook call");
            Outcome::GaveUp {
                reason: "encode",
                attempts: 0,
                refused: true,
            }
        }
    };
    if let Outcome::GaveUp {
        reason,
        attempts,
        refused,
    } = outcome
    {
        let why = if refused { "refused" } else { "retries" };
        metrics::counter!("relay_webhook_given_up_total", "reason" => why).increment(1);
        let line = shared
            .gave_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hit(Instant::now());
        if let Some(calls) = line {
            tracing::warn!(
                doc = %call.id,
                receiver = %shared.deliverer.origin(),
                last_failure = reason,
                attempts,
                calls,
                "webhook call given up ({why}); the receiver will not hear of it"
            );
        }
    }
    drop(permit);
    let queued = shared.update(|q| {
        q.finished(&call.id, Instant::now());
        q.len()
    });
    shared.wake.notify_one();
    if queued == 0 {
        shared.idle.notify_waiters();
    }
}
