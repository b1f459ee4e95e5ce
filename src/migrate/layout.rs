//! The automerge-repo storage layout, both ways: where `NodeFSStorageAdapter` puts a storage
//! key, and which key a file under its directory holds. Pure (no I/O), so the mapping is tested
//! here and import and export cannot disagree about it.
//!
//! What the npm packages (2.5.6) do, read from their sources:
//!
//! - `@automerge/automerge-repo-storage-nodefs`, `dist/index.js`: a key `[first, ...rest]` is
//!   the file `DIR/<first[..2]>/<first[2..]>/<rest joined by />` (`getFilePath`); the first
//!   two characters of a document id are a directory level of their own. `loadRange(prefix)`
//!   walks the prefix's directory and turns each file back into a key by removing the
//!   separator after the first two characters of its path relative to `DIR`.
//! - `@automerge/automerge-repo`, `dist/storage/StorageSubsystem.js` and `keyHash.js`: a
//!   document is what `loadRange([id, "snapshot"])` and then `loadRange([id, "incremental"])`
//!   return, concatenated and loaded with `A.loadIncremental`. A snapshot is `A.save(doc)`
//!   under `[id, "snapshot", headsHash(heads)]`: the SHA-256 (hex) of the document's hex heads
//!   concatenated ([`heads_hash`]); an incremental is `A.saveSince(doc, heads)` under
//!   `[id, "incremental", keyHash(bytes)]`, the SHA-256 of its bytes. Saving a snapshot deletes
//!   the chunks it was made from. `[id, "sync-state", storageId]` holds what a peer with that
//!   storage id has (sync state, not document data), and `["storage-adapter-id"]` the repo's
//!   own storage id: a file `st/orage-adapter-id`.
//! - `dist/AutomergeUrl.js`: a Repo only finds ids that decode as bs58check
//!   (`isValidDocumentId`, [`is_repo_id`]).

use std::path::{Path, PathBuf};

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

/// The document chunks automerge-repo stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Snapshot,
    Incremental,
}

impl Kind {
    /// The key's second element (and the directory).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Snapshot => "snapshot",
            Kind::Incremental => "incremental",
        }
    }
}

/// What a file under an automerge-repo storage directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A snapshot or incremental chunk of document `doc`, stored under `name`.
    Chunk {
        doc: String,
        kind: Kind,
        name: String,
    },
    /// A peer's sync state for `doc` (not document data).
    SyncState { doc: String },
    /// Anything else: another storage key (`storage-adapter-id`, a plug-in's namespace), or a
    /// file the adapter never writes. Says why it is no document chunk.
    Other(String),
}

/// The storage key a file at `rel` (its path components under the directory) holds, as
/// `loadRange` computes it: the first two components joined. `None` when the path cannot come
/// from `getFilePath` (the first directory is not two characters, or there is no second level).
pub fn key_of(rel: &[&str]) -> Option<Vec<String>> {
    let (first, rest) = rel.split_first()?;
    let (second, rest) = rest.split_first()?;
    if first.chars().count() != 2 {
        return None;
    }
    let mut key = vec![format!("{first}{second}")];
    key.extend(rest.iter().map(|s| s.to_string()));
    Some(key)
}

/// What the file at `rel` (path components under the directory) is.
pub fn classify(rel: &[&str]) -> Entry {
    let Some(key) = key_of(rel) else {
        return Entry::Other("not in the automerge-repo layout".into());
    };
    match key.as_slice() {
        [doc, kind, name] if kind == "snapshot" || kind == "incremental" => Entry::Chunk {
            doc: doc.clone(),
            kind: if kind == "snapshot" {
                Kind::Snapshot
            } else {
                Kind::Incremental
            },
            name: name.clone(),
        },
        [doc, kind, _] if kind == "sync-state" => Entry::SyncState { doc: doc.clone() },
        _ => Entry::Other(format!("not a document chunk (storage key {key:?})")),
    }
}

/// Why document `id` cannot be laid out (`getFilePath` would put it somewhere `loadRange`
/// does not read back, or outside its directory), or `None`.
pub fn layout_problem(id: &str) -> Option<&'static str> {
    let rest: String = id.chars().skip(2).collect();
    if rest.is_empty() {
        Some("shorter than 3 characters: the layout's first directory is the id's first two")
    } else if rest == "." || rest == ".." {
        Some("its characters after the first two are a directory name (. or ..)")
    } else {
        None
    }
}

