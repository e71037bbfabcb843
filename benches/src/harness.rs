//! Process, port, fio and ferry-cluster plumbing for the end-to-end harness
//! (`src/bin/e2e.rs`): everything that spawns or talks to another process.
//!
//! Every spawned server is owned by a [`Proc`] guard that stops it by its own PID
//! (SIGTERM, then SIGKILL after a bounded wait) when dropped — on success, on error
//! and after Ctrl-C (see [`install_interrupt_handler`]). Servers run in their own
//! process group (a terminal's Ctrl-C reaches only the harness and fio, and the
//! harness then stops the servers in order) and get SIGTERM if the harness dies
//! without running its destructors (`PR_SET_PDEATHSIG`).
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

// ---------------------------------------------------------------------------------
// Interrupts

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT / SIGTERM / SIGHUP set a flag instead of killing the harness, so every wait
/// below returns an error and the guards stop the servers on the way out.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error if the harness was interrupted.
pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` unless interrupted.
fn nap(d: Duration) -> anyhow::Result<()> {
    check_interrupt()?;
    std::thread::sleep(d);
    check_interrupt()
}

// ---------------------------------------------------------------------------------
// Processes

/// Runs `cmd` in a process group of its own (a terminal's Ctrl-C reaches only the
/// harness, which then stops it in order) and has the kernel send it SIGTERM should
/// the harness die without cleaning up (`PR_SET_PDEATHSIG`; spawn from the main
/// thread: the signal follows the spawning thread's exit).
fn own_group_dies_with_parent(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A spawned server, stopped by its own PID when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd` in its own process group with stdout and stderr appended to `log`
    /// (`None`: inherited), and SIGTERM for it should the harness die.
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&Path>) -> anyhow::Result<Proc> {
        if let Some(log) = log {
            let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        cmd.stdin(Stdio::null());
        own_group_dies_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.map(Path::to_path_buf),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the process, its exit status and the end of its log if it has
    /// exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(self.died(st)),
            Err(e) => Err(anyhow!("{}: waitpid: {e}", self.name)),
        }
    }

    fn died(&self, st: ExitStatus) -> anyhow::Error {
        let tail = self.log.as_deref().map(log_tail).unwrap_or_default();
        anyhow!("{} exited unexpectedly ({st}){tail}", self.name)
    }

    /// The end of this process's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.log.as_deref().map(log_tail).unwrap_or_default()
    }
}

fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  last lines of {}:\n  {tail}", path.display())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by its PID; it is not reaped yet, so the PID
        // cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        // ferryd drains and checkpoints on SIGTERM (fsyncs the volumes): bounded.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) | Err(_) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {}) still running 30 s after SIGTERM: SIGKILL",
            self.name,
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process (all its threads, live and exited), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces: fields 3.. follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no ')' in {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 14 is utime, 15 stime; `fields[0]` is field 3.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .with_context(|| format!("{path}: only {} fields", fields.len() + 2))?
            .parse::<u64>()
            .map(|v| v as f64)
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// Restarts `pid`'s peak resident memory count (`VmHWM`) from its current resident
/// size, so [`peak_rss_bytes`] then gives the peak of one job, not of the process's
/// life (writing 5 to `/proc/PID/clear_refs`, Linux ≥ 4.0).
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing {path}"))
}

/// `pid`'s peak resident memory (`VmHWM` of `/proc/PID/status`) in bytes.
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_hwm(&text).with_context(|| format!("no VmHWM in {path}"))
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let v = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: u64 = v.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes `pid` has had read from storage (`read_bytes` of `/proc/PID/io`: page-cache
/// misses and direct reads, not cache hits).
pub fn storage_read_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no read_bytes in {path}"))
}

/// Summed [`cpu_seconds`] of several processes.
pub fn cpu_seconds_all(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

// ---------------------------------------------------------------------------------
// Ports and tools

/// A TCP port the OS considers free on 127.0.0.1 (bound to port 0, then released).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first of `n` consecutive TCP ports the OS considers free on 127.0.0.1 (all bound
/// at once, then released): `ferryctl init` gives each standby on the host the port
/// after the previous node's, for NBD and for metrics.
pub fn free_tcp_ports(n: usize) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0")?;
        let p = first.local_addr()?.port();
        let rest: Option<Vec<TcpListener>> = (1..n)
            .map(|i| {
                let port = p.checked_add(u16::try_from(i).ok()?)?;
                TcpListener::bind(("127.0.0.1", port)).ok()
            })
            .collect();
        if rest.is_some() {
            return Ok(p);
        }
    }
    bail!("no {n} consecutive free TCP ports on 127.0.0.1 in 100 tries")
}

