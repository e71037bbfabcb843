//! Signed checkpoints (format 3, `api/AUDIT.md`): every `[audit] checkpoint_every`
//! lines and at a clean stop, ferryd appends an `audit-checkpoint` line whose
//! signature, by the node's certificate key, covers the chain head (the full-text SM3
//! of the line before it) and the number of lines it covers. The unkeyed chain alone
//! cannot tell a rewritten chain from the genuine one; a rewrite of any line before a
//! checkpoint changes the head that checkpoint signed, and only the node's key can sign
//! the new one.
//!
//! This module owns the checkpoint's fields, the exact bytes signed, and the pass that
//! checks every checkpoint of a verified log ([`verify_signed`]). The keys and the
//! algorithms (SM2 with SM3, or ECDSA P-256) are the caller's, behind
//! [`CheckpointSigner`] and [`CheckpointVerifier`] (ferry-transport's `nodesig`), so
//! this crate stays free of certificate code.
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::files::{log_paths, verify_chain, ChainReport};
use super::{parse_line, split_lines, AuditEntry, AuditError, LineMeta, Outcome};

/// `request` of a checkpoint line.
pub const CHECKPOINT_REQUEST: &str = "audit-checkpoint";

/// The first bytes of every signed message: a signature made for anything else
/// (a TLS handshake, another format) never reads as a checkpoint's.
const DOMAIN: &[u8] = b"ferry audit checkpoint v3\n";

/// The `args` of a checkpoint line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointArgs {
    /// Lines covered: the seq of the line before the checkpoint.
    pub lines: u64,
    /// The chain head: the full-text SM3 of that line (equal to the checkpoint's own
    /// `prev`).
    pub head: String,
    /// `sm2-sm3` or `ecdsa-p256-sha256`.
    pub alg: String,
    /// Fingerprint (hex SM3 of the DER) of the certificate whose key signed.
    pub cert: String,
    /// The signature over [`signed_message`], hex of its DER.
    pub sig: String,
}

/// The bytes a checkpoint signs: `ferry audit checkpoint v3\n`, then `lines=N\n`,
/// `head=HEX\n`, `cert=HEX\n` (ASCII, lowercase hex).
pub fn signed_message(lines: u64, head: &str, cert: &str) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(format!("lines={lines}\nhead={head}\ncert={cert}\n").as_bytes());
    m
}

/// A node key that signs checkpoints.
pub trait CheckpointSigner: Send + Sync + std::fmt::Debug {
    /// The algorithm's name in `alg`.
    fn alg(&self) -> &str;
    /// The fingerprint of the certificate of the key.
    fn cert(&self) -> &str;
    /// A signature over `msg` (DER), or why there is none.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String>;
}

/// Checks checkpoint signatures: knows the certificates they may name.
pub trait CheckpointVerifier {
    /// `Ok` when `sig` over `msg` is by the key of certificate `cert` under `alg`.
    fn verify(&self, alg: &str, cert: &str, msg: &[u8], sig: &[u8]) -> Result<(), String>;
}

/// The checkpoint entry for a chain whose last line is `lines` with full hash `head`.
/// `pid` is the writer's.
pub fn checkpoint_entry(
    lines: u64,
    head: &str,
    pid: Option<i32>,
    signer: &dyn CheckpointSigner,
) -> Result<AuditEntry, String> {
    let sig = signer.sign(&signed_message(lines, head, signer.cert()))?;
    let args = CheckpointArgs {
        lines,
        head: head.to_string(),
        alg: signer.alg().to_string(),
        cert: signer.cert().to_string(),
        sig: hex::encode(sig),
    };
    Ok(AuditEntry {
        uid: None,
        gid: None,
        pid,
        role: None,
        request: CHECKPOINT_REQUEST.into(),
        args: serde_json::to_value(args).map_err(|e| e.to_string())?,
        result: Outcome::Ok,
        message: None,
    })
}

/// Whether a parsed line is a checkpoint (format 3 or later).
pub fn is_checkpoint(m: &LineMeta) -> bool {
    m.v >= 3 && m.request == CHECKPOINT_REQUEST
}

/// Where a checkpoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointAt {
    /// The file (no directory) and the 1-based line in it.
    pub file: String,
    pub line: u64,
    pub seq: u64,
}

impl std::fmt::Display for CheckpointAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint at seq {} ({} line {})",
            self.seq, self.file, self.line
        )
    }
}

