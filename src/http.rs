//! HTTP document routes: a thin adapter from requests to the document owner.
//!
//! `GET/HEAD/PUT/POST/DELETE /{id}` follow the product contract. Upload bodies are read under
//! the size limit and validated on a blocking thread before they reach the owner. The router
//! sends a `GET /{id}` here when it is neither a WebSocket upgrade nor an event stream.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::Access;
use crate::doc::{parse_heads, JsonRead, Precondition, ReadOutcome};
use crate::error::RelayError;
use crate::id::DocId;
use crate::state::AppState;
use crate::transport::caller::Caller;
use crate::transport::outcome::{outcome_json, write_status};
use crate::transport::request::{doc_id, read_body};
use crate::transport::validate::validate;

fn etag_matches(headers: &HeaderMap, name: header::HeaderName, etag: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

/// `Accept: application/json` (preferred over Automerge bytes): the JSON view.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .find(|t| *t == "application/json" || *t == "application/octet-stream")
        == Some("application/json")
}

/// `GET /{id}` (and HEAD): the document (as JSON when asked for), or `?since=` its changes;
/// 304 on a matching ETag.
pub async fn get_doc(
    state: &AppState,
    id: DocId,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Response, RelayError> {
    let current = |etag: &str| etag_matches(headers, header::IF_NONE_MATCH, etag);
    let json = wants_json(headers);
    let (mut resp, etag) = if json {
        if query.contains_key("since") {
            return Err(RelayError::BadRequest(
                "?since= returns Automerge changes; the JSON view is of the whole document".into(),
            ));
        }
        match state.docs.read_json(&id, current).await? {
            JsonRead::Missing => return Err(RelayError::NotFound),
            JsonRead::NotModified(etag) => (StatusCode::NOT_MODIFIED.into_response(), etag),
            JsonRead::Found(json, etag) => (Json(json).into_response(), etag),
        }
    } else {
        let since = query.get("since").map(|s| parse_heads(s)).transpose()?;
        let ReadOutcome::Found { bytes, etag, .. } = state.docs.read(&id, since).await? else {
            return Err(RelayError::NotFound);
        };
        let resp = if current(&etag) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                Body::from(bytes),
            )
                .into_response()
        };
        (resp, etag)
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if json {
        h.insert(header::VARY, HeaderValue::from_static("accept"));
    }
    Ok(resp)
}

/// The write's precondition. A value that is not text cannot be an ETag: 400, rather than
/// ignoring the condition and writing unconditionally.
fn precondition(headers: &HeaderMap) -> Result<Precondition, RelayError> {
    let list = |name: header::HeaderName| -> Result<Vec<String>, RelayError> {
        let mut tags = Vec::new();
        for value in headers.get_all(&name) {
            let text = value.to_str().map_err(|_| {
                RelayError::BadRequest(format!("{name} must hold ETags (ASCII text)"))
            })?;
            tags.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
            );
        }
        Ok(tags)
    };
    let if_match = list(header::IF_MATCH)?;
    if !if_match.is_empty() {
        return Ok(Precondition::IfMatch(if_match));
    }
    if list(header::IF_NONE_MATCH)?.iter().any(|t| t == "*") {
        return Ok(Precondition::IfNoneMatchAny);
    }
    Ok(Precondition::None)
}

/// `PUT /{id}` and `POST /{id}`: merge the body (never overwrites).
pub async fn put_doc(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RelayError> {
    // The grant first: a caller without one does not get its body read. Then the body
    // (bounded), so any other error answer leaves the connection reusable.
    let id = doc_id(path)?;
    caller.require(&id, Access::Write)?;
    let precondition = precondition(&headers)?;
    let bytes = read_body(&headers, body, state.limits.max_body).await?;
    let upload = validate(&state.uploads, &state.docs, &id, bytes).await?;
    let outcome = state.docs.write(&id, upload, precondition, None).await?;
    let mut resp = (write_status(&outcome), Json(outcome_json(&outcome))).into_response();
    if let Ok(v) = HeaderValue::from_str(&outcome.etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

/// `DELETE /{id}`: 204, or 404 when there was nothing to delete.
pub async fn delete_doc(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, RelayError> {
    let id = doc_id(path)?;
    caller.require(&id, Access::Write)?;
    if state.docs.delete(&id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(RelayError::NotFound)
    }
}
