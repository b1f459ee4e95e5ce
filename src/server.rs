//! Wiring: open the store, build the router, serve until SIGINT/SIGTERM, then drain and flush.
//!
//! Two things here exist because of storage faults. The store always starts, even on a full
//! disk: it is wrapped in a `GuardedStore` (time bounds, health, `--min-free-disk`), and a
//! sled store with no room to open is opened later (until then reads answer 503 and writes
//! 507). And shutdown is bounded by `--shutdown-grace-secs` whatever the store does: the final
//! flush and the release of the store are given what is left of the grace period, then
//! abandoned — nothing acknowledged depends on them, since every acknowledged write was
//! flushed before it was answered.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{self, AcceptSettings};
use crate::auth::Auth;
use crate::cluster::{spawn_heads_check, FanoutSettings, RedisFanout};
use crate::config::{MinFreeDisk, ServeArgs, StoreKind};
use crate::doc::{DocConfig, Documents};
use crate::limits::ConnectionLimits;
use crate::live::Followers;
use crate::repo::hub::Hub;
use crate::router::router;
use crate::state::{AppState, Limits};
use crate::storage::{
    redacted, DiskSpace, FaultSwitch, FaultyStore, GuardedStore, Guarding, MemoryStore, MinFree,
    Opened, PgSettings, PostgresStore, SledStore, Store,
};
use crate::upload::UploadGate;
use crate::webhook::{Webhook, WebhookSettings};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Store(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The watermark `--min-free-disk` asks for; `None` for no check.
fn min_free(args: &ServeArgs) -> Option<MinFree> {
    match args.min_free_disk {
        None => Some(MinFree::Default),
        Some(MinFreeDisk::Bytes(0)) => None,
        Some(MinFreeDisk::Bytes(b)) => Some(MinFree::Bytes(b)),
        Some(MinFreeDisk::Percent(p)) if p <= 0.0 => None,
        Some(MinFreeDisk::Percent(p)) => Some(MinFree::Percent(p)),
    }
}

/// Opens the configured store, guarded. A sled store that has no room to open yet is
/// returned unhealthy and opens itself once space allows; a PostgreSQL store must be reachable
/// at start (its schema is created or migrated then).
pub async fn open_store(args: &ServeArgs) -> Result<Arc<dyn Store>, ServeError> {
    let mut deferred = None;
    let (backend, mut disk): (Arc<dyn Store>, Option<DiskSpace>) = match &args.store {
        StoreKind::Sled => {
            let disk = min_free(args).map(|m| DiskSpace::new(&args.data_dir, m));
            match SledStore::open_or_defer(&args.data_dir, args.store_cache as u64) {
                Ok(Opened::Open(store)) => (Arc::new(store), disk),
                Ok(Opened::Deferred { store, reason }) => {
                    tracing::warn!(error = %reason, "no room on the disk to open the store: serving without it (reads 503, writes 507) and opening it once space is freed");
                    deferred = Some(reason.message);
                    (Arc::new(store), disk)
                }
                Err(e) => return Err(ServeError::Store(e.message)),
            }
        }
        StoreKind::Memory => (Arc::new(MemoryStore::new()), None),
        StoreKind::Postgres(url) => {
            let settings = PgSettings {
                max_connections: args.store_pool,
                connect_timeout: args.store_timeout().min(Duration::from_secs(5)),
            };
            let store = PostgresStore::connect(url, settings).await.map_err(|e| {
                ServeError::Store(format!(
                    "cannot open the PostgreSQL store {}: {e}",
                    redacted(url)
                ))
            })?;
            (Arc::new(store), None)
        }
    };
    let backend: Arc<dyn Store> = match &args.test_faults {
        Some(file) => {
            tracing::warn!(file = %file.display(), "RELAY_TEST_FAULTS is set: store faults are injected from this file (for tests only)");
            let switch = FaultSwitch::from_file(file.clone());
            disk = disk.map(|d| d.with_faults(switch.clone()));
            Arc::new(FaultyStore::new(backend, switch))
        }
        None => backend,
    };
    let guarded = GuardedStore::new(
        backend,
        disk,
        Guarding {
            timeout: args.store_timeout(),
            probe_every: Duration::from_secs(1),
        },
    );
    if let Some(reason) = deferred {
        guarded.mark_unhealthy(&reason);
    }
    // The first reading of the disk logs when it is already under the watermark.
    let watermark = guarded.health().disk.is_some();
    if matches!(args.store, StoreKind::Sled) && min_free(args).is_some() && !watermark {
        tracing::warn!(data_dir = %args.data_dir.display(), "cannot read the free disk space of the data dir; --min-free-disk is not enforced until it can");
    }
    Ok(Arc::new(guarded))
}

/// Runs the server until `shutdown` fires. Prints `listening on http://ADDR` once bound.
pub async fn run(args: ServeArgs, shutdown: CancellationToken) -> Result<(), ServeError> {
    let auth = Arc::new(Auth::new(args.auth_settings()).map_err(ServeError::Config)?);
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr()?;
    if auth.is_open() && !args.allow_anonymous && !addr.ip().is_loopback() {
        return Err(ServeError::Config(format!(
            "refusing to serve {addr} without credentials: anyone who can reach it could read, \
             overwrite and delete every document. Configure --auth-tokens FILE or signed tokens \
             (--auth-jwt-secret-file FILE or --auth-jwt-public-key FILE), or pass \
             --allow-anonymous to serve it open anyway"
        )));
    }
    let max_connections = accept::fit_to_fd_limit(args.max_connections, accept::raise_fd_limit());
    let live = ConnectionLimits::new(max_connections, args.max_doc_connections);
    let store = open_store(&args).await?;
    // Before anything records a metric (the fan-out sets its gauges as it connects).
    let metrics = crate::metrics::install();
    let docs = Documents::with_config(
        store,
        DocConfig {
            repo_sync_interval: Duration::from_millis(args.repo_sync_interval_ms),
            memory_budget: args.memory_budget as u64,
            max_doc_size: args.max_doc_size as u64,
            max_pending: args.max_pending_changes,
            subscriber_queue_bytes: args.max_peer_queue,
        },
    );
    if let Some(url) = &args.fanout {
        if !matches!(args.store, StoreKind::Postgres(_)) {
            return Err(ServeError::Config(
                "--fanout passes changes between nodes that share one store: it needs \
                 --store postgres://… (with sled or memory each node would keep changes the \
                 others never stored)"
                    .into(),
            ));
        }
        let fanout = RedisFanout::start(
            FanoutSettings {
                url: url.clone(),
                prefix: args.fanout_prefix.clone(),
                max_message: args.fanout_max_message,
            },
            docs.clone(),
            shutdown.clone(),
        )
        .map_err(ServeError::Config)?;
        docs.join_cluster(fanout);
    }
    // Nodes sharing a store check their hot documents against it, with or without fan-out.
    if matches!(args.store, StoreKind::Postgres(_)) && args.heads_check_secs > 0 {
        spawn_heads_check(
            docs.clone(),
            Duration::from_secs(args.heads_check_secs),
            shutdown.clone(),
        );
    }
    let tasks = TaskTracker::new();
    let state = AppState {
        docs: docs.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        hub: Arc::new(Hub::new(format!("automerge-relay-{}", std::process::id()))),
        followers: Followers::new(),
        metrics,
        auth: auth.clone(),
        metrics_public: args.metrics_public,
        uploads: Arc::new(UploadGate::new(
            args.max_decoded_upload.unwrap_or(args.max_doc_size) as u64,
            args.validation_memory as u64,
        )),
        limits: Arc::new(Limits {
            max_body: args.max_body,
            subscriber_queue: args.subscriber_queue,
            ping_interval: args.ping_interval(),
            max_messages_per_sec: args.max_messages_per_sec,
            max_peer_queue: args.max_peer_queue,
            send_timeout: args.send_timeout(),
            max_ephemeral: args.max_ephemeral,
            connections: live.clone(),
        }),
    };
    // Once the metrics recorder is installed (above), before anything is served.
    let webhook = match &args.webhook {
        Some(url) => {
            let hook = Webhook::start(webhook_settings(&args, url)).map_err(ServeError::Config)?;
            docs.observe(hook.clone());
            Some(hook)
        }
        None => None,
    };
    let app = router(state, &args.cors_origin).map_err(ServeError::Config)?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    }
    tracing::info!(%addr, data_dir = %args.data_dir.display(), store = %args.store, fanout = ?args.fanout.as_deref().map(redacted), open = auth.is_open(), "automerge-relay started");
    tokio::spawn(reload_on_hangup(auth, shutdown.clone()));

    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let accepting = AcceptSettings {
        max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
    };
    let serve = accept::serve(listener, app, accepting, live, shutdown.clone());
    let serve = tokio::spawn(async move {
        serve.await;
        // Live sockets are not HTTP requests: wait for them to finish their in-flight uploads.
        tasks.close();
        tasks.wait().await;
    });
    shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + grace;
    match tokio::time::timeout(grace, serve).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        ),
    }
    // Then the document owners: what the transports handed them is merged, persisted and
    // answered before the final flush.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match docs.close(left).await {
        Ok(()) => tracing::info!("store flushed; bye"),
        Err(e) => tracing::warn!(
            error = %e,
            "final store flush abandoned; every acknowledged write was flushed before it was \
             acknowledged, so nothing acknowledged is lost; exiting 0"
        ),
    }
    // Every change is durable now: the webhook calls still waiting go out, debounce or not.
    if let Some(hook) = &webhook {
        hook.finish(deadline).await;
    }
    release(docs, deadline).await;
    Ok(())
}

