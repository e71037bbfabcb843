//! fio's nbd engine against `nbdkit file` (baseline) and ferryd alone, with an async
//! standby and with a sync standby (both on loopback), on the same disk, in one run,
//! with ratios and the p99 replication lag sampled during the write job.
//! `cargo build --release -p ferryd -p ferryctl && cargo run --release -p ferry-benches
//! --bin nbd_vs_nbdkit [-- --runtime SECS]`
//!
//! Job: 4k random writes at QD32 over a 1 GiB volume, then 4k random reads at QD32.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_benches::bench_dir;

const VOL: u64 = 1 << 30;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after 30 s")
}

#[derive(Debug, Clone, Copy)]
struct FioResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fio(uri: &str, rw: &str, runtime: u64) -> anyhow::Result<FioResult> {
    let out = Command::new("fio")
        .args([
            "--name=job",
            "--ioengine=nbd",
            "--bs=4k",
            "--iodepth=32",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--size={VOL}"))
        .arg(format!("--runtime={runtime}"))
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v = ferry_benches::fio_json(&out.stdout)?;
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let j = &v["jobs"][0][side];
    let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
    Ok(FioResult {
        iops: j["iops"].as_f64().context("no iops in fio json")?,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    if !p.exists() {
        bail!(
            "{} missing: run `cargo build --release -p ferryd -p ferryctl` first",
            p.display()
        );
    }
    Ok(p)
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running ferry cluster: the primary, and optionally one standby.
struct Cluster {
    _procs: Vec<Proc>,
    primary_sock: PathBuf,
}

/// `ferryctl init` + start; `mode` None = primary alone.
fn start_cluster(dir: &Path, port: u16, mode: Option<&str>) -> anyhow::Result<Cluster> {
    let mut init = Command::new(bin("ferryctl")?);
    init.args(["init", "--dir"])
        .arg(dir)
        .arg("--volume")
        .arg(format!("vol0:{VOL}"))
        .arg("--nbd")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--journal-size", "2GiB"]);
    if let Some(m) = mode {
        init.arg("--primary")
            .arg(format!("127.0.0.1:{}", free_udp_port()?))
            .arg("--standby")
            .arg(format!("dr1=127.0.0.1:{}", free_udp_port()?))
            .args(["--mode", m]);
    }
    let out = init.output()?;
    if !out.status.success() {
        bail!("ferryctl init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut procs = Vec::new();
    let names: &[&str] = if mode.is_some() {
        &["dr1", "primary"]
    } else {
        &["primary"]
    };
    for n in names {
        let child = Command::new(bin("ferryd")?)
            .arg("--config")
            .arg(dir.join(format!("{n}.toml")))
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        procs.push(Proc(child));
    }
    wait_port(port)?;
    let primary_sock = dir.join("primary/ferryd.sock");
    if mode.is_some() {
        // Wait for the session so the run measures replication, not reconnects.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = status(&primary_sock)?;
            if st["targets"][0]["state"] == "streaming" {
                break;
            }
            if Instant::now() > deadline {
                bail!("standby never connected: {st}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(Cluster {
        _procs: procs,
        primary_sock,
    })
}

/// One status call over the control socket.
fn status(sock: &Path) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connect {}", sock.display()))?;
    s.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    Ok(v["result"].clone())
}

/// Samples the target's lag every 10 ms while `f` runs; returns f's result and p99 lag.
fn with_lag_samples<T>(
    sock: &Path,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<f64>)> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let sock = sock.to_path_buf();
        std::thread::spawn(move || {
            let mut lags = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(st) = status(&sock) {
                    if let Some(l) = st["targets"][0]["lag_seconds"].as_f64() {
                        lags.push(l);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            lags
        })
    };
    let r = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lags = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("lag sampler panicked"))?;
    lags.sort_by(|a, b| a.total_cmp(b));
    let p99 = (!lags.is_empty()).then(|| lags[(lags.len() * 99 / 100).min(lags.len() - 1)]);
    Ok((r?, p99))
}

fn main() -> anyhow::Result<()> {
    let runtime: u64 = std::env::args()
        .skip_while(|a| a != "--runtime")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let scratch = tempfile::tempdir_in(bench_dir())?;
    let mut table = Vec::new();
    let mut lags: Vec<(&str, f64)> = Vec::new();

    // Baseline: nbdkit's file plugin on a file in the same directory.
    {
        let file = scratch.path().join("nbdkit.img");
        std::fs::File::create(&file)?.set_len(VOL)?;
        let port = free_port()?;
        let child = Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg("file")
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .context("starting nbdkit (apt-get install nbdkit)")?;
        let _p = Proc(child);
        wait_port(port)?;
        let uri = format!("nbd://127.0.0.1:{port}");
        table.push(("nbdkit file", "randwrite", fio(&uri, "randwrite", runtime)?));
        table.push(("nbdkit file", "randread", fio(&uri, "randread", runtime)?));
    }
    for (label, mode) in [
        ("ferryd primary", None),
        ("ferryd + async", Some("async")),
        ("ferryd + sync", Some("sync")),
    ] {
        let dir = scratch.path().join(label.replace([' ', '+'], "_"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let c = start_cluster(&dir, port, mode)?;
        let uri = format!("nbd://127.0.0.1:{port}/vol0");
        let (w, lag) = with_lag_samples(&c.primary_sock, || fio(&uri, "randwrite", runtime))?;
        table.push((label, "randwrite", w));
        if let Some(l) = lag {
            lags.push((label, l));
        }
        table.push((label, "randread", fio(&uri, "randread", runtime)?));
    }
    println!("fio nbd engine, 4k, QD32, {runtime} s per job, 1 GiB volume");
    println!(
        "{:<16} {:<10} {:>10} {:>9} {:>9} {:>8}",
        "server", "job", "IOPS", "p50 us", "p99 us", "ratio"
    );
    for (server, job, r) in &table {
        let base = table
            .iter()
            .find(|(s, j, _)| *s == "nbdkit file" && j == job)
            .map(|t| t.2.iops)
            .unwrap_or(f64::NAN);
        println!(
            "{server:<16} {job:<10} {:>10.0} {:>9.0} {:>9.0} {:>8.2}",
            r.iops,
            r.p50_us,
            r.p99_us,
            r.iops / base
        );
    }
    for (label, l) in &lags {
        println!(
            "{label}: p99 replication lag during randwrite {:.1} ms",
            l * 1000.0
        );
    }
    let iops = |l: &str| {
        table
            .iter()
            .find(|(s, j, _)| *s == l && *j == "randwrite")
            .map(|t| t.2.iops)
    };
    if let (Some(a), Some(p)) = (iops("ferryd + async"), iops("ferryd primary")) {
        println!("async / primary alone, randwrite IOPS: {:.2}", a / p);
    }
    if let (Some(a), Some(p)) = (iops("ferryd + sync"), iops("ferryd primary")) {
        println!("sync / primary alone, randwrite IOPS: {:.2}", a / p);
    }
    Ok(())
}
