//! A node in the standby role: start-up of the replica side ([`run_standby`]) and
//! its control handler.
use std::sync::Arc;

use anyhow::{bail, Context};
use ferry_journal::Seq;
use serde_json::json;

use crate::ops::control;
use crate::pit::{Pit, PitExports};
use crate::replica::session as standby;
use crate::replica::standby::Standby;
use crate::ship::{self as replication, ShipFeed};
use crate::store::meta::RollbackState;
use ferry_api::config::{Config, ReplicationConfig};

use crate::node::checkpoint::Checkpointer;
use crate::node::lifecycle::{
    finish_shutdown, transport_options, wait_until, ControlSocket, Lifecycle, Observe,
};
use crate::node::members;
use crate::node::recovery::Recovered;
use crate::node::relay;
use crate::node::reload::{self, Reloader};
use crate::node::requests::{
    find_volume, list_bookmarks, parse_target, respond, rolled_back_reason, OPERATOR_PAUSE,
};
use crate::node::roles::{promote, rollback, take_over};
use crate::node::status::{self, RoleSource, StatusSource};

pub(crate) async fn run_standby(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
    life: Arc<Lifecycle>,
    reload_from: Option<(std::path::PathBuf, Config)>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let r = cfg
        .replication
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a standby needs a [replication] section"))?;
    let listen: std::net::SocketAddr =
        ferry_api::config::parse_addr(&r.listen).map_err(anyhow::Error::msg)?;
    let (standby, feed) = new_standby(&cfg, &rec, &r, &life)?;
    let exports = rec
        .applier
        .pit
        .as_ref()
        .map(|p| Arc::new(PitExports::new(p.clone(), cfg.undo_dir().join("scratch"))));
    let local = replication::local_identity(
        &cfg,
        rec.meta.node_id,
        rec.meta.epoch()?,
        ferry_proto::wire::Role::Standby,
        &rec.bases,
        &r.primary,
    );
    let peers = standby_peers(&cfg, (&r.primary, &local), &rec, &life)?;
    let prober = prober(&cfg, &r.primary, &local)?;
    let control = ControlSocket::bind(&cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relayed = match &feed {
        Some(f) => Some(start_relay(&cfg, &rec, f, &standby, &stop_rx)?),
        None => None,
    };
    let ckpt = start_checkpointer(&cfg, &rec, &standby, &relayed)?;
    let status = standby_status(&cfg, &rec, &standby, (&exports, relayed));
    obs.metrics.set_source(status.metrics_source());
    let (reloader, hup) = reload::start(reload_from, || reload_live(&rec, &control, &obs));
    let handler = standby_handler(
        &cfg,
        rec.clone(),
        standby.clone(),
        (exports.clone(), reloader, prober),
        status,
        life.clone(),
    );
    let control_task = control.serve(&cfg, handler, stop_rx.clone());
    let serve = tokio::spawn(standby::serve(
        standby.clone(),
        (local, peers),
        replication::load_tls(&cfg)?,
        transport_options(),
        listen,
        stop_rx,
    ));
    let watchdog = obs.announce_ready(
        &format!(
            "role=standby replication={listen} control={}",
            cfg.control.socket.display()
        ),
        &format!("standby: replication {listen}"),
        rec.journal.clone(),
    );
    obs.stop_serving(
        shutdown,
        watchdog,
        "shutting down standby",
        &stop_tx,
        "standby listener",
        serve,
        control_task,
    )
    .await;
    if let Some(t) = hup {
        t.abort();
    }
    drain_standby(&rec, &standby, exports.as_deref()).await;
    finish_shutdown(ckpt, &rec).await
}

/// The replica side's state, paused if recovery says so, able to take over; with
/// relayed members, the feed of the records it passes on to them.
fn new_standby(
    cfg: &Config,
    rec: &Arc<Recovered>,
    r: &ReplicationConfig,
    life: &Arc<Lifecycle>,
) -> anyhow::Result<(Arc<Standby>, Option<Arc<ShipFeed>>)> {
    let paused = initial_pause(rec)?;
    if let Some(why) = &paused {
        tracing::warn!("{why}");
    }
    let feed = relay::relay_feed(cfg, rec);
    let standby = Arc::new(Standby::new(
        rec.journal.clone(),
        rec.applier.clone(),
        rec.applied.clone(),
        (&r.primary, &r.listen),
        paused,
        (cfg.via_of(&cfg.node.name).map(str::to_string), feed.clone()),
    )?);
    *standby.handover.lock() = Some(take_over(rec.clone(), standby.clone(), life.clone()));
    Ok((standby, feed))
}

/// The shippers to the members this standby relays to, each told what the replica
/// has applied.
fn start_relay(
    cfg: &Config,
    rec: &Arc<Recovered>,
    feed: &Arc<ShipFeed>,
    standby: &Arc<Standby>,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Arc<replication::Replication>> {
    relay::start_relay(
        cfg,
        rec,
        feed,
        {
            let sb = standby.clone();
            Arc::new(move || sb.applied_seq())
        },
        stop_rx,
    )
}

/// The checkpointer, releasing the journal up to what the replica applied.
fn start_checkpointer(
    cfg: &Config,
    rec: &Arc<Recovered>,
    standby: &Arc<Standby>,
    relayed: &Option<Arc<replication::Replication>>,
) -> anyhow::Result<Checkpointer> {
    Checkpointer::start(cfg, rec.clone(), {
        let (sb, relayed) = (standby.clone(), relayed.clone());
        // A relay keeps what the members it relays to do not hold durably yet.
        Arc::new(move || {
            (
                sb.applied_seq(),
                relayed.as_ref().map_or(Seq::MAX, |r| r.release_floor()),
            )
        })
    })
}

/// Whom this standby accepts: its primary; with a `[cluster]`, every member too, a
/// newer epoch's primary among them being followed (`members::refused_hook`; a
/// relayed node asks its relay whether it is that primary itself).
fn standby_peers(
    cfg: &Config,
    (primary, local): (&str, &ferry_proto::session::LocalIdentity),
    rec: &Arc<Recovered>,
    life: &Arc<Lifecycle>,
) -> anyhow::Result<Arc<standby::Peers>> {
    let names = members::accepted_names(cfg, primary);
    let mut refused = None;
    if cfg.cluster.is_some() {
        let via = cfg.via_of(&cfg.node.name).map(str::to_string);
        let relay = via
            .as_deref()
            .and_then(|v| cfg.peers().into_iter().find(|n| n.name == v));
        let relay_probe = match relay {
            Some(n) => Some(Arc::new(members::Prober {
                tls: Arc::new(replication::load_tls(cfg)?),
                local: local.clone(),
                opts: transport_options(),
                peers: vec![n.clone()],
            })),
            None => None,
        };
        refused = Some(members::refused_hook(
            rec.clone(),
            life.clone(),
            (names.clone(), via),
            relay_probe,
        ));
    }
    Ok(Arc::new(standby::Peers { names, refused }))
}

/// With a `[cluster]`: asks the other standbys (not the primary followed) where they
/// are, so that `promote` can refuse a node that holds less.
fn prober(
    cfg: &Config,
    primary: &str,
    local: &ferry_proto::session::LocalIdentity,
) -> anyhow::Result<Option<Arc<members::Prober>>> {
    if cfg.cluster.is_none() {
        return Ok(None);
    }
    Ok(Some(Arc::new(members::Prober {
        tls: Arc::new(replication::load_tls(cfg)?),
        local: local.clone(),
        opts: transport_options(),
        peers: cfg
            .peers()
            .into_iter()
            .filter(|n| n.name != primary)
            .cloned()
            .collect(),
    })))
}

/// What `ferryctl status` and the metrics read on a standby.
fn standby_status(
    cfg: &Config,
    rec: &Arc<Recovered>,
    standby: &Arc<Standby>,
    (exports, relay): (
        &Option<Arc<PitExports>>,
        Option<Arc<replication::Replication>>,
    ),
) -> Arc<StatusSource> {
    Arc::new(StatusSource {
        node: cfg.node.name.clone(),
        meta: rec.meta.clone(),
        journal: rec.journal.clone(),
        volumes: status::volumes(cfg, None),
        bases: rec.bases.clone(),
        members: status::members(cfg),
        role: RoleSource::Standby {
            standby: standby.clone(),
            applier: rec.applier.clone(),
            exports: exports.clone(),
            relay,
        },
    })
}

/// What a reload changes on a standby: the retention of its undo log, the metrics
/// endpoint and the access grants (targets are recorded for its promotion).
fn reload_live(rec: &Recovered, control: &ControlSocket, obs: &Observe) -> reload::Live {
    reload::Live {
        role: ferry_api::config::Role::Standby,
        targets: None,
        pit: rec.applier.pit.clone(),
        metrics: obs.endpoint.clone(),
        access: control.access.clone(),
        audit: control.audit.clone(),
    }
}

/// Unexports the point-in-time views and lets the applier finish what is durable
/// (unless paused) before the final checkpoint.
async fn drain_standby(rec: &Recovered, standby: &Standby, exports: Option<&PitExports>) {
    if let Some(x) = exports {
        if let Err(e) = x.unexport(None, true).await {
            tracing::warn!("unexporting point-in-time views: {e:#}");
        }
    }
    let target = rec.journal.durable_seq();
    wait_until("the replica to apply what is durable", || {
        standby.applied_seq() >= target || standby.paused().is_some()
    });
}

/// Why the standby starts paused, if it does. Recovery replayed everything durable:
/// `rec.applied` is the journal's end, or the rollback target of a rolled-back
/// replica, which stays paused.
fn initial_pause(rec: &Recovered) -> anyhow::Result<Option<String>> {
    Ok(match rec.rollback {
        Some(RollbackState::Done { target }) => Some(rolled_back_reason(target)),
        _ => rec
            .meta
            .operator_pause()
            .context("reading the operator pause from the metadata store")?,
    })
}

const PIT_OFF: &str = "point-in-time recovery is disabled on this standby ([pit] enabled = false)";

/// The standby handler's optional parts: the PIT views, the reloader, the position
/// prober (with a `[cluster]`).
type HandlerParts = (
    Option<Arc<PitExports>>,
    Option<Arc<Reloader>>,
    Option<Arc<members::Prober>>,
);

pub(crate) fn standby_handler(
    cfg: &Config,
    rec: Arc<Recovered>,
    sb: Arc<Standby>,
    (exports, reloader, prober): HandlerParts,
    status: Arc<StatusSource>,
    life: Arc<Lifecycle>,
) -> control::Handler {
    let has_nbd = cfg.nbd.is_some();
    Arc::new(move |req| {
        let pit = rec.applier.pit.clone();
        match req {
            ferry_api::control::Request::Status => status.respond(),
            ferry_api::control::Request::ListBookmarks => respond(list_bookmarks(&rec, pit.as_deref())),
            ferry_api::control::Request::BookmarkCreate { .. } => ferry_api::control::Response::err(
                "bookmarks are created on the primary (they travel to standbys in the write-set stream)",
            ),
            ferry_api::control::Request::ListPits { limit } => respond(list_pits(
                &rec,
                &sb,
                pit.as_deref(),
                exports.as_deref(),
                limit,
            )),
            ferry_api::control::Request::PitExport {
                volume,
                target,
                listen,
                writable,
            } => respond((|| {
                let x = exports.as_ref().ok_or_else(|| anyhow::anyhow!(PIT_OFF))?;
                let base = find_volume(&rec, &volume)?;
                let t = parse_target(&target)?;
                let addr = ferry_api::config::parse_addr(&listen).map_err(anyhow::Error::msg)?;
                tokio::task::block_in_place(|| x.export(base, &t, addr, writable))
            })()),
            ferry_api::control::Request::PitUnexport { id, all } => respond((|| {
                let x = exports.as_ref().ok_or_else(|| anyhow::anyhow!(PIT_OFF))?;
                let ids = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(x.unexport(id, all))
                })?;
                Ok(json!({"unexported": ids}))
            })()),
            ferry_api::control::Request::DrillReport(r) => respond(record_drill(&r)),
            ferry_api::control::Request::Pause => pause(&rec, &sb),
            ferry_api::control::Request::Resume => resume(&rec, &sb),
            ferry_api::control::Request::Rollback {
                volume,
                target,
                group,
            } => respond(tokio::task::block_in_place(|| {
                rollback(&rec, &sb, exports.as_deref(), &volume, &target, group)
            })),
            ferry_api::control::Request::Promote { target, force } => respond(tokio::task::block_in_place(|| {
                promote(has_nbd, &rec, &sb, (exports.as_deref(), prober.as_deref()), target.as_ref(), force, &life)
            })),
            ferry_api::control::Request::Reload => reload::answer(reloader.as_deref()),
            other @ (ferry_api::control::Request::Demote
            | ferry_api::control::Request::Switchover { .. }
            | ferry_api::control::Request::Verify { .. }) => {
                ferry_api::control::Response::err(format!(
                    "{} is a primary command: this node is a standby",
                    other.name()
                ))
            }
        }
    })
}

