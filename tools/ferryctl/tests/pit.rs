//! Point-in-time recovery end to end: real ferryd processes (primary + standby on
//! loopback), bookmarks through the stream, NBD views read by qemu-img, rollback
//! with SIGKILL in the middle, retention under a size limit.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_api::config::Config;
use ferry_api::timefmt::format_rfc3339;
use ferryd::testkit::{assert_qemu_io_ok, qemu_io, run, skip_without, Attached, Node};

/// A primary and a sync standby `dr1` (32 MiB volume); `standby_pit` is appended to
/// the standby's config as its `[pit]` section.
fn init(dir: &Path, standby_pit: &str) -> (PathBuf, PathBuf) {
    let (pcfg, scfg) = init_pair(
        dir,
        &Init {
            volume: "vol0:32MiB",
            mode: "sync",
            ..Init::default()
        },
    );
    if !standby_pit.is_empty() {
        let mut text = std::fs::read_to_string(&scfg).unwrap();
        text.push_str("\n[pit]\n");
        text.push_str(standby_pit);
        std::fs::write(&scfg, text).unwrap();
    }
    (pcfg, scfg)
}

fn wait_applied(primary: &Node, standby: &Node) -> u64 {
    let last = seq(&primary.status(), "/durable_seq");
    standby.wait_status(
        "standby to apply everything",
        Duration::from_secs(60),
        |st| seq(st, "/applied_seq") >= last,
    );
    last
}

fn replica_path(scfg: &Path) -> PathBuf {
    Config::load(scfg).unwrap().volumes[0].path.clone()
}

