//! Checksums and hashes on ferry's paths: CRC32C (frame and journal checksums; the
//! journal's is salted with the segment number), SM3 (the audit log's hash chain) and
//! XXH3-128 (chunk digests for initial sync and verify), over 256 B (an audit line), 4 KiB, 64 KiB and 1 MiB.
//! `cargo bench -p ferry-benches --bench checksums`.
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_journal::format::salted_crc;
use sm3::{Digest, Sm3};
use xxhash_rust::xxh3::xxh3_128;

fn sums(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for (len, name) in [
        (256usize, "256B"),
        (4096, "4KiB"),
        (64 << 10, "64KiB"),
        (1 << 20, "1MiB"),
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new("crc32c", name), |b| {
            b.iter(|| crc32c::crc32c(black_box(&data)))
        });
        g.bench_function(BenchmarkId::new("crc32c_salted_journal", name), |b| {
            b.iter(|| salted_crc(black_box(7), black_box(&data)))
        });
        g.bench_function(BenchmarkId::new("sm3", name), |b| {
            b.iter(|| Sm3::digest(black_box(&data)))
        });
        g.bench_function(BenchmarkId::new("xxh3_128", name), |b| {
            b.iter(|| xxh3_128(black_box(&data)))
        });
    }
    g.finish();
}

criterion_group!(benches, sums);
criterion_main!(benches);
