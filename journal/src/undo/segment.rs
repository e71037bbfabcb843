//! Undo segment files: names, the open segment's handles and length, opening for
//! O_DIRECT appends, positioned reads, creating a new segment atomically (temporary
//! name, rename, directory fsync) and the directory fsyncs that make renames and
//! deletions durable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::failpoint;
use crate::undo::error::UndoError;

pub const UNDO_SEGMENT_SUFFIX: &str = ".undo";
pub const UNDO_TMP_SUFFIX: &str = ".undo.tmp";

/// Segment `no`'s file name: `{no:016}.undo`.
pub fn undo_segment_file_name(no: u64) -> String {
    format!("{no:016}{UNDO_SEGMENT_SUFFIX}")
}

/// `0000000000000001.undo` → 1; anything else → None.
pub fn parse_undo_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(UNDO_SEGMENT_SUFFIX)?;
    if digits.len() < 16 || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Makes creations, renames and deletions in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), UndoError> {
    failpoint::check("undo::dir_fsync")
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| UndoError::io(format!("fsync directory {}", dir.display()), e))
}

/// Opens a segment for appends with O_DIRECT, or buffered where the file system
/// refuses O_DIRECT (older tmpfs, for instance; durability is the same `fdatasync`).
pub(super) fn open_direct(path: &Path) -> Result<File, UndoError> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let (f, direct) = failpoint::check("undo::segment_open")
        .and_then(|()| crate::segment::open_direct_or_buffered(path))
        .map_err(|e| UndoError::io(format!("open {}", path.display()), e))?;
    if !direct {
        WARNED.call_once(|| {
            tracing::warn!(path = %path.display(), "undo log: O_DIRECT not supported here; appending through the page cache");
        });
    }
    Ok(f)
}

pub(super) fn read_at(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), UndoError> {
    failpoint::check("undo::pread")
        .and_then(|()| file.read_exact_at(buf, offset))
        .map_err(|e| {
            UndoError::io(
                format!("read {} bytes of {} at {offset}", buf.len(), path.display()),
                e,
            )
        })
}

/// One segment file of an open log.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) no: u64,
    pub(super) path: PathBuf,
    /// Buffered descriptor: reads, truncation.
    pub(super) file: File,
    /// Appends (O_DIRECT where the file system allows it), opened on first use.
    /// Only aligned segments are appended to.
    pub(super) direct: Option<File>,
    /// Entries are 4 KiB aligned (see
    /// [`UNDO_SEGMENT_FLAG_ALIGNED`](crate::undo::format::UNDO_SEGMENT_FLAG_ALIGNED)).
    pub(super) aligned: bool,
    /// File length: the next entry's offset.
    pub(super) len: u64,
    /// Index in the log's points of this segment's first entry.
    pub(super) first_point: usize,
    pub(super) entries: usize,
    /// A sealed segment's data key (unwrapped on open or drawn at creation).
    pub(super) key: Option<std::sync::Arc<ferry_gm::atrest::DataKey>>,
    /// Whether a sealed segment may take more entries: only one this log created
    /// and has not cut since (see `seal`'s nonce rule). Plaintext segments ignore it.
    pub(super) appendable: bool,
}

/// Opens an existing segment (buffered, read-write: recovery reads it and may
/// truncate a torn tail).
pub(super) fn open_existing(path: &Path) -> Result<File, UndoError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| UndoError::io(format!("open {}", path.display()), e))
}

/// Creates segment `no` in `dir` holding `image` (header block and first entry):
/// written under `.undo.tmp`, fdatasync'ed, renamed, directory fsync'ed, so a crash
/// leaves either no segment or a complete one. Returns the (buffered) file. On
/// failure before the rename the temporary file is removed (a partial one would
/// hold the space a retry after ENOSPC waits for).
pub(super) fn create_durably(dir: &Path, no: u64, image: &[u8]) -> Result<File, UndoError> {
    let tmp = dir.join(format!("{no:016}{UNDO_TMP_SUFFIX}"));
    let path = dir.join(undo_segment_file_name(no));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = failpoint::check("undo::segment_create")
            .and_then(|()| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
            })
            .map_err(|e| UndoError::io(format!("create {}", tmp.display()), e))?;
        failpoint::check("undo::segment_write")
            .and_then(|()| f.write_all(image))
            .and_then(|()| failpoint::check("undo::segment_fsync"))
            .and_then(|()| f.sync_data())
            .and_then(|()| failpoint::check("undo::rename"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                UndoError::io(
                    format!(
                        "write {} and rename it to {}",
                        tmp.display(),
                        path.display()
                    ),
                    e,
                )
            })?;
        Ok(f)
    })();
    let f = match written {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    sync_dir(dir)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(undo_segment_file_name(1), "0000000000000001.undo");
        assert_eq!(parse_undo_segment_name("0000000000000001.undo"), Some(1));
        assert_eq!(
            parse_undo_segment_name(&undo_segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_undo_segment_name("0000000000000001.seg"), None);
        assert_eq!(parse_undo_segment_name("1.undo"), None);
        assert_eq!(parse_undo_segment_name("0000000000000001.undo.tmp"), None);
    }

    #[test]
    fn create_durably_leaves_only_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        // A leftover temporary file of an earlier attempt is replaced, not an error.
        std::fs::write(
            dir.path().join(format!("{:016}{UNDO_TMP_SUFFIX}", 7)),
            b"old",
        )
        .unwrap();
        let f = create_durably(dir.path(), 7, b"image").unwrap();
        let mut back = [0u8; 5];
        read_at(&f, dir.path(), &mut back, 0).unwrap();
        assert_eq!(&back, b"image");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![undo_segment_file_name(7)]);
    }
}