/// A UDP port the OS considers free on 127.0.0.1 (QUIC).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`, failing early if
/// one of `procs` exits.
pub fn wait_port(port: u16, timeout: Duration, procs: &mut [&mut Proc]) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            let logs: String = procs.iter().map(|p| p.log_tail()).collect();
            bail!(
                "nothing listens on 127.0.0.1:{port} after {} s{logs}",
                timeout.as_secs()
            );
        }
        nap(Duration::from_millis(20))?;
    }
}

/// `name` found in `$PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// fio with its nbd engine; installs fio with apt-get when it is not on PATH.
pub fn ensure_fio() -> anyhow::Result<()> {
    if find_on_path("fio").is_none() {
        eprintln!("fio is not on PATH: running `apt-get install -y fio`");
        let st = Command::new("apt-get")
            .args(["install", "-y", "fio"])
            .status();
        match st {
            Ok(s) if s.success() && find_on_path("fio").is_some() => {
                eprintln!("installed fio");
            }
            Ok(s) => bail!(
                "fio is missing and `apt-get install -y fio` failed ({s}); install fio (with its nbd engine) and rerun"
            ),
            Err(e) => bail!(
                "fio is missing and apt-get could not run ({e}); install fio (with its nbd engine) and rerun"
            ),
        }
    }
    let out = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .context("running fio --enghelp=nbd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("uri") {
        bail!(
            "this fio has no nbd engine (`fio --enghelp=nbd`: {}{}); install a fio built with libnbd",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The first line of `prog --version`, for the report.
pub fn tool_version(prog: &str) -> String {
    Command::new(prog)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------------
// ferry binaries

/// The workspace root (this crate's parent directory).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo target directory to take ferryd and ferryctl from: `$CARGO_TARGET_DIR`,
/// else the one this binary was built into (`<dir>/release/e2e`), else
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(release) = exe.parent() {
            if release.file_name().is_some_and(|n| n == "release") {
                if let Some(t) = release.parent() {
                    return t.to_path_buf();
                }
            }
        }
    }
    workspace_dir().join("target")
}

/// Paths of the release `ferryd` and `ferryctl`.
pub struct FerryBins {
    pub ferryd: PathBuf,
    pub ferryctl: PathBuf,
}

/// Builds (unless `build` is false: then they must exist) and locates the release
/// `ferryd` and `ferryctl` of this workspace. Building first means the harness
/// measures the current sources; cargo makes it a no-op when nothing changed.
pub fn ferry_bins(build: bool) -> anyhow::Result<FerryBins> {
    let target = target_dir();
    if build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "building ferryd and ferryctl: cargo build --release -p ferryd -p ferryctl (target dir {})",
            target.display()
        );
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "ferryd", "-p", "ferryctl"])
            .current_dir(workspace_dir())
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .context("running cargo build (pass --no-build to use existing binaries)")?;
        if !st.success() {
            bail!("cargo build --release -p ferryd -p ferryctl failed ({st}); pass --no-build to use the binaries already in {}/release", target.display());
        }
    }
    let bins = FerryBins {
        ferryd: target.join("release/ferryd"),
        ferryctl: target.join("release/ferryctl"),
    };
    for b in [&bins.ferryd, &bins.ferryctl] {
        if !b.is_file() {
            bail!(
                "{} missing: run `cargo build --release -p ferryd -p ferryctl` (with the same CARGO_TARGET_DIR) or drop --no-build",
                b.display()
            );
        }
    }
    Ok(bins)
}

// ---------------------------------------------------------------------------------
// fio

/// One fio job against an NBD URI.
#[derive(Debug, Clone)]
pub struct FioSpec {
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    /// `--fsync=1`: a flush after every write (the nbd engine rejects --fdatasync).
    pub fsync: bool,
    /// `Some(secs)`: time-based; `None`: one pass over the volume.
    pub runtime: Option<u64>,
    pub size: u64,
}

/// What one fio run measured (the write side for write jobs, else the read side).
#[derive(Debug, Clone, Copy)]
pub struct FioResult {
    pub iops: f64,
    pub bw_bytes: f64,
    pub io_bytes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Flush latency percentiles (jobs with `fsync`).
    pub flush_p50_us: Option<f64>,
    pub flush_p99_us: Option<f64>,
}

impl FioSpec {
    pub fn is_write(&self) -> bool {
        self.rw.contains("write")
    }

    fn args(&self, uri: &str) -> Vec<String> {
        let mut a = vec![
            "--name=e2e".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            format!("--size={}", self.size),
            "--output-format=json".into(),
        ];
        if let Some(secs) = self.runtime {
            a.push("--time_based".into());
            a.push(format!("--runtime={secs}"));
        }
        if self.fsync {
            a.push("--fsync=1".into());
        }
        a
    }

