//! `replication.sync = "ANY 1 (dr1, dr2)"` (issue 21, item 2) with real ferryd
//! processes on loopback, each replication address behind the userspace UDP proxy of
//! pair.rs (delays and partitions):
//!
//! * dr1 SIGKILLed: writes are acknowledged at dr2's pace (its link slowed, each write
//!   takes at least dr2's round trip), no sync loss is recorded and dr1 stays sync (it
//!   is never timed out: dr2 meets the policy); dr2, partitioned and SIGKILLed right
//!   after the last acknowledgement, holds every acknowledged write after a restart.
//! * `on_sync_loss = "block"` on both, both down: a write waits well past the sync
//!   timeout (status: writes blocked, nothing recorded lost), and completes once one of
//!   them (dr1, restarted) returns.
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
/// Each datagram to and from dr2 is held this long in phase one.
const DR2_DELAY_MS: u32 = 150;
const WAIT: Duration = Duration::from_secs(30);

/// The status entry of target `name` on a primary.
fn target<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// `[primary, dr1, dr2]`'s configs (the primary under `ANY 1 (dr1, dr2)`, each
/// standby with the primary as its own target) and the proxies in front of their
/// replication addresses.
fn three_nodes(dir: &Path) -> ([PathBuf; 3], [LossyLink; 3]) {
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
    r.sync = Some(SyncPolicy::parse("ANY 1 (dr1, dr2)").unwrap());
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
    let ([pcfg, dr1cfg, dr2cfg], links) = three_nodes(dir.path());
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
