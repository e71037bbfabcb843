//! Cascading on a standby ([`start_relay`]): the members whose `via` names this node
//! are shipped to from this node's own journal, with the primary's machinery — one
//! `ship::session` shipper per member, reading the in-memory tail a [`ShipFeed`] keeps
//! (fed by this standby's journal completions, `Standby::journal_write_set`) or
//! journal segments when behind, with the overflow tracking of `ship::catchup`. The
//! relay ships in the epoch it follows, under the primary's sequence numbers (its
//! journal mirrors them), and its journal is released only below what every relayed
//! member holds durably ([`Replication::release_floor`]), so one that was away
//! resumes from the relay's journal.
//!
//! On the primary, [`start_fallback`] covers a relay that is down
//! (`via_fallback = "primary"`, the default): once the relay has not streamed from
//! the primary for [`FALLBACK_AFTER`], the primary adds the relayed member as an
//! async target of its own (`Replication::add_target`, as a reload does), and removes
//! it again once the relay streams and holds at least what the member holds, so the
//! relay can resume it without a gap. The member takes one live session at a time,
//! from whichever source dialed last (`replica::session::serve`); both stream the
//! same history under the same sequence numbers, so a hand-over between them in
//! either direction is a resume from the member's durable position.
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::config::Config;
use ferry_journal::Seq;
use tokio::sync::watch;

use crate::node::lifecycle::{sender_context, ship_shared, SenderRole};
use crate::node::recovery::Recovered;
use crate::ship::session::HoldFn as ShipHold;
use crate::ship::{self as replication, Replication, ShipContext, ShipFeed, SyncGate};

/// The feed of a node that relays (some member's `via` names it), enabled; `None`
/// when it relays to nobody, so a plain standby keeps nothing in memory.
pub(crate) fn relay_feed(cfg: &Config, rec: &Recovered) -> Option<Arc<ShipFeed>> {
    if cfg.relay_targets().is_empty() {
        return None;
    }
    let feed = Arc::new(ShipFeed::new(rec.journal.durable_seq()));
    let tail = cfg.replication.as_ref().map_or(0, |r| r.tail_bytes.0);
    feed.enable(tail as usize);
    Some(feed)
}

/// Starts a shipper to every member this standby relays to, fed by `feed`;
/// `applied` is this replica's applied position (a resync copy's snapshot).
pub(crate) fn start_relay(
    cfg: &Config,
    rec: &Arc<Recovered>,
    feed: &Arc<ShipFeed>,
    applied: Arc<dyn Fn() -> Seq + Send + Sync>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Arc<Replication>> {
    let start = rec.checkpoint.min(rec.journal.durable_seq());
    let targets: Vec<_> = cfg
        .relay_targets()
        .iter()
        .map(|t| Arc::new(replication::TargetState::new(t, start, false)))
        .collect();
    let timeout = cfg.replication.as_ref().map_or(5000, |r| r.sync_timeout_ms);
    // Relayed members are async: the gate holds nothing, and no sync loss is recorded.
    let sync = SyncGate::new(targets.clone(), Duration::from_millis(timeout), None);
    let repl = Replication::new(targets, sync.clone(), feed.index.clone());
    let shared = crate::ship::catchup::start(
        ship_shared(cfg, rec, applied, &sync),
        &repl.targets,
        feed,
        stop_rx.clone(),
    )?;
    for t in repl.targets() {
        tracing::info!(target = %t.name, address = %t.address, "relaying to '{}' (cascading: its via names this node)", t.name);
    }
    let ctx = relay_context(cfg, rec, feed, &sync)?;
    repl.start(ctx, shared, feed.clone(), stop_rx.clone());
    Ok(Arc::new(repl))
}

/// The shippers' context on a relay: it presents itself as the sender (the primary
/// role of the handshake) in the epoch it follows; a relayed member that shows a newer
/// epoch is only logged (this standby follows a newer primary when that one dials it).
fn relay_context(
    cfg: &Config,
    rec: &Recovered,
    feed: &ShipFeed,
    sync: &Arc<SyncGate>,
) -> anyhow::Result<Arc<ShipContext>> {
    let role = SenderRole {
        outdated: Arc::new(|epoch, by| {
            tracing::warn!(
                "relayed member '{by}' is in epoch {epoch}, newer than this relay's: not \
                 relaying to it until this node follows that epoch's primary"
            )
        }),
        fork: None,
        horizons: None,
        hold: Some(relay_hold(rec)),
        // No client write waits on a relay's targets: durable acks are all it needs.
        received_acks: false,
    };
    sender_context(cfg, rec, feed, sync, role)
}

/// Why the relay may not ship now: its replica is what a resync copy to a relayed
/// member reads, so while it is inconsistent (its own resync from the primary), its
/// apply stopped, or it was rolled back, it ships nothing; the members wait.
fn relay_hold(rec: &Recovered) -> ShipHold {
    let (applier, meta) = (rec.applier.clone(), rec.meta.clone());
    Arc::new(move || {
        if applier.resync.get().is_some() {
            return Some("this relay's replica is being resynced from its primary".into());
        }
        match meta.rollback_state() {
            Ok(Some(_)) => Some("this relay's replica was rolled back (or is being)".into()),
            Ok(None) => None,
            Err(e) => Some(format!("reading this relay's rollback state: {e}")),
        }
    })
}

/// How long a relay stays away from the primary before the primary ships to the
/// members it relays to itself.
pub(crate) const FALLBACK_AFTER: Duration = Duration::from_secs(5);
const FALLBACK_CHECK_EVERY: Duration = Duration::from_millis(250);

/// Starts the primary's fallback monitor when some relayed member falls back to it;
/// `start_acked`: where a target added while running is assumed until its Hello.
pub(crate) fn start_fallback(
    cfg: &Config,
    repl: Option<Arc<Replication>>,
    start_acked: Arc<dyn Fn() -> Seq + Send + Sync>,
    mut stop_rx: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let members = cfg.fallback_targets();
    let repl = repl?;
    if members.is_empty() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut down_since: Vec<Option<Instant>> = vec![None; members.len()];
        loop {
            for ((t, relay), since) in members.iter().zip(down_since.iter_mut()) {
                fallback_step(&repl, t, relay, since, &start_acked).await;
            }
            tokio::select! {
                _ = stop_rx.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(FALLBACK_CHECK_EVERY) => {}
            }
        }
    }))
}

