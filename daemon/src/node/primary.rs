//! A node in the primary role: start-up of the write path and replication
//! ([`run_primary`]), its control handler, and online verify requests.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_journal::Seq;
use serde_json::json;

use crate::config::Config;
use crate::nbd;
use crate::ops::control;
use crate::ops::metrics::{NodeSource, RoleSource};
use crate::primary::volume::{Group, Registry, Volume};
use crate::ship::{self as replication, Replication, ShipContext, SyncGate};
use crate::store::base::Base;

use crate::node::checkpoint::Checkpointer;
use crate::node::lifecycle::{
    finish_shutdown, journal_status, transport_options, wait_until, ControlSocket, Lifecycle,
    Observe,
};
use crate::node::recovery::{Recovered, JOURNAL_QUEUE};
use crate::node::requests::{create_bookmark, find_volume, list_bookmarks, respond};
use crate::node::roles::{demote, fence_responder, outdated_reason, switchover};

pub(crate) async fn run_primary(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
    life: Arc<Lifecycle>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let group = Group::new(rec.journal.clone(), rec.checkpoint, JOURNAL_QUEUE);
    let volumes: Vec<Arc<Volume>> = rec
        .bases
        .iter()
        .map(|b| {
            Arc::new(Volume {
                base: b.clone(),
                group: group.clone(),
            })
        })
        .collect();
    let registry = Arc::new(Registry { volumes });
    if let Some(o) = rec.meta.outdated()? {
        let why = outdated_reason(&o);
        tracing::error!("{why}");
        group.set_fence(Some(why));
    }
    let outdated: replication::OutdatedHook = {
        let (group, meta) = (group.clone(), rec.meta.clone());
        Arc::new(move |epoch, by| {
            let o = crate::store::meta::Outdated {
                epoch,
                by: by.to_string(),
            };
            if meta.outdated().ok().flatten().as_ref() == Some(&o) {
                return;
            }
            let why = outdated_reason(&o);
            tracing::error!("{why}");
            group.set_fence(Some(why));
            if let Err(e) = meta.set_outdated(&o) {
                tracing::error!("recording that this primary is outdated: {e}");
            }
        })
    };

    let nbd_listen = cfg.nbd_addr().map_err(anyhow::Error::msg)?;
    let nbd_tls = crate::primary::nbd_tls::policy(&cfg)?;
    // After a role change on one host (a switchover in a demo or a test), the node
    // that served this address a moment ago may still be draining: retry a while.
    let deadline = Instant::now() + Duration::from_secs(15);
    let listener = loop {
        match tokio::net::TcpListener::bind(nbd_listen).await {
            Ok(l) => break l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tracing::warn!(%nbd_listen, "NBD address in use; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("binding NBD listener {nbd_listen}"))
                )
            }
        }
    };
    let nbd_addr = listener.local_addr()?;
    let control = ControlSocket::bind(&cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Replication: targets start at the checkpoint; their Hellos say where they are.
    let targets = replication::target_states(&cfg, rec.checkpoint.min(rec.journal.durable_seq()));
    // After a failover, a target that has not rejoined since the fork (typically the
    // old primary) starts degraded: the first writes of the new primary must not
    // wait out a sync timeout for a node that is known to be away. It turns
    // synchronous again once it has caught up.
    if let Some(fork) = rec.meta.fork_seq()? {
        for t in &targets {
            if !rec.meta.rejoined(&t.name, fork)? {
                t.degraded.store(true, Ordering::Release);
            }
        }
    }
    let repl = match &cfg.replication {
        Some(r) if !targets.is_empty() => {
            let sync = SyncGate::new(targets.clone(), Duration::from_millis(r.sync_timeout_ms));
            *group.sync.write() = Some(sync.clone());
            group.feed.enable(r.tail_bytes.0 as usize);
            // Before the shippers start: a target left in bitmap mode resyncs at once.
            crate::ship::catchup::start(
                crate::ship::target::Shared {
                    journal: rec.journal.clone(),
                    bases: rec.bases.clone(),
                    applied: {
                        let g = group.clone();
                        Arc::new(move || g.applied_seq())
                    },
                    checkpoint: {
                        let m = rec.meta.clone();
                        Arc::new(move || m.checkpoint().unwrap_or(0))
                    },
                    sync: Some(sync.clone()),
                    dir: crate::ship::catchup::dirty_dir(&cfg),
                    region_size: crate::ship::dirty::DEFAULT_REGION_SIZE,
                },
                &targets,
                &group.feed,
                stop_rx.clone(),
            )?;
            let ctx = Arc::new(ShipContext {
                journal: rec.journal.clone(),
                tail: group.feed.tail.clone(),
                local: replication::local_identity(
                    &cfg,
                    rec.meta.node_id,
                    rec.meta.epoch()?,
                    ferry_transport::wire::Role::Primary,
                    &rec.bases,
                    "",
                ),
                tls: replication::load_tls(&cfg)?,
                opts: transport_options(),
                durable: group.feed.durable(),
                async_linger: Duration::from_micros(
                    cfg.replication.as_ref().map_or(0, |r| r.async_linger_us),
                ),
                sync: sync.clone(),
                outdated: outdated.clone(),
                fork: rec.meta.fork_seq()?.map(|f| (f, rec.meta.clone())),
            });
            replication::start(ctx, &targets, &stop_rx);
            Some(Arc::new(Replication {
                targets,
                sync,
                index: group.feed.index.clone(),
            }))
        }
        _ => None,
    };

    let ckpt = Checkpointer::start(&cfg, rec.clone(), {
        let (group, repl) = (group.clone(), repl.clone());
        Arc::new(move || {
            let floor = repl.as_ref().map_or(Seq::MAX, |r| r.release_floor());
            (group.applied_seq(), floor)
        })
    })?;

    obs.metrics.set_source(NodeSource {
        meta: rec.meta.clone(),
        journal: rec.journal.clone(),
        role: RoleSource::Primary {
            group: group.clone(),
            replication: repl.clone(),
        },
    });
    // A primary by promotion answers the primary it replaced (should it come back)
    // on its replication address, so that one learns it is outdated and stops.
    let fence_task = match (&cfg.replication, rec.meta.fork_seq()?) {
        (Some(r), Some(_)) if !r.listen.is_empty() => Some(tokio::spawn(fence_responder(
            crate::config::parse_addr(&r.listen).map_err(anyhow::Error::msg)?,
            replication::local_identity(
                &cfg,
                rec.meta.node_id,
                rec.meta.epoch()?,
                ferry_transport::wire::Role::Primary,
                &rec.bases,
                &r.primary,
            ),
            replication::load_tls(&cfg)?,
            stop_rx.clone(),
        ))),
        _ => None,
    };
    let handler = primary_handler(
        &cfg,
        rec.clone(),
        group.clone(),
        repl.clone(),
        nbd_addr,
        life.clone(),
    );
    let control_task = control.serve(&cfg, handler, stop_rx.clone());
    let server_cfg = nbd::ServerConfig {
        max_payload: (32u64 << 20).min(cfg.journal.segment_size.0 / 2) as u32,
        tls: nbd_tls,
        ..nbd::ServerConfig::default()
    };
    let nbd_task = tokio::spawn(nbd::serve(
        listener,
        registry.clone(),
        server_cfg,
        stop_rx.clone(),
    ));

    for v in &cfg.volumes {
        tracing::info!(volume = %v.name, size = v.size.0, "serving nbd://{nbd_addr}/{}", v.name);
    }
    // The ready line carries the bound address, so `listen = "127.0.0.1:0"` works.
    let watchdog = obs.announce_ready(
        &format!(
            "role=primary nbd={nbd_addr} control={}",
            cfg.control.socket.display()
        ),
        &format!("primary: serving nbd://{nbd_addr}"),
        rec.journal.clone(),
    );

    obs.stop_serving(
        shutdown,
        watchdog,
        "shutting down: draining NBD clients",
        &stop_tx,
        "NBD server",
        nbd_task,
        control_task,
    )
    .await;
    // Every acknowledged write is applied; seal the last write-set, let the journal
    // make it durable, then the checkpointer's final round fsyncs and records it.
    let _ = group.seal(bytes::Bytes::new());
    let target = rec.journal.last_seq();
    wait_until("the final seal to become durable", || {
        rec.journal.durable_seq() >= target
    });
    if let Some(t) = fence_task {
        let _ = t.await;
    }
    drop(registry);
    finish_shutdown(ckpt, &rec).await
}

