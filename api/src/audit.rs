//! The tamper-evident audit log of control requests: its line format, the canonical
//! SM3 line hash and the chain verifier (`ferryctl audit verify`). ferryd's writer
//! (append, fdatasync, rotation, reopen) builds every line with [`seal`] or
//! [`seal_with`], so the line format and its hash have one definition. The byte and
//! line layout, the format versions, rotation and the crash cases are in `api/AUDIT.md`;
//! the set of files a rotated log is made of, and its verification across files, is
//! [`files`].
//!
//! One JSON object per line (format 3, `"v":3`; format 1 lines have no `v`, `intent`;
//! format 2 is format 3 without checkpoint lines):
//!
//! ```text
//! {"seq":1,"time":"2025-01-02T03:04:05.123456789Z","unix_ns":…,"uid":1000,"gid":1000,
//!  "pid":4242,"role":"viewer","request":"status","args":{"cmd":"status"},"result":"ok",
//!  "message":null,"v":3,"prev":"000…000","hash":"…"}
//! ```
//!
//! The lines form a hash chain (SM3, GB/T 32905-2016):
//! * `seq` counts 1, 2, 3, … with no gap, across rotated files too;
//! * `prev` is the hex SM3 of the previous line's full text (without its newline), or 64
//!   zeros on the first line of the chain;
//! * `hash` is the hex SM3 of the line's canonical content: the line's exact bytes with
//!   the final `,"hash":"…"` member removed (so it covers every other field, `prev`
//!   included). `hash` is always the last member.
//!
//! A state-changing request is two lines: an `intent` line (`"result":"intent"`) made
//! durable before the action, and its outcome (`ok` or `error`, with `"intent":SEQ`
//! naming the intent line) after it. An intent without an outcome is an action that a
//! crash interrupted; the verifier reports such intents.
//!
//! Hashing exact bytes (not a re-serialisation) makes verification independent of JSON
//! key order or number formatting. The chain is unkeyed: it detects edits, removals,
//! insertions and reordering by anyone who does not rewrite every later line too, and a
//! removed *tail* is only detectable against a recorded `(entries, last hash)` pair —
//! which is what `ferryctl audit verify` prints, for shipping off-host. Format 3 adds
//! the key: [`checkpoint`] lines signed by the node's certificate key, so a chain
//! rewritten before a checkpoint is detected too.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sm3::{Digest, Sm3};

use crate::control::{Request, Role};
use crate::timefmt::civil_from_days;

pub mod checkpoint;
pub mod files;

/// The line format ferryd writes (`"v":3`: format 2 plus signed checkpoint lines,
/// [`checkpoint`]). Format 1 (no `v`) and format 2 lines still verify.
pub const FORMAT_VERSION: u32 = 3;

/// `request` of the first line of a file that rotation started: it continues the chain
/// of the previous file, named in its `args` (`prev_file`, `prev_seq`).
pub const ROTATE_REQUEST: &str = "audit-rotate";

/// Whether a request changes the node (its role, data, recovery points, exports or
/// replication): such a request is audited as an intent, made durable before it is
/// carried out, and an outcome. Exhaustive on purpose: a new request must say.
pub fn changes_state(req: &Request) -> bool {
    match req {
        Request::Status
        | Request::ListBookmarks
        | Request::ListPits { .. }
        // Compares digests with the standbys; it writes nothing.
        | Request::Verify { .. }
        // Only recorded: see [`is_record`].
        | Request::DrillReport(_) => false,
        Request::BookmarkCreate { .. }
        | Request::PitExport { .. }
        | Request::PitUnexport { .. }
        | Request::Pause
        | Request::Resume
        | Request::Promote { .. }
        | Request::Demote
        | Request::Switchover { .. }
        | Request::Rollback { .. }
        | Request::Reload => true,
    }
}

/// Whether a request that changes nothing exists to be recorded (a drill's result): its
/// one line is fsynced before the answer, like an outcome, not batched.
pub fn is_record(req: &Request) -> bool {
    matches!(req, Request::DrillReport(_))
}

/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Denied,
    Error,
    /// A state-changing request about to be carried out; its outcome line follows.
    Intent,
}

/// What the control socket records about one request.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Peer credentials (`SO_PEERCRED`); `None` when they could not be read.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
    /// The role the peer resolved to; `None`: no role.
    pub role: Option<Role>,
    /// The request type (`cmd`), or `"?"` when the request could not be parsed.
    pub request: String,
    /// The request as received (JSON), or the raw text when it was not JSON.
    pub args: serde_json::Value,
    pub result: Outcome,
    /// The error or denial message.
    pub message: Option<String>,
}

#[derive(Serialize)]
struct Record<'a> {
    seq: u64,
    time: String,
    unix_ns: u64,
    uid: Option<u32>,
    gid: Option<u32>,
    pid: Option<i32>,
    role: Option<Role>,
    request: &'a str,
    args: &'a serde_json::Value,
    result: Outcome,
    message: Option<&'a str>,
    v: u32,
    /// On an outcome line: the `seq` of its intent line.
    #[serde(skip_serializing_if = "Option::is_none")]
    intent: Option<u64>,
    prev: &'a str,
}

