//! Archive targets on the primary (`[[replication.target]] kind = "archive"`): the cold
//! tier. Each target runs beside the QUIC shippers: it uploads a base image of every
//! volume when the archive has none (or the journal no longer reaches back to what
//! it holds), then tails the journal with the shippers' reader thread, turns its
//! write-sets into `ferry_archive` write-sets and uploads them as packs (when a pack
//! is full, or every `flush_interval`). Its archived sequence holds the journal's
//! release floor, so nothing unarchived is released. With a `retention` grid a
//! compaction task beside it merges and thins the packs ([`ferry_archive::compact`]);
//! with a `base_interval` it uploads a new base that often.
//!
//! [`ArchiveState`] is what status and the release floor read; [`run`] owns the loop;
//! [`seed`] starts a standby that `ferryctl archive seed` restored from an archive.
pub mod run;
pub mod seed;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::config::Config;
use ferry_api::status::{ArchiveStatus, PitPoint};
use ferry_api::timefmt::format_rfc3339;
use ferry_archive::compact::{Grid, Tier};
use ferry_archive::format::manifest::{Kind, Manifest};
use ferry_archive::writer::PackedBytes;
use ferry_journal::{now_ns, Journal, Seq};
use parking_lot::Mutex;

/// What an archive target keeps and how (`retention`, `base_interval`,
/// `object_lock_days` of its config).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Compaction's grid; `None`: nothing is compacted.
    pub retention: Option<Grid>,
    /// A new base image at least this often.
    pub base_interval: Option<Duration>,
    pub object_lock_days: Option<u64>,
}

impl Policy {
    /// The config's policy; a grid the config accepted but compaction does not is
    /// logged and left out (the parser checks the same rules: not expected).
    fn from_config(a: &ferry_api::config::ArchiveTargetConfig) -> Policy {
        let retention = a.retention.as_ref().and_then(|g| {
            let ns = |d: Duration| d.as_nanos() as u64;
            let tiers = g
                .tiers
                .iter()
                .map(|&(p, h)| Tier {
                    period_ns: ns(p),
                    horizon_ns: ns(h),
                })
                .collect();
            Grid::new(g.every_for.map_or(0, ns), tiers)
                .map_err(
                    |e| tracing::error!(target = %a.name, "retention '{g}': {e}; not compacting"),
                )
                .ok()
        });
        Policy {
            retention,
            base_interval: a.base_interval_s.map(Duration::from_secs),
            object_lock_days: a.object_lock_days,
        }
    }
}

/// One archive target's live state.
pub struct ArchiveState {
    pub name: String,
    pub url: String,
    pub flush_interval: Duration,
    pub policy: Policy,
    /// Newest write-set boundary the archive holds durably: the release floor.
    archived: AtomicU64,
    /// The primary's time of that write-set (ns since the Unix epoch; 0: unknown).
    archived_ts: AtomicU64,
    bytes_uploaded: AtomicU64,
    /// What the archive holds and this primary put there (status only).
    held: Mutex<Held>,
    /// State name and last error.
    phase: Mutex<(&'static str, Option<String>)>,
    /// The journal filled up while this archive held it back: the hold is dropped
    /// until the next session (which uploads a new base if the journal no longer
    /// reaches back to the archive).
    overflowed: AtomicBool,
}

impl ArchiveState {
    pub fn new(name: &str, url: &str, flush_interval: Duration, start: Seq) -> ArchiveState {
        ArchiveState {
            name: name.to_string(),
            url: url.to_string(),
            flush_interval,
            policy: Policy::default(),
            archived: AtomicU64::new(start),
            archived_ts: AtomicU64::new(0),
            bytes_uploaded: AtomicU64::new(0),
            held: Mutex::new(Held::default()),
            phase: Mutex::new(("starting", None)),
            overflowed: AtomicBool::new(false),
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
        if bytes > 0 {
            self.held.lock().last_upload_ns = Some(now_ns());
        }
    }

    /// What the archive's newest manifest names, and what this session's writer
    /// packed: the stored bytes, the oldest point and the compression for status.
    pub(crate) fn note_archive(&self, m: &Manifest, packed: PackedBytes) {
        let mut h = self.held.lock();
        h.stored_bytes = m.entries.iter().map(|e| e.bytes).sum();
        h.oldest = m
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Base)
            .min_by_key(|e| e.last_seq)
            .map(|e| (e.last_seq, e.last_ts));
        // Each session's writer counts from zero: add what it packed since last seen.
        let seen = h.session;
        h.packed_total.raw += packed.raw.saturating_sub(seen.raw);
        h.packed_total.stored += packed.stored.saturating_sub(seen.stored);
        h.session = packed;
    }

    /// A new session's writer (its pack counters start from zero).
    pub(crate) fn new_session(&self) {
        self.held.lock().session = PackedBytes::default();
    }

    /// A new state; `error` replaces the last error only when given.
    pub(crate) fn set_phase(&self, state: &'static str, error: Option<String>) {
        let mut p = self.phase.lock();
        p.0 = state;
        if error.is_some() {
            p.1 = error;
        }
    }

    /// Holds the journal again (a session that reached the archive).
    pub(crate) fn hold_again(&self) {
        self.overflowed.store(false, Ordering::Release);
    }

    /// Whether this target holds the journal now.
    fn holds(&self) -> bool {
        self.phase.lock().0 != "stopped" && !self.overflowed.load(Ordering::Acquire)
    }

