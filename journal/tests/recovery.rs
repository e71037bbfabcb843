//! One test per row of the recovery decision table, on hand-made segment files.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ferry_journal::format::{self, BatchParams, SegmentHeader, BLOCK_SIZE};
use ferry_journal::*;

const SEG: u64 = MIB;
const REC_LEN: usize = 1000;

/// A segment image being built in memory.
struct Img {
    no: u64,
    buf: Vec<u8>,
    pos: usize,
    /// Offsets of the batches written, in order.
    batches: Vec<usize>,
}

impl Img {
    fn new(no: u64, first_seq: u64) -> Img {
        Img::with_depth(no, first_seq, 1)
    }
    /// Segment whose header carries the `SEQ_JUMP` flag (Journal::skip_to).
    fn jumping(no: u64, first_seq: u64) -> Img {
        let mut img = Img::with_depth(no, first_seq, 1);
        let h = SegmentHeader {
            segment_no: no,
            cluster_id: CLUSTER,
            first_seq,
            segment_size: SEG,
            max_inflight: 1,
            seq_jump: true,
        };
        img.buf[..format::SEGMENT_HEADER_LEN].copy_from_slice(&format::encode_segment_header(&h));
        img
    }
    /// Segment whose header records `depth` batch writes in flight.
    fn with_depth(no: u64, first_seq: u64, depth: u32) -> Img {
        let mut buf = vec![0u8; SEG as usize];
        let h = SegmentHeader {
            segment_no: no,
            cluster_id: CLUSTER,
            first_seq,
            segment_size: SEG,
            max_inflight: depth,
            seq_jump: false,
        };
        buf[..format::SEGMENT_HEADER_LEN].copy_from_slice(&format::encode_segment_header(&h));
        Img {
            no,
            buf,
            pos: BLOCK_SIZE,
            batches: Vec::new(),
        }
    }
    /// Appends a batch of `n` records starting at `first_seq`, salted with `salt_no`.
    fn batch_salted(&mut self, salt_no: u64, first_seq: u64, n: u64) -> &mut Img {
        let recs: Vec<Record> = (first_seq..first_seq + n)
            .map(|s| Record::write(0, s * 4096, payload(s, REC_LEN)))
            .collect();
        let p = BatchParams {
            segment_no: salt_no,
            cluster_id: CLUSTER,
            epoch: 1,
            first_seq,
            timestamp_ns: 1,
        };
        let b = format::encode_batch_vec(&p, &recs).unwrap();
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(&b);
        self.batches.push(self.pos);
        self.pos += b.len();
        self
    }
    fn batch(&mut self, first_seq: u64, n: u64) -> &mut Img {
        let no = self.no;
        self.batch_salted(no, first_seq, n)
    }
    fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join(segment_file_name(self.no));
        std::fs::write(&p, &self.buf).unwrap();
        p
    }
}

fn open(dir: &Path, mode: RecoveryMode) -> Result<(Journal, RecoveryReport), JournalError> {
    let mut o = opts(dir, EngineChoice::Std);
    o.recovery = mode;
    Journal::open(o)
}

fn read_all(j: &Journal) -> Vec<u64> {
    j.reader(0)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            assert_eq!(e.record.data, payload(e.seq, REC_LEN));
            e.seq
        })
        .collect()
}

fn expect_corruption(
    r: Result<(Journal, RecoveryReport), JournalError>,
    file: &Path,
    offset: u64,
    needle: &str,
) {
    match r {
        Err(JournalError::Corruption {
            segment,
            offset: o,
            reason,
        }) => {
            assert_eq!(segment, file, "{reason}");
            assert_eq!(o, offset, "{reason}");
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            );
        }
        Err(e) => panic!("expected corruption, got {e}"),
        Ok((_, rep)) => panic!("expected corruption, opened: {rep:?}"),
    }
}

#[test]
fn clean_log_with_zero_tail() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).batch(4, 2).write(dir.path());
    for mode in [
        RecoveryMode::TolerateTornTail,
        RecoveryMode::AbsoluteConsistency,
    ] {
        let (j, rep) = open(dir.path(), mode).unwrap();
        assert_eq!(
            (
                rep.first_seq,
                rep.last_seq,
                rep.truncated_batches,
                rep.segments
            ),
            (1, 5, 0, 1)
        );
        assert_eq!(read_all(&j), vec![1, 2, 3, 4, 5]);
    }
}

