//! The audit log writer: appends one hash-chained line per control request, continues
//! the chain on reopen after checking its tail, rotates the file by size with the chain
//! carried into the next file, and decides when lines are fsynced:
//!
//! * [`AuditLog::append`], [`AuditLog::append_intent`], [`AuditLog::append_outcome`]:
//!   durable (`fdatasync`) when they return. A state-changing request writes its intent
//!   this way before it is carried out, and its outcome before it is answered.
//! * [`AuditLog::append_batched`]: read-only and refused requests. The line is written
//!   at once (a killed process loses nothing) and fsynced by a flusher thread within
//!   `sync_interval`, or at once when `sync_lines` lines wait: a viewer asking `status`
//!   in a loop cannot make the daemon fsync once per request.
//!
//! With a node key (`[tls]` configured), a checkpoint line signed by it follows every
//! `[audit] checkpoint_every` lines and ends the log at a clean stop (the drop of the
//! [`AuditLog`]): format 3, [`ferry_api::audit::checkpoint`].
//!
//! The line format, the canonical SM3 hashing, the file set of a rotated log and the
//! verifier are ferry-api's ([`ferry_api::audit`], which `ferryctl audit verify` uses
//! without linking ferryd); lines are built with its [`seal_with`], so there is one
//! definition of the line hash. The layout and crash cases are in `api/AUDIT.md`.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use parking_lot::{Condvar, Mutex};

use ferry_api::audit::checkpoint::{checkpoint_entry, is_checkpoint, CheckpointSigner};
use ferry_api::audit::files::{active_name, rotated_files, rotated_name};
use ferry_api::audit::{parse_line, seal_with, sm3_hex, split_lines, LineMeta};
use ferry_api::audit::{AuditEntry, AuditError, Outcome, GENESIS, ROTATE_REQUEST};
use ferry_api::config::{AuditConfig, Config};
use ferry_transport::nodesig::NodeSigner;

/// Rotation and batching limits (`[audit]` in the config).
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Rotate once the active file holds this many bytes (it may exceed it by a line).
    pub max_file_size: u64,
    /// Rotated files kept; older ones are deleted after a rotation (0: keep all).
    pub keep_files: u32,
    /// Longest time a batched line waits for its fsync.
    pub sync_interval: Duration,
    /// Batched lines that trigger an fsync at once.
    pub sync_lines: u32,
    /// Lines between two signed checkpoints.
    pub checkpoint_every: u64,
    /// The node key that signs the checkpoints; `None`: no checkpoints (a node
    /// without `[tls]` has no key).
    pub signer: Option<Arc<dyn CheckpointSigner>>,
}

impl AuditOptions {
    pub fn from_config(cfg: Option<&AuditConfig>) -> AuditOptions {
        let d = AuditConfig::default();
        let c = cfg.unwrap_or(&d);
        AuditOptions {
            max_file_size: c.max_file_size.0,
            keep_files: c.keep_files,
            sync_interval: Duration::from_millis(c.sync_interval_ms),
            sync_lines: c.sync_lines.max(1),
            checkpoint_every: c.checkpoint_every.max(1),
            signer: None,
        }
    }

    /// The node's options: `[audit]`, and the node's `[tls]` certificate and key for
    /// the checkpoints. A key that cannot be loaded refuses the start: the node would
    /// run with a log nobody can vouch for, and its replication link would fail on the
    /// same key anyway.
    pub fn for_node(cfg: &Config) -> anyhow::Result<AuditOptions> {
        let mut opts = AuditOptions::from_config(cfg.audit.as_ref());
        if let Some(tls) = &cfg.tls {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let signer =
                NodeSigner::from_pem(&read(&tls.cert)?, &read(&tls.key)?).with_context(|| {
                    format!(
                        "audit checkpoints: node key {} and certificate {}",
                        tls.key.display(),
                        tls.cert.display()
                    )
                })?;
            opts.signer = Some(Arc::new(NodeKey(signer)));
        }
        Ok(opts)
    }
}

