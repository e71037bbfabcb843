//! `volume.cache` against real crashes: ferryd processes killed with SIGKILL while an
//! NBD client writes one 4 KiB block after another (each block its own pattern), then
//! restarted. Each mode keeps what it promises:
//! * writethrough: every acknowledged write;
//! * writeback: every write acknowledged before a completed FLUSH, and every FUA
//!   write; the volume is a prefix of the writes issued (what the journal recovered,
//!   never a later write without an earlier one), and a standby converges to it
//!   byte for byte;
//! * writethrough-until-flush: writethrough before the first FLUSH, writeback after
//!   it (status shows the switch);
//! * writeback with a sync standby killed: every write flushed before the kill is on
//!   the standby once it restarts and catches up;
//! * writeback with a sync standby and the primary killed (protocol B: replies wait
//!   until the standby has received the write): every acknowledged write, flushed or
//!   not, is on the standby once it has made durable what it received, and on the
//!   restarted primary.
#[path = "common/pair.rs"]
mod pair;
use pair::*;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::config::{CacheMode, Config, ReplicationMode};
use ferry_nbd::testclient::TestClient;
use ferryd::testkit::{primary_config, set_volume_cache, Node};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = VOLUME_BYTES / BLOCK;

/// Block `i`'s pattern in `round`: a fill byte, and `i + 1` and the round up front.
fn pattern(i: u64, round: u8) -> Vec<u8> {
    let mut b = vec![(i % 251) as u8 + 1; BLOCK as usize];
    b[..8].copy_from_slice(&(i + 1).to_le_bytes());
    b[8] = round;
    b
}

/// How the writer mixes in FUA writes and FLUSHes (0: never).
#[derive(Clone, Copy)]
struct Plan {
    fua_every: u64,
    flush_every: u64,
    round: u8,
}

/// What the writer was told before its connection died.
#[derive(Debug, Default)]
struct Seen {
    acked: Vec<u64>,
    fua: Vec<u64>,
    /// Blocks `0..flushed` were written before a FLUSH that completed.
    flushed: u64,
}

/// The writer's counts so far, read while it runs.
#[derive(Default)]
struct Progress {
    acked: AtomicU64,
    /// Blocks before this one were covered by a completed FLUSH.
    flushed: AtomicU64,
}

/// Writes blocks 0, 1, 2, … one at a time until the connection fails or the volume
/// ends, counting in `progress`.
fn writer(addr: SocketAddr, plan: Plan, progress: Arc<Progress>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        let Ok((mut c, _)) = TestClient::open(addr, VOLUME) else {
            return seen;
        };
        for i in 0..BLOCKS {
            let fua = plan.fua_every > 0 && i % plan.fua_every == plan.fua_every - 1;
            let flags = if fua {
                ferry_nbd::proto::CMD_FLAG_FUA
            } else {
                0
            };
            match c.write(i * BLOCK, &pattern(i, plan.round), flags) {
                Ok(0) => seen.acked.push(i),
                _ => break,
            }
            if fua {
                seen.fua.push(i);
            }
            progress.acked.store(i + 1, Ordering::SeqCst);
            if plan.flush_every > 0 && i % plan.flush_every == plan.flush_every - 1 {
                match c.flush() {
                    Ok(0) => seen.flushed = i + 1,
                    _ => break,
                }
                progress.flushed.store(i + 1, Ordering::SeqCst);
            }
        }
        seen
    })
}