/// What the signature pass found in a log whose chain verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedReport {
    /// The chain's own report.
    pub chain: ChainReport,
    /// Checkpoints whose signature verified (all of them, or the pass failed).
    pub checkpoints: u64,
    /// The newest one.
    pub last: Option<CheckpointAt>,
    /// Lines after the newest checkpoint (all lines when there is none): lines no
    /// signature covers yet, which a crash leaves, and which a removal of the tail
    /// (or of the checkpoints in it) cannot be told from.
    pub unsigned_tail: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The chain itself does not verify.
    #[error(transparent)]
    Chain(#[from] AuditError),
    #[error("{at}: signature does not verify ({why}): lines before it were rewritten after it was signed, with the chain recomputed, or the checkpoint was forged")]
    Signature { at: CheckpointAt, why: String },
    #[error("{at}: not a valid checkpoint: {why}")]
    Malformed { at: CheckpointAt, why: String },
}

impl CheckpointError {
    /// The checkpoint that failed (`None`: the chain did).
    pub fn checkpoint(&self) -> Option<&CheckpointAt> {
        match self {
            CheckpointError::Chain(_) => None,
            CheckpointError::Signature { at, .. } | CheckpointError::Malformed { at, .. } => {
                Some(at)
            }
        }
    }
}

/// Verifies the log whose active file is `active`: its chain ([`verify_chain`]), then
/// the signature of every checkpoint in it, oldest first (one file in memory at a time).
/// The first bad checkpoint is named; a checkpoint that verifies vouches for every line
/// before it.
pub fn verify_signed(
    active: &Path,
    verifier: &dyn CheckpointVerifier,
) -> Result<SignedReport, CheckpointError> {
    let chain = verify_chain(active)?;
    let mut checkpoints = 0u64;
    let mut last = None;
    for path in log_paths(active)? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data = std::fs::read(&path).map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?;
        for (i, text) in split_lines(&data)?.iter().enumerate() {
            let line = i as u64 + 1;
            let meta = LineMeta::parse(line, text)?;
            if !is_checkpoint(&meta) {
                continue;
            }
            let (c, _) = parse_line(line, text)?;
            let at = CheckpointAt {
                file: name.clone(),
                line,
                seq: c.seq,
            };
            check_one(&at, &c.prev, &meta, verifier)?;
            checkpoints += 1;
            last = Some(at);
        }
    }
    let last_seq = chain
        .files
        .iter()
        .rev()
        .find_map(|f| f.seqs.map(|(_, l)| l))
        .unwrap_or(0);
    let unsigned_tail = match &last {
        Some(at) => last_seq - at.seq,
        None => chain.entries,
    };
    Ok(SignedReport {
        chain,
        checkpoints,
        last,
        unsigned_tail,
    })
}

/// Checks one checkpoint line whose `prev` is `prev`.
fn check_one(
    at: &CheckpointAt,
    prev: &str,
    meta: &LineMeta,
    verifier: &dyn CheckpointVerifier,
) -> Result<(), CheckpointError> {
    let bad = |why: String| CheckpointError::Malformed {
        at: at.clone(),
        why,
    };
    let args: CheckpointArgs =
        serde_json::from_value(meta.args.clone()).map_err(|e| bad(format!("args: {e}")))?;
    if args.lines + 1 != at.seq {
        return Err(bad(format!(
            "it claims to cover {} lines, but it is seq {}",
            args.lines, at.seq
        )));
    }
    if args.head != prev {
        return Err(CheckpointError::Signature {
            at: at.clone(),
            why: format!(
                "it signed head {}, the line before it now hashes to {prev}",
                args.head
            ),
        });
    }
    let sig = hex::decode(&args.sig).map_err(|e| bad(format!("sig: {e}")))?;
    let msg = signed_message(args.lines, &args.head, &args.cert);
    verifier
        .verify(&args.alg, &args.cert, &msg, &sig)
        .map_err(|why| CheckpointError::Signature {
            at: at.clone(),
            why,
        })
}

#[cfg(test)]
mod tests {
    use super::super::files::rotated_name;
    use super::super::{seal, sm3_hex, GENESIS, ROTATE_REQUEST};
    use super::*;
    use crate::control::Role;

    /// A stand-in key: the "signature" is SM3 over a secret and the message, checked
    /// by recomputing it (the real algorithms are ferry-transport's `nodesig`, tested
    /// there and end to end by ferryctl's tests). It has what the tests need: only the
    /// holder of the secret makes signatures that verify.
    #[derive(Debug)]
    struct TestKey(&'static str);

    impl CheckpointSigner for TestKey {
        fn alg(&self) -> &str {
            "test-sm3-mac"
        }
        fn cert(&self) -> &str {
            "c0ffee"
        }
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
            let mut m = self.0.as_bytes().to_vec();
            m.extend_from_slice(msg);
            Ok(sm3_hex(&m).into_bytes())
        }
    }

