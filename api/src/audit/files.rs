//! The files a rotated audit log is made of, and the chain checked across them.
//!
//! The active file is the configured path (`audit.log`); rotation renames it to
//! `audit.log.NNNNNN` (a counter, six digits or more, that only grows) and starts a new
//! active file whose first line, a rotation header ([`super::ROTATE_REQUEST`]), carries
//! on the chain: its `seq` follows the previous file's last one, its `prev` is that
//! line's full-text SM3, and its `args` name the previous file (`prev_file`,
//! `prev_seq`). [`verify_chain`] reads the files oldest first, one at a time (memory
//! is bounded by one file), and checks every line and every link between files, so a
//! deleted, emptied, edited or cut file in the middle is named.
use std::path::{Path, PathBuf};

use super::{verify_file, AuditError, Intents, OpenIntent, RotatedFrom, Start, GENESIS};

/// Name of rotated file number `n` of the log whose active file is `active_name`.
pub fn rotated_name(active_name: &str, n: u64) -> String {
    format!("{active_name}.{n:06}")
}

/// The rotation number of `name` if it is a rotated file of `active_name`.
pub fn rotation_number(active_name: &str, name: &str) -> Option<u64> {
    let digits = name.strip_prefix(active_name)?.strip_prefix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The active file's name, as rotated names are built from it.
pub fn active_name(active: &Path) -> Result<String, AuditError> {
    active
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| AuditError::Io {
            path: active.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an audit log path must end in a UTF-8 file name",
            ),
        })
}

