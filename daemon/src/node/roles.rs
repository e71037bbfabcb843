//! Role changes: quiesce, switchover and demote on a primary; promote, take-over and
//! rollback on a standby; the fence responder and outdated-primary reasons.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_journal::Seq;
use serde_json::json;

use crate::pit::PitExports;
use crate::primary::volume::Group;
use crate::replica::standby::{HandoverFn, Standby};
use crate::ship::{Replication, TargetState};
use crate::store::meta::RollbackState;

use crate::node::checkpoint::checkpoint_now;
use crate::node::lifecycle::{transport_options, Lifecycle};
use crate::node::members::Prober;
use crate::node::recovery::Recovered;
use crate::node::requests::{find_volume, parse_target, rolled_back_reason};

/// Stops writes, waits until they are all durable here and applied to the bases,
/// and checkpoints: the state a role change starts from.
pub(crate) async fn quiesce(rec: &Recovered, group: &Group, why: String) -> anyhow::Result<Seq> {
    group.set_fence(Some(why));
    if !group.drain(Duration::from_secs(10)).await {
        bail!("writes in flight did not finish within 10 s");
    }
    let last = rec.journal.last_seq();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rec.journal.durable_seq() < last || group.applied_seq() < last {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the journal did not make {last} durable and applied within 30 s (durable {}, applied {})",
                rec.journal.durable_seq(),
                group.applied_seq()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::task::block_in_place(|| checkpoint_now(rec, last))?;
    Ok(last)
}

/// Planned, lossless role swap with a caught-up standby: writes stop, the standby
/// confirms it holds every record, takes over in a new epoch, and this node
/// restarts as its standby.
pub(crate) async fn switchover(
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    repl: Option<&Replication>,
    to: Option<&str>,
    (life, has_listen): (&Arc<Lifecycle>, bool),
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    if let Some(o) = rec.meta.outdated()? {
        bail!("{}", outdated_reason(&o));
    }
    let t = switchover_target(repl, to)?;
    // Before writes stop: a second switchover must not end (and unfence) the first.
    let Ok(_busy) = t.switchover.try_lock() else {
        bail!(
            "a switchover to standby '{}' is already in progress",
            t.name
        );
    };
    if t.state() != "streaming" {
        bail!(
            "standby '{}' is {}, not streaming: it cannot take over losslessly",
            t.name,
            t.state()
        );
    }
    let result = hand_over(rec, group, &t).await;
    match result {
        Ok((seq, new_epoch)) => {
            tracing::warn!(to = %t.name, seq, epoch = new_epoch, "switchover done: restarting as a standby");
            life.request_restart();
            Ok(json!({
                "to": t.name,
                "seq": seq,
                "epoch": new_epoch,
                "writes_stopped_seconds": started.elapsed().as_secs_f64(),
            }))
        }
        Err(Abandoned::BeforeHandover(e)) => {
            // The standby was never told to take over: take writes again, unless we
            // have learnt meanwhile that a newer epoch exists (a newer epoch marked this
            // node outdated): lifting that fence would accept writes the new primary
            // never gets.
            match rec.meta.outdated() {
                Ok(o) => group.set_fence(fence_after_abandoned_switchover(o.as_ref())),
                Err(m) => tracing::error!(
                    "switchover abandoned; writes stay refused: reading the outdated mark: {m}"
                ),
            }
            Err(e.context("switchover abandoned; this node stays the primary"))
        }
        Err(Abandoned::OutcomeUnknown(e)) => {
            // Handover was sent but its answer lost: the standby may be the primary of
            // a new epoch already. Lifting the fence now would acknowledge writes the
            // new primary never gets (ferry-torture seeds 203, 198057928233978): writes
            // stay refused until this node learns the outcome from the standby itself.
            let why = format!(
                "switchover to '{}': the handover was sent but not answered; writes stay refused until '{}' is heard from (its next session says whether it took over)",
                t.name, t.name
            );
            group.set_fence(Some(why.clone()));
            let outcome = tokio::spawn(await_handover_outcome(
                rec.clone(),
                group.clone(),
                t.clone(),
                (life.clone(), has_listen),
            ));
            // Usually the standby's next session says within seconds; the watcher goes
            // on in the background if not.
            match tokio::time::timeout(Duration::from_secs(30), outcome).await {
                Ok(Ok(HandoverOutcome::TookOver(epoch))) => Ok(json!({
                    "to": t.name,
                    "epoch": epoch,
                    "ack": "lost: the standby's newer epoch showed it took over",
                    "writes_stopped_seconds": started.elapsed().as_secs_f64(),
                })),
                Ok(Ok(HandoverOutcome::DidNot)) => Err(e.context(format!(
                    "switchover abandoned: '{}' did not take over (it streams from this node again); writes resume",
                    t.name
                ))),
                _ => Err(e.context(why)),
            }
        }
    }
}

/// What an unanswered Handover turned out to be.
enum HandoverOutcome {
    /// The standby is the primary of this epoch; this node rejoins it as a standby.
    TookOver(u64),
    /// The standby streams from this node again: no switchover happened.
    DidNot,
    /// The outdated mark could not be read: writes stay refused.
    Unknown,
}

/// Why a switchover ended without a new primary this node knows of.
enum Abandoned {
    /// Nothing was sent to the standby that could make it take over.
    BeforeHandover(anyhow::Error),
    /// Handover was sent, its answer never came: the standby may have taken over.
    OutcomeUnknown(anyhow::Error),
}

/// After an unanswered Handover: keeps writes refused until the standby's epoch is
/// known. A newer epoch (the standby took over: the shipper's next handshake, or the
/// fence responder, marks this node outdated) finishes the switchover as if the ack
/// had come: this node took no write after the handover point, so nothing diverged,
/// and it rejoins as the new primary's standby (a demote). A session streaming again
/// at this node's epoch (the standby never took over, or it would refuse this
/// primary) lets writes resume.
async fn await_handover_outcome(
    rec: Arc<Recovered>,
    group: Arc<Group>,
    t: Arc<TargetState>,
    (life, has_listen): (Arc<Lifecycle>, bool),
) -> HandoverOutcome {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match rec.meta.outdated() {
            Ok(Some(o)) => {
                tracing::warn!(to = %t.name, "switchover: '{}' took over (epoch {}); finishing the switchover as its standby", o.by, o.epoch);
                group.set_fence(Some(outdated_reason(&o)));
                if let Err(e) = demote(&rec, &group, has_listen, &life).await {
                    tracing::error!("switchover: rejoining '{}' as its standby failed: {e:#}; writes stay refused (ferryctl demote)", o.by);
                    return HandoverOutcome::Unknown;
                }
                return HandoverOutcome::TookOver(o.epoch);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(
                    "switchover outcome: reading the outdated mark: {e}; writes stay refused"
                );
                return HandoverOutcome::Unknown;
            }
        }
        if t.state() == "streaming" {
            tracing::warn!(to = %t.name, "switchover did not happen: '{}' streams from this primary again; taking writes", t.name);
            group.set_fence(None);
            return HandoverOutcome::DidNot;
        }
    }
}

