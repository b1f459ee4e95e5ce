//! The `X-Relay-Signature` of a call: `sha256=` and the hex HMAC-SHA256 of the exact body,
//! keyed with the bytes of `--webhook-secret-file`. The receiver recomputes it over the raw
//! body it got, so the JSON is signed as sent, never re-serialized.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shared key. Its `Debug` never shows it, so it cannot reach a log line.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// The file's bytes without one trailing `\n` or `\r\n` (as `--auth-jwt-secret-file`):
    /// `echo secret > file` signs with `secret`.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read the webhook secret file {}: {e}",
                path.display()
            )
        })?;
        Self::from_file_bytes(bytes).ok_or_else(|| {
            format!(
                "the webhook secret file {} is empty (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
                path.display(),
                path.display()
            )
        })
    }

    fn from_file_bytes(mut bytes: Vec<u8>) -> Option<Self> {
        if bytes.ends_with(b"\r\n") {
            bytes.truncate(bytes.len() - 2);
        } else if bytes.ends_with(b"\n") {
            bytes.truncate(bytes.len() - 1);
        }
        (!bytes.is_empty()).then_some(Self(bytes))
    }

    /// The header value for `body`: `sha256=<hex>`.
    pub fn signature(&self, body: &[u8]) -> String {
        // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4231_test_case_2() {
        let secret = Secret(b"Jefe".to_vec());
        assert_eq!(
            secret.signature(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn one_trailing_newline_is_dropped_and_an_empty_key_refused() {
        let key = |b: &[u8]| Secret::from_file_bytes(b.to_vec()).map(|s| s.0);
        assert_eq!(key(b"Jefe\n"), Some(b"Jefe".to_vec()));
        assert_eq!(key(b"Jefe\r\n"), Some(b"Jefe".to_vec()));
        assert_eq!(key(b"Jefe\n\n"), Some(b"Jefe\n".to_vec()));
        assert_eq!(key(b"\n"), None);
        assert_eq!(key(b""), None);
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let shown = format!("{:?}", Secret(b"hunter2".to_vec()));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
