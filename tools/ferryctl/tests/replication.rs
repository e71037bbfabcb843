//! Replication end to end: real ferryd processes (a primary and standbys on
//! loopback, QUIC with mutual TLS), real NBD clients, SIGKILL.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferryd::testkit::{
    acked_writes, assert_qemu_io_ok, qemu_io, skip_without, spawn_qemu_io, Node,
};

const VOL: u64 = 64 << 20;

/// A primary and `standbys`, 64 MiB volume, 64 MiB journal.
fn workload(seed: u64, n: usize) -> Vec<String> {
    mixed_workload(seed, n, VOL, None)
}

fn init(dir: &Path, standbys: &[&str], mode: &str) -> (PathBuf, Vec<PathBuf>) {
    init_cluster(
        dir,
        standbys,
        &Init {
            mode,
            ..Init::default()
        },
    )
}

#[test]
fn async_replica_becomes_byte_identical() {
    if skip_without("qemu-io", "async_replica_becomes_byte_identical") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1"], "async");
    let standby = Node::start(&ferryd(), &scfgs[0]);
    let primary = Node::start(&ferryd(), &pcfg);
    // Heartbeats flow both ways before any write (the standby must not wait for the
    // data stream to answer them).
    primary.wait_status(
        "a heartbeat round trip while idle",
        Duration::from_secs(15),
        |st| st["targets"][0]["rtt_us"].as_u64().unwrap_or(0) > 0,
    );
    for round in 0..3 {
        assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(round, 300)));
    }
    let st = primary.status();
    assert_eq!(st["targets"][0]["name"], "dr1");
    assert_eq!(st["targets"][0]["mode"], "async");
    let last = wait_caught_up(&primary, &standby);
    assert!(
        last > 800,
        "expected the workload in the journal, last_seq {last}"
    );
    let st = primary.status();
    assert_eq!(st["targets"][0]["state"], "streaming", "{st:#}");
    assert_eq!(st["targets"][0]["lag_seconds"].as_f64(), Some(0.0));
    let sst = standby.status();
    assert_eq!(sst["role"], "standby");
    assert!(sst["primary"]["connected"].is_string(), "{sst:#}");
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
}

/// Sync mode: every write the client saw acknowledged is on the standby, even when
/// the primary is SIGKILLed mid-workload.
#[test]
fn sync_mode_loses_no_acknowledged_write_when_the_primary_dies() {
    if skip_without(
        "qemu-io",
        "sync_mode_loses_no_acknowledged_write_when_the_primary_dies",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1"], "sync");
    let standby = Node::start(&ferryd(), &scfgs[0]);
    let mut primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("target to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let list: Vec<String> = (0..600u64)
        .map(|i| format!("write -P {} {} 16k", i % 250 + 1, i * 32768))
        .collect();
    let run = spawn_qemu_io(&primary.url("vol0"), &list);
    primary.wait_status("part of the workload", Duration::from_secs(60), |st| {
        seq(st, "/last_seq") >= 200
    });
    primary.kill();
    let acked = acked_writes(&run.finish(), 16384);
    assert!(
        !acked.is_empty() && acked.len() < 600,
        "kill should land mid-workload: {} acked",
        acked.len()
    );
    // The standby applies everything it holds durably.
    let durable = seq(&standby.status(), "/durable_seq");
    standby.wait_status(
        "standby to apply what it holds",
        Duration::from_secs(30),
        |st| seq(st, "/applied_seq") >= durable,
    );
    let img = std::fs::read(dir.path().join("dr1/vol0.img")).unwrap();
    for off in &acked {
        let i = off / 32768;
        let pat = (i % 250 + 1) as u8;
        let at = *off as usize;
        assert!(
            img[at..at + 16384].iter().all(|&b| b == pat),
            "acknowledged write at {off} (pattern {pat}) is missing on the sync standby"
        );
    }
    eprintln!(
        "{} acknowledged writes all present on the standby",
        acked.len()
    );
}

/// A standby stopped under writes catches up from the primary's journal.
#[test]
fn stopped_standby_catches_up_after_restart() {
    if skip_without("qemu-io", "stopped_standby_catches_up_after_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1"], "async");
    // A small in-memory tail: catching up must read journal segments.
    let text = std::fs::read_to_string(&pcfg).unwrap();
    std::fs::write(
        &pcfg,
        text.replace("tail_bytes = \"64MiB\"", "tail_bytes = \"1MiB\""),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&pcfg)
        .unwrap()
        .contains("tail_bytes = \"1MiB\""));
    let mut standby = Node::start(&ferryd(), &scfgs[0]);
    let primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(1, 200)));
    wait_caught_up(&primary, &standby);
    standby.kill();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(2, 400)));
    let st = primary.wait_status(
        "target to notice the standby is gone",
        Duration::from_secs(30),
        |st| st["targets"][0]["state"] != "streaming" || seq(st, "/targets/0/lag_bytes") > 0,
    );
    assert!(
        seq(&st, "/targets/0/lag_bytes") > 0,
        "lag must show while the standby is down: {st:#}"
    );
    let standby = Node::start(&ferryd(), &scfgs[0]);
    wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
}

