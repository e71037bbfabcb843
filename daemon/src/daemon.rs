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
use crate::metrics::{self, Metrics, NodeSource, RoleSource};
use crate::nbd;
use crate::replication::{self, Replication, ShipContext, SyncGate};
use crate::sdnotify::{self, State};
use crate::standby::{self, Standby};
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
    o.max_inflight_batches = cfg.journal.inflight_batches as usize;
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

/// What a checkpoint works from: the sequence applied to the bases (contiguous), and
/// the floor below which every replication target holds the journal durably.
pub type Positions = Arc<dyn Fn() -> (Seq, Seq) + Send + Sync>;

/// Fsyncs the bases and records the checkpoint; releases journal segments below both
/// the checkpoint and the replication floor.
fn checkpoint(
    rec: &Recovered,
    positions: &Positions,
    last: &mut Seq,
    released: &mut Seq,
) -> anyhow::Result<()> {
    let (applied, floor) = positions();
    if applied > *last {
        for b in &rec.bases {
            b.sync()
                .with_context(|| format!("checkpoint: fsync {}", b.path.display()))?;
        }
        rec.meta.set_checkpoint(applied)?;
        *last = applied;
    }
    let release = (*last).min(floor);
    if release > *released {
        rec.journal.release_through(release)?;
        *released = release;
    }
    Ok(())
}

/// The checkpoint thread: every `checkpoint_interval_ms`, or early when the journal
/// is half full, and once more on the way out.
struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(cfg: &Config, rec: Arc<Recovered>, positions: Positions) -> anyhow::Result<Self> {
        let interval = Duration::from_millis(cfg.journal.checkpoint_interval_ms);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-checkpoint".into())
            .spawn(move || {
                let mut last = rec.checkpoint;
                let mut released = rec.checkpoint.min(positions().1);
                let mut since = Instant::now();
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                    let j = &rec.journal;
                    let full = j.used_bytes() * 100 >= j.capacity_bytes() * CHECKPOINT_FILL_PERCENT;
                    if full || since.elapsed() >= interval {
                        since = Instant::now();
                        if let Err(e) = checkpoint(&rec, &positions, &mut last, &mut released) {
                            tracing::error!("checkpoint failed: {e:#}; will retry");
                        }
                    }
                }
                if let Err(e) = checkpoint(&rec, &positions, &mut last, &mut released) {
                    tracing::error!("final checkpoint failed: {e:#}");
                }
            })
            .context("starting the checkpoint thread")?;
        Ok(Checkpointer { stop, thread })
    }

    /// Stops the thread after its final checkpoint.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// The control socket, bound early (so a second ferryd on the same config is refused
/// before it touches anything) and served once the role's status handler exists.
struct ControlSocket {
    listener: tokio::net::UnixListener,
    access: control::Access,
    audit: Arc<crate::audit::AuditLog>,
}

impl ControlSocket {
    async fn bind(cfg: &Config) -> anyhow::Result<Self> {
        let access = control::Access::from_config(cfg.access.as_ref());
        let audit = Arc::new(crate::audit::AuditLog::open(&cfg.audit_log_path())?);
        let listener = control::bind(&cfg.control.socket, &access).await?;
        Ok(ControlSocket {
            listener,
            access,
            audit,
        })
    }

    fn serve(
        self,
        cfg: &Config,
        handler: control::Handler,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(control::serve(
            self.listener,
            cfg.control.socket.clone(),
            handler,
            self.access,
            Some(self.audit),
            stop,
        ))
    }
}

