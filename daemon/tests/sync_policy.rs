//! `replication.sync` (issue 21, item 2) with real ferryd processes on loopback, each
//! replication address behind the userspace UDP proxy of pair.rs (delays and
//! partitions):
//!
//! * `ANY 1 (dr1, dr2)`, dr1 SIGKILLed: writes are acknowledged at dr2's pace (its
//!   link slowed, each write takes at least dr2's round trip), no sync loss is
//!   recorded and dr1 stays sync (it is never timed out: dr2 meets the policy); dr2,
//!   partitioned and SIGKILLed right after the last acknowledgement, holds every
//!   acknowledged write after a restart.
//! * `ANY 1`, `on_sync_loss = "block"` on both, both down: a write waits well past the
//!   sync timeout (status: writes blocked, nothing recorded lost), and completes once
//!   one of them (dr1, restarted) returns.
//! * `FIRST 1 (dr1, dr2)`: each write waits for dr1 (its link slowed, dr2's fast);
//!   with dr1 partitioned, the first write waits the sync timeout, dr1 is degraded
//!   (its sync loss recorded, status shows it) and the gate moves to dr2: writes go on
//!   at dr2's pace and every acknowledged write is on dr2.
#[path = "common/pair.rs"]
mod pair;
use pair::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::config::{Config, OnSyncLoss, ReplicationMode, Role, SyncPolicy, TargetConfig};
use ferry_testkit::udp_proxy::LossyLink;
use ferryd::testkit::{free_udp_port, Node};

/// Well above dr2's slowed round trip even on a loaded machine: a timeout here would
/// degrade the targets (and fail the test), so only a policy that waits for dr1
/// could reach it.
const SYNC_TIMEOUT_MS: u64 = 3000;
/// Each datagram to and from dr2 is held this long in phase one (ANY), and once dr1
/// is degraded (FIRST).
const DR2_DELAY_MS: u32 = 150;
/// Each datagram to and from dr1 is held this long while it leads FIRST 1.
const DR1_DELAY_MS: u32 = 150;
const WAIT: Duration = Duration::from_secs(30);

/// The status entry of target `name` on a primary.
fn target<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// `[primary, dr1, dr2]`'s configs (the primary under `policy`, each standby with the
/// primary as its own target) and the proxies in front of their replication
/// addresses.
fn three_nodes(dir: &Path, policy: &str) -> ([PathBuf; 3], [LossyLink; 3]) {
    let listen = [(); 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_udp_port())));
    let links = listen.map(|a| LossyLink::new(a).unwrap());
    let ca = ferry_transport::pki::ClusterCa::generate(CLUSTER).unwrap();
    let mut p = node_config(
        dir,
        "primary",
        Role::Primary,
        listen[0],
        ("dr1", links[1].port),
    );
    let r = p.replication.as_mut().unwrap();
    r.sync_timeout_ms = SYNC_TIMEOUT_MS;
    r.targets.push(TargetConfig {
        name: "dr2".into(),
        address: format!("127.0.0.1:{}", links[2].port),
        mode: ReplicationMode::Async,
        on_sync_loss: Default::default(),
        wan: Default::default(),
        max_lag_seconds: None,
    });
    r.sync = Some(SyncPolicy::parse(policy).unwrap());
    let standby = |name: &str, i: usize| {
        let c = node_config(
            dir,
            name,
            Role::Standby,
            listen[i],
            ("primary", links[0].port),
        );
        write_node(dir, &c, &ca)
    };
    let pcfg = write_node(dir, &p, &ca);
    ([pcfg, standby("dr1", 1), standby("dr2", 2)], links)
}

/// Sets `on_sync_loss` of every target in the primary's config file.
fn set_on_sync_loss(config: &Path, policy: OnSyncLoss) {
    let mut cfg = Config::load(config).unwrap();
    for t in &mut cfg.replication.as_mut().unwrap().targets {
        t.on_sync_loss = policy;
    }
    std::fs::write(config, cfg.to_toml()).unwrap();
}

