//! Rollback (standby paused): the target is persisted first, then undo is applied
//! newest first, the replica fsynced, the undo log cut after the target and the
//! rollback marked done. Rewriting before-images is idempotent, so a crash anywhere
//! restarts the same rollback from the top at the next start.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_journal::Op;

use super::{Pit, Point, Target};
use crate::store::base::find_base;

/// Testing hook: milliseconds to sleep after each undo entry a rollback applies, so
/// a test can SIGKILL a rollback in the middle. Never set in production.
pub const ROLLBACK_PAUSE_ENV: &str = "FERRYD_TEST_ROLLBACK_PAUSE_MS";

impl Pit {
    /// Rolls the replica back to `t`. The caller has stopped replication and the
    /// applier is idle with everything applied checkpointed (so no restart replays
    /// the journal over the rolled-back replica).
    pub fn rollback(&self, t: &Target) -> anyhow::Result<RollbackReport> {
        if !self.views.lock().is_empty() {
            bail!("point-in-time views are exported; unexport them before a rollback");
        }
        let point = self.resolve(t)?;
        self.meta
            .set_rollback_state(Some(crate::store::meta::RollbackState::InProgress {
                target: point.seq,
            }))?;
        tracing::warn!(target = point.seq, "rollback started");
        let mut r = self.finish_rollback(point.seq)?;
        r.point = point;
        Ok(r)
    }

    /// Applies undo newest first down to `target`, fsyncs, cuts the log and marks the
    /// rollback done. Idempotent: run again from the top after a crash.
    pub fn finish_rollback(&self, target: u64) -> anyhow::Result<RollbackReport> {
        let started = Instant::now();
        let pause = std::env::var(ROLLBACK_PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let mut undo = self.undo.lock();
        let mut entries = 0u64;
        let mut bytes = 0u64;
        for e in undo.entries_after(target) {
            let e = e.map_err(|e| anyhow!("rollback to {target}: {e}"))?;
            // Last extent first: overlapping extents of one entry leave the oldest.
            for x in e.extents.iter().rev() {
                let base = find_base(&self.bases, x.volume, e.last_seq)?;
                if x.offset
                    .checked_add(x.len())
                    .is_none_or(|end| end > base.size)
                {
                    bail!(
                        "undo entry {}..={} restores {}+{} beyond volume '{}'",
                        e.first_seq,
                        e.last_seq,
                        x.offset,
                        x.len(),
                        base.name
                    );
                }
                if x.zeros > 0 {
                    base.apply(Op::WriteZeroes, x.offset, x.zeros, &[])
                } else {
                    base.apply(Op::Write, x.offset, x.len() as u32, &x.data)
                }
                .with_context(|| format!("rollback: writing {}", base.path.display()))?;
                bytes += x.len();
            }
            entries += 1;
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
        for b in &self.bases {
            b.sync()
                .with_context(|| format!("rollback: fsync {}", b.path.display()))?;
        }
        undo.truncate_after(target)
            .map_err(|e| anyhow!("rollback: cutting the undo log after {target}: {e}"))?;
        // Rolled back to (at or before) the start of a resync: the transition is over.
        if self.meta.resync_state()?.is_some_and(|r| target <= r.from) {
            self.meta.set_resync_state(None)?;
        }
        self.meta
            .set_rollback_state(Some(crate::store::meta::RollbackState::Done { target }))?;
        self.applied.store(target, Ordering::Release);
        self.refresh_window(&undo);
        let took = started.elapsed();
        tracing::warn!(target, entries, bytes, "rollback finished in {took:?}");
        Ok(RollbackReport {
            point: Point {
                seq: target,
                timestamp_ns: 0,
            },
            entries,
            bytes,
            took,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RollbackReport {
    pub point: Point,
    pub entries: u64,
    pub bytes: u64,
    pub took: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use bytes::Bytes;
    use ferry_journal::Record;

    use crate::pit::testrig::{rig, Rig, SIZE};
    use crate::store::meta::Meta;
    use ferry_api::config::PitConfig;
    use ferry_api::size::ByteSize;

    /// A resync transition: no point inside it is offered (views, rollback), the
    /// point it started from is, also after a crash in the middle of the copy (the
    /// undo log reopened), and a rollback to it restores that image exactly.
    #[test]
    fn resync_keeps_its_start_reachable_across_a_crash() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 0x11)]);
        let from = r.apply(2, &[(Op::Write, 4096, 8192, 0x22), (Op::Seal, 0, 0, 1)]);
        let image_at_from = std::fs::read(&r.base.path).unwrap();
        // Begin: the copy replaces records from+1..=snapshot.
        let snapshot = from + 40;
        r.applier
            .meta
            .begin_resync(
                &crate::store::meta::ResyncState {
                    from,
                    snapshot,
                    through: 0,
                    copied: false,
                },
                from,
            )
            .unwrap();
        r.pit.begin_resync(from, snapshot, 3).unwrap();
        r.applied.store(snapshot, Ordering::Release);
        // Two copied batches, one with data, one zeroing a range.
        let batch = |off: u64, len: u32, fill: Option<u8>| {
            vec![(
                snapshot,
                Record {
                    volume: 0,
                    op: if fill.is_some() { Op::Write } else { Op::Trim },
                    offset: off,
                    length: len,
                    data: fill.map_or(Bytes::new(), |f| Bytes::from(vec![f; len as usize])),
                },
            )]
        };
        r.applier
            .apply_resync_batch(snapshot, 4, &batch(0, 65536, Some(0x33)))
            .unwrap();
        r.applier
            .apply_resync_batch(snapshot, 5, &batch(100_000, 50_000, None))
            .unwrap();
        assert_ne!(std::fs::read(&r.base.path).unwrap(), image_at_from);
        let inside = r
            .pit
            .resolve(&Target::Seq(snapshot))
            .unwrap_err()
            .to_string();
        assert!(inside.contains("inconsistent"), "{inside}");
        assert_eq!(
            serde_json::to_value(r.pit.status()).unwrap()["newest"]["seq"],
            from,
            "no point inside"
        );
        // A crash: the undo log is reopened from disk.
        let Rig {
            _dir: dir,
            base,
            pit,
            applier,
            applied,
            ..
        } = r;
        drop(applier);
        drop(pit);
        let settings = PitConfig {
            enabled: true,
            dir: None,
            max_bytes: ByteSize(1 << 30),
            max_age_secs: 0,
            segment_size: ByteSize(1 << 20),
        };
        let meta = Arc::new(Meta::open(&dir.path().join("meta"), [3; 16]).unwrap());
        let pit = Pit::open(
            dir.path().join("undo"),
            [3; 16],
            settings,
            meta.clone(),
            vec![base.clone()],
            applied,
            None,
        )
        .unwrap();
        assert!(pit.resolve(&Target::Seq(snapshot)).is_err());
        let v = pit
            .open_view(base.clone(), &Target::Seq(from), None)
            .unwrap();
        let mut got = Vec::new();
        let mut at = 0;
        while at < SIZE {
            let n = (SIZE - at).min(65536);
            got.extend_from_slice(&v.read_sync(at, n as u32).unwrap());
            at += n;
        }
        assert!(got == image_at_from, "the view at the resync's start");
        drop(v);
        let report = pit.rollback(&Target::Seq(from)).unwrap();
        assert_eq!(report.point.seq, from);
        assert!(
            std::fs::read(&base.path).unwrap() == image_at_from,
            "rollback to the resync's start"
        );
        assert_eq!(meta.resync_state().unwrap(), None, "the transition is over");
    }
}