    impl CheckpointVerifier for TestKey {
        fn verify(&self, alg: &str, cert: &str, msg: &[u8], sig: &[u8]) -> Result<(), String> {
            if alg != self.alg() || cert != self.cert() {
                return Err(format!("unknown key {alg}/{cert}"));
            }
            (self.sign(msg)? == sig)
                .then_some(())
                .ok_or_else(|| "signature does not verify".to_string())
        }
    }

    fn status(uid: u32) -> AuditEntry {
        AuditEntry {
            uid: Some(uid),
            gid: Some(100),
            pid: Some(7),
            role: Some(Role::Viewer),
            request: "status".into(),
            args: serde_json::json!({"cmd": "status"}),
            result: Outcome::Ok,
            message: None,
        }
    }

    /// Lines as the writer makes them: `n` status lines, a checkpoint after every
    /// `every` of them (and none at the end), signed with `key`.
    fn make(n: u64, every: u64, key: &TestKey) -> Vec<String> {
        let (mut seq, mut prev, mut out) = (0u64, GENESIS.to_string(), Vec::new());
        let mut push = |e: &AuditEntry, seq: &mut u64, prev: &mut String| {
            *seq += 1;
            let s = seal(*seq, *seq, prev, e).unwrap();
            *prev = s.full_hash;
            out.push(s.line);
        };
        for i in 0..n {
            push(&status(i as u32), &mut seq, &mut prev);
            if (i + 1) % every == 0 {
                let cp = checkpoint_entry(seq, &prev.clone(), Some(7), key).unwrap();
                push(&cp, &mut seq, &mut prev);
            }
        }
        out
    }

