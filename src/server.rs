//! Wiring: open the store, build the router, serve until SIGINT/SIGTERM, then drain and flush.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{self, AcceptSettings};
use crate::auth::Auth;
use crate::config::{ServeArgs, StoreKind};
use crate::doc::{DocConfig, Documents};
use crate::limits::ConnectionLimits;
use crate::live::Followers;
use crate::repo::hub::Hub;
use crate::router::router;
use crate::state::{AppState, Limits};
use crate::storage::{MemoryStore, SledStore, Store};
use crate::upload::UploadGate;

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

/// Opens the configured store.
pub fn open_store(args: &ServeArgs) -> Result<Arc<dyn Store>, ServeError> {
    Ok(match args.store {
        StoreKind::Sled => Arc::new(
            SledStore::open_with_cache(&args.data_dir, args.store_cache as u64)
                .map_err(|e| ServeError::Store(e.0))?,
        ),
        StoreKind::Memory => Arc::new(MemoryStore::new()),
    })
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
    let store = open_store(&args)?;
    let docs = Documents::with_config(
        store,
        DocConfig {
            repo_sync_interval: Duration::from_millis(args.repo_sync_interval_ms),
            memory_budget: args.memory_budget as u64,
            max_doc_size: args.max_doc_size as u64,
        },
    );
    let tasks = TaskTracker::new();
    let state = AppState {
        docs: docs.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        hub: Arc::new(Hub::new(format!("automerge-relay-{}", std::process::id()))),
        followers: Followers::new(),
        metrics: crate::metrics::install(),
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
            connections: live.clone(),
        }),
    };
    let app = router(state, &args.cors_origin).map_err(ServeError::Config)?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    }
    tracing::info!(%addr, data_dir = %args.data_dir.display(), store = ?args.store, open = auth.is_open(), "automerge-relay started");
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
    docs.close(left.max(Duration::from_secs(1)))
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    tracing::info!("store flushed; bye");
    Ok(())
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
