//! `automerge-relay import DIR`: every document of an automerge-repo storage directory into the
//! store, one document at a time: its files read and validated, merged with what the store
//! already holds, and only what is new stored, as one chunk. A second import of the same
//! directory therefore stores nothing, and an interrupted one can simply be run again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::merge::{Added, Merge, Merged, Write};
use super::progress::Progress;
use super::scan::{scan, ChunkFile};
use super::summary::{Ending, ImportSummary, Skipped};
use crate::id::DocId;
use crate::storage::{Store, StoredChunk};

/// What the run needs besides the store.
pub struct ImportJob<'a> {
    pub dir: &'a Path,
    pub dry_run: bool,
    /// Files larger than this are skipped (`--max-doc-size`: the relay would refuse the
    /// document anyway).
    pub max_file: u64,
    /// Set on SIGINT/SIGTERM: stop before the next document.
    pub stop: &'a AtomicBool,
}

/// One document's files, read and merged (on a blocking thread).
struct DocImport {
    merged: Merged,
    files_read: u64,
    bytes_read: u64,
    bad: Vec<Skipped>,
}

pub async fn import(store: Arc<dyn Store>, job: ImportJob<'_>, summary: &mut ImportSummary) {
    let dir = job.dir.to_path_buf();
    let scanned = match tokio::task::spawn_blocking(move || scan(&dir)).await {
        Ok(Ok(scanned)) => scanned,
        Ok(Err(e)) => return summary.ending = Ending::Failed(e),
        Err(e) => return summary.ending = Ending::Failed(format!("scanning failed: {e}")),
    };
    summary.found = scanned.docs.len();
    summary.sync_states = scanned.sync_states;
    summary.other_files = scanned.others;
    let mut progress = Progress::new("import", scanned.docs.len() as u64);
    for (raw_id, files) in scanned.docs {
        if job.stop.load(Ordering::Relaxed) {
            summary.ending = Ending::Interrupted;
            break;
        }
        let id = match DocId::parse(&raw_id) {
            Ok(id) => id,
            Err(e) => {
                let why = format!(
                    "not a relay document id ({e}); {} not read",
                    files_note(&files)
                );
                summary.skipped_docs.push(Skipped::new(raw_id, why));
                progress.inc();
                continue;
            }
        };
        if let Err(e) = import_one(&*store, &id, files, &job, summary).await {
            summary.ending = Ending::Failed(e);
            break;
        }
        progress.inc();
    }
    progress.finish();
    if !job.dry_run && summary.ending != Ending::Interrupted {
        if let Err(e) = store.flush().await {
            if summary.ending == Ending::Done {
                summary.ending = Ending::Failed(format!("the store failed to flush: {e}"));
            }
        }
    }
}

fn files_note(files: &[ChunkFile]) -> String {
    match files.len() {
        1 => "1 file".into(),
        n => format!("{n} files"),
    }
}

/// Imports one document. `Err` is a failure of the store (or of a stored document that does
/// not load): the run stops there.
async fn import_one(
    store: &dyn Store,
    id: &DocId,
    files: Vec<ChunkFile>,
    job: &ImportJob<'_>,
    summary: &mut ImportSummary,
) -> Result<(), String> {
    let chunks = store
        .load(id)
        .await
        .map_err(|e| format!("the store failed to load {id}: {e}"))?;
    let max_file = job.max_file;
    let done = tokio::task::spawn_blocking(move || merge_files(chunks, files, max_file))
        .await
        .map_err(|e| format!("merging {id} failed: {e}"))?
        .map_err(|e| format!("{id}: {e}"))?;
    summary.files_read += done.files_read;
    summary.bytes_read += done.bytes_read;
    summary.bad_files.extend(done.bad);
    let merged = done.merged;
    summary.new_changes += merged.new_changes;
    summary.waiting += merged.waiting;
    match &merged.write {
        None if merged.changes == 0 && !merged.stored_before => summary.empty += 1,
        None => summary.unchanged += 1,
        Some(_) if merged.stored_before => summary.updated += 1,
        Some(_) => summary.created += 1,
    }
    let Some(write) = merged.write else {
        return Ok(());
    };
    summary.bytes_stored += write.len() as u64;
    if job.dry_run {
        return Ok(());
    }
    let stored = match write {
        Write::Snapshot(bytes) => store.compact(id, bytes, Vec::new()).await,
        Write::Incremental(bytes) => store.append(id, bytes).await,
    };
    stored
        .map(|_| ())
        .map_err(|e| format!("the store failed to write {id}: {e}"))
}

/// Reads and merges a document's files into what the store holds (blocking: file I/O and
/// Automerge). `Err` when the stored chunks do not load.
fn merge_files(
    chunks: Vec<StoredChunk>,
    files: Vec<ChunkFile>,
    max_file: u64,
) -> Result<DocImport, String> {
    let mut merge = Merge::new(&chunks)?;
    drop(chunks);
    let (mut files_read, mut bytes_read, mut bad) = (0, 0, Vec::new());
    // The files `merge` numbered, in order, for what it finds wrong only at the end.
    let mut added = Vec::new();
    for file in files {
        match std::fs::metadata(&file.path) {
            Ok(meta) if meta.len() > max_file => {
                let why = format!(
                    "{} bytes, larger than --max-doc-size ({max_file} bytes)",
                    meta.len()
                );
                bad.push(Skipped::new(file.rel, why));
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                bad.push(Skipped::new(file.rel, format!("cannot read: {e}")));
                continue;
            }
        }
        let bytes = match std::fs::read(&file.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                bad.push(Skipped::new(file.rel, format!("cannot read: {e}")));
                continue;
            }
        };
        files_read += 1;
        bytes_read += bytes.len() as u64;
        if let Added::Rejected(why) = merge.add(bytes) {
            bad.push(Skipped::new(file.rel.clone(), why));
        }
        added.push(file.rel);
    }
    let (merged, late) = merge.finish();
    for (index, why) in late {
        let rel = added.get(index).cloned().unwrap_or_default();
        bad.push(Skipped::new(rel, why));
    }
    Ok(DocImport {
        merged,
        files_read,
        bytes_read,
        bad,
    })
}
