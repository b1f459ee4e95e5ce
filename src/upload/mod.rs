//! Parsing and strict validation of uploaded bytes, done *outside* the document owner.
//!
//! `Automerge::load_incremental` is lenient (it accepts garbage with a warning, ignores trailing
//! junk and silently drops truncated input), so nothing reaches a document before this module
//! has checked it. An upload is split into its Automerge chunks; each chunk is loaded strictly
//! into a scratch document (`OnPartialLoad::Error`, `VerificationMode::Check`). A chunk whose
//! only problem is missing dependencies is well-formed and kept: the document owner queues it
//! until the dependencies arrive. The result records every change hash the upload carries so
//! the owner can report `applied` and `pending` per request.

use automerge::{
    Automerge, AutomergeError, Change, ChangeHash, LoadOptions, OnPartialLoad, VerificationMode,
};
use bytes::Bytes;

use crate::error::RelayError;

mod decoded;
mod gate;

#[cfg(test)]
pub use decoded::bomb;
pub use decoded::decoded_size;
pub use gate::UploadGate;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
const CHUNK_BUNDLE: u8 = 3;

/// What a document owner last published about its document: validation uses it to work out
/// which changes of a full save can be new to the server, so the owner applies only those.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hint {
    /// Changes whenever the document's history may have shrunk (delete, reload).
    pub epoch: u64,
    pub heads: Vec<ChangeHash>,
}

/// A validated upload, ready for the document owner.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The upload's bytes: a concatenation of well-formed Automerge chunks.
    pub bytes: Bytes,
    /// Hashes of changes that come from document chunks (self-contained histories).
    pub doc_hashes: Vec<ChangeHash>,
    /// Changes that came as change chunks; these may wait for missing dependencies.
    pub changes: Vec<Change>,
    /// True when the upload holds document chunks (full saves).
    pub has_doc_chunks: bool,
    /// For document chunks, validated against a [`Hint`]: the changes not reachable from the
    /// hint's heads (a superset of what is new to the server, usually one or two changes),
    /// with the hint's epoch. `None` when there was no hint.
    pub doc_delta: Option<(u64, Vec<Change>)>,
}

impl Upload {
    /// Number of distinct changes the upload carries.
    pub fn change_count(&self) -> usize {
        self.doc_hashes.len() + self.changes.len()
    }

    /// An upper bound of the bytes this upload can add to a document whose hint has `epoch`:
    /// the raw size of the changes that may be new, or the whole upload.
    pub fn growth_bound(&self, epoch: u64) -> u64 {
        let raw = |changes: &[Change]| -> u64 {
            changes.iter().map(|c| c.raw_bytes().len() as u64).sum()
        };
        match &self.doc_delta {
            _ if !self.has_doc_chunks => raw(&self.changes),
            Some((e, delta)) if *e == epoch => raw(delta) + raw(&self.changes),
            _ => self.bytes.len() as u64,
        }
    }
}

/// Splits `bytes` into chunk slices, checking only the framing.
pub fn split_chunks(bytes: &[u8]) -> Result<Vec<(u8, &[u8])>, RelayError> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let invalid = |why: &str| RelayError::InvalidBody(format!("{why} at byte {offset}"));
        let magic_len = rest.len().min(4);
        if rest[..magic_len] != MAGIC[..magic_len] {
            return Err(invalid("missing Automerge magic bytes"));
        }
        if rest.len() < 9 {
            return Err(invalid("truncated chunk header"));
        }
        let kind = rest[8];
        let (len, leb_len) = read_uleb(&rest[9..]).ok_or_else(|| invalid("bad chunk length"))?;
        let header = 9 + leb_len;
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(header))
            .ok_or_else(|| invalid("chunk length overflows"))?;
        if total > rest.len() {
            return Err(invalid("truncated chunk"));
        }
        chunks.push((kind, &rest[..total]));
        rest = &rest[total..];
    }
    Ok(chunks)
}

pub(super) fn read_uleb(input: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, byte) in input.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        value |= bits.checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Signed LEB128 (the run counts of Automerge's run-length-encoded columns).
fn read_sleb(input: &[u8]) -> Option<(i64, usize)> {
    let mut value: i64 = 0;
    for (i, byte) in input.iter().enumerate().take(10) {
        let shift = 7 * i as u32;
        value |= i64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            if byte & 0x40 != 0 && shift + 7 < 64 {
                value |= -1i64 << (shift + 7);
            }
            return Some((value, i + 1));
        }
    }
    None
}

/// The most values one column of a bundle chunk may hold (one per op or per change).
pub const MAX_BUNDLE_COLUMN_VALUES: u64 = 1 << 22;