/// The standby a switchover hands over to: the one named, or the only one.
fn switchover_target(
    repl: Option<&Replication>,
    to: Option<&str>,
) -> anyhow::Result<Arc<TargetState>> {
    let targets = repl.map(|r| r.targets()).unwrap_or_default();
    let t = match to {
        Some(name) => targets
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no replication target named '{name}'"))?,
        None => match targets.as_slice() {
            [t] => t.clone(),
            [] => bail!("this primary has no standby to hand over to"),
            _ => bail!("several standbys: name one with --to"),
        },
    };
    Ok(t)
}

/// Stops writes, waits until `t` confirms every record, and has it take over in a
/// new epoch, recorded as this node's role change; returns (seq, new epoch).
async fn hand_over(
    rec: &Recovered,
    group: &Group,
    t: &TargetState,
) -> Result<(Seq, u64), Abandoned> {
    let seq = caught_up(rec, group, t)
        .await
        .map_err(Abandoned::BeforeHandover)?;
    let answer = t.request_handover(seq).map_err(Abandoned::BeforeHandover)?;
    let new_epoch = match tokio::time::timeout(Duration::from_secs(30), answer).await {
        Ok(Ok(Ok(epoch))) => epoch,
        // The standby refused the handover in its answer: it did not take over.
        Ok(Ok(Err(e))) => return Err(Abandoned::BeforeHandover(e)),
        Ok(Err(_)) => {
            return Err(Abandoned::OutcomeUnknown(anyhow::anyhow!(
                "the session with '{}' ended during the handover",
                t.name
            )))
        }
        Err(_) => {
            // A HandoverAck after this is unexpected: the session ends instead of
            // reporting a handover this node no longer waits for.
            t.abandon_handover();
            return Err(Abandoned::OutcomeUnknown(anyhow::anyhow!(
                "standby '{}' did not answer the handover within 30 s",
                t.name
            )));
        }
    };
    // The standby took over: from here on, this node must never take writes again.
    tokio::task::block_in_place(|| {
        rec.meta
            .change_role(new_epoch, "standby", Some(&t.name), None)
    })
    .map_err(|e| Abandoned::OutcomeUnknown(e.into()))?;
    Ok((seq, new_epoch))
}

