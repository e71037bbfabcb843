//! A volume's backing store ([`Base`]): opening and sizing files and block devices,
//! applying journal records to them in [`WRITE_CHUNK`] pieces, leaving zeros
//! ([`zero_range`]) and finding holes ([`is_hole`], [`file_extents`]). Used by the
//! primary write path, crash replay, the replica applier, catch-up copies, verify and PIT views.
//!
//! A failed fsync poisons its [`Base`] for the life of the process ("fsyncgate"):
//! Linux may drop the dirty pages whose writeback failed and mark them clean, so a
//! later fsync can succeed without the data ever reaching the disk. Every later
//! [`Base::sync`] and [`Base::apply`] fails too, so no checkpoint passes the records
//! the failed fsync covered (the journal keeps them) and the volume group stops;
//! a restart replays them from the journal onto the store.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, OnceLock};

use ferry_journal::{Op, Seq};

use ferry_nbd::{ExportError, Extent};

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
    /// Why this store is poisoned: the first fsync that failed (see the module doc).
    fault: OnceLock<String>,
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
            fault: OnceLock::new(),
        })
    }

    /// Applies one journal record. Used by the applier and by crash replay. Refused
    /// once an fsync failed: the store no longer holds what the journal says it does.
    pub fn apply(&self, op: Op, offset: u64, length: u32, data: &[u8]) -> std::io::Result<()> {
        self.check_fault()?;
        match op {
            Op::Write => write_chunked(&self.file, data, offset),
            Op::Trim => self.punch(offset, length as u64, false),
            Op::WriteZeroes => self.punch(offset, length as u64, true),
            Op::Seal => Ok(()),
        }
    }

    /// Trim and write-zeroes both leave zeros behind (our reads after a trim return
    /// zeros, which the NBD spec allows and which keeps replicas comparable).
    fn punch(&self, offset: u64, len: u64, zero_only: bool) -> std::io::Result<()> {
        zero_range(&self.file, offset, len, self.is_block_device || zero_only)
    }

    /// Makes what was written durable. After one failure every later call fails
    /// as well (see the module doc): the caller must not trust a retry.
    pub fn sync(&self) -> std::io::Result<()> {
        self.sync_with(|f| {
            super::failpoint::check("ferryd::base_fsync")?;
            f.sync_data()
        })
    }

    fn sync_with(&self, fsync: impl FnOnce(&File) -> std::io::Result<()>) -> std::io::Result<()> {
        self.check_fault()?;
        fsync(&self.file).inspect_err(|e| {
            let why = format!(
                "fsync of {} failed ({e}): writes since the last checkpoint may be lost \
                 from it; the volume group stops and a restart replays them from the journal",
                self.path.display()
            );
            tracing::error!(volume = %self.name, "{why}");
            let _ = self.fault.set(why);
        })
    }

    /// Why this store refuses writes and fsyncs, if an fsync of it failed.
    pub fn fault(&self) -> Option<&str> {
        self.fault.get().map(String::as_str)
    }

    fn check_fault(&self) -> std::io::Result<()> {
        match self.fault() {
            Some(why) => Err(std::io::Error::other(why.to_string())),
            None => Ok(()),
        }
    }
}

/// The first store of `bases` an fsync failed on, with why: the volume group is
/// stopped until a restart (status shows it).
pub fn storage_fault(bases: &[Arc<Base>]) -> Option<String> {
    bases.iter().find_map(|b| b.fault().map(str::to_string))
}

/// Largest piece of one buffered write to a base or replica; pieces end on multiples
/// of it. Why: since Linux 6.16 ext4 caches a buffered write in folios as large as the
/// write (up to 2 MiB), and a later 4 KiB overwrite inside such a folio walks every
/// buffer head of it in `ext4_block_write_begin`: after 1 MiB sequential writes, 4 KiB
/// random overwrites cost several times the CPU (benches/README, "Large folios").
/// Pieces of 64 KiB keep that walk at 16 buffer heads for 16 syscalls per MiB.
pub const WRITE_CHUNK: u64 = 64 << 10;

fn write_chunked(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    for (at, r) in write_pieces(offset, data.len()) {
        file.write_all_at(&data[r], at)?;
    }
    Ok(())
}

/// The pieces of a write of `len` bytes at `offset`: (file offset, range of the data),
/// in order, each within one [`WRITE_CHUNK`]-aligned window.
fn write_pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let room = (WRITE_CHUNK - at % WRITE_CHUNK) as usize;
        let n = (len - done).min(room);
        let piece = (at, done..done + n);
        done += n;
        Some(piece)
    })
}

