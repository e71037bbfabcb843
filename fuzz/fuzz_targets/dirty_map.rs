//! The persisted dirty-region bitmap (ferryd `ship::dirty::DirtyMap`): the input is
//! written as a map file (with its header and bitmap CRCs fixed up when the first
//! byte is odd, so the field checks behind them are reached) and opened. Open must
//! refuse or return a map whose counts agree with its bits; a map that opens
//! survives a flush (unless its generation is exhausted) and reopens identical.
#![no_main]

use ferry_fuzz::Scratch;
use ferryd::ship::dirty::{DirtyError, DirtyMap, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= HEADER_LEN {
        // bitmap CRC: generation (bytes 24..32) then the bitmap; header CRC: 0..60.
        let bitmap_crc = crc32c::crc32c_append(crc32c::crc32c(&b[24..32]), &b[HEADER_LEN..]);
        b[56..60].copy_from_slice(&bitmap_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&header_crc.to_le_bytes());
    }
    let scratch = Scratch::new("dirty");
    std::fs::create_dir_all(&scratch.0).expect("scratch dir");
    let path = scratch.0.join("map");
    std::fs::write(&path, &b).expect("write map");
    let Ok(mut map) = DirtyMap::open(&path) else {
        return;
    };
    let ranges: Vec<(u64, u64)> = map.dirty_ranges().collect();
    let covered: u64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(
        covered,
        map.dirty_bytes(),
        "dirty runs and dirty bytes disagree"
    );
    assert!(map.count() <= map.regions());
    for &(off, len) in ranges.iter().take(64) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= map.volume_size()),
            "range past the volume"
        );
        assert!(map.is_dirty(off, len));
    }
    let _ = map.next_dirty_range(0);
    map.mark_all();
    assert_eq!(map.count(), map.regions());
    match map.flush() {
        Ok(()) => {}
        // A forged header at the last generation: no later image exists.
        Err(DirtyError::BadHeader {
            field: "generation",
            ..
        }) => return,
        Err(e) => panic!("flush an opened map: {e}"),
    }
    let again = DirtyMap::open(&path).expect("reopen a flushed map");
    assert_eq!(again.count(), map.count());
    assert_eq!(again.volume_size(), map.volume_size());
    assert_eq!(again.region_size(), map.region_size());
});
