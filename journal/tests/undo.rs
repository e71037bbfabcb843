//! Undo log tests: golden bytes, round trips, garbage never panics, recovery
//! (torn last entry vs corruption), time index, rollback simulation, truncate and
//! release across reopen.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use ferry_journal::undo::*;
use proptest::prelude::*;

const CLUSTER: [u8; 16] = *b"ferry-cluster-01";

fn ext(volume: u32, offset: u64, data: &[u8]) -> UndoExtent {
    UndoExtent::data(volume, offset, Bytes::copy_from_slice(data))
}

/// Entry for write-set `n` (seqs 10n+1 ..= 10n+10), timestamp 1000 n.
fn entry(n: u64) -> UndoEntry {
    UndoEntry {
        first_seq: 10 * n + 1,
        last_seq: 10 * n + 10,
        timestamp_ns: 1000 * n,
        extents: vec![
            ext(1, n * 4096, &vec![n as u8; 1000 + n as usize]),
            ext(2, 7, &[0xAB; 33]),
        ],
        kind: EntryKind::WriteSet,
    }
}

fn open(dir: &Path, seg: u64) -> (UndoLog, UndoRecovery) {
    UndoLog::open(dir, CLUSTER, seg).expect("open")
}

fn seg_path(dir: &Path, no: u64) -> std::path::PathBuf {
    dir.join(undo_segment_file_name(no))
}

// ---------------------------------------------------------------- format

#[test]
fn golden_entry_bytes() {
    let e = UndoEntry {
        first_seq: 10,
        last_seq: 12,
        timestamp_ns: 1_700_000_000_000_000_000,
        extents: vec![ext(7, 4096, b"abcd")],
        kind: EntryKind::WriteSet,
    };
    #[rustfmt::skip]
    let expected: [u8; 56 + 20] = [
        b'F', b'R', b'Y', b'U',                 // 0  magic
        2, 0,                                   // 4  version
        0, 0,                                   // 6  flags
        10, 0, 0, 0, 0, 0, 0, 0,                // 8  first_seq
        12, 0, 0, 0, 0, 0, 0, 0,                // 16 last_seq
        0, 0, 42, 54, 254, 156, 151, 23,        // 24 timestamp_ns
        1, 0, 0, 0,                             // 32 extent_count
        131, 186, 235, 209,                     // 36 body_crc (salted with segment 3)
        20, 0, 0, 0, 0, 0, 0, 0,                // 40 body_len
        0, 0, 0, 0,                             // 48 reserved
        36, 122, 214, 254,                      // 52 header_crc (salted with segment 3)
        // extent header
        7, 0, 0, 0,                             // 0  volume
        4, 0, 0, 0,                             // 4  length
        0, 0x10, 0, 0, 0, 0, 0, 0,              // 8  offset 4096
        b'a', b'b', b'c', b'd',                 // before-image
    ];
    let got = encode_undo_entry(&e, 3).unwrap();
    assert_eq!(got, expected);
    // The CRC definition, independently: crc32c over the LE segment number, then bytes.
    let salted = |b: &[u8]| crc32c::crc32c_append(crc32c::crc32c(&3u64.to_le_bytes()), b);
    assert_eq!(salted(&expected[56..]).to_le_bytes(), expected[36..40]);
    assert_eq!(salted(&expected[..52]).to_le_bytes(), expected[52..56]);
    let (back, n) = decode_undo_entry(&Bytes::copy_from_slice(&got), 3).unwrap();
    assert_eq!((back, n), (e.clone(), 76));
    // Another segment's salt: the header does not validate.
    assert!(matches!(
        decode_undo_entry_header(&got, 4),
        Err(UndoFormatError::HeaderCrc { .. })
    ));
    // The same entry as version 1 wrote it (golden header CRC of that version) is
    // still read, as the same entry.
    let mut v1 = got.clone();
    v1[4] = 1;
    v1[52..56].copy_from_slice(&[40, 93, 173, 218]);
    assert_eq!(salted(&v1[..52]).to_le_bytes(), v1[52..56]);
    let (old, n) = decode_undo_entry(&Bytes::copy_from_slice(&v1), 3).unwrap();
    assert_eq!((old, n), (e.clone(), 76));
    // CRC-valid header with an unknown version (3 is the sealed format now) is
    // "checksummed", never torn.
    for version in [0u8, 4] {
        let mut v = got.clone();
        v[4] = version;
        let crc = salted(&v[..52]);
        v[52..56].copy_from_slice(&crc.to_le_bytes());
        let err = decode_undo_entry_header(&v, 3).unwrap_err();
        assert_eq!(err, UndoFormatError::UnsupportedVersion(version.into()));
        assert!(err.is_checksummed());
    }
}

#[test]
fn golden_zero_extent_bytes() {
    // A zero extent is a header alone: the length field carries the zero flag.
    let e = UndoEntry {
        first_seq: 5,
        last_seq: 5,
        timestamp_ns: 9,
        extents: vec![UndoExtent::zeros(2, 8192, 1 << 20)],
        kind: EntryKind::WriteSet,
    };
    let got = encode_undo_entry(&e, 1).unwrap();
    assert_eq!(got.len(), 56 + 16);
    #[rustfmt::skip]
    let extent: [u8; 16] = [
        2, 0, 0, 0,                             // 0  volume
        0, 0, 0x10, 0x80,                       // 4  length 1 MiB | zero flag (bit 31)
        0, 0x20, 0, 0, 0, 0, 0, 0,              // 8  offset 8192
    ];
    assert_eq!(got[56..], extent);
    assert_eq!(got[40..48], 16u64.to_le_bytes()); // body_len: no data bytes
    let (back, n) = decode_undo_entry(&Bytes::copy_from_slice(&got), 1).unwrap();
    assert_eq!(
        (back.extents[0].len(), back.extents[0].data.len(), n),
        (1 << 20, 0, 72)
    );
    assert_eq!(back, e);
    // Data and zeros at once, or neither, is refused.
    let mut both = UndoExtent::zeros(2, 0, 4);
    both.data = Bytes::from_static(b"abcd");
    for bad in [
        both,
        UndoExtent::zeros(2, 0, 0),
        UndoExtent::zeros(2, 0, 1 << 31),
    ] {
        let e = UndoEntry {
            extents: vec![bad],
            ..e.clone()
        };
        assert!(matches!(
            encode_undo_entry(&e, 1),
            Err(UndoError::InvalidEntry(_))
        ));
    }
    // Extent data offsets: after the entry header and each extent header.
    let pos = UndoPosition {
        segment_no: 1,
        offset: 64,
        len: 0,
    };
    let mixed = UndoEntry {
        extents: vec![
            ext(1, 0, b"xy"),
            UndoExtent::zeros(1, 2, 9),
            ext(1, 20, b"z"),
        ],
        ..e
    };
    assert_eq!(
        extent_data_offsets(&pos, &mixed),
        vec![Some(64 + 56 + 16), None, Some(64 + 56 + 16 + 2 + 16 + 16)]
    );
}

