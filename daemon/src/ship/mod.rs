//! Primary side of replication: one shipper per target.
//!
//! Each shipper owns a QUIC connection to its standby (the primary dials; see
//! transport/PROTOCOL.md). Per session:
//! * a **reader thread** tails the journal from the standby's resume position with a
//!   `JournalReader`, cuts the records into write-sets (at every seal, or at
//!   [`MAX_WRITE_SET_BYTES`]), and hands them over a bounded channel (backpressure: the
//!   reader stops while the network is behind, memory stays bounded);
//! * the **session task** feeds them through the sans-IO `session::Sender` (in-flight
//!   window), sends them on the data stream, and applies the standby's acks.
//!
//! After any error the session is dropped and rebuilt from the standby's durable
//! position (reconnect with backoff): nothing is resent from memory that the standby
//! does not ask for, and nothing is skipped.
//!
//! [`SeqIndex`] records (sequence, cumulative bytes, primary timestamp) for recent
//! journal records so each target's lag can be given in bytes and seconds; the
//! [`SyncGate`] makes client writes wait for sync targets.
pub mod catchup;
pub mod dirty;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferry_journal::{now_ns, Journal, Op, Seq};
use ferry_transport::quic::{self, Backoff, TlsMaterial, TransportOptions};
use ferry_transport::session::{self, LocalIdentity, Sender, SenderConfig};
use ferry_transport::wire::{
    self, Frame, Heartbeat, RecordOp, VolumeGeometry, WireRecord, WriteSet,
};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, ReplicationMode, TargetConfig};
use crate::store::base::Base;

/// A write-set is cut at a seal, or once it holds this many bytes of records.
pub const MAX_WRITE_SET_BYTES: usize = 4 << 20;
/// Write-sets formed ahead of the network per target (bounded memory).
const READ_AHEAD_WRITE_SETS: usize = 16;
/// Records tracked for lag accounting; beyond this a far-behind target's lag is
/// reported as a lower bound.
const SEQ_INDEX_LEN: usize = 1 << 20;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// (sequence, cumulative record bytes, primary timestamp) of recent journal records,
/// appended in sequence order by the journal's completion path.
#[derive(Default)]
pub struct SeqIndex {
    inner: Mutex<SeqIndexInner>,
}

#[derive(Default)]
struct SeqIndexInner {
    entries: VecDeque<(Seq, u64, u64)>,
    cum_bytes: u64,
}

impl SeqIndex {
    pub fn push(&self, seq: Seq, bytes: u64, ts_ns: u64) {
        let mut g = self.inner.lock();
        g.cum_bytes += bytes;
        let cum = g.cum_bytes;
        if g.entries.len() >= SEQ_INDEX_LEN {
            g.entries.pop_front();
        }
        g.entries.push_back((seq, cum, ts_ns));
    }

    /// Bytes and age of everything after `acked` (0 when caught up).
    pub fn lag_after(&self, acked: Seq, now_ns: u64) -> (u64, f64) {
        let g = self.inner.lock();
        let Some(&(last_seq, last_cum, _)) = g.entries.back() else {
            return (0, 0.0);
        };
        if acked >= last_seq {
            return (0, 0.0);
        }
        let Some(&(front_seq, front_cum, front_ts)) = g.entries.front() else {
            return (0, 0.0);
        };
        // Index of the first record after `acked`.
        let (base_cum, first_ts) = if acked < front_seq {
            (front_cum, front_ts) // lower bound: the target is further behind than tracked
        } else {
            let i = (acked - front_seq) as usize;
            let at = g.entries.get(i).map_or(front_cum, |e| e.1);
            let ts = g.entries.get(i + 1).map_or(front_ts, |e| e.2);
            (at, ts)
        };
        let age = now_ns.saturating_sub(first_ts) as f64 / 1e9;
        (last_cum.saturating_sub(base_cum), age)
    }
}

/// Recent durable records kept in memory (bounded by bytes), so a shipper that is
/// current sends from memory and reads journal segments only when it is behind.
pub struct Tail {
    inner: Mutex<TailInner>,
    /// 0 until replication is enabled: a primary without targets keeps nothing.
    cap_bytes: std::sync::atomic::AtomicUsize,
}

struct TailInner {
    entries: VecDeque<(Seq, ferry_journal::Record, u64)>,
    bytes: usize,
}

/// What the tail can say about a position.
pub enum TailRead {
    /// Records from the asked position on (possibly empty: caught up).
    Records(Vec<(Seq, ferry_journal::Record, u64)>),
    /// The position was evicted: read the journal.
    Evicted,
}

impl Default for Tail {
    fn default() -> Self {
        Self::new()
    }
}

impl Tail {
    pub fn new() -> Tail {
        Tail {
            inner: Mutex::new(TailInner {
                entries: VecDeque::new(),
                bytes: 0,
            }),
            cap_bytes: Default::default(),
        }
    }