/// The node's certificate key as the checkpoint signer.
#[derive(Debug)]
pub struct NodeKey(pub NodeSigner);

impl CheckpointSigner for NodeKey {
    fn alg(&self) -> &str {
        self.0.alg()
    }

    fn cert(&self) -> &str {
        self.0.cert()
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        self.0.sign(msg).map_err(|e| e.to_string())
    }
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions::from_config(None)
    }
}

struct Tail {
    file: File,
    /// Bytes in the active file (all complete lines).
    len: u64,
    seq: u64,
    /// Full-text SM3 of the last line: the next line's `prev`.
    prev: String,
    /// Set when a failed append or fsync could not be rolled back: the tail is unknown.
    failed: Option<String>,
    /// Batched lines written but not fsynced yet, and when the first of them was.
    unsynced: u32,
    dirty_since: Option<Instant>,
    /// Number of the next rotated file.
    next_rotation: u64,
    /// The log is being dropped: the flusher syncs what is left and ends.
    closing: bool,
    /// Seq of the newest checkpoint line (0: none known since the open).
    last_checkpoint: u64,
    /// The next periodic checkpoint follows the line with this seq (or a later one).
    checkpoint_due: u64,
}

struct Shared {
    path: PathBuf,
    opts: AuditOptions,
    tail: Mutex<Tail>,
    /// Wakes the flusher when a batched line is written or the log closes.
    wake: Condvar,
    fsyncs: AtomicU64,
}

/// The append side. Thread-safe. Dropping it fsyncs the batched lines.
pub struct AuditLog {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.shared.path)
            .finish()
    }
}

/// The last line of the newest rotated file: where a new active file's chain goes on.
#[derive(Debug, Clone)]
struct PrevFile {
    name: String,
    seq: u64,
    full_hash: String,
}

impl AuditLog {
    /// [`AuditLog::open_with`] the default options.
    pub fn open(path: &Path) -> anyhow::Result<AuditLog> {
        AuditLog::open_with(path, AuditOptions::default())
    }

