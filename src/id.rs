//! Document ids: the one place that decides which names are documents.
//!
//! An id is 1–128 characters of `A-Z a-z 0-9 . _ ~ -`, not starting with `_` or `.`
//! (so `/_/...` stays the server's namespace and `.`/`..` can never name a document).
//! automerge-repo's bs58check ids fall inside this alphabet, so one id reaches the same
//! document over every interface.

use std::fmt;

use crate::error::RelayError;

/// Longest accepted id, in characters.
pub const MAX_ID_LEN: usize = 128;

/// A validated document id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocId(String);

impl DocId {
    /// Validates `raw` as a document id.
    pub fn parse(raw: &str) -> Result<Self, RelayError> {
        let bad = |why: &str| RelayError::BadId(format!("{why} (got {:?})", truncate(raw)));
        if raw.is_empty() {
            return Err(bad("document id is empty"));
        }
        if raw.len() > MAX_ID_LEN {
            return Err(bad("document id is longer than 128 characters"));
        }
        if raw.starts_with('_') || raw.starts_with('.') {
            return Err(bad("document id must not start with '_' or '.'"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
        {
            return Err(bad("document id may only contain A-Z a-z 0-9 . _ ~ -"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(raw: &str) -> String {
    raw.chars().take(40).collect()
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_repo_ids_and_plain_names() {
        for ok in [
            "3jBnkqtmACWf3kw8Kh3pSCFE3zVc",
            "a",
            "todo-list_1.v2~x",
            &"x".repeat(128),
        ] {
            assert!(DocId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            ".",
            "..",
            "_x",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "a%2F",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(DocId::parse(bad), Err(RelayError::BadId(_))),
                "{bad}"
            );
        }
    }
}
