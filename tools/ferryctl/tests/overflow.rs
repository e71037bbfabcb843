//! Journal overflow end to end (real ferryd processes, QUIC, qemu-io): a standby
//! that is down while more is written than the primary's journal holds is switched
//! to a dirty-region bitmap, the client never sees an error, and on reconnect only
//! the dirty regions are copied; also when the standby dies in the middle of that copy.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

const VOL: u64 = 64 << 20;

/// `n` writes of 64 KiB (with discards, zero-writes and flushes mixed in) at
/// pseudo-random 4 KiB-aligned offsets: about n × 64 KiB through the journal.
/// A primary and standby `dr1` with a 4 MiB journal of 1 MiB segments.
fn init(dir: &Path) -> (PathBuf, PathBuf) {
    init_pair(
        dir,
        &Init {
            journal: "4MiB",
            segment: "1MiB",
            ..Init::default()
        },
    )
}

/// About n × 64 KiB through the journal (see `mixed_workload`).
fn workload(seed: u64, n: usize) -> Vec<String> {
    mixed_workload(seed, n, VOL, Some(65536))
}

/// Starts a primary and a standby, writes a little and waits until both hold it;
/// then stops the standby and writes about 3× the journal: the client sees no
/// error and the target ends in bitmap mode with the journal released.
fn overflow_with_standby_down(
    dir: &Path,
    env: &[(&str, &str)],
) -> (Node, PathBuf, serde_json::Value) {
    let (pcfg, scfg) = init(dir);
    let mut standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start_env(&ferryd(), &pcfg, env);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(1, 20)));
    wait_caught_up(&primary, &standby);
    standby.kill();
    // ~12 MiB of writes through a 4 MiB journal, standby gone.
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(2, 220)));
    let st = primary.wait_status(
        "the target to be tracked in a bitmap",
        Duration::from_secs(30),
        |st| st["targets"][0]["tracking"] == "bitmap",
    );
    let t = &st["targets"][0];
    assert!(seq(t, "/dirty_bytes") > 0, "{st:#}");
    assert!(t["points_lost"].is_object(), "{st:#}");
    assert!(
        seq(&st, "/journal/used_bytes") < seq(&st, "/journal/capacity_bytes"),
        "the journal is released without the target: {st:#}"
    );
    assert!(
        seq(&st, "/durable_seq") > 200,
        "the workload went through the journal: {st:#}"
    );
    (primary, scfg, st)
}

#[test]
fn overflow_switches_to_a_bitmap_and_resyncs_only_dirty_regions() {
    if skip_without(
        "qemu-io",
        "overflow_switches_to_a_bitmap_and_resyncs_only_dirty_regions",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (primary, scfg, before) = overflow_with_standby_down(dir.path(), &[]);
    let dirty = seq(&before, "/targets/0/dirty_bytes");
    let base = seq(&before, "/targets/0/points_lost/after_seq");
    let standby = Node::start(&ferryd(), &scfg);
    // More writes while it resyncs and streams again: still no client error.
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(3, 30)));
    wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
    let st = primary.status();
    let t = &st["targets"][0];
    let resynced = seq(t, "/resync_bytes");
    eprintln!(
        "overflow: {dirty} dirty bytes at the switch, {resynced} bytes resynced ({} as data) \
         of a {VOL}-byte volume; recovery points lost after {base} up to {}",
        seq(t, "/resync_data_bytes"),
        t["points_lost"]["through_seq"]
    );
    // Dirty regions the standby already holds (written back to what it has, or zero
    // on both sides) are skipped by the digest comparison: at most the dirty bytes
    // plus what was written during the copy, never the volume.
    assert!(resynced > 0 && resynced < VOL, "{st:#}");
    assert!(seq(t, "/points_lost/through_seq") > base, "{st:#}");
    assert!(
        seq(t, "/points_lost/through_seq") <= seq(&st, "/durable_seq"),
        "{st:#}"
    );
    assert_eq!(seq(t, "/dirty_bytes"), 0, "{st:#}");
    // The maps are gone once the target is streaming again.
    let maps = dir.path().join("primary/dirty/dr1");
    assert!(
        std::fs::read_dir(&maps).map_or(0, |d| d.count()) == 0,
        "{} still holds maps",
        maps.display()
    );
    // The standby's recovery points skip the resync: none inside it is offered.
    let sst = standby.status();
    assert_eq!(sst["replica"], "consistent", "{sst:#}");
    assert!(sst["resync"].is_null(), "{sst:#}");
}

