//! Storage and protocol faults injected into real ferryd processes (cargo feature
//! `failpoints`: `cargo test -p ferryd --features failpoints --test failpoints`).
//! Failpoints are armed through the `FAILPOINTS` environment variable of the spawned
//! daemon (daemon/FAILPOINTS.md); each test owns its processes.
use std::path::Path;
use std::time::Duration;

use ferryd::testkit::{assert_qemu_io_ok, primary_config, qemu_io, skip_without, Node};

#[path = "common/test_primary.rs"]
mod test_primary;
use test_primary::{answer, connect, standby_config, write_set, Answer, MIB};

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A test primary sends write-set 1 (block 0 filled with 0xab) to the standby `node`
/// listening on `addr`; returns once it is durable there and applied.
fn apply_first_write_set(
    node: &Node,
    addr: std::net::SocketAddr,
    tls: &ferry_transport::quic::TlsMaterial,
) {
    let epoch = node.status()["epoch"].as_u64().expect("epoch");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = connect(addr, tls, epoch).await;
        match answer(&mut s, write_set(epoch, 1, 0, 0xab)).await {
            Answer::Durable(1) => {}
            other => panic!("the standby did not take the write-set: {other:?}"),
        }
        s.conn.close(0u32.into(), b"test done");
    });
    node.wait_status("the write-set applied", Duration::from_secs(20), |st| {
        st["applied_seq"].as_u64() == Some(1)
    });
}

/// Issue 16, path 1 ("fsyncgate"): the first fsync of the base after acknowledged
/// writes fails. Linux may then drop the failed pages, so a retried fsync succeeds
/// without the data on disk. The checkpoint must not pass those writes: the group
/// stops (status, EIO) and a restart replays them from the journal. The lost pages
/// are simulated by putting back, while the daemon is down, what the file held
/// before the writes.
#[test]
fn fsync_failure_on_a_base_never_lets_the_checkpoint_pass_its_writes() {
    let name = "fsync_failure_on_a_base_never_lets_the_checkpoint_pass_its_writes";
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 16 * MIB)], 64 * MIB, 4 * MIB);
    let mut node = Node::start_env(
        ferryd(),
        &cfg,
        &[("FAILPOINTS", "ferryd::base_fsync=1*return(EIO)")],
    );
    let url = node.url("vol0");
    assert_qemu_io_ok(&qemu_io(&url, &cmds(&["write -P 0xab 0 1M"])));
    let last = node.status()["last_seq"].as_u64().unwrap();
    // The first checkpoint (500 ms interval) fails; give the retries time to run.
    node.wait_status(
        "the first checkpoint attempt",
        Duration::from_secs(30),
        |_| node.log_text().contains("Input/output error"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = node.status();
    assert!(
        st["checkpoint_seq"].as_u64().unwrap() < last,
        "the checkpoint passed writes whose fsync failed: {st:#}\nlog:\n{}",
        node.log_text()
    );
    assert_eq!(
        st["failed"], true,
        "status must show the stopped group: {st:#}"
    );
    assert!(
        st["writes_refused"]
            .as_str()
            .unwrap_or("")
            .contains("fsync"),
        "{st:#}"
    );
    let refused = qemu_io(&url, &cmds(&["write -P 0xcd 2M 4k"]));
    let out = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        out.contains("Input/output error"),
        "a write after the failed fsync must fail with EIO: {out}"
    );
    node.kill();

    // What the disk holds after the kernel dropped the failed pages: the old zeros.
    let img = dir.path().join("primary/vol0.img");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; MIB as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let node = Node::start(ferryd(), &cfg);
    assert_qemu_io_ok(&qemu_io(&node.url("vol0"), &cmds(&["read -P 0xab 0 1M"])));
    let st = node.status();
    assert_eq!(st["failed"], false, "{st:#}");
    assert!(st["checkpoint_seq"].as_u64().unwrap() >= last, "{st:#}");
}

