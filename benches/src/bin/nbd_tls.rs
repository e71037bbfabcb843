//! Issue 23's NBD measurements in one run against one release ferryd (a gm
//! cluster's primary with `[nbd] tls = "optional"`, so plain NBD, the standard
//! suites and the SM suites are all served by the same listener):
//!
//! 1. `nbdcopy nbd://…/vol0 null:` of a 4 GiB volume holding 256 MiB of data
//!    (16 extents of 16 MiB, the rest never written): time (direct), and the
//!    bytes ferryd sent to the client (one more copy through a counting TCP
//!    relay on loopback, so the count is what crossed the wire whatever
//!    syscalls either side uses), with block status (`base:allocation`, nbdcopy's default)
//!    and with `--no-extents` (a client that does not ask, exactly what a server
//!    without `base:allocation` leads to: every block crosses the wire).
//! 2. 1 MiB sequential writes and reads of a separate volume: nbdcopy (libnbd,
//!    GnuTLS: 1 connection, 1 MiB requests, its default queue depth) and fio's
//!    nbd engine (libnbd too, queue depth 8) plain and over TLS with the
//!    standard suites; and the in-project blocking client
//!    (one request at a time) plain, standard (ring) and SM (ferry-gmtls,
//!    TLS_SM4_GCM_SM3, asserted), the same code for all three.
//!
//! `cargo run --release -p ferry-benches --bin nbd_tls [-- --mib 512 --rounds 3
//! --before-ferryd PATH --ferryd PATH]`
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use ferry_api::config::{Config, NbdTls, TlsConfig, TlsSuiteConfig};
use ferry_benches::harness::{ferry_bins, median, target_dir, tool_version, FioSpec};
use ferry_nbd::rustls;
use ferry_nbd::testclient::TestClient;
use ferry_transport::pki::{AnyClusterCa, TlsSuite};
use ferryd::testkit::{primary_config, Node};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Parser)]
struct Args {
    /// MiB moved each way per throughput run.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Rounds of every measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Use the release ferryd already built instead of building it.
    #[arg(long)]
    no_build: bool,
    /// This ferryd instead of the workspace's release build (implies --no-build).
    #[arg(long)]
    ferryd: Option<PathBuf>,
    /// A ferryd from before block status (8271c98) for the "before" row:
    /// `git worktree add --detach DIR 8271c98 && cd DIR && cargo build --release -p ferryd`.
    #[arg(long)]
    before_ferryd: Option<PathBuf>,
}

/// The TLS material of the run: the gm CA (the cluster's) and the standard
/// CA's directory as libnbd reads it (`ca-cert.pem`).
struct Pki {
    gm_ca: rustls::pki_types::CertificateDer<'static>,
    std_ca: rustls::pki_types::CertificateDer<'static>,
    client_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.mib > 0 && args.rounds > 0,
        "--mib and --rounds must be > 0"
    );
    let ferryd = match &args.ferryd {
        Some(path) => path.clone(),
        None => ferryd_bin(!args.no_build)?,
    };
    let dir = tempfile::tempdir_in(ferry_benches::bench_dir())?;
    let (config, pki) = setup(dir.path(), args.mib)?;
    // Before any thread starts: libnbd (fio, nbdcopy) finds the CA there.
    std::env::set_var("HOME", dir.path().join("home"));
    let node = Node::start(&ferryd, &config);
    let addr = node.nbd.context("ferryd serves no NBD")?;
    println!(
        "ferryd {} (pid {}), {}, {}\n",
        ferryd.display(),
        node.pid,
        tool_version("nbdcopy"),
        std::env::consts::ARCH
    );
    let before = match &args.before_ferryd {
        Some(exe) => {
            let dir = dir.path().join("before");
            let config = primary_config(&dir, &[("vol0", 4 * GIB)], GIB, 64 * MIB);
            Some(Node::start(exe, &config))
        }
        None => None,
    };
    let before_addr = before.as_ref().and_then(|n| n.nbd);
    block_status(addr, before_addr, args.rounds)?;
    drop(before);
    throughput(addr, &pki, args.mib, args.rounds)?;
    Ok(())
}