/// Stops writes and waits until `t` holds every record; returns the last sequence.
async fn caught_up(rec: &Recovered, group: &Group, t: &TargetState) -> anyhow::Result<Seq> {
    let seq = quiesce(
        rec,
        group,
        format!("switchover to '{}' in progress", t.name),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while t.acked_seq.load(Ordering::Acquire) < seq {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "standby '{}' did not confirm sequence {seq} within 30 s (it holds {})",
                t.name,
                t.acked_seq.load(Ordering::Acquire)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(seq)
}

/// An outdated primary rejoins as a standby of the node that superseded it.
pub(crate) async fn demote(
    rec: &Recovered,
    group: &Group,
    has_listen: bool,
    life: &Lifecycle,
) -> anyhow::Result<serde_json::Value> {
    let Some(o) = rec.meta.outdated()? else {
        bail!(
            "this primary is not outdated (no newer epoch seen); for a planned role swap use `ferryctl switchover`"
        );
    };
    if !has_listen {
        bail!("this node has no replication.listen address to accept its new primary on");
    }
    let seq = quiesce(rec, group, outdated_reason(&o)).await?;
    tokio::task::block_in_place(|| rec.meta.change_role(o.epoch, "standby", Some(&o.by), None))?;
    tracing::warn!(primary = %o.by, epoch = o.epoch, last_seq = seq, "demoted: restarting as a standby");
    life.request_restart();
    Ok(json!({"primary": o.by, "epoch": o.epoch, "last_seq": seq}))
}

/// The fence a primary keeps after its switchover was abandoned: none (it takes writes
/// again), unless it is outdated by now (the standby took over unheard, and its newer
/// epoch reached us): then writes stay refused, for good.
fn fence_after_abandoned_switchover(o: Option<&crate::store::meta::Outdated>) -> Option<String> {
    o.map(outdated_reason)
}

pub(crate) fn outdated_reason(o: &crate::store::meta::Outdated) -> String {
    format!(
        "this primary is outdated: node '{}' is the primary of epoch {}; writes are refused \
         (demote this node to rejoin as its standby)",
        o.by, o.epoch
    )
}

/// The peer a primary's fence responder accepts (TLS and Hello check one name): the
/// primary this node replaced, recorded by promote and take-over as the primary to
/// answer; else (an older promotion, or a primary that never changed roles) its only
/// target, the one node that can come back as an older or a newer primary. `None`:
/// nobody to answer (several targets and no record).
pub(crate) fn fence_peer(cfg: &ferry_api::config::Config) -> Option<String> {
    let r = cfg.replication.as_ref()?;
    if r.listen.is_empty() {
        return None;
    }
    if !r.primary.is_empty() && r.primary != cfg.node.name {
        return Some(r.primary.clone());
    }
    match r.targets.as_slice() {
        [t] => Some(t.name.clone()),
        _ => None,
    }
}

/// The newer epoch a dialer's handshake revealed, if it did: the dialer is the
/// primary of a newer epoch, so this node is outdated.
fn newer_epoch_of(e: &ferry_transport::quic::QuicError) -> Option<u64> {
    use ferry_proto::session::HandshakeError;
    match e {
        ferry_transport::quic::QuicError::Handshake(HandshakeError::LocalEpochStale {
            peer,
            ..
        }) => Some(*peer),
        _ => None,
    }
}

/// Answers the primary's peer when it dials this node's replication address: one of
/// an older epoch gets our Hello (newer epoch), learns it is outdated and fences
/// itself; one of a newer epoch tells us that we are outdated, and `outdated`
/// fences this node (the rule: a node that hears of a newer epoch from any peer
/// never accepts another write as primary; found by ferry-torture, seed 101).
pub(crate) async fn fence_responder(
    listen: std::net::SocketAddr,
    (local, peers): (ferry_proto::session::LocalIdentity, Vec<String>),
    tls: ferry_transport::quic::TlsMaterial,
    outdated: crate::ship::OutdatedHook,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use ferry_transport::quic;
    let opts = transport_options();
    let endpoint = match quic::server_config_for(&tls, &peers, &opts)
        .map_err(anyhow::Error::from)
        .and_then(|c| quic::listen(listen, c).map_err(anyhow::Error::from))
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%listen, "cannot answer outdated primaries on {listen}: {e:#}");
            return;
        }
    };
    // Handshakes run on their own, bounded (as on a standby): a peer that stalls its
    // handshake never keeps the primary that superseded us from being heard.
    let mut acceptor = quic::Acceptor::new(&endpoint, quic::HANDSHAKE_TIMEOUT);
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = acceptor.next() => match accepted {
                None => break,
                Some(Err(e)) => tracing::debug!("fence responder: refused a connection: {e}"),
                Some(Ok(conn)) => answer_fence(conn, &local, &peers, &opts, &outdated).await,
            }
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
}

