//! The Packed frame (V3) and the WAN policy: round trips of compressed, raw-fallback
//! and zero-filled frames (proptest), precise errors on malformed and truncated
//! input, bounded memory (a declared size past the limit is refused before anything
//! is decompressed; a zstd bomb fails), the packer's skip and level rules, and the
//! token bucket's cap.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::packed::{Codec, Packed};
use ferry_proto::wan::{Class, Packer, TokenBucket, LEVEL_WINDOW, MAX_LEVEL, MAX_SKIP, MIN_LEVEL};
use ferry_proto::wire::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Frames

/// Data of one kind: text-like, random, or zeros.
fn data(kind: u8, len: usize, seed: u64) -> Bytes {
    match kind % 3 {
        0 => Bytes::from(
            format!("ferry log line {seed}: block written ok\n")
                .repeat(len / 20 + 1)
                .into_bytes()[..len]
                .to_vec(),
        ),
        1 => {
            let mut x = seed | 1;
            Bytes::from(
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect::<Vec<u8>>(),
            )
        }
        _ => Bytes::from(vec![0u8; len]),
    }
}

fn write_set(first: u64, recs: &[(u8, RecordOp, u32)]) -> WriteSet {
    let records = recs
        .iter()
        .enumerate()
        .map(|(i, &(kind, op, len))| {
            let seq = first + i as u64;
            let body = match op {
                RecordOp::Write => data(kind, len as usize, seq),
                RecordOp::Seal => Bytes::from_static(b"label"),
                _ => Bytes::new(),
            };
            WireRecord {
                seq,
                volume: 1,
                op,
                offset: seq * 4096,
                length: if op == RecordOp::Seal {
                    body.len() as u32
                } else {
                    len
                },
                data: body,
            }
        })
        .collect::<Vec<_>>();
    WriteSet {
        epoch: 4,
        first_seq: first,
        last_seq: first + records.len() as u64 - 1,
        timestamp_ns: 99,
        records,
    }
}

fn arb_records() -> impl Strategy<Value = Vec<(u8, RecordOp, u32)>> {
    proptest::collection::vec(
        (
            any::<u8>(),
            prop_oneof![
                4 => Just(RecordOp::Write),
                1 => Just(RecordOp::Trim),
                1 => Just(RecordOp::WriteZeroes),
                1 => Just(RecordOp::Seal),
            ],
            1u32..20_000,
        ),
        1..12,
    )
}

fn roundtrip(f: &Frame) -> Frame {
    let bytes = encode(f).expect("encode").freeze();
    let back = decode(bytes.clone()).expect("decode");
    // Canonical: what decodes re-encodes to the same bytes.
    assert_eq!(&encode(&back).expect("re-encode")[..], &bytes[..]);
    back
}

