//! Error type of the journal. `Corruption` (the data on disk is wrong) is kept apart
//! from `Io` (the system call failed) because operators react to them differently.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::format::Seq;

#[derive(thiserror::Error, Debug, Clone)]
pub enum JournalError {
    /// A system call failed. `Arc` because one failure is delivered to every
    /// completion of the affected batch and to every later append.
    #[error("journal io error: {context}")]
    Io {
        context: String,
        #[source]
        source: Arc<io::Error>,
    },
    /// Data on disk is not what the journal wrote: never silently truncated.
    #[error("journal corruption in {} at offset {offset}: {reason}", segment.display())]
    Corruption {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A torn tail was found and `RecoveryMode::AbsoluteConsistency` forbids truncating it.
    #[error("torn tail in {} at offset {offset}: {reason} (refused by RecoveryMode::AbsoluteConsistency)", segment.display())]
    TornTail {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The journal directory belongs to another cluster.
    #[error("segment {} belongs to cluster {found:02x?}, expected {expected:02x?}", segment.display())]
    ClusterMismatch {
        segment: PathBuf,
        expected: [u8; 16],
        found: [u8; 16],
    },
    /// A segment is encrypted and the journal was opened without a key.
    #[error("segment {} is encrypted with key id {key_id}, and no key was configured ([encryption] key_file)", segment.display())]
    KeyRequired {
        segment: PathBuf,
        key_id: ferry_gm::atrest::KeyId,
    },
    /// A segment is encrypted under another key than the configured one.
    #[error("segment {} is encrypted with key id {found}, but the configured key has id {configured}: wrong key file", segment.display())]
    WrongKey {
        segment: PathBuf,
        found: ferry_gm::atrest::KeyId,
        configured: ferry_gm::atrest::KeyId,
    },
    /// Another `Journal` (this or another process) has the directory open.
    #[error("journal directory {} is in use by another journal instance", dir.display())]
    Locked { dir: PathBuf },
    #[error("journal is closed")]
    Closed,
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("invalid journal options: {0}")]
    InvalidOptions(String),
    /// `skip_to` was called at a moment or to a sequence it cannot honour.
    #[error("cannot skip the journal's sequence: {0}")]
    InvalidSkip(String),
    #[error("io_uring engine unavailable: {0}")]
    EngineUnavailable(String),
    /// The reader asked for a sequence that `release_through` already gave up.
    #[error("sequence {requested} has been released (first available is {first_available})")]
    Released {
        requested: Seq,
        first_available: Seq,
    },
}

impl JournalError {
    pub fn io(context: impl Into<String>, source: io::Error) -> JournalError {
        JournalError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;
