//! Fan-out between nodes over Redis pub/sub: what a document's owner publishes reaches the
//! other nodes that hold the document hot.
//!
//! Three tasks, so that no owner ever waits on the network for longer than a bounded
//! subscribe:
//! - the **publisher** takes messages from a bounded queue and `PUBLISH`es them over a
//!   connection manager (which reconnects by itself). A message that cannot be sent (queue
//!   full, Redis down) is dropped and counted: the other nodes find the change in the store
//!   (`Command::Refresh`), it is delayed, never lost;
//! - the **subscriber** holds the pub/sub connection and one subscription per hot document,
//!   reference-counted (an owner that retires and its successor may watch and unwatch in
//!   either order). When the connection drops it reconnects with a backoff, subscribes to
//!   every watched channel again and has every watched document compared with the store:
//!   whatever was published meanwhile is read back;
//! - the **deliverer** decodes what arrives and hands it to the hot document's owner.
//!
//! Redis delivers a node's own messages back to it; they carry its node id and are skipped.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::wire::{self, Message, NodeId};
use crate::doc::{Cluster, Documents, Watching};
use crate::id::DocId;
use crate::storage::{ChunkKey, ChunkKind};

/// Longest a subscribe, a connect or a publish may take before it is given up on.
const NETWORK_BOUND: Duration = Duration::from_secs(2);
/// Messages waiting to be published; past it they are dropped (and repaired from the store).
const PUBLISH_QUEUE: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Settings of the fan-out.
#[derive(Clone, Debug)]
pub struct FanoutSettings {
    pub url: String,
    /// Prefix of every channel (`--fanout-prefix`).
    pub prefix: String,
    /// Changes larger than this are announced, not sent (`--fanout-max-message`).
    pub max_message: usize,
}

enum Sub {
    Watch(String, oneshot::Sender<()>),
    Unwatch(String),
}

/// This node's side of the fan-out; the document layer sees it as its [`Cluster`].
pub struct RedisFanout {
    node: NodeId,
    settings: FanoutSettings,
    publish: mpsc::Sender<(String, Vec<u8>)>,
    subs: mpsc::UnboundedSender<Sub>,
}

impl RedisFanout {
    /// Starts the fan-out's tasks for `docs` (which it then serves as their cluster). Fails
    /// only on a malformed URL: Redis being down at start is a fault it recovers from.
    pub fn start(
        settings: FanoutSettings,
        docs: Documents,
        shutdown: CancellationToken,
    ) -> Result<std::sync::Arc<Self>, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("bad --fanout URL: {e}"))?;
        let mut node = [0u8; 16];
        getrandom::fill(&mut node).map_err(|e| format!("no randomness for a node id: {e}"))?;
        let (publish, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (subs, subs_rx) = mpsc::unbounded_channel();
        let (inbound, inbound_rx) = mpsc::unbounded_channel();
        tokio::spawn(publisher(client.clone(), publish_rx, shutdown.clone()));
        tokio::spawn(subscriber(
            client,
            settings.prefix.clone(),
            docs.clone(),
            subs_rx,
            inbound,
            shutdown.clone(),
        ));
        tokio::spawn(deliverer(
            node,
            settings.prefix.clone(),
            docs,
            inbound_rx,
            shutdown,
        ));
        Ok(std::sync::Arc::new(Self {
            node,
            settings,
            publish,
            subs,
        }))
    }

    fn send(&self, id: &DocId, msg: &Message) {
        let channel = wire::channel(&self.settings.prefix, id);
        match self
            .publish
            .try_send((channel, wire::encode(&self.node, msg)))
        {
            Ok(()) => {}
            Err(_) => {
                metrics::counter!("relay_fanout_publish_failures_total", "reason" => "queue_full")
                    .increment(1);
            }
        }
    }
}

impl Cluster for RedisFanout {
    fn published(&self, id: &DocId, _key: &ChunkKey, bytes: Bytes) {
        if bytes.len() <= self.settings.max_message {
            self.send(id, &Message::Changes(bytes));
        } else {
            self.send(id, &Message::Notice);
        }
    }

