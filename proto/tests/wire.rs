//! Wire-format properties: round trips, zero-copy decoding, and a decoder
//! that rejects (never panics on) random, truncated, bit-flipped and
//! re-checksummed corrupt input.

use bytes::{Bytes, BytesMut};
use ferry_proto::wire::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Strategies

fn arb_name(max: usize) -> impl Strategy<Value = String> {
    // Mixes ASCII and multi-byte characters; filtered to the byte limit.
    proptest::string::string_regex("[a-z0-9é中-]{0,40}")
        .expect("regex")
        .prop_filter("byte limit", move |s| s.len() <= max)
}

fn arb_volume() -> impl Strategy<Value = VolumeGeometry> {
    (
        any::<u32>(),
        arb_name(MAX_NAME_LEN),
        9u32..17,
        0u64..1 << 30,
    )
        .prop_map(|(id, name, shift, blocks)| VolumeGeometry {
            id,
            name,
            size_bytes: blocks << shift,
            block_size: 1 << shift,
        })
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        any::<u64>(),
        1u16..4,
        0u16..4,
        any::<[u8; 16]>(),
        any::<[u8; 16]>(),
        arb_name(MAX_NAME_LEN),
        prop_oneof![Just(Role::Primary), Just(Role::Standby)],
        proptest::collection::vec(arb_volume(), 0..6),
        any::<u64>(),
    )
        .prop_map(
            |(epoch, min, extra, cluster_id, node_id, node_name, role, vols, resume)| {
                // Volume ids must be unique.
                let mut volumes: Vec<VolumeGeometry> = Vec::new();
                for v in vols {
                    if !volumes.iter().any(|w| w.id == v.id) {
                        volumes.push(v);
                    }
                }
                Hello {
                    epoch,
                    min_version: min,
                    max_version: min + extra,
                    cluster_id,
                    node_id,
                    node_name,
                    role,
                    volumes,
                    resume_position: resume,
                }
            },
        )
}

fn arb_record_body() -> impl Strategy<Value = (u32, RecordOp, u64, u32, Bytes)> {
    let data_op = (
        prop_oneof![Just(RecordOp::Write), Just(RecordOp::Seal)],
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(op, mut data)| {
            if op == RecordOp::Write && data.is_empty() {
                data.push(0xaa);
            }
            (op, data.len() as u32, Bytes::from(data))
        });
    let no_data_op = (
        prop_oneof![Just(RecordOp::Trim), Just(RecordOp::WriteZeroes)],
        1u32..=u32::MAX,
    )
        .prop_map(|(op, len)| (op, len, Bytes::new()));
    (
        any::<u32>(),
        0u64..1 << 50,
        prop_oneof![data_op, no_data_op],
    )
        .prop_map(|(vol, off, (op, len, data))| (vol, op, off, len, data))
}

fn arb_write_set() -> impl Strategy<Value = WriteSet> {
    (
        any::<u64>(),
        1u64..1 << 60,
        any::<u64>(),
        proptest::collection::vec(arb_record_body(), 1..8),
    )
        .prop_map(|(epoch, first_seq, timestamp_ns, bodies)| {
            let records: Vec<WireRecord> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, (volume, op, offset, length, data))| WireRecord {
                    seq: first_seq + i as u64,
                    volume,
                    op,
                    offset,
                    length,
                    data,
                })
                .collect();
            WriteSet {
                epoch,
                first_seq,
                last_seq: first_seq + records.len() as u64 - 1,
                timestamp_ns,
                records,
            }
        })
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        arb_hello().prop_map(Frame::Hello),
        (any::<u64>(), any::<u16>(), any::<u64>(), any::<bool>()).prop_map(
            |(epoch, version, resume_seq, received_acks)| {
                Frame::HelloAck(HelloAck {
                    epoch,
                    version,
                    resume_seq,
                    received_acks,
                })
            }
        ),
        arb_write_set().prop_map(Frame::WriteSet),
        // applied ≤ durable ≤ received; received above durable is a V4 ack.
        (any::<u64>(), any::<[u64; 3]>()).prop_map(|(epoch, mut p)| {
            p.sort_unstable();
            Frame::Ack(Ack {
                epoch,
                received_durable_seq: p[1],
                applied_seq: p[0],
                received_seq: p[2],
            })
        }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop_oneof![
                Just(None),
                Just(Some(SyncLoss::None)),
                any::<u64>().prop_map(|at| Some(SyncLoss::DegradedAt(at)))
            ]
        )
            .prop_map(|(epoch, s, e, l, sync_loss)| {
                Frame::Heartbeat(Heartbeat {
                    epoch,
                    sent_at_ns: s,
                    echo_ns: e,
                    last_seq: l,
                    sync_loss,
                })
            }),
        (
            any::<u64>(),
            prop_oneof![1u32..=11, 12u32..=u32::MAX],
            "[ -~]{0,200}"
        )
            .prop_map(|(epoch, code, reason)| Frame::Error(ErrorFrame {
                epoch,
                code: ErrorCode::from_u32(code),
                reason,
            })),
    ]
}

