//! The replication frame decoder: one-shot `decode` and the streaming
//! `FrameDecoder`, on raw bytes and on bytes whose length and CRCs were fixed up
//! (so the payload decoders of every frame type are reached). Whatever decodes must
//! re-encode to the same bytes (the encoding is canonical) and decode again to the
//! same frame; a write-set's vectored encoding must equal its plain one; a Packed
//! frame's inner frame, packed again (raw and zstd), must decode to itself.
#![no_main]

use bytes::Bytes;
use ferry_fuzz::fix_frame_crcs;
use ferry_proto::wire::{self, Frame, FrameDecoder, HEADER_LEN, MAX_PAYLOAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    if mode & 1 == 1 {
        fix_frame_crcs(&mut buf);
    }
    if mode & 2 == 0 {
        if let Ok(frame) = wire::decode(Bytes::from(buf.clone())) {
            round_trip(&frame, &buf);
        }
    } else {
        stream(&buf, mode >> 2);
    }
});

/// Feeds `buf` to a streaming decoder in chunks of `1 + chunk` bytes (0: all at
/// once); every frame it yields must round-trip, and each must equal what one-shot
/// `decode` makes of the same bytes.
fn stream(buf: &[u8], chunk: u8) {
    let mut d = FrameDecoder::new(MAX_PAYLOAD_LEN);
    let step = if chunk == 0 {
        buf.len().max(1)
    } else {
        usize::from(chunk)
    };
    let mut consumed = 0usize;
    for piece in buf.chunks(step) {
        d.feed(piece);
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let bytes = wire::encode(&frame).expect("decoded frame re-encodes");
                    let at = consumed..consumed + bytes.len();
                    assert_eq!(&buf[at], &bytes[..], "streamed frame is not canonical");
                    consumed += bytes.len();
                    round_trip(&frame, &bytes);
                }
                Ok(None) => break,
                Err(_) => {
                    assert!(
                        d.next_frame().is_err(),
                        "decoder not poisoned after an error"
                    );
                    return;
                }
            }
        }
    }
    assert!(d.buffered_len() <= buf.len() - consumed);
}

fn round_trip(frame: &Frame, bytes: &[u8]) {
    let again = wire::encode(frame).expect("decoded frame re-encodes");
    assert_eq!(&again[..], bytes, "encode(decode(x)) != x");
    let back = wire::decode(again.freeze()).expect("re-encoded frame decodes");
    assert_eq!(&back, frame, "decode(encode(f)) != f");
    let header = wire::decode_header(bytes, MAX_PAYLOAD_LEN).expect("header decodes");
    assert_eq!(header.frame_type, frame.frame_type());
    assert_eq!(header.epoch, frame.epoch());
    assert_eq!(header.payload_len, bytes.len() - HEADER_LEN);
    if header.version == 4 {
        assert!(
            matches!(frame, Frame::Ack(_) | Frame::HelloAck(_)),
            "only an Ack or a HelloAck carries a V4 tail"
        );
    }
    if let Frame::Ack(a) = frame {
        assert!(
            a.applied_seq <= a.received_durable_seq && a.received_durable_seq <= a.received_seq
        );
    }
    if let Frame::Packed(p) = frame {
        assert_eq!(header.version, 3, "a Packed frame is a V3 frame");
        assert!(p.raw_len() <= MAX_PAYLOAD_LEN);
        for level in [None, Some(1)] {
            let again = ferry_proto::packed::Packed::pack(p.inner().clone(), level)
                .expect("a decoded inner frame packs again");
            let bytes = wire::encode(&Frame::Packed(again)).expect("repacked frame encodes");
            match wire::decode(bytes.freeze()).expect("repacked frame decodes") {
                Frame::Packed(q) => assert_eq!(q.inner(), p.inner(), "repacking changed the data"),
                other => panic!("repacked frame decoded as {:?}", other.frame_type()),
            }
        }
    }
    if let Frame::WriteSet(ws) = frame {
        let parts = wire::encode_write_set_vectored(ws).expect("vectored encode");
        let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(
            joined, bytes,
            "vectored and plain write-set encodings differ"
        );
        assert_eq!(ws.encoded_len(), bytes.len());
    }
}