proptest! {
    /// Compressed, raw and zero-filled write-sets decode to exactly the write-set
    /// that was packed (zeros included), whatever the mix of records.
    #[test]
    fn packed_write_sets_round_trip(recs in arb_records(), first in 1u64..1 << 40, level in proptest::option::of(1i32..6)) {
        let ws = write_set(first, &recs);
        let p = Packed::pack(Frame::WriteSet(ws.clone()), level).unwrap();
        prop_assert_eq!(p.codec(), if level.is_some() { Codec::Zstd } else { Codec::None });
        let back = roundtrip(&Frame::Packed(p.clone()));
        prop_assert_eq!(&back, &Frame::Packed(p));
        let Frame::Packed(q) = back else { unreachable!() };
        prop_assert_eq!(q.into_inner(), Frame::WriteSet(ws));
    }

    /// The packer's choice, whatever it is, carries the same write-set; a frame it
    /// leaves plain is the plain frame; a packed one is never larger than the plain
    /// one by more than the Packed header (8 bytes).
    #[test]
    fn the_packer_never_changes_the_data(recs in arb_records(), compress: bool) {
        let ws = write_set(7, &recs);
        let mut packer = Packer::new(compress);
        let out = packer.pack(Frame::WriteSet(ws.clone())).unwrap();
        prop_assert_eq!(out.plain_len, ws.encoded_len());
        prop_assert!(out.wire_len <= out.plain_len + 8, "{} > {}", out.wire_len, out.plain_len);
        let sent = roundtrip(&out.frame);
        prop_assert_eq!(encode(&sent).unwrap().len(), out.wire_len);
        let got = match sent {
            Frame::Packed(p) => p.into_inner(),
            plain => plain,
        };
        prop_assert_eq!(got, Frame::WriteSet(ws));
    }

    /// Resync batches pack too (their zero extents already cost nothing).
    #[test]
    fn packed_resync_data_round_trips(n in 1usize..6, kind: u8, level in proptest::option::of(1i32..4)) {
        let extents = (0..n).map(|i| ResyncExtent {
            volume: 1,
            offset: i as u64 * 65536,
            length: 4096,
            data: (i % 2 == 0).then(|| data(kind, 4096, i as u64)),
        }).collect();
        let d = ResyncData { epoch: 4, extents };
        let p = Packed::pack(Frame::ResyncData(d.clone()), level).unwrap();
        let Frame::Packed(q) = roundtrip(&Frame::Packed(p)) else { unreachable!() };
        prop_assert_eq!(q.into_inner(), Frame::ResyncData(d));
    }

    /// Random bytes after a valid Packed prefix, and every truncation of a valid
    /// frame, are refused with an error (never a panic).
    #[test]
    fn corrupt_packed_frames_are_refused(recs in arb_records(), cut in any::<prop::sample::Index>(), junk in proptest::collection::vec(any::<u8>(), 0..256)) {
        let ws = write_set(3, &recs);
        let p = Packed::pack(Frame::WriteSet(ws), Some(1)).unwrap();
        let bytes = encode(&Frame::Packed(p)).unwrap();
        let at = cut.index(bytes.len());
        let mut short = bytes[..at].to_vec();
        if short.len() >= HEADER_LEN {
            let n = (short.len() - HEADER_LEN) as u32;
            short[20..24].copy_from_slice(&n.to_le_bytes());
            refill_crcs(&mut short);
        }
        prop_assert!(decode(Bytes::from(short)).is_err());
        let mut body = bytes[..HEADER_LEN + 8].to_vec();
        body.extend_from_slice(&junk);
        let n = (body.len() - HEADER_LEN) as u32;
        body[20..24].copy_from_slice(&n.to_le_bytes());
        refill_crcs(&mut body);
        let _ = decode(Bytes::from(body));
    }
}

fn refill_crcs(frame: &mut [u8]) {
    let crc = crc32c::crc32c(&frame[HEADER_LEN..]);
    frame[24..28].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&frame[..28]);
    frame[28..32].copy_from_slice(&hcrc.to_le_bytes());
}

/// A Packed frame from its parts (header filled in, CRCs right).
fn packed_frame(inner_type: u16, codec: u8, raw_len: u32, body: &[u8]) -> Bytes {
    let mut payload = BytesMut::new();
    payload.put_u16_le(inner_type);
    payload.put_u8(codec);
    payload.put_u8(0);
    payload.put_u32_le(raw_len);
    payload.put_slice(body);
    let mut f = vec![0u8; HEADER_LEN];
    f[0..4].copy_from_slice(b"FRY1");
    f[4..6].copy_from_slice(&3u16.to_le_bytes());
    f[6..8].copy_from_slice(&10u16.to_le_bytes());
    f[12..20].copy_from_slice(&4u64.to_le_bytes());
    f[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&payload);
    refill_crcs(&mut f);
    Bytes::from(f)
}

fn field_of(e: DecodeError) -> String {
    match e {
        DecodeError::InvalidField { field, reason } => format!("{field}: {reason}"),
        other => format!("{other:?}"),
    }
}

/// The raw body of a one-record write-set, from the real encoder.
fn raw_write_set(op: RecordOp, len: u32, data: &[u8]) -> Vec<u8> {
    let ws = WriteSet {
        epoch: 4,
        first_seq: 1,
        last_seq: 1,
        timestamp_ns: 0,
        records: vec![WireRecord {
            seq: 1,
            volume: 1,
            op,
            offset: 0,
            length: len,
            data: Bytes::copy_from_slice(data),
        }],
    };
    encode(&Frame::WriteSet(ws)).unwrap()[HEADER_LEN..].to_vec()
}

