//! Start-up, crash recovery, checkpointing and orderly shutdown of a ferryd node.
//!
//! Start-up order matters for safety:
//! 1. metadata (refuses a config naming another cluster),
//! 2. base volumes (refuses a store smaller than configured),
//! 3. journal recovery (truncates a torn tail, refuses corruption before it),
//! 4. replay of every journaled record after the checkpoint onto the bases, fsync,
//!    new checkpoint — only then do the listeners open, so no client ever reads a base
//!    that lags an acknowledged write.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_journal::{Journal, JournalOptions, Op, Seq};
use serde_json::json;

use crate::config::{Config, Role};
use crate::control;
use crate::meta::{Meta, RollbackState};
use crate::metrics::{self, Metrics, NodeSource, RoleSource};
use crate::nbd;
use crate::pit::{Applier, Pit, PitExports, Target};
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
    /// Applies write-sets on a standby (with undo capture when PIT is on).
    pub applier: Arc<Applier>,
    /// The replica's applied position on a standby (shared with the PIT store).
    pub applied: Arc<AtomicU64>,
    /// A standby that was rolled back no longer follows its primary.
    pub rollback: Option<RollbackState>,
}

pub fn journal_options(cfg: &Config) -> JournalOptions {
    let mut o = JournalOptions::new(cfg.journal.dir.clone(), cfg.cluster_id());
    o.segment_size = cfg.journal.segment_size.0;
    o.capacity = cfg.journal.size.0;
    o.engine = cfg.journal.engine;
    o.recovery = cfg.journal.recovery;
    o.queue_records = JOURNAL_QUEUE;
    o.max_inflight_batches = cfg.journal.inflight_batches as usize;
    // A primary's callbacks only wake the waiting request (and feed the shippers'
    // tail): run them on the writer thread. A standby's may wait for its apply queue.
    o.inline_completions = cfg.node.role == Role::Primary;
    o.writer_nice = cfg.journal.writer_nice;
    o
}