    /// Starts keeping up to `cap_bytes` of recent records.
    pub fn enable(&self, cap_bytes: usize) {
        self.cap_bytes.store(cap_bytes, Ordering::Release);
    }

    /// Called in sequence order with every durable record.
    pub fn push(&self, seq: Seq, rec: ferry_journal::Record, ts_ns: u64) {
        let cap = self.cap_bytes.load(Ordering::Acquire);
        if cap == 0 {
            return;
        }
        let mut g = self.inner.lock();
        g.bytes += rec.data.len() + 64;
        g.entries.push_back((seq, rec, ts_ns));
        while g.bytes > cap {
            match g.entries.pop_front() {
                Some((_, r, _)) => g.bytes -= r.data.len() + 64,
                None => break,
            }
        }
    }

    /// Records from `from` on, up to about `max_bytes`.
    pub fn read(&self, from: Seq, max_bytes: usize) -> TailRead {
        let g = self.inner.lock();
        let (Some(front), Some(back)) = (g.entries.front(), g.entries.back()) else {
            // Nothing kept (yet): anything not durable yet will arrive here; anything
            // older must come from the journal.
            return TailRead::Evicted;
        };
        let (front, back) = (front.0, back.0);
        if from > back {
            return TailRead::Records(Vec::new());
        }
        if from < front {
            return TailRead::Evicted;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in g.entries.range((from - front) as usize..) {
            bytes += e.1.data.len() + 32;
            out.push(e.clone());
            if bytes >= max_bytes || e.1.op == Op::Seal {
                break;
            }
        }
        TailRead::Records(out)
    }
}

/// What shippers read from the write path, fed by the journal's completions in
/// sequence order: lag accounting, the in-memory tail and the durable position.
/// Disabled — no work, no memory — on a primary without replication targets.
pub struct ShipFeed {
    pub index: Arc<SeqIndex>,
    pub tail: Arc<Tail>,
    durable_tx: watch::Sender<Seq>,
    enabled: AtomicBool,
    /// Targets whose overflow tracking marks every durable record while they are in
    /// bitmap mode (`overflow.rs`).
    tracked: parking_lot::RwLock<Vec<Arc<TargetState>>>,
}

impl ShipFeed {
    pub fn new(durable: Seq) -> ShipFeed {
        ShipFeed {
            index: Arc::new(SeqIndex::default()),
            tail: Arc::new(Tail::new()),
            durable_tx: watch::channel(durable).0,
            enabled: AtomicBool::new(false),
            tracked: Default::default(),
        }
    }

    /// Registers the targets whose dirty maps mark durable records.
    pub fn track(&self, targets: Vec<Arc<TargetState>>) {
        *self.tracked.write() = targets;
    }

    /// Starts feeding, keeping up to `tail_bytes` of recent records in memory.
    pub fn enable(&self, tail_bytes: usize) {
        self.tail.enable(tail_bytes);
        self.enabled.store(true, Ordering::Release);
    }

    /// Called with every durable record, in sequence order.
    pub fn journaled(&self, seq: Seq, rec: impl FnOnce() -> ferry_journal::Record) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let rec = rec();
        for t in self.tracked.read().iter() {
            t.track.on_durable(seq, &rec);
        }
        let ts = now_ns();
        // Lag is counted in bytes to ship: a trim's range is not shipped as data.
        self.index.push(seq, rec.data.len() as u64, ts);
        self.tail.push(seq, rec, ts);
        self.durable_tx.send_replace(seq);
    }

    /// Durable-position updates for a shipper's journal reader.
    pub fn durable(&self) -> watch::Receiver<Seq> {
        self.durable_tx.subscribe()
    }
}

/// What status shows about one target, shared between its shipper and the rest.
pub struct TargetState {
    pub name: String,
    pub address: String,
    pub mode: ReplicationMode,
    state: Mutex<&'static str>,
    /// Highest sequence the standby holds durably / has applied.
    pub acked_seq: AtomicU64,
    pub applied_seq: AtomicU64,
    /// A sync target that missed `sync_timeout`: writes no longer wait for it until
    /// it has caught up again.
    pub degraded: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    pub rtt_us: AtomicU64,
    /// A planned switchover waiting for this target's session to send Handover at
    /// the given sequence; answered with the new epoch from its HandoverAck.
    handover: Mutex<Option<(Seq, oneshot::Sender<anyhow::Result<u64>>)>>,
    handover_kick: tokio::sync::Notify,
    /// Verify answers awaited from this target, by (verify id, volume id).
    verify_waiters: Mutex<VerifyWaiters>,
    /// Journal overflow: streaming, bitmap or resyncing (`overflow.rs`).
    pub track: crate::ship::catchup::Tracker,
}

