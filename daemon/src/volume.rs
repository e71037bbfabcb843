//! Protected volumes and the journal-first write path.
//!
//! All volumes of a daemon form one consistency group: they share one journal and one
//! global sequence, so write order across volumes is preserved everywhere downstream.
//!
//! A write travels:
//! 1. NBD task → `Journal::append` (assigns the sequence; the writer thread group-commits
//!    it with O_DIRECT and makes it durable);
//! 2. the journal's completion (called strictly in sequence order) hands the record to
//!    the single **applier** thread through a bounded channel;
//! 3. the applier writes it to the base volume — in sequence order, so the base always
//!    equals "checkpoint + journal prefix", which is exactly what crash replay rebuilds —
//!    advances `applied_seq`, and only then answers the NBD task, which replies.
//!
//! So an acknowledged write is durable (journal) and visible to reads (base). A FLUSH
//! therefore has nothing left to make durable; it only seals the current write-set.
//! Because every acknowledgement implies durability, FLUSH on any connection covers
//! writes acknowledged on every connection: `CAN_MULTI_CONN` is advertised truthfully.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use ferry_journal::{Journal, JournalError, Op, Record, Seq};
use tokio::sync::{oneshot, Semaphore};

use crate::nbd::{Export, ExportError, ExportFlags, ExportRegistry};

/// Reads above this size go to a blocking-pool thread; smaller ones are served inline,
/// because a page-cache pread of a few KiB costs less than a thread hand-off.
const INLINE_READ_MAX: u32 = 64 << 10;
/// Bound on records waiting for the applier; the journal completion thread blocks
/// (backpressure) when it is full.
const APPLY_QUEUE: usize = 4096;

/// A volume's backing store: a file or a block device.
pub struct Base {
    /// Volume id carried in journal records; persisted per name in the metadata store
    /// so a reordered config cannot make replay write a record to the wrong volume.
    pub id: u32,
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub file: File,
    is_block_device: bool,
}