/// The chain fields of a line, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Chain {
    pub seq: u64,
    /// Hex SM3 of the previous line's full text ([`GENESIS`] on the first line).
    pub prev: String,
    /// Hex SM3 of this line's canonical content.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of entries (lines).
    pub entries: u64,
    /// `hash` of the last entry (`GENESIS` for an empty log): record it elsewhere to
    /// detect a removed tail later.
    pub last_hash: String,
    /// The file starts with a rotation header whose previous file was not verified
    /// here: the chain is checked from that header on.
    pub continues_from: Option<RotatedFrom>,
    /// Intents without an outcome, oldest first: actions a crash interrupted (or, in
    /// the newest lines, actions still running when the log was read).
    pub open_intents: Vec<OpenIntent>,
}

/// What a rotation header says about the file before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotatedFrom {
    /// Seq of the header line itself.
    pub seq: u64,
    /// Name (no directory) of the previous file.
    pub prev_file: String,
    /// Seq of the previous file's last line.
    pub prev_seq: u64,
}

/// An intent line with no outcome line after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenIntent {
    pub seq: u64,
    pub request: String,
    pub time: String,
    /// The file it is in (set by [`files::verify_chain`]; empty for one file).
    pub file: String,
}

/// A verification failure. Line numbers are 1-based; each variant names the first bad
/// line.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: incomplete last line ({bytes} bytes, no newline): the log was truncated mid-line or a write was interrupted")]
    Truncated { line: u64, bytes: usize },
    #[error("line {line}: not an audit record: {reason}")]
    Malformed { line: u64, reason: String },
    #[error("line {line} (seq {seq}): hash mismatch: the line was edited after it was written")]
    Edited { line: u64, seq: u64 },
    #[error("line {line} (seq {seq}): {missing} line(s) removed before this line (expected seq {expected}; prev does not match {after})")]
    Removed {
        line: u64,
        seq: u64,
        expected: u64,
        missing: u64,
        after: String,
    },
    #[error("line {line} (seq {seq}): inserted line: {why}")]
    Inserted { line: u64, seq: u64, why: String },
    #[error("line {line} (seq {seq}): lines reordered: expected seq {expected} here; this line chains to line {chains_to}{found}")]
    Reordered {
        line: u64,
        seq: u64,
        expected: u64,
        chains_to: u64,
        found: String,
    },
    #[error("line {line} (seq {seq}): chain broken: {why}")]
    Broken { line: u64, seq: u64, why: String },
    #[error("line {line} (seq {seq}): outcome of seq {intent}, which is not an intent awaiting its outcome")]
    Unpaired { line: u64, seq: u64, intent: u64 },
    /// The first line of a rotated-to file does not continue the file before it.
    #[error("line 1: does not continue {prev_file}: {why}")]
    Link { prev_file: String, why: String },
    /// A problem inside one file of a rotated log.
    #[error("{file}: {source}")]
    InFile {
        file: String,
        source: Box<AuditError>,
    },
}

impl AuditError {
    /// The first bad line (1-based), if the error is about a line.
    pub fn line(&self) -> Option<u64> {
        match self {
            AuditError::Io { .. } => None,
            AuditError::Link { .. } => Some(1),
            AuditError::InFile { source, .. } => source.line(),
            AuditError::Truncated { line, .. }
            | AuditError::Unpaired { line, .. }
            | AuditError::Malformed { line, .. }
            | AuditError::Edited { line, .. }
            | AuditError::Removed { line, .. }
            | AuditError::Inserted { line, .. }
            | AuditError::Reordered { line, .. }
            | AuditError::Broken { line, .. } => Some(*line),
        }
    }
}

/// Hex SM3 of `data`: a line's canonical content gives its `hash`, its full text the
/// next line's `prev`.
pub fn sm3_hex(data: &[u8]) -> String {
    hex::encode(Sm3::digest(data))
}

/// Checks a line's own hash; returns its chain fields and whether the hash holds.
/// `line_no` (1-based) is for the error.
pub fn parse_line(line_no: u64, text: &[u8]) -> Result<(Chain, bool), AuditError> {
    let bad = |reason: String| AuditError::Malformed {
        line: line_no,
        reason,
    };
    let s = std::str::from_utf8(text).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    if s.is_empty() {
        return Err(bad("empty line".into()));
    }
    let chain: Chain = serde_json::from_str(s).map_err(|e| bad(format!("{e}")))?;
    // Byte offsets, not `str` slices: the suffix position may fall inside a
    // multi-byte character of a forged line, and slicing a `str` there panics.
    let suffix_at = text.len().checked_sub(HASH_SUFFIX_LEN);
    let Some(suffix) = suffix_at.map(|at| &text[at..]) else {
        return Err(bad("`hash` is not the last member".into()));
    };
    if !suffix.starts_with(b",\"hash\":\"") || !suffix.ends_with(b"\"}") {
        return Err(bad("`hash` is not the last member".into()));
    }
    if chain.prev.len() != 64 || !chain.prev.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("`prev` is not 64 hex digits".into()));
    }
    let mut canonical = Vec::with_capacity(s.len());
    canonical.extend_from_slice(&text[..text.len() - HASH_SUFFIX_LEN]);
    canonical.push(b'}');
    let ok = sm3_hex(&canonical) == chain.hash
        && suffix[9..HASH_SUFFIX_LEN - 2] == *chain.hash.as_bytes();
    Ok((chain, ok))
}

