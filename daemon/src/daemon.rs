//! Start-up, crash recovery, checkpointing and orderly shutdown of a ferryd node.
//!
//! Start-up order matters for safety:
//! 1. metadata (refuses a config naming another cluster),
//! 2. base volumes (refuses a store smaller than configured),
//! 3. journal recovery (truncates a torn tail, refuses corruption before it),
//! 4. replay of every journaled record after the checkpoint onto the bases, fsync,
//!    new checkpoint — only then do the listeners open, so no client ever reads a base
//!    that lags an acknowledged write.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_journal::{EngineChoice, Journal, JournalOptions, Op, RecoveryMode, Seq};
use serde_json::json;

use crate::config::{Config, EngineConfig, RecoveryConfig, Role};
use crate::control;
use crate::meta::Meta;
use crate::nbd;
use crate::volume::{Base, Group, Registry, Volume};

/// Journal queue depth; also the number of writes that may wait for the journal at once.
const JOURNAL_QUEUE: usize = 1024;
/// A checkpoint starts early once the journal is this full (percent).
const CHECKPOINT_FILL_PERCENT: u64 = 50;

pub struct Recovered {
    pub meta: Arc<Meta>,
    pub journal: Arc<Journal>,
    pub bases: Vec<Arc<Base>>,
    pub checkpoint: Seq,
}

pub fn journal_options(cfg: &Config) -> JournalOptions {
    let mut o = JournalOptions::new(cfg.journal.dir.clone(), cfg.cluster_id());
    o.segment_size = cfg.journal.segment_size.0;
    o.capacity = cfg.journal.size.0;
    o.engine = match cfg.journal.engine {
        EngineConfig::Auto => EngineChoice::Auto,
        EngineConfig::IoUring => EngineChoice::IoUring,
        EngineConfig::Std => EngineChoice::Std,
    };
    o.recovery = match cfg.journal.recovery {
        RecoveryConfig::TolerateTornTail => RecoveryMode::TolerateTornTail,
        RecoveryConfig::AbsoluteConsistency => RecoveryMode::AbsoluteConsistency,
    };
    o.queue_records = JOURNAL_QUEUE;
    o
}

/// Steps 1–4 above. Blocking; runs before the runtime serves anything.
pub fn recover(cfg: &Config) -> anyhow::Result<Recovered> {
    let meta = Meta::open(&cfg.node.metadata_dir, cfg.cluster_id())?;
    let epoch = meta.epoch()?;
    let mut bases = Vec::with_capacity(cfg.volumes.len());
    for v in &cfg.volumes {
        let id = meta.volume_id(&v.name)?;
        bases.push(Arc::new(Base::open(id, &v.name, &v.path, v.size.0)?));
    }
    let mut opts = journal_options(cfg);
    opts.epoch = epoch;
    let started = Instant::now();
    let (journal, report) = Journal::open(opts)
        .with_context(|| format!("opening journal {}", cfg.journal.dir.display()))?;
    tracing::info!(
        engine = journal.engine_name(),
        first_seq = report.first_seq,
        last_seq = report.last_seq,
        truncated_bytes = report.truncated_bytes,
        truncated_batches = report.truncated_batches,
        "journal recovered in {:?}",
        started.elapsed()
    );
    if let Some(reason) = journal.fallback_reason() {
        tracing::warn!("journal io engine fell back to std IO: {reason}");
    }
    let checkpoint = meta.checkpoint()?;
    let last = journal.last_seq();
    if last < checkpoint {
        bail!(
            "journal {} ends at sequence {last} but the metadata checkpoint is {checkpoint}: \
             the journal directory was replaced or truncated; refusing to start (writes after the checkpoint would be lost)",
            cfg.journal.dir.display()
        );
    }
    let journal = Arc::new(journal);
    let replayed = replay(&journal, &bases, checkpoint)?;
    let checkpoint = if replayed > 0 {
        for b in &bases {
            b.sync()
                .with_context(|| format!("fsync {} after replay", b.path.display()))?;
        }
        let upto = journal.durable_seq();
        meta.set_checkpoint(upto)?;
        tracing::info!(
            replayed,
            checkpoint = upto,
            "journal replayed onto base volumes"
        );
        upto
    } else {
        checkpoint
    };
    // Releases are not persisted by the journal (the checkpoint in the metadata is the
    // durable record of them), so segments at or below it reappear after a restart.
    journal.release_through(checkpoint)?;
    Ok(Recovered {
        meta: Arc::new(meta),
        journal,
        bases,
        checkpoint,
    })
}