#[test]
fn golden_segment_header() {
    // Packed layout (segments of earlier versions: readable, never appended to).
    let h = UndoSegmentHeader {
        segment_no: 3,
        cluster_id: CLUSTER,
        first_seq: 10,
        aligned: false,
    };
    #[rustfmt::skip]
    let expected: [u8; 64] = [
        b'F', b'E', b'R', b'R', b'Y', b'U', b'N', b'D', // 0  magic
        2, 0,                                           // 8  version
        0, 0,                                           // 10 flags
        0, 0, 0, 0,                                     // 12 reserved
        3, 0, 0, 0, 0, 0, 0, 0,                         // 16 segment_no
        b'f', b'e', b'r', b'r', b'y', b'-', b'c', b'l', // 24 cluster_id
        b'u', b's', b't', b'e', b'r', b'-', b'0', b'1',
        10, 0, 0, 0, 0, 0, 0, 0,                        // 40 first_seq
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,             // 48 reserved
        177, 246, 140, 232,                             // 60 header_crc
    ];
    assert_eq!(encode_undo_segment_header(&h), expected);
    // As version 1 wrote it: still read.
    let mut v1 = expected;
    v1[8] = 1;
    v1[60..64].copy_from_slice(&[190, 157, 211, 1]);
    assert_eq!(decode_undo_segment_header(&v1, 3), Ok(h));
    assert_eq!(decode_undo_segment_header(&expected, 3), Ok(h));
    assert!(decode_undo_segment_header(&expected, 4).is_err());
    assert_eq!(
        decode_undo_segment_header(&[0u8; 64], 3),
        Err(UndoFormatError::Zero)
    );
    assert_eq!(h.first_entry_offset(), 64);

    // Aligned layout (every segment created now): flag bit 0.
    let a = UndoSegmentHeader { aligned: true, ..h };
    let mut aligned = expected;
    aligned[10] = 1; // flags
    aligned[60..64].copy_from_slice(&[248, 0, 112, 9]); // header_crc
    let salted = |b: &[u8]| crc32c::crc32c_append(crc32c::crc32c(&3u64.to_le_bytes()), b);
    assert_eq!(salted(&aligned[..60]).to_le_bytes(), aligned[60..64]);
    assert_eq!(encode_undo_segment_header(&a), aligned);
    assert_eq!(decode_undo_segment_header(&aligned, 3), Ok(a));
    assert_eq!(a.first_entry_offset(), UNDO_ALIGN);
    // An unknown flag is refused (a reader must not misplace entries).
    let mut unknown = aligned;
    unknown[10] = 3;
    let crc = salted(&unknown[..60]).to_le_bytes();
    unknown[60..64].copy_from_slice(&crc);
    assert!(matches!(
        decode_undo_segment_header(&unknown, 3),
        Err(UndoFormatError::Invalid(m)) if m.contains("unknown flags")
    ));
}

fn arb_entry() -> impl Strategy<Value = UndoEntry> {
    (
        1u64..u64::MAX / 2,
        0u64..1000,
        any::<u64>(),
        prop::collection::vec(
            (
                any::<u32>(),
                0u64..u64::MAX / 2,
                prop::collection::vec(any::<u8>(), 1..300),
            ),
            0..6,
        ),
    )
        .prop_map(|(first, span, ts, xs)| UndoEntry {
            first_seq: first,
            last_seq: first + span,
            timestamp_ns: ts,
            extents: xs
                .into_iter()
                .map(|(v, o, d)| {
                    // Every third extent a zero extent: both kinds round-trip.
                    if o % 3 == 0 {
                        UndoExtent::zeros(v, o, d.len() as u32)
                    } else {
                        UndoExtent::data(v, o, Bytes::from(d))
                    }
                })
                .collect(),
            // Resync entries (flag bit 0) round-trip too.
            kind: [
                EntryKind::WriteSet,
                EntryKind::Resync,
                EntryKind::ResyncStart,
            ][(ts % 3) as usize],
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn entry_round_trip(e in arb_entry(), seg in 1u64..1000) {
        let b = encode_undo_entry(&e, seg).unwrap();
        let (back, n) = decode_undo_entry(&Bytes::from(b.clone()), seg).unwrap();
        prop_assert_eq!(n as usize, b.len());
        // What `append` sizes segments by.
        prop_assert_eq!(e.encoded_len(), b.len() as u64);
        prop_assert_eq!(back, e);
    }

    #[test]
    fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..400), seg in 0u64..4) {
        let bytes = Bytes::from(b.clone());
        let _ = decode_undo_entry(&bytes, seg);
        let _ = decode_undo_entry_header(&b, seg);
        let _ = decode_undo_segment_header(&b, seg);
    }

    /// Valid header with a mutated body / forged header CRC: decoding still never
    /// panics (bodies are bounded by the bytes present).
    #[test]
    fn mutated_entries_never_panic(e in arb_entry(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), refix in any::<bool>()) {
        let mut b = encode_undo_entry(&e, 1).unwrap();
        for (at, v) in flips {
            let i = at % b.len();
            b[i] ^= v;
        }
        if refix {
            // Forge valid CRCs over whatever the bytes now say, so the field checks
            // and the extent parser run on the garbage.
            let salted = |x: &[u8]| crc32c::crc32c_append(crc32c::crc32c(&1u64.to_le_bytes()), x);
            let bcrc = salted(&b[56..]);
            b[36..40].copy_from_slice(&bcrc.to_le_bytes());
            let hcrc = salted(&b[..52]);
            b[52..56].copy_from_slice(&hcrc.to_le_bytes());
        }
        let _ = decode_undo_entry(&Bytes::from(b), 1);
    }
}

#[test]
fn encode_rejects_bad_entries() {
    let mut e = entry(1);
    e.extents[0].data = Bytes::new();
    assert!(matches!(
        encode_undo_entry(&e, 1),
        Err(UndoError::InvalidEntry(_))
    ));
    let mut e = entry(1);
    e.last_seq = 0;
    assert!(matches!(
        encode_undo_entry(&e, 1),
        Err(UndoError::InvalidEntry(_))
    ));
}

// ---------------------------------------------------------------- log

#[test]
fn append_reopen_keeps_index() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, rec) = open(d.path(), 4096);
    assert_eq!(rec.entries, 0);
    let mut positions = Vec::new();
    for n in 0..40 {
        positions.push(log.append(&entry(n)).unwrap());
    }
    // Empty write-set (no overwritten ranges) still gets a point.
    let empty = UndoEntry {
        first_seq: 401,
        last_seq: 401,
        timestamp_ns: 40_000,
        extents: vec![],
        kind: EntryKind::WriteSet,
    };
    positions.push(log.append(&empty).unwrap());
    assert!(log.segment_count() > 2, "small segments roll");
    let points = log.points().to_vec();
    let used = log.used_bytes();
    drop(log);
    let (log, rec) = open(d.path(), 4096);
    assert_eq!(rec.entries, 41);
    assert_eq!(rec.truncated, None);
    assert_eq!(log.points(), &points[..]);
    assert_eq!(log.used_bytes(), used);
    for (n, p) in positions.iter().enumerate().take(40) {
        assert_eq!(log.read_entry(p).unwrap(), entry(n as u64));
    }
    assert_eq!(log.read_entry(&positions[40]).unwrap(), empty);
    // Sum of file sizes matches used_bytes.
    let on_disk: u64 = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(on_disk, used);
}

