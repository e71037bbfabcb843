//! fio's nbd engine against ferryd and against `nbdkit file` serving a file on the same
//! disk, in one run, with ratios. `cargo run --release -p ferry-benches --bin nbd_vs_nbdkit
//! [-- --runtime SECS]` (builds nothing itself: run `cargo build --release -p ferryd` first).
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

fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/ferryd")
}

fn start_ferryd(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    let img = dir.join("vol0.img");
    std::fs::File::create(&img)?.set_len(VOL)?;
    let cfg = format!(
        r#"[node]
name = "primary"
role = "primary"
cluster_id = "0123456789abcdef0123456789abcdef"
metadata_dir = "{d}"
[journal]
dir = "{d}/journal"
size = "2GiB"
segment_size = "64MiB"
[nbd]
listen = "127.0.0.1:{port}"
[control]
socket = "{d}/ferryd.sock"
[[volume]]
name = "vol0"
path = "{img}"
size = {VOL}
"#,
        d = dir.display(),
        img = img.display()
    );
    let path = dir.join("primary.toml");
    std::fs::write(&path, cfg)?;
    let bin = ferry_bin();
    if !bin.exists() {
        bail!(
            "{} missing: run `cargo build --release -p ferryd` first",
            bin.display()
        );
    }
    let child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let p = Proc(child);
    wait_port(port)?;
    Ok(p)
}

fn main() -> anyhow::Result<()> {
    let runtime: u64 = std::env::args()
        .skip_while(|a| a != "--runtime")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let scratch = tempfile::tempdir_in(bench_dir())?;
    let mut table = Vec::new();

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
    {
        let dir = scratch.path().join("ferry");
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let _p = start_ferryd(&dir, port)?;
        let uri = format!("nbd://127.0.0.1:{port}/vol0");
        table.push((
            "ferryd primary",
            "randwrite",
            fio(&uri, "randwrite", runtime)?,
        ));
        table.push((
            "ferryd primary",
            "randread",
            fio(&uri, "randread", runtime)?,
        ));
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
    Ok(())
}