/// One dialer of the fence responder: a primary of a newer epoch (TLS admitted it as
/// one of `peers`; its Hello names it and says it is a primary) fences this node as
/// outdated by it; an older one is told it is outdated by our Hello.
async fn answer_fence(
    conn: quinn::Connection,
    local: &ferry_proto::session::LocalIdentity,
    peers: &[String],
    opts: &ferry_transport::quic::TransportOptions,
    outdated: &crate::ship::OutdatedHook,
) {
    use ferry_transport::quic;
    let peer = conn.remote_address();
    let names = quic::peer_node_names(&conn);
    let mut seen = None;
    let hello = quic::standby_handshake_observed(conn, local, 0, opts, |h| {
        seen = Some((h.node_name.clone(), h.role));
    });
    let Ok(answered) = tokio::time::timeout(quic::HANDSHAKE_TIMEOUT, hello).await else {
        tracing::warn!(%peer, "fence responder: the peer's Hello did not come within {:?}", quic::HANDSHAKE_TIMEOUT);
        return;
    };
    match answered {
        Err(e) => match (newer_epoch_of(&e), seen) {
            // TLS admitted only these names, and the Hello names the certificate's
            // node in the primary role: that node is the primary of the newer epoch.
            (Some(epoch), Some((name, ferry_proto::wire::Role::Primary)))
                if names.contains(&name) && peers.contains(&name) =>
            {
                outdated(epoch, &name)
            }
            (Some(epoch), _) => {
                tracing::warn!(%peer, epoch, "fence responder: a peer showed epoch {epoch} without being its primary: ignored")
            }
            // A standby asking for our role and position (a relayed member that
            // asks whether its relay is the new primary): our Hello was the answer.
            (None, Some((name, ferry_proto::wire::Role::Standby))) => {
                tracing::info!(%peer, "answered a position probe from standby '{name}'")
            }
            (None, _) => tracing::warn!(%peer, "told an outdated primary it was superseded: {e}"),
        },
        Ok(_) => tracing::warn!(%peer, "fence responder: unexpected handshake success"),
    }
}