/// The release ferryd: built (with ferryctl, as the other benchmarks do), or
/// the one already in the target directory.
fn ferryd_bin(build: bool) -> anyhow::Result<PathBuf> {
    if build {
        return Ok(ferry_bins(true)?.ferryd);
    }
    let path = target_dir().join("release/ferryd");
    ensure!(
        path.exists(),
        "{} missing: run `cargo build --release -p ferryd` (same CARGO_TARGET_DIR) or drop --no-build",
        path.display()
    );
    Ok(path)
}

/// A gm cluster's primary: SM2 cluster certificate for the SM suites, a
/// standard certificate for 127.0.0.1 as `nbd.tls_cert` (so `tls_suite` is
/// "both"), TLS optional. vol0: 4 GiB; vol1: `mib` MiB.
fn setup(dir: &Path, mib: u64) -> anyhow::Result<(PathBuf, Pki)> {
    let path = primary_config(
        dir,
        &[("vol0", 4 * GIB), ("vol1", mib * MIB)],
        GIB,
        64 * MIB,
    );
    let mut cfg = Config::load(&path).map_err(anyhow::Error::msg)?;
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let gm = AnyClusterCa::generate(cfg.cluster_id(), TlsSuite::Gm)?;
    gm.write_pem_files(&pki)?;
    gm.issue_node("primary")?.write_pem_files(&pki)?;
    cfg.tls = Some(TlsConfig {
        ca: pki.join("ca.pem"),
        cert: pki.join("primary.pem"),
        key: pki.join("primary.key"),
        suite: TlsSuiteConfig::Gm,
    });
    let (std_ca, cert, key) = loopback_credentials()?;
    // libnbd's default certificate directory under HOME: fio's nbd engine
    // may not name one in the URI (libnbd refuses local file access in URIs
    // unless the program allows it, and fio does not).
    let client_dir = dir.join("home/.pki/libnbd");
    std::fs::create_dir_all(&client_dir)?;
    std::fs::write(client_dir.join("ca-cert.pem"), &std_ca)?;
    std::fs::write(pki.join("nbd.pem"), cert)?;
    std::fs::write(pki.join("nbd.key"), key)?;
    let n = cfg.nbd.as_mut().context("no [nbd]")?;
    n.tls = NbdTls::Optional;
    n.tls_cert = Some(pki.join("nbd.pem"));
    n.tls_key = Some(pki.join("nbd.key"));
    std::fs::write(&path, cfg.to_toml())?;
    let der = |pem: &str| -> anyhow::Result<rustls::pki_types::CertificateDer<'static>> {
        let mut v = ferry_transport::pki::parse_cert_pem(pem)?;
        v.pop().context("no certificate")
    };
    let pki = Pki {
        gm_ca: der(&gm.cert_pem())?,
        std_ca: der(&std_ca)?,
        client_dir,
    };
    Ok((path, pki))
}

/// A CA and a server certificate for 127.0.0.1 from it (PEM: CA, cert, key).
fn loopback_credentials() -> anyhow::Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = p.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

// ---------------------------------------------------------------------------------
// 1. block status

/// 256 MiB of data in vol0, then nbdcopy to null: with and without extents,
/// and from the "before" server when there is one.
fn block_status(addr: SocketAddr, before: Option<SocketAddr>, rounds: usize) -> anyhow::Result<()> {
    fill_vol0(addr)?;
    let mut rows = vec![
        ("current: block status (nbdcopy default)", addr, None),
        ("current: nbdcopy --no-extents", addr, Some("--no-extents")),
    ];
    if let Some(b) = before {
        fill_vol0(b)?;
        rows.push((
            "before (8271c98, simple replies only): nbdcopy default",
            b,
            None,
        ));
    }
    println!(
        "### nbdcopy nbd://…/vol0 null: (4 GiB volume, 256 MiB of data; medians of {rounds})\n"
    );
    println!("| server and client | time s | bytes ferryd sent | MiB/s of volume |");
    println!("| --- | --- | --- | --- |");
    for (label, server, extra) in rows {
        let copy = |to: SocketAddr| {
            let mut cmd = Command::new("nbdcopy");
            cmd.args(extra).args([&format!("nbd://{to}/vol0"), "null:"]);
            run(&mut cmd)
        };
        let mut secs = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            copy(server)?;
            secs.push(t.elapsed().as_secs_f64());
        }
        let relay = Relay::start(server)?;
        copy(relay.addr)?;
        let b = relay.to_client.load(Ordering::Relaxed);
        let s = median(secs);
        println!(
            "| {label} | {s:.2} | {b} ({:.1} MiB) | {:.0} |",
            b as f64 / MIB as f64,
            4096.0 / s
        );
    }
    println!();
    Ok(())
}