    /// Runs fio to completion (bounded by `timeout`; killed on timeout or Ctrl-C).
    pub fn run(&self, uri: &str, timeout: Duration) -> anyhow::Result<FioResult> {
        let args = self.args(uri);
        let mut cmd = Command::new("fio");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        own_group_dies_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("starting fio")?;
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
        let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().context("waiting for fio")? {
                break st;
            }
            if interrupted() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                check_interrupt()?;
                bail!(
                    "fio did not finish within {} s: fio {}",
                    timeout.as_secs(),
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = out
            .join()
            .map_err(|_| anyhow!("fio stdout reader panicked"))?;
        let stderr = err
            .join()
            .map_err(|_| anyhow!("fio stderr reader panicked"))?;
        if !status.success() {
            // fio's messages; not the JSON document it may still print.
            let out = String::from_utf8_lossy(&stdout);
            let messages = out.split('{').next().unwrap_or_default().trim();
            bail!(
                "fio failed ({status}): fio {}\n{}\n{messages}",
                args.join(" "),
                String::from_utf8_lossy(&stderr).trim(),
            );
        }
        let v = crate::fio_json(&stdout).with_context(|| format!("fio {}", args.join(" ")))?;
        parse_fio(&v, self.is_write(), self.fsync)
            .with_context(|| format!("reading the JSON output of fio {}", args.join(" ")))
    }
}

/// Extracts a [`FioResult`] from fio's JSON document.
pub fn parse_fio(v: &serde_json::Value, write: bool, fsync: bool) -> anyhow::Result<FioResult> {
    let job = v.get("jobs").and_then(|j| j.get(0)).context("no jobs[0]")?;
    let err = job.get("error").and_then(|e| e.as_i64()).unwrap_or(0);
    if err != 0 {
        bail!("fio job error {err}");
    }
    let side = if write { "write" } else { "read" };
    let s = job
        .get(side)
        .with_context(|| format!("no jobs[0].{side}"))?;
    let num = |key: &str| -> anyhow::Result<f64> {
        s.get(key)
            .and_then(|x| x.as_f64())
            .with_context(|| format!("no numeric jobs[0].{side}.{key}"))
    };
    let pct = |lat: &serde_json::Value, what: &str, p: &str| -> anyhow::Result<f64> {
        lat.get("percentile")
            .and_then(|x| x.get(p))
            .and_then(|x| x.as_f64())
            .map(|ns| ns / 1000.0)
            .with_context(|| format!("no {what}.percentile.{p}"))
    };
    let io_bytes = num("io_bytes")? as u64;
    if io_bytes == 0 {
        bail!("fio moved no data");
    }
    let clat = s
        .get("clat_ns")
        .with_context(|| format!("no jobs[0].{side}.clat_ns"))?;
    let (flush_p50_us, flush_p99_us) = if fsync {
        let lat = job
            .get("sync")
            .and_then(|x| x.get("lat_ns"))
            .context("no jobs[0].sync.lat_ns (job ran with --fsync=1)")?;
        (
            Some(pct(lat, "sync.lat_ns", "50.000000")?),
            Some(pct(lat, "sync.lat_ns", "99.000000")?),
        )
    } else {
        (None, None)
    };
    Ok(FioResult {
        iops: num("iops")?,
        bw_bytes: num("bw_bytes")?,
        io_bytes,
        p50_us: pct(clat, "clat_ns", "50.000000")?,
        p99_us: pct(clat, "clat_ns", "99.000000")?,
        flush_p50_us,
        flush_p99_us,
    })
}

// ---------------------------------------------------------------------------------
// Prometheus endpoint

/// One scrape of `/metrics`: `name{labels}` → value.
#[derive(Debug, Default)]
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut m = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if let Some((k, v)) = line.rsplit_once(' ') {
                if let Ok(v) = v.parse::<f64>() {
                    m.insert(k.to_string(), v);
                }
            }
        }
        Scrape(m)
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).copied()
    }

    pub fn need(&self, key: &str) -> anyhow::Result<f64> {
        self.get(key)
            .with_context(|| format!("metric {key} missing from /metrics"))
    }

    /// Keys (with labels) of the series named `name`.
    pub fn keys_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .keys()
            .filter(move |k| k.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
            .map(String::as_str)
    }
}

/// The value of label `name` in a series key `metric{a="x",b="y"}` (no escapes).
pub fn label<'a>(key: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("{name}=\"");
    let start = key.find(&pat)? + pat.len();
    let len = key[start..].find('"')?;
    Some(&key[start..start + len])
}