type VerifyWaiters =
    std::collections::HashMap<(u64, u32), oneshot::Sender<Result<bytes::Bytes, String>>>;

impl TargetState {
    /// Asks this target's live session to hand the primary role over at `seq`
    /// (every record up to it durable on the target). Resolves to the new epoch.
    /// Registers interest in this target's verify answer for (`id`, `volume`).
    pub fn await_verify(
        &self,
        id: u64,
        volume: u32,
    ) -> oneshot::Receiver<Result<bytes::Bytes, String>> {
        let (tx, rx) = oneshot::channel();
        self.verify_waiters.lock().insert((id, volume), tx);
        rx
    }

    pub fn forget_verify(&self, id: u64) {
        self.verify_waiters.lock().retain(|k, _| k.0 != id);
    }

    pub fn request_handover(&self, seq: Seq) -> oneshot::Receiver<anyhow::Result<u64>> {
        let (tx, rx) = oneshot::channel();
        *self.handover.lock() = Some((seq, tx));
        self.handover_kick.notify_one();
        rx
    }

    fn new(t: &TargetConfig, acked: Seq) -> TargetState {
        TargetState {
            name: t.name.clone(),
            address: t.address.clone(),
            mode: t.mode,
            state: Mutex::new("connecting"),
            acked_seq: AtomicU64::new(acked),
            applied_seq: AtomicU64::new(acked),
            degraded: AtomicBool::new(false),
            last_error: Mutex::new(None),
            rtt_us: AtomicU64::new(0),
            handover: Mutex::new(None),
            handover_kick: tokio::sync::Notify::new(),
            verify_waiters: Mutex::new(Default::default()),
            track: Default::default(),
        }
    }

    fn set_state(&self, s: &'static str) {
        *self.state.lock() = s;
    }

    pub fn state(&self) -> &'static str {
        *self.state.lock()
    }
}

/// Makes client writes wait until every live sync target holds them durably.
///
/// `durable` is the minimum durable position over sync targets that are not
/// degraded (`Seq::MAX` when there are none). A write that waits longer than
/// `timeout` degrades the sync targets holding it back — loudly — so clients never
/// fail because a standby is slow or gone; the target returns to sync once it has
/// caught up.
pub struct SyncGate {
    targets: Vec<Arc<TargetState>>,
    tx: watch::Sender<Seq>,
    timeout: Duration,
}

impl SyncGate {
    pub fn new(targets: Vec<Arc<TargetState>>, timeout: Duration) -> Arc<SyncGate> {
        let (tx, _) = watch::channel(Seq::MAX);
        let g = Arc::new(SyncGate {
            targets,
            tx,
            timeout,
        });
        g.recompute();
        g
    }

    pub fn has_sync_targets(&self) -> bool {
        self.targets.iter().any(|t| t.mode == ReplicationMode::Sync)
    }

    /// Recomputes the sync position after an ack or a state change.
    pub fn recompute(&self) {
        let min = self
            .targets
            .iter()
            .filter(|t| t.mode == ReplicationMode::Sync && !t.degraded.load(Ordering::Acquire))
            .map(|t| t.acked_seq.load(Ordering::Acquire))
            .min()
            .unwrap_or(Seq::MAX);
        self.tx.send_if_modified(|v| {
            let changed = *v != min;
            *v = min;
            changed
        });
    }

    /// Waits until `seq` is durable on every live sync target.
    pub async fn wait(&self, seq: Seq) {
        let mut rx = self.tx.subscribe();
        loop {
            match tokio::time::timeout(self.timeout, rx.wait_for(|s| *s >= seq)).await {
                Ok(_) => return,
                Err(_) => {
                    for t in &self.targets {
                        if t.mode == ReplicationMode::Sync
                            && !t.degraded.load(Ordering::Acquire)
                            && t.acked_seq.load(Ordering::Acquire) < seq
                        {
                            t.degraded.store(true, Ordering::Release);
                            tracing::error!(
                                target = %t.name,
                                seq,
                                "sync target did not confirm a write within {:?}: degraded to async \
                                 (RPO is no longer zero) until it catches up",
                                self.timeout
                            );
                        }
                    }
                    self.recompute();
                }
            }
        }
    }
}

/// Replication on a primary: target states, the sync gate, the shippers.
pub struct Replication {
    pub targets: Vec<Arc<TargetState>>,
    pub sync: Arc<SyncGate>,
    pub index: Arc<SeqIndex>,
}

impl Replication {
    /// The journal may release only what every target holds durably (or, for a
    /// target in bitmap mode, what its dirty map covers durably).
    pub fn release_floor(&self) -> Seq {
        self.targets
            .iter()
            .map(|t| t.track.floor(t.acked_seq.load(Ordering::Acquire)))
            .min()
            .unwrap_or(Seq::MAX)
    }

