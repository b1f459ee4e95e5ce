//! What an import or export did, as the lines it ends with. Counted while it runs, printed
//! once (on stdout, so a script can keep it apart from the progress on stderr). Every file or
//! document left out is named with the reason: a skipped file is never silent, and never a
//! failure either (only the store, or the directory, failing is).

use std::fmt;
use std::path::PathBuf;

/// A file or document left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// A path relative to the directory, or a document id.
    pub what: String,
    pub why: String,
}

impl Skipped {
    pub fn new(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            why: why.into(),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Ending {
    #[default]
    Done,
    /// SIGINT or SIGTERM: stopped between two documents. What was done is kept; running
    /// again carries on (both directions are idempotent).
    Interrupted,
    /// The store (or the directory) failed; nothing after it was tried.
    Failed(String),
}

impl Ending {
    /// The exit status: 0 when everything went (skipped files included), 1 on a failure, 130
    /// when interrupted.
    pub fn exit_code(&self) -> u8 {
        match self {
            Ending::Done => 0,
            Ending::Failed(_) => 1,
            Ending::Interrupted => 130,
        }
    }
}

/// `automerge-relay import`.
#[derive(Debug, Default)]
pub struct ImportSummary {
    pub dir: PathBuf,
    pub store: String,
    pub dry_run: bool,
    pub ending: Ending,
    /// Documents with at least one chunk file in the directory.
    pub found: usize,
    /// Documents the store did not have, now stored.
    pub created: usize,
    /// Documents the store had, with new changes added.
    pub updated: usize,
    /// Documents the store already had every change of.
    pub unchanged: usize,
    /// Documents whose files hold no changes at all (nothing to store).
    pub empty: usize,
    /// New changes stored (of them, `waiting` wait for missing dependencies).
    pub new_changes: u64,
    pub waiting: u64,
    pub files_read: u64,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    /// `sync-state` files: not document data.
    pub sync_states: u64,
    /// Documents left out (ids the relay cannot use).
    pub skipped_docs: Vec<Skipped>,
    /// Chunk files that are not Automerge data, or could not be read.
    pub bad_files: Vec<Skipped>,
    /// Files that are no document chunk (`storage-adapter-id`, other keys, stray files).
    pub other_files: Vec<Skipped>,
    /// With `--store memory`: what was stored is gone when the process exits.
    pub ephemeral_store: bool,
}

/// `automerge-relay export`.
#[derive(Debug, Default)]
pub struct ExportSummary {
    pub dir: PathBuf,
    pub store: String,
    pub ending: Ending,
    /// Documents the store listed.
    pub listed: usize,
    /// Documents whose snapshot was written (new or changed).
    pub written: usize,
    /// Documents whose snapshot was already there, byte for byte, with nothing else to remove.
    pub up_to_date: usize,
    pub changes: u64,
    pub waiting: u64,
    pub bytes_written: u64,
    /// Older chunk files of exported documents that the new snapshot contains, removed.
    pub replaced: u64,
    /// Files in exported documents' directories left in place, and why.
    pub kept: Vec<Skipped>,
    /// Documents not exported, and why.
    pub skipped_docs: Vec<Skipped>,
}

/// `12.3 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The last line; `left_out` says what the lines above name, when they name anything.
fn ending_line(f: &mut fmt::Formatter<'_>, ending: &Ending, left_out: Option<&str>) -> fmt::Result {
    match (ending, left_out) {
        (Ending::Done, Some(left_out)) => writeln!(f, "  result:    done; {left_out}"),
        (Ending::Done, None) => writeln!(f, "  result:    done"),
        (Ending::Interrupted, _) => writeln!(
            f,
            "  result:    interrupted; what is counted above is done, run again to finish"
        ),
        (Ending::Failed(why), _) => writeln!(f, "  result:    FAILED: {why}"),
    }
}

fn list(f: &mut fmt::Formatter<'_>, items: &[Skipped]) -> fmt::Result {
    for s in items {
        writeln!(f, "    {}: {}", s.what, s.why)?;
    }
    Ok(())
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let would = if self.dry_run { "would be " } else { "" };
        writeln!(
            f,
            "import {} -> {}{}",
            self.dir.display(),
            self.store,
            if self.dry_run {
                " (dry run: nothing stored)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  documents: {} found; {} {would}created, {} {would}updated, {} unchanged, {} empty, {} skipped",
            self.found,
            self.created,
            self.updated,
            self.unchanged,
            self.empty,
            self.skipped_docs.len()
        )?;
        writeln!(
            f,
            "  changes:   {} {would}stored ({} waiting for missing dependencies)",
            plural(self.new_changes, "new change", "new changes"),
            self.waiting
        )?;
        writeln!(
            f,
            "  bytes:     {} read from {}, {} {would}stored",
            bytes(self.bytes_read),
            plural(self.files_read, "file", "files"),
            bytes(self.bytes_stored)
        )?;
        writeln!(
            f,
            "  skipped:   {}, {}, {}, {}",
            plural(
                self.bad_files.len() as u64,
                "bad chunk file",
                "bad chunk files"
            ),
            plural(self.sync_states, "sync state", "sync states"),
            plural(self.other_files.len() as u64, "other file", "other files"),
            plural(self.skipped_docs.len() as u64, "document", "documents"),
        )?;
        if !self.bad_files.is_empty() {
            writeln!(f, "  bad chunk files (not imported):")?;
            list(f, &self.bad_files)?;
        }
        if !self.skipped_docs.is_empty() {
            writeln!(f, "  documents skipped:")?;
            list(f, &self.skipped_docs)?;
        }
        if self.sync_states > 0 {
            writeln!(
                f,
                "  sync states are what a peer had of a document, not document data: not imported"
            )?;
        }
        if !self.other_files.is_empty() {
            writeln!(f, "  other files (no document data):")?;
            list(f, &self.other_files)?;
        }
        if self.ephemeral_store && !self.dry_run {
            writeln!(
                f,
                "  note:      --store memory keeps nothing once this process exits"
            )?;
        }
        let skipped_any = !self.bad_files.is_empty() || !self.skipped_docs.is_empty();
        let left_out = "the files and documents named above were not imported";
        ending_line(f, &self.ending, skipped_any.then_some(left_out))
    }
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "export {} -> {}", self.store, self.dir.display())?;
        writeln!(
            f,
            "  documents: {} in the store; {} written, {} up to date, {} skipped",
            self.listed,
            self.written,
            self.up_to_date,
            self.skipped_docs.len()
        )?;
        writeln!(
            f,
            "  changes:   {} in the exported documents ({} waiting for missing dependencies)",
            self.changes, self.waiting
        )?;
        writeln!(
            f,
            "  bytes:     {} written; {} replaced by the new snapshots",
            bytes(self.bytes_written),
            plural(self.replaced, "older file", "older files")
        )?;
        if !self.skipped_docs.is_empty() {
            writeln!(f, "  documents skipped:")?;
            list(f, &self.skipped_docs)?;
        }
        if !self.kept.is_empty() {
            writeln!(f, "  files left in place:")?;
            list(f, &self.kept)?;
        }
        let left_out = match (self.skipped_docs.is_empty(), self.kept.is_empty()) {
            (true, true) => None,
            (false, true) => Some("the documents named above were not exported"),
            (true, false) => Some("the files named above were left as they were"),
            (false, false) => Some(
                "the documents named above were not exported, the files named above were left \
                 as they were",
            ),
        };
        ending_line(f, &self.ending, left_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
    }

    #[test]
    fn an_import_summary_names_every_skipped_file() {
        let summary = ImportSummary {
            dir: "repo-data".into(),
            store: "sled store in relay-data".into(),
            found: 2,
            created: 1,
            unchanged: 1,
            new_changes: 3,
            files_read: 4,
            bytes_read: 2048,
            bytes_stored: 1000,
            sync_states: 1,
            bad_files: vec![Skipped::new(
                "ab/cd/incremental/ff",
                "not valid Automerge data",
            )],
            other_files: vec![Skipped::new("st/orage-adapter-id", "not a document chunk")],
            ..Default::default()
        };
        let text = summary.to_string();
        assert!(
            text.contains("2 found; 1 created, 0 updated, 1 unchanged"),
            "{text}"
        );
        assert!(text.contains("3 new changes stored"), "{text}");
        assert!(
            text.contains("    ab/cd/incremental/ff: not valid Automerge data"),
            "{text}"
        );
        assert!(
            text.contains("1 bad chunk file, 1 sync state, 1 other file"),
            "{text}"
        );
        assert!(
            text.contains("result:    done; the files and documents named above were not imported"),
            "{text}"
        );
        assert_eq!(
            summary.ending.exit_code(),
            0,
            "a skipped file is no failure"
        );
        let failed = Ending::Failed("the store failed".into());
        assert_eq!(failed.exit_code(), 1);
    }
}
