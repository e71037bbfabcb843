//! fio's nbd engine against `nbdkit file` (baseline) and ferryd alone, with an async
//! standby and with a sync standby (both on loopback), on the same disk, in one run,
//! with ratios and the p99 replication lag sampled during the write job. Write rounds
//! alternate the servers and report medians (the host cache drifts between runs).
//! `cargo build --release -p ferryd -p ferryctl && cargo run --release -p ferry-benches
//! --bin nbd_vs_nbdkit [-- --runtime SECS --rounds N]`
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
pub struct FioResult {
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

fn arg(name: &str, default: u64) -> u64 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A server under test: a label, its NBD URI, and (ferry) its control socket.
struct Server {
    label: &'static str,
    uri: String,
    sock: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let runtime = arg("--runtime", 6);
    let rounds = arg("--rounds", 3).max(1) as usize;
    let scratch = tempfile::tempdir_in(bench_dir())?;
    let mut keep = Vec::new();
    let mut servers = Vec::new();

    // Baseline: nbdkit's file plugin on a file in the same directory.
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
    let nbdkit = Proc(child);
    wait_port(port)?;
    servers.push(Server {
        label: "nbdkit file",
        uri: format!("nbd://127.0.0.1:{port}"),
        sock: None,
    });
    let mut clusters = Vec::new();
    for (label, mode) in [
        ("ferryd primary", None),
        ("ferryd + async", Some("async")),
        ("ferryd + sync", Some("sync")),
    ] {
        let dir = scratch.path().join(label.replace([' ', '+'], "_"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let c = start_cluster(&dir, port, mode)?;
        servers.push(Server {
            label,
            uri: format!("nbd://127.0.0.1:{port}/vol0"),
            sock: mode.map(|_| c.primary_sock.clone()),
        });
        clusters.push(c);
    }
    keep.push(nbdkit);

    // Rounds alternate the servers, so the host cache's drift hits all of them alike;
    // each figure is the median over rounds, each ratio the median of per-round ratios.
    let mut writes: Vec<Vec<FioResult>> = vec![Vec::new(); servers.len()];
    let mut lags: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
    for round in 0..rounds {
        for (i, s) in servers.iter().enumerate() {
            let (w, lag) = match &s.sock {
                Some(sock) => with_lag_samples(sock, || fio(&s.uri, "randwrite", runtime))?,
                None => (fio(&s.uri, "randwrite", runtime)?, None),
            };
            eprintln!(
                "round {round}: {:<16} randwrite {:>8.0} IOPS",
                s.label, w.iops
            );
            writes[i].push(w);
            lags[i].extend(lag);
        }
    }
    let reads: Vec<FioResult> = servers
        .iter()
        .map(|s| fio(&s.uri, "randread", runtime))
        .collect::<anyhow::Result<_>>()?;

    println!(
        "fio nbd engine, 4k, QD32, 1 GiB volume, {runtime} s per job; randwrite: median of {rounds} alternating rounds"
    );
    println!(
        "{:<16} {:<10} {:>10} {:>9} {:>9} {:>10}",
        "server", "job", "IOPS", "p50 us", "p99 us", "x nbdkit"
    );
    for (i, s) in servers.iter().enumerate() {
        let ratio = median(
            (0..rounds)
                .map(|r| writes[i][r].iops / writes[0][r].iops)
                .collect(),
        );
        let m = |f: fn(&FioResult) -> f64| median(writes[i].iter().map(f).collect());
        println!(
            "{:<16} {:<10} {:>10.0} {:>9.0} {:>9.0} {:>10.2}",
            s.label,
            "randwrite",
            m(|r| r.iops),
            m(|r| r.p50_us),
            m(|r| r.p99_us),
            ratio
        );
    }
    for (i, s) in servers.iter().enumerate() {
        let r = &reads[i];
        println!(
            "{:<16} {:<10} {:>10.0} {:>9.0} {:>9.0} {:>10.2}",
            s.label,
            "randread",
            r.iops,
            r.p50_us,
            r.p99_us,
            r.iops / reads[0].iops
        );
    }
    for (i, s) in servers.iter().enumerate() {
        if !lags[i].is_empty() {
            let mut l = lags[i].clone();
            l.sort_by(|a, b| a.total_cmp(b));
            let p99 = l[(l.len() * 99 / 100).min(l.len() - 1)];
            println!(
                "{}: p99 replication lag during randwrite {:.1} ms",
                s.label,
                p99 * 1000.0
            );
        }
    }
    let per_round = |a: usize, b: usize| {
        median(
            (0..rounds)
                .map(|r| writes[a][r].iops / writes[b][r].iops)
                .collect(),
        )
    };
    println!(
        "async / primary alone, randwrite IOPS: {:.2}",
        per_round(2, 1)
    );
    println!(
        "sync / primary alone, randwrite IOPS: {:.2}",
        per_round(3, 1)
    );
    drop(clusters);
    Ok(())
}
