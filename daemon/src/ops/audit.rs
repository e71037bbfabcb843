//! The audit log writer: appends one hash-chained line per control request, durable
//! (`fdatasync`) before the response is sent, and continues the chain on reopen after
//! checking its tail.
//!
//! The line format, the canonical SM3 hashing and the verifier are ferry-api's
//! ([`ferry_api::audit`], which `ferryctl audit verify` uses without linking ferryd);
//! lines are built with its [`seal`], so there is one definition of the line hash.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use ferry_api::audit::{parse_line, seal, sm3_hex, split_lines};
use ferry_api::audit::{AuditEntry, AuditError, Outcome, GENESIS};

struct Tail {
    file: File,
    /// Bytes in the file (all complete, verified lines).
    len: u64,
    seq: u64,
    /// Full-text SM3 of the last line: the next line's `prev`.
    prev: String,
    /// Set when a failed append could not be rolled back: the tail is unknown.
    failed: Option<String>,
}

/// The append side. Thread-safe; each append is durable (fdatasync) when it returns.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

/// Reads the last `n` lines (or fewer) of a file that ends with a newline.
fn read_tail_lines(file: &mut File, len: u64, n: usize) -> std::io::Result<Vec<u8>> {
    let mut chunk = 64u64 << 10;
    loop {
        let start = len.saturating_sub(chunk);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::with_capacity((len - start) as usize);
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        // Newlines before the final one delimit whole lines.
        let newlines = buf[..buf.len().saturating_sub(1)]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        if start == 0 || newlines >= n {
            if start == 0 {
                return Ok(buf);
            }
            // Drop the partial first line.
            let cut = buf.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1);
            return Ok(buf[cut..].to_vec());
        }
        chunk *= 4;
    }
}

impl AuditLog {
    /// Opens (creating, mode 0600) the log and continues its chain. The tail — the last
    /// line's hash, its link to the line before, and a complete final line — must
    /// verify, or this refuses with the precise problem: appending to a broken chain
    /// would hide the break. Run `ferryctl audit verify` for the whole file.
    pub fn open(path: &Path) -> anyhow::Result<AuditLog> {
        use anyhow::Context;
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("audit log directory {}", dir.display()))?;
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("audit log {}", path.display()))?
            .len();
        // A crash in the middle of an append leaves a last line without its newline.
        // Like the journal's torn tail, it is cut (loudly, and recorded in the chain
        // below): that line was never made durable, so no answer went out after it.
        // Anything else that does not verify still refuses.
        let torn = cut_torn_line(&mut file, len)
            .with_context(|| format!("audit log {}: cutting a torn last line", path.display()))?;
        let len = len - torn;
        if torn > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = torn,
                "audit log: cut a torn last line (an append interrupted by a crash)"
            );
        }
        let (seq, prev) = chain_tail(&mut file, len, path)?;
        let log = AuditLog {
            path: path.to_path_buf(),
            tail: Mutex::new(Tail {
                file,
                len,
                seq,
                prev,
                failed: None,
            }),
        };
        if torn > 0 {
            log.append(AuditEntry {
                uid: None,
                gid: None,
                pid: Some(std::process::id() as i32),
                role: None,
                request: "audit-recovery".into(),
                args: serde_json::json!({ "torn_bytes_cut": torn }),
                result: Outcome::Ok,
                message: Some(format!(
                    "ferryd cut a torn last line of {torn} bytes at start-up"
                )),
            })?;
        }
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and fdatasyncs it. On a write failure the partial line is
    /// truncated away; if even that fails, every later append fails too.
    pub fn append(&self, entry: AuditEntry) -> anyhow::Result<()> {
        let mut t = self.tail.lock();
        if let Some(why) = &t.failed {
            anyhow::bail!(
                "audit log {} is unusable since an earlier failure: {why}",
                self.path.display()
            );
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let seq = t.seq + 1;
        let sealed = seal(seq, unix_ns, &t.prev, &entry)?;
        let mut line = sealed.line;
        line.push('\n');
        let res = t
            .file
            .write_all(line.as_bytes())
            .and_then(|()| t.file.sync_data());
        if let Err(e) = res {
            let len = t.len;
            if let Err(e2) = t.file.set_len(len).and_then(|()| t.file.sync_data()) {
                t.failed = Some(format!("{e}; rolling back the partial line failed: {e2}"));
            }
            return Err(anyhow::anyhow!(
                "appending to audit log {}: {e}",
                self.path.display()
            ));
        }
        t.len += line.len() as u64;
        t.seq = seq;
        t.prev = sealed.full_hash;
        Ok(())
    }
}