/// Splits into lines; a last line without its newline is an error (truncation).
pub fn split_lines(data: &[u8]) -> Result<Vec<&[u8]>, AuditError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let last = lines.pop().unwrap_or_default();
    if !last.is_empty() {
        return Err(AuditError::Truncated {
            line: lines.len() as u64 + 1,
            bytes: last.len(),
        });
    }
    Ok(lines)
}

/// Verifies one log file. An empty file is a valid empty log; a missing file is an
/// error (an audit log that vanished is not "clean"). A file that starts with a
/// rotation header verifies from that header on; [`files::verify_chain`] checks a
/// rotated log's files together.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let data = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    verify_bytes(&data)
}

/// [`verify`] on the log's contents.
pub fn verify_bytes(data: &[u8]) -> Result<VerifyReport, AuditError> {
    let mut intents = Intents::default();
    let f = verify_file(data, &Start::Fresh, &mut intents)?;
    Ok(VerifyReport {
        entries: f.entries,
        last_hash: f.last_hash,
        continues_from: f.continues_from,
        open_intents: intents.open.into_values().collect(),
    })
}

/// Where a file's chain is expected to start.
#[derive(Debug, Clone)]
pub enum Start {
    /// The first file verified: at the genesis (seq 1, [`GENESIS`]), or at a genuine
    /// rotation header (the files before it are not checked).
    Fresh,
    /// Right after the last line of the previous file.
    After {
        /// Seq of that line.
        seq: u64,
        /// Its full-text SM3.
        full_hash: String,
        /// That file's name (no directory).
        file: String,
    },
}

/// What verifying one file found.
#[derive(Debug, Clone)]
pub struct FileState {
    pub entries: u64,
    /// Seq of the first and the last line (`None` for an empty file).
    pub seqs: Option<(u64, u64)>,
    /// `hash` of the last line ([`GENESIS`] when the file is empty).
    pub last_hash: String,
    /// Full-text SM3 of the last line: the next file's first `prev`.
    pub last_full: Option<String>,
    pub continues_from: Option<RotatedFrom>,
}

/// Intents seen without an outcome yet, carried from file to file.
#[derive(Debug, Default)]
pub struct Intents {
    /// By seq.
    pub open: BTreeMap<u64, OpenIntent>,
    /// Seq of the first line verified: an outcome may name an intent before it (in a
    /// file removed by rotation), never an unknown one after it.
    first_seq: Option<u64>,
    /// The file being verified, recorded in its open intents.
    pub file: String,
}

impl Intents {
    /// Records line `line` (`c`, `m`), which is linked and genuine.
    fn note(&mut self, line: u64, c: &Chain, m: &LineMeta) -> Result<(), AuditError> {
        self.first_seq.get_or_insert(c.seq);
        if m.result == Some(Outcome::Intent) {
            self.open.insert(
                c.seq,
                OpenIntent {
                    seq: c.seq,
                    request: m.request.clone(),
                    time: m.time.clone(),
                    file: self.file.clone(),
                },
            );
        }
        if let Some(intent) = m.intent {
            let before_start = self.first_seq.is_some_and(|f| intent < f);
            if self.open.remove(&intent).is_none() && !before_start {
                return Err(AuditError::Unpaired {
                    line,
                    seq: c.seq,
                    intent,
                });
            }
        }
        Ok(())
    }
}

/// The members of a line beyond its chain fields, parsed. Lenient: a member of the
/// wrong type reads as absent, so that an edited line is reported by its hash (which
/// it fails) rather than as malformed.
#[derive(Debug, Clone, Default)]
pub struct LineMeta {
    /// Format version; 1 for lines written before `v` existed.
    pub v: u32,
    pub request: String,
    pub time: String,
    pub result: Option<Outcome>,
    /// On an outcome line, the seq of its intent line.
    pub intent: Option<u64>,
    pub args: serde_json::Value,
}

#[derive(Deserialize)]
struct RawMeta {
    #[serde(default)]
    v: serde_json::Value,
    #[serde(default)]
    request: serde_json::Value,
    #[serde(default)]
    time: serde_json::Value,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    intent: serde_json::Value,
    #[serde(default)]
    args: serde_json::Value,
}

