//! Per-target state on a primary: [`TargetState`] (one target, shared between its
//! shipper and the rest), the owner of the target's [`TargetLifecycle`] (session
//! phase, tracking mode, degraded, handover: `ferry_proto::target` decides every
//! change), its journal-overflow [`Tracker`] (the dirty maps and counters; the
//! procedures that create, fill and delete them are in `ship::catchup`) and the
//! [`SyncGate`] that makes client writes wait for live sync targets. They live
//! together because each refers to the others.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_journal::{Journal, Op, Record, Seq};
use ferry_proto::target::{
    quorum_gate_position, sync_gate_position, HandedOver, SyncLossPolicy, SyncMode,
    TargetLifecycle, TargetStatus as Snapshot, UnexpectedHandoverAck,
};
use ferry_proto::wire::ErrorCode;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::ship::dirty::DirtyMap;
use crate::store::base::Base;
use crate::store::meta::Meta;
use ferry_api::config::{OnSyncLoss, ReplicationMode, SyncPolicy, TargetConfig};

/// A bitmap-mode target's maps are flushed at least this often (the monitor may flush
/// sooner under journal pressure).
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The values of `tracking` in status, for metrics.
pub const MODES: [&str; 3] = ferry_proto::target::TRACKING_NAMES;

/// The lifecycle's clock: a monotonic time since the first call (it takes times as
/// arguments and reads no clock itself).
pub(crate) fn lifecycle_now() -> Duration {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

/// The answer a switchover awaits from a handover: the new epoch, or why not.
pub type HandoverAnswer = oneshot::Sender<anyhow::Result<u64>>;

/// The lifecycle and what its decisions need kept beside it (under one lock).
struct Life {
    lc: TargetLifecycle,
    /// The switchover waiting for the handover in flight (phase `HandingOver`).
    answer: Option<HandoverAnswer>,
}

/// The target's durable ack, readable without the lifecycle's lock (the switchover
/// polls it). A mirror: written only by [`TargetState::update`], the lifecycle's
/// owner, after every change; nothing else can store into it.
#[derive(Debug, Default)]
pub struct AckedMirror(AtomicU64);

impl AckedMirror {
    pub fn load(&self, order: Ordering) -> Seq {
        self.0.load(order)
    }
}

/// One replication target, shared between its shipper and the rest. Its lifecycle
/// changes only through the methods here, which call the lifecycle's event methods
/// and return its decisions for the caller (the IO code) to carry out. Lock order:
/// the lifecycle's lock is taken last and held across no IO and no other lock.
pub struct TargetState {
    pub name: String,
    pub address: String,
    pub mode: ReplicationMode,
    life: Mutex<Life>,
    /// Mirror of the lifecycle's ack (see [`AckedMirror`]).
    pub acked_seq: AckedMirror,
    pub rtt_us: AtomicU64,
    /// Wakes the streaming session to send the Handover the lifecycle decided.
    pub(crate) handover_kick: tokio::sync::Notify,
    /// Held by the switchover to this target, start to end: a second one is refused.
    pub switchover: tokio::sync::Mutex<()>,
    /// Verify answers awaited from this target, by (verify id, volume id).
    pub(crate) verify_waiters: Mutex<VerifyWaiters>,
    /// Journal overflow: the dirty maps and their counters ([`Tracker`]).
    pub track: Tracker,
    /// Held while the target's sync-loss record is written to the metadata, so the
    /// writes land in the order of the lifecycle's changes (a late clear must not
    /// overwrite a loss recorded after it).
    sync_loss_io: Mutex<()>,
    /// Compression, zero blocks, the bandwidth cap and their counters.
    pub wan: crate::ship::wan::Wan,
    /// `max_lag_seconds`: write replies wait while it streams with more lag
    /// (`ship::pace`).
    pub max_lag: Option<Duration>,
    /// Woken after every lifecycle change (an ack, a phase change): writes paced by
    /// this target look at its lag again.
    pub(crate) changed: tokio::sync::Notify,
    /// Writes are being paced by this target now (logged once per episode).
    pub(crate) pacing_now: AtomicBool,
}

type VerifyWaiters =
    std::collections::HashMap<(u64, u32), oneshot::Sender<Result<bytes::Bytes, String>>>;

fn sync_mode(m: ReplicationMode) -> SyncMode {
    match m {
        ReplicationMode::Sync => SyncMode::Sync,
        ReplicationMode::Async => SyncMode::Async,
    }
}

impl TargetState {
    /// `acked`: where the target is assumed to be until its Hello says (the
    /// checkpoint). `away_since_fork`: on a primary by promotion, it has not rejoined
    /// since the fork, so it starts degraded.
    pub(crate) fn new(t: &TargetConfig, acked: Seq, away_since_fork: bool) -> TargetState {
        TargetState {
            name: t.name.clone(),
            address: t.address.clone(),
            mode: t.mode,
            life: Mutex::new(Life {
                lc: TargetLifecycle::new(t.name.clone(), sync_mode(t.mode), acked, away_since_fork)
                    .with_sync_loss_policy(match t.on_sync_loss {
                        OnSyncLoss::Degrade => SyncLossPolicy::Degrade,
                        OnSyncLoss::Block => SyncLossPolicy::Block,
                    }),
                answer: None,
            }),
            acked_seq: AckedMirror(AtomicU64::new(acked)),
            rtt_us: AtomicU64::new(0),
            handover_kick: tokio::sync::Notify::new(),
            switchover: tokio::sync::Mutex::new(()),
            verify_waiters: Mutex::new(Default::default()),
            track: Default::default(),
            sync_loss_io: Mutex::new(()),
            wan: crate::ship::wan::Wan::new(&t.wan),
            max_lag: t
                .max_lag_seconds
                .and_then(|s| Duration::try_from_secs_f64(s).ok()),
            changed: tokio::sync::Notify::new(),
            pacing_now: AtomicBool::new(false),
        }
    }

    /// Calls a lifecycle event method (`f`) and returns its decision: the only place
    /// the lifecycle changes, and the only writer of the [`AckedMirror`].
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut TargetLifecycle) -> R) -> R {
        let mut life = self.life.lock();
        let r = f(&mut life.lc);
        self.acked_seq.0.store(life.lc.acked(), Ordering::Release);
        drop(life);
        self.changed.notify_waiters();
        r
    }

    /// Reads the lifecycle (a query, no change).
    pub(crate) fn read<R>(&self, f: impl FnOnce(&TargetLifecycle) -> R) -> R {
        f(&self.life.lock().lc)
    }

    /// Everything status and metrics show of the lifecycle, at one instant.
    pub fn snapshot(&self) -> Snapshot {
        self.read(TargetLifecycle::snapshot)
    }

    /// The session phase as status names it (`connecting`, `streaming`, …).
    pub fn state(&self) -> &'static str {
        self.read(|lc| lc.phase().as_str())
    }

    /// The journal position this target needs kept.
    pub fn floor(&self) -> Seq {
        self.read(TargetLifecycle::floor)
    }

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

    /// Asks this target's live session to hand the primary role over at `seq` (every
    /// record up to it durable on the target). Resolves to the new epoch, or to an
    /// error once the session refuses or ends. Refused while no session streams (a
    /// request is never left for a later session) and while another one is pending.
    pub fn request_handover(
        &self,
        seq: Seq,
    ) -> anyhow::Result<oneshot::Receiver<anyhow::Result<u64>>> {
        let mut life = self.life.lock();
        life.lc.request_handover(seq)?;
        let (tx, rx) = oneshot::channel();
        life.answer = Some(tx);
        drop(life);
        self.handover_kick.notify_one();
        Ok(rx)
    }

    /// The Handover the session must send now, if one is pending.
    pub(crate) fn handover_to_send(&self) -> Option<Seq> {
        self.read(|lc| match lc.phase() {
            ferry_proto::target::TargetPhase::HandingOver { seq } => Some(seq),
            _ => None,
        })
    }

    /// The switchover stopped waiting (timed out): forgets the pending handover, so a
    /// HandoverAck arriving later is unexpected (the session ends), not a success.
    /// True if one was pending.
    pub fn abandon_handover(&self) -> bool {
        let mut life = self.life.lock();
        let pending = life.lc.abandon_handover();
        life.answer = None;
        pending
    }

    /// The standby's HandoverAck: answers the switchover on success. An ack that
    /// answers no pending handover fails the pending one (if any) and is an error.
    pub(crate) fn on_handover_ack(
        &self,
        seq: Seq,
        new_epoch: u64,
    ) -> Result<HandedOver, UnexpectedHandoverAck> {
        let mut life = self.life.lock();
        let res = life.lc.on_handover_ack(seq, new_epoch);
        let answer = match &res {
            Ok(_) => life.answer.take(),
            Err(e) if e.handover_failed => {
                life.answer = None;
                None
            }
            Err(_) => None,
        };
        drop(life);
        self.changed.notify_waiters();
        if let (Ok(done), Some(tx)) = (&res, answer) {
            let _ = tx.send(Ok(done.new_epoch));
        }
        res
    }

    /// The standby sent an Error frame with `code` (the session ends): a pending
    /// handover is refused with `why`; `ResyncRequired` plans a full resync for the
    /// next session (the lifecycle decides). True if that was planned just now.
    pub(crate) fn on_peer_error(
        &self,
        code: ErrorCode,
        why: impl FnOnce() -> anyhow::Error,
    ) -> bool {
        let mut life = self.life.lock();
        let out = life.lc.on_peer_error_code(code);
        let answer = out.handover_failed.then(|| life.answer.take()).flatten();
        drop(life);
        self.changed.notify_waiters();
        if let Some(tx) = answer {
            let _ = tx.send(Err(why()));
        }
        out.full_resync_planned
    }

    /// The session ended (`error`: why, for status): an unfinished resync goes back
    /// to bitmap mode, a handover in flight fails (the switchover sees its answer
    /// dropped).
    pub(crate) fn session_ended(&self, error: Option<String>) {
        let mut life = self.life.lock();
        let end = life.lc.session_ended(error);
        if end.handover_failed {
            life.answer = None;
        }
        drop(life);
        self.changed.notify_waiters();
        if end.resync_interrupted {
            tracing::warn!(target = %self.name, "resync interrupted; it starts again on the next connection");
        }
    }

    /// A client write at `seq` waited `sync_timeout` in vain for `position`: degrades
    /// this target if it is a live sync target that does not hold it so far (true:
    /// just now).
    pub(crate) fn sync_timeout(&self, seq: Seq, position: GatePosition) -> bool {
        match position {
            GatePosition::Durable => self.update(|lc| lc.sync_timeout(seq)),
            GatePosition::Received => self.update(|lc| lc.sync_received_timeout(seq)),
        }
    }

    /// Records this target's sync loss durably if one is due (it is degraded, and
    /// writes wait for it until then): in `meta` first, then in the lifecycle, so no
    /// write past the loss is acknowledged without a durable record of it. `meta`
    /// `None` (unit tests): in memory only. A failed write leaves writes waiting; the
    /// next timeout tries again.
    pub(crate) fn record_sync_loss(&self, meta: Option<&Meta>) {
        let _io = self.sync_loss_io.lock();
        let Some(at) = self.read(TargetLifecycle::sync_loss_to_record) else {
            return;
        };
        if let Some(meta) = meta {
            let put = || meta.set_sync_loss(&self.name, Some(at));
            if let Err(e) = tokio::task::block_in_place(put) {
                tracing::error!(
                    target = %self.name,
                    "cannot record the sync target's loss of sync at {at}: writes keep \
                     waiting for it ({e})"
                );
                return;
            }
        }
        self.update(|lc| lc.sync_loss_recorded(at));
        tracing::error!(
            target = %self.name,
            seq = at,
            "sync loss recorded: writes after {at} are acknowledged without this target \
             until it catches up; promoting it meanwhile may lose them (it refuses \
             without --force)"
        );
    }

    /// The target holds every write acknowledged without it: its sync-loss record
    /// goes from `meta` — unless a new loss was recorded since (the lifecycle says
    /// which is current). A failure only logs: the record stays, and a restart
    /// restores it until the target catches up again (the safe side).
    pub(crate) fn clear_sync_loss(&self, meta: Option<&Meta>) {
        let _io = self.sync_loss_io.lock();
        if self.read(TargetLifecycle::sync_loss).is_some() {
            return;
        }
        if let Some(meta) = meta {
            if let Err(e) = tokio::task::block_in_place(|| meta.set_sync_loss(&self.name, None)) {
                tracing::error!(target = %self.name, "cannot clear the sync loss record: {e}");
                return;
            }
        }
        tracing::info!(
            target = %self.name,
            "sync target holds every write acknowledged without it: sync loss cleared"
        );
    }

    /// The V2 tail of a heartbeat to this target: its durable sync-loss record (so
    /// the standby knows it may lack acknowledged writes), only to a standby that
    /// reads V2 tails.
    pub(crate) fn heartbeat_sync_loss(
        &self,
        neg: ferry_proto::session::Negotiated,
    ) -> Option<ferry_proto::wire::SyncLoss> {
        use ferry_proto::wire::SyncLoss;
        neg.has_v2_tails()
            .then(|| match self.read(TargetLifecycle::sync_loss) {
                Some(at) => SyncLoss::DegradedAt(at),
                None => SyncLoss::None,
            })
    }

    /// `on_sync_loss = "block"`: writes are waiting for it past the timeout.
    pub(crate) fn writes_blocked(&self) -> bool {
        self.read(TargetLifecycle::writes_blocked)
    }

    /// Start-up: what `meta` recorded of the target before the restart holds on —
    /// its sync loss, and its standby's request for a full resync (issue 16 path 7:
    /// a restart between the request and the resync used to forget it); a target
    /// degraded from the start (away since a failover, bitmap mode) gets its sync
    /// loss recorded now, before the first write.
    pub(crate) fn load_persisted(&self, meta: &Meta) -> anyhow::Result<()> {
        if meta.resync_required(&self.name)? {
            self.update(TargetLifecycle::restore_peer_requires_resync);
            tracing::warn!(
                target = %self.name,
                "the standby required a full resync before the restart: its next session \
                 resyncs every region by digest"
            );
        }
        if let Some(at) = meta.sync_loss(&self.name)? {
            self.update(|lc| lc.restore_sync_loss(at));
        } else if let Some(at) = self.read(TargetLifecycle::sync_loss_to_record) {
            meta.set_sync_loss(&self.name, Some(at))?;
            self.update(|lc| lc.sync_loss_recorded(at));
        }
        Ok(())
    }

    /// Test set-up: a session streams after `acked` (as after its handshake).
    #[cfg(test)]
    pub(crate) fn streaming_at(&self, acked: Seq) {
        let plan = tests::plan(acked, false);
        self.update(|lc| {
            lc.connecting();
            lc.session_started(&plan, acked, acked);
        });
    }
}

