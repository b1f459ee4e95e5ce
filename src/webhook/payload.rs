//! The JSON body of a call, built once and sent as is on every attempt (the signature is over
//! these exact bytes):
//! `{"id":"<doc id>","heads":["<hex>",...],"changes":N,"time":"<RFC 3339 UTC>"}` or
//! `{"id":"<doc id>","deleted":true,"time":"..."}`. `time` is when the relay made the last
//! change of the call durable (or the delete), not when the call was sent, so retries carry the
//! same body.

use std::time::{SystemTime, UNIX_EPOCH};

use automerge::ChangeHash;
use serde::Serialize;

#[derive(Serialize)]
struct Changed<'a> {
    id: &'a str,
    heads: Vec<String>,
    changes: u64,
    time: String,
}

#[derive(Serialize)]
struct Deleted<'a> {
    id: &'a str,
    deleted: bool,
    time: String,
}

/// The body of a change call; heads sorted, so equal heads give equal bodies.
pub fn changed(
    id: &str,
    heads: &[ChangeHash],
    changes: u64,
    at: SystemTime,
) -> serde_json::Result<Vec<u8>> {
    let mut heads: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
    heads.sort();
    serde_json::to_vec(&Changed {
        id,
        heads,
        changes,
        time: rfc3339(at),
    })
}

/// The body of a delete call.
pub fn deleted(id: &str, at: SystemTime) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Deleted {
        id,
        deleted: true,
        time: rfc3339(at),
    })
}

/// `at` in UTC as RFC 3339 with milliseconds, e.g. `2023-11-14T22:13:20.000Z` (a time before
/// 1970 reads as the epoch), formatted as the JSON view formats timestamps.
pub fn rfc3339(at: SystemTime) -> String {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    crate::doc::iso8601(i64::try_from(millis).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_700_000_000, 42)), "2023-11-14T22:13:20.042Z");
        assert_eq!(rfc3339(at(1_709_251_199, 999)), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(at(4_102_444_800, 0)), "2100-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn bodies() {
        let heads = [ChangeHash([0xbb; 32]), ChangeHash([0xaa; 32])];
        let body = changed("doc-1", &heads, 3, at(1_700_000_000, 0)).expect("encodes");
        let aa = "aa".repeat(32);
        let bb = "bb".repeat(32);
        assert_eq!(
            String::from_utf8(body).expect("utf-8"),
            format!(
                r#"{{"id":"doc-1","heads":["{aa}","{bb}"],"changes":3,"time":"2023-11-14T22:13:20.000Z"}}"#
            )
        );
        let body = deleted("doc-1", at(0, 0)).expect("encodes");
        assert_eq!(
            body,
            br#"{"id":"doc-1","deleted":true,"time":"1970-01-01T00:00:00.000Z"}"#
        );
    }
}
