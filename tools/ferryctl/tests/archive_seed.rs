//! `ferryctl archive seed` end to end, with real processes and a `file://` archive: a
//! new standby restored from its primary's archive joins by streaming after the
//! seeded point (no resync: the primary's journal still holds it), or, once the
//! primary released that part of its journal, by a resync that compares digests and
//! copies only the chunks that differ; either way it then equals the primary byte for
//! byte. A foreign archive is refused by the command; a point the primary no longer
//! has (its history was re-created) is refused at the first connection, plainly.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use ferry_api::config::Config;
use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

const SIZE: u64 = 32 << 20;

/// A primary with an archive target (`cold`, in `dir/archive`) and its standby `dr1`
/// (not started); returns their configs and the archive's URL.
fn init(dir: &Path) -> (PathBuf, PathBuf, String) {
    let (pcfg, scfg) = init_pair(
        dir,
        &Init {
            volume: "vol0:32MiB",
            ..Init::default()
        },
    );
    let url = format!("file://{}", dir.join("archive").display());
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.push_str(&format!(
        "\n[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"{url}\"\nflush_interval = 1\n"
    ));
    std::fs::write(&pcfg, text).unwrap();
    (pcfg, scfg, url)
}

/// Waits until the archive holds everything the primary made durable.
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

/// `ferryctl --config SCFG archive seed --url URL --latest --json`.
fn seed(scfg: &Path, url: &str) -> Output {
    ctl(
        scfg,
        &["archive", "seed", "--url", url, "--latest", "--json"],
    )
}

fn seeded(scfg: &Path, url: &str) -> serde_json::Value {
    let o = seed(scfg, url);
    assert!(
        o.status.success(),
        "archive seed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn volume_path(config: &Path) -> PathBuf {
    Config::load(config).unwrap().volumes[0].path.clone()
}

/// Data A (8 MiB over the volume), archived; the standby seeded from it; then B (three
/// 64 KiB writes) on the primary only, after A written again over itself (the same
/// bytes: 8 MiB more of journal, two segments, and nothing that differs). Returns the
/// seed's point.
fn a_seed_then_b(primary: &Node, scfg: &Path, url: &str) -> u64 {
    let nbd = primary.url("vol0");
    let offsets: Vec<u64> = (0..8u64).map(|i| i * (4 << 20)).collect();
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xa1, &offsets, 1 << 20)));
    let archived = wait_archived(primary);
    let s = seeded(scfg, url);
    let at = seq(&s, "/seq");
    assert!(at >= archived, "{s:#}");
    assert!(
        seq(&s, "/bytes_downloaded") > 0 && s["epoch"] == 1 && s["point_epoch"] == 1,
        "{s:#}"
    );
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xa1, &offsets, 1 << 20)));
    assert_qemu_io_ok(&qemu_io(
        &nbd,
        &writes(0xb2, &[4096, 9 << 20, 30 << 20], 65536),
    ));
    at
}

/// The standby's volume equals the primary's, once it applied everything.
fn assert_equal(primary: &Node, standby: &Node, scfg: &Path, dir: &Path) {
    wait_caught_up(primary, standby);
    let want = image_of(&primary.url("vol0"), &dir.join("primary.img"));
    let got = std::fs::read(volume_path(scfg)).unwrap();
    assert_same("seeded standby vs primary", &got, &want);
}

#[test]
fn a_seeded_standby_streams_after_the_archived_point_without_a_resync() {
    const T: &str = "a_seeded_standby_streams_after_the_archived_point_without_a_resync";
    if skip_without("qemu-img", T) || skip_without("qemu-io", T) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg, url) = init(dir.path());
    let primary = Node::start(&ferryd(), &pcfg);
    let at = a_seed_then_b(&primary, &scfg, &url);
    let again = seed(&scfg, &url);
    assert!(!again.status.success(), "a second seed was accepted");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("seeded already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    let standby = Node::start(&ferryd(), &scfg);
    assert_equal(&primary, &standby, &scfg, dir.path());
    // The catch-up path: no resync of any kind, and the standby journaled only what
    // came after the point (A's rewrite and B: a little over 8 MiB, not A twice).
    let t = &primary.status()["targets"][0];
    assert_eq!(
        (t["resync_bytes"].as_u64(), t["tracking"].as_str()),
        (Some(0), Some("streaming")),
        "{t:#}"
    );
    let st = standby.status();
    assert_eq!(seq(&st, "/journal/first_seq"), at + 1, "{st:#}");
    let journaled = seq(&st, "/journal/bytes_written");
    assert!(
        journaled > 8 << 20 && journaled < 9 << 20,
        "the standby journaled {journaled} bytes: {st:#}"
    );
    assert!(
        standby
            .log_text()
            .contains("standby seeded from the archive"),
        "{}",
        standby.log_text()
    );
}

