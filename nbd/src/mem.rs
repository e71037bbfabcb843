//! Simple exports for tests and benchmarks: an in-memory export (with
//! allocation tracking, for block status), a
//! file-backed export (pread/pwrite on the blocking pool) and a registry
//! backed by an ordered list.
//!
//! These are not the production write path (that is ferryd's `volume`); they
//! exist so the NBD server can be exercised and benchmarked on its own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::{Export, ExportError, ExportFlags, ExportRegistry, Extent};

/// Capabilities of the test exports: everything, and multi-conn is safe
/// because all connections share one backing store with no private cache.
pub const ALL_FLAGS: ExportFlags = ExportFlags {
    read_only: false,
    can_trim: true,
    can_write_zeroes: true,
    can_multi_conn: true,
    send_fua: true,
    send_flush: true,
};

/// Allocation granularity of [`MemExport`].
pub const MEM_BLOCK: u64 = 4096;

/// Allocation state of one [`MEM_BLOCK`] of a [`MemExport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Never written, or trimmed: a hole reading as zeroes.
    Hole,
    /// Written.
    Data,
    /// Zeroed with NO_HOLE: allocated, reading as zeroes.
    Zero,
}

struct Store {
    bytes: Vec<u8>,
    blocks: Vec<Block>,
}

impl Store {
    /// Set the state of the blocks wholly inside `r`.
    fn set_whole(&mut self, r: &std::ops::Range<usize>, b: Block) {
        let first = (r.start as u64).div_ceil(MEM_BLOCK) as usize;
        let end = (r.end as u64 / MEM_BLOCK) as usize;
        if first < end {
            self.blocks[first..end].fill(b);
        }
    }

    /// Set the state of every block `r` touches.
    fn set_touched(&mut self, r: &std::ops::Range<usize>, b: Block) {
        if r.is_empty() {
            return;
        }
        let first = (r.start as u64 / MEM_BLOCK) as usize;
        let end = ((r.end as u64).div_ceil(MEM_BLOCK) as usize).min(self.blocks.len());
        self.blocks[first..end].fill(b);
    }
}

/// In-memory export with allocation tracking per 4 KiB block, so block
/// status and sparse reads can be tested: it starts as one hole; writes
/// allocate, trims and write-zeroes (unless NO_HOLE) punch whole blocks.
/// Trim and write-zeroes both zero the range, so after a discard the range
/// is guaranteed to read back as zeroes (tests rely on it).
pub struct MemExport {
    name: String,
    data: RwLock<Store>,
    flags: ExportFlags,
    /// Artificial latency per operation, to hold requests in flight in tests.
    delay: Duration,
    fast_zero: bool,
    flushes: AtomicU64,
    bytes_read: AtomicU64,
}

impl MemExport {
    pub fn new(name: impl Into<String>, size: usize) -> Self {
        let blocks = (size as u64).div_ceil(MEM_BLOCK) as usize;
        MemExport {
            name: name.into(),
            data: RwLock::new(Store {
                bytes: vec![0u8; size],
                blocks: vec![Block::Hole; blocks],
            }),
            flags: ALL_FLAGS,
            delay: Duration::ZERO,
            fast_zero: false,
            flushes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
        }
    }

    pub fn with_flags(mut self, flags: ExportFlags) -> Self {
        self.flags = flags;
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Claim fast zeroing (FAST_ZERO requests then proceed).
    pub fn with_fast_zero(mut self, fast: bool) -> Self {
        self.fast_zero = fast;
        self
    }

    /// Number of flush calls served (FUA writes count as one too).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Bytes returned by `read` so far (to check that clients skip holes).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Copy of a range, for assertions. Panics on out-of-range (test helper).
    pub fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.read().bytes[offset..offset + len].to_vec()
    }