    fn deleted(&self, id: &DocId) {
        self.send(id, &Message::Deleted);
    }

    fn watch(&self, id: &DocId) -> Watching<'_> {
        let (done, subscribed) = oneshot::channel();
        let sent = self
            .subs
            .send(Sub::Watch(wire::channel(&self.settings.prefix, id), done));
        Box::pin(async move {
            if sent.is_ok() {
                let _ = timeout(NETWORK_BOUND * 2, subscribed).await;
            }
        })
    }

    fn unwatch(&self, id: &DocId) {
        let _ = self
            .subs
            .send(Sub::Unwatch(wire::channel(&self.settings.prefix, id)));
    }
}

async fn publisher(
    client: redis::Client,
    mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    shutdown: CancellationToken,
) {
    let mut conn: Option<ConnectionManager> = None;
    let mut next_connect = Instant::now();
    loop {
        let (channel, payload) = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = shutdown.cancelled() => return,
        };
        if conn.is_none() && Instant::now() >= next_connect {
            match timeout(NETWORK_BOUND, client.get_connection_manager()).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => next_connect = Instant::now() + BACKOFF_MIN * 10,
            }
        }
        let Some(c) = conn.as_mut() else {
            metrics::counter!("relay_fanout_publish_failures_total", "reason" => "disconnected")
                .increment(1);
            continue;
        };
        let sent = timeout(
            NETWORK_BOUND,
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(payload)
                .query_async::<i64>(c),
        )
        .await;
        match sent {
            Ok(Ok(_)) => metrics::counter!("relay_fanout_published_total").increment(1),
            Ok(Err(e)) => {
                metrics::counter!("relay_fanout_publish_failures_total", "reason" => "error")
                    .increment(1);
                tracing::debug!(error = %e, "fan-out publish failed");
            }
            Err(_) => {
                metrics::counter!("relay_fanout_publish_failures_total", "reason" => "timeout")
                    .increment(1);
            }
        }
    }
}

struct Connection {
    sink: PubSubSink,
    stream: PubSubStream,
}