#[test]
fn append_requires_contiguous_seqs() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    log.append(&entry(1)).unwrap();
    assert!(matches!(
        log.append(&entry(3)),
        Err(UndoError::InvalidEntry(_))
    ));
    log.append(&entry(2)).unwrap();
    assert_eq!(log.points().len(), 2);
}

#[test]
fn other_cluster_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    log.append(&entry(1)).unwrap();
    drop(log);
    let err = UndoLog::open(d.path(), *b"another-cluster!", 1 << 20).unwrap_err();
    assert!(matches!(err, UndoError::ClusterMismatch { .. }), "{err}");
}

#[test]
fn leftover_tmp_removed() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    log.append(&entry(1)).unwrap();
    drop(log);
    let tmp = d.path().join("0000000000000002.undo.tmp");
    fs::write(&tmp, b"half a segment").unwrap();
    let (log, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec.removed_tmp, vec![tmp.clone()]);
    assert!(!tmp.exists());
    assert_eq!(log.points().len(), 1);
}

/// Writes `bytes` at the end of segment `no`.
fn append_raw(dir: &Path, no: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(seg_path(dir, no))
        .unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn torn_last_entry_truncated_and_only_it() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    for n in 0..5 {
        log.append(&entry(n)).unwrap();
    }
    let points = log.points().to_vec();
    let len = log.used_bytes();
    drop(log);
    let full = encode_undo_entry(&entry(5), 1).unwrap();

    // (a) header + half the body landed.
    append_raw(d.path(), 1, &full[..full.len() / 2]);
    // (b) whole length landed but the body is partly zeros (crc bad).
    let mut zeroed = full.clone();
    let n = zeroed.len();
    zeroed[n - 10..].fill(0);
    // (c) only part of the header.
    // (d) file extended with zeros.
    // (e) the whole entry landed but not its padding: the append did not finish.
    for tail in [
        None,
        Some(zeroed),
        Some(full[..30].to_vec()),
        Some(vec![0u8; 500]),
        Some(full.clone()),
    ] {
        if let Some(t) = tail {
            append_raw(d.path(), 1, &t);
        }
        let (log, rec) = open(d.path(), 1 << 20);
        let (file, off, _) = rec.truncated.clone().expect("torn tail truncated");
        assert_eq!(file, seg_path(d.path(), 1));
        assert_eq!(off, len);
        assert_eq!(log.points(), &points[..]);
        assert_eq!(log.used_bytes(), len);
        assert_eq!(fs::metadata(seg_path(d.path(), 1)).unwrap().len(), len);
        drop(log);
    }
    // After truncation, appending continues normally.
    let (mut log, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec.truncated, None);
    log.append(&entry(5)).unwrap();
    drop(log);
    let (log, _) = open(d.path(), 1 << 20);
    assert_eq!(log.points().len(), 6);
    assert_eq!(log.read_entry(&log.points()[5].position).unwrap(), entry(5));
}

#[test]
fn entries_are_4k_aligned_and_zero_padded() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    let sizes = [1usize, 4040, 4041, 4096, 9000, 70_000];
    let entries: Vec<UndoEntry> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| UndoEntry {
            first_seq: i as u64 + 1,
            last_seq: i as u64 + 1,
            timestamp_ns: i as u64,
            extents: vec![ext(1, 0, &vec![0xEE; n])],
            kind: EntryKind::WriteSet,
        })
        .collect();
    for e in &entries {
        log.append(e).unwrap();
    }
    let pts = log.points().to_vec();
    drop(log);
    let file = fs::read(seg_path(d.path(), 1)).unwrap();
    assert_eq!(file.len() % UNDO_ALIGN as usize, 0);
    // The header block's padding is zero.
    assert!(file[UNDO_SEGMENT_HEADER_LEN..UNDO_ALIGN as usize]
        .iter()
        .all(|&b| b == 0));
    for (i, p) in pts.iter().enumerate() {
        assert_eq!(p.position.offset % UNDO_ALIGN, 0, "entry {i}");
        assert_eq!(p.position.len, 56 + 16 + sizes[i] as u64);
        let end = (p.position.offset + p.position.len) as usize;
        let next = pts
            .get(i + 1)
            .map_or(file.len(), |q| q.position.offset as usize);
        assert_eq!(next, end.div_ceil(4096) * 4096, "entry {i} padded to 4 KiB");
        assert!(file[end..next].iter().all(|&b| b == 0), "entry {i} padding");
    }
    let (log, rec) = open(d.path(), 1 << 20);
    assert_eq!(rec.truncated, None);
    assert_eq!(log.points(), &pts[..]);
    for (p, e) in pts.iter().zip(&entries) {
        assert_eq!(&log.read_entry(&p.position).unwrap(), e);
    }
}