/// Runs the writer until `kill_after` writes are acknowledged, then `kill`s; returns
/// what the writer saw (checked to have stopped mid-workload).
fn write_then_kill(addr: SocketAddr, plan: Plan, kill_after: u64, kill: impl FnOnce()) -> Seen {
    let progress = Arc::new(Progress::default());
    let w = writer(addr, plan, progress.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.acked.load(Ordering::SeqCst) < kill_after {
        assert!(!w.is_finished(), "the writer stopped early");
        assert!(
            Instant::now() < deadline,
            "the writer made no progress to {kill_after} writes within 120 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    kill();
    let seen = w.join().unwrap();
    assert!(
        (seen.acked.len() as u64) < BLOCKS,
        "the kill came after the workload finished; the test proved nothing"
    );
    seen
}

/// The whole volume through NBD.
fn image(addr: SocketAddr) -> Vec<u8> {
    let (mut c, _) = TestClient::open(addr, VOLUME).unwrap();
    let mut out = Vec::with_capacity(VOLUME_BYTES as usize);
    for off in (0..VOLUME_BYTES).step_by(1 << 20) {
        out.extend(c.read(off, 1 << 20).unwrap().expect("read refused"));
    }
    out
}

fn block_of(img: &[u8], i: u64) -> &[u8] {
    &img[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize]
}

/// Which blocks hold their pattern of `round`; fails on a block that holds anything
/// but that, zeroes or its pattern of round `before` (a torn or misplaced write).
fn present_over(img: &[u8], round: u8, before: Option<u8>) -> Vec<bool> {
    (0..BLOCKS)
        .map(|i| {
            let b = block_of(img, i);
            if b == pattern(i, round).as_slice() {
                return true;
            }
            let old = before.is_some_and(|r| b == pattern(i, r).as_slice());
            assert!(
                old || b.iter().all(|&x| x == 0),
                "block {i} holds neither its write nor what it held before"
            );
            false
        })
        .collect()
}

fn present(img: &[u8], round: u8) -> Vec<bool> {
    present_over(img, round, None)
}

fn assert_all_present(have: &[bool], blocks: &[u64], what: &str) {
    let missing: Vec<_> = blocks.iter().filter(|&&i| !have[i as usize]).collect();
    assert!(
        missing.is_empty(),
        "{what} missing after the restart: blocks {missing:?}"
    );
}

/// The writes are issued one at a time and the journal keeps their order: what a
/// crash leaves is a prefix of them (the journal's recovered records), never a later
/// write without an earlier one. Returns the prefix's length.
fn assert_prefix(have: &[bool]) -> u64 {
    let n = have.iter().take_while(|&&p| p).count();
    assert!(
        have[n..].iter().all(|&p| !p),
        "block {} is present although block {n} is not: not a prefix of the writes",
        n + have[n..].iter().position(|&p| p).unwrap_or(0)
    );
    n as u64
}

fn lone_primary(dir: &Path, cache: CacheMode) -> std::path::PathBuf {
    let cfg = primary_config(dir, &[(VOLUME, VOLUME_BYTES)], 32 << 20, 4 << 20);
    set_volume_cache(&cfg, cache);
    cfg
}

fn volume_status(node: &Node) -> serde_json::Value {
    node.status()["volumes"][0].clone()
}

#[test]
fn writethrough_a_killed_primary_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = lone_primary(dir.path(), CacheMode::Writethrough);
    let mut node = Node::start(ferryd(), &cfg);
    let plan = Plan {
        fua_every: 0,
        flush_every: 50,
        round: 1,
    };
    let seen = write_then_kill(node.nbd.unwrap(), plan, 300, || node.kill());
    let node = Node::start(ferryd(), &cfg);
    let have = present(&image(node.nbd.unwrap()), 1);
    assert_all_present(&have, &seen.acked, "acknowledged writes");
    assert_prefix(&have);
    let v = volume_status(&node);
    assert_eq!(
        (v["cache"].as_str(), v["cache_effective"].as_str()),
        (Some("writethrough"), Some("writethrough"))
    );
}

/// Writeback: flushed and FUA writes survive a primary's SIGKILL, the volume is the
/// journal's prefix, and an async standby converges to exactly that volume.
#[test]
fn writeback_a_killed_primary_keeps_flushed_and_fua_writes_and_its_standby_converges() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], _links) = cluster(dir.path());
    for cfg in [&pcfg, &scfg] {
        let mut c = Config::load(cfg).unwrap();
        c.volumes[0].cache = CacheMode::Writeback;
        // Async: what the writeback promise alone keeps, without a standby holding
        // every acknowledged write (the sync case is the protocol B test below).
        if let Some(r) = c.replication.as_mut() {
            r.targets[0].mode = ReplicationMode::Async;
        }
        std::fs::write(cfg, c.to_toml()).unwrap();
    }
    let _dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let mut primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let plan = Plan {
        fua_every: 7,
        flush_every: 40,
        round: 2,
    };
    let seen = write_then_kill(primary_of(&primary, 1), plan, 400, || primary.kill());
    assert!(seen.flushed > 0 && !seen.fua.is_empty(), "{seen:?}");

    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    let addr = primary_of(&primary, 1);
    let img = image(addr);
    let have = present(&img, 2);
    let flushed: Vec<u64> = (0..seen.flushed).collect();
    assert_all_present(&have, &flushed, "writes flushed before the kill");
    assert_all_present(&have, &seen.fua, "FUA writes");
    let n = assert_prefix(&have);
    eprintln!(
        "{} writes acknowledged, {} flushed, {n} recovered",
        seen.acked.len(),
        seen.flushed
    );
    let v = volume_status(&primary);
    assert_eq!(
        (v["cache"].as_str(), v["cache_effective"].as_str()),
        (Some("writeback"), Some("writeback"))
    );

    let st = wait(
        &primary,
        "dr1 to hold everything",
        Duration::from_secs(60),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["applied_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );
    let standby = std::fs::read(dir.path().join("dr1").join(format!("{VOLUME}.img"))).unwrap();
    assert!(
        standby == img,
        "the standby differs from the restarted primary; status {st:#}"
    );
}

/// The default: writethrough until the first FLUSH (acknowledged writes survive a
/// SIGKILL), then writeback (flushed writes survive), shown by status.
#[test]
fn writethrough_until_flush_switches_at_the_first_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = lone_primary(dir.path(), CacheMode::WritethroughUntilFlush);
    let mut node = Node::start(ferryd(), &cfg);
    let v = volume_status(&node);
    assert_eq!(
        (v["cache"].as_str(), v["cache_effective"].as_str()),
        (Some("writethrough-until-flush"), Some("writethrough"))
    );
    let plan = Plan {
        fua_every: 0,
        flush_every: 0,
        round: 3,
    };
    let seen = write_then_kill(node.nbd.unwrap(), plan, 200, || node.kill());
    let mut node = Node::start(ferryd(), &cfg);
    let have = present(&image(node.nbd.unwrap()), 3);
    assert_all_present(&have, &seen.acked, "writes acknowledged before any FLUSH");
    assert_eq!(
        volume_status(&node)["cache_effective"].as_str(),
        Some("writethrough"),
        "a restart starts writethrough again"
    );

    let (mut c, _) = TestClient::open(node.nbd.unwrap(), VOLUME).unwrap();
    assert_eq!(c.flush().unwrap(), 0);
    drop(c);
    assert_eq!(
        volume_status(&node)["cache_effective"].as_str(),
        Some("writeback")
    );
    let plan = Plan {
        fua_every: 9,
        flush_every: 30,
        round: 4,
    };
    let seen = write_then_kill(node.nbd.unwrap(), plan, 200, || node.kill());
    let node = Node::start(ferryd(), &cfg);
    let have = present_over(&image(node.nbd.unwrap()), 4, Some(3));
    let flushed: Vec<u64> = (0..seen.flushed).collect();
    assert_all_present(&have, &flushed, "writes flushed before the kill");
    assert_all_present(&have, &seen.fua, "FUA writes");
    assert_prefix(&have);
}

