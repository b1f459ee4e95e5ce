//! What an upload decodes to, measured before anything is loaded.
//!
//! `--max-body` counts wire bytes, but Automerge compresses its columns with DEFLATE: a 64 KiB
//! save holding 64 MiB of zeros was accepted, loaded (automerge inflates every column into
//! memory, without a limit) and stored as a 64 MiB chunk; eight in parallel (511 KiB sent)
//! drove the relay's RSS to 2 GB under a 64 MiB memory budget. So every compressed column and
//! compressed change is inflated here first, into nothing (only counted), stopping at the
//! limit. A chunk that does not parse this far is left to automerge's strict load, which
//! rejects it at the same place (it reads the same framing).

use std::io::Read;

use super::{read_uleb, split_chunks, CHUNK_BUNDLE, CHUNK_COMPRESSED_CHANGE, CHUNK_DOCUMENT};
use crate::error::RelayError;

/// The column spec bit that marks a DEFLATE-compressed column.
const DEFLATE: u32 = 0b1000;

/// Bytes `bytes` decodes to: its size, plus what its compressed parts inflate to beyond
/// their wire size. `Err(DecodedTooLarge)` as soon as the count passes `limit`.
pub fn decoded_size(bytes: &[u8], limit: u64) -> Result<u64, RelayError> {
    let too_large = || RelayError::DecodedTooLarge { limit };
    let mut total = bytes.len() as u64;
    if total > limit {
        return Err(too_large());
    }
    for (kind, chunk) in split_chunks(bytes)? {
        let budget = limit - total;
        let extra = match kind {
            CHUNK_DOCUMENT => document_extra(chunk, budget),
            CHUNK_COMPRESSED_CHANGE => compressed_change_extra(chunk, budget),
            CHUNK_BUNDLE => bundle_extra(chunk, budget),
            _ => Some(Ok(0)),
        };
        match extra {
            Some(Ok(extra)) => total += extra,
            Some(Err(Excess)) => return Err(too_large()),
            // Does not parse this far: automerge's strict load rejects it.
            None => {}
        }
        if total > limit {
            return Err(too_large());
        }
    }
    Ok(total)
}

/// The inflated size passed the budget.
#[derive(Debug, PartialEq, Eq)]
struct Excess;

/// `None`: the chunk does not parse this far.
type Extra = Option<Result<u64, Excess>>;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn uleb(&mut self) -> Option<u64> {
        let (v, n) = read_uleb(self.0)?;
        self.0 = &self.0[n..];
        Some(v)
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.uleb()?).ok()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    /// Skips past the chunk header (magic, checksum, type, length).
    fn body(chunk: &'a [u8]) -> Option<Self> {
        let mut r = Reader(chunk.get(9..)?);
        r.uleb()?;
        Some(r)
    }

    /// A column list: (spec, length) pairs.
    fn columns(&mut self) -> Option<Vec<(u32, usize)>> {
        (0..self.uleb()?)
            .map(|_| Some((u32::try_from(self.uleb()?).ok()?, self.len()?)))
            .collect()
    }

    /// The data of `columns`, in order: what the compressed ones add when inflated.
    fn column_data(&mut self, columns: &[(u32, usize)], budget: &mut u64) -> Extra {
        let mut extra = 0;
        for &(spec, len) in columns {
            let data = self.take(len)?;
            if spec & DEFLATE != 0 {
                match inflated_len(data, *budget) {
                    Ok(n) => {
                        let more = n.saturating_sub(len as u64);
                        *budget = budget.saturating_sub(more);
                        extra += more;
                    }
                    Err(Excess) => return Some(Err(Excess)),
                }
            }
        }
        Some(Ok(extra))
    }
}