/// What the primary does now about relayed member `t` (see [`FallbackMove`]).
async fn fallback_step(
    repl: &Replication,
    t: &ferry_api::config::TargetConfig,
    relay: &str,
    down_since: &mut Option<Instant>,
    start_acked: &Arc<dyn Fn() -> Seq + Send + Sync>,
) {
    let targets = repl.targets();
    // A relay that is not this primary's target (a chain of relays) is not watched.
    let Some(r) = targets.iter().find(|x| x.name == relay) else {
        return;
    };
    let relay_acked = r.snapshot().acked_seq;
    let direct = targets
        .iter()
        .find(|x| x.name == t.name)
        .map(|x| x.snapshot().acked_seq);
    let relay_up = r.state() == "streaming";
    match fallback_move(relay_up, relay_acked, direct, down_since, Instant::now()) {
        FallbackMove::Keep => {}
        FallbackMove::Ship => {
            tracing::warn!(
                member = %t.name,
                relay,
                "relay '{relay}' has not streamed for {FALLBACK_AFTER:?}: shipping to '{}' \
                 directly until it is back (via_fallback = \"primary\")",
                t.name
            );
            if let Err(e) = repl.add_target(t, start_acked()).await {
                tracing::error!(member = %t.name, "falling back to ship to '{}': {e:#}", t.name);
            }
        }
        FallbackMove::Stop => {
            tracing::info!(
                member = %t.name,
                relay,
                "relay '{relay}' streams again and holds what '{}' holds: it relays to it \
                 again; this primary stops shipping to it",
                t.name
            );
            if let Err(e) = repl.remove_target(&t.name).await {
                tracing::error!(member = %t.name, "stopping the fallback to '{}': {e:#}", t.name);
            }
        }
    }
}

/// The fallback's decision for one relayed member.
#[derive(Debug, PartialEq, Eq)]
enum FallbackMove {
    Keep,
    /// The relay has been away for [`FALLBACK_AFTER`]: ship to the member directly.
    Ship,
    /// The relay streams and holds at least what the member acknowledged to this
    /// primary: hand the member back to the relay.
    Stop,
}

/// `direct`: the member's ack while this primary ships to it (`None`: it does not);
/// `down_since`: when the relay was first seen not streaming (kept across calls).
fn fallback_move(
    relay_up: bool,
    relay_acked: Seq,
    direct: Option<Seq>,
    down_since: &mut Option<Instant>,
    now: Instant,
) -> FallbackMove {
    if relay_up {
        *down_since = None;
    } else if down_since.is_none() {
        *down_since = Some(now);
    }
    match direct {
        Some(acked) if relay_up && relay_acked >= acked => FallbackMove::Stop,
        Some(_) => FallbackMove::Keep,
        None => match *down_since {
            Some(t) if now.duration_since(t) >= FALLBACK_AFTER => FallbackMove::Ship,
            _ => FallbackMove::Keep,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The primary ships to a relayed member only after its relay was away for
    /// FALLBACK_AFTER in a row, and hands it back only once the relay streams and
    /// holds at least what the member holds.
    #[test]
    fn fallback_waits_for_a_lasting_outage_and_a_caught_up_relay() {
        let t0 = Instant::now();
        let mut since = None;
        assert_eq!(
            fallback_move(true, 10, None, &mut since, t0),
            FallbackMove::Keep
        );
        assert_eq!(
            fallback_move(false, 10, None, &mut since, t0),
            FallbackMove::Keep
        );
        let later = t0 + FALLBACK_AFTER / 2;
        assert_eq!(
            fallback_move(false, 10, None, &mut since, later),
            FallbackMove::Keep
        );
        // Back before the delay: the outage starts over.
        assert_eq!(
            fallback_move(true, 10, None, &mut since, later),
            FallbackMove::Keep
        );
        assert_eq!(since, None);
        let down = t0 + FALLBACK_AFTER;
        assert_eq!(
            fallback_move(false, 10, None, &mut since, down),
            FallbackMove::Keep
        );
        let gone = down + FALLBACK_AFTER;
        assert_eq!(
            fallback_move(false, 10, None, &mut since, gone),
            FallbackMove::Ship
        );
        // Shipping directly: the relay's return alone is not enough.
        assert_eq!(
            fallback_move(false, 10, Some(30), &mut since, gone),
            FallbackMove::Keep
        );
        assert_eq!(
            fallback_move(true, 20, Some(30), &mut since, gone),
            FallbackMove::Keep
        );
        assert_eq!(
            fallback_move(true, 30, Some(30), &mut since, gone),
            FallbackMove::Stop
        );
    }
}
