//! A node in the primary role: start-up of the write path and replication
//! ([`run_primary`]), its control handler, and online verify requests.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_journal::Seq;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ops::control;
use crate::primary::volume::{Group, Registry, Volume};
use crate::ship::{self as replication, Replication, ShipContext, SyncGate, TargetState};
use crate::store::base::Base;
use ferry_api::config::Config;
use ferry_nbd as nbd;

use crate::node::checkpoint::Checkpointer;
use crate::node::lifecycle::{
    finish_shutdown, sender_context, ship_shared, wait_until, ControlSocket, Lifecycle, Observe,
    SenderRole,
};
use crate::node::recovery::{Recovered, JOURNAL_QUEUE};
use crate::node::reload::{self, Reloader};
use crate::node::requests::{create_bookmark, find_volume, list_bookmarks, respond};
use crate::node::roles::{demote, fence_peer, fence_responder, outdated_reason, switchover};
use crate::node::status::{self, RoleSource, StatusSource};

pub(crate) async fn run_primary(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
    life: Arc<Lifecycle>,
    reload_from: Option<(std::path::PathBuf, Config)>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let group = Group::new(rec.journal.clone(), rec.checkpoint, JOURNAL_QUEUE);
    let registry = volume_registry(&cfg, &rec, &group);
    fence_if_outdated(&rec, &group)?;
    // The TLS policy is loaded before the listener opens: a bad certificate stops
    // start-up naming its key.
    let nbd_tls = crate::primary::nbd_tls::policy(&cfg)?;
    let listener = bind_nbd(&cfg).await?;
    let nbd_addr = listener.local_addr()?;
    let control = ControlSocket::bind(&cfg).await?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let repl = match &cfg.replication {
        Some(r) => start_replication(&cfg, r, &rec, &group, &stop_rx)?,
        None => None,
    };
    let archives = start_archives(&cfg, &rec, &group, &stop_rx)?;
    let ckpt = start_checkpointer(&cfg, &rec, &group, &repl, &archives)?;
    let status = primary_status(&cfg, &rec, &group, repl.clone(), archives, nbd_addr);
    obs.metrics.set_source(status.metrics_source());
    let fence_task = fence_task(&cfg, &rec, &group, &stop_rx)?;
    let fallback = start_fallback(&cfg, &rec, &repl, &stop_rx);
    let (reloader, hup) = reload::start(reload_from, || {
        reload_live(&rec, repl.clone(), &control, &obs)
    });
    let handler = primary_handler(
        &cfg,
        rec.clone(),
        group.clone(),
        repl,
        status,
        life,
        reloader,
    );
    let control_task = control.serve(&cfg, handler, stop_rx.clone());
    let nbd_task = serve_nbd(&cfg, listener, registry.clone(), &group, nbd_tls, stop_rx);
    let watchdog = announce_primary(&cfg, &rec, &obs, nbd_addr);

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
    if let Some(t) = hup {
        t.abort();
    }
    seal_for_shutdown(&rec, &group);
    if let Some(t) = fence_task {
        let _ = t.await;
    }
    if let Some(t) = fallback {
        let _ = t.await;
    }
    drop(registry);
    finish_shutdown(ckpt, &rec).await
}

/// A primary that learned a newer epoch's primary superseded it starts fenced: its
/// writes stay refused until it is demoted.
fn fence_if_outdated(rec: &Recovered, group: &Group) -> anyhow::Result<()> {
    if let Some(o) = rec.meta.outdated()? {
        let why = outdated_reason(&o);
        tracing::error!("{why}");
        group.set_fence(Some(why));
    }
    Ok(())
}

/// The checkpointer, releasing the journal up to what is applied, shipped to every
/// target and archived.
fn start_checkpointer(
    cfg: &Config,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    repl: &Option<Arc<Replication>>,
    archives: &Arc<crate::archive::Archives>,
) -> anyhow::Result<Checkpointer> {
    Checkpointer::start(cfg, rec.clone(), {
        let (group, repl, archives) = (group.clone(), repl.clone(), archives.clone());
        Arc::new(move || {
            let floor = repl.as_ref().map_or(Seq::MAX, |r| r.release_floor());
            let applied = group.applied_seq();
            (applied, archives.release_floor(floor.min(applied)))
        })
    })
}