/// GET `/metrics` from 127.0.0.1:`port` (bounded: 2 s).
pub fn scrape(port: u16) -> anyhow::Result<Scrape> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)
        .with_context(|| format!("connecting to the metrics endpoint 127.0.0.1:{port}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("reading 127.0.0.1:{port}/metrics"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("127.0.0.1:{port}/metrics: no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "127.0.0.1:{port}/metrics: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(Scrape::parse(body))
}

// ---------------------------------------------------------------------------------
// ferry clusters

/// A running ferry cluster on loopback: the primary and its standbys `dr1`..`drN` (none:
/// the primary alone), created with `ferryctl init` (plus a `[metrics]` section on each
/// node).
pub struct FerryCluster {
    /// Primary first: dropped (stopped) before the standbys.
    procs: Vec<Proc>,
    /// The standbys' node names, in the order of `procs[1..]`.
    standbys: Vec<String>,
    pub nbd_port: u16,
    pub metrics_port: u16,
    pub engine: String,
}

/// The node names of `n` standbys: `dr1`..`drN`.
pub fn standby_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("dr{i}")).collect()
}

/// The series key of `metric` for replication target `name`, with `more` labels after
/// the target's (each starting with a comma).
fn target_key(metric: &str, name: &str, more: &str) -> String {
    format!("{metric}{{target=\"{name}\"{more}}}")
}

/// The largest of the series `keys` present in `m` (the slowest target's figure).
fn slowest(m: &Scrape, keys: &[String]) -> Option<f64> {
    keys.iter().filter_map(|k| m.get(k)).reduce(f64::max)
}

/// `ferryctl init`'s arguments for a primary on UDP port `primary` and the standbys
/// `(name, UDP port)` in `mode`: `async` or `sync`, either with `:gm` for the SM suites
/// or `:enc` for encryption at rest.
fn standby_args(mode: &str, primary: u16, standbys: &[(String, u16)]) -> Vec<String> {
    // `MODE:gm`: the cluster speaks the national-crypto suites (SM2 certificates,
    // TLS_SM4_GCM_SM3 over QUIC), to compare with the standard ones in one run.
    // `MODE:enc`: standard suites, journals and the undo log encrypted at rest.
    let (m, crypto) = mode.split_once(':').unwrap_or((mode, "standard"));
    let (crypto, encrypt) = match crypto {
        "enc" => ("standard", true),
        c => (c, false),
    };
    let mut a: Vec<String> = encrypt
        .then(|| "--encrypt".to_string())
        .into_iter()
        .collect();
    a.extend(["--primary".to_string(), format!("127.0.0.1:{primary}")]);
    for (name, port) in standbys {
        a.extend(["--standby".to_string(), format!("{name}=127.0.0.1:{port}")]);
    }
    a.extend(["--mode", m, "--crypto", crypto].map(String::from));
    a
}