#[test]
fn packed_segments_of_earlier_versions_stay_readable() {
    // Segment 1 as earlier versions wrote it: no flag, entries back to back.
    let d = tempfile::tempdir().unwrap();
    let mut image = encode_undo_segment_header(&UndoSegmentHeader {
        segment_no: 1,
        cluster_id: CLUSTER,
        first_seq: 11,
        aligned: false,
    })
    .to_vec();
    let mut offsets = Vec::new();
    for n in 1..=3 {
        offsets.push(image.len() as u64);
        image.extend(encode_undo_entry(&entry(n), 1).unwrap());
    }
    fs::write(seg_path(d.path(), 1), &image).unwrap();

    let (mut log, rec) = open(d.path(), 1 << 20);
    assert_eq!((rec.segments, rec.entries, rec.truncated), (1, 3, None));
    let got: Vec<u64> = log.points().iter().map(|p| p.position.offset).collect();
    assert_eq!(got, offsets);
    for (p, n) in log.points().to_vec().iter().zip(1..) {
        assert_eq!(log.read_entry(&p.position).unwrap(), entry(n));
    }
    // The next entry goes to a new, aligned segment; the packed one is untouched.
    log.append(&entry(4)).unwrap();
    let p4 = log.points()[3].position;
    assert_eq!((p4.segment_no, p4.offset), (2, UNDO_ALIGN));
    assert_eq!(fs::read(seg_path(d.path(), 1)).unwrap(), image);
    drop(log);

    let (log, rec) = open(d.path(), 1 << 20);
    assert_eq!((rec.segments, rec.entries), (2, 4));
    let back: Vec<UndoEntry> = log.entries_after(10).map(|e| e.unwrap()).collect();
    assert_eq!(back, vec![entry(4), entry(3), entry(2), entry(1)]);
    // A torn tail of a packed last segment is still cut at the entry boundary.
    drop(log);
    fs::remove_file(seg_path(d.path(), 2)).unwrap();
    let full = encode_undo_entry(&entry(4), 1).unwrap();
    append_raw(d.path(), 1, &full[..full.len() / 2]);
    let (log, rec) = open(d.path(), 1 << 20);
    assert_eq!(
        rec.truncated.map(|(_, off, _)| off),
        Some(image.len() as u64)
    );
    assert_eq!(log.points().len(), 3);
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn corrupt_earlier_entry_refused_with_file_and_offset() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    for n in 0..5 {
        log.append(&entry(n)).unwrap();
    }
    let p2 = log.points()[2].position;
    drop(log);
    let path = seg_path(d.path(), 1);
    // Header of entry 2: a later valid entry exists, so it is not a torn tail.
    flip(&path, p2.offset + 9);
    let err = UndoLog::open(d.path(), CLUSTER, 1 << 20).unwrap_err();
    match &err {
        UndoError::Corruption { file, offset, .. } => {
            assert_eq!(file, &path);
            assert_eq!(*offset, p2.offset);
        }
        e => panic!("expected corruption, got {e}"),
    }
    // Nothing was modified by the refused open.
    flip(&path, p2.offset + 9);
    let (log, rec) = open(d.path(), 1 << 20);
    assert_eq!((rec.entries, rec.truncated), (5, None));
    drop(log);

    // Body rot in an earlier entry: open scans headers only, read_entry refuses.
    flip(&path, p2.offset + 60);
    let (log, _) = open(d.path(), 1 << 20);
    match log.read_entry(&p2).unwrap_err() {
        UndoError::Corruption { file, offset, .. } => {
            assert_eq!(file, path);
            assert_eq!(offset, p2.offset);
        }
        e => panic!("expected corruption, got {e}"),
    }
    assert!(log.entries_after(0).any(|r| r.is_err()));
}

#[test]
fn damage_in_non_last_segment_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 4096);
    for n in 0..30 {
        log.append(&entry(n)).unwrap();
    }
    assert!(log.segment_count() >= 3);
    drop(log);
    // Torn-looking garbage at the end of segment 1 (not the last): corruption.
    let len1 = fs::metadata(seg_path(d.path(), 1)).unwrap().len();
    append_raw(d.path(), 1, &[0u8; 100]);
    match UndoLog::open(d.path(), CLUSTER, 4096).unwrap_err() {
        UndoError::Corruption { file, offset, .. } => {
            assert_eq!(file, seg_path(d.path(), 1));
            assert_eq!(offset, len1);
        }
        e => panic!("{e}"),
    }
    OpenOptions::new()
        .write(true)
        .open(seg_path(d.path(), 1))
        .unwrap()
        .set_len(len1)
        .unwrap();
    open(d.path(), 4096);
    // A missing middle segment: corruption (gap).
    fs::remove_file(seg_path(d.path(), 2)).unwrap();
    assert!(matches!(
        UndoLog::open(d.path(), CLUSTER, 4096).unwrap_err(),
        UndoError::Corruption { .. }
    ));
}

#[test]
fn find_by_seq_and_time_pick_newest_at_or_before() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    assert_eq!(log.find_by_seq(5), None);
    assert_eq!(log.find_by_time(5), None);
    for n in 1..=5 {
        log.append(&entry(n)).unwrap(); // seqs 10n+1..=10n+10, ts 1000n
    }
    assert_eq!(log.find_by_seq(10), None);
    assert_eq!(log.find_by_seq(20).unwrap().seq, 20);
    assert_eq!(log.find_by_seq(29).unwrap().seq, 20);
    assert_eq!(log.find_by_seq(30).unwrap().seq, 30);
    assert_eq!(log.find_by_seq(u64::MAX).unwrap().seq, 60);
    assert_eq!(log.find_by_time(999), None);
    assert_eq!(log.find_by_time(1000).unwrap().seq, 20);
    assert_eq!(log.find_by_time(2500).unwrap().seq, 30);
    assert_eq!(log.find_by_time(u64::MAX).unwrap().seq, 60);
    // A primary clock step back: write-set 6 stamped before write-set 5.
    let mut e6 = entry(6);
    e6.timestamp_ns = 4500;
    log.append(&e6).unwrap();
    assert_eq!(log.find_by_time(4600).unwrap().seq, 50);
    assert_eq!(log.find_by_time(5000).unwrap().seq, 70);
}

#[test]
fn entries_after_newest_first_and_targets_checked() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 4096);
    for n in 1..=8 {
        log.append(&entry(n)).unwrap();
    }
    let got: Vec<u64> = log.entries_after(40).map(|r| r.unwrap().last_seq).collect();
    assert_eq!(got, vec![90, 80, 70, 60, 50]);
    assert_eq!(log.entries_after(90).count(), 0);
    // Boundary just before the oldest entry: everything.
    assert_eq!(log.entries_after(10).count(), 8);
    // Inside a write-set, or older than retained: one error.
    for bad in [45, 9, 0] {
        let v: Vec<_> = log.entries_after(bad).collect();
        assert_eq!(v.len(), 1);
        assert!(matches!(v[0], Err(UndoError::InvalidTarget(_))), "{bad}");
        assert!(matches!(
            log.truncate_after(bad),
            Err(UndoError::InvalidTarget(_))
        ));
    }
}