/// Issue 16, path 1, on a standby: the first fsync of the replica after a write-set
/// was applied fails. The standby's checkpoint must not pass it either: apply stops
/// (status shows why) and a restart replays the write-set from the standby journal.
/// The lost pages are simulated as above.
#[test]
fn fsync_failure_on_a_replica_never_lets_the_checkpoint_pass_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr, tls) = standby_config(dir.path(), true);
    let img = dir.path().join("primary/vol0.img");
    let mut node = Node::start_env(
        ferryd(),
        &cfg,
        &[("FAILPOINTS", "ferryd::base_fsync=1*return(EIO)")],
    );
    apply_first_write_set(&node, addr, &tls);
    node.wait_status(
        "the first checkpoint attempt",
        Duration::from_secs(30),
        |_| node.log_text().contains("Input/output error"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = node.status();
    assert!(
        st["checkpoint_seq"].as_u64().unwrap() < 1,
        "the replica's checkpoint passed a write-set whose fsync failed: {st:#}\nlog:\n{}",
        node.log_text()
    );
    assert!(
        st["apply_error"].as_str().unwrap_or("").contains("fsync"),
        "status must show the stopped replica: {st:#}"
    );
    node.kill();

    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let node = Node::start(ferryd(), &cfg);
    let st = node.status();
    assert!(st["checkpoint_seq"].as_u64().unwrap() >= 1, "{st:#}");
    assert_eq!(st["apply_error"], serde_json::Value::Null, "{st:#}");
    let data = std::fs::read(&img).unwrap();
    assert!(
        data[..4096].iter().all(|&b| b == 0xab),
        "the write-set was not replayed onto the replica"
    );
}

/// Issue 16, path 1, through `checkpoint_now`: a promote whose checkpoint fsync
/// fails is refused, and so is the retry (the fsync of the retry would succeed after
/// the kernel dropped the failed pages): the node stays a standby and a restart
/// replays the write-set. The periodic checkpointer is kept out of the way (1 h).
#[test]
fn fsync_failure_in_checkpoint_now_refuses_the_promote_and_its_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr, tls) = standby_config(dir.path(), true);
    let mut c = ferry_api::config::Config::load(&cfg).unwrap();
    c.journal.checkpoint_interval_ms = 3_600_000;
    // A standby needs somewhere to serve its volumes once promoted.
    c.nbd = Some(ferry_api::config::NbdConfig::plain("127.0.0.1:0"));
    std::fs::write(&cfg, c.to_toml()).unwrap();
    let img = dir.path().join("primary/vol0.img");
    let mut node = Node::start_env(
        ferryd(),
        &cfg,
        &[("FAILPOINTS", "ferryd::base_fsync=1*return(EIO)")],
    );
    apply_first_write_set(&node, addr, &tls);
    let promote = || {
        ferry_api::control::call(
            &c.control.socket,
            &ferry_api::control::Request::Promote {
                target: None,
                force: true,
            },
        )
        .expect("promote call")
    };
    let first = promote();
    let why = first.error.clone().unwrap_or_default();
    assert!(
        !first.ok && why.contains("Input/output error"),
        "the promote's fsync failed: {first:?}"
    );
    let retry = promote();
    let why = retry.error.clone().unwrap_or_default();
    assert!(
        !retry.ok && why.contains("fsync"),
        "a retried promote passed the failed fsync: {retry:?}\nlog:\n{}",
        node.log_text()
    );
    let st = node.status();
    assert_eq!(st["role"], "standby", "{st:#}");
    assert!(st["checkpoint_seq"].as_u64().unwrap() < 1, "{st:#}");
    node.kill();

    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let node = Node::start(ferryd(), &cfg);
    let st = node.status();
    assert_eq!(st["role"], "standby", "{st:#}");
    let data = std::fs::read(&img).unwrap();
    assert!(
        data[..4096].iter().all(|&b| b == 0xab),
        "the write-set was not replayed onto the replica"
    );
}

#[path = "common/pair.rs"]
mod pair;