#[test]
fn torn_header_is_truncated_and_zeroed() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Img::new(1, 1);
        img.batch(1, 3).batch(4, 2);
        let torn_at = img.batches[1];
        // Half a header landed: first 40 bytes of garbage.
        img.buf[torn_at + 8..torn_at + 40].fill(0xab);
        let path = img.write(dir.path());
        let err = open(dir.path(), RecoveryMode::AbsoluteConsistency)
            .err()
            .unwrap();
        assert!(
            matches!(err, JournalError::TornTail { offset, .. } if offset == torn_at as u64),
            "{err}"
        );
        let mut o = opts(dir.path(), engine);
        o.recovery = RecoveryMode::TolerateTornTail;
        let (j, rep) = Journal::open(o.clone()).unwrap();
        assert_eq!(
            (rep.last_seq, rep.truncated_batches, rep.truncated_bytes),
            (3, 1, BLOCK_SIZE as u64)
        );
        let disk = std::fs::read(&path).unwrap();
        assert!(
            disk[torn_at..torn_at + BLOCK_SIZE].iter().all(|&b| b == 0),
            "torn block not zeroed"
        );
        assert_eq!(read_all(&j), vec![1, 2, 3]);
        // The log continues at the truncation point with the next sequence.
        assert_eq!(
            j.append_wait(Record::write(0, 0, payload(4, REC_LEN)))
                .unwrap(),
            4
        );
        j.close().unwrap();
        let (j, rep) = Journal::open(o).unwrap();
        assert_eq!((rep.last_seq, rep.truncated_batches), (4, 0));
        assert_eq!(read_all(&j), vec![1, 2, 3, 4]);
    }
}

#[test]
fn torn_body_is_truncated_and_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3).batch(4, 2);
    let torn_at = img.batches[1];
    img.buf[torn_at + 300] ^= 0xff;
    let path = img.write(dir.path());
    assert!(matches!(
        open(dir.path(), RecoveryMode::AbsoluteConsistency),
        Err(JournalError::TornTail { .. })
    ));
    let (j, rep) = open(dir.path(), RecoveryMode::TolerateTornTail).unwrap();
    assert_eq!((rep.last_seq, rep.truncated_batches), (3, 1));
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[torn_at..img.pos].iter().all(|&b| b == 0));
    assert_eq!(read_all(&j), vec![1, 2, 3]);
}

#[test]
fn bad_body_before_a_valid_batch_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3).batch(4, 2).batch(6, 1);
    let bad = img.batches[1];
    img.buf[bad + 200] ^= 0x01;
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        img.batches[2] as u64,
        "valid batch (seq 6..=6)",
    );
    // Nothing was modified by the refused open.
    assert_eq!(std::fs::read(&path).unwrap(), img.buf);
}

#[test]
fn bad_header_before_a_valid_batch_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3).batch(4, 2).batch(6, 1);
    img.buf[img.batches[1] + 50] ^= 0x10;
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        img.batches[2] as u64,
        "bad batch header",
    );
}

#[test]
fn valid_batch_after_zero_block_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3);
    img.pos += BLOCK_SIZE; // a lost write leaves a zero hole
    img.batch(4, 1);
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        img.batches[1] as u64,
        "end of the log",
    );
}

