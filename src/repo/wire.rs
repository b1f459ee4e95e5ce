//! The automerge-repo wire format (protocol "1"): one CBOR map per binary WebSocket frame.
//!
//! Decoding is tolerant of what the JS encoder (cbor-x) writes: 2-byte map headers for every
//! map, `undefined` for absent optional fields, float64 for large integers, keys in any order,
//! unknown keys, byte strings optionally tagged 64, and `metadata` as an alias of
//! `peerMetadata`. Encoding writes byte fields as CBOR byte strings (never arrays).

use ciborium::Value;

/// A peer's metadata as sent in `join`/`peer`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PeerMetadata {
    pub storage_id: Option<String>,
    pub is_ephemeral: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum RepoMessage {
    Join {
        sender_id: String,
        peer_metadata: Option<PeerMetadata>,
        /// `None` when the field is absent (the JS server then assumes "1").
        supported_protocol_versions: Option<Vec<String>>,
    },
    Peer {
        sender_id: String,
        target_id: String,
        peer_metadata: Option<PeerMetadata>,
        selected_protocol_version: String,
    },
    Error {
        sender_id: Option<String>,
        target_id: Option<String>,
        message: String,
    },
    Sync {
        sender_id: String,
        target_id: String,
        document_id: String,
        data: Vec<u8>,
    },
    Request {
        sender_id: String,
        target_id: String,
        document_id: String,
        data: Vec<u8>,
    },
    DocUnavailable {
        sender_id: String,
        target_id: String,
        document_id: String,
    },
    Ephemeral {
        sender_id: String,
        target_id: String,
        document_id: String,
        session_id: String,
        count: u64,
        data: Vec<u8>,
    },
    /// Accepted and ignored: `remote-subscription-change`, `remote-heads-changed`, `leave`.
    Ignored {
        kind: String,
        sender_id: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("frame is not CBOR: {0}")]
    NotCbor(String),
    #[error("frame is not a CBOR map")]
    NotMap,
    #[error("missing or invalid field {0:?}")]
    Field(&'static str),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
}

struct Fields(Vec<(Value, Value)>);

impl Fields {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| k.as_text() == Some(key))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    fn text(&self, key: &'static str) -> Result<String, WireError> {
        self.opt_text(key)?.ok_or(WireError::Field(key))
    }

    fn opt_text(&self, key: &'static str) -> Result<Option<String>, WireError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Text(s)) => Ok(Some(s.clone())),
            Some(_) => Err(WireError::Field(key)),
        }
    }

    fn bytes(&self, key: &'static str) -> Result<Vec<u8>, WireError> {
        match self.get(key) {
            Some(Value::Bytes(b)) => Ok(b.clone()),
            Some(Value::Tag(64, inner)) => match inner.as_ref() {
                Value::Bytes(b) => Ok(b.clone()),
                _ => Err(WireError::Field(key)),
            },
            _ => Err(WireError::Field(key)),
        }
    }

    fn count(&self, key: &'static str) -> Result<u64, WireError> {
        match self.get(key) {
            Some(Value::Integer(i)) => u64::try_from(*i).map_err(|_| WireError::Field(key)),
            Some(Value::Float(f)) if *f >= 0.0 && f.fract() == 0.0 && *f < 1.8e19 => Ok(*f as u64),
            _ => Err(WireError::Field(key)),
        }
    }

    fn metadata(&self) -> Result<Option<PeerMetadata>, WireError> {
        let Some(v) = self.get("peerMetadata").or_else(|| self.get("metadata")) else {
            return Ok(None);
        };
        let Value::Map(m) = v else {
            return Err(WireError::Field("peerMetadata"));
        };
        let m = Fields(m.clone());
        Ok(Some(PeerMetadata {
            storage_id: m.opt_text("storageId")?,
            is_ephemeral: matches!(m.get("isEphemeral"), Some(Value::Bool(true))),
        }))
    }

    fn versions(&self) -> Result<Option<Vec<String>>, WireError> {
        match self.get("supportedProtocolVersions") {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(
                items
                    .iter()
                    .filter_map(|v| v.as_text().map(str::to_owned))
                    .collect(),
            )),
            Some(_) => Err(WireError::Field("supportedProtocolVersions")),
        }
    }
}

