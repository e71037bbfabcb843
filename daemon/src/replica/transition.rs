//! The standby's resync transition as status, the applier and resync copies see it
//! ([`ResyncStatus`], mirroring the metadata), with the progress of the current copy.
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde_json::json;

use crate::store::meta::{Meta, MetaError, ResyncState};

/// The standby's resync transition (mirrors the metadata) and the progress of the
/// copy in the current session.
#[derive(Debug, Default)]
pub struct ResyncStatus {
    state: Mutex<Option<ResyncState>>,
    /// Bytes of the current copy applied here, and announced by the primary.
    pub copied_bytes: AtomicU64,
    pub total_bytes: AtomicU64,
}

impl ResyncStatus {
    pub fn load(meta: &Meta) -> Result<ResyncStatus, MetaError> {
        Ok(ResyncStatus {
            state: Mutex::new(meta.resync_state()?),
            ..Default::default()
        })
    }

    pub fn get(&self) -> Option<ResyncState> {
        *self.state.lock()
    }

    pub fn set(&self, s: Option<ResyncState>) {
        *self.state.lock() = s;
    }

    /// A copy was started and not finished: the replica holds parts of it.
    pub fn copy_incomplete(&self) -> bool {
        self.get().is_some_and(|s| !s.copied)
    }

    pub fn status(&self) -> serde_json::Value {
        match self.get() {
            None => serde_json::Value::Null,
            Some(s) => json!({
                "from_seq": s.from,
                "snapshot_seq": s.snapshot,
                "through_seq": (s.through > 0).then_some(s.through),
                "copied": s.copied,
                "copied_bytes": self.copied_bytes.load(Ordering::Relaxed),
                "total_bytes": self.total_bytes.load(Ordering::Relaxed),
            }),
        }
    }
}