/// Which of a sync target's positions a client write waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatePosition {
    /// Durable on the target: FLUSH, FUA and writethrough writes.
    Durable,
    /// Received by the target (in its memory, queued for its journal: DRBD's protocol
    /// B): writeback writes. A standby that sends no received acks (older than V4, or
    /// not asked) is received exactly as far as it is durable.
    Received,
}

/// Makes client writes wait until the live sync targets hold them durably: every one
/// of them, or as many as the sync policy (`replication.sync`) asks.
///
/// It keeps two positions, computed alike over the same targets and policy: the
/// durable one (each target's `TargetLifecycle::sync_position`) and the received one
/// (`sync_received_position`, never behind it), which a writeback write's reply waits
/// for ([`GatePosition`]).
///
/// The position is the minimum durable position over sync targets that are not
/// degraded (`Seq::MAX` when there are none; each target's
/// `TargetLifecycle::sync_position`), or under a policy
/// `ferry_proto::target::quorum_gate_position` over the listed targets (the k-th
/// highest for ANY k, the lowest of the first k not degraded for FIRST k; its docs
/// say why a write held by fewer than k of them always has a sync loss recorded
/// first). The listed targets are the sync ones (`Config::ship_targets`), so the
/// timeout below treats them as it treats every sync target: it degrades every
/// listed target lacking the write, also one the policy did not wait for (under FIRST,
/// a lower-priority one) — its recorded loss is true, it lacks an acknowledged write.
/// A write that waits
/// longer than `timeout`
/// degrades the sync targets holding it back — loudly — so clients never fail
/// because a standby is slow or gone; the target returns to sync once it has caught
/// up. A write reads only the watch channel, never a target's lock.
pub struct SyncGate {
    /// The targets now configured: a reload adds and removes some.
    targets: parking_lot::RwLock<Vec<Arc<TargetState>>>,
    /// The durable position.
    tx: watch::Sender<Seq>,
    /// The received position (≥ the durable one).
    received_tx: watch::Sender<Seq>,
    timeout: Duration,
    /// Where sync losses are recorded (`None` in unit tests: in memory only).
    meta: Option<Arc<Meta>>,
    /// `replication.sync` (`None`: every sync target must hold a write).
    policy: Option<SyncPolicy>,
}

