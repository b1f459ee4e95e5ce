//! Walking an automerge-repo storage directory: every file classified (`layout`), the document
//! chunks grouped per document, snapshots first (the order automerge-repo loads them in). Only
//! paths are kept; the files are read one document at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::layout::{classify, Entry, Kind};
use super::summary::Skipped;

/// One chunk file of a document.
#[derive(Debug, Clone)]
pub struct ChunkFile {
    pub path: PathBuf,
    /// The path under the directory, for the summary.
    pub rel: String,
    pub kind: Kind,
}

#[derive(Debug, Default)]
pub struct Scan {
    /// Document id (as the directory names it) → its chunk files.
    pub docs: BTreeMap<String, Vec<ChunkFile>>,
    pub sync_states: u64,
    /// Files that are no document chunk, and directories that could not be read.
    pub others: Vec<Skipped>,
}

/// Walks `root`. `Err` only when `root` itself cannot be read; anything below it that cannot
/// be read is listed in `others`.
pub fn scan(root: &Path) -> Result<Scan, String> {
    let mut out = Scan::default();
    let mut dirs = vec![PathBuf::new()];
    let mut first = true;
    while let Some(rel_dir) = dirs.pop() {
        let dir = root.join(&rel_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if first => return Err(format!("cannot read {}: {e}", root.display())),
            Err(e) => {
                out.others
                    .push(Skipped::new(show(&rel_dir), format!("cannot read: {e}")));
                continue;
            }
        };
        first = false;
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => names.push(entry),
                Err(e) => out
                    .others
                    .push(Skipped::new(show(&rel_dir), format!("cannot list: {e}"))),
            }
        }
        names.sort_by_key(|e| e.file_name());
        for entry in names {
            let rel = rel_dir.join(entry.file_name());
            // Like the adapter's walk: directories are entered (symlinks to them are not).
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(rel);
                continue;
            }
            let parts: Option<Vec<&str>> = rel.iter().map(|p| p.to_str()).collect();
            let Some(parts) = parts else {
                out.others.push(Skipped::new(
                    show(&rel),
                    "name is not UTF-8: no storage key",
                ));
                continue;
            };
            match classify(&parts) {
                Entry::Chunk { doc, kind, .. } => {
                    out.docs.entry(doc).or_default().push(ChunkFile {
                        path: root.join(&rel),
                        rel: show(&rel),
                        kind,
                    })
                }
                Entry::SyncState { .. } => out.sync_states += 1,
                Entry::Other(why) => out.others.push(Skipped::new(show(&rel), why)),
            }
        }
    }
    for files in out.docs.values_mut() {
        files.sort_by(|a, b| (a.kind, &a.rel).cmp(&(b.kind, &b.rel)));
    }
    out.others.sort_by(|a, b| a.what.cmp(&b.what));
    Ok(out)
}

fn show(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_chunks_per_document_and_names_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rel: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        };
        put("ab/cdef/incremental/22");
        put("ab/cdef/snapshot/11");
        put("ab/cdef/incremental/01");
        put("ab/cdef/sync-state/peer");
        put("xy/z/snapshot/33");
        put("st/orage-adapter-id");
        put("README");
        let scan = scan(dir.path()).unwrap();
        let ids: Vec<&String> = scan.docs.keys().collect();
        assert_eq!(ids, ["abcdef", "xyz"]);
        let files: Vec<&str> = scan.docs["abcdef"].iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(
            files,
            [
                "ab/cdef/snapshot/11",
                "ab/cdef/incremental/01",
                "ab/cdef/incremental/22"
            ],
            "snapshots first"
        );
        assert_eq!(scan.sync_states, 1);
        let others: Vec<&str> = scan.others.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(others, ["README", "st/orage-adapter-id"]);
        assert!(scan.others[1].why.contains("storage-adapter-id"));
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(&dir.path().join("nope")).is_err());
    }
}