/// The 4 KiB block at `offset` of the node's volume file.
fn block_on_disk(config: &Path, offset: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let path = Config::load(config).unwrap().volumes[0].path.clone();
    let mut b = vec![0u8; 4096];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

fn no_sync_loss(st: &serde_json::Value) {
    for name in ["dr1", "dr2"] {
        let t = target(st, name);
        assert!(t["sync_loss_at"].is_null(), "{name}: {st:#}");
        assert_eq!(t["effective_mode"], "sync", "{name}: {st:#}");
    }
}

#[test]
fn any_one_of_two_goes_on_at_the_live_ones_pace_and_blocks_when_both_are_down() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, dr1cfg, dr2cfg], links) = three_nodes(dir.path(), "ANY 1 (dr1, dr2)");
    let mut dr1 = Node::start_env(ferryd(), &dr1cfg, &TEST_ENV);
    let mut dr2 = Node::start_env(ferryd(), &dr2cfg, &TEST_ENV);
    let mut primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "both targets to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 0, 0xa0), 0);
    let st = status(&primary).unwrap();
    assert_eq!(st["sync_policy"], "ANY 1 (dr1, dr2)", "{st:#}");

    // Phase one: dr1 gone, dr2 slow. Each write waits for dr2 (at least its round
    // trip), never for dr1: nothing times out, nothing is recorded lost.
    dr1.kill();
    links[2].set_delay(DR2_DELAY_MS);
    let tags: Vec<(u64, u8)> = (0..6u8)
        .map(|i| (4096 * (1 + i as u64), 0xb0 + i))
        .collect();
    for &(offset, tag) in &tags {
        let t0 = Instant::now();
        assert_eq!(write(p_addr, offset, tag), 0, "write at {offset}");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(2 * u64::from(DR2_DELAY_MS)),
            "acknowledged in {took:?}, before dr2 could hold it"
        );
        eprintln!("sync_policy: a write under ANY 1 with dr1 down took {took:?}");
    }
    // Nothing more reaches dr2; it is SIGKILLed, and restarts still cut off.
    links[2].pause(true);
    let st = status(&primary).unwrap();
    no_sync_loss(&st);
    dr2.kill();
    let dr2 = Node::start_env(ferryd(), &dr2cfg, &TEST_ENV);
    let st = wait(&dr2, "dr2 to restart and apply what it holds", WAIT, |st| {
        let (applied, durable) = (st["applied_seq"].as_u64(), st["durable_seq"].as_u64());
        st["role"] == "standby"
            && applied.is_some_and(|a| durable.is_some_and(|d| a >= d))
            && st["replica"] == "consistent"
    });
    assert!(st["sync_loss_at"].is_null(), "{st:#}");
    for &(offset, tag) in &tags {
        assert_eq!(
            block_on_disk(&dr2cfg, offset),
            block(tag),
            "dr2 lacks the acknowledged write at {offset}"
        );
    }

    // Phase two: `block` on both (a restart applies it), dr2 back, then both down.
    let code = primary.terminate();
    assert!(code.success(), "{code}\n{}", primary.log_text());
    set_on_sync_loss(&pcfg, OnSyncLoss::Block);
    links[2].heal();
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr2 to stream", WAIT, |st| {
        target(st, "dr2")["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 8 << 12, 0xc1), 0, "dr2 alone meets ANY 1");
    links[2].pause(true);
    let done = Arc::new(AtomicBool::new(false));
    let w = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = write(p_addr, 9 << 12, 0xc2);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let st = wait(&primary, "the write to show blocked on both", WAIT, |st| {
        target(st, "dr1")["writes_blocked"] == true && target(st, "dr2")["writes_blocked"] == true
    });
    no_sync_loss(&st);
    // Well past the sync timeout: still waiting.
    std::thread::sleep(Duration::from_millis(SYNC_TIMEOUT_MS));
    assert!(!done.load(Ordering::SeqCst), "the write did not wait");
    no_sync_loss(&status(&primary).unwrap());

    // dr1 returns (dr2 stays cut off): it catches up and the write completes.
    let _dr1 = Node::start_env(ferryd(), &dr1cfg, &TEST_ENV);
    assert_eq!(w.join().unwrap(), 0, "the write completes once dr1 is back");
    let st = wait(&primary, "dr1's block to lift", WAIT, |st| {
        target(st, "dr1")["writes_blocked"] == false
    });
    no_sync_loss(&st);
    assert_eq!(read(p_addr, 9 << 12), block(0xc2));
}

/// Writes `tag`'s block at `offset` and returns how long the acknowledgement took.
fn timed_write(p_addr: SocketAddr, offset: u64, tag: u8) -> Duration {
    let t0 = Instant::now();
    assert_eq!(write(p_addr, offset, tag), 0, "write at {offset}");
    t0.elapsed()
}

