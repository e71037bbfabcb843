//! End-to-end benchmark (issue 7): fio's nbd engine against `nbdkit file` and
//! `qemu-nbd` (baselines, no replication), ferryd primary alone, ferryd with an async
//! standby and ferryd with a sync standby (loopback), all on one backing disk, in one
//! run. `cargo run --release -p ferry-benches --bin e2e [-- --json PATH]`; `--help`
//! lists the options, jobs and targets; benches/README.md explains the figures.
//!
//! `ferry-async-x2` and `ferry-async-x3` (issue 21) are ferry-async with 2 and 3 async
//! standbys; with them in the run a second table shows the CPU per target (see
//! [`Fanout`]). They run only when `--targets` names them (each standby adds a volume,
//! a journal and an undo log on the scratch disk).
//!
//! Two controls run only when `--targets` names them, to show what a loopback standby
//! costs the primary by sharing its disk. `ferry-async-tmpfs` is the async standby
//! with its data on tmpfs. `ferry-capture-reads` is ferryd alone while a second fio
//! reads 4 KiB at random from a data file on the same disk, at the rate the async
//! standby's before-image capture read from storage in the same job and round (it
//! runs right after `ferry-async`).
//!
//! Each round runs every job against every target (the target order rotates from
//! round to round, so the host cache's drift hits all of them alike); the table shows
//! medians over rounds, and each ratio is the median of the per-round ratios to
//! `nbdkit file`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use ferry_benches::harness::{
    check_interrupt, cpu_seconds, cpu_seconds_all, ensure_fio, ferry_bins, find_on_path,
    free_tcp_port, install_interrupt_handler, median, peak_rss_bytes, percentile, reset_peak_rss,
    standby_names, storage_read_bytes, tool_version, wait_port, ClusterSetup, FerryCluster,
    FioResult, FioSpec, LagSamples, Proc,
};
use serde_json::{json, Value};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// ferryd's journal size (`ferryctl init --journal-size`).
const JOURNAL_SIZE: &str = "2GiB";
const JOURNAL_BYTES: u64 = 2 << 30;
/// The standby's undo log size limit (`pit.max_bytes`, 4 GiB by default).
const UNDO_BYTES: u64 = 4 << 30;
/// How often the standby's replication lag is sampled during a write job. A scrape
/// costs ferryd ~0.2 ms of CPU, so this adds ~1% of a core to the ferry figures.
const LAG_EVERY: Duration = Duration::from_millis(20);

#[derive(Parser)]
#[command(
    name = "e2e",
    about = "ferry end-to-end benchmark: fio's nbd engine against nbdkit, qemu-nbd and ferryd clusters",
    after_help = "Jobs:    randwrite-4k-qd1, randwrite-4k-qd32, randread-4k-qd32, write-1m-qd8, write-flush-4k-qd1\n\
                  Targets: nbdkit, qemu-nbd, ferry, ferry-wb, ferry-async, ferry-async-wb, ferry-async-nopit, ferry-async-paced, ferry-async-gm, ferry-async-enc, ferry-sync, ferry-sync-wb (default: all);\n\
                  ferry targets run cache = \"writethrough\"; the -wb ones cache = \"writeback\"\n\
                  only when named: ferry-async-x2, ferry-async-x3 (ferry-async with 2 / 3 async standbys);\n\
                  controls, only when named: ferry-capture-reads (needs ferry-async), ferry-async-tmpfs\n\n\
                  Per-target CPU (a second table, when ferry-async-x2 or -x3 runs): for each target with\n\
                  standbys, the primary's and the standbys' CPU s/GiB (mean and max per standby), and\n\
                  vs alone = (cluster CPU s/GiB - the primary alone's: ferry, or ferry-wb for writeback) / standbys:\n\
                  what one target costs the cluster, its shipping on the primary included;\n\
                  marginal = (cluster CPU s/GiB - the same target with one standby, e.g. ferry-async) / (standbys - 1):\n\
                  what each target beyond the first adds. Each per round and job, then the median over rounds.\n"
)]
struct Args {
    /// Seconds per job per round [default: 10; --quick: 3].
    #[arg(long)]
    runtime: Option<u64>,
    /// Rounds; the table shows medians [default: 3; --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Volume size, e.g. 1GiB, 512MiB [default: 1GiB; --quick: 256MiB].
    #[arg(long)]
    size: Option<String>,
    /// Also write the results as JSON to PATH.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Comma-separated subset of the jobs (see below).
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Comma-separated subset of the targets (see below).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Where the scratch directory (all backing files, journals, logs) is created
    /// [default: $TMPDIR, else /var/tmp].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Smoke run: shorter jobs, one round, a smaller volume.
    #[arg(long)]
    quick: bool,
    /// Use the ferryd/ferryctl already built instead of running cargo build first.
    #[arg(long)]
    no_build: bool,
    /// Skip the free-space check, which assumes every journal (2 GiB) and every undo
    /// log (4 GiB) fills up; short runs use far less. Watch the disk yourself.
    #[arg(long)]
    no_space_check: bool,
    /// Keep the scratch directory (configs, logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Keep the volumes' pages cached between jobs (write back, but no
    /// POSIX_FADV_DONTNEED): jobs then run on what the prefill and earlier jobs left
    /// in the page cache, large folios included, as on a volume in use.
    #[arg(long)]
    warm: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Nbdkit,
    QemuNbd,
    /// ferryd primary, with or without standbys `dr1`..`drN`.
    Ferry(Option<Standby>),
    /// Control: ferryd primary alone while the async standby's storage reads of the
    /// same job and round are replayed beside it (see the module docs).
    FerryCaptureReads,
}

impl Kind {
    /// A control (see the module docs).
    fn is_control(self) -> bool {
        match self {
            Kind::FerryCaptureReads => true,
            Kind::Ferry(Some(sb)) => sb.tmpfs,
            _ => false,
        }
    }

    /// Run only when `--targets` names it: a control, or a target with several
    /// standbys (each adds a volume, a journal and an undo log to the scratch disk).
    fn only_when_named(self) -> bool {
        self.is_control() || self.standbys() > 1
    }

    /// How many standbys a ferry target runs.
    fn standbys(self) -> usize {
        match self {
            Kind::Ferry(Some(sb)) => sb.count,
            _ => 0,
        }
    }

    /// The same ferry target with `n` standbys (0: the primary alone); the per-target
    /// CPU compares a target with these.
    fn with_standbys(self, n: usize) -> Kind {
        match self {
            Kind::Ferry(Some(sb)) if n > 0 => Kind::Ferry(Some(Standby { count: n, ..sb })),
            Kind::Ferry(_) if n == 0 => Kind::Ferry(None),
            k => k,
        }
    }
}

/// The standbys of a ferry target.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Standby {
    /// How many: `dr1`..`drN`, all alike.
    count: usize,
    /// `--mode` of `ferryctl init`: "async" or "sync".
    mode: &'static str,
    /// An undo log (PIT): on by default; off only to show what capture costs.
    pit: bool,
    /// Its whole data directory on tmpfs (`/dev/shm`) instead of the scratch disk: a
    /// control that shows the primary with a standby whose storage is not its own
    /// disk (the two cores stay shared).
    tmpfs: bool,
    /// `max_lag_seconds` of the primary's target (pacing), if set.
    max_lag: Option<f64>,
}

const fn standby(mode: &'static str, pit: bool, tmpfs: bool) -> Option<Standby> {
    Some(Standby {
        count: 1,
        mode,
        pit,
        tmpfs,
        max_lag: None,
    })
}

/// `n` async standbys set up as `ferry-async`'s one.
const fn async_standbys(n: usize) -> Option<Standby> {
    Some(Standby {
        count: n,
        mode: "async",
        pit: true,
        tmpfs: false,
        max_lag: None,
    })
}

/// `max_lag_seconds` of `ferry-async-paced`.
const PACED_MAX_LAG: f64 = 0.5;

#[derive(Debug)]
struct TargetDef {
    key: &'static str,
    label: &'static str,
    kind: Kind,
    /// A ferry target's `volume.cache`: set explicitly, so that the default
    /// (writethrough until the first FLUSH) never turns a writethrough target into a
    /// writeback one in the middle of a run (write + flush sends flushes).
    cache: Option<&'static str>,
}

const WT: Option<&str> = Some("writethrough");
const WB: Option<&str> = Some("writeback");

