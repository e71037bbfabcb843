//! Verified reads of one undo entry from its segment file: the position is
//! bounds-checked against the segment, the header and body are read with plain
//! `pread`s, and both checksums are verified before anything is returned. Which
//! positions may be read at all (indexed entries only) is the log's decision.

use bytes::Bytes;

use crate::undo::entry::{UndoEntry, UndoPosition};
use crate::undo::error::UndoError;
use crate::undo::format::{
    decode_undo_entry_body, decode_undo_entry_header, UNDO_ENTRY_HEADER_LEN,
    UNDO_SEGMENT_HEADER_LEN,
};
use crate::undo::segment::{read_at, Segment};

/// Reads and verifies the entry at `pos` of segment `s` (`pos.segment_no == s.no`).
pub(super) fn read_entry(s: &Segment, pos: &UndoPosition) -> Result<UndoEntry, UndoError> {
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
    // body_len <= pos.len <= file length: bounded before allocating.
    let mut body = vec![0u8; h.body_len as usize];
    read_at(
        &s.file,
        &s.path,
        &mut body,
        pos.offset + UNDO_ENTRY_HEADER_LEN as u64,
    )?;
    decode_undo_entry_body(&h, s.no, &Bytes::from(body))
        .map_err(|e| UndoError::corrupt(&s.path, pos.offset, format!("entry body: {e}")))
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
        };
        let pos = UndoPosition {
            segment_no: 3,
            offset: UNDO_ALIGN,
            len: bytes.len() as u64,
        };
        (seg, pos)
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