/// A standby whose certificate comes from another cluster is refused.
#[test]
fn a_node_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (pcfg, _) = init(dir.path(), &["dr1"], "async");
    // Another cluster's dr1 listening where ours is expected.
    let (_, other_cfgs) = init(other.path(), &["dr1"], "async");
    let addr = repl_listen(&dir.path().join("dr1.toml"));
    let theirs = std::fs::read_to_string(&other_cfgs[0]).unwrap();
    let theirs_addr = repl_listen(&other_cfgs[0]);
    std::fs::write(&other_cfgs[0], theirs.replace(&theirs_addr, &addr)).unwrap();
    let impostor = Node::start(&ferryd(), &other_cfgs[0]);
    let primary = Node::start(&ferryd(), &pcfg);
    let st = primary.wait_status("a refusal", Duration::from_secs(30), |st| {
        st["targets"][0]["last_error"].is_string()
    });
    let err = st["targets"][0]["last_error"].as_str().unwrap().to_string();
    assert_ne!(st["targets"][0]["state"], "streaming");
    assert!(
        err.contains("cluster") || err.contains("CA") || err.contains("certificate"),
        "refusal should say why: {err}"
    );
    let ist = impostor.wait_status(
        "the impostor to log the refusal",
        Duration::from_secs(30),
        |st| st["primary"]["last_error"].is_string(),
    );
    assert!(ist["primary"]["connected"].is_null());
}

use ferry_testkit::udp_proxy::LossyLink;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// Replication over a link that drops, duplicates, reorders and stalls: it recovers,
/// the standby applies in order, and the replica ends byte-identical.
#[test]
fn replication_recovers_from_a_lossy_reordering_stalling_link() {
    if skip_without(
        "qemu-io",
        "replication_recovers_from_a_lossy_reordering_stalling_link",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1"], "async");
    // Route the primary's target address through the proxy.
    let sb_addr: SocketAddr = repl_listen(&scfgs[0]).parse().unwrap();
    let link = LossyLink::new(sb_addr).unwrap();
    let p_text = std::fs::read_to_string(&pcfg).unwrap();
    std::fs::write(
        &pcfg,
        p_text.replace(
            &format!("address = \"{sb_addr}\""),
            &format!("address = \"127.0.0.1:{}\"", link.port),
        ),
    )
    .unwrap();
    let standby = Node::start(&ferryd(), &scfgs[0]);
    let primary = Node::start(&ferryd(), &pcfg);
    // 5% loss, 2% duplicates, 5% reordering while writing.
    link.set(50, 20, 50);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(7, 300)));
    // A stall: nothing passes for 3 s while the client keeps writing.
    link.paused.store(true, Ordering::Relaxed);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(8, 200)));
    std::thread::sleep(Duration::from_secs(3));
    let st = primary.status();
    assert!(
        seq(&st, "/targets/0/lag_bytes") > 0,
        "a stalled link must show lag: {st:#}"
    );
    link.paused.store(false, Ordering::Relaxed);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(9, 200)));
    wait_caught_up(&primary, &standby);
    link.set(0, 0, 0);
    assert!(
        link.seen.load(Ordering::Relaxed) > 100,
        "traffic must have crossed the proxy"
    );
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
}