impl SyncGate {
    /// A gate without a sync policy: every sync target holds writes back.
    pub fn new(
        targets: Vec<Arc<TargetState>>,
        timeout: Duration,
        meta: Option<Arc<Meta>>,
    ) -> Arc<SyncGate> {
        Self::with_policy(targets, timeout, meta, None)
    }

    /// A gate under `policy` (`replication.sync`; `None`: as [`Self::new`]).
    pub fn with_policy(
        targets: Vec<Arc<TargetState>>,
        timeout: Duration,
        meta: Option<Arc<Meta>>,
        policy: Option<SyncPolicy>,
    ) -> Arc<SyncGate> {
        let (tx, _) = watch::channel(Seq::MAX);
        let (received_tx, _) = watch::channel(Seq::MAX);
        let g = Arc::new(SyncGate {
            targets: parking_lot::RwLock::new(targets),
            tx,
            received_tx,
            timeout,
            meta,
            policy,
        });
        g.recompute();
        g
    }

    pub fn has_sync_targets(&self) -> bool {
        self.targets
            .read()
            .iter()
            .any(|t| t.mode == ReplicationMode::Sync)
    }

    /// Replaces the targets (a reload) and recomputes the sync position: a removed
    /// sync target no longer holds writes back.
    pub fn set_targets(&self, targets: Vec<Arc<TargetState>>) {
        *self.targets.write() = targets;
        self.recompute();
    }

