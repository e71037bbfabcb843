//! Per-target state on a primary: [`TargetState`] (what status shows, shared between
//! a shipper and the rest), its journal-overflow [`Tracker`] (streaming, bitmap or
//! resyncing; the procedures that move it between modes are in
//! `ship::catchup`) and the [`SyncGate`] that makes client writes wait for
//! live sync targets. They live together because each refers to the others.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_journal::{Journal, Op, Record, Seq};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{oneshot, watch};

use crate::config::{ReplicationMode, TargetConfig};
use crate::ship::dirty::DirtyMap;
use crate::store::base::Base;

/// A bitmap-mode target's maps are flushed at least this often (the monitor may flush
/// sooner under journal pressure).
const FLUSH_EVERY: Duration = Duration::from_secs(1);

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
    pub(crate) handover: Mutex<Option<(Seq, oneshot::Sender<anyhow::Result<u64>>)>>,
    pub(crate) handover_kick: tokio::sync::Notify,
    /// Verify answers awaited from this target, by (verify id, volume id).
    pub(crate) verify_waiters: Mutex<VerifyWaiters>,
    /// Journal overflow: streaming, bitmap or resyncing ([`Tracker`]).
    pub track: Tracker,
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

    pub(crate) fn new(t: &TargetConfig, acked: Seq) -> TargetState {
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

    pub(crate) fn set_state(&self, s: &'static str) {
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

/// How a target is tracked.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Streaming = 0,
    /// Becoming bitmap: maps being created and filled from the journal. Still holds
    /// the floor at its ack.
    Switching = 1,
    Bitmap = 2,
    Resyncing = 3,
}

impl Mode {
    pub(crate) fn from_u8(v: u8) -> Mode {
        match v {
            1 => Mode::Switching,
            2 => Mode::Bitmap,
            3 => Mode::Resyncing,
            _ => Mode::Streaming,
        }
    }

    /// The name in status and metrics (`switching` shows as `streaming`: nothing
    /// changed for the target yet).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Streaming | Mode::Switching => "streaming",
            Mode::Bitmap => "bitmap",
            Mode::Resyncing => "resyncing",
        }
    }
}

/// The values of [`Mode::as_str`], for metrics.
pub const MODES: [&str; 3] = ["streaming", "bitmap", "resyncing"];

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

/// Per-target overflow state (a field of [`TargetState`]).
#[derive(Default)]
pub struct Tracker {
    pub(crate) mode: AtomicU8,
    /// Every record up to it is durably marked in the maps (bitmap/resyncing floor).
    pub(crate) flushed_through: AtomicU64,
    /// Resyncing: the copy's snapshot (the stream goes on after it).
    pub(crate) hold: AtomicU64,
    /// Bytes the dirty regions cover (updated at each flush and resync start).
    pub dirty_bytes: AtomicU64,
    /// Bytes shipped by resyncs since this primary started (data and zero extents).
    pub resync_bytes: AtomicU64,
    /// Bytes shipped as data by resyncs since this primary started.
    pub resync_data_bytes: AtomicU64,
    /// Ends the target's streaming session when it switches to bitmap mode.
    pub(crate) kick: tokio::sync::Notify,
    /// The monitor abandons the current resync (the journal filled during it).
    pub(crate) abort: AtomicBool,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) live: Mutex<Live>,
    pub(crate) shared: OnceLock<Arc<Shared>>,
    pub(crate) flush_failing: AtomicBool,
}

#[derive(Default)]
pub(crate) struct Inner {
    /// (volume id, map), in the order of the bases.
    pub(crate) maps: Vec<(u32, DirtyMap)>,
    /// The target's durable ack when bitmap mode began.
    pub(crate) base_seq: Seq,
    /// The current resync's end point, once ResyncEnd was sent.
    pub(crate) through: Option<Seq>,
    /// Recovery points the target never gets: after `.0` up to `.1` (None: not known
    /// yet). The current transition, or the last completed one.
    pub(crate) lost: Option<(Seq, Option<Seq>)>,
    pub(crate) last_flush: Option<Instant>,
    /// Not before this instant (a failed switch backs off).
    pub(crate) retry_switch: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct Live {
    pub(crate) active: bool,
    pub(crate) bits: Vec<(u32, RegionBits)>,
    /// Every durable record up to it has been marked (live or in the maps).
    pub(crate) marked_through: Seq,
}

impl Tracker {
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    pub(crate) fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::Release);
    }

    /// Streaming → switching, for exactly one caller (the monitor and a session may
    /// both want to switch a target).
    pub(crate) fn begin_switch(&self) -> bool {
        self.mode
            .compare_exchange(
                Mode::Streaming as u8,
                Mode::Switching as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The journal position this target needs kept, given its durable ack.
    pub fn floor(&self, acked: Seq) -> Seq {
        match self.mode() {
            Mode::Streaming | Mode::Switching => acked,
            Mode::Bitmap => self.flushed_through.load(Ordering::Acquire),
            Mode::Resyncing => self
                .flushed_through
                .load(Ordering::Acquire)
                .min(self.hold.load(Ordering::Acquire).max(acked)),
        }
    }

    /// The monitor abandoned the resync in progress (its session must end).
    pub fn resync_abandoned(&self) -> bool {
        self.mode() == Mode::Resyncing && self.abort.load(Ordering::Acquire)
    }

    /// Whether the target's next session must resync from the bitmap.
    pub fn needs_resync(&self) -> bool {
        matches!(self.mode(), Mode::Bitmap | Mode::Resyncing)
    }

    /// Resolves when the target is switched to bitmap mode (its streaming session
    /// must end: the journal records it would read are being released).
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

    /// Makes the marks durable (bitmap and resyncing modes). `force`: even if the
    /// last flush was recent. On failure the marks stay in memory and the floor stays
    /// where it was: the journal is held, nothing is lost.
    pub(crate) fn flush(&self, name: &str, force: bool) {
        let mut inner = self.inner.lock();
        if !matches!(self.mode(), Mode::Bitmap | Mode::Resyncing) {
            return;
        }
        if !force && inner.last_flush.is_some_and(|t| t.elapsed() < FLUSH_EVERY) {
            return;
        }
        let res = (|| -> anyhow::Result<Seq> {
            let through = self.merge(&mut inner)?;
            let base = inner.base_seq;
            for (_, map) in inner.maps.iter_mut() {
                map.set_seqs(base, through);
                map.flush()?;
            }
            Ok(through)
        })();
        inner.last_flush = Some(Instant::now());
        match res {
            Ok(through) => {
                self.flushed_through.store(through, Ordering::Release);
                self.count_dirty(&inner);
                if self.flush_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(target = %name, through, "dirty map flushed again");
                }
            }
            Err(e) => {
                if !self.flush_failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        target = %name,
                        "flushing the dirty map failed: {}; the journal is held at sequence {} \
                         for this target until a flush succeeds (writes may wait for journal \
                         space; nothing is lost)",
                        crate::error_chain(&e),
                        self.flushed_through.load(Ordering::Acquire)
                    );
                }
            }
        }
    }

    /// Status fields of the target.
    pub fn status(&self) -> serde_json::Value {
        let lost = self.inner.lock().lost;
        json!({
            "tracking": self.mode().as_str(),
            "dirty_bytes": self.dirty_bytes.load(Ordering::Relaxed),
            "resync_bytes": self.resync_bytes.load(Ordering::Relaxed),
            "resync_data_bytes": self.resync_data_bytes.load(Ordering::Relaxed),
            "points_lost": lost.map(|(after, until)| json!({
                "after_seq": after,
                "through_seq": until,
            })),
        })
    }
}