/// The fallback monitor (`relay::start_fallback`); a target it adds is assumed at
/// this node's checkpoint (durable) until its Hello says where it is.
fn start_fallback(
    cfg: &Config,
    rec: &Arc<Recovered>,
    repl: &Option<Arc<Replication>>,
    stop_rx: &watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    crate::node::relay::start_fallback(
        cfg,
        repl.clone(),
        {
            let r = rec.clone();
            Arc::new(move || {
                r.meta
                    .checkpoint()
                    .unwrap_or(0)
                    .min(r.journal.durable_seq())
            })
        },
        stop_rx.clone(),
    )
}

/// Logs the volumes served and tells systemd and the ready line: the primary serves.
fn announce_primary(
    cfg: &Config,
    rec: &Recovered,
    obs: &Observe,
    nbd_addr: std::net::SocketAddr,
) -> Option<JoinHandle<()>> {
    for v in &cfg.volumes {
        tracing::info!(volume = %v.name, size = v.size.0, "serving nbd://{nbd_addr}/{}", v.name);
    }
    // The ready line carries the bound address, so `listen = "127.0.0.1:0"` works.
    obs.announce_ready(
        &format!(
            "role=primary nbd={nbd_addr} control={}",
            cfg.control.socket.display()
        ),
        &format!("primary: serving nbd://{nbd_addr}"),
        rec.journal.clone(),
    )
}