/// A drill's result: the control server's audit line holds the report itself; this
/// checks it is one an auditor can read (a bounded one-line summary) and logs it.
fn record_drill(r: &ferry_api::control::DrillReport) -> anyhow::Result<serde_json::Value> {
    let max = ferry_api::control::MAX_DRILL_SUMMARY;
    if r.summary.len() > max || r.summary.contains('\n') {
        bail!("drill report: the summary must be one line of at most {max} bytes");
    }
    if r.check != "filesystem" && r.check != "command" {
        bail!(
            "drill report: check '{}' is neither 'filesystem' nor 'command'",
            r.check
        );
    }
    tracing::info!(
        volume = %r.volume,
        seq = r.seq,
        passed = r.passed,
        rto_ms = r.rto_ms,
        rpo_ms = r.rpo_ms,
        "DR drill recorded: {}",
        r.summary
    );
    Ok(json!({"recorded": true}))
}

/// The point-in-time window with its most recent `limit` points (20 by default), the
/// bookmarks, the exported views and the applied position.
fn list_pits(
    rec: &Recovered,
    sb: &Standby,
    pit: Option<&Pit>,
    exports: Option<&PitExports>,
    limit: Option<usize>,
) -> anyhow::Result<serde_json::Value> {
    let pit = pit.ok_or_else(|| anyhow::anyhow!(PIT_OFF))?;
    let mut v = serde_json::to_value(pit.status())?;
    v["recent_points"] = points_json(&pit.points(limit.unwrap_or(20)));
    v["bookmarks"] = list_bookmarks(rec, Some(pit))?["bookmarks"].clone();
    v["exports"] = json!(exports.map(|x| x.status()).unwrap_or_default());
    v["applied_seq"] = json!(sb.applied_seq());
    Ok(v)
}