/// The standby is SIGKILLed in the middle of the copy (slowed down by a testing
/// hook), is inconsistent meanwhile (no point inside the resync is offered), and the
/// resync completes after it restarts.
#[test]
fn standby_killed_mid_resync_completes_after_restart() {
    if skip_without(
        "qemu-io",
        "standby_killed_mid_resync_completes_after_restart",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The primary notices the killed standby within 1.5 s, not QUIC's 10 s default.
    let (primary, scfg, _) =
        overflow_with_standby_down(dir.path(), &[(ferryd::node::IDLE_TIMEOUT_ENV, "1500")]);
    let mut standby = Node::start_env(
        &ferryd(),
        &scfg,
        &[(ferryd::replica::resync::RESYNC_PAUSE_ENV, "300")],
    );
    let sst = standby.wait_status(
        "the copy to be under way on the standby",
        Duration::from_secs(30),
        |st| seq(st, "/resync/copied_bytes") > 0,
    );
    assert_eq!(sst["replica"], "inconsistent", "{sst:#}");
    let from = seq(&sst, "/resync/from_seq");
    let snapshot = seq(&sst, "/resync/snapshot_seq");
    assert!(snapshot > from, "{sst:#}");
    // (The primary may have sent the whole copy already: QUIC buffers it.)
    assert_eq!(
        primary.status()["targets"][0]["tracking"],
        "resyncing",
        "the primary shows the resync"
    );
    // No recovery point inside the resync; its start stays reachable.
    let pit = |seq: u64| {
        Command::new(ferryctl())
            .arg("--config")
            .arg(&scfg)
            .args([
                "pit",
                "export",
                "--volume",
                "vol0",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--seq", &seq.to_string(), "--json"])
            .output()
            .unwrap()
    };
    let inside = pit(snapshot);
    assert!(!inside.status.success());
    let err = String::from_utf8_lossy(&inside.stderr);
    assert!(err.contains("inconsistent"), "{err}");
    let at_start = pit(from);
    assert!(
        at_start.status.success(),
        "the last consistent point must stay reachable: {}",
        String::from_utf8_lossy(&at_start.stderr)
    );
    standby.kill();
    let standby = Node::start(&ferryd(), &scfg);
    let last = wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
    assert!(
        standby.log_text().contains("resync copy complete"),
        "{}",
        standby.log_text()
    );
    eprintln!(
        "mid-resync kill: resumed from {from}, caught up at {last}, {} bytes resynced in all",
        seq(&primary.status(), "/targets/0/resync_bytes")
    );
}

/// A primary restarted while its standby is away releases the journal up to its
/// checkpoint (acks are not persisted), so the standby's next record is gone when it
/// comes back: it is resynced in full from the volumes instead of being refused.
#[test]
fn stale_replica_receives_only_the_chunks_that_differ() {
    if skip_without(
        "qemu-io",
        "stale_replica_receives_only_the_chunks_that_differ",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path());
    let mut standby = Node::start(&ferryd(), &scfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(4, 20)));
    wait_caught_up(&primary, &standby);
    standby.kill();
    // ~2 MiB: more than one 1 MiB segment, less than the switch threshold.
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(5, 32)));
    assert_eq!(primary.status()["targets"][0]["tracking"], "streaming");
    assert!(primary.terminate().success());
    let primary = Node::start(&ferryd(), &pcfg);
    let st = primary.status();
    assert!(
        seq(&st, "/journal/first_seq") > 21,
        "the restart released the standby's next record: {st:#}"
    );
    let standby = Node::start(&ferryd(), &scfg);
    wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
    // The journal no longer says what the standby misses, so every region is a
    // candidate; the digest comparison at the start of the copy leaves only the
    // chunks that differ: about the ~2 MiB written while it was away (64 KiB
    // regions), not the 64 MiB volume.
    let st = primary.status();
    let moved = seq(&st, "/targets/0/resync_bytes");
    eprintln!("stale replica: {moved} bytes resynced of a {VOL}-byte volume");
    assert!(
        moved > 0 && moved <= 6 << 20,
        "only the differing chunks should move: {st:#}"
    );
}