    /// The node's metadata, where the targets' durable records go (`None` in unit
    /// tests).
    pub(crate) fn meta(&self) -> Option<&Meta> {
        self.meta.as_deref()
    }

    /// The sync policy, if any (status shows it).
    pub fn policy(&self) -> Option<&SyncPolicy> {
        self.policy.as_ref()
    }

    /// Recomputes both sync positions after an ack or a state change.
    pub fn recompute(&self) {
        let targets = self.targets.read();
        // One read of each lifecycle for both, so received ≥ durable holds between them.
        let both: Vec<(Option<Seq>, Option<Seq>)> = targets
            .iter()
            .map(|t| t.read(|lc| (lc.sync_position(), lc.sync_received_position())))
            .collect();
        let durable = self.position(&targets, |i| both[i].0);
        let received = self.position(&targets, |i| both[i].1);
        drop(targets);
        for (tx, pos) in [(&self.tx, durable), (&self.received_tx, received)] {
            tx.send_if_modified(|v| {
                let changed = *v != pos;
                *v = pos;
                changed
            });
        }
    }

    /// The gate's position from each target's (`position(i)` for `targets[i]`), under
    /// the policy.
    fn position(
        &self,
        targets: &[Arc<TargetState>],
        position: impl Fn(usize) -> Option<Seq>,
    ) -> Seq {
        match &self.policy {
            None => sync_gate_position((0..targets.len()).map(&position)),
            // In the order listed (FIRST's priority). A name without a target cannot
            // be (the config is checked against the targets, and `sync` changes only
            // with a restart); like a removed sync target, it would hold nothing back.
            Some(p) => quorum_gate_position(
                p.quorum,
                p.names.iter().map(|n| {
                    targets
                        .iter()
                        .position(|t| t.name == *n)
                        .and_then(&position)
                }),
            ),
        }
    }

    /// Waits until `seq` is durable on every live sync target. A timeout degrades
    /// the sync targets that lack it (`on_sync_loss = "degrade"`), each only once
    /// its loss is recorded durably; with `"block"` the write simply waits on.
    pub async fn wait(&self, seq: Seq) {
        self.wait_for(seq, GatePosition::Durable).await
    }

