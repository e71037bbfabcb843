//! Golden bytes: the handshake and ack encodings are frozen for protocol V1, the
//! V2 tails (`golden_v2_tails`) for V2, and the received-ack tails
//! (`golden_v4_received_acks`) for V4. If one of these tests fails, the wire format
//! changed: bump the protocol version (wire::ProtocolVersion) instead of editing the
//! expected bytes.

use bytes::Bytes;
use ferry_proto::wire::{
    decode, encode, frame_version, Ack, DigestRequest, Frame, Handover, HandoverAck, Heartbeat,
    Hello, HelloAck, ProtocolVersion, ResyncBegin, ResyncData, ResyncEnd, ResyncExtent, Role,
    SyncLoss, VolumeGeometry,
};

fn golden_hello() -> Hello {
    Hello {
        epoch: 7,
        min_version: 1,
        max_version: 1,
        cluster_id: core::array::from_fn(|i| i as u8),
        node_id: core::array::from_fn(|i| 0xa0 + i as u8),
        node_name: "sb1".into(),
        role: Role::Standby,
        volumes: vec![VolumeGeometry {
            id: 1,
            name: "db".into(),
            size_bytes: 1 << 20,
            block_size: 4096,
        }],
        resume_position: 42,
    }
}

#[rustfmt::skip]
const HELLO_BYTES: [u8; 32 + 70] = [
    // --- frame header ---
    b'F', b'R', b'Y', b'1',                         // magic
    0x01, 0x00,                                     // version 1
    0x01, 0x00,                                     // type 1 = Hello
    0x00, 0x00,                                     // flags
    0x00, 0x00,                                     // reserved
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
    0x46, 0x00, 0x00, 0x00,                         // payload_len 70
    0xc2, 0x5a, 0x73, 0x93,                         // payload CRC32C
    0x21, 0xf2, 0xa9, 0x7d,                         // header CRC32C (bytes 0..28)
    // --- Hello payload ---
    0x01, 0x00,                                     // min_version 1
    0x01, 0x00,                                     // max_version 1
    0x02,                                           // role 2 = Standby
    0x03,                                           // node_name_len 3
    0x01, 0x00,                                     // volume_count 1
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // cluster_id
    0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, // node_id
    0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
    0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // resume_position 42
    b's', b'b', b'1',                               // node_name
    // volume 0
    0x01, 0x00, 0x00, 0x00,                         // id 1
    0x00, 0x10, 0x00, 0x00,                         // block_size 4096
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // size_bytes 1 MiB
    0x02,                                           // name_len 2
    b'd', b'b',                                     // name
];

#[rustfmt::skip]
const ACK_BYTES: [u8; 32 + 16] = [
    b'F', b'R', b'Y', b'1',                         // magic
    0x01, 0x00,                                     // version 1
    0x04, 0x00,                                     // type 4 = Ack
    0x00, 0x00, 0x00, 0x00,                         // flags, reserved
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
    0x10, 0x00, 0x00, 0x00,                         // payload_len 16
    0xc0, 0x6b, 0x98, 0x78,                         // payload CRC32C
    0x8f, 0xea, 0xc1, 0x5a,                         // header CRC32C
    0x22, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // received_durable_seq 0x1122
    0x00, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // applied_seq 0x1100
];

#[test]
fn crc32c_is_castagnoli() {
    // Known answer from RFC 3720 / iSCSI: pins the checksum algorithm itself.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn golden_hello_bytes() {
    // A V2 build still sends its Hello as a V1 frame: a V1 peer must read it to
    // negotiate at all.
    assert_eq!(
        frame_version(&Frame::Hello(golden_hello())),
        ProtocolVersion::V1
    );
    let encoded = encode(&Frame::Hello(golden_hello())).expect("encode");
    assert_eq!(&encoded[..], &HELLO_BYTES[..]);
    let decoded = decode(Bytes::from_static(&HELLO_BYTES)).expect("decode");
    assert_eq!(decoded, Frame::Hello(golden_hello()));
}

