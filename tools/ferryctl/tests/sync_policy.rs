//! `replication.sync = "ANY 1 (dr1, dr2)"` (issue 21, item 2) across network
//! namespaces: the primary, dr1 and dr2 each in its own namespace, joined by veth
//! pairs; partitions made by nft inside a node's namespace (never the host's ruleset);
//! the primary reaches dr2 through the userspace UDP proxy on the bridge, which delays
//! each datagram (this kernel has no netem).
//!
//! * dr1 partitioned: writes go on at dr2's pace — each takes at least dr2's round
//!   trip, is held by dr2 when it is acknowledged and never waits for dr1's sync
//!   timeout — and every acknowledged write is on dr2's disk; nothing is recorded lost
//!   (dr2 meets the policy).
//! * dr1 and dr2 partitioned, `on_sync_loss = "block"`: a write waits (status: writes
//!   blocked on both) past the sync timeout, and completes once dr1's partition is
//!   lifted; it is then on dr1's disk.
mod common;
use common::netns::Netns;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::config::{Config, OnSyncLoss, SyncPolicy};
use ferry_testkit::udp_proxy::LossyLink;
use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip, skip_without, Node};

const WAIT: Duration = Duration::from_secs(30);
/// Far above a write's round trip on a veth link, even on a loaded machine: a write
/// that took this long waited for the partitioned standby.
const SYNC_TIMEOUT_MS: u64 = 3000;
/// A partitioned session ends (and a healed link redials) quickly.
const ENV: [(&str, &str); 1] = [(ferryd::node::IDLE_TIMEOUT_ENV, "1500")];
const LEN: u64 = 16384;
/// Each datagram between the primary and dr2 is held this long.
const DR2_DELAY_MS: u32 = 100;

fn no_sync_loss(st: &serde_json::Value) {
    for name in ["dr1", "dr2"] {
        let t = target(st, name);
        assert!(t["sync_loss_at"].is_null(), "{name}: {st:#}");
        assert_eq!(t["effective_mode"], "sync", "{name}: {st:#}");
    }
}

/// `[primary, dr1, dr2]`'s configs made by `ferryctl init` at the namespaces'
/// addresses, each serving NBD on its own link address; the primary under
/// `ANY 1 (dr1, dr2)` with `block` on both targets, reaching dr2 at `dr2_via`.
fn configs(dir: &Path, addrs: &[String], dr2_via: &str) -> Vec<PathBuf> {
    let out = init_dir(
        dir,
        &[
            "--volume",
            "vol0:32MiB",
            "--nbd",
            "127.0.0.1:0",
            "--journal-size",
            "64MiB",
            "--segment-size",
            "4MiB",
            "--mode",
            "sync",
            "--primary",
            &format!("{}:7001", addrs[0]),
            "--standby",
            &format!("dr1={}:7001/sync", addrs[1]),
            "--standby",
            &format!("dr2={}:7001/sync", addrs[2]),
        ],
    );
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfgs: Vec<PathBuf> = ["primary", "dr1", "dr2"]
        .iter()
        .map(|n| dir.join(format!("{n}.toml")))
        .collect();
    for (c, a) in cfgs.iter().zip(addrs) {
        let mut cfg = Config::load(c).unwrap();
        cfg.nbd.as_mut().unwrap().listen = format!("{a}:0");
        std::fs::write(c, cfg.to_toml()).unwrap();
    }
    let mut p = Config::load(&cfgs[0]).unwrap();
    let r = p.replication.as_mut().unwrap();
    r.sync = Some(SyncPolicy::parse("ANY 1 (dr1, dr2)").unwrap());
    r.sync_timeout_ms = SYNC_TIMEOUT_MS;
    for t in &mut r.targets {
        t.on_sync_loss = OnSyncLoss::Block;
        if t.name == "dr2" {
            t.address = dr2_via.to_string();
        }
    }
    std::fs::write(&cfgs[0], p.to_toml()).unwrap();
    cfgs
}