/// The directory of document `id`'s chunks of `kind`: `DIR/<id[..2]>/<id[2..]>/<kind>`. Only
/// for ids without a [`layout_problem`].
pub fn chunk_dir(root: &Path, id: &str, kind: Kind) -> PathBuf {
    let split = id.char_indices().nth(2).map_or(id.len(), |(i, _)| i);
    let (first, rest) = id.split_at(split);
    root.join(first).join(rest).join(kind.as_str())
}

/// The name automerge-repo gives a snapshot with these heads (`headsHash`): hex SHA-256 of
/// the hex heads, sorted as `getHeads` returns them, concatenated.
pub fn heads_hash(heads: &[ChangeHash]) -> String {
    let mut hex: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
    hex.sort();
    hex::encode(Sha256::digest(hex.concat().as_bytes()))
}

/// Whether a Repo can `find` this id: it decodes as bs58check (`documentIdToBinary`).
pub fn is_repo_id(id: &str) -> bool {
    bs58::decode(id).with_check(None).into_vec().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_two_characters_are_a_directory_level() {
        let dir = chunk_dir(
            Path::new("/d"),
            "3jBnkqtmACWf3kw8Kh3pSCFE3zVc",
            Kind::Snapshot,
        );
        assert_eq!(dir, Path::new("/d/3j/BnkqtmACWf3kw8Kh3pSCFE3zVc/snapshot"));
        let dir = chunk_dir(Path::new("d"), "abc", Kind::Incremental);
        assert_eq!(dir, Path::new("d/ab/c/incremental"));
    }

    #[test]
    fn files_map_back_to_their_keys() {
        let chunk = classify(&["3j", "BnkqtmACWf3kw8Kh3pSCFE3zVc", "incremental", "ab12"]);
        assert_eq!(
            chunk,
            Entry::Chunk {
                doc: "3jBnkqtmACWf3kw8Kh3pSCFE3zVc".into(),
                kind: Kind::Incremental,
                name: "ab12".into()
            }
        );
        let snap = classify(&["ab", "c", "snapshot", "ff"]);
        assert!(matches!(snap, Entry::Chunk { kind: Kind::Snapshot, ref doc, .. } if doc == "abc"));
        assert_eq!(
            classify(&["ab", "cd", "sync-state", "storage-id"]),
            Entry::SyncState { doc: "abcd".into() }
        );
        assert_eq!(
            key_of(&["st", "orage-adapter-id"]),
            Some(vec!["storage-adapter-id".to_string()])
        );
        for other in [
            &["st", "orage-adapter-id"][..],
            &["ab", "cd", "snapshot"],
            &["ab", "cd", "snapshot", "x", "y"],
            &["ab", "cd", "heads", "x"],
            &["abc", "d", "snapshot", "x"],
            &[".automerge-relay-export.tmp"],
            &["ab"],
        ] {
            assert!(matches!(classify(other), Entry::Other(_)), "{other:?}");
        }
    }

    #[test]
    fn ids_the_layout_cannot_hold() {
        assert!(layout_problem("ab").is_some());
        assert!(layout_problem("a").is_some());
        assert!(
            layout_problem("ab..").is_some(),
            "would escape its directory"
        );
        assert!(layout_problem("ab.").is_some());
        assert_eq!(layout_problem("abc"), None);
        assert_eq!(layout_problem("ab.x"), None);
    }

    #[test]
    fn snapshot_names_are_automerge_repos_heads_hash() {
        // From a directory NodeFSStorageAdapter wrote under automerge-repo 2.5.6: the
        // document WfERmo4nb7cGBnyoWZBkSKHJ6WH with this head had its snapshot under this name.
        let head: ChangeHash = "56e34f1ae27b479e45ee386beffe1b756a8bbcaec403ea9325e903fa9221985a"
            .parse()
            .unwrap();
        assert_eq!(
            heads_hash(&[head]),
            "a3ef79d20e3d877111876cf74cee7cdfba49fb583d6ac8ef5d2de90eadf07e6c"
        );
        assert_eq!(
            heads_hash(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let other: ChangeHash = "0b".repeat(32).parse().unwrap();
        assert_eq!(heads_hash(&[head, other]), heads_hash(&[other, head]));
        let joined = format!("{other}{head}");
        assert_eq!(
            heads_hash(&[head, other]),
            hex::encode(Sha256::digest(joined.as_bytes()))
        );
    }

    #[test]
    fn repo_ids_are_bs58check() {
        assert!(is_repo_id("3jBnkqtmACWf3kw8Kh3pSCFE3zVc"));
        assert!(!is_repo_id("3jBnkqtmACWf3kw8Kh3pSCFE3zVd"), "checksum");
        assert!(!is_repo_id("todo-list"));
    }
}