/// The most bytes the compressed columns of one bundle chunk may inflate to, together.
pub const MAX_INFLATED_BUNDLE: usize = 256 << 20;

/// automerge 0.12 decodes some columns of a bundle chunk (chunk type 3) eagerly into vectors
/// before validating anything (the op-id column in `decode_delta_int`, the change metadata), so
/// a run-length-encoded run of billions of values, a few bytes long, made loading a 180-byte
/// upload allocate gigabytes (found by fuzzing: `tests/fixtures/fuzz-regressions/upload-13.bin`).
/// This walks the bundle's columns and rejects one that declares more than
/// [`MAX_BUNDLE_COLUMN_VALUES`] values. Only the run lengths are read; whatever else is wrong
/// with the chunk is left to automerge's strict load. DEFLATE-compressed columns are inflated
/// first ([`inflate`]), since the same run fits in a compressed column (`upload-14.bin`), and
/// together they may inflate to at most [`MAX_INFLATED_BUNDLE`] bytes (automerge inflates them
/// all into memory, without a limit).
fn check_bundle_columns(chunk: &[u8]) -> Result<(), RelayError> {
    match bundle_excess(chunk) {
        Some(why) => Err(RelayError::InvalidBody(why)),
        None => Ok(()),
    }
}

/// What is too large in a bundle chunk; `None` when nothing is, or when the chunk does not
/// parse this far (automerge then rejects it).
fn bundle_excess(chunk: &[u8]) -> Option<String> {
    let take = |rest: &mut &[u8], n: usize| -> Option<()> {
        *rest = rest.get(n..)?;
        Some(())
    };
    let uleb = |rest: &mut &[u8]| -> Option<u64> {
        let (v, n) = read_uleb(rest)?;
        *rest = &rest[n..];
        Some(v)
    };
    // Header: magic, checksum, chunk type, body length (`split_chunks` checked the framing).
    let mut rest = chunk.get(9..)?;
    uleb(&mut rest)?;
    // Dependencies (32-byte hashes), then actor ids (length-prefixed).
    let deps = usize::try_from(uleb(&mut rest)?).ok()?;
    take(&mut rest, deps.checked_mul(32)?)?;
    for _ in 0..uleb(&mut rest)? {
        let len = usize::try_from(uleb(&mut rest)?).ok()?;
        take(&mut rest, len)?;
    }
    // What the compressed columns may still inflate to, all together.
    let mut budget = MAX_INFLATED_BUNDLE;
    // Change columns, then op columns: a list of (spec, length), then the columns' data.
    for _section in 0..2 {
        let mut columns = Vec::new();
        for _ in 0..uleb(&mut rest)? {
            let spec = u32::try_from(uleb(&mut rest)?).ok()?;
            let len = usize::try_from(uleb(&mut rest)?).ok()?;
            columns.push((spec, len));
        }
        for (spec, len) in columns {
            let data = rest.get(..len)?;
            rest = &rest[len..];
            let (id, kind) = (spec >> 4, spec & 0b111);
            let values = if spec & 0b1000 == 0 {
                declared_values(kind, data)
            } else {
                let mut inflated = Vec::new();
                if inflate(data, budget, &mut inflated) == Err(Inflate::TooLarge) {
                    return Some(format!(
                        "bundle columns inflate to more than {MAX_INFLATED_BUNDLE} bytes"
                    ));
                }
                // A malformed stream is counted as far as it inflates, in case automerge's
                // inflater is more lenient and hands that much on.
                budget -= inflated.len();
                declared_values(kind, &inflated)
            };
            if values > MAX_BUNDLE_COLUMN_VALUES {
                return Some(format!(
                    "bundle column {id} declares more than {MAX_BUNDLE_COLUMN_VALUES} values"
                ));
            }
        }
    }
    None
}

