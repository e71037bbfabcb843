//! Cascading on a standby ([`start_relay`]): the members whose `via` names this node
//! are shipped to from this node's own journal, with the primary's machinery — one
//! `ship::session` shipper per member, reading the in-memory tail a [`ShipFeed`] keeps
//! (fed by this standby's journal completions, `Standby::journal_write_set`) or
//! journal segments when behind, with the overflow tracking of `ship::catchup`. The
//! relay ships in the epoch it follows, under the primary's sequence numbers (its
//! journal mirrors them), and its journal is released only below what every relayed
//! member holds durably ([`Replication::release_floor`]), so one that was away
//! resumes from the relay's journal.
use std::sync::Arc;
use std::time::Duration;

use ferry_api::config::Config;
use ferry_journal::Seq;
use tokio::sync::watch;

use crate::node::lifecycle::transport_options;
use crate::node::recovery::Recovered;
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
        crate::ship::target::Shared {
            journal: rec.journal.clone(),
            bases: rec.bases.clone(),
            applied,
            checkpoint: {
                let m = rec.meta.clone();
                Arc::new(move || m.checkpoint().unwrap_or(0))
            },
            sync: Some(sync.clone()),
            dir: crate::ship::catchup::dirty_dir(cfg),
            region_size: crate::ship::dirty::DEFAULT_REGION_SIZE,
        },
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
    Ok(Arc::new(ShipContext {
        journal: rec.journal.clone(),
        tail: feed.tail.clone(),
        local: replication::local_identity(
            cfg,
            rec.meta.node_id,
            rec.meta.epoch()?,
            ferry_proto::wire::Role::Primary,
            &rec.bases,
            "",
        ),
        tls: replication::load_tls(cfg)?,
        opts: transport_options(),
        durable: feed.durable(),
        async_linger: Duration::from_micros(
            cfg.replication.as_ref().map_or(0, |r| r.async_linger_us),
        ),
        sync: sync.clone(),
        outdated: Arc::new(|epoch, by| {
            tracing::warn!(
                "relayed member '{by}' is in epoch {epoch}, newer than this relay's: not \
                 relaying to it until this node follows that epoch's primary"
            )
        }),
        fork: None,
    }))
}