/// 16 extents of 16 MiB, 256 MiB apart, in vol0; the rest never written.
fn fill_vol0(addr: SocketAddr) -> anyhow::Result<()> {
    let (mut c, _) = TestClient::open(addr, "vol0")?;
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for extent in 0..16u64 {
        for m in 0..16u64 {
            let at = extent * 256 * MIB + m * MIB;
            ensure!(c.write(at, &chunk, 0)? == 0, "write at {at} failed");
        }
    }
    ensure!(c.flush()? == 0, "flush failed");
    Ok(())
}

/// A TCP relay on loopback that counts the bytes going from the server to
/// its clients.
struct Relay {
    addr: SocketAddr,
    to_client: Arc<AtomicU64>,
}

impl Relay {
    fn start(server: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let to_client = Arc::new(AtomicU64::new(0));
        let count = to_client.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(server) else {
                    continue;
                };
                if let (Ok(c2), Ok(u2)) = (client.try_clone(), up.try_clone()) {
                    pipe(c2, u2, Arc::new(AtomicU64::new(0)));
                    pipe(up, client, count.clone());
                }
            }
        });
        Ok(Relay { addr, to_client })
    }
}

/// Copies `from` to `to` on a thread until either end closes, counting.
fn pipe(mut from: TcpStream, mut to: TcpStream, count: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// 2. throughput

/// How a client reaches the export.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    Plain,
    Standard,
    Sm,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Plain => "TLS off",
            Link::Standard => "TLS, standard suites",
            Link::Sm => "TLS, SM suites",
        }
    }
}

fn throughput(addr: SocketAddr, pki: &Pki, mib: u64, rounds: usize) -> anyhow::Result<()> {
    println!("### 1 MiB sequential, {mib} MiB each way (vol1), MiB/s, medians of {rounds}\n");
    println!("| client | link | write MiB/s | read MiB/s |");
    println!("| --- | --- | --- | --- |");
    let src = source_file(mib)?;
    for link in [Link::Plain, Link::Standard] {
        let uri = match link {
            Link::Plain => format!("nbd://{addr}/vol1"),
            _ => format!(
                "nbds://{addr}/vol1?tls-certificates={}",
                pki.client_dir.display()
            ),
        };
        let (w, r) = rounds_of(rounds, || nbdcopy_pass(&uri, &src, mib))?;
        println!(
            "| nbdcopy (1 conn, 1M requests) | {} | {w:.0} | {r:.0} |",
            link.name()
        );
        // fio's nbd engine connects with libnbd's nbd_connect_uri: nbds://
        // works, with the CA from libnbd's default directory under HOME.
        let fio_uri = uri.split('?').next().unwrap_or(&uri);
        match rounds_of(rounds, || fio_pass(fio_uri, mib)) {
            Ok((w, r)) => println!(
                "| fio nbd engine (QD8) | {} | {w:.0} | {r:.0} |",
                link.name()
            ),
            Err(e) => println!(
                "| fio nbd engine (QD8) | {} | failed: {} | |",
                link.name(),
                format!("{e:#}").replace(['\n', '|'], " ")
            ),
        }
    }
    for link in [Link::Plain, Link::Standard, Link::Sm] {
        let (w, r) = rounds_of(rounds, || client_pass(addr, pki, link, mib))?;
        println!(
            "| ferry raw client (QD1) | {} | {w:.0} | {r:.0} |",
            link.name()
        );
    }
    println!();
    let _ = std::fs::remove_file(&src);
    Ok(())
}

