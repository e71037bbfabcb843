//! Encrypted undo segments and entries (format version 3, "sealed"): the segment
//! header's key part (the segment's data key wrapped under the KEK), entry bodies
//! sealed with SM4-GCM in 4 KiB chunks, and the nonce rule. Pure: no IO.
//!
//! Why chunks and not one tag per entry: views read before-images in place, a few
//! KiB from the middle of entries of up to ~8 MiB; a tag per [`UNDO_SEAL_CHUNK`] of
//! body lets a view authenticate and decrypt only the chunks it reads. The tags go
//! in a table between the entry header and the ciphertext, so the ciphertext of
//! body byte `k` sits at a fixed distance from the entry (as the plaintext does in
//! an unencrypted entry) and `extent_data_offsets` still names it.
//!
//! Nonces (see `journal/FORMAT.md`, "Encrypted undo segments"): chunk `j` of the
//! entry at file offset `o` uses `unit_nonce(segment_no, o / 4096 + j)` under the
//! segment's data key. An entry of body length `L` has `ceil(L / 4096)` chunks and
//! occupies at least that many 4 KiB blocks (its header and tags come on top), so
//! two entries of one segment never share an index; the data key is drawn at random
//! each time a segment is created, and a log never appends to a sealed segment it
//! did not create in this process (recovery and truncation may cut a tail, and
//! appending over it would reuse nonces with other bytes).

use bytes::Bytes;
use ferry_gm::atrest::{DataKey, Kek, KeyId, WrappedKey, KEY_ID_LEN, WRAPPED_KEY_LEN};
use ferry_gm::TAG_LEN;

use crate::format::{rd_u16, rd_u32, salted_crc};
use crate::undo::entry::UndoEntry;
use crate::undo::error::UndoError;
use crate::undo::format::{
    encode_plain_parts, encode_segment_base, encode_undo_entry_header, UndoEntryHeader,
    UndoFormatError, UndoSegmentHeader, UNDO_ALIGN, UNDO_ENTRY_HEADER_LEN, UNDO_FORMAT_VERSION,
    UNDO_SEGMENT_FLAG_ALIGNED, UNDO_SEGMENT_FLAG_SEALED, UNDO_SEGMENT_HEADER_LEN,
};

/// Plaintext bytes of body sealed under one tag.
pub const UNDO_SEAL_CHUNK: u64 = 4096;
/// Bytes of one chunk tag in an entry's tag table.
pub const UNDO_TAG_LEN: usize = TAG_LEN;
/// Length of a sealed segment's header: the 64 bytes of the plaintext layout, then
/// the key part (key id, wrapped data key, reserved, checksum).
pub const UNDO_SEALED_SEGMENT_HEADER_LEN: usize = 128;
/// Where the key id starts in a sealed segment header.
const KEY_AT: usize = UNDO_SEGMENT_HEADER_LEN;
const WRAP_AT: usize = KEY_AT + KEY_ID_LEN;
const KEY_CRC_AT: usize = UNDO_SEALED_SEGMENT_HEADER_LEN - 4;

/// Bytes of the tag table of a body of `body_len` bytes.
pub fn tags_len(body_len: u64) -> u64 {
    body_len.div_ceil(UNDO_SEAL_CHUNK) * UNDO_TAG_LEN as u64
}

/// Bytes stored for a sealed body of `body_len` bytes: tags, then ciphertext.
pub fn sealed_len(body_len: u64) -> u64 {
    body_len + tags_len(body_len)
}

/// The body length of a sealed entry `total` bytes long (header included): each
/// full chunk costs 4096 + 16 stored bytes, a partial last one its length + 16.
pub(super) fn sealed_body_len(total: u64) -> Option<u64> {
    let stored = total.checked_sub(UNDO_ENTRY_HEADER_LEN as u64)?;
    let n = stored.div_ceil(UNDO_SEAL_CHUNK + UNDO_TAG_LEN as u64);
    let body = stored.checked_sub(n * UNDO_TAG_LEN as u64)?;
    (sealed_len(body) == stored).then_some(body)
}

/// A sealed segment's key part: the KEK's id and the wrapped data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoSegmentKey {
    pub key_id: KeyId,
    pub wrapped: WrappedKey,
}

/// Associated data of a sealed segment's wrapped data key: its header bytes 0..64
/// (segment number, cluster, first sequence, flags) and the key id, so the wrapped
/// key is valid only in this segment's header.
pub fn undo_segment_key_aad(h: &UndoSegmentHeader, key_id: KeyId) -> [u8; WRAP_AT] {
    let mut a = [0u8; WRAP_AT];
    a[..KEY_AT].copy_from_slice(&sealed_base(h));
    a[KEY_AT..].copy_from_slice(&key_id.0);
    a
}

