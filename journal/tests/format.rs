//! Format tests: golden bytes, round trips, and "never panics on garbage".

use bytes::Bytes;
use ferry_journal::format::*;
use proptest::prelude::*;

const CLUSTER: [u8; 16] = *b"ferry-cluster-01";

#[test]
fn golden_segment_header() {
    let h = SegmentHeader {
        segment_no: 1,
        cluster_id: CLUSTER,
        first_seq: 42,
        segment_size: 1 << 20,
        max_inflight: 1,
        seq_jump: false,
    };
    // Depth 1 is stored as 0: byte-identical to the original v1 header.
    #[rustfmt::skip]
    let expected: [u8; 64] = [
        b'F', b'E', b'R', b'R', b'Y', b'S', b'E', b'G', // 0  magic
        1, 0,                                           // 8  version
        0, 0,                                           // 10 flags
        0x00, 0x10, 0, 0,                               // 12 header block size 4096
        1, 0, 0, 0, 0, 0, 0, 0,                         // 16 segment number
        b'f', b'e', b'r', b'r', b'y', b'-', b'c', b'l', // 24 cluster id
        b'u', b's', b't', b'e', b'r', b'-', b'0', b'1',
        42, 0, 0, 0, 0, 0, 0, 0,                        // 40 first seq
        0, 0, 0x10, 0, 0, 0, 0, 0,                      // 48 segment size 1 MiB
        0, 0, 0, 0,                                     // 56 max_inflight (0 = 1)
        0xfe, 0xcc, 0x80, 0xa4,                         // 60 crc32c salted with segment 1
    ];
    let got = encode_segment_header(&h);
    assert_eq!(got, expected);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&1u64.to_le_bytes()), &expected[..60]);
    assert_eq!(crc.to_le_bytes(), expected[60..64]);
    assert_eq!(decode_segment_header(&got, 1), Ok(h));
    // The same bytes under another file number fail (salt) and are recognised as stale.
    assert_eq!(
        decode_segment_header(&got, 2),
        Err(FormatError::Stale {
            written_for: 1,
            segment: 2
        })
    );
}

/// The writer pipeline depth lives in the formerly reserved u32 at offset 56
/// (covered by the header CRC); 0 means 1.
#[test]
fn golden_segment_header_with_pipeline_depth() {
    let h = SegmentHeader {
        segment_no: 1,
        cluster_id: CLUSTER,
        first_seq: 42,
        segment_size: 1 << 20,
        max_inflight: 2,
        seq_jump: false,
    };
    #[rustfmt::skip]
    let expected: [u8; 64] = [
        b'F', b'E', b'R', b'R', b'Y', b'S', b'E', b'G', // 0  magic
        1, 0,                                           // 8  version
        0, 0,                                           // 10 flags
        0x00, 0x10, 0, 0,                               // 12 header block size 4096
        1, 0, 0, 0, 0, 0, 0, 0,                         // 16 segment number
        b'f', b'e', b'r', b'r', b'y', b'-', b'c', b'l', // 24 cluster id
        b'u', b's', b't', b'e', b'r', b'-', b'0', b'1',
        42, 0, 0, 0, 0, 0, 0, 0,                        // 40 first seq
        0, 0, 0x10, 0, 0, 0, 0, 0,                      // 48 segment size 1 MiB
        2, 0, 0, 0,                                     // 56 max_inflight 2
        0x7f, 0xef, 0xe7, 0x1b,                         // 60 crc32c salted with segment 1
    ];
    let got = encode_segment_header(&h);
    assert_eq!(got, expected);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&1u64.to_le_bytes()), &expected[..60]);
    assert_eq!(crc.to_le_bytes(), expected[60..64]);
    assert_eq!(decode_segment_header(&got, 1), Ok(h));
    // A stored 0 decodes as 1; more than MAX_INFLIGHT_BATCHES is refused.
    let mut zero = got;
    zero[56] = 0;
    let crc = salted_crc(1, &zero[..60]);
    zero[60..64].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_segment_header(&zero, 1).unwrap().max_inflight, 1);
    let mut big = got;
    big[56..60].copy_from_slice(&(MAX_INFLIGHT_BATCHES + 1).to_le_bytes());
    let crc = salted_crc(1, &big[..60]);
    big[60..64].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_segment_header(&big, 1),
        Err(FormatError::Invalid(_))
    ));
}

