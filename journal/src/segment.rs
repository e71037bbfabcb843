//! Segment files: names, opening (O_DIRECT where possible), preparation of spares
//! (fresh files pre-zeroed by real writes, or recycled released segments) and the
//! directory fsyncs that make renames durable.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::AlignedBuf;
use crate::error::{JournalError, Result};
use crate::failpoint;
use crate::format::{BLOCK_SIZE, SEGMENT_HEADER_BLOCK};

pub const SEGMENT_SUFFIX: &str = ".seg";
pub const TMP_SUFFIX: &str = ".seg.tmp";
/// Chunk used when pre-zeroing a new segment.
const ZERO_CHUNK: usize = 1 << 20;

pub fn segment_file_name(no: u64) -> String {
    format!("{no:016}{SEGMENT_SUFFIX}")
}

pub fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(segment_file_name(no))
}

fn tmp_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016}{TMP_SUFFIX}"))
}

/// Parses `0000000000000001.seg` → 1. Anything else → None.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    // `{:016}` pads to at least 16 digits; larger numbers get longer names.
    if digits.len() < 16 || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether O_DIRECT is usable in this directory (false on tmpfs, for instance).
/// Learned on the first open; logged once.
static DIRECT_IO_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Opens a segment for writing, with O_DIRECT when the filesystem supports it.
pub fn open_rw(path: &Path) -> Result<File> {
    let open = if let Err(e) = failpoint::check("journal::segment_open") {
        Err(e)
    } else if DIRECT_IO_UNSUPPORTED.load(Ordering::Relaxed) {
        OpenOptions::new().read(true).write(true).open(path)
    } else {
        open_direct_or_buffered(path).map(|(f, direct)| {
            if !direct {
                DIRECT_IO_UNSUPPORTED.store(true, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), "journal: O_DIRECT not supported here; using buffered IO (durability still by fdatasync)");
            }
            f
        })
    };
    open.map_err(|e| JournalError::io(format!("open {}", path.display()), e))
}

/// Opens `path` read-write with O_DIRECT, or without it where the file system refuses
/// O_DIRECT (EINVAL: older tmpfs, for instance; tmpfs on Linux 6.18 accepts it). The
/// flag says which; the caller logs the fallback (the journal and the undo log may
/// live on different file systems, so each learns for itself).
pub(crate) fn open_direct_or_buffered(path: &Path) -> std::io::Result<(File, bool)> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(|f| (f, false)),
        Err(e) => Err(e),
    }
}

pub fn open_ro(path: &Path) -> Result<File> {
    failpoint::check("journal::segment_open")
        .and_then(|()| File::open(path))
        .map_err(|e| JournalError::io(format!("open {}", path.display()), e))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    failpoint::check("journal::dir_fsync")
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io(format!("fsync directory {}", dir.display()), e))
}

fn write_zeros(file: &File, path: &Path, from: u64, to: u64) -> Result<()> {
    let zeros = AlignedBuf::new_zeroed(ZERO_CHUNK);
    let mut off = from;
    while off < to {
        let n = ((to - off) as usize).min(ZERO_CHUNK);
        failpoint::check("journal::segment_zero")
            .and_then(|()| file.write_all_at(&zeros.as_slice()[..n], off))
            .map_err(|e| JournalError::io(format!("zero {} at {off}", path.display()), e))?;
        off += n as u64;
    }
    Ok(())
}

/// Zeroes `[from, to)` of an existing segment durably (used by recovery to wipe a
/// torn tail so it cannot resurface).
pub fn zero_range(path: &Path, from: u64, to: u64) -> Result<()> {
    let f = open_rw(path)?;
    write_zeros(&f, path, from, to)?;
    failpoint::check("journal::segment_fsync")
        .and_then(|()| f.sync_data())
        .map_err(|e| JournalError::io(format!("fdatasync {}", path.display()), e))
}

