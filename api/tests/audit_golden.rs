//! The audit log's file format is pinned (api/AUDIT.md): a rotated log built with
//! `seal`/`seal_with` from fixed entries, with signed checkpoints (format 3), matches
//! the committed files in `tests/golden/audit/` byte for byte, and those files verify
//! as one chain, and their checkpoints as signed, with the report AUDIT.md describes.
//! Format 2 logs (`tests/golden/audit-v2/`, as ferryd wrote them before checkpoints)
//! and format 1 lines (no `v`, no intents) still verify.
//!
//! After an intended format change, rewrite the fixtures with
//! `FERRY_BLESS=1 cargo test -p ferry-api --test audit_golden` and review the diff.
use std::path::{Path, PathBuf};

use ferry_api::audit::checkpoint::{
    checkpoint_entry, verify_signed, CheckpointSigner, CheckpointVerifier,
};
use ferry_api::audit::files::{rotated_name, verify_chain};
use ferry_api::audit::ROTATE_REQUEST;
use ferry_api::audit::{seal_with, sm3_hex, verify_bytes, AuditEntry, Outcome, GENESIS};
use ferry_api::control::Role;
use sm2::dsa::signature::{Signer, Verifier};

/// The golden node key: SM2 with SM3 and the default distinguishing ID, as a gm
/// node signs (ferry-transport's `nodesig`), from a fixed secret; SM2 signing is
/// deterministic, so the signatures are pinned too.
#[derive(Debug)]
struct GoldenKey(sm2::dsa::SigningKey, String);

const DISTID: &str = "1234567812345678";

fn golden_key() -> GoldenKey {
    let secret = sm2::SecretKey::from_slice(&[0x42; 32]).unwrap();
    GoldenKey(
        sm2::dsa::SigningKey::new(DISTID, &secret).unwrap(),
        golden_cert(),
    )
}

/// Stands for the SM3 fingerprint of the node certificate's DER.
fn golden_cert() -> String {
    sm3_hex(b"golden node certificate")
}

impl CheckpointSigner for GoldenKey {
    fn alg(&self) -> &str {
        "sm2-sm3"
    }
    fn cert(&self) -> &str {
        &self.1
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        let sig: sm2::dsa::Signature = self.0.try_sign(msg).map_err(|e| e.to_string())?;
        Ok(sig.to_der().as_bytes().to_vec())
    }
}

impl CheckpointVerifier for GoldenKey {
    fn verify(&self, alg: &str, cert: &str, msg: &[u8], sig: &[u8]) -> Result<(), String> {
        if alg != "sm2-sm3" || cert != golden_cert() {
            return Err(format!("unknown key {alg}/{cert}"));
        }
        let sig = sm2::dsa::Signature::from_der(sig).map_err(|e| e.to_string())?;
        self.0
            .verifying_key()
            .verify(msg, &sig)
            .map_err(|e| e.to_string())
    }
}

const T0: u64 = 1_796_601_600_000_000_000; // 2026-12-07T00:00:00Z

fn entry(
    role: Option<Role>,
    request: &str,
    args: serde_json::Value,
    result: Outcome,
) -> AuditEntry {
    AuditEntry {
        uid: Some(1000),
        gid: Some(1000),
        pid: Some(4242),
        role,
        request: request.into(),
        args,
        result,
        message: None,
    }
}

/// The two files of the golden log: `(name, text)`.
fn build() -> Vec<(String, String)> {
    use serde_json::json;
    let first = rotated_name("audit.log", 1);
    let mut denied = entry(
        Some(Role::Viewer),
        "promote",
        json!({"cmd": "promote", "force": true}),
        Outcome::Denied,
    );
    denied.message = Some("permission denied: promote needs admin, uid 1000 has viewer".into());
    let pause = entry(
        Some(Role::Operator),
        "pause",
        json!({"cmd": "pause"}),
        Outcome::Intent,
    );
    let mut header = entry(
        None,
        ROTATE_REQUEST,
        json!({"prev_file": first, "prev_seq": 5}),
        Outcome::Ok,
    );
    (header.uid, header.gid) = (None, None);
    header.message = Some(format!("continues the chain of {first}"));
    let bookmark = entry(
        Some(Role::Operator),
        "bookmark",
        json!({"cmd": "bookmark", "name": "before-upgrade"}),
        Outcome::Intent,
    );
    let status = entry(
        Some(Role::Viewer),
        "status",
        json!({"cmd": "status"}),
        Outcome::Ok,
    );
    let mut pause_ok = pause.clone();
    pause_ok.result = Outcome::Ok;
    // (file, entry, intent it answers)
    // `None`: a checkpoint of the chain so far (every 4 lines, and at the stop).
    let plan: [(usize, Option<&AuditEntry>, Option<u64>); 9] = [
        (0, Some(&status), None),
        (0, Some(&denied), None),
        (0, Some(&pause), None),
        (0, Some(&pause_ok), Some(3)),
        (0, None, None),
        (1, Some(&header), None),
        // A crash while the bookmark was being made: no outcome follows.
        (1, Some(&bookmark), None),
        (1, Some(&status), None),
        (1, None, None),
    ];
    let mut files = vec![
        (first.clone(), String::new()),
        ("audit.log".to_string(), String::new()),
    ];
    let key = golden_key();
    let mut prev = GENESIS.to_string();
    for (i, (f, e, intent)) in plan.iter().enumerate() {
        let seq = i as u64 + 1;
        let cp;
        let e = match e {
            Some(e) => *e,
            None => {
                cp = checkpoint_entry(seq - 1, &prev, Some(4242), &key).unwrap();
                &cp
            }
        };
        let s = seal_with(seq, T0 + seq * 1_000_000, &prev, e, *intent).unwrap();
        prev = s.full_hash;
        files[*f].1.push_str(&s.line);
        files[*f].1.push('\n');
    }
    files
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/audit")
}