    /// Write directly (test set-up). Panics on out-of-range (test helper).
    pub fn fill(&self, offset: usize, data: &[u8]) {
        let mut s = self.data.write();
        let r = offset..offset + data.len();
        s.bytes[r.clone()].copy_from_slice(data);
        s.set_touched(&r, Block::Data);
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ExportError> {
        // The server validates ranges already; re-check so a misbehaving
        // caller gets an error instead of a panic.
        let size = self.data.read().bytes.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} outside export of {size} bytes"
            ))),
        }
    }

    fn zero(&self, offset: u64, len: u32, punch: bool) -> Result<(), ExportError> {
        let r = self.range(offset, len.into())?;
        let mut s = self.data.write();
        s.bytes[r.clone()].fill(0);
        s.set_whole(&r, if punch { Block::Hole } else { Block::Zero });
        Ok(())
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.data.read().bytes.len() as u64
    }

    fn flags(&self) -> ExportFlags {
        self.flags
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.pause().await;
        let r = self.range(offset, len.into())?;
        self.bytes_read.fetch_add(len.into(), Ordering::Relaxed);
        Ok(Bytes::copy_from_slice(&self.data.read().bytes[r]))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.pause().await;
        let r = self.range(offset, data.len() as u64)?;
        let mut s = self.data.write();
        s.bytes[r.clone()].copy_from_slice(&data);
        s.set_touched(&r, Block::Data);
        if fua {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.pause().await;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.pause().await;
        self.zero(offset, len, true)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<(), ExportError> {
        self.pause().await;
        self.zero(offset, len, may_trim)
    }

    async fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, ExportError> {
        let r = self.range(offset, len)?;
        let s = self.data.read();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = r.start as u64;
        while pos < r.end as u64 {
            let b = s.blocks[(pos / MEM_BLOCK) as usize];
            let n = (MEM_BLOCK - pos % MEM_BLOCK).min(r.end as u64 - pos);
            let e = Extent {
                len: n,
                hole: b == Block::Hole,
                zero: b != Block::Data,
            };
            let full = out.len() >= max;
            match out.last_mut() {
                Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += n,
                _ if full => break,
                _ => out.push(e),
            }
            pos += n;
        }
        Ok(out)
    }

    fn fast_zero(&self) -> bool {
        self.fast_zero
    }
}

/// File-backed export using positional I/O on tokio's blocking pool. Used
/// to benchmark the protocol layer against `nbdkit file`.
pub struct FileExport {
    name: String,
    file: Arc<File>,
    size: u64,
    flags: ExportFlags,
}

impl FileExport {
    pub fn open(name: impl Into<String>, path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(FileExport {
            name: name.into(),
            file: Arc::new(file),
            size,
            flags: ExportFlags {
                read_only,
                ..ALL_FLAGS
            },
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, ExportError> {
        let file = self.file.clone();
        match tokio::task::spawn_blocking(move || f(&file)).await {
            Ok(r) => r.map_err(io_err),
            Err(e) => Err(ExportError::Io(format!("blocking task failed: {e}"))),
        }
    }
}

fn io_err(e: std::io::Error) -> ExportError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ExportError::NoSpace,
        _ => ExportError::Io(e.to_string()),
    }
}

/// fallocate(2) wrapper; `Err` when the filesystem does not support `mode`.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u32) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, owned fd; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            libc::off_t::from(len),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_zero_bytes(file: &File, offset: u64, len: u32) -> std::io::Result<()> {
    const CHUNK: u32 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0u32;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeroes[..n as usize], offset + u64::from(done))?;
        done += n;
    }
    Ok(())
}

impl Export for FileExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        self.flags
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.blocking(move |f| {
            let mut buf = BytesMut::zeroed(len as usize);
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf.freeze())
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        self.blocking(move |f| {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        self.blocking(|f| f.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.blocking(move |f| {
            // Trim is advisory; if hole punching is unsupported do nothing.
            let _ = fallocate(
                f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
            Ok(())
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<(), ExportError> {
        self.blocking(move |f| {
            let mode = if may_trim {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            if fallocate(f, mode, offset, len).is_ok() {
                return Ok(());
            }
            write_zero_bytes(f, offset, len)
        })
        .await
    }
}

/// Registry over a fixed, ordered list of exports; the first one is the
/// default export.
pub struct MapRegistry<E: Export> {
    exports: Vec<Arc<E>>,
}

impl<E: Export> MapRegistry<E> {
    pub fn new(exports: Vec<Arc<E>>) -> Self {
        MapRegistry { exports }
    }
}

impl<E: Export> ExportRegistry for MapRegistry<E> {
    type E = E;

    fn lookup(&self, name: &str) -> Option<Arc<E>> {
        self.exports.iter().find(|e| e.name() == name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.exports.iter().map(|e| e.name().to_owned()).collect()
    }

    fn default_export(&self) -> Option<String> {
        self.exports.first().map(|e| e.name().to_owned())
    }
}