/// `ferryctl init` of a primary and the standbys `names` in `mode` (see
/// [`standby_args`]; `None`: the primary alone) in `dir`.
fn ferryctl_init(
    bins: &FerryBins,
    dir: &Path,
    (volume_size, journal_size): (u64, &str),
    (mode, names): (Option<&str>, &[String]),
    (nbd_port, metrics_port): (u16, u16),
) -> anyhow::Result<()> {
    let mut init = Command::new(&bins.ferryctl);
    init.args(["init", "--dir"])
        .arg(dir)
        .arg("--volume")
        .arg(format!("vol0:{volume_size}"))
        .arg("--nbd")
        .arg(format!("127.0.0.1:{nbd_port}"))
        .args(["--journal-size", journal_size])
        // The Prometheus endpoint, as the README shows: lag sampling through it does
        // not append an audit line per sample as control requests do. The primary
        // gets this port, each standby the next one.
        .args(["--metrics-port", &metrics_port.to_string()]);
    if let Some(m) = mode {
        let standbys = names
            .iter()
            .map(|n| Ok((n.clone(), free_udp_port()?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        init.args(standby_args(m, free_udp_port()?, &standbys));
    }
    let out = init.output().context("running ferryctl init")?;
    if !out.status.success() {
        bail!(
            "ferryctl init failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// How a cluster is set up beyond `ferryctl init`'s defaults.
#[derive(Debug, Clone, Copy)]
pub struct ClusterSetup<'a> {
    /// None: the primary alone; else the standbys' mode (see `standby_args`).
    pub mode: Option<&'a str>,
    /// How many standbys (`dr1`..`drN`) run in `mode`: 0 without a mode, else ≥ 1.
    pub standbys: usize,
    /// false turns the standbys' undo logs off (`[pit] enabled = false`).
    pub pit: bool,
    /// Move each standby's data directory there (replaced by a symlink, so its
    /// configuration stays as `ferryctl init` wrote it), e.g. onto another file system.
    pub standby_storage: Option<&'a Path>,
    /// The volume's `cache` mode on every node.
    pub cache: &'a str,
    /// The primary paces writes by its targets' lag (`max_lag_seconds`).
    pub max_lag_seconds: Option<f64>,
}

impl ClusterSetup<'_> {
    /// The standbys' node names; an error when `mode` and `standbys` disagree.
    fn standby_names(&self) -> anyhow::Result<Vec<String>> {
        match (self.mode, self.standbys) {
            (None, 0) => Ok(Vec::new()),
            (Some(_), n) if n > 0 => Ok(standby_names(n)),
            (mode, n) => bail!("{n} standbys with mode {mode:?}: a mode needs at least one standby and standbys need a mode"),
        }
    }
}

/// Sets the volume's cache mode in a node's config (`ferryctl init` leaves the default).
fn set_cache(cfg: &Path, cache: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(cfg).with_context(|| format!("reading {}", cfg.display()))?;
    if !text.contains("[[volume]]\n") {
        bail!("{} has no [[volume]] table", cfg.display());
    }
    let text = text.replace(
        "[[volume]]\n",
        &format!("[[volume]]\ncache = \"{cache}\"\n"),
    );
    std::fs::write(cfg, text).with_context(|| format!("writing {}", cfg.display()))
}

/// What `ferryctl init` does not set: the cache mode, PIT off, storage elsewhere,
/// pacing; on the primary and on each standby of `names`.
fn configure(dir: &Path, names: &[String], setup: ClusterSetup) -> anyhow::Result<()> {
    set_cache(&dir.join("primary.toml"), setup.cache)?;
    for name in names {
        configure_standby(dir, name, &setup)?;
    }
    match setup.max_lag_seconds.filter(|_| !names.is_empty()) {
        Some(secs) => set_max_lag(&dir.join("primary.toml"), secs),
        None => Ok(()),
    }
}

/// A standby's cache mode, PIT off, storage elsewhere (as `setup` says).
fn configure_standby(dir: &Path, name: &str, setup: &ClusterSetup) -> anyhow::Result<()> {
    let cfg = dir.join(format!("{name}.toml"));
    set_cache(&cfg, setup.cache)?;
    if !setup.pit {
        let section = "[pit]\nenabled = false\n";
        std::fs::OpenOptions::new()
            .append(true)
            .open(&cfg)
            .and_then(|mut f| write!(f, "\n{section}"))
            .with_context(|| format!("adding {section:?} to {}", cfg.display()))?;
    }
    match setup.standby_storage {
        Some(to) => move_to(&dir.join(name), to),
        None => Ok(()),
    }
}

/// `max_lag_seconds` on every replication target of the primary's config at `path`:
/// inside the targets' tables, which text appended at the end would not reach.
fn set_max_lag(path: &Path, secs: f64) -> anyhow::Result<()> {
    let mut cfg = ferry_api::config::Config::load(path)
        .with_context(|| format!("reading {}", path.display()))?;
    for t in cfg
        .replication
        .iter_mut()
        .flat_map(|r| r.targets.iter_mut())
    {
        t.max_lag_seconds = Some(secs);
    }
    std::fs::write(path, cfg.to_toml()).with_context(|| format!("writing {}", path.display()))
}

fn spawn_ferryd(bins: &FerryBins, dir: &Path, node: &str) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(&bins.ferryd);
    cmd.arg("--config")
        .arg(dir.join(format!("{node}.toml")))
        .env(
            "FERRY_LOG",
            std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into()),
        );
    Proc::spawn(
        &format!("ferryd {node} ({})", dir.display()),
        cmd,
        Some(&dir.join(format!("{node}.log"))),
    )
}

impl FerryCluster {
    /// `ferryctl init` in `dir` with a volume and journal of these sizes, set up as
    /// `setup` says, and start.
    pub fn start(
        bins: &FerryBins,
        dir: &Path,
        sizes: (u64, &str),
        setup: ClusterSetup,
    ) -> anyhow::Result<FerryCluster> {
        let names = setup.standby_names()?;
        // `ferryctl init` gives each standby on this host the ports after the primary's.
        let nbd_port = free_tcp_ports(names.len() + 1)?;
        let metrics_port = free_tcp_ports(names.len() + 1)?;
        ferryctl_init(
            bins,
            dir,
            sizes,
            (setup.mode, &names),
            (nbd_port, metrics_port),
        )?;
        configure(dir, &names, setup)?;
        // The standbys first, so the primary's first dial finds them.
        let mut procs = names
            .iter()
            .map(|n| spawn_ferryd(bins, dir, n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        procs.insert(0, spawn_ferryd(bins, dir, "primary")?);
        {
            let mut refs: Vec<&mut Proc> = procs.iter_mut().collect();
            wait_port(nbd_port, Duration::from_secs(60), &mut refs)?;
            wait_port(metrics_port, Duration::from_secs(10), &mut refs)?;
        }
        let mut c = FerryCluster {
            procs,
            standbys: names,
            nbd_port,
            metrics_port,
            engine: String::new(),
        };
        c.engine = c.journal_engine()?;
        // Measure replication, not the first connections.
        let streaming = c.target_keys("ferry_replication_target_state", ",state=\"streaming\"");
        c.wait_until(Duration::from_secs(30), "every standby to connect", |m| {
            Ok(streaming.iter().all(|k| m.get(k) == Some(1.0)))
        })?;
        Ok(c)
    }

    /// The series keys of `metric` for every standby (see [`target_key`]).
    fn target_keys(&self, metric: &str, more: &str) -> Vec<String> {
        self.standbys
            .iter()
            .map(|n| target_key(metric, n, more))
            .collect()
    }

    /// The journal engine ferryd reports, with the reason if it fell back.
    fn journal_engine(&self) -> anyhow::Result<String> {
        let m = self.scrape()?;
        let info = m
            .keys_of("ferry_journal_engine_info")
            .next()
            .unwrap_or_default()
            .to_string();
        let mut engine = label(&info, "engine").unwrap_or("unknown").to_string();
        if let Some(why) = label(&info, "fallback_reason").filter(|r| !r.is_empty()) {
            eprintln!("WARNING: ferryd's journal fell back to {engine}: {why}");
            engine = format!("{engine} (fallback: {why})");
        }
        Ok(engine)
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.nbd_port)
    }

    /// PIDs of every ferryd process of the cluster.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// The cluster has at least one standby.
    pub fn has_standby(&self) -> bool {
        !self.standbys.is_empty()
    }

    /// The standbys' node names (`dr1`..`drN`).
    pub fn standbys(&self) -> &[String] {
        &self.standbys
    }

    /// PIDs of the standbys' ferryd, in the order of [`standbys`](Self::standbys).
    pub fn standby_pids(&self) -> Vec<u32> {
        self.procs.iter().skip(1).map(Proc::pid).collect()
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    pub fn scrape(&self) -> anyhow::Result<Scrape> {
        scrape(self.metrics_port)
    }

    fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Scrape) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let m = self.scrape()?;
            if done(&m)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = self.procs.iter().map(Proc::log_tail).collect();
                bail!(
                    "timed out after {} s waiting for {what}{logs}",
                    timeout.as_secs()
                );
            }
            nap(Duration::from_millis(20))?;
        }
    }

    /// Waits until the primary has applied everything it journaled and every standby
    /// has applied it too, so no job pays for the previous one's backlog.
    pub fn drain(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let replicas = self.target_keys("ferry_replication_applied_seq", "");
        self.wait_until(timeout, "replication and apply to catch up", |m| {
            let last = m.need("ferry_journal_last_seq")?;
            for k in &replicas {
                if m.need(k)? < last {
                    return Ok(false);
                }
            }
            Ok(m.need("ferry_apply_applied_seq")? >= last)
        })
    }
}