    /// Rewrites the chain from line index `from` on, as an attacker without the key
    /// can: every line's prev and hash recomputed, the content kept.
    fn rechain(lines: &mut [String], from: usize) {
        let mut prev = if from == 0 {
            GENESIS.to_string()
        } else {
            sm3_hex(lines[from - 1].as_bytes())
        };
        for l in lines.iter_mut().skip(from) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let old_prev = v["prev"].as_str().unwrap().to_string();
            let body = &l[..l.len() - 75];
            let body = body.replace(
                &format!("\"prev\":\"{old_prev}\""),
                &format!("\"prev\":\"{prev}\""),
            );
            let canonical = format!("{body}}}");
            *l = format!("{body},\"hash\":\"{}\"}}", sm3_hex(canonical.as_bytes()));
            prev = sm3_hex(l.as_bytes());
        }
    }

    fn write(dir: &Path, lines: &[String]) -> std::path::PathBuf {
        let p = dir.join("audit.log");
        std::fs::write(&p, format!("{}\n", lines.join("\n"))).unwrap();
        p
    }

    #[test]
    fn checkpoint_lines_are_format_three_and_verify() {
        let key = TestKey("node secret");
        let lines = make(7, 3, &key);
        assert_eq!(lines.len(), 9);
        assert!(
            lines[3].contains(r#""request":"audit-checkpoint""#),
            "{}",
            lines[3]
        );
        assert!(lines[3].contains(r#""v":3"#), "{}", lines[3]);
        assert!(
            lines[3].contains(r#""args":{"alg":"test-sm3-mac","cert":"c0ffee","head":""#),
            "{}",
            lines[3]
        );
        assert!(lines[3].contains(r#","lines":3,"sig":""#), "{}", lines[3]);
        let dir = tempfile::tempdir().unwrap();
        let r = verify_signed(&write(dir.path(), &lines), &key).unwrap();
        assert_eq!(r.chain.entries, 9);
        assert_eq!(r.checkpoints, 2);
        let last = r.last.unwrap();
        assert_eq!(
            (last.seq, last.line, last.file.as_str()),
            (8, 8, "audit.log")
        );
        assert_eq!(r.unsigned_tail, 1);
        assert_eq!(
            signed_message(3, "ab", "cd"),
            b"ferry audit checkpoint v3\nlines=3\nhead=ab\ncert=cd\n"
        );
    }

    #[test]
    fn a_rewritten_chain_fails_at_the_next_checkpoint() {
        let key = TestKey("node secret");
        let mut lines = make(9, 3, &key);
        // Line 2 (seq 2) now says uid 0; the chain recomputed from there on.
        lines[1] = lines[1].replace("\"uid\":1,", "\"uid\":0,");
        rechain(&mut lines, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &lines);
        // The chain alone is fooled ...
        assert_eq!(verify_chain(&path).unwrap().entries, 12);
        // ... the first checkpoint after the edit is not.
        let e = verify_signed(&path, &key).unwrap_err();
        let at = e.checkpoint().unwrap();
        assert_eq!((at.seq, at.line), (4, 4));
        assert!(
            matches!(e, CheckpointError::Signature { .. }),
            "the head no longer matches: {e}"
        );
        assert!(e.to_string().contains("it signed head"), "{e}");
        // The attacker fixes the checkpoint's head too: the signature fails.
        let head = sm3_hex(lines[2].as_bytes());
        let v: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
        let old = v["args"]["head"].as_str().unwrap().to_string();
        lines[3] = lines[3].replace(
            &format!("\"head\":\"{old}\""),
            &format!("\"head\":\"{head}\""),
        );
        rechain(&mut lines, 3);
        let path = write(dir.path(), &lines);
        let e = verify_signed(&path, &key).unwrap_err();
        assert!(matches!(e, CheckpointError::Signature { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("checkpoint at seq 4 (audit.log line 4): signature does not verify"),
            "{e}"
        );
        // Re-signed with another key: not the node's.
        let mut lines = make(9, 3, &key);
        lines[1] = lines[1].replace("\"uid\":1,", "\"uid\":0,");
        rechain(&mut lines, 1);
        let forged =
            checkpoint_entry(3, &sm3_hex(lines[2].as_bytes()), Some(7), &TestKey("guess")).unwrap();
        lines[3] = seal(4, 4, &sm3_hex(lines[2].as_bytes()), &forged)
            .unwrap()
            .line;
        rechain(&mut lines, 4);
        let e = verify_signed(&write(dir.path(), &lines), &key).unwrap_err();
        assert!(matches!(e, CheckpointError::Signature { .. }), "{e}");
    }

    #[test]
    fn an_edit_after_the_last_checkpoint_is_an_unsigned_tail() {
        let key = TestKey("node secret");
        let mut lines = make(8, 3, &key);
        // seq 9..10 follow the last checkpoint (seq 8): edited and rechained, they
        // verify, and the report says no signature covers them.
        lines[9] = lines[9].replace("\"uid\":7,", "\"uid\":0,");
        rechain(&mut lines, 9);
        let dir = tempfile::tempdir().unwrap();
        let r = verify_signed(&write(dir.path(), &lines), &key).unwrap();
        assert_eq!((r.checkpoints, r.unsigned_tail), (2, 2));
        // Truncated to just after a checkpoint: nothing unsigned.
        lines.truncate(8);
        let r = verify_signed(&write(dir.path(), &lines), &key).unwrap();
        assert_eq!((r.checkpoints, r.unsigned_tail), (2, 0));
        // No checkpoint at all (a format 2 log): everything is the unsigned tail.
        let plain: Vec<String> = make(4, 100, &key);
        let r = verify_signed(&write(dir.path(), &plain), &key).unwrap();
        assert_eq!((r.checkpoints, r.last, r.unsigned_tail), (0, None, 4));
    }

    #[test]
    fn checkpoints_verify_across_rotated_files() {
        let key = TestKey("node secret");
        let dir = tempfile::tempdir().unwrap();
        let mut lines = make(6, 3, &key); // seq 1..8, checkpoints at 4 and 8
        let first = rotated_name("audit.log", 1);
        let mut h = status(0);
        h.request = ROTATE_REQUEST.into();
        h.args = serde_json::json!({"prev_file": first, "prev_seq": 8});
        let header = seal(9, 9, &sm3_hex(lines[7].as_bytes()), &h).unwrap();
        let cp = checkpoint_entry(9, &header.full_hash, Some(7), &key).unwrap();
        let cp = seal(10, 10, &header.full_hash, &cp).unwrap();
        std::fs::write(dir.path().join(&first), format!("{}\n", lines.join("\n"))).unwrap();
        let active = write(dir.path(), &[header.line, cp.line]);
        let r = verify_signed(&active, &key).unwrap();
        assert_eq!((r.checkpoints, r.unsigned_tail), (3, 0));
        assert_eq!(
            r.last.unwrap().to_string(),
            "checkpoint at seq 10 (audit.log line 2)"
        );
        // An edit in the rotated file, rechained through both files: named there.
        lines[0] = lines[0].replace("\"uid\":0,", "\"uid\":9,");
        rechain(&mut lines, 0);
        std::fs::write(dir.path().join(&first), format!("{}\n", lines.join("\n"))).unwrap();
        let e = verify_signed(&active, &key).unwrap_err();
        // The rotated file's own chain holds; the active file no longer links to it.
        assert!(matches!(e, CheckpointError::Chain(_)), "{e}");
    }
}
