//! Helpers shared by ferryctl's end-to-end tests (each test file is its own crate and
//! uses a different subset, hence the `dead_code` allowance).
#![allow(dead_code)]

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_api::config::Config;
use ferry_api::control::{self, Request};
use ferryd::testkit::{free_udp_port, Node};

pub fn ferryctl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryctl"))
}

/// ferryd is built by the same `cargo test --workspace` run (the ferryd package has
/// integration tests, so its binary is built next to ours).
pub fn ferryd() -> PathBuf {
    let p = ferryctl().with_file_name("ferryd");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p ferryd`)",
        p.display()
    );
    p
}

/// `ferryctl init --dir DIR ARGS…`: its output, for tests that check success or the
/// refusal themselves.
pub fn init_dir(dir: &Path, args: &[&str]) -> Output {
    Command::new(ferryctl())
        .args(["init", "--dir"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// What `ferryctl init` is asked for: one volume, the journal, the mode.
pub struct Init<'a> {
    pub volume: &'a str,
    pub journal: &'a str,
    pub segment: &'a str,
    pub mode: &'a str,
    /// `--crypto`: "standard" or "gm".
    pub crypto: &'a str,
    /// `--encrypt`: journals encrypted at rest, a key file per node.
    pub encrypt: bool,
}

impl Default for Init<'_> {
    fn default() -> Self {
        Init {
            volume: "vol0:64MiB",
            journal: "64MiB",
            segment: "4MiB",
            mode: "async",
            crypto: "standard",
            encrypt: false,
        }
    }
}

/// `ferryctl init` for a primary and the given standbys on loopback (ports from the
/// OS); returns the primary's and the standbys' config paths. A standby `NAME/MODE`
/// (`dr2/async`) gets its own mode; `NAME@via=RELAY` (`far@via=dr1`) is relayed
/// (cascading).
pub fn init_cluster(dir: &Path, standbys: &[&str], o: &Init) -> (PathBuf, Vec<PathBuf>) {
    let mut cmd = Command::new(ferryctl());
    cmd.args(["init", "--dir"])
        .arg(dir)
        .args(["--volume", o.volume, "--nbd", "127.0.0.1:0"])
        .args(["--journal-size", o.journal, "--segment-size", o.segment])
        .args(["--mode", o.mode, "--crypto", o.crypto])
        .args(o.encrypt.then_some("--encrypt"))
        .arg("--primary")
        .arg(format!("127.0.0.1:{}", free_udp_port()));
    for s in standbys {
        let (s, via) = s.split_once('@').map_or((*s, None), |(n, v)| (n, Some(v)));
        let (name, mode) = s.split_once('/').map_or((s, None), |(n, m)| (n, Some(m)));
        let mode = mode.map(|m| format!("/{m}")).unwrap_or_default();
        let via = via.map(|v| format!("@{v}")).unwrap_or_default();
        cmd.arg("--standby")
            .arg(format!("{name}=127.0.0.1:{}{mode}{via}", free_udp_port()));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        dir.join("primary.toml"),
        standbys
            .iter()
            .map(|s| dir.join(format!("{}.toml", s.split(['/', '@']).next().unwrap_or(s))))
            .collect(),
    )
}

/// A primary and one standby `dr1`.
pub fn init_pair(dir: &Path, o: &Init) -> (PathBuf, PathBuf) {
    let (p, mut s) = init_cluster(dir, &["dr1"], o);
    (p, s.remove(0))
}

/// A node's replication (QUIC) listen address from its config.
pub fn repl_listen(config: &Path) -> String {
    Config::load(config)
        .unwrap()
        .replication
        .expect("a [replication] section")
        .listen
}

pub fn seq(v: &serde_json::Value, p: &str) -> u64 {
    v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// Waits until target 0 streams, holds everything the primary made durable, and the
/// standby applied it and is consistent. Returns that sequence.
pub fn wait_caught_up(primary: &Node, standby: &Node) -> u64 {
    let last = seq(&primary.status(), "/durable_seq");
    primary.wait_status(
        "target to be streaming and hold everything",
        Duration::from_secs(60),
        |st| {
            st["targets"][0]["tracking"] == "streaming"
                && seq(st, "/targets/0/acked_seq") >= last
                && seq(st, "/targets/0/lag_bytes") == 0
        },
    );
    standby.wait_status(
        "standby to apply everything and be consistent",
        Duration::from_secs(60),
        |st| seq(st, "/applied_seq") >= last && st["replica"] == "consistent",
    );
    last
}

/// Asserts two files are byte-identical, naming the first differing block.
pub fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i} (block {})",
            a.display(),
            b.display(),
            i / 4096
        );
    }
}

/// `ferryctl --config CONFIG ARGS…`.
pub fn ctl(config: &Path, args: &[&str]) -> Output {
    Command::new(ferryctl())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// Runs ferryctl expecting success; returns its JSON output (`--json` is added).
pub fn ctl_json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ctl(config, &a);
    assert!(
        out.status.success(),
        "ferryctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ferryctl {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Status through the control socket, tolerating a node that is restarting.
pub fn try_status(config: &Path) -> Option<serde_json::Value> {
    let cfg = Config::load(config).ok()?;
    let r = control::call(&cfg.control.socket, &Request::Status).ok()?;
    r.ok.then_some(r.result?)
}

/// Polls `try_status` until `ok` holds (bounded, naming what it waited for).
pub fn wait_for(
    config: &Path,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = try_status(config).filter(|s| ok(s)) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last status: {:#}",
            try_status(config).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` qemu-io commands at pseudo-random 4 KiB-aligned offsets of a `vol`-byte
/// volume: pattern writes, with a discard, a write-zeroes and a flush in every ten.
/// `len`: each command's length, or `None` for 4..64 KiB at random.
pub fn mixed_workload(seed: u64, n: usize, vol: u64, len: Option<u64>) -> Vec<String> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut cmds = Vec::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (vol / 4096 - 64)) * 4096;
        let len = len.unwrap_or(4096 * (1 + (x >> 20) % 16));
        match i % 10 {
            7 => cmds.push(format!("discard {off} {len}")),
            8 => cmds.push(format!("write -z {off} {len}")),
            9 => cmds.push("flush".into()),
            _ => cmds.push(format!("write -P {} {off} {len}", (x >> 8) % 255 + 1)),
        }
    }
    cmds
}