/// How many values an uncompressed column of type `kind` declares, counted until the total
/// exceeds [`MAX_BUNDLE_COLUMN_VALUES`] or the data stops parsing.
fn declared_values(kind: u32, mut data: &[u8]) -> u64 {
    const BOOLEAN: u32 = 4;
    const STRING: u32 = 5;
    // Skips one encoded value: LEB128, or a length-prefixed string.
    let skip_value = |data: &mut &[u8]| -> Option<()> {
        let (v, n) = read_uleb(data)?;
        let len = if kind == STRING {
            n.checked_add(usize::try_from(v).ok()?)?
        } else {
            n
        };
        *data = data.get(len..)?;
        Some(())
    };
    let mut total: u64 = 0;
    match kind {
        // Raw value bytes: not run-length encoded.
        7 => {}
        BOOLEAN => {
            // Alternating run lengths, starting with `false`.
            while let Some((run, n)) = read_uleb(data) {
                data = &data[n..];
                total = total.saturating_add(run);
                if total > MAX_BUNDLE_COLUMN_VALUES {
                    break;
                }
            }
        }
        _ => {
            // Runs: count > 0 repeats one value, count < 0 is that many literal values,
            // count 0 is followed by a number of nulls.
            while let Some((count, n)) = read_sleb(data) {
                data = &data[n..];
                let run = match count {
                    0 => match read_uleb(data) {
                        Some((nulls, n)) => {
                            data = &data[n..];
                            nulls
                        }
                        None => break,
                    },
                    _ => count.unsigned_abs(),
                };
                total = total.saturating_add(run);
                if total > MAX_BUNDLE_COLUMN_VALUES {
                    break;
                }
                // Step over the run's values to the next count.
                let values = match count {
                    1.. => 1,
                    0 => 0,
                    _ => run,
                };
                let skipped = (0..values).try_for_each(|_| skip_value(&mut data));
                if skipped.is_none() {
                    break;
                }
            }
        }
    }
    total
}

/// Why [`inflate`] failed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflate {
    Malformed,
    TooLarge,
}

/// Inflates a raw DEFLATE stream (what automerge writes for compressed columns, and inflates
/// with this same flate2) into `out`, at most `limit` bytes. On an error `out` holds what was
/// inflated before it.
#[doc(hidden)]
pub fn inflate(data: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), Inflate> {
    use std::io::Read;
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut decoder = flate2::read::DeflateDecoder::new(data).take(cap);
    match decoder.read_to_end(out) {
        Ok(_) if out.len() > limit => {
            out.truncate(limit);
            Err(Inflate::TooLarge)
        }
        Ok(_) => Ok(()),
        Err(_) => Err(Inflate::Malformed),
    }
}

fn strict() -> LoadOptions<'static> {
    LoadOptions::new()
        .on_partial_load(OnPartialLoad::Error)
        .verification_mode(VerificationMode::Check)
}

/// Loads one chunk strictly; `Ok(Some(doc))` when complete, `Ok(None)` when well-formed but
/// waiting for dependencies.
fn load_chunk(chunk: &[u8]) -> Result<Option<Automerge>, RelayError> {
    match Automerge::load_with_options(chunk, strict()) {
        Ok(doc) => Ok(Some(doc)),
        Err(AutomergeError::MissingDeps) => Ok(None),
        Err(e) => Err(RelayError::InvalidBody(e.to_string())),
    }
}

/// Parses and strictly validates an upload. CPU-bound: call it from a blocking thread for
/// large bodies.
pub fn parse_upload(bytes: Bytes) -> Result<Upload, RelayError> {
    parse_upload_with(bytes, None)
}

/// [`parse_upload`], also computing the document-chunk delta against `hint`.
///
/// automerge 0.12 panics on some malformed column data (found by fuzzing) instead of returning
/// an error; such input is reported as invalid like any other.
pub fn parse_upload_with(bytes: Bytes, hint: Option<&Hint>) -> Result<Upload, RelayError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parse_unguarded(bytes, hint)
    }))
    .unwrap_or_else(|_| {
        Err(RelayError::InvalidBody(
            "malformed Automerge data (the decoder gave up)".into(),
        ))
    })
}

