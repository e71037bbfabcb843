//! Sync mode's promise (issue 16, path 11), with real ferryd processes and the
//! userspace UDP proxy in front of each replication address (pair.rs):
//!
//! * `on_sync_loss = "degrade"` (the default): a sync target that misses the timeout
//!   is degraded and writes go on, but only after the primary recorded durably where
//!   it lost sync; the standby hears it in the primary's heartbeats and keeps it (it
//!   may be partitioned from then on, or restarted), and `promote` refuses without
//!   `--force` — with it, the promote goes on and the audit log has it.
//! * `on_sync_loss = "block"`: the write waits while the target is cut off (status
//!   says so) and completes once it is back.
#[path = "common/pair.rs"]
mod pair;
use pair::*;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::config::{Config, OnSyncLoss};
use ferry_api::control::{call, Request};
use ferryd::testkit::Node;

/// What the standby can know honestly: it hears the loss only from a heartbeat. The
/// link is slowed (each datagram held 700 ms, both ways: a round trip above the 1 s
/// sync timeout) while a client keeps writing, so the target is degraded while still
/// connected and heartbeats tell it so; then the link is cut before it catches up.
/// Everything it was told survives a restart; promote refuses, naming the sequence,
/// until --force.
#[test]
fn path11_a_standby_told_it_lost_sync_refuses_promote_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], links) = cluster(dir.path());
    let mut dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 0, 0xa1), 0, "a synchronous write");
    let st = status(&dr1).unwrap();
    assert_eq!(st["sync_loss_at"], serde_json::Value::Null, "{st:#}");

    for l in &links {
        l.set_delay(700);
    }
    let writer = Writer::start(p_addr);
    let st = wait(
        &primary,
        "the primary to record dr1's sync loss",
        Duration::from_secs(30),
        |st| st["targets"][0]["sync_loss_at"].is_u64(),
    );
    assert_eq!(
        st["targets"][0]["effective_mode"], "async (degraded)",
        "{st:#}"
    );
    let lost_at = st["targets"][0]["sync_loss_at"].as_u64().unwrap();
    let st = wait(
        &dr1,
        "dr1 to hear it lost sync",
        Duration::from_secs(30),
        |st| st["sync_loss_at"].is_u64(),
    );
    partition(&links, true);
    let told = st["sync_loss_at"].as_u64().unwrap();
    assert!(told <= lost_at, "told {told}, recorded {lost_at}");
    let acked = writer.stop();
    assert!(acked > 0, "writes went on without the target");

    // Partitioned from now on, and restarted: it still knows.
    let code = dr1.terminate();
    assert!(code.success(), "{code}\n{}", dr1.log_text());
    let dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let st = wait(&dr1, "dr1 to restart", Duration::from_secs(30), |st| {
        st["role"] == "standby"
    });
    assert_eq!(st["sync_loss_at"].as_u64(), Some(told), "{st:#}");

    let cfg = Config::load(&scfg).unwrap();
    let refused = call(
        &cfg.control.socket,
        &Request::Promote {
            target: None,
            force: false,
        },
    )
    .unwrap();
    assert!(!refused.ok, "promote went on: {refused:?}");
    let why = refused.error.unwrap_or_default();
    assert!(
        why.contains(&format!("lost sync at sequence {told}")) && why.contains("--force"),
        "{why}"
    );
    let st = status(&dr1).unwrap();
    assert_eq!(st["role"], "standby", "{st:#}");

    let done = control(
        &dr1,
        &Request::Promote {
            target: None,
            force: true,
        },
    );
    assert_eq!(done["forced_past_sync_loss"].as_u64(), Some(told), "{done}");
    primary_of(&dr1, 2);
    let audit = promote_audit(&cfg.audit_log_path());
    assert!(
        audit.iter().any(|(force, result, message)| !force
            && result == "error"
            && message.contains(&format!("sequence {told}"))),
        "the refusal is not in the audit log: {audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|(force, result, _)| *force && result == "ok"),
        "the forced promote is not in the audit log: {audit:?}"
    );
    let st = status(&dr1).unwrap();
    assert_eq!(
        st["sync_loss_at"],
        serde_json::Value::Null,
        "the old primary's word no longer applies: {st:#}"
    );
}

/// Caught up, the standby is told so: the record clears on both sides and promote
/// needs no --force for it.
#[test]
fn path11_a_standby_that_caught_up_is_told_it_holds_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], links) = cluster(dir.path());
    let dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    for l in &links {
        l.set_delay(700);
    }
    let writer = Writer::start(p_addr);
    wait(
        &dr1,
        "dr1 to hear it lost sync",
        Duration::from_secs(30),
        |st| st["sync_loss_at"].is_u64(),
    );
    writer.stop();
    for l in &links {
        l.heal();
    }
    let st = wait(
        &primary,
        "the primary to clear dr1's sync loss",
        Duration::from_secs(30),
        |st| st["targets"][0]["sync_loss_at"].is_null(),
    );
    assert_eq!(st["targets"][0]["effective_mode"], "sync", "{st:#}");
    wait(
        &dr1,
        "dr1 to hear it caught up",
        Duration::from_secs(30),
        |st| st["sync_loss_at"].is_null(),
    );
}

/// `on_sync_loss = "block"`: a write waits while the target is cut off, however long
/// past the sync timeout (status: writes blocked, still sync), and completes once the
/// target is back; nothing is recorded as lost.
#[test]
fn path11_block_makes_writes_wait_for_a_cut_off_sync_target() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], links) = cluster(dir.path());
    let mut cfg = Config::load(&pcfg).unwrap();
    cfg.replication.as_mut().unwrap().targets[0].on_sync_loss = OnSyncLoss::Block;
    std::fs::write(&pcfg, cfg.to_toml()).unwrap();
    let _dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 0, 0xa1), 0);

    partition(&links, true);
    let done = Arc::new(AtomicBool::new(false));
    let w = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = write(p_addr, 4096, 0xb2);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let st = wait(
        &primary,
        "status to show the write blocked",
        Duration::from_secs(30),
        |st| st["targets"][0]["writes_blocked"] == true,
    );
    assert_eq!(st["targets"][0]["effective_mode"], "sync", "{st:#}");
    // Well past the 1 s sync timeout: still waiting.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !done.load(Ordering::SeqCst),
        "the write did not wait for the target"
    );
    let st = status(&primary).unwrap();
    assert_eq!(
        st["targets"][0]["sync_loss_at"],
        serde_json::Value::Null,
        "{st:#}"
    );

    partition(&links, false);
    assert_eq!(
        w.join().unwrap(),
        0,
        "the write completes once the target is back"
    );
    wait(
        &primary,
        "the block to lift",
        Duration::from_secs(30),
        |st| st["targets"][0]["writes_blocked"] == false,
    );
}

/// A client writing one block after another (each flushed) until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(addr: std::net::SocketAddr) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let offset = 4096 * (1 + i % 512);
                    assert_eq!(write(addr, offset, (i % 251) as u8), 0, "write {i}");
                    acked.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Writer {
            stop,
            acked,
            thread,
        }
    }

    /// Stops it; the writes it had acknowledged.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("writer");
        self.acked.load(Ordering::SeqCst)
    }
}

/// The promote lines of an audit log: (force, result, message).
fn promote_audit(path: &Path) -> Vec<(bool, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["request"] == "promote")
        .map(|v| {
            (
                v["args"]["force"] == true,
                v["result"].as_str().unwrap_or_default().to_string(),
                v["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