/// Waits (bounded, 10 s) for a shutdown step; says so if it gives up, since the
/// final checkpoint then covers less (nothing is lost: restart replays the journal).
fn wait_until(what: &str, done: impl Fn() -> bool) {
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            if Instant::now() > deadline {
                tracing::warn!(
                    "gave up waiting for {what} after 10 s; restart will replay the rest"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// Runs a node until `shutdown` resolves; then drains, checkpoints and returns.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // The metrics endpoint comes up before recovery: a long replay is then visible as
    // alive (/healthz 200) but not ready (/readyz 503). Dropping it stops it.
    let metrics = Metrics::new(&cfg.node.name, cfg.node.role);
    let endpoint = metrics::start(&cfg, metrics.clone()).await?;
    let obs = Observe {
        metrics,
        addr: endpoint.as_ref().map(|e| e.addr),
    };
    let rec = Arc::new(tokio::task::block_in_place(|| recover(&cfg))?);
    let result = match cfg.node.role {
        Role::Primary => run_primary(cfg, rec, obs, shutdown).await,
        Role::Standby => run_standby(cfg, rec, obs, shutdown).await,
    };
    drop(endpoint);
    result
}

/// The node's metrics and, when `[metrics]` is configured, the endpoint's bound address.
struct Observe {
    metrics: Arc<Metrics>,
    addr: Option<std::net::SocketAddr>,
}

impl Observe {
    /// Marks the node ready everywhere at once: `/readyz`, the one stable stdout line
    /// scripts and tests wait for, and systemd (READY=1, then watchdog pings).
    fn announce_ready(
        &self,
        line: &str,
        status: &str,
        journal: Arc<Journal>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.metrics.set_ready(true);
        println!("ferryd ready: {line}{}", self.ready_suffix());
        sd_notify(&[State::Ready, State::Status(status)]);
        spawn_watchdog(journal)
    }

    /// The start of an orderly stop, told to systemd and `/readyz`.
    fn announce_stopping(&self, watchdog: Option<tokio::task::JoinHandle<()>>) {
        sd_notify(&[State::Stopping, State::Status("draining")]);
        if let Some(w) = watchdog {
            w.abort();
        }
        self.metrics.set_ready(false);
    }

    /// ` metrics=ADDR` for the ready line (empty without a metrics endpoint).
    fn ready_suffix(&self) -> String {
        self.addr
            .map(|a| format!(" metrics={a}"))
            .unwrap_or_default()
    }
}

fn transport_options() -> ferry_transport::quic::TransportOptions {
    ferry_transport::quic::TransportOptions::default()
}

async fn run_primary(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
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

    let nbd_listen = cfg.nbd_addr().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(nbd_listen)
        .await
        .with_context(|| format!("binding NBD listener {nbd_listen}"))?;
    let nbd_addr = listener.local_addr()?;
    let control = ControlSocket::bind(&cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Replication: targets start at the checkpoint; their Hellos say where they are.
    let targets = replication::target_states(&cfg, rec.checkpoint.min(rec.journal.durable_seq()));
    let repl = match &cfg.replication {
        Some(r) if !targets.is_empty() => {
            let sync = SyncGate::new(targets.clone(), Duration::from_millis(r.sync_timeout_ms));
            *group.sync.write() = Some(sync.clone());
            group.feed.enable(r.tail_bytes.0 as usize);
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
                sync: sync.clone(),
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
    let handler = primary_status(&cfg, rec.clone(), group.clone(), repl.clone(), nbd_addr);
    let control_task = control.serve(&cfg, handler, stop_rx.clone());
    let server_cfg = nbd::ServerConfig {
        max_payload: (32u64 << 20).min(cfg.journal.segment_size.0 / 2) as u32,
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

    shutdown.await;
    obs.announce_stopping(watchdog);
    tracing::info!("shutting down: draining NBD clients");
    let _ = stop_tx.send(true);
    match nbd_task.await {
        Ok(Err(e)) => tracing::warn!("NBD server stopped with an error: {e}"),
        Err(e) => tracing::warn!("NBD server task: {e}"),
        Ok(Ok(())) => {}
    }
    let _ = control_task.await;
    // Every acknowledged write is applied; seal the last write-set, let the journal
    // make it durable, then the checkpointer's final round fsyncs and records it.
    let _ = group.seal(bytes::Bytes::new());
    let target = rec.journal.last_seq();
    wait_until("the final seal to become durable", || {
        rec.journal.durable_seq() >= target
    });
    ckpt.finish().await;
    drop(registry);
    tracing::info!(
        checkpoint = rec.meta.checkpoint().unwrap_or(0),
        "shutdown complete"
    );
    Ok(())
}

async fn run_standby(
    cfg: Config,
    rec: Arc<Recovered>,
    obs: Observe,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let r = cfg
        .replication
        .clone()
        .ok_or_else(|| anyhow::anyhow!("a standby needs a [replication] section"))?;
    let listen: std::net::SocketAddr =
        crate::config::parse_addr(&r.listen).map_err(anyhow::Error::msg)?;
    // Recovery replayed everything durable: the replica is at the journal's end.
    let applied = rec.journal.durable_seq();
    let standby = Arc::new(Standby::new(
        rec.journal.clone(),
        rec.bases.clone(),
        applied,
        &r.primary,
        &r.listen,
    )?);
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
        },
    });
    let handler = standby_status(&cfg, rec.clone(), standby.clone());
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
    shutdown.await;
    obs.announce_stopping(watchdog);
    tracing::info!("shutting down standby");
    let _ = stop_tx.send(true);
    match serve.await {
        Ok(Err(e)) => tracing::warn!("standby listener: {e:#}"),
        Err(e) => tracing::warn!("standby task: {e}"),
        Ok(Ok(())) => {}
    }
    let _ = control_task.await;
    // Let the applier finish what is durable before the final checkpoint.
    let target = rec.journal.durable_seq();
    wait_until("the replica to apply what is durable", || {
        standby.applied_seq() >= target
    });
    ckpt.finish().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Tells systemd (Type=notify); failures are logged, never fatal.
fn sd_notify(states: &[State]) {
    if let Err(e) = sdnotify::notify(states) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Pings systemd's watchdog from the runtime (a stalled runtime misses it) while the
/// journal is alive. `None` when `WatchdogSec=` is off.
fn spawn_watchdog(journal: Arc<Journal>) -> Option<tokio::task::JoinHandle<()>> {
    let every = sdnotify::watchdog_interval()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        // A stall must not be followed by a burst of pings.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = JournalProbe::default();
        loop {
            tick.tick().await;
            if probe.alive(&journal) {
                sd_notify(&[State::Watchdog]);
            } else {
                tracing::error!(
                    durable_seq = journal.durable_seq(),
                    last_seq = journal.last_seq(),
                    "journal made no progress with writes pending for two watchdog periods: \
                     withholding the watchdog ping"
                );
            }
        }
    }))
}

/// Journal liveness for the watchdog: idle is alive, progress is alive, and a journal
/// that is nearly full is waiting for a checkpoint or a standby (normal, not a hang).
/// Only "records pending, nothing made durable, room to write" for two ticks is a hang.
#[derive(Default)]
struct JournalProbe {
    last_durable: Seq,
    stuck_ticks: u32,
}

impl JournalProbe {
    fn alive(&mut self, j: &Journal) -> bool {
        let durable = j.durable_seq();
        let idle = j.last_seq() == durable;
        let nearly_full = j.used_bytes() * 10 >= j.capacity_bytes() * 9;
        if idle || nearly_full || durable != self.last_durable {
            self.stuck_ticks = 0;
        } else {
            self.stuck_ticks += 1;
        }
        self.last_durable = durable;
        self.stuck_ticks < 2
    }
}

fn journal_status(j: &Journal) -> serde_json::Value {
    let st = j.stats();
    json!({
        "used_bytes": j.used_bytes(),
        "capacity_bytes": j.capacity_bytes(),
        "engine": j.engine_name(),
        "fallback_reason": j.fallback_reason(),
        "first_seq": j.first_available_seq(),
        "batches": st.batches,
        "records": st.records,
        "bytes_written": st.bytes_written,
        "write_seconds": st.write_ns as f64 / 1e9,
    })
}

fn primary_status(
    cfg: &Config,
    rec: Arc<Recovered>,
    group: Arc<Group>,
    repl: Option<Arc<Replication>>,
    nbd_addr: std::net::SocketAddr,
) -> control::Handler {
    let node = cfg.node.name.clone();
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
                "nbd": {"listen": nbd_addr.to_string()},
                "journal": journal_status(j),
                "volumes": volumes,
                "targets": repl.as_ref().map_or(json!([]), |r| r.status()),
            }))
        }
    })
}