/// Moves directory `from` into `to` (another file system: `cp -a` keeps sparse files
/// sparse and modes as they are) and leaves a symlink at `from`.
fn move_to(from: &Path, to: &Path) -> anyhow::Result<()> {
    let name = from
        .file_name()
        .with_context(|| format!("{} has no name", from.display()))?;
    let dest = to.join(name);
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(&dest)
        .output()
        .context("running cp")?;
    if !out.status.success() {
        bail!(
            "cp -a {} {} failed ({}): {}",
            from.display(),
            dest.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::remove_dir_all(from).with_context(|| format!("removing {}", from.display()))?;
    std::os::unix::fs::symlink(&dest, from)
        .with_context(|| format!("linking {} to {}", from.display(), dest.display()))
}

/// Replication-lag samples taken while a job runs.
#[derive(Debug, Default, Clone)]
pub struct LagSamples {
    /// Per sample, the slowest standby's lag.
    pub seconds: Vec<f64>,
    /// A sync target was degraded to async in at least one sample.
    pub degraded: bool,
    pub failed_scrapes: usize,
}

impl FerryCluster {
    /// Samples `ferry_replication_lag_seconds` of every standby every `every` while `f`
    /// runs, keeping the slowest standby's per sample.
    pub fn with_lag_samples<T>(
        &self,
        every: Duration,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, LagSamples)> {
        let stop = Arc::new(AtomicBool::new(false));
        let lag = self.target_keys("ferry_replication_lag_seconds", "");
        let degraded = self.target_keys("ferry_replication_target_mode", ",mode=\"degraded\"");
        let port = self.metrics_port;
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = LagSamples::default();
                while !stop.load(Ordering::Relaxed) {
                    match scrape(port) {
                        Ok(m) => {
                            s.seconds.extend(slowest(&m, &lag));
                            s.degraded |= degraded.iter().any(|k| m.get(k) == Some(1.0));
                        }
                        Err(_) => s.failed_scrapes += 1,
                    }
                    std::thread::sleep(every);
                }
                s
            })
        };
        let r = f();
        stop.store(true, Ordering::Relaxed);
        let s = sampler
            .join()
            .map_err(|_| anyhow!("lag sampler panicked"))?;
        Ok((r?, s))
    }
}