/// Flags bit 0 of the segment header: the segment's first_seq jumps over skipped
/// sequences (Journal::skip_to). Other flag bits stay refused.
#[test]
fn golden_segment_header_with_seq_jump() {
    let h = SegmentHeader {
        segment_no: 1,
        cluster_id: CLUSTER,
        first_seq: 42,
        segment_size: 1 << 20,
        max_inflight: 1,
        seq_jump: true,
    };
    #[rustfmt::skip]
    let expected: [u8; 64] = [
        b'F', b'E', b'R', b'R', b'Y', b'S', b'E', b'G', // 0  magic
        1, 0,                                           // 8  version
        1, 0,                                           // 10 flags: SEQ_JUMP
        0x00, 0x10, 0, 0,                               // 12 header block size 4096
        1, 0, 0, 0, 0, 0, 0, 0,                         // 16 segment number
        b'f', b'e', b'r', b'r', b'y', b'-', b'c', b'l', // 24 cluster id
        b'u', b's', b't', b'e', b'r', b'-', b'0', b'1',
        42, 0, 0, 0, 0, 0, 0, 0,                        // 40 first seq
        0, 0, 0x10, 0, 0, 0, 0, 0,                      // 48 segment size 1 MiB
        0, 0, 0, 0,                                     // 56 max_inflight (0 = 1)
        0xb7, 0x3a, 0x7c, 0x45,                         // 60 crc32c salted with segment 1
    ];
    let got = encode_segment_header(&h);
    assert_eq!(got[..60], expected[..60]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&1u64.to_le_bytes()), &expected[..60]);
    assert_eq!(crc.to_le_bytes(), got[60..64], "crc {crc:#010x}");
    assert_eq!(got[60..64], expected[60..64], "golden crc");
    assert_eq!(decode_segment_header(&got, 1), Ok(h));
    let mut other = got;
    other[10] = 2;
    let crc = salted_crc(1, &other[..60]);
    other[60..64].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_segment_header(&other, 1),
        Err(FormatError::Invalid(_))
    ));
}

#[test]
fn golden_batch_header() {
    let h = BatchHeader {
        flags: BATCH_FLAG_HAS_SEAL,
        segment_no: 1,
        cluster_id: CLUSTER,
        epoch: 3,
        first_seq: 42,
        last_seq: 43,
        timestamp_ns: 1_700_000_000_000_000_000,
        record_count: 2,
        body_len: 76,
        body_crc: 0xdead_beef,
        encrypted: false,
    };
    #[rustfmt::skip]
    let expected: [u8; 80] = [
        b'F', b'R', b'Y', b'B',                         // 0  magic
        1, 0,                                           // 4  version
        1, 0,                                           // 6  flags (HAS_SEAL)
        1, 0, 0, 0, 0, 0, 0, 0,                         // 8  segment number
        b'f', b'e', b'r', b'r', b'y', b'-', b'c', b'l', // 16 cluster id
        b'u', b's', b't', b'e', b'r', b'-', b'0', b'1',
        3, 0, 0, 0, 0, 0, 0, 0,                         // 32 epoch
        42, 0, 0, 0, 0, 0, 0, 0,                        // 40 first seq
        43, 0, 0, 0, 0, 0, 0, 0,                        // 48 last seq
        0x00, 0x00, 0x2a, 0x36, 0xfe, 0x9c, 0x97, 0x17, // 56 timestamp ns
        2, 0, 0, 0,                                     // 64 record count
        76, 0, 0, 0,                                    // 68 body length
        0xef, 0xbe, 0xad, 0xde,                         // 72 body crc
        0x4e, 0x69, 0x15, 0x86,                         // 76 header crc salted with segment 1
    ];
    let got = encode_batch_header(&h);
    assert_eq!(got, expected);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&1u64.to_le_bytes()), &expected[..76]);
    assert_eq!(crc.to_le_bytes(), expected[76..80]);
    assert_eq!(decode_batch_header(&got, 1), Ok(h));
}