const TARGETS: &[TargetDef] = &[
    TargetDef {
        key: "nbdkit",
        label: "nbdkit file",
        kind: Kind::Nbdkit,
        cache: None,
    },
    TargetDef {
        key: "qemu-nbd",
        label: "qemu-nbd",
        kind: Kind::QemuNbd,
        cache: None,
    },
    TargetDef {
        key: "ferry",
        label: "ferryd primary",
        kind: Kind::Ferry(None),
        cache: WT,
    },
    TargetDef {
        key: "ferry-wb",
        label: "ferryd primary, writeback",
        kind: Kind::Ferry(None),
        cache: WB,
    },
    TargetDef {
        key: "ferry-async",
        label: "ferryd + async standby",
        kind: Kind::Ferry(standby("async", true, false)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-async-x2",
        label: "ferryd + 2 async standbys",
        kind: Kind::Ferry(async_standbys(2)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-async-x3",
        label: "ferryd + 3 async standbys",
        kind: Kind::Ferry(async_standbys(3)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-async-wb",
        label: "async standby, writeback",
        kind: Kind::Ferry(standby("async", true, false)),
        cache: WB,
    },
    TargetDef {
        key: "ferry-async-nopit",
        label: "ferryd + async, no PIT",
        kind: Kind::Ferry(standby("async", false, false)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-async-paced",
        label: "async, max_lag 0.5 s",
        kind: Kind::Ferry(Some(Standby {
            count: 1,
            mode: "async",
            pit: true,
            tmpfs: false,
            max_lag: Some(PACED_MAX_LAG),
        })),
        cache: WT,
    },
    TargetDef {
        key: "ferry-async-gm",
        label: "async, SM suites (gm)",
        kind: Kind::Ferry(standby("async:gm", true, false)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-async-enc",
        label: "async, encrypted at rest",
        kind: Kind::Ferry(standby("async:enc", true, false)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-sync",
        label: "ferryd + sync standby",
        kind: Kind::Ferry(standby("sync", true, false)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-sync-wb",
        label: "sync standby, writeback",
        kind: Kind::Ferry(standby("sync", true, false)),
        cache: WB,
    },
    TargetDef {
        key: "ferry-async-tmpfs",
        label: "async, standby on tmpfs",
        kind: Kind::Ferry(standby("async", true, true)),
        cache: WT,
    },
    TargetDef {
        key: "ferry-capture-reads",
        label: "ferryd alone + async's reads",
        kind: Kind::FerryCaptureReads,
        cache: WT,
    },
];

/// Where `ferry-async-tmpfs` keeps its standby.
const TMPFS: &str = "/dev/shm";

/// 4 KiB random reads at the rate the async standby read from storage.
const REPLAY_BLOCK: u64 = 4096;

#[derive(Debug)]
struct JobDef {
    key: &'static str,
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    fsync: bool,
}

const JOBS: &[JobDef] = &[
    JobDef {
        key: "randwrite-4k-qd1",
        label: "4k randwrite QD1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        fsync: false,
    },
    JobDef {
        key: "randwrite-4k-qd32",
        label: "4k randwrite QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        fsync: false,
    },
    JobDef {
        key: "randread-4k-qd32",
        label: "4k randread QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        fsync: false,
    },
    JobDef {
        key: "write-1m-qd8",
        label: "1M seq write QD8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        fsync: false,
    },
    JobDef {
        key: "write-flush-4k-qd1",
        label: "4k write + flush QD1",
        rw: "write",
        bs: "4k",
        iodepth: 1,
        fsync: true,
    },
];

/// A running target.
struct Server {
    def: &'static TargetDef,
    uri: String,
    /// The baseline server (nbdkit / qemu-nbd).
    proc: Option<Proc>,
    ferry: Option<FerryCluster>,
    /// The command line, for the report.
    command: String,
    /// The volume's backing files (ferry: the primary's and the standbys'; the
    /// control: also its data file to read).
    files: Vec<PathBuf>,
    /// `ferry-capture-reads`: the data file its replayed reads read.
    replay_file: Option<PathBuf>,
    /// A standby on tmpfs: its directory there, removed after `ferry` (declared
    /// before it) has stopped.
    _tmpfs: Option<tempfile::TempDir>,
}

impl Server {
    fn pids(&self) -> Vec<u32> {
        match (&self.proc, &self.ferry) {
            (Some(p), _) => vec![p.pid()],
            (None, Some(c)) => c.pids(),
            (None, None) => Vec::new(),
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(p) = &mut self.proc {
            p.check_alive()?;
        }
        if let Some(c) = &mut self.ferry {
            c.check_alive()?;
        }
        Ok(())
    }

    /// Runs `spec` and waits for ferry to apply and replicate everything it wrote.
    /// `replay`: 4 KiB reads per second to issue beside it from `replay_file`. Also
    /// returns the standbys' storage reads during fio (all together), in 4 KiB per
    /// second.
    fn run(
        &mut self,
        spec: &FioSpec,
        timeout: Duration,
        replay: Option<f64>,
    ) -> anyhow::Result<(FioResult, LagSamples, Option<f64>)> {
        let uri = self.uri.clone();
        let mut reader = match (replay, &self.replay_file) {
            (Some(rate), Some(file)) if rate >= 1.0 => Some(start_reader(file, rate, spec)?),
            _ => None,
        };
        let standbys = self
            .ferry
            .as_ref()
            .map(FerryCluster::standby_pids)
            .unwrap_or_default();
        let reads0 = standby_reads(&standbys)?;
        let started = Instant::now();
        let r = match &self.ferry {
            Some(c) if c.has_standby() && spec.is_write() => {
                c.with_lag_samples(LAG_EVERY, || spec.run(&uri, timeout))
            }
            _ => spec.run(&uri, timeout).map(|r| (r, LagSamples::default())),
        };
        let secs = started.elapsed().as_secs_f64();
        let reads = match reads0 {
            Some(r0) if r.is_ok() => {
                // A standby that died reads as itself, with its log, not as /proc.
                self.check_alive()?;
                let r1 = standby_reads(&standbys)
                    .with_context(|| format!("{}: the standbys' reads", self.def.label))?
                    .unwrap_or(r0);
                Some(r1.saturating_sub(r0) as f64 / REPLAY_BLOCK as f64 / secs)
            }
            _ => None,
        };
        // A reader that stopped early would make the control measure nothing.
        if let Some(p) = reader.as_mut() {
            p.check_alive()
                .context("the replayed reads stopped before the job ended")?;
        }
        drop(reader);
        if r.is_err() {
            // A dead server explains a failed fio better than fio does (give one that
            // is shutting down a moment to exit).
            for _ in 0..20 {
                self.check_alive()
                    .with_context(|| format!("{} during fio", self.def.label))?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let (fio, lag) = r.with_context(|| format!("fio against {}", self.def.label))?;
        if let Some(c) = &mut self.ferry {
            c.drain(Duration::from_secs(300))
                .with_context(|| format!("{} after fio", self.def.label))?;
        }
        self.check_alive()?;
        Ok((fio, lag, reads.or(replay)))
    }
}

/// The storage reads of the standbys `pids` together (`None`: no standby).
fn standby_reads(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter()
        .map(|&p| storage_read_bytes(p))
        .sum::<anyhow::Result<u64>>()
        .map(Some)
}

/// The order in which round `round` runs the `n` targets: rotated by one per round,
/// so drift over the run hits every target alike; the control `replay` (if any) right
/// after `after`, whose reads of the same round it replays.
fn round_order(n: usize, round: usize, replay: Option<usize>, after: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).map(|k| (k + round) % n).collect();
    if let (Some(r), Some(a)) = (replay, after) {
        order.retain(|&t| t != r);
        let at = order
            .iter()
            .position(|&t| t == a)
            .map_or(order.len(), |p| p + 1);
        order.insert(at, r);
    }
    order
}

/// Starts the control's reader: fio reading 4 KiB blocks of `file` at random, O_DIRECT
/// (every read reaches the disk, as the standby's capture reads of cold blocks do),
/// `rate` per second, for longer than `spec` runs; stopped by its PID when dropped.
/// O_DIRECT spends less CPU than the standby's buffered reads, so the control shows
/// the disk's share of the cost, not more.
fn start_reader(file: &Path, rate: f64, spec: &FioSpec) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=capture-reads",
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        "--ioengine=io_uring",
        "--iodepth=8",
        "--time_based",
        "--output=/dev/null",
    ])
    .arg(format!("--filename={}", file.display()))
    .arg(format!("--rate_iops={}", rate.round() as u64))
    .arg(format!("--runtime={}", spec.runtime.unwrap_or(600) + 60));
    let p = Proc::spawn("fio (replayed capture reads)", cmd, None)?;
    // Let it reach its rate before the measured job starts.
    std::thread::sleep(Duration::from_millis(500));
    Ok(p)
}

/// Writes `size` bytes of data (not zeros: a hole reads nothing from disk) to `file`.
fn write_data_file(file: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let mut block = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i as u64 ^ off.rotate_left(17)) as u8 | 1;
        }
        let n = (size - off).min(block.len() as u64) as usize;
        f.write_all(&block[..n])
            .with_context(|| format!("writing {}", file.display()))?;
        off += n as u64;
    }
    f.sync_all()
        .with_context(|| format!("syncing {}", file.display()))
}

/// One job against one target in one round.
#[derive(Clone)]
struct Sample {
    fio: FioResult,
    /// Every process of the target (a ferry cluster: primary and standbys).
    cpu_s: f64,
    /// Of `cpu_s`, each standby's (empty without standbys).
    standby_cpu_s: Vec<f64>,
    /// Peak resident memory during the job, bytes: the primary (or the lone server)
    /// first, then each standby.
    peak_rss: Vec<u64>,
    lag_p99_s: Option<f64>,
    lag_samples: usize,
    degraded: bool,
    /// Standby targets: their storage reads (all standbys) in 4 KiB per second; the
    /// control: the rate it replayed.
    reads_per_s: Option<f64>,
}

impl Sample {
    fn cpu_per_gib(&self) -> f64 {
        self.cpu_s / (self.fio.io_bytes as f64 / GIB)
    }

    /// Each standby's share of [`cpu_per_gib`](Self::cpu_per_gib).
    fn each_standby_cpu_per_gib(&self) -> Vec<f64> {
        let gib = self.fio.io_bytes as f64 / GIB;
        self.standby_cpu_s.iter().map(|s| s / gib).collect()
    }

    /// The standbys' share of [`cpu_per_gib`](Self::cpu_per_gib), all together.
    fn standby_cpu_per_gib(&self) -> Option<f64> {
        let each = self.each_standby_cpu_per_gib();
        (!each.is_empty()).then(|| each.iter().sum())
    }

    /// The mean and the largest of the standbys' CPU s/GiB.
    fn standby_mean_max_per_gib(&self) -> Option<(f64, f64)> {
        let each = self.each_standby_cpu_per_gib();
        let max = each.iter().copied().reduce(f64::max)?;
        Some((each.iter().sum::<f64>() / each.len() as f64, max))
    }

    /// The standbys' CPU seconds, all together (`None` without standbys).
    fn standby_cpu_s_total(&self) -> Option<f64> {
        (!self.standby_cpu_s.is_empty()).then(|| self.standby_cpu_s.iter().sum())
    }

    /// Peak resident memory of the primary (or the lone server), MiB.
    fn primary_peak_rss_mib(&self) -> f64 {
        self.peak_rss.first().map_or(0.0, |&b| b as f64 / MIB)
    }

    /// The largest standby's peak resident memory, MiB (`None` without standbys).
    fn standby_peak_rss_mib(&self) -> Option<f64> {
        self.peak_rss.iter().skip(1).max().map(|&b| b as f64 / MIB)
    }

    /// The primary's (or the lone server's) share of [`cpu_per_gib`](Self::cpu_per_gib).
    fn primary_cpu_per_gib(&self) -> f64 {
        self.cpu_per_gib() - self.standby_cpu_per_gib().unwrap_or(0.0)
    }
}

fn main() -> std::process::ExitCode {
    install_interrupt_handler();
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn pick<T>(
    all: &'static [T],
    key: fn(&T) -> &'static str,
    want: &[String],
    what: &str,
) -> anyhow::Result<Vec<&'static T>> {
    if want.is_empty() {
        return Ok(all.iter().collect());
    }
    let names: Vec<&str> = all.iter().map(key).collect();
    let mut out: Vec<&'static T> = Vec::new();
    for w in want {
        let Some(t) = all.iter().find(|t| key(t) == w.trim()) else {
            bail!("unknown {what} {w:?}; known: {}", names.join(", "));
        };
        if !out.iter().any(|o| std::ptr::eq(*o, t)) {
            out.push(t);
        }
    }
    // Keep the canonical order (jobs: reads after the writes that filled the volume).
    out.sort_by_key(|t| all.iter().position(|a| std::ptr::eq(a, *t)));
    Ok(out)
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("--size {s:?}: expected a number with an optional unit (KiB, MiB, GiB, TiB)")
    })?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        u => bail!("--size {s:?}: unknown unit {u:?} (KiB, MiB, GiB, TiB)"),
    };
    let v = n.checked_mul(mul).context("--size overflows")?;
    if v < 16 << 20 || v & ((1 << 20) - 1) != 0 {
        bail!("--size {s:?}: need a multiple of 1MiB, at least 16MiB");
    }
    Ok(v)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn start_server(
    def: &'static TargetDef,
    scratch: &Path,
    size: u64,
    bins: Option<&ferry_benches::harness::FerryBins>,
) -> anyhow::Result<Server> {
    eprintln!("starting {}", def.label);
    match def.kind {
        Kind::Nbdkit | Kind::QemuNbd => start_nbd_server(def, scratch, size),
        Kind::Ferry(_) | Kind::FerryCaptureReads => start_ferry_server(def, scratch, size, bins),
    }
}

/// nbdkit file or qemu-nbd on a sparse file of the volume's size: the baselines.
fn start_nbd_server(def: &'static TargetDef, scratch: &Path, size: u64) -> anyhow::Result<Server> {
    let file = scratch.join(format!("{}.img", def.key));
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", file.display()))?;
    let port = free_tcp_port()?;
    let mut cmd;
    let uri;
    if def.kind == Kind::Nbdkit {
        // Defaults: page cache, 16 threads, flush = fdatasync.
        cmd = Command::new("nbdkit");
        cmd.args([
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .arg("file")
        .arg(&file);
        uri = format!("nbd://127.0.0.1:{port}");
    } else {
        // The same settings as nbdkit file: page cache (writeback), a thread
        // pool for the IO, flush = fdatasync. (--aio=native needs
        // --cache=none, i.e. O_DIRECT, which nbdkit does not do.)
        cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-t", "-x", "vol0", "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["--cache=writeback", "--aio=threads"])
            .arg(&file);
        uri = format!("nbd://127.0.0.1:{port}/vol0");
    }
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut p = Proc::spawn(
        def.label,
        cmd,
        Some(&scratch.join(format!("{}.log", def.key))),
    )?;
    wait_port(port, Duration::from_secs(30), &mut [&mut p])?;
    Ok(Server {
        def,
        uri,
        proc: Some(p),
        ferry: None,
        command,
        files: vec![file],
        replay_file: None,
        _tmpfs: None,
    })
}

/// A ferry primary (and its standbys, if the target has any) started by the harness.
fn start_ferry_server(
    def: &'static TargetDef,
    scratch: &Path,
    size: u64,
    bins: Option<&ferry_benches::harness::FerryBins>,
) -> anyhow::Result<Server> {
    let sb = match def.kind {
        Kind::Ferry(sb) => sb,
        _ => None,
    };
    let bins = bins.context("ferry binaries not located")?;
    let dir = scratch.join(def.key);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmpfs = sb
        .filter(|sb| sb.tmpfs)
        .map(|_| {
            tempfile::Builder::new()
                .prefix("ferry-e2e-")
                .tempdir_in(TMPFS)
                .with_context(|| format!("creating a directory in {TMPFS}"))
        })
        .transpose()?;
    let cache = def.cache.unwrap_or("writethrough");
    let c = FerryCluster::start(
        bins,
        &dir,
        (size, JOURNAL_SIZE),
        ClusterSetup {
            mode: sb.map(|sb| sb.mode),
            standbys: def.kind.standbys(),
            pit: sb.is_none_or(|sb| sb.pit),
            standby_storage: tmpfs.as_ref().map(|t| t.path()),
            cache,
            max_lag_seconds: sb.and_then(|sb| sb.max_lag),
        },
    )?;
    let command = ferry_command(size, sb, cache);
    let files = std::iter::once("primary")
        .chain(c.standbys().iter().map(String::as_str))
        .map(|n| dir.join(n).join("vol0.img"))
        .filter(|p| p.exists())
        .collect();
    let mut s = Server {
        def,
        uri: c.uri(),
        proc: None,
        ferry: Some(c),
        command,
        files,
        replay_file: None,
        _tmpfs: tmpfs,
    };
    if def.kind == Kind::FerryCaptureReads {
        let file = scratch.join(format!("{}.data", def.key));
        write_data_file(&file, size)?;
        s.command = format!(
                    "{}; beside each job: fio --rw=randread --bs=4k --direct=1 --ioengine=io_uring --iodepth=8 --rate_iops=<ferry-async's standby reads/s> on a {} data file",
                    s.command,
                    human(size)
                );
        s.files.push(file.clone());
        s.replay_file = Some(file);
    }
    Ok(s)
}

/// The setup a ferry target runs, as the report shows it.
fn ferry_command(size: u64, sb: Option<Standby>, cache: &str) -> String {
    let names = standby_names(sb.map_or(0, |sb| sb.count));
    let flags: String = names
        .iter()
        .map(|n| format!(" --standby {n}=127.0.0.1:P"))
        .collect();
    let join = |suffix: &str| {
        names
            .iter()
            .map(|n| format!("{n}{suffix}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "ferryctl init --volume vol0:{size} --journal-size {JOURNAL_SIZE}{} + [metrics] + volume.cache = \"{cache}\"; ferryd --config primary.toml{}",
        sb.map(|sb| format!("{flags} --mode {}", sb.mode))
            .unwrap_or_default(),
        match sb {
            None => String::new(),
            Some(sb) => format!(
                "{} (and {}{}{})",
                sb.max_lag
                    .map(|s| format!(" + max_lag_seconds = {s}"))
                    .unwrap_or_default(),
                join(".toml"),
                if sb.pit { "" } else { " + [pit] enabled = false" },
                if sb.tmpfs {
                    format!("; {} moved to {TMPFS}", join("/"))
                } else {
                    String::new()
                }
            ),
        }
    )
}

fn run(args: Args) -> anyhow::Result<()> {
    let runtime = args
        .runtime
        .unwrap_or(if args.quick { 3 } else { 10 })
        .max(1);
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let size =
        parse_size(
            args.size
                .as_deref()
                .unwrap_or(if args.quick { "256MiB" } else { "1GiB" }),
        )?;
    let jobs = pick(JOBS, |j| j.key, &args.jobs, "job")?;
    // The controls and the targets with several standbys run only when named: they
    // add disk, tmpfs and time.
    let targets = if args.targets.is_empty() {
        TARGETS
            .iter()
            .filter(|t| !t.kind.only_when_named())
            .collect()
    } else {
        pick(TARGETS, |t| t.key, &args.targets, "target")?
    };

    let async_key = "ferry-async";
    let replay_ti = targets
        .iter()
        .position(|t| t.kind == Kind::FerryCaptureReads);
    let async_ti = targets.iter().position(|t| t.key == async_key);
    if replay_ti.is_some() && async_ti.is_none() {
        bail!("ferry-capture-reads replays the reads of {async_key}: list both in --targets");
    }
    ensure_fio()?;
    check_tools(&targets)?;
    let bins = if ferry_nodes(&targets) > 0 {
        Some(ferry_bins(!args.no_build)?)
    } else {
        None
    };

    let base = args
        .dir
        .clone()
        .or_else(|| std::env::var_os("TMPDIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    if args.no_space_check {
        eprintln!(
            "--no-space-check: not checking the free space in {}",
            base.display()
        );
    } else {
        check_space(&targets, size, &base)?;
    }
    let mut scratch = tempfile::Builder::new()
        .prefix("ferry-e2e-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch directory in {}", base.display()))?;
    scratch.disable_cleanup(args.keep);
    eprintln!("scratch directory: {}", scratch.path().display());

    // Declared after `scratch`, so the servers stop before it is removed.
    let mut servers: Vec<Server> = Vec::new();
    for def in &targets {
        servers.push(start_server(def, scratch.path(), size, bins.as_ref())?);
    }
    prefill(&mut servers, size)?;

    let files: Vec<PathBuf> = servers.iter().flat_map(|s| s.files.clone()).collect();
    settle(scratch.path(), &files, !args.warm)?;
    let load_before = loadavg();
    let plan = Plan {
        runtime,
        rounds,
        size,
        replay_ti,
        async_ti,
        dir: scratch.path(),
        files: &files,
        warm: args.warm,
    };
    let samples = measure(&plan, &jobs, &mut servers)?;

    let load = [load_before, loadavg()];
    let report = Report::build(
        &args,
        runtime,
        rounds,
        size,
        &jobs,
        &servers,
        &samples,
        scratch.path(),
        &load,
    );
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if args.keep {
        eprintln!("kept {}", scratch.path().display());
    }
    drop(servers);
    Ok(())
}

/// The tools the chosen baselines need are on PATH.
fn check_tools(targets: &[&'static TargetDef]) -> anyhow::Result<()> {
    for (kind, tool, pkg) in [
        (Kind::Nbdkit, "nbdkit", "nbdkit"),
        (Kind::QemuNbd, "qemu-nbd", "qemu-utils"),
    ] {
        if targets.iter().any(|t| t.kind == kind) && find_on_path(tool).is_none() {
            bail!("{tool} is not on PATH: apt-get install {pkg}, or leave it out with --targets");
        }
    }
    Ok(())
}

/// How many ferryd processes the chosen targets start.
fn ferry_nodes(targets: &[&'static TargetDef]) -> u64 {
    targets
        .iter()
        .map(|t| match t.kind {
            Kind::Ferry(_) | Kind::FerryCaptureReads => 1 + t.kind.standbys() as u64,
            _ => 0,
        })
        .sum()
}

/// The most a target may write: (on the scratch disk, on tmpfs) — a file of the
/// volume's size per baseline and for the control's data, and per ferry node its volume
/// and a full journal, plus a full undo log per standby with PIT.
fn space_needed(kind: Kind, size: u64) -> (u64, u64) {
    let node = size + JOURNAL_BYTES;
    match kind {
        Kind::Nbdkit | Kind::QemuNbd => (size, 0),
        Kind::FerryCaptureReads => (size + node, 0),
        Kind::Ferry(None) => (node, 0),
        Kind::Ferry(Some(sb)) => {
            let standbys = sb.count as u64 * (node + if sb.pit { UNDO_BYTES } else { 0 });
            if sb.tmpfs {
                (node, standbys)
            } else {
                (node + standbys, 0)
            }
        }
    }
}

/// Refuse a run that would fill the scratch disk or tmpfs halfway through.
fn check_space(targets: &[&'static TargetDef], size: u64, base: &Path) -> anyhow::Result<()> {
    let (need, want) = targets
        .iter()
        .map(|t| space_needed(t.kind, size))
        .fold((0, 0), |(d, t), (d1, t1)| (d + d1, t + t1));
    if want > 0 {
        match free_bytes(Path::new(TMPFS)) {
            Some(free) if free >= want => {}
            free => bail!(
                "{TMPFS} has {} free; a standby on tmpfs needs up to {:.1} GiB: leave ferry-async-tmpfs out or use --size",
                free.map_or("unknown".into(), |f| format!("{:.1} GiB", f as f64 / GIB)),
                want as f64 / GIB
            ),
        }
    }
    if let Some(free) = free_bytes(base) {
        if free < need + (1 << 30) {
            bail!(
                "{} has {:.1} GiB free; this run needs up to {:.1} GiB (volumes, journals, undo logs): use --dir, --size or --targets (or --no-space-check)",
                base.display(),
                free as f64 / GIB,
                need as f64 / GIB
            );
        }
    }
    Ok(())
}

/// Fill every volume once, so reads read data and every target starts alike.
fn prefill(servers: &mut [Server], size: u64) -> anyhow::Result<()> {
    for s in servers {
        check_interrupt()?;
        eprintln!("prefill {} ({} MiB)", s.def.label, size >> 20);
        let fill = FioSpec {
            rw: "write",
            bs: "1M",
            iodepth: 8,
            fsync: false,
            runtime: None,
            size,
        };
        s.run(&fill, Duration::from_secs(600), None)
            .context("prefilling the volume")?;
    }
    Ok(())
}

/// What every measured job shares.
struct Plan<'a> {
    runtime: u64,
    rounds: usize,
    size: u64,
    /// The control that replays the async standby's reads, and that standby's target.
    replay_ti: Option<usize>,
    async_ti: Option<usize>,
    dir: &'a Path,
    files: &'a [PathBuf],
    warm: bool,
}

/// Every job on every target, `rounds` times: `samples[target][job][round]`.
fn measure(
    plan: &Plan,
    jobs: &[&'static JobDef],
    servers: &mut [Server],
) -> anyhow::Result<Vec<Vec<Vec<Sample>>>> {
    let timeout = Duration::from_secs(plan.runtime + 120);
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); jobs.len()]; servers.len()];
    for round in 0..plan.rounds {
        for (ji, job) in jobs.iter().enumerate() {
            let spec = FioSpec {
                rw: job.rw,
                bs: job.bs,
                iodepth: job.iodepth,
                fsync: job.fsync,
                runtime: Some(plan.runtime),
                size: plan.size,
            };
            let order = round_order(servers.len(), round, plan.replay_ti, plan.async_ti);
            for ti in order {
                check_interrupt()?;
                let replay = if Some(ti) == plan.replay_ti {
                    plan.async_ti
                        .and_then(|a| samples[a][ji].last())
                        .and_then(|s: &Sample| s.reads_per_s)
                } else {
                    None
                };
                let s = &mut servers[ti];
                let sample = measure_one(plan, s, &spec, timeout, replay)?;
                log_sample(round, plan.rounds, job, s, &sample);
                samples[ti][ji].push(sample);
            }
        }
    }
    Ok(samples)
}

/// One job on one target: fio's figures, the CPU its processes used, replication lag.
fn measure_one(
    plan: &Plan,
    s: &mut Server,
    spec: &FioSpec,
    timeout: Duration,
    replay: Option<f64>,
) -> anyhow::Result<Sample> {
    let pids = s.pids();
    // Each standby apart, so its cost per GiB can be set against the primary's.
    let standbys = s
        .ferry
        .as_ref()
        .map(FerryCluster::standby_pids)
        .unwrap_or_default();
    let each = |pids: &[u32]| {
        pids.iter()
            .map(|&p| cpu_seconds(p))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    pids.iter().try_for_each(|&p| reset_peak_rss(p))?;
    let cpu0 = cpu_seconds_all(&pids)?;
    let sb0 = each(&standbys)?;
    let (fio, lag, reads_per_s) = s.run(spec, timeout, replay)?;
    let cpu1 = cpu_seconds_all(&pids)?;
    let sb1 = each(&standbys)?;
    let peak_rss = pids
        .iter()
        .map(|&p| peak_rss_bytes(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    settle(plan.dir, plan.files, !plan.warm)?;
    Ok(Sample {
        fio,
        cpu_s: cpu1 - cpu0,
        standby_cpu_s: sb0.iter().zip(&sb1).map(|(a, b)| b - a).collect(),
        peak_rss,
        lag_p99_s: percentile(&lag.seconds, 99.0),
        lag_samples: lag.seconds.len(),
        degraded: lag.degraded,
        reads_per_s,
    })
}

fn log_sample(round: usize, rounds: usize, job: &JobDef, s: &Server, sample: &Sample) {
    let fio = &sample.fio;
    eprintln!(
        "round {}/{rounds} {:<20} {:<24} {:>9.0} IOPS {:>8.1} MiB/s  p99 {:>7.0} us  {:.2} CPU s/GiB{}  peak RSS {}{}{}{}",
        round + 1,
        job.label,
        s.def.label,
        fio.iops,
        fio.bw_bytes / MIB,
        fio.p99_us,
        sample.cpu_per_gib(),
        standby_cpu_note(sample),
        rss_note(sample),
        sample
            .lag_p99_s
            .map(|l| format!("  lag p99 {:.1} ms", l * 1e3))
            .unwrap_or_default(),
        if sample.degraded { "  (sync target degraded)" } else { "" },
        sample
            .reads_per_s
            .map(|r| format!("  standby reads {r:.0}/s"))
            .unwrap_or_default(),
    );
}

/// The standbys' CPU s/GiB for the progress line: ` (standby X)`, or with several
/// ` (standbys X: A B C)` (all together, then each).
fn standby_cpu_note(sample: &Sample) -> String {
    let each = sample.each_standby_cpu_per_gib();
    let total: f64 = each.iter().sum();
    match each.len() {
        0 => String::new(),
        1 => format!(" (standby {total:.2})"),
        _ => {
            let each: Vec<String> = each.iter().map(|x| format!("{x:.2}")).collect();
            format!(" (standbys {total:.2}: {})", each.join(" "))
        }
    }
}

/// Peak resident memory for the progress line and the table: `P MiB`, or with
/// standbys `P / S MiB` (the largest standby's).
fn rss_note(sample: &Sample) -> String {
    rss_pair(sample.primary_peak_rss_mib(), sample.standby_peak_rss_mib()) + " MiB"
}

fn rss_pair(primary: f64, standby: Option<f64>) -> String {
    match standby {
        Some(s) => format!("{primary:.0} / {s:.0}"),
        None => format!("{primary:.0}"),
    }
}

/// Aggregated figures of one target on one job.
struct Row {
    job: usize,
    target: usize,
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    flush_p50_us: Option<f64>,
    flush_p99_us: Option<f64>,
    cpu_per_gib: f64,
    primary_cpu_per_gib: f64,
    standby_cpu_per_gib: Option<f64>,
    /// Peak resident memory, MiB: the primary's (or the lone server's), the largest
    /// standby's.
    peak_rss_mib: f64,
    standby_peak_rss_mib: Option<f64>,
    lag_p99_ms: Option<f64>,
    degraded: bool,
    reads_per_s: Option<f64>,
    /// Median per-round ratios to nbdkit file: throughput, p50, p99, CPU/GiB, flush p99.
    vs_nbdkit: Option<[f64; 5]>,
}

/// The per-target CPU of one target with standbys (or of its primary alone) on one
/// job: the second table, when a target with several standbys runs. CPU in s/GiB.
#[derive(Debug)]
struct Fanout {
    job: usize,
    target: usize,
    standbys: usize,
    iops: f64,
    /// Median per-round ratio of IOPS to the same target with one standby.
    x_one_iops: Option<f64>,
    cpu_per_gib: f64,
    primary_cpu_per_gib: f64,
    /// The mean and the largest of the standbys' CPU s/GiB.
    standby_mean: Option<f64>,
    standby_max: Option<f64>,
    /// (cluster − the primary alone) / standbys, per round: what one target costs
    /// the cluster, its shipping on the primary included.
    vs_alone: Option<f64>,
    /// (cluster − the same target with one standby) / (standbys − 1), per round: what
    /// each target beyond the first adds.
    marginal: Option<f64>,
}

/// The run's target that is target `ti` with `n` standbys (0: its primary alone) and
/// the same cache mode: what its per-target CPU is measured against.
fn reference(defs: &[&TargetDef], ti: usize, n: usize) -> Option<usize> {
    let want = defs[ti].kind.with_standbys(n);
    let cache = defs[ti].cache;
    defs.iter()
        .position(|d| matches!(d.kind, Kind::Ferry(_)) && d.kind == want && d.cache == cache)
}

/// The median over rounds of `(a − b) / added`: what each of `added` more targets
/// costs, from per-round figures of the larger cluster `a` and the smaller `b`.
fn per_added(a: &[f64], b: &[f64], added: usize) -> Option<f64> {
    if added == 0 || a.is_empty() || a.len() != b.len() {
        return None;
    }
    let n = added as f64;
    Some(median(a.iter().zip(b).map(|(x, y)| (x - y) / n).collect()))
}

/// The per-target table's rows: every ferry target on every job, when at least one
/// target runs several standbys (else none).
fn fanout(defs: &[&TargetDef], jobs: usize, samples: &[Vec<Vec<Sample>>]) -> Vec<Fanout> {
    if !defs.iter().any(|d| d.kind.standbys() > 1) {
        return Vec::new();
    }
    let ferry: Vec<usize> = (0..defs.len())
        .filter(|&ti| matches!(defs[ti].kind, Kind::Ferry(_)))
        .collect();
    (0..jobs)
        .flat_map(|ji| ferry.iter().map(move |&ti| (ji, ti)))
        .map(|(ji, ti)| fanout_row(defs, samples, ji, ti))
        .collect()
}

fn fanout_row(defs: &[&TargetDef], samples: &[Vec<Vec<Sample>>], ji: usize, ti: usize) -> Fanout {
    let n = defs[ti].kind.standbys();
    let v = &samples[ti][ji];
    let per_round =
        |ti: usize, f: fn(&Sample) -> f64| -> Vec<f64> { samples[ti][ji].iter().map(f).collect() };
    let cpu = per_round(ti, Sample::cpu_per_gib);
    let cpu_of = |r: usize| per_round(r, Sample::cpu_per_gib);
    let one = reference(defs, ti, 1).filter(|_| n > 1);
    let mo = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let x: Vec<f64> = v.iter().filter_map(f).collect();
        (!x.is_empty()).then(|| median(x))
    };
    Fanout {
        job: ji,
        target: ti,
        standbys: n,
        iops: median(per_round(ti, |s| s.fio.iops)),
        x_one_iops: one.map(|o| {
            let base = per_round(o, |s| s.fio.iops);
            median(v.iter().zip(base).map(|(s, b)| s.fio.iops / b).collect())
        }),
        cpu_per_gib: median(cpu.clone()),
        primary_cpu_per_gib: median(per_round(ti, Sample::primary_cpu_per_gib)),
        standby_mean: mo(&|s| s.standby_mean_max_per_gib().map(|m| m.0)),
        standby_max: mo(&|s| s.standby_mean_max_per_gib().map(|m| m.1)),
        vs_alone: reference(defs, ti, 0).and_then(|a| per_added(&cpu, &cpu_of(a), n)),
        marginal: one.and_then(|o| per_added(&cpu, &cpu_of(o), n - 1)),
    }
}

struct Report {
    header: Vec<String>,
    rows: Vec<Row>,
    fanout: Vec<Fanout>,
    jobs: Vec<&'static JobDef>,
    labels: Vec<&'static str>,
    json: Value,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn build(
        args: &Args,
        runtime: u64,
        rounds: usize,
        size: u64,
        jobs: &[&'static JobDef],
        servers: &[Server],
        samples: &[Vec<Vec<Sample>>],
        dir: &Path,
        load: &[String; 2],
    ) -> Report {
        let rows = Report::rows(jobs, servers, samples);
        let defs: Vec<&TargetDef> = servers.iter().map(|s| s.def).collect();
        let fanout = fanout(&defs, jobs.len(), samples);

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let command = std::iter::once("e2e".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        let engine = servers
            .iter()
            .find_map(|s| s.ferry.as_ref().map(|c| c.engine.clone()));
        let fio_v = tool_version("fio");
        let header = vec![
            format!(
                "`{command}` — {} — {cores} cores, Linux {kernel}; load average before / after the jobs: {} / {}",
                utc_date(now),
                load[0],
                load[1]
            ),
            format!(
                "fio nbd engine, {} volume, {runtime} s per job, {rounds} round(s), medians; scratch dir {}{}",
                human(size),
                dir.display(),
                if args.warm {
                    "; page cache kept between jobs (--warm)"
                } else {
                    ""
                }
            ),
            format!(
                "{fio_v}; nbdkit {}; {}{}",
                tool_version("nbdkit").trim_start_matches("nbdkit "),
                tool_version("qemu-nbd"),
                engine
                    .as_ref()
                    .map(|e| format!("; ferryd journal engine {e}"))
                    .unwrap_or_default()
            ),
        ];

        let mut json = json!({
            "date": utc_date(now),
            "unix_time": now,
            "command": command,
            "host": {"cores": cores, "kernel": kernel, "loadavg_before": load[0], "loadavg_after": load[1]},
            "options": {
                "runtime_s": runtime,
                "rounds": rounds,
                "size_bytes": size,
                "dir": dir.display().to_string(),
                "quick": args.quick,
            },
            "tools": {"fio": fio_v, "nbdkit": tool_version("nbdkit"), "qemu-nbd": tool_version("qemu-nbd")},
            "ferry_journal_engine": engine,
            "jobs": jobs.iter().map(|j| json!({
                "key": j.key, "label": j.label, "rw": j.rw, "bs": j.bs,
                "iodepth": j.iodepth, "fsync": j.fsync,
            })).collect::<Vec<_>>(),
            "targets": servers.iter().map(|s| json!({
                "key": s.def.key, "label": s.def.label, "command": s.command,
            })).collect::<Vec<_>>(),
            "results": Report::results(&rows, jobs, servers, samples),
        });
        if !fanout.is_empty() {
            json["per_target_cpu"] = fanout_json(&fanout, jobs, &defs);
        }
        Report {
            header,
            rows,
            fanout,
            jobs: jobs.to_vec(),
            labels: servers.iter().map(|s| s.def.label).collect(),
            json,
        }
    }

    /// Medians of every target on every job, and their ratios to nbdkit file.
    fn rows(
        jobs: &[&'static JobDef],
        servers: &[Server],
        samples: &[Vec<Vec<Sample>>],
    ) -> Vec<Row> {
        let base = servers.iter().position(|s| s.def.kind == Kind::Nbdkit);
        let mut rows = Vec::new();
        for (ji, _) in jobs.iter().enumerate() {
            for (ti, _) in servers.iter().enumerate() {
                let v = &samples[ti][ji];
                let m = |f: &dyn Fn(&Sample) -> f64| median(v.iter().map(f).collect());
                let mo = |f: &dyn Fn(&Sample) -> Option<f64>| {
                    let x: Vec<f64> = v.iter().filter_map(f).collect();
                    (!x.is_empty()).then(|| median(x))
                };
                let vs_nbdkit = base.filter(|&b| b != ti).map(|b| {
                    let b = &samples[b][ji];
                    let ratio = |f: &dyn Fn(&Sample) -> f64| {
                        median(v.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect())
                    };
                    [
                        ratio(&|s| s.fio.iops),
                        ratio(&|s| s.fio.p50_us),
                        ratio(&|s| s.fio.p99_us),
                        ratio(&|s| s.cpu_per_gib()),
                        ratio(&|s| s.fio.flush_p99_us.unwrap_or(f64::NAN)),
                    ]
                });
                rows.push(Row {
                    job: ji,
                    target: ti,
                    iops: m(&|s| s.fio.iops),
                    mib_s: m(&|s| s.fio.bw_bytes / MIB),
                    p50_us: m(&|s| s.fio.p50_us),
                    p99_us: m(&|s| s.fio.p99_us),
                    flush_p50_us: mo(&|s| s.fio.flush_p50_us),
                    flush_p99_us: mo(&|s| s.fio.flush_p99_us),
                    cpu_per_gib: m(&|s| s.cpu_per_gib()),
                    primary_cpu_per_gib: m(&|s| s.primary_cpu_per_gib()),
                    standby_cpu_per_gib: mo(&|s| s.standby_cpu_per_gib()),
                    peak_rss_mib: m(&|s| s.primary_peak_rss_mib()),
                    standby_peak_rss_mib: mo(&|s| s.standby_peak_rss_mib()),
                    lag_p99_ms: mo(&|s| s.lag_p99_s).map(|l| l * 1e3),
                    degraded: v.iter().any(|s| s.degraded),
                    reads_per_s: mo(&|s| s.reads_per_s),
                    vs_nbdkit,
                });
            }
        }
        rows
    }

    /// The JSON report's per-row results, each with its rounds.
    fn results(
        rows: &[Row],
        jobs: &[&'static JobDef],
        servers: &[Server],
        samples: &[Vec<Vec<Sample>>],
    ) -> Vec<Value> {
        let f = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        let fo = |x: Option<f64>| x.map_or(Value::Null, f);
        rows.iter()
            .map(|r| {
                let v = &samples[r.target][r.job];
                json!({
                    "job": jobs[r.job].key,
                    "target": servers[r.target].def.key,
                    "iops": f(r.iops),
                    "mib_s": f(r.mib_s),
                    "p50_us": f(r.p50_us),
                    "p99_us": f(r.p99_us),
                    "flush_p50_us": fo(r.flush_p50_us),
                    "flush_p99_us": fo(r.flush_p99_us),
                    "cpu_s_per_gib": f(r.cpu_per_gib),
                    "primary_cpu_s_per_gib": f(r.primary_cpu_per_gib),
                    "standby_cpu_s_per_gib": fo(r.standby_cpu_per_gib),
                    "peak_rss_mib": f(r.peak_rss_mib),
                    "standby_peak_rss_mib": fo(r.standby_peak_rss_mib),
                    "replication_lag_p99_ms": fo(r.lag_p99_ms),
                    "sync_target_degraded": r.degraded,
                    "standby_reads_per_s": fo(r.reads_per_s),
                    "vs_nbdkit": r.vs_nbdkit.map(|x| json!({
                        "throughput": f(x[0]), "p50": f(x[1]), "p99": f(x[2]),
                        "cpu_s_per_gib": f(x[3]), "flush_p99": f(x[4]),
                    })),
                    "rounds": v.iter().map(|s| json!({
                        "iops": f(s.fio.iops),
                        "bw_bytes": f(s.fio.bw_bytes),
                        "io_bytes": s.fio.io_bytes,
                        "p50_us": f(s.fio.p50_us),
                        "p99_us": f(s.fio.p99_us),
                        "flush_p50_us": fo(s.fio.flush_p50_us),
                        "flush_p99_us": fo(s.fio.flush_p99_us),
                        "cpu_s": f(s.cpu_s),
                        "standby_cpu_s": fo(s.standby_cpu_s_total()),
                        "peak_rss_bytes": s.peak_rss,
                        "replication_lag_p99_ms": fo(s.lag_p99_s.map(|l| l * 1e3)),
                        "lag_samples": s.lag_samples,
                        "sync_target_degraded": s.degraded,
                        "standby_reads_per_s": fo(s.reads_per_s),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect::<Vec<_>>()
    }

    fn markdown(&self) -> String {
        let mut o = String::new();
        for h in &self.header {
            o.push_str(h);
            o.push_str("  \n");
        }
        o.push('\n');
        o.push_str("| job | target | IOPS | MiB/s | p50 µs | p99 µs | CPU s/GiB | primary CPU s/GiB | standby CPU s/GiB | peak RSS MiB | lag p99 ms | standby reads/s | × nbdkit IOPS | × p99 | × CPU/GiB |\n");
        o.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            let (x_thr, x_p99, x_cpu) = match r.vs_nbdkit {
                Some(x) => (num(x[0], 2), num(x[2], 2), num(x[3], 2)),
                None => ("".into(), "".into(), "".into()),
            };
            o.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {x_thr} | {x_p99} | {x_cpu} |\n",
                self.jobs[r.job].label,
                self.labels[r.target],
                num(r.iops, 0),
                num(r.mib_s, if r.mib_s < 100.0 { 1 } else { 0 }),
                num(r.p50_us, 0),
                num(r.p99_us, 0),
                num(r.cpu_per_gib, 2),
                num(r.primary_cpu_per_gib, 2),
                r.standby_cpu_per_gib.map(|x| num(x, 2)).unwrap_or_default(),
                rss_pair(r.peak_rss_mib, r.standby_peak_rss_mib),
                r.lag_p99_ms.map(|l| num(l, 1)).unwrap_or_default(),
                if r.degraded { " (degraded)" } else { "" },
                r.reads_per_s.map(|x| num(x, 0)).unwrap_or_default(),
            ));
        }
        let flush: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.flush_p99_us.is_some())
            .collect();
        if !flush.is_empty() {
            o.push_str(
                "\nFlush latency of the write + flush job (p50/p99 above are the writes'):\n\n",
            );
            o.push_str(
                "| target | flush p50 µs | flush p99 µs | × nbdkit p99 |\n|---|---:|---:|---:|\n",
            );
            for r in flush {
                o.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    self.labels[r.target],
                    r.flush_p50_us.map(|x| num(x, 0)).unwrap_or_default(),
                    r.flush_p99_us.map(|x| num(x, 0)).unwrap_or_default(),
                    r.vs_nbdkit.map(|x| num(x[4], 2)).unwrap_or_default(),
                ));
            }
        }
        o.push_str(&fanout_markdown(&self.fanout, &self.jobs, &self.labels));
        o
    }
}

/// The per-target table (empty without rows).
fn fanout_markdown(rows: &[Fanout], jobs: &[&JobDef], labels: &[&str]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let opt = |x: Option<f64>| x.map(|x| num(x, 2)).unwrap_or_default();
    let mut o = String::from(
        "\nPer-target CPU, in CPU s/GiB written (read for randread): vs alone = (cluster − ferryd primary alone) / standbys; \
         marginal = (cluster − the same target with one standby) / (standbys − 1); both per round, same job, then the median:\n\n\
         | job | target | standbys | IOPS | × 1 standby IOPS | cluster CPU s/GiB | primary CPU s/GiB | standby CPU s/GiB mean | standby CPU s/GiB max | per target vs alone | marginal per added target |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            jobs[r.job].label,
            labels[r.target],
            r.standbys,
            num(r.iops, 0),
            opt(r.x_one_iops),
            num(r.cpu_per_gib, 2),
            num(r.primary_cpu_per_gib, 2),
            opt(r.standby_mean),
            opt(r.standby_max),
            opt(r.vs_alone),
            opt(r.marginal),
        ));
    }
    o
}

/// The per-target table for the JSON report.
fn fanout_json(rows: &[Fanout], jobs: &[&JobDef], defs: &[&TargetDef]) -> Value {
    let f = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
    let fo = |x: Option<f64>| x.map_or(Value::Null, f);
    rows.iter()
        .map(|r| {
            json!({
                "job": jobs[r.job].key,
                "target": defs[r.target].key,
                "standbys": r.standbys,
                "iops": f(r.iops),
                "vs_one_standby_iops": fo(r.x_one_iops),
                "cpu_s_per_gib": f(r.cpu_per_gib),
                "primary_cpu_s_per_gib": f(r.primary_cpu_per_gib),
                "standby_cpu_s_per_gib_mean": fo(r.standby_mean),
                "standby_cpu_s_per_gib_max": fo(r.standby_max),
                "per_target_cpu_s_per_gib_vs_alone": fo(r.vs_alone),
                "marginal_cpu_s_per_gib_per_added_target": fo(r.marginal),
            })
        })
        .collect()
}

/// Between jobs, outside the measured window: writes the file system's dirty pages
/// back (`syncfs`) and, with `drop_cache` (all but `--warm`), drops the volumes' pages
/// from the page cache (`POSIX_FADV_DONTNEED`), so every job starts alike. The baselines and ferryd's
/// volumes are written through the page cache: one job's writeback must not land on
/// the next, and its folios must not shape the next job's cost (after 1M sequential
/// writes, ext4 on Linux 6.18 holds large folios, and 4k overwrites into them cost ~5x
/// more CPU in `ext4_block_write_begin`: nbdkit 25k instead of 125k IOPS).
fn settle(dir: &Path, files: &[PathBuf], drop_cache: bool) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: a valid descriptor we own.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("syncfs on the scratch directory");
    }
    for f in files.iter().filter(|_| drop_cache) {
        let file = std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        // SAFETY: a valid descriptor we own; offset 0, length 0 = the whole file.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc))
                .with_context(|| format!("posix_fadvise(DONTNEED) on {}", f.display()));
        }
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages (other work on the machine skews the figures).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "–".into()
    }
}

fn human(bytes: u64) -> String {
    if bytes & ((1 << 30) - 1) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (proleptic Gregorian).
fn utc_date(secs: u64) -> String {
    let rem = secs % 86_400;
    let (y, m, d) = ferry_api::timefmt::civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_795_522_723), "2026-11-24 12:18 UTC");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert!(parse_size("1KiB").is_err());
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("1 PB").is_err());
    }

    #[test]
    fn the_control_runs_right_after_the_target_it_replays() {
        assert_eq!(round_order(3, 0, None, None), [0, 1, 2]);
        assert_eq!(round_order(3, 1, None, None), [1, 2, 0]);
        for round in 0..5 {
            let order = round_order(5, round, Some(2), Some(1));
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1, 2, 3, 4], "round {round}: {order:?}");
            let a = order.iter().position(|&t| t == 1).unwrap();
            assert_eq!(order[a + 1], 2, "round {round}: {order:?}");
        }
        // The rotation still moves the others: round 1 starts with target 1.
        assert_eq!(round_order(5, 1, Some(2), Some(1)), [1, 2, 3, 4, 0]);
        assert_eq!(round_order(5, 4, Some(2), Some(1)), [4, 0, 1, 2, 3]);
    }

    fn def(key: &str) -> &'static TargetDef {
        TARGETS.iter().find(|t| t.key == key).unwrap()
    }

    #[test]
    fn several_standbys_run_only_when_named() {
        let some = pick(
            TARGETS,
            |t| t.key,
            &[
                "ferry-async-x3".into(),
                "ferry-async".into(),
                "ferry-async-x2".into(),
            ],
            "target",
        )
        .unwrap();
        let keys: Vec<&str> = some.iter().map(|t| t.key).collect();
        assert_eq!(keys, ["ferry-async", "ferry-async-x2", "ferry-async-x3"]);
        let standbys: Vec<usize> = some.iter().map(|t| t.kind.standbys()).collect();
        assert_eq!(standbys, [1, 2, 3]);
        assert!(def("ferry-async-x2").kind.only_when_named());
        assert!(def("ferry-async-tmpfs").kind.only_when_named());
        assert!(!def("ferry-async").kind.only_when_named());
        assert!(!def("ferry-sync").kind.only_when_named());
        assert!(!def("ferry-async-x3").kind.is_control());
    }

    #[test]
    fn per_target_references_are_the_same_target_with_fewer_standbys() {
        let keys = [
            "nbdkit",
            "ferry",
            "ferry-wb",
            "ferry-async",
            "ferry-async-wb",
            "ferry-async-x3",
        ];
        let defs: Vec<&TargetDef> = keys.iter().map(|k| def(k)).collect();
        let x3 = 5;
        assert_eq!(reference(&defs, x3, 1), Some(3), "ferry-async");
        assert_eq!(reference(&defs, x3, 0), Some(1), "ferry");
        assert_eq!(reference(&defs, x3, 2), None, "no x2 in this run");
        assert_eq!(
            reference(&defs, 4, 0),
            Some(2),
            "writeback against writeback"
        );
        assert_eq!(reference(&defs, 0, 0), None, "a baseline has none");
        assert_eq!(
            def("ferry-async-x2").kind.with_standbys(1),
            def("ferry-async").kind
        );
    }

    #[test]
    fn per_added_divides_the_difference_per_round() {
        assert_eq!(
            per_added(&[16.0, 15.0], &[2.0, 3.0], 3),
            Some((14.0 / 3.0 + 4.0) / 2.0)
        );
        assert_eq!(per_added(&[10.0], &[6.0], 2), Some(2.0));
        assert_eq!(per_added(&[10.0], &[6.0], 0), None);
        assert_eq!(per_added(&[], &[], 1), None);
        assert_eq!(
            per_added(&[1.0, 2.0], &[1.0], 1),
            None,
            "rounds must pair up"
        );
    }

    #[test]
    fn space_counts_every_standby() {
        let size = 512 << 20;
        let node = size + JOURNAL_BYTES;
        assert_eq!(space_needed(Kind::Nbdkit, size), (size, 0));
        assert_eq!(space_needed(def("ferry").kind, size), (node, 0));
        assert_eq!(
            space_needed(def("ferry-async").kind, size),
            (2 * node + UNDO_BYTES, 0)
        );
        assert_eq!(
            space_needed(def("ferry-async-x3").kind, size),
            (4 * node + 3 * UNDO_BYTES, 0)
        );
        assert_eq!(
            space_needed(def("ferry-async-nopit").kind, size),
            (2 * node, 0)
        );
        assert_eq!(
            space_needed(def("ferry-async-tmpfs").kind, size),
            (node, node + UNDO_BYTES)
        );
        assert_eq!(
            space_needed(Kind::FerryCaptureReads, size),
            (size + node, 0)
        );
    }

    #[test]
    fn the_command_lists_every_standby() {
        let sb = |k: &str| match def(k).kind {
            Kind::Ferry(sb) => sb,
            _ => None,
        };
        // One standby: as before.
        assert_eq!(
            ferry_command(1 << 30, sb("ferry-async-tmpfs"), "writethrough"),
            "ferryctl init --volume vol0:1073741824 --journal-size 2GiB --standby dr1=127.0.0.1:P --mode async + [metrics] + volume.cache = \"writethrough\"; ferryd --config primary.toml (and dr1.toml; dr1/ moved to /dev/shm)"
        );
        let x3 = ferry_command(1 << 30, sb("ferry-async-x3"), "writethrough");
        assert!(
            x3.contains("--standby dr1=127.0.0.1:P --standby dr2=127.0.0.1:P --standby dr3=127.0.0.1:P --mode async"),
            "{x3}"
        );
        assert!(x3.ends_with("(and dr1.toml, dr2.toml, dr3.toml)"), "{x3}");
        assert!(!ferry_command(1 << 30, None, "writeback").contains("--standby"));
    }

    fn sample(iops: f64, cpu_s: f64, standbys: &[f64]) -> Sample {
        Sample {
            fio: FioResult {
                iops,
                bw_bytes: 0.0,
                io_bytes: 1 << 30,
                p50_us: 0.0,
                p99_us: 0.0,
                flush_p50_us: None,
                flush_p99_us: None,
            },
            cpu_s,
            standby_cpu_s: standbys.to_vec(),
            // 100 MiB for the primary, 200, 300 … for the standbys.
            peak_rss: (0..=standbys.len() as u64)
                .map(|i| ((i + 1) * 100) << 20)
                .collect(),
            lag_p99_s: None,
            lag_samples: 0,
            degraded: false,
            reads_per_s: None,
        }
    }

    #[test]
    fn peak_memory_shows_the_primary_and_the_largest_standby() {
        assert_eq!(rss_note(&sample(1.0, 1.0, &[])), "100 MiB");
        assert_eq!(
            rss_note(&sample(1.0, 1.0, &[0.5, 0.5, 0.5])),
            "100 / 400 MiB"
        );
    }

    #[test]
    fn the_per_target_table() {
        let defs: Vec<&TargetDef> = ["nbdkit", "ferry", "ferry-async", "ferry-async-x3"]
            .iter()
            .map(|k| def(k))
            .collect();
        // samples[target][job][round], 1 GiB per sample: CPU seconds are CPU s/GiB.
        let samples = vec![
            vec![vec![sample(9000.0, 1.0, &[]), sample(9000.0, 1.0, &[])]],
            vec![vec![sample(5000.0, 2.0, &[]), sample(5000.0, 3.0, &[])]],
            vec![vec![
                sample(2000.0, 6.0, &[2.0]),
                sample(2000.0, 7.0, &[2.5]),
            ]],
            vec![vec![
                sample(1000.0, 16.0, &[2.0, 2.5, 3.0]),
                sample(1200.0, 15.0, &[2.0, 3.0, 4.0]),
            ]],
        ];
        let rows = fanout(&defs, 1, &samples);
        assert_eq!(rows.iter().map(|r| r.target).collect::<Vec<_>>(), [1, 2, 3]);
        let x3 = &rows[2];
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert_eq!(x3.standbys, 3);
        assert!(close(x3.x_one_iops, 0.55), "{x3:?}");
        assert!(close(Some(x3.cpu_per_gib), 15.5), "{x3:?}");
        assert!(
            close(Some(x3.primary_cpu_per_gib), (8.5 + 6.0) / 2.0),
            "{x3:?}"
        );
        assert!(close(x3.standby_mean, 2.75), "{x3:?}");
        assert!(close(x3.standby_max, 3.5), "{x3:?}");
        assert!(close(x3.vs_alone, (14.0 / 3.0 + 4.0) / 2.0), "{x3:?}");
        assert!(close(x3.marginal, 4.5), "{x3:?}");
        let one = &rows[1];
        assert!(close(one.vs_alone, 4.0), "{one:?}");
        assert_eq!((one.marginal, one.x_one_iops), (None, None));
        assert_eq!((rows[0].vs_alone, rows[0].standby_mean), (None, None));

        let jobs = [&JOBS[1]];
        let labels: Vec<&str> = defs.iter().map(|d| d.label).collect();
        let md = fanout_markdown(&rows, &jobs, &labels);
        assert!(md.contains("| job | target | standbys | IOPS |"), "{md}");
        assert!(
            md.contains("| 4k randwrite QD32 | ferryd + 3 async standbys | 3 | 1100 | 0.55 | 15.50 | 7.25 | 2.75 | 3.50 | 4.33 | 4.50 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| 4k randwrite QD32 | ferryd primary | 0 | 5000 |  | 2.50 | 2.50 |  |  |  |  |"
            ),
            "{md}"
        );
        let json = fanout_json(&rows, &jobs, &defs);
        assert_eq!(json[2]["target"], "ferry-async-x3");
        assert_eq!(json[2]["marginal_cpu_s_per_gib_per_added_target"], 4.5);

        // Without a target of several standbys there is no such table.
        assert!(fanout(&defs[..3], 1, &samples[..3]).is_empty());
    }

    #[test]
    fn the_progress_line_shows_each_standby() {
        assert_eq!(standby_cpu_note(&sample(1.0, 3.0, &[])), "");
        assert_eq!(
            standby_cpu_note(&sample(1.0, 3.0, &[1.5])),
            " (standby 1.50)"
        );
        assert_eq!(
            standby_cpu_note(&sample(1.0, 9.0, &[1.0, 2.0, 3.0])),
            " (standbys 6.00: 1.00 2.00 3.00)"
        );
    }

    #[test]
    fn picks() {
        let all = pick(JOBS, |j| j.key, &[], "job").unwrap();
        assert_eq!(all.len(), JOBS.len());
        let some = pick(
            TARGETS,
            |t| t.key,
            &["ferry-sync".into(), "nbdkit".into(), "nbdkit".into()],
            "target",
        )
        .unwrap();
        assert_eq!(
            some.iter().map(|t| t.key).collect::<Vec<_>>(),
            ["nbdkit", "ferry-sync"]
        );
        let e = pick(TARGETS, |t| t.key, &["nope".into()], "target").unwrap_err();
        assert!(e.to_string().contains("ferry-async"), "{e}");
    }
}
