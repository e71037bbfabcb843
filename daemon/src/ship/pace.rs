//! Pacing of client writes by replication lag (`max_lag_seconds` of a target): while
//! a target streams with more lag than its bound, a write's reply waits until the
//! target is back under it. The writers slow down to what the link and the standby
//! sustain instead of the recovery point growing without bound; nothing is dropped
//! or reordered (the write is durable and shipped as before, only its reply waits).
//!
//! Only a target that is connected and streaming paces: one that is disconnected,
//! connecting, or tracked in a bitmap (switching, bitmap, resyncing) never holds a
//! write, so a lost standby cannot stop the primary. The wait ends as soon as the
//! target acks enough or leaves streaming (every lifecycle change wakes it).
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_journal::{now_ns, Seq};
use ferry_proto::target::{TargetPhase, Tracking};

use crate::ship::feed::{SeqIndex, ShipFeed};
use crate::ship::target::TargetState;

/// A paced write looks at the lag again at least this often, even without a
/// lifecycle change (the wake-up is the fast path, this the safety net).
const RECHECK: Duration = Duration::from_millis(50);

impl ShipFeed {
    /// Waits while any target with `max_lag_seconds` streams with more lag than
    /// that. Returns at once when no target paces (one atomic load).
    pub async fn pace(&self) {
        for t in self.paced_targets() {
            wait_under(&t, &self.index).await;
        }
    }
}

/// Whether a target in this phase and tracking mode paces writes: only while it
/// is connected and the journal holds its records (streaming).
pub(crate) fn paces(phase: TargetPhase, tracking: Tracking) -> bool {
    matches!(phase, TargetPhase::Streaming) && matches!(tracking, Tracking::Streaming)
}

/// The lag in seconds that makes `t` hold writes now, if it does.
fn lag_over(t: &TargetState, index: &SeqIndex, now: u64) -> Option<f64> {
    let max = t.max_lag?;
    let (pacing, acked): (bool, Seq) = t.read(|lc| (paces(lc.phase(), lc.tracking()), lc.acked()));
    if !pacing {
        return None;
    }
    let (_, lag) = index.lag_after(acked, now);
    (lag > max.as_secs_f64()).then_some(lag)
}

/// Waits until `t` no longer holds writes (see [`lag_over`]).
async fn wait_under(t: &TargetState, index: &SeqIndex) {
    let mut logged = false;
    loop {
        // Registered before the check, so a change between the two is not missed.
        let changed = t.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let Some(lag) = lag_over(t, index, now_ns()) else {
            if logged {
                episode(&t.pacing_now, false, &t.name, 0.0, t.max_lag);
            }
            return;
        };
        if !logged {
            episode(&t.pacing_now, true, &t.name, lag, t.max_lag);
            logged = true;
        }
        let _ = tokio::time::timeout(RECHECK, changed).await;
    }
}

/// Logs the start and the end of a pacing episode of a target once each (many
/// writes wait at once; the first to wait and the first to pass log).
fn episode(flag: &AtomicBool, on: bool, name: &str, lag: f64, max: Option<Duration>) {
    if flag.swap(on, Ordering::Relaxed) == on {
        return;
    }
    let max = max.map_or(0.0, |m| m.as_secs_f64());
    if on {
        tracing::warn!(
            target_name = name,
            lag_seconds = lag,
            max_lag_seconds = max,
            "replication lag above max_lag_seconds: write replies wait for the target"
        );
    } else {
        tracing::info!(
            target_name = name,
            max_lag_seconds = max,
            "replication lag back under max_lag_seconds: writes no longer paced"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_api::config::{ReplicationMode, TargetConfig};

    use super::*;

    fn target(max_lag_seconds: Option<f64>) -> Arc<TargetState> {
        let cfg = TargetConfig {
            name: "dr".into(),
            address: "127.0.0.1:1".into(),
            mode: ReplicationMode::Async,
            on_sync_loss: Default::default(),
            wan: Default::default(),
            max_lag_seconds,
        };
        Arc::new(TargetState::new(&cfg, 0, false))
    }

    /// A feed with records 1..=10, the first stamped `age` seconds ago.
    fn feed(targets: &[Arc<TargetState>], age: u64) -> Arc<ShipFeed> {
        let feed = Arc::new(ShipFeed::new(0));
        let t0 = now_ns().saturating_sub(age * 1_000_000_000);
        for seq in 1..=10 {
            feed.index.push(seq, 4096, t0 + seq);
        }
        feed.track(targets.to_vec());
        feed
    }

    fn stream(t: &TargetState) {
        t.streaming_at(0);
    }

    /// The target holds everything up to `seq` durably (the journal at 10).
    fn ack(t: &TargetState, seq: Seq) {
        t.update(|lc| lc.on_ack(seq, seq, 10));
    }

    #[test]
    fn only_a_streaming_target_paces() {
        assert!(paces(TargetPhase::Streaming, Tracking::Streaming));
        for phase in [
            TargetPhase::Connecting,
            TargetPhase::Resyncing,
            TargetPhase::Disconnected,
            TargetPhase::Stopped,
        ] {
            assert!(!paces(phase, Tracking::Streaming), "{phase:?}");
        }
        let bitmap = Tracking::Bitmap {
            base: 1,
            flushed_through: 1,
        };
        assert!(!paces(TargetPhase::Streaming, bitmap));
    }

    /// A write waits while the target streams with lag above its bound, and
    /// passes once the target acks (the lifecycle change wakes it).
    #[tokio::test]
    async fn replies_wait_while_lag_is_over_the_bound_and_pass_on_the_ack() {
        let t = target(Some(1.0));
        stream(&t);
        let feed = feed(std::slice::from_ref(&t), 60);
        let paced = tokio::spawn({
            let feed = feed.clone();
            async move { feed.pace().await }
        });
        // Acks that leave the oldest unacked record 60 s old change nothing.
        for seq in 1..=3 {
            ack(&t, seq);
            tokio::task::yield_now().await;
        }
        assert!(
            !paced.is_finished(),
            "a reply passed with the lag over the bound"
        );
        assert!(t.pacing_now.load(Ordering::Relaxed));
        ack(&t, 10);
        tokio::time::timeout(Duration::from_secs(10), paced)
            .await
            .expect("still waiting after the target caught up")
            .unwrap();
        assert!(!t.pacing_now.load(Ordering::Relaxed));
    }

    /// A target that stops streaming (disconnected) releases the writes it held.
    #[tokio::test]
    async fn a_target_that_leaves_streaming_releases_its_writes() {
        let t = target(Some(1.0));
        stream(&t);
        let feed = feed(std::slice::from_ref(&t), 60);
        let paced = tokio::spawn({
            let feed = feed.clone();
            async move { feed.pace().await }
        });
        tokio::task::yield_now().await;
        assert!(!paced.is_finished());
        t.session_ended(Some("link down".into()));
        tokio::time::timeout(Duration::from_secs(10), paced)
            .await
            .expect("still waiting for a disconnected target")
            .unwrap();
    }

    /// Without the key, or under the bound, or before streaming: no wait at all.
    #[tokio::test]
    async fn no_bound_or_no_lag_or_no_session_never_waits() {
        let unpaced = target(None);
        stream(&unpaced);
        let f = feed(std::slice::from_ref(&unpaced), 60);
        assert!(!f.pacing.load(Ordering::Relaxed));
        f.pace().await;
        // Recent records: lag under the bound.
        let t = target(Some(30.0));
        stream(&t);
        feed(&[t], 1).pace().await;
        // Far behind but not connected yet.
        let t = target(Some(1.0));
        feed(&[t], 60).pace().await;
    }
}