    pub fn status(&self) -> serde_json::Value {
        let now = now_ns();
        let targets: Vec<_> = self
            .targets
            .iter()
            .map(|t| {
                let acked = t.acked_seq.load(Ordering::Acquire);
                let (lag_bytes, lag_seconds) = self.index.lag_after(acked, now);
                let degraded = t.degraded.load(Ordering::Acquire);
                let mut v = json!({
                    "name": t.name,
                    "address": t.address,
                    "mode": t.mode.to_string(),
                    "effective_mode": if degraded { "async (degraded)" } else if t.mode == ReplicationMode::Sync { "sync" } else { "async" },
                    "state": t.state(),
                    "acked_seq": acked,
                    "applied_seq": t.applied_seq.load(Ordering::Acquire),
                    "lag_bytes": lag_bytes,
                    "lag_seconds": lag_seconds,
                    "rtt_us": t.rtt_us.load(Ordering::Relaxed),
                    "last_error": t.last_error.lock().clone(),
                });
                if let (Some(v), serde_json::Value::Object(o)) = (v.as_object_mut(), t.track.status()) {
                    v.extend(o);
                }
                v
            })
            .collect();
        serde_json::Value::Array(targets)
    }
}

/// Everything a shipper needs, shared by all of them.
/// See [`ShipContext::outdated`].
pub type OutdatedHook = Arc<dyn Fn(u64, &str) + Send + Sync>;

pub struct ShipContext {
    pub journal: Arc<Journal>,
    pub tail: Arc<Tail>,
    pub local: LocalIdentity,
    pub tls: TlsMaterial,
    pub opts: TransportOptions,
    pub durable: watch::Receiver<Seq>,
    /// `replication.async_linger_us`: an async shipper's coalescing wait.
    pub async_linger: Duration,
    pub sync: Arc<SyncGate>,
    /// Called when a target proves a newer epoch exists (it was promoted): this
    /// primary is outdated and must stop taking writes. Arguments: the newer epoch
    /// and the node that showed it.
    pub outdated: OutdatedHook,
    /// On a primary by promotion: the fork point, and the targets known to have
    /// rejoined after it (a node whose journal goes past the fork without having
    /// rejoined holds writes of the old epoch the new history does not have).
    pub fork: Option<(Seq, Arc<crate::store::meta::Meta>)>,
}

pub fn geometry(bases: &[Arc<Base>]) -> Vec<VolumeGeometry> {
    bases
        .iter()
        .map(|b| VolumeGeometry {
            id: b.id,
            name: b.name.clone(),
            size_bytes: b.size,
            block_size: 4096,
        })
        .collect()
}

pub fn load_tls(cfg: &Config) -> anyhow::Result<TlsMaterial> {
    let tls = cfg
        .tls
        .as_ref()
        .ok_or_else(|| anyhow!("replication needs a [tls] section"))?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let node = ferry_transport::pki::NodeIdentity {
        name: cfg.node.name.clone(),
        cert_pem: read(&tls.cert)?,
        key_pem: read(&tls.key)?,
    };
    TlsMaterial::from_pem(&read(&tls.ca)?, &node)
        .with_context(|| format!("loading TLS material of node '{}'", cfg.node.name))
}

/// Starts one shipper task per target; each stops when `shutdown` turns true.
pub fn start(
    ctx: Arc<ShipContext>,
    targets: &[Arc<TargetState>],
    shutdown: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    targets
        .iter()
        .map(|t| {
            let ctx = ctx.clone();
            let t = t.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = run_target(ctx, t.clone()) => {}
                    _ = stop.wait_for(|s| *s) => t.set_state("stopped"),
                }
            })
        })
        .collect()
}

pub fn target_states(cfg: &Config, start_acked: Seq) -> Vec<Arc<TargetState>> {
    cfg.replication
        .as_ref()
        .map(|r| {
            r.targets
                .iter()
                .map(|t| Arc::new(TargetState::new(t, start_acked)))
                .collect()
        })
        .unwrap_or_default()
}

async fn run_target(ctx: Arc<ShipContext>, t: Arc<TargetState>) {
    let mut backoff = Backoff::default();
    let addr: SocketAddr = match t.address.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(target = %t.name, "bad target address {}: {e}", t.address);
            return;
        }
    };
    loop {
        t.set_state("connecting");
        let started = Instant::now();
        match session(&ctx, &t, addr).await {
            Ok(()) => {}
            Err(e) => {
                let newer = e
                    .chain()
                    .find_map(|c| match c.downcast_ref::<quic::QuicError>() {
                        Some(quic::QuicError::Handshake(
                            session::HandshakeError::LocalEpochStale { peer, .. },
                        )) => Some(*peer),
                        _ => None,
                    });
                if let Some(epoch) = newer {
                    (ctx.outdated)(epoch, &t.name);
                }
                let msg = crate::error_chain(&e);
                if t.last_error.lock().as_deref() != Some(msg.as_str()) {
                    tracing::warn!(target = %t.name, address = %t.address, "replication session ended: {msg}");
                }
                *t.last_error.lock() = Some(msg);
            }
        }
        t.set_state("disconnected");
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// MTU of the route to `peer` as the kernel knows it (`IP_MTU` of a UDP socket
/// connected to it; nothing is sent), or `None` if it cannot be read. Bounds QUIC's
/// path MTU discovery (`TransportOptions::toward`). Here, not in `ferry-transport`:
/// that crate forbids unsafe code, and neither std nor socket2 reads `IP_MTU`.
fn route_mtu(peer: SocketAddr) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0u8; 4], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.connect(peer).ok()?;
    let (level, name) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, a c_int we own, on a
    // socket we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && mtu > 0).then_some(mtu as u32)
}

