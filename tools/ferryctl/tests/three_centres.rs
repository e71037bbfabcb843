//! "Two sites, three centres" (issue 21's headline test): four ferryd processes, each
//! in its own network namespace joined by veth pairs through a bridge — `primary`,
//! `near` (sync, same city), `far` (async, remote) and `cascade` (async, relayed by
//! near: `via = "near"`). Every node reaches far and cascade through the userspace
//! UDP proxy on the bridge, which delays each datagram (a WAN link; this kernel has
//! no netem). The primary is SIGKILLed mid-workload and near promoted: every
//! acknowledged write is on near; the workload moves to near, and far and cascade
//! follow near and stream within 10 s of the promotion, the resync each re-attach
//! moved is printed; after more writes on near and lag 0, far's and cascade's volumes
//! equal near's byte for byte.
mod common;
use common::netns::Netns;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_api::config::Config;
use ferry_testkit::udp_proxy::LossyLink;
use ferryd::testkit::{
    acked_writes, assert_qemu_io_ok, qemu_io, skip, skip_without, spawn_qemu_io, Node,
};

/// Bounded waits: generous, since the machine may be loaded.
const WAIT: Duration = Duration::from_secs(30);
/// Issue 21: the far site and the cascade stream from the new primary within this.
const REATTACH: Duration = Duration::from_secs(10);
/// Each datagram to and from far and cascade is held this long (one way).
const WAN_DELAY_MS: u32 = 10;
/// Far above what far can hold past near's fork (the writes in flight at the kill, a
/// 64 KiB region each), far below the 32 MiB volume.
const MAX_DELTA: u64 = 4 << 20;
const NAMES: [&str; 4] = ["primary", "near", "far", "cascade"];

fn volume_of(config: &Path) -> PathBuf {
    Config::load(config).unwrap().volumes[0].path.clone()
}

/// `promote --json` on `config`, retrying while the dead primary still counts as
/// connected; `--force` when another standby holds more (async far may hold a
/// write near had not acknowledged yet: that write was never acknowledged).
fn promote(config: &Path) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
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
            err.contains("is connected") && Instant::now() < deadline,
            "promote near: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The four configs made by `ferryctl init` at the namespaces' addresses, each node
/// serving NBD on its own link address; every config but far's (cascade's) own
/// reaches far (cascade) at `wan[0]` (`wan[1]`), the proxies on the bridge.
fn configs(dir: &Path, addrs: &[String], wan: [&str; 2]) -> Vec<PathBuf> {
    let out = init_dir(
        dir,
        &[
            "--volume",
            "vol0:32MiB",
            "--nbd",
            "127.0.0.1:0",
            "--journal-size",
            "64MiB",
            "--segment-size",
            "4MiB",
            "--primary",
            &format!("{}:7001", addrs[0]),
            "--standby",
            &format!("near={}:7001/sync", addrs[1]),
            "--standby",
            &format!("far={}:7001/async", addrs[2]),
            "--standby",
            &format!("cascade={}:7001@via=near", addrs[3]),
        ],
    );
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfgs: Vec<PathBuf> = NAMES
        .iter()
        .map(|n| dir.join(format!("{n}.toml")))
        .collect();
    for (i, (c, a)) in cfgs.iter().zip(addrs).enumerate() {
        let mut cfg = Config::load(c).unwrap();
        cfg.nbd.as_mut().unwrap().listen = format!("{a}:0");
        let mut text = cfg.to_toml();
        // Others dial far and cascade across the WAN proxies; each listens on its own
        // link address as before.
        for (j, via) in [(2, wan[0]), (3, wan[1])] {
            if i != j {
                text = text.replace(&format!("\"{}:7001\"", addrs[j]), &format!("\"{via}\""));
            }
        }
        std::fs::write(c, text).unwrap();
    }
    cfgs
}

