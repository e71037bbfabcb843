//! Failover end to end with real processes: unplanned promotion after SIGKILL of the
//! primary, fencing of the old primary by epoch, planned switchover under a running
//! workload, and the old primary rejoining as a standby.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferryd::testkit::{
    acked_writes, assert_qemu_io_ok, qemu_io, skip_without, spawn_qemu_io, Node,
};

/// A primary and a sync standby `dr1` with a 32 MiB volume.
fn init(dir: &Path) -> (PathBuf, PathBuf) {
    init_pair(
        dir,
        &Init {
            volume: "vol0:32MiB",
            mode: "sync",
            ..Init::default()
        },
    )
}

fn nbd_url(st: &serde_json::Value) -> String {
    format!(
        "nbd://{}/vol0",
        st["nbd"]["listen"]
            .as_str()
            .expect("a primary's NBD address")
    )
}

/// Writes one block until the node accepts it; returns how long that took.
fn first_accepted_write(config: &Path, since: Instant) -> (Duration, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) =
            try_status(config).filter(|s| s["role"] == "primary" && s["nbd"]["listen"].is_string())
        {
            let url = nbd_url(&st);
            let out = qemu_io(&url, &["write -P 0x99 31M 4k".to_string()]);
            if out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("wrote 4096/4096")
            {
                return (since.elapsed(), url);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the new primary accepted no write within 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pattern_of(off: u64) -> u64 {
    off / 32768 % 250 + 1
}

fn workload(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| format!("write -P {} {} 16k", pattern_of(i * 32768), i * 32768))
        .collect()
}

fn check_acked(url: &str, acked: &[u64]) {
    let reads: Vec<String> = acked
        .iter()
        .map(|o| format!("read -P {} {o} 16k", pattern_of(*o)))
        .collect();
    for chunk in reads.chunks(200) {
        assert_qemu_io_ok(&qemu_io(url, chunk));
    }
}

#[test]
fn unplanned_failover_fences_the_old_primary() {
    if skip_without("qemu-io", "unplanned_failover_fences_the_old_primary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path());
    let standby = Node::start(&ferryd(), &scfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("target to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let run = spawn_qemu_io(&primary.url("vol0"), &workload(900));
    primary.wait_status("part of the workload", Duration::from_secs(60), |st| {
        st["last_seq"].as_u64().unwrap_or(0) >= 200
    });
    primary.kill();
    let acked = acked_writes(&run.finish(), 16384);
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );

    // Until the dead primary has missed three heartbeats, promotion refuses (a live
    // primary would mean two primaries); then it goes through. Timed to the first
    // accepted write.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (t0, p) = loop {
        let t0 = Instant::now();
        let out = ctl(&scfg, &["promote", "--json"]);
        if out.status.success() {
            break (
                t0,
                serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
            );
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("is connected"), "promote: {err}");
        assert!(
            Instant::now() < deadline,
            "promote still refused after 20 s: {err}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(p["epoch"], 2, "{p:#}");
    let (took, url) = first_accepted_write(&scfg, t0);
    eprintln!(
        "promote: {:.3} s from the command to the first accepted write",
        took.as_secs_f64()
    );
    check_acked(&url, &acked);
    let st = try_status(&scfg).unwrap();
    assert_eq!(
        (st["role"].as_str(), st["epoch"].as_u64()),
        (Some("primary"), Some(2)),
        "{st:#}"
    );
    assert_eq!(st["fork_seq"], p["fork_seq"]);

    // The old primary comes back: it reaches the new primary, learns epoch 2, and
    // refuses writes from then on.
    let old = Node::start(&ferryd(), &pcfg);
    let st = old.wait_status(
        "the old primary to learn it is outdated",
        Duration::from_secs(30),
        |st| st["outdated"].is_object(),
    );
    assert_eq!(
        (
            st["outdated"]["epoch"].as_u64(),
            st["outdated"]["by"].as_str()
        ),
        (Some(2), Some("dr1")),
        "{st:#}"
    );
    let w = qemu_io(&old.url("vol0"), &["write -P 7 0 4k".to_string()]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !text.contains("wrote 4096/4096"),
        "the outdated primary accepted a write: {text}"
    );
    assert!(
        old.log_text().contains("this primary is outdated"),
        "{}",
        old.log_text()
    );
    // Reads still work there.
    assert!(qemu_io(&old.url("vol0"), &["read 0 4k".to_string()])
        .status
        .success());
    // A standby command on a primary, and promote on a primary, are refused.
    let out = ctl(&pcfg, &["promote"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("standby command"),
        "{out:?}"
    );

    // Failback: the old primary had journaled writes the standby never got (not
    // acknowledged: sync mode), so histories diverged after the fork. More writes on
    // the new primary, then demote: the old primary rejoins as dr1's standby through a
    // delta resync that copies only the regions either side changed since the fork.
    let old_last = st["last_seq"].as_u64().unwrap();
    let fork = p["fork_seq"].as_u64().unwrap();
    assert_qemu_io_ok(&qemu_io(
        &url,
        &["write -P 0x77 20M 1M".to_string(), "flush".to_string()],
    ));
    let d = ctl_json(&pcfg, &["demote"]);
    assert_eq!(d["primary"], "dr1", "{d:#}");
    wait_for(
        &pcfg,
        "the old primary to run as a standby",
        Duration::from_secs(30),
        |st| st["role"] == "standby",
    );
    // dr1 must pass the old primary's last sequence before it can resync it.
    let filler: Vec<String> = (0..(old_last.saturating_sub(fork) + 2))
        .map(|i| format!("write -P 0x66 {} 4k", (24 << 20) + i * 4096))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &filler));
    let new = wait_for(
        &scfg,
        "dr1 to stream to the old primary",
        Duration::from_secs(60),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["tracking"] == "streaming"
                && st["targets"][0]["acked_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );
    let last = new["durable_seq"].as_u64().unwrap();
    wait_for(
        &pcfg,
        "the old primary to apply everything",
        Duration::from_secs(60),
        |st| st["applied_seq"].as_u64().unwrap_or(0) >= last && st["replica"] != "inconsistent",
    );
    let a = std::fs::read(dir.path().join("dr1/vol0.img")).unwrap();
    let b = std::fs::read(dir.path().join("primary/vol0.img")).unwrap();
    assert!(a == b, "the images differ after failback");
    let moved = new["targets"][0]["resync_data_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "failback: old primary held {} sequences past the fork; {moved} bytes moved as data for a {} byte volume",
        old_last.saturating_sub(fork),
        32u64 << 20
    );
    // Since the fork: ~1.1 MiB written on dr1 plus the old primary's few 16 KiB
    // writes, in 64 KiB regions. Never the volume.
    assert!(
        moved <= 4 << 20,
        "failback moved {moved} bytes: more than the delta"
    );
    drop(standby);
}

#[test]
fn switchover_under_a_workload_loses_nothing_and_reverses_replication() {
    if skip_without(
        "qemu-io",
        "switchover_under_a_workload_loses_nothing_and_reverses_replication",
    ) || skip_without(
        "qemu-img",
        "switchover_under_a_workload_loses_nothing_and_reverses_replication",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path());
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("target to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let run = spawn_qemu_io(&primary.url("vol0"), &workload(900));
    primary.wait_status("part of the workload", Duration::from_secs(60), |st| {
        st["last_seq"].as_u64().unwrap_or(0) >= 150
    });

    let t0 = Instant::now();
    // A switchover to a node that is not a target is refused and changes nothing.
    let out = ctl(&pcfg, &["switchover", "--to", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no replication target named 'nope'"),
        "{err}"
    );
    assert!(primary.status()["writes_refused"].is_null());
    let sw = ctl_json(&pcfg, &["switchover"]);
    assert_eq!(
        (sw["to"].as_str(), sw["epoch"].as_u64()),
        (Some("dr1"), Some(2)),
        "{sw:#}"
    );
    let acked = acked_writes(&run.finish(), 16384);
    let (pause, url) = first_accepted_write(&scfg, t0);
    eprintln!(
        "switchover: writes stopped on the old primary for {:.3} s; {:.3} s from the command to the first write on the new primary ({} writes acknowledged before)",
        sw["writes_stopped_seconds"].as_f64().unwrap_or(0.0),
        pause.as_secs_f64(),
        acked.len()
    );
    check_acked(&url, &acked);
    // A switchover reads as one, and the old primary (a sync target now), which handed
    // over everything and comes straight back as a standby, does not start degraded.
    let st = wait_for(
        &scfg,
        "dr1 to run as the primary",
        Duration::from_secs(30),
        |st| st["role"] == "primary",
    );
    assert_eq!(st["fork_by"], "switchover", "{st:#}");
    // (Degraded only by a sync timeout, should the old primary take longer than that
    // to come back; never from the start.)
    assert!(
        st["targets"][0]["effective_mode"] == "sync"
            || standby.log_text().contains("did not confirm a write"),
        "{st:#}"
    );
    let text = String::from_utf8_lossy(&ctl(&scfg, &["status"]).stdout).to_string();
    assert!(
        text.contains("primary by switchover from sequence"),
        "{text}"
    );

    // Replication now runs the other way: the old primary is dr1's standby.
    let old = wait_for(
        &pcfg,
        "the old primary to run as a standby",
        Duration::from_secs(30),
        |st| st["role"] == "standby",
    );
    assert_eq!(old["primary"]["name"], "dr1", "{old:#}");
    assert_qemu_io_ok(&qemu_io(
        &url,
        &["write -P 0x42 1M 1M".to_string(), "flush".to_string()],
    ));
    let new = wait_for(
        &scfg,
        "dr1 to stream to the old primary",
        Duration::from_secs(30),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["acked_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );
    assert_eq!(new["targets"][0]["name"], "primary");
    let last = new["durable_seq"].as_u64().unwrap();
    wait_for(
        &pcfg,
        "the old primary to apply the new writes",
        Duration::from_secs(30),
        |st| st["applied_seq"].as_u64().unwrap_or(0) >= last,
    );
    let a = std::fs::read(dir.path().join("dr1/vol0.img")).unwrap();
    let b = std::fs::read(dir.path().join("primary/vol0.img")).unwrap();
    assert!(a == b, "the images differ after the switchover");
    drop((standby, primary));
}

/// Waits until `node` applied everything up to `last` and is consistent.
fn wait_applied_to(node: &Node, what: &str, last: u64) {
    node.wait_status(what, Duration::from_secs(90), |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
}

/// `count` one-block write-sets of `fill` from `base` on (one qemu-io run each, so
/// each is its own write-set) and one large write.
fn write_sets(url: &str, fill: u8, base: u64, count: u64) {
    for i in 0..count {
        assert_qemu_io_ok(&qemu_io(
            url,
            &[
                format!("write -P {fill} {} 64k", base + i * (1 << 20)),
                "flush".to_string(),
            ],
        ));
    }
}

/// A standby that follows `primary` in `epoch` from now on. ferry has no command for
/// this yet (a standby of an older epoch refuses a promoted primary): done offline,
/// the way such a command would, on a stopped node: the config names the new primary,
/// the metadata carries its epoch. The replica and the journal stay as they are.
fn follow(config: &Path, primary: &str, epoch: u64) {
    let mut cfg = ferry_api::config::Config::load(config).unwrap();
    cfg.replication.as_mut().unwrap().primary = primary.into();
    std::fs::write(config, cfg.to_toml()).unwrap();
    let meta = ferryd::store::meta::Meta::open(&cfg.node.metadata_dir, cfg.cluster_id()).unwrap();
    meta.set_epoch(epoch).unwrap();
}

/// Issue 16 path 4: a standby promoted with rollback (`--bookmark`) still journals the
/// write-sets after the bookmark; neither it nor the nodes that follow it may hold them
/// afterwards. A, bookmark, B reach dr1 and dr2; dr3 stops after the bookmark (it
/// resumes at or below the fork). dr1 is promoted back to the bookmark, dr2 and dr3
/// follow it, C is written on dr1: dr1 holds A and C, and both replicas equal dr1's
/// volume byte for byte. dr2 holds B (past the fork): a resync by digest, as failback;
/// dr3 must get the new epoch only, not B.
#[test]
fn a_promotion_with_rollback_ships_no_discarded_write_to_the_other_standbys() {
    promote_back_to_a_bookmark(
        "a_promotion_with_rollback_ships_no_discarded_write_to_the_other_standbys",
        false,
    );
}

/// The same, with a crash between the rollback and the promotion's cut: the rollback
/// alone (`ferryctl rollback`), SIGKILL, restart, then a plain `promote` (of the
/// rolled-back replica). The restarted standby must not replay the undone records, and
/// the promotion cuts them as above.
#[test]
fn a_sigkill_between_the_rollback_and_the_promotion_still_cuts_the_undone_writes() {
    promote_back_to_a_bookmark(
        "a_sigkill_between_the_rollback_and_the_promotion_still_cuts_the_undone_writes",
        true,
    );
}

/// dr1's config: once promoted, it ships to dr2 and dr3 (not to the dead primary).
fn ship_to_the_others(dr1: &Path, others: &[PathBuf]) {
    let mut c1 = ferry_api::config::Config::load(dr1).unwrap();
    let r1 = c1.replication.as_mut().unwrap();
    r1.targets = ["dr2", "dr3"]
        .iter()
        .zip(others)
        .map(|(n, c)| ferry_api::config::TargetConfig {
            name: n.to_string(),
            address: repl_listen(c),
            mode: ferry_api::config::ReplicationMode::Async,
            on_sync_loss: Default::default(),
            max_lag_seconds: None,
        })
        .collect();
    std::fs::write(dr1, c1.to_toml()).unwrap();
}

/// Promotes `config` (retrying while the dead primary still counts as connected).
fn promote(config: &Path, args: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut a = vec!["promote", "--json"];
        a.extend_from_slice(args);
        let out = ctl(config, &a);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("is connected"), "promote: {err}");
        assert!(Instant::now() < deadline, "promote still refused: {err}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The scenario of the two tests above; `crash`: roll back, SIGKILL and restart dr1,
/// then promote it, instead of `promote --bookmark`.
fn promote_back_to_a_bookmark(name: &str, crash: bool) {
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, s) = init_cluster(
        dir.path(),
        &["dr1", "dr2", "dr3"],
        &Init {
            volume: "vol0:32MiB",
            mode: "async",
            ..Init::default()
        },
    );
    ship_to_the_others(&s[0], &s[1..]);
    let mut dr1 = Node::start(&ferryd(), &s[0]);
    let mut dr2 = Node::start(&ferryd(), &s[1]);
    let mut dr3 = Node::start(&ferryd(), &s[2]);
    let mut primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");

    write_sets(&url, 0x41, 0, 8);
    let bm = ctl_json(&pcfg, &["bookmark", "create", "a"]);
    let last = seq(&primary.status(), "/durable_seq");
    for n in [&dr1, &dr2, &dr3] {
        wait_applied_to(n, "a standby to hold A and the bookmark", last);
    }
    dr3.terminate();
    // B: write-sets after the bookmark, over A's blocks and beside them.
    write_sets(&url, 0x42, 0, 8);
    write_sets(&url, 0x43, 32 << 10, 8);
    let b_last = seq(&primary.status(), "/durable_seq");
    for n in [&dr1, &dr2] {
        wait_applied_to(n, "dr1 and dr2 to hold B", b_last);
    }
    primary.kill();

    // dr2 stops before the promotion so that it does not follow it yet.
    dr2.terminate();
    let p = if crash {
        ctl_json(&s[0], &["rollback", "--volume", "vol0", "--bookmark", "a"]);
        dr1.kill();
        dr1 = Node::start(&ferryd(), &s[0]);
        promote(&s[0], &[])
    } else {
        promote(&s[0], &["--bookmark", "a"])
    };
    assert_eq!(
        p["fork_seq"], bm["seq"],
        "rolled back to the bookmark: {p:#}"
    );
    assert!(seq(&p, "/fork_seq") < b_last, "{p:#}");
    assert!(seq(&p, "/cut_seq") >= b_last, "B is cut: {p:#}");
    assert!(
        dr1.log_text()
            .contains(&format!("fork={} cut={}", p["fork_seq"], p["cut_seq"])),
        "{}",
        dr1.log_text()
    );
    for c in &s[1..] {
        follow(c, "dr1", p["epoch"].as_u64().unwrap());
    }
    let dr2 = Node::start(&ferryd(), &s[1]);
    let dr3 = Node::start(&ferryd(), &s[2]);
    let (_, url1) = first_accepted_write(&s[0], Instant::now());
    write_sets(&url1, 0x44, 16 << 10, 6);

    let st = wait_for(
        &s[0],
        "dr1 to stream to dr2 and dr3 and be acknowledged everything",
        Duration::from_secs(120),
        |st| {
            let durable = seq(st, "/durable_seq");
            (0..2).all(|i| {
                st["targets"][i]["state"] == "streaming"
                    && st["targets"][i]["tracking"] == "streaming"
                    && seq(st, &format!("/targets/{i}/acked_seq")) >= durable
            })
        },
    );
    let last = seq(&st, "/durable_seq");
    wait_applied_to(&dr2, "dr2 to apply the new epoch", last);
    wait_applied_to(&dr3, "dr3 to apply the new epoch", last);
    let vol = |c: &Path| {
        ferry_api::config::Config::load(c).unwrap().volumes[0]
            .path
            .clone()
    };
    // dr1 holds A (rolled back) and C, never B.
    let img = std::fs::read(vol(&s[0])).unwrap();
    let only_b = (7 << 20) + (80 << 10);
    for (at, want) in [
        (0, 0x41),
        (1 << 20, 0x41),
        (32 << 10, 0x44),
        (only_b, 0),
        (8 << 20, 0),
    ] {
        assert_eq!(img[at], want, "dr1's volume at byte {at}");
    }
    same_file(&vol(&s[0]), &vol(&s[2]));
    same_file(&vol(&s[0]), &vol(&s[1]));
}
