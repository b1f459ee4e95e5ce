//! A document as JSON, for people and tools that cannot read Automerge (`GET /{id}` with
//! `Accept: application/json`): maps → objects, lists → arrays, text → strings, counters →
//! numbers, timestamps → ISO 8601 strings in UTC with milliseconds (what `JSON.stringify` makes
//! of the `Date` that `Automerge.toJS` returns), bytes → standard base64. Where concurrent
//! writes conflict, the value Automerge picks as the winner is shown (as `toJS` does).

use automerge::{Automerge, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use base64::Engine;
use serde_json::{Map, Number, Value as Json};

/// The whole document.
pub(super) fn to_json(doc: &Automerge) -> Json {
    object(doc, &ROOT, ObjType::Map)
}

fn object(doc: &Automerge, obj: &ObjId, kind: ObjType) -> Json {
    match kind {
        ObjType::Map | ObjType::Table => {
            let mut map = Map::new();
            for key in doc.keys(obj) {
                if let Ok(Some((value, id))) = doc.get(obj, key.as_str()) {
                    map.insert(key, value_json(doc, value, &id));
                }
            }
            Json::Object(map)
        }
        ObjType::List => Json::Array(
            (0..doc.length(obj))
                .filter_map(|i| doc.get(obj, i).ok().flatten())
                .map(|(value, id)| value_json(doc, value, &id))
                .collect(),
        ),
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

fn value_json(doc: &Automerge, value: Value<'_>, id: &ObjId) -> Json {
    match value {
        Value::Object(kind) => object(doc, id, kind),
        Value::Scalar(s) => scalar(&s),
    }
}

fn scalar(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Null => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Timestamp(ms) => Json::String(iso8601(*ms)),
        ScalarValue::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        // A type from a newer Automerge: shown as its bytes, so nothing is silently dropped.
        ScalarValue::Unknown { bytes, .. } => {
            Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// Milliseconds since the epoch as `2024-01-31T12:00:00.000Z`.
pub fn iso8601(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::AutoCommit;

    #[test]
    fn every_type_maps_as_documented() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "title", "groceries").unwrap();
        doc.put(ROOT, "n", 3_i64).unwrap();
        doc.put(ROOT, "u", ScalarValue::Uint(7)).unwrap();
        doc.put(ROOT, "f", 1.5_f64).unwrap();
        doc.put(ROOT, "yes", true).unwrap();
        doc.put(ROOT, "nothing", ScalarValue::Null).unwrap();
        doc.put(ROOT, "count", ScalarValue::counter(5)).unwrap();
        doc.increment(ROOT, "count", 2).unwrap();
        doc.put(ROOT, "at", ScalarValue::Timestamp(1_700_000_000_123))
            .unwrap();
        doc.put(ROOT, "raw", ScalarValue::Bytes(vec![0, 1, 2, 255]))
            .unwrap();
        let list = doc.put_object(ROOT, "items", ObjType::List).unwrap();
        doc.insert(&list, 0, "milk").unwrap();
        let nested = doc.insert_object(&list, 1, ObjType::Map).unwrap();
        doc.put(&nested, "done", false).unwrap();
        let text = doc.put_object(ROOT, "notes", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, "hello").unwrap();
        let json = to_json(doc.document());
        assert_eq!(
            json,
            serde_json::json!({
                "title": "groceries", "n": 3, "u": 7, "f": 1.5, "yes": true, "nothing": null,
                "count": 7, "at": "2023-11-14T22:13:20.123Z", "raw": "AAEC/w==",
                "items": ["milk", {"done": false}], "notes": "hello"
            })
        );
    }

    #[test]
    fn timestamps_before_the_epoch_and_out_of_range() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(iso8601(i64::MAX), i64::MAX.to_string());
    }
}