/// The chain position to continue from: `(seq, hash)` of the last line, after checking
/// that line's own hash, its link to the line before and that it is complete. Refuses
/// with the precise problem otherwise: appending to a broken chain would hide the break.
fn chain_tail(file: &mut File, len: u64, path: &Path) -> anyhow::Result<(u64, String)> {
    use anyhow::Context;
    Ok(if len == 0 {
        (0, GENESIS.to_string())
    } else {
        let refuse = |e: AuditError| {
            anyhow::anyhow!(
                "audit log {}: refusing to append: its tail does not verify: {e} (run `ferryctl audit verify --file {}`; move the log aside to start a new chain)",
                path.display(),
                path.display()
            )
        };
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        let tail = read_tail_lines(file, len, 2)
            .with_context(|| format!("reading audit log {}", path.display()))?;
        // Line numbers here are counted from the end; re-count for the message.
        let total_lines = count_newlines(file, len)? + u64::from(last[0] != b'\n');
        let lines = match split_lines(&tail) {
            Ok(l) => l,
            Err(_) => {
                let bytes =
                    tail.len() - tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                return Err(refuse(AuditError::Truncated {
                    line: total_lines,
                    bytes,
                }));
            }
        };
        let lines = &lines[lines.len().saturating_sub(2)..];
        let first_no = total_lines + 1 - lines.len() as u64;
        let mut parsed = Vec::new();
        for (k, l) in lines.iter().enumerate() {
            parsed.push(parse_line(first_no + k as u64, l).map_err(refuse)?);
        }
        let (c, ok) = parsed.last().expect("a non-empty file has a line");
        if !ok {
            return Err(refuse(AuditError::Edited {
                line: total_lines,
                seq: c.seq,
            }));
        }
        let (exp_seq, exp_prev) = if lines.len() == 2 {
            (parsed[0].0.seq + 1, sm3_hex(lines[0]))
        } else {
            (1, GENESIS.to_string())
        };
        if c.seq != exp_seq || c.prev != exp_prev {
            return Err(refuse(AuditError::Broken {
                line: total_lines,
                seq: c.seq,
                why: format!(
                    "expected seq {exp_seq} and prev = hash of the line before; found seq {} and a prev that does not match",
                    c.seq
                ),
            }));
        }
        (c.seq, sm3_hex(lines[lines.len() - 1]))
    })
}

/// Truncates (durably) a last line that lacks its newline; returns the bytes cut.
fn cut_torn_line(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(0);
        }
        if let Some(p) = chunk.iter().rposition(|&b| b == b'\n') {
            return cut_to(file, start + p as u64 + 1, len);
        }
        end = start;
    }
    cut_to(file, 0, len)
}

fn cut_to(file: &mut File, keep: u64, len: u64) -> std::io::Result<u64> {
    file.set_len(keep)?;
    file.sync_data()?;
    Ok(len - keep)
}