impl LineMeta {
    /// Parses a line that [`parse_line`] accepted.
    pub fn parse(line_no: u64, text: &[u8]) -> Result<LineMeta, AuditError> {
        let raw: RawMeta = serde_json::from_slice(text).map_err(|e| AuditError::Malformed {
            line: line_no,
            reason: format!("{e}"),
        })?;
        let text = |v: serde_json::Value| v.as_str().map(str::to_string).unwrap_or_default();
        Ok(LineMeta {
            v: raw
                .v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(1),
            request: text(raw.request),
            time: text(raw.time),
            result: serde_json::from_value(raw.result).ok(),
            intent: raw.intent.as_u64(),
            args: raw.args,
        })
    }

    /// What a rotation header says about the previous file; `None` for other lines.
    pub fn rotated_from(&self, seq: u64) -> Option<RotatedFrom> {
        if self.v < 2 || self.request != ROTATE_REQUEST {
            return None;
        }
        Some(RotatedFrom {
            seq,
            prev_file: self.args.get("prev_file")?.as_str()?.to_string(),
            prev_seq: self.args.get("prev_seq")?.as_u64()?,
        })
    }
}

/// Verifies one file's lines, starting where `start` says; intents and outcomes are
/// paired through `intents`, which carries open intents to the next file.
pub fn verify_file(
    data: &[u8],
    start: &Start,
    intents: &mut Intents,
) -> Result<FileState, AuditError> {
    let lines = split_lines(data)?;
    let mut parsed = Vec::with_capacity(lines.len());
    let mut metas = Vec::with_capacity(lines.len());
    let mut first_malformed = None;
    for (i, l) in lines.iter().enumerate() {
        let line_no = i as u64 + 1;
        match parse_line(line_no, l).and_then(|p| Ok((p, LineMeta::parse(line_no, l)?))) {
            Ok((p, m)) => {
                parsed.push(p);
                metas.push(m);
            }
            Err(e) => {
                first_malformed = Some(e);
                break;
            }
        }
    }
    // Full-text hash of every parsed line, for "where does this prev point".
    let full: Vec<String> = lines[..parsed.len()].iter().map(|l| sm3_hex(l)).collect();
    let by_full: HashMap<&str, usize> = full
        .iter()
        .enumerate()
        .map(|(i, h)| (h.as_str(), i))
        .collect();
    let file = ParsedLog {
        parsed: &parsed,
        full: &full,
        by_full: &by_full,
    };
    let (first_seq, first_prev, continues_from) = expected_start(start, &parsed, &metas)?;
    for i in 0..parsed.len() {
        let line = i as u64 + 1;
        let (c, hash_ok) = &parsed[i];
        let (exp_seq, exp_prev) = match i {
            0 => (first_seq, first_prev.as_str()),
            _ => (parsed[i - 1].0.seq + 1, full[i - 1].as_str()),
        };
        let linked = c.seq == exp_seq && c.prev == exp_prev;
        if !linked {
            if i == 0 {
                if let Start::After { file: prev, .. } = start {
                    return Err(link_error(prev, c, &metas[0], *hash_ok));
                }
            }
            return Err(file.unlinked(i, exp_seq, exp_prev));
        }
        if !hash_ok {
            return Err(AuditError::Edited { line, seq: c.seq });
        }
        intents.note(line, c, &metas[i])?;
    }
    if let Some(e) = first_malformed {
        return Err(e);
    }
    Ok(FileState {
        entries: parsed.len() as u64,
        seqs: parsed
            .first()
            .zip(parsed.last())
            .map(|(f, l)| (f.0.seq, l.0.seq)),
        last_hash: parsed
            .last()
            .map_or_else(|| GENESIS.to_string(), |p| p.0.hash.clone()),
        last_full: full.last().cloned(),
        continues_from,
    })
}

/// The (seq, prev) the first line must have, and the rotation header it is when the
/// chain is picked up there.
fn expected_start(
    start: &Start,
    parsed: &[(Chain, bool)],
    metas: &[LineMeta],
) -> Result<(u64, String, Option<RotatedFrom>), AuditError> {
    Ok(match start {
        Start::After { seq, full_hash, .. } => (seq + 1, full_hash.clone(), None),
        Start::Fresh => match parsed.first().zip(metas.first()) {
            // Only a genuine header anchors: a forged one fails its own hash, and a
            // genuine one cannot be moved (the next line chains to its full text).
            Some(((c, true), m)) if m.rotated_from(c.seq).is_some() => {
                (c.seq, c.prev.clone(), m.rotated_from(c.seq))
            }
            _ => (1, GENESIS.to_string(), None),
        },
    })
}

/// Why the first line of a file does not continue `prev` (the file before it).
fn link_error(prev: &str, c: &Chain, m: &LineMeta, hash_ok: bool) -> AuditError {
    let why = match m.rotated_from(c.seq).filter(|_| hash_ok) {
        None => format!(
            "the file does not start with a genuine rotation header (found seq {})",
            c.seq
        ),
        Some(r) if r.prev_file != prev => format!(
            "it continues {} (seq {}), which is missing: a whole file was removed between {prev} and this one",
            r.prev_file, r.prev_seq
        ),
        Some(r) => format!(
            "its header links to seq {} of {prev}, whose last line does not match: {prev} was edited or cut at its end",
            r.prev_seq
        ),
    };
    AuditError::Link {
        prev_file: prev.to_string(),
        why,
    }
}

