//! Verified reads of one undo entry from its segment file: the position is
//! bounds-checked against the segment, the header and body are read with plain
//! `pread`s, and both checksums are verified before anything is returned. Which
//! positions may be read at all (indexed entries only) is the log's decision.
//! [`verify_entry`] checks the same without keeping the body: it streams it in
//! [`VERIFY_CHUNK`] pieces (bounded memory whatever the entry size). A sealed
//! entry's chunks are authenticated and decrypted on the way (`seal`).
//! [`UndoImageReader`] serves views: before-image bytes read in place, by file
//! offset, decrypting only the chunks they fall in.

use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ferry_gm::atrest::{DataKey, Kek};

use crate::format::{rd_u32, rd_u64, salted_crc};
use crate::undo::format::{UndoEntryHeader, UNDO_EXTENT_HEADER_LEN, UNDO_EXTENT_ZERO_FLAG};

use crate::undo::entry::{UndoEntry, UndoPosition};
use crate::undo::error::UndoError;
use crate::undo::format::{
    decode_undo_entry_body, decode_undo_entry_header, decode_undo_extents,
    decode_undo_segment_header, UNDO_ENTRY_HEADER_LEN, UNDO_SEGMENT_HEADER_LEN,
};
use crate::undo::seal::{
    self, decode_undo_segment_key, tags_len, UNDO_SEALED_SEGMENT_HEADER_LEN, UNDO_SEAL_CHUNK,
    UNDO_TAG_LEN,
};
use crate::undo::segment::{read_at, undo_segment_file_name, Segment};

/// Bytes of an entry body read at a time by [`verify_entry`].
const VERIFY_CHUNK: usize = 1 << 20;

/// Reads the header of the entry at `pos` of segment `s` (`pos.segment_no == s.no`)
/// after bounds-checking the position; checks it against the index's length and
/// the segment's encryption. Returns it and its bytes (a sealed body's AAD).
fn read_header(
    s: &Segment,
    pos: &UndoPosition,
) -> Result<(UndoEntryHeader, [u8; UNDO_ENTRY_HEADER_LEN]), UndoError> {
    if pos.len < UNDO_ENTRY_HEADER_LEN as u64
        || pos.offset < UNDO_SEGMENT_HEADER_LEN as u64
        || pos.offset.checked_add(pos.len).is_none_or(|e| e > s.len)
    {
        return Err(UndoError::UnknownPosition(*pos));
    }
    let mut hb = [0u8; UNDO_ENTRY_HEADER_LEN];
    read_at(&s.file, &s.path, &mut hb, pos.offset)?;
    let h = decode_undo_entry_header(&hb, s.no)
        .map_err(|e| UndoError::corrupt(&s.path, pos.offset, format!("entry header: {e}")))?;
    if h.total_len() != pos.len {
        return Err(UndoError::corrupt(
            &s.path,
            pos.offset,
            format!("entry is {} bytes, index says {}", h.total_len(), pos.len),
        ));
    }
    if h.sealed != s.key.is_some() {
        return Err(UndoError::corrupt(
            &s.path,
            pos.offset,
            "entry sealed flag does not match its segment's encryption",
        ));
    }
    Ok((h, hb))
}

/// Checks the entry at `pos` of segment `s` as [`read_entry`] would (header, body
/// checksum, extent layout) without holding its body: the body is read in
/// [`VERIFY_CHUNK`] pieces. `Corruption` names the file and the entry's offset.
pub(super) fn verify_entry(s: &Segment, pos: &UndoPosition) -> Result<(), UndoError> {
    let (h, hb) = read_header(s, pos)?;
    if let Some(dk) = &s.key {
        return verify_sealed(s, dk, pos, &h, &hb);
    }
    let mut body = BodyCheck::new(s.no, h.extent_count);
    let mut chunk = vec![0u8; (h.body_len as usize).min(VERIFY_CHUNK)];
    let mut done = 0u64;
    let start = pos.offset + UNDO_ENTRY_HEADER_LEN as u64;
    // Bounded: `done` grows by at least one byte per round up to `body_len`.
    while done < h.body_len {
        let n = ((h.body_len - done) as usize).min(chunk.len());
        read_at(&s.file, &s.path, &mut chunk[..n], start + done)?;
        body.feed(&chunk[..n]);
        done += n as u64;
    }
    body.finish(Some(h.body_crc))
        .map_err(|e| UndoError::corrupt(&s.path, pos.offset, format!("entry body: {e}")))
}

