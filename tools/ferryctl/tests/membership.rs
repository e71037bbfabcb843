//! Membership end to end with real processes on loopback: a primary, a sync standby
//! `dr1` and an async standby `dr2` made by `ferryctl init` (every config lists every
//! node); the primary is SIGKILLed mid-workload and dr1 promoted: dr2 follows dr1 by
//! itself, ends byte-identical to it, and never follows the old primary when that
//! one comes back without a demote. And `promote` refuses a standby behind another.
mod common;
use common::netns::Netns;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

use ferryd::testkit::{
    acked_writes, assert_qemu_io_ok, qemu_io, skip_without, spawn_qemu_io, Node,
};

/// Bounded waits: generous, since the machine may be loaded; never a timing assertion.
const WAIT: Duration = Duration::from_secs(30);

/// The `cluster[]` entry of member `name`.
fn member<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["cluster"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// `promote --json` on `config`, retrying while the dead primary still counts as
/// connected (three missed heartbeats). Returns the answer or the final refusal.
fn promote(config: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut a = vec!["promote", "--json"];
        a.extend_from_slice(args);
        let out = ctl(config, &a);
        if out.status.success() {
            return Ok(serde_json::from_slice(&out.stdout).unwrap());
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if !err.contains("is connected") || Instant::now() > deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn volume_of(config: &Path) -> std::path::PathBuf {
    ferry_api::config::Config::load(config).unwrap().volumes[0]
        .path
        .clone()
}

#[test]
fn after_a_failover_the_other_standby_follows_the_new_primary() {
    let name = "after_a_failover_the_other_standby_follows_the_new_primary";
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, s) = init_cluster(
        dir.path(),
        &["dr1/sync", "dr2/async"],
        &Init {
            volume: "vol0:32MiB",
            mode: "sync",
            ..Init::default()
        },
    );
    let (dr1cfg, dr2cfg) = (&s[0], &s[1]);
    let text = std::fs::read_to_string(dr2cfg).unwrap();
    assert!(
        text.contains("[[cluster.node]]") && text.contains("name = \"dr1\""),
        "init wrote no membership into dr2's config:\n{text}"
    );
    let _dr1 = Node::start(&ferryd(), dr1cfg);
    let dr2 = Node::start(&ferryd(), dr2cfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("both targets to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    let run = spawn_qemu_io(&primary.url("vol0"), &workload(400));
    primary.wait_status("part of the workload", Duration::from_secs(60), |st| {
        seq(st, "/last_seq") >= 100
    });
    primary.kill();
    let acked = acked_writes(&run.finish(), 16384);
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );

    // dr2 (async) may hold a write-set more than dr1 if the kill came between the
    // two acks: promote then refuses, naming dr2, and --force goes ahead (dr2 is then
    // resynced from dr1's history).
    let t0 = Instant::now();
    let (p, forced) = match promote(dr1cfg, &[]) {
        Ok(p) => (p, false),
        Err(e) => {
            assert!(e.contains("'dr2' holds more"), "promote dr1: {e}");
            eprintln!("promote dr1 refused ({e}); forcing");
            (
                promote(dr1cfg, &["--force"]).expect("promote --force"),
                true,
            )
        }
    };
    assert_eq!(p["epoch"], 2, "{p:#}");
    if forced {
        // dr2 holds a write past dr1's fork: dr1 resyncs it once its own history
        // passes dr2's position, so it writes a little first.
        let st = wait_for(dr1cfg, "dr1 to serve as the primary", WAIT, |st| {
            st["role"] == "primary" && st["nbd"]["listen"].is_string()
        });
        let url = format!("nbd://{}/vol0", st["nbd"]["listen"].as_str().unwrap_or(""));
        let pass: Vec<String> = (0..16)
            .map(|i| format!("write -P 0x11 {} 4k", (28 << 20) + i * 4096))
            .collect();
        assert_qemu_io_ok(&qemu_io(&url, &pass));
    }

    // dr2 hears of epoch 2 when dr1 dials it, follows dr1 (a restart in epoch 2), and
    // dr1 streams to it.
    let st = wait_for(dr1cfg, "dr1 to stream to dr2", WAIT, |st| {
        st["role"] == "primary"
            && target(st, "dr2")["state"] == "streaming"
            && target(st, "dr2")["tracking"] == "streaming"
    });
    let took = t0.elapsed();
    let t = target(&st, "dr2");
    eprintln!(
        "membership: promote of dr1 to dr2 streaming from it: {:.3} s; resync moved {} bytes ({} as data) for a {} byte volume; fork {}",
        took.as_secs_f64(),
        seq(t, "/resync_bytes"),
        seq(t, "/resync_data_bytes"),
        32u64 << 20,
        p["fork_seq"]
    );
    let d2 = dr2.status();
    assert_eq!(
        (d2["epoch"].as_u64(), d2["primary"]["name"].as_str()),
        (Some(2), Some("dr1")),
        "{d2:#}"
    );
    assert!(
        dr2.log_text().contains("following it"),
        "{}",
        dr2.log_text()
    );

    // Every acknowledged write is on dr1.
    let url = format!(
        "nbd://{}/vol0",
        st["nbd"]["listen"].as_str().expect("dr1's NBD address")
    );
    let reads: Vec<String> = acked
        .iter()
        .map(|o| format!("read -P {} {o} 16k", pattern_of(*o)))
        .collect();
    for chunk in reads.chunks(200) {
        assert_qemu_io_ok(&qemu_io(&url, chunk));
    }

    // New writes on dr1; once dr2 holds and applied them, the replicas are equal.
    assert_qemu_io_ok(&qemu_io(
        &url,
        &[
            "write -P 0x5a 30M 1M".to_string(),
            "write -P 0x5b 4k 8k".to_string(),
            "flush".to_string(),
        ],
    ));
    let caught_up = |st: &serde_json::Value| {
        let t = target(st, "dr2");
        t["state"] == "streaming"
            && seq(t, "/acked_seq") >= seq(st, "/durable_seq")
            && seq(t, "/lag_bytes") == 0
    };
    let st = wait_for(dr1cfg, "dr2 to hold everything dr1 wrote", WAIT, caught_up);
    let last = seq(&st, "/durable_seq");
    dr2.wait_status("dr2 to apply everything", WAIT, |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
    same_file(&volume_of(dr1cfg), &volume_of(dr2cfg));

    // Each node shows the cluster as it sees it.
    let m = member(&st, "dr2");
    assert_eq!(
        (
            m["role"].as_str(),
            m["connected"].as_bool(),
            m["epoch"].as_u64()
        ),
        (Some("standby"), Some(true), Some(2)),
        "{st:#}"
    );
    assert_eq!(member(&st, "primary")["connected"], false, "{st:#}");
    let d2 = dr2.status();
    let m = member(&d2, "dr1");
    assert_eq!(
        (
            m["role"].as_str(),
            m["connected"].as_bool(),
            m["state"].as_str()
        ),
        (Some("primary"), Some(true), Some("following")),
        "{d2:#}"
    );
    let text = String::from_utf8_lossy(&ctl(dr2cfg, &["status"]).stdout).to_string();
    assert!(
        text.contains("member     \"dr1\"") && text.contains("following"),
        "{text}"
    );

    // The old primary comes back without a demote (epoch 1): it learns it is
    // outdated, and dr2 keeps following dr1 (a lower epoch never captures it).
    let old = Node::start(&ferryd(), &pcfg);
    old.wait_status("the old primary to learn it is outdated", WAIT, |st| {
        st["outdated"].is_object()
    });
    // Long enough for the old primary's shipper to dial dr2 (it redials within a
    // second or two of its start).
    std::thread::sleep(Duration::from_secs(3));
    assert_qemu_io_ok(&qemu_io(
        &url,
        &["write -P 0x5c 12M 64k".to_string(), "flush".to_string()],
    ));
    let st = wait_for(dr1cfg, "dr2 to hold dr1's newest write", WAIT, caught_up);
    let last = seq(&st, "/durable_seq");
    let d2 = dr2.wait_status("dr2 to apply dr1's newest write", WAIT, |st| {
        seq(st, "/applied_seq") >= last
    });
    assert_eq!(
        (d2["epoch"].as_u64(), d2["primary"]["name"].as_str()),
        (Some(2), Some("dr1")),
        "dr2 followed a lower epoch: {d2:#}"
    );
    same_file(&volume_of(dr1cfg), &volume_of(dr2cfg));

    // The old primary learns from dr1 itself (dr1 ships to it) who superseded it, and
    // rejoins through `demote` as dr1's standby: dr1 then streams to both.
    let st = old.wait_status("dr1 to name itself to the old primary", WAIT, |st| {
        st["outdated"]["by"] == "dr1"
    });
    let old_last = seq(&st, "/last_seq");
    let d = ctl_json(&pcfg, &["demote"]);
    assert_eq!(d["primary"], "dr1", "{d:#}");
    wait_for(&pcfg, "the old primary to run as a standby", WAIT, |st| {
        st["role"] == "standby"
    });
    // dr1 must pass the old primary's last sequence before it can resync it.
    let fork = seq(&p, "/fork_seq");
    let filler: Vec<String> = (0..(old_last.saturating_sub(fork) + 2))
        .map(|i| format!("write -P 0x66 {} 4k", (24 << 20) + i * 4096))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &filler));
    let both = |st: &serde_json::Value| {
        ["primary", "dr2"].iter().all(|n| {
            let t = target(st, n);
            t["state"] == "streaming"
                && t["tracking"] == "streaming"
                && seq(t, "/acked_seq") >= seq(st, "/durable_seq")
        })
    };
    let st = wait_for(
        dr1cfg,
        "dr1 to stream to the old primary and dr2",
        Duration::from_secs(60),
        both,
    );
    let last = seq(&st, "/durable_seq");
    for c in [&pcfg, dr2cfg] {
        wait_for(c, "a standby to apply everything", WAIT, |st| {
            seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
        });
    }
    same_file(&volume_of(dr1cfg), &volume_of(&pcfg));
    same_file(&volume_of(dr1cfg), &volume_of(dr2cfg));
    eprintln!(
        "membership: the old primary rejoined dr1 by demote: {} bytes moved ({} as data)",
        seq(target(&st, "primary"), "/resync_bytes"),
        seq(target(&st, "primary"), "/resync_data_bytes")
    );
    drop(old);
}

#[test]
fn promote_refuses_a_standby_behind_another_and_the_other_can_be_promoted() {
    let name = "promote_refuses_a_standby_behind_another_and_the_other_can_be_promoted";
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, s) = init_cluster(
        dir.path(),
        &["dr1", "dr2"],
        &Init {
            volume: "vol0:32MiB",
            mode: "async",
            ..Init::default()
        },
    );
    let (dr1cfg, dr2cfg) = (&s[0], &s[1]);
    let dr1 = Node::start(&ferryd(), dr1cfg);
    let _dr2 = Node::start(&ferryd(), dr2cfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    primary.wait_status("both targets to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    assert_qemu_io_ok(&qemu_io(&url, &workload(16)));
    // dr1 stops following; what follows reaches dr2 only.
    let out = ctl(dr1cfg, &["pause"]);
    assert!(out.status.success(), "pause: {out:?}");
    assert_qemu_io_ok(&qemu_io(
        &url,
        &["write -P 0x33 8M 256k".to_string(), "flush".to_string()],
    ));
    let st = primary.wait_status("dr2 to hold everything", WAIT, |st| {
        seq(target(st, "dr2"), "/acked_seq") >= seq(st, "/durable_seq")
    });
    let last = seq(&st, "/durable_seq");
    primary.kill();

    let e = promote(dr1cfg, &[]).expect_err("promote of the standby behind dr2 went through");
    assert!(
        e.contains("standby 'dr2' holds more") && e.contains(&format!("sequence {last}")),
        "{e}"
    );
    assert_eq!(
        seq(&dr1.status(), "/epoch"),
        1,
        "the refused promote changed dr1"
    );

    // The async standby that holds more is promoted; dr1 resumes and follows it.
    let p = promote(dr2cfg, &[]).expect("promote dr2");
    assert_eq!(p["epoch"], 2, "{p:#}");
    assert_eq!(p["fork_seq"].as_u64(), Some(last), "{p:#}");
    let out = ctl(dr1cfg, &["resume"]);
    assert!(out.status.success(), "resume: {out:?}");
    let st = wait_for(dr2cfg, "dr2 to stream to dr1", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming"
            && target(st, "dr1")["tracking"] == "streaming"
            && seq(target(st, "dr1"), "/acked_seq") >= seq(st, "/durable_seq")
    });
    let last = seq(&st, "/durable_seq");
    dr1.wait_status("dr1 to apply everything from dr2", WAIT, |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
    same_file(&volume_of(dr1cfg), &volume_of(dr2cfg));
}

/// The loopback test's failover with each node in its own network namespace, joined
/// by veth pairs through a bridge: dr2 follows the promoted dr1 across the links and
/// ends byte-identical to it.
#[test]
fn in_network_namespaces_the_other_standby_follows_the_new_primary() {
    let name = "in_network_namespaces_the_other_standby_follows_the_new_primary";
    if skip_without("qemu-io", name) || skip_without("ip", name) {
        return;
    }
    let (ns, addrs) = match Netns::make(3) {
        Ok(v) => v,
        Err(e) => {
            ferryd::testkit::skip(name, &format!("cannot make network namespaces: {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ferryctl())
        .args(["init", "--dir"])
        .arg(dir.path())
        .args(["--volume", "vol0:32MiB", "--nbd", "127.0.0.1:0"])
        .args([
            "--journal-size",
            "64MiB",
            "--segment-size",
            "4MiB",
            "--mode",
            "sync",
        ])
        .args(["--primary", &format!("{}:7001", addrs[0])])
        .args(["--standby", &format!("dr1={}:7001/sync", addrs[1])])
        .args(["--standby", &format!("dr2={}:7001/async", addrs[2])])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfgs: Vec<std::path::PathBuf> = ["primary", "dr1", "dr2"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.toml")))
        .collect();
    // Each node serves NBD on its own link address (the test's client is outside).
    for (c, a) in cfgs.iter().zip(&addrs) {
        let mut cfg = ferry_api::config::Config::load(c).unwrap();
        cfg.nbd.as_mut().unwrap().listen = format!("{a}:0");
        std::fs::write(c, cfg.to_toml()).unwrap();
    }
    let _dr1 = Node::start(&ns.ferryd_in(1, dir.path()), &cfgs[1]);
    let dr2 = Node::start(&ns.ferryd_in(2, dir.path()), &cfgs[2]);
    let mut primary = Node::start(&ns.ferryd_in(0, dir.path()), &cfgs[0]);
    primary.wait_status("both targets to stream across the links", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    let run = spawn_qemu_io(&primary.url("vol0"), &workload(200));
    primary.wait_status("part of the workload", Duration::from_secs(60), |st| {
        seq(st, "/last_seq") >= 50
    });
    primary.kill();
    let acked = acked_writes(&run.finish(), 16384);
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );
    let t0 = Instant::now();
    let p = match promote(&cfgs[1], &[]) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.contains("'dr2' holds more"), "promote dr1: {e}");
            promote(&cfgs[1], &["--force"]).expect("promote --force")
        }
    };
    assert_eq!(p["epoch"], 2, "{p:#}");
    let st = wait_for(
        &cfgs[1],
        "dr1 to stream to dr2 across the links",
        WAIT,
        |st| st["role"] == "primary" && st["nbd"]["listen"].is_string(),
    );
    let url = format!("nbd://{}/vol0", st["nbd"]["listen"].as_str().unwrap_or(""));
    // Past anything dr2 may hold beyond the fork (a forced promotion).
    let pass: Vec<String> = (0..16)
        .map(|i| format!("write -P 0x22 {} 4k", (28 << 20) + i * 4096))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &pass));
    let st = wait_for(&cfgs[1], "dr2 to hold everything dr1 wrote", WAIT, |st| {
        let t = target(st, "dr2");
        t["state"] == "streaming"
            && t["tracking"] == "streaming"
            && seq(t, "/acked_seq") >= seq(st, "/durable_seq")
    });
    eprintln!(
        "membership (netns): promote of dr1 to dr2 caught up with it: {:.3} s; resync moved {} bytes ({} as data)",
        t0.elapsed().as_secs_f64(),
        seq(target(&st, "dr2"), "/resync_bytes"),
        seq(target(&st, "dr2"), "/resync_data_bytes")
    );
    let reads: Vec<String> = acked
        .iter()
        .map(|o| format!("read -P {} {o} 16k", pattern_of(*o)))
        .collect();
    for chunk in reads.chunks(200) {
        assert_qemu_io_ok(&qemu_io(&url, chunk));
    }
    let last = seq(&st, "/durable_seq");
    let d2 = dr2.wait_status("dr2 to apply everything", WAIT, |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
    assert_eq!(d2["primary"]["name"], "dr1", "{d2:#}");
    same_file(&volume_of(&cfgs[1]), &volume_of(&cfgs[2]));
}