/// One connection's life: handshake, then ship until an error.
async fn session(ctx: &ShipContext, t: &Arc<TargetState>, addr: SocketAddr) -> anyhow::Result<()> {
    let endpoint = quic::client_endpoint("0.0.0.0:0".parse()?)?;
    let opts = ctx.opts.clone().toward(addr, route_mtu(addr));
    let client = quic::client_config(&ctx.tls, &t.name, &opts)?;
    let conn = quic::connect(&endpoint, client, addr, &t.name).await?;
    let journal = ctx.journal.clone();
    let epoch = ctx.local.epoch;
    let mut local = ctx.local.clone();
    local.expected_peer_name = t.name.clone();
    // A target tracked in a dirty map resumes anywhere: the copy replaces what the
    // journal no longer holds.
    let resync = t.track.needs_resync();
    let full_resync: Mutex<Option<Seq>> = Mutex::new(None);
    let mut s = quic::primary_handshake(
        conn,
        &local,
        journal.durable_seq(),
        &ctx.opts,
        |neg, hello| {
            if let Some((fork, meta)) = &ctx.fork {
                let rejoined = meta.rejoined(&t.name, *fork).unwrap_or(false);
                if hello.resume_position > *fork && !rejoined {
                    // It holds writes of the old epoch this history does not have (the
                    // previous primary's unreplicated writes). Failback: resync it. The
                    // digest comparison at the start of the copy limits the copy to the
                    // regions either side changed since the fork.
                    if hello.resume_position > journal.durable_seq() {
                        return Err(session::HandshakeError::ForkDiverged(format!(
                            "node '{}' holds sequences up to {} (written after the fork at {fork}); \
                             this primary is at {}: it resyncs once this history passes that point",
                            t.name,
                            hello.resume_position,
                            journal.durable_seq()
                        )));
                    }
                    tracing::warn!(
                        target = %t.name,
                        fork,
                        resume = hello.resume_position,
                        "the rejoining node wrote after the fork: delta resync"
                    );
                    *full_resync.lock() = Some(hello.resume_position);
                    return session::plan_resync(
                        neg,
                        epoch,
                        hello.resume_position,
                        journal.durable_seq(),
                    );
                }
            }
            if resync {
                return session::plan_resync(
                    neg,
                    epoch,
                    hello.resume_position,
                    journal.durable_seq(),
                );
            }
            let oldest = journal.first_available_seq();
            match session::plan_resume(
                neg,
                epoch,
                hello.resume_position,
                oldest,
                journal.durable_seq(),
            ) {
                // The journal lost what it needs (released while it was away): a full
                // resync from the volumes instead of refusing it for good.
                Err(session::HandshakeError::ResyncRequired { resume, .. }) => {
                    *full_resync.lock() = Some(resume);
                    session::plan_resync(neg, epoch, hello.resume_position, journal.durable_seq())
                }
                r => r,
            }
        },
    )
    .await?;
    let full = full_resync.lock().take();
    if let Some(from) = full {
        tokio::task::block_in_place(|| crate::ship::catchup::switch_full(t, from))?;
    }
    let resync = resync || full.is_some();
    let resume = s.hello_ack.resume_seq;
    if let Some((fork, meta)) = &ctx.fork {
        meta.set_rejoined(&t.name, *fork)?;
    }
    tracing::info!(target = %t.name, address = %t.address, resume, "replication session established");
    *t.last_error.lock() = None;
    t.acked_seq.store(resume, Ordering::Release);
    t.applied_seq
        .store(s.peer_hello.resume_position.min(resume), Ordering::Release);
    // Reverts an unfinished resync to bitmap mode when this session ends.
    let _resync_guard = crate::ship::catchup::ResyncGuard(t);
    let resume = if resync {
        t.set_state("resyncing");
        crate::ship::catchup::resync_copy(t, &mut s, resume, epoch).await?
    } else {
        resume
    };
    t.set_state("streaming");
    ctx.sync.recompute();

    let (ws_tx, mut ws_rx) = mpsc::channel::<anyhow::Result<WriteSet>>(READ_AHEAD_WRITE_SETS);
    // Detached: the reader exits by itself once this session drops the receiver.
    {
        let src = ShipSource {
            journal: ctx.journal.clone(),
            tail: ctx.tail.clone(),
            durable: ctx.durable.clone(),
            rt: tokio::runtime::Handle::current(),
            linger: match t.mode {
                ReplicationMode::Async => ctx.async_linger,
                ReplicationMode::Sync => Duration::ZERO,
            },
        };
        std::thread::Builder::new()
            .name(format!("ferry-ship-{}", t.name))
            .spawn(move || read_write_sets(src, resume + 1, epoch, ws_tx))
            .context("spawning the journal reader thread")?;
    }

    let mut sender = Sender::new(epoch, SenderConfig::default(), resume);
    let mut durable_at_last_ack = ctx.journal.durable_seq();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let mut pending: Option<WriteSet> = None;
    loop {
        // Feed the window from the read-ahead, then transmit what it allows.
        loop {
            if pending.is_none() {
                match ws_rx.try_recv() {
                    Ok(ws) => pending = Some(ws?),
                    Err(_) => break,
                }
            }
            let Some(ws) = pending.take() else { break };
            match sender.push(ws) {
                Ok(()) => {}
                Err(session::SenderError::QueueFull { .. }) => break,
                Err(e) => bail!("shipping: {e}"),
            }
        }
        while let Some(ws) = sender.poll_transmit() {
            s.data.send_write_set(&ws).await?;
        }
        tokio::select! {
            frame = s.control_recv.recv_frame() => {
                match frame? {
                    Some(Frame::Ack(ack)) => {
                        let out = sender.on_ack(&ack).map_err(|e| anyhow!("standby ack: {e}"))?;
                        t.acked_seq.store(out.durable_seq, Ordering::Release);
                        t.applied_seq.store(out.applied_seq, Ordering::Release);
                        if crate::ship::catchup::resync_done(t, out.durable_seq) {
                            tokio::task::block_in_place(|| crate::ship::catchup::complete_resync(t));
                        }
                        // Caught up = this ack covers everything that was durable when
                        // the previous ack arrived (reachable under continuous writes,
                        // unlike "equals the head").
                        let caught_up = out.durable_seq >= durable_at_last_ack;
                        durable_at_last_ack = ctx.journal.durable_seq();
                        if t.degraded.load(Ordering::Acquire) && caught_up {
                            t.degraded.store(false, Ordering::Release);
                            tracing::info!(target = %t.name, "sync target caught up: synchronous again");
                        }
                        ctx.sync.recompute();
                    }
                    Some(Frame::Heartbeat(hb)) => {
                        if hb.echo_ns != 0 {
                            let rtt = now_ns().saturating_sub(hb.echo_ns) / 1000;
                            t.rtt_us.store(rtt, Ordering::Relaxed);
                        }
                    }
                    Some(Frame::VerifyResult(v)) => {
                        let waiter = t.verify_waiters.lock().remove(&(v.id, v.volume));
                        if let Some(w) = waiter {
                            let _ = w.send(if v.ok {
                                Ok(v.body)
                            } else {
                                Err(String::from_utf8_lossy(&v.body).into_owned())
                            });
                        }
                    }
                    Some(Frame::HandoverAck(a)) => {
                        let waiting = t.handover.lock().take();
                        match waiting {
                            Some((seq, tx)) if seq == a.seq => {
                                let _ = tx.send(Ok(a.new_epoch));
                                // The standby restarts as the primary: this session ends.
                                return Ok(());
                            }
                            _ => bail!("unexpected HandoverAck at {} (epoch {})", a.seq, a.new_epoch),
                        }
                    }
                    Some(Frame::Error(e)) => {
                        if let Some((_, tx)) = t.handover.lock().take() {
                            let _ = tx.send(Err(anyhow!("standby refused the handover: {:?}: {}", e.code, e.reason)));
                        }
                        bail!("standby refused: {:?}: {}", e.code, e.reason)
                    }
                    Some(other) => bail!("unexpected {:?} frame on the control stream", other.frame_type()),
                    None => bail!("standby closed the control stream"),
                }
            }
            _ = t.handover_kick.notified() => {
                let seq = t.handover.lock().as_ref().map(|(seq, _)| *seq);
                if let Some(seq) = seq {
                    // Everything up to `seq` went out before (the data stream is
                    // ordered and the primary stopped writing): the standby checks it.
                    s.control_send.send_frame(&Frame::Handover(ferry_transport::wire::Handover { epoch, seq })).await?;
                    tracing::warn!(target = %t.name, seq, "handover sent: the standby is to take over");
                }
            }
            ws = ws_rx.recv(), if pending.is_none() => {
                match ws {
                    Some(ws) => pending = Some(ws?),
                    None => bail!("journal reader stopped"),
                }
            }
            _ = t.track.kicked() => {
                bail!("switched to bitmap mode: the journal no longer keeps this target's records");
            }
            _ = heartbeat.tick() => {
                // A switch to bitmap mode (or an abandoned resync) whose wake-up this
                // loop missed.
                if t.track.mode() == crate::ship::catchup::Mode::Bitmap || t.track.resync_abandoned() {
                    bail!("switched to bitmap mode: the journal no longer keeps this target's records");
                }
                s.control_send
                    .send_frame(&Frame::Heartbeat(Heartbeat {
                        epoch,
                        sent_at_ns: now_ns(),
                        echo_ns: 0,
                        last_seq: ctx.journal.durable_seq(),
                    }))
                    .await?;
            }
        }
    }
}

