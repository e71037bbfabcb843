//! Chunk-list decoding (ferryd `verify::chunks`: the digests exchanged by initial sync and
//! online verify). Raw bytes, or bytes whose CRC was fixed up (first byte odd) so the
//! field checks behind it are reached. What decodes must re-encode to the same bytes,
//! every chunk range must lie inside the list's range, and a list diffed against
//! itself needs nothing shipped.
#![no_main]

use ferryd::verify::chunks::{self, ChunkList};
use libfuzzer_sys::fuzz_target;

/// Header length and CRC position of an encoded list (see `ChunkList::encode`).
const HEADER_LEN: usize = 48;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= HEADER_LEN {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[0..44]), &b[HEADER_LEN..]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(list) = ChunkList::decode(&b) else {
        return;
    };
    assert_eq!(list.encode(), b, "encode(decode(x)) != x");
    let end = list.offset + list.len;
    for i in 0..list.digests.len() {
        let (start, len) = list.chunk_range(i);
        assert!(
            start >= list.offset && start + len <= end && len > 0,
            "chunk {i} outside the list"
        );
    }
    let same = chunks::diff(&list, &list).expect("a list diffs against itself");
    assert!(same.is_empty(), "identical lists differ: {same:?}");
});
