//! Typed errors and their one mapping to HTTP: `{"error":"<stable_code>","message":"..."}`.
//!
//! Every layer returns `RelayError`; transports turn it into a status (HTTP) or an error
//! message (WebSocket) using the same stable code, so clients can match on `error`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    BadId(String),
    #[error("no document with this id")]
    NotFound,
    #[error("no such route")]
    NoRoute,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("the body is empty; send an Automerge save or incremental changes")]
    EmptyBody,
    #[error("the body is not valid Automerge data: {0}")]
    InvalidBody(String),
    #[error("the body holds no Automerge changes")]
    NoChanges,
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the upload decodes to more than the limit of {limit} bytes; nothing was stored")]
    DecodedTooLarge { limit: u64 },
    #[error("too many changes wait for dependencies in this document (limit {limit}); send the changes they depend on first")]
    TooManyPending { limit: usize },
    #[error("the merged document would exceed the limit of {limit} bytes; nothing was stored")]
    DocTooLarge { limit: u64 },
    #[error("too many live connections ({0}); try again later")]
    TooManyConnections(&'static str),
    #[error("the document does not match the precondition (If-Match / If-None-Match)")]
    PreconditionFailed,
    #[error("bad ?since= parameter: {0}")]
    BadSince(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("storage failed: {0}")]
    Storage(String),
    /// The disk is (nearly) full: the write was refused before anything was stored.
    #[error("not enough free disk space: {0}")]
    InsufficientStorage(String),
    /// The store failed or is not answering; writes are refused until it recovers.
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl RelayError {
    /// The stable machine-readable code sent as `"error"`.
    pub fn code(&self) -> &'static str {
        match self {
            RelayError::BadId(_) => "bad_id",
            RelayError::NotFound => "not_found",
            RelayError::NoRoute => "no_route",
            RelayError::MethodNotAllowed => "method_not_allowed",
            RelayError::EmptyBody => "empty_body",
            RelayError::InvalidBody(_) => "invalid_automerge",
            RelayError::NoChanges => "no_changes",
            RelayError::TooLarge { .. } | RelayError::DecodedTooLarge { .. } => "too_large",
            RelayError::DocTooLarge { .. } => "document_too_large",
            RelayError::TooManyConnections(_) => "too_many_connections",
            RelayError::PreconditionFailed => "precondition_failed",
            RelayError::TooManyPending { .. } => "too_many_pending",
            RelayError::BadSince(_) => "bad_since",
            RelayError::BadRequest(_) => "bad_request",
            RelayError::Storage(_) => "storage_error",
            RelayError::InsufficientStorage(_) => "insufficient_storage",
            RelayError::StorageUnavailable(_) => "storage_unavailable",
            RelayError::Unauthorized(_) => "unauthorized",
            RelayError::Forbidden(_) => "forbidden",
            RelayError::ShuttingDown => "shutting_down",
            RelayError::Internal(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            RelayError::BadId(_)
            | RelayError::EmptyBody
            | RelayError::InvalidBody(_)
            | RelayError::NoChanges
            | RelayError::BadSince(_)
            | RelayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RelayError::NotFound | RelayError::NoRoute => StatusCode::NOT_FOUND,
            RelayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RelayError::Forbidden(_) => StatusCode::FORBIDDEN,
            RelayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RelayError::TooLarge { .. }
            | RelayError::DecodedTooLarge { .. }
            | RelayError::DocTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RelayError::TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
            RelayError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            RelayError::TooManyPending { .. } => StatusCode::CONFLICT,
            RelayError::Storage(_) | RelayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RelayError::ShuttingDown | RelayError::StorageUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RelayError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    /// The JSON body shared by HTTP responses and WebSocket error messages.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.code(), "message": self.to_string() })
    }
}

/// Refusals logged per second at most; the rest are counted and reported with the next line.
const REFUSAL_LINES_PER_SEC: u32 = 20;

/// Whether a refusal may be logged now (a flood of bad requests must not flood the log); the
/// number of refusals left unlogged since the last line.
fn refusal_log_slot() -> Option<u64> {
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};
    struct Window {
        start: Instant,
        lines: u32,
        suppressed: u64,
    }
    static WINDOW: OnceLock<Mutex<Window>> = OnceLock::new();
    let window = WINDOW.get_or_init(|| {
        Mutex::new(Window {
            start: Instant::now(),
            lines: 0,
            suppressed: 0,
        })
    });
    let mut w = window.lock().ok()?;
    if w.start.elapsed() >= Duration::from_secs(1) {
        w.start = Instant::now();
        w.lines = 0;
    }
    if w.lines >= REFUSAL_LINES_PER_SEC {
        w.suppressed += 1;
        return None;
    }
    w.lines += 1;
    Some(std::mem::take(&mut w.suppressed))
}

impl IntoResponse for RelayError {
    fn into_response(self) -> Response {
        crate::metrics::rejected(self.code());
        if matches!(
            self,
            RelayError::InsufficientStorage(_) | RelayError::StorageUnavailable(_)
        ) {
            // The store logs the fault once when it starts and once when it ends; a flood of
            // refused writes in between is counted, not logged line by line.
            tracing::debug!(error = %self, "write refused: storage fault");
        } else if matches!(
            self,
            RelayError::DocTooLarge { .. } | RelayError::TooManyConnections(_)
        ) {
            tracing::warn!(error = %self, "limit reached");
        } else if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else if let Some(suppressed) = refusal_log_slot() {
            tracing::info!(code = self.code(), error = %self, suppressed, "request refused");
        }
        let mut resp = (self.status(), Json(self.body())).into_response();
        if matches!(self, RelayError::Unauthorized(_)) {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if matches!(self, RelayError::TooLarge { .. }) {
            // The rest of the body was not read, so this connection cannot carry another request.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}