#[test]
fn golden_record_header() {
    let h = RecordHeader {
        seq: 7,
        offset: 4096,
        volume: 2,
        length: 512,
        data_len: 512,
        op: Op::Write,
    };
    #[rustfmt::skip]
    let expected: [u8; 32] = [
        7, 0, 0, 0, 0, 0, 0, 0,       // 0  seq
        0, 0x10, 0, 0, 0, 0, 0, 0,    // 8  offset
        2, 0, 0, 0,                   // 16 volume
        0, 2, 0, 0,                   // 20 length
        0, 2, 0, 0,                   // 24 data length
        1, 0, 0, 0,                   // 28 op, reserved
    ];
    assert_eq!(encode_record_header(&h), expected);
    assert_eq!(decode_record_header(&expected), Ok(h));
}

fn params(first_seq: u64) -> BatchParams {
    BatchParams {
        segment_no: 9,
        cluster_id: CLUSTER,
        epoch: 5,
        first_seq,
        timestamp_ns: 123,
    }
}

fn decode_vec(
    bytes: &[u8],
    segment_no: u64,
) -> Result<(BatchHeader, Vec<(u64, Record)>), FormatError> {
    let h = decode_batch_header(bytes, segment_no)?;
    let end = BATCH_HEADER_LEN + h.body_len as usize;
    if end > bytes.len() {
        return Err(FormatError::Truncated {
            need: end,
            have: bytes.len(),
        });
    }
    let body = Bytes::copy_from_slice(&bytes[BATCH_HEADER_LEN..end]);
    Ok((h, decode_batch_body(&h, &body)?))
}

#[test]
fn invalid_records_are_refused() {
    let bad = [
        Record {
            volume: 0,
            op: Op::Write,
            offset: 0,
            length: 3,
            data: Bytes::from_static(b"ab"),
        },
        Record {
            volume: 0,
            op: Op::Trim,
            offset: 0,
            length: 3,
            data: Bytes::from_static(b"ab"),
        },
        Record {
            volume: 0,
            op: Op::Seal,
            offset: 1,
            length: 0,
            data: Bytes::new(),
        },
        Record::seal(0, Bytes::from(vec![1u8; MAX_SEAL_PAYLOAD + 1])),
    ];
    for r in &bad {
        assert!(validate_record(r).is_err(), "{r:?}");
        assert!(encode_batch_vec(&params(1), std::slice::from_ref(r)).is_err());
    }
    assert!(encode_batch_vec(&params(1), &[]).is_err());
}

#[test]
fn record_with_wrong_seq_is_rejected() {
    let recs = [
        Record::write(1, 0, Bytes::from_static(b"hello")),
        Record::trim(1, 0, 9),
    ];
    let mut b = encode_batch_vec(&params(10), &recs).unwrap();
    // Patch the second record's seq and fix the body crc so only the seq check can fire.
    let second = BATCH_HEADER_LEN + RECORD_HEADER_LEN + 5;
    b[second..second + 8].copy_from_slice(&99u64.to_le_bytes());
    let mut h = decode_batch_header(&b, 9).unwrap();
    h.body_crc = salted_crc(
        9,
        &b[BATCH_HEADER_LEN..BATCH_HEADER_LEN + h.body_len as usize],
    );
    b[..BATCH_HEADER_LEN].copy_from_slice(&encode_batch_header(&h));
    let err = decode_vec(&b, 9).unwrap_err();
    assert!(
        matches!(err, FormatError::Invalid(ref m) if m.contains("seq 99")),
        "{err}"
    );
}

