//! The undo log's error type: what an operation on the log reports (IO, corruption
//! with file and offset, refused targets and options). Byte-level decode errors
//! are [`UndoFormatError`](super::format::UndoFormatError).

use std::io;
use std::path::{Path, PathBuf};

use crate::undo::entry::UndoPosition;

#[derive(thiserror::Error, Debug)]
pub enum UndoError {
    /// A system call failed.
    #[error("undo io error: {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Data on disk is not what the undo log wrote: never silently truncated.
    #[error("undo log corruption in {} at offset {offset}: {reason}", file.display())]
    Corruption {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("undo segment {} belongs to cluster {found:02x?}, expected {expected:02x?}", file.display())]
    ClusterMismatch {
        file: PathBuf,
        expected: [u8; 16],
        found: [u8; 16],
    },
    /// The entry handed to `append` is malformed (caller bug).
    #[error("invalid undo entry: {0}")]
    InvalidEntry(String),
    /// A rollback / truncate / view target that the log cannot serve (inside a
    /// write-set, or older than the oldest retained entry).
    #[error("invalid undo target: {0}")]
    InvalidTarget(String),
    #[error("invalid undo log options: {0}")]
    InvalidOptions(String),
    /// The position does not name an entry of this log.
    #[error("unknown undo position {0:?}")]
    UnknownPosition(UndoPosition),
    /// A segment is encrypted and the log was opened without a key.
    #[error("undo segment {} is encrypted with key id {key_id}, and no key was configured ([encryption] key_file)", file.display())]
    KeyRequired {
        file: PathBuf,
        key_id: ferry_gm::atrest::KeyId,
    },
    /// A segment is encrypted under a key the configured key file does not hold.
    #[error("undo segment {} is encrypted with key id {found}, but the configured key file has no such key (current key {configured}): wrong key file, or the key was retired too early", file.display())]
    WrongKey {
        file: PathBuf,
        found: ferry_gm::atrest::KeyId,
        configured: ferry_gm::atrest::KeyId,
    },
    /// Sealing failed (the random number generator, or a chunk out of range).
    #[error("undo encryption: {0}")]
    Crypto(String),
    /// An earlier write or truncate failed part-way; the in-memory state may not
    /// match the files. Reopen (recovery repairs the tail).
    #[error("undo log is poisoned by an earlier io error; reopen it")]
    Poisoned,
}

impl UndoError {
    pub(super) fn io(context: impl Into<String>, source: io::Error) -> UndoError {
        UndoError::Io {
            context: context.into(),
            source,
        }
    }
    pub(super) fn corrupt(file: &Path, offset: u64, reason: impl Into<String>) -> UndoError {
        UndoError::Corruption {
            file: file.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn corruption_names_file_and_offset() {
        let e = UndoError::corrupt(Path::new("/undo/0000000000000003.undo"), 8192, "bad crc");
        let s = e.to_string();
        assert!(s.contains("/undo/0000000000000003.undo"), "{s}");
        assert!(s.contains("8192"), "{s}");
        assert!(s.contains("bad crc"), "{s}");
    }

    #[test]
    fn io_error_keeps_its_source() {
        let e = UndoError::io("fsync", io::Error::from_raw_os_error(libc::EIO));
        assert!(e.to_string().contains("fsync"));
        let src = e.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(src.and_then(io::Error::raw_os_error), Some(libc::EIO));
    }
}
