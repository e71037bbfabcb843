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
    // The primary's uplink carried the workload once (to dr1); dr1 carried far's copy.
    let relayed = seq(&target(&dr1.status(), "far")["wire"], "/payload_bytes");
    let shipped = seq(&target(&st, "dr1")["wire"], "/payload_bytes");
    assert_eq!(st["targets"].as_array().map(Vec::len), Some(1), "{st:#}");
    assert!(relayed > 0 && shipped > 0, "{st:#}");
    eprintln!(
        "cascade: primary sent {shipped} payload bytes (to dr1 only), dr1 relayed {relayed} to far"
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

/// `promote --json` on `config`, retrying while the dead primary still counts as
/// connected; `--force` when another standby holds more (the test does not care which
/// standby is ahead, only that the relayed node ends equal to the new primary).
fn promote(config: &Path) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = ctl(config, &["promote", "--json"]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if err.contains("holds more") {
            return ctl_json(config, &["promote", "--force"]);
        }
        assert!(
            err.contains("is connected") && std::time::Instant::now() < deadline,
            "promote: {err}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A failover to a standby that is not the relay: dr1 follows the new primary dr2,
/// far follows the new epoch through dr1 and, since dr1 cannot know dr2's fork, asks
/// dr1 for a full resync by digest before taking its write-sets; far ends equal to
/// the new primary.
#[test]
fn a_relayed_member_follows_a_new_epoch_through_its_relay_with_a_resync() {
    let name = "a_relayed_member_follows_a_new_epoch_through_its_relay_with_a_resync";
    if skip_without("qemu-io", name) || skip_without("qemu-img", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, s) = init_cluster(
        dir.path(),
        &["dr1/async", "dr2/async", "far@via=dr1"],
        &Init {
            volume: "vol0:16MiB",
            ..Init::default()
        },
    );
    let (dr1cfg, dr2cfg, farcfg) = (&s[0], &s[1], &s[2]);
    for cfg in [&pcfg, dr1cfg, dr2cfg, farcfg] {
        let text = std::fs::read_to_string(cfg).unwrap();
        let stay = text.replace("via = \"dr1\"", "via = \"dr1\"\nvia_fallback = \"stay\"");
        std::fs::write(cfg, stay).unwrap();
    }
    let far = Node::start(&ferryd(), farcfg);
    let dr1 = Node::start(&ferryd(), dr1cfg);
    let _dr2 = Node::start(&ferryd(), dr2cfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("dr1 and dr2 to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming" && target(st, "dr2")["state"] == "streaming"
    });
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(60, 9, 0)));
    let last = seq(&primary.status(), "/durable_seq");
    far.wait_status("far to apply the first workload", WAIT, |st| {
        seq(st, "/applied_seq") >= last
    });
    primary.kill();

    let p = promote(dr2cfg);
    assert_eq!(p["epoch"], 2, "{p:#}");
    let st = wait_for(dr2cfg, "dr2 to serve and stream to dr1", WAIT, |st| {
        st["role"] == "primary"
            && st["nbd"]["listen"].is_string()
            && target(st, "dr1")["state"] == "streaming"
    });
    assert!(
        target(&st, "far").is_null(),
        "dr2 ships to far itself: {st:#}"
    );
    let url = format!("nbd://{}/vol0", st["nbd"]["listen"].as_str().unwrap_or(""));
    assert_qemu_io_ok(&qemu_io(&url, &workload(90, 160, 4096)));
    let last = seq(&try_status(dr2cfg).unwrap(), "/durable_seq");
    // far follows epoch 2 through dr1 (a restart), asks for the resync, then streams.
    let f = wait_for(farcfg, "far to hold dr2's writes through dr1", WAIT, |st| {
        st["epoch"] == 2
            && seq(st, "/applied_seq") >= last
            && st["replica"] == "consistent"
            && st["primary"]["source"] == "dr1"
    });
    let d1 = try_status(dr1cfg).unwrap();
    let t = target(&d1, "far");
    // The resync far asked for (dr1 cannot know dr2's fork), compared by digest.
    assert!(
        seq(t, "/resync_bytes") > 0,
        "dr1 resynced nothing to far: {d1:#}"
    );
    assert_eq!(t["tracking"], "streaming", "{d1:#}");
    let want = image_of(&url, &dir.path().join("dr2.img"));
    let got = std::fs::read(volume_of(farcfg)).unwrap();
    assert_same("far's replica against the new primary dr2", &got, &want);
    eprintln!(
        "cascade failover: far in epoch {} following {}; dr1 resynced {} bytes to it",
        f["epoch"],
        f["primary"]["name"],
        seq(t, "/resync_bytes")
    );
    let log = std::fs::read_to_string(&far.log).unwrap_or_default();
    assert!(
        log.contains("following it"),
        "far did not follow epoch 2:\n{log}"
    );
    // far refused dr1's first write-set of epoch 2, asking for the resync.
    let relay_log = dr1.log_text();
    assert!(
        relay_log.contains("followed a newer epoch through its relay"),
        "far did not ask its relay for a resync:\n{relay_log}"
    );
}

/// A failover to the relay itself: the primary dies, dr1 is promoted and ships to far
/// directly. dr1 is the new epoch's primary and knows its fork, so far (which holds
/// nothing past it: it only ever received what dr1 held) follows and streams at
/// once, with no resync by digest: only the new writes travel.
#[test]
fn a_relayed_member_streams_without_a_resync_when_its_relay_is_promoted() {
    let name = "a_relayed_member_streams_without_a_resync_when_its_relay_is_promoted";
    if skip_without("qemu-io", name) || skip_without("qemu-img", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, dr1cfg, farcfg) = init_cascade(dir.path(), "async", Some("stay"));
    let far = Node::start(&ferryd(), &farcfg);
    let dr1 = Node::start(&ferryd(), &dr1cfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    primary.wait_status("dr1 to stream", WAIT, |st| {
        target(st, "dr1")["state"] == "streaming"
    });
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &workload(60, 5, 0)));
    wait_relayed(&primary, &dr1, &far);
    primary.kill();

    let p = promote(&dr1cfg);
    assert_eq!(p["epoch"], 2, "{p:#}");
    let st = wait_for(&dr1cfg, "dr1 to serve and stream to far", WAIT, |st| {
        st["role"] == "primary"
            && st["nbd"]["listen"].is_string()
            && target(st, "far")["state"] == "streaming"
    });
    let url = format!("nbd://{}/vol0", st["nbd"]["listen"].as_str().unwrap_or(""));
    // 40 writes of 16 KiB: what far should receive, and nothing like the whole volume.
    let new_bytes = 40 * 16384;
    assert_qemu_io_ok(&qemu_io(&url, &workload(40, 200, 4096)));
    let last = seq(&try_status(&dr1cfg).unwrap(), "/durable_seq");
    let f = wait_for(&farcfg, "far to hold dr1's new writes", WAIT, |st| {
        st["epoch"] == 2
            && seq(st, "/applied_seq") >= last
            && st["replica"] == "consistent"
            && st["primary"]["name"] == "dr1"
    });
    let d1 = try_status(&dr1cfg).unwrap();
    let t = target(&d1, "far");
    let moved = seq(&t["wire"], "/payload_bytes");
    eprintln!(
        "relay promoted: far in epoch {} following {}; resync {} bytes, {moved} payload bytes \
         shipped for {new_bytes} bytes written",
        f["epoch"],
        f["primary"]["name"],
        seq(t, "/resync_bytes")
    );
    assert_eq!(seq(t, "/resync_bytes"), 0, "dr1 resynced far: {d1:#}");
    assert_eq!(t["tracking"], "streaming", "{d1:#}");
    assert!(
        moved >= new_bytes && moved < 2 * new_bytes,
        "dr1 shipped {moved} payload bytes to far for {new_bytes} written: {d1:#}"
    );
    let log = dr1.log_text();
    assert!(
        !log.contains("followed a newer epoch through its relay"),
        "far asked its promoted relay for a resync:\n{log}"
    );
    // far asked dr1 whether it is the new primary, and dr1 answered as one.
    assert!(
        log.contains("answered a position probe from standby 'far'"),
        "far did not ask its relay whether it is the new primary:\n{log}"
    );
    let want = image_of(&url, &dir.path().join("dr1.img"));
    let got = std::fs::read(volume_of(&farcfg)).unwrap();
    assert_same("far's replica against the new primary dr1", &got, &want);
}