/// Leaves zeros in `[offset, offset + len)` of `file`: a punched hole, or zeroed blocks
/// with `keep_allocated` (devices, write-zeroes); zeros written where the file system
/// or device has neither.
pub fn zero_range(file: &File, offset: u64, len: u64, keep_allocated: bool) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = if keep_allocated {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: plain syscall on an fd we own; arguments are integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    ) {
        return Err(err);
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        write_chunked(file, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Allocation of `[offset, offset + len)` of a file from SEEK_DATA/SEEK_HOLE, at most `max`
/// extents: holes read as zeroes (hole + zero), everything else is data. Where the seeks are
/// unsupported everything is data, which is always correct (a block device reports that too).
/// Used by the primary's volumes and by PIT views (for the ranges they read from the replica).
pub fn file_extents(
    file: &File,
    offset: u64,
    len: u64,
    max: usize,
) -> Result<Vec<Extent>, ExportError> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < max {
        // ENXIO: no data at or after `pos` (the base is at least the volume's size).
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.clamp(pos, end),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                out.push(Extent::data(end - pos));
                break;
            }
            Err(e) => return Err(ExportError::Io(format!("SEEK_DATA: {e}"))),
        };
        if data > pos {
            out.push(Extent::hole(data - pos));
            pos = data;
            continue;
        }
        // A concurrent hole punch may leave no hole past `pos`: then the rest is data.
        let hole = match seek(file, pos, libc::SEEK_HOLE) {
            Ok(h) if h > pos => h.min(end),
            Ok(_) => end,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(ExportError::Io(format!("SEEK_HOLE: {e}"))),
        };
        out.push(Extent::data(hole - pos));
        pos = hole;
    }
    Ok(out)
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let pos =
        libc::off_t::try_from(pos).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a valid, owned fd; no memory is passed. The fd's offset is not used
    // by anyone else (all I/O on the base is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    u64::try_from(r).map_err(|_| std::io::Error::last_os_error())
}

/// Whether `[offset, offset + len)` of `file` holds no data (a hole). Any doubt
/// (block devices, filesystems without SEEK_DATA) answers false: the bytes are read.
pub fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on an fd we own; it only moves a file offset nobody else uses
    // (all our IO is positional).
    let next = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `offset`.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset + len
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

/// The base of `volume`, for record `seq`: the one lookup used by crash replay, the
/// replica applier and the PIT paths. A volume id missing from the config is an error
/// (a record must never be dropped silently).
pub fn find_base(bases: &[Arc<Base>], volume: u32, seq: Seq) -> anyhow::Result<&Arc<Base>> {
    bases.iter().find(|b| b.id == volume).ok_or_else(|| {
        anyhow::anyhow!(
            "journal record {seq} is for volume id {volume}, which is not in the config \
             (restore the volume's [[volume]] section)"
        )
    })
}

#[cfg(test)]
mod write_tests {
    use super::*;

    #[test]
    fn large_writes_are_cut_on_chunk_boundaries() {
        let c = WRITE_CHUNK;
        let cases: &[(u64, usize)] = &[
            (0, 0),
            (0, 4096),
            (0, c as usize),
            (0, 1 << 20),
            (4096, 1 << 20),
            (c - 512, 1024),
            (3 * c + 7, 5 * c as usize + 13),
        ];
        for &(offset, len) in cases {
            let pieces: Vec<_> = write_pieces(offset, len).collect();
            // Contiguous, in order, covering exactly the write.
            let mut next = 0usize;
            for (at, r) in &pieces {
                assert_eq!(r.start, next, "{offset}+{len}: {pieces:?}");
                assert_eq!(*at, offset + r.start as u64);
                assert!(!r.is_empty() && r.len() as u64 <= c);
                // Never across a window boundary.
                assert_eq!(at / c, (at + r.len() as u64 - 1) / c, "{offset}+{len}");
                next = r.end;
            }
            assert_eq!(next, len, "{offset}+{len}: {pieces:?}");
            // As few pieces as the windows allow.
            let windows = if len == 0 {
                0
            } else {
                (offset + len as u64 - 1) / c - offset / c + 1
            };
            assert_eq!(pieces.len() as u64, windows, "{offset}+{len}");
        }
    }

    #[test]
    fn a_chunked_write_lands_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v.img");
        let size = 4 << 20;
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let base = Base::open(1, "v", &path, size).unwrap();
        let data: Vec<u8> = (0..(1 << 20) + 4097u32).map(|i| (i % 251) as u8).collect();
        let at = WRITE_CHUNK - 100;
        base.apply(Op::Write, at, data.len() as u32, &data).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[at as usize..at as usize + data.len()], &data[..]);
        assert!(back[..at as usize].iter().all(|&b| b == 0));
        assert!(back[at as usize + data.len()..].iter().all(|&b| b == 0));
    }

    /// fsyncgate: once an fsync failed, a later one must not report success (the
    /// kernel may have dropped the failed pages), and nothing more is written.
    #[test]
    fn a_failed_fsync_poisons_the_store_for_good() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("v.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let base = Arc::new(Base::open(1, "v", &path, 1 << 20).unwrap());
        base.apply(Op::Write, 0, 4, b"abcd").unwrap();
        base.sync().unwrap();
        assert_eq!(storage_fault(std::slice::from_ref(&base)), None);
        let e = base
            .sync_with(|_| Err(std::io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let again = base.sync().unwrap_err().to_string();
        assert!(
            again.contains("fsync of") && again.contains("restart"),
            "{again}"
        );
        assert!(
            base.apply(Op::Write, 0, 4, b"wxyz").is_err(),
            "a write after the fault"
        );
        assert!(
            base.apply(Op::Trim, 0, 4096, &[]).is_err(),
            "a trim after the fault"
        );
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"abcd");
        let why = storage_fault(&[base]).expect("the group reports the fault");
        assert!(why.contains("v.img"), "{why}");
    }
}