/// Issue 16, path 3 (ferry-torture seeds 203 and 198057928233978): the standby takes
/// over on Handover but its HandoverAck never arrives. The old primary cannot tell
/// whether the switchover happened, so it must not take writes again: it stays fenced
/// until it hears the standby's newer epoch (then for good). Before the fix it lifted
/// its fence at once and acknowledged writes the new primary never got.
#[test]
fn a_lost_handover_ack_never_lets_the_old_primary_take_writes() {
    use ferry_api::control::Request;
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], _links) = pair::cluster(dir.path());
    let mut env = pair::TEST_ENV.to_vec();
    env.push(("FAILPOINTS", "ferryd::handover_ack_send=1*return"));
    let dr1 = Node::start_env(ferryd(), &scfg, &env);
    let primary = Node::start_env(ferryd(), &pcfg, &pair::TEST_ENV);
    pair::wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = pair::primary_of(&primary, 1);
    assert_eq!(
        pair::write(p_addr, 0, 0xa1),
        0,
        "a write before the switchover"
    );

    let cfg = ferry_api::config::Config::load(&pcfg).unwrap();
    let r = ferry_api::control::call(&cfg.control.socket, &Request::Switchover { to: None })
        .expect("switchover call");
    // The request waits (bounded) for the outcome: dr1's newer epoch shows it took
    // over, so the switchover is reported done, its ack lost. While the outcome was
    // unknown the old primary stayed fenced (before the fix it took writes at once).
    assert!(r.ok, "{r:?}\nlog:\n{}", primary.log_text());
    let res = r.result.unwrap_or_default();
    assert!(
        res["ack"].as_str().unwrap_or("").contains("lost"),
        "{res:#}"
    );
    assert!(
        primary
            .log_text()
            .contains("writes stay refused until 'dr1' is heard from")
            || primary
                .log_text()
                .contains("finishing the switchover as its standby"),
        "{}",
        primary.log_text()
    );
    // Once it hears dr1's newer epoch it finishes the switchover as dr1's standby:
    // nothing diverged, it took no write after the handover point.
    let st = pair::wait(
        &primary,
        "the old primary to rejoin as dr1's standby",
        Duration::from_secs(60),
        |st| st["role"] == "standby" && st["epoch"] == 2,
    );
    let refused = ferry_nbd::testclient::TestClient::open(p_addr, "vol0")
        .map(|(mut c, _)| c.write(8192, &[0xee; 4096], 0).unwrap_or(1))
        .unwrap_or(1);
    assert_ne!(
        refused, 0,
        "the old primary took a write after the switchover: {st:#}"
    );
    let d_addr = pair::primary_of(&dr1, 2);
    pair::wait(
        &dr1,
        "the old primary to stream from dr1",
        Duration::from_secs(60),
        |st| st["targets"][0]["state"] == "streaming",
    );
    assert!(
        pair::read(d_addr, 0) == pair::block(0xa1),
        "the acknowledged write is lost"
    );
    assert!(
        pair::read(d_addr, 4096) == pair::block(0),
        "a refused write reached the new primary"
    );
}

/// Issue 17: a stalled data path never keeps a control request waiting. Every journal
/// batch write sleeps 3 s (the writer thread stuck in a slow device); while a client's
/// write is stuck behind it, `status` answers: the write is still pending when the
/// answer comes.
#[test]
fn status_answers_while_the_journal_writer_is_stalled() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 16 * MIB)], 64 * MIB, 4 * MIB);
    let node = Node::start_env(
        ferryd(),
        &cfg,
        &[("FAILPOINTS", "journal::batch_write=sleep(3000)")],
    );
    let st = node.status();
    let addr: std::net::SocketAddr = st["nbd"]["listen"].as_str().unwrap().parse().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut c, _) = ferry_nbd::testclient::TestClient::open(addr, "vol0").unwrap();
            let err = c.write(0, &[0x5a; 4096], 0).unwrap();
            done.store(true, Ordering::SeqCst);
            err
        })
    };
    // Let the write reach the stalled journal writer.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !done.load(Ordering::SeqCst),
        "the stall failpoint did not hold the write"
    );
    let during = node.status();
    assert!(
        !done.load(Ordering::SeqCst),
        "status answered only after the stalled write finished: it waited behind the data path"
    );
    assert_eq!(during["role"], "primary", "{during:#}");
    assert_eq!(
        writer.join().unwrap(),
        0,
        "the stalled write must still succeed"
    );
}

