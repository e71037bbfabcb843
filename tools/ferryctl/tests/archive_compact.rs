//! Compaction and periodic bases with real processes: a primary archiving to a
//! `file://` directory under a short retention grid merges its packs into level 1 and
//! uploads new bases while writes go on; `ferryctl archive restore` at a bookmark
//! and at the newest point still equals the primary's volume as it was then.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

const TEST: &str = "a_compacting_archive_restores_bookmarks_and_the_newest_point";

fn wait_archived(primary: &Node) -> u64 {
    let last = seq(&primary.status(), "/durable_seq");
    primary.wait_status(
        "the archive to hold the durable sequence",
        Duration::from_secs(60),
        |st| {
            st["archives"][0]["state"] == "archiving" && seq(st, "/archives/0/archived_seq") >= last
        },
    );
    last
}

fn restore(url: &str, point: &[&str], out: &Path) -> serde_json::Value {
    let o = Command::new(ferryctl())
        .args(["archive", "restore", "--url", url, "--volume", "vol0"])
        .args(point)
        .arg("--to")
        .arg(out)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "archive restore {point:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Files under `dir` whose path contains `part`.
fn count(dir: &Path, part: &str) -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            n += count(&p, part);
        } else if p.to_string_lossy().contains(part) {
            n += 1;
        }
    }
    n
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(90);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_compacting_archive_restores_bookmarks_and_the_newest_point() {
    if skip_without("qemu-img", TEST) || skip_without("qemu-io", TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive");
    let url = format!("file://{}", archive.display());
    let (pcfg, _) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:32MiB",
            ..Init::default()
        },
    );
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.push_str(&format!(
        "\n[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"{url}\"\n\
         flush_interval = 1\nretention = \"every write-set for 2s, 1 per 1s for 24s, 1 per 1h for 1d\"\n\
         base_interval = 4\n"
    ));
    std::fs::write(&pcfg, text).unwrap();
    let primary = Node::start(&ferryd(), &pcfg);
    let nbd = primary.url("vol0");

    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xa1, &[0, 1 << 20], 65536)));
    let a = image_of(&nbd, &dir.path().join("a.img"));
    ctl_json(&pcfg, &["bookmark", "create", "before-b"]);
    // B: overwrites of the same blocks over several seconds, several packs.
    for round in 0..6u8 {
        assert_qemu_io_ok(&qemu_io(
            &nbd,
            &writes(0xb0 + round, &[4096, 1 << 20, 9 << 20], 8192),
        ));
        std::thread::sleep(Duration::from_millis(700));
    }
    wait_archived(&primary);
    wait_for("level-1 packs", || count(&archive, "/L1/") > 0);
    wait_for("a periodic base", || count(&archive, "bases/") >= 2);

    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xc3, &[0, 2 << 20], 131072)));
    let c = image_of(&nbd, &dir.path().join("c.img"));
    wait_archived(&primary);
    let out = dir.path().join("restored.img");
    restore(&url, &["--bookmark", "before-b"], &out);
    assert_same("restore --bookmark", &std::fs::read(&out).unwrap(), &a);
    restore(&url, &["--latest"], &out);
    assert_same("restore --latest", &std::fs::read(&out).unwrap(), &c);
    // Compaction went on while the writer kept committing: it never stopped or
    // failed it (a periodic base may be under way).
    let st = primary.status();
    let a = &st["archives"][0];
    assert!(a["state"] == "archiving" || a["state"] == "base", "{a:#}");
    assert!(a["last_error"].is_null(), "{a:#}");
}