    /// The journal is full and this archive holds it back: stop holding it (the
    /// overflow rule of the hot targets, whose bitmap mode becomes a new base here).
    fn overflow(&self) {
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            let why = format!(
                "the journal filled up while the archive was at sequence {}: it no longer holds the journal; a new base image follows once the archive is reachable",
                self.archived_seq()
            );
            tracing::error!(target = %self.name, "{why}");
            self.set_phase("overflowed", Some(why));
        }
    }

    /// The status row; `durable`: the primary's newest durable record.
    pub fn status(&self, durable: Seq) -> ArchiveStatus {
        let (state, last_error) = self.phase.lock().clone();
        let held = *self.held.lock();
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
            last_upload: held.last_upload_ns.map(format_rfc3339),
            stored_bytes: held.stored_bytes,
            compression_ratio: (held.packed_total.stored > 0)
                .then(|| held.packed_total.raw as f64 / held.packed_total.stored as f64),
            oldest_point: held.oldest.map(|(seq, ts)| PitPoint {
                seq,
                time: format_rfc3339(ts),
                timestamp_ns: ts,
            }),
        }
    }
}

/// Status-only facts about the archive and this primary's uploads to it.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    last_upload_ns: Option<u64>,
    stored_bytes: u64,
    /// The oldest base: (sequence, time).
    oldest: Option<(Seq, u64)>,
    /// Packed since this primary started, over all sessions.
    packed_total: PackedBytes,
    /// The current session's writer's counters as last seen.
    session: PackedBytes,
}

/// The primary's archive targets.
#[derive(Default)]
pub struct Archives {
    pub targets: Vec<Arc<ArchiveState>>,
    /// Whose fill decides an overflow (none in unit tests: never full).
    journal: Option<Arc<Journal>>,
}

impl Archives {
    /// The configured archive targets, holding the journal from `start` (the
    /// checkpoint) until they know what their archive holds.
    pub fn from_config(cfg: &Config, start: Seq, journal: Arc<Journal>) -> Archives {
        let targets = cfg
            .replication
            .as_ref()
            .map(|r| {
                r.archives
                    .iter()
                    .map(|a| {
                        let every = Duration::from_secs(a.flush_interval_s.max(1));
                        let mut t = ArchiveState::new(&a.name, &a.url, every, start);
                        t.policy = Policy::from_config(a);
                        Arc::new(t)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Archives {
            targets,
            journal: Some(journal),
        }
    }

    fn journal_full(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| {
            j.used_bytes().saturating_mul(100)
                >= j.capacity_bytes()
                    .max(1)
                    .saturating_mul(ferry_proto::target::SWITCH_PERCENT)
        })
    }

    /// The journal may be released only through `others` (what the checkpoint and
    /// the standbys allow) and what every archive holds. A stopped target (another
    /// primary archives there) holds nothing: it will not resume before a restart.
    /// An archive that holds the journal back further than `others` while the
    /// journal is full gives its hold up (see [`ArchiveState::overflow`]): client
    /// writes never wait for object storage.
    pub fn release_floor(&self, others: Seq) -> Seq {
        let full = self.journal_full();
        let mut floor = others;
        for t in self.targets.iter().filter(|t| t.holds()) {
            if full && t.archived_seq() < others {
                t.overflow();
                continue;
            }
            floor = floor.min(t.archived_seq());
        }
        floor
    }

    pub fn status(&self, durable: Seq) -> Vec<ArchiveStatus> {
        self.targets.iter().map(|t| t.status(durable)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full journal: an archive behind the other holders gives its hold up (and
    /// says so), one at or ahead of them keeps it; a new session holds again.
    #[test]
    fn a_full_journal_overflows_only_the_archive_that_holds_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = ferry_journal::JournalOptions::new(dir.path().join("j"), [1; 16]);
        o.segment_size = 1 << 20;
        o.capacity = 4 << 20;
        o.engine = ferry_journal::EngineChoice::Std;
        let j = Arc::new(Journal::open(o).unwrap().0);
        let every = Duration::from_secs(1);
        let behind = Arc::new(ArchiveState::new("behind", "file:///a", every, 0));
        let ahead = Arc::new(ArchiveState::new("ahead", "file:///b", every, 0));
        let all = Archives {
            targets: vec![behind.clone(), ahead.clone()],
            journal: Some(j.clone()),
        };
        let data = bytes::Bytes::from(vec![7u8; 256 << 10]);
        while j.used_bytes() * 100 < j.capacity_bytes() * ferry_proto::target::SWITCH_PERCENT {
            j.append_wait(ferry_journal::Record::write(0, 0, data.clone()))
                .unwrap();
        }
        behind.set_archived(2, now_ns());
        ahead.set_archived(10, now_ns());
        assert_eq!(all.release_floor(5), 5);
        let s = behind.status(10);
        assert_eq!(s.state, "overflowed");
        assert!(s.last_error.unwrap().contains("journal filled up"));
        assert_eq!(ahead.status(10).state, "starting");
        behind.hold_again();
        behind.set_archived(3, now_ns());
        assert_eq!(all.release_floor(5), 5, "still full: it overflows again");
        assert_eq!(
            Archives {
                journal: None,
                ..all
            }
            .release_floor(5),
            5
        );
    }

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
            journal: None,
        };
        assert_eq!(Archives::default().release_floor(Seq::MAX), Seq::MAX);
        a.set_archived(20, now_ns() - 3_000_000_000);
        b.set_archived(10, now_ns());
        assert_eq!(all.release_floor(Seq::MAX), 10);
        assert_eq!(all.release_floor(7), 7);
        b.set_phase("stopped", Some("lost the race".into()));
        assert_eq!(all.release_floor(Seq::MAX), 20);
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