#[test]
fn stale_batches_of_a_recycled_segment_end_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(5, 10);
    // Batches 10..=12 belong to segment 5; what follows was written when the file
    // was segment 2 (salted with 2): it must neither validate nor count as torn.
    img.batch(10, 3)
        .batch_salted(2, 13, 4)
        .batch_salted(2, 17, 4);
    img.write(dir.path());
    for mode in [
        RecoveryMode::TolerateTornTail,
        RecoveryMode::AbsoluteConsistency,
    ] {
        let (j, rep) = open(dir.path(), mode).unwrap();
        assert_eq!(
            (rep.first_seq, rep.last_seq, rep.truncated_batches),
            (10, 12, 0)
        );
        assert_eq!(read_all(&j), vec![10, 11, 12]);
        j.close().unwrap();
    }
    // Appending over the stale area keeps an all-zero block after each batch.
    let (j, _) = open(dir.path(), RecoveryMode::AbsoluteConsistency).unwrap();
    for s in 13..=14 {
        assert_eq!(
            j.append_wait(Record::write(0, 0, payload(s, REC_LEN)))
                .unwrap(),
            s
        );
    }
    j.close().unwrap();
    let (j, rep) = open(dir.path(), RecoveryMode::AbsoluteConsistency).unwrap();
    assert_eq!(rep.last_seq, 14);
    assert_eq!(read_all(&j), (10..=14).collect::<Vec<_>>());
}

#[test]
fn sequence_gap_inside_a_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3).batch(5, 2);
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        img.batches[1] as u64,
        "expected 4",
    );
}

#[test]
fn sequence_gap_across_segments_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).write(dir.path());
    let p2 = Img::new(2, 5).batch(5, 1).write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &p2,
        0,
        "gap",
    );
}

/// A gap is accepted only in front of a segment flagged SEQ_JUMP, and even then
/// an overlap is corruption.
#[test]
fn sequence_jump_segment_allows_a_gap_but_not_an_overlap() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).write(dir.path());
    Img::jumping(2, 10).batch(10, 2).write(dir.path());
    let (j, rep) = open(dir.path(), RecoveryMode::TolerateTornTail).unwrap();
    assert_eq!((rep.first_seq, rep.last_seq), (1, 11));
    assert_eq!(read_all(&j), vec![1, 2, 3, 10, 11]);
    drop(j);
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).write(dir.path());
    let p2 = Img::jumping(2, 3).batch(3, 1).write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &p2,
        0,
        "gap/overlap",
    );
}

#[test]
fn missing_middle_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).write(dir.path());
    let p3 = Img::new(3, 4).batch(4, 1).write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &p3,
        0,
        "missing",
    );
}

#[test]
fn torn_tail_in_an_earlier_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Img::new(1, 1);
    a.batch(1, 3).batch(4, 1);
    a.buf[a.batches[1] + 100] ^= 1;
    let p1 = a.write(dir.path());
    Img::new(2, 5).batch(5, 1).write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &p1,
        a.batches[1] as u64,
        "later segments",
    );
}

#[test]
fn torn_segment_activation_becomes_a_spare() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).write(dir.path());
    let mut b = Img::new(2, 4);
    b.batch(4, 2);
    // The activation write tore: header and first batch damaged, nothing valid after.
    b.buf[20] ^= 0x40;
    let first = b.batches[0];
    b.buf[first + 200] ^= 0x01;
    b.write(dir.path());
    assert!(matches!(
        open(dir.path(), RecoveryMode::AbsoluteConsistency),
        Err(JournalError::TornTail { offset: 0, .. })
    ));
    let (j, rep) = open(dir.path(), RecoveryMode::TolerateTornTail).unwrap();
    assert_eq!(
        (
            rep.last_seq,
            rep.truncated_batches,
            rep.segments,
            rep.spare_segments
        ),
        (3, 1, 1, 1)
    );
    assert_eq!(read_all(&j), vec![1, 2, 3]);
}

#[test]
fn leftover_temp_files_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 1).write(dir.path());
    std::fs::write(dir.path().join("0000000000000007.seg.tmp"), [1u8; 4096]).unwrap();
    let (_j, rep) = open(dir.path(), RecoveryMode::TolerateTornTail).unwrap();
    assert_eq!((rep.removed_temp_files, rep.last_seq), (1, 1));
    assert!(!dir.path().join("0000000000000007.seg.tmp").exists());
}

// ---------------------------------------------------------------- pipelined tails

/// Ways the older of two in-flight batch writes can fail to land.
fn damage(img: &mut Img, at: usize, how: &str) {
    match how {
        // Header block never written (the write did not reach the device at all).
        "zero" => img.buf[at..at + BLOCK_SIZE].fill(0),
        "header" => img.buf[at + 8..at + 40].fill(0xab),
        "body" => img.buf[at + 300] ^= 0xff,
        _ => unreachable!(),
    }
}

