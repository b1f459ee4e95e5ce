//! Upload validation for every transport that accepts Automerge bytes.

use bytes::Bytes;

use crate::doc::Documents;
use crate::error::RelayError;
use crate::id::DocId;
use crate::upload::{parse_upload_with, Upload};

/// Validates an upload for document `id` off the async workers (parsing a large save is CPU
/// work), using the owner's latest hint so the owner only applies what may be new.
pub async fn validate(docs: &Documents, id: &DocId, bytes: Bytes) -> Result<Upload, RelayError> {
    let hint = docs.hint(id);
    tokio::task::spawn_blocking(move || parse_upload_with(bytes, hint.as_ref()))
        .await
        .map_err(|e| RelayError::Internal(format!("validation task failed: {e}")))?
}