/// A sync standby that dies must not fail client writes: after `sync_timeout_ms` it is
/// degraded to async (visible in status), status says `disconnected` (not
/// `streaming`, then `connecting`), and it becomes synchronous again once it has
/// caught up.
#[test]
fn dead_sync_standby_degrades_to_async_and_recovers() {
    if skip_without(
        "qemu-io",
        "dead_sync_standby_degrades_to_async_and_recovers",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1"], "sync");
    let text = std::fs::read_to_string(&pcfg).unwrap();
    std::fs::write(
        &pcfg,
        text.replace("sync_timeout_ms = 5000", "sync_timeout_ms = 500"),
    )
    .unwrap();
    let mut standby = Node::start(&ferryd(), &scfgs[0]);
    let primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("target to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(3, 50)));
    assert_eq!(primary.status()["targets"][0]["effective_mode"], "sync");
    standby.kill();
    // Writes still succeed (after at most one timeout), and status says why RPO > 0.
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(4, 100)));
    let st = primary.status();
    assert_eq!(
        st["targets"][0]["effective_mode"], "async (degraded)",
        "{st:#}"
    );
    assert!(seq(&st, "/targets/0/lag_bytes") > 0);
    // Status says the standby is gone within seconds (it sent nothing for 5 s; not
    // QUIC's 10 s idle timeout), and keeps saying so while it is redialled.
    primary.wait_status(
        "the killed standby to read disconnected",
        Duration::from_secs(9),
        |st| st["targets"][0]["state"] == "disconnected",
    );
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let st = primary.status();
        assert_eq!(st["targets"][0]["state"], "disconnected", "{st:#}");
    }
    // Back: it catches up and is synchronous again, even with writes going on.
    let standby = Node::start(&ferryd(), &scfgs[0]);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(5, 100)));
    primary.wait_status(
        "the target to be synchronous again",
        Duration::from_secs(60),
        |st| st["targets"][0]["effective_mode"] == "sync",
    );
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(6, 50)));
    wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
}

/// A primary restarted after SIGKILL resumes replication at once: the standby replaces
/// the dead session instead of waiting for QUIC's idle timeout (10 s).
#[test]
fn restarted_primary_resumes_without_waiting_for_the_dead_connection() {
    if skip_without(
        "qemu-io",
        "restarted_primary_resumes_without_waiting_for_the_dead_connection",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1"], "async");
    let standby = Node::start(&ferryd(), &scfgs[0]);
    let mut primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(11, 100)));
    wait_caught_up(&primary, &standby);
    primary.kill();
    let primary = Node::start(&ferryd(), &pcfg);
    let started = std::time::Instant::now();
    primary.wait_status(
        "the restarted primary to stream again",
        Duration::from_secs(30),
        |st| st["targets"][0]["state"] == "streaming",
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "resuming took {took:?}: the standby waited for the dead connection"
    );
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(12, 100)));
    wait_caught_up(&primary, &standby);
    same_file(
        &dir.path().join("primary/vol0.img"),
        &dir.path().join("dr1/vol0.img"),
    );
}