async fn subscriber(
    client: redis::Client,
    prefix: String,
    docs: Documents,
    mut rx: mpsc::UnboundedReceiver<Sub>,
    inbound: mpsc::UnboundedSender<redis::Msg>,
    shutdown: CancellationToken,
) {
    let mut watched: HashMap<String, usize> = HashMap::new();
    let mut conn: Option<Connection> = None;
    let mut retry_at = Instant::now();
    let mut backoff = BACKOFF_MIN;
    let mut was_connected = false;
    metrics::gauge!("relay_fanout_connected").set(0.0);
    loop {
        if conn.is_none() && Instant::now() >= retry_at {
            match connect(&client, &watched).await {
                Ok(c) => {
                    conn = Some(c);
                    backoff = BACKOFF_MIN;
                    metrics::gauge!("relay_fanout_connected").set(1.0);
                    tracing::info!(watched = watched.len(), "fan-out connected to Redis");
                    if was_connected {
                        // Whatever was published while we were away: read back from the store.
                        catch_up(&prefix, &docs, watched.keys());
                    }
                    was_connected = true;
                }
                Err(e) => {
                    if backoff == BACKOFF_MIN {
                        tracing::warn!(error = %e, "fan-out cannot reach Redis; retrying (changes reach other nodes through the store meanwhile)");
                    }
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        tokio::select! {
            sub = rx.recv() => {
                let Some(sub) = sub else { return };
                let broken = match sub {
                    Sub::Watch(channel, done) => {
                        let count = watched.entry(channel.clone()).or_insert(0);
                        *count += 1;
                        let first = *count == 1;
                        let ok = match (&mut conn, first) {
                            (Some(c), true) => subscribe(&mut c.sink, &[channel]).await,
                            _ => true,
                        };
                        let _ = done.send(());
                        !ok
                    }
                    Sub::Unwatch(channel) => {
                        let last = match watched.get_mut(&channel) {
                            Some(count) => {
                                *count = count.saturating_sub(1);
                                *count == 0
                            }
                            None => false,
                        };
                        if last {
                            watched.remove(&channel);
                            match &mut conn {
                                Some(c) => !matches!(
                                    timeout(NETWORK_BOUND, c.sink.unsubscribe(&channel)).await,
                                    Ok(Ok(()))
                                ),
                                None => false,
                            }
                        } else {
                            false
                        }
                    }
                };
                if broken {
                    lost(&mut conn, &mut retry_at);
                }
            }
            msg = next_message(&mut conn) => match msg {
                Some(msg) => {
                    let _ = inbound.send(msg);
                }
                None => lost(&mut conn, &mut retry_at),
            },
            _ = tokio::time::sleep_until(retry_at), if conn.is_none() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn lost(conn: &mut Option<Connection>, retry_at: &mut Instant) {
    if conn.take().is_some() {
        metrics::gauge!("relay_fanout_connected").set(0.0);
        tracing::warn!("fan-out lost its Redis connection; reconnecting");
    }
    *retry_at = Instant::now();
}

async fn next_message(conn: &mut Option<Connection>) -> Option<redis::Msg> {
    match conn {
        Some(c) => c.stream.next().await,
        None => std::future::pending().await,
    }
}

async fn connect(
    client: &redis::Client,
    watched: &HashMap<String, usize>,
) -> Result<Connection, String> {
    let pubsub = timeout(NETWORK_BOUND, client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut sink, stream) = pubsub.split();
    let channels: Vec<String> = watched.keys().cloned().collect();
    for batch in channels.chunks(512) {
        if !subscribe(&mut sink, batch).await {
            return Err("subscribing failed".to_owned());
        }
    }
    Ok(Connection { sink, stream })
}

async fn subscribe(sink: &mut PubSubSink, channels: &[String]) -> bool {
    matches!(
        timeout(NETWORK_BOUND, sink.subscribe(channels)).await,
        Ok(Ok(()))
    )
}

/// Every watched document compares itself with the store.
fn catch_up<'a>(prefix: &str, docs: &Documents, channels: impl Iterator<Item = &'a String>) {
    let ids: Vec<DocId> = channels.filter_map(|c| wire::doc_of(prefix, c)).collect();
    let docs = docs.clone();
    tokio::spawn(async move {
        for id in ids {
            docs.refresh(&id, false).await;
        }
    });
}

async fn deliverer(
    node: NodeId,
    prefix: String,
    docs: Documents,
    mut rx: mpsc::UnboundedReceiver<redis::Msg>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = shutdown.cancelled() => return,
        };
        let Some(id) = wire::doc_of(&prefix, msg.get_channel_name()) else {
            continue;
        };
        let (from, message) = match wire::decode(msg.get_payload_bytes()) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("relay_fanout_received_total", "kind" => "invalid").increment(1);
                tracing::warn!(doc = %id, error = %e, "fan-out message ignored");
                continue;
            }
        };
        if from == node {
            continue;
        }
        match message {
            Message::Changes(bytes) => {
                metrics::counter!("relay_fanout_received_total", "kind" => "changes").increment(1);
                let key = ChunkKey::for_bytes(ChunkKind::Incremental, &bytes);
                match crate::upload::parse_upload(bytes) {
                    Ok(upload) => docs.published_elsewhere(&id, upload, key).await,
                    // Not ours to judge: the store has what the other node stored.
                    Err(_) => docs.refresh(&id, false).await,
                }
            }
            Message::Notice => {
                metrics::counter!("relay_fanout_received_total", "kind" => "notice").increment(1);
                docs.refresh(&id, false).await;
            }
            Message::Deleted => {
                metrics::counter!("relay_fanout_received_total", "kind" => "deleted").increment(1);
                docs.refresh(&id, true).await;
            }
        }
    }
}