/// The `len` bytes at `offset` of the node's volume file.
fn on_disk(config: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let path = Config::load(config).unwrap().volumes[0].path.clone();
    let mut b = vec![0u8; len as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

/// Waits until the standby `name` applied everything the primary made durable.
fn applied_on(primary: &Node, standby: &Node, name: &str) {
    let st = primary.wait_status(&format!("{name} to hold every write"), WAIT, |st| {
        seq(target(st, name), "/acked_seq") >= seq(st, "/durable_seq")
    });
    let last = seq(&st, "/durable_seq");
    standby.wait_status(&format!("{name} to apply every write"), WAIT, |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
}

#[test]
fn in_network_namespaces_any_one_of_two_goes_on_without_the_partitioned_one_and_blocks_without_both(
) {
    let name = "in_network_namespaces_any_one_of_two_goes_on_without_the_partitioned_one_and_blocks_without_both";
    if skip_without("qemu-io", name) || skip_without("ip", name) || skip_without("nft", name) {
        return;
    }
    let (ns, addrs) = match Netns::make(3) {
        Ok(v) => v,
        Err(e) => {
            skip(name, &format!("cannot make network namespaces: {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let dr2_link = LossyLink::on(
        ns.bridge_ip.into(),
        format!("{}:7001", addrs[2]).parse().unwrap(),
    )
    .unwrap();
    let dr2_via = format!("{}:{}", ns.bridge_ip, dr2_link.port);
    let cfgs = configs(dir.path(), &addrs, &dr2_via);
    let dr1 = Node::start_env(&ns.ferryd_in(1, dir.path()), &cfgs[1], &ENV);
    let dr2 = Node::start_env(&ns.ferryd_in(2, dir.path()), &cfgs[2], &ENV);
    let primary = Node::start_env(&ns.ferryd_in(0, dir.path()), &cfgs[0], &ENV);
    let st = primary.wait_status("both targets to stream across the links", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    assert_eq!(st["sync_policy"], "ANY 1 (dr1, dr2)", "{st:#}");
    let url = primary.url("vol0");

    // dr1 cut off, dr2 slow: each write is acknowledged once dr2 holds it (at least
    // dr2's round trip), never after waiting for dr1 (its sync timeout).
    ns.partition(1)
        .unwrap_or_else(|e| panic!("partition dr1: {e}"));
    dr2_link.set_delay(DR2_DELAY_MS);
    let writes: Vec<(u64, u8)> = (0..8u8).map(|i| (u64::from(i) * 65536, 0x40 + i)).collect();
    for &(offset, fill) in &writes {
        // The write is the journal's next record (qemu-io's closing flush follows it).
        let write_seq = seq(&primary.status(), "/last_seq") + 1;
        let t0 = Instant::now();
        assert_qemu_io_ok(&qemu_io(&url, &[format!("write -P {fill} {offset} {LEN}")]));
        let took = t0.elapsed();
        let st = primary.status();
        assert!(
            seq(target(&st, "dr2"), "/acked_seq") >= write_seq,
            "the write at {offset} was acknowledged before dr2 held it: {st:#}"
        );
        assert!(
            took < Duration::from_millis(SYNC_TIMEOUT_MS),
            "the write at {offset} took {took:?}: it waited for the partitioned dr1"
        );
        assert!(
            took >= Duration::from_millis(2 * u64::from(DR2_DELAY_MS)),
            "the write at {offset} was acknowledged in {took:?}, within dr2's round trip"
        );
        eprintln!("sync_policy (netns): a write under ANY 1 with dr1 partitioned took {took:?}");
    }
    no_sync_loss(&primary.status());
    applied_on(&primary, &dr2, "dr2");
    for &(offset, fill) in &writes {
        assert_eq!(
            on_disk(&cfgs[2], offset, LEN),
            vec![fill; LEN as usize],
            "dr2 lacks the acknowledged write at {offset}"
        );
    }

    // Both cut off: a write waits, past the sync timeout, with nothing recorded lost.
    ns.partition(2)
        .unwrap_or_else(|e| panic!("partition dr2: {e}"));
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let w = {
        let (done, url) = (done.clone(), url.clone());
        std::thread::spawn(move || {
            let out = qemu_io(&url, &[format!("write -P 0x77 1M {LEN}")]);
            done.store(true, Ordering::SeqCst);
            out
        })
    };
    let st = primary.wait_status("the write to show blocked on both", WAIT, |st| {
        target(st, "dr1")["writes_blocked"] == true && target(st, "dr2")["writes_blocked"] == true
    });
    no_sync_loss(&st);
    std::thread::sleep(Duration::from_millis(SYNC_TIMEOUT_MS + 1000));
    assert!(!done.load(Ordering::SeqCst), "the write did not wait");
    let st = primary.status();
    no_sync_loss(&st);
    assert_eq!(target(&st, "dr1")["writes_blocked"], true, "{st:#}");

    // dr1's partition lifted (dr2 stays cut off): it catches up and the write
    // completes.
    ns.heal(1).unwrap_or_else(|e| panic!("heal dr1: {e}"));
    let deadline = Instant::now() + WAIT;
    while !done.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the blocked write did not complete within {WAIT:?} of dr1's return; status: {:#}",
            primary.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_qemu_io_ok(&w.join().unwrap());
    eprintln!(
        "sync_policy (netns): the write blocked with both partitioned completed {:?} after it began",
        t0.elapsed()
    );
    let st = primary.wait_status("dr1's block to lift", WAIT, |st| {
        target(st, "dr1")["writes_blocked"] == false
    });
    no_sync_loss(&st);
    applied_on(&primary, &dr1, "dr1");
    assert_eq!(on_disk(&cfgs[1], 1 << 20, LEN), vec![0x77; LEN as usize]);
    for &(offset, fill) in &writes {
        assert_eq!(
            on_disk(&cfgs[1], offset, LEN),
            vec![fill; LEN as usize],
            "dr1 did not catch up with the write at {offset}"
        );
    }
}