    /// Opens (creating, mode 0600) the log and continues its chain. The tail — the last
    /// line's hash, its link to the line before (or to the previous file's last line),
    /// and a complete final line — must verify, or this refuses with the precise
    /// problem: appending to a broken chain would hide the break. Run `ferryctl audit
    /// verify` for the whole log.
    pub fn open_with(path: &Path, opts: AuditOptions) -> anyhow::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("audit log directory {}", dir.display()))?;
            }
        }
        let rotated = rotated_files(path)?;
        let next_rotation = rotated.last().map_or(1, |(n, _)| n + 1);
        let mut file = open_active(path, false)?;
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
        let newest = rotated.last().map(|(_, p)| p.clone());
        let prev_file = || newest.as_deref().map(last_line_of).transpose();
        let (seq, prev, needs_header) = match chain_tail(&mut file, len, path, prev_file)? {
            Continue::At(seq, prev) => (seq, prev, None),
            Continue::NewFile(p) => (p.seq, p.full_hash.clone(), Some(p)),
        };
        let last_checkpoint = if last_line_is_checkpoint(&mut file, len) {
            seq
        } else {
            0
        };
        let log = AuditLog::start(path, opts, file, len, (seq, prev), next_rotation);
        {
            let mut t = log.shared.tail.lock();
            t.last_checkpoint = last_checkpoint;
            t.checkpoint_due = seq + log.shared.opts.checkpoint_every;
        }
        if let Some(p) = needs_header {
            // The active file is new or empty after a rotation (a crash between the
            // rename and the header, or a removed active file): it starts with the
            // header, as rotation would have written it.
            let mut t = log.shared.tail.lock();
            log.shared.put(&mut t, &rotate_header(&p), None, true)?;
        }
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

    fn start(
        path: &Path,
        opts: AuditOptions,
        file: File,
        len: u64,
        (seq, prev): (u64, String),
        next_rotation: u64,
    ) -> AuditLog {
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            opts,
            tail: Mutex::new(Tail {
                file,
                len,
                seq,
                prev,
                failed: None,
                unsynced: 0,
                dirty_since: None,
                next_rotation,
                closing: false,
                last_checkpoint: 0,
                checkpoint_due: u64::MAX,
            }),
            wake: Condvar::new(),
            fsyncs: AtomicU64::new(0),
        });
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("audit-flush".into())
            .spawn(move || s.flush_loop())
            .map_err(|e| {
                tracing::error!("audit log: no flusher thread ({e}); every line is fsynced")
            })
            .ok();
        AuditLog { shared, flusher }
    }

    /// The active file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// fdatasyncs done so far (every kind): what batching saves shows here.
    pub fn fsyncs(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// Appends one entry and fdatasyncs it; returns its seq. On a write failure the
    /// partial line is truncated away; if even that fails, every later append fails.
    pub fn append(&self, entry: AuditEntry) -> anyhow::Result<u64> {
        self.shared.append(&entry, None, true)
    }

    /// Appends the intent of a state-changing request, durably, before it is carried
    /// out; returns its seq, which [`AuditLog::append_outcome`] links to.
    pub fn append_intent(&self, mut entry: AuditEntry) -> anyhow::Result<u64> {
        entry.result = Outcome::Intent;
        entry.message = None;
        self.shared.append(&entry, None, true)
    }

    /// Appends, durably, the outcome of the request whose intent is line `intent`.
    pub fn append_outcome(&self, intent: u64, entry: AuditEntry) -> anyhow::Result<u64> {
        self.shared.append(&entry, Some(intent), true)
    }

    /// Appends an entry now and fsyncs it with others: within `sync_interval`, or at
    /// once when `sync_lines` lines wait. For requests that change nothing.
    pub fn append_batched(&self, entry: AuditEntry) -> anyhow::Result<u64> {
        if self.flusher.is_none() {
            return self.append(entry);
        }
        self.shared.append(&entry, None, false)
    }

    /// fdatasyncs the batched lines now (shutdown).
    pub fn sync(&self) -> anyhow::Result<()> {
        let mut t = self.shared.tail.lock();
        if t.unsynced > 0 {
            self.shared.sync(&mut t)?;
        }
        Ok(())
    }
}

