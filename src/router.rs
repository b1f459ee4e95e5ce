//! The router: which transport serves a request. The only module that knows every transport,
//! so the transports never import each other.
//!
//! `GET /{id}` is three things: a WebSocket upgrade goes to [`ws_doc`](crate::ws_doc),
//! `Accept: text/event-stream` to [`sse`](crate::sse), anything else to [`http`](crate::http).
//! `GET /` is the automerge-repo socket ([`repo::socket`](crate::repo::socket)) on an upgrade,
//! else a short description of the API. Live connections take a connection slot first.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::auth::Access;
use crate::error::RelayError;
use crate::state::AppState;
use crate::transport::caller::Caller;
use crate::transport::request::doc_id;
use crate::{http, ops, repo, sse, ws_doc};

const ABOUT: &str = "automerge-relay: a merge-on-write server for Automerge documents.

  GET    /{id}            the document (Automerge.save format); ?since=h1,h2 for changes only
  PUT    /{id}, POST      merge a save or incremental changes (never overwrites)
  DELETE /{id}            delete the document
  GET    /{id} + WebSocket upgrade      live changes of one document
  GET    /{id} + Accept: text/event-stream   change notifications (SSE)
  GET    /  + WebSocket upgrade          automerge-repo sync protocol
  GET    /_/health, /_/ready, /_/metrics, /_/stats, /_/docs

Ids: 1-128 characters of A-Z a-z 0-9 . _ ~ -, not starting with _ or .
";

/// Builds the router with CORS and request tracing.
pub fn router(state: AppState, cors_origins: &[String]) -> Result<Router, String> {
    let allowed = cors_origins
        .iter()
        .map(|o| HeaderValue::from_str(o.trim()).map_err(|_| format!("bad --cors-origin {o:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let origin = if allowed.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(allowed.clone())
    };
    let allowed = Arc::new(allowed);
    let cors = CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::ACCEPT,
            header::CACHE_CONTROL,
        ])
        .expose_headers([header::ETAG])
        .max_age(std::time::Duration::from_secs(600));

    Ok(Router::new()
        .route("/", get(root))
        .route("/_/health", get(ops::health))
        .route("/_/ready", get(ops::ready))
        .route("/_/stats", get(ops::stats))
        .route("/_/metrics", get(ops::prometheus))
        .route("/_/docs", get(ops::list_docs))
        .route("/_/docs/{id}", get(ops::doc_info))
        .route("/_/docs/{id}/history", get(ops::doc_history))
        .route("/_/", get(ops::dashboard))
        .route(
            "/{id}",
            get(get_doc)
                .put(http::put_doc)
                .post(http::put_doc)
                .delete(http::delete_doc),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(move |req, next| {
            only_allowed_origins(allowed.clone(), req, next)
        }))
        .layer(cors)
        // Failures are logged by RelayError itself, at the level they deserve. Spans name the
        // path only: a query may carry a token.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_failure(()),
        ))
}

/// `GET /`: the automerge-repo socket, or what this server is.
async fn root(
    State(state): State<AppState>,
    caller: Result<Caller, RelayError>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, RelayError> {
    let Ok(ws) = ws else {
        let about = ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], ABOUT);
        return Ok(about.into_response());
    };
    // The token is checked before the upgrade; each document's grant per message.
    let Caller(principal) = caller?;
    let slot = state.limits.connections.acquire(None)?.socket();
    Ok(repo::socket::upgrade(ws, state, slot, principal))
}

/// `GET /{id}`: a live socket, an event stream or the document.
async fn get_doc(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, RelayError> {
    let id = doc_id(path)?;
    // Reading covers subscribing; a read-only WebSocket client's uploads are refused there.
    caller.require(&id, Access::Read)?;
    if let Ok(ws) = ws {
        let slot = state.limits.connections.acquire(Some(&id))?.socket();
        return Ok(ws_doc::upgrade(ws, state, id, slot, caller.0));
    }
    if sse::wants_sse(&headers) {
        let slot = state.limits.connections.acquire(Some(&id))?;
        return sse::stream(state, id, slot, caller.expires_at()).await;
    }
    http::get_doc(&state, id, &query, &headers).await
}

/// With `--cors-origin`, a request from another origin is refused (403) whatever its method —
/// a browser sends a simple POST or a WebSocket upgrade without asking first. Requests with no
/// `Origin` (not from a browser page) pass; preflights are answered by the CORS layer.
async fn only_allowed_origins(
    allowed: Arc<Vec<HeaderValue>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        if !allowed.is_empty() && !allowed.contains(origin) {
            return RelayError::Forbidden("requests from this origin are not allowed")
                .into_response();
        }
    }
    next.run(req).await
}

async fn no_route() -> RelayError {
    RelayError::NoRoute
}

async fn method_not_allowed() -> RelayError {
    RelayError::MethodNotAllowed
}