/// [`verify_entry`] of a sealed entry: the tag table is read whole (1/256 of the
/// body), the ciphertext in [`VERIFY_CHUNK`] pieces, each checksummed, authenticated
/// and decrypted, and the plaintext checked as a plaintext body is.
fn verify_sealed(
    s: &Segment,
    dk: &DataKey,
    pos: &UndoPosition,
    h: &UndoEntryHeader,
    hb: &[u8],
) -> Result<(), UndoError> {
    let corrupt = |e: String| UndoError::corrupt(&s.path, pos.offset, format!("entry body: {e}"));
    let start = pos.offset + UNDO_ENTRY_HEADER_LEN as u64;
    let mut tags = vec![0u8; tags_len(h.body_len) as usize];
    read_at(&s.file, &s.path, &mut tags, start)?;
    let mut crc = crc32c::crc32c_append(salted_crc(s.no, &[]), &tags);
    let ct_start = start + tags.len() as u64;
    let mut body = BodyCheck::new(s.no, h.extent_count);
    let mut chunk = vec![0u8; (h.body_len as usize).min(VERIFY_CHUNK)];
    let mut done = 0u64;
    let mut auth = Ok(());
    // Bounded: `done` grows by at least one byte per round up to `body_len`.
    while done < h.body_len {
        let n = ((h.body_len - done) as usize).min(chunk.len());
        let piece = &mut chunk[..n];
        read_at(&s.file, &s.path, piece, ct_start + done)?;
        crc = crc32c::crc32c_append(crc, piece);
        if auth.is_ok() {
            // VERIFY_CHUNK is a multiple of the seal chunk: pieces start at a chunk.
            let j0 = done / UNDO_SEAL_CHUNK;
            let t = &tags[j0 as usize * UNDO_TAG_LEN..];
            auth = seal::open_chunks(dk, s.no, pos.offset, hb, j0, t, piece);
            body.feed(piece);
        }
        done += n as u64;
    }
    // The checksum first, as for a plaintext body (a flipped bit says so plainly);
    // a right checksum with a wrong tag is tampering.
    if crc != h.body_crc {
        return Err(corrupt(format!(
            "body crc mismatch (stored {:#010x}, computed {crc:#010x})",
            h.body_crc
        )));
    }
    auth.map_err(corrupt)?;
    body.finish(None).map_err(corrupt)
}

/// Incremental check of an entry body: its salted CRC, and that its extent headers
/// chain exactly to its end (the structure `decode_undo_entry_body` checks).
struct BodyCheck {
    crc: u32,
    extents: u32,
    seen: u32,
    /// Before-image bytes of the current extent still to skip.
    skip: u64,
    /// Partial extent header carried over a chunk boundary.
    hdr: [u8; UNDO_EXTENT_HEADER_LEN],
    have: usize,
    /// Body offset of the next byte fed.
    at: u64,
    error: Option<String>,
}

impl BodyCheck {
    fn new(segment_no: u64, extents: u32) -> BodyCheck {
        BodyCheck {
            crc: salted_crc(segment_no, &[]),
            extents,
            seen: 0,
            skip: 0,
            hdr: [0; UNDO_EXTENT_HEADER_LEN],
            have: 0,
            at: 0,
            error: None,
        }
    }