/// Where a shipper's reader thread takes records from, and how it waits for them.
struct ShipSource {
    journal: Arc<Journal>,
    tail: Arc<Tail>,
    durable: watch::Receiver<Seq>,
    rt: tokio::runtime::Handle,
    /// Coalescing wait once caught up (`replication.async_linger_us`; 0 for sync).
    linger: Duration,
}

/// Produces write-sets from `from` on: from the in-memory tail while it holds the
/// position, from journal segments while behind. Blocks while the channel is full.
fn read_write_sets(
    src: ShipSource,
    from: Seq,
    epoch: u64,
    tx: mpsc::Sender<anyhow::Result<WriteSet>>,
) {
    let ShipSource {
        journal,
        tail,
        mut durable,
        rt,
        linger,
    } = src;
    let mut next = from;
    let mut records: Vec<WireRecord> = Vec::new();
    let mut bytes = 0usize;
    let mut ts = 0u64;
    let mut reader: Option<ferry_journal::JournalReader> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        // Memory first.
        if reader.is_none() {
            let read = match tail.read(next, MAX_WRITE_SET_BYTES) {
                // Nothing in memory yet and nothing durable to read: caught up.
                TailRead::Evicted if next > journal.durable_seq() => TailRead::Records(Vec::new()),
                r => r,
            };
            match read {
                TailRead::Records(recs) if recs.is_empty() => {
                    // Caught up: wait for more durable records (bounded, re-checks).
                    let arrived = rt.block_on(async {
                        tokio::time::timeout(
                            Duration::from_millis(200),
                            durable.wait_for(|d| *d >= next),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok())
                    });
                    // Coalesce: let the records that follow join this write-set.
                    if arrived && !linger.is_zero() {
                        std::thread::sleep(linger);
                    }
                    continue;
                }
                TailRead::Records(recs) => {
                    for (seq, rec, t) in recs {
                        next = seq + 1;
                        ts = t;
                        let seal = rec.op == Op::Seal;
                        bytes += rec.data.len() + 32;
                        records.push(wire_record(seq, rec));
                        if (seal || bytes >= MAX_WRITE_SET_BYTES)
                            && !emit(&tx, epoch, &mut records, &mut bytes, ts)
                        {
                            return;
                        }
                    }
                    if !records.is_empty() && !emit(&tx, epoch, &mut records, &mut bytes, ts) {
                        return;
                    }
                    continue;
                }
                TailRead::Evicted => match journal.reader(next) {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(anyhow!("journal reader from {next}: {e}")));
                        return;
                    }
                },
            }
        }
        // Behind: read segments until caught up with what is durable, then back to memory.
        let Some(r) = reader.as_mut() else { continue };
        match r.next() {
            Some(Ok(e)) => {
                next = e.seq + 1;
                ts = e.meta.timestamp_ns;
                let seal = e.record.op == Op::Seal;
                bytes += e.record.data.len() + 32;
                records.push(wire_record(e.seq, e.record));
                if (seal || bytes >= MAX_WRITE_SET_BYTES)
                    && !emit(&tx, epoch, &mut records, &mut bytes, ts)
                {
                    return;
                }
            }
            Some(Err(e)) => {
                let _ = tx.blocking_send(Err(anyhow!("reading the journal: {e}")));
                return;
            }
            None => {
                if !records.is_empty() && !emit(&tx, epoch, &mut records, &mut bytes, ts) {
                    return;
                }
                reader = None;
            }
        }
    }
}