#[test]
fn a_seeded_standby_past_the_journal_resyncs_only_the_chunks_that_differ() {
    const T: &str = "a_seeded_standby_past_the_journal_resyncs_only_the_chunks_that_differ";
    if skip_without("qemu-img", T) || skip_without("qemu-io", T) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg, url) = init(dir.path());
    let mut primary = Node::start(&ferryd(), &pcfg);
    let at = a_seed_then_b(&primary, &scfg, &url);
    // A restart releases the journal through the checkpoint: the seeded point's next
    // record is gone.
    assert!(primary.terminate().success());
    let primary = Node::start(&ferryd(), &pcfg);
    let first = seq(&primary.status(), "/journal/first_seq");
    assert!(first > at + 1, "journal still starts at {first}");

    let standby = Node::start(&ferryd(), &scfg);
    assert_equal(&primary, &standby, &scfg, dir.path());
    let t = &primary.status()["targets"][0];
    let (moved, data) = (seq(t, "/resync_bytes"), seq(t, "/resync_data_bytes"));
    eprintln!("seeded at {at}: the resync moved {moved} bytes ({data} of data) of {SIZE}");
    // B touched three chunks; the rest of the 32 MiB (A's 8 MiB among it) matched.
    assert!(moved > 0 && data < 4 << 20, "{t:#}");
    assert!(data < SIZE / 8, "{t:#}");
}

#[test]
fn seeding_from_a_foreign_archive_or_a_lost_history_is_refused() {
    const T: &str = "seeding_from_a_foreign_archive_or_a_lost_history_is_refused";
    if skip_without("qemu-img", T) || skip_without("qemu-io", T) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg, url) = init(&dir.path().join("a"));
    let (other_pcfg, _, other_url) = init(&dir.path().join("b"));
    let mut other = Node::start(&ferryd(), &other_pcfg);
    assert_qemu_io_ok(&qemu_io(&other.url("vol0"), &writes(0x33, &[0], 65536)));
    wait_archived(&other);
    assert!(other.terminate().success());
    let o = seed(&scfg, &other_url);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("foreign archive"),
        "{err}"
    );
    assert!(
        !Config::load(&scfg)
            .unwrap()
            .node
            .metadata_dir
            .join("archive-seed.json")
            .exists(),
        "a refused seed left a marker"
    );

    // The primary's history is re-created after the archive took it: the seeded point
    // is past everything the new history holds.
    let mut primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(
        &primary.url("vol0"),
        &writes(0x44, &[0, 1 << 20, 2 << 20, 3 << 20], 65536),
    ));
    wait_archived(&primary);
    let at = seq(&seeded(&scfg, &url), "/seq");
    assert!(primary.terminate().success());
    let cfg = Config::load(&pcfg).unwrap();
    std::fs::remove_file(cfg.node.metadata_dir.join("meta.redb")).unwrap();
    std::fs::remove_dir_all(&cfg.journal.dir).unwrap();
    std::fs::write(&cfg.volumes[0].path, b"").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&cfg.volumes[0].path)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let primary = Node::start(&ferryd(), &pcfg);
    let standby = Node::start(&ferryd(), &scfg);
    let st = standby.wait_status(
        "the primary to refuse the seeded point",
        Duration::from_secs(60),
        |st| st.to_string().contains("seeded from an archive"),
    );
    let text = st.to_string();
    assert!(
        text.contains(&format!("sequence {at}")) && text.contains("not of the primary's history"),
        "{st:#}"
    );
    assert_eq!(seq(&st, "/applied_seq"), at, "the replica moved: {st:#}");
    let p = primary.status();
    assert!(
        p["targets"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("diverged")),
        "{p:#}"
    );
}