/// The parsed lines of a log being verified, with the full-text hash of each.
struct ParsedLog<'a> {
    parsed: &'a [(Chain, bool)],
    full: &'a [String],
    /// Line index by full-text hash.
    by_full: &'a HashMap<&'a str, usize>,
}

impl ParsedLog<'_> {
    /// Why line index `i`, which does not continue the chain (expected `exp_seq` and
    /// `exp_prev`), breaks it; the checks run from the most specific diagnosis down.
    fn unlinked(&self, i: usize, exp_seq: u64, exp_prev: &str) -> AuditError {
        self.twin(i)
            .or_else(|| self.replayed(i))
            .or_else(|| self.reordered(i, exp_seq))
            .or_else(|| self.inserted_before_next(i, exp_seq, exp_prev))
            .unwrap_or_else(|| self.broken(i, exp_seq))
    }

    /// Same seq and prev as the line before: one of the two was inserted; the
    /// genuine one is the one the chain continues from.
    fn twin(&self, i: usize) -> Option<AuditError> {
        let (parsed, full) = (self.parsed, self.full);
        let line = i as u64 + 1;
        let c = &parsed[i].0;
        if i > 0 && c.seq == parsed[i - 1].0.seq && c.prev == parsed[i - 1].0.prev {
            // Which one does the chain continue from? The other one is the insertion.
            let next_chains_to_this = parsed.get(i + 1).is_some_and(|n| n.0.prev == full[i]);
            let (inserted, genuine) = if next_chains_to_this {
                (line - 1, line)
            } else {
                (line, line - 1)
            };
            return Some(AuditError::Inserted {
                line: inserted,
                seq: c.seq,
                why: format!(
                    "lines {} and {line} carry the same seq {} and prev; line {genuine} is the genuine one",
                    line - 1,
                    c.seq
                ),
            });
        }
        None
    }

    /// An exact copy of another line (replayed): an insertion.
    fn replayed(&self, i: usize) -> Option<AuditError> {
        let full = self.full;
        let k = (0..self.parsed.len()).find(|&k| k != i && full[k] == full[i])?;
        Some(AuditError::Inserted {
            line: i as u64 + 1,
            seq: self.parsed[i].0.seq,
            why: format!("an exact copy of line {}", k + 1),
        })
    }

    /// A genuine line out of place: its prev is the full hash of another line of the
    /// file whose seq precedes it.
    fn reordered(&self, i: usize, exp_seq: u64) -> Option<AuditError> {
        let parsed = self.parsed;
        let (c, hash_ok) = &parsed[i];
        if *hash_ok {
            if let Some(&m) = self.by_full.get(c.prev.as_str()) {
                if m + 1 != i && parsed[m].0.seq + 1 == c.seq {
                    let found = (0..parsed.len())
                        .find(|&k| k != i && parsed[k].0.seq == exp_seq)
                        .map(|k| format!("; seq {exp_seq} is at line {}", k + 1))
                        .unwrap_or_default();
                    return Some(AuditError::Reordered {
                        line: i as u64 + 1,
                        seq: c.seq,
                        expected: exp_seq,
                        chains_to: m as u64 + 1,
                        found,
                    });
                }
            }
        }
        None
    }

    /// The next line chains to the line before this one: this one was inserted.
    fn inserted_before_next(&self, i: usize, exp_seq: u64, exp_prev: &str) -> Option<AuditError> {
        let n = self.parsed.get(i + 1)?;
        if n.0.seq == exp_seq && n.0.prev == exp_prev && n.1 {
            let line = i as u64 + 1;
            return Some(AuditError::Inserted {
                line,
                seq: self.parsed[i].0.seq,
                why: format!(
                    "line {} continues the chain from {}",
                    line + 1,
                    if i == 0 {
                        "the start".to_string()
                    } else {
                        format!("line {i}")
                    }
                ),
            });
        }
        None
    }

    /// None of the specific diagnoses fit: an edited line, missing lines, or a break.
    fn broken(&self, i: usize, exp_seq: u64) -> AuditError {
        let line = i as u64 + 1;
        let (c, hash_ok) = &self.parsed[i];
        if !hash_ok {
            return AuditError::Edited { line, seq: c.seq };
        }
        let after = if i == 0 {
            "the start of the log".to_string()
        } else {
            format!("line {i}")
        };
        if c.seq > exp_seq {
            return AuditError::Removed {
                line,
                seq: c.seq,
                expected: exp_seq,
                missing: c.seq - exp_seq,
                after,
            };
        }
        let why = if c.seq < exp_seq {
            format!(
                "seq {} does not follow seq {} of line {} (duplicate or out of order) and prev does not match it: a line was inserted or moved here",
                c.seq,
                exp_seq - 1,
                i
            )
        } else {
            format!("prev does not match the hash of {after}: that line was replaced, or this line was forged")
        };
        AuditError::Broken {
            line,
            seq: c.seq,
            why,
        }
    }
}