#[test]
fn depth2_invalid_batch_then_valid_last_batch_is_a_torn_tail() {
    for how in ["zero", "header", "body"] {
        for reopen_depth in [1usize, 2] {
            let dir = tempfile::tempdir().unwrap();
            let mut img = Img::with_depth(1, 1, 2);
            img.batch(1, 3).batch(4, 2).batch(6, 1);
            let (k, k1) = (img.batches[1], img.batches[2]);
            damage(&mut img, k, how);
            let path = img.write(dir.path());
            // Refused without modification under AbsoluteConsistency.
            assert!(
                matches!(
                    open(dir.path(), RecoveryMode::AbsoluteConsistency),
                    Err(JournalError::TornTail { offset, .. }) if offset == k as u64
                ),
                "{how}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), img.buf);
            // Recorded depth 2 decides, whatever the reopening writer's depth.
            let mut o = opts(dir.path(), EngineChoice::Std);
            o.max_inflight_batches = reopen_depth;
            let (j, rep) = Journal::open(o.clone()).unwrap();
            assert_eq!(
                (rep.last_seq, rep.truncated_batches, rep.truncated_bytes),
                (3, 2, (img.pos - k) as u64),
                "{how}"
            );
            let ev = rep
                .events
                .iter()
                .find(|e| {
                    e.contains("discarded 2 batches, seqs 4..6, written but never acknowledged")
                })
                .unwrap_or_else(|| panic!("{how}: no discard event in {:?}", rep.events));
            assert!(ev.contains(&format!("offset {k}")), "{ev}");
            let disk = std::fs::read(&path).unwrap();
            assert!(
                disk[k..img.pos].iter().all(|&b| b == 0),
                "{how}: span not zeroed"
            );
            assert!(k1 < img.pos);
            assert_eq!(read_all(&j), vec![1, 2, 3]);
            // The log continues at the truncation point, and reopens clean.
            for s in 4..=5 {
                assert_eq!(
                    j.append_wait(Record::write(0, 0, payload(s, REC_LEN)))
                        .unwrap(),
                    s
                );
            }
            j.close().unwrap();
            let (j, rep) = Journal::open(o).unwrap();
            assert_eq!((rep.last_seq, rep.truncated_batches), (5, 0), "{how}");
            assert_eq!(read_all(&j), vec![1, 2, 3, 4, 5]);
        }
    }
}

#[test]
fn depth2_invalid_batch_then_two_valid_batches_is_corruption() {
    for how in ["zero", "header", "body"] {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Img::with_depth(1, 1, 2);
        img.batch(1, 3).batch(4, 2).batch(6, 1).batch(7, 1);
        {
            let at = img.batches[1];
            damage(&mut img, at, how);
        }
        let path = img.write(dir.path());
        let mut o = opts(dir.path(), EngineChoice::Std);
        o.max_inflight_batches = 2;
        let needle = if how == "zero" {
            "end of the log"
        } else {
            "invalid batch"
        };
        expect_corruption(Journal::open(o), &path, img.batches[2] as u64, needle);
        assert_eq!(std::fs::read(&path).unwrap(), img.buf, "{how}: modified");
    }
}

#[test]
fn depth1_recorded_invalid_batch_then_valid_batch_is_corruption() {
    // Written with depth 1 (header field 0): opening with depth 2 changes nothing.
    for how in ["zero", "header", "body"] {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Img::new(1, 1);
        img.batch(1, 3).batch(4, 2).batch(6, 1);
        {
            let at = img.batches[1];
            damage(&mut img, at, how);
        }
        let path = img.write(dir.path());
        let mut o = opts(dir.path(), EngineChoice::Std);
        o.max_inflight_batches = 2;
        expect_corruption(
            Journal::open(o),
            &path,
            img.batches[2] as u64,
            "valid batch (seq 6..=6)",
        );
    }
}

#[test]
fn depth2_tail_rules_need_contiguous_seqs_and_a_fresh_gap() {
    // The valid batch after the invalid one must continue the sequence.
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::with_depth(1, 1, 2);
    img.batch(1, 3).batch(4, 2).batch(3, 1);
    {
        let at = img.batches[1];
        damage(&mut img, at, "body");
    }
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        img.batches[2] as u64,
        "valid batch (seq 3..=3)",
    );
    // A stale block (recycled area) at the end followed by a valid batch stays
    // corruption: the writer never pipelines over not-known-zero space.
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::with_depth(5, 10, 2);
    img.batch(10, 3).batch_salted(2, 13, 1).batch(14, 1);
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        img.batches[2] as u64,
        "end of the log",
    );
    // A depth-2 tail in a segment that is not the last one is still corruption.
    let dir = tempfile::tempdir().unwrap();
    let mut a = Img::with_depth(1, 1, 2);
    a.batch(1, 3).batch(4, 1).batch(5, 1);
    {
        let at = a.batches[1];
        damage(&mut a, at, "body");
    }
    let p1 = a.write(dir.path());
    Img::with_depth(2, 6, 2).batch(6, 1).write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &p1,
        a.batches[1] as u64,
        "later segments",
    );
}