/// Recovery points as `ferryctl pit list` shows them: sequence and time.
fn points_json(points: &[crate::pit::Point]) -> serde_json::Value {
    points
        .iter()
        .map(|p| json!({"seq": p.seq, "time": ferry_api::timefmt::format_rfc3339(p.timestamp_ns)}))
        .collect()
}

/// Pauses replication, durably first: a pause the next restart forgets is not a pause.
fn pause(rec: &Recovered, sb: &Standby) -> ferry_api::control::Response {
    if sb.paused().is_none() {
        if let Err(e) = rec.meta.set_operator_pause(Some(OPERATOR_PAUSE)) {
            return ferry_api::control::Response::err(format!(
                "not paused: recording the pause failed: {e}"
            ));
        }
        sb.set_paused(Some(OPERATOR_PAUSE.into()));
        tracing::warn!("replication paused by an operator (kept across restarts)");
    }
    ferry_api::control::Response::ok(json!({"paused": sb.paused()}))
}

/// Resumes replication, unless the replica was rolled back (it no longer follows).
fn resume(rec: &Recovered, sb: &Standby) -> ferry_api::control::Response {
    match rec.meta.rollback_state() {
        Ok(Some(RollbackState::Done { target })) => {
            ferry_api::control::Response::err(rolled_back_reason(target))
        }
        Ok(_) => match rec.meta.set_operator_pause(None) {
            Ok(()) => {
                sb.set_paused(None);
                tracing::info!("replication resumed by an operator");
                ferry_api::control::Response::ok(json!({"paused": null}))
            }
            Err(e) => ferry_api::control::Response::err(format!(
                "still paused: clearing the recorded pause failed: {e}"
            )),
        },
        Err(e) => ferry_api::control::Response::err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_points_show_their_sequence_and_time() {
        let points = [
            crate::pit::Point {
                seq: 3,
                timestamp_ns: 0,
            },
            crate::pit::Point {
                seq: 8,
                timestamp_ns: 61_500_000_000,
            },
        ];
        assert_eq!(
            points_json(&points),
            json!([
                {"seq": 3, "time": "1970-01-01T00:00:00.000Z"},
                {"seq": 8, "time": "1970-01-01T00:01:01.500Z"},
            ])
        );
        assert_eq!(points_json(&[]), json!([]));
    }
}