/// The rotated files of the log whose active file is `active`, oldest first.
pub fn rotated_files(active: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let name = active_name(active)?;
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |source| AuditError::Io {
        path: dir.clone(),
        source,
    };
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io(e)),
    };
    for e in entries {
        let e = e.map_err(io)?;
        if let Some(n) = e
            .file_name()
            .to_str()
            .and_then(|f| rotation_number(&name, f))
        {
            found.push((n, e.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The files of the log whose active file is `active`, oldest first: the rotated
/// files, then the active file (when it exists, or when there is nothing else).
pub fn log_paths(active: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut paths: Vec<PathBuf> = rotated_files(active)?.into_iter().map(|(_, p)| p).collect();
    if paths.is_empty() || active.exists() {
        paths.push(active.to_path_buf());
    }
    Ok(paths)
}

/// One file of a verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    pub name: String,
    pub entries: u64,
    /// First and last seq (`None`: empty).
    pub seqs: Option<(u64, u64)>,
}

/// A rotated log, verified as one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Oldest first; the active file last (when it exists).
    pub files: Vec<FileSummary>,
    /// Lines in all files.
    pub entries: u64,
    /// `hash` of the chain's last line: record it elsewhere to detect a removed tail.
    pub last_hash: String,
    /// The oldest file present starts with a rotation header: the files before it were
    /// removed (by `keep_files`, or by hand) and are not checked.
    pub continues_from: Option<RotatedFrom>,
    /// Intents without an outcome, oldest first.
    pub open_intents: Vec<OpenIntent>,
}

/// Verifies the log whose active file is `active`, with its rotated files: each file's
/// chain, and each file's first line against the last line of the file before it.
/// Errors name the file. The active file may be missing when rotated files exist (a
/// crash between rotation's rename and the new file; ferryd recreates it).
pub fn verify_chain(active: &Path) -> Result<ChainReport, AuditError> {
    let paths = log_paths(active)?;
    let mut intents = Intents::default();
    let mut start = Start::Fresh;
    let mut report = ChainReport {
        files: Vec::new(),
        entries: 0,
        last_hash: GENESIS.to_string(),
        continues_from: None,
        open_intents: Vec::new(),
    };
    for path in &paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data = std::fs::read(path).map_err(|source| AuditError::Io {
            path: path.clone(),
            source,
        })?;
        intents.file.clone_from(&name);
        let f = verify_file(&data, &start, &mut intents).map_err(|e| AuditError::InFile {
            file: name.clone(),
            source: Box::new(e),
        })?;
        if report.files.is_empty() {
            report.continues_from = f.continues_from.clone();
        }
        report.entries += f.entries;
        if let (Some(full), Some((_, last))) = (f.last_full, f.seqs) {
            report.last_hash = f.last_hash;
            start = Start::After {
                seq: last,
                full_hash: full,
                file: name.clone(),
            };
        }
        report.files.push(FileSummary {
            name,
            entries: f.entries,
            seqs: f.seqs,
        });
    }
    report.open_intents = intents.open.into_values().collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::super::{seal, seal_with, AuditEntry, Outcome, ROTATE_REQUEST};
    use super::*;

    fn entry(request: &str, result: Outcome) -> AuditEntry {
        AuditEntry {
            uid: Some(1000),
            gid: Some(1000),
            pid: Some(7),
            role: None,
            request: request.into(),
            args: serde_json::json!({ "cmd": request }),
            result,
            message: None,
        }
    }

    /// Writes a rotated log as ferryd's writer lays it out: `files` files of `per` lines
    /// each (the first line of every file after the first is its rotation header), the
    /// last one active. `spec(seq)` may make a line an intent or an outcome.
    fn make_set(
        dir: &Path,
        files: u64,
        per: u64,
        spec: impl Fn(u64) -> (Outcome, Option<u64>),
    ) -> PathBuf {
        let active = dir.join("audit.log");
        let (mut seq, mut prev) = (0u64, GENESIS.to_string());
        for f in 1..=files {
            let name = if f == files {
                "audit.log".to_string()
            } else {
                rotated_name("audit.log", f)
            };
            let mut text = String::new();
            for k in 0..per {
                seq += 1;
                let s = if k == 0 && f > 1 {
                    let mut e = entry(ROTATE_REQUEST, Outcome::Ok);
                    let before = rotated_name("audit.log", f - 1);
                    e.args = serde_json::json!({"prev_file": before, "prev_seq": seq - 1});
                    seal(seq, seq, &prev, &e).unwrap()
                } else {
                    let (result, intent) = spec(seq);
                    seal_with(seq, seq, &prev, &entry("pause", result), intent).unwrap()
                };
                prev = s.full_hash;
                text.push_str(&s.line);
                text.push('\n');
            }
            std::fs::write(dir.join(name), text).unwrap();
        }
        active
    }

    fn plain(_: u64) -> (Outcome, Option<u64>) {
        (Outcome::Ok, None)
    }

    #[test]
    fn a_rotated_log_verifies_as_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let active = make_set(dir.path(), 3, 4, plain);
        let r = verify_chain(&active).unwrap();
        assert_eq!(r.entries, 12);
        let names: Vec<_> = r.files.iter().map(|f| (f.name.as_str(), f.seqs)).collect();
        assert_eq!(
            names,
            [
                ("audit.log.000001", Some((1, 4))),
                ("audit.log.000002", Some((5, 8))),
                ("audit.log", Some((9, 12))),
            ]
        );
        assert_eq!(r.continues_from, None);
        let last = std::fs::read_to_string(&active).unwrap();
        let last = last.lines().last().unwrap();
        assert!(last.ends_with(&format!("\"hash\":\"{}\"}}", r.last_hash)));
        // Without rotated files, the active file alone; a missing log is an error.
        let one = tempfile::tempdir().unwrap();
        let active = make_set(one.path(), 1, 3, plain);
        assert_eq!(verify_chain(&active).unwrap().files.len(), 1);
        let e = verify_chain(&one.path().join("other.log")).unwrap_err();
        assert!(matches!(e, AuditError::Io { .. }), "{e}");
    }

    #[test]
    fn a_removed_middle_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let active = make_set(dir.path(), 4, 3, plain);
        std::fs::remove_file(dir.path().join("audit.log.000002")).unwrap();
        let e = verify_chain(&active).unwrap_err();
        assert_eq!(
            e.to_string(),
            "audit.log.000003: line 1: does not continue audit.log.000001: it continues audit.log.000002 (seq 6), which is missing: a whole file was removed between audit.log.000001 and this one"
        );
        assert_eq!(e.line(), Some(1));
    }

    #[test]
    fn an_edited_or_rewritten_middle_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let active = make_set(dir.path(), 3, 4, plain);
        let mid = dir.path().join("audit.log.000002");
        let good = std::fs::read_to_string(&mid).unwrap();
        // Line 2 of the file (seq 6) now claims uid 0.
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[1] = lines[1].replacen("\"uid\":1000", "\"uid\":0", 1);
        std::fs::write(&mid, format!("{}\n", lines.join("\n"))).unwrap();
        let e = verify_chain(&active).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("audit.log.000002: line 2 (seq 6): hash mismatch"),
            "{e}"
        );
        // Its last line cut off: the file itself still verifies, the next one's header
        // does not link to it.
        let mut lines: Vec<&str> = good.lines().collect();
        lines.pop();
        std::fs::write(&mid, format!("{}\n", lines.join("\n"))).unwrap();
        let e = verify_chain(&active).unwrap_err();
        assert_eq!(
            e.to_string(),
            "audit.log: line 1: does not continue audit.log.000002: its header links to seq 8 of audit.log.000002, whose last line does not match: audit.log.000002 was edited or cut at its end"
        );
        // Emptied.
        std::fs::write(&mid, "").unwrap();
        let e = verify_chain(&active).unwrap_err();
        assert!(e.to_string().starts_with("audit.log: line 1: does not continue audit.log.000001: it continues audit.log.000002"), "{e}");
    }

    #[test]
    fn pruned_files_leave_a_chain_that_starts_at_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let active = make_set(dir.path(), 4, 3, plain);
        std::fs::remove_file(dir.path().join("audit.log.000001")).unwrap();
        std::fs::remove_file(dir.path().join("audit.log.000002")).unwrap();
        let r = verify_chain(&active).unwrap();
        assert_eq!(r.entries, 6);
        let from = r.continues_from.unwrap();
        assert_eq!(
            (from.seq, from.prev_file.as_str(), from.prev_seq),
            (7, "audit.log.000002", 6)
        );
    }

    #[test]
    fn open_intents_are_found_across_files() {
        let dir = tempfile::tempdir().unwrap();
        // Seq 2 and 3 are intents; 3's outcome is seq 6, in the next file (rotation
        // between an intent and its outcome); 2's never came. Seq 11 is open too.
        let active = make_set(dir.path(), 3, 4, |seq| match seq {
            2 | 3 | 11 => (Outcome::Intent, None),
            6 => (Outcome::Ok, Some(3)),
            _ => (Outcome::Ok, None),
        });
        let r = verify_chain(&active).unwrap();
        let open: Vec<_> = r
            .open_intents
            .iter()
            .map(|o| (o.seq, o.file.as_str()))
            .collect();
        assert_eq!(open, [(2, "audit.log.000001"), (11, "audit.log")]);
    }

    #[test]
    fn rotated_names_sort_and_parse() {
        assert_eq!(rotated_name("audit.log", 7), "audit.log.000007");
        assert_eq!(rotated_name("audit.log", 1_234_567), "audit.log.1234567");
        assert_eq!(rotation_number("audit.log", "audit.log.000007"), Some(7));
        assert_eq!(
            rotation_number("audit.log", "audit.log.1234567"),
            Some(1_234_567)
        );
        for not in [
            "audit.log",
            "audit.log.",
            "audit.log.1x",
            "audit.logx.1",
            "a.log.1",
        ] {
            assert_eq!(rotation_number("audit.log", not), None, "{not}");
        }
    }
}