fn count_newlines(file: &mut File, len: u64) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut r = Read::by_ref(file).take(len);
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::audit::verify;
    use ferry_api::control::Role;

    fn entry(i: u32) -> AuditEntry {
        AuditEntry {
            uid: Some(1000 + i),
            gid: Some(100),
            pid: Some(4242),
            role: Some(Role::Viewer),
            request: "status".into(),
            args: serde_json::json!({"cmd": "status"}),
            result: Outcome::Ok,
            message: None,
        }
    }

    /// A log of `n` entries; returns its lines (without newlines).
    fn make(n: u32) -> (tempfile::TempDir, PathBuf, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.append(entry(i)).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = text.lines().map(str::to_string).collect();
        (dir, path, lines)
    }

    fn join(lines: &[String]) -> Vec<u8> {
        let mut s = lines.join("\n");
        s.push('\n');
        s.into_bytes()
    }

    #[test]
    fn chain_continues_across_reopen() {
        let (_d, path, lines) = make(3);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains(&format!("\"prev\":\"{GENESIS}\"")));
        assert!(lines[1].contains(&format!("\"prev\":\"{}\"", sm3_hex(lines[0].as_bytes()))));
        let log = AuditLog::open(&path).unwrap();
        log.append(entry(9)).unwrap();
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        log.append(entry(10)).unwrap();
        let r = verify(&path).unwrap();
        assert_eq!(r.entries, 5);
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("{\"seq\":5,"), "{last}");
        assert!(last.ends_with(&format!("\"hash\":\"{}\"}}", r.last_hash)));
        assert!(last.contains("\"role\":\"viewer\""));
        assert!(last.contains("\"result\":\"ok\""));
    }

    /// Issue 16 path 9: a torn last line (a crash mid-append) is cut at start-up, like
    /// the journal's torn tail, and the cut is recorded in the chain; it no longer
    /// stops ferryd from starting.
    #[test]
    fn a_torn_last_line_is_cut_recorded_and_the_chain_goes_on() {
        let (_d, path, lines) = make(4);
        let data = std::fs::read(&path).unwrap();
        let cut = data.len() - 40;
        std::fs::write(&path, &data[..cut]).unwrap();
        let e = verify(&path).unwrap_err();
        assert!(matches!(e, AuditError::Truncated { line: 4, .. }), "{e}");
        let log = AuditLog::open(&path).unwrap();
        log.append(entry(9)).unwrap();
        drop(log);
        let r = verify(&path).unwrap();
        assert_eq!(
            r.entries, 5,
            "3 whole lines, the recovery record, the new one"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let now: Vec<&str> = text.lines().collect();
        assert_eq!(
            now[..3],
            lines[..3].iter().map(String::as_str).collect::<Vec<_>>()[..]
        );
        // The cut kept the first 3 lines and the 4th's first bytes went.
        let torn = lines[3].len() + 1 - 40;
        assert!(
            now[3].contains("\"request\":\"audit-recovery\"")
                && now[3].contains(&format!("\"torn_bytes_cut\":{torn}")),
            "{}",
            now[3]
        );
        // A file that is nothing but a torn line starts a new chain.
        std::fs::write(&path, b"{\"seq\":1,\"ti").unwrap();
        AuditLog::open(&path).unwrap();
        assert_eq!(verify(&path).unwrap().entries, 1);
    }

    #[test]
    fn open_refuses_an_edited_tail() {
        let (_d, path, mut lines) = make(3);
        lines[2] = lines[2].replace("\"pid\":4242", "\"pid\":1");
        std::fs::write(&path, join(&lines)).unwrap();
        let e = AuditLog::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 3 (seq 3): hash mismatch"), "{e}");
        // A removed last-but-one line is a broken link at the tail.
        let (_d, path, mut lines) = make(4);
        lines.remove(2);
        std::fs::write(&path, join(&lines)).unwrap();
        let e = AuditLog::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 3 (seq 4): chain broken"), "{e}");
    }

    #[test]
    fn concurrent_appends_keep_the_chain() {
        let (_d, path, _) = make(0);
        let log = std::sync::Arc::new(AuditLog::open(&path).unwrap());
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        log.append(entry(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(verify(&path).unwrap().entries, 40);
    }
}
