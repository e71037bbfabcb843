//! `ferryctl audit verify` on good and tampered logs, one file or rotated ones: exit
//! codes and messages; and the signed checkpoints of a real ferryd in a gm cluster
//! against a chain rewritten by someone without the node's key.
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_api::audit::{AuditEntry, Outcome};
use ferry_api::control::Role;
use ferryd::ops::audit::{AuditLog, AuditOptions};

fn ferryctl(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferryctl"))
        .args(args)
        .output()
        .expect("run ferryctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A log of `n` genuine entries.
fn make_log(dir: &Path, n: u32) -> PathBuf {
    let path = dir.join("node/audit.log");
    let log = AuditLog::open(&path).unwrap();
    for i in 0..n {
        log.append(AuditEntry {
            uid: Some(1000 + i),
            gid: Some(1000),
            pid: Some(77),
            role: Some(Role::Operator),
            request: "status".into(),
            args: serde_json::json!({"cmd": "status"}),
            result: Outcome::Ok,
            message: None,
        })
        .unwrap();
    }
    path
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, format!("{}\n", lines.join("\n"))).unwrap();
}

fn verify_fails(path: &Path, expect: &str) {
    let o = ferryctl(&["audit", "verify", "--file", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("FAILED"), "{t}");
    assert!(t.contains(expect), "expected {expect:?} in {t}");
}

#[test]
fn good_log_verifies_by_file_and_by_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 5);
    let last = lines(&path).pop().unwrap();
    let hash = &last[last.len() - 66..last.len() - 2];
    let o = ferryctl(&["audit", "verify", "--file", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("audit log OK: 5 entries, last hash {hash}\n")
    );

    // Via a node config: default <metadata_dir>/audit.log, relative to the config.
    let init = ferryctl(&[
        "init",
        "--dir",
        dir.path().to_str().unwrap(),
        "--volume",
        "vol0:1MiB",
        "--nbd",
        "127.0.0.1:0",
        "--journal-size",
        "2MiB",
        "--segment-size",
        "1MiB",
    ]);
    assert!(init.status.success(), "{}", text(&init));
    std::fs::copy(&path, dir.path().join("primary/audit.log")).unwrap();
    let cfg = dir.path().join("primary.toml");
    let o = ferryctl(&["--config", cfg.to_str().unwrap(), "audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).starts_with("audit log OK: 5 entries"),
        "{}",
        text(&o)
    );

    // access.audit_log overrides the default.
    let mut toml = std::fs::read_to_string(&cfg).unwrap();
    toml.push_str("\n[access]\naudit_log = \"node/audit.log\"\n");
    std::fs::write(&cfg, toml).unwrap();
    let o = ferryctl(&["--config", cfg.to_str().unwrap(), "audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let o = ferryctl(&["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--config FILE"), "{}", text(&o));
    let o = ferryctl(&["audit", "verify", "--file", "/nonexistent/audit.log"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cannot read audit log"), "{}", text(&o));
}

#[test]
fn tampered_logs_fail_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_log(dir.path(), 6);
    let good = lines(&path);

    let mut l = good.clone();
    l[3] = l[3].replace("\"uid\":1003", "\"uid\":0");
    write_lines(&path, &l);
    verify_fails(&path, "line 4 (seq 4): hash mismatch: the line was edited");

    let mut l = good.clone();
    l.remove(1);
    write_lines(&path, &l);
    verify_fails(&path, "line 2 (seq 3): 1 line(s) removed before this line");

    let mut l = good.clone();
    l.insert(2, l[4].clone());
    write_lines(&path, &l);
    verify_fails(&path, "line 3 (seq 5): inserted line");

    let mut l = good.clone();
    l.swap(3, 4);
    write_lines(&path, &l);
    verify_fails(&path, "line 4 (seq 5): lines reordered");

    let mut data = format!("{}\n", good.join("\n")).into_bytes();
    data.truncate(data.len() - 30);
    std::fs::write(&path, &data).unwrap();
    verify_fails(&path, "line 6: incomplete last line");
}

fn status_entry(i: u32) -> AuditEntry {
    AuditEntry {
        uid: Some(1000 + i),
        gid: Some(1000),
        pid: Some(77),
        role: Some(Role::Viewer),
        request: "status".into(),
        args: serde_json::json!({"cmd": "status"}),
        result: Outcome::Ok,
        message: None,
    }
}

/// Issue 16 path 9: `audit verify DIR` checks the chain across rotated files, names a
/// removed or edited middle file, and lists intents that never got their outcome.
#[test]
fn verify_checks_rotated_files_as_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let opts = AuditOptions {
        max_file_size: 1024,
        keep_files: 0,
        ..AuditOptions::default()
    };
    let log = AuditLog::open_with(&path, opts).unwrap();
    for i in 0..10 {
        log.append(status_entry(i)).unwrap();
    }
    let mut pause = status_entry(99);
    pause.request = "pause".into();
    let intent = log.append_intent(pause).unwrap();
    drop(log);
    let o = ferryctl(&["audit", "verify", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.starts_with("audit log OK: "), "{out}");
    assert!(
        out.contains("files: audit.log.000001 (seq 1-"),
        "the rotated files are listed: {out}"
    );
    assert!(
        out.contains(&format!(
            "1 intent(s) without an outcome (interrupted by a crash, or still running):\n  seq {intent} pause at "
        )),
        "{out}"
    );
    // The same through --file, and a lone rotated file from its header on.
    let o = ferryctl(&["audit", "verify", "--file", path.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), out);
    let second = dir.path().join("audit.log.000002");
    let o = ferryctl(&["audit", "verify", "--file", second.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("it continues audit.log.000001 (up to seq"),
        "{}",
        text(&o)
    );

    // A middle file edited.
    let good = std::fs::read_to_string(&second).unwrap();
    std::fs::write(&second, good.replacen("\"pid\":77", "\"pid\":78", 1)).unwrap();
    let o = ferryctl(&["audit", "verify", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("FAILED: audit.log.000002: line 2 (seq"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("hash mismatch"), "{}", text(&o));
    // Removed.
    std::fs::remove_file(&second).unwrap();
    let o = ferryctl(&["audit", "verify", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(
            "FAILED: audit.log.000003: line 1: does not continue audit.log.000001: it continues audit.log.000002"
        ),
        "{}",
        text(&o)
    );
}

/// The lines rewritten from index `from` on as someone without the node key can: each
/// line's `prev` and `hash` recomputed, so the unkeyed chain verifies again.
fn rechain(lines: &mut [String], from: usize) {
    use ferry_api::audit::{sm3_hex, GENESIS};
    let mut prev = match from {
        0 => GENESIS.to_string(),
        _ => sm3_hex(lines[from - 1].as_bytes()),
    };
    for l in lines.iter_mut().skip(from) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let old = format!("\"prev\":\"{}\"", v["prev"].as_str().unwrap());
        // `,"hash":"` + 64 hex + `"}` ends every line.
        let body = l[..l.len() - 75].replace(&old, &format!("\"prev\":\"{prev}\""));
        let hash = sm3_hex(format!("{body}}}").as_bytes());
        *l = format!("{body},\"hash\":\"{hash}\"}}");
        prev = sm3_hex(l.as_bytes());
    }
}

/// Issue 19 item 4: a gm primary (SM2 node key) signs a checkpoint every 4 lines and
/// at its clean stop; `ferryctl audit verify --config` checks them against the node's
/// certificate. A line edited with the whole chain recomputed verifies as a chain but
/// fails at the next checkpoint, which is named; a cut tail is reported as unsigned.
#[test]
fn a_rewritten_chain_fails_at_the_next_signed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, _) = common::init_pair(
        dir.path(),
        &common::Init {
            volume: "vol0:1MiB",
            journal: "2MiB",
            segment: "1MiB",
            crypto: "gm",
            ..common::Init::default()
        },
    );
    let mut toml = std::fs::read_to_string(&pcfg).unwrap();
    toml.push_str("\n[audit]\ncheckpoint_every = 4\n");
    std::fs::write(&pcfg, toml).unwrap();
    let mut primary = ferryd::testkit::Node::start(&common::ferryd(), &pcfg);
    for _ in 0..9 {
        primary.status();
    }
    assert!(primary.terminate().success(), "{}", primary.log_text());
    let cfg = ferry_api::config::Config::load(&pcfg).unwrap();
    let log = cfg.audit_log_path();
    let good = lines(&log);
    let requests: Vec<String> = good
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["request"].to_string())
        .collect();
    let checkpoints: Vec<usize> = (0..good.len())
        .filter(|&i| requests[i] == "\"audit-checkpoint\"")
        .collect();
    assert_eq!(checkpoints.first(), Some(&4), "{requests:?}");
    assert_eq!(
        checkpoints.last(),
        Some(&(good.len() - 1)),
        "stop: {requests:?}"
    );
    assert!(good[4].contains(r#""alg":"sm2-sm3""#), "{}", good[4]);

    let c = pcfg.to_str().unwrap();
    let o = ferryctl(&["--config", c, "audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!(
            "signatures OK: {} checkpoint(s) verified against {}",
            checkpoints.len(),
            cfg.tls.as_ref().unwrap().cert.display()
        )),
        "{out}"
    );
    assert!(out.ends_with("unsigned tail: none\n"), "{out}");

    // Seq 2 rewritten to another uid (hiding who asked), every line after rechained.
    let mut l = good.clone();
    let v: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
    let uid = format!("\"uid\":{},", v["uid"]);
    assert!(l[1].contains(&uid), "{}", l[1]);
    l[1] = l[1].replacen(&uid, "\"uid\":4242,", 1);
    assert_ne!(l[1], good[1]);
    rechain(&mut l, 1);
    write_lines(&log, &l);
    // Without the certificate only the chain is checked, and it holds.
    let o = ferryctl(&["audit", "verify", "--file", log.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("signatures not checked"), "{}", text(&o));
    let o = ferryctl(&["--config", c, "audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o)
            .contains("FAILED: checkpoint at seq 5 (audit.log line 5): signature does not verify"),
        "{}",
        text(&o)
    );
    // The checkpoint's head fixed up too (and rechained): the signature still fails.
    let head = ferry_api::audit::sm3_hex(l[3].as_bytes());
    let v: serde_json::Value = serde_json::from_str(&l[4]).unwrap();
    let old = v["args"]["head"].as_str().unwrap().to_string();
    l[4] = l[4].replace(&old, &head);
    rechain(&mut l, 4);
    write_lines(&log, &l);
    let o = ferryctl(&[
        "audit",
        "verify",
        "--cert",
        cfg.tls.as_ref().unwrap().cert.to_str().unwrap(),
        "--file",
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("checkpoint at seq 5 (audit.log line 5): signature does not verify (signature does not verify)"),
        "{}",
        text(&o)
    );

    // The genuine log with its stop checkpoint and the line before cut off: the
    // chain and the other checkpoints hold; the tail is reported as unsigned.
    let mut l = good.clone();
    l.truncate(good.len() - 1);
    write_lines(&log, &l);
    let o = ferryctl(&["--config", c, "audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let unsigned = good.len() - 1 - checkpoints[checkpoints.len() - 2] - 1;
    assert!(
        text(&o).contains(&format!(
            "unsigned tail: {unsigned} line(s) after the newest checkpoint"
        )),
        "{}",
        text(&o)
    );
    // Another node's certificate: every checkpoint names a certificate not given.
    let other = dir.path().join("dr1/tls/dr1.pem");
    let o = ferryctl(&[
        "audit",
        "verify",
        "--cert",
        other.to_str().unwrap(),
        "--file",
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("which is not the one given"),
        "{}",
        text(&o)
    );
}
