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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_transition_and_the_copy_progress() {
        let s = ResyncStatus::default();
        assert_eq!(s.status(), serde_json::Value::Null);
        assert!(!s.copy_incomplete());
        s.set(Some(ResyncState {
            from: 10,
            snapshot: 50,
            through: 0,
            copied: false,
        }));
        s.copied_bytes.store(4096, Ordering::Relaxed);
        s.total_bytes.store(8192, Ordering::Relaxed);
        assert!(s.copy_incomplete());
        let v = s.status();
        assert_eq!(v["from_seq"], 10);
        assert_eq!(v["snapshot_seq"], 50);
        assert_eq!(
            v["through_seq"],
            serde_json::Value::Null,
            "0 means not known yet"
        );
        assert_eq!(
            (v["copied_bytes"].as_u64(), v["total_bytes"].as_u64()),
            (Some(4096), Some(8192))
        );
        s.set(Some(ResyncState {
            from: 10,
            snapshot: 50,
            through: 60,
            copied: true,
        }));
        assert!(!s.copy_incomplete());
        assert_eq!(s.status()["through_seq"], 60);
        s.set(None);
        assert_eq!(s.get(), None);
    }
}
