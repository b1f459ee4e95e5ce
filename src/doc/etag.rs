//! ETags and head lists: the document's version as clients see it.

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use crate::error::RelayError;

/// Strong ETag derived from the heads (order-independent).
pub fn etag_for(heads: &[ChangeHash]) -> String {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for head in sorted {
        h.update(head.0);
    }
    format!("\"{}\"", &hex::encode(h.finalize())[..32])
}

/// Parses a comma-separated list of hex change hashes (`?since=`).
pub fn parse_heads(raw: &str) -> Result<Vec<ChangeHash>, RelayError> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ChangeHash>()
                .map_err(|_| RelayError::BadSince(format!("{s:?} is not a hex change hash")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_ignores_head_order_and_is_quoted() {
        let a = ChangeHash([1; 32]);
        let b = ChangeHash([2; 32]);
        assert_eq!(etag_for(&[a, b]), etag_for(&[b, a]));
        assert_ne!(etag_for(&[a]), etag_for(&[b]));
        assert!(etag_for(&[a]).starts_with('"') && etag_for(&[a]).ends_with('"'));
    }

    #[test]
    fn since_parsing() {
        let h = hex::encode([7u8; 32]);
        assert_eq!(parse_heads(&format!("{h},{h}")).unwrap().len(), 2);
        assert!(parse_heads("").unwrap().is_empty());
        assert!(matches!(parse_heads("zz"), Err(RelayError::BadSince(_))));
    }
}