    /// Waits until every live sync target has received `seq` (a writeback write's
    /// reply); a timeout acts as in [`Self::wait`], on the targets that have not
    /// received it. The sync loss it records is at the target's durable ack.
    pub async fn wait_received(&self, seq: Seq) {
        self.wait_for(seq, GatePosition::Received).await
    }

    async fn wait_for(&self, seq: Seq, position: GatePosition) {
        let mut rx = match position {
            GatePosition::Durable => self.tx.subscribe(),
            GatePosition::Received => self.received_tx.subscribe(),
        };
        loop {
            match tokio::time::timeout(self.timeout, rx.wait_for(|s| *s >= seq)).await {
                Ok(_) => return,
                Err(_) => {
                    let targets = self.targets.read().clone();
                    for t in &targets {
                        let was_blocked = t.writes_blocked();
                        if t.sync_timeout(seq, position) {
                            tracing::error!(
                                target = %t.name,
                                seq,
                                "sync target did not confirm a write within {:?}: degraded to async \
                                 (RPO is no longer zero) until it catches up",
                                self.timeout
                            );
                        }
                        // Degraded now or before (bitmap mode): durable first.
                        t.record_sync_loss(self.meta.as_deref());
                        if !was_blocked && t.writes_blocked() {
                            tracing::error!(
                                target = %t.name,
                                seq,
                                "sync target did not confirm a write within {:?}: writes wait \
                                 for it (on_sync_loss = \"block\") until it returns",
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

/// Region bits marked in memory (the live side of a map): one bit per region,
/// cheap to set from the journal's completion path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBits {
    pub(crate) shift: u32,
    pub(crate) size: u64,
    pub(crate) words: Vec<u64>,
    pub(crate) any: bool,
}

impl RegionBits {
    /// `region_size`: a power of two.
    pub fn new(volume_size: u64, region_size: u64) -> RegionBits {
        let shift = region_size.max(1).trailing_zeros();
        let regions = volume_size.div_ceil(1u64 << shift);
        RegionBits {
            shift,
            size: volume_size,
            words: vec![0; regions.div_ceil(64) as usize],
            any: false,
        }
    }

    /// Marks every region `[offset, offset + len)` touches (clipped to the volume).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        for r in first..=last {
            if let Some(w) = self.words.get_mut((r / 64) as usize) {
                *w |= 1 << (r % 64);
            }
        }
        self.any = true;
    }

    /// The marked regions as coalesced `(offset, len)` byte ranges (clipped to the
    /// volume), clearing them.
    pub fn take(&mut self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        if !self.any {
            return out;
        }
        let rs = 1u64 << self.shift;
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let off = (i as u64 * 64 + b) * rs;
                let len = rs.min(self.size - off);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += len,
                    _ => out.push((off, len)),
                }
            }
        }
        self.any = false;
        out
    }
}

/// What the monitor and the resync copies need from the primary.
pub struct Shared {
    pub journal: Arc<Journal>,
    pub bases: Vec<Arc<Base>>,
    /// The contiguous applied position of the volume group.
    pub applied: Arc<dyn Fn() -> Seq + Send + Sync>,
    /// The persisted checkpoint.
    pub checkpoint: Arc<dyn Fn() -> Seq + Send + Sync>,
    pub sync: Option<Arc<SyncGate>>,
    pub dir: PathBuf,
    pub region_size: u64,
}

/// Per-target overflow state (a field of [`TargetState`]): the dirty maps and their
/// counters. Which mode the target is in, where its floor is and whether its resync
/// was abandoned are the lifecycle's (`Tracking`).
#[derive(Default)]
pub struct Tracker {
    /// Bytes the dirty regions cover (updated at each flush and resync start).
    pub dirty_bytes: AtomicU64,
    /// Bytes shipped by resyncs since this primary started (data and zero extents).
    pub resync_bytes: AtomicU64,
    /// Bytes shipped as data by resyncs since this primary started.
    pub resync_data_bytes: AtomicU64,
    /// Ends the target's session when the lifecycle says it must (switched to bitmap
    /// mode, resync abandoned).
    pub(crate) kick: tokio::sync::Notify,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) live: Mutex<Live>,
    pub(crate) shared: OnceLock<Arc<Shared>>,
    pub(crate) flush_failing: AtomicBool,
}

#[derive(Default)]
pub(crate) struct Inner {
    /// (volume id, map), in the order of the bases.
    pub(crate) maps: Vec<(u32, DirtyMap)>,
    pub(crate) last_flush: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct Live {
    pub(crate) active: bool,
    pub(crate) bits: Vec<(u32, RegionBits)>,
    /// Every durable record up to it has been marked (live or in the maps).
    pub(crate) marked_through: Seq,
}

impl Tracker {
    /// Resolves when the target's session must end (switched to bitmap mode: the
    /// journal records it would read are being released; or resync abandoned).
    pub async fn kicked(&self) {
        self.kick.notified().await
    }

    /// Called with every durable record, in sequence order (journal completion path):
    /// marks its range while the target is tracked in a bitmap. Memory only; quick.
    pub fn on_durable(&self, seq: Seq, rec: &Record) {
        let mut live = self.live.lock();
        if !live.active {
            return;
        }
        if rec.op != Op::Seal && rec.length > 0 {
            if let Some((_, bits)) = live.bits.iter_mut().find(|(v, _)| *v == rec.volume) {
                bits.mark(rec.offset, u64::from(rec.length));
            }
        }
        live.marked_through = seq;
    }

