//! A document's changes, newest first, a page at a time (`GET /_/docs/{id}/history`). Pure:
//! given the document and the page's bounds.

use automerge::{Automerge, ChangeHash};
use serde_json::{json, Value as Json};

use super::json::iso8601;

/// One page of history and the `before` of the next page (`None` on the last).
pub struct HistoryPage {
    pub changes: Vec<Json>,
    pub next: Option<ChangeHash>,
}

/// Up to `limit` changes, newest first (reverse causal order), starting after `before`
/// (exclusive); `None` when `before` is not a change of the document.
pub(super) fn history(
    doc: &Automerge,
    limit: usize,
    before: Option<&ChangeHash>,
) -> Option<HistoryPage> {
    let mut metas = doc.get_changes_meta(&[]);
    metas.reverse();
    let start = match before {
        None => 0,
        Some(h) => metas.iter().position(|m| m.hash == *h)? + 1,
    };
    let page: Vec<_> = metas.iter().skip(start).take(limit).collect();
    let more = start + page.len() < metas.len();
    let next = if more {
        page.last().map(|m| m.hash)
    } else {
        None
    };
    let changes = page
        .iter()
        .map(|m| {
            json!({
                "hash": m.hash.to_string(),
                "actor": m.actor.to_hex_string(),
                "seq": m.seq,
                // Change times are seconds since the epoch (Automerge's convention).
                "time": iso8601(m.timestamp.saturating_mul(1000)),
                "timestamp": m.timestamp,
                "message": m.message.as_deref(),
                "deps": m.deps.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
                "ops": (m.max_op + 1).saturating_sub(m.start_op),
            })
        })
        .collect();
    Some(HistoryPage { changes, next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::{CommitOptions, Transactable};
    use automerge::{AutoCommit, ROOT};

    #[test]
    fn newest_first_in_pages_that_cover_everything_once() {
        let mut doc = AutoCommit::new();
        for i in 0..5_i64 {
            doc.put(ROOT, "n", i).unwrap();
            doc.put(ROOT, "m", i).unwrap();
            doc.commit_with(
                CommitOptions::default()
                    .with_message(format!("edit {i}"))
                    .with_time(1_700_000_000 + i),
            );
        }
        let doc = doc.document().clone();
        let first = history(&doc, 2, None).unwrap();
        assert_eq!(first.changes.len(), 2);
        assert_eq!(first.changes[0]["message"], "edit 4", "newest first");
        assert_eq!(first.changes[0]["ops"], 2);
        assert_eq!(first.changes[0]["seq"], 5);
        assert_eq!(first.changes[0]["time"], "2023-11-14T22:13:24.000Z");
        let mut seen: Vec<Json> = first.changes.clone();
        let mut next = first.next;
        while let Some(before) = next {
            let page = history(&doc, 2, Some(&before)).unwrap();
            seen.extend(page.changes);
            next = page.next;
        }
        let messages: Vec<&str> = seen
            .iter()
            .map(|c| c["message"].as_str().unwrap())
            .collect();
        assert_eq!(messages, ["edit 4", "edit 3", "edit 2", "edit 1", "edit 0"]);
        assert_eq!(seen[4]["deps"], json!([]));
        assert_eq!(seen[3]["deps"], json!([seen[4]["hash"]]));
        let unknown = ChangeHash([7; 32]);
        assert!(history(&doc, 2, Some(&unknown)).is_none());
    }
}