#[test]
fn golden_ack_bytes() {
    let ack = Ack {
        epoch: 7,
        received_durable_seq: 0x1122,
        applied_seq: 0x1100,
        received_seq: 0x1122,
    };
    let encoded = encode(&Frame::Ack(ack)).expect("encode");
    assert_eq!(&encoded[..], &ACK_BYTES[..]);
    assert_eq!(
        decode(Bytes::from_static(&ACK_BYTES)).expect("decode"),
        Frame::Ack(ack)
    );
}

#[test]
fn golden_handover_ack_bytes() {
    let a = HandoverAck {
        epoch: 7,
        seq: 0x1122,
        new_epoch: 8,
    };
    let encoded = encode(&Frame::HandoverAck(a)).expect("encode");
    #[rustfmt::skip]
    let expected: [u8; 32 + 16] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x01, 0x00,                                     // version 1
        0x11, 0x00,                                     // type 17 = HandoverAck
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x10, 0x00, 0x00, 0x00,                         // payload_len 16
        0x74, 0xb9, 0xfb, 0xce,                         // payload CRC32C
        0xb6, 0x13, 0xef, 0xe4,                         // header CRC32C
        0x22, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 0x1122
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // new_epoch 8
    ];
    assert_eq!(&encoded[..], &expected[..]);
    assert_eq!(
        decode(Bytes::copy_from_slice(&expected)).expect("decode"),
        Frame::HandoverAck(a)
    );
    // A handover that does not raise the epoch is refused both ways.
    let bad = HandoverAck { new_epoch: 7, ..a };
    assert!(encode(&Frame::HandoverAck(bad)).is_err());
    let h = encode(&Frame::Handover(Handover { epoch: 3, seq: 9 })).expect("encode");
    assert_eq!(
        (&h[6..8], &h[32..]),
        (&[16u8, 0][..], &9u64.to_le_bytes()[..])
    );
}

