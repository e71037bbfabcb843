//! Cascading end to end with real processes on loopback: `ferryctl init` makes a
//! primary, a sync standby `dr1` and a standby `far` relayed by dr1
//! (`far=HOST:PORT@via=dr1`). The primary never ships to far; dr1 ships to it from its
//! own journal, and far ends byte-identical to the primary. dr1 is then SIGKILLed,
//! the primary writes on, and once dr1 is back far catches up through it, in order
//! (`via_fallback = "stay"`); with the default fallback the primary ships to far while
//! dr1 is down and hands it back to dr1 once dr1 holds what far holds.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

/// Bounded waits: generous, since the machine may be loaded; never a timing assertion.
const WAIT: Duration = Duration::from_secs(30);

/// The status entry of target `name` (`targets[]`), or null.
fn target<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// 16 KiB writes of pattern `p` every 64 KiB over the first `n` slots, then a flush.
/// Run twice with other patterns over overlapping slots, so an out-of-order apply
/// would leave an older pattern behind.
fn workload(n: u64, p: u64, shift: u64) -> Vec<String> {
    let mut cmds: Vec<String> = (0..n)
        .map(|i| format!("write -P {} {} 16k", (p + i) % 250 + 1, i * 65536 + shift))
        .collect();
    cmds.push("flush".into());
    cmds
}

/// The `cluster[]` entry of member `name`, or null.
fn member<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["cluster"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn volume_of(config: &Path) -> std::path::PathBuf {
    ferry_api::config::Config::load(config).unwrap().volumes[0]
        .path
        .clone()
}

/// Waits until dr1 holds what the primary made durable, relayed it to far, and far
/// applied it; returns that sequence.
fn wait_relayed(primary: &Node, dr1: &Node, far: &Node) -> u64 {
    let last = seq(&primary.status(), "/durable_seq");
    primary.wait_status("dr1 to hold everything", WAIT, |st| {
        seq(target(st, "dr1"), "/acked_seq") >= last
    });
    dr1.wait_status("dr1 to relay everything to far", WAIT, |st| {
        let t = target(st, "far");
        t["state"] == "streaming" && seq(t, "/acked_seq") >= last && seq(t, "/lag_bytes") == 0
    });
    far.wait_status("far to apply everything", WAIT, |st| {
        seq(st, "/applied_seq") >= last && st["replica"] == "consistent"
    });
    last
}

/// far's replica equals the primary's volume as the primary serves it.
fn far_equals_primary(primary: &Node, far_cfg: &Path, scratch: &Path) {
    let want = image_of(&primary.url("vol0"), scratch);
    let got = std::fs::read(volume_of(far_cfg)).unwrap();
    assert_same("far's replica against the primary", &got, &want);
}

/// `ferryctl init` for a primary, `dr1` (`dr1_mode`) and `far` relayed by dr1, with
/// `via_fallback` set in every config when given; the three config paths.
fn init_cascade(dir: &Path, dr1_mode: &str, fallback: Option<&str>) -> (PathBuf, PathBuf, PathBuf) {
    let dr1 = format!("dr1/{dr1_mode}");
    let (pcfg, s) = init_cluster(
        dir,
        &[dr1.as_str(), "far@via=dr1"],
        &Init {
            volume: "vol0:16MiB",
            ..Init::default()
        },
    );
    for cfg in [&pcfg, &s[0], &s[1]] {
        let text = std::fs::read_to_string(cfg).unwrap();
        assert!(
            text.contains("via = \"dr1\""),
            "init wrote no via into {}:\n{text}",
            cfg.display()
        );
        if let Some(f) = fallback {
            let with = text.replace(
                "via = \"dr1\"",
                &format!("via = \"dr1\"\nvia_fallback = \"{f}\""),
            );
            std::fs::write(cfg, with).unwrap();
        }
    }
    (pcfg, s[0].clone(), s[1].clone())
}

#[test]
fn a_standby_relays_to_the_member_whose_via_names_it() {
    let name = "a_standby_relays_to_the_member_whose_via_names_it";
    if skip_without("qemu-io", name) || skip_without("qemu-img", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, dr1cfg, farcfg) = init_cascade(dir.path(), "sync", Some("stay"));
    let (dr1cfg, farcfg) = (&dr1cfg, &farcfg);
    let far = Node::start(&ferryd(), farcfg);
    let mut dr1 = Node::start(&ferryd(), dr1cfg);
    let primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("dr1 to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming"
    });

    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(120, 1, 0)));
    let last = wait_relayed(&primary, &dr1, &far);
    let scratch = dir.path().join("primary.img");
    far_equals_primary(&primary, farcfg, &scratch);

    // The primary has no session to far: far is not among its targets at all.
    let st = primary.status();
    assert!(
        target(&st, "far").is_null(),
        "the primary ships to far itself: {st:#}"
    );
    let m = member(&st, "far");
    assert_eq!(m["state"], "relayed by dr1", "{st:#}");
    assert_eq!(m["connected"], false, "{st:#}");
    // far follows the primary, fed by dr1.
    let f = far.status();
    assert_eq!(f["primary"]["name"], "primary", "{f:#}");
    assert_eq!(f["primary"]["via"], "dr1", "{f:#}");
    assert_eq!(f["primary"]["source"], "dr1", "{f:#}");
    assert_eq!(seq(&f, "/durable_seq"), seq(&dr1.status(), "/durable_seq"));

    // The relay dies; the primary writes on (dr1 is sync: its timeout degrades it).
    dr1.kill();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(160, 77, 8192)));
    let more = seq(&primary.status(), "/durable_seq");
    assert!(more > last, "the second workload journaled nothing");
    // far keeps what it has and stays at it: nobody else ships to it.
    let f = far.status();
    assert_eq!(seq(&f, "/applied_seq"), last, "{f:#}");
    assert!(target(&primary.status(), "far").is_null());

    // dr1 comes back, catches up from the primary, and relays the rest to far.
    let dr1 = Node::start(&ferryd(), dr1cfg);
    let now = wait_relayed(&primary, &dr1, &far);
    assert!(now >= more);
    far_equals_primary(&primary, farcfg, &scratch);
    let d = dr1.status();
    assert_eq!(member(&d, "far")["state"], "relayed (streaming)", "{d:#}");
}

