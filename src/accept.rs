//! Accepting HTTP connections: a bounded number of them, each with a deadline for its headers.
//!
//! `axum::serve` has neither: partial requests and idle keep-alive connections stayed open
//! forever, and under `ulimit -n 1024`, 1,100 stalled sockets from one client made
//! `/_/health` time out. Here:
//! - a client has `--header-timeout-secs` to send a request's headers; hyper arms that timer
//!   whenever it waits for a request, so an idle keep-alive connection closes after it too;
//! - `--max-connections` counts every connection: HTTP ones (SSE streams included) here,
//!   upgraded WebSockets by their live slots. At the limit, a new connection takes the place of the
//!   oldest one that has no request in progress (stalled in its headers, or idle between
//!   requests): a slowloris flood then sheds itself instead of locking everyone out. When
//!   every connection is busy, a few more are accepted on a reserve that answers only
//!   `/_/health` (503 `too_many_connections` otherwise); past the reserve a connection is
//!   closed at once;
//! - the process's soft file-descriptor limit is raised to the hard one at start, and
//!   `--max-connections` is lowered to fit under it with room for the store.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use tower::ServiceExt;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::RelayError;
use crate::limits::ConnectionLimits;

/// Connections beyond `--max-connections` that still get an answer (health, or 503).
const RESERVE: usize = 32;
/// File descriptors kept for the store, logs and the like.
const FD_HEADROOM: u64 = 64;
/// Pause after `accept` fails (out of file descriptors): retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How connections are accepted.
#[derive(Debug, Clone)]
pub struct AcceptSettings {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Raises the soft file-descriptor limit to the hard one; returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim = raised;
                }
            }
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    None
}

/// `--max-connections`, lowered to fit the file-descriptor limit with the reserve.
pub fn fit_to_fd_limit(max_connections: usize, fd_limit: Option<u64>) -> usize {
    let Some(fds) = fd_limit else {
        return max_connections;
    };
    let room = fds.saturating_sub(FD_HEADROOM + RESERVE as u64) as usize;
    if max_connections > room {
        tracing::warn!(
            max_connections,
            fd_limit = fds,
            effective = room,
            "--max-connections exceeds what the file-descriptor limit allows; lowered"
        );
        return room.max(1);
    }
    max_connections
}

/// One connection, as the shedding sees it.
#[derive(Default)]
struct ConnState {
    /// Requests in progress, counted until their response body is done (an SSE stream is
    /// a request in progress for as long as it streams).
    busy: AtomicUsize,
    /// Cancelled to close the connection at once.
    kill: CancellationToken,
}

/// Open connections, oldest first.
#[derive(Default)]
struct Pool(Mutex<VecDeque<Weak<ConnState>>>);

impl Pool {
    fn add(&self) -> Arc<ConnState> {
        let conn = Arc::new(ConnState::default());
        if let Ok(mut q) = self.0.lock() {
            q.push_back(Arc::downgrade(&conn));
        }
        conn
    }

    /// Closes the oldest connection with no request in progress; false if every one is busy.
    fn shed_one(&self) -> bool {
        let Ok(mut q) = self.0.lock() else {
            return false;
        };
        q.retain(|w| w.strong_count() > 0);
        let idle = q.iter().position(|w| {
            w.upgrade()
                .is_some_and(|c| c.busy.load(Ordering::Acquire) == 0)
        });
        match idle.and_then(|i| q.remove(i)).and_then(|w| w.upgrade()) {
            Some(conn) => {
                conn.kill.cancel();
                true
            }
            None => false,
        }
    }
}

/// Counts one request as in progress until dropped (with its response body).
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(conn: &Arc<ConnState>) -> Self {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Self(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress until it is done.
struct TrackedBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The router, counting each connection's requests in progress.
#[derive(Clone)]
struct Tracked {
    app: Router,
    conn: Arc<ConnState>,
}

impl tower::Service<axum::extract::Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request<Incoming>) -> Self::Future {
        let busy = Busy::new(&self.conn);
        let app = self.app.clone();
        Box::pin(async move {
            let resp = app.oneshot(req.map(Body::new)).await?;
            Ok(resp.map(|inner| Body::new(TrackedBody { inner, _busy: busy })))
        })
    }
}

/// Open plain HTTP connections; decremented when dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting and waits for the open
/// connections to finish their requests (the caller bounds the wait).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: AcceptSettings,
    live: Arc<ConnectionLimits>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    let pool = Pool::default();
    let open = Arc::new(AtomicUsize::new(0));
    let overflow = overflow_router();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                // Replies and pushes are small frames the client is waiting for: Nagle's
                // algorithm held a push behind the client's delayed ACK of the previous frame,
                // one delivery in seven of a typing storm at 20-50 ms instead of 2-5 ms.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let count = open.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = Open(open.clone());
        let total = count + live.sockets();
        let app = if total <= settings.max_connections || pool.shed_one() {
            app.clone()
        } else if total <= settings.max_connections + RESERVE {
            crate::metrics::rejected("too_many_connections");
            overflow.clone()
        } else {
            crate::metrics::rejected("too_many_connections");
            continue;
        };
        let state = pool.add();
        let kill = state.kill.clone();
        let service = Tracked { app, conn: state };
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _guard = guard;
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                // Shed for a newer connection: it had no request in progress.
                _ = kill.cancelled() => return,
                _ = stop.cancelled() => {
                    // Finish the request in progress (if any), take no other.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    connections.close();
    connections.wait().await;
}

/// What a connection past the limit is served: health, else 503 and close.
fn overflow_router() -> Router {
    async fn busy() -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut resp = RelayError::TooManyConnections("server limit").into_response();
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        resp
    }
    Router::new()
        .route(
            "/_/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_fits_under_the_fd_limit() {
        assert_eq!(fit_to_fd_limit(10_000, None), 10_000);
        assert_eq!(fit_to_fd_limit(10_000, Some(1_000_000)), 10_000);
        assert_eq!(fit_to_fd_limit(10_000, Some(1024)), 1024 - 64 - 32);
    }
}