/// The bitmap resync frames (types 7, 8, 9): fixed layouts, one data extent and one
/// zero extent (no bytes follow it).
#[test]
fn golden_resync_frames() {
    let b = ResyncBegin {
        epoch: 7,
        from_seq: 0x10,
        snapshot_seq: 0x20,
        total_bytes: 0x30000,
        region_size: 65536,
        primary_time_ns: None,
    };
    #[rustfmt::skip]
    let begin: [u8; 32 + 32] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x01, 0x00,                                     // version 1
        0x07, 0x00,                                     // type 7 = ResyncBegin
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x20, 0x00, 0x00, 0x00,                         // payload_len 32
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // from_seq 0x10
        0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // snapshot_seq 0x20
        0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, // total_bytes 0x30000
        0x00, 0x00, 0x01, 0x00,                         // region_size 65536
        0x00, 0x00, 0x00, 0x00,                         // reserved
    ];
    check_golden(&Frame::ResyncBegin(b), &begin, GOLDEN_CRCS[0]);

    let d = ResyncData {
        epoch: 7,
        extents: vec![
            ResyncExtent {
                volume: 1,
                offset: 0x1000,
                length: 4,
                data: Some(Bytes::from_static(b"abcd")),
            },
            ResyncExtent {
                volume: 1,
                offset: 0x10000,
                length: 0x10000,
                data: None,
            },
        ],
    };
    #[rustfmt::skip]
    let data: [u8; 32 + 8 + 24 + 4 + 24] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x01, 0x00,                                     // version 1
        0x08, 0x00,                                     // type 8 = ResyncData
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x3c, 0x00, 0x00, 0x00,                         // payload_len 60
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x02, 0x00, 0x00, 0x00,                         // extent_count 2
        0x00, 0x00, 0x00, 0x00,                         // reserved
        // extent 0: data
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset 0x1000
        0x01, 0x00, 0x00, 0x00,                         // volume 1
        0x04, 0x00, 0x00, 0x00,                         // length 4
        0x01, 0x00, 0x00, 0x00,                         // kind 1 = data, reserved
        0x04, 0x00, 0x00, 0x00,                         // data_len 4
        b'a', b'b', b'c', b'd',                         // data
        // extent 1: zeros
        0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, // offset 0x10000
        0x01, 0x00, 0x00, 0x00,                         // volume 1
        0x00, 0x00, 0x01, 0x00,                         // length 0x10000
        0x02, 0x00, 0x00, 0x00,                         // kind 2 = zeros, reserved
        0x00, 0x00, 0x00, 0x00,                         // data_len 0
    ];
    check_golden(&Frame::ResyncData(d.clone()), &data, GOLDEN_CRCS[1]);

    let e = ResyncEnd {
        epoch: 7,
        through_seq: 0x25,
        bytes: 0x20000,
        data_bytes: 0x1000,
        primary_time_ns: None,
    };
    #[rustfmt::skip]
    let end: [u8; 32 + 24] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x01, 0x00,                                     // version 1
        0x09, 0x00,                                     // type 9 = ResyncEnd
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x18, 0x00, 0x00, 0x00,                         // payload_len 24
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x25, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // through_seq 0x25
        0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // bytes 0x20000
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // data_bytes 0x1000
    ];
    check_golden(&Frame::ResyncEnd(e), &end, GOLDEN_CRCS[2]);

    // Invariants are checked both ways: a snapshot before the start point, an
    // empty batch, a zero extent that carries bytes, data of the wrong length.
    let bad_begin = ResyncBegin {
        snapshot_seq: 0x0f,
        ..b
    };
    assert!(encode(&Frame::ResyncBegin(bad_begin)).is_err());
    assert!(encode(&Frame::ResyncData(ResyncData {
        epoch: 7,
        extents: vec![]
    }))
    .is_err());
    let mut short = d.clone();
    short.extents[0].length = 5;
    assert!(encode(&Frame::ResyncData(short)).is_err());
    let mut zero_with_bytes = data.to_vec();
    zero_with_bytes[32 + 8 + 24 + 4 + 20] = 1; // data_len 1 on the zero extent
    let crc = crc32c::crc32c(&zero_with_bytes[32..]);
    zero_with_bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&zero_with_bytes[..28]);
    zero_with_bytes[28..32].copy_from_slice(&hcrc.to_le_bytes());
    assert!(decode(Bytes::from(zero_with_bytes)).is_err());
}