    pub(crate) fn start_live(&self, sh: &Shared, marked_through: Seq) {
        let mut live = self.live.lock();
        live.active = true;
        live.marked_through = marked_through;
        live.bits = sh
            .bases
            .iter()
            .map(|b| (b.id, RegionBits::new(b.size, sh.region_size)))
            .collect();
    }

    pub(crate) fn stop_live(&self) {
        let mut live = self.live.lock();
        live.active = false;
        live.bits.clear();
    }

    /// Moves the live marks into the maps (memory) and returns the position they
    /// cover.
    pub(crate) fn merge(&self, inner: &mut Inner) -> anyhow::Result<Seq> {
        let (taken, through) = {
            let mut live = self.live.lock();
            let taken: Vec<(u32, Vec<(u64, u64)>)> =
                live.bits.iter_mut().map(|(v, b)| (*v, b.take())).collect();
            (taken, live.marked_through)
        };
        for (vol, ranges) in taken {
            if let Some((_, map)) = inner.maps.iter_mut().find(|(v, _)| *v == vol) {
                for (off, len) in ranges {
                    map.mark(off, len)?;
                }
            }
        }
        Ok(through)
    }

    pub(crate) fn count_dirty(&self, inner: &Inner) {
        let bytes = inner.maps.iter().map(|(_, m)| m.dirty_bytes()).sum();
        self.dirty_bytes.store(bytes, Ordering::Relaxed);
    }
}

/// The maps' start (`base_seq`) and durably marked position while the lifecycle
/// tracks the target in maps (bitmap or resyncing); `None` otherwise.
pub(crate) fn maps_in_use(tracking: ferry_proto::target::Tracking) -> Option<(Seq, Seq)> {
    use ferry_proto::target::Tracking;
    match tracking {
        Tracking::Bitmap {
            base,
            flushed_through,
        }
        | Tracking::Resyncing {
            base,
            flushed_through,
            ..
        } => Some((base, flushed_through)),
        Tracking::Streaming | Tracking::Switching { .. } => None,
    }
}

impl TargetState {
    /// Makes the marks durable (bitmap and resyncing modes). `force`: even if the
    /// last flush was recent. On failure the marks stay in memory and the floor stays
    /// where it was: the journal is held, nothing is lost.
    pub(crate) fn flush(&self, force: bool) {
        let tr = &self.track;
        let mut inner = tr.inner.lock();
        let Some((base, held)) = maps_in_use(self.read(|lc| lc.tracking())) else {
            return;
        };
        if !force && inner.last_flush.is_some_and(|t| t.elapsed() < FLUSH_EVERY) {
            return;
        }
        let res = (|| -> anyhow::Result<Seq> {
            let through = tr.merge(&mut inner)?;
            for (_, map) in inner.maps.iter_mut() {
                map.set_seqs(base, through);
                map.flush()?;
            }
            Ok(through)
        })();
        inner.last_flush = Some(Instant::now());
        match res {
            Ok(through) => {
                self.update(|lc| lc.marks_flushed(through));
                tr.count_dirty(&inner);
                if tr.flush_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(target = %self.name, through, "dirty map flushed again");
                }
            }
            Err(e) => {
                if !tr.flush_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        target = %self.name,
                        "flushing the dirty map failed: {}; the journal is held at sequence {held} \
                         for this target until a flush succeeds (writes may wait for journal \
                         space; nothing is lost)",
                        crate::error_chain(&e),
                    );
                }
            }
        }
    }

    /// The `tracking` fields of the target's status row.
    pub fn track_status(&self, snap: &Snapshot) -> ferry_api::status::TrackStatus {
        let tr = &self.track;
        ferry_api::status::TrackStatus {
            tracking: snap.tracking.as_str().to_string(),
            dirty_bytes: tr.dirty_bytes.load(Ordering::Relaxed),
            resync_bytes: tr.resync_bytes.load(Ordering::Relaxed),
            resync_data_bytes: tr.resync_data_bytes.load(Ordering::Relaxed),
            points_lost: snap.points_lost.map(|l| ferry_api::status::PointsLost {
                after_seq: l.after,
                through_seq: l.through,
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_proto::target::{EffectiveMode, EndReason, HelloPlan, PlanStart};

    pub(crate) fn target(name: &str, mode: ReplicationMode, acked: Seq) -> Arc<TargetState> {
        Arc::new(TargetState::new(
            &TargetConfig {
                name: name.into(),
                address: "127.0.0.1:1".into(),
                mode,
                on_sync_loss: Default::default(),
                wan: Default::default(),
                max_lag_seconds: None,
            },
            acked,
            false,
        ))
    }

    /// A handshake's plan: the standby resumes at `resume`, streaming or resyncing.
    pub(crate) fn plan(resume: Seq, resync: bool) -> HelloPlan {
        HelloPlan {
            ack: ferry_proto::wire::HelloAck {
                epoch: 1,
                version: 1,
                resume_seq: resume,
                received_acks: false,
            },
            start: if resync {
                PlanStart::Resync { full: None }
            } else {
                PlanStart::Stream
            },
            record_rejoined: false,
        }
    }

    fn tracking(t: &TargetState) -> &'static str {
        t.snapshot().tracking.as_str()
    }

    fn needs_resync(t: &TargetState) -> bool {
        t.read(|lc| lc.tracking().needs_resync())
    }

    /// The journal position a target holds, by tracking mode; one switch at a time.
    #[test]
    fn the_floor_follows_the_tracking_mode() {
        let t = target("a", ReplicationMode::Sync, 7);
        assert_eq!((tracking(&t), t.floor()), ("streaming", 7));
        assert!(t.update(|lc| lc.begin_overflow_switch()).is_some());
        assert!(
            t.update(|lc| lc.begin_overflow_switch()).is_none(),
            "a second switch waits for the first"
        );
        assert_eq!((tracking(&t), t.floor()), ("streaming", 7));
        assert!(!needs_resync(&t));
        t.update(|lc| lc.bitmap_entered(5));
        assert_eq!(t.floor(), 5, "bitmap: what is durably marked");
        assert!(needs_resync(&t));
        // A resync session from 2 with the snapshot at 3; acks during the stream.
        let mut floors = Vec::new();
        t.update(|lc| {
            lc.connecting();
            lc.session_started(&plan(2, true), 2, 2);
            lc.resync_begin(2, 3).unwrap();
        });
        floors.push(t.floor());
        t.update(|lc| lc.resync_copied(100, 100));
        for ack in [4, 9] {
            t.update(|lc| lc.on_ack(ack, ack, 100));
            floors.push(t.floor());
        }
        // min(marked, max(snapshot, ack))
        assert_eq!(floors, [3, 4, 5]);
        assert_eq!(t.read(|lc| lc.must_end_session()), None);
        assert!(t.update(|lc| lc.abandon_resync(10)));
        assert_eq!(
            t.read(|lc| lc.must_end_session()),
            Some(EndReason::ResyncAbandoned)
        );
        assert!(
            t.update(|lc| lc.begin_overflow_switch()).is_none(),
            "only a streaming target switches"
        );
        assert_eq!(MODES.map(|m| m.len()), [9, 6, 9]);
    }

    fn degraded(t: &TargetState) -> bool {
        t.snapshot().effective_mode == EffectiveMode::Degraded
    }

    /// Client writes wait for live sync targets only; one that misses the timeout is
    /// degraded (loudly) and writes go on.
    #[tokio::test]
    async fn a_sync_target_that_misses_the_timeout_is_degraded() {
        let a = target("a", ReplicationMode::Sync, 0);
        let b = target("b", ReplicationMode::Async, 0);
        let g = SyncGate::new(vec![a.clone(), b.clone()], Duration::from_millis(50), None);
        assert!(g.has_sync_targets());
        a.streaming_at(5);
        g.recompute();
        tokio::time::timeout(Duration::from_secs(5), g.wait(5))
            .await
            .expect("5 is durable on the sync target");
        assert!(!degraded(&a));
        tokio::time::timeout(Duration::from_secs(5), g.wait(6))
            .await
            .expect("the timeout degrades the target and lets the write go");
        assert!(degraded(&a));
        assert!(!degraded(&b), "async targets never wait");
        let async_only = SyncGate::new(vec![b], Duration::from_millis(50), None);
        assert!(!async_only.has_sync_targets());
    }

    /// The gate's two positions: a writeback write's reply goes once the sync target
    /// has received it, a FLUSH waits until it is durable there; a received wait that
    /// times out degrades only a target that has not received the write, with its loss
    /// at its durable ack.
    #[tokio::test]
    async fn a_writeback_write_waits_for_received_a_flush_for_durable() {
        let short = Duration::from_millis(200);
        let a = target("a", ReplicationMode::Sync, 0);
        let g = SyncGate::new(vec![a.clone()], Duration::from_secs(3600), None);
        a.streaming_at(5);
        a.update(|lc| lc.on_received(10));
        g.recompute();
        tokio::time::timeout(short, g.wait_received(8))
            .await
            .expect("received through 10");
        let durable = tokio::time::timeout(short, g.wait(8)).await;
        assert!(durable.is_err(), "durable only through 5");
        a.update(|lc| lc.on_ack(8, 8, 10));
        g.recompute();
        tokio::time::timeout(short, g.wait(8))
            .await
            .expect("durable through 8");
        let received = tokio::time::timeout(short, g.wait_received(11)).await;
        assert!(received.is_err());

        let b = target("b", ReplicationMode::Sync, 0);
        let c = target("c", ReplicationMode::Sync, 0);
        let g = SyncGate::new(vec![b.clone(), c.clone()], Duration::from_millis(50), None);
        b.streaming_at(5);
        c.streaming_at(5);
        b.update(|lc| lc.on_received(10));
        g.recompute();
        tokio::time::timeout(Duration::from_secs(5), g.wait_received(8))
            .await
            .expect("the timeout degrades c and lets the write go");
        assert!(!degraded(&b), "b received the write");
        assert!(degraded(&c));
        assert_eq!(c.snapshot().sync_loss_at, Some(5), "at c's durable ack");
    }

    /// `ANY 1 (a, b)`: with `b` gone (its ack stale, not degraded) writes go at `a`'s
    /// pace and `b` is never timed out; once neither holds a write, the timeout
    /// degrades both and the write goes on. `FIRST 1 (b, a)`: `b` is waited for
    /// until the timeout degrades it, then `a` (which holds the write) suffices.
    #[tokio::test]
    async fn a_sync_policy_acknowledges_once_it_is_met() {
        let within = |f| tokio::time::timeout(Duration::from_secs(5), f);
        let (a, b) = (
            target("a", ReplicationMode::Sync, 0),
            target("b", ReplicationMode::Sync, 0),
        );
        let any = SyncGate::with_policy(
            vec![a.clone(), b.clone()],
            Duration::from_secs(3600),
            None,
            Some(SyncPolicy::parse("ANY 1 (a, b)").unwrap()),
        );
        a.streaming_at(5);
        any.recompute();
        within(any.wait(5)).await.expect("a holds 5: enough");
        assert!(!degraded(&a) && !degraded(&b), "no timeout, no loss");
        let (a, b) = (
            target("a", ReplicationMode::Sync, 0),
            target("b", ReplicationMode::Sync, 0),
        );
        let any = SyncGate::with_policy(
            vec![a.clone(), b.clone()],
            Duration::from_millis(50),
            None,
            Some(SyncPolicy::parse("ANY 1 (a, b)").unwrap()),
        );
        a.streaming_at(5);
        any.recompute();
        within(any.wait(6))
            .await
            .expect("the timeout degrades both");
        assert!(degraded(&a) && degraded(&b));
        let (a, b) = (
            target("a", ReplicationMode::Sync, 0),
            target("b", ReplicationMode::Sync, 0),
        );
        let first = SyncGate::with_policy(
            vec![a.clone(), b.clone()],
            Duration::from_millis(50),
            None,
            Some(SyncPolicy::parse("FIRST 1 (b, a)").unwrap()),
        );
        assert_eq!(
            first.policy().map(|p| p.to_string()).as_deref(),
            Some("FIRST 1 (b, a)")
        );
        a.streaming_at(5);
        first.recompute();
        within(first.wait(5)).await.expect("b degraded, a holds 5");
        assert!(degraded(&b) && !degraded(&a), "a had it: not degraded");
        // The primary's own name in the list (a policy shared by every member's
        // config): no target has it, and the listed targets meet the policy.
        let a = target("a", ReplicationMode::Sync, 0);
        let own = SyncGate::with_policy(
            vec![a.clone()],
            Duration::from_secs(3600),
            None,
            Some(SyncPolicy::parse("ANY 1 (primary, a)").unwrap()),
        );
        a.streaming_at(5);
        own.recompute();
        within(own.wait(5)).await.expect("a holds 5: enough");
        assert!(!degraded(&a));
    }

    /// A session that ends with a handover in flight fails the switchover at once
    /// (its answer is dropped), and its unfinished resync goes back to bitmap mode.
    #[test]
    fn a_session_end_fails_the_handover_and_reverts_the_resync() {
        let t = target("a", ReplicationMode::Sync, 0);
        t.streaming_at(11);
        let mut rx = t.request_handover(11).unwrap();
        t.session_ended(Some("connection lost".into()));
        assert!(rx.try_recv().is_err(), "the answer is dropped");
        assert_eq!(t.handover_to_send(), None);
        let snap = t.snapshot();
        assert_eq!(snap.phase.as_str(), "disconnected");
        assert_eq!(snap.last_error.as_deref(), Some("connection lost"));
        // In bitmap mode, a resync session ends before its copy completed.
        t.update(|lc| {
            lc.begin_overflow_switch();
            lc.bitmap_entered(20);
            lc.connecting();
            lc.session_started(&plan(11, true), 11, 20);
            lc.resync_begin(11, 20).unwrap();
        });
        assert_eq!(tracking(&t), "resyncing");
        t.session_ended(None);
        assert_eq!(tracking(&t), "bitmap");
        assert_eq!(
            t.snapshot().last_error,
            None,
            "cleared when the session started"
        );
    }

    /// A handover is asked of a streaming session only, one at a time; once
    /// abandoned, nothing waits for its answer.
    #[test]
    fn a_handover_request_reaches_a_streaming_session_once() {
        let t = target("a", ReplicationMode::Sync, 0);
        let err = t.request_handover(9).unwrap_err().to_string();
        assert!(err.contains("is connecting, not streaming"), "{err}");
        t.streaming_at(11);
        let mut rx = t.request_handover(9).unwrap();
        let err = t.request_handover(10).unwrap_err().to_string();
        assert!(err.contains("already in progress"), "{err}");
        assert_eq!(t.handover_to_send(), Some(9));
        t.on_handover_ack(9, 4).unwrap();
        assert_eq!(rx.try_recv().unwrap().unwrap(), 4);
        // A handover completes once per lifecycle (the node restarts as a standby):
        // the abandoned one is asked of a new target.
        let t = target("a", ReplicationMode::Sync, 0);
        t.streaming_at(11);
        let mut rx = t.request_handover(11).unwrap();
        assert!(t.abandon_handover());
        assert!(!t.abandon_handover());
        assert!(rx.try_recv().is_err(), "the sender is gone");
        assert_eq!(t.handover_to_send(), None);
    }
}