fn parse_unguarded(bytes: Bytes, hint: Option<&Hint>) -> Result<Upload, RelayError> {
    if bytes.is_empty() {
        return Err(RelayError::EmptyBody);
    }
    let mut doc_hashes = Vec::new();
    let mut changes = Vec::new();
    let mut has_doc_chunks = false;
    let mut delta = Vec::new();
    for (kind, chunk) in split_chunks(&bytes)? {
        match kind {
            CHUNK_DOCUMENT => {
                let doc = load_chunk(chunk)?.ok_or_else(|| {
                    RelayError::InvalidBody("document chunk with missing dependencies".into())
                })?;
                doc_hashes.extend(doc.get_changes_meta(&[]).into_iter().map(|m| m.hash));
                has_doc_chunks = true;
                if let Some(hint) = hint {
                    // Everything reachable from heads the server has is known to it.
                    let known: Vec<ChangeHash> = hint
                        .heads
                        .iter()
                        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
                        .copied()
                        .collect();
                    delta.extend(doc.get_changes(&known));
                }
            }
            CHUNK_CHANGE | CHUNK_COMPRESSED_CHANGE => {
                load_chunk(chunk)?;
                let change =
                    Change::try_from(chunk).map_err(|e| RelayError::InvalidBody(e.to_string()))?;
                changes.push(change);
            }
            CHUNK_BUNDLE => {
                check_bundle_columns(chunk)?;
                load_chunk(chunk)?;
                let bundle = automerge::Bundle::try_from(chunk)
                    .map_err(|e| RelayError::InvalidBody(format!("{e:?}")))?;
                let bundled = bundle
                    .to_changes()
                    .map_err(|e| RelayError::InvalidBody(e.to_string()))?;
                changes.extend(bundled);
            }
            other => {
                return Err(RelayError::InvalidBody(format!(
                    "unknown Automerge chunk type {other}"
                )))
            }
        }
    }
    if doc_hashes.is_empty() && changes.is_empty() {
        return Err(RelayError::NoChanges);
    }
    Ok(Upload {
        bytes,
        doc_hashes,
        changes,
        has_doc_chunks,
        doc_delta: hint.map(|h| (h.epoch, delta)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    fn doc_with(n: usize) -> AutoCommit {
        let mut doc = AutoCommit::new();
        for i in 0..n {
            doc.put(ROOT, format!("k{i}"), i as i64).unwrap();
            doc.commit();
        }
        doc
    }

    #[test]
    fn full_save_is_accepted_with_all_hashes() {
        let mut doc = doc_with(3);
        let up = parse_upload(Bytes::from(doc.save())).unwrap();
        assert_eq!(up.doc_hashes.len(), 3);
        assert!(up.changes.is_empty());
    }

    #[test]
    fn full_save_delta_against_a_hint_holds_only_unknown_changes() {
        let mut doc = doc_with(5);
        let server_heads = doc.get_heads();
        doc.put(ROOT, "new", 1).unwrap();
        doc.commit();
        let new_hash = doc.get_heads()[0];
        let hint = Hint {
            epoch: 7,
            heads: server_heads,
        };
        let up = parse_upload_with(Bytes::from(doc.save()), Some(&hint)).unwrap();
        let (epoch, delta) = up.doc_delta.unwrap();
        assert_eq!(epoch, 7);
        assert_eq!(
            delta.iter().map(|c| c.hash()).collect::<Vec<_>>(),
            vec![new_hash]
        );
        // Heads the upload does not know are ignored: everything is a candidate.
        let foreign = Hint {
            epoch: 1,
            heads: vec![ChangeHash([3; 32])],
        };
        let up = parse_upload_with(Bytes::from(doc.save()), Some(&foreign)).unwrap();
        assert_eq!(up.doc_delta.unwrap().1.len(), 6);
    }

    #[test]
    fn incremental_with_missing_deps_is_well_formed() {
        let mut doc = doc_with(2);
        let heads = doc.get_heads();
        doc.put(ROOT, "late", 1).unwrap();
        doc.commit();
        let inc = doc.save_after(&heads);
        let up = parse_upload(Bytes::from(inc)).unwrap();
        assert_eq!(up.changes.len(), 1);
    }

    #[test]
    fn rejects_garbage_truncation_junk_and_empty() {
        let mut doc = doc_with(2);
        let save = doc.save();
        assert!(matches!(
            parse_upload(Bytes::new()),
            Err(RelayError::EmptyBody)
        ));
        assert!(matches!(
            parse_upload(Bytes::from_static(b"hello world, not automerge")),
            Err(RelayError::InvalidBody(_))
        ));
        let truncated = Bytes::copy_from_slice(&save[..save.len() - 3]);
        assert!(matches!(
            parse_upload(truncated),
            Err(RelayError::InvalidBody(_))
        ));
        let mut junk = save.clone();
        junk.extend_from_slice(b"junk");
        assert!(matches!(
            parse_upload(Bytes::from(junk)),
            Err(RelayError::InvalidBody(_))
        ));
        let mut flipped = save.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert!(parse_upload(Bytes::from(flipped)).is_err());
    }

    #[test]
    fn inputs_that_crashed_the_decoder_are_invalid() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fuzz-regressions");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("upload-")
            {
                continue;
            }
            let bytes = Bytes::from(std::fs::read(&path).unwrap());
            assert!(
                matches!(parse_upload(bytes), Err(RelayError::InvalidBody(_))),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen > 0, "no regression inputs found");
    }

    #[test]
    fn empty_document_save_has_no_changes() {
        let mut doc = AutoCommit::new();
        assert!(matches!(
            parse_upload(Bytes::from(doc.save())),
            Err(RelayError::NoChanges)
        ));
    }
}
