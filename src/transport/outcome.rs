//! How a write is reported, in one place: the HTTP status of a PUT/POST and the JSON that both
//! the HTTP response and the per-document WebSocket ack carry.

use automerge::ChangeHash;
use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::doc::WriteOutcome;

/// Heads as the JSON array of hex hashes every transport sends.
pub fn heads_json(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

/// 202 when nothing of the upload could be applied yet (all of it waits for dependencies),
/// 201 when the write created the document, else 200.
pub fn write_status(outcome: &WriteOutcome) -> StatusCode {
    if outcome.applied == 0 && outcome.pending > 0 && outcome.pending == outcome.total {
        StatusCode::ACCEPTED
    } else if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// `{"heads": [...], "applied": n}`, with `"pending": n` when changes wait for dependencies.
pub fn outcome_json(outcome: &WriteOutcome) -> Value {
    let mut body = json!({
        "heads": heads_json(&outcome.heads),
        "applied": outcome.applied,
    });
    if outcome.pending > 0 {
        body["pending"] = json!(outcome.pending);
    }
    body
}

/// The WebSocket ack of a durable upload: [`outcome_json`] with `"type": "ack"`.
pub fn ack_json(outcome: &WriteOutcome) -> Value {
    let mut ack = outcome_json(outcome);
    ack["type"] = json!("ack");
    ack
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(created: bool, applied: usize, pending: usize, total: usize) -> WriteOutcome {
        WriteOutcome {
            created,
            heads: Vec::new(),
            etag: "\"e\"".into(),
            applied,
            pending,
            total,
        }
    }

    #[test]
    fn status_follows_what_was_applied() {
        assert_eq!(write_status(&outcome(true, 2, 0, 2)), StatusCode::CREATED);
        assert_eq!(write_status(&outcome(false, 2, 0, 2)), StatusCode::OK);
        assert_eq!(
            write_status(&outcome(false, 0, 0, 2)),
            StatusCode::OK,
            "duplicates"
        );
        assert_eq!(write_status(&outcome(false, 0, 2, 2)), StatusCode::ACCEPTED);
        assert_eq!(write_status(&outcome(true, 1, 1, 2)), StatusCode::CREATED);
    }

    #[test]
    fn pending_is_reported_only_when_something_waits() {
        let done = outcome_json(&outcome(false, 2, 0, 2));
        assert_eq!(done, json!({"heads": [], "applied": 2}));
        let waiting = ack_json(&outcome(false, 1, 1, 2));
        assert_eq!(
            waiting,
            json!({"type": "ack", "heads": [], "applied": 1, "pending": 1})
        );
    }
}