fn sealed_base(h: &UndoSegmentHeader) -> [u8; UNDO_SEGMENT_HEADER_LEN] {
    encode_segment_base(
        h,
        UNDO_FORMAT_VERSION,
        UNDO_SEGMENT_FLAG_ALIGNED | UNDO_SEGMENT_FLAG_SEALED,
    )
}

/// The header of a sealed segment (always aligned): bytes 0..64 as in a plaintext
/// one (version 3, flags ALIGNED | SEALED, checksum at 60), then the key id, the
/// wrapped data key, 8 reserved zero bytes and a salted CRC32C of bytes 0..124.
pub fn encode_sealed_undo_segment_header(
    h: &UndoSegmentHeader,
    key: &UndoSegmentKey,
) -> [u8; UNDO_SEALED_SEGMENT_HEADER_LEN] {
    let mut b = [0u8; UNDO_SEALED_SEGMENT_HEADER_LEN];
    b[..KEY_AT].copy_from_slice(&sealed_base(h));
    b[KEY_AT..WRAP_AT].copy_from_slice(&key.key_id.0);
    b[WRAP_AT..WRAP_AT + WRAPPED_KEY_LEN].copy_from_slice(&key.wrapped.0);
    let crc = salted_crc(h.segment_no, &b[..KEY_CRC_AT]);
    b[KEY_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The key part of a segment header whose bytes 0..64 decoded
/// (`decode_undo_segment_header`): `None` for a plaintext segment.
pub fn decode_undo_segment_key(
    b: &[u8],
    segment_no: u64,
) -> Result<Option<UndoSegmentKey>, UndoFormatError> {
    if b.len() < UNDO_SEGMENT_HEADER_LEN || rd_u16(b, 10) & UNDO_SEGMENT_FLAG_SEALED == 0 {
        return Ok(None);
    }
    if b.len() < UNDO_SEALED_SEGMENT_HEADER_LEN {
        return Err(UndoFormatError::Truncated {
            need: UNDO_SEALED_SEGMENT_HEADER_LEN as u64,
            have: b.len() as u64,
        });
    }
    let stored = rd_u32(b, KEY_CRC_AT);
    let computed = salted_crc(segment_no, &b[..KEY_CRC_AT]);
    if stored != computed {
        return Err(UndoFormatError::HeaderCrc { stored, computed });
    }
    if b[WRAP_AT + WRAPPED_KEY_LEN..KEY_CRC_AT]
        .iter()
        .any(|&x| x != 0)
    {
        return Err(UndoFormatError::Invalid(
            "segment key part reserved bytes not zero".into(),
        ));
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&b[KEY_AT..WRAP_AT]);
    let mut w = [0u8; WRAPPED_KEY_LEN];
    w.copy_from_slice(&b[WRAP_AT..WRAP_AT + WRAPPED_KEY_LEN]);
    Ok(Some(UndoSegmentKey {
        key_id: KeyId(id),
        wrapped: WrappedKey(w),
    }))
}

/// Unwraps sealed segment `h`'s data key with the key of `kek`'s ring that its
/// header names. The id is looked up first, so a missing or wrong key is named as
/// such; an id that matches with a wrap that does not authenticate means the header
/// was altered.
pub(super) fn unwrap_segment_key(
    path: &std::path::Path,
    h: &UndoSegmentHeader,
    key: &UndoSegmentKey,
    kek: Option<&Kek>,
) -> Result<DataKey, UndoError> {
    let Some(ring) = kek else {
        return Err(UndoError::KeyRequired {
            file: path.to_path_buf(),
            key_id: key.key_id,
        });
    };
    let Some(k) = ring.for_id(key.key_id) else {
        return Err(UndoError::WrongKey {
            file: path.to_path_buf(),
            found: key.key_id,
            configured: ring.id(),
        });
    };
    k.unwrap(&key.wrapped, &undo_segment_key_aad(h, key.key_id))
        .map_err(|e| {
            UndoError::corrupt(
                path,
                UNDO_SEGMENT_HEADER_LEN as u64,
                format!(
                    "the wrapped data key (key id {}) does not unwrap ({e}): the segment header was altered",
                    key.key_id
                ),
            )
        })
}

/// Associated data of every chunk of an entry: its header bytes 0..52 with the body
/// checksum (36..40) zeroed, since that checksum covers the tags.
fn entry_aad(header: &[u8]) -> [u8; 52] {
    let mut a = [0u8; 52];
    a.copy_from_slice(&header[..52]);
    a[36..40].fill(0);
    a
}

/// Nonce index of chunk `j` of the entry at file offset `offset`.
fn chunk_index(offset: u64, j: u64) -> Option<u32> {
    u32::try_from((offset / UNDO_ALIGN).checked_add(j)?).ok()
}

/// Encodes entry `e` sealed under segment `segment_no`'s data key `dk`, to be
/// written at file offset `offset` (4 KiB aligned): header (version 3, flag
/// SEALED, `body_len` the plaintext length, `body_crc` over the stored bytes), tag
/// table, ciphertext.
pub fn encode_sealed_undo_entry(
    e: &UndoEntry,
    segment_no: u64,
    offset: u64,
    dk: &DataKey,
) -> Result<Vec<u8>, UndoError> {
    let (mut out, mut h) = encode_plain_parts(e, segment_no)?;
    let n = h.body_len.div_ceil(UNDO_SEAL_CHUNK);
    if offset % UNDO_ALIGN != 0 || chunk_index(offset, n).is_none() {
        return Err(UndoError::InvalidEntry(format!(
            "a sealed entry at offset {offset} is past the nonce space of a segment (16 TiB) or unaligned"
        )));
    }
    let tags = tags_len(h.body_len) as usize;
    let hl = UNDO_ENTRY_HEADER_LEN;
    out.splice(hl..hl, std::iter::repeat_n(0u8, tags));
    h.sealed = true;
    h.body_crc = 0;
    let aad = entry_aad(&encode_undo_entry_header(&h, segment_no));
    let (head, body) = out.split_at_mut(hl + tags);
    for (j, chunk) in body.chunks_mut(UNDO_SEAL_CHUNK as usize).enumerate() {
        let idx = chunk_index(offset, j as u64).expect("checked above for every chunk");
        let tag = dk
            .seal(segment_no, idx, &aad, chunk)
            .map_err(|e| UndoError::Crypto(format!("sealing undo chunk {j}: {e}")))?;
        head[hl + j * UNDO_TAG_LEN..hl + (j + 1) * UNDO_TAG_LEN].copy_from_slice(&tag);
    }
    h.body_crc = salted_crc(segment_no, &out[hl..]);
    out[..hl].copy_from_slice(&encode_undo_entry_header(&h, segment_no));
    Ok(out)
}

/// Authenticates and decrypts chunks `j0..` of the sealed entry whose header is `h`
/// (`header` its bytes) at file offset `offset`: `tags` hold their tags, `ct` their
/// ciphertext (chunk `j0` first), decrypted in place. The error names the first
/// chunk that does not authenticate.
pub(super) fn open_chunks(
    dk: &DataKey,
    segment_no: u64,
    offset: u64,
    header: &[u8],
    j0: u64,
    tags: &[u8],
    ct: &mut [u8],
) -> Result<(), String> {
    let aad = entry_aad(header);
    for (k, chunk) in ct.chunks_mut(UNDO_SEAL_CHUNK as usize).enumerate() {
        let j = j0 + k as u64;
        let bad = || {
            format!(
                "chunk {j} does not authenticate: the entry was altered, or it was not written under this segment's key"
            )
        };
        let idx = chunk_index(offset, j).ok_or_else(bad)?;
        let mut tag = [0u8; UNDO_TAG_LEN];
        let t = tags
            .get(k * UNDO_TAG_LEN..(k + 1) * UNDO_TAG_LEN)
            .ok_or_else(bad)?;
        tag.copy_from_slice(t);
        dk.open(segment_no, idx, &aad, chunk, &tag)
            .map_err(|_| bad())?;
    }
    Ok(())
}

/// Opens a whole sealed body: `stored` is the tag table and ciphertext read after
/// the header (checksum already checked); returns the plaintext body (a zero-copy
/// slice of `stored`).
pub(super) fn open_body(
    dk: &DataKey,
    segment_no: u64,
    offset: u64,
    h: &UndoEntryHeader,
    header: &[u8],
    mut stored: Vec<u8>,
) -> Result<Bytes, String> {
    let tags = tags_len(h.body_len) as usize;
    if stored.len() != tags + h.body_len as usize {
        return Err(format!(
            "sealed body is {} bytes, header says {}",
            stored.len(),
            tags + h.body_len as usize
        ));
    }
    let (t, ct) = stored.split_at_mut(tags);
    open_chunks(dk, segment_no, offset, header, 0, t, ct)?;
    Ok(Bytes::from(stored).slice(tags..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_lengths_invert() {
        for body in [0u64, 1, 16, 4095, 4096, 4097, 8192, 8 << 20, (8 << 20) + 17] {
            let total = UNDO_ENTRY_HEADER_LEN as u64 + sealed_len(body);
            assert_eq!(sealed_body_len(total), Some(body), "body {body}");
        }
        assert_eq!(tags_len(4097), 32);
        // A stored length no body has (a lone tag with no ciphertext).
        assert_eq!(sealed_body_len(UNDO_ENTRY_HEADER_LEN as u64 + 16), None);
    }

    #[test]
    fn chunk_indices_stay_in_the_entry_and_the_u32_space() {
        assert_eq!(chunk_index(4096, 0), Some(1));
        assert_eq!(chunk_index(8192, 3), Some(5));
        assert_eq!(chunk_index(u32::MAX as u64 * 4096, 1), None);
    }
}