/// The V2 tails (header version 2): a primary's heartbeat with the target's sync
/// loss, and the primary's clock after ResyncBegin and ResyncEnd. The same frames
/// without a tail are V1 frames (the V1 goldens above and below).
#[test]
fn golden_v2_tails() {
    let hb = Heartbeat {
        epoch: 7,
        sent_at_ns: 0x0a,
        echo_ns: 0,
        last_seq: 0x30,
        sync_loss: Some(SyncLoss::DegradedAt(0x2a)),
    };
    #[rustfmt::skip]
    let heartbeat: [u8; 32 + 40] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x02, 0x00,                                     // version 2
        0x05, 0x00,                                     // type 5 = Heartbeat
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x28, 0x00, 0x00, 0x00,                         // payload_len 40
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // sent_at_ns 10
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // echo_ns 0
        0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // last_seq 0x30
        // --- V2 tail ---
        0x01, 0x00, 0x00, 0x00,                         // sync_loss flags: 1 = degraded
        0x00, 0x00, 0x00, 0x00,                         // reserved
        0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // degraded_at 0x2a
    ];
    check_golden(&Frame::Heartbeat(hb), &heartbeat, V2_CRCS[0]);

    let b = ResyncBegin {
        epoch: 7,
        from_seq: 0x10,
        snapshot_seq: 0x20,
        total_bytes: 0x30000,
        region_size: 65536,
        primary_time_ns: Some(0x1122_3344_5566_7788),
    };
    #[rustfmt::skip]
    let begin: [u8; 32 + 40] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x02, 0x00,                                     // version 2
        0x07, 0x00,                                     // type 7 = ResyncBegin
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x28, 0x00, 0x00, 0x00,                         // payload_len 40
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // from_seq 0x10
        0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // snapshot_seq 0x20
        0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, // total_bytes 0x30000
        0x00, 0x00, 0x01, 0x00,                         // region_size 65536
        0x00, 0x00, 0x00, 0x00,                         // reserved
        // --- V2 tail ---
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // primary_time_ns
    ];
    check_golden(&Frame::ResyncBegin(b), &begin, V2_CRCS[1]);

    let e = ResyncEnd {
        epoch: 7,
        through_seq: 0x25,
        bytes: 0x20000,
        data_bytes: 0x1000,
        primary_time_ns: Some(0x1122_3344_5566_7799),
    };
    #[rustfmt::skip]
    let end: [u8; 32 + 32] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x02, 0x00,                                     // version 2
        0x09, 0x00,                                     // type 9 = ResyncEnd
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x20, 0x00, 0x00, 0x00,                         // payload_len 32
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x25, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // through_seq 0x25
        0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // bytes 0x20000
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // data_bytes 0x1000
        // --- V2 tail ---
        0x99, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // primary_time_ns
    ];
    check_golden(&Frame::ResyncEnd(e), &end, V2_CRCS[2]);

    // A V1 header with the tail's bytes is refused (trailing bytes), and a V2 header
    // without them is truncated: the version says which layout, never the length.
    let mut v1_with_tail = end.to_vec();
    v1_with_tail[4] = 1;
    refill_crcs(&mut v1_with_tail);
    assert!(decode(Bytes::from(v1_with_tail)).is_err());
    let mut v2_without_tail = end[..32 + 24].to_vec();
    v2_without_tail[20] = 24;
    refill_crcs(&mut v2_without_tail);
    assert!(decode(Bytes::from(v2_without_tail)).is_err());
}

