//! The state every route shares, built once in `server.rs` and handed to the router.
//!
//! It lives at the root, not in a transport, so the transports depend on it and never on each
//! other: `http`, `ws_doc`, `sse` and `repo::socket` all take an [`AppState`].

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::doc::Documents;
use crate::limits::ConnectionLimits;
use crate::live::Followers;
use crate::repo::hub::Hub;
use crate::upload::UploadGate;

/// Shared state of every route.
#[derive(Clone)]
pub struct AppState {
    pub docs: Documents,
    pub limits: Arc<Limits>,
    /// Cancelled at shutdown; live connections close when it fires.
    pub shutdown: CancellationToken,
    /// Upgraded sockets, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Shared state of automerge-repo connections.
    pub hub: Arc<Hub>,
    /// Live document subscriptions (WebSocket and SSE), reported as `relay_subscribers`.
    pub followers: Followers,
    /// Renders `/_/metrics` (absent when no recorder could be installed).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The credentials every request is checked against.
    pub auth: Arc<Auth>,
    /// `/_/metrics` needs no token (`--metrics-public`).
    pub metrics_public: bool,
    /// Bounds on uploads being validated (decoded size, scratch memory).
    pub uploads: Arc<UploadGate>,
}

/// Limits and tuning the transports need.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body or WebSocket message (`--max-body`).
    pub max_body: usize,
    /// Events that may wait for one document subscriber (`--subscriber-queue`).
    pub subscriber_queue: usize,
    /// Keepalive of every live connection: WebSocket pings and SSE comments (`--ping-secs`).
    pub ping_interval: Duration,
    /// Data frames one socket may send per second (`--max-messages-per-sec`).
    pub max_messages_per_sec: u32,
    pub connections: Arc<ConnectionLimits>,
}