/// Tiny deterministic PRNG (xorshift64*) so the simulation needs no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn rollback_simulation() {
    const SIZE: usize = 1 << 20;
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 256 << 10);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut replica: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    let initial = replica.clone();
    let mut after: Vec<Vec<u8>> = Vec::new(); // after[i] = state after write-set i
    let mut seq = 1u64;
    let mut ends = Vec::new();
    for ws in 0..50u64 {
        // Random ops: writes (random data), trims and write-zeroes (zeros), possibly
        // overlapping each other within the write-set.
        let nops = 1 + rng.below(6);
        let mut ops = Vec::new();
        for _ in 0..nops {
            let len = 1 + rng.below(16 << 10) as usize;
            let off = rng.below((SIZE - len) as u64) as usize;
            let kind = rng.below(3);
            let data: Vec<u8> = if kind == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                vec![0u8; len]
            };
            ops.push((off, data));
        }
        // Before-images of every range the write-set overwrites, captured before
        // applying it (order within the entry does not matter: all are "before").
        let extents = ops
            .iter()
            .map(|(off, data)| ext(0, *off as u64, &replica[*off..*off + data.len()]))
            .collect();
        let first = seq;
        seq += nops;
        let e = UndoEntry {
            first_seq: first,
            last_seq: seq - 1,
            timestamp_ns: 1_000 + ws * 10,
            extents,
            kind: EntryKind::WriteSet,
        };
        log.append(&e).unwrap();
        for (off, data) in &ops {
            replica[*off..*off + data.len()].copy_from_slice(data);
        }
        after.push(replica.clone());
        ends.push(seq - 1);
    }
    // Reopen: the rollback must work from recovered state too.
    drop(log);
    let (mut log, _) = open(d.path(), 256 << 10);
    assert_eq!(log.points().len(), 50);
    let undo_to = |buf: &mut Vec<u8>, log: &UndoLog, target: u64| {
        for e in log.entries_after(target) {
            // Within an entry, apply extents last-first too, so overlapping ranges of
            // one write-set end with the before-image of the first op.
            for x in e.unwrap().extents.iter().rev() {
                let o = x.offset as usize;
                buf[o..o + x.data.len()].copy_from_slice(&x.data);
            }
        }
    };
    // Views at several points from the newest state.
    for k in [0usize, 7, 24, 48, 49] {
        let mut buf = replica.clone();
        undo_to(&mut buf, &log, ends[k]);
        assert!(buf == after[k], "view at write-set {k} differs");
        // find_by_time agrees with the seq index.
        let p = log.find_by_time(1_000 + k as u64 * 10 + 5).unwrap();
        assert_eq!(p.seq, ends[k]);
    }
    // Before everything.
    let mut buf = replica.clone();
    undo_to(&mut buf, &log, 0);
    assert!(buf == initial);
    // Real rollback to k = 30, then truncate; reopen; roll back further to 12.
    let k = 30;
    undo_to(&mut replica, &log, ends[k]);
    assert!(replica == after[k]);
    log.truncate_after(ends[k]).unwrap();
    drop(log);
    let (log, _) = open(d.path(), 256 << 10);
    assert_eq!(log.points().len(), k + 1);
    assert_eq!(log.points().last().unwrap().seq, ends[k]);
    undo_to(&mut replica, &log, ends[12]);
    assert!(replica == after[12]);
}

#[test]
fn truncate_after_and_release_before_consistent_across_reopen() {
    let d = tempfile::tempdir().unwrap();
    let seg = 4096;
    let (mut log, _) = open(d.path(), seg);
    for n in 1..=40 {
        log.append(&entry(n)).unwrap();
    }
    let nseg = log.segment_count();
    assert!(nseg >= 4);

    // truncate to a boundary that is the first entry of a segment's predecessor:
    // find a point whose next entry starts a new segment (offset UNDO_ALIGN).
    let pts = log.points().to_vec();
    let i = (1..pts.len())
        .find(|&i| pts[i].position.offset == UNDO_ALIGN && i > 25)
        .unwrap();
    log.truncate_after(pts[i - 1].seq).unwrap();
    assert_eq!(log.points(), &pts[..i]);
    let used = log.used_bytes();
    // truncate inside a segment
    log.truncate_after(pts[i - 3].seq).unwrap();
    assert_eq!(log.points(), &pts[..i - 2]);
    assert!(log.used_bytes() < used);
    // idempotent
    log.truncate_after(pts[i - 3].seq).unwrap();
    drop(log);
    let (mut log, rec) = open(d.path(), seg);
    assert_eq!(rec.truncated, None);
    assert_eq!(log.points(), &pts[..i - 2]);
    // Appending after a truncate continues at the next seq.
    let next = (pts[i - 3].seq - 10) / 10 + 1;
    assert!(matches!(
        log.append(&entry(next + 1)),
        Err(UndoError::InvalidEntry(_))
    ));
    log.append(&entry(next)).unwrap();

    // Retention.
    let before = log.used_bytes();
    let segs = log.segment_count();
    let cut = log.points()[10].seq;
    let freed = log.release_before(cut).unwrap();
    assert!(freed > 0);
    assert_eq!(log.used_bytes(), before - freed);
    assert!(log.segment_count() < segs);
    // Every dropped point was at or before `cut`, and the first kept segment still
    // holds a point at or after it.
    let kept = log.points().to_vec();
    assert!(kept[0].first_seq <= cut + 1);
    assert_eq!(kept.last().unwrap().seq, 10 * next + 10);
    // Rolling back past retention is refused.
    assert!(log.entries_after(kept[0].first_seq - 2).any(|r| r.is_err()));
    // Never the newest segment.
    log.release_before(u64::MAX).unwrap();
    assert_eq!(log.segment_count(), 1);
    let kept = log.points().to_vec();
    let used = log.used_bytes();
    drop(log);
    let (log, _) = open(d.path(), seg);
    assert_eq!(log.points(), &kept[..]);
    assert_eq!(log.used_bytes(), used);
    let segments = fs::read_dir(d.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().ends_with(".undo"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(segments, 1);
    for p in log.points() {
        log.read_entry(&p.position).unwrap();
    }

    // Truncating everything leaves an empty log that accepts any next seq.
    let mut log = log;
    let first = log.points()[0].first_seq;
    log.truncate_after(first - 1).unwrap();
    assert_eq!(log.points().len(), 0);
    assert_eq!(log.used_bytes(), 0);
    drop(log);
    let (mut log, _) = open(d.path(), seg);
    assert!(log.points().is_empty());
    log.append(&entry(100)).unwrap();
}

#[test]
fn crash_mid_truncate_leaves_a_prefix() {
    // Simulate a crash after the newest segment was deleted but before the cut
    // segment was truncated: what remains is a consistent prefix.
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 4096);
    for n in 1..=30 {
        log.append(&entry(n)).unwrap();
    }
    let last_no = log.points().last().unwrap().position.segment_no;
    drop(log);
    fs::remove_file(seg_path(d.path(), last_no)).unwrap();
    let (log, rec) = open(d.path(), 4096);
    assert_eq!(rec.truncated, None);
    let pts = log.points();
    assert!(pts.len() < 30 && !pts.is_empty());
    for w in pts.windows(2) {
        assert_eq!(w[0].seq + 1, w[1].first_seq);
    }
}

#[test]
fn checksummed_bad_tail_is_corruption_not_torn() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    for n in 0..3 {
        log.append(&entry(n)).unwrap();
    }
    let len = log.used_bytes();
    drop(log);
    // A CRC-valid entry of an unknown version at the end: written on purpose, so
    // refused, never truncated.
    let mut b = encode_undo_entry(&entry(3), 1).unwrap();
    b[4] = 9;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&1u64.to_le_bytes()), &b[..52]);
    b[52..56].copy_from_slice(&crc.to_le_bytes());
    append_raw(d.path(), 1, &b);
    match UndoLog::open(d.path(), CLUSTER, 1 << 20).unwrap_err() {
        UndoError::Corruption { offset, .. } => assert_eq!(offset, len),
        e => panic!("{e}"),
    }
    assert_eq!(
        fs::metadata(seg_path(d.path(), 1)).unwrap().len(),
        len + b.len() as u64
    );
    // Same entry behind a torn-looking (zero) region: the scan finds it → refused.
    let f = OpenOptions::new()
        .write(true)
        .open(seg_path(d.path(), 1))
        .unwrap();
    f.set_len(len).unwrap();
    drop(f);
    append_raw(d.path(), 1, &[0u8; 40]);
    append_raw(d.path(), 1, &b);
    match UndoLog::open(d.path(), CLUSTER, 1 << 20).unwrap_err() {
        UndoError::Corruption { offset, .. } => assert_eq!(offset, len),
        e => panic!("{e}"),
    }
}