/// V4: a HelloAck asking for received acks, and an Ack whose received position is past
/// its durable one. Without the tail each is the V1 frame (a V4 build talks to a V1
/// standby in V1 frames only).
#[test]
fn golden_v4_received_acks() {
    let hello_ack = HelloAck {
        epoch: 7,
        version: 4,
        resume_seq: 0x2a,
        received_acks: true,
    };
    #[rustfmt::skip]
    let hello_ack_bytes: [u8; 32 + 24] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x04, 0x00,                                     // version 4
        0x02, 0x00,                                     // type 2 = HelloAck
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x18, 0x00, 0x00, 0x00,                         // payload_len 24
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x04, 0x00,                                     // version 4
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,             // reserved
        0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // resume_seq 0x2a
        // --- V4 tail ---
        0x01, 0x00, 0x00, 0x00,                         // flags: 1 = send received acks
        0x00, 0x00, 0x00, 0x00,                         // reserved
    ];
    check_golden(
        &Frame::HelloAck(hello_ack.clone()),
        &hello_ack_bytes,
        V4_CRCS[0],
    );

    let ack = Ack {
        epoch: 7,
        received_durable_seq: 0x1122,
        applied_seq: 0x1100,
        received_seq: 0x1130,
    };
    #[rustfmt::skip]
    let ack_bytes: [u8; 32 + 24] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x04, 0x00,                                     // version 4
        0x04, 0x00,                                     // type 4 = Ack
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x18, 0x00, 0x00, 0x00,                         // payload_len 24
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        0x22, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // received_durable_seq 0x1122
        0x00, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // applied_seq 0x1100
        // --- V4 tail ---
        0x30, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // received_seq 0x1130
    ];
    check_golden(&Frame::Ack(ack), &ack_bytes, V4_CRCS[1]);

    // Without the tail they are the V1 frames.
    let v1 = HelloAck {
        received_acks: false,
        ..hello_ack
    };
    assert_eq!(frame_version(&Frame::HelloAck(v1)), ProtocolVersion::V1);
    let durable_only = Ack::durable(7, 0x1122, 0x1100);
    assert_eq!(
        frame_version(&Frame::Ack(durable_only)),
        ProtocolVersion::V1
    );
    assert_eq!(
        &encode(&Frame::Ack(durable_only)).unwrap()[..],
        &ACK_BYTES[..]
    );

    // One layout per version: a V4 ack whose received position is not past its
    // durable one, a V4 HelloAck with no flag or an unknown one, a tail under an older
    // header, a V4 header without the tail.
    let with = |bytes: &[u8], at: usize, v: &[u8]| {
        let mut b = bytes.to_vec();
        b[at..at + v.len()].copy_from_slice(v);
        refill_crcs(&mut b);
        decode(Bytes::from(b))
    };
    assert!(with(&ack_bytes, 48, &0x1122u64.to_le_bytes()).is_err());
    assert!(with(&ack_bytes, 48, &0x1121u64.to_le_bytes()).is_err());
    assert!(with(&hello_ack_bytes, 48, &[0]).is_err());
    assert!(with(&hello_ack_bytes, 48, &[3]).is_err());
    assert!(with(&hello_ack_bytes, 52, &[1]).is_err(), "reserved");
    for older in [1u8, 2, 3] {
        assert!(with(&ack_bytes, 4, &[older]).is_err());
        assert!(with(&hello_ack_bytes, 4, &[older]).is_err());
    }
    let mut no_tail = ack_bytes[..32 + 16].to_vec();
    no_tail[20] = 16;
    refill_crcs(&mut no_tail);
    assert!(decode(Bytes::from(no_tail)).is_err());
    // received below durable is not encodable.
    let bad = Ack {
        received_seq: 0x1121,
        ..ack
    };
    assert!(encode(&Frame::Ack(bad)).is_err());
}

/// (payload CRC, header CRC) of the two V4 golden frames.
const V4_CRCS: [([u8; 4], [u8; 4]); 2] = [
    ([0x47, 0x65, 0x7d, 0x6b], [0xa0, 0x71, 0xfb, 0x0a]),
    ([0x1f, 0x73, 0x7d, 0xb4], [0xc7, 0xbb, 0x3e, 0x5f]),
];

fn refill_crcs(frame: &mut [u8]) {
    let crc = crc32c::crc32c(&frame[32..]);
    frame[24..28].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&frame[..28]);
    frame[28..32].copy_from_slice(&hcrc.to_le_bytes());
}

/// (payload CRC, header CRC) of the three V2 golden frames.
const V2_CRCS: [([u8; 4], [u8; 4]); 3] = [
    ([0x8b, 0x98, 0x04, 0xb1], [0xf4, 0x0d, 0x48, 0xa2]),
    ([0x61, 0x23, 0x77, 0x86], [0x87, 0x4c, 0x4a, 0xda]),
    ([0xab, 0x50, 0x65, 0xde], [0xae, 0x92, 0x62, 0x71]),
];

/// (payload CRC, header CRC) of the three resync golden frames.
const GOLDEN_CRCS: [([u8; 4], [u8; 4]); 3] = [
    ([0xdd, 0x4b, 0x4b, 0x43], [0x95, 0x80, 0x16, 0xc9]),
    ([0x34, 0x9c, 0x77, 0x71], [0xfc, 0x44, 0x8e, 0x5b]),
    ([0x97, 0xe7, 0xbc, 0xe6], [0xe0, 0x2e, 0x98, 0xa3]),
];