impl Drop for AuditLog {
    /// A clean stop: the last lines are signed (a checkpoint), the batched ones
    /// fsynced.
    fn drop(&mut self) {
        {
            let mut t = self.shared.tail.lock();
            if t.failed.is_none() && t.seq > t.last_checkpoint {
                self.shared.checkpoint_logged(&mut t);
            }
        }
        self.shared.tail.lock().closing = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

impl Shared {
    fn append(
        &self,
        entry: &AuditEntry,
        intent: Option<u64>,
        durable: bool,
    ) -> anyhow::Result<u64> {
        let mut t = self.tail.lock();
        if let Some(why) = &t.failed {
            anyhow::bail!(
                "audit log {} is unusable since an earlier failure: {why}",
                self.path.display()
            );
        }
        if t.len > 0 && t.len >= self.opts.max_file_size {
            self.rotate(&mut t)?;
        }
        let seq = self.put(&mut t, entry, intent, durable)?;
        if t.seq >= t.checkpoint_due {
            self.checkpoint_logged(&mut t);
        }
        if !durable {
            t.unsynced += 1;
            let first = t.dirty_since.is_none();
            t.dirty_since.get_or_insert_with(Instant::now);
            if t.unsynced >= self.opts.sync_lines {
                self.sync(&mut t)?;
            } else if first {
                // The flusher sleeps until a batch starts; later lines join the batch.
                self.wake.notify_all();
            }
        }
        Ok(seq)
    }

    /// Seals and writes the next line (fdatasyncing it when `durable`); on failure the
    /// partial line is cut off again, or the log is marked failed.
    fn put(
        &self,
        t: &mut Tail,
        entry: &AuditEntry,
        intent: Option<u64>,
        durable: bool,
    ) -> anyhow::Result<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let seq = t.seq + 1;
        let sealed = seal_with(seq, unix_ns, &t.prev, entry, intent)?;
        let mut line = sealed.line;
        line.push('\n');
        let mut res = t.file.write_all(line.as_bytes());
        if durable && res.is_ok() {
            res = t.file.sync_data();
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = res {
            let len = t.len;
            if let Err(e2) = t.file.set_len(len).and_then(|()| t.file.sync_data()) {
                t.failed = Some(format!("{e}; rolling back the partial line failed: {e2}"));
            }
            anyhow::bail!("appending to audit log {}: {e}", self.path.display());
        }
        t.len += line.len() as u64;
        t.seq = seq;
        t.prev = sealed.full_hash;
        if durable {
            // Everything before the line is durable with it.
            t.unsynced = 0;
            t.dirty_since = None;
        }
        Ok(seq)
    }

    /// Appends, durably, a checkpoint signed by the node key over the chain so far
    /// (nothing without a key). A failure is logged, not returned: the line the
    /// caller appended is in the log already, and a failed write marks the log
    /// failed for the next append as any other.
    fn checkpoint_logged(&self, t: &mut Tail) {
        let Some(signer) = self.opts.signer.as_deref() else {
            return;
        };
        let pid = Some(std::process::id() as i32);
        let res = checkpoint_entry(t.seq, &t.prev, pid, signer)
            .map_err(|e| anyhow::anyhow!("signing: {e}"))
            .and_then(|e| self.put(t, &e, None, true));
        match res {
            Ok(seq) => {
                t.last_checkpoint = seq;
                t.checkpoint_due = seq + self.opts.checkpoint_every;
            }
            Err(e) => {
                // Try again after the next line rather than on every line.
                t.checkpoint_due = t.seq + 1;
                tracing::error!(path = %self.path.display(), "audit log: no checkpoint: {e:#}");
            }
        }
    }

    /// fdatasyncs the batched lines. A failed fsync may have lost them (the kernel
    /// drops the pages), so the log is marked failed rather than retried.
    fn sync(&self, t: &mut Tail) -> anyhow::Result<()> {
        let r = t.file.sync_data();
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        t.unsynced = 0;
        t.dirty_since = None;
        if let Err(e) = r {
            let why = format!("fdatasync failed: {e}");
            t.failed = Some(why.clone());
            anyhow::bail!("audit log {}: {why}", self.path.display());
        }
        Ok(())
    }

    /// The flusher thread: fsyncs batched lines once the oldest has waited
    /// `sync_interval`, and what is left when the log closes.
    fn flush_loop(&self) {
        let mut t = self.tail.lock();
        loop {
            let Some(since) = t.dirty_since else {
                if t.closing {
                    return;
                }
                self.wake.wait(&mut t);
                continue;
            };
            let due = since + self.opts.sync_interval;
            if t.closing || Instant::now() >= due {
                if let Err(e) = self.sync(&mut t) {
                    tracing::error!("{e:#}");
                }
                continue;
            }
            self.wake.wait_until(&mut t, due);
        }
    }
}

impl Shared {
    /// Renames the active file to the next rotated name and starts a new active file
    /// whose first line, a rotation header, continues the chain; then deletes the
    /// rotated files beyond `keep_files`. Called with the lock held, before an append.
    fn rotate(&self, t: &mut Tail) -> anyhow::Result<()> {
        if t.unsynced > 0 {
            self.sync(t)?;
        }
        let name = rotated_name(&active_name(&self.path)?, t.next_rotation);
        let rotated = self.path.with_file_name(&name);
        if rotated.exists() {
            anyhow::bail!(
                "audit log: cannot rotate to {}: it exists",
                rotated.display()
            );
        }
        std::fs::rename(&self.path, &rotated)
            .with_context(|| format!("audit log: rotating {} to {name}", self.path.display()))?;
        t.next_rotation += 1;
        let prev = PrevFile {
            name,
            seq: t.seq,
            full_hash: t.prev.clone(),
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let fresh = sync_dir(dir).and_then(|()| open_active(&self.path, true));
        let header = fresh.and_then(|f| {
            t.file = f;
            t.len = 0;
            self.put(t, &rotate_header(&prev), None, true)
        });
        if let Err(e) = header {
            // The chain's next line must be the header: refuse until a restart writes
            // it (open does, for an empty or missing active file).
            t.failed = Some(format!("rotation to a new file failed: {e:#}"));
            return Err(e);
        }
        if let Err(e) = sync_dir(dir) {
            tracing::warn!(
                "audit log: fsync of {} after rotation: {e:#}",
                dir.display()
            );
        }
        tracing::info!(
            path = %self.path.display(),
            rotated = %prev.name,
            last_seq = prev.seq,
            "audit log rotated"
        );
        self.prune();
        Ok(())
    }

    /// Deletes the oldest rotated files beyond `keep_files` (0: keeps all).
    fn prune(&self) {
        let keep = self.opts.keep_files as usize;
        if keep == 0 {
            return;
        }
        let files = match rotated_files(&self.path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("audit log: listing rotated files: {e}");
                return;
            }
        };
        for (_, p) in files.iter().take(files.len().saturating_sub(keep)) {
            match std::fs::remove_file(p) {
                Ok(()) => {
                    tracing::info!(file = %p.display(), keep, "audit log: removed the oldest rotated file")
                }
                Err(e) => tracing::warn!("audit log: removing {}: {e}", p.display()),
            }
        }
    }
}

/// The first line of a file that rotation started.
fn rotate_header(p: &PrevFile) -> AuditEntry {
    AuditEntry {
        uid: None,
        gid: None,
        pid: Some(std::process::id() as i32),
        role: None,
        request: ROTATE_REQUEST.into(),
        args: serde_json::json!({ "prev_file": p.name, "prev_seq": p.seq }),
        result: Outcome::Ok,
        message: Some(format!("continues the chain of {}", p.name)),
    }
}

fn open_active(path: &Path, new: bool) -> anyhow::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).append(true).mode(0o600);
    if new {
        o.create_new(true);
    } else {
        o.create(true);
    }
    o.open(path)
        .with_context(|| format!("opening audit log {}", path.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

/// The last line of a rotated file, after checking its own hash.
fn last_line_of(path: &Path) -> anyhow::Result<PrevFile> {
    let mut f = File::open(path).with_context(|| format!("audit log {}", path.display()))?;
    let len = f.metadata()?.len();
    let tail = read_tail_lines(&mut f, len, 1)?;
    let lines = split_lines(&tail).map_err(|e| anyhow::anyhow!("{e}"));
    let last = lines.and_then(|l| {
        l.last()
            .copied()
            .ok_or_else(|| anyhow::anyhow!("the file is empty"))
    });
    let checked = last.and_then(|l| {
        let (c, ok) = parse_line(1, l)?;
        anyhow::ensure!(ok, "its last line (seq {}) fails its hash", c.seq);
        Ok(PrevFile {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            seq: c.seq,
            full_hash: sm3_hex(l),
        })
    });
    checked.with_context(|| {
        format!(
            "audit log: refusing to continue after the rotated file {}",
            path.display()
        )
    })
}

/// Whether the last line of the active file (of `len` bytes, whole lines) is a
/// checkpoint: a restart without new lines then adds no second one. Unreadable reads
/// as no: at worst one checkpoint too many.
fn last_line_is_checkpoint(file: &mut File, len: u64) -> bool {
    if len == 0 {
        return false;
    }
    let Ok(tail) = read_tail_lines(file, len, 1) else {
        return false;
    };
    let Ok(lines) = split_lines(&tail) else {
        return false;
    };
    lines
        .last()
        .and_then(|l| LineMeta::parse(1, l).ok())
        .is_some_and(|m| is_checkpoint(&m))
}

/// Where the chain goes on after open.
enum Continue {
    /// After line `seq` (full hash) of the active file, or at the genesis (`0`).
    At(u64, String),
    /// In an empty active file, after the newest rotated one: a header comes first.
    NewFile(PrevFile),
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

/// The chain position to continue from, after checking the last line's own hash, its
/// link to the line before (or, for a file's only line, to the previous file's last
/// line) and that it is complete. Refuses with the precise problem otherwise:
/// appending to a broken chain would hide the break. `prev_file` reads the last line
/// of the newest rotated file, when there is one.
fn chain_tail(
    file: &mut File,
    len: u64,
    path: &Path,
    prev_file: impl FnOnce() -> anyhow::Result<Option<PrevFile>>,
) -> anyhow::Result<Continue> {
    if len == 0 {
        return Ok(match prev_file()? {
            Some(p) => Continue::NewFile(p),
            None => Continue::At(0, GENESIS.to_string()),
        });
    }
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
            let bytes = tail.len() - tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
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
    let Some((c, ok)) = parsed.last() else {
        return Err(refuse(AuditError::Malformed {
            line: total_lines,
            reason: "no line in a non-empty file".into(),
        }));
    };
    if !ok {
        return Err(refuse(AuditError::Edited {
            line: total_lines,
            seq: c.seq,
        }));
    }
    let (exp_seq, exp_prev) = if lines.len() == 2 {
        (parsed[0].0.seq + 1, sm3_hex(lines[0]))
    } else {
        first_line_start(lines[0], c, path, prev_file)?
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
    Ok(Continue::At(c.seq, sm3_hex(lines[lines.len() - 1])))
}

/// The (seq, prev) the only line of the active file must have: the genesis, or, for a
/// rotation header, the next after the newest rotated file's last line. A header
/// whose previous file is gone (removed by hand) is taken as the start, loudly.
fn first_line_start(
    text: &[u8],
    c: &ferry_api::audit::Chain,
    path: &Path,
    prev_file: impl FnOnce() -> anyhow::Result<Option<PrevFile>>,
) -> anyhow::Result<(u64, String)> {
    let meta = LineMeta::parse(1, text)?;
    let Some(r) = meta.rotated_from(c.seq) else {
        return Ok((1, GENESIS.to_string()));
    };
    Ok(match prev_file()? {
        Some(p) => (p.seq + 1, p.full_hash),
        None => {
            tracing::warn!(
                path = %path.display(),
                prev_file = %r.prev_file,
                "audit log: the rotated file this one continues is not present; the chain is checked from this file on"
            );
            (c.seq, c.prev.clone())
        }
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
    use ferry_api::audit::files::verify_chain;
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

    fn small(max_file_size: u64, keep_files: u32) -> AuditOptions {
        AuditOptions {
            max_file_size,
            keep_files,
            sync_interval: Duration::from_millis(20),
            sync_lines: 8,
            checkpoint_every: 1000,
            signer: None,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    /// Issue 16 path 9: the log rotates by size and the chain goes on in the next
    /// file, whose first line names the previous one; old files beyond `keep_files` go.
    #[test]
    fn rotation_carries_the_chain_into_the_next_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // A line is about 330 bytes: a 1 KiB file holds 4 of them.
        let log = AuditLog::open_with(&path, small(1024, 0)).unwrap();
        for i in 0..20 {
            log.append(entry(i)).unwrap();
        }
        drop(log);
        let files = names(dir.path());
        assert!(files.len() >= 5, "{files:?}");
        assert_eq!(files[0], "audit.log");
        assert_eq!(files[1], "audit.log.000001");
        let r = verify_chain(&path).unwrap();
        assert_eq!(r.files.len(), files.len());
        let headers = r.files.len() as u64 - 1;
        assert_eq!(r.entries, 20 + headers);
        assert_eq!(r.continues_from, None);
        // Each rotated-to file starts with a header naming its predecessor.
        let text = std::fs::read_to_string(dir.path().join("audit.log.000002")).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["request"], ROTATE_REQUEST);
        assert_eq!(first["args"]["prev_file"], "audit.log.000001");
        assert_eq!(first["v"], 3);
        for f in &r.files {
            let size = std::fs::metadata(dir.path().join(&f.name)).unwrap().len();
            assert!(size < 1024 + 512, "{}: {size} bytes", f.name);
        }

        // Reopen continues the numbering and the chain; keep_files 2 prunes the rest.
        let log = AuditLog::open_with(&path, small(1024, 2)).unwrap();
        for i in 0..8 {
            log.append(entry(i)).unwrap();
        }
        drop(log);
        let files = names(dir.path());
        assert_eq!(files.len(), 3, "{files:?}");
        let r = verify_chain(&path).unwrap();
        let from = r.continues_from.expect("older files were pruned");
        assert_eq!(
            from.prev_file,
            rotated_name(
                "audit.log",
                files[1].rsplit('.').next().unwrap().parse::<u64>().unwrap() - 1
            )
        );
    }

    /// A crash between rotation's rename and the new file's header leaves no active
    /// file (or an empty one): open writes the header then, as rotation would have.
    #[test]
    fn open_after_a_crash_inside_rotation_writes_the_header() {
        for remove in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            let log = AuditLog::open_with(&path, small(1024, 0)).unwrap();
            for i in 0..6 {
                log.append(entry(i)).unwrap();
            }
            drop(log);
            let r = verify_chain(&path).unwrap();
            // What the crash left: the active file renamed away, no header yet.
            let n = r.files.len() as u64;
            std::fs::rename(&path, dir.path().join(rotated_name("audit.log", n))).unwrap();
            if !remove {
                File::create(&path).unwrap();
            }
            let log = AuditLog::open_with(&path, small(1024, 0)).unwrap();
            log.append(entry(9)).unwrap();
            drop(log);
            let after = verify_chain(&path).unwrap();
            assert_eq!(after.entries, r.entries + 2, "header and the new line");
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.lines().next().unwrap().contains(ROTATE_REQUEST),
                "{text}"
            );
            // A file holding only its header reopens against the rotated file before.
            let log = AuditLog::open_with(&path, small(1 << 20, 0)).unwrap();
            drop(log);
        }
    }

    #[test]
    fn a_lone_header_reopens_against_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open_with(&path, small(1024, 0)).unwrap();
        // Up to the append that rotates: the active file is its header and that line.
        let mut appended = 0;
        while !dir.path().join("audit.log.000001").exists() {
            log.append(entry(appended)).unwrap();
            appended += 1;
        }
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        lines.pop();
        std::fs::write(&path, format!("{}\n", lines[0])).unwrap();
        AuditLog::open_with(&path, small(1024, 0))
            .unwrap()
            .append(entry(5))
            .unwrap();
        // The appended lines, the header, the line after the cut.
        assert_eq!(
            verify_chain(&path).unwrap().entries,
            u64::from(appended) + 1
        );
        // The rotated file's last line edited: the header no longer links to it.
        std::fs::write(&path, format!("{}\n", lines[0])).unwrap();
        let old = dir.path().join("audit.log.000001");
        let t = std::fs::read_to_string(&old).unwrap();
        let mut l: Vec<String> = t.lines().map(str::to_string).collect();
        l.pop();
        std::fs::write(&old, format!("{}\n", l.join("\n"))).unwrap();
        let e = AuditLog::open_with(&path, small(1024, 0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("line 1 (seq {appended}): chain broken")),
            "{e}"
        );
    }

    #[test]
    fn intent_and_outcome_are_durable_and_linked() {
        let (_d, path, _) = make(1);
        let log = AuditLog::open(&path).unwrap();
        let before = log.fsyncs();
        let mut e = entry(1);
        e.request = "pause".into();
        let intent = log.append_intent(e.clone()).unwrap();
        assert_eq!(intent, 2);
        assert_eq!(
            log.fsyncs(),
            before + 1,
            "the intent is fsynced before the action"
        );
        let open = verify(&path).unwrap().open_intents;
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].seq, open[0].request.as_str()), (2, "pause"));
        log.append_outcome(intent, e).unwrap();
        assert_eq!(log.fsyncs(), before + 2);
        let r = verify(&path).unwrap();
        assert!(r.open_intents.is_empty());
        let text = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            (last["intent"].as_u64(), last["result"].as_str()),
            (Some(2), Some("ok"))
        );
    }

