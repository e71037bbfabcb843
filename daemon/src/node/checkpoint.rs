//! Checkpoints: the bases are fsynced, the applied position recorded in the metadata,
//! and journal segments below both the checkpoint and the replication floor released.
//! [`Checkpointer`] runs them periodically (and early when the journal fills up).
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_journal::Seq;

use crate::config::Config;
use crate::node::recovery::Recovered;

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
        for b in &rec.bases {
            b.sync()
                .with_context(|| format!("checkpoint: fsync {}", b.path.display()))?;
        }
        rec.meta.set_checkpoint(applied)?;
        *last = applied;
    }
    let release = (*last).min(floor);
    if release > *released {
        rec.journal.release_through(release)?;
        *released = release;
    }
    Ok(())
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
                let mut released = rec.checkpoint.min(positions().1);
                let mut since = Instant::now();
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    let j = &rec.journal;
                    let full = j.used_bytes() * 100 >= j.capacity_bytes() * CHECKPOINT_FILL_PERCENT;
                    if full || since.elapsed() >= interval {
                        since = Instant::now();
                        if let Err(e) = checkpoint(&rec, &positions, &mut last, &mut released) {
                            tracing::error!("checkpoint failed: {e:#}; will retry");
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
pub(crate) fn checkpoint_now(rec: &Recovered, applied: Seq) -> anyhow::Result<()> {
    for b in &rec.bases {
        b.sync()
            .with_context(|| format!("fsync {}", b.path.display()))?;
    }
    if rec.meta.checkpoint()? < applied {
        rec.meta.set_checkpoint(applied)?;
    }
    Ok(())
}
