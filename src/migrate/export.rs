//! `automerge-relay export DIR`: every document of the store into an automerge-repo storage
//! directory, as the one file automerge-repo itself would compact it to: a full save under
//! `<id[..2]>/<id[2..]>/snapshot/<headsHash>`. A Repo with `NodeFSStorageAdapter` on DIR
//! then finds every document with the relay's heads.
//!
//! Idempotent: the snapshot's name follows from its heads, so exporting an unchanged document
//! again finds the same file with the same bytes and writes nothing. Older chunk files of the
//! document (an earlier export, or automerge-repo's own files) are removed once the new
//! snapshot is durable, but only those it wholly contains; a file with changes the store lacks
//! is left in place and named.
//!
//! Ids a Repo cannot use (not bs58check) are skipped unless `--all-ids`; ids the layout
//! cannot hold (shorter than 3 characters, or `xx.`/`xx..`) always are.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::layout::{chunk_dir, is_repo_id, layout_problem, Kind};
use super::progress::Progress;
use super::snapshot::{Covered, Snapshot};
use super::summary::{Ending, ExportSummary, Skipped};
use crate::id::DocId;
use crate::storage::{Store, StoredChunk};

/// Ids asked of the store per `list` call.
const PAGE: usize = 500;

pub struct ExportJob<'a> {
    pub dir: &'a Path,
    pub all_ids: bool,
    /// Set on SIGINT/SIGTERM: stop before the next document.
    pub stop: &'a AtomicBool,
}

/// What exporting one document did.
#[derive(Default)]
struct DocExport {
    written: bool,
    bytes: u64,
    changes: u64,
    waiting: u64,
    replaced: u64,
    kept: Vec<Skipped>,
    /// The stored chunks hold no applied change: nothing to export.
    nothing: bool,
}

pub async fn export(store: Arc<dyn Store>, job: ExportJob<'_>, summary: &mut ExportSummary) {
    if let Err(e) = std::fs::create_dir_all(job.dir) {
        summary.ending = Ending::Failed(format!("cannot create {}: {e}", job.dir.display()));
        return;
    }
    let ids = match list_all(&*store).await {
        Ok(ids) => ids,
        Err(e) => return summary.ending = Ending::Failed(e),
    };
    summary.listed = ids.len();
    // Written first and renamed into place, so no half-written snapshot is ever read. It sits
    // at the top of DIR, where a Repo never looks.
    let tmp = job.dir.join(format!(
        ".automerge-relay-export-{}.tmp",
        std::process::id()
    ));
    let mut progress = Progress::new("export", ids.len() as u64);
    for id in ids {
        if job.stop.load(Ordering::Relaxed) {
            summary.ending = Ending::Interrupted;
            break;
        }
        if let Some(why) = refusal(&id, job.all_ids) {
            summary.skipped_docs.push(Skipped::new(id.as_str(), why));
            progress.inc();
            continue;
        }
        let chunks = match store.load(&id).await {
            Ok(chunks) => chunks,
            Err(e) => {
                summary.ending = Ending::Failed(format!("the store failed to load {id}: {e}"));
                break;
            }
        };
        if chunks.is_empty() {
            let why = "deleted while the export ran";
            summary.skipped_docs.push(Skipped::new(id.as_str(), why));
            progress.inc();
            continue;
        }
        let (root, tmp_path, raw) = (job.dir.to_path_buf(), tmp.clone(), id.to_string());
        let done =
            tokio::task::spawn_blocking(move || export_one(&root, &raw, &tmp_path, chunks)).await;
        let done = match done {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                summary.ending = Ending::Failed(format!("{id}: {e}"));
                break;
            }
            Err(e) => {
                summary.ending = Ending::Failed(format!("exporting {id} failed: {e}"));
                break;
            }
        };
        if done.nothing {
            let why = "no applied changes (only changes waiting for dependencies): nothing a Repo could load";
            summary.skipped_docs.push(Skipped::new(id.as_str(), why));
        } else if done.written {
            summary.written += 1;
        } else {
            summary.up_to_date += 1;
        }
        summary.changes += done.changes;
        summary.waiting += done.waiting;
        summary.bytes_written += done.bytes;
        summary.replaced += done.replaced;
        summary.kept.extend(done.kept);
        progress.inc();
    }
    progress.finish();
    let _ = std::fs::remove_file(&tmp);
}