impl Base {
    /// Opens an existing backing file or device and checks it is large enough.
    pub fn open(id: u32, name: &str, path: &Path, size: u64) -> anyhow::Result<Base> {
        use anyhow::Context;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| {
                format!(
                    "volume '{name}': cannot open backing store {} (create it with `ferryctl init`, or point volume.path at an existing file or block device)",
                    path.display()
                )
            })?;
        let md = file
            .metadata()
            .with_context(|| format!("volume '{name}': stat {}", path.display()))?;
        use std::os::unix::fs::FileTypeExt;
        let is_block_device = md.file_type().is_block_device();
        let actual = if is_block_device {
            block_device_size(&file)
                .with_context(|| format!("volume '{name}': size of {}", path.display()))?
        } else {
            md.len()
        };
        if actual < size {
            anyhow::bail!(
                "volume '{name}': backing store {} holds {actual} bytes but the config says {size}; refusing to serve a volume larger than its store",
                path.display()
            );
        }
        Ok(Base {
            id,
            name: name.to_string(),
            path: path.to_path_buf(),
            size,
            file,
            is_block_device,
        })
    }

    /// Applies one journal record. Used by the applier and by crash replay.
    pub fn apply(&self, op: Op, offset: u64, length: u32, data: &[u8]) -> std::io::Result<()> {
        match op {
            Op::Write => self.file.write_all_at(data, offset),
            Op::Trim => self.punch(offset, length as u64, false),
            Op::WriteZeroes => self.punch(offset, length as u64, true),
            Op::Seal => Ok(()),
        }
    }

    /// Trim and write-zeroes both leave zeros behind (our reads after a trim return
    /// zeros, which the NBD spec allows and which keeps replicas comparable).
    fn punch(&self, offset: u64, len: u64, zero_only: bool) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mode = if self.is_block_device || zero_only {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: plain syscall on an fd we own; arguments are integers.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            // Filesystems or devices without fallocate modes: write zeros instead.
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => self.write_zeros(offset, len),
            _ => Err(err),
        }
    }

    fn write_zeros(&self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        while len > 0 {
            let n = len.min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

struct ApplyItem {
    seq: Seq,
    base: Arc<Base>,
    op: Op,
    offset: u64,
    length: u32,
    data: Bytes,
    /// `None` for seal records: nobody waits for them, but they pass through the
    /// applier so `applied_seq` stays contiguous.
    reply: Option<oneshot::Sender<Result<(), ExportError>>>,
}

/// State shared by every volume of the consistency group.
pub struct Group {
    pub journal: Arc<Journal>,
    apply_tx: crossbeam_channel::Sender<ApplyItem>,
    /// Highest sequence applied to the base volumes (contiguous: the applier runs in order).
    pub applied_seq: Arc<AtomicU64>,
    /// Set when a base volume failed a write after its record was journaled: the base no
    /// longer equals the journal prefix, so we stop taking writes and stop advancing
    /// `applied_seq` (the checkpoint never passes the failure; restart replays it).
    pub failed: Arc<AtomicBool>,
    /// Journal queue slots: async writers wait here instead of blocking a runtime thread
    /// inside `Journal::append`.
    slots: Arc<Semaphore>,
    /// Writes since the last write-set seal.
    dirty: AtomicBool,
    /// Seal records apply nothing; the applier item still names a base.
    seal_base: Arc<Base>,
    applier: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl Group {
    pub fn start(
        journal: Arc<Journal>,
        seal_base: Arc<Base>,
        applied_from: Seq,
        queue_slots: usize,
    ) -> Arc<Group> {
        let (apply_tx, apply_rx) = crossbeam_channel::bounded::<ApplyItem>(APPLY_QUEUE);
        let applied_seq = Arc::new(AtomicU64::new(applied_from));
        let failed = Arc::new(AtomicBool::new(false));
        let applier = {
            let applied_seq = applied_seq.clone();
            let failed = failed.clone();
            std::thread::Builder::new()
                .name("ferry-applier".into())
                .spawn(move || run_applier(apply_rx, applied_seq, failed))
                .map_err(|e| tracing::error!("cannot start applier thread: {e}"))
                .ok()
        };
        if applier.is_none() {
            failed.store(true, Ordering::SeqCst);
        }
        Arc::new(Group {
            journal,
            apply_tx,
            applied_seq,
            failed,
            slots: Arc::new(Semaphore::new(queue_slots.max(1))),
            dirty: AtomicBool::new(false),
            seal_base,
            applier: parking_lot::Mutex::new(applier),
        })
    }

    /// Journals a mutation, then waits until it is applied to the base.
    async fn mutate(
        &self,
        base: &Arc<Base>,
        op: Op,
        offset: u64,
        length: u32,
        data: Bytes,
    ) -> Result<(), ExportError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(ExportError::Io(
                "volume group failed an earlier base write; restart ferryd to replay the journal"
                    .into(),
            ));
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ExportError::ShuttingDown)?;
        let (tx, rx) = oneshot::channel();
        let item_base = base.clone();
        let apply_tx = self.apply_tx.clone();
        let item_data = data.clone();
        let done: ferry_journal::Completion = Box::new(move |res: Result<Seq, JournalError>| {
            drop(permit);
            match res {
                Ok(seq) => {
                    let item = ApplyItem {
                        seq,
                        base: item_base,
                        op,
                        offset,
                        length,
                        data: item_data,
                        reply: Some(tx),
                    };
                    // Blocks only when the applier is APPLY_QUEUE behind: backpressure.
                    if let Err(e) = apply_tx.send(item) {
                        e.0.answer(Err(ExportError::ShuttingDown));
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(ExportError::Io(format!("journal: {e}"))));
                }
            }
        });
        let rec = Record {
            volume: base.id,
            op,
            offset,
            length,
            data,
        };
        self.journal
            .append(rec, done)
            .map_err(|e| ExportError::Io(format!("journal: {e}")))?;
        self.dirty.store(true, Ordering::Relaxed);
        rx.await.map_err(|_| ExportError::ShuttingDown)?
    }

    /// Seals the current write-set if anything was written since the last seal. The
    /// seal needs no wait: every acknowledged write is already durable; the seal only
    /// marks a boundary for shipping and point-in-time recovery.
    pub fn seal(&self, marker: Bytes) -> Result<(), ExportError> {
        if !self.dirty.swap(false, Ordering::Relaxed) && marker.is_empty() {
            return Ok(());
        }
        let rec = Record {
            volume: 0,
            op: Op::Seal,
            offset: 0,
            length: 0,
            data: marker,
        };
        let apply_tx = self.apply_tx.clone();
        let base = self.seal_base.clone();
        let done: ferry_journal::Completion = Box::new(move |res: Result<Seq, JournalError>| {
            if let Ok(seq) = res {
                let _ = apply_tx.send(ApplyItem {
                    seq,
                    base,
                    op: Op::Seal,
                    offset: 0,
                    length: 0,
                    data: Bytes::new(),
                    reply: None,
                });
            }
        });
        self.journal
            .append(rec, done)
            .map(|_| ())
            .map_err(|e| ExportError::Io(format!("journal: {e}")))
    }

    /// Stops the applier after everything queued was applied. Call after the frontends
    /// stopped and the journal drained.
    pub fn stop_applier(&self) {
        // The applier exits when every sender is gone; ours is the last once the
        // journal (holding completions) is closed, so send nothing and just join if
        // the channel is disconnected; otherwise wait for the queue to empty.
        while !self.apply_tx.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = self.applier.lock().take();
    }
}

impl ApplyItem {
    fn answer(self, r: Result<(), ExportError>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(r);
        }
    }
}

