//! Shared helpers of ferry's fuzz targets: checksum fix-ups that let the fuzzer get
//! past CRCs to the payload parsers, the deterministic data the journal and undo
//! templates hold (so a recovered record can be checked byte for byte), the
//! templates themselves and the directory mutations applied to copies of them.

use std::fs;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use bytes::Bytes;
use ferry_journal::undo::{EntryKind, UndoEntry, UndoExtent, UndoLog};
use ferry_journal::{EngineChoice, Journal, JournalOptions, Record, RecoveryMode};
use ferry_proto::wire::HEADER_LEN;

/// Cluster id of every template log.
pub const CLUSTER: [u8; 16] = *b"ferry-fuzz-clstr";
/// Journal segment size of the template (the journal's minimum).
pub const JOURNAL_SEGMENT: u64 = 1 << 20;
/// Undo segment size of the template: small, so a few entries span several segments.
pub const UNDO_SEGMENT: u64 = 16 << 10;

/// Rewrites a frame's `payload_len`, payload CRC and header CRC so that
/// `decode_header` accepts whatever the fuzzer put in the other fields. Without it
/// almost every mutation dies at a checksum and the payload decoders go unexercised.
pub fn fix_frame_crcs(buf: &mut [u8]) {
    if buf.len() < HEADER_LEN {
        return;
    }
    let payload_len = u32::try_from(buf.len() - HEADER_LEN).unwrap_or(u32::MAX);
    buf[20..24].copy_from_slice(&payload_len.to_le_bytes());
    let payload_crc = crc32c::crc32c(&buf[HEADER_LEN..]);
    buf[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&buf[..28]);
    buf[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

/// Deterministic record data for `seq`: what the template journal holds, so a
/// recovered record is checked against what was written, not just its CRC.
pub fn payload(seq: u64, len: usize) -> Bytes {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    Bytes::from(v)
}

/// Record data length for `seq` in the template: varied so batches differ in size
/// and some records straddle 4 KiB blocks.
pub fn payload_len(seq: u64) -> usize {
    [512usize, 4096, 100, 9000, 1][(seq % 5) as usize]
}

/// Journal options of the template (std engine: no io_uring in the fuzz loop).
pub fn journal_options(dir: &Path) -> JournalOptions {
    let mut o = JournalOptions::new(dir, CLUSTER);
    o.segment_size = JOURNAL_SEGMENT;
    o.capacity = 4 * JOURNAL_SEGMENT;
    o.engine = EngineChoice::Std;
    o.recovery = RecoveryMode::TolerateTornTail;
    o.max_batch_bytes = 64 << 10;
    o.queue_records = 64;
    o
}

/// Records the template journal holds: enough to fill past one segment, so the
/// template has a full segment, an active one and a spare.
pub const JOURNAL_RECORDS: u64 = 400;

/// Writes the template journal into `dir` (which must not exist yet).
pub fn build_journal(dir: &Path) -> Result<(), String> {
    let (j, _) = Journal::open(journal_options(dir)).map_err(|e| e.to_string())?;
    for seq in 1..=JOURNAL_RECORDS {
        let rec = journal_record(seq);
        // Batches of a few records: append without waiting, wait every 8th.
        if seq % 8 == 0 {
            j.append_wait(rec).map_err(|e| e.to_string())?;
        } else {
            j.append(rec, Box::new(|_| {})).map_err(|e| e.to_string())?;
        }
    }
    j.append_wait(Record::seal(1, Bytes::from_static(b"end")))
        .map_err(|e| e.to_string())?;
    j.close().map_err(|e| e.to_string())
}

/// The record the template journal holds at `seq`.
pub fn journal_record(seq: u64) -> Record {
    if seq == JOURNAL_RECORDS + 1 {
        return Record::seal(1, Bytes::from_static(b"end"));
    }
    match seq % 7 {
        3 => Record::trim(1, seq * 4096, 8192),
        5 => Record::write_zeroes(2, seq * 512, 4096),
        6 => Record::seal(1, payload(seq, 16)),
        _ => Record::write(1, seq * 4096, payload(seq, payload_len(seq))),
    }
}

/// Entries of the template undo log: write-sets, a resync transition, more write-sets,
/// one of them captured in pieces.
pub fn undo_entries() -> Vec<UndoEntry> {
    let mut v = Vec::new();
    let mut seq = 1u64;
    for i in 0..24u64 {
        let n = 1 + i % 3;
        let kind = match i {
            10 => EntryKind::ResyncStart,
            11 | 12 => EntryKind::Resync,
            16 => EntryKind::PartStart,
            17 => EntryKind::Part,
            _ => EntryKind::WriteSet,
        };
        // Resync entries and pieces carry data but cover no sequence (last = first - 1).
        let (first, last) = if kind == EntryKind::WriteSet {
            (seq, seq + n - 1)
        } else {
            (seq, seq - 1)
        };
        let mut extents = vec![UndoExtent::data(
            1,
            i * 8192,
            payload(i, [700usize, 4096, 33][(i % 3) as usize]),
        )];
        if i % 4 == 1 {
            extents.push(UndoExtent::zeros(2, i * 65536, 1 << 20));
        }
        v.push(UndoEntry {
            first_seq: first,
            last_seq: last,
            timestamp_ns: 1_700_000_000_000_000_000 + i * 1_000_000,
            extents,
            kind,
        });
        seq = last + 1;
    }
    v
}

/// Writes the template undo log into `dir`.
pub fn build_undo(dir: &Path) -> Result<(), String> {
    let (mut log, _) = UndoLog::open(dir, CLUSTER, UNDO_SEGMENT).map_err(|e| e.to_string())?;
    for e in undo_entries() {
        log.append(&e).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One change to a copied log directory.
#[derive(Debug, Arbitrary)]
pub enum Mutation {
    /// XOR one byte (offset taken modulo the file length).
    Flip {
        file: u8,
        at: u32,
        xor: u8,
    },
    /// Overwrite bytes at an offset (clipped to the file).
    Write {
        file: u8,
        at: u32,
        bytes: Vec<u8>,
    },
    /// Zero a range (clipped to the file).
    Zero {
        file: u8,
        at: u32,
        len: u16,
    },
    /// Cut the file to `len` modulo (file length + 1).
    Truncate {
        file: u8,
        len: u32,
    },
    /// Grow the file with zeros.
    Extend {
        file: u8,
        by: u16,
    },
    Delete {
        file: u8,
    },
}

/// Log files of `dir` (sorted by name; the lock file excluded).
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.file_name().is_some_and(|n| n != "LOCK"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Applies `m` to the files of `dir`. Failures of the mutation itself (a file
/// already deleted) are ignored: the point is the state left behind.
pub fn apply(dir: &Path, m: &Mutation) {
    let files = log_files(dir);
    if files.is_empty() {
        return;
    }
    let pick = |f: u8| &files[f as usize % files.len()];
    match m {
        Mutation::Delete { file } => {
            let _ = fs::remove_file(pick(*file));
        }
        Mutation::Truncate { file, len } => {
            let p = pick(*file);
            let cur = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let _ = fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|f| f.set_len(u64::from(*len) % (cur + 1)));
        }
        Mutation::Extend { file, by } => {
            let p = pick(*file);
            let cur = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let _ = fs::OpenOptions::new()
                .write(true)
                .open(p)
                .and_then(|f| f.set_len(cur + u64::from(*by)));
        }
        Mutation::Flip { file, at, xor } => edit(pick(*file), *at, |b| b[0] ^= *xor, 1),
        Mutation::Write { file, at, bytes } => edit(
            pick(*file),
            *at,
            |b| b.copy_from_slice(&bytes[..b.len()]),
            bytes.len(),
        ),
        Mutation::Zero { file, at, len } => edit(pick(*file), *at, |b| b.fill(0), *len as usize),
    }
}

/// Lets `f` change up to `len` bytes of `path` from `at % file length`, in place
/// (positioned read and write: the journal's segments are 1 MiB each).
fn edit(path: &Path, at: u32, f: impl FnOnce(&mut [u8]), len: usize) {
    use std::os::unix::fs::FileExt;
    let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(path) else {
        return;
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size == 0 || len == 0 {
        return;
    }
    let start = u64::from(at) % size;
    let n = len.min(usize::try_from(size - start).unwrap_or(usize::MAX));
    let mut buf = vec![0u8; n];
    if file.read_exact_at(&mut buf, start).is_err() {
        return;
    }
    f(&mut buf);
    let _ = file.write_all_at(&buf, start);
}

/// Removes scratch directories left by fuzz processes that are gone (libFuzzer
/// exits without running destructors, and a crash skips them too).
pub fn remove_stale_scratch() {
    let Ok(rd) = fs::read_dir(scratch_base()) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ferry-fuzz-")) else {
            continue;
        };
        let mut parts = rest.rsplit('-');
        let pid = parts.nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn scratch_base() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// Copies the files of `from` into the fresh directory `to`.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for p in log_files(from) {
        if let Some(name) = p.file_name() {
            fs::copy(&p, to.join(name))?;
        }
    }
    Ok(())
}

/// A scratch directory on tmpfs when there is one (the journal and undo targets copy
/// a few MiB per input), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = scratch_base();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = base.join(format!("ferry-fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