#[test]
fn stale_position_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    for n in 0..3 {
        log.append(&entry(n)).unwrap();
    }
    let p2 = log.points()[2].position;
    log.truncate_after(log.points()[1].seq).unwrap();
    assert!(matches!(
        log.read_entry(&p2),
        Err(UndoError::UnknownPosition(_))
    ));
    let bogus = UndoPosition {
        offset: p2.offset + 1,
        ..log.points()[1].position
    };
    assert!(matches!(
        log.read_entry(&bogus),
        Err(UndoError::UnknownPosition(_))
    ));
}

#[test]
fn a_second_owner_of_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = ferry_journal::undo::UndoLog::open(dir.path(), [3; 16], 1 << 20).unwrap();
    let err = match ferry_journal::undo::UndoLog::open(dir.path(), [3; 16], 1 << 20) {
        Ok(_) => panic!("a second open must fail while the first holds the lock"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("in use by another"), "{err}");
    drop(log);
    ferry_journal::undo::UndoLog::open(dir.path(), [3; 16], 1 << 20).expect("free after drop");
}

// ---------------------------------------------------------------- resync entries

/// Entry header flag bit 0 (RESYNC) with an empty sequence range (a resync data
/// entry after the snapshot: `first_seq = last_seq + 1`).
#[test]
fn golden_resync_entry_bytes() {
    let e = UndoEntry {
        first_seq: 13,
        last_seq: 12,
        timestamp_ns: 1_700_000_000_000_000_000,
        extents: vec![UndoExtent::zeros(7, 0, 4096)],
        kind: EntryKind::Resync,
    };
    #[rustfmt::skip]
    let expected: [u8; 56 + 16] = [
        b'F', b'R', b'Y', b'U',                 // 0  magic
        2, 0,                                   // 4  version
        1, 0,                                   // 6  flags: RESYNC
        13, 0, 0, 0, 0, 0, 0, 0,                // 8  first_seq
        12, 0, 0, 0, 0, 0, 0, 0,                // 16 last_seq (empty range)
        0, 0, 42, 54, 254, 156, 151, 23,        // 24 timestamp_ns
        1, 0, 0, 0,                             // 32 extent_count
        0x17, 0xa9, 0xc3, 0x61,                 // 36 body_crc (salted with segment 3)
        16, 0, 0, 0, 0, 0, 0, 0,                // 40 body_len
        0, 0, 0, 0,                             // 48 reserved
        122, 153, 110, 224,                     // 52 header_crc (salted with segment 3)
        // extent header
        7, 0, 0, 0,                             // 0  volume
        0x00, 0x10, 0, 0x80,                    // 4  length 4096 | zero flag
        0, 0, 0, 0, 0, 0, 0, 0,                 // 8  offset 0
    ];
    let got = encode_undo_entry(&e, 3).unwrap();
    assert_eq!(got, expected);
    let salted = |b: &[u8]| crc32c::crc32c_append(crc32c::crc32c(&3u64.to_le_bytes()), b);
    assert_eq!(salted(&expected[56..]).to_le_bytes(), expected[36..40]);
    assert_eq!(salted(&expected[..52]).to_le_bytes(), expected[52..56]);
    let (back, n) = decode_undo_entry(&Bytes::copy_from_slice(&got), 3).unwrap();
    assert_eq!((back, n), (e.clone(), 72));
    // An empty range is only "first_seq - 1"; anything lower stays invalid, and an
    // unknown flag bit is refused as checksummed (never taken for a torn write).
    let bad = UndoEntry {
        last_seq: 11,
        ..e.clone()
    };
    assert!(matches!(
        encode_undo_entry(&bad, 3),
        Err(UndoError::InvalidEntry(_))
    ));
    let mut f2 = got.clone();
    f2[6] = 2; // RESYNC_START without RESYNC
    let crc = salted(&f2[..52]);
    f2[52..56].copy_from_slice(&crc.to_le_bytes());
    let err = decode_undo_entry_header(&f2, 3).unwrap_err();
    assert!(err.is_checksummed(), "{err}");
}

fn resync_entry(first: u64, last: u64, fill: u8) -> UndoEntry {
    UndoEntry {
        first_seq: first,
        last_seq: last,
        timestamp_ns: 5,
        extents: vec![ext(0, 0, &[fill; 8])],
        kind: EntryKind::Resync,
    }
}

fn resync_start(first: u64, last: u64, fill: u8) -> UndoEntry {
    UndoEntry {
        kind: EntryKind::ResyncStart,
        ..resync_entry(first, last, fill)
    }
}

/// A resync transition from 10 (snapshot 20, consistent again at 25): no point
/// inside it is reachable; the point before it and the first one after it are; a
/// rollback to the point before it applies every entry of the transition; the
/// rules hold across a reopen.
#[test]
fn resync_entries_are_not_recovery_points() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), 1 << 20);
    let plain = |first, last| UndoEntry {
        first_seq: first,
        last_seq: last,
        timestamp_ns: first,
        extents: vec![ext(0, 0, &[first as u8; 8])],
        kind: EntryKind::WriteSet,
    };
    log.append(&plain(1, 10)).unwrap();
    // Begin: bridges 11..=20 (the records the copy replaces); data entries are empty.
    log.append(&resync_start(11, 20, 0xa1)).unwrap();
    log.append(&resync_entry(21, 20, 0xa2)).unwrap();
    log.append(&resync_entry(21, 20, 0xa3)).unwrap();
    // Streamed write-sets before `through` (25) are resync entries too.
    log.append(&resync_entry(21, 23, 0xa4)).unwrap();
    log.append(&plain(24, 26)).unwrap();
    let check = |log: &UndoLog| {
        assert_eq!(log.find_by_seq(22).map(|p| p.seq), Some(10));
        assert_eq!(log.find_by_seq(26).map(|p| p.seq), Some(26));
        assert_eq!(log.find_by_time(23).map(|p| p.seq), Some(10));
        assert_eq!(
            log.recovery_points().map(|p| p.seq).collect::<Vec<_>>(),
            vec![10, 26]
        );
        for inside in [20, 23] {
            let err = log.points_after(inside).unwrap_err().to_string();
            assert!(err.contains("inside a resync"), "{inside}: {err}");
            assert!(err.contains("10 and 26"), "{inside}: {err}");
        }
        assert!(log.points_after(15).is_err(), "inside the bridging entry");
        assert_eq!(log.points_after(10).unwrap().len(), 5);
        let fills: Vec<u8> = log
            .entries_after(10)
            .map(|e| e.unwrap().extents[0].data[0])
            .collect();
        assert_eq!(fills, vec![24, 0xa4, 0xa3, 0xa2, 0xa1], "newest first");
    };
    check(&log);
    drop(log);
    let (log, rec) = open(dir.path(), 1 << 20);
    assert_eq!(rec.entries, 6);
    check(&log);
}

