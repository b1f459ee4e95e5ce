//! Upload validation for every transport that accepts Automerge bytes.
//!
//! Two steps, both CPU work: measure what the upload decodes to, refusing it (413) past
//! `--max-decoded-upload` before anything is loaded; then, with a share of
//! `--validation-memory` held, load it strictly with the owner's latest hint, so the owner
//! applies only what may be new.
//!
//! Small uploads are validated on the calling task: a keystroke's change (100–600 bytes)
//! takes 20–90 µs to measure and load, less than handing it to a blocking thread and back,
//! which in an 8-typist storm was two of the relay's five thread hand-overs per keystroke
//! (`benches/typing-storm.sh`). An upload counts as small when it is at most [`INLINE_BYTES`]
//! on the wire and decodes to at most [`INLINE_DECODED`]; measuring stops at that bound, so a
//! small body that inflates a lot costs at most that much inflating before it moves to a
//! blocking thread.

use bytes::Bytes;

use crate::doc::Documents;
use crate::error::RelayError;
use crate::id::DocId;
use crate::upload::{decoded_size, parse_upload_with, Upload, UploadGate};

/// Largest body validated on the calling task.
const INLINE_BYTES: usize = 16 * 1024;
/// Most it may decode to (loading 64 KiB of decoded changes takes well under a millisecond).
const INLINE_DECODED: u64 = 64 * 1024;

pub async fn validate(
    gate: &UploadGate,
    docs: &Documents,
    id: &DocId,
    bytes: Bytes,
) -> Result<Upload, RelayError> {
    let limit = gate.max_decoded();
    let (bytes, decoded) = match inline_size(&bytes, limit) {
        Some(decoded) => (bytes, decoded?),
        None => {
            let (bytes, decoded) = blocking(move || {
                let decoded = decoded_size(&bytes, limit);
                (bytes, decoded)
            })
            .await?;
            (bytes, decoded?)
        }
    };
    let _permit = gate.admit(decoded).await?;
    let hint = docs.hint(id);
    if decoded <= INLINE_DECODED {
        return parse_upload_with(bytes, hint.as_ref());
    }
    blocking(move || parse_upload_with(bytes, hint.as_ref())).await?
}

/// What a small body decodes to, measured here; `None` when it must be measured off the task
/// (not small, or it decodes to more than a small one may while `limit` allows more).
fn inline_size(bytes: &[u8], limit: u64) -> Option<Result<u64, RelayError>> {
    if bytes.len() > INLINE_BYTES {
        return None;
    }
    match decoded_size(bytes, limit.min(INLINE_DECODED)) {
        Err(RelayError::DecodedTooLarge { .. }) if limit > INLINE_DECODED => None,
        answer => Some(answer),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RelayError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RelayError::Internal(format!("validation task failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    #[test]
    fn a_keystroke_is_measured_here() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "k", "v").unwrap();
        let change = doc.save_after(&[]);
        let size = inline_size(&change, 16 << 20).unwrap().unwrap();
        assert_eq!(size, change.len() as u64);
    }

    #[test]
    fn large_bodies_and_small_ones_that_inflate_are_measured_off_the_task() {
        assert!(inline_size(&vec![0u8; INLINE_BYTES + 1], 16 << 20).is_none());
        let save = crate::upload::bomb(1 << 20);
        assert!(save.len() <= INLINE_BYTES, "{} bytes", save.len());
        assert!(inline_size(&save, 16 << 20).is_none());
    }

    #[test]
    fn a_limit_below_the_inline_bound_is_final_here() {
        let save = crate::upload::bomb(1 << 20);
        assert!(matches!(
            inline_size(&save, 1024),
            Some(Err(RelayError::DecodedTooLarge { limit: 1024 }))
        ));
        // Garbage is an error at once too (the strict load would refuse it anyway).
        assert!(matches!(
            inline_size(b"not automerge", 16 << 20),
            Some(Err(_))
        ));
    }
}
