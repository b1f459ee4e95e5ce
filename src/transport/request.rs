//! Reading a document request: the id from the path, the body under the size limit.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::header::{self, HeaderMap};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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

/// Bodies over the limit are still read (and thrown away) up to this size before the 413 goes
/// out: a client that is still sending then reads the answer (Node's `fetch` posting 40 MiB
/// got EPIPE instead, because the server closed while the body was arriving). Past it, or
/// past [`DRAIN_TIME`], the connection is closed.
const DRAIN_LIMIT: u64 = 64 << 20;
/// The longest a refused body is read for.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads a request body under `limit`, answering 413 past it.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RelayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|n| n > limit as u64) {
        if declared.is_some_and(|n| n <= DRAIN_LIMIT) {
            drain(&mut body).await;
        }
        return Err(RelayError::TooLarge { limit });
    }
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| RelayError::BadRequest(format!("could not read the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if read.len() + data.len() > limit {
            drain(&mut body).await;
            return Err(RelayError::TooLarge { limit });
        }
        read.extend_from_slice(&data);
    }
    Ok(read.freeze())
}

/// Reads and discards what is left of `body`, up to [`DRAIN_LIMIT`] and [`DRAIN_TIME`].
async fn drain(body: &mut Body) {
    let discard = async {
        let mut seen: u64 = 0;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if seen > DRAIN_LIMIT {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}