/// A header whose checksum verifies was written on purpose: an unknown format version
/// (a newer ferry) must be refused, never truncated away as if torn.
#[test]
fn valid_checksum_with_unknown_version_is_refused_not_truncated() {
    // Batch header: version at byte 4, checksum over bytes 0..76 at 76.
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3).batch(4, 2);
    let at = img.batches[1];
    img.buf[at + 4..at + 6].copy_from_slice(&99u16.to_le_bytes());
    let crc = format::salted_crc(1, &img.buf[at..at + 76]);
    img.buf[at + 76..at + 80].copy_from_slice(&crc.to_le_bytes());
    let path = img.write(dir.path());
    let before = std::fs::read(&path).unwrap();
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        at as u64,
        "valid checksum",
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a refused open changes nothing"
    );

    // Segment header: version at byte 8, checksum over bytes 0..60 at 60.
    let dir = tempfile::tempdir().unwrap();
    let mut img = Img::new(1, 1);
    img.batch(1, 3);
    img.buf[8..10].copy_from_slice(&99u16.to_le_bytes());
    let crc = format::salted_crc(1, &img.buf[0..60]);
    img.buf[60..64].copy_from_slice(&crc.to_le_bytes());
    let path = img.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &path,
        0,
        "valid checksum",
    );
}

// ---------------------------------------------------------------- bad segment headers

/// A segment header that fails its CRC while acknowledged batches follow it is
/// damage, not a torn activation: recovery must refuse (naming file and offset)
/// instead of wiping the header and, with it, every record of the segment.
#[test]
fn bad_header_of_the_active_segment_with_valid_batches_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = open(dir.path(), RecoveryMode::TolerateTornTail).unwrap();
    for s in 1..=5u64 {
        assert_eq!(
            j.append_wait(Record::write(0, s * 4096, payload(s, REC_LEN)))
                .unwrap(),
            s
        );
    }
    j.close().unwrap();
    // Segment 1 is the active one and holds all five acknowledged records.
    let p1 = dir.path().join(segment_file_name(1));
    let mut buf = std::fs::read(&p1).unwrap();
    buf[60] ^= 0x01; // the header CRC
    std::fs::write(&p1, &buf).unwrap();
    for mode in [
        RecoveryMode::TolerateTornTail,
        RecoveryMode::AbsoluteConsistency,
    ] {
        expect_corruption(open(dir.path(), mode), &p1, 0, "valid batch");
    }
    // Nothing was repaired: the damaged header and the batches are still there.
    assert_eq!(std::fs::read(&p1).unwrap(), buf);
}

/// Same with an older data segment before the damaged (newest) one.
#[test]
fn bad_header_after_a_data_segment_with_valid_batches_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    Img::new(1, 1).batch(1, 3).write(dir.path());
    let mut b = Img::new(2, 4);
    b.batch(4, 2).batch(6, 1);
    b.buf[60] ^= 0x01;
    let p2 = b.write(dir.path());
    expect_corruption(
        open(dir.path(), RecoveryMode::TolerateTornTail),
        &p2,
        0,
        "valid batch (seq 4..=5) at offset 4096",
    );
}