fn wire_record(seq: Seq, r: ferry_journal::Record) -> WireRecord {
    WireRecord {
        seq,
        volume: r.volume,
        op: match r.op {
            Op::Write => RecordOp::Write,
            Op::Trim => RecordOp::Trim,
            Op::WriteZeroes => RecordOp::WriteZeroes,
            Op::Seal => RecordOp::Seal,
        },
        offset: r.offset,
        // The journal keeps a seal's length 0 (its label is payload); on the wire a
        // record's length always covers the bytes it carries.
        length: if r.op == Op::Seal {
            r.data.len() as u32
        } else {
            r.length
        },
        data: r.data,
    }
}

fn emit(
    tx: &mpsc::Sender<anyhow::Result<WriteSet>>,
    epoch: u64,
    records: &mut Vec<WireRecord>,
    bytes: &mut usize,
    ts: u64,
) -> bool {
    let recs = std::mem::take(records);
    *bytes = 0;
    let (Some(first), Some(last)) = (recs.first().map(|r| r.seq), recs.last().map(|r| r.seq))
    else {
        return true;
    };
    let ws = WriteSet {
        epoch,
        first_seq: first,
        last_seq: last,
        timestamp_ns: ts,
        records: recs,
    };
    tx.blocking_send(Ok(ws)).is_ok()
}