/// A resync whose snapshot is the point it started from: its entries are all
/// empty and end "at" that point; the boundary there is before them.
#[test]
fn empty_resync_at_the_start_point_keeps_it_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), 1 << 20);
    log.append(&entry(0)).unwrap(); // 1..=10
    log.append(&resync_start(11, 10, 1)).unwrap();
    log.append(&resync_entry(11, 10, 2)).unwrap();
    assert_eq!(log.points_after(10).unwrap().len(), 2);
    assert_eq!(log.find_by_seq(10).map(|p| p.seq), Some(10));
    // The end marker: an empty entry that is a point (the copy was consistent).
    log.append(&UndoEntry {
        first_seq: 11,
        last_seq: 10,
        timestamp_ns: 9,
        extents: vec![],
        kind: EntryKind::WriteSet,
    })
    .unwrap();
    assert_eq!(log.points_after(10).unwrap().len(), 0, "after the marker");
    assert_eq!(log.recovery_points().count(), 2);
    // A log that starts with a resync: the boundary before it is consistent.
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), 1 << 20);
    log.append(&resync_start(41, 50, 1)).unwrap();
    assert_eq!(log.points_after(40).unwrap().len(), 1);
    assert!(log.points_after(39).is_err(), "older than the oldest");
    // One whose oldest entry continues a transition (its start was released by a
    // release interrupted by a crash): the boundary before it is not offered.
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = open(dir.path(), 1 << 20);
    log.append(&resync_entry(51, 50, 1)).unwrap();
    let err = log.points_after(50).unwrap_err().to_string();
    assert!(err.contains("start is no longer retained"), "{err}");
}

/// Retention never leaves a log whose oldest entry continues a resync.
#[test]
fn release_before_stops_inside_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: every entry rolls to its own segment.
    let (mut log, _) = open(dir.path(), 4096);
    let big = |first, last, kind| UndoEntry {
        first_seq: first,
        last_seq: last,
        timestamp_ns: first,
        extents: vec![ext(0, 0, &[1; 5000])],
        kind,
    };
    log.append(&big(1, 10, EntryKind::WriteSet)).unwrap();
    log.append(&big(11, 20, EntryKind::ResyncStart)).unwrap();
    log.append(&big(21, 20, EntryKind::Resync)).unwrap();
    log.append(&big(21, 30, EntryKind::WriteSet)).unwrap();
    log.append(&big(31, 40, EntryKind::WriteSet)).unwrap();
    assert_eq!(log.segment_count(), 5);
    // Up to 25: the transition (11..=30) cannot be cut in the middle, so only the
    // segment before it goes; the way back to 10 stays.
    log.release_before(25).unwrap();
    assert_eq!(log.points()[0].first_seq, 11);
    assert_eq!(log.points_after(10).unwrap().len(), 4);
    // Up to 30: the transition goes as a whole.
    log.release_before(30).unwrap();
    assert_eq!(log.points()[0].first_seq, 31);
    assert_eq!(log.points_after(30).unwrap().len(), 1);
}

/// A rollback applies `entries_after` newest first: a bad entry in the middle must be
/// reported before the first entry is handed out, or the caller has already applied
/// the newer ones when it meets the error (a half-rolled-back replica).
#[test]
fn rollback_past_a_bad_middle_entry_is_refused_before_anything_is_applied() {
    let d = tempfile::tempdir().unwrap();
    // Two entries per segment: the bad entry sits in the middle of the log.
    let (mut log, _) = open(d.path(), 3 * 4096);
    for n in 0..6 {
        log.append(&entry(n)).unwrap();
    }
    let bad = log.points()[2].position;
    drop(log);
    let path = seg_path(d.path(), bad.segment_no);
    // A data byte of its first extent (open reads headers only: not noticed there).
    flip(&path, bad.offset + 56 + 16 + 5);
    let (log, rec) = open(d.path(), 3 * 4096);
    assert_eq!((rec.entries, rec.truncated), (6, None));
    let items: Vec<_> = log.entries_after(0).collect();
    let shape: Vec<Result<u64, String>> = items
        .iter()
        .map(|r| r.as_ref().map(|e| e.last_seq).map_err(|e| e.to_string()))
        .collect();
    assert_eq!(
        items.len(),
        1,
        "only the error, no entry to apply: {shape:?}"
    );
    match &items[0] {
        Err(UndoError::Corruption { file, offset, .. }) => {
            assert_eq!(file, &path);
            assert_eq!(*offset, bad.offset);
        }
        e => panic!("expected corruption, got {e:?}"),
    }
    // The check on its own, before any rollback or view: same error.
    match log.verify_from(0) {
        Err(UndoError::Corruption { file, offset, .. }) => {
            assert_eq!((file, offset), (path.clone(), bad.offset));
        }
        r => panic!("expected corruption, got {r:?}"),
    }
    assert!(matches!(
        log.verify_from(25),
        Err(UndoError::InvalidTarget(_))
    ));
    // A rollback that does not reach the bad entry is served as before.
    log.verify_from(30).unwrap();
    log.verify_from(60).unwrap();
    let got: Vec<u64> = log.entries_after(30).map(|r| r.unwrap().last_seq).collect();
    assert_eq!(got, vec![60, 50, 40]);
}

/// `verify_from` checks each entry as the writer laid it out, streaming large bodies:
/// zero extents, several extents, an entry bigger than the read chunk, and damage in
/// the last byte of a big body.
#[test]
fn verify_from_streams_big_entries_and_finds_late_damage() {
    let d = tempfile::tempdir().unwrap();
    let (mut log, _) = open(d.path(), 1 << 20);
    let big = UndoEntry {
        first_seq: 1,
        last_seq: 3,
        timestamp_ns: 1,
        extents: vec![
            UndoExtent::zeros(1, 0, 1 << 20),
            ext(1, 1 << 20, &vec![7u8; 3 << 20]),
            ext(2, 5, &[1, 2, 3]),
        ],
        kind: EntryKind::WriteSet,
    };
    log.append(&big).unwrap();
    log.append(&UndoEntry {
        first_seq: 4,
        last_seq: 4,
        timestamp_ns: 2,
        extents: vec![ext(1, 0, &[9; 10])],
        kind: EntryKind::WriteSet,
    })
    .unwrap();
    log.verify_from(0).unwrap();
    let p = log.points()[0].position;
    drop(log);
    let path = seg_path(d.path(), p.segment_no);
    flip(&path, p.offset + p.len - 1);
    let (log, _) = open(d.path(), 1 << 20);
    match log.verify_from(0) {
        Err(UndoError::Corruption {
            file,
            offset,
            reason,
        }) => {
            assert_eq!((file, offset), (path.clone(), p.offset), "{reason}");
            assert!(reason.contains("crc"), "{reason}");
        }
        r => panic!("expected corruption, got {r:?}"),
    }
    log.verify_from(3).unwrap();
}

// ---------------------------------------------------------------- pieces (v2)

