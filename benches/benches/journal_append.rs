//! Journal append throughput: 4 KiB and 1 MiB records, 1 and 32 concurrent appenders,
//! io_uring and std engines. Each append waits until durable (group commit batches the
//! concurrent ones). `cargo bench -p ferry-benches --bench journal_append`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_benches::{open_bench_journal, record};
use ferry_journal::EngineChoice;

fn appends(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for (engine, ename) in [
        (EngineChoice::IoUring, "io_uring"),
        (EngineChoice::Std, "std"),
    ] {
        for size in [4096usize, 1 << 20] {
            for appenders in [1usize, 32] {
                let dir = tempfile::tempdir_in(ferry_benches::bench_dir()).expect("tempdir");
                let Some(journal) = open_bench_journal(dir.path(), engine) else {
                    eprintln!("SKIP {ename}: engine unavailable on this machine");
                    continue;
                };
                let journal = Arc::new(journal);
                let payload = Bytes::from(vec![0x5au8; size]);
                g.throughput(Throughput::Bytes(size as u64));
                let id = BenchmarkId::new(
                    format!("{ename}/{}", if size == 4096 { "4KiB" } else { "1MiB" }),
                    format!("{appenders}_appenders"),
                );
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let per = iters.div_ceil(appenders as u64);
                        let start = Instant::now();
                        std::thread::scope(|s| {
                            for _ in 0..appenders {
                                let j = journal.clone();
                                let p = payload.clone();
                                s.spawn(move || {
                                    for _ in 0..per {
                                        j.append_wait(record(p.clone())).expect("append");
                                    }
                                });
                            }
                        });
                        let elapsed = start.elapsed();
                        // Keep the journal from filling: everything is "checkpointed".
                        journal
                            .release_through(journal.durable_seq())
                            .expect("release");
                        // Report per-append time as if `iters` appends ran.
                        elapsed.mul_f64(iters as f64 / (per * appenders as u64) as f64)
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