/// `ferryctl init` refuses a relay that is not another standby and a relayed standby
/// asked to be sync, naming the spec.
#[test]
fn init_refuses_a_via_that_cannot_relay() {
    for (specs, want) in [
        (
            ["dr1=127.0.0.1:7101", "far=127.0.0.1:7102@via=dr9"],
            "@via=dr9 must name another --standby",
        ),
        (
            ["dr1=127.0.0.1:7101", "far=127.0.0.1:7102@via=far"],
            "@via=far must name another --standby",
        ),
        (
            ["dr1=127.0.0.1:7101", "far=127.0.0.1:7102/sync@via=dr1"],
            "a standby with @via is async",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--volume",
            "vol0:16MiB",
            "--nbd",
            "127.0.0.1:0",
            "--primary",
            "127.0.0.1:7100",
        ];
        for s in specs {
            args.extend(["--standby", s]);
        }
        let out = init_dir(dir.path(), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{specs:?}: {err}"
        );
    }
}

/// With the default `via_fallback = "primary"`: while dr1 is down the primary ships to
/// far itself (after the fallback delay), and once dr1 is back and holds what far
/// holds, the primary stops and dr1 relays again; far equals the primary throughout.
#[test]
fn the_primary_ships_to_a_relayed_member_while_its_relay_is_down() {
    let name = "the_primary_ships_to_a_relayed_member_while_its_relay_is_down";
    if skip_without("qemu-io", name) || skip_without("qemu-img", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, dr1cfg, farcfg) = init_cascade(dir.path(), "async", None);
    let far = Node::start(&ferryd(), &farcfg);
    let mut dr1 = Node::start(&ferryd(), &dr1cfg);
    let primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("dr1 to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming"
    });
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(60, 3, 0)));
    wait_relayed(&primary, &dr1, &far);
    assert!(target(&primary.status(), "far").is_null());

    dr1.kill();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(100, 41, 4096)));
    let last = seq(&primary.status(), "/durable_seq");
    primary.wait_status("the primary to ship to far itself", WAIT, |st| {
        let t = target(st, "far");
        t["state"] == "streaming" && seq(t, "/acked_seq") >= last && t["mode"] == "async"
    });
    far.wait_status("far to apply what the primary sent", WAIT, |st| {
        seq(st, "/applied_seq") >= last && st["primary"]["source"] == "primary"
    });
    let scratch = dir.path().join("primary.img");
    far_equals_primary(&primary, &farcfg, &scratch);
    assert!(
        primary.log_text().contains("shipping to 'far' directly"),
        "{}",
        primary.log_text()
    );

    // dr1 returns: it catches up from the primary, the primary lets far go, dr1 relays.
    let dr1 = Node::start(&ferryd(), &dr1cfg);
    primary.wait_status("the primary to hand far back to dr1", WAIT, |st| {
        target(st, "far").is_null() && target(st, "dr1")["state"] == "streaming"
    });
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(80, 120, 8192)));
    wait_relayed(&primary, &dr1, &far);
    far_equals_primary(&primary, &farcfg, &scratch);
    let f = far.status();
    assert_eq!(f["primary"]["source"], "dr1", "{f:#}");
}
