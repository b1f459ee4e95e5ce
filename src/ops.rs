//! The server's own routes under `/_/`: health, readiness, stats, Prometheus metrics, the
//! document listing, one document's info and history, and the dashboard page. Not a transport of documents; they report on the server. Health and
//! readiness are always open (load balancers probe them); the rest needs an admin token.

use std::collections::HashMap;

use automerge::ChangeHash;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::Access;
use crate::doc::{iso8601, DocInfo};
use crate::error::RelayError;
use crate::id::DocId;
use crate::state::AppState;
use crate::transport::caller::Caller;
use crate::transport::request::doc_id;

pub async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when the store takes writes (healthy, disk over `--min-free-disk`) and answers a
/// listing. Not ready: `503 {"error":"not_ready","reason":<the code writes get>,"message"}`.
/// Health (`/_/health`) stays ok meanwhile: the process is fine, and restarting it would not
/// free the disk.
pub async fn ready(State(state): State<AppState>) -> Response {
    let store = state.docs.store_health();
    let disk = json!({
        "free_bytes": store.free_bytes,
        "min_free_bytes": store.min_free_bytes,
    });
    let refusing = match store.refusing {
        Some(e) => Some(e),
        None => state.docs.store_answers().await.err(),
    };
    match refusing {
        None => Json(json!({"status": "ready", "disk": disk})).into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": "not_ready",
                "reason": e.code(),
                "message": e.to_string(),
                "disk": disk,
                "stuck_store_operations": store.stuck,
            })),
        )
            .into_response(),
    }
}

/// Document counters, the process's resident memory (`rss`, from `/proc/self/status`) and
/// the allocator's own figures (`heap`: bytes handed out, including reserved pages never
/// touched, and bytes kept free), which are not resident memory. `hot_bytes` (an estimate of
/// the documents' memory) is compared with `rss`.
#[derive(serde::Serialize)]
struct StatsBody {
    #[serde(flatten)]
    docs: crate::doc::StatsSnapshot,
    rss: Option<u64>,
    heap: Option<crate::alloc::HeapUsage>,
    /// Open connections (HTTP and live sockets), live per-document subscribers (WebSocket and
    /// SSE) and automerge-repo peers.
    connections: usize,
    subscribers: usize,
    repo_peers: usize,
}

pub async fn stats(State(state): State<AppState>, caller: Caller) -> Result<Response, RelayError> {
    caller.require_server_admin()?;
    Ok(Json(StatsBody {
        docs: state.docs.stats(),
        rss: crate::alloc::rss(),
        heap: crate::alloc::heap_usage(),
        connections: state.limits.connections.live(),
        subscribers: state.followers.count(),
        repo_peers: state.hub.peer_count(),
    })
    .into_response())
}

/// Prometheus metrics: admin only, unless `--metrics-public` (they hold no secrets and no
/// document contents, but they do show the server's load).
pub async fn prometheus(
    State(state): State<AppState>,
    caller: Result<Caller, RelayError>,
) -> Result<Response, RelayError> {
    if !state.metrics_public {
        caller?.require_server_admin()?;
    }
    let Some(handle) = &state.metrics else {
        return Err(RelayError::NoRoute);
    };
    let s = state.docs.stats();
    metrics::gauge!("relay_documents_hot").set(s.hot_documents as f64);
    metrics::gauge!("relay_documents_hot_bytes").set(s.hot_bytes as f64);
    metrics::gauge!("relay_connections").set(state.limits.connections.live() as f64);
    metrics::gauge!("relay_subscribers").set(state.followers.count() as f64);
    metrics::gauge!("relay_repo_peers").set(state.hub.peer_count() as f64);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response())
}

pub async fn list_docs(
    State(state): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, RelayError> {
    caller.require_server_admin()?;
    let after = q.get("after").map(|a| DocId::parse(a)).transpose()?;
    let limit = number(&q, "limit", 100)?.clamp(1, 1000);
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    let docs = state.docs.list(after.as_ref(), prefix, limit).await?;
    let next = (docs.len() == limit).then(|| docs.last().map(|(id, _)| id.to_string()));
    let documents: Vec<serde_json::Value> =
        docs.iter().map(|(id, info)| doc_json(id, info)).collect();
    Ok(Json(json!({ "documents": documents, "next": next.flatten() })).into_response())
}

/// `GET /_/docs/{id}`: one document's figures and who is connected to it.
pub async fn doc_info(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, RelayError> {
    let id = doc_id(path)?;
    caller.require(&id, Access::Admin)?;
    let Some(info) = state.docs.info(&id).await? else {
        return Err(RelayError::NotFound);
    };
    let mut body = doc_json(&id, &info);
    body["subscribers"] = json!(info.subscribers);
    body["repo_peers"] = json!(info.repo_peers);
    Ok(Json(body).into_response())
}

/// `GET /_/docs/{id}/history?limit=&before=`: its changes, newest first.
pub async fn doc_history(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, RelayError> {
    let id = doc_id(path)?;
    caller.require(&id, Access::Admin)?;
    let limit = number(&q, "limit", 50)?.clamp(1, 1000);
    let before = match q.get("before") {
        Some(b) => Some(b.parse::<ChangeHash>().map_err(|_| {
            RelayError::BadRequest("before must be a change hash (64 hex digits)".into())
        })?),
        None => None,
    };
    let Some(page) = state.docs.history(&id, limit, before).await? else {
        return Err(RelayError::NotFound);
    };
    let next = page.next.map(|h| h.to_string());
    Ok(Json(json!({ "id": id.as_str(), "changes": page.changes, "next": next })).into_response())
}

fn number(q: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, RelayError> {
    match q.get(name) {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| RelayError::BadRequest(format!("{name} must be a number"))),
        None => Ok(default),
    }
}

fn doc_json(id: &DocId, info: &DocInfo) -> serde_json::Value {
    json!({
        "id": id.as_str(),
        "heads": info.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "changes": info.changes,
        "size": info.stored_bytes,
        "pending": info.pending,
        "loaded": info.was_hot,
        "last_change": (info.last_change > 0).then(|| iso8601(info.last_change.saturating_mul(1000))),
    })
}

/// The dashboard page (`assets/dashboard.html`, in the binary): status, documents, a
/// document's JSON and history, all read from the admin routes above with the page's
/// `?token=`. Admin only, like them.
pub async fn dashboard(caller: Caller) -> Result<Response, RelayError> {
    caller.require_server_admin()?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/dashboard.html"),
    )
        .into_response())
}