/// A document chunk: actors, heads, the change and op column lists, then their data.
fn document_extra(chunk: &[u8], mut budget: u64) -> Extra {
    let mut r = Reader::body(chunk)?;
    for _ in 0..r.uleb()? {
        let len = r.len()?;
        r.take(len)?;
    }
    let heads = r.len()?;
    r.take(heads.checked_mul(32)?)?;
    let changes = r.columns()?;
    let ops = r.columns()?;
    let a = match r.column_data(&changes, &mut budget)? {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let b = match r.column_data(&ops, &mut budget)? {
        Ok(b) => b,
        Err(e) => return Some(Err(e)),
    };
    Some(Ok(a + b))
}

/// A compressed change chunk: the whole body is one DEFLATE stream.
fn compressed_change_extra(chunk: &[u8], budget: u64) -> Extra {
    let mut r = Reader(chunk.get(9..)?);
    let len = r.len()?;
    let body = r.take(len)?;
    Some(inflated_len(body, budget).map(|n| n.saturating_sub(len as u64)))
}

/// A bundle chunk: dependencies, actors, then two sections of (column list, data).
fn bundle_extra(chunk: &[u8], mut budget: u64) -> Extra {
    let mut r = Reader::body(chunk)?;
    let deps = r.len()?;
    r.take(deps.checked_mul(32)?)?;
    for _ in 0..r.uleb()? {
        let len = r.len()?;
        r.take(len)?;
    }
    let mut extra = 0;
    for _section in 0..2 {
        let columns = r.columns()?;
        match r.column_data(&columns, &mut budget)? {
            Ok(n) => extra += n,
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(extra))
}

/// How many bytes the raw DEFLATE stream `data` inflates to, counted without keeping them;
/// `Err` past `budget`. A malformed stream counts as far as it inflates.
fn inflated_len(data: &[u8], budget: u64) -> Result<u64, Excess> {
    let mut decoder = flate2::read::DeflateDecoder::new(data).take(budget.saturating_add(1));
    let mut buf = [0u8; 16 * 1024];
    let mut total: u64 = 0;
    loop {
        match decoder.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    if total > budget {
        Err(Excess)
    } else {
        Ok(total)
    }
}

/// A small save of a large, very compressible document (for the tests of everything that
/// measures uploads).
#[cfg(test)]
pub fn bomb(decoded: usize) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "zeros", "\0".repeat(decoded))
        .expect("a test document");
    doc.save()
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    #[test]
    fn a_compressed_save_counts_what_it_inflates_to() {
        let save = bomb(4 << 20);
        assert!(save.len() < 64 << 10, "compressed: {} bytes", save.len());
        let size = decoded_size(&save, 64 << 20).unwrap();
        assert!(size >= 4 << 20, "decoded {size}");
        assert!(matches!(
            decoded_size(&save, 1 << 20),
            Err(RelayError::DecodedTooLarge { limit }) if limit == 1 << 20
        ));
    }

    #[test]
    fn uncompressed_changes_count_their_size() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "k", 1).unwrap();
        let change = doc.save_after(&[]);
        assert_eq!(decoded_size(&change, 1 << 20).unwrap(), change.len() as u64);
        assert!(decoded_size(&change, 10).is_err());
    }

    #[test]
    fn a_compressed_change_counts_its_inflated_body() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "zeros", "\0".repeat(1 << 20)).unwrap();
        let heads = doc.get_heads();
        let change = doc.get_change_by_hash(&heads[0]).unwrap();
        // automerge compresses a change chunk this large when it encodes it.
        let bytes = change.clone().bytes().to_vec();
        assert_eq!(bytes[8], CHUNK_COMPRESSED_CHANGE);
        let size = decoded_size(&bytes, 64 << 20).unwrap();
        assert!(size >= 1 << 20, "decoded {size} of {} bytes", bytes.len());
        assert!(decoded_size(&bytes, 512 << 10).is_err());
    }

    #[test]
    fn garbage_is_left_to_the_strict_load() {
        assert!(
            decoded_size(b"not automerge", 1 << 20).is_err(),
            "bad framing"
        );
        let mut save = bomb(1000);
        let cut = save.len() - 3;
        save.truncate(cut);
        assert!(decoded_size(&save, 1 << 20).is_err(), "truncated framing");
    }
}