/// Maps a wire op to the journal's.
/// The journal record of a received wire record (the inverse of [`wire_record`]).
pub fn journal_record(r: WireRecord) -> ferry_journal::Record {
    let op = match r.op {
        RecordOp::Write => Op::Write,
        RecordOp::Trim => Op::Trim,
        RecordOp::WriteZeroes => Op::WriteZeroes,
        RecordOp::Seal => Op::Seal,
    };
    ferry_journal::Record {
        volume: r.volume,
        op,
        offset: r.offset,
        // A seal's label is payload: its journal length is 0 (see `wire_record`).
        length: if op == Op::Seal { 0 } else { r.length },
        data: r.data,
    }
}

pub fn local_identity(
    cfg: &Config,
    node_id: [u8; 16],
    epoch: u64,
    role: wire::Role,
    bases: &[Arc<Base>],
    expected_peer: &str,
) -> LocalIdentity {
    let (min_version, max_version) = LocalIdentity::supported_versions();
    LocalIdentity {
        cluster_id: cfg.cluster_id(),
        node_id,
        node_name: cfg.node.name.clone(),
        role,
        epoch,
        min_version,
        max_version,
        volumes: geometry(bases),
        expected_peer_name: expected_peer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_journal::Record;

    fn rec(len: usize, op: Op) -> Record {
        Record {
            volume: 0,
            op,
            offset: 0,
            length: len as u32,
            data: Bytes::from(vec![1u8; len]),
        }
    }

    #[test]
    fn tail_serves_from_memory_and_reports_eviction() {
        let t = Tail::new();
        t.push(1, rec(10, Op::Write), 1);
        assert!(
            matches!(t.read(1, 1 << 20), TailRead::Evicted),
            "a disabled tail keeps nothing"
        );
        t.enable(1000);
        for s in 1..=20 {
            t.push(
                s,
                rec(100, if s % 5 == 0 { Op::Seal } else { Op::Write }),
                s,
            );
        }
        // 164 bytes accounted per record: about 6 fit in 1000.
        assert!(matches!(t.read(1, 1 << 20), TailRead::Evicted));
        match t.read(16, 1 << 20) {
            TailRead::Records(r) => {
                // Stops at the seal (seq 20).
                assert_eq!(
                    r.iter().map(|e| e.0).collect::<Vec<_>>(),
                    vec![16, 17, 18, 19, 20]
                );
            }
            TailRead::Evicted => panic!("seq 16 is in memory"),
        }
        assert!(matches!(t.read(21, 1 << 20), TailRead::Records(r) if r.is_empty()));
    }

    #[test]
    fn seq_index_gives_lag_in_bytes_and_seconds() {
        let i = SeqIndex::default();
        assert_eq!(i.lag_after(0, 100), (0, 0.0));
        for s in 1..=10u64 {
            i.push(s, 4096, s * 1_000_000_000);
        }
        assert_eq!(i.lag_after(10, 20_000_000_000), (0, 0.0));
        let (bytes, secs) = i.lag_after(7, 20_000_000_000);
        assert_eq!(bytes, 3 * 4096);
        assert!(
            (secs - 12.0).abs() < 1e-9,
            "oldest unacked is seq 8 at t=8 s: {secs}"
        );
        let (bytes, _) = i.lag_after(0, 20_000_000_000);
        assert_eq!(bytes, 9 * 4096, "lower bound when behind the index front");
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn the_route_mtu_is_the_interface_mtu() {
        // Loopback's MTU as the kernel reports it for the interface.
        let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("reading /sys/class/net/lo/mtu")
            .trim()
            .parse()
            .expect("lo mtu");
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // An IPv4 packet holds at most 65535 bytes: the route reports lo's MTU capped there.
        assert_eq!(route_mtu(peer), Some(lo.min(65535)));
        let opts = TransportOptions::default().toward(peer, route_mtu(peer));
        assert_eq!(
            opts.mtu_upper_bound,
            quic::udp_payload_bound(lo.min(65535), false),
            "discovery bound from the loopback MTU {lo}"
        );
    }
}