/// Fills the CRCs into `bytes`, checks them against the pinned values and against
/// the encoder, and decodes back.
fn check_golden(frame: &Frame, bytes: &[u8], crcs: ([u8; 4], [u8; 4])) {
    let mut want = bytes.to_vec();
    let payload_crc = crc32c::crc32c(&want[32..]);
    want[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&want[..28]);
    want[28..32].copy_from_slice(&header_crc.to_le_bytes());
    let encoded = encode(frame).expect("encode");
    assert_eq!(&encoded[..], &want[..]);
    assert_eq!(
        (payload_crc.to_le_bytes(), header_crc.to_le_bytes()),
        crcs,
        "pinned CRCs of {:?}",
        frame.frame_type()
    );
    assert_eq!(
        &decode(Bytes::copy_from_slice(&want)).expect("decode"),
        frame
    );
}

#[test]
fn golden_digest_request_payload() {
    // algo 1 = xxh3-128, 2 = SM3 (`[verify] digest`, issue 19).
    for algo in [1u8, 2] {
        let d = DigestRequest {
            epoch: 2,
            id: 0x0102,
            chunk_size: 65536,
            seed: 9,
            algo: u32::from(algo),
        };
        let e = encode(&Frame::DigestRequest(d)).expect("encode");
        assert_eq!(&e[6..8], &[19u8, 0][..], "type 19");
        #[rustfmt::skip]
        let payload: [u8; 32] = [
            0x02, 0x01, 0, 0, 0, 0, 0, 0,   // id
            0, 0, 1, 0, 0, 0, 0, 0,         // chunk_size 65536
            9, 0, 0, 0, 0, 0, 0, 0,         // seed
            algo, 0, 0, 0,                  // algo
            0, 0, 0, 0,                     // reserved
        ];
        assert_eq!(&e[32..], &payload[..]);
        assert_eq!(
            decode(Bytes::copy_from_slice(&e)).expect("decode"),
            Frame::DigestRequest(d)
        );
    }
}

/// The Packed frame (type 10, V3) with codec 0: a write-set whose second record, a
/// 4 KiB write of zeros, travels as its length (form 1, no data).
#[test]
fn golden_packed_write_set_with_a_zero_record() {
    use ferry_proto::packed::{Codec, Packed};
    use ferry_proto::wire::{RecordOp, WireRecord, WriteSet};
    let ws = WriteSet {
        epoch: 7,
        first_seq: 0x10,
        last_seq: 0x11,
        timestamp_ns: 0x1122_3344_5566_7788,
        records: vec![
            WireRecord {
                seq: 0x10,
                volume: 1,
                op: RecordOp::Write,
                offset: 0x2000,
                length: 4,
                data: Bytes::from_static(b"abcd"),
            },
            WireRecord {
                seq: 0x11,
                volume: 1,
                op: RecordOp::Write,
                offset: 0x3000,
                length: 0x1000,
                data: Bytes::from(vec![0u8; 0x1000]),
            },
        ],
    };
    let p = Packed::pack(Frame::WriteSet(ws.clone()), None).expect("pack");
    assert_eq!(p.codec(), Codec::None);
    assert_eq!(
        frame_version(&Frame::Packed(p.clone())),
        ProtocolVersion::V3
    );
    #[rustfmt::skip]
    let bytes: [u8; 32 + 8 + 100] = [
        b'F', b'R', b'Y', b'1',                         // magic
        0x03, 0x00,                                     // version 3
        0x0a, 0x00,                                     // type 10 = Packed
        0x00, 0x00, 0x00, 0x00,                         // flags, reserved
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // epoch 7
        0x6c, 0x00, 0x00, 0x00,                         // payload_len 108
        0x00, 0x00, 0x00, 0x00,                         // payload CRC32C
        0x00, 0x00, 0x00, 0x00,                         // header CRC32C
        // --- Packed payload ---
        0x03, 0x00,                                     // inner_type 3 = WriteSet
        0x00,                                           // codec 0 = none
        0x00,                                           // reserved
        0x64, 0x00, 0x00, 0x00,                         // raw_len 100
        // --- raw body: the write-set payload ---
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // first_seq 0x10
        0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // last_seq 0x11
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // timestamp_ns
        0x02, 0x00, 0x00, 0x00,                         // record_count 2
        0x00, 0x00, 0x00, 0x00,                         // reserved
        // record 0x10: data
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq
        0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset 0x2000
        0x01, 0x00, 0x00, 0x00,                         // volume 1
        0x04, 0x00, 0x00, 0x00,                         // length 4
        0x01,                                           // op 1 = write
        0x00,                                           // form 0 = data follow
        0x00, 0x00,                                     // reserved
        0x04, 0x00, 0x00, 0x00,                         // data_len 4
        b'a', b'b', b'c', b'd',                         // data
        // record 0x11: zero-filled
        0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq
        0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset 0x3000
        0x01, 0x00, 0x00, 0x00,                         // volume 1
        0x00, 0x10, 0x00, 0x00,                         // length 4096
        0x01,                                           // op 1 = write
        0x01,                                           // form 1 = zero-filled
        0x00, 0x00,                                     // reserved
        0x00, 0x00, 0x00, 0x00,                         // data_len 0
    ];
    check_golden(&Frame::Packed(p.clone()), &bytes, PACKED_CRCS);
    // It decodes to exactly the write-set the primary journaled, zeros included.
    assert_eq!(p.into_inner(), Frame::WriteSet(ws));
}