#[test]
fn malformed_packed_frames_get_precise_errors() {
    let raw = raw_write_set(RecordOp::Write, 4, b"abcd");
    let len = raw.len() as u32;
    let e = |f: Bytes| field_of(decode(f).unwrap_err());
    assert!(e(packed_frame(4, 0, len, &raw)).starts_with("packed.inner_type: 4"));
    assert!(e(packed_frame(3, 2, len, &raw)).starts_with("packed.codec: unknown codec 2"));
    assert!(e(packed_frame(3, 0, len + 1, &raw))
        .contains("packed.raw_len: 69, but the uncompressed body is 68"));
    // zstd: the body must decompress to exactly raw_len bytes.
    let z = zstd::bulk::compress(&raw, 1).unwrap();
    assert!(e(packed_frame(3, 1, len + 5, &z))
        .contains("packed.raw_len: 73, but the zstd body decompresses to 68"));
    assert!(e(packed_frame(3, 1, len - 1, &z))
        .starts_with("packed.body: zstd body does not decompress to at most 67 bytes"));
    assert!(e(packed_frame(3, 1, len, &z[..z.len() - 3])).starts_with("packed.body"));
    assert!(decode(packed_frame(3, 1, len, &z)).is_ok());
    // Form 1 only on a write, without data; unknown forms refused.
    let mut trim = raw_write_set(RecordOp::Trim, 4096, b"");
    trim[32 + 25] = 1;
    assert!(e(packed_frame(3, 0, trim.len() as u32, &trim))
        .contains("record.form: seq 1: a Trim cannot be zero-filled"));
    let mut form = raw.clone();
    form[32 + 25] = 7;
    assert!(e(packed_frame(3, 0, len, &form)).contains("record.form: seq 1: unknown form 7"));
    let mut zero_with_data = raw.clone();
    zero_with_data[32 + 25] = 1;
    assert!(e(packed_frame(3, 0, len, &zero_with_data))
        .contains("record.data_len: seq 1: a zero-filled write carries 4 bytes"));
    // The same form byte in a plain (V1) write-set is a reserved byte.
    let mut plain = encode(&decode(packed_frame(3, 0, len, &raw)).unwrap())
        .unwrap()
        .to_vec();
    assert_eq!(&plain[4..8], &[3, 0, 10, 0]);
    plain = {
        let mut f = plain[..HEADER_LEN].to_vec();
        f[4] = 1;
        f[6] = 3;
        f.extend_from_slice(&zero_with_data);
        f[20..24].copy_from_slice(&(zero_with_data.len() as u32).to_le_bytes());
        refill_crcs(&mut f);
        f
    };
    assert!(e(Bytes::from(plain)).starts_with("record.reserved"));
    // A Packed frame under an older header version, and a plain frame under V3.
    let mut v2 = packed_frame(3, 0, len, &raw).to_vec();
    v2[4] = 2;
    refill_crcs(&mut v2);
    assert!(e(Bytes::from(v2)).starts_with("header.version"));
    let ack = encode(&Frame::Ack(Ack {
        epoch: 4,
        received_durable_seq: 2,
        applied_seq: 1,
        received_seq: 2,
    }))
    .unwrap();
    let mut ack3 = ack.to_vec();
    ack3[4] = 3;
    refill_crcs(&mut ack3);
    assert!(e(Bytes::from(ack3)).starts_with("header.version"));
}

