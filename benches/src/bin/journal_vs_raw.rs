//! Journal append bandwidth beside raw `fio --direct=1` on the same disk, in one run,
//! with ratios. `cargo run --release -p ferry-benches --bin journal_vs_raw [-- --gib N]`
//!
//! Baselines: fio sequential 1 MiB writes with O_DIRECT (psync QD1 and io_uring QD8),
//! no fsync — the disk's raw write bandwidth. Journal: 1 MiB and 4 KiB records from 1
//! and 32 appender threads, each append waiting until durable, per engine.
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use ferry_benches::{bench_dir, open_bench_journal_depth, record};
use ferry_journal::EngineChoice;

fn fio_raw(dir: &std::path::Path, engine: &str, qd: u32, bytes: u64) -> anyhow::Result<f64> {
    let file = dir.join("fio-raw.dat");
    let out = Command::new("fio")
        .args([
            "--name=raw",
            "--rw=write",
            "--bs=1M",
            "--direct=1",
            "--end_fsync=1",
            "--output-format=json",
        ])
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--size={bytes}"))
        .arg(format!("--filename={}", file.display()))
        .output()
        .context("running fio (apt-get install fio)")?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v = ferry_benches::fio_json(&out.stdout)?;
    let bw_kib = v["jobs"][0]["write"]["bw"]
        .as_f64()
        .context("fio json without jobs[0].write.bw")?;
    Ok(bw_kib * 1024.0 / (1 << 20) as f64)
}

fn journal_mib_s(
    engine: EngineChoice,
    depth: usize,
    size: usize,
    appenders: usize,
    bytes: u64,
) -> Option<f64> {
    let dir = tempfile::tempdir_in(bench_dir()).ok()?;
    let j = Arc::new(open_bench_journal_depth(dir.path(), engine, depth)?);
    let per = (bytes / size as u64).div_ceil(appenders as u64);
    let payload = Bytes::from(vec![0xa5u8; size]);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..appenders {
            let j = j.clone();
            let p = payload.clone();
            s.spawn(move || {
                for i in 0..per {
                    j.append_wait(record(p.clone())).expect("append");
                    if i % 64 == 63 {
                        // Stand-in for the daemon's checkpointer.
                        let _ = j.release_through(j.durable_seq());
                    }
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let total = (per * appenders as u64 * size as u64) as f64;
    Some(total / (1 << 20) as f64 / secs)
}

fn main() -> anyhow::Result<()> {
    let gib: u64 = std::env::args()
        .skip_while(|a| a != "--gib")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let bytes = gib << 30;
    let dir = bench_dir();
    println!("scratch dir: {} ({} GiB per run)", dir.display(), gib);
    let raw_psync = fio_raw(&dir, "psync", 1, bytes)?;
    let raw_uring = fio_raw(&dir, "io_uring", 8, bytes)?;
    let raw = raw_psync.max(raw_uring);
    println!("{:<44} {:>10}", "run", "MiB/s");
    println!(
        "{:<44} {:>10.0}",
        "fio raw 1M seq write O_DIRECT psync QD1", raw_psync
    );
    println!(
        "{:<44} {:>10.0}",
        "fio raw 1M seq write O_DIRECT io_uring QD8", raw_uring
    );
    let mut rows = Vec::new();
    for (engine, depth, name) in [
        (EngineChoice::IoUring, 1, "io_uring"),
        (EngineChoice::IoUring, 2, "io_uring/d2"),
        (EngineChoice::Std, 1, "std"),
    ] {
        for (size, sname, total) in [(1usize << 20, "1MiB", bytes), (4096, "4KiB", bytes / 8)] {
            for appenders in [1usize, 32] {
                if let Some(mbs) = journal_mib_s(engine, depth, size, appenders, total) {
                    let label = format!("journal {name} {sname} x{appenders} appenders");
                    println!(
                        "{label:<44} {mbs:>10.0}   {:.2}x raw  ({:.0} appends/s)",
                        mbs / raw,
                        mbs * (1 << 20) as f64 / size as f64
                    );
                    rows.push((name, sname, appenders, mbs));
                } else {
                    println!("journal {name}: engine unavailable, not measured");
                }
            }
        }
    }
    let find = |e: &str, s: &str, a: usize| {
        rows.iter()
            .find(|r| r.0 == e && r.1 == s && r.2 == a)
            .map(|r| r.3)
    };
    if let (Some(u), Some(s)) = (find("io_uring", "4KiB", 32), find("std", "4KiB", 32)) {
        println!("io_uring / std, 4KiB x32: {:.2}", u / s);
    }
    if let (Some(u), Some(s)) = (find("io_uring", "1MiB", 32), find("std", "1MiB", 32)) {
        println!("io_uring / std, 1MiB x32: {:.2}", u / s);
    }
    if let Some(u) = find("io_uring", "1MiB", 32) {
        println!("io_uring 1MiB x32 / best raw: {:.2}", u / raw);
    }
    if let Some(u) = find("io_uring/d2", "1MiB", 32) {
        println!("io_uring depth 2, 1MiB x32 / best raw: {:.2}", u / raw);
    }
    Ok(())
}