fn webhook_settings(args: &ServeArgs, url: &str) -> WebhookSettings {
    WebhookSettings {
        url: url.to_owned(),
        secret_file: args.webhook_secret_file.clone(),
        debounce: Duration::from_millis(args.webhook_debounce_ms),
        max_wait: Duration::from_millis(args.webhook_max_wait_ms),
        retries: args.webhook_retries,
        queue: args.webhook_queue,
        timeout: Duration::from_secs(args.webhook_timeout_secs.max(1)),
    }
}

/// Drops the last handles on the store on a thread of its own, waiting at most until
/// `deadline`: sled flushes again when its last handle goes, and that can block on a wedged
/// disk. What it would flush was never acknowledged.
async fn release(docs: Documents, deadline: tokio::time::Instant) {
    let (done, dropped) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("release-store".into())
        .spawn(move || {
            drop(docs);
            let _ = done.send(());
        });
    if spawned.is_err() {
        tracing::warn!("cannot start a thread to close the store; exiting without closing it");
        return;
    }
    if tokio::time::timeout_at(deadline, dropped).await.is_err() {
        tracing::warn!("closing the store did not finish within the grace period; exiting without waiting for it (nothing acknowledged depends on it)");
    }
}

/// Reloads the credentials on every SIGHUP until shutdown; a bad file keeps the previous
/// configuration (and says why).
async fn reload_on_hangup(auth: Arc<Auth>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot watch SIGHUP; credentials reload only on restart");
            return;
        };
        loop {
            tokio::select! {
                _ = hangups.recv() => {}
                _ = shutdown.cancelled() => return,
            }
            match auth.reload() {
                Ok(()) => tracing::info!("SIGHUP: credentials reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: cannot reload the credentials; keeping the previous ones")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (auth, shutdown);
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
