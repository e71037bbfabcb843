//! Shared helpers for ferry's benchmarks: journal set-up for the micro-benchmarks and
//! `journal_vs_raw`, fio output parsing, and (in [`harness`]) the process, port, fio and
//! ferry-cluster plumbing of the end-to-end harness `e2e`.
pub mod harness;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use ferry_journal::{EngineChoice, Journal, JournalOptions, Op, Record};

/// Where benchmark journals live: `FERRY_BENCH_DIR` or the target directory, which is
/// on the same disk as the build (not a tmpfs /tmp).
pub fn bench_dir() -> PathBuf {
    let dir = std::env::var_os("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("bench-scratch")
        });
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

/// Segment size and capacity of benchmark journals.
pub const BENCH_SEGMENT: u64 = 128 << 20;
pub const BENCH_CAPACITY: u64 = 1 << 30;

/// Runs a new journal once through its whole capacity (1 MiB records, releasing as
/// it goes), untimed. Why: a new journal pre-zeroes each segment the first time it
/// needs it (a write of the segment size: writes into only-fallocated extents are
/// ~2× slower here), so its first pass writes everything twice; a deployed journal
/// is past that and recycles released segments (one 4 KiB header write each).
/// Measuring after this pass measures the steady state.
pub fn warm_journal(j: &Journal) {
    let rec = Bytes::from(vec![0x11u8; 1 << 20]);
    let n = (BENCH_CAPACITY + 2 * BENCH_SEGMENT) >> 20;
    with_checkpointer(j, || {
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let rec = rec.clone();
                s.spawn(move || {
                    for _ in (t..n).step_by(8) {
                        j.append_wait(record(rec.clone())).expect("warm-up append");
                    }
                });
            }
        })
    });
}

/// Runs `f` while a thread stands in for the daemon's checkpointer: it releases
/// the journal through its durable position every 5 ms, so appenders never wait for
/// space (the daemon's checkpoint also fsyncs the base; not measured here).
pub fn with_checkpointer<R>(j: &Journal, f: impl FnOnce() -> R) -> R {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let _ = j.release_through(j.durable_seq());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        let r = f();
        stop.store(true, std::sync::atomic::Ordering::Release);
        r
    })
}

/// Opens a journal with the given engine; `None` if that engine cannot run here (a
/// benchmark must never silently measure the fallback).
pub fn open_bench_journal(dir: &Path, engine: EngineChoice) -> Option<Journal> {
    open_bench_journal_depth(dir, engine, 1)
}

/// Like [`open_bench_journal`] with `depth` batch writes in flight.
pub fn open_bench_journal_depth(dir: &Path, engine: EngineChoice, depth: usize) -> Option<Journal> {
    let mut o = JournalOptions::new(dir.to_path_buf(), [0x42; 16]);
    o.engine = engine;
    o.max_inflight_batches = depth;
    o.segment_size = BENCH_SEGMENT;
    o.capacity = BENCH_CAPACITY;
    match Journal::open(o) {
        Ok((j, _)) => {
            let want = match engine {
                EngineChoice::IoUring => "io_uring",
                EngineChoice::Std => "std",
                EngineChoice::Auto => j.engine_name(),
            };
            if j.engine_name() != want {
                eprintln!(
                    "engine {want} requested but {} runs: {:?}",
                    j.engine_name(),
                    j.fallback_reason()
                );
                return None;
            }
            Some(j)
        }
        Err(e) => {
            eprintln!("cannot open journal: {e}");
            None
        }
    }
}

pub fn record(data: Bytes) -> Record {
    Record {
        volume: 0,
        op: Op::Write,
        offset: 0,
        length: data.len() as u32,
        data,
    }
}

/// Parses fio's `--output-format=json` output. fio prints informational lines (e.g.
/// "fio: connected to NBD server") before the JSON document, so skip to the first `{`.
pub fn fio_json(stdout: &[u8]) -> anyhow::Result<serde_json::Value> {
    let start = stdout.iter().position(|&b| b == b'{').ok_or_else(|| {
        anyhow::anyhow!("fio printed no JSON: {}", String::from_utf8_lossy(stdout))
    })?;
    serde_json::from_slice(&stdout[start..])
        .map_err(|e| anyhow::anyhow!("fio JSON did not parse: {e}"))
}