/// Issue 16, path 1, on the undo log: the `fdatasync` of a write-set's before-images
/// fails (`undo::append_fdatasync`; write-set 1 creates the log's first segment, so
/// the first append is write-set 2's). The standby must not apply the write-set
/// without durable before-images: apply stops there (status shows why), the replica
/// keeps write-set 1's data and the checkpoint stays before write-set 2. A restart
/// replays it from the standby journal, before-images first: the newest recovery
/// point is write-set 2 and the one before it (write-set 1's) is still offered.
#[test]
fn undo_fsync_failure_stops_apply_before_the_write_set_and_a_restart_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr, tls) = standby_config(dir.path(), true);
    let img = dir.path().join("primary/vol0.img");
    let mut node = Node::start_env(
        ferryd(),
        &cfg,
        &[("FAILPOINTS", "undo::append_fdatasync=1*return(EIO)")],
    );
    let epoch = node.status()["epoch"].as_u64().expect("epoch");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = connect(addr, &tls, epoch).await;
        // Both overwrite the same block: write-set 2's before-image is 0xab.
        for (seq, fill) in [(1, 0xab), (2, 0xcd)] {
            match answer(&mut s, write_set(epoch, seq, 0, fill)).await {
                Answer::Durable(d) if d >= seq => {}
                other => panic!("the standby did not take write-set {seq}: {other:?}"),
            }
        }
        s.conn.close(0u32.into(), b"test done");
    });
    let st = node.wait_status("apply to stop", Duration::from_secs(20), |st| {
        st["apply_error"].is_string()
    });
    let why = st["apply_error"].as_str().unwrap_or("");
    assert!(
        why.contains("undo capture failed at write-set 2"),
        "status must say why apply stopped: {st:#}\nlog:\n{}",
        node.log_text()
    );
    // Let a few checkpoint rounds (500 ms) pass.
    std::thread::sleep(Duration::from_secs(2));
    let st = node.status();
    assert_eq!(st["applied_seq"].as_u64(), Some(1), "{st:#}");
    assert!(
        st["checkpoint_seq"].as_u64().unwrap() < 2,
        "the checkpoint passed a write-set whose before-images are not durable: {st:#}"
    );
    let data = std::fs::read(&img).unwrap();
    assert!(
        data[..4096].iter().all(|&b| b == 0xab),
        "write-set 2 was applied without its before-images"
    );
    node.kill();

    let node = Node::start(ferryd(), &cfg);
    let st = node.wait_status("the replay", Duration::from_secs(20), |st| {
        st["applied_seq"].as_u64() == Some(2)
    });
    assert_eq!(st["apply_error"], serde_json::Value::Null, "{st:#}");
    assert!(st["checkpoint_seq"].as_u64().unwrap() >= 2, "{st:#}");
    let data = std::fs::read(&img).unwrap();
    assert!(
        data[..4096].iter().all(|&b| b == 0xcd),
        "write-set 2 was not replayed onto the replica"
    );
    assert_eq!(st["pit"]["newest"]["seq"].as_u64(), Some(2), "{st:#}");
    assert!(
        st["pit"]["oldest"]["seq"].as_u64().is_some_and(|s| s <= 1),
        "write-set 1's point (write-set 2's before-images) must be offered: {st:#}"
    );
}

