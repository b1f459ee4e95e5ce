//! What nodes say to each other over Redis, as bytes. Sans-IO: encoded and decoded here,
//! sent and received by `redis.rs`.
//!
//! One channel per document, `<prefix>doc:<id>`. A message is
//! `[version][kind][node id: 16 bytes][payload]`; the node id lets a node skip its own
//! messages (Redis delivers them back to a subscribed publisher). Kinds:
//! - `changes`: the bytes of a chunk the sender made durable (its key is their SHA-256, so
//!   the receiver knows which stored chunk it has seen);
//! - `notice`: the sender stored changes too large to send: read the store;
//! - `deleted`: the sender deleted the document from the store.

use bytes::Bytes;

use crate::id::DocId;

const VERSION: u8 = 1;
const HEADER: usize = 2 + 16;

pub type NodeId = [u8; 16];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Changes(Bytes),
    Notice,
    Deleted,
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Changes(_) => 0,
            Message::Notice => 1,
            Message::Deleted => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("message version {0} is not {VERSION} (another release of automerge-relay?)")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
}

pub fn encode(node: &NodeId, msg: &Message) -> Vec<u8> {
    let payload: &[u8] = match msg {
        Message::Changes(bytes) => bytes,
        Message::Notice | Message::Deleted => &[],
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(VERSION);
    out.push(msg.kind());
    out.extend_from_slice(node);
    out.extend_from_slice(payload);
    out
}

pub fn decode(bytes: &[u8]) -> Result<(NodeId, Message), WireError> {
    if bytes.len() < HEADER {
        return Err(WireError::Short(bytes.len()));
    }
    if bytes[0] != VERSION {
        return Err(WireError::Version(bytes[0]));
    }
    let mut node = [0u8; 16];
    node.copy_from_slice(&bytes[2..HEADER]);
    let msg = match bytes[1] {
        0 => Message::Changes(Bytes::copy_from_slice(&bytes[HEADER..])),
        1 => Message::Notice,
        2 => Message::Deleted,
        other => return Err(WireError::Kind(other)),
    };
    Ok((node, msg))
}

/// The document's channel.
pub fn channel(prefix: &str, id: &DocId) -> String {
    format!("{prefix}doc:{}", id.as_str())
}

/// The document a channel of this prefix belongs to.
pub fn doc_of(prefix: &str, channel: &str) -> Option<DocId> {
    let id = channel.strip_prefix(prefix)?.strip_prefix("doc:")?;
    DocId::parse(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let node = [7u8; 16];
        for msg in [
            Message::Changes(Bytes::from_static(b"\x85\x6f\x4a\x83chunk")),
            Message::Changes(Bytes::new()),
            Message::Notice,
            Message::Deleted,
        ] {
            assert_eq!(decode(&encode(&node, &msg)), Ok((node, msg)));
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        assert_eq!(decode(b"\x01\x00short"), Err(WireError::Short(7)));
        let mut other = encode(&[0; 16], &Message::Notice);
        other[0] = 9;
        assert_eq!(decode(&other), Err(WireError::Version(9)));
        let mut kind = encode(&[0; 16], &Message::Notice);
        kind[1] = 5;
        assert_eq!(decode(&kind), Err(WireError::Kind(5)));
    }

    #[test]
    fn channels_name_their_document() {
        let id = DocId::parse("3jBnkqtmACWf3kw8Kh3pSCFE3zVc").unwrap();
        let ch = channel("relay:", &id);
        assert_eq!(ch, "relay:doc:3jBnkqtmACWf3kw8Kh3pSCFE3zVc");
        assert_eq!(doc_of("relay:", &ch), Some(id));
        assert_eq!(doc_of("other:", &ch), None);
        assert_eq!(doc_of("relay:", "relay:doc:_bad"), None);
    }
}
