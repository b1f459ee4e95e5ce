//! Upload validation for every transport that accepts Automerge bytes.
//!
//! Two steps off the async workers (both are CPU work): measure what the upload decodes to,
//! refusing it (413) past `--max-decoded-upload` before anything is loaded; then, with a share
//! of `--validation-memory` held, load it strictly with the owner's latest hint, so the owner
//! applies only what may be new.

use bytes::Bytes;

use crate::doc::Documents;
use crate::error::RelayError;
use crate::id::DocId;
use crate::upload::{decoded_size, parse_upload_with, Upload, UploadGate};

pub async fn validate(
    gate: &UploadGate,
    docs: &Documents,
    id: &DocId,
    bytes: Bytes,
) -> Result<Upload, RelayError> {
    let limit = gate.max_decoded();
    let (bytes, decoded) = blocking(move || {
        let decoded = decoded_size(&bytes, limit);
        (bytes, decoded)
    })
    .await?;
    let _permit = gate.admit(decoded?).await?;
    let hint = docs.hint(id);
    blocking(move || parse_upload_with(bytes, hint.as_ref())).await?
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RelayError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RelayError::Internal(format!("validation task failed: {e}")))
}