#[test]
fn first_one_of_two_waits_for_the_first_and_moves_to_the_second_once_it_degrades() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, dr1cfg, dr2cfg], links) = three_nodes(dir.path(), "FIRST 1 (dr1, dr2)");
    let _dr1 = Node::start_env(ferryd(), &dr1cfg, &TEST_ENV);
    let dr2 = Node::start_env(ferryd(), &dr2cfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "both targets to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 0, 0xa0), 0);
    let st = status(&primary).unwrap();
    assert_eq!(st["sync_policy"], "FIRST 1 (dr1, dr2)", "{st:#}");

    // Phase one: dr1 slow, dr2 fast. Each write waits for dr1 (at least its round
    // trip), though dr2 holds it long before.
    links[1].set_delay(DR1_DELAY_MS);
    let mut tags: Vec<(u64, u8)> = Vec::new();
    for i in 0..4u8 {
        let (offset, tag) = (4096 * (1 + u64::from(i)), 0xb0 + i);
        let took = timed_write(p_addr, offset, tag);
        assert!(
            took >= Duration::from_millis(2 * u64::from(DR1_DELAY_MS)),
            "acknowledged in {took:?}, before dr1 could hold it (FIRST 1 waits for dr1)"
        );
        eprintln!("sync_policy: a write under FIRST 1 with dr1 slowed took {took:?}");
        tags.push((offset, tag));
    }
    let st = status(&primary).unwrap();
    no_sync_loss(&st);
    let rtt = |name: &str| target(&st, name)["rtt_us"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "sync_policy: round trips: dr1 {} us (slowed), dr2 {} us",
        rtt("dr1"),
        rtt("dr2")
    );
    assert!(
        rtt("dr2") < u64::from(DR1_DELAY_MS) * 1000,
        "dr2 was not the fast one: {st:#}"
    );

    // Phase two: dr1 cut off. The next write waits the sync timeout for it, then dr1
    // is degraded (its loss recorded) and the gate moves to dr2.
    links[1].pause(true);
    links[2].set_delay(DR2_DELAY_MS);
    let took = timed_write(p_addr, 16 << 12, 0xc0);
    tags.push((16 << 12, 0xc0));
    assert!(
        took >= Duration::from_millis(SYNC_TIMEOUT_MS),
        "acknowledged in {took:?} without dr1, before its sync timeout"
    );
    eprintln!("sync_policy: the write under FIRST 1 when dr1 was cut off took {took:?}");
    let st = wait(&primary, "dr1's sync loss to show", WAIT, |st| {
        target(st, "dr1")["sync_loss_at"].is_u64()
    });
    assert_eq!(
        target(&st, "dr1")["effective_mode"],
        "async (degraded)",
        "{st:#}"
    );
    assert!(target(&st, "dr2")["sync_loss_at"].is_null(), "{st:#}");
    assert_eq!(target(&st, "dr2")["effective_mode"], "sync", "{st:#}");

    // Writes go on at dr2's pace: its round trip each, never dr1's timeout again.
    for i in 0..4u8 {
        let (offset, tag) = (4096 * (17 + u64::from(i)), 0xd0 + i);
        let took = timed_write(p_addr, offset, tag);
        assert!(
            took >= Duration::from_millis(2 * u64::from(DR2_DELAY_MS))
                && took < Duration::from_millis(SYNC_TIMEOUT_MS),
            "acknowledged in {took:?}: not at dr2's pace (its round trip, under the sync timeout)"
        );
        eprintln!("sync_policy: a write under FIRST 1 with dr1 degraded took {took:?}");
        tags.push((offset, tag));
    }
    let st = status(&primary).unwrap();
    assert!(target(&st, "dr1")["sync_loss_at"].is_u64(), "{st:#}");
    assert!(target(&st, "dr2")["sync_loss_at"].is_null(), "{st:#}");

    // Every acknowledged write is on dr2.
    let last = st["durable_seq"].as_u64().unwrap_or(0);
    wait(&primary, "dr2 to hold every write", WAIT, |st| {
        target(st, "dr2")["acked_seq"].as_u64() >= Some(last)
    });
    wait(&dr2, "dr2 to apply every write", WAIT, |st| {
        st["applied_seq"].as_u64() >= Some(last) && st["replica"] == "consistent"
    });
    for &(offset, tag) in &tags {
        assert_eq!(
            block_on_disk(&dr2cfg, offset),
            block(tag),
            "dr2 lacks the acknowledged write at {offset}"
        );
    }
}