/// Writeback with a sync standby killed mid-workload: the primary degrades it and
/// goes on; once restarted and caught up, the standby holds every write flushed
/// before the kill, and its volume equals the primary's.
#[test]
fn writeback_a_killed_sync_standby_gets_every_flushed_write_after_it_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], _links) = cluster(dir.path());
    for cfg in [&pcfg, &scfg] {
        set_volume_cache(cfg, CacheMode::Writeback);
    }
    let mut dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let addr = primary_of(&primary, 1);
    let plan = Plan {
        fua_every: 0,
        flush_every: 20,
        round: 5,
    };
    // The standby dies; the writer goes on (the target degrades after its sync
    // timeout) until it is told to stop by the volume's end or 200 more writes.
    let progress = Arc::new(Progress::default());
    let w = writer(addr, plan, progress.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.acked.load(Ordering::SeqCst) < 200 {
        assert!(Instant::now() < deadline && !w.is_finished(), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Read first: a FLUSH that completes while the kill lands counts as after it.
    let flushed_at_kill = progress.flushed.load(Ordering::SeqCst);
    dr1.kill();
    let seen = w.join().unwrap();
    assert!(seen.flushed >= flushed_at_kill, "{seen:?}");

    let _dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let st = wait(
        &primary,
        "dr1 to catch up",
        Duration::from_secs(120),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["applied_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );
    let img = image(addr);
    let standby = std::fs::read(dir.path().join("dr1").join(format!("{VOLUME}.img"))).unwrap();
    let have = present(&standby, 5);
    let flushed: Vec<u64> = (0..flushed_at_kill).collect();
    assert_all_present(&have, &flushed, "writes flushed before the standby's kill");
    assert!(
        standby == img,
        "the standby differs from the primary; status {st:#}"
    );
}

/// Writeback with a sync standby (protocol B, V4 received acks): a write's reply waits
/// until the standby has received it, not until it is durable there. With the primary
/// SIGKILLed mid-workload (no FLUSH ever: every write is only acknowledged), the
/// standby, left running, makes durable and applies what it received, and then holds
/// every acknowledged write; so does the restarted primary.
#[test]
fn writeback_with_a_sync_standby_a_killed_primary_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], _links) = cluster(dir.path());
    for cfg in [&pcfg, &scfg] {
        set_volume_cache(cfg, CacheMode::Writeback);
        let c = Config::load(cfg).unwrap();
        if let Some(r) = c.replication.as_ref() {
            assert_eq!(r.targets[0].mode, ReplicationMode::Sync, "a sync standby");
        }
    }
    let dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let mut primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    assert!(
        primary.log_text().contains("received_acks=true"),
        "the primary did not ask its sync standby for received acks; log:\n{}",
        primary.log_text()
    );
    let plan = Plan {
        fua_every: 0,
        flush_every: 0,
        round: 6,
    };
    let seen = write_then_kill(primary_of(&primary, 1), plan, 300, || primary.kill());
    assert_eq!(seen.flushed, 0);

    // The standby drains: its journal makes durable what it received, the applier
    // writes it to the replica. Settled = applied == durable, unchanged for a while.
    let mut last = (0, 0);
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = dr1.status();
        let now = (
            st["durable_seq"].as_u64().unwrap_or(0),
            st["applied_seq"].as_u64().unwrap_or(0),
        );
        if now != last || now.0 != now.1 {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not settle within 60 s; status {st:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let standby = std::fs::read(dir.path().join("dr1").join(format!("{VOLUME}.img"))).unwrap();
    let have = present(&standby, 6);
    assert_all_present(
        &have,
        &seen.acked,
        "acknowledged writes on the standby after the primary's kill",
    );
    let n = assert_prefix(&have);
    eprintln!(
        "{} writes acknowledged, {n} on the standby (durable {}, applied {})",
        seen.acked.len(),
        last.0,
        last.1
    );

    // Everything the standby received was durable on the primary first.
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    let have = present(&image(primary_of(&primary, 1)), 6);
    assert_all_present(
        &have,
        &seen.acked,
        "acknowledged writes on the restarted primary",
    );
    assert_prefix(&have);
}
