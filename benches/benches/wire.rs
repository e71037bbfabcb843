//! Replication frame encode/decode (`ferry_proto::wire`): a write-set of 4 KiB
//! writes (1 and 64 records) and of 1 MiB writes (4 records), copying `encode`, the
//! sender's copy-free `encode_write_set_vectored`, one-shot `decode`, and the
//! receiver's streaming `FrameDecoder` fed in 64 KiB chunks (a QUIC read's size).
//! `cargo bench -p ferry-benches --bench wire`.
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_proto::wire::{
    decode, encode, encode_write_set_vectored, Frame, FrameDecoder, RecordOp, WireRecord, WriteSet,
};

fn write_set(n: u64, len: usize) -> WriteSet {
    let records = (0..n)
        .map(|i| {
            let seq = 1 + i;
            WireRecord {
                seq,
                volume: 0,
                op: RecordOp::Write,
                offset: seq * len as u64,
                length: len as u32,
                data: Bytes::from(vec![(seq % 251) as u8; len]),
            }
        })
        .collect();
    WriteSet {
        epoch: 1,
        first_seq: 1,
        last_seq: n,
        timestamp_ns: 1_700_000_000_000_000_000,
        records,
    }
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (n, len, name) in [
        (1u64, 4096usize, "1x4KiB"),
        (64, 4096, "64x4KiB"),
        (4, 1 << 20, "4x1MiB"),
    ] {
        let frame = Frame::WriteSet(write_set(n, len));
        let Frame::WriteSet(ws) = &frame else {
            unreachable!()
        };
        let encoded = encode(&frame).expect("encode").freeze();
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        g.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| encode(black_box(&frame)).expect("encode"))
        });
        g.bench_function(BenchmarkId::new("encode_vectored", name), |b| {
            b.iter(|| encode_write_set_vectored(black_box(ws)).expect("encode"))
        });
        g.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| decode(black_box(encoded.clone())).expect("decode"))
        });
        g.bench_function(BenchmarkId::new("stream_decode_64KiB_chunks", name), |b| {
            b.iter(|| {
                let mut d = FrameDecoder::default();
                let mut got = None;
                for chunk in encoded.chunks(64 << 10) {
                    d.feed(chunk);
                    if let Some(f) = d.next_frame().expect("decode") {
                        got = Some(f);
                    }
                }
                got.expect("one frame")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