impl RepoMessage {
    /// Decodes one frame.
    pub fn decode(frame: &[u8]) -> Result<Self, WireError> {
        let value: Value =
            ciborium::de::from_reader(frame).map_err(|e| WireError::NotCbor(e.to_string()))?;
        let Value::Map(map) = value else {
            return Err(WireError::NotMap);
        };
        let f = Fields(map);
        let kind = f.text("type")?;
        Ok(match kind.as_str() {
            "join" => RepoMessage::Join {
                sender_id: f.text("senderId")?,
                peer_metadata: f.metadata()?,
                supported_protocol_versions: f.versions()?,
            },
            "peer" => RepoMessage::Peer {
                sender_id: f.text("senderId")?,
                target_id: f.text("targetId")?,
                peer_metadata: f.metadata()?,
                selected_protocol_version: f.text("selectedProtocolVersion")?,
            },
            "error" => RepoMessage::Error {
                sender_id: f.opt_text("senderId")?,
                target_id: f.opt_text("targetId")?,
                message: f.opt_text("message")?.unwrap_or_default(),
            },
            "sync" | "request" => {
                let (sender_id, target_id) = (f.text("senderId")?, f.text("targetId")?);
                let (document_id, data) = (f.text("documentId")?, f.bytes("data")?);
                if kind == "sync" {
                    RepoMessage::Sync {
                        sender_id,
                        target_id,
                        document_id,
                        data,
                    }
                } else {
                    RepoMessage::Request {
                        sender_id,
                        target_id,
                        document_id,
                        data,
                    }
                }
            }
            "doc-unavailable" => RepoMessage::DocUnavailable {
                sender_id: f.text("senderId")?,
                target_id: f.text("targetId")?,
                document_id: f.text("documentId")?,
            },
            "ephemeral" => RepoMessage::Ephemeral {
                sender_id: f.text("senderId")?,
                target_id: f.text("targetId")?,
                document_id: f.text("documentId")?,
                session_id: f.text("sessionId")?,
                count: f.count("count")?,
                data: f.bytes("data")?,
            },
            "remote-subscription-change" | "remote-heads-changed" | "leave" => {
                RepoMessage::Ignored {
                    sender_id: f.opt_text("senderId")?,
                    kind,
                }
            }
            _ => return Err(WireError::UnknownType(kind)),
        })
    }

    /// Encodes one frame.
    pub fn encode(&self) -> Vec<u8> {
        let t = |s: &str| Value::Text(s.to_owned());
        let mut m: Vec<(Value, Value)> = Vec::new();
        let mut put = |k: &str, v: Value| m.push((t(k), v));
        match self {
            RepoMessage::Join {
                sender_id,
                peer_metadata,
                supported_protocol_versions,
            } => {
                put("type", t("join"));
                put("senderId", t(sender_id));
                if let Some(md) = peer_metadata {
                    put("peerMetadata", metadata_value(md));
                }
                if let Some(v) = supported_protocol_versions {
                    put(
                        "supportedProtocolVersions",
                        Value::Array(v.iter().map(|s| t(s)).collect()),
                    );
                }
            }
            RepoMessage::Peer {
                sender_id,
                target_id,
                peer_metadata,
                selected_protocol_version,
            } => {
                put("type", t("peer"));
                put("senderId", t(sender_id));
                put("targetId", t(target_id));
                if let Some(md) = peer_metadata {
                    put("peerMetadata", metadata_value(md));
                }
                put("selectedProtocolVersion", t(selected_protocol_version));
            }
            RepoMessage::Error {
                sender_id,
                target_id,
                message,
            } => {
                put("type", t("error"));
                if let Some(s) = sender_id {
                    put("senderId", t(s));
                }
                if let Some(s) = target_id {
                    put("targetId", t(s));
                }
                put("message", t(message));
            }
            RepoMessage::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            }
            | RepoMessage::Request {
                sender_id,
                target_id,
                document_id,
                data,
            } => {
                let kind = if matches!(self, RepoMessage::Sync { .. }) {
                    "sync"
                } else {
                    "request"
                };
                put("type", t(kind));
                put("senderId", t(sender_id));
                put("targetId", t(target_id));
                put("documentId", t(document_id));
                put("data", Value::Bytes(data.clone()));
            }
            RepoMessage::DocUnavailable {
                sender_id,
                target_id,
                document_id,
            } => {
                put("type", t("doc-unavailable"));
                put("senderId", t(sender_id));
                put("targetId", t(target_id));
                put("documentId", t(document_id));
            }
            RepoMessage::Ephemeral {
                sender_id,
                target_id,
                document_id,
                session_id,
                count,
                data,
            } => {
                put("type", t("ephemeral"));
                put("senderId", t(sender_id));
                put("targetId", t(target_id));
                put("documentId", t(document_id));
                put("sessionId", t(session_id));
                put("count", Value::Integer((*count).into()));
                put("data", Value::Bytes(data.clone()));
            }
            RepoMessage::Ignored { kind, sender_id } => {
                put("type", t(kind));
                if let Some(s) = sender_id {
                    put("senderId", t(s));
                }
            }
        }
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = ciborium::ser::into_writer(&Value::Map(m), &mut out);
        out
    }

    /// The message's `type` string.
    pub fn kind(&self) -> &str {
        match self {
            RepoMessage::Join { .. } => "join",
            RepoMessage::Peer { .. } => "peer",
            RepoMessage::Error { .. } => "error",
            RepoMessage::Sync { .. } => "sync",
            RepoMessage::Request { .. } => "request",
            RepoMessage::DocUnavailable { .. } => "doc-unavailable",
            RepoMessage::Ephemeral { .. } => "ephemeral",
            RepoMessage::Ignored { kind, .. } => kind,
        }
    }
}

