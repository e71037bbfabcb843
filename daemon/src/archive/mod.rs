//! Archive targets on the primary (`[[replication.target]] kind = "archive"`): the cold
//! tier. Each target runs beside the QUIC shippers: it uploads a base image of every
//! volume when the archive has none (or the journal no longer reaches back to what
//! it holds), then tails the journal with the shippers' reader thread, turns its
//! write-sets into `ferry_archive` write-sets and uploads them as packs (when a pack
//! is full, or every `flush_interval`). Its archived sequence holds the journal's
//! release floor, so nothing unarchived is released.
//!
//! [`ArchiveState`] is what status and the release floor read; [`run`] owns the loop.
pub mod run;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::config::Config;
use ferry_api::status::ArchiveStatus;
use ferry_journal::{now_ns, Seq};
use parking_lot::Mutex;

/// One archive target's live state.
pub struct ArchiveState {
    pub name: String,
    pub url: String,
    pub flush_interval: Duration,
    /// Newest write-set boundary the archive holds durably: the release floor.
    archived: AtomicU64,
    /// The primary's time of that write-set (ns since the Unix epoch; 0: unknown).
    archived_ts: AtomicU64,
    bytes_uploaded: AtomicU64,
    /// State name and last error.
    phase: Mutex<(&'static str, Option<String>)>,
}

impl ArchiveState {
    pub fn new(name: &str, url: &str, flush_interval: Duration, start: Seq) -> ArchiveState {
        ArchiveState {
            name: name.to_string(),
            url: url.to_string(),
            flush_interval,
            archived: AtomicU64::new(start),
            archived_ts: AtomicU64::new(0),
            bytes_uploaded: AtomicU64::new(0),
            phase: Mutex::new(("starting", None)),
        }
    }

    pub fn archived_seq(&self) -> Seq {
        self.archived.load(Ordering::Acquire)
    }

    /// The archive holds everything through `seq` (written by `timestamp_ns`).
    pub(crate) fn set_archived(&self, seq: Seq, timestamp_ns: u64) {
        self.archived.store(seq, Ordering::Release);
        if timestamp_ns > 0 {
            self.archived_ts.store(timestamp_ns, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_uploaded(&self, bytes: u64) {
        self.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A new state; `error` replaces the last error only when given.
    pub(crate) fn set_phase(&self, state: &'static str, error: Option<String>) {
        let mut p = self.phase.lock();
        p.0 = state;
        if error.is_some() {
            p.1 = error;
        }
    }

    /// The status row; `durable`: the primary's newest durable record.
    pub fn status(&self, durable: Seq) -> ArchiveStatus {
        let (state, last_error) = self.phase.lock().clone();
        let archived = self.archived_seq();
        let ts = self.archived_ts.load(Ordering::Relaxed);
        // Caught up: no lag. Behind: how old the newest archived write-set is (what a
        // restore from the archive would lose now).
        let lag_seconds = if archived >= durable || ts == 0 {
            0.0
        } else {
            now_ns().saturating_sub(ts) as f64 / 1e9
        };
        ArchiveStatus {
            name: self.name.clone(),
            kind: "archive".into(),
            url: self.url.clone(),
            state: state.to_string(),
            archived_seq: archived,
            lag_seconds,
            bytes_uploaded: self.bytes_uploaded.load(Ordering::Relaxed),
            last_error,
        }
    }
}

/// The primary's archive targets.
#[derive(Default)]
pub struct Archives {
    pub targets: Vec<Arc<ArchiveState>>,
}

impl Archives {
    /// The configured archive targets, holding the journal from `start` (the
    /// checkpoint) until they know what their archive holds.
    pub fn from_config(cfg: &Config, start: Seq) -> Archives {
        let targets = cfg
            .replication
            .as_ref()
            .map(|r| {
                r.archives
                    .iter()
                    .map(|a| {
                        let every = Duration::from_secs(a.flush_interval_s.max(1));
                        Arc::new(ArchiveState::new(&a.name, &a.url, every, start))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Archives { targets }
    }

    /// The journal may be released only through what every archive holds. A stopped
    /// target (another primary archives there) holds nothing: it will not resume
    /// before a restart, and holding the journal for it would stall this primary's
    /// writes once the journal is full; after a restart it takes a new base if the
    /// journal no longer reaches back to its archive.
    pub fn release_floor(&self) -> Seq {
        self.targets
            .iter()
            .filter(|t| t.phase.lock().0 != "stopped")
            .map(|t| t.archived_seq())
            .min()
            .unwrap_or(Seq::MAX)
    }

    pub fn status(&self, durable: Seq) -> Vec<ArchiveStatus> {
        self.targets.iter().map(|t| t.status(durable)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_least_archived_and_status_shows_lag_only_when_behind() {
        let a = Arc::new(ArchiveState::new(
            "a",
            "file:///a",
            Duration::from_secs(1),
            5,
        ));
        let b = Arc::new(ArchiveState::new(
            "b",
            "s3://b/p",
            Duration::from_secs(1),
            5,
        ));
        let all = Archives {
            targets: vec![a.clone(), b.clone()],
        };
        assert_eq!(Archives::default().release_floor(), Seq::MAX);
        a.set_archived(20, now_ns() - 3_000_000_000);
        b.set_archived(10, now_ns());
        assert_eq!(all.release_floor(), 10);
        b.set_phase("stopped", Some("lost the race".into()));
        assert_eq!(all.release_floor(), 20);
        b.set_phase("archiving", None);
        let s = a.status(30);
        assert_eq!((s.kind.as_str(), s.archived_seq), ("archive", 20));
        assert!(
            s.lag_seconds >= 3.0 && s.lag_seconds < 60.0,
            "{}",
            s.lag_seconds
        );
        assert_eq!(a.status(20).lag_seconds, 0.0);
        a.set_phase("retrying", Some("boom".into()));
        a.set_phase("archiving", None);
        let s = a.status(20);
        assert_eq!(
            (s.state.as_str(), s.last_error.as_deref()),
            ("archiving", Some("boom"))
        );
    }
}