/// Issue 16, path 7 (the rest): a standby that refused a write-set with
/// `ResyncRequired` gets a full resync by digest, even when the primary restarts in
/// between. The standby refuses once (`ferryd::standby_refuse_write_set`); the
/// primary cannot redial (`ferryd::ship_connect` after its first dial) until it is
/// restarted without failpoints. It used to forget the request and stream again.
#[test]
fn path7_a_standby_resync_request_survives_a_primary_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], _links) = pair::cluster(dir.path());
    let with = |fp: &'static str| {
        let mut env = pair::TEST_ENV.to_vec();
        env.push(("FAILPOINTS", fp));
        env
    };
    let _dr1 = Node::start_env(
        ferryd(),
        &scfg,
        &with("ferryd::standby_refuse_write_set=1*return"),
    );
    let mut primary = Node::start_env(ferryd(), &pcfg, &with("ferryd::ship_connect=1*off->return"));
    pair::wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let addr = pair::primary_of(&primary, 1);
    // Refused by dr1; acknowledged once the sync target is degraded.
    assert_eq!(pair::write(addr, 0, 0xa7), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !primary.log_text().contains("requires a resync") {
        assert!(
            std::time::Instant::now() < deadline,
            "the primary never heard the standby's resync request; log:\n{}",
            primary.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = pair::status(&primary).unwrap();
    assert_eq!(
        st["targets"][0]["points_lost"],
        serde_json::Value::Null,
        "{st:#}"
    );
    let code = primary.terminate();
    assert!(code.success(), "{code}\n{}", primary.log_text());

    let primary = Node::start_env(ferryd(), &pcfg, &pair::TEST_ENV);
    let st = pair::wait(
        &primary,
        "a full resync of dr1, then streaming",
        Duration::from_secs(60),
        |st| {
            let t = &st["targets"][0];
            t["points_lost"].is_object()
                && t["state"] == "streaming"
                && t["tracking"] == "streaming"
                && t["acked_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );
    assert!(
        primary
            .log_text()
            .contains("the standby required a resync: full resync by digest"),
        "{st:#}\n{}",
        primary.log_text()
    );
    let img = std::fs::read(dir.path().join("dr1/vol0.img")).unwrap();
    assert!(
        img[..4096].iter().all(|&b| b == 0xa7),
        "the resync copied the write"
    );
}

/// Issue 18, item 2: a primary ships each record while its own journal writes it, so a
/// standby may hold a record the primary's journal never did. Here the primary's
/// journal writer stalls (`journal::batch_write=sleep`) while dr1 takes the write
/// durably; the primary is SIGKILLed, so the write was never acknowledged, and restarts
/// with a journal that ends before it. Its next write reuses the sequence. dr1 must not
/// stream on from its position (it would keep the lost write and miss the new one):
/// the crash horizon makes it resync, and both nodes end up byte for byte equal.
#[test]
fn a_record_shipped_before_the_primary_crashed_unjournaled_is_resynced_away() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], _links) = pair::cluster(dir.path());
    let dr1 = Node::start_env(ferryd(), &scfg, &pair::TEST_ENV);
    let mut env = pair::TEST_ENV.to_vec();
    env.push(("FAILPOINTS", "journal::batch_write=sleep(60000)"));
    let mut primary = Node::start_env(ferryd(), &pcfg, &env);
    pair::wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = pair::primary_of(&primary, 1);
    // The write stalls in the primary's journal; it is never acknowledged.
    let stalled = std::thread::spawn(move || {
        let (mut c, _) = ferry_nbd::testclient::TestClient::open(p_addr, pair::VOLUME).unwrap();
        c.write(0, &pair::block(0x5a), 0)
    });
    pair::wait(
        &dr1,
        "dr1 to hold the write the primary's journal has not written",
        Duration::from_secs(30),
        |st| st["durable_seq"].as_u64() >= Some(1),
    );
    let st = pair::status(&primary).expect("primary status");
    assert_eq!(
        st["durable_seq"], 0,
        "the primary's journal wrote it: {st:#}"
    );
    primary.kill();
    let _ = stalled.join();

    let primary = Node::start_env(ferryd(), &pcfg, &pair::TEST_ENV);
    let p_addr = pair::primary_of(&primary, 1);
    assert_eq!(
        pair::write(p_addr, 4096, 0xb2),
        0,
        "a write after the restart"
    );
    let last = pair::status(&primary).expect("primary status")["durable_seq"]
        .as_u64()
        .expect("durable_seq");
    pair::wait(
        &primary,
        "dr1 to hold every write",
        Duration::from_secs(60),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["applied_seq"].as_u64() >= Some(last)
        },
    );
    let scfg = ferry_api::config::Config::load(&scfg).unwrap();
    let pcfg = ferry_api::config::Config::load(&pcfg).unwrap();
    let replica = std::fs::read(&scfg.volumes[0].path).unwrap();
    let volume = std::fs::read(&pcfg.volumes[0].path).unwrap();
    assert!(
        replica[4096..8192] == pair::block(0xb2)[..],
        "dr1 missed the write made after the restart (block 1 starts {:#x})",
        replica[4096]
    );
    assert!(
        volume[..4096] == pair::block(0)[..],
        "the restarted primary holds the unjournaled write"
    );
    assert!(
        replica == volume,
        "dr1 differs from the primary: it kept the write the primary's crash lost \
         (block 0: {:#x})",
        replica[0]
    );
}