/// Stopping a primary that has replicated is clean: no shipper thread outlives the
/// runtime. Its journal reader thread used to wait on a tokio timer through a
/// runtime handle and panicked ("A Tokio 1.x context was found, but it is being
/// shutdown") when SIGTERM shut that runtime down within its 200 ms wait, although
/// ferryd still exited 0. A race: three stops (it hit about two in three before).
#[test]
fn stopping_a_replicating_primary_panics_no_thread() {
    if skip_without("qemu-io", "stopping_a_replicating_primary_panics_no_thread") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfgs) = init(dir.path(), &["dr1", "dr2"], "async");
    let _dr1 = Node::start(&ferryd(), &scfgs[0]);
    let dr2 = Node::start(&ferryd(), &scfgs[1]);
    for round in 0..3 {
        let mut primary = Node::start(&ferryd(), &pcfg);
        assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(21 + round, 100)));
        wait_caught_up(&primary, &dr2);
        primary.wait_status("both shippers streaming", Duration::from_secs(30), |st| {
            (0..2).all(|i| st["targets"][i]["state"] == "streaming")
        });
        // Caught up: both reader threads wait for durable records when SIGTERM arrives.
        let status = primary.terminate();
        let log = primary.log_text();
        assert!(
            status.success(),
            "ferryd exited with {status:?}; log:\n{log}"
        );
        assert!(
            !log.contains("panicked"),
            "a thread panicked while the primary stopped (round {round}); log:\n{log}"
        );
    }
}

/// A cluster that grows: `ferryctl node add` issues the third node's certificate from
/// the cluster CA, writes its config and adds it to the primary's targets (keeping the
/// operator's comments there); `ferryctl reload` makes the running primary (same
/// process) ship to it, and the new standby receives everything, including what was
/// written before it existed. A name or address already in the cluster is refused; a
/// reload that also changes a volume's size is refused naming the key and changes
/// nothing; SIGHUP reloads too (here: the target removed again).
#[test]
fn node_add_grows_a_running_cluster_by_a_third_standby() {
    if skip_without(
        "qemu-io",
        "node_add_grows_a_running_cluster_by_a_third_standby",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, s) = init(dir.path(), &["dr1"], "async");
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.insert_str(0, "# operator's note: keep this\n");
    std::fs::write(&pcfg, &text).unwrap();
    let dr1 = Node::start(&ferryd(), &s[0]);
    let primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(71, 40)));

    let addr = format!("127.0.0.1:{}", ferryd::testkit::free_udp_port());
    let add = |spec: &str| {
        std::process::Command::new(ferryctl())
            .args(["node", "add", spec, "--dir"])
            .arg(dir.path())
            .arg("--same-host")
            .output()
            .unwrap()
    };
    let out = add(&format!("dr2={addr}"));
    assert!(
        out.status.success(),
        "node add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reload"),
        "node add names the next step: {out:?}"
    );
    let dr2_cfg = dir.path().join("dr2.toml");
    let cfg = ferry_api::config::Config::load(&dr2_cfg).unwrap();
    assert_eq!(cfg.replication.as_ref().unwrap().listen, addr);
    assert!(dir.path().join("dr2/tls/dr2.pem").exists());
    let ptext = std::fs::read_to_string(&pcfg).unwrap();
    assert!(
        ptext.starts_with("# operator's note: keep this\n"),
        "{ptext}"
    );
    let pconf = ferry_api::config::Config::load(&pcfg).unwrap();
    let names: Vec<_> = pconf
        .replication
        .unwrap()
        .targets
        .iter()
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(names, ["dr1", "dr2"]);
    for again in [
        format!("dr2=127.0.0.1:{}", ferryd::testkit::free_udp_port()),
        format!("dr3={addr}"),
    ] {
        let out = add(&again);
        assert!(!out.status.success(), "{again} must be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("already"),
            "{out:?}"
        );
    }
    let targets = |st: &serde_json::Value| -> Vec<String> {
        st["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };

    // All or nothing: the new target and a new volume size; the size needs a restart.
    let v = ptext.find("[[volume]]").unwrap();
    let at = v + ptext[v..].find("size = ").unwrap();
    let end = at + ptext[at..].find('\n').unwrap();
    let mut bigger = ptext.clone();
    bigger.replace_range(at..end, "size = \"128MiB\"");
    std::fs::write(&pcfg, &bigger).unwrap();
    let out = ctl(&pcfg, &["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("volume[0].size"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(targets(&primary.status()), ["dr1"], "nothing changed");
    std::fs::write(&pcfg, &ptext).unwrap();

    let dr2 = Node::start(&ferryd(), &dr2_cfg);
    let out = ctl(&pcfg, &["reload"]);
    assert!(out.status.success(), "reload: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("target dr2 added"),
        "{out:?}"
    );
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(72, 40)));
    let last = seq(&primary.status(), "/durable_seq");
    primary.wait_status(
        "dr2 to stream and hold everything",
        Duration::from_secs(90),
        |st| {
            st["targets"].as_array().into_iter().flatten().any(|t| {
                t["name"] == "dr2" && t["tracking"] == "streaming" && seq(t, "/acked_seq") >= last
            })
        },
    );
    dr2.wait_status("dr2 to apply everything", Duration::from_secs(60), |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
    let vol = |c: &Path| {
        ferry_api::config::Config::load(c).unwrap().volumes[0]
            .path
            .clone()
    };
    same_file(&vol(&pcfg), &vol(&dr2_cfg));
    // The same process all along: it recovered its journal once.
    assert_eq!(
        primary.log_text().matches("journal recovered").count(),
        1,
        "the primary restarted: {}",
        primary.log_text()
    );
    assert!(Path::new(&format!("/proc/{}", primary.pid)).exists());

    // SIGHUP does what reload does: dr2 removed from the file, then from the primary.
    std::fs::write(&pcfg, &text).unwrap();
    // SAFETY: signalling the primary this test started, by its PID.
    unsafe { libc::kill(primary.pid as i32, libc::SIGHUP) };
    primary.wait_status("SIGHUP to remove dr2", Duration::from_secs(30), |st| {
        targets(st) == ["dr1"]
    });
    let meta = ferry_api::config::Config::load(&pcfg)
        .unwrap()
        .node
        .metadata_dir;
    assert!(!meta.join("dirty/dr2").exists(), "dr2's maps are deleted");
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(73, 20)));
    wait_caught_up(&primary, &dr1);
    drop(dr2);
}