fn standby_status(cfg: &Config, rec: Arc<Recovered>, sb: Arc<Standby>) -> control::Handler {
    let node = cfg.node.name.clone();
    let volumes: Vec<_> = cfg
        .volumes
        .iter()
        .map(|v| json!({"name": v.name, "size_bytes": v.size.0, "path": v.path}))
        .collect();
    Arc::new(move |req| match req {
        control::Request::Status => {
            let j = &rec.journal;
            let st = &sb.state;
            let applied_ts = st.applied_ts_ns.load(Ordering::Relaxed);
            control::Response::ok(json!({
                "node": node,
                "role": "standby",
                "epoch": rec.meta.epoch().unwrap_or(0),
                "last_seq": j.durable_seq(),
                "durable_seq": j.durable_seq(),
                "applied_seq": sb.applied_seq(),
                "checkpoint_seq": rec.meta.checkpoint().unwrap_or(0),
                "journal": journal_status(j),
                "primary": {
                    "name": st.primary,
                    "listen": st.listen,
                    "connected": st.connected.lock().clone(),
                    "last_seq": st.last_primary_seq.load(Ordering::Relaxed),
                    "last_error": st.last_error.lock().clone(),
                },
                "applied_primary_time_ns": applied_ts,
                "volumes": volumes,
                "targets": [],
            }))
        }
    })
}