#[test]
fn views_at_a_bookmark_and_a_time_equal_the_primary_then() {
    if skip_without(
        "qemu-img",
        "views_at_a_bookmark_and_a_time_equal_the_primary_then",
    ) || skip_without(
        "qemu-io",
        "views_at_a_bookmark_and_a_time_equal_the_primary_then",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "");
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");

    // A, then a bookmark, then B; a time between B and C; then C.
    assert_qemu_io_ok(&qemu_io(
        &url,
        &writes(0xa1, &[0, 1 << 20, 20 << 20], 65536),
    ));
    let a = image_of(&url, &dir.path().join("a.img"));
    let bm = ctl_json(&pcfg, &["bookmark", "create", "before-b"]);
    assert_eq!(bm["name"], "before-b");
    // A name is one point: taken names and names that are not labels are refused.
    for (name, why) in [
        ("before-b", "already exists"),
        ("bad name!", "use 1..=64 characters"),
    ] {
        let out = ctl(&pcfg, &["bookmark", "create", name]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "bookmark {name:?}: {err}"
        );
    }
    let mut b_cmds = writes(0xb2, &[4096, 1 << 20, 30 << 20], 8192);
    b_cmds.push("discard 20971520 32768".into());
    assert_qemu_io_ok(&qemu_io(&url, &b_cmds));
    let b = image_of(&url, &dir.path().join("b.img"));
    wait_applied(&primary, &standby);
    std::thread::sleep(Duration::from_millis(300));
    let between = format_rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_qemu_io_ok(&qemu_io(&url, &writes(0xc3, &[0, 2 << 20], 131072)));
    wait_applied(&primary, &standby);

    // The bookmark came through the stream.
    let list = ctl_json(&scfg, &["bookmark", "list"]);
    let b0 = &list["bookmarks"][0];
    assert_eq!(
        (&b0["name"], &b0["seq"], &b0["reachable"]),
        (&bm["name"], &bm["seq"], &serde_json::json!(true)),
        "{list:#}"
    );
    let pits = ctl_json(&scfg, &["pit", "list"]);
    assert!(seq(&pits, "/points") >= 3, "{pits:#}");
    let st = standby.status();
    assert!(
        st["pit"]["oldest"]["seq"].is_u64() && st["pit"]["newest"]["time"].is_string(),
        "{st:#}"
    );

    // Read-only view at the bookmark.
    let v = ctl_json(
        &scfg,
        &[
            "pit",
            "export",
            "--volume",
            "vol0",
            "--bookmark",
            "before-b",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(v["seq"], bm["seq"]);
    let uri = v["uri"].as_str().unwrap().to_string();
    assert_same(
        "view at the bookmark",
        &image_of(&uri, &dir.path().join("va.img")),
        &a,
    );
    // Replication goes on under the open view; the view does not move.
    assert_qemu_io_ok(&qemu_io(
        &url,
        &writes(0xd4, &[0, 4096, 1 << 20, 20 << 20], 65536),
    ));
    wait_applied(&primary, &standby);
    assert_same(
        "view at the bookmark after more writes",
        &image_of(&uri, &dir.path().join("va2.img")),
        &a,
    );
    // Read-only means read-only.
    let w = qemu_io(&uri, &["write -P 1 0 4096".to_string()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !w.status.success() || text.contains("failed") || text.contains("read-only"),
        "write to a read-only view: {text}"
    );
    let out = ctl(&scfg, &["pit", "unexport"]);
    assert!(
        out.status.success(),
        "unexport: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A view at a time between B and C.
    let v = ctl_json(
        &scfg,
        &[
            "pit",
            "export",
            "--volume",
            "vol0",
            "--at",
            &between,
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let uri = v["uri"].as_str().unwrap().to_string();
    assert_same(
        "view at a time between B and C",
        &image_of(&uri, &dir.path().join("vb.img")),
        &b,
    );

    // A writable view next to it: writes land in its overlay, never on the replica.
    let replica = replica_path(&scfg);
    let before = std::fs::read(&replica).unwrap();
    let w = ctl_json(
        &scfg,
        &[
            "pit",
            "export",
            "--volume",
            "vol0",
            "--bookmark",
            "before-b",
            "--listen",
            "127.0.0.1:0",
            "--writable",
        ],
    );
    let wuri = w["uri"].as_str().unwrap().to_string();
    assert_qemu_io_ok(&qemu_io(
        &wuri,
        &[
            "write -P 0xee 0 1048576".to_string(),
            "read -P 0xee 0 1048576".to_string(),
        ],
    ));
    let mut want = a.clone();
    want[..1 << 20].fill(0xee);
    assert_same(
        "writable view",
        &image_of(&wuri, &dir.path().join("vw.img")),
        &want,
    );
    assert_same(
        "replica under a writable view",
        &std::fs::read(&replica).unwrap(),
        &before,
    );
    let two = ctl(&scfg, &["pit", "unexport"]);
    assert!(
        !two.status.success(),
        "unexport with two views must ask which"
    );
    let out = ctl(&scfg, &["pit", "unexport", "--all"]);
    assert!(
        out.status.success(),
        "unexport --all: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scratch = dir.path().join("dr1/meta/undo/scratch");
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "overlay files left after unexport: {left:?}"
    );
    // The primary refuses standby commands with a reason.
    let out = ctl(&pcfg, &["pit", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("standby command"),
        "{out:?}"
    );
}

#[test]
fn rollback_to_a_bookmark_survives_sigkill_and_restart() {
    if skip_without(
        "qemu-img",
        "rollback_to_a_bookmark_survives_sigkill_and_restart",
    ) || skip_without(
        "qemu-io",
        "rollback_to_a_bookmark_survives_sigkill_and_restart",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "");
    // Each undo entry the rollback applies takes 150 ms more: time to kill it.
    let mut standby = Node::start_env(
        &ferryd(),
        &scfg,
        &[(ferryd::pit::ROLLBACK_PAUSE_ENV, "150")],
    );
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    assert_qemu_io_ok(&qemu_io(
        &url,
        &writes(0x5a, &[0, 8 << 20, 16 << 20], 1 << 20),
    ));
    let a = image_of(&url, &dir.path().join("a.img"));
    ctl_json(&pcfg, &["bookmark", "create", "good"]);
    // Many separate write-sets after the bookmark (one per qemu-io run).
    for i in 0..12u64 {
        assert_qemu_io_ok(&qemu_io(
            &url,
            &writes(0x60 + i as u8, &[i * 65536, (8 << 20) + i * 4096], 65536),
        ));
    }
    wait_applied(&primary, &standby);
    let points = seq(&ctl_json(&scfg, &["pit", "list"]), "/points");
    assert!(points >= 8, "expected many points, got {points}");

    // Refusals first: a bad target does not pause anything.
    let out = ctl(
        &scfg,
        &["rollback", "--volume", "vol0", "--bookmark", "nope"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no bookmark named 'nope'"),
        "{out:?}"
    );
    assert!(standby.status()["paused"].is_null());

    let mut rb = Command::new(ferryctl())
        .arg("--config")
        .arg(&scfg)
        .args(["rollback", "--volume", "vol0", "--bookmark", "good"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !standby.log_text().contains("rollback started") {
        assert!(
            Instant::now() < deadline,
            "rollback did not start:\n{}",
            standby.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(400));
    standby.kill();
    let _ = rb.wait();
    assert!(
        !standby.log_text().contains("rollback finished"),
        "the rollback ended before the kill; raise the pause"
    );

    // Restart: recovery finishes the rollback before serving anything.
    let standby = Node::start(&ferryd(), &scfg);
    assert!(
        standby.log_text().contains("finishing the rollback"),
        "{}",
        standby.log_text()
    );
    assert_same(
        "replica after the rollback",
        &std::fs::read(replica_path(&scfg)).unwrap(),
        &a,
    );
    let st = standby.status();
    assert!(
        st["paused"].as_str().unwrap_or("").contains("rolled back"),
        "{st:#}"
    );
    // It no longer follows the primary, even after another write.
    assert_qemu_io_ok(&qemu_io(&url, &writes(0x77, &[0], 4096)));
    std::thread::sleep(Duration::from_millis(500));
    assert_same(
        "rolled-back replica stays put",
        &std::fs::read(replica_path(&scfg)).unwrap(),
        &a,
    );
    let out = ctl(&scfg, &["resume"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rolled back"),
        "{out:?}"
    );
}

#[test]
fn an_operator_pause_survives_a_restart_and_resume_catches_up() {
    if skip_without(
        "qemu-io",
        "an_operator_pause_survives_a_restart_and_resume_catches_up",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:32MiB",
            ..Init::default()
        },
    );
    let mut standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    assert_qemu_io_ok(&qemu_io(&url, &writes(0x11, &[0, 1 << 20], 65536)));
    wait_caught_up(&primary, &standby);
    let frozen = std::fs::read(replica_path(&scfg)).unwrap();

    let out = ctl(&scfg, &["pause"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("operator"),
        "{out:?}"
    );
    standby.wait_status(
        "the paused standby to end its session",
        Duration::from_secs(30),
        |st| st["primary"]["connected"].is_null(),
    );
    assert_qemu_io_ok(&qemu_io(&url, &writes(0x22, &[0, 4 << 20], 65536)));
    // SIGKILL: nothing but the metadata store can remember the pause.
    standby.kill();
    let standby = Node::start(&ferryd(), &scfg);
    let st = standby.status();
    assert!(
        st["paused"].as_str().unwrap_or("").contains("operator"),
        "the pause must outlive the restart: {st:#}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_same(
        "paused replica after the restart",
        &std::fs::read(replica_path(&scfg)).unwrap(),
        &frozen,
    );

    let out = ctl(&scfg, &["resume"]);
    assert!(out.status.success(), "{out:?}");
    assert!(standby.status()["paused"].is_null());
    wait_caught_up(&primary, &standby);
    same_file(
        &Config::load(&pcfg).unwrap().volumes[0].path,
        &replica_path(&scfg),
    );
}

#[test]
fn retention_drops_the_oldest_points_under_a_size_limit() {
    if skip_without(
        "qemu-io",
        "retention_drops_the_oldest_points_under_a_size_limit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(
        dir.path(),
        "max_bytes = \"3MiB\"\nsegment_size = \"1MiB\"\n",
    );
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    // Data everywhere first, so later writes have non-zero before-images.
    assert_qemu_io_ok(&qemu_io(&url, &writes(1, &[0], 16 << 20)));
    ctl_json(&pcfg, &["bookmark", "create", "early"]);
    for i in 0..10u64 {
        assert_qemu_io_ok(&qemu_io(&url, &writes(2 + i as u8, &[i << 20], 1 << 20)));
    }
    wait_applied(&primary, &standby);
    let st = standby.status();
    let pit = &st["pit"];
    assert!(pit["used_bytes"].as_u64().unwrap() <= 3 << 20, "{pit:#}");
    assert!(seq(pit, "/oldest/seq") > 1, "nothing dropped: {pit:#}");
    let log = standby.log_text();
    assert!(log.contains("point-in-time window shrank"), "{log}");
    assert!(log.contains("bookmarked point dropped"), "{log}");
    let list = ctl_json(&scfg, &["bookmark", "list"]);
    assert_eq!(list["bookmarks"][0]["reachable"], false, "{list:#}");
    let out = ctl(
        &scfg,
        &[
            "pit",
            "export",
            "--volume",
            "vol0",
            "--bookmark",
            "early",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("older than the oldest retained point"),
        "{out:?}"
    );
}

/// Whether test `name` can attach and mount views here (the tools, root, /dev/fuse);
/// it is skipped, loudly, when not.
fn can_mount_views(name: &str) -> bool {
    for tool in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "mount",
        "fusermount3",
        "fsfreeze",
        "e2fsck",
        "blkid",
    ] {
        if skip_without(tool, name) {
            return false;
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        ferryd::testkit::skip(name, "needs root and /dev/fuse");
        return false;
    }
    true
}

/// Bookmark `name` on the primary with the filesystem at `mnt` frozen around it: the
/// point is clean, no journal replay is needed to mount it read-only.
fn frozen_bookmark(pcfg: &Path, mnt: &Path, name: &str) {
    run(Command::new("fsfreeze").arg("-f").arg(mnt));
    let bm = ctl(pcfg, &["bookmark", "create", name]);
    run(Command::new("fsfreeze").arg("-u").arg(mnt));
    assert!(
        bm.status.success(),
        "bookmark: {}",
        String::from_utf8_lossy(&bm.stderr)
    );
}

/// The README's DR drill: ext4 on the primary, an application-consistent bookmark
/// (fsfreeze around it), later changes; on the standby, a read-only view at the
/// bookmark attached with nbdfuse + losetup, mounted read-only, files checked, fsck
/// clean, unexported.
#[test]
fn dr_drill_mounts_a_view_at_a_bookmark() {
    let name = "dr_drill_mounts_a_view_at_a_bookmark";
    if !can_mount_views(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "");
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let mnt = dir.path().join("mnt");
    let mut att = Attached::new(&primary.url("vol0"), &dir.path().join("p"), false);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(att.dev()));
    att.mount(&mnt, &[]);
    std::fs::write(mnt.join("orders.db"), b"version 1").unwrap();
    std::fs::write(mnt.join("keep.txt"), b"unchanged").unwrap();
    frozen_bookmark(&pcfg, &mnt, "drill");
    std::fs::write(mnt.join("orders.db"), b"version 2, after the bookmark").unwrap();
    std::fs::remove_file(mnt.join("keep.txt")).unwrap();
    run(Command::new("sync").arg("-f").arg(mnt.join("orders.db")));
    wait_applied(&primary, &standby);

    let v = ctl_json(
        &scfg,
        &[
            "pit",
            "export",
            "--volume",
            "vol0",
            "--bookmark",
            "drill",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let view_mnt = dir.path().join("view");
    {
        let mut view = Attached::new(v["uri"].as_str().unwrap(), &dir.path().join("v"), true);
        view.mount(&view_mnt, &["-o", "ro"]);
        assert_eq!(
            std::fs::read(view_mnt.join("orders.db")).unwrap(),
            b"version 1"
        );
        assert_eq!(
            std::fs::read(view_mnt.join("keep.txt")).unwrap(),
            b"unchanged"
        );
        run(Command::new("umount").arg(&view_mnt));
        view.mnt = None;
        let fsck = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(view.dev())
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck on the view: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let out = ctl(&scfg, &["pit", "unexport"]);
    assert!(
        out.status.success(),
        "unexport: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The primary's filesystem is untouched by the drill.
    assert_eq!(
        std::fs::read(mnt.join("orders.db")).unwrap(),
        b"version 2, after the bookmark"
    );
}

/// `ferryctl drill` end to end on ext4: a bookmark taken with the filesystem frozen,
/// the drill exports it, attaches, mounts read-only and fscks it; the report (JSON and
/// HTML) carries the RTO and RPO, the audit log the result, and no view is left open.
#[test]
fn ferryctl_drill_checks_a_bookmark_on_ext4_and_reports_rto_and_rpo() {
    let name = "ferryctl_drill_checks_a_bookmark_on_ext4_and_reports_rto_and_rpo";
    if !can_mount_views(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "");
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let mnt = dir.path().join("mnt");
    let mut att = Attached::new(&primary.url("vol0"), &dir.path().join("p"), false);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(att.dev()));
    att.mount(&mnt, &[]);
    std::fs::write(mnt.join("orders.db"), b"version 1").unwrap();
    frozen_bookmark(&pcfg, &mnt, "nightly");
    std::fs::write(mnt.join("orders.db"), b"version 2").unwrap();
    run(Command::new("sync").arg("-f").arg(mnt.join("orders.db")));
    wait_applied(&primary, &standby);

    let report = dir.path().join("drill.json");
    let out = ctl(
        &scfg,
        &[
            "drill",
            "--volume",
            "vol0",
            "--bookmark",
            "nightly",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drill failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("RTO") && text.contains("RPO"), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["passed"], true, "{r:#}");
    assert_eq!(r["audited"], true, "{r:#}");
    assert_eq!(r["check"]["kind"], "filesystem", "{r:#}");
    assert_eq!(r["check"]["filesystem"], "ext4", "{r:#}");
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(r["rpo_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
    let names: Vec<&str> = r["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for step in [
        "export a writable view",
        "mount read-only",
        "fsck, changing nothing",
        "unexport view",
    ] {
        assert!(names.contains(&step), "{step} missing: {names:?}");
    }
    let page = std::fs::read_to_string(report.with_extension("html")).unwrap();
    assert!(page.contains("PASSED") && page.contains("ext4"), "{page}");
    // Torn down: no view open, no loop device left on the overlay.
    let pits = ctl_json(&scfg, &["pit", "list"]);
    assert_eq!(pits["exports"], serde_json::json!([]), "{pits:#}");
    let audit = std::fs::read_to_string(Config::load(&scfg).unwrap().audit_log_path()).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains("\"drill_report\""))
        .unwrap_or_else(|| panic!("no drill_report line in the audit log:\n{audit}"));
    assert!(line.contains("\"passed\":true"), "{line}");
    // The primary's filesystem is untouched by the drill.
    assert_eq!(std::fs::read(mnt.join("orders.db")).unwrap(), b"version 2");
}

/// A drill whose own check fails exits 1, still records the result and closes its view;
/// the check sees the view's URI and point in its environment.
#[test]
fn a_drill_with_a_failing_check_fails_loudly_and_is_audited() {
    let name = "a_drill_with_a_failing_check_fails_loudly_and_is_audited";
    if skip_without("qemu-io", name) || skip_without("qemu-img", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "");
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &writes(0x5a, &[0], 1 << 20)));
    let newest = wait_applied(&primary, &standby);
    let out = ctl(
        &scfg,
        &[
            "drill",
            "--volume",
            "vol0",
            "--check",
            "qemu-img info \"$FERRY_DRILL_URI\" >/dev/null && echo saw $FERRY_DRILL_VOLUME at $FERRY_DRILL_SEQ; exit 3",
            "--json",
        ],
    );
    assert!(!out.status.success(), "a failed check must fail the drill");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["passed"], false, "{r:#}");
    assert_eq!(r["audited"], true, "{r:#}");
    assert_eq!(r["chosen"], "latest", "{r:#}");
    // The newest point: at least what the primary had made durable (a later seal, e.g.
    // from qemu-io's closing flush, may have arrived since).
    let seq = r["point"]["seq"].as_u64().unwrap();
    assert!(seq >= newest, "{r:#}");
    let output = r["check"]["output"].as_str().unwrap();
    assert!(output.contains(&format!("saw vol0 at {seq}")), "{output}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FAILED"),
        "{out:?}"
    );
    let pits = ctl_json(&scfg, &["pit", "list"]);
    assert_eq!(pits["exports"], serde_json::json!([]), "{pits:#}");
    let audit = std::fs::read_to_string(Config::load(&scfg).unwrap().audit_log_path()).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"drill_report\"") && l.contains("\"passed\":false")),
        "{audit}"
    );
}

/// `qemu-img map --output=json` of an NBD URI: (start, length, data, zero) runs.
fn map_of(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let o = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw", uri])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img map {uri}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    runs.iter()
        .map(|r| {
            (
                r["start"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["data"].as_bool().unwrap(),
                r["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The (data, zero) status `map` gives every byte of `[offset, offset + len)`, or
/// a panic naming the run where it changes.
fn status_of(map: &[(u64, u64, bool, bool)], offset: u64, len: u64) -> (bool, bool) {
    let runs: Vec<_> = map
        .iter()
        .filter(|r| r.0 < offset + len && r.0 + r.1 > offset)
        .collect();
    assert!(!runs.is_empty(), "no run covers {offset}+{len}: {map:?}");
    let s = (runs[0].2, runs[0].3);
    assert!(
        runs.iter().all(|r| (r.2, r.3) == s),
        "{offset}+{len} is not one status: {runs:?}"
    );
    s
}

/// Block status through a real client: a view at a bookmark reports the allocation
/// the volume had then, after the replica got data over a hole and a hole punched
/// over data; a view at the newest point reports the replica's.
#[test]
fn view_block_status_is_the_allocation_at_its_point() {
    let name = "view_block_status_is_the_allocation_at_its_point";
    if skip_without("qemu-img", name) || skip_without("qemu-io", name) {
        return;
    }
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init(dir.path(), "");
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    assert_qemu_io_ok(&qemu_io(&url, &writes(0xa1, &[0], MIB)));
    ctl_json(&pcfg, &["bookmark", "create", "then"]);
    // Data over the hole at 4 MiB, a hole punched over the data at 0.
    let mut cmds = writes(0xb2, &[4 * MIB], MIB);
    cmds.insert(0, format!("discard 0 {MIB}"));
    assert_qemu_io_ok(&qemu_io(&url, &cmds));
    let newest = wait_applied(&primary, &standby);
    // The replica itself must show holes for the test to mean anything.
    let replica = replica_path(&scfg);
    let now = map_of(&format!("file:{}", replica.display()));
    if status_of(&now, 0, MIB) != (false, true) {
        ferryd::testkit::skip(name, "the replica's file system reports no holes");
        return;
    }
    assert_eq!(
        status_of(&now, 4 * MIB, MIB),
        (true, false),
        "replica {now:?}"
    );

    let export = |point: &[&str]| {
        let mut args = vec![
            "pit",
            "export",
            "--volume",
            "vol0",
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(point);
        let v = ctl_json(&scfg, &args);
        v["uri"].as_str().unwrap().to_string()
    };
    let uri = export(&["--bookmark", "then"]);
    let then = map_of(&uri);
    assert_eq!(
        status_of(&then, 0, MIB),
        (true, false),
        "view then: {then:?}"
    );
    assert_eq!(
        status_of(&then, 4 * MIB, MIB),
        (false, true),
        "view then: {then:?}"
    );
    assert_eq!(
        status_of(&then, MIB, 3 * MIB),
        (false, true),
        "view then: {then:?}"
    );
    // The holes read as zeros, the data as written.
    let img = image_of(&uri, &dir.path().join("then.img"));
    assert!(img[..MIB as usize].iter().all(|&b| b == 0xa1));
    assert!(img[MIB as usize..].iter().all(|&b| b == 0));
    let out = ctl(&scfg, &["pit", "unexport"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let seq = newest.to_string();
    let uri = export(&["--seq", &seq]);
    let latest = map_of(&uri);
    assert_eq!(
        status_of(&latest, 0, MIB),
        (false, true),
        "view now: {latest:?}"
    );
    assert_eq!(
        status_of(&latest, 4 * MIB, MIB),
        (true, false),
        "view now: {latest:?}"
    );
    let out = ctl(&scfg, &["pit", "unexport"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
