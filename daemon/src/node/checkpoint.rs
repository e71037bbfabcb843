//! Checkpoints: the bases are fsynced, the applied position recorded in the metadata,
//! and journal segments below both the checkpoint and the replication floor released.
//! [`Checkpointer`] runs them periodically (and early when the journal fills up).
//!
//! A failed fsync never lets the checkpoint pass the records it covered: the store
//! stays poisoned (`store::base`, "fsyncgate"), so no retry can succeed, the journal
//! keeps everything after the last good checkpoint, the volume group stops (writes
//! fail with EIO, status shows it) and a restart replays the records. The same holds
//! for [`checkpoint_now`] and for a standby's replica, which checkpoints here too.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_journal::Seq;

use crate::node::recovery::Recovered;
use crate::store::base::storage_fault;
use ferry_api::config::Config;

/// A checkpoint starts early once the journal is this full (percent).
const CHECKPOINT_FILL_PERCENT: u64 = 50;

/// What a checkpoint works from: the sequence applied to the bases (contiguous), and
/// the floor below which every replication target holds the journal durably.
pub type Positions = Arc<dyn Fn() -> (Seq, Seq) + Send + Sync>;

/// Fsyncs the bases and records the checkpoint; releases journal segments below both
/// the checkpoint and the replication floor.
fn checkpoint(
    rec: &Recovered,
    positions: &Positions,
    last: &mut Seq,
    released: &mut Seq,
) -> anyhow::Result<()> {
    let (applied, floor) = positions();
    if applied > *last {
        sync_bases(rec)?;
        // Never lowers it: a rollback moves `applied` back below the checkpoint, and a
        // promotion then records its cut as the checkpoint; a lower one written by
        // this thread (e.g. at the shutdown of the promote's restart) would make the
        // new primary replay the records the rollback undid.
        if rec.meta.checkpoint()? < applied {
            rec.meta.set_checkpoint(applied)?;
        }
        *last = applied;
    }
    let release = release_point(*last, floor);
    if release > *released {
        rec.journal.release_through(release)?;
        *released = release;
    }
    Ok(())
}

/// Fsyncs every base; the first failure ends it (and poisons that base for good).
fn sync_bases(rec: &Recovered) -> anyhow::Result<()> {
    if let Some(why) = storage_fault(&rec.bases) {
        anyhow::bail!("{why}");
    }
    for b in &rec.bases {
        b.sync()
            .with_context(|| format!("checkpoint: fsync {}", b.path.display()))?;
    }
    Ok(())
}

/// Logs a failed checkpoint: a transient error is retried at the next round; a
/// failed fsync stopped the volume group, which is said once, loudly.
fn report_failure(rec: &Recovered, last: Seq, e: &anyhow::Error, stopped: &mut bool) {
    match storage_fault(&rec.bases) {
        Some(why) if !*stopped => {
            *stopped = true;
            tracing::error!(
                checkpoint = last,
                "volume group stopped: {why}; the checkpoint stays at {last} and the journal \
                 keeps every record after it: restart ferryd (once the storage is healthy) to \
                 replay them"
            );
        }
        Some(_) => {}
        None => tracing::error!("checkpoint failed: {e:#}; will retry"),
    }
}

/// The journal may be released through the checkpoint, but not past what every
/// replication target holds durably.
fn release_point(checkpoint: Seq, floor: Seq) -> Seq {
    checkpoint.min(floor)
}

/// A checkpoint is due once the interval has passed, or early once the journal is
/// [`CHECKPOINT_FILL_PERCENT`] full.
fn checkpoint_due(used: u64, capacity: u64, since: Duration, interval: Duration) -> bool {
    used * 100 >= capacity * CHECKPOINT_FILL_PERCENT || since >= interval
}

/// The checkpoint thread: every `checkpoint_interval_ms`, or early when the journal
/// is half full, and once more on the way out.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    pub(crate) fn start(
        cfg: &Config,
        rec: Arc<Recovered>,
        positions: Positions,
    ) -> anyhow::Result<Self> {
        let interval = Duration::from_millis(cfg.journal.checkpoint_interval_ms);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-checkpoint".into())
            .spawn(move || {
                let mut last = rec.checkpoint;
                let mut released = release_point(rec.checkpoint, positions().1);
                let mut since = Instant::now();
                let mut stopped = false;
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    let j = &rec.journal;
                    if checkpoint_due(
                        j.used_bytes(),
                        j.capacity_bytes(),
                        since.elapsed(),
                        interval,
                    ) {
                        since = Instant::now();
                        if let Err(e) = checkpoint(&rec, &positions, &mut last, &mut released) {
                            report_failure(&rec, last, &e, &mut stopped);
                        }
                    }
                }
                if let Err(e) = checkpoint(&rec, &positions, &mut last, &mut released) {
                    tracing::error!("final checkpoint failed: {e:#}");
                }
            })
            .context("starting the checkpoint thread")?;
        Ok(Checkpointer { stop, thread })
    }

    /// Stops the thread after its final checkpoint.
    pub(crate) async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Fsyncs the bases and records `applied` as the checkpoint (never lowering it).
/// Fails, and keeps failing, once an fsync of a base failed: the role change or
/// rollback that asked for it must not go on.
pub(crate) fn checkpoint_now(rec: &Recovered, applied: Seq) -> anyhow::Result<()> {
    sync_bases(rec)?;
    if rec.meta.checkpoint()? < applied {
        rec.meta.set_checkpoint(applied)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_due_after_the_interval_or_at_half_a_journal() {
        let (sec, min) = (Duration::from_secs(1), Duration::from_secs(60));
        assert!(!checkpoint_due(0, 100, sec, min));
        assert!(!checkpoint_due(49, 100, sec, min));
        assert!(checkpoint_due(50, 100, sec, min), "half full");
        assert!(checkpoint_due(0, 100, min, min), "interval passed");
    }

    #[test]
    fn the_journal_is_released_through_the_lower_of_checkpoint_and_floor() {
        assert_eq!(release_point(100, Seq::MAX), 100, "no targets");
        assert_eq!(release_point(100, 40), 40, "a target holds less");
        assert_eq!(release_point(30, 40), 30);
    }
}
