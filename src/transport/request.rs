//! Reading a document request: the id from the path, the body under the size limit.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::header::{self, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::error::RelayError;
use crate::id::DocId;

/// The id from the path; a path that does not decode is a bad id too.
pub fn doc_id(path: Result<Path<String>, PathRejection>) -> Result<DocId, RelayError> {
    match path {
        Ok(Path(raw)) => DocId::parse(&raw),
        Err(e) => Err(RelayError::BadId(format!(
            "document id does not decode: {e}"
        ))),
    }
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