pub(crate) fn primary_handler(
    cfg: &Config,
    rec: Arc<Recovered>,
    group: Arc<Group>,
    repl: Option<Arc<Replication>>,
    nbd_addr: std::net::SocketAddr,
    life: Arc<Lifecycle>,
) -> control::Handler {
    let node = cfg.node.name.clone();
    let has_listen = cfg
        .replication
        .as_ref()
        .is_some_and(|r| !r.listen.is_empty());
    let volumes: Vec<_> = cfg
        .volumes
        .iter()
        .map(|v| json!({"name": v.name, "size_bytes": v.size.0, "path": v.path, "export": format!("nbd://{nbd_addr}/{}", v.name)}))
        .collect();
    Arc::new(move |req| match req {
        control::Request::Status => {
            let j = &rec.journal;
            control::Response::ok(json!({
                "node": node,
                "role": "primary",
                "epoch": rec.meta.epoch().unwrap_or(0),
                "last_seq": j.last_seq(),
                "durable_seq": j.durable_seq(),
                "applied_seq": group.applied_seq(),
                "checkpoint_seq": rec.meta.checkpoint().unwrap_or(0),
                "failed": group.gate.failed(),
                "outdated": rec.meta.outdated().ok().flatten().map(|o| json!({"epoch": o.epoch, "by": o.by})),
                "writes_refused": group.fenced(),
                "fork_seq": rec.meta.fork_seq().ok().flatten(),
                "nbd": {"listen": nbd_addr.to_string()},
                "journal": journal_status(j),
                "volumes": volumes,
                "targets": repl.as_ref().map_or(json!([]), |r| r.status()),
            }))
        }
        control::Request::BookmarkCreate { name } => respond(tokio::task::block_in_place(|| {
            create_bookmark(&rec, &group, &name)
        })),
        control::Request::ListBookmarks => respond(list_bookmarks(&rec, None)),
        control::Request::Switchover { to } => respond(tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(switchover(
                &rec,
                &group,
                repl.as_deref(),
                to.as_deref(),
                &life,
            ))
        })),
        control::Request::Verify { volume } => respond(tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(verify(
                &rec,
                &group,
                repl.as_deref(),
                volume.as_deref(),
            ))
        })),
        control::Request::Demote => respond(tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(demote(&rec, &group, has_listen, &life))
        })),
        other => control::Response::err(format!(
            "{} is a standby command: this node is the primary",
            other.name()
        )),
    })
}