    /// Issue 17: batched lines are written at once but fsynced by the count or the
    /// interval, whichever comes first; dropping the log fsyncs the rest.
    #[test]
    fn batched_appends_share_fsyncs() {
        let (_d, path, _) = make(0);
        let log = AuditLog::open_with(&path, small(64 << 20, 0)).unwrap();
        for i in 0..1000 {
            log.append_batched(entry(i)).unwrap();
        }
        let n = log.fsyncs();
        assert!(
            (125..=250).contains(&n),
            "1000 lines, 8 per fsync: {n} fsyncs"
        );
        // Every line is in the file before its fsync.
        assert_eq!(verify(&path).unwrap().entries, 1000);
        // One line alone waits for the interval, not for more lines.
        let before = log.fsyncs();
        log.append_batched(entry(1)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.fsyncs() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            log.fsyncs(),
            before + 1,
            "the flusher synced within the interval"
        );
        for i in 0..3 {
            log.append_batched(entry(i)).unwrap();
        }
        drop(log);
        assert_eq!(verify(&path).unwrap().entries, 1004);
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;
    use ferry_api::audit::checkpoint::{verify_signed, CheckpointVerifier};
    use ferry_transport::nodesig::CertSet;
    use ferry_transport::pki::{AnyClusterCa, TlsSuite};

    struct Certs(CertSet);

    impl CheckpointVerifier for Certs {
        fn verify(&self, alg: &str, cert: &str, msg: &[u8], sig: &[u8]) -> Result<(), String> {
            self.0
                .verify(alg, cert, msg, sig)
                .map_err(|e| e.to_string())
        }
    }

    fn key_and_certs(suite: TlsSuite) -> (Arc<dyn CheckpointSigner>, Certs) {
        let ca = AnyClusterCa::generate([3; 16], suite).unwrap();
        let node = ca.issue_node("primary").unwrap();
        let mut certs = CertSet::default();
        certs.add_pem(&node.cert_pem).unwrap();
        let signer = NodeSigner::from_pem(&node.cert_pem, &node.key_pem).unwrap();
        (Arc::new(NodeKey(signer)), Certs(certs))
    }

    fn status() -> AuditEntry {
        AuditEntry {
            uid: Some(1000),
            gid: Some(100),
            pid: Some(1),
            role: None,
            request: "status".into(),
            args: serde_json::json!({"cmd": "status"}),
            result: Outcome::Ok,
            message: None,
        }
    }

    fn requests(text: &str) -> Vec<String> {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["request"].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// Every `checkpoint_every` lines and at the drop (a clean stop) a checkpoint
    /// signed by the node key, in a gm and in a standard cluster; a restart with
    /// nothing new adds none.
    #[test]
    fn checkpoints_every_n_lines_and_at_a_clean_stop() {
        for suite in [TlsSuite::Gm, TlsSuite::Standard] {
            let (signer, certs) = key_and_certs(suite);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            let opts = AuditOptions {
                checkpoint_every: 3,
                signer: Some(signer),
                ..AuditOptions::default()
            };
            let log = AuditLog::open_with(&path, opts.clone()).unwrap();
            for _ in 0..7 {
                log.append_batched(status()).unwrap();
            }
            drop(log);
            let text = std::fs::read_to_string(&path).unwrap();
            let cp = "audit-checkpoint";
            let s = "status";
            assert_eq!(
                requests(&text),
                [s, s, s, cp, s, s, s, cp, s, cp],
                "{suite:?}"
            );
            let r = verify_signed(&path, &certs).unwrap();
            assert_eq!((r.checkpoints, r.unsigned_tail), (3, 0), "{suite:?}");
            // Reopened and stopped with nothing new: no second checkpoint.
            drop(AuditLog::open_with(&path, opts.clone()).unwrap());
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
            // Without a key (no [tls]): plain lines, an unsigned tail.
            let log = AuditLog::open(&path).unwrap();
            log.append(status()).unwrap();
            drop(log);
            let r = verify_signed(&path, &certs).unwrap();
            assert_eq!((r.checkpoints, r.unsigned_tail), (3, 1));
        }
    }
}