/// Steps 2–4 above, on the metadata store `open_meta` opened (step 1). Blocking;
/// runs before the runtime serves anything.
pub fn recover(cfg: &Config, meta: Meta) -> anyhow::Result<Recovered> {
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
    // A standby's journal that jumped after a resync copy records the jump only with
    // the first record after it; the metadata holds it until then.
    let skip = meta.journal_skip()?;
    if journal.last_seq() < skip {
        journal
            .skip_to(skip)
            .context("repeating the journal's jump after a resync")?;
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
    let standby = cfg.node.role == Role::Standby;
    let rollback = if standby {
        meta.rollback_state()?
    } else {
        None
    };
    let meta = Arc::new(meta);
    let applied = Arc::new(AtomicU64::new(checkpoint));
    let pit = if standby && cfg.pit().enabled {
        Some(Pit::open(
            cfg.undo_dir(),
            cfg.cluster_id(),
            cfg.pit(),
            meta.clone(),
            bases.clone(),
            applied.clone(),
        )?)
    } else {
        None
    };
    if matches!(rollback, Some(RollbackState::InProgress { .. })) && pit.is_none() {
        bail!(
            "a rollback is in progress on this standby but [pit] is disabled; enable it again so the rollback can finish"
        );
    }
    let applier = Arc::new(Applier {
        bases: bases.clone(),
        meta: meta.clone(),
        pit: pit.clone(),
        verify: Default::default(),
        applied: applied.clone(),
        outbox: Default::default(),
        resync: Arc::new(crate::resync::ResyncStatus::load(&meta)?),
    });
    let replayed = match rollback {
        // A rolled-back replica must not be rolled forward by the journal (the
        // checkpoint covered everything before the rollback started).
        Some(_) => 0,
        None if standby => replay_standby(&journal, &applier, checkpoint)?,
        None => replay(&journal, &bases, checkpoint)?,
    };
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
    // A target in bitmap mode still needs the records whose marks were not flushed.
    let floor = if standby {
        Seq::MAX
    } else {
        crate::overflow::persisted_floor(cfg)
    };
    journal.release_through(checkpoint.min(floor))?;
    applied.store(journal.durable_seq(), Ordering::Release);
    // A resync whose end point was applied just before a crash (the metadata was not
    // cleared yet): the replay above applied it again.
    if let Some(r) = applier
        .resync
        .get()
        .filter(|r| r.copied && journal.durable_seq() >= r.through)
    {
        meta.set_resync_state(None)?;
        applier.resync.set(None);
        tracing::info!(
            from = r.from,
            through = r.through,
            "resync complete: the replica is a consistent image again"
        );
    }
    if let (Some(RollbackState::InProgress { target }), Some(pit)) = (rollback, &pit) {
        tracing::warn!(target, "finishing the rollback interrupted by a restart");
        pit.finish_rollback(target)?;
    }
    let rollback = meta.rollback_state()?;
    if let Some(RollbackState::Done { target }) = rollback {
        applied.store(target, Ordering::Release);
    }
    Ok(Recovered {
        meta,
        journal,
        bases,
        checkpoint,
        applier,
        applied,
        rollback,
    })
}

/// A standby's replay: records the undo log already covers are re-applied as they
/// are; later ones are grouped into write-sets (journal batches, cut at seals) and
/// go through the applier, so their before-images are captured first. Their
/// timestamps are the standby's journal times (the primary's were not persisted),
/// at most the shipping delay later than the primary's.
fn replay_standby(journal: &Journal, applier: &Applier, checkpoint: Seq) -> anyhow::Result<u64> {
    if journal.last_seq() <= checkpoint {
        return Ok(0);
    }
    let covered = applier
        .pit
        .as_ref()
        .and_then(|p| p.newest_seq())
        .unwrap_or(0);
    let mut n = 0u64;
    let mut ws: Vec<(Seq, ferry_journal::Record)> = Vec::new();
    let mut ws_batch = (0, 0);
    for entry in journal.reader(checkpoint + 1)? {
        let e = entry.context("reading the journal for replay")?;
        let batch = (e.meta.last_seq, e.meta.timestamp_ns);
        if !ws.is_empty() && batch != ws_batch {
            applier.apply_write_set(ws_batch.1, &ws)?;
            ws.clear();
        }
        n += 1;
        if e.seq <= covered {
            // Undo already holds this write-set's before-images.
            let r = &e.record;
            if let Some(base) = replay_target(&applier.bases, e.seq, r)? {
                base.apply(r.op, r.offset, r.length, &r.data)
                    .with_context(|| {
                        format!("replaying record {} onto {}", e.seq, base.path.display())
                    })?;
            }
            continue;
        }
        // Refuse an unknown volume or a range beyond it before capturing anything.
        replay_target(&applier.bases, e.seq, &e.record)?;
        let seal = e.record.op == Op::Seal;
        ws_batch = batch;
        ws.push((e.seq, e.record));
        if seal {
            applier.apply_write_set(ws_batch.1, &ws)?;
            ws.clear();
        }
    }
    if !ws.is_empty() {
        applier.apply_write_set(ws_batch.1, &ws)?;
    }
    Ok(n)
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
        let Some(base) = replay_target(bases, e.seq, r)? else {
            continue;
        };
        base.apply(r.op, r.offset, r.length, &r.data)
            .with_context(|| format!("replaying record {} onto {}", e.seq, base.path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// The base a journaled record applies to (`None` for a seal), or why replay must
/// stop rather than drop or misapply it.
fn replay_target<'a>(
    bases: &'a [Arc<Base>],
    seq: Seq,
    r: &ferry_journal::Record,
) -> anyhow::Result<Option<&'a Arc<Base>>> {
    if r.op == Op::Seal {
        return Ok(None);
    }
    let Some(base) = bases.iter().find(|b| b.id == r.volume) else {
        bail!(
            "journal record {seq} is for volume id {} which is not in the config; \
             refusing to start rather than drop it (restore the volume's [[volume]] section)",
            r.volume
        );
    };
    let end = r.offset.checked_add(r.length as u64);
    if end.is_none_or(|end| end > base.size) {
        bail!(
            "journal record {seq} writes {}+{} beyond volume '{}' ({} bytes); was the volume shrunk?",
            r.offset,
            r.length,
            base.name,
            base.size
        );
    }
    Ok(Some(base))
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

/// How a node's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down (signal): exit.
    Stopped,
    /// A role change was recorded: start again (the binary re-executes itself, so the
    /// new role starts from a clean recovery, like after a crash).
    Restart,
}

/// Lets a control request end the run for a role change.
#[derive(Default)]
pub struct Lifecycle {
    restart: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Lifecycle {
    pub fn request_restart(&self) {
        self.restart.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    async fn until(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => {}
            _ = self.notify.notified() => tracing::info!("role change recorded: restarting in the new role"),
        }
    }
}

/// Opens the metadata store and applies a role recorded by promote, demote or
/// switchover over the config's (the role decides how recovery replays).
fn open_meta(cfg: &mut Config) -> anyhow::Result<Meta> {
    let meta = Meta::open(&cfg.node.metadata_dir, cfg.cluster_id())?;
    if let Some(role) = meta.role_override()? {
        let role = match role.as_str() {
            "primary" => Role::Primary,
            "standby" => Role::Standby,
            other => bail!("metadata records an unknown role '{other}'"),
        };
        if role != cfg.node.role {
            tracing::warn!(
                config = ?cfg.node.role,
                recorded = ?role,
                "running in the role recorded by the last role change, not the config's"
            );
        }
        cfg.node.role = role;
    }
    if let (Some(name), Some(r)) = (meta.primary_name()?, cfg.replication.as_mut()) {
        r.primary = name;
    }
    Ok(meta)
}

/// Runs a node until `shutdown` resolves; then drains, checkpoints and returns.
pub async fn run(
    mut cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Exit> {
    let meta = tokio::task::block_in_place(|| open_meta(&mut cfg))?;
    let life = Arc::new(Lifecycle::default());
    // The metrics endpoint comes up before recovery: a long replay is then visible as
    // alive (/healthz 200) but not ready (/readyz 503). Dropping it stops it.
    let metrics = Metrics::new(&cfg.node.name, cfg.node.role);
    let endpoint = metrics::start(&cfg, metrics.clone()).await?;
    let obs = Observe {
        metrics,
        addr: endpoint.as_ref().map(|e| e.addr),
    };
    let rec = Arc::new(tokio::task::block_in_place(|| recover(&cfg, meta))?);
    let shutdown = life.until(shutdown);
    let result = match cfg.node.role {
        Role::Primary => run_primary(cfg, rec, obs, life.clone(), shutdown).await,
        Role::Standby => run_standby(cfg, rec, obs, life.clone(), shutdown).await,
    };
    drop(endpoint);
    result.map(|()| {
        if life.restart.load(Ordering::SeqCst) {
            Exit::Restart
        } else {
            Exit::Stopped
        }
    })
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

/// Testing hook: QUIC idle timeout in milliseconds (a test that SIGKILLs a standby
/// need not wait 10 s for the primary to notice). Never set in production.
pub const IDLE_TIMEOUT_ENV: &str = "FERRYD_TEST_IDLE_TIMEOUT_MS";

fn transport_options() -> ferry_transport::quic::TransportOptions {
    let mut o = ferry_transport::quic::TransportOptions::default();
    if let Some(ms) = std::env::var(IDLE_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        o.idle_timeout = Duration::from_millis(ms);
    }
    o
}

async fn run_primary(
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
            let o = crate::meta::Outdated {
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
            crate::overflow::start(
                crate::overflow::Shared {
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
                    dir: crate::overflow::dirty_dir(&cfg),
                    region_size: crate::dirty::DEFAULT_REGION_SIZE,
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
    if let Some(t) = fence_task {
        let _ = t.await;
    }
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

fn primary_handler(
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

/// Stops writes, waits until they are all durable here and applied to the bases,
/// and checkpoints: the state a role change starts from.
async fn quiesce(rec: &Recovered, group: &Group, why: String) -> anyhow::Result<Seq> {
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
async fn switchover(
    rec: &Recovered,
    group: &Group,
    repl: Option<&Replication>,
    to: Option<&str>,
    life: &Lifecycle,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    if let Some(o) = rec.meta.outdated()? {
        bail!("{}", outdated_reason(&o));
    }
    let targets = repl.map(|r| r.targets.as_slice()).unwrap_or_default();
    let t = match to {
        Some(name) => targets
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| anyhow::anyhow!("no replication target named '{name}'"))?,
        None => match targets {
            [t] => t,
            [] => bail!("this primary has no standby to hand over to"),
            _ => bail!("several standbys: name one with --to"),
        },
    };
    if t.state() != "streaming" {
        bail!(
            "standby '{}' is {}, not streaming: it cannot take over losslessly",
            t.name,
            t.state()
        );
    }
    let result = async {
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
        let answer = t.request_handover(seq);
        let new_epoch = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .map_err(|_| anyhow::anyhow!("standby '{}' did not take over within 30 s", t.name))?
            .map_err(|_| {
                anyhow::anyhow!("the session with '{}' ended during the handover", t.name)
            })??;
        tokio::task::block_in_place(|| {
            rec.meta
                .change_role(new_epoch, "standby", Some(&t.name), None)
        })?;
        Ok((seq, new_epoch))
    }
    .await;
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
        Err(e) => {
            // The standby did not confirm a role change: take writes again. (Had it
            // changed roles unheard, our next session would learn the newer epoch
            // and fence us.)
            group.set_fence(None);
            Err(e.context("switchover abandoned; this node stays the primary"))
        }
    }
}

/// Online verify from the primary: a `#verify` seal travels in the stream; this node
/// and every streaming standby hash their volumes as of that seal (copy-before-write
/// keeps the point while writes continue); the differing ranges are listed.
async fn verify(
    rec: &Recovered,
    group: &Group,
    repl: Option<&Replication>,
    volume: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    use crate::chunks::{ChunkList, HashParams};
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
            .unwrap_or(crate::chunks::DEFAULT_CHUNK_SIZE),
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
            let ranges = crate::chunks::diff(mine, &remote)?;
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

/// An outdated primary rejoins as a standby of the node that superseded it.
async fn demote(
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

fn outdated_reason(o: &crate::meta::Outdated) -> String {
    format!(
        "this primary is outdated: node '{}' is the primary of epoch {}; writes are refused \
         (demote this node to rejoin as its standby)",
        o.by, o.epoch
    )
}

/// Answers primaries of older epochs that dial this node's replication address with
/// our Hello (newer epoch): they learn they are outdated and fence themselves.
async fn fence_responder(
    listen: std::net::SocketAddr,
    local: ferry_transport::session::LocalIdentity,
    tls: ferry_transport::quic::TlsMaterial,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use ferry_transport::quic;
    let opts = transport_options();
    let endpoint = match quic::server_config(&tls, &local.expected_peer_name, &opts)
        .map_err(anyhow::Error::from)
        .and_then(|c| quic::listen(listen, c).map_err(anyhow::Error::from))
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(%listen, "cannot answer outdated primaries on {listen}: {e:#}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            accepted = quic::accept(&endpoint) => match accepted {
                None => break,
                Some(Err(e)) => tracing::debug!("fence responder: refused a connection: {e}"),
                Some(Ok(conn)) => {
                    let peer = conn.remote_address();
                    match quic::standby_handshake(conn, &local, 0, &opts).await {
                        Err(e) => tracing::warn!(%peer, "told an outdated primary it was superseded: {e}"),
                        Ok(_) => tracing::warn!(%peer, "fence responder: unexpected handshake success"),
                    }
                }
            }
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
}

fn respond(r: anyhow::Result<serde_json::Value>) -> control::Response {
    match r {
        Ok(v) => control::Response::ok(v),
        Err(e) => control::Response::err(crate::error_chain(&e)),
    }
}

/// Longest bookmark name: it travels in a seal record's label.
const MAX_BOOKMARK_NAME: usize = 64;

/// Seals the current write-set with `name` and records the bookmark once the seal
/// is durable (so it names a point every standby will receive).
fn create_bookmark(
    rec: &Recovered,
    group: &Group,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    if name.is_empty()
        || name.len() > MAX_BOOKMARK_NAME
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:@".contains(&c))
    {
        bail!(
            "bookmark name '{name}': use 1..={MAX_BOOKMARK_NAME} characters from A-Z a-z 0-9 - _ . : @"
        );
    }
    if let Some(b) = rec.meta.bookmarks()?.into_iter().find(|b| b.name == name) {
        bail!("bookmark '{name}' already exists (sequence {})", b.seq);
    }
    let seq = group
        .seal(bytes::Bytes::copy_from_slice(name.as_bytes()))
        .map_err(|e| anyhow::anyhow!("sealing the write-set: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("sealing the write-set: no seal was journaled"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rec.journal.durable_seq() < seq {
        if Instant::now() > deadline {
            bail!("the bookmark's seal (sequence {seq}) did not become durable within 30 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = crate::meta::Bookmark {
        name: name.to_string(),
        seq,
        timestamp_ns: replication::now_ns(),
    };
    rec.meta.add_bookmark(&b)?;
    tracing::info!(name, seq, "bookmark created");
    Ok(bookmark_json(&b, None))
}

fn bookmark_json(b: &crate::meta::Bookmark, reachable: Option<bool>) -> serde_json::Value {
    let mut v = json!({
        "name": b.name,
        "seq": b.seq,
        "time": crate::timefmt::format_rfc3339(b.timestamp_ns),
        "timestamp_ns": b.timestamp_ns,
    });
    if let Some(r) = reachable {
        v["reachable"] = json!(r);
    }
    v
}

fn list_bookmarks(rec: &Recovered, pit: Option<&Pit>) -> anyhow::Result<serde_json::Value> {
    let list: Vec<_> = rec
        .meta
        .bookmarks()?
        .iter()
        .map(|b| bookmark_json(b, pit.map(|p| p.reachable(b.seq))))
        .collect();
    Ok(json!({ "bookmarks": list }))
}

/// Status `paused` of a standby an operator paused.
const OPERATOR_PAUSE: &str = "paused by an operator (ferryctl resume)";

fn rolled_back_reason(target: Seq) -> String {
    format!(
        "this standby was rolled back to sequence {target} and no longer follows the primary \
         (promote it, or re-seed it from the primary)"
    )
}

fn parse_target(t: &control::PointSpec) -> anyhow::Result<Target> {
    Ok(match t {
        control::PointSpec::Seq(s) => Target::Seq(*s),
        control::PointSpec::Bookmark(b) => Target::Bookmark(b.clone()),
        control::PointSpec::At(s) => {
            Target::Time(crate::timefmt::parse_rfc3339(s).map_err(anyhow::Error::msg)?)
        }
    })
}

fn find_volume(rec: &Recovered, name: &str) -> anyhow::Result<Arc<Base>> {
    rec.bases
        .iter()
        .find(|b| b.name == name)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<_> = rec.bases.iter().map(|b| b.name.as_str()).collect();
            anyhow::anyhow!("no volume named '{name}' (volumes: {})", names.join(", "))
        })
}

fn standby_handler(
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

/// Waits (bounded) until the replica applied everything journaled.
fn drain_applier(sb: &Standby, timeout: Duration) -> anyhow::Result<Seq> {
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

/// Fsyncs the bases and records `applied` as the checkpoint (never lowering it).
fn checkpoint_now(rec: &Recovered, applied: Seq) -> anyhow::Result<()> {
    for b in &rec.bases {
        b.sync()
            .with_context(|| format!("fsync {}", b.path.display()))?;
    }
    if rec.meta.checkpoint()? < applied {
        rec.meta.set_checkpoint(applied)?;
    }
    Ok(())
}

/// Makes this standby the primary of a new epoch: stops following the primary,
/// optionally rolls back to a point, records the fork point and the new role, then
/// restarts as the primary (serving NBD, journaling new writes after the fork).
fn promote(
    has_nbd: bool,
    rec: &Recovered,
    sb: &Standby,
    exports: Option<&PitExports>,
    target: Option<&control::PointSpec>,
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
    rec.meta
        .change_role(new_epoch, "primary", None, Some(fork))?;
    tracing::warn!(
        epoch = new_epoch,
        fork,
        "promoted: restarting as the primary"
    );
    life.request_restart();
    Ok(json!({
        "epoch": new_epoch,
        "fork_seq": fork,
        "prepared_seconds": started.elapsed().as_secs_f64(),
    }))
}

/// The role change a planned switchover makes on the standby side.
fn take_over(rec: Arc<Recovered>, sb: Arc<Standby>, life: Arc<Lifecycle>) -> standby::HandoverFn {
    Arc::new(move |seq| {
        let applied = drain_applier(&sb, Duration::from_secs(30))?;
        if applied != seq {
            bail!("applied {applied}, the handover is at {seq}");
        }
        checkpoint_now(&rec, applied)?;
        let new_epoch = rec.meta.epoch()? + 1;
        rec.meta
            .change_role(new_epoch, "primary", None, Some(seq))?;
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
fn rollback(
    rec: &Recovered,
    sb: &Standby,
    exports: Option<&PitExports>,
    volume: &str,
    target: &control::PointSpec,
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
        "time": crate::timefmt::format_rfc3339(r.point.timestamp_ns),
        "from_seq": applied,
        "undo_entries": r.entries,
        "bytes_restored": r.bytes,
        "seconds": r.took.as_secs_f64(),
        "volumes": rec.bases.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
    }))
}