#[test]
fn the_rotated_log_format_is_pinned() {
    let dir = golden_dir();
    for (name, text) in build() {
        let path = dir.join(&name);
        if std::env::var_os("FERRY_BLESS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let golden = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, golden, "{name} differs from the golden file");
    }
    let signed = verify_signed(&dir.join("audit.log"), &golden_key()).unwrap();
    assert_eq!((signed.checkpoints, signed.unsigned_tail), (2, 0));
    assert_eq!(
        signed.last.unwrap().to_string(),
        "checkpoint at seq 9 (audit.log line 4)"
    );
    let r = verify_chain(&dir.join("audit.log")).unwrap();
    assert_eq!(r, signed.chain);
    assert_eq!(r.entries, 9);
    let files: Vec<_> = r.files.iter().map(|f| (f.name.as_str(), f.seqs)).collect();
    assert_eq!(
        files,
        [
            ("audit.log.000001", Some((1, 5))),
            ("audit.log", Some((6, 9)))
        ]
    );
    assert_eq!(r.continues_from, None);
    let open: Vec<_> = r
        .open_intents
        .iter()
        .map(|o| (o.seq, o.request.as_str(), o.time.as_str(), o.file.as_str()))
        .collect();
    assert_eq!(
        open,
        [(7, "bookmark", "2026-12-07T00:00:00.007000000Z", "audit.log")]
    );
    let active = std::fs::read_to_string(dir.join("audit.log")).unwrap();
    let last = active.lines().last().unwrap();
    assert!(last.ends_with(&format!("\"hash\":\"{}\"}}", r.last_hash)));
}

/// The format 2 log ferryd wrote before checkpoints (the golden files of format 2,
/// kept as they were committed): it still verifies as a chain, with no checkpoint,
/// so all its lines are the unsigned tail.
#[test]
fn format_two_logs_still_verify() {
    let active = golden_dir().with_file_name("audit-v2").join("audit.log");
    let r = verify_chain(&active).unwrap();
    assert_eq!(r.entries, 7);
    assert_eq!(r.open_intents.len(), 1);
    assert_eq!(r.open_intents[0].seq, 6);
    let signed = verify_signed(&active, &golden_key()).unwrap();
    assert_eq!((signed.checkpoints, signed.unsigned_tail), (0, 7));
    assert_eq!(signed.last, None);
}

/// A format 1 log, as ferryd wrote it before format 2: no `v`, no intent lines.
#[test]
fn format_one_logs_still_verify() {
    let mut prev = GENESIS.to_string();
    let mut log = String::new();
    for seq in 1..=3u64 {
        let canonical = format!(
            "{{\"seq\":{seq},\"time\":\"2025-01-02T03:04:05.000000000Z\",\"unix_ns\":1735787045000000000,\"uid\":1000,\"gid\":1000,\"pid\":4242,\"role\":\"viewer\",\"request\":\"status\",\"args\":{{\"cmd\":\"status\"}},\"result\":\"ok\",\"message\":null,\"prev\":\"{prev}\"}}"
        );
        let hash = sm3_hex(canonical.as_bytes());
        let line = format!(
            "{},\"hash\":\"{hash}\"}}",
            &canonical[..canonical.len() - 1]
        );
        prev = sm3_hex(line.as_bytes());
        log.push_str(&line);
        log.push('\n');
    }
    let r = verify_bytes(log.as_bytes()).unwrap();
    assert_eq!(r.entries, 3);
    assert!(r.open_intents.is_empty());
}
