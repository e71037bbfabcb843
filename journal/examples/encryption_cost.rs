//! What encryption at rest costs the journal's write path: durable appends with and
//! without a key, same disk, same run, alternating rounds, medians and their ratio.
//!
//! ```sh
//! cargo run --release -p ferry-journal --example encryption_cost -- [DIR] [SECS] [ROUNDS]
//! ```
//!
//! Workloads: 4 KiB records from 32 appenders (the 4k QD32 shape: group commit
//! batches them) and 1 MiB records from 8 appenders (sequential 1M at QD8). DIR
//! (default `$TMPDIR`) should be on the disk the journal lives on.
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_gm::atrest::Kek;
use ferry_journal::{EngineChoice, Journal, JournalOptions, Record};

/// Appends per second over `secs`, `appenders` threads of `size`-byte records.
fn run(dir: &Path, key: Option<Arc<Kek>>, size: usize, appenders: usize, secs: f64) -> f64 {
    let mut o = JournalOptions::new(dir, [0x42; 16]);
    o.engine = EngineChoice::Auto;
    o.segment_size = 64 << 20;
    o.capacity = 1 << 30;
    o.encryption = key;
    let (j, _) = Journal::open(o).expect("open journal");
    if let Some(r) = j.fallback_reason() {
        eprintln!("note: journal engine {} ({r})", j.engine_name());
    }
    let j = Arc::new(j);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    // Distinct bytes per record (not that SM4 cares).
    let payload = Bytes::from(
        (0..size)
            .map(|i| (i * 131 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..appenders {
            let (j, stop, done, p) = (j.clone(), stop.clone(), done.clone(), payload.clone());
            s.spawn(move || {
                let mut off = t as u64 * (1 << 30);
                while !stop.load(Ordering::Relaxed) {
                    j.append_wait(Record::write(1, off, p.clone()))
                        .expect("append");
                    off += size as u64;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut released = Instant::now();
        while start.elapsed() < Duration::from_secs_f64(secs) {
            std::thread::sleep(Duration::from_millis(20));
            if released.elapsed() > Duration::from_millis(200) {
                j.release_through(j.durable_seq()).expect("release");
                released = Instant::now();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    drop(j);
    rate
}

/// Single-thread SM4-GCM sealing speed in MB/s (64 MiB in 1 MiB messages): what
/// the writer thread can encrypt at most, for reading the ratios.
fn seal_mb_s() -> f64 {
    let key = ferry_gm::atrest::DataKey::from_bytes(&[3; 16]);
    let mut buf = vec![0x5a_u8; 1 << 20];
    let start = Instant::now();
    for i in 0..64u32 {
        key.seal(1, i, b"", &mut buf).expect("seal");
    }
    64.0 * (1 << 20) as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parent = args
        .first()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let kek = Arc::new(Kek::from_bytes(&[7; 16]));
    println!(
        "SM4 backend {}, SM4-GCM seal {:.0} MB/s on one thread; {rounds} rounds x {secs} s, alternating",
        ferry_gm::Backend::selected().name(),
        seal_mb_s()
    );
    for (name, size, appenders) in [("4KiB x 32", 4096usize, 32usize), ("1MiB x 8", 1 << 20, 8)] {
        let (mut plain, mut enc) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for encrypted in [false, true] {
                let dir = tempfile::tempdir_in(&parent).expect("tempdir");
                let key = encrypted.then(|| kek.clone());
                let r = run(dir.path(), key, size, appenders, secs);
                if encrypted { &mut enc } else { &mut plain }.push(r);
            }
        }
        let (p, e) = (median(plain), median(enc));
        let mb = |r: f64| r * size as f64 / 1e6;
        println!(
            "{name}: plain {p:.0}/s ({:.0} MB/s), sm4-gcm {e:.0}/s ({:.0} MB/s), ratio {:.3}",
            mb(p),
            mb(e),
            e / p
        );
    }
}