/// Waits (bounded) until the replica applied everything journaled.
pub(crate) fn drain_applier(sb: &Standby, timeout: Duration) -> anyhow::Result<Seq> {
    let deadline = Instant::now() + timeout;
    while sb.applied_seq() < sb.durable_seq() {
        if let Some(e) = sb.state.apply_error.lock().clone() {
            bail!("the replica applier stopped ({e}); restart ferryd first");
        }
        if Instant::now() > deadline {
            bail!(
                "the replica did not apply sequences up to {} within {timeout:?} (applied {})",
                sb.durable_seq(),
                sb.applied_seq()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(sb.applied_seq())
}

/// Makes this standby the primary of a new epoch: stops following the primary,
/// optionally rolls back to a point, records the fork point and the new role, then
/// restarts as the primary (serving NBD, journaling new writes after the fork).
pub(crate) fn promote(
    has_nbd: bool,
    rec: &Recovered,
    sb: &Standby,
    (exports, prober): (Option<&PitExports>, Option<&Prober>),
    target: Option<&ferry_api::control::PointSpec>,
    force: bool,
    life: &Lifecycle,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    if !has_nbd {
        bail!("this node has no [nbd] section: add nbd.listen so it can serve its volumes once promoted");
    }
    let epoch = rec.meta.epoch()?;
    // Heartbeats come every second: three missed ones and the primary is not live.
    if let Some(peer) = sb.state.live_primary(Duration::from_secs(3)) {
        if !force {
            bail!(
                "the primary of epoch {epoch} is connected (from {peer}); stop it first, or add --force \
                 (it will be fenced when it next reaches this node)"
            );
        }
        tracing::warn!(%peer, "promoting with --force while the primary is connected");
    }
    let sync_loss = refuse_sync_loss(rec, force)?;
    let behind = refuse_behind(rec, prober, target.is_some(), force)?;
    if exports.is_some_and(|x| !x.is_empty()) {
        bail!("point-in-time views are exported; unexport them before promoting");
    }
    if let (Some(r), None) = (rec.applier.resync.get(), target) {
        bail!(
            "the replica is inconsistent: it is being resynced from the primary; roll it \
             back to its last consistent point first (`ferryctl rollback --seq {}`), then \
             promote, or let the resync finish",
            r.from
        );
    }
    let fork = match (target, rec.meta.rollback_state()?) {
        (Some(t), _) => {
            let vol = rec
                .bases
                .first()
                .map(|b| b.name.clone())
                .unwrap_or_default();
            let r = rollback(rec, sb, exports, &vol, t, true)?;
            r["seq"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("rollback reported no sequence"))?
        }
        (None, Some(RollbackState::Done { target })) => target,
        (None, _) => {
            sb.set_paused(Some("promoting to primary".into()));
            let applied = drain_applier(sb, Duration::from_secs(60))?;
            checkpoint_now(rec, applied)?;
            applied
        }
    };
    let new_epoch = epoch + 1;
    // The journal still holds what a rollback undid (fork + 1 ..= its end): cut there,
    // in the role change's transaction, so that it is never shipped nor replayed and
    // the new epoch's first write is the cut + 1 (`Meta::promote`).
    let cut = rec.journal.last_seq().max(rec.meta.checkpoint()?).max(fork);
    // The primary replaced is recorded as the one to answer: it is the node that
    // comes back as an outdated primary (see `fence_peer`). The role change also
    // clears what the old primary told this node (its sync loss).
    rec.meta
        .promote(new_epoch, Some(&sb.state.primary), fork, cut)?;
    tracing::warn!(
        epoch = new_epoch,
        fork,
        cut,
        "promoted: restarting as the primary"
    );
    life.request_restart();
    Ok(json!({
        "epoch": new_epoch,
        "fork_seq": fork,
        "cut_seq": cut,
        "forced_past_sync_loss": sync_loss,
        "forced_behind": behind,
        "prepared_seconds": started.elapsed().as_secs_f64(),
    }))
}

/// With a `[cluster]`: asks the other reachable standbys where they are. Refused
/// without `force` when one holds more than this node (promote that one instead) or
/// is in a newer epoch already (another node was promoted). A promotion back to a
/// point (`rolling_back`) means to hold less: only the newer epoch refuses it. With
/// `force`, the reason is returned (for the answer and the audit log) and logged.
fn refuse_behind(
    rec: &Recovered,
    prober: Option<&Prober>,
    rolling_back: bool,
    force: bool,
) -> anyhow::Result<Option<String>> {
    let Some(prober) = prober else {
        return Ok(None);
    };
    let durable = rec.journal.durable_seq();
    let epoch = rec.meta.epoch()?;
    let others = tokio::runtime::Handle::current().block_on(prober.positions(durable));
    for p in &others {
        tracing::info!(peer = %p.name, epoch = p.epoch, durable = p.durable, "position of another standby");
    }
    let compared = if rolling_back { Seq::MAX } else { durable };
    let Some(why) = crate::node::members::behind_another(epoch, compared, &others) else {
        return Ok(None);
    };
    if !force {
        bail!("{why}");
    }
    tracing::warn!("promoting with --force: {why}");
    Ok(Some(why))
}

/// A standby its primary said lost sync (a sync target degraded at some sequence)
/// may lack writes the primary acknowledged after it: promoting it can lose them.
/// Refused without `force`; with it, the sequence is returned (for the answer and
/// the audit log) and logged.
fn refuse_sync_loss(rec: &Recovered, force: bool) -> anyhow::Result<Option<Seq>> {
    let Some(at) = rec.meta.heard_sync_loss()? else {
        return Ok(None);
    };
    if !force {
        bail!(
            "this standby lost sync at sequence {at}: the primary acknowledged writes after \
             {at} that it may not hold (its sync target was degraded), so promoting it may \
             lose acknowledged writes. Let it catch up with the primary, or add --force to \
             promote anyway"
        );
    }
    tracing::warn!(
        seq = at,
        "promoting with --force although this standby lost sync at {at}: writes the \
         primary acknowledged after it may be lost"
    );
    Ok(Some(at))
}

/// The role change a planned switchover makes on the standby side.
pub(crate) fn take_over(rec: Arc<Recovered>, sb: Arc<Standby>, life: Arc<Lifecycle>) -> HandoverFn {
    Arc::new(move |seq| {
        let applied = drain_applier(&sb, Duration::from_secs(30))?;
        if applied != seq {
            bail!("applied {applied}, the handover is at {seq}");
        }
        checkpoint_now(&rec, applied)?;
        let new_epoch = rec.meta.epoch()? + 1;
        // As in `promote`: the replaced primary is the peer to answer.
        rec.meta
            .change_role(new_epoch, "primary", Some(&sb.state.primary), Some(seq))?;
        rec.meta.set_fork_by_switchover()?;
        // Not paused here: that would end this session before the HandoverAck goes
        // out. The restart right after the ack ends it.
        tracing::warn!(
            epoch = new_epoch,
            fork = seq,
            "switchover: this node is the primary now; restarting"
        );
        let life = life.clone();
        Ok((
            new_epoch,
            Box::new(move || life.request_restart()) as Box<dyn FnOnce() + Send>,
        ))
    })
}

/// Pauses replication, waits for the applier to drain, checkpoints, then rolls the
/// whole consistency group back (write-sets span volumes: rolling back one alone
/// would produce an image that never existed).
pub(crate) fn rollback(
    rec: &Recovered,
    sb: &Standby,
    exports: Option<&PitExports>,
    volume: &str,
    target: &ferry_api::control::PointSpec,
    group: bool,
) -> anyhow::Result<serde_json::Value> {
    let pit = rec.applier.pit.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "point-in-time recovery is disabled on this standby ([pit] enabled = false)"
        )
    })?;
    find_volume(rec, volume)?;
    if rec.bases.len() > 1 && !group {
        let names: Vec<_> = rec.bases.iter().map(|b| b.name.as_str()).collect();
        bail!(
            "volumes {} form one consistency group and are rolled back together; add --group to confirm",
            names.join(", ")
        );
    }
    if let Some(RollbackState::Done { target }) = rec.meta.rollback_state()? {
        bail!("{}", rolled_back_reason(target));
    }
    if exports.is_some_and(|x| !x.is_empty()) {
        bail!("point-in-time views are exported; unexport them before a rollback");
    }
    let t = parse_target(target)?;
    // Validate before pausing: a typo must not stop replication.
    pit.resolve(&t)?;
    sb.set_paused(Some("paused for a rollback".into()));
    // Everything applied is made durable and checkpointed first: a restart must
    // never replay the journal over the rolled-back replica.
    let applied = drain_applier(sb, Duration::from_secs(60))?;
    checkpoint_now(rec, applied)?;
    let r = pit.rollback(&t)?;
    sb.set_paused(Some(rolled_back_reason(r.point.seq)));
    Ok(json!({
        "seq": r.point.seq,
        "time": ferry_api::timefmt::format_rfc3339(r.point.timestamp_ns),
        "from_seq": applied,
        "undo_entries": r.entries,
        "bytes_restored": r.bytes,
        "seconds": r.took.as_secs_f64(),
        "volumes": rec.bases.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::meta::Outdated;

    /// ferry-torture seed 203: the standby took over, the old primary learnt the newer
    /// epoch (fenced, outdated), then its switchover timed out and lifted every fence:
    /// it acknowledged a write the new primary never got.
    #[test]
    fn an_abandoned_switchover_never_lifts_an_outdated_fence() {
        assert_eq!(fence_after_abandoned_switchover(None), None);
        let o = Outdated {
            epoch: 3,
            by: "dr1".into(),
        };
        let fence = fence_after_abandoned_switchover(Some(&o)).expect("stays fenced");
        assert_eq!(fence, outdated_reason(&o));
    }

    /// A primary named `name` with a replication section: `primary` as recorded (or
    /// configured), `targets` by name.
    fn primary_config(
        name: &str,
        listen: &str,
        primary: &str,
        targets: &[&str],
    ) -> ferry_api::config::Config {
        use ferry_api::config::{ReplicationConfig, TargetConfig};
        let mut cfg = ferry_api::config::Config::parse(&format!(
            r#"
            [node]
            name = "{name}"
            role = "primary"
            cluster_id = "00112233445566778899aabbccddeeff"
            metadata_dir = "a"
            [journal]
            dir = "a/journal"
            size = "64MiB"
            [control]
            socket = "a/ferryd.sock"
            [[volume]]
            name = "vol0"
            path = "/tmp/vol0.img"
            size = "1MiB"
        "#
        ))
        .expect("test config");
        cfg.replication = Some(ReplicationConfig {
            listen: listen.into(),
            primary: primary.into(),
            sync_timeout_ms: 1000,
            tail_bytes: ferry_api::size::ByteSize(1 << 20),
            async_linger_us: 0,
            archives: Vec::new(),
            sync: None,
            targets: targets
                .iter()
                .map(|t| TargetConfig {
                    name: t.to_string(),
                    address: "127.0.0.1:1".into(),
                    mode: Default::default(),
                    on_sync_loss: Default::default(),
                    wan: Default::default(),
                    max_lag_seconds: None,
                })
                .collect(),
        });
        cfg
    }

    /// ferry-torture seed 101: `primary`, promoted after being dr1's standby, kept
    /// the config's `replication.primary = "primary"` (itself) and refused the dial
    /// of the primary it replaced in TLS. The replaced primary recorded by promote
    /// comes first; a node's own name never.
    #[test]
    fn the_fence_responder_answers_the_replaced_primary_never_this_node() {
        let addr = "127.0.0.1:7000";
        let recorded = primary_config("primary", addr, "dr1", &["dr1", "dr2"]);
        assert_eq!(fence_peer(&recorded).as_deref(), Some("dr1"));
        let own = primary_config("primary", addr, "primary", &["dr1"]);
        assert_eq!(fence_peer(&own).as_deref(), Some("dr1"), "the only target");
        let ambiguous = primary_config("primary", addr, "primary", &["dr1", "dr2"]);
        assert_eq!(fence_peer(&ambiguous), None);
        let no_listen = primary_config("primary", "", "dr1", &["dr1"]);
        assert_eq!(fence_peer(&no_listen), None);
    }

    /// A dialer of a newer epoch outdates this node; every other refusal does not.
    #[test]
    fn only_a_newer_epoch_from_the_dialer_outdates_this_node() {
        use ferry_proto::session::HandshakeError;
        use ferry_transport::quic::QuicError;
        let newer = QuicError::Handshake(HandshakeError::LocalEpochStale { local: 2, peer: 3 });
        assert_eq!(newer_epoch_of(&newer), Some(3));
        let older = QuicError::Handshake(HandshakeError::StaleEpoch { local: 3, peer: 2 });
        assert_eq!(newer_epoch_of(&older), None);
        assert_eq!(newer_epoch_of(&QuicError::Protocol("x".into())), None);
    }

    #[test]
    fn an_outdated_primary_is_told_who_replaced_it_and_what_to_do() {
        let why = outdated_reason(&crate::store::meta::Outdated {
            epoch: 4,
            by: "site-b".into(),
        });
        assert!(
            why.contains("node 'site-b' is the primary of epoch 4") && why.contains("demote"),
            "{why}"
        );
    }
}