/// Polls near's status until far and cascade both stream from it with nothing left
/// to resync, recording when each first did (bounded by [`REATTACH`]); returns those
/// times since `t0` and the last status read.
fn reattached(near: &Path, t0: Instant) -> ([Option<Duration>; 2], serde_json::Value) {
    let mut when: [Option<Duration>; 2] = [None, None];
    loop {
        let st = try_status(near).unwrap_or_default();
        for (k, name) in ["far", "cascade"].iter().enumerate() {
            let t = target(&st, name);
            if when[k].is_none()
                && st["role"] == "primary"
                && t["state"] == "streaming"
                && t["tracking"] == "streaming"
            {
                when[k] = Some(t0.elapsed());
            }
        }
        if when.iter().all(Option::is_some) || t0.elapsed() > REATTACH {
            return (when, st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_sites_three_centres_the_far_site_and_the_cascade_follow_the_promoted_near_site() {
    let name = "two_sites_three_centres_the_far_site_and_the_cascade_follow_the_promoted_near_site";
    if skip_without("qemu-io", name) || skip_without("ip", name) {
        return;
    }
    let (ns, addrs) = match Netns::make(4) {
        Ok(v) => v,
        Err(e) => {
            skip(name, &format!("cannot make network namespaces: {e}"));
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let links: Vec<LossyLink> = [2, 3]
        .iter()
        .map(|&i| {
            let l = LossyLink::on(
                ns.bridge_ip.into(),
                format!("{}:7001", addrs[i]).parse().unwrap(),
            )
            .unwrap();
            l.set_delay(WAN_DELAY_MS);
            l
        })
        .collect();
    let wan: Vec<String> = links
        .iter()
        .map(|l| format!("{}:{}", ns.bridge_ip, l.port))
        .collect();
    let cfgs = configs(dir.path(), &addrs, [&wan[0], &wan[1]]);
    let far = Node::start(&ns.ferryd_in(2, dir.path()), &cfgs[2]);
    let cascade = Node::start(&ns.ferryd_in(3, dir.path()), &cfgs[3]);
    let near = Node::start(&ns.ferryd_in(1, dir.path()), &cfgs[1]);
    let mut primary = Node::start(&ns.ferryd_in(0, dir.path()), &cfgs[0]);
    primary.wait_status("near and far to stream across the links", WAIT, |st| {
        target(st, "near")["state"] == "streaming" && target(st, "far")["state"] == "streaming"
    });
    near.wait_status("near to relay to cascade", WAIT, |st| {
        target(st, "cascade")["state"] == "streaming"
    });

    // SIGKILL mid-workload: some writes acknowledged, the rest in flight or unsent.
    let run = spawn_qemu_io(&primary.url("vol0"), &workload(300));
    primary.wait_status("part of the workload", WAIT, |st| {
        seq(st, "/last_seq") >= 60
    });
    primary.kill();
    let killed = Instant::now();
    let acked = acked_writes(&run.finish(), 16384);
    assert!(
        !acked.is_empty(),
        "no write was acknowledged before the kill"
    );

    let p = promote(&cfgs[1]);
    let t0 = Instant::now();
    assert_eq!(p["epoch"], 2, "{p:#}");
    eprintln!(
        "three centres: primary SIGKILLed with {} of 300 writes acknowledged; near promoted \
         {:.3} s after the kill",
        acked.len(),
        killed.elapsed().as_secs_f64()
    );
    // Every acknowledged write is on near (sync), read before near writes over them.
    let near_st = wait_for(&cfgs[1], "near to serve as the primary", WAIT, |st| {
        st["role"] == "primary" && st["nbd"]["listen"].is_string()
    });
    let url = format!(
        "nbd://{}/vol0",
        near_st["nbd"]["listen"].as_str().unwrap_or("")
    );
    let reads: Vec<String> = acked
        .iter()
        .map(|o| format!("read -P {} {o} 16k", pattern_of(*o)))
        .collect();
    for chunk in reads.chunks(200) {
        assert_qemu_io_ok(&qemu_io(&url, chunk));
    }

    // The workload moves to near, over slots the old primary wrote and past them. It
    // starts before the re-attach is awaited: async far may hold a write or two past
    // near's fork, and near resyncs it only once its own history passes that point
    // (until then far's handshake is refused as diverged), as it would under a live
    // workload. A first few writes do that; the rest follow the re-attach.
    let more: Vec<String> = (0..64u64)
        .map(|i| format!("write -P 0x5a {} 16k", i * 131072 + 8192))
        .collect();
    let (first, rest) = more.split_at(8);
    assert_qemu_io_ok(&qemu_io(&url, first));
    let (when, st) = reattached(&cfgs[1], t0);
    for (k, node) in ["far", "cascade"].iter().enumerate() {
        let t = target(&st, node);
        match when[k] {
            Some(d) => eprintln!(
                "three centres: promote of near to {node} streaming from it: {:.3} s ({} \
                 payload bytes shipped to it by then)",
                d.as_secs_f64(),
                seq(&t["wire"], "/payload_bytes"),
            ),
            None => panic!("{node} did not stream from near within {REATTACH:?}: {st:#}"),
        }
    }
    assert_qemu_io_ok(&qemu_io(&url, rest));
    let st = wait_for(&cfgs[1], "far and cascade to hold everything", WAIT, |st| {
        ["far", "cascade"].iter().all(|n| {
            let t = target(st, n);
            t["state"] == "streaming"
                && t["tracking"] == "streaming"
                && seq(t, "/acked_seq") >= seq(st, "/durable_seq")
                && seq(t, "/lag_bytes") == 0
        })
    });
    let last = seq(&st, "/durable_seq");
    for node in ["far", "cascade"] {
        let t = target(&st, node);
        eprintln!(
            "three centres: re-attach of {node}: resync moved {} bytes ({} as data); near \
             shipped it {} payload bytes in all for {} bytes written on near",
            seq(t, "/resync_bytes"),
            seq(t, "/resync_data_bytes"),
            seq(&t["wire"], "/payload_bytes"),
            64 * 16384,
        );
    }
    // Only the delta, checked once the new writes arrived (a member that wants a resync
    // refuses the first write-set). cascade held only what near held: nothing to copy,
    // its relay is the new primary, which knows its fork. far, async, may hold a few
    // writes past near's fork, each costing a 64 KiB region at most.
    assert_eq!(
        seq(target(&st, "cascade"), "/resync_bytes"),
        0,
        "near resynced cascade: {st:#}"
    );
    let far_resync = seq(target(&st, "far"), "/resync_bytes");
    assert!(
        far_resync <= MAX_DELTA,
        "near resynced {far_resync} bytes to far, more than a delta: {st:#}"
    );

    for (node, cfg) in [(&far, &cfgs[2]), (&cascade, &cfgs[3])] {
        let s = node.wait_status("the replica to apply everything", WAIT, |s| {
            seq(s, "/applied_seq") >= last && s["replica"] == "consistent"
        });
        assert_eq!(s["epoch"], 2, "{s:#}");
        assert_eq!(s["primary"]["name"], "near", "{s:#}");
        same_file(&volume_of(&cfgs[1]), &volume_of(cfg));
    }
    let seen: Vec<u64> = links
        .iter()
        .map(|l| l.seen.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert!(
        seen.iter().all(|&n| n > 0),
        "the WAN proxies carried nothing: {seen:?}"
    );
}
