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
    finish_shutdown, transport_options, wait_until, ControlSocket, Lifecycle, Observe,
};
use crate::node::recovery::{Recovered, JOURNAL_QUEUE};
use crate::node::requests::{create_bookmark, find_volume, list_bookmarks, respond};
use crate::node::roles::{demote, fence_peer, fence_responder, outdated_reason, switchover};
use crate::node::status::{self, RoleSource, StatusSource};

pub(crate) async fn run_primary(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
    life: Arc<Lifecycle>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let group = Group::new(rec.journal.clone(), rec.checkpoint, JOURNAL_QUEUE);
    let registry = volume_registry(&rec, &group);
    if let Some(o) = rec.meta.outdated()? {
        let why = outdated_reason(&o);
        tracing::error!("{why}");
        group.set_fence(Some(why));
    }
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
    // Archive targets (cold tier) hold the journal from the checkpoint until they know
    // what their archive holds.
    let archives = Arc::new(crate::archive::Archives::from_config(
        &cfg,
        rec.checkpoint.min(rec.journal.durable_seq()),
        rec.journal.clone(),
    ));
    crate::archive::run::start_on_primary(
        &cfg,
        rec.meta.epoch()?,
        rec.meta.fork_seq()?,
        &rec.journal,
        &rec.bases,
        &group,
        &archives,
        &stop_rx,
    );
    let ckpt = Checkpointer::start(&cfg, rec.clone(), {
        let (group, repl, archives) = (group.clone(), repl.clone(), archives.clone());
        Arc::new(move || {
            let floor = repl.as_ref().map_or(Seq::MAX, |r| r.release_floor());
            let applied = group.applied_seq();
            (applied, archives.release_floor(floor.min(applied)))
        })
    })?;
    let status = Arc::new(StatusSource {
        node: cfg.node.name.clone(),
        meta: rec.meta.clone(),
        journal: rec.journal.clone(),
        volumes: status::volumes(&cfg, Some(nbd_addr)),
        role: RoleSource::Primary {
            group: group.clone(),
            replication: repl.clone(),
            archives,
            nbd: nbd_addr,
        },
    });
    obs.metrics.set_source(status.metrics_source());
    // A primary answers its peer on its replication address: the primary it replaced
    // (should it come back) learns it is outdated and stops; a primary of a newer
    // epoch that dials us (we were replaced unheard) fences this node.
    let fence_task = match (&cfg.replication, fence_peer(&cfg)) {
        (Some(r), Some(peer)) => Some(start_fence_responder(
            &cfg,
            r,
            &rec,
            &peer,
            outdated_hook(&group, &rec),
            &stop_rx,
        )?),
        _ => None,
    };
    let handler = primary_handler(&cfg, rec.clone(), group.clone(), repl, status, life);
    let control_task = control.serve(&cfg, handler, stop_rx.clone());
    let nbd_task = serve_nbd(&cfg, listener, registry.clone(), nbd_tls, stop_rx);

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
    seal_for_shutdown(&rec, &group);
    if let Some(t) = fence_task {
        let _ = t.await;
    }
    drop(registry);
    finish_shutdown(ckpt, &rec).await
}

/// The NBD exports: one volume per recovered base, all writing through `group`.
fn volume_registry(rec: &Recovered, group: &Arc<Group>) -> Arc<Registry> {
    let volumes = rec
        .bases
        .iter()
        .map(|b| {
            Arc::new(Volume {
                base: b.clone(),
                group: group.clone(),
            })
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

fn serve_nbd(
    cfg: &Config,
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    tls: nbd::TlsPolicy,
    stop_rx: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    let server_cfg = ferry_nbd::ServerConfig {
        max_payload: (32u64 << 20).min(cfg.journal.segment_size.0 / 2) as u32,
        tls,
        ..nbd::ServerConfig::default()
    };
    tokio::spawn(ferry_nbd::serve(listener, registry, server_cfg, stop_rx))
}

/// Every acknowledged write is applied; seals the last write-set and lets the
/// journal make it durable (the checkpointer's final round then fsyncs and records
/// it).
fn seal_for_shutdown(rec: &Recovered, group: &Group) {
    let _ = group.seal(bytes::Bytes::new());
    let target = rec.journal.last_seq();
    wait_until("the final seal to become durable", || {
        rec.journal.durable_seq() >= target
    });
}

/// Records that a newer primary outdated this one, and fences its writes.
fn outdated_hook(group: &Arc<Group>, rec: &Recovered) -> replication::OutdatedHook {
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
}

/// The replication targets, starting at the checkpoint (their Hellos say where they
/// are). After a failover, a target that has not rejoined since the fork (typically
/// the old primary) starts degraded: the first writes of the new primary must not
/// wait out a sync timeout for a node that is known to be away. It turns synchronous
/// again once it has caught up.
fn replication_targets(cfg: &Config, rec: &Recovered) -> anyhow::Result<Vec<Arc<TargetState>>> {
    let mut away = Vec::new();
    if let (Some(fork), Some(r)) = (rec.meta.fork_seq()?, cfg.replication.as_ref()) {
        for t in &r.targets {
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
    let sync = SyncGate::new(targets.clone(), Duration::from_millis(r.sync_timeout_ms));
    *group.sync.write() = Some(sync.clone());
    group.feed.enable(r.tail_bytes.0 as usize);
    // Before the shippers start: a target left in bitmap mode resyncs at once.
    crate::ship::catchup::start(
        catchup_shared(cfg, rec, group, &sync),
        &targets,
        &group.feed,
        stop_rx.clone(),
    )?;
    let ctx = ship_context(cfg, rec, group, &sync)?;
    replication::start(ctx, &targets, stop_rx);
    Ok(Some(Arc::new(Replication {
        targets,
        sync,
        index: group.feed.index.clone(),
    })))
}

fn catchup_shared(
    cfg: &Config,
    rec: &Recovered,
    group: &Arc<Group>,
    sync: &Arc<SyncGate>,
) -> crate::ship::target::Shared {
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
        dir: crate::ship::catchup::dirty_dir(cfg),
        region_size: crate::ship::dirty::DEFAULT_REGION_SIZE,
    }
}

fn ship_context(
    cfg: &Config,
    rec: &Arc<Recovered>,
    group: &Arc<Group>,
    sync: &Arc<SyncGate>,
) -> anyhow::Result<Arc<ShipContext>> {
    Ok(Arc::new(ShipContext {
        journal: rec.journal.clone(),
        tail: group.feed.tail.clone(),
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
        durable: group.feed.durable(),
        async_linger: Duration::from_micros(
            cfg.replication.as_ref().map_or(0, |r| r.async_linger_us),
        ),
        sync: sync.clone(),
        outdated: outdated_hook(group, rec),
        fork: rec.meta.fork_seq()?.map(|f| (f, rec.meta.clone())),
    }))
}

fn start_fence_responder(
    cfg: &Config,
    r: &ferry_api::config::ReplicationConfig,
    rec: &Recovered,
    peer: &str,
    outdated: replication::OutdatedHook,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    Ok(tokio::spawn(fence_responder(
        ferry_api::config::parse_addr(&r.listen).map_err(anyhow::Error::msg)?,
        replication::local_identity(
            cfg,
            rec.meta.node_id,
            rec.meta.epoch()?,
            ferry_proto::wire::Role::Primary,
            &rec.bases,
            peer,
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
                    &life,
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
        r.targets
            .iter()
            .filter(|t| t.state() == "streaming")
            .cloned()
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
        ..HashParams::random_xxh3()?
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