/// (payload CRC, header CRC) of the packed golden frame.
const PACKED_CRCS: ([u8; 4], [u8; 4]) = ([0x8c, 0xb1, 0xb7, 0xa1], [0x73, 0x89, 0x88, 0xa3]);

/// A zstd-packed ResyncData, its body as a zstd 1.5 encoder wrote it: decoding is
/// pinned (an encoder may choose other bytes for the same data, so only the frame's
/// fixed part is compared on encode).
#[test]
fn golden_packed_zstd_resync_data_decodes() {
    use ferry_proto::packed::{Codec, Packed};
    let d = ResyncData {
        epoch: 7,
        extents: vec![ResyncExtent {
            volume: 1,
            offset: 0x1000,
            length: 64,
            data: Some(Bytes::from(b"ferry ".repeat(11)[..64].to_vec())),
        }],
    };
    let p = Packed::pack(Frame::ResyncData(d.clone()), Some(3)).expect("pack");
    assert_eq!(p.codec(), Codec::Zstd);
    let enc = encode(&Frame::Packed(p.clone())).expect("encode");
    assert_eq!(
        &enc[4..8],
        &[0x03, 0x00, 0x0a, 0x00][..],
        "version 3, type 10"
    );
    assert_eq!(
        &enc[32..40],
        &[0x08, 0x00, 0x01, 0x00, 96, 0, 0, 0][..],
        "ResyncData, zstd, raw_len 96"
    );
    assert_eq!(
        decode(Bytes::copy_from_slice(&enc)).expect("decode"),
        Frame::Packed(p)
    );
    let pinned: &[u8] = ZSTD_BODY;
    let mut frame = enc[..40].to_vec();
    frame.extend_from_slice(pinned);
    frame[20..24].copy_from_slice(&((8 + pinned.len()) as u32).to_le_bytes());
    refill_crcs(&mut frame);
    match decode(Bytes::from(frame)).expect("the pinned zstd body decodes") {
        Frame::Packed(q) => assert_eq!(q.into_inner(), Frame::ResyncData(d)),
        other => panic!("decoded {other:?}"),
    }
}

#[rustfmt::skip]
const ZSTD_BODY: &[u8] = &[
    0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x60, 0xdd, 0x00, 0x00, 0x78, 0x01, 0x00,
    0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x40, 0x66, 0x65, 0x72, 0x72, 0x79,
    0x20, 0x04, 0x00, 0x4f, 0x39, 0x65, 0x25, 0x6a, 0x20, 0x70, 0x06, 0xb0,
];
