//! A node in the standby role: start-up of the replica side ([`run_standby`]) and
//! its control handler.
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use ferry_journal::Seq;
use serde_json::json;

use crate::config::Config;
use crate::ops::control;
use crate::ops::metrics::{NodeSource, RoleSource};
use crate::pit::PitExports;
use crate::replica::session as standby;
use crate::replica::standby::Standby;
use crate::ship::{self as replication};
use crate::store::meta::RollbackState;

use crate::node::checkpoint::Checkpointer;
use crate::node::lifecycle::{
    finish_shutdown, journal_status, transport_options, wait_until, ControlSocket, Lifecycle,
    Observe,
};
use crate::node::recovery::Recovered;
use crate::node::requests::{
    find_volume, list_bookmarks, parse_target, respond, rolled_back_reason, OPERATOR_PAUSE,
};
use crate::node::roles::{promote, rollback, take_over};

pub(crate) async fn run_standby(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
    life: Arc<Lifecycle>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let r = cfg
        .replication
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a standby needs a [replication] section"))?;
    let listen: std::net::SocketAddr =
        crate::config::parse_addr(&r.listen).map_err(anyhow::Error::msg)?;
    // Recovery replayed everything durable: `rec.applied` is the journal's end (or
    // the rollback target of a rolled-back replica, which stays paused).
    let paused = match rec.rollback {
        Some(RollbackState::Done { target }) => Some(rolled_back_reason(target)),
        _ => rec
            .meta
            .operator_pause()
            .context("reading the operator pause from the metadata store")?,
    };
    if let Some(why) = &paused {
        tracing::warn!("{why}");
    }
    let standby = Arc::new(Standby::new(
        rec.journal.clone(),
        rec.applier.clone(),
        rec.applied.clone(),
        &r.primary,
        &r.listen,
        paused,
    )?);
    *standby.handover.lock() = Some(take_over(rec.clone(), standby.clone(), life.clone()));
    let exports = rec
        .applier
        .pit
        .as_ref()
        .map(|p| Arc::new(PitExports::new(p.clone(), cfg.undo_dir().join("scratch"))));
    let local = replication::local_identity(
        &cfg,
        rec.meta.node_id,
        rec.meta.epoch()?,
        ferry_transport::wire::Role::Standby,
        &rec.bases,
        &r.primary,
    );
    let control = ControlSocket::bind(&cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ckpt = Checkpointer::start(&cfg, rec.clone(), {
        let sb = standby.clone();
        Arc::new(move || (sb.applied_seq(), Seq::MAX))
    })?;
    obs.metrics.set_source(NodeSource {
        meta: rec.meta.clone(),
        journal: rec.journal.clone(),
        role: RoleSource::Standby {
            standby: standby.clone(),
            pit: rec.applier.pit.clone(),
        },
    });
    let handler = standby_handler(
        &cfg,
        rec.clone(),
        standby.clone(),
        exports.clone(),
        life.clone(),
    );
    let control_task = control.serve(&cfg, handler, stop_rx.clone());
    let serve = tokio::spawn(standby::serve(
        standby.clone(),
        local,
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
    if let Some(x) = &exports {
        if let Err(e) = x.unexport(None, true).await {
            tracing::warn!("unexporting point-in-time views: {e:#}");
        }
    }
    // Let the applier finish what is durable before the final checkpoint.
    let target = rec.journal.durable_seq();
    wait_until("the replica to apply what is durable", || {
        standby.applied_seq() >= target || standby.paused().is_some()
    });
    finish_shutdown(ckpt, &rec).await
}

pub(crate) fn standby_handler(
    cfg: &Config,
    rec: Arc<Recovered>,
    sb: Arc<Standby>,
    exports: Option<Arc<PitExports>>,
    life: Arc<Lifecycle>,
) -> control::Handler {
    let node = cfg.node.name.clone();
    let volumes: Vec<_> = cfg
        .volumes
        .iter()
        .map(|v| json!({"name": v.name, "size_bytes": v.size.0, "path": v.path}))
        .collect();
    let pit_off = "point-in-time recovery is disabled on this standby ([pit] enabled = false)";
    let has_nbd = cfg.nbd.is_some();
    Arc::new(move |req| {
        let pit = rec.applier.pit.clone();
        match req {
            control::Request::Status => {
                let j = &rec.journal;
                let st = &sb.state;
                let applied_ts = st.applied_ts_ns.load(Ordering::Relaxed);
                let mut pit_status = pit.as_ref().map_or(json!({"enabled": false}), |p| p.status());
                if let Some(x) = &exports {
                    pit_status["exports"] = json!(x.status());
                }
                control::Response::ok(json!({
                    "node": node,
                    "role": "standby",
                    "epoch": rec.meta.epoch().unwrap_or(0),
                    "last_seq": j.durable_seq(),
                    "durable_seq": j.durable_seq(),
                    "applied_seq": sb.applied_seq(),
                    "checkpoint_seq": rec.meta.checkpoint().unwrap_or(0),
                    "journal": journal_status(j),
                    "paused": sb.paused(),
                    "apply_error": st.apply_error.lock().clone(),
                    // A bitmap resync in progress: no consistent image until it ends.
                    "replica": if rec.applier.resync.get().is_some() { "inconsistent" } else { "consistent" },
                    "resync": rec.applier.resync.status(),
                    "primary": {
                        "name": st.primary,
                        "listen": st.listen,
                        "connected": st.connected.lock().clone(),
                        "last_seq": st.last_primary_seq.load(Ordering::Relaxed),
                        "last_error": st.last_error.lock().clone(),
                    },
                    "applied_primary_time_ns": applied_ts,
                    "pit": pit_status,
                    "volumes": volumes,
                    "targets": [],
                }))
            }
            control::Request::ListBookmarks => respond(list_bookmarks(&rec, pit.as_deref())),
            control::Request::BookmarkCreate { .. } => control::Response::err(
                "bookmarks are created on the primary (they travel to standbys in the write-set stream)",
            ),
            control::Request::ListPits { limit } => respond((|| {
                let pit = pit.as_ref().ok_or_else(|| anyhow::anyhow!(pit_off))?;
                let mut v = pit.status();
                v["recent_points"] = json!(pit
                    .points(limit.unwrap_or(20))
                    .iter()
                    .map(|p| json!({"seq": p.seq, "time": crate::timefmt::format_rfc3339(p.timestamp_ns)}))
                    .collect::<Vec<_>>());
                v["bookmarks"] = list_bookmarks(&rec, Some(pit))?["bookmarks"].clone();
                v["exports"] = json!(exports.as_ref().map(|x| x.status()).unwrap_or_default());
                v["applied_seq"] = json!(sb.applied_seq());
                Ok(v)
            })()),
            control::Request::PitExport {
                volume,
                target,
                listen,
                writable,
            } => respond((|| {
                let x = exports.as_ref().ok_or_else(|| anyhow::anyhow!(pit_off))?;
                let base = find_volume(&rec, &volume)?;
                let t = parse_target(&target)?;
                let addr = crate::config::parse_addr(&listen).map_err(anyhow::Error::msg)?;
                tokio::task::block_in_place(|| x.export(base, &t, addr, writable))
            })()),
            control::Request::PitUnexport { id, all } => respond((|| {
                let x = exports.as_ref().ok_or_else(|| anyhow::anyhow!(pit_off))?;
                let ids = tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(x.unexport(id, all))
                })?;
                Ok(json!({"unexported": ids}))
            })()),
            control::Request::Pause => {
                if sb.paused().is_none() {
                    // Durable first: a pause the next restart forgets is not a pause.
                    if let Err(e) = rec.meta.set_operator_pause(Some(OPERATOR_PAUSE)) {
                        return control::Response::err(format!(
                            "not paused: recording the pause failed: {e}"
                        ));
                    }
                    sb.set_paused(Some(OPERATOR_PAUSE.into()));
                    tracing::warn!("replication paused by an operator (kept across restarts)");
                }
                control::Response::ok(json!({"paused": sb.paused()}))
            }
            control::Request::Resume => match rec.meta.rollback_state() {
                Ok(Some(RollbackState::Done { target })) => {
                    control::Response::err(rolled_back_reason(target))
                }
                Ok(_) => match rec.meta.set_operator_pause(None) {
                    Ok(()) => {
                        sb.set_paused(None);
                        tracing::info!("replication resumed by an operator");
                        control::Response::ok(json!({"paused": null}))
                    }
                    Err(e) => control::Response::err(format!(
                        "still paused: clearing the recorded pause failed: {e}"
                    )),
                },
                Err(e) => control::Response::err(e.to_string()),
            },
            control::Request::Rollback {
                volume,
                target,
                group,
            } => respond(tokio::task::block_in_place(|| {
                rollback(&rec, &sb, exports.as_deref(), &volume, &target, group)
            })),
            control::Request::Promote { target, force } => respond(tokio::task::block_in_place(|| {
                promote(has_nbd, &rec, &sb, exports.as_deref(), target.as_ref(), force, &life)
            })),
            other @ (control::Request::Demote
            | control::Request::Switchover { .. }
            | control::Request::Verify { .. }) => {
                control::Response::err(format!(
                    "{} is a primary command: this node is a standby",
                    other.name()
                ))
            }
        }
    })
}