/// Recomputes both checksums so corrupt content reaches the payload parser
/// instead of stopping at the CRC check.
fn fix_checksums(buf: &mut [u8]) {
    if buf.len() < HEADER_LEN {
        return;
    }
    let payload_crc = crc32c::crc32c(&buf[HEADER_LEN..]);
    buf[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&buf[0..28]);
    buf[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

fn encoded(frame: &Frame) -> Bytes {
    encode(frame).expect("generated frames are valid").freeze()
}

// ---------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn roundtrip_every_frame(frame in arb_frame()) {
        let bytes = encoded(&frame);
        prop_assert_eq!(decode(bytes).expect("decode"), frame);
    }

    #[test]
    fn vectored_encoding_matches_and_shares_data(ws in arb_write_set()) {
        let parts = encode_write_set_vectored(&ws).expect("vectored");
        let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let plain = encoded(&Frame::WriteSet(ws.clone()));
        prop_assert_eq!(&joined[..], &plain[..]);
        // Every non-empty record's data goes out as the caller's own buffer.
        for r in ws.records.iter().filter(|r| !r.data.is_empty()) {
            prop_assert!(parts.iter().any(|p| p.as_ptr() == r.data.as_ptr() && p.len() == r.data.len()));
        }
    }

    #[test]
    fn decoded_record_data_points_into_frame_buffer(ws in arb_write_set()) {
        let bytes = encoded(&Frame::WriteSet(ws));
        let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        let Ok(Frame::WriteSet(out)) = decode(bytes.clone()) else {
            return Err(TestCaseError::fail("not a write-set"));
        };
        for r in out.records.iter().filter(|r| !r.data.is_empty()) {
            prop_assert!(range.contains(&(r.data.as_ptr() as usize)));
        }
    }

    #[test]
    fn random_bytes_are_rejected_without_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(decode(Bytes::from(data.clone())).is_err());
        let mut dec = FrameDecoder::default();
        dec.feed(&data);
        // Random bytes can only "work" by being incomplete.
        prop_assert!(!matches!(dec.next_frame(), Ok(Some(_))));
    }

    #[test]
    fn random_bytes_after_valid_magic_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), fix in any::<bool>()) {
        let mut buf = b"FRY1".to_vec();
        buf.extend_from_slice(&data);
        if fix { fix_checksums(&mut buf); }
        let _ = decode(Bytes::from(buf));
    }

    #[test]
    fn corrupt_payload_with_valid_checksums_never_panics(
        frame in arb_frame(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut buf = encoded(&frame).to_vec();
        let payload_len = buf.len() - HEADER_LEN;
        if payload_len == 0 { return Ok(()); }
        for (idx, val) in edits {
            let at = HEADER_LEN + idx.index(payload_len);
            buf[at] = val;
        }
        fix_checksums(&mut buf);
        // Either rejected or decoded into something that re-encodes to the same bytes.
        if let Ok(f) = decode(Bytes::from(buf.clone())) {
            prop_assert_eq!(&encoded(&f)[..], &buf[..]);
        }
    }

    #[test]
    fn every_truncation_is_reported_as_truncated(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let bytes = encoded(&frame);
        let cut = cut.index(bytes.len());
        let err = decode(bytes.slice(..cut)).expect_err("truncated frame decoded");
        let is_truncated = matches!(err, DecodeError::Truncated { .. });
        prop_assert!(is_truncated, "{:?}", err);
    }

    #[test]
    fn every_single_bit_flip_is_detected(frame in arb_frame(), bit in any::<prop::sample::Index>()) {
        let mut buf = encoded(&frame).to_vec();
        let bit = bit.index(buf.len() * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(Bytes::from(buf)).is_err());
    }

    #[test]
    fn streaming_decoder_is_independent_of_chunking(
        frames in proptest::collection::vec(arb_frame(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut stream = BytesMut::new();
        for f in &frames { stream.extend_from_slice(&encoded(f)); }
        let stream = stream.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        for w in points.windows(2) {
            dec.feed(&stream[w[0]..w[1]]);
            while let Some(f) = dec.next_frame().expect("valid stream") {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert_eq!(dec.buffered_len(), 0);
    }
}

// ---------------------------------------------------------------------------
// Precise errors

fn ack_frame() -> Vec<u8> {
    encoded(&Frame::Ack(Ack {
        epoch: 3,
        received_durable_seq: 10,
        applied_seq: 9,
        received_seq: 10,
    }))
    .to_vec()
}

fn err_of(buf: Vec<u8>) -> DecodeError {
    decode(Bytes::from(buf)).expect_err("must not decode")
}

#[test]
fn bad_magic() {
    let mut b = ack_frame();
    b[0] = b'X';
    assert!(matches!(err_of(b), DecodeError::BadMagic { .. }));
}

#[test]
fn unsupported_version_reports_range() {
    let mut b = ack_frame();
    b[4] = 9;
    fix_checksums(&mut b);
    assert_eq!(
        err_of(b),
        DecodeError::UnsupportedVersion {
            got: 9,
            min: 1,
            max: 4
        }
    );
}

/// Found by the wire_frame fuzzer: an Ack (no V2 tail) under a version-2 header
/// decoded, then re-encoded as version 1, so the bytes were not canonical.
#[test]
fn v2_header_on_a_frame_without_a_tail_is_refused() {
    let mut b = ack_frame();
    b[4] = 2;
    fix_checksums(&mut b);
    assert!(matches!(
        err_of(b),
        DecodeError::InvalidField {
            field: "header.version",
            ..
        }
    ));
}

#[test]
fn unknown_frame_type() {
    let mut b = ack_frame();
    b[6] = 0x77;
    fix_checksums(&mut b);
    assert_eq!(err_of(b), DecodeError::UnknownFrameType { got: 0x77 });
}

#[test]
fn nonzero_flags_rejected() {
    let mut b = ack_frame();
    b[8] = 1;
    fix_checksums(&mut b);
    assert!(matches!(
        err_of(b),
        DecodeError::InvalidField {
            field: "header.flags",
            ..
        }
    ));
}

#[test]
fn oversized_payload_rejected_before_buffering() {
    let mut b = ack_frame();
    b[20..24].copy_from_slice(&(MAX_PAYLOAD_LEN as u32 + 1).to_le_bytes());
    fix_checksums(&mut b[..HEADER_LEN]);
    let b = b[..HEADER_LEN].to_vec();
    assert!(matches!(err_of(b.clone()), DecodeError::TooLarge { .. }));
    // The streaming decoder refuses it from the header alone.
    let mut dec = FrameDecoder::default();
    dec.feed(&b);
    assert!(matches!(
        dec.next_frame(),
        Err(DecodeError::TooLarge { .. })
    ));
    assert_eq!(dec.next_frame(), Err(DecodeError::Poisoned));
}

#[test]
fn configurable_payload_limit() {
    let b = ack_frame();
    assert!(matches!(
        decode_with_limit(Bytes::from(b), 8),
        Err(DecodeError::TooLarge { len: 16, max: 8 })
    ));
}

#[test]
fn header_and_payload_checksums_are_distinguished() {
    let mut b = ack_frame();
    b[HEADER_LEN] ^= 1;
    assert!(matches!(
        err_of(b),
        DecodeError::BadChecksum {
            which: ChecksumKind::Payload,
            ..
        }
    ));
    let mut b = ack_frame();
    b[13] ^= 1; // epoch
    assert!(matches!(
        err_of(b),
        DecodeError::BadChecksum {
            which: ChecksumKind::Header,
            ..
        }
    ));
}

#[test]
fn ack_applied_beyond_durable_is_invalid() {
    let mut b = ack_frame();
    b[HEADER_LEN + 8] = 11; // applied 11 > durable 10
    fix_checksums(&mut b);
    assert!(matches!(
        err_of(b),
        DecodeError::InvalidField {
            field: "ack.applied_seq",
            ..
        }
    ));
}

#[test]
fn streaming_decoder_rejects_garbage_at_first_byte() {
    let mut dec = FrameDecoder::default();
    dec.feed(b"G");
    assert!(matches!(
        dec.next_frame(),
        Err(DecodeError::BadMagic { .. })
    ));
}

#[test]
fn encoder_refuses_invalid_frames() {
    let ws = WriteSet {
        epoch: 1,
        first_seq: 5,
        last_seq: 6,
        timestamp_ns: 0,
        records: vec![WireRecord {
            seq: 5,
            volume: 0,
            op: RecordOp::Write,
            offset: 0,
            length: 4,
            data: Bytes::from_static(b"abcd"),
        }],
    };
    assert!(matches!(
        encode(&Frame::WriteSet(ws.clone())),
        Err(EncodeError::InvalidField {
            field: "write_set.records",
            ..
        })
    ));
    assert!(encode_write_set_vectored(&ws).is_err());
    let long = Frame::Error(ErrorFrame {
        epoch: 1,
        code: ErrorCode::Internal,
        reason: "x".repeat(MAX_REASON_LEN + 1),
    });
    assert!(encode(&long).is_err());
}