/// Memory stays bounded by the payload limit whatever a frame declares: a raw length
/// past it is refused before decompression, a zstd bomb (a tiny body that expands
/// to 256 MiB) fails at the buffer's end, and zero-filled records may not expand a
/// write-set past the limit either.
#[test]
fn declared_sizes_are_bounded_before_anything_is_made() {
    // raw_len above the decoder's limit: TooLarge, nothing decompressed.
    let err = decode_with_limit(
        packed_frame(3, 1, 1 << 20, &[0x28, 0xb5, 0x2f, 0xfd]),
        1 << 16,
    )
    .unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            len: 1 << 20,
            max: 1 << 16
        }
    );

    // A zstd bomb: 256 MiB of zeros compresses to a few KiB; it claims 1 KiB.
    let bomb = {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..256 {
            std::io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        enc.finish().unwrap()
    };
    assert!(bomb.len() < 64 << 10, "bomb is {} bytes", bomb.len());
    let t0 = std::time::Instant::now();
    let msg = field_of(decode(packed_frame(3, 1, 1024, &bomb)).unwrap_err());
    assert!(
        msg.starts_with("packed.body: zstd body does not decompress to at most 1024 bytes"),
        "{msg}"
    );
    // The same bomb claiming the whole 64 MiB limit decodes at most 64 MiB, then fails.
    let msg = field_of(decode(packed_frame(3, 1, MAX_PAYLOAD_LEN as u32, &bomb)).unwrap_err());
    assert!(msg.starts_with("packed.body"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(20));

    // Zero-filled records: 3 × 4 GiB − 1 of zeros declared in a 100-byte body.
    let mut body = BytesMut::new();
    body.put_u64_le(1);
    body.put_u64_le(3);
    body.put_u64_le(0);
    body.put_u32_le(3);
    body.put_u32_le(0);
    for seq in 1..=3u64 {
        body.put_u64_le(seq);
        body.put_u64_le(0);
        body.put_u32_le(1);
        body.put_u32_le(u32::MAX);
        body.put_u8(1); // write
        body.put_u8(1); // zero-filled
        body.put_u16_le(0);
        body.put_u32_le(0);
    }
    let err = decode(packed_frame(3, 0, body.len() as u32, &body)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            len: 32 + 32 + u32::MAX as usize,
            max: MAX_PAYLOAD_LEN
        }
    );
}

// ---------------------------------------------------------------------------
// Packer

fn ws_of(kind: u8, first: u64) -> Frame {
    Frame::WriteSet(write_set(
        first,
        &[
            (kind, RecordOp::Write, 64 << 10),
            (kind, RecordOp::Write, 64 << 10),
        ],
    ))
}

#[test]
fn text_is_compressed_random_goes_raw_and_zeros_travel_as_lengths() {
    let mut p = Packer::new(true);
    let text = p.pack(ws_of(0, 1)).unwrap();
    assert!(text.compressed && text.zstd_tried);
    assert!(
        text.wire_len * 10 < text.plain_len,
        "text {} of {}",
        text.wire_len,
        text.plain_len
    );
    let random = p.pack(ws_of(1, 3)).unwrap();
    assert!(random.zstd_tried && !random.compressed);
    assert!(
        matches!(random.frame, Frame::WriteSet(_)),
        "random data go as the plain frame"
    );
    assert_eq!(random.wire_len, random.plain_len);
    let zeros = Packer::new(false).pack(ws_of(2, 5)).unwrap();
    assert_eq!(zeros.zero_records, 2);
    assert!(!zeros.compressed);
    assert!(
        zeros.wire_len < 200,
        "{} bytes for 128 KiB of zeros",
        zeros.wire_len
    );
    // Without compression and without zeros: the plain frame.
    let plain = Packer::new(false).pack(ws_of(0, 7)).unwrap();
    assert!(matches!(plain.frame, Frame::WriteSet(_)) && !plain.zstd_tried);
}

/// After k incompressible frames in a row the next min(2^k, 64) are not tried; a
/// compressible frame resets the count.
#[test]
fn incompressible_data_back_off_exponentially() {
    let mut p = Packer::new(true);
    let mut tried = Vec::new();
    for i in 0..200u64 {
        tried.push(p.pack(ws_of(1, 1 + 2 * i)).unwrap().zstd_tried);
    }
    let at: Vec<usize> = tried
        .iter()
        .enumerate()
        .filter(|(_, t)| **t)
        .map(|(i, _)| i)
        .collect();
    // Tried at 0, then after skipping 2, 4, 8, 16, 32, 64, 64 frames.
    assert_eq!(at, vec![0, 3, 8, 17, 34, 67, 132, 197]);
    assert_eq!(MAX_SKIP, 64);
    // Text after it: tried once the skip runs out, compressed, and tried every frame again.
    let mut n = 0;
    while !p.pack(ws_of(0, 1000 + n)).unwrap().compressed {
        n += 2;
        assert!(n < 200);
    }
    assert!(p.pack(ws_of(0, 2000)).unwrap().compressed);
}

