//! HTTP document routes: a thin adapter from requests to the document owner.
//!
//! `GET/HEAD/PUT/POST/DELETE /{id}` follow the product contract; `/_/...` belongs to the
//! server (health, readiness, stats, listings). Upload bodies are read under the size limit
//! and validated on a blocking thread before they reach the owner.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::doc::{parse_heads, Documents, Precondition, ReadOutcome, WriteOutcome};
use crate::error::RelayError;
use crate::id::DocId;
use crate::state::AppState;
use crate::upload::{parse_upload_with, Upload};

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
    let origin = if cors_origins.is_empty() {
        AllowOrigin::any()
    } else {
        let list = cors_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim()).map_err(|_| format!("bad --cors-origin {o:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
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
        .route("/_/health", get(health))
        .route("/_/ready", get(ready))
        .route("/_/stats", get(stats))
        .route("/_/metrics", get(prometheus))
        .route("/_/docs", get(list_docs))
        .route(
            "/{id}",
            get(get_doc).put(put_doc).post(put_doc).delete(delete_doc),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(cors)
        // Failures are logged by RelayError itself, at the level they deserve.
        .layer(TraceLayer::new_for_http().on_failure(())))
}

async fn root(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => match state.limits.connections.acquire(None) {
            Ok(slot) => crate::repo::socket::upgrade(ws, state, slot),
            Err(e) => e.into_response(),
        },
        Err(_) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], ABOUT).into_response(),
    }
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.docs.list(None, 1).await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "not_ready", "message": e.to_string()})),
        )
            .into_response(),
    }
}

/// Document counters, plus what the allocator holds (for telling live memory from free
/// memory the process keeps).
#[derive(serde::Serialize)]
struct StatsBody {
    #[serde(flatten)]
    docs: crate::doc::StatsSnapshot,
    heap: Option<crate::alloc::HeapUsage>,
}

async fn stats(State(state): State<AppState>) -> impl IntoResponse {
    Json(StatsBody {
        docs: state.docs.stats(),
        heap: crate::alloc::heap_usage(),
    })
}

async fn prometheus(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return RelayError::NoRoute.into_response();
    };
    let s = state.docs.stats();
    metrics::gauge!("relay_documents_hot").set(s.hot_documents as f64);
    metrics::gauge!("relay_documents_hot_bytes").set(s.hot_bytes as f64);
    metrics::gauge!("relay_connections").set(state.limits.connections.live() as f64);
    metrics::gauge!("relay_subscribers").set(state.followers.count() as f64);
    metrics::gauge!("relay_repo_peers").set(state.hub.peer_count() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

async fn list_docs(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, RelayError> {
    let after = q.get("after").map(|a| DocId::parse(a)).transpose()?;
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| RelayError::BadRequest("limit must be a number".into()))?,
        None => 100,
    }
    .clamp(1, 1000);
    let ids = state.docs.list(after.as_ref(), limit).await?;
    let ids: Vec<&str> = ids.iter().map(|d| d.as_str()).collect();
    Ok(Json(json!({ "documents": ids })).into_response())
}

async fn no_route() -> RelayError {
    RelayError::NoRoute
}

async fn method_not_allowed() -> RelayError {
    RelayError::MethodNotAllowed
}

/// The id from the path; a path that does not decode is a bad id too.
pub fn doc_id(path: Result<Path<String>, PathRejection>) -> Result<DocId, RelayError> {
    match path {
        Ok(Path(raw)) => DocId::parse(&raw),
        Err(e) => Err(RelayError::BadId(format!(
            "document id does not decode: {e}"
        ))),
    }
}

fn heads_json(heads: &[automerge::ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

fn etag_matches(headers: &HeaderMap, name: header::HeaderName, etag: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

async fn get_doc(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, RelayError> {
    let id = doc_id(path)?;
    if let Ok(ws) = ws {
        let slot = state.limits.connections.acquire(Some(&id))?;
        return Ok(crate::ws_doc::upgrade(ws, state, id, slot));
    }
    if crate::sse::wants_sse(&headers) {
        let slot = state.limits.connections.acquire(Some(&id))?;
        return crate::sse::stream(state, id, slot).await;
    }
    let since = q.get("since").map(|s| parse_heads(s)).transpose()?;
    let ReadOutcome::Found { bytes, etag, .. } = state.docs.read(&id, since).await? else {
        return Err(RelayError::NotFound);
    };
    let mut resp = if etag_matches(&headers, header::IF_NONE_MATCH, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from(bytes),
        )
            .into_response()
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// Reads a request body under `limit`, answering 413 past it.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RelayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(RelayError::TooLarge { limit });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(RelayError::TooLarge { limit }),
        Err(e) => Err(RelayError::BadRequest(format!(
            "could not read the body: {e}"
        ))),
    }
}

/// Validates an upload for document `id` off the async workers (parsing a large save is CPU
/// work), using the owner's latest hint so the owner only applies what may be new.
pub async fn validate(docs: &Documents, id: &DocId, bytes: Bytes) -> Result<Upload, RelayError> {
    let hint = docs.hint(id);
    tokio::task::spawn_blocking(move || parse_upload_with(bytes, hint.as_ref()))
        .await
        .map_err(|e| RelayError::Internal(format!("validation task failed: {e}")))?
}

fn precondition(headers: &HeaderMap) -> Precondition {
    let list = |name| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let if_match = list(header::IF_MATCH);
    if !if_match.is_empty() {
        return Precondition::IfMatch(if_match);
    }
    if list(header::IF_NONE_MATCH).iter().any(|t| t == "*") {
        return Precondition::IfNoneMatchAny;
    }
    Precondition::None
}

/// The JSON and status of a write, shared with the WebSocket ack.
pub fn write_status(outcome: &WriteOutcome) -> StatusCode {
    if outcome.applied == 0 && outcome.pending > 0 && outcome.pending == outcome.total {
        StatusCode::ACCEPTED
    } else if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

async fn put_doc(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RelayError> {
    // Read the body first (bounded), so an error answer leaves the connection reusable.
    let bytes = read_body(&headers, body, state.limits.max_body).await?;
    let id = doc_id(path)?;
    let upload = validate(&state.docs, &id, bytes).await?;
    let outcome = state
        .docs
        .write(&id, upload, precondition(&headers), None)
        .await?;
    let status = write_status(&outcome);
    let mut body = json!({
        "heads": heads_json(&outcome.heads),
        "applied": outcome.applied,
    });
    if status == StatusCode::ACCEPTED || outcome.pending > 0 {
        body["pending"] = json!(outcome.pending);
    }
    let mut resp = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&outcome.etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

async fn delete_doc(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, RelayError> {
    let id = doc_id(path)?;
    if state.docs.delete(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(RelayError::NotFound)
    }
}