/// The whole image behind an NBD URI, read by qemu-img.
pub fn image_of(uri: &str, out: &Path) -> Vec<u8> {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img convert {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).unwrap()
}

/// Two images compare equal, or the first differing byte and block are named.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs first at byte {i} (block {})", i / 4096);
    }
}

/// qemu-io commands writing `fill` at each offset, then a flush.
pub fn writes(fill: u8, offsets: &[u64], len: u64) -> Vec<String> {
    let mut c: Vec<String> = offsets
        .iter()
        .map(|o| format!("write -P {fill} {o} {len}"))
        .collect();
    c.push("flush".into());
    c
}

/// A primary alone (no standby), 4 MiB volume, metrics on a port of the OS's choice.
pub fn lone_primary(dir: &Path) -> PathBuf {
    let out = init_dir(
        dir,
        &[
            "--volume",
            "vol0:4MiB",
            "--nbd",
            "127.0.0.1:0",
            "--journal-size",
            "16MiB",
            "--segment-size",
            "4MiB",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("primary.toml")
}

/// The pattern byte qemu-io writes in the 64 KiB slot holding `off` (the workload's).
pub fn pattern_of(off: u64) -> u64 {
    off / 65536 % 250 + 1
}

/// `n` 16 KiB writes, one every 64 KiB, each with its slot's pattern.
pub fn workload(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("write -P {} {} 16k", pattern_of(i * 65536), i * 65536))
        .collect()
}

/// The status entry of target `name` (a primary's or a relay's `targets[]`), or null.
pub fn target<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}
