//! Golden bytes: the handshake and ack encodings are frozen for protocol V1.
//! If one of these tests fails, the wire format changed: bump the protocol
//! version (wire::ProtocolVersion) instead of editing the expected bytes.

use bytes::Bytes;
use ferry_transport::wire::{
    decode, encode, Ack, Frame, Handover, HandoverAck, Hello, Role, VolumeGeometry,
    MAX_SUPPORTED_VERSION,
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
    assert_eq!(MAX_SUPPORTED_VERSION.as_u16(), 1, "golden bytes are for V1");
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