fn arb_record() -> impl Strategy<Value = Record> {
    let data = proptest::collection::vec(any::<u8>(), 0..3000);
    (any::<u32>(), 1u8..=4, any::<u64>(), any::<u32>(), data).prop_map(
        |(volume, op, offset, length, data)| match op {
            1 => Record::write(volume, offset, Bytes::from(data)),
            2 => Record::trim(volume, offset, length),
            3 => Record::write_zeroes(volume, offset, length),
            _ => Record::seal(volume, Bytes::from(data)),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn batch_round_trip(recs in proptest::collection::vec(arb_record(), 1..20), first in 1u64..u64::MAX / 2, seg in any::<u64>()) {
        let p = BatchParams { segment_no: seg, cluster_id: CLUSTER, epoch: 77, first_seq: first, timestamp_ns: 5 };
        let b = encode_batch_vec(&p, &recs).unwrap();
        prop_assert_eq!(b.len() % BLOCK_SIZE, 0);
        let (h, got) = decode_vec(&b, seg).unwrap();
        prop_assert_eq!(h.first_seq, first);
        prop_assert_eq!(h.last_seq, first + recs.len() as u64 - 1);
        prop_assert_eq!(h.epoch, 77);
        prop_assert_eq!(h.disk_len() as usize, b.len());
        let got_recs: Vec<Record> = got.iter().map(|(_, r)| r.clone()).collect();
        prop_assert_eq!(&got_recs, &recs);
        for (i, (s, _)) in got.iter().enumerate() {
            prop_assert_eq!(*s, first + i as u64);
        }
        // Another segment number (salt) never validates.
        prop_assert!(decode_batch_header(&b, seg.wrapping_add(1)).is_err());
    }

    #[test]
    fn combine_equals_checksum_of_concatenation(a in proptest::collection::vec(any::<u8>(), 0..5000), b in proptest::collection::vec(any::<u8>(), 0..5000), seed in any::<u32>()) {
        let whole = crc32c::crc32c_append(seed, &[a.as_slice(), b.as_slice()].concat());
        let ca = crc32c::crc32c_append(seed, &a);
        prop_assert_eq!(crc32c_combine(ca, data_crc(&b), b.len()), whole);
        prop_assert_eq!(crc32c_combine(ca, data_crc(&b), b.len()), crc32c::crc32c_combine(ca, data_crc(&b), b.len()));
    }

    #[test]
    fn precomputed_crcs_give_identical_bytes(recs in proptest::collection::vec(arb_record(), 1..12), known in proptest::collection::vec(any::<bool>(), 12), seg in any::<u64>()) {
        let mut p = params(1);
        p.segment_no = seg;
        let plain = encode_batch_vec(&p, &recs).unwrap();
        let mut out = vec![0xeeu8; plain.len()];
        let (_, n) = encode_batch_with_crcs(
            &mut out,
            &p,
            recs.iter().zip(&known).map(|(r, k)| (r, k.then(|| data_crc(&r.data)))),
        )
        .unwrap();
        prop_assert_eq!(n, plain.len());
        prop_assert_eq!(out, plain);
    }

    #[test]
    fn any_corrupted_byte_is_detected(recs in proptest::collection::vec(arb_record(), 1..5), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let b = encode_batch_vec(&params(1), &recs).unwrap();
        let h = decode_batch_header(&b, 9).unwrap();
        let used = BATCH_HEADER_LEN + h.body_len as usize;
        let mut c = b.clone();
        c[pos.index(used)] ^= flip;
        prop_assert!(decode_vec(&c, 9).is_err());
    }

    #[test]
    fn segment_header_round_trip(no in any::<u64>(), first in 1u64.., size in 2u64..1_000_000, depth in 1u32..=MAX_INFLIGHT_BATCHES) {
        let h = SegmentHeader { segment_no: no, cluster_id: CLUSTER, first_seq: first, segment_size: size * BLOCK_SIZE as u64, max_inflight: depth, seq_jump: no % 2 == 0 };
        prop_assert_eq!(decode_segment_header(&encode_segment_header(&h), no), Ok(h));
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), seg in any::<u64>()) {
        let _ = decode_segment_header(&bytes, seg);
        let _ = decode_batch_header(&bytes, seg);
        let _ = decode_record_header(&bytes);
        let _ = decode_vec(&bytes, seg);
    }

    #[test]
    fn random_body_under_valid_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..600), count in 1u32..50, first in 1u64..1000) {
        // A header that validates (as if the header landed but the body is garbage,
        // or a checksum collision): decoding the body must still only return errors.
        let h = BatchHeader {
            flags: BATCH_FLAG_HAS_SEAL, segment_no: 3, cluster_id: CLUSTER, epoch: 0,
            first_seq: first, last_seq: first + count as u64 - 1, timestamp_ns: 0,
            record_count: count, body_len: body.len() as u32, body_crc: salted_crc(3, &body),
            encrypted: false,
        };
        let _ = decode_batch_body(&h, &Bytes::from(body));
    }
}

#[test]
fn combine_handles_large_lengths() {
    // Lengths past 2^32 bytes use powers of x beyond the first 32 table entries.
    for len in [1usize << 20, (1 << 32) + 12_345, usize::MAX / 3] {
        let ours = crc32c_combine(0x1234_5678, 0x9abc_def0, len);
        let reference = crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, len);
        assert_eq!(ours, reference, "len {len}");
    }
}