// ---------------------------------------------------------------------------------
// Statistics

/// The median (mean of the two middle values for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `p`-th percentile (nearest rank), `None` when empty.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache line lands in the `[[volume]]` table of a config as ferryd reads it.
    #[test]
    fn set_cache_writes_the_volumes_cache_mode() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("primary.toml");
        std::fs::write(
            &cfg,
            "[node]\nname = \"p\"\n\n[[volume]]\nname = \"vol0\"\npath = \"/v\"\nsize = \"4MiB\"\n",
        )
        .unwrap();
        set_cache(&cfg, "writeback").unwrap();
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(
            text.contains("[[volume]]\ncache = \"writeback\"\nname = \"vol0\"\n"),
            "{text}"
        );
        std::fs::write(&cfg, "[node]\n").unwrap();
        assert!(set_cache(&cfg, "writeback").is_err(), "no volume table");
    }

    #[test]
    fn standbys_are_named_dr1_to_drn_and_keyed_by_target() {
        assert_eq!(standby_names(0), Vec::<String>::new());
        assert_eq!(standby_names(3), ["dr1", "dr2", "dr3"]);
        assert_eq!(
            target_key(
                "ferry_replication_target_state",
                "dr2",
                ",state=\"streaming\""
            ),
            "ferry_replication_target_state{target=\"dr2\",state=\"streaming\"}"
        );
        let m = Scrape::parse(
            "ferry_replication_lag_seconds{target=\"dr1\"} 0.5\nferry_replication_lag_seconds{target=\"dr2\"} 2.5\n",
        );
        let keys = |names: &[&str]| -> Vec<String> {
            names
                .iter()
                .map(|n| target_key("ferry_replication_lag_seconds", n, ""))
                .collect()
        };
        assert_eq!(slowest(&m, &keys(&["dr1", "dr2", "dr3"])), Some(2.5));
        assert_eq!(slowest(&m, &keys(&["dr1"])), Some(0.5));
        assert_eq!(slowest(&m, &keys(&["dr3"])), None, "no series, no sample");
    }

    #[test]
    fn init_arguments_name_every_standby() {
        let sb = |n: &str, p: u16| (n.to_string(), p);
        assert_eq!(
            standby_args("async", 7000, &[sb("dr1", 7001), sb("dr2", 7002)]),
            [
                "--primary",
                "127.0.0.1:7000",
                "--standby",
                "dr1=127.0.0.1:7001",
                "--standby",
                "dr2=127.0.0.1:7002",
                "--mode",
                "async",
                "--crypto",
                "standard"
            ]
        );
        let gm = standby_args("sync:gm", 1, &[sb("dr1", 2)]);
        assert_eq!(gm[4..], ["--mode", "sync", "--crypto", "gm"]);
        let enc = standby_args("async:enc", 1, &[sb("dr1", 2)]);
        assert_eq!(enc[0], "--encrypt");
        assert_eq!(enc[5..], ["--mode", "async", "--crypto", "standard"]);
    }

    #[test]
    fn a_setups_mode_and_standby_count_agree() {
        let setup = |mode, standbys| ClusterSetup {
            mode,
            standbys,
            pit: true,
            standby_storage: None,
            cache: "writethrough",
            max_lag_seconds: None,
        };
        assert!(setup(None, 0).standby_names().unwrap().is_empty());
        assert_eq!(
            setup(Some("async"), 2).standby_names().unwrap(),
            ["dr1", "dr2"]
        );
        assert!(setup(Some("async"), 0).standby_names().is_err());
        assert!(setup(None, 1).standby_names().is_err());
    }

    /// Every standby gets the cache mode, PIT off and its storage moved.
    #[test]
    fn configure_sets_up_every_standby() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let names = standby_names(2);
        for node in ["primary", "dr1", "dr2"] {
            std::fs::write(
                dir.path().join(format!("{node}.toml")),
                "[[volume]]\nname = \"vol0\"\n",
            )
            .unwrap();
            std::fs::create_dir(dir.path().join(node)).unwrap();
        }
        let setup = ClusterSetup {
            mode: Some("async"),
            standbys: 2,
            pit: false,
            standby_storage: Some(elsewhere.path()),
            cache: "writeback",
            max_lag_seconds: None,
        };
        configure(dir.path(), &names, setup).unwrap();
        let read =
            |node: &str| std::fs::read_to_string(dir.path().join(format!("{node}.toml"))).unwrap();
        assert!(read("primary").contains("cache = \"writeback\""));
        assert!(
            !read("primary").contains("[pit]"),
            "the primary keeps PIT as is"
        );
        assert!(!std::fs::symlink_metadata(dir.path().join("primary"))
            .unwrap()
            .is_symlink());
        for n in &names {
            let text = read(n);
            assert!(text.contains("cache = \"writeback\""), "{n}: {text}");
            assert!(text.contains("[pit]\nenabled = false\n"), "{n}: {text}");
            assert!(
                std::fs::symlink_metadata(dir.path().join(n))
                    .unwrap()
                    .is_symlink(),
                "{n}"
            );
            assert!(elsewhere.path().join(n).is_dir(), "{n}");
        }
    }

    #[test]
    fn a_run_of_free_ports() {
        let p = free_tcp_ports(3).unwrap();
        assert!(p.checked_add(2).is_some(), "{p}");
        assert!(free_tcp_ports(1).is_ok());
    }

    #[test]
    fn stats() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert!(median(vec![]).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn scrape_parse() {
        let s = Scrape::parse(
            "# HELP x\nferry_journal_last_seq 12\nferry_replication_lag_seconds{target=\"dr1\"} 0.5\n",
        );
        assert_eq!(s.get("ferry_journal_last_seq"), Some(12.0));
        assert_eq!(
            s.get("ferry_replication_lag_seconds{target=\"dr1\"}"),
            Some(0.5)
        );
        assert_eq!(s.keys_of("ferry_replication_lag_seconds").count(), 1);
        assert_eq!(s.keys_of("ferry_replication_lag").count(), 0);
        let k = "ferry_journal_engine_info{engine=\"io_uring\",fallback_reason=\"\"}";
        assert_eq!(label(k, "engine"), Some("io_uring"));
        assert_eq!(label(k, "fallback_reason"), Some(""));
        assert_eq!(label(k, "nope"), None);
    }

    #[test]
    fn fio_parse_errors_have_context() {
        let v: serde_json::Value =
            serde_json::json!({"jobs": [{"error": 0, "write": {"iops": 1.0}}]});
        let e = parse_fio(&v, true, false).unwrap_err().to_string();
        assert!(e.contains("io_bytes"), "{e}");
        let v = serde_json::json!({"jobs": []});
        assert!(parse_fio(&v, true, false).is_err());
        let v = serde_json::json!({"jobs": [{"error": 0, "read": {
            "iops": 10.0, "bw_bytes": 40960.0, "io_bytes": 40960,
            "clat_ns": {"percentile": {"50.000000": 1000, "99.000000": 5000}}}}]});
        let r = parse_fio(&v, false, false).unwrap();
        assert_eq!((r.p50_us, r.p99_us, r.io_bytes), (1.0, 5.0, 40960));
        assert!(
            parse_fio(&v, false, true).is_err(),
            "fsync job without sync latencies"
        );
    }

    #[test]
    fn peak_rss_is_read_from_vm_hwm_in_kib() {
        let status = "Name:\tferryd\nVmPeak:\t 2000 kB\nVmHWM:\t  386500 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(386_500 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t12 MB\n"), None, "an unknown unit");
        // This process's own peak: a live figure, at least a page.
        let own = peak_rss_bytes(std::process::id()).unwrap();
        assert!(own >= 4096, "{own}");
        // (Not compared with `own` after the reset: other tests' threads in this
        // process allocate meanwhile.)
        reset_peak_rss(std::process::id()).unwrap();
        assert!(peak_rss_bytes(std::process::id()).unwrap() >= 4096);
    }

    #[test]
    fn own_cpu_time_reads() {
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    #[test]
    fn storage_reads_of_a_process() {
        // Any number (0 when everything came from the page cache), but a number.
        storage_read_bytes(std::process::id()).unwrap();
        let err = storage_read_bytes(u32::MAX).unwrap_err();
        assert!(format!("{err:#}").contains("/proc/"), "{err:#}");
    }

    #[test]
    fn a_directory_moves_to_another_place_behind_a_symlink() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let from = a.path().join("dr1");
        std::fs::create_dir_all(from.join("journal")).unwrap();
        std::fs::write(from.join("journal/x"), b"data").unwrap();
        move_to(&from, b.path()).unwrap();
        assert!(std::fs::symlink_metadata(&from).unwrap().is_symlink());
        assert_eq!(
            std::fs::read(b.path().join("dr1/journal/x")).unwrap(),
            b"data"
        );
        assert_eq!(std::fs::read(from.join("journal/x")).unwrap(), b"data");
    }
}