/// Online verify from the primary: a `#verify` seal travels in the stream; this node
/// and every streaming standby hash their volumes as of that seal (copy-before-write
/// keeps the point while writes continue); the differing ranges are listed.
pub(crate) async fn verify(
    rec: &Recovered,
    group: &Group,
    repl: Option<&Replication>,
    volume: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    use crate::verify::chunks::{ChunkList, HashParams};
    use crate::verify::{Request as VerifyRequest, Snapshot};
    let started = Instant::now();
    let bases: Vec<Arc<Base>> = match volume {
        Some(v) => vec![find_volume(rec, v)?],
        None => rec.bases.clone(),
    };
    let targets: Vec<_> = repl
        .map(|r| {
            r.targets
                .iter()
                .filter(|t| t.state() == "streaming")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if targets.is_empty() {
        bail!("no standby is streaming: nothing to verify against");
    }
    let params = HashParams {
        chunk_size: bases
            .iter()
            .map(|b| VerifyRequest::chunk_size_for(b.size))
            .max()
            .unwrap_or(crate::verify::chunks::DEFAULT_CHUNK_SIZE),
        ..HashParams::random_xxh3()?
    };
    let req = VerifyRequest {
        // The seed is random per run: it doubles as the run's id.
        id: params.seed,
        params,
        volumes: if volume.is_some() {
            bases.iter().map(|b| b.id).collect()
        } else {
            Vec::new()
        },
    };
    let id = req.id;
    let snap = Snapshot::new(req.clone(), &bases)?;
    let mut waits = Vec::new();
    for t in &targets {
        for b in &bases {
            waits.push((t.clone(), b.clone(), t.await_verify(id, b.id)));
        }
    }
    group.gate.verify.add(snap.clone());
    let arm = snap.clone();
    let sealed = group.seal_then(
        bytes::Bytes::from(req.label().into_bytes()),
        Some(Box::new(move |seq| arm.arm(seq))),
    );
    let result = async {
        let seq = sealed
            .map_err(|e| anyhow::anyhow!("sealing the verify point: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("the verify point was not journaled"))?;
        let gate = group.gate.clone();
        let hasher = snap.clone();
        let local = tokio::task::spawn_blocking(move || {
            hasher.hash_all(|| gate.applied_seq(), Duration::from_secs(600))
        })
        .await??;
        let mut report = Vec::new();
        let mut differing_total = 0u64;
        for (t, b, rx) in waits {
            let remote = tokio::time::timeout(Duration::from_secs(600), rx)
                .await
                .map_err(|_| anyhow::anyhow!("standby '{}' did not answer the verify within 10 min", t.name))?
                .map_err(|_| anyhow::anyhow!("the session with '{}' ended during the verify", t.name))?
                .map_err(|e| anyhow::anyhow!("standby '{}' could not verify volume '{}': {e}", t.name, b.name))?;
            let remote = ChunkList::decode(&remote)
                .map_err(|e| anyhow::anyhow!("standby '{}' sent bad digests: {e}", t.name))?;
            let mine = local
                .iter()
                .find(|(v, _)| *v == b.id)
                .map(|(_, l)| l)
                .ok_or_else(|| anyhow::anyhow!("no local digests for '{}'", b.name))?;
            let ranges = crate::verify::chunks::diff(mine, &remote)?;
            let bytes: u64 = ranges.iter().map(|r| r.len).sum();
            differing_total += bytes;
            report.push(json!({
                "target": t.name,
                "volume": b.name,
                "differing_bytes": bytes,
                "differing": ranges.iter().map(|r| json!({"offset": r.offset, "len": r.len})).collect::<Vec<_>>(),
            }));
        }
        Ok::<_, anyhow::Error>(json!({
            "id": id,
            "seq": seq,
            "chunk_size": req.params.chunk_size,
            "identical": differing_total == 0,
            "results": report,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }
    .await;
    group.gate.verify.remove(id);
    for t in &targets {
        t.forget_verify(id);
    }
    result
}