/// One line built by [`seal`]: its text (no newline) and the SM3 of that text, which
/// is the next line's `prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub line: String,
    pub full_hash: String,
}

/// Builds line `seq` of the chain for `entry` at `unix_ns`, linked to `prev` (the
/// previous line's full hash, or [`GENESIS`]): the canonical record, then its SM3 as
/// the last member, `hash`.
pub fn seal(
    seq: u64,
    unix_ns: u64,
    prev: &str,
    entry: &AuditEntry,
) -> Result<Sealed, serde_json::Error> {
    seal_with(seq, unix_ns, prev, entry, None)
}

/// [`seal`] for an outcome line: `intent` is the seq of its intent line.
pub fn seal_with(
    seq: u64,
    unix_ns: u64,
    prev: &str,
    entry: &AuditEntry,
    intent: Option<u64>,
) -> Result<Sealed, serde_json::Error> {
    let rec = Record {
        seq,
        time: rfc3339_utc(unix_ns),
        unix_ns,
        uid: entry.uid,
        gid: entry.gid,
        pid: entry.pid,
        role: entry.role,
        request: &entry.request,
        args: &entry.args,
        result: entry.result,
        message: entry.message.as_deref(),
        v: FORMAT_VERSION,
        intent,
        prev,
    };
    let canonical = serde_json::to_string(&rec)?;
    let hash = sm3_hex(canonical.as_bytes());
    let mut line = String::with_capacity(canonical.len() + HASH_SUFFIX_LEN);
    line.push_str(&canonical[..canonical.len() - 1]);
    line.push_str(",\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}");
    let full_hash = sm3_hex(line.as_bytes());
    Ok(Sealed { line, full_hash })
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` from Unix nanoseconds.
pub fn rfc3339_utc(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let nanos = unix_ns % 1_000_000_000;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A log of `n` entries, chained as ferryd's writer chains them; returns its lines
    /// (without newlines).
    fn make(n: u32) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (0..n)
            .map(|i| {
                let s = seal(
                    u64::from(i) + 1,
                    1_795_521_600_000_000_000 + u64::from(i),
                    &prev,
                    &entry(i),
                )
                .unwrap();
                prev = s.full_hash;
                s.line
            })
            .collect()
    }

    fn join(lines: &[String]) -> Vec<u8> {
        let mut s = lines.join("\n");
        s.push('\n');
        s.into_bytes()
    }

    #[test]
    fn time_format() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_utc(1_709_210_096_000_000_007),
            "2024-02-29T12:34:56.000000007Z"
        );
    }

    #[test]
    fn sealed_lines_chain_and_verify() {
        let lines = make(3);
        assert!(
            lines[0].starts_with("{\"seq\":1,\"time\":\"2026-11-24T12:00:00.000000000Z\","),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(&format!("\"prev\":\"{GENESIS}\"")));
        assert!(lines[1].contains(&format!("\"prev\":\"{}\"", sm3_hex(lines[0].as_bytes()))));
        assert!(lines[2].contains("\"role\":\"viewer\""));
        assert!(lines[2].contains("\"result\":\"ok\""));
        let r = verify_bytes(&join(&lines)).unwrap();
        assert_eq!(r.entries, 3);
        assert!(lines[2].ends_with(&format!("\"hash\":\"{}\"}}", r.last_hash)));
        let (chain, ok) = parse_line(3, lines[2].as_bytes()).unwrap();
        assert!(ok);
        assert_eq!((chain.seq, chain.hash), (3, r.last_hash));
    }

    #[test]
    fn truncated_last_line_is_named() {
        let mut data = join(&make(4));
        data.truncate(data.len() - 40);
        let e = verify_bytes(&data).unwrap_err();
        assert!(matches!(e, AuditError::Truncated { line: 4, .. }), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, &data).unwrap();
        let e = verify(&path).unwrap_err();
        assert!(matches!(e, AuditError::Truncated { line: 4, .. }), "{e}");
        let e = verify(&dir.path().join("missing.log")).unwrap_err();
        assert!(matches!(e, AuditError::Io { .. }), "{e}");
    }

    #[test]
    fn empty_log_verifies() {
        let r = verify_bytes(b"").unwrap();
        assert_eq!(r.entries, 0);
        assert_eq!(r.last_hash, GENESIS);
    }

    #[test]
    fn edited_field_is_named() {
        let mut lines = make(5);
        lines[2] = lines[2].replace("\"uid\":1002", "\"uid\":0");
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(matches!(e, AuditError::Edited { line: 3, seq: 3 }), "{e}");
        assert!(
            e.to_string().starts_with("line 3 (seq 3): hash mismatch"),
            "{e}"
        );
    }

    #[test]
    fn edited_seq_is_named() {
        let mut lines = make(5);
        lines[1] = lines[1].replace("\"seq\":2,", "\"seq\":7,");
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(matches!(e, AuditError::Edited { line: 2, .. }), "{e}");
    }

    #[test]
    fn deleted_line_is_named() {
        let mut lines = make(5);
        lines.remove(2);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Removed {
                    line: 3,
                    seq: 4,
                    missing: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "line 3 (seq 4): 1 line(s) removed before this line (expected seq 3; prev does not match line 2)"
        );
        // The head removed.
        let mut lines = make(3);
        lines.remove(0);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Removed {
                    line: 1,
                    seq: 2,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// A forged line: self-consistent hash, but it cannot know how to chain.
    fn forge(seq: u64, prev: &str) -> String {
        let e = AuditEntry {
            uid: Some(0),
            gid: Some(0),
            pid: Some(1),
            role: Some(Role::Admin),
            request: "promote".into(),
            args: serde_json::json!({"cmd": "promote"}),
            result: Outcome::Ok,
            message: None,
        };
        seal(seq, 0, prev, &e).unwrap().line
    }

    #[test]
    fn inserted_line_is_named() {
        // Naive forgery: plausible seq, made-up prev.
        let mut lines = make(5);
        lines.insert(2, forge(3, &"ab".repeat(32)));
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(matches!(e, AuditError::Inserted { line: 3, .. }), "{e}");
        assert!(
            e.to_string()
                .contains("line 4 continues the chain from line 2"),
            "{e}"
        );
        // Careful forgery: correct seq and prev, so the line itself links; the genuine
        // seq-3 line after it gives it away.
        let mut lines = make(5);
        let prev = sm3_hex(lines[1].as_bytes());
        lines.insert(2, forge(3, &prev));
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Inserted {
                    line: 3,
                    seq: 3,
                    ..
                }
            ),
            "{e}"
        );
        // An inserted copy of a line with a bad hash.
        let mut lines = make(5);
        let dup = lines[1].replace("\"uid\":1001", "\"uid\":0");
        lines.insert(2, dup);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(matches!(e, AuditError::Inserted { line: 3, .. }), "{e}");
        // A replayed copy of a genuine line.
        let mut lines = make(6);
        lines.insert(2, lines[4].clone());
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Inserted {
                    line: 3,
                    seq: 5,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().ends_with("an exact copy of line 6"), "{e}");
        // Appended at the end with a wrong prev.
        let mut lines = make(3);
        lines.push(forge(4, &"cd".repeat(32)));
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Broken {
                    line: 4,
                    seq: 4,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn swapped_lines_are_named() {
        let mut lines = make(6);
        lines.swap(2, 3);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Reordered {
                    line: 3,
                    seq: 4,
                    expected: 3,
                    chains_to: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("seq 3 is at line 4"), "{e}");
        let mut lines = make(6);
        lines.swap(1, 4);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Reordered {
                    line: 2,
                    seq: 5,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// A sealed line for `request` with `result`, linked to `intent` when given.
    fn line_of(
        seq: u64,
        prev: &str,
        request: &str,
        result: Outcome,
        intent: Option<u64>,
    ) -> Sealed {
        let mut e = entry(0);
        e.request = request.into();
        e.result = result;
        seal_with(seq, 1_795_521_600_000_000_000 + seq, prev, &e, intent).unwrap()
    }

    /// Lines `(request, result, intent)` chained from the genesis.
    fn chain_of(spec: &[(&str, Outcome, Option<u64>)]) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        spec.iter()
            .enumerate()
            .map(|(i, (req, res, intent))| {
                let s = line_of(i as u64 + 1, &prev, req, *res, *intent);
                prev = s.full_hash;
                s.line
            })
            .collect()
    }

    #[test]
    fn format_three_lines_carry_v_and_the_intent_link() {
        let lines = chain_of(&[
            ("pause", Outcome::Intent, None),
            ("pause", Outcome::Ok, Some(1)),
        ]);
        assert!(
            lines[0].contains(r#""result":"intent","message":null,"v":3,"prev":"#),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(r#""result":"ok","message":null,"v":3,"intent":1,"prev":"#),
            "{}",
            lines[1]
        );
        let r = verify_bytes(&join(&lines)).unwrap();
        assert_eq!(r.entries, 2);
        assert!(r.open_intents.is_empty(), "{:?}", r.open_intents);
        let m = LineMeta::parse(2, lines[1].as_bytes()).unwrap();
        assert_eq!((m.v, m.intent, m.result), (3, Some(1), Some(Outcome::Ok)));
        // A format 1 line (no `v`) reads as format 1.
        let old = r#"{"seq":1,"request":"status","result":"ok"}"#;
        assert_eq!(LineMeta::parse(1, old.as_bytes()).unwrap().v, 1);
    }

    /// Issue 16 path 9: an intent whose outcome never came (a crash while the action
    /// ran) stays visible and is reported; outcomes pair with their intents by seq.
    #[test]
    fn intents_without_an_outcome_are_reported() {
        let lines = chain_of(&[
            ("status", Outcome::Ok, None),
            ("promote", Outcome::Intent, None),
            ("bookmark", Outcome::Intent, None),
            ("bookmark", Outcome::Error, Some(3)),
            ("resume", Outcome::Intent, None),
        ]);
        let r = verify_bytes(&join(&lines)).unwrap();
        assert_eq!(r.entries, 5);
        let open: Vec<_> = r
            .open_intents
            .iter()
            .map(|o| (o.seq, o.request.as_str()))
            .collect();
        assert_eq!(open, [(2, "promote"), (5, "resume")]);
        assert!(r.open_intents[0].time.ends_with('Z'));
    }

    #[test]
    fn an_outcome_of_no_intent_is_refused() {
        // Names seq 1, a plain line; then seq 7, which does not exist.
        for (intent, line) in [(1, 2), (7, 2)] {
            let lines = chain_of(&[
                ("status", Outcome::Ok, None),
                ("pause", Outcome::Ok, Some(intent)),
            ]);
            let e = verify_bytes(&join(&lines)).unwrap_err();
            assert!(
                matches!(e, AuditError::Unpaired { line: l, intent: i, .. } if l == line && i == intent),
                "{e}"
            );
        }
        // Two outcomes for one intent: the second is unpaired.
        let lines = chain_of(&[
            ("pause", Outcome::Intent, None),
            ("pause", Outcome::Ok, Some(1)),
            ("pause", Outcome::Ok, Some(1)),
        ]);
        let e = verify_bytes(&join(&lines)).unwrap_err();
        assert!(matches!(e, AuditError::Unpaired { line: 3, .. }), "{e}");
    }

    /// A file that rotation started verifies on its own from its header; a header
    /// that is not genuine, or a plain line in its place, does not anchor anything.
    #[test]
    fn a_rotation_header_anchors_a_lone_file() {
        let mut e = entry(0);
        e.request = ROTATE_REQUEST.into();
        e.args = serde_json::json!({"prev_file": "audit.log.000001", "prev_seq": 40});
        let prev = "ab".repeat(32);
        let header = seal(41, 7, &prev, &e).unwrap();
        let next = seal(42, 8, &header.full_hash, &entry(1)).unwrap();
        let lines = vec![header.line.clone(), next.line];
        let r = verify_bytes(&join(&lines)).unwrap();
        assert_eq!(r.entries, 2);
        let from = r.continues_from.unwrap();
        assert_eq!(
            (from.seq, from.prev_file.as_str(), from.prev_seq),
            (41, "audit.log.000001", 40)
        );
        let mut forged = lines.clone();
        forged[0] = forged[0].replace("\"prev_seq\":40", "\"prev_seq\":39");
        let err = verify_bytes(&join(&forged)).unwrap_err();
        assert!(matches!(err, AuditError::Edited { line: 1, .. }), "{err}");
        // The head of a genesis chain cut off: the first line left is no header.
        let mut cut = make(4);
        cut.drain(..2);
        let err = verify_bytes(&join(&cut)).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::Removed {
                    line: 1,
                    seq: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn only_state_changing_requests_need_an_intent() {
        use crate::control::PointSpec;
        for r in [
            Request::Status,
            Request::ListBookmarks,
            Request::ListPits { limit: None },
            Request::Verify { volume: None },
        ] {
            assert!(!changes_state(&r), "{r:?}");
        }
        for r in [
            Request::Pause,
            Request::Resume,
            Request::Demote,
            Request::BookmarkCreate { name: "b".into() },
            Request::Promote {
                target: None,
                force: false,
            },
            Request::Switchover { to: None },
            Request::Rollback {
                volume: "v".into(),
                target: PointSpec::Seq(1),
                group: false,
            },
            Request::PitUnexport {
                id: None,
                all: true,
            },
        ] {
            assert!(changes_state(&r), "{r:?}");
            assert!(!is_record(&r), "{r:?}");
        }
        let drill = Request::DrillReport(crate::control::DrillReport {
            volume: "v".into(),
            seq: 7,
            point_time: "2026-12-07T00:00:00Z".into(),
            passed: true,
            rto_ms: 1,
            rpo_ms: 2,
            check: "filesystem".into(),
            summary: "ok".into(),
        });
        assert!(!changes_state(&drill) && is_record(&drill));
        assert!(!is_record(&Request::Status));
    }

    /// Found while writing the `audit_verify` fuzz target (fuzz/): a line whose `"hash":"` suffix
    /// position falls inside a multi-byte character made `parse_line` slice a `str`
    /// off a char boundary and panic (`ferryctl audit verify` on a forged log).
    #[test]
    fn forged_line_with_multibyte_text_at_the_suffix_is_malformed_not_a_panic() {
        let line = format!(
            "{{\"seq\":1,\"prev\":\"{}\",\"hash\":\"ab\",\"z\":\"{}\"}}",
            "0".repeat(64),
            "\u{e9}".repeat(60)
        );
        let err = parse_line(1, line.as_bytes()).expect_err("hash is not the last member");
        assert!(
            matches!(err, AuditError::Malformed { line: 1, .. }),
            "{err}"
        );
        let mut log = line.into_bytes();
        log.push(b'\n');
        assert!(matches!(
            verify_bytes(&log),
            Err(AuditError::Malformed { line: 1, .. })
        ));
    }
}