/// Medians of `rounds` (write, read) MiB/s pairs.
fn rounds_of(
    rounds: usize,
    mut pass: impl FnMut() -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<(f64, f64)> {
    let mut w = Vec::new();
    let mut r = Vec::new();
    for _ in 0..rounds {
        let (a, b) = pass()?;
        w.push(a);
        r.push(b);
    }
    Ok((median(w), median(r)))
}

/// `mib` MiB of incompressible, non-zero data in /dev/shm (so that the
/// source costs no disk reads; nbdcopy would skip zero blocks).
fn source_file(mib: u64) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(format!("/dev/shm/ferry-nbd-tls-{}.img", std::process::id()));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; MIB as usize];
    let mut f = std::fs::File::create(&path)?;
    for _ in 0..mib {
        for b in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&(state | 1).to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &block)?;
    }
    Ok(path)
}

/// nbdcopy file → export, then export → null: (MiB/s each).
fn nbdcopy_pass(uri: &str, src: &Path, mib: u64) -> anyhow::Result<(f64, f64)> {
    let common = ["--connections=1", "--request-size=1048576", "--flush"];
    let t = Instant::now();
    run(Command::new("nbdcopy").args(common).arg(src).arg(uri))?;
    let w = mib as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    run(Command::new("nbdcopy")
        .args(&common[..2])
        .args([uri, "null:"]))?;
    Ok((w, mib as f64 / t.elapsed().as_secs_f64()))
}

/// fio, 1 MiB sequential writes then reads at queue depth 8 (MiB/s each).
fn fio_pass(uri: &str, mib: u64) -> anyhow::Result<(f64, f64)> {
    let spec = |rw| FioSpec {
        rw,
        bs: "1M",
        iodepth: 8,
        fsync: false,
        runtime: None,
        size: mib * MIB,
    };
    let timeout = Duration::from_secs(300);
    let w = spec("write").run(uri, timeout)?;
    let r = spec("read").run(uri, timeout)?;
    Ok((w.bw_bytes / MIB as f64, r.bw_bytes / MIB as f64))
}

/// The raw client: one 1 MiB request at a time, writes (then a flush), reads.
fn client_pass(addr: SocketAddr, pki: &Pki, link: Link, mib: u64) -> anyhow::Result<(f64, f64)> {
    let mut c = connect(addr, pki, link)?;
    let data: Vec<u8> = (0..MIB).map(|i| (i * 31 % 253) as u8 + 1).collect();
    let t = Instant::now();
    for m in 0..mib {
        ensure!(c.write(m * MIB, &data, 0)? == 0, "write failed");
    }
    ensure!(c.flush()? == 0, "flush failed");
    let w = mib as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for m in 0..mib {
        let got = c.read(m * MIB, MIB as u32)?;
        ensure!(
            got.as_deref() == Ok(&data[..]),
            "read back differs at {m} MiB"
        );
    }
    Ok((w, mib as f64 / t.elapsed().as_secs_f64()))
}

/// A session on vol1 over `link`; the SM link must negotiate TLS_SM4_GCM_SM3.
fn connect(addr: SocketAddr, pki: &Pki, link: Link) -> anyhow::Result<TestClient> {
    let mut c = TestClient::start(addr)?;
    let (provider, ca, name) = match link {
        Link::Plain => {
            c.go("vol1")?
                .map_err(|e| anyhow::anyhow!("GO refused: {e}"))?;
            return Ok(c);
        }
        Link::Standard => (
            Arc::new(rustls::crypto::ring::default_provider()),
            &pki.std_ca,
            "localhost",
        ),
        Link::Sm => (ferry_gmtls::provider_arc(), &pki.gm_ca, "primary"),
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.starttls(Arc::new(tls), name)?
        .map_err(|e| anyhow::anyhow!("STARTTLS refused: {e}"))?;
    if link == Link::Sm {
        ensure!(
            c.tls_suite() == Some(ferry_gmtls::tls_sm4_gcm_sm3()),
            "SM link negotiated {:?}",
            c.tls_suite()
        );
    }
    c.go("vol1")?
        .map_err(|e| anyhow::anyhow!("GO refused: {e}"))?;
    Ok(c)
}