/// `node add` on a cluster with a sync policy: the policy decides which targets are
/// sync. Without `--mode` the new node is async, and the output gives the exact line
/// that would list it; its config carries the policy (enforced once it is promoted),
/// and a reload adds it live. `--mode sync` appends it to the policy in
/// `primary.toml` and says a restart applies it (a reload refuses the policy change);
/// after the restart the primary gates on the new list. A node whose config cannot
/// know every node the policy names gets no policy, and a note saying why.
#[test]
fn node_add_follows_the_clusters_sync_policy() {
    let name = "node_add_follows_the_clusters_sync_policy";
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, s) = init(dir.path(), &["dr1/sync", "dr2/sync"], "sync");
    let text = std::fs::read_to_string(&pcfg).unwrap();
    let text = text.replacen(
        "[replication]\n",
        "[replication]\nsync = \"ANY 1 (dr1, dr2)\"\n",
        1,
    );
    std::fs::write(&pcfg, &text).unwrap();
    let _dr1 = Node::start(&ferryd(), &s[0]);
    let _dr2 = Node::start(&ferryd(), &s[1]);
    let mut primary = Node::start(&ferryd(), &pcfg);
    let add = |spec: &str, mode: &[&str]| {
        let out = std::process::Command::new(ferryctl())
            .args(["node", "add", spec, "--dir"])
            .arg(dir.path())
            .arg("--same-host")
            .args(mode)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node add {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let load = |c: &Path| ferry_api::config::Config::load(c).unwrap();
    let modes = |c: &ferry_api::config::Config| -> Vec<(String, &'static str)> {
        c.ship_targets()
            .into_iter()
            .map(|t| {
                let sync = t.mode == ferry_api::config::ReplicationMode::Sync;
                (t.name, if sync { "sync" } else { "async" })
            })
            .collect()
    };

    // Without --mode: async, the exact line to list it, the policy carried.
    let out = add(&format!("dr3=127.0.0.1:{}", free_port()), &[]);
    assert!(
        out.contains("does not list dr3, so it is async")
            && out.contains("sync = \"ANY 1 (dr1, dr2, dr3)\"")
            && out.contains("reload"),
        "{out}"
    );
    let p = load(&pcfg);
    assert_eq!(p.sync_policy().unwrap().to_string(), "ANY 1 (dr1, dr2)");
    let dr3 = load(&dir.path().join("dr3.toml"));
    assert_eq!(
        dr3.sync_policy().map(|p| p.to_string()).as_deref(),
        Some("ANY 1 (dr1, dr2)"),
        "dr3 carries the cluster's policy"
    );
    assert_eq!(
        modes(&dr3),
        [
            ("primary".to_string(), "async"),
            ("dr1".to_string(), "sync"),
            ("dr2".to_string(), "sync")
        ]
    );
    let out = ctl(&pcfg, &["reload"]);
    assert!(out.status.success(), "reload: {out:?}");
    primary.wait_status("dr3 added as an async target", WAIT, |st| {
        st["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["name"] == "dr3" && t["effective_mode"] == "async")
    });

    // --mode sync: appended to the policy; a restart applies it.
    let out = add(
        &format!("dr4=127.0.0.1:{}", free_port()),
        &["--mode", "sync"],
    );
    assert!(
        out.contains("is now \"ANY 1 (dr1, dr2, dr4)\" (was \"ANY 1 (dr1, dr2)\")")
            && out.contains("restart the primary"),
        "{out}"
    );
    let ptext = std::fs::read_to_string(&pcfg).unwrap();
    assert!(
        ptext.contains("sync = \"ANY 1 (dr1, dr2, dr4)\"\n"),
        "{ptext}"
    );
    assert_eq!(
        modes(&load(&pcfg)),
        [
            ("dr1".to_string(), "sync"),
            ("dr2".to_string(), "sync"),
            ("dr3".to_string(), "async"),
            ("dr4".to_string(), "sync")
        ]
    );
    let dr4cfg = dir.path().join("dr4.toml");
    assert_eq!(
        load(&dr4cfg)
            .sync_policy()
            .map(|p| p.to_string())
            .as_deref(),
        Some("ANY 1 (dr1, dr2, dr4)")
    );
    let out = ctl(&pcfg, &["reload"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("replication.sync"),
        "a reload must refuse the policy change: {out:?}"
    );
    let code = primary.terminate();
    assert!(code.success(), "{code}");
    let _dr4 = Node::start(&ferryd(), &dr4cfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let st = primary.wait_status("dr4 to stream as a sync target", WAIT, |st| {
        st["targets"].as_array().into_iter().flatten().any(|t| {
            t["name"] == "dr4" && t["state"] == "streaming" && t["effective_mode"] == "sync"
        })
    });
    assert_eq!(st["sync_policy"], "ANY 1 (dr1, dr2, dr4)", "{st:#}");
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(74, 10)));

    // dr5's config lists no dr4 (the primary's [cluster] does not): no policy, a note.
    let out = add(&format!("dr5=127.0.0.1:{}", free_port()), &[]);
    assert!(
        out.contains("dr5.toml has no replication.sync: the policy names dr4"),
        "{out}"
    );
    assert!(load(&dir.path().join("dr5.toml")).sync_policy().is_none());
}

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    ferryd::testkit::free_udp_port()
}
