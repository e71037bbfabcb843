//! Quick throughput check of writer pipelining: N threads append records (4 KiB by
//! default) with `append_wait` for a few seconds at depth 1 and depth 2.
//!
//! `cargo run -p ferry-journal --release --example pipeline_throughput -- [dir] [secs] [threads] [engine] [rounds] [record bytes]`
//! (dir defaults to a temp dir under /var/tmp; engine: uring | std; `BATCH=bytes` in
//! the environment sets `max_batch_bytes`). Nothing is released, so every segment is
//! a new one written full of zeros first: this measures a first pass.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_journal::{EngineChoice, Journal, JournalOptions, Record};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args.get(1).cloned().unwrap_or_else(|| "/var/tmp".into());
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let engine = match args.get(4).map(String::as_str) {
        Some("std") => EngineChoice::Std,
        _ => EngineChoice::IoUring,
    };
    let rounds: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(2);
    let size: usize = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(4096);
    for depth in (0..rounds).flat_map(|_| [1usize, 2]) {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let mut o = JournalOptions::new(dir.path(), *b"ferry-bench-clus");
        o.engine = engine;
        o.segment_size = 64 << 20;
        // Large enough that a run never fills the journal (nothing is released, so
        // every segment is fresh: recycled segments do not pipeline, see FORMAT.md).
        o.capacity = 8 << 30;
        o.max_inflight_batches = depth;
        if let Some(b) = std::env::var("BATCH").ok().and_then(|v| v.parse().ok()) {
            o.max_batch_bytes = b;
        }
        let (j, _) = Journal::open(o).expect("open");
        let j = Arc::new(j);
        let stop = Arc::new(AtomicBool::new(false));
        let lat_ns = Arc::new(AtomicU64::new(0));
        let data = Bytes::from(vec![0x5au8; size]);
        // Warm up (first segment activation) before measuring.
        j.append_wait(Record::write(0, 0, data.clone())).unwrap();
        let s0 = j.stats();
        let t0 = Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (j, stop, lat, data) = (j.clone(), stop.clone(), lat_ns.clone(), data.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let a = Instant::now();
                        j.append_wait(Record::write(t as u32, n * size as u64, data.clone()))
                            .unwrap();
                        lat.fetch_add(a.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        let n: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        let el = t0.elapsed().as_secs_f64();
        let s = j.stats();
        let (b, r) = (s.batches - s0.batches, s.records - s0.records);
        println!(
            "{} depth {depth}: {:.0} appends/s, {b} batches, {:.2} records/batch, {:.1} us/batch write (submit->reap), {:.1} us mean append_wait",
            j.engine_name(),
            n as f64 / el,
            r as f64 / b.max(1) as f64,
            (s.write_ns - s0.write_ns) as f64 / b.max(1) as f64 / 1e3,
            lat_ns.load(Ordering::Relaxed) as f64 / n.max(1) as f64 / 1e3,
        );
        Arc::try_unwrap(j).ok().unwrap().close().unwrap();
    }
}
