//! Limits under hostile load (issue 17), on a real ferryd: a flood of idle TCP
//! connections to the NBD port, none finishing the handshake, must neither grow the
//! daemon's memory without bound (it once went from 32 MB to 1.57 GB with 3000) nor
//! keep a real client, `ferryctl status` or a scrape out; and the NBD server's
//! counters (connections displaced at the cap, refused requests) reach /metrics.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_nbd::testclient::TestClient;
use ferryd::testkit::{
    assert_qemu_io_ok, enable_metrics, primary_config, qemu_io, skip_without, Node,
};

const MIB: u64 = 1 << 20;
/// Idle connections in the flood (each holds one fd here and one in ferryd).
const FLOOD: usize = 1000;
/// Allowed growth of ferryd's peak resident memory under the flood.
const RSS_BUDGET: u64 = 64 * MIB;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

/// `VmRSS` or `VmHWM` (peak) of a process, in bytes.
fn vm(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad line {line:?}"));
    kib * 1024
}

/// One HTTP GET; the body.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    out
}

/// The value of an unlabelled sample in an exposition, checking its family has HELP.
fn sample(text: &str, family: &str, sample: &str) -> u64 {
    assert!(
        text.contains(&format!("# HELP {family} ")),
        "{family} has no HELP:\n{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{sample} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample}:\n{text}"))
}

/// A 1 MiB write and its read-back through ferry-nbd's raw client.
fn write_and_read_back(nbd: SocketAddr, byte: u8) {
    let (mut c, _) = TestClient::open(nbd, "vol0").expect("a real client gets in");
    let data = vec![byte; MIB as usize];
    assert_eq!(c.write(3 * MIB, &data, 0).unwrap(), 0);
    assert_eq!(c.read(3 * MIB, MIB as u32).unwrap().unwrap(), data);
    c.disconnect().unwrap();
}

#[test]
fn an_nbd_flood_of_idle_connections_keeps_memory_bounded_and_clients_served() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 64 * MIB)], 64 * MIB, 4 * MIB);
    enable_metrics(&cfg);
    let node = Node::start(ferryd(), &cfg);
    let nbd = node.nbd.expect("nbd address");
    let metrics = node.metrics.expect("metrics address");
    // One session first, so the baseline includes what serving costs anyway.
    write_and_read_back(nbd, 0x11);
    let before = vm(node.pid, "VmHWM:");

    let t = Instant::now();
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|i| TcpStream::connect(nbd).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    // Let ferryd accept (and displace) all of them.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = get(metrics, "/metrics");
        let accepted = sample(
            &m,
            "ferry_nbd_connections_accepted",
            "ferry_nbd_connections_accepted_total",
        );
        if accepted > FLOOD as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "flood not accepted:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While the flood is held: a real client, the control socket and a scrape.
    write_and_read_back(nbd, 0x22);
    if !skip_without(
        "qemu-io",
        "an_nbd_flood_of_idle_connections (its qemu-io part)",
    ) {
        let cmds = ["write -P 0x33 0 1M", "flush", "read -P 0x33 0 1M"].map(String::from);
        assert_qemu_io_ok(&qemu_io(&node.url("vol0"), &cmds));
    }
    let status = node.status();
    assert_eq!(status["node"], "primary", "{status}");
    let after = vm(node.pid, "VmHWM:");
    let m = get(metrics, "/metrics");
    let active = sample(
        &m,
        "ferry_nbd_connections_active",
        "ferry_nbd_connections_active",
    );
    let evicted = sample(
        &m,
        "ferry_nbd_connections_evicted",
        "ferry_nbd_connections_evicted_total",
    );
    let refused = sample(
        &m,
        "ferry_nbd_connections_refused",
        "ferry_nbd_connections_refused_total",
    );
    eprintln!(
        "flood of {FLOOD} idle NBD connections: ferryd peak RSS {} MiB -> {} MiB \
         (+{} KiB) in {:?}; active {active}, displaced {evicted}, refused {refused}",
        before / MIB,
        after / MIB,
        after.saturating_sub(before) / 1024,
        t.elapsed()
    );
    assert!(
        after.saturating_sub(before) < RSS_BUDGET,
        "peak RSS grew from {before} to {after} bytes"
    );
    assert!(active <= 64, "{active} connections open at a cap of 64");
    assert!(
        evicted >= (FLOOD - 64) as u64,
        "{evicted} displaced of {FLOOD}"
    );
    assert_eq!(refused, 0, "nothing was in a session for long");
    drop(flood);
}

#[test]
fn a_refused_nbd_request_is_counted_on_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 16 * MIB)], 64 * MIB, 4 * MIB);
    enable_metrics(&cfg);
    let node = Node::start(ferryd(), &cfg);
    let (nbd, metrics) = (node.nbd.unwrap(), node.metrics.unwrap());
    let m = get(metrics, "/metrics");
    let refused = |m: &str| {
        sample(
            m,
            "ferry_nbd_requests_refused",
            "ferry_nbd_requests_refused_total",
        )
    };
    assert_eq!(refused(&m), 0);
    assert_eq!(
        sample(&m, "ferry_nbd_tls_sessions", "ferry_nbd_tls_sessions_total"),
        0
    );
    let (mut c, _) = TestClient::open(nbd, "vol0").unwrap();
    // A read past the end of the volume: refused by validation.
    let errno = c.read(16 * MIB, 4096).unwrap().unwrap_err();
    assert_eq!(errno, ferry_nbd::proto::EINVAL);
    c.disconnect().unwrap();
    let m = get(metrics, "/metrics");
    assert_eq!(refused(&m), 1, "{m}");
    // The payload limit ferryd advertises is ferry-nbd's, bounded by half a segment.
    let (_, info) = TestClient::open(nbd, "vol0").unwrap();
    assert_eq!(
        info.block_size.map(|b| b.2),
        Some((2 * MIB) as u32),
        "{info:?}"
    );
}
