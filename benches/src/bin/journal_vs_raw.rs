//! Journal append bandwidth beside raw `fio --direct=1` on the same disk, in one run,
//! with ratios. `cargo run --release -p ferry-benches --bin journal_vs_raw [-- --gib N --rounds R]`
//!
//! Baselines: fio sequential 1 MiB writes with O_DIRECT (psync QD1 and io_uring QD8),
//! no fsync, over a file laid out first (`--overwrite=1`) — the disk's raw write
//! bandwidth for overwrites, which is what a journal past its first pass does. Journal: 1 MiB and 4 KiB records from 1
//! and 32 appender threads, each append waiting until durable, per engine.
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use ferry_benches::{bench_dir, open_bench_journal_depth, record, warm_journal, with_checkpointer};
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
            // Lay the file out (written, not just allocated) before the timed pass:
            // the journal overwrites recycled segments, and writing into unwritten
            // extents is ~1.5x slower here. Like for like.
            "--overwrite=1",
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

/// One journal run: MiB/s of `bytes` appended as `size`-byte records by `appenders`
/// threads, each append waiting until durable. `warm`: after the untimed first pass
/// (steady state, recycled segments); otherwise a new journal's first pass.
fn journal_mib_s(
    engine: EngineChoice,
    depth: usize,
    size: usize,
    appenders: usize,
    bytes: u64,
    warm: bool,
) -> Option<f64> {
    let dir = tempfile::tempdir_in(bench_dir()).ok()?;
    let j = Arc::new(open_bench_journal_depth(dir.path(), engine, depth)?);
    if warm {
        warm_journal(&j);
    }
    let per = (bytes / size as u64).div_ceil(appenders as u64);
    let payload = Bytes::from(vec![0xa5u8; size]);
    let start = Instant::now();
    with_checkpointer(&j, || {
        std::thread::scope(|s| {
            for _ in 0..appenders {
                let j = j.clone();
                let p = payload.clone();
                s.spawn(move || {
                    for _ in 0..per {
                        j.append_wait(record(p.clone())).expect("append");
                    }
                });
            }
        })
    });
    let secs = start.elapsed().as_secs_f64();
    let total = (per * appenders as u64 * size as u64) as f64;
    Some(total / (1 << 20) as f64 / secs)
}

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Row {
    label: String,
    size: usize,
    mib_s: Vec<f64>,
    ratio: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let gib: u64 = arg("--gib", 1);
    let rounds: usize = arg("--rounds", 3);
    // `--only ENGINE/SIZE/APPENDERS` (e.g. io_uring/1MiB/32): one journal row, for
    // profiling.
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    let bytes = gib << 30;
    let dir = bench_dir();
    println!(
        "scratch dir: {} ({gib} GiB per run, {rounds} rounds; raw fio and the journal \
         runs alternate, ratios are to the same round's raw figure)",
        dir.display()
    );
    let configs = configs(only.as_deref());
    let mut raw_rows = [
        ("fio raw 1M seq write O_DIRECT psync QD1", Vec::new()),
        ("fio raw 1M seq write O_DIRECT io_uring QD8", Vec::new()),
    ];
    let mut rows: Vec<Row> = configs
        .iter()
        .map(|c| Row {
            label: c.0.clone(),
            size: c.3,
            mib_s: Vec::new(),
            ratio: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        run_round(&dir, bytes, round, &configs, &mut raw_rows, &mut rows)?;
    }
    print_medians(rounds, raw_rows, &rows);
    Ok(())
}

/// (label, engine, depth, size, appenders, warm)
type Config = (String, EngineChoice, usize, usize, usize, bool);

/// Every journal row, or the one `--only` names.
fn configs(only: Option<&str>) -> Vec<Config> {
    let mut configs = Vec::new();
    for (engine, depth, name) in [
        (EngineChoice::IoUring, 1, "io_uring"),
        (EngineChoice::IoUring, 2, "io_uring/d2"),
        (EngineChoice::Std, 1, "std"),
    ] {
        for (size, sname) in [(1usize << 20, "1MiB"), (4096, "4KiB")] {
            for appenders in [1usize, 32] {
                let key = format!("{name}/{sname}/{appenders}");
                if only.is_some_and(|o| o != key) {
                    continue;
                }
                let label = format!("journal {name} {sname} x{appenders}");
                configs.push((label, engine, depth, size, appenders, true));
            }
        }
    }
    if only.is_none() {
        configs.push((
            "journal io_uring 1MiB x32, new journal".into(),
            EngineChoice::IoUring,
            1,
            1 << 20,
            32,
            false,
        ));
    }
    configs
}

/// One round: both raw fio runs, then every journal row against the better of them.
fn run_round(
    dir: &std::path::Path,
    bytes: u64,
    round: usize,
    configs: &[Config],
    raw_rows: &mut [(&str, Vec<f64>); 2],
    rows: &mut [Row],
) -> anyhow::Result<()> {
    let psync = fio_raw(dir, "psync", 1, bytes)?;
    let uring = fio_raw(dir, "io_uring", 8, bytes)?;
    raw_rows[0].1.push(psync);
    raw_rows[1].1.push(uring);
    let raw = psync.max(uring);
    println!("round {}: raw {raw:.0} MiB/s", round + 1);
    for (c, row) in configs.iter().zip(rows.iter_mut()) {
        // 4 KiB runs write an eighth: same wall time order as the 1 MiB ones.
        let total = if c.3 < (1 << 20) { bytes / 8 } else { bytes };
        match journal_mib_s(c.1, c.2, c.3, c.4, total, c.5) {
            Some(mbs) => {
                println!("  {:<44} {mbs:>8.0} MiB/s  {:.2}x raw", c.0, mbs / raw);
                row.mib_s.push(mbs);
                row.ratio.push(mbs / raw);
            }
            None => println!("  {}: engine unavailable, not measured", c.0),
        }
    }
    Ok(())
}

/// The medians of every row over the rounds, and io_uring against std.
fn print_medians(rounds: usize, raw_rows: [(&str, Vec<f64>); 2], rows: &[Row]) {
    println!();
    println!("medians over {rounds} rounds:");
    println!("{:<44} {:>10} {:>8}", "run", "MiB/s", "x raw");
    for (label, v) in raw_rows {
        println!("{label:<44} {:>10.0}", median(v));
    }
    for r in rows {
        if r.mib_s.is_empty() {
            continue;
        }
        let mbs = median(r.mib_s.clone());
        println!(
            "{:<44} {mbs:>10.0} {:>8.2}   ({:.0} appends/s)",
            r.label,
            median(r.ratio.clone()),
            mbs * (1 << 20) as f64 / r.size as f64
        );
    }
    let find = |l: &str| rows.iter().find(|r| r.label == l && !r.mib_s.is_empty());
    for (a, b, what) in [
        (
            "journal io_uring 4KiB x32",
            "journal std 4KiB x32",
            "io_uring / std, 4KiB x32",
        ),
        (
            "journal io_uring 1MiB x32",
            "journal std 1MiB x32",
            "io_uring / std, 1MiB x32",
        ),
    ] {
        if let (Some(a), Some(b)) = (find(a), find(b)) {
            let per_round: Vec<f64> = a.mib_s.iter().zip(&b.mib_s).map(|(x, y)| x / y).collect();
            println!(
                "{what}: {:.2} (median of per-round ratios)",
                median(per_round)
            );
        }
    }
}