/// Archive targets (cold tier): they hold the journal from the checkpoint until they
/// know what their archive holds, then upload from there.
fn start_archives(
    cfg: &Config,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Arc<crate::archive::Archives>> {
    let archives = Arc::new(crate::archive::Archives::from_config(
        cfg,
        rec.checkpoint.min(rec.journal.durable_seq()),
        rec.journal.clone(),
    ));
    crate::archive::run::start_on_primary(
        cfg,
        rec.meta.epoch()?,
        rec.meta.fork_seq()?,
        &rec.journal,
        &rec.bases,
        group,
        &archives,
        stop_rx,
    );
    Ok(archives)
}

/// What `status` and the metrics read on a primary.
fn primary_status(
    cfg: &Config,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    replication: Option<Arc<Replication>>,
    archives: Arc<crate::archive::Archives>,
    nbd: std::net::SocketAddr,
) -> Arc<StatusSource> {
    Arc::new(StatusSource {
        node: cfg.node.name.clone(),
        meta: rec.meta.clone(),
        journal: rec.journal.clone(),
        volumes: status::volumes(cfg, Some(nbd)),
        bases: rec.bases.clone(),
        members: status::members(cfg),
        role: RoleSource::Primary {
            group: group.clone(),
            replication,
            archives,
            nbd,
        },
    })
}

/// A primary answers its peer on its replication address: the primary it replaced
/// (should it come back) learns it is outdated and stops; a primary of a newer epoch
/// that dials us (we were replaced unheard) fences this node. With a `[cluster]`
/// every member is answered: the new primary, whichever it is, names itself.
fn fence_task(
    cfg: &Config,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(r) = cfg.replication.as_ref().filter(|r| !r.listen.is_empty()) else {
        return Ok(None);
    };
    let mut names: Vec<String> = fence_peer(cfg).into_iter().collect();
    for n in cfg.peers() {
        if !names.contains(&n.name) {
            names.push(n.name.clone());
        }
    }
    if names.is_empty() {
        return Ok(None);
    }
    Ok(Some(start_fence_responder(
        cfg,
        r,
        rec,
        names,
        outdated_hook(group, rec, true),
        stop_rx,
    )?))
}

/// What a reload changes on a primary: its targets, the metrics endpoint and the
/// access grants (retention is recorded: no undo log runs here).
fn reload_live(
    rec: &Arc<Recovered>,
    repl: Option<Arc<Replication>>,
    control: &ControlSocket,
    obs: &Observe,
) -> reload::Live {
    let r = rec.clone();
    reload::Live {
        role: ferry_api::config::Role::Primary,
        targets: repl.map(|repl| reload::Targets {
            repl,
            start_acked: Arc::new(move || {
                r.meta
                    .checkpoint()
                    .unwrap_or(0)
                    .min(r.journal.durable_seq())
            }),
        }),
        pit: None,
        metrics: obs.endpoint.clone(),
        access: control.access.clone(),
        audit: control.audit.clone(),
    }
}

/// The NBD exports: one volume per recovered base, all writing through `group`, each
/// in its configured cache mode.
fn volume_registry(cfg: &Config, rec: &Recovered, group: &Arc<Group>) -> Arc<Registry> {
    let volumes = rec
        .bases
        .iter()
        .map(|b| {
            let cache = cfg
                .volumes
                .iter()
                .find(|v| v.name == b.name)
                .map(|v| v.cache)
                .unwrap_or_default();
            Arc::new(Volume::new(b.clone(), group.clone(), cache))
        })
        .collect();
    Arc::new(Registry { volumes })
}

/// Binds the NBD listener. After a role change on one host (a switchover in a demo
/// or a test), the node that served this address a moment ago may still be
/// draining: an address in use is retried for a while.
async fn bind_nbd(cfg: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    let nbd_listen = cfg.nbd_addr().map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::net::TcpListener::bind(nbd_listen).await {
            Ok(l) => return Ok(l),
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
    }
}

/// Serves the volumes over NBD with the `[nbd]` limits. Requests may be as large as
/// ferry-nbd allows, but a write must fit in half a journal segment. The server's
/// counters (refused requests and connections, TLS sessions) are read by /metrics
/// through the group's frontend.
fn serve_nbd(
    cfg: &Config,
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    group: &Group,
    tls: nbd::TlsPolicy,
    stop_rx: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    let server_cfg = nbd_server_config(cfg, tls);
    group.frontend.attach_nbd_server(server_cfg.stats.clone());
    tokio::spawn(ferry_nbd::serve(listener, registry, server_cfg, stop_rx))
}

/// ferry-nbd's settings from the config: payload limit and connection limits.
fn nbd_server_config(cfg: &Config, tls: nbd::TlsPolicy) -> nbd::ServerConfig {
    let d = nbd::ServerConfig::default();
    let (max_connections, handshake, idle) =
        cfg.nbd
            .as_ref()
            .map_or((d.max_connections, d.handshake_timeout, None), |n| {
                (
                    n.max_connections as usize,
                    Duration::from_secs(n.handshake_timeout_secs),
                    (n.idle_timeout_secs > 0).then(|| Duration::from_secs(n.idle_timeout_secs)),
                )
            });
    nbd::ServerConfig {
        max_payload: u64::from(nbd::DEFAULT_MAX_PAYLOAD).min(cfg.journal.segment_size.0 / 2) as u32,
        tls,
        max_connections,
        handshake_timeout: handshake,
        idle_timeout: idle,
        ..d
    }
}

/// Seals the last write-set and lets the journal make it durable and the gate apply
/// everything before it (writeback writes are acknowledged before either), so the
/// checkpointer's final round fsyncs and records every acknowledged write.
fn seal_for_shutdown(rec: &Recovered, group: &Group) {
    let _ = group.seal(bytes::Bytes::new());
    let target = rec.journal.last_seq();
    wait_until("the final seal to become durable and applied", || {
        rec.journal.durable_seq() >= target && group.applied_seq() >= target
    });
}

/// Records that a newer primary outdated this one, and fences its writes.
/// `primary_known`: the caller knows `by` is the new primary (it dialed this node's
/// fence responder as a primary). A target that shows a newer epoch may instead be a
/// standby already following the new primary (membership): its name is kept only
/// until the new primary itself is heard, and never replaces it.
fn outdated_hook(
    group: &Arc<Group>,
    rec: &Recovered,
    primary_known: bool,
) -> replication::OutdatedHook {
    let (group, meta) = (group.clone(), rec.meta.clone());
    Arc::new(move |epoch, by| {
        let o = crate::store::meta::Outdated {
            epoch,
            by: by.to_string(),
        };
        let known = meta.outdated().ok().flatten();
        if known.as_ref() == Some(&o)
            || known
                .as_ref()
                .is_some_and(|k| k.epoch > epoch || (k.epoch == epoch && !primary_known))
        {
            return;
        }
        let why = outdated_reason(&o);
        tracing::error!("{why}");
        group.set_fence(Some(why));
        if let Err(e) = meta.set_outdated(&o) {
            tracing::error!("recording that this primary is outdated: {e}");
        }
    })
}

/// The replication targets, starting at the checkpoint (their Hellos say where they
/// are). After a failover by promotion, a target that has not rejoined since the fork
/// (typically the old primary) starts degraded: the first writes of the new primary
/// must not wait out a sync timeout for a node that is known to be away. It turns
/// synchronous again once it has caught up. After a switchover the old primary is not
/// away (it handed over everything and comes back as a standby at once): no target
/// starts degraded.
fn replication_targets(cfg: &Config, rec: &Recovered) -> anyhow::Result<Vec<Arc<TargetState>>> {
    let mut away = Vec::new();
    let promoted = rec.meta.fork_by()? == Some("promotion");
    if let (Some(fork), true) = (rec.meta.fork_seq()?, promoted) {
        for t in &cfg.ship_targets() {
            if !rec.meta.rejoined(&t.name, fork)? {
                away.push(t.name.clone());
            }
        }
    }
    let start = rec.checkpoint.min(rec.journal.durable_seq());
    Ok(replication::target_states(cfg, start, |name| {
        away.iter().any(|a| a == name)
    }))
}

/// Starts the catch-up (bitmap resync) and the shippers of the configured targets;
/// `None` without targets.
fn start_replication(
    cfg: &Config,
    r: &ferry_api::config::ReplicationConfig,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<Replication>>> {
    let targets = replication_targets(cfg, rec)?;
    if targets.is_empty() {
        return Ok(None);
    }
    // Before anything is shipped in this run: records past this point are this run's.
    rec.meta
        .arm_crash_horizons(rec.journal.last_seq())
        .map_err(|e| anyhow::anyhow!("recording the targets' crash horizons: {e}"))?;
    let sync = SyncGate::with_policy(
        targets.clone(),
        Duration::from_millis(r.sync_timeout_ms),
        Some(rec.meta.clone()),
        r.sync.clone(),
    );
    *group.sync.write() = Some(sync.clone());
    group.feed.enable(r.tail_bytes.0 as usize);
    let repl = Replication::new(targets, sync.clone(), group.feed.index.clone());
    // Before the shippers start: a target left in bitmap mode resyncs at once.
    let shared = crate::ship::catchup::start(
        catchup_shared(cfg, rec, group, &sync),
        &repl.targets,
        &group.feed,
        stop_rx.clone(),
    )?;
    // Sync losses and standbys' resync requests recorded before a restart hold on; a
    // sync target degraded from the start (bitmap mode, away since a failover) is
    // recorded before the first write.
    for t in repl.targets() {
        t.load_persisted(&rec.meta)?;
    }
    sync.recompute();
    let ctx = ship_context(cfg, rec, group, &sync)?;
    repl.start(ctx, shared, group.feed.clone(), stop_rx.clone());
    Ok(Some(Arc::new(repl)))
}

fn catchup_shared(
    cfg: &Config,
    rec: &Recovered,
    group: &Arc<Group>,
    sync: &Arc<SyncGate>,
) -> crate::ship::target::Shared {
    let g = group.clone();
    ship_shared(cfg, rec, Arc::new(move || g.applied_seq()), sync)
}

fn ship_context(
    cfg: &Config,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    sync: &Arc<SyncGate>,
) -> anyhow::Result<Arc<ShipContext>> {
    let role = SenderRole {
        outdated: outdated_hook(group, rec, false),
        fork: rec.meta.fork_seq()?.map(|f| (f, rec.meta.clone())),
        horizons: Some(rec.meta.clone()),
        received_acks: cfg
            .volumes
            .iter()
            .any(|v| v.cache != ferry_api::config::CacheMode::Writethrough),
        hold: None,
    };
    sender_context(cfg, rec, &group.feed, sync, role)
}

fn start_fence_responder(
    cfg: &Config,
    r: &ferry_api::config::ReplicationConfig,
    rec: &Recovered,
    peers: Vec<String>,
    outdated: replication::OutdatedHook,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let first = peers.first().cloned().unwrap_or_default();
    Ok(tokio::spawn(fence_responder(
        ferry_api::config::parse_addr(&r.listen).map_err(anyhow::Error::msg)?,
        (
            replication::local_identity(
                cfg,
                rec.meta.node_id,
                rec.meta.epoch()?,
                ferry_proto::wire::Role::Primary,
                &rec.bases,
                &first,
            ),
            peers,
        ),
        replication::load_tls(cfg)?,
        outdated,
        stop_rx.clone(),
    )))
}

pub(crate) fn primary_handler(
    cfg: &Config,
    rec: Arc<Recovered>,
    group: Arc<Group>,
    repl: Option<Arc<Replication>>,
    status: Arc<StatusSource>,
    life: Arc<Lifecycle>,
    reloader: Option<Arc<Reloader>>,
) -> control::Handler {
    let has_listen = cfg
        .replication
        .as_ref()
        .is_some_and(|r| !r.listen.is_empty());
    Arc::new(move |req| match req {
        ferry_api::control::Request::Status => status.respond(),
        ferry_api::control::Request::BookmarkCreate { name } => {
            respond(tokio::task::block_in_place(|| {
                create_bookmark(&rec, &group, &name)
            }))
        }
        ferry_api::control::Request::ListBookmarks => respond(list_bookmarks(&rec, None)),
        ferry_api::control::Request::Switchover { to } => {
            respond(tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(switchover(
                    &rec,
                    &group,
                    repl.as_deref(),
                    to.as_deref(),
                    (&life, has_listen),
                ))
            }))
        }
        ferry_api::control::Request::Verify { volume } => {
            respond(tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(verify(
                    &rec,
                    &group,
                    repl.as_deref(),
                    volume.as_deref(),
                ))
            }))
        }
        ferry_api::control::Request::Demote => respond(tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(demote(&rec, &group, has_listen, &life))
        })),
        ferry_api::control::Request::Reload => reload::answer(reloader.as_deref()),
        other => ferry_api::control::Response::err(format!(
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
    use crate::verify::Snapshot;
    let started = Instant::now();
    let bases: Vec<Arc<Base>> = match volume {
        Some(v) => vec![find_volume(rec, v)?],
        None => rec.bases.clone(),
    };
    let targets = streaming_targets(repl);
    if targets.is_empty() {
        bail!("no standby is streaming: nothing to verify against");
    }
    let req = verify_request(&bases, volume.is_some())?;
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
        let (report, differing_total) = compare_with_standbys(&local, waits).await?;
        Ok::<_, anyhow::Error>(json!({
            "id": id,
            "seq": seq,
            "chunk_size": req.params.chunk_size,
            "digest": req.params.algo.name(),
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

/// The targets a verify compares with: those streaming now.
fn streaming_targets(repl: Option<&Replication>) -> Vec<Arc<TargetState>> {
    repl.map(|r| {
        r.targets()
            .into_iter()
            .filter(|t| t.state() == "streaming")
            .collect()
    })
    .unwrap_or_default()
}

/// A verify run over `bases` (all volumes, or the one `named`): chunk size from the
/// largest volume, a random seed that doubles as the run's id.
fn verify_request(bases: &[Arc<Base>], named: bool) -> anyhow::Result<crate::verify::Request> {
    use crate::verify::chunks::HashParams;
    use crate::verify::Request as VerifyRequest;
    let params = HashParams {
        chunk_size: bases
            .iter()
            .map(|b| VerifyRequest::chunk_size_for(b.size))
            .max()
            .unwrap_or(crate::verify::chunks::DEFAULT_CHUNK_SIZE),
        ..HashParams::random(crate::verify::node_digest())?
    };
    Ok(VerifyRequest {
        id: params.seed,
        params,
        volumes: if named {
            bases.iter().map(|b| b.id).collect()
        } else {
            Vec::new()
        },
    })
}

/// What a standby's digests of one volume arrive on.
type VerifyWait = (
    Arc<TargetState>,
    Arc<Base>,
    tokio::sync::oneshot::Receiver<Result<bytes::Bytes, String>>,
);

/// Waits for each standby's digests of each volume and diffs them with the local
/// ones: one report row per (target, volume), and the differing bytes in all.
async fn compare_with_standbys(
    local: &[(u32, crate::verify::chunks::ChunkList)],
    waits: Vec<VerifyWait>,
) -> anyhow::Result<(Vec<serde_json::Value>, u64)> {
    use crate::verify::chunks::ChunkList;
    let mut report = Vec::new();
    let mut differing_total = 0u64;
    for (t, b, rx) in waits {
        let remote = tokio::time::timeout(Duration::from_secs(600), rx)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "standby '{}' did not answer the verify within 10 min",
                    t.name
                )
            })?
            .map_err(|_| anyhow::anyhow!("the session with '{}' ended during the verify", t.name))?
            .map_err(|e| {
                anyhow::anyhow!(
                    "standby '{}' could not verify volume '{}': {e}",
                    t.name,
                    b.name
                )
            })?;
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
    Ok((report, differing_total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_settings_come_from_the_config_and_the_library() {
        let text = |nbd: &str, seg: &str| {
            format!(
                "[node]\nname = \"p\"\nrole = \"primary\"\n\
                 cluster_id = \"00112233445566778899aabbccddeeff\"\nmetadata_dir = \"m\"\n\
                 [journal]\ndir = \"j\"\nsize = \"1GiB\"\nsegment_size = \"{seg}\"\n\
                 [nbd]\nlisten = \"127.0.0.1:0\"\n{nbd}\n[control]\nsocket = \"s\"\n"
            )
        };
        let cfg = Config::parse(&text("", "256MiB")).unwrap();
        let s = nbd_server_config(&cfg, nbd::TlsPolicy::Off);
        // The library's limit (64 MiB), not a smaller one of ferryd's own.
        assert_eq!(s.max_payload, nbd::DEFAULT_MAX_PAYLOAD);
        assert_eq!(s.max_payload, 64 << 20);
        assert_eq!(s.max_connections, 64);
        assert_eq!(s.handshake_timeout, Duration::from_secs(10));
        assert_eq!(s.idle_timeout, None);
        // A small segment still bounds a write to half of it.
        let cfg = Config::parse(&text(
            "max_connections = 5\nhandshake_timeout_secs = 2\nidle_timeout_secs = 30",
            "16MiB",
        ))
        .unwrap();
        let s = nbd_server_config(&cfg, nbd::TlsPolicy::Off);
        assert_eq!(s.max_payload, 8 << 20);
        assert_eq!(s.max_connections, 5);
        assert_eq!(s.handshake_timeout, Duration::from_secs(2));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn without_replication_no_target_is_streaming() {
        assert!(streaming_targets(None).is_empty());
    }

    #[test]
    fn a_verify_of_all_volumes_names_none_and_its_seed_is_its_id() {
        let all = verify_request(&[], false).unwrap();
        assert!(all.volumes.is_empty());
        assert_eq!(all.id, all.params.seed);
        assert_eq!(
            all.params.chunk_size,
            crate::verify::chunks::DEFAULT_CHUNK_SIZE
        );
        let again = verify_request(&[], false).unwrap();
        assert_ne!(again.id, all.id, "each run has its own random id");
    }
}