/// Creates segment `no` as a fully written zero file of `size` bytes: written under
/// a temporary name, fdatasync'ed, renamed, directory fsync'ed. Why write zeros
/// instead of fallocate: writes into unwritten extents cost a metadata update
/// each (about 2x slower here), and a crash can only leave a `.tmp` file behind.
///
/// On failure the temporary file is removed: a half-zeroed file would hold the very
/// space a retry after ENOSPC waits for.
pub fn create_zeroed(dir: &Path, no: u64, size: u64) -> Result<PathBuf> {
    let tmp = tmp_path(dir, no);
    let _ = fs::remove_file(&tmp);
    let r = (|| {
        let f = failpoint::check("journal::segment_create")
            .and_then(|()| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
            })
            .map_err(|e| JournalError::io(format!("create {}", tmp.display()), e))?;
        drop(f);
        let f = open_rw(&tmp)?;
        write_zeros(&f, &tmp, 0, size)?;
        failpoint::check("journal::segment_fsync")
            .and_then(|()| f.sync_all())
            .map_err(|e| JournalError::io(format!("fsync {}", tmp.display()), e))
    })();
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    publish(dir, &tmp, no)
}

/// Recycles a released segment file as segment `no`: rename to a temporary name,
/// zero its header block (so it reads as an unused spare), rename to the final
/// name, fsync the directory. The old batches stay but are salted with the old
/// number, so they never validate in the new segment.
pub fn recycle(dir: &Path, old: &Path, no: u64) -> Result<PathBuf> {
    let tmp = tmp_path(dir, no);
    failpoint::check("journal::rename")
        .and_then(|()| fs::rename(old, &tmp))
        .map_err(|e| {
            JournalError::io(format!("rename {} -> {}", old.display(), tmp.display()), e)
        })?;
    let f = open_rw(&tmp)?;
    write_zeros(&f, &tmp, 0, SEGMENT_HEADER_BLOCK)?;
    failpoint::check("journal::segment_fsync")
        .and_then(|()| f.sync_data())
        .map_err(|e| JournalError::io(format!("fdatasync {}", tmp.display()), e))?;
    drop(f);
    publish(dir, &tmp, no)
}

/// Gives a prepared temporary file its segment name, durably: rename, then fsync the
/// directory, so after a crash the segment either exists whole or not at all.
fn publish(dir: &Path, tmp: &Path, no: u64) -> Result<PathBuf> {
    let path = segment_path(dir, no);
    failpoint::check("journal::rename")
        .and_then(|()| fs::rename(tmp, &path))
        .map_err(|e| {
            JournalError::io(format!("rename {} -> {}", tmp.display(), path.display()), e)
        })?;
    sync_dir(dir)?;
    Ok(path)
}

pub fn delete(dir: &Path, path: &Path) -> Result<()> {
    fs::remove_file(path).map_err(|e| JournalError::io(format!("delete {}", path.display()), e))?;
    sync_dir(dir)
}

/// Reads exactly `buf.len()` bytes at `offset` (plain pread).
pub fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    failpoint::check("journal::pread")
        .and_then(|()| file.read_exact_at(buf, offset))
        .map_err(|e| {
            JournalError::io(
                format!("read {} bytes of {} at {offset}", buf.len(), path.display()),
                e,
            )
        })
}

pub fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| JournalError::io(format!("stat {}", path.display()), e))
}

const _: () = assert!(ZERO_CHUNK & (BLOCK_SIZE - 1) == 0);

/// Errors of directory listing, separated so recovery can attach the path.
pub fn list_dir(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        if let Some(name) = ent.file_name().to_str() {
            out.push((name.to_string(), ent.path()));
        }
    }
    Ok(out)
}

/// Takes an exclusive `flock` on `dir/LOCK` so two journals (threads or processes)
/// never write the same directory. Released when the returned file is dropped or
/// the process dies.
pub fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io(format!("open {}", path.display()), e))?;
    // SAFETY: flock on a valid fd owned by `f`.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(JournalError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(JournalError::io(format!("flock {}", path.display()), e));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_file_name(1), "0000000000000001.seg");
        assert_eq!(parse_segment_name("0000000000000001.seg"), Some(1));
        assert_eq!(
            parse_segment_name(&segment_file_name(u64::MAX / 10)),
            Some(u64::MAX / 10)
        );
        for bad in [
            "1.seg",
            "000000000000000x.seg",
            "0000000000000001.seg.tmp",
            "LOCK",
            "+000000000000001.seg",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }
}