/// A write-set in pieces: flag bits `PART | RESYNC_START` on the first piece, `PART`
/// on later ones, empty ranges; version 2. A version-1 entry carrying the bit, a
/// piece with a non-empty range, or `PART` with `RESYNC` are refused.
#[test]
fn golden_piece_entry_bytes() {
    let e = UndoEntry {
        first_seq: 13,
        last_seq: 12,
        timestamp_ns: 1_700_000_000_000_000_000,
        extents: vec![UndoExtent::zeros(7, 0, 4096)],
        kind: EntryKind::PartStart,
    };
    #[rustfmt::skip]
    let expected: [u8; 56 + 16] = [
        b'F', b'R', b'Y', b'U',                 // 0  magic
        2, 0,                                   // 4  version
        6, 0,                                   // 6  flags: PART | RESYNC_START (first piece)
        13, 0, 0, 0, 0, 0, 0, 0,                // 8  first_seq
        12, 0, 0, 0, 0, 0, 0, 0,                // 16 last_seq (empty range)
        0, 0, 42, 54, 254, 156, 151, 23,        // 24 timestamp_ns
        1, 0, 0, 0,                             // 32 extent_count
        0x17, 0xa9, 0xc3, 0x61,                 // 36 body_crc (salted with segment 3)
        16, 0, 0, 0, 0, 0, 0, 0,                // 40 body_len
        0, 0, 0, 0,                             // 48 reserved
        1, 202, 243, 37,                        // 52 header_crc (salted with segment 3)
        // extent header
        7, 0, 0, 0,                             // 0  volume
        0x00, 0x10, 0, 0x80,                    // 4  length 4096 | zero flag
        0, 0, 0, 0, 0, 0, 0, 0,                 // 8  offset 0
    ];
    let got = encode_undo_entry(&e, 3).unwrap();
    assert_eq!(got, expected);
    let salted = |b: &[u8]| crc32c::crc32c_append(crc32c::crc32c(&3u64.to_le_bytes()), b);
    assert_eq!(salted(&expected[..52]).to_le_bytes(), expected[52..56]);
    let (back, n) = decode_undo_entry(&Bytes::copy_from_slice(&got), 3).unwrap();
    assert_eq!((back, n), (e.clone(), 72));
    // A later piece: flags 4.
    let later = UndoEntry {
        kind: EntryKind::Part,
        ..e.clone()
    };
    let b = encode_undo_entry(&later, 3).unwrap();
    assert_eq!(b[6..8], [4, 0]);
    assert_eq!(decode_undo_entry(&Bytes::from(b), 3).unwrap().0, later);
    // Refused: flags re-sealed with a valid CRC, each a checksummed error.
    let reseal = |version: u8, flags: u8| {
        let mut h = got.clone();
        h[4] = version;
        h[6] = flags;
        let crc = salted(&h[..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
        decode_undo_entry_header(&h, 3)
    };
    for (version, flags) in [(1, 6), (1, 4), (2, 5), (2, 7), (2, 8)] {
        let err = reseal(version, flags).unwrap_err();
        assert!(err.is_checksummed(), "v{version} flags {flags}: {err}");
    }
    assert_eq!(reseal(2, 4).unwrap().kind, EntryKind::Part);
    // A piece covers no sequence.
    let ranged = UndoEntry {
        last_seq: 13,
        ..e.clone()
    };
    assert!(matches!(
        encode_undo_entry(&ranged, 3),
        Err(UndoError::InvalidEntry(_))
    ));
    let mut h = expected;
    h[16] = 13;
    let crc = salted(&h[..52]);
    h[52..56].copy_from_slice(&crc.to_le_bytes());
    assert!(decode_undo_entry_header(&h, 3)
        .unwrap_err()
        .is_checksummed());
}

/// Pieces of write-set `first..`: the first marked, stamped `ts`, one data extent
/// each.
fn pieces(first: u64, n: usize, ts: u64) -> Vec<UndoEntry> {
    (0..n)
        .map(|i| UndoEntry {
            first_seq: first,
            last_seq: first - 1,
            timestamp_ns: ts,
            extents: vec![ext(1, 4096 * i as u64, &[i as u8 + 1; 4096])],
            kind: if i == 0 {
                EntryKind::PartStart
            } else {
                EntryKind::Part
            },
        })
        .collect()
}

/// A write-set in pieces then its entry is one step of the log: its start and end
/// are points, nothing inside; a rollback iterator yields the pieces too; and
/// pieces left at the end by an unfinished capture are removed on open (across a
/// segment roll), after which the write-set is captured again.
#[test]
fn unfinished_pieces_are_removed_on_open_finished_ones_kept() {
    let d = tempfile::tempdir().unwrap();
    // Small segments: the pieces span several files.
    let (mut log, _) = open(d.path(), 3 * UNDO_ALIGN);
    log.append(&entry(1)).unwrap(); // 11..=20
    for p in pieces(21, 3, 2000) {
        log.append(&p).unwrap();
    }
    let mut ws = entry(2); // 21..=30
    ws.timestamp_ns = 2000;
    log.append(&ws).unwrap();
    let finished = log.points().len();
    // The next write-set's capture stops after two pieces (a crash).
    for p in pieces(31, 2, 3000) {
        log.append(&p).unwrap();
    }
    assert!(log.segment_count() >= 3);
    assert_eq!(log.find_by_seq(u64::MAX).unwrap().seq, 30);
    drop(log);

    let (mut log, rec) = open(d.path(), 3 * UNDO_ALIGN);
    assert_eq!(rec.dropped_pieces, 2);
    assert_eq!((rec.entries, log.points().len()), (finished, finished));
    assert_eq!(rec.segments, log.segment_count());
    let on_disk: u64 = fs::read_dir(d.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("undo".as_ref()))
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(on_disk, log.used_bytes());
    // Boundaries: 20 (before the pieces) and 30; nothing inside.
    assert_eq!(log.entries_after(20).count(), 4);
    let kinds: Vec<EntryKind> = log.entries_after(20).map(|e| e.unwrap().kind).collect();
    assert_eq!(
        kinds,
        vec![
            EntryKind::WriteSet,
            EntryKind::Part,
            EntryKind::Part,
            EntryKind::PartStart
        ]
    );
    for inside in [21, 25, 29] {
        assert!(matches!(
            log.points_after(inside),
            Err(UndoError::InvalidTarget(_))
        ));
    }
    assert_eq!(log.find_by_seq(29).unwrap().seq, 20);
    // The write-set is captured again from its first sequence.
    for p in pieces(31, 2, 3000) {
        log.append(&p).unwrap();
    }
    log.append(&entry(3)).unwrap();
    drop(log);
    let (log, rec) = open(d.path(), 3 * UNDO_ALIGN);
    assert_eq!(rec.dropped_pieces, 0);
    assert_eq!(log.entries_after(30).count(), 3);
    let seqs: Vec<u64> = log.recovery_points().map(|p| p.seq).collect();
    assert_eq!(seqs, vec![20, 30, 40]);
}