/// Applies every journaled record after `checkpoint` to the bases, in order.
fn replay(journal: &Journal, bases: &[Arc<Base>], checkpoint: Seq) -> anyhow::Result<u64> {
    let mut n = 0u64;
    if journal.last_seq() <= checkpoint {
        return Ok(0);
    }
    for entry in journal.reader(checkpoint + 1)? {
        let e = entry.context("reading the journal for replay")?;
        let r = &e.record;
        if r.op == Op::Seal {
            continue;
        }
        let Some(base) = bases.iter().find(|b| b.id == r.volume) else {
            bail!(
                "journal record {} is for volume id {} which is not in the config; \
                 refusing to start rather than drop it (restore the volume's [[volume]] section)",
                e.seq,
                r.volume
            );
        };
        let end = r.offset.checked_add(r.length as u64);
        if end.is_none_or(|end| end > base.size) {
            bail!(
                "journal record {} writes {}+{} beyond volume '{}' ({} bytes); was the volume shrunk?",
                e.seq,
                r.offset,
                r.length,
                base.name,
                base.size
            );
        }
        base.apply(r.op, r.offset, r.length, &r.data)
            .with_context(|| format!("replaying record {} onto {}", e.seq, base.path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// Fsyncs the bases, records the checkpoint, releases journal segments below it.
fn checkpoint(rec: &Recovered, group: &Group, last: &mut Seq) -> anyhow::Result<()> {
    let applied = group.applied_seq();
    if applied <= *last {
        return Ok(());
    }
    for b in &rec.bases {
        b.sync()
            .with_context(|| format!("checkpoint: fsync {}", b.path.display()))?;
    }
    rec.meta.set_checkpoint(applied)?;
    rec.journal.release_through(applied)?;
    *last = applied;
    Ok(())
}

fn spawn_checkpointer(
    rec: Arc<Recovered>,
    group: Arc<Group>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("ferry-checkpoint".into())
        .spawn(move || {
            let mut last = rec.checkpoint;
            let mut since = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let j = &rec.journal;
                let full = j.used_bytes() * 100 >= j.capacity_bytes() * CHECKPOINT_FILL_PERCENT;
                if full || since.elapsed() >= interval {
                    since = Instant::now();
                    if let Err(e) = checkpoint(&rec, &group, &mut last) {
                        tracing::error!("checkpoint failed: {e:#}; will retry");
                    }
                }
            }
        })
        .unwrap_or_else(|e| panic!("cannot start checkpoint thread: {e}"))
}

/// Runs a node until `shutdown` resolves; then drains, checkpoints and returns.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if cfg.node.role == Role::Standby {
        bail!(
            "node '{}' is configured as a standby; standby replication is not built yet",
            cfg.node.name
        );
    }
    let rec = Arc::new(tokio::task::block_in_place(|| recover(&cfg))?);
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

    let listener = tokio::net::TcpListener::bind(cfg.nbd_addr().map_err(anyhow::Error::msg)?)
        .await
        .with_context(|| format!("binding NBD listener {}", cfg.nbd.listen))?;
    let nbd_addr = listener.local_addr()?;
    let control_listener = control::bind(&cfg.control.socket).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_ckpt = Arc::new(AtomicBool::new(false));
    let ckpt = spawn_checkpointer(
        rec.clone(),
        group.clone(),
        Duration::from_millis(cfg.journal.checkpoint_interval_ms),
        stop_ckpt.clone(),
    );

    let handler = status_handler(&cfg, rec.clone(), group.clone(), nbd_addr);
    let control_task = tokio::spawn(control::serve(
        control_listener,
        cfg.control.socket.clone(),
        handler,
        stop_rx.clone(),
    ));
    let server_cfg = nbd::ServerConfig {
        max_payload: (32u64 << 20).min(cfg.journal.segment_size.0 / 2) as u32,
        ..nbd::ServerConfig::default()
    };
    let nbd_task = tokio::spawn(nbd::serve(listener, registry.clone(), server_cfg, stop_rx));

    for v in &cfg.volumes {
        tracing::info!(volume = %v.name, size = v.size.0, "serving nbd://{nbd_addr}/{}", v.name);
    }
    // One stable line on stdout for scripts and tests (the address is the bound one,
    // so `listen = "127.0.0.1:0"` works).
    println!(
        "ferryd ready: role=primary nbd={nbd_addr} control={}",
        cfg.control.socket.display()
    );

    shutdown.await;
    tracing::info!("shutting down: draining NBD clients");
    let _ = stop_tx.send(true);
    match nbd_task.await {
        Ok(Err(e)) => tracing::warn!("NBD server stopped with an error: {e}"),
        Err(e) => tracing::warn!("NBD server task: {e}"),
        Ok(Ok(())) => {}
    }
    let _ = control_task.await;
    stop_ckpt.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || ckpt.join()).await;

    // Every acknowledged write is applied; make the bases durable and release the
    // journal so the next start has nothing to replay.
    let _ = group.seal(bytes::Bytes::new());
    let mut last = rec.checkpoint;
    tokio::task::block_in_place(|| {
        // Wait for the journal to make the seal durable before checkpointing.
        let target = rec.journal.last_seq();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rec.journal.durable_seq() < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        checkpoint(&rec, &group, &mut last)
    })?;
    drop(registry);
    tracing::info!(checkpoint = last, "shutdown complete");
    Ok(())
}

fn status_handler(
    cfg: &Config,
    rec: Arc<Recovered>,
    group: Arc<Group>,
    nbd_addr: std::net::SocketAddr,
) -> control::Handler {
    let node = cfg.node.name.clone();
    let role = cfg.node.role;
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
                "role": role.to_string(),
                "epoch": rec.meta.epoch().unwrap_or(0),
                "last_seq": j.last_seq(),
                "durable_seq": j.durable_seq(),
                "applied_seq": group.applied_seq(),
                "checkpoint_seq": rec.meta.checkpoint().unwrap_or(0),
                "failed": group.gate.failed(),
                "frontend": {
                    "mutations": group.mutations.load(Ordering::Relaxed),
                    "mutation_seconds": group.mutation_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    "journal_wait_seconds": group.journal_wait_ns.load(Ordering::Relaxed) as f64 / 1e9,
                },
                "nbd": {"listen": nbd_addr.to_string()},
                "journal": {
                    "used_bytes": j.used_bytes(),
                    "capacity_bytes": j.capacity_bytes(),
                    "engine": j.engine_name(),
                    "fallback_reason": j.fallback_reason(),
                    "batches": j.stats().batches,
                    "records": j.stats().records,
                    "bytes_written": j.stats().bytes_written,
                    "write_seconds": j.stats().write_ns as f64 / 1e9,
                },
                "volumes": volumes,
                "targets": [],
            }))
        }
    })
}