/// Initial sync: a standby that joins a primary whose 1 GiB volume holds 10% written
/// data (and whose journal no longer holds it) receives about that 10%: unwritten
/// and zero regions are not shipped as data.
#[test]
fn initial_sync_moves_about_what_was_written() {
    if skip_without("qemu-io", "initial_sync_moves_about_what_was_written") {
        return;
    }
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:1GiB",
            journal: "16MiB",
            segment: "1MiB",
            mode: "async",
            ..Init::default()
        },
    );
    let primary = Node::start(&ferryd(), &pcfg);
    // 102.4 MiB: the first 1 MiB of every 10 MiB, through a 16 MiB journal with no
    // standby yet.
    let cmds: Vec<String> = (0..102u64)
        .map(|i| format!("write -P {} {} 1M", i % 250 + 1, i * (10 << 20)))
        .collect();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &cmds));
    let written = 102u64 << 20;
    let standby = Node::start(&ferryd(), &scfg);
    wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
    let t = &primary.status()["targets"][0];
    let data = seq(t, "/resync_data_bytes");
    eprintln!(
        "initial sync of a 1 GiB volume with {written} bytes written: {data} bytes shipped as data ({:.1}% of the volume), {} bytes covered",
        data as f64 * 100.0 / GIB as f64,
        seq(t, "/resync_bytes")
    );
    assert!(
        data >= written / 2 && data <= written + written / 5,
        "about the written 10% should move as data, not the volume: {t:#}"
    );
}

/// Failback after an overflow: the old primary wrote past the fork (never
/// replicated), dr1 was promoted and wrote until its journal overflowed for the absent
/// old primary, so that target is tracked in maps that start at dr1's old checkpoint.
/// When the old primary rejoins past the fork, every region must be a resync
/// candidate (the digest comparison skips the equal ones): the regions only the old
/// primary wrote after the fork are in no map, and used to stay as it wrote them —
/// a silently diverged replica.
#[test]
fn failback_after_an_overflow_copies_what_the_old_primary_wrote_past_the_fork() {
    if skip_without(
        "qemu-io",
        "failback_after_an_overflow_copies_what_the_old_primary_wrote_past_the_fork",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path());
    let mut dr1 = Node::start(&ferryd(), &scfg);
    let mut old = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(&old.url("vol0"), &workload(1, 20)));
    wait_caught_up(&old, &dr1);
    // The old primary's writes past the fork: dr1 is down, they never reach it. A
    // range dr1 never writes afterwards (its writes stay below 16 MiB).
    dr1.kill();
    let past_fork: Vec<String> = (0..16u64)
        .map(|i| format!("write -P 0x5a {} 64k", (40 << 20) + i * (1 << 20)))
        .collect();
    assert_qemu_io_ok(&qemu_io(&old.url("vol0"), &past_fork));
    let old_last = seq(&old.status(), "/durable_seq");
    old.kill();

    let dr1 = Node::start(&ferryd(), &scfg);
    let st = change_role(&scfg, &["promote", "--force"], "primary");
    let fork = seq(&st, "/fork_seq");
    assert!(
        old_last > fork,
        "the old primary wrote past the fork: {st:#}"
    );
    let url = format!("nbd://{}/vol0", st["nbd"]["listen"].as_str().unwrap());
    // ~12 MiB through dr1's 4 MiB journal while the old primary is away, below 16 MiB.
    let fill: Vec<String> = (0..192u64)
        .map(|i| format!("write -P {} {} 64k", i % 200 + 1, (i % 128) * 65536))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &fill));
    wait_for(
        &scfg,
        "the old primary's target to be tracked in a bitmap",
        Duration::from_secs(60),
        |st| st["targets"][0]["tracking"] == "bitmap",
    );

    // The old primary comes back, learns it is outdated, and rejoins as dr1's standby.
    let _old = Node::start(&ferryd(), &pcfg);
    wait_for(
        &pcfg,
        "the old primary to learn it is outdated",
        Duration::from_secs(60),
        |st| st["outdated"].is_object(),
    );
    change_role(&pcfg, &["demote"], "standby");
    let new = wait_for(
        &scfg,
        "dr1 to stream to the old primary",
        Duration::from_secs(120),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["tracking"] == "streaming"
                && seq(st, "/targets/0/acked_seq") >= seq(st, "/durable_seq")
        },
    );
    let last = seq(&new, "/durable_seq");
    wait_for(
        &pcfg,
        "the old primary to apply everything",
        Duration::from_secs(120),
        |st| seq(st, "/applied_seq") >= last && st["replica"] == "consistent",
    );
    same_file(
        &dir.path().join("dr1/vol0.img"),
        &dir.path().join("primary/vol0.img"),
    );
    drop(dr1);
}

/// `ferryctl ARGS` (a role change) until the node runs in `role` (a primary serving
/// NBD); its status then. The command's answer is sometimes lost as the node
/// re-executes itself in the new role (an empty response), so success is read
/// from the status, and the command repeated only if the role did not change.
fn change_role(config: &Path, args: &[&str], role: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let out = ctl(config, args);
        let settle = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < settle {
            if let Some(st) = try_status(config).filter(|st| {
                st["role"] == role && (role != "primary" || st["nbd"]["listen"].is_string())
            }) {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{args:?} did not make the node a {role}: {out:?}"
        );
    }
}
