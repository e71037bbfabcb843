//! `ferryctl init` and `ferryctl status` against a real ferryd.
mod common;
use common::*;
use std::process::Command;

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

#[test]
fn init_lays_out_a_node_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ferryctl())
        .args(["init", "--dir"])
        .arg(dir.path())
        .args([
            "--volume",
            "vol0:64MiB",
            "--volume",
            "db:8MiB",
            "--nbd",
            "127.0.0.1:0",
        ])
        .args(["--journal-size", "32MiB", "--segment-size", "4MiB"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = dir.path().join("primary/vol0.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    assert_eq!(
        std::fs::metadata(dir.path().join("primary/db.img"))
            .unwrap()
            .len(),
        8 << 20
    );
    // Sparse: no blocks allocated for a fresh volume.
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&img).unwrap().blocks() < 64);
    let cfg = ferry_api::config::Config::load(&dir.path().join("primary.toml")).unwrap();
    assert_eq!(cfg.volumes.len(), 2);
    assert_eq!(cfg.node.role, ferry_api::config::Role::Primary);

    let again = init_dir(
        dir.path(),
        &["--volume", "vol0:64MiB", "--nbd", "127.0.0.1:0"],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    for (spec, want) in [
        ("vol0", "NAME:SIZE"),
        ("vol0:12parsecs", "not a size"),
        ("a/b:1GiB", "not a valid name"),
        ("v:1000", "multiple of 4096"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let out = init_dir(d.path(), &["--volume", spec, "--nbd", "127.0.0.1:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{spec}: {err}");
    }
}

#[test]
fn status_reports_the_running_node() {
    if skip_without("qemu-io", "status_reports_the_running_node") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let st = init_dir(
        dir.path(),
        &[
            "--volume",
            "vol0:64MiB",
            "--nbd",
            "127.0.0.1:0",
            "--journal-size",
            "32MiB",
            "--segment-size",
            "4MiB",
        ],
    );
    assert!(st.status.success());
    let cfg = dir.path().join("primary.toml");
    let node = Node::start(&ferryd(), &cfg);
    assert_qemu_io_ok(&qemu_io(
        &node.url("vol0"),
        &["write -P 7 0 256k".to_string()],
    ));
    let out = Command::new(ferryctl())
        .arg("--config")
        .arg(&cfg)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["role"], "primary");
    assert_eq!(v["epoch"], 1);
    assert!(v["last_seq"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["journal"]["capacity_bytes"], 32 << 20);
    assert!(v["journal"]["used_bytes"].as_u64().is_some());
    assert!(v["targets"].as_array().unwrap().is_empty());
    let human = Command::new(ferryctl())
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("primary") && text.contains("journal"),
        "{text}"
    );

    // Without a daemon, a clear error.
    drop(node);
    let out = Command::new(ferryctl())
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach ferryd"));
}