#[test]
fn the_level_rises_while_the_link_is_the_bottleneck_and_falls_when_the_cpu_is() {
    let mut p = Packer::new(true);
    assert_eq!(p.level(), MIN_LEVEL);
    let window = |p: &mut Packer, pack_ns, wait_ns| {
        for _ in 0..LEVEL_WINDOW {
            p.observe(true, pack_ns, wait_ns);
        }
    };
    window(&mut p, 1_000, 10_000);
    assert_eq!(p.level(), MIN_LEVEL + 1);
    for _ in 0..20 {
        window(&mut p, 1_000, 10_000);
    }
    assert_eq!(p.level(), MAX_LEVEL, "capped");
    // Balanced: it stays.
    window(&mut p, 1_000, 1_500);
    assert_eq!(p.level(), MAX_LEVEL);
    window(&mut p, 10_000, 1_000);
    assert_eq!(p.level(), MAX_LEVEL - 1);
    // Frames zstd did not run on do not count.
    for _ in 0..100 {
        p.observe(false, 0, 1_000_000);
    }
    assert_eq!(p.level(), MAX_LEVEL - 1);
    for _ in 0..20 {
        window(&mut p, 10_000, 0);
    }
    assert_eq!(p.level(), MIN_LEVEL, "floored");
}

// ---------------------------------------------------------------------------
// Token bucket

const MS: u64 = 1_000_000;

/// Frames released by a simulated sender over `secs` seconds: each waits what the
/// bucket says. Returns (release time, bytes) per frame.
fn simulate(b: &mut TokenBucket, frame: usize, class: Class, secs: u64) -> Vec<(u64, usize)> {
    let mut now = 0u64;
    let mut out = Vec::new();
    while now < secs * 1000 * MS {
        let wait = b.take(now, frame, class);
        now += wait.as_nanos() as u64;
        out.push((now, frame));
    }
    out
}

#[test]
fn the_bucket_holds_the_rate_plus_the_burst_over_any_window() {
    for class in [Class::Live, Class::Bulk] {
        let rate = 25_000_000u64; // 200 Mbit/s
        let burst = TokenBucket::default_burst(rate);
        let mut b = TokenBucket::new(rate, burst, 0);
        let sent = simulate(&mut b, 1 << 20, class, 10);
        // From the start: bytes released by t ≤ rate·t + burst, for every t.
        let mut total = 0u64;
        for &(t, n) in &sent {
            total += n as u64;
            let cap = rate as f64 * t as f64 / 1e9 + burst as f64;
            assert!(
                total as f64 <= cap + 1.0,
                "{class:?}: {total} bytes by {t} ns > {cap}"
            );
        }
        // And the long-run rate is the cap (within 1 %).
        let (t_end, _) = *sent.last().unwrap();
        let achieved = total as f64 / (t_end as f64 / 1e9);
        assert!(
            (achieved / rate as f64 - 1.0).abs() < 0.01,
            "{class:?}: {achieved} B/s"
        );
    }
}

#[test]
fn bulk_leaves_a_reserve_that_live_frames_take_at_once() {
    let rate = 10_000_000u64;
    let mut b = TokenBucket::new(rate, 1 << 20, 0);
    // Bulk drains the bucket down to a quarter of the burst, then waits.
    assert_eq!(b.take(0, 512 << 10, Class::Bulk), Duration::ZERO);
    assert_eq!(b.take(0, 256 << 10, Class::Bulk), Duration::ZERO);
    let w = b.take(0, 1, Class::Bulk);
    assert!(w > Duration::ZERO, "bulk must not dip into the reserve");
    // A fresh bucket in the same state: a live frame takes the reserve without waiting.
    let mut b = TokenBucket::new(rate, 1 << 20, 0);
    b.take(0, 768 << 10, Class::Bulk);
    assert_eq!(b.take(0, 200 << 10, Class::Live), Duration::ZERO);
    // A frame larger than the burst goes into debt and waits for it: 4 MiB at 10 MB/s.
    let mut b = TokenBucket::new(rate, 1 << 20, 0);
    let w = b.take(0, 4 << 20, Class::Live);
    let want = ((4 << 20) - (1 << 20)) as f64 / rate as f64;
    assert!((w.as_secs_f64() - want).abs() < 1e-6, "{w:?} vs {want}");
    // Time going backwards adds no tokens.
    let mut b = TokenBucket::new(rate, 1 << 20, 10 * MS);
    b.take(10 * MS, 1 << 20, Class::Live);
    assert!(b.tokens(5 * MS) <= 0.0);
}