    fn feed(&mut self, mut b: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, b);
        // Bounded: every round consumes at least one byte or stops.
        while !b.is_empty() && self.error.is_none() {
            let n = if self.skip > 0 {
                let n = (self.skip as usize).min(b.len());
                self.skip -= n as u64;
                n
            } else if self.seen == self.extents {
                self.error = Some(format!("trailing body bytes at body offset {}", self.at));
                break;
            } else {
                let n = (UNDO_EXTENT_HEADER_LEN - self.have).min(b.len());
                self.hdr[self.have..self.have + n].copy_from_slice(&b[..n]);
                self.have += n;
                n
            };
            b = &b[n..];
            self.at += n as u64;
            if self.have == UNDO_EXTENT_HEADER_LEN {
                self.extent_header();
            }
        }
    }

    /// A complete extent header was collected: check it, skip its bytes next.
    fn extent_header(&mut self) {
        self.have = 0;
        let field = rd_u32(&self.hdr, 4);
        let offset = rd_u64(&self.hdr, 8);
        let zero = field & UNDO_EXTENT_ZERO_FLAG != 0;
        let len = (field & !UNDO_EXTENT_ZERO_FLAG) as u64;
        if len == 0 || offset.checked_add(len).is_none() {
            self.error = Some(format!(
                "extent {} (ending at body offset {}): length {len} or offset {offset} invalid",
                self.seen, self.at
            ));
        }
        self.skip = if zero { 0 } else { len };
        self.seen += 1;
    }

    /// `stored`: the body checksum to compare (a sealed body's checksum covers
    /// its ciphertext, checked by the caller: `None`).
    fn finish(self, stored: Option<u32>) -> Result<(), String> {
        // The checksum first: damage is most likely a flipped bit, and a wrong CRC
        // says so more plainly than the structural error it may also cause.
        if let Some(stored) = stored.filter(|&c| c != self.crc) {
            return Err(format!(
                "body crc mismatch (stored {stored:#010x}, computed {:#010x})",
                self.crc
            ));
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.seen != self.extents || self.have != 0 || self.skip != 0 {
            return Err(format!(
                "extents overrun the body ({} of {} complete)",
                self.seen, self.extents
            ));
        }
        Ok(())
    }
}

/// Reads and verifies the entry at `pos` of segment `s` (`pos.segment_no == s.no`).
pub(super) fn read_entry(s: &Segment, pos: &UndoPosition) -> Result<UndoEntry, UndoError> {
    let (h, hb) = read_header(s, pos)?;
    let corrupt = |e: String| UndoError::corrupt(&s.path, pos.offset, format!("entry body: {e}"));
    // stored_body_len <= pos.len <= file length: bounded before allocating.
    let mut body = vec![0u8; h.stored_body_len() as usize];
    read_at(
        &s.file,
        &s.path,
        &mut body,
        pos.offset + UNDO_ENTRY_HEADER_LEN as u64,
    )?;
    let Some(dk) = &s.key else {
        return decode_undo_entry_body(&h, s.no, &Bytes::from(body))
            .map_err(|e| corrupt(e.to_string()));
    };
    let computed = salted_crc(s.no, &body);
    if computed != h.body_crc {
        return Err(corrupt(format!(
            "body crc mismatch (stored {:#010x}, computed {computed:#010x})",
            h.body_crc
        )));
    }
    let plain = seal::open_body(dk, s.no, pos.offset, &h, &hb, body).map_err(corrupt)?;
    decode_undo_extents(&h, &plain).map_err(|e| corrupt(e.to_string()))
}

/// Reads before-image bytes in place for a view, by file offset (as
/// `extent_data_offsets` names them), from one undo segment file opened apart from
/// the log (a view keeps it open while the log appends). In a sealed segment only
/// the chunks the bytes fall in are read, authenticated and decrypted.
pub struct UndoImageReader {
    no: u64,
    path: PathBuf,
    file: File,
    key: Option<DataKey>,
}

impl core::fmt::Debug for UndoImageReader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("UndoImageReader")
            .field("path", &self.path)
            .field("sealed", &self.key.is_some())
            .finish()
    }
}