fn run_applier(
    rx: crossbeam_channel::Receiver<ApplyItem>,
    applied_seq: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
) {
    for item in rx.iter() {
        if failed.load(Ordering::Relaxed) {
            item.answer(Err(ExportError::Io(
                "volume group failed an earlier base write".into(),
            )));
            continue;
        }
        match item
            .base
            .apply(item.op, item.offset, item.length, &item.data)
        {
            Ok(()) => {
                applied_seq.store(item.seq, Ordering::Release);
                item.answer(Ok(()));
            }
            Err(e) => {
                failed.store(true, Ordering::SeqCst);
                tracing::error!(
                    volume = %item.base.name,
                    seq = item.seq,
                    offset = item.offset,
                    "base volume write failed after the record was journaled: {e}; \
                     refusing further writes; the record stays in the journal and is replayed on restart"
                );
                let reply = if e.raw_os_error() == Some(libc::ENOSPC) {
                    ExportError::NoSpace
                } else {
                    ExportError::Io(format!("base volume {}: {e}", item.base.path.display()))
                };
                item.answer(Err(reply));
            }
        }
    }
}

/// A protected volume served as an NBD export.
pub struct Volume {
    pub base: Arc<Base>,
    pub group: Arc<Group>,
}

impl Volume {
    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.base.size => Ok(()),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {}",
                self.base.size
            ))),
        }
    }
}

impl Export for Volume {
    fn name(&self) -> &str {
        &self.base.name
    }

    fn size(&self) -> u64 {
        self.base.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags {
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
            send_fua: true,
            send_flush: true,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.check(offset, len as u64)?;
        let base = self.base.clone();
        let read = move || -> Result<Bytes, ExportError> {
            let mut buf = BytesMut::zeroed(len as usize);
            base.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| ExportError::Io(format!("read {}: {e}", base.path.display())))?;
            Ok(buf.freeze())
        };
        if len <= INLINE_READ_MAX {
            read()
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|e| ExportError::Io(format!("read task: {e}")))?
        }
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        // FUA needs nothing extra: the write is acknowledged only once journaled durably.
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| ExportError::Invalid("write larger than 4 GiB".into()))?;
        self.group
            .mutate(&self.base, Op::Write, offset, len, data)
            .await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.group.seal(Bytes::new())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.check(offset, len as u64)?;
        self.group
            .mutate(&self.base, Op::Trim, offset, len, Bytes::new())
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        self.check(offset, len as u64)?;
        self.group
            .mutate(&self.base, Op::WriteZeroes, offset, len, Bytes::new())
            .await
    }
}

/// The daemon's exports, by name.
pub struct Registry {
    pub volumes: Vec<Arc<Volume>>,
}

impl ExportRegistry for Registry {
    type E = Volume;
    fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.iter().find(|v| v.base.name == name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.base.name.clone()).collect()
    }
    fn default_export(&self) -> Option<String> {
        self.volumes.first().map(|v| v.base.name.clone())
    }
}
