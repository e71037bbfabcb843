//! Online verify end to end: the primary and a standby hash their volumes at one
//! point of the stream while a workload keeps writing; a block corrupted behind the
//! standby's back is found, and nothing else is reported.
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, spawn_qemu_io, Node};

fn verify(pcfg: &Path) -> (Output, serde_json::Value) {
    let out = Command::new(ferryctl())
        .arg("--config")
        .arg(pcfg)
        .args(["verify", "--json"])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

#[test]
fn verify_finds_a_corrupted_block_while_writes_continue() {
    if skip_without(
        "qemu-io",
        "verify_finds_a_corrupted_block_while_writes_continue",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            journal: "128MiB",
            ..Init::default()
        },
    );
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    let fill: Vec<String> = (0..32u64)
        .map(|i| format!("write -P {} {}M 1M", i + 1, i))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &fill));
    primary.wait_status("the standby to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });

    let (out, v) = verify(&pcfg);
    assert!(out.status.success() && v["identical"] == true, "{v:#}");

    // Corrupt one block of the replica behind the standby's back.
    let replica = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("dr1/vol0.img"))
        .unwrap();
    replica
        .write_all_at(&[0xde; 512], (5 << 20) + 4096)
        .unwrap();
    replica.sync_all().unwrap();

    // Verify while a workload rewrites other regions (and the verified point with them).
    let work: Vec<String> = (0..400u64)
        .map(|i| {
            format!(
                "write -P {} {} 64k",
                i % 200 + 30,
                (40 << 20) + (i % 300) * 65536
            )
        })
        .chain((0..100u64).map(|i| format!("write -P {} {} 4k", i % 200 + 30, (i % 32) << 20)))
        .collect();
    let run = spawn_qemu_io(&url, &work);
    let (out, v) = verify(&pcfg);
    let written = run.finish();
    assert!(
        written.contains("wrote"),
        "the workload did not run: {written}"
    );
    assert!(
        !out.status.success(),
        "verify must fail on a difference: {v:#}"
    );
    let r = &v["results"][0];
    assert_eq!(
        (r["target"].as_str(), r["volume"].as_str()),
        (Some("dr1"), Some("vol0")),
        "{v:#}"
    );
    let ranges = r["differing"].as_array().unwrap();
    let chunk = v["chunk_size"].as_u64().unwrap();
    assert_eq!(
        ranges.len(),
        1,
        "exactly the corrupted chunk differs: {v:#}"
    );
    let (off, len) = (
        ranges[0]["offset"].as_u64().unwrap(),
        ranges[0]["len"].as_u64().unwrap(),
    );
    assert!(
        off <= (5 << 20) + 4096 && (5 << 20) + 4096 + 512 <= off + len && len == chunk,
        "{v:#}"
    );
    eprintln!(
        "verify found {off}+{len} in {:.3} s with writes running",
        v["seconds"].as_f64().unwrap_or(0.0)
    );
    drop((standby, primary));
}

/// Issue 19 item 4: a gm cluster compares with SM3 by default (`[verify] digest`
/// resolves to sm3 on both nodes): identical replicas verify, a changed block is
/// found; a standby set to another digest refuses, naming both.
#[test]
fn a_gm_pair_verifies_with_sm3_and_refuses_a_digest_mismatch() {
    let name = "a_gm_pair_verifies_with_sm3_and_refuses_a_digest_mismatch";
    if skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            crypto: "gm",
            ..Init::default()
        },
    );
    let mut standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let fill: Vec<String> = (0..8u64)
        .map(|i| format!("write -P {} {}M 1M", i + 1, i))
        .collect();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &fill));
    let streaming = |p: &Node| {
        p.wait_status("the standby to stream", Duration::from_secs(30), |st| {
            st["targets"][0]["state"] == "streaming"
        });
    };
    streaming(&primary);
    let (out, v) = verify(&pcfg);
    assert!(out.status.success() && v["identical"] == true, "{v:#}");
    assert_eq!(v["digest"], "sm3", "{v:#}");

    let replica = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("dr1/vol0.img"))
        .unwrap();
    replica.write_all_at(&[0xde; 512], 3 << 20).unwrap();
    replica.sync_all().unwrap();
    let (out, v) = verify(&pcfg);
    assert!(!out.status.success(), "{v:#}");
    let ranges = v["results"][0]["differing"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{v:#}");
    let off = ranges[0]["offset"].as_u64().unwrap();
    assert!(off <= 3 << 20 && (3 << 20) < off + v["chunk_size"].as_u64().unwrap());

    // The standby told to compare with xxh3: it refuses the primary's SM3 verify.
    assert!(standby.terminate().success());
    let mut toml = std::fs::read_to_string(&scfg).unwrap();
    toml.push_str("\n[verify]\ndigest = \"xxh3\"\n");
    std::fs::write(&scfg, toml).unwrap();
    let standby = Node::start(&ferryd(), &scfg);
    streaming(&primary);
    let out = Command::new(ferryctl())
        .arg("--config")
        .arg(&pcfg)
        .arg("verify")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "digest mismatch: the primary compares with sm3, this node's [verify] digest is xxh3"
        ),
        "{text}"
    );
    drop((standby, primary));
}