impl UndoImageReader {
    /// Opens segment `no` of the log in `dir`; a sealed one's data key is
    /// unwrapped with `kek`'s ring (refused without the key it names).
    pub fn open(dir: &Path, no: u64, kek: Option<&Kek>) -> Result<UndoImageReader, UndoError> {
        let path = dir.join(undo_segment_file_name(no));
        let file =
            File::open(&path).map_err(|e| UndoError::io(format!("open {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| UndoError::io(format!("stat {}", path.display()), e))?
            .len();
        let mut hb = [0u8; UNDO_SEALED_SEGMENT_HEADER_LEN];
        let n = (len as usize).min(hb.len());
        read_at(&file, &path, &mut hb[..n], 0)?;
        let corrupt = |e: crate::undo::format::UndoFormatError| {
            UndoError::corrupt(&path, 0, format!("segment header: {e}"))
        };
        let h = decode_undo_segment_header(&hb[..n], no).map_err(corrupt)?;
        let key = match decode_undo_segment_key(&hb[..n], no).map_err(corrupt)? {
            Some(k) => Some(seal::unwrap_segment_key(&path, &h, &k, kek)?),
            None => None,
        };
        Ok(UndoImageReader {
            no,
            path,
            file,
            key,
        })
    }

    /// Fills `buf` with the before-image bytes at file offset `at`, inside the body
    /// of the entry at `entry` (an indexed position of this segment).
    pub fn read_image(
        &self,
        entry: &UndoPosition,
        at: u64,
        buf: &mut [u8],
    ) -> Result<(), UndoError> {
        let Some(dk) = &self.key else {
            return read_at(&self.file, &self.path, buf, at);
        };
        let body_len =
            seal::sealed_body_len(entry.len).ok_or(UndoError::UnknownPosition(*entry))?;
        let body = entry.offset + UNDO_ENTRY_HEADER_LEN as u64 + tags_len(body_len);
        let end = at.checked_add(buf.len() as u64);
        if entry.segment_no != self.no || at < body || end.is_none_or(|e| e > body + body_len) {
            return Err(UndoError::UnknownPosition(*entry));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let (rel, rel_end) = (at - body, at - body + buf.len() as u64);
        let j0 = rel / UNDO_SEAL_CHUNK;
        let j1 = (rel_end - 1) / UNDO_SEAL_CHUNK;
        let mut hb = [0u8; UNDO_ENTRY_HEADER_LEN];
        read_at(&self.file, &self.path, &mut hb, entry.offset)?;
        let mut tags = vec![0u8; (j1 - j0 + 1) as usize * UNDO_TAG_LEN];
        let tags_at = entry.offset + UNDO_ENTRY_HEADER_LEN as u64 + j0 * UNDO_TAG_LEN as u64;
        read_at(&self.file, &self.path, &mut tags, tags_at)?;
        let ct_end = ((j1 + 1) * UNDO_SEAL_CHUNK).min(body_len);
        let mut ct = vec![0u8; (ct_end - j0 * UNDO_SEAL_CHUNK) as usize];
        read_at(&self.file, &self.path, &mut ct, body + j0 * UNDO_SEAL_CHUNK)?;
        seal::open_chunks(dk, self.no, entry.offset, &hb, j0, &tags, &mut ct).map_err(|e| {
            UndoError::corrupt(&self.path, entry.offset, format!("entry body: {e}"))
        })?;
        let from = (rel - j0 * UNDO_SEAL_CHUNK) as usize;
        buf.copy_from_slice(&ct[from..from + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::undo::entry::{EntryKind, UndoExtent};
    use crate::undo::format::{
        encode_undo_entry, encode_undo_segment_header, pad_to, UndoSegmentHeader, UNDO_ALIGN,
    };
    use crate::undo::segment::{create_durably, undo_segment_file_name};

    /// An aligned segment 3 holding `e` as its only entry, and the entry's position.
    fn segment_with(dir: &std::path::Path, e: &UndoEntry) -> (Segment, UndoPosition) {
        let hdr = encode_undo_segment_header(&UndoSegmentHeader {
            segment_no: 3,
            cluster_id: [1; 16],
            first_seq: e.first_seq,
            aligned: true,
        });
        let bytes = encode_undo_entry(e, 3).unwrap();
        let mut image = vec![0u8; (UNDO_ALIGN + pad_to(bytes.len() as u64, true)) as usize];
        image[..hdr.len()].copy_from_slice(&hdr);
        image[UNDO_ALIGN as usize..UNDO_ALIGN as usize + bytes.len()].copy_from_slice(&bytes);
        let file = create_durably(dir, 3, &image).unwrap();
        let seg = Segment {
            no: 3,
            path: dir.join(undo_segment_file_name(3)),
            file,
            direct: None,
            aligned: true,
            len: image.len() as u64,
            first_point: 0,
            entries: 1,
            key: None,
            appendable: false,
        };
        let pos = UndoPosition {
            segment_no: 3,
            offset: UNDO_ALIGN,
            len: bytes.len() as u64,
        };
        (seg, pos)
    }

    /// The streaming check agrees with `decode_undo_entry_body` whatever the piece
    /// size (extent headers split across pieces), on a good body and on bodies whose
    /// CRC is right but whose extents do not chain to the end.
    #[test]
    fn body_check_in_any_piece_size_matches_the_decoder() {
        let e = UndoEntry {
            first_seq: 1,
            last_seq: 1,
            timestamp_ns: 0,
            extents: vec![
                UndoExtent::data(1, 0, Bytes::from(vec![5u8; 37])),
                UndoExtent::zeros(1, 4096, 100),
                UndoExtent::data(2, 9, Bytes::from_static(b"xyz")),
            ],
            kind: EntryKind::WriteSet,
        };
        let bytes = encode_undo_entry(&e, 3).unwrap();
        let good = bytes[UNDO_ENTRY_HEADER_LEN..].to_vec();
        let mut overrun = good.clone();
        overrun[4] = 38; // first extent claims one byte more than it holds
        let mut trailing = good.clone();
        trailing.push(0);
        for (body, ok) in [(good, true), (overrun, false), (trailing, false)] {
            let crc = salted_crc(3, &body);
            for piece in [1, 3, 16, 17, body.len()] {
                let mut c = BodyCheck::new(3, 3);
                for p in body.chunks(piece) {
                    c.feed(p);
                }
                assert_eq!(c.finish(Some(crc)).is_ok(), ok, "piece {piece}");
            }
            let mut c = BodyCheck::new(3, 3);
            c.feed(&body);
            assert!(c.finish(Some(crc ^ 1)).unwrap_err().contains("crc"));
        }
    }

    #[test]
    fn reads_back_and_checks_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let e = UndoEntry {
            first_seq: 4,
            last_seq: 6,
            timestamp_ns: 9,
            extents: vec![
                UndoExtent::data(1, 512, Bytes::from_static(b"old bytes")),
                UndoExtent::zeros(1, 4096, 8192),
            ],
            kind: EntryKind::WriteSet,
        };
        let (seg, pos) = segment_with(dir.path(), &e);
        assert_eq!(read_entry(&seg, &pos).unwrap(), e);
        // A length that disagrees with the header is corruption, not a short read.
        let short = UndoPosition {
            len: pos.len - 1,
            ..pos
        };
        assert!(matches!(
            read_entry(&seg, &short),
            Err(UndoError::Corruption { .. })
        ));
        // Positions outside the segment (or inside its header) are never read.
        for bad in [
            UndoPosition {
                offset: seg.len,
                ..pos
            },
            UndoPosition { offset: 0, ..pos },
            UndoPosition {
                offset: u64::MAX - 1,
                ..pos
            },
        ] {
            assert!(matches!(
                read_entry(&seg, &bad),
                Err(UndoError::UnknownPosition(_))
            ));
        }
    }
}