/// Every id in the store, paged.
async fn list_all(store: &dyn Store) -> Result<Vec<DocId>, String> {
    let mut ids: Vec<DocId> = Vec::new();
    loop {
        let page = store
            .list(ids.last(), PAGE)
            .await
            .map_err(|e| format!("the store failed to list documents: {e}"))?;
        let full = page.len() == PAGE;
        ids.extend(page);
        if !full {
            return Ok(ids);
        }
    }
}

/// Why `id` is not exported, if it is not.
fn refusal(id: &DocId, all_ids: bool) -> Option<String> {
    if let Some(why) = layout_problem(id.as_str()) {
        return Some(format!(
            "the automerge-repo layout cannot hold this id: {why}"
        ));
    }
    if !all_ids && !is_repo_id(id.as_str()) {
        return Some(
            "not an automerge-repo id (bs58check), so no Repo could find it; --all-ids \
             exports it anyway"
                .into(),
        );
    }
    None
}

/// Writes one document's snapshot and removes the older files it contains (blocking). `Err`
/// is a failure writing the directory.
fn export_one(
    root: &Path,
    id: &str,
    tmp: &Path,
    chunks: Vec<StoredChunk>,
) -> Result<DocExport, String> {
    let Some(snapshot) = Snapshot::of(&chunks)? else {
        return Ok(DocExport {
            nothing: true,
            ..Default::default()
        });
    };
    drop(chunks);
    let dir = chunk_dir(root, id, Kind::Snapshot);
    let name = snapshot.name();
    let path = dir.join(&name);
    let mut out = DocExport {
        changes: snapshot.changes,
        waiting: snapshot.waiting,
        ..Default::default()
    };
    let same = std::fs::read(&path).is_ok_and(|bytes| bytes == snapshot.bytes);
    if !same {
        write_durably(&dir, &path, tmp, &snapshot.bytes)?;
        out.written = true;
        out.bytes = snapshot.bytes.len() as u64;
    }
    // Only once the new snapshot is durable: what it replaces.
    for kind in [Kind::Snapshot, Kind::Incremental] {
        let kind_dir = chunk_dir(root, id, kind);
        for old in files_in(&kind_dir)? {
            if kind == Kind::Snapshot && old.file_name().is_some_and(|n| n == name.as_str()) {
                continue;
            }
            let rel = old
                .strip_prefix(root)
                .unwrap_or(&old)
                .to_string_lossy()
                .into_owned();
            let bytes = match std::fs::read(&old) {
                Ok(bytes) => bytes,
                Err(e) => {
                    out.kept.push(Skipped::new(
                        rel,
                        format!("cannot read, left in place: {e}"),
                    ));
                    continue;
                }
            };
            match snapshot.covers(bytes) {
                Covered::Yes => {
                    std::fs::remove_file(&old)
                        .map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
                    out.replaced += 1;
                    out.written = true;
                }
                Covered::No(n) => out.kept.push(Skipped::new(
                    rel,
                    format!("holds {n} changes the store does not have: left in place (a Repo loads them too)"),
                )),
                Covered::Unreadable(why) => out.kept.push(Skipped::new(
                    rel,
                    format!("not Automerge data, left in place: {why}"),
                )),
            }
        }
    }
    Ok(out)
}

/// The files directly in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Writes `bytes` to `tmp`, syncs it, renames it to `path` and syncs `dir`: the file is
/// there whole or not at all, even after a crash.
fn write_durably(dir: &Path, path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), String> {
    let fail =
        |what: &str, p: &Path, e: std::io::Error| format!("cannot {what} {}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| fail("create", dir, e))?;
    let mut file = File::create(tmp).map_err(|e| fail("create", tmp, e))?;
    file.write_all(bytes).map_err(|e| fail("write", tmp, e))?;
    file.sync_all().map_err(|e| fail("sync", tmp, e))?;
    drop(file);
    std::fs::rename(tmp, path).map_err(|e| fail("rename into place", path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync", dir, e))
}