fn metadata_value(md: &PeerMetadata) -> Value {
    let mut m = Vec::new();
    if let Some(s) = &md.storage_id {
        m.push((Value::Text("storageId".into()), Value::Text(s.clone())));
    }
    m.push((
        Value::Text("isEphemeral".into()),
        Value::Bool(md.is_ephemeral),
    ));
    Value::Map(m)
}

#[cfg(test)]
mod tests {
    //! Round trips against frames captured from the real JS client and server
    //! (tests/fixtures/repo-protocol, see its README).
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/repo-protocol")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn all_fixtures() -> Vec<(String, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-protocol");
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cbor"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_fixture_decodes_and_round_trips() {
        let fixtures = all_fixtures();
        assert!(fixtures.len() >= 25, "fixtures missing");
        for (name, bytes) in fixtures {
            let msg = RepoMessage::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            // The file name says which type it holds: captured-<type>-N / synthetic-<type>.
            let kind = msg.kind().to_owned();
            assert!(name.contains(&kind), "{name} decoded as {kind}");
            let again = RepoMessage::decode(&msg.encode()).unwrap();
            assert_eq!(again, msg, "{name} does not round-trip");
        }
    }

    #[test]
    fn join_from_a_client_without_storage() {
        let msg = RepoMessage::decode(&fixture("captured-join-1.cbor")).unwrap();
        let RepoMessage::Join {
            peer_metadata,
            supported_protocol_versions,
            ..
        } = msg
        else {
            panic!("not a join: {msg:?}")
        };
        assert_eq!(supported_protocol_versions, Some(vec!["1".to_string()]));
        let md = peer_metadata.expect("metadata");
        assert_eq!(md.storage_id, None, "undefined storageId is absent");
        assert!(md.is_ephemeral);
    }

    #[test]
    fn join_with_metadata_alias() {
        let msg = RepoMessage::decode(&fixture("synthetic-join-metadata.cbor")).unwrap();
        assert!(matches!(
            msg,
            RepoMessage::Join {
                peer_metadata: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn sync_data_is_a_real_sync_message() {
        for name in [
            "captured-sync-1.cbor",
            "captured-sync-3.cbor",
            "captured-request-1.cbor",
        ] {
            let (RepoMessage::Sync {
                data, document_id, ..
            }
            | RepoMessage::Request {
                data, document_id, ..
            }) = RepoMessage::decode(&fixture(name)).unwrap()
            else {
                panic!("{name}")
            };
            assert!(crate::id::DocId::parse(&document_id).is_ok());
            automerge::sync::Message::decode(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn byte_fields_encode_as_byte_strings() {
        let msg = RepoMessage::Sync {
            sender_id: "s".into(),
            target_id: "t".into(),
            document_id: "d".into(),
            data: vec![1, 2, 3],
        };
        let bytes = msg.encode();
        // 0x43 = byte string of length 3, followed by the bytes.
        assert!(bytes.windows(4).any(|w| w == [0x43, 1, 2, 3]));
    }

    #[test]
    fn float_counts_and_bad_frames() {
        let mut m = vec![
            (Value::Text("type".into()), Value::Text("ephemeral".into())),
            (Value::Text("senderId".into()), Value::Text("a".into())),
            (Value::Text("targetId".into()), Value::Text("b".into())),
            (Value::Text("documentId".into()), Value::Text("d".into())),
            (Value::Text("sessionId".into()), Value::Text("s".into())),
            (Value::Text("count".into()), Value::Float(5.0)),
            (Value::Text("data".into()), Value::Bytes(vec![1])),
        ];
        let mut buf = Vec::new();
        ciborium::ser::into_writer(&Value::Map(m.clone()), &mut buf).unwrap();
        assert!(matches!(
            RepoMessage::decode(&buf),
            Ok(RepoMessage::Ephemeral { count: 5, .. })
        ));
        m[0].1 = Value::Text("bogus".into());
        buf.clear();
        ciborium::ser::into_writer(&Value::Map(m), &mut buf).unwrap();
        assert!(matches!(
            RepoMessage::decode(&buf),
            Err(WireError::UnknownType(_))
        ));
        assert!(RepoMessage::decode(b"\xff\x00garbage").is_err());
        assert!(matches!(
            RepoMessage::decode(&[0x01]),
            Err(WireError::NotMap)
        ));
    }
}
