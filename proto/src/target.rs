//! One replication target's lifecycle on the primary, as a pure state machine.
//!
//! ferryd once spread a target's life over five fields written by three threads
//! (`TargetState.state`, `TargetState.degraded`, the pending `handover`, and the
//! overflow `Tracker`'s `mode` and `abort`), with the decisions in async IO code no
//! deterministic test reached. [`TargetLifecycle`] owns all of it. It does no IO,
//! reads no clock and starts no thread: the daemon holds one per target, under one
//! lock (ferryd `ship::target::TargetState`, its only owner), calls an event method
//! where something happened (a session connected, an ack arrived, the journal filled,
//! a switchover was asked for), and carries out the decision the method returns
//! (stream after a position, run a resync copy, create the dirty maps, end the
//! session, answer the switchover). Status, metrics, the journal's release floor and
//! the sync gate read it ([`TargetLifecycle::snapshot`] and the accessors). Times are
//! arguments: a monotonic [`Duration`] since any origin. The "Replaces ferryd …"
//! notes on the methods name the daemon code each one took over (names of that time).
//!
//! # State
//!
//! Three dimensions that change independently, each its own enum, plus the handover:
//!
//! * [`TargetPhase`] — the shipper's session (`state` in status and metrics).
//! * [`Tracking`] — how the journal keeps the target's records (`tracking`): it holds
//!   them (streaming), or a dirty-region bitmap replaces them (bitmap), or the bitmap's
//!   regions are being copied (resyncing). A target stays in bitmap mode while it is
//!   disconnected, so this is not a phase of the session.
//! * `degraded` — client writes no longer wait for the target until it has caught up;
//!   with the configured [`SyncMode`] it gives the [`EffectiveMode`] (`effective_mode`).
//! * The planned handover ([`TargetPhase::HandingOver`]), at most once per lifecycle.
//!
//! # Session phase
//!
//! | from              | event                                  | to                 | decision                               |
//! |-------------------|----------------------------------------|--------------------|----------------------------------------|
//! | any but Stopped   | [`connecting`]                         | Connecting         | dial                                   |
//! | Connecting        | [`plan_hello`] (`&self`)               | —                  | [`HelloPlan`] or a refusal (table below) |
//! | Connecting        | [`session_started`], plan streams      | Streaming          | [`SessionStart::Stream`]               |
//! | Connecting        | [`session_started`], plan resyncs      | Resyncing          | [`SessionStart::Resync`]               |
//! | Resyncing         | [`resync_copied`]                      | Streaming          | stream after the snapshot              |
//! | Streaming         | [`request_handover`], acked ≥ seq      | HandingOver        | [`SendHandover`]                       |
//! | HandingOver       | [`on_handover_ack`], same seq          | Streaming, handed over (for good) | [`HandedOver`]: answer, end session |
//! | HandingOver       | [`on_handover_ack`] other seq, [`on_peer_error`] | Streaming | the handover fails, the session ends |
//! | any               | [`on_peer_error_code`] `ResyncRequired` | —                 | the next session resyncs in full       |
//! | HandingOver       | [`abandon_handover`] (switchover timed out) | Streaming        | a late HandoverAck is unexpected       |
//! | any session phase | [`session_ended`]                      | Disconnected       | revert an unfinished resync; fail a pending handover |
//! | any               | [`stopped`]                            | Stopped            |                                        |
//!
//! # Where a session resumes ([`plan_hello`])
//!
//! | # | failback: fork known, target not rejoined, resume > fork | tracking            | resume                                     | decision                          |
//! |---|------------------------------------------------------------|---------------------|--------------------------------------------|-----------------------------------|
//! | 1 | yes                                                        | any                 | > primary durable                          | refuse `ForkDiverged`             |
//! | 2 | yes                                                        | any                 | ≤ primary durable                          | resync, full ([`FullReason::Failback`]) |
//! | 3 | no                                                         | bitmap / resyncing  | > primary durable                          | refuse `Diverged`                 |
//! | 4 | no                                                         | bitmap / resyncing  | ≤ primary durable                          | resync from the maps              |
//! | 5 | no                                                         | streaming/switching | > primary durable                          | refuse `Diverged`                 |
//! | 6 | no                                                         | streaming/switching | < durable, and resume + 1 released         | resync, full ([`FullReason::JournalReleased`]) |
//! | 7 | no                                                         | streaming/switching | otherwise                                  | stream after resume               |
//!
//! Between rows 2 and 3: on a primary promoted with rollback, whose journal kept the
//! undone records after the fork up to its cut ([`ForkView::cut`]), a target below the
//! cut (at or below the fork, or rejoined and inside the discarded range) resyncs in
//! full ([`FullReason::ForkCut`]): streaming would ship the discarded records (issue
//! 16 path 4). The digest comparison copies only what differs.
//!
//! Before rows 3–7: a target whose standby refused a write-set with `ResyncRequired`
//! ([`on_peer_error_code`]: a record outside its volumes) resyncs in full
//! ([`FullReason::StandbyRequired`]), or is refused `Diverged` if it is past the
//! primary; streaming the same records again would only meet the same refusal. The
//! request is forgotten once such a session started (its full switch is durable, so
//! the maps carry it from then on).
//!
//! A full resync first switches a streaming target to bitmap mode with every region
//! dirty, or marks every region in the maps of a target already in bitmap mode
//! ([`begin_full_switch`]; the latter is new, see there); the digest comparison at the
//! start of the copy (ferryd) then skips the regions the target already holds. Every
//! accepted plan on a primary by promotion records the target as rejoined, after that
//! marking is durable.
//!
//! # Tracking
//!
//! | from                | event                                              | to                   | effect                                   |
//! |---------------------|----------------------------------------------------|----------------------|------------------------------------------|
//! | Streaming           | [`begin_overflow_switch`] (journal ≥ 75 %, it holds it) | Switching (overflow) | create maps, mark the journal after acked |
//! | Streaming           | [`begin_full_switch`] (plan rows 2, 6)             | Switching (full)     | create maps, every region dirty          |
//! | Bitmap              | [`begin_full_switch`] (plan row 2)                 | Bitmap               | mark every region in the maps            |
//! | Switching           | [`begin_full_switch`]                              | Switching            | refused: the session ends, retries       |
//! | Switching           | [`bitmap_entered`]                                 | Bitmap               | degraded; overflow: end the session      |
//! | Switching           | [`switch_failed`]                                  | Streaming            | overflow: not retried for 5 s            |
//! | (start-up)          | [`reopened_in_bitmap`]                             | Bitmap               | degraded                                 |
//! | Bitmap / Resyncing  | [`resync_begin`], primary applied ≥ from           | Resyncing            | snapshot = applied; all dirty if from < base |
//! | Resyncing           | [`resync_copied`]                                  | Resyncing (through)  | stream after the snapshot                |
//! | Resyncing (through) | [`on_ack`] ≥ through                               | Streaming            | delete the maps                          |
//! | Resyncing           | [`abandon_resync`] (journal ≥ 75 %, floor < checkpoint) | Resyncing (abandoned) | end the session                    |
//! | Resyncing           | [`session_ended`]                                  | Bitmap               | the resync runs again next session       |
//!
//! The journal keeps what [`TargetLifecycle::floor`] says: the ack while streaming or
//! switching, the durably marked position in bitmap mode, and while resyncing the
//! lower of that and the snapshot (or the ack, once past it).
//!
//! # Degraded
//!
//! | from          | event                                                         | to           |
//! |---------------|---------------------------------------------------------------|--------------|
//! | sync, live    | [`sync_timeout`] for a write past its ack                     | degraded     |
//! | any           | [`bitmap_entered`], [`reopened_in_bitmap`]                    | degraded     |
//! | (start-up)    | [`TargetLifecycle::new`] after a failover, not rejoined       | degraded     |
//! | degraded      | [`on_ack`] covering the primary's durable position at the previous ack of the session (or at its start) | live |
//!
//! # Sync loss (`on_sync_loss`)
//!
//! A sync target degraded by a timeout has lost writes the primary acknowledged
//! without it; its standby must know before anyone promotes it.
//!
//! | policy  | event                                    | effect                                                        |
//! |---------|------------------------------------------|---------------------------------------------------------------|
//! | degrade | [`sync_timeout`] for a write past its ack | degraded; no record yet: writes still wait at its ack        |
//! | any     | degraded otherwise (bitmap mode, away since a failover) | the same: a record is due ([`sync_loss_to_record`])  |
//! | degrade | [`sync_loss_recorded`] (durable in meta)  | writes go on without it; heartbeats tell the standby the seq |
//! | degrade | [`on_ack`] caught up, then [`sync_resumed`] at the primary's durable position | clears once an ack covers that position ([`AckOutcome::sync_loss_cleared`]) |
//! | any     | [`restore_sync_loss`] (start-up found the record) | degraded, recorded                                  |
//! | block   | [`sync_timeout`] for a write past its ack | not degraded: the write keeps waiting, status `writes_blocked` until an ack covers it |
//!
//! # Sync policy (`replication.sync`)
//!
//! Which targets' positions acknowledge a write: every sync target (no policy), or
//! `ANY k` / `FIRST k` of a listed set ([`SyncQuorum`], [`quorum_gate_position`],
//! whose docs say why no acknowledged write is held by fewer than `k` of them without
//! a recorded sync loss). The lifecycle above is the same for each listed target.
//!
//! # Two gate positions (protocol B)
//!
//! A target keeps two positions for the gate: its durable ack
//! ([`TargetLifecycle::sync_position`]: FLUSH, FUA and writethrough writes wait for it)
//! and its received position ([`TargetLifecycle::sync_received_position`], moved by
//! [`on_received`]: a writeback write's reply waits for it), with received ≥ durable
//! always. Both are offered under the same condition (a sync target not degraded, or
//! degraded without its loss recorded), so the policy above applies to each alike.
//! Everything else stays keyed on durable acks: the timeout degrades a target only for
//! a write it has not received ([`sync_received_timeout`]) but records its loss at its
//! durable ack (the standby may lose what it only received), and catching up, the
//! loss's clearing and the journal's floor read the durable ack.
//!
//! [`connecting`]: TargetLifecycle::connecting
//! [`plan_hello`]: TargetLifecycle::plan_hello
//! [`session_started`]: TargetLifecycle::session_started
//! [`resync_copied`]: TargetLifecycle::resync_copied
//! [`request_handover`]: TargetLifecycle::request_handover
//! [`on_handover_ack`]: TargetLifecycle::on_handover_ack
//! [`on_peer_error`]: TargetLifecycle::on_peer_error
//! [`on_peer_error_code`]: TargetLifecycle::on_peer_error_code
//! [`abandon_handover`]: TargetLifecycle::abandon_handover
//! [`session_ended`]: TargetLifecycle::session_ended
//! [`stopped`]: TargetLifecycle::stopped
//! [`begin_full_switch`]: TargetLifecycle::begin_full_switch
//! [`begin_overflow_switch`]: TargetLifecycle::begin_overflow_switch
//! [`bitmap_entered`]: TargetLifecycle::bitmap_entered
//! [`switch_failed`]: TargetLifecycle::switch_failed
//! [`reopened_in_bitmap`]: TargetLifecycle::reopened_in_bitmap
//! [`resync_begin`]: TargetLifecycle::resync_begin
//! [`on_ack`]: TargetLifecycle::on_ack
//! [`abandon_resync`]: TargetLifecycle::abandon_resync
//! [`sync_timeout`]: TargetLifecycle::sync_timeout
//! [`sync_loss_recorded`]: TargetLifecycle::sync_loss_recorded
//! [`sync_loss_to_record`]: TargetLifecycle::sync_loss_to_record
//! [`sync_resumed`]: TargetLifecycle::sync_resumed
//! [`restore_sync_loss`]: TargetLifecycle::restore_sync_loss
//! [`on_received`]: TargetLifecycle::on_received
//! [`sync_received_timeout`]: TargetLifecycle::sync_received_timeout

use std::time::Duration;

use thiserror::Error;

use crate::session::{plan_resume, plan_resync, HandshakeError, Negotiated};
use crate::wire::{Epoch, ErrorCode, HelloAck, Seq};

/// Journal fill (percent of its capacity) at which the streaming target holding the
/// journal is switched to bitmap mode, and a resync holding it is abandoned.
pub const SWITCH_PERCENT: u64 = 75;
/// Journal fill (percent) above which the dirty maps are flushed on every monitor
/// round, so the journal behind them is released promptly.
pub const PRESSURE_PERCENT: u64 = 50;
/// After a failed switch to bitmap mode, the target is not tried again for this long.
pub const SWITCH_RETRY: Duration = Duration::from_secs(5);

/// What a sync target's missed timeout does (`on_sync_loss` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncLossPolicy {
    /// It is degraded (writes go on without it), after the loss is recorded durably.
    #[default]
    Degrade,
    /// Writes keep waiting for it (status shows them blocked).
    Block,
}

/// The configured replication mode of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Client writes wait until the target holds them durably (unless degraded).
    Sync,
    Async,
}

/// The shipper's session with the target (`state` in status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPhase {
    /// Dialing and handshaking (also the initial phase).
    Connecting,
    /// Copying the dirty regions (bitmap resync), before streaming.
    Resyncing,
    /// Shipping write-sets.
    Streaming,
    /// Handover sent at `seq`: waiting for the standby's HandoverAck.
    HandingOver { seq: Seq },
    /// The session ended; the shipper waits out its backoff.
    Disconnected,
    /// The daemon is shutting down.
    Stopped,
}

impl TargetPhase {
    /// The name in status and metrics. A handover in flight shows as `streaming`
    /// (the session streams until the standby answers), as it always did.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetPhase::Connecting => "connecting",
            TargetPhase::Resyncing => "resyncing",
            TargetPhase::Streaming | TargetPhase::HandingOver { .. } => "streaming",
            TargetPhase::Disconnected => "disconnected",
            TargetPhase::Stopped => "stopped",
        }
    }

    fn in_session(self) -> bool {
        matches!(
            self,
            TargetPhase::Resyncing | TargetPhase::Streaming | TargetPhase::HandingOver { .. }
        )
    }
}

/// Every value of [`TargetPhase::as_str`], for metrics.
pub const PHASE_NAMES: [&str; 5] = [
    "connecting",
    "streaming",
    "resyncing",
    "disconnected",
    "stopped",
];

/// Why a target is being switched to bitmap mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchKind {
    /// The journal filled while the target held it: mark the journal's records after
    /// its ack; its streaming session must end.
    Overflow,
    /// Its next session needs a full resync ([`FullReason`]): every region dirty.
    Full,
}

/// How the journal tracks the target (`tracking` in status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// The journal keeps every record after its ack.
    Streaming,
    /// Becoming bitmap (maps being created and filled): still holds the journal at its
    /// ack. `base`: the position the maps start after.
    Switching { base: Seq, kind: SwitchKind },
    /// Its writes are marked in dirty maps starting after `base`; every record up to
    /// `flushed_through` is durably marked.
    Bitmap { base: Seq, flushed_through: Seq },
    /// A session copies the dirty regions as of `snapshot`; `through` is the copy's end
    /// point once ResyncEnd went out; `abandoned` once the journal filled during it.
    Resyncing {
        base: Seq,
        flushed_through: Seq,
        snapshot: Seq,
        through: Option<Seq>,
        abandoned: bool,
    },
}

impl Tracking {
    /// The name in status and metrics (`switching` shows as `streaming`: nothing
    /// changed for the target yet).
    pub fn as_str(&self) -> &'static str {
        match self {
            Tracking::Streaming | Tracking::Switching { .. } => "streaming",
            Tracking::Bitmap { .. } => "bitmap",
            Tracking::Resyncing { .. } => "resyncing",
        }
    }

    /// Whether the next session must resync from the maps.
    pub fn needs_resync(&self) -> bool {
        matches!(self, Tracking::Bitmap { .. } | Tracking::Resyncing { .. })
    }
}

/// Every value of [`Tracking::as_str`], for metrics.
pub const TRACKING_NAMES: [&str; 3] = ["streaming", "bitmap", "resyncing"];

/// Whether client writes wait for the target. The one definition: ferry-api's
/// status uses it too (and writes its JSON form, [`EffectiveMode::status_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectiveMode {
    Sync,
    Async,
    /// Degraded: a sync target that missed its timeout, or any target in bitmap mode
    /// or away since a failover, until it has caught up.
    Degraded,
}

impl EffectiveMode {
    /// `effective_mode` in status.
    pub const fn status_str(self) -> &'static str {
        match self {
            EffectiveMode::Sync => "sync",
            EffectiveMode::Async => "async",
            EffectiveMode::Degraded => "async (degraded)",
        }
    }

    /// The `mode` label of `ferry_replication_target_mode`.
    pub const fn metric_str(self) -> &'static str {
        match self {
            EffectiveMode::Sync => "sync",
            EffectiveMode::Async => "async",
            EffectiveMode::Degraded => "degraded",
        }
    }
}

/// Recovery points the target never gets: after `after` up to `through` (`None`: not
/// known yet). The current transition to bitmap mode, or the last completed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostPoints {
    pub after: Seq,
    pub through: Option<Seq>,
}

/// A completed handover: the standby took over at `seq` with `new_epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    pub seq: Seq,
    pub new_epoch: Epoch,
}

/// The primary's journal as a handshake sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalView {
    /// Oldest record still held.
    pub first_available: Seq,
    /// Last durable record.
    pub durable: Seq,
}

/// On a primary by promotion: where the histories forked, and whether this target has
/// had a session since (it then holds nothing of the old epoch past the fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkView {
    pub seq: Seq,
    pub rejoined: bool,
    /// The cut (`>= seq`): the last sequence of the old epoch this primary's journal
    /// held at the promotion. Records `seq + 1 ..= cut` were undone by the rollback
    /// the promotion made: no part of this history, never shipped; this history's
    /// next record after the fork is `cut + 1`. `cut == seq`: nothing was discarded.
    pub cut: Seq,
}

/// Everything [`TargetLifecycle::plan_hello`] decides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloInput {
    pub negotiated: Negotiated,
    /// This primary's epoch.
    pub epoch: Epoch,
    /// The standby's Hello: it holds every record up to it durably.
    pub peer_resume: Seq,
    pub journal: JournalView,
    pub fork: Option<ForkView>,
}

/// Why a session's resync must start from every region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// The journal released what the target needs (while it was away).
    JournalReleased,
    /// It wrote past the fork at `fork` and never rejoined: it holds writes of the
    /// old epoch this history does not have.
    Failback { fork: Seq },
    /// The standby refused a write-set with `ResyncRequired` (a record outside its
    /// volumes): its copy cannot take the stream, only a copy compared by digest.
    StandbyRequired,
    /// Streaming to it would cross the cut of a promotion with rollback (records
    /// `fork + 1 ..= cut` were discarded and are never shipped): it resumes at or
    /// below the fork, or (rejoined) inside the discarded range.
    ForkCut { fork: Seq, cut: Seq },
}

/// What a session does once its handshake completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStart {
    Stream,
    Resync { full: Option<FullReason> },
}

/// The accepted handshake: the HelloAck to send and what follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloPlan {
    pub ack: HelloAck,
    pub start: PlanStart,
    /// Persist that the target rejoined after the fork (on a primary by promotion).
    pub record_rejoined: bool,
}

/// The decision of [`TargetLifecycle::session_started`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStart {
    /// Ship write-sets after `after` (the standby holds every record up to it).
    Stream { after: Seq },
    /// Copy the dirty regions first ([`TargetLifecycle::resync_begin`] with `from`).
    Resync { from: Seq },
}

/// Create the target's dirty maps (the decision of a `begin_*_switch`), then call
/// [`TargetLifecycle::bitmap_entered`] or [`TargetLifecycle::switch_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchToBitmap {
    /// The maps start after it (the records after it are marked).
    pub base: Seq,
    pub kind: SwitchKind,
}

impl SwitchToBitmap {
    /// Every region is dirty (no journal records to mark).
    pub fn all_dirty(&self) -> bool {
        self.kind == SwitchKind::Full
    }
}

/// The decision of [`TargetLifecycle::begin_full_switch`]: done (and durable) before
/// the rejoin after a failover is recorded, so a crash cannot lose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullSwitch {
    /// Create the maps with every region dirty, then call
    /// [`TargetLifecycle::bitmap_entered`] or [`TargetLifecycle::switch_failed`].
    Create(SwitchToBitmap),
    /// The target is already tracked in maps: mark every region dirty in them and
    /// flush them (a failure ends the session; the next one plans the same again).
    MarkAll,
}

/// A full resync found the target's maps being created by an overflow switch: the
/// session ends and the next one plans again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("the target is being switched to bitmap mode; the resync starts on the next connection")]
pub struct SwitchInProgress;

/// The decision of [`TargetLifecycle::bitmap_entered`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapEntered {
    /// The target's streaming session must end (its records are being released).
    pub end_session: bool,
}

/// The decision of [`TargetLifecycle::resync_begin`]: send ResyncBegin, copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncStart {
    pub from: Seq,
    /// The stream continues after it.
    pub snapshot: Seq,
    /// The standby resumes before the maps start (restored from an older copy?): mark
    /// every region dirty first.
    pub mark_all: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResyncRefused {
    /// The copy's snapshot must cover what the standby holds: retry once the primary
    /// has applied `from` (records are shipped once durable, applied a moment later).
    #[error("the primary has applied {applied}, not yet the standby's position {from}")]
    NotApplied { from: Seq, applied: Seq },
    #[error("target is not in bitmap mode")]
    NotInBitmap,
}

/// The decision of [`TargetLifecycle::on_ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckOutcome {
    /// The target holds the resync's end point: delete its maps, it streams again.
    pub resync_complete: bool,
    /// A degraded target caught up: writes wait for it again (if it is sync). Call
    /// [`TargetLifecycle::sync_resumed`] after the sync gate's recompute.
    pub caught_up: bool,
    /// The target holds every write acknowledged without it: delete the durable
    /// sync-loss record.
    pub sync_loss_cleared: bool,
}

/// Why the session must end now ([`TargetLifecycle::must_end_session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    SwitchedToBitmap,
    ResyncAbandoned,
}

/// The decision of [`TargetLifecycle::session_ended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionEnd {
    /// A resync that had not completed went back to bitmap mode (runs again).
    pub resync_interrupted: bool,
    /// A handover was in flight: it failed (the switchover is abandoned).
    pub handover_failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandoverRefused {
    #[error("standby '{name}' is {state}, not streaming: it cannot take over losslessly")]
    NotStreaming { name: String, state: &'static str },
    #[error("a handover to standby '{name}' at {seq} is already in progress")]
    InProgress { name: String, seq: Seq },
    #[error("standby '{name}' holds {acked}, not yet {seq}")]
    NotCaughtUp { name: String, seq: Seq, acked: Seq },
    #[error("standby '{name}' already took over at {seq} (epoch {new_epoch})")]
    AlreadyHandedOver {
        name: String,
        seq: Seq,
        new_epoch: Epoch,
    },
}

/// The decision of [`TargetLifecycle::request_handover`]: send Handover at `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendHandover {
    pub seq: Seq,
}

/// The decision of [`TargetLifecycle::on_peer_error_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerError {
    /// A handover was pending: the standby refused it.
    pub handover_failed: bool,
    /// The standby asked for a resync just now: the next session resyncs in full
    /// (log it loudly; repeats of the request return false).
    pub full_resync_planned: bool,
}

/// A HandoverAck that answers no pending handover: a protocol violation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unexpected HandoverAck at {seq} (epoch {new_epoch})")]
pub struct UnexpectedHandoverAck {
    pub seq: Seq,
    pub new_epoch: Epoch,
    /// A handover was pending (at another seq): it failed.
    pub handover_failed: bool,
}

/// Plain-data view of a target for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    pub name: String,
    pub mode: SyncMode,
    pub phase: TargetPhase,
    pub tracking: Tracking,
    pub effective_mode: EffectiveMode,
    pub acked_seq: Seq,
    pub applied_seq: Seq,
    /// The journal position it needs kept.
    pub floor: Seq,
    pub points_lost: Option<LostPoints>,
    pub handed_over: Option<HandedOver>,
    pub last_error: Option<String>,
    /// The durable record: writes after this sequence were acknowledged without the
    /// target (a sync target degraded there), until it has caught up past them.
    pub sync_loss_at: Option<Seq>,
    /// `on_sync_loss = "block"`: client writes are waiting for it past the timeout.
    pub writes_blocked: bool,
}

/// One replication target's lifecycle on the primary; see the module docs.
#[derive(Debug, Clone)]
pub struct TargetLifecycle {
    name: String,
    mode: SyncMode,
    phase: TargetPhase,
    tracking: Tracking,
    degraded: bool,
    /// Highest sequence the standby holds durably / has applied.
    acked: Seq,
    applied: Seq,
    /// Highest sequence the standby said it received (V4 received acks: checked and
    /// queued for its journal, in its memory); read as at least `acked`.
    received: Seq,
    /// The primary's durable position at the previous ack of this session (at its
    /// start before the first): an ack covering it means the target caught up.
    durable_at_last_ack: Seq,
    lost: Option<LostPoints>,
    /// A failed overflow switch: not tried again before this time.
    retry_switch_at: Option<Duration>,
    handed_over: Option<HandedOver>,
    last_error: Option<String>,
    /// The standby refused a write-set with `ResyncRequired`: the next session
    /// resyncs in full ([`FullReason::StandbyRequired`]).
    peer_requires_resync: bool,
    /// Sync loss (see [`SyncLossState`]).
    loss: SyncLossState,
}

/// A sync target's loss of sync, recorded durably before any write past it is
/// acknowledged without the target, and cleared once the target holds every write
/// acknowledged without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SyncLossState {
    policy: SyncLossPolicy,
    /// The durable record (what the daemon persisted and the standby is told). A
    /// degraded sync target without one still holds writes back.
    recorded: Option<Seq>,
    /// Caught up: the record clears once an ack covers this (the primary's durable
    /// position after writes began waiting for the target again).
    clear_at: Option<Seq>,
    /// `Block`: the newest write that timed out waiting for the target.
    blocked: Option<Seq>,
}

impl TargetLifecycle {
    /// A target at start-up. `acked`: where it is assumed to be until its Hello says
    /// (the checkpoint). `away_since_fork`: on a primary by promotion, it has not
    /// rejoined since the fork, so it starts degraded — the first writes must not wait
    /// out a sync timeout for a node known to be away (replaces the loop in
    /// ferryd `daemon.rs` after `target_states`; `TargetState::new`).
    pub fn new(name: impl Into<String>, mode: SyncMode, acked: Seq, away_since_fork: bool) -> Self {
        TargetLifecycle {
            name: name.into(),
            mode,
            phase: TargetPhase::Connecting,
            tracking: Tracking::Streaming,
            degraded: away_since_fork,
            acked,
            applied: acked,
            received: acked,
            durable_at_last_ack: 0,
            lost: None,
            retry_switch_at: None,
            handed_over: None,
            last_error: None,
            peer_requires_resync: false,
            loss: SyncLossState::default(),
        }
    }

    /// Sets what a missed sync timeout does (the target's `on_sync_loss`).
    pub fn with_sync_loss_policy(mut self, policy: SyncLossPolicy) -> Self {
        self.loss.policy = policy;
        self
    }

    /// Start-up found a durable sync-loss record at `at`: writes after it were
    /// acknowledged without the target, so it starts degraded and the record holds
    /// until it has caught up.
    pub fn restore_sync_loss(&mut self, at: Seq) {
        self.loss.recorded = Some(at);
        self.degraded = true;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mode(&self) -> SyncMode {
        self.mode
    }

    pub fn phase(&self) -> TargetPhase {
        self.phase
    }

    pub fn tracking(&self) -> Tracking {
        self.tracking
    }

    pub fn acked(&self) -> Seq {
        self.acked
    }

    pub fn applied(&self) -> Seq {
        self.applied
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded
    }

    pub fn handed_over(&self) -> Option<HandedOver> {
        self.handed_over
    }

    /// sync / async / degraded (replaces ferryd `metrics::effective_mode` and the
    /// `effective_mode` expression in `Replication::status`).
    pub fn effective_mode(&self) -> EffectiveMode {
        match (self.degraded, self.mode) {
            (true, _) => EffectiveMode::Degraded,
            (false, SyncMode::Sync) => EffectiveMode::Sync,
            (false, SyncMode::Async) => EffectiveMode::Async,
        }
    }

    pub fn snapshot(&self) -> TargetStatus {
        TargetStatus {
            name: self.name.clone(),
            mode: self.mode,
            phase: self.phase,
            tracking: self.tracking,
            effective_mode: self.effective_mode(),
            acked_seq: self.acked,
            applied_seq: self.applied,
            floor: self.floor(),
            points_lost: self.lost,
            handed_over: self.handed_over,
            last_error: self.last_error.clone(),
            sync_loss_at: self.loss.recorded,
            writes_blocked: self.loss.blocked.is_some(),
        }
    }

    // -----------------------------------------------------------------------
    // Session

    /// The shipper dials (top of ferryd `run_target`'s loop).
    pub fn connecting(&mut self) {
        if self.phase != TargetPhase::Stopped {
            self.phase = TargetPhase::Connecting;
        }
    }

    /// The daemon shuts down (ferryd `replication::start`).
    pub fn stopped(&mut self) {
        self.phase = TargetPhase::Stopped;
    }

    /// Where the session resumes, from the standby's Hello: the decision table in the
    /// module docs. Pure (`&self`): the handshake may still fail after it; call
    /// [`Self::session_started`] once it completed. Replaces the closure passed to
    /// `quic::primary_handshake` in ferryd `replication::session`.
    pub fn plan_hello(&self, h: &HelloInput) -> Result<HelloPlan, HandshakeError> {
        let resync = |full| {
            let ack = plan_resync(h.negotiated, h.epoch, h.peer_resume, h.journal.durable)?;
            Ok((ack, PlanStart::Resync { full }))
        };
        let (ack, start) = if let Some(fork) = self.failback_fork(h) {
            if h.peer_resume > h.journal.durable {
                return Err(self.fork_diverged(fork, h));
            }
            resync(Some(FullReason::Failback { fork }))?
        } else if let Some((fork, cut)) = self.across_cut(h) {
            resync(Some(FullReason::ForkCut { fork, cut }))?
        } else if self.peer_requires_resync {
            resync(Some(FullReason::StandbyRequired))?
        } else if self.tracking.needs_resync() {
            resync(None)?
        } else {
            match plan_resume(
                h.negotiated,
                h.epoch,
                h.peer_resume,
                h.journal.first_available,
                h.journal.durable,
            ) {
                Ok(ack) => (ack, PlanStart::Stream),
                // The journal lost what it needs (released while it was away): a full
                // resync from the volumes instead of refusing it for good.
                Err(HandshakeError::ResyncRequired { .. }) => {
                    resync(Some(FullReason::JournalReleased))?
                }
                Err(e) => return Err(e),
            }
        };
        Ok(HelloPlan {
            ack,
            start,
            record_rejoined: h.fork.is_some(),
        })
    }

    /// The fork, if the target wrote past it and has not rejoined since: it holds
    /// writes of the old epoch (the previous primary's unreplicated writes).
    fn failback_fork(&self, h: &HelloInput) -> Option<Seq> {
        h.fork
            .filter(|f| !f.rejoined && h.peer_resume > f.seq)
            .map(|f| f.seq)
    }

    /// (fork, cut), if streaming after the target's position would ship a record
    /// the promotion discarded (see [`ForkView::cut`]): the journal's next record
    /// after a position below the cut is one of them, or (at or below the fork) the
    /// stream would reach them. At the cut itself the stream goes on with this
    /// history (a target not rejoined there is a failback, decided before).
    fn across_cut(&self, h: &HelloInput) -> Option<(Seq, Seq)> {
        h.fork
            .filter(|f| f.cut > f.seq && h.peer_resume < f.cut)
            .map(|f| (f.seq, f.cut))
    }

    fn fork_diverged(&self, fork: Seq, h: &HelloInput) -> HandshakeError {
        HandshakeError::ForkDiverged {
            detail: format!(
                "node '{}' holds sequences up to {} (written after the fork at {fork}); \
                 this primary is at {}: it resyncs once this history passes that point",
                self.name, h.peer_resume, h.journal.durable
            ),
            peer_resume: h.peer_resume,
        }
    }

    /// After the handshake, before [`Self::session_started`] (and before the rejoin is
    /// recorded): what a plan with a full resync needs done to the dirty maps first.
    /// `Ok(None)`: nothing (no full resync).
    ///
    /// A streaming target is switched to bitmap mode with every region dirty
    /// ([`FullSwitch::Create`]; replaces ferryd `overflow::switch_full`). A target
    /// already tracked in maps gets every region marked in them
    /// ([`FullSwitch::MarkAll`]): its maps start at the target's old ack and mark only
    /// this history's writes, so without it the regions the old primary wrote past the
    /// fork of a failback would never be copied and stay diverged (found by the
    /// lifecycle simulation, `proto/tests/sim.rs`). While another switch is creating
    /// the maps, the session must end and retry ([`SwitchInProgress`]).
    pub fn begin_full_switch(
        &mut self,
        plan: &HelloPlan,
    ) -> Result<Option<FullSwitch>, SwitchInProgress> {
        if !matches!(plan.start, PlanStart::Resync { full: Some(_) }) {
            return Ok(None);
        }
        match self.tracking {
            Tracking::Streaming => Ok(self
                .begin_switch(plan.ack.resume_seq, SwitchKind::Full)
                .map(FullSwitch::Create)),
            Tracking::Bitmap { .. } | Tracking::Resyncing { .. } => Ok(Some(FullSwitch::MarkAll)),
            Tracking::Switching { .. } => Err(SwitchInProgress),
        }
    }

    /// The handshake completed (and a full switch, if any, entered bitmap mode): the
    /// target holds `plan.ack.resume_seq`. `journal_durable`: the primary's durable
    /// position now (the first "caught up" mark). Replaces the middle of ferryd
    /// `replication::session` (acked/applied stores, `set_state`).
    pub fn session_started(
        &mut self,
        plan: &HelloPlan,
        peer_resume: Seq,
        journal_durable: Seq,
    ) -> SessionStart {
        let resume = plan.ack.resume_seq;
        self.last_error = None;
        // The full switch this plan asked for is durable (the caller ran it first):
        // the maps carry the standby's request from now on.
        if plan.start
            == (PlanStart::Resync {
                full: Some(FullReason::StandbyRequired),
            })
        {
            self.peer_requires_resync = false;
        }
        self.acked = resume;
        self.applied = peer_resume.min(resume);
        // A standby drains what it received before it resumes (or lost it in a crash).
        self.received = resume;
        self.durable_at_last_ack = journal_durable;
        // A switch to bitmap mode since the plan does not change it: the streaming
        // session ends at its first heartbeat check (`must_end_session`) and the next
        // one resyncs, as before.
        if matches!(plan.start, PlanStart::Resync { .. }) {
            self.enter(TargetPhase::Resyncing);
            SessionStart::Resync { from: resume }
        } else {
            self.enter(TargetPhase::Streaming);
            SessionStart::Stream { after: resume }
        }
    }

    /// The session ended (any error, or after a handover). `error`: why, kept for
    /// status. Replaces `t.set_state("disconnected")` in ferryd `run_target`, the
    /// `ResyncGuard` drop (an unfinished resync goes back to bitmap mode: marks are
    /// never cleared during a copy, so it simply runs again) and the pending handover
    /// sender being dropped: a handover in flight fails at once.
    pub fn session_ended(&mut self, error: Option<String>) -> SessionEnd {
        let handover_failed = matches!(self.phase, TargetPhase::HandingOver { .. });
        if self.phase != TargetPhase::Stopped {
            self.phase = TargetPhase::Disconnected;
        }
        if error.is_some() {
            self.last_error = error;
        }
        let resync_interrupted = self.revert_resync();
        SessionEnd {
            resync_interrupted,
            handover_failed,
        }
    }

    fn revert_resync(&mut self) -> bool {
        let Tracking::Resyncing {
            base,
            flushed_through,
            ..
        } = self.tracking
        else {
            return false;
        };
        self.tracking = Tracking::Bitmap {
            base,
            flushed_through,
        };
        true
    }

    /// Checked at every heartbeat tick and on a kick: a streaming session must end
    /// once the target was switched to bitmap mode (its records are being released),
    /// a streaming or copying one once its resync was abandoned. (A resync session
    /// starts in bitmap mode: that is what it is for.) Replaces the checks in ferryd
    /// `replication::session`'s heartbeat arm and `overflow::resync_copy`'s.
    pub fn must_end_session(&self) -> Option<EndReason> {
        let streaming = matches!(
            self.phase,
            TargetPhase::Streaming | TargetPhase::HandingOver { .. }
        );
        match self.tracking {
            Tracking::Bitmap { .. } if streaming => Some(EndReason::SwitchedToBitmap),
            Tracking::Resyncing {
                abandoned: true, ..
            } if self.phase.in_session() => Some(EndReason::ResyncAbandoned),
            _ => None,
        }
    }

    // -----------------------------------------------------------------------
    // Acks and the sync gate

    /// A standby ack: it holds `durable`, has applied `applied`. `journal_durable`:
    /// the primary's durable position now. Ignored during a resync copy (nothing past
    /// `from` is acknowledged then). Replaces the `Frame::Ack` arm of ferryd
    /// `replication::session` and `overflow::resync_done`.
    pub fn on_ack(&mut self, durable: Seq, applied: Seq, journal_durable: Seq) -> AckOutcome {
        if !matches!(
            self.phase,
            TargetPhase::Streaming | TargetPhase::HandingOver { .. }
        ) {
            return AckOutcome::default();
        }
        self.acked = durable;
        self.applied = applied;
        let resync_complete = self.complete_resync_if_done();
        // Caught up = this ack covers everything that was durable when the previous
        // ack arrived (reachable under continuous writes, unlike "equals the head").
        let covers = durable >= self.durable_at_last_ack;
        self.durable_at_last_ack = journal_durable;
        let caught_up = self.degraded && covers;
        if caught_up {
            self.degraded = false;
        }
        if self.loss.blocked.is_some_and(|b| durable >= b) {
            self.loss.blocked = None;
        }
        let sync_loss_cleared =
            self.loss.recorded.is_some() && self.loss.clear_at.is_some_and(|c| durable >= c);
        if sync_loss_cleared {
            self.loss.recorded = None;
            self.loss.clear_at = None;
        }
        AckOutcome {
            resync_complete,
            caught_up,
            sync_loss_cleared,
        }
    }

    /// After a caught-up ack ([`AckOutcome::caught_up`]) and the sync gate's
    /// recompute: `journal_durable` is the primary's durable position read after
    /// writes began waiting for the target again, so it covers every write
    /// acknowledged without it; the record clears once the target holds it — at
    /// once (true: delete the durable record) if its ack already does, as when
    /// writes have stopped and no later ack would come.
    pub fn sync_resumed(&mut self, journal_durable: Seq) -> bool {
        if self.loss.recorded.is_none() || self.degraded {
            return false;
        }
        if self.acked >= journal_durable {
            self.loss.recorded = None;
            self.loss.clear_at = None;
            return true;
        }
        self.loss.clear_at = Some(journal_durable);
        false
    }

    /// The loss to record durably before writes may go on without the target
    /// (then [`Self::sync_loss_recorded`]): `Some(acked)` while a sync target is
    /// degraded (a timeout, bitmap mode, away since a failover) without a record.
    /// Writes after its ack have not been acknowledged yet: they wait for it.
    pub fn sync_loss_to_record(&self) -> Option<Seq> {
        self.loss_unrecorded().then_some(self.acked)
    }

    fn loss_unrecorded(&self) -> bool {
        self.mode == SyncMode::Sync && self.degraded && self.loss.recorded.is_none()
    }

    /// The loss at `at` (a [`Self::sync_loss_to_record`] answer) is durable: writes
    /// stop waiting for the target. A record already standing (an older loss not yet
    /// cleared) is kept: it is the earlier point, so the writes after it are the
    /// ones the target may lack.
    pub fn sync_loss_recorded(&mut self, at: Seq) {
        if self.loss_unrecorded() && at <= self.acked {
            self.loss.recorded = Some(at);
        }
    }

    /// `on_sync_loss = "block"`: client writes wait for it past the timeout.
    pub fn writes_blocked(&self) -> bool {
        self.loss.blocked.is_some()
    }

    /// The durable sync-loss record, as its heartbeats tell the standby.
    pub fn sync_loss(&self) -> Option<Seq> {
        self.loss.recorded
    }

    fn complete_resync_if_done(&mut self) -> bool {
        match self.tracking {
            Tracking::Resyncing {
                through: Some(th), ..
            } if self.acked >= th => {
                self.tracking = Tracking::Streaming;
                true
            }
            _ => false,
        }
    }

    /// What this target contributes to the sync gate: its ack if client writes wait
    /// for it (sync, not degraded). The gate waits for the minimum over targets
    /// ([`sync_gate_position`]). Replaces the filter in ferryd `SyncGate::recompute`.
    ///
    /// A target degraded by a timeout still holds writes back until its loss is
    /// recorded durably ([`Self::sync_loss_recorded`]): a crash must not lose the
    /// record of writes acknowledged without it.
    pub fn sync_position(&self) -> Option<Seq> {
        let waits = !self.degraded || self.loss.recorded.is_none();
        (self.mode == SyncMode::Sync && waits).then_some(self.acked)
    }

    /// A received ack (protocol V4): the standby holds everything through `received`
    /// in memory, queued for its journal. Ignored during a resync copy, as
    /// [`Self::on_ack`]. It moves only the received position: degraded, caught up,
    /// the sync loss and the journal floor stay keyed on durable acks.
    pub fn on_received(&mut self, received: Seq) {
        if matches!(
            self.phase,
            TargetPhase::Streaming | TargetPhase::HandingOver { .. }
        ) {
            self.received = self.received.max(received);
        }
    }

    /// Everything through this is received by the standby (at least its durable ack;
    /// equal to it for a standby that sends no received acks).
    pub fn received(&self) -> Seq {
        self.received.max(self.acked)
    }

    /// What this target contributes to the sync gate's *received* position, the one
    /// a writeback write's reply waits for (DRBD's protocol B: a primary crash alone
    /// loses no acknowledged write, the standby makes durable what it received): its
    /// received position whenever [`Self::sync_position`] holds writes back for it.
    /// FLUSH, FUA and writethrough writes wait for the durable position.
    pub fn sync_received_position(&self) -> Option<Seq> {
        self.sync_position().map(|_| self.received())
    }

    /// A writeback write at `seq` waited `sync_timeout` in vain for the received
    /// position: as [`Self::sync_timeout`], for a target that has not received it (one
    /// that has is not to blame, whatever its durable ack says).
    pub fn sync_received_timeout(&mut self, seq: Seq) -> bool {
        if self.received() >= seq {
            return false;
        }
        self.sync_timeout(seq)
    }

    /// A client write at `seq` waited `sync_timeout` in vain: a live sync target that
    /// does not hold it is degraded (true: it just was — log it loudly, then record
    /// [`Self::sync_loss_to_record`]). With [`SyncLossPolicy::Block`] it is not: the
    /// write keeps waiting and status shows writes blocked. Replaces the timeout arm
    /// of ferryd `SyncGate::wait`.
    pub fn sync_timeout(&mut self, seq: Seq) -> bool {
        if self.mode != SyncMode::Sync || self.degraded || self.acked >= seq {
            return false;
        }
        if self.loss.policy == SyncLossPolicy::Block {
            self.loss.blocked = Some(self.loss.blocked.map_or(seq, |b| b.max(seq)));
            return false;
        }
        self.degraded = true;
        // Caught up earlier but not yet past every write acknowledged without it:
        // the standing record goes on (a new catch-up must clear it).
        self.loss.clear_at = None;
        true
    }

    // -----------------------------------------------------------------------
    // Journal overflow: bitmap mode and resync

    /// The journal position this target needs kept. Replaces ferryd
    /// `overflow::Tracker::floor`.
    pub fn floor(&self) -> Seq {
        match self.tracking {
            Tracking::Streaming | Tracking::Switching { .. } => self.acked,
            Tracking::Bitmap {
                flushed_through, ..
            } => flushed_through,
            Tracking::Resyncing {
                flushed_through,
                snapshot,
                ..
            } => flushed_through.min(snapshot.max(self.acked)),
        }
    }

    /// The maps are durable up to `through` (a flush succeeded). Replaces the
    /// `flushed_through` store in ferryd `overflow::Tracker::flush`.
    pub fn marks_flushed(&mut self, through: Seq) {
        match &mut self.tracking {
            Tracking::Bitmap {
                flushed_through, ..
            }
            | Tracking::Resyncing {
                flushed_through, ..
            } => *flushed_through = through,
            Tracking::Streaming | Tracking::Switching { .. } => {}
        }
    }

    /// Journal over [`SWITCH_PERCENT`]: a resync that holds the journal below the
    /// `checkpoint` is abandoned (true: just now — end its session; it runs again on
    /// the next connection, marks intact). Writes must not wait for a target. Replaces
    /// the first loop of ferryd `overflow::monitor`.
    pub fn abandon_resync(&mut self, checkpoint: Seq) -> bool {
        let floor = self.floor();
        match &mut self.tracking {
            Tracking::Resyncing { abandoned, .. } if !*abandoned && floor < checkpoint => {
                *abandoned = true;
                true
            }
            _ => false,
        }
    }

    /// Journal over [`SWITCH_PERCENT`]: `Some(acked)` if this target is a candidate
    /// for the switch to bitmap mode — streaming, holding the journal below the
    /// `checkpoint`, not in a retry pause. The monitor switches the candidate furthest
    /// behind ([`choose_switch`]). Replaces the filters in ferryd `overflow::monitor`.
    pub fn switch_candidate(&self, checkpoint: Seq, now: Duration) -> Option<Seq> {
        let ready = self.retry_switch_at.is_none_or(|at| now >= at);
        (self.tracking == Tracking::Streaming && ready && self.acked < checkpoint)
            .then_some(self.acked)
    }

    /// Streaming → switching for the monitor (`None` if no longer streaming: a session
    /// switched it first). Replaces the start of ferryd `overflow::switch`.
    pub fn begin_overflow_switch(&mut self) -> Option<SwitchToBitmap> {
        self.begin_switch(self.acked, SwitchKind::Overflow)
    }

    fn begin_switch(&mut self, base: Seq, kind: SwitchKind) -> Option<SwitchToBitmap> {
        if self.tracking != Tracking::Streaming {
            return None;
        }
        self.tracking = Tracking::Switching { base, kind };
        Some(SwitchToBitmap { base, kind })
    }

    /// The maps exist and are durable up to `flushed_through`: the target stops
    /// holding the journal, and writes stop waiting for it (it is resynced later).
    /// Replaces the end of ferryd `overflow::enter_bitmap` and the kick in `switch`.
    pub fn bitmap_entered(&mut self, flushed_through: Seq) -> BitmapEntered {
        let Tracking::Switching { base, kind } = self.tracking else {
            return BitmapEntered { end_session: false };
        };
        self.tracking = Tracking::Bitmap {
            base,
            flushed_through,
        };
        self.lost = Some(LostPoints {
            after: base,
            through: None,
        });
        self.degraded = true;
        BitmapEntered {
            end_session: kind == SwitchKind::Overflow && self.phase.in_session(),
        }
    }

    /// Creating the maps failed (undone): the target keeps streaming. An overflow
    /// switch is retried after [`SWITCH_RETRY`]; a full switch fails its session.
    /// Replaces the error paths of ferryd `overflow::enter_bitmap` and `monitor`.
    pub fn switch_failed(&mut self, now: Duration) {
        if let Tracking::Switching { kind, .. } = self.tracking {
            self.tracking = Tracking::Streaming;
            if kind == SwitchKind::Overflow {
                self.retry_switch_at = Some(now + SWITCH_RETRY);
            }
        }
    }

    /// Start-up found the target's persisted maps (`base`, durable through
    /// `flushed_through`): it resumes in bitmap mode. Replaces the end of ferryd
    /// `overflow::load`.
    pub fn reopened_in_bitmap(&mut self, base: Seq, flushed_through: Seq) {
        self.tracking = Tracking::Bitmap {
            base,
            flushed_through,
        };
        self.lost = Some(LostPoints {
            after: base,
            through: None,
        });
        self.degraded = true;
    }

    /// The session's copy starts for a standby at `from`; `applied`: the primary's
    /// contiguous applied position, which becomes the snapshot (the floor is held
    /// there from now on). Replaces ferryd `overflow::begin_resync`'s decisions.
    pub fn resync_begin(&mut self, from: Seq, applied: Seq) -> Result<ResyncStart, ResyncRefused> {
        if applied < from {
            return Err(ResyncRefused::NotApplied { from, applied });
        }
        let (base, flushed_through) = match self.tracking {
            Tracking::Bitmap {
                base,
                flushed_through,
            }
            | Tracking::Resyncing {
                base,
                flushed_through,
                ..
            } => (base, flushed_through),
            _ => return Err(ResyncRefused::NotInBitmap),
        };
        // The standby holds less than it acknowledged (restored from an older copy?):
        // the map does not cover what it misses.
        let mark_all = from < base;
        let base = base.min(from);
        self.tracking = Tracking::Resyncing {
            base,
            flushed_through,
            snapshot: applied,
            through: None,
            abandoned: false,
        };
        self.lost = Some(LostPoints {
            after: from.max(base),
            through: None,
        });
        Ok(ResyncStart {
            from,
            snapshot: applied,
            mark_all,
        })
    }

    /// The copy was sent, ending with ResyncEnd at `through` (the primary's durable
    /// position then); streaming resumes after the snapshot. `journal_durable`: the
    /// primary's durable position as streaming starts. The resync completes once an
    /// ack covers `through` ([`Self::on_ack`]). Replaces the end of ferryd
    /// `overflow::resync_copy`.
    pub fn resync_copied(&mut self, through: Seq, journal_durable: Seq) -> SessionStart {
        let snapshot = match &mut self.tracking {
            Tracking::Resyncing {
                snapshot,
                through: th,
                ..
            } => {
                *th = Some(through);
                *snapshot
            }
            // Not resyncing (cannot happen while the session that began it lives):
            // stream after the ack, which the standby holds.
            _ => self.acked,
        };
        let after = self.lost.map_or(self.acked, |l| l.after);
        self.lost = Some(LostPoints {
            after,
            through: Some(through),
        });
        self.enter(TargetPhase::Streaming);
        self.durable_at_last_ack = journal_durable;
        SessionStart::Stream { after: snapshot }
    }

    /// Moves the session to `phase`, unless the daemon stopped the target: a
    /// handshake or resync copy that completes during shutdown (the daemon calls
    /// these from other tasks) must not make a stopped target report a session.
    fn enter(&mut self, phase: TargetPhase) {
        if self.phase != TargetPhase::Stopped {
            self.phase = phase;
        }
    }

    // -----------------------------------------------------------------------
    // Planned handover (switchover)

    /// Whether a switchover to this target may start (before writes are stopped).
    /// Replaces the state check in ferryd `daemon::switchover`.
    pub fn handover_precheck(&self) -> Result<(), HandoverRefused> {
        if let Some(h) = self.handed_over {
            return Err(HandoverRefused::AlreadyHandedOver {
                name: self.name.clone(),
                seq: h.seq,
                new_epoch: h.new_epoch,
            });
        }
        if let TargetPhase::HandingOver { seq } = self.phase {
            return Err(HandoverRefused::InProgress {
                name: self.name.clone(),
                seq,
            });
        }
        if self.phase != TargetPhase::Streaming {
            return Err(HandoverRefused::NotStreaming {
                name: self.name.clone(),
                state: self.phase.as_str(),
            });
        }
        Ok(())
    }

    /// Writes are stopped at `seq`: hand the primary role over, only if the target
    /// holds every record up to it (the switchover waits for that ack first).
    /// Replaces ferryd `TargetState::request_handover` and the kick arm of
    /// `replication::session`. A request made while no session streams is refused,
    /// never queued for whichever session streams next.
    pub fn request_handover(&mut self, seq: Seq) -> Result<SendHandover, HandoverRefused> {
        self.handover_precheck()?;
        if self.acked < seq {
            return Err(HandoverRefused::NotCaughtUp {
                name: self.name.clone(),
                seq,
                acked: self.acked,
            });
        }
        self.phase = TargetPhase::HandingOver { seq };
        Ok(SendHandover { seq })
    }

    /// The standby's HandoverAck: it took over at `seq` with `new_epoch`. The session
    /// ends (the standby restarts as the primary). Replaces the `HandoverAck` arm of
    /// ferryd `replication::session`.
    pub fn on_handover_ack(
        &mut self,
        seq: Seq,
        new_epoch: Epoch,
    ) -> Result<HandedOver, UnexpectedHandoverAck> {
        match self.phase {
            TargetPhase::HandingOver { seq: pending } if pending == seq => {
                let done = HandedOver { seq, new_epoch };
                self.handed_over = Some(done);
                self.phase = TargetPhase::Streaming;
                Ok(done)
            }
            phase => {
                let handover_failed = matches!(phase, TargetPhase::HandingOver { .. });
                if handover_failed {
                    self.phase = TargetPhase::Streaming;
                }
                Err(UnexpectedHandoverAck {
                    seq,
                    new_epoch,
                    handover_failed,
                })
            }
        }
    }

    /// The switchover gave up waiting for the HandoverAck (ferryd's 30 s timeout in
    /// `daemon::switchover`) and takes writes again: true if a handover was pending.
    /// An ack arriving later is then unexpected (the session ends), not a success.
    pub fn abandon_handover(&mut self) -> bool {
        self.on_peer_error()
    }

    /// The standby sent an Error frame (the session ends): true if it refused a
    /// pending handover. Replaces the `Frame::Error` arm of ferryd
    /// `replication::session`.
    pub fn on_peer_error(&mut self) -> bool {
        let pending = matches!(self.phase, TargetPhase::HandingOver { .. });
        if pending {
            self.phase = TargetPhase::Streaming;
        }
        pending
    }

    /// The standby sent an Error frame with `code` (the session ends). `ResyncRequired`
    /// (it refused a write-set with a record outside its volumes) plans a full resync
    /// for the next session ([`FullReason::StandbyRequired`]): reconnecting to stream
    /// the same records would be refused again, forever. Otherwise as
    /// [`Self::on_peer_error`].
    pub fn on_peer_error_code(&mut self, code: ErrorCode) -> PeerError {
        let handover_failed = self.on_peer_error();
        let full_resync_planned = code == ErrorCode::ResyncRequired && !self.peer_requires_resync;
        if code == ErrorCode::ResyncRequired {
            self.peer_requires_resync = true;
        }
        PeerError {
            handover_failed,
            full_resync_planned,
        }
    }

    /// Whether the next session resyncs in full because the standby asked for it.
    pub fn peer_requires_resync(&self) -> bool {
        self.peer_requires_resync
    }

    /// Start-up found the standby's request recorded durably (the daemon persists it
    /// when [`PeerError::full_resync_planned`], and deletes it once a session with
    /// that plan has started): a restart before the resync does not forget it.
    pub fn restore_peer_requires_resync(&mut self) {
        self.peer_requires_resync = true;
    }
}

/// The sync gate's position: the minimum over the targets' [`TargetLifecycle::sync_position`]
/// (`Seq::MAX` when no write waits for any). Replaces ferryd `SyncGate::recompute`'s fold.
pub fn sync_gate_position(positions: impl IntoIterator<Item = Option<Seq>>) -> Seq {
    positions.into_iter().flatten().min().unwrap_or(Seq::MAX)
}

/// How many of a sync policy's listed targets must hold a write before it is
/// acknowledged (`replication.sync`, PostgreSQL style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncQuorum {
    /// Every sync target (no `replication.sync`: each `mode = "sync"` target).
    All,
    /// `ANY k (…)`: any `k` of the listed targets.
    Any(usize),
    /// `FIRST k (…)`: the first `k` listed targets that are not degraded, in the
    /// order listed (priority).
    First(usize),
}

/// The sync gate's position under a [`SyncQuorum`]: `positions` are the listed
/// targets' [`TargetLifecycle::sync_position`]s in the order listed (`None`: it does
/// not hold writes back — async, or degraded with its loss recorded durably).
///
/// * `All`: the minimum ([`sync_gate_position`]).
/// * `Any(k)`: the `k`-th highest position.
/// * `First(k)`: the minimum over the first `k` targets that hold writes back.
///
/// With fewer than `k` targets holding writes back, every one of them must hold the
/// write (the `k`-th highest becomes the lowest); with none, `Seq::MAX`.
///
/// Why no acknowledged write is ever held by fewer than `k` listed targets without a
/// recorded sync loss: a write at `s` is acknowledged once this position is at least
/// `s`. If `m >= k` listed targets hold writes back, the position is at most the
/// `k`-th highest of their acks (for `First`, the lowest of `k` of them), so `k`
/// targets hold `s`. If `m < k`, every one of the `m` holds `s`, and each of the other
/// `n - m >= k - m` listed targets is out of the count only because it is degraded
/// **with its loss recorded durably** ([`TargetLifecycle::sync_position`] keeps a
/// degraded target in until [`TargetLifecycle::sync_loss_recorded`]): so the missing
/// copies are exactly covered by durable sync-loss records, written before the write
/// was acknowledged. Every position counted is an ack, a sequence the target holds
/// durably: a target that is merely down (not degraded) counts with its last ack, so
/// it is never credited with a write it lacks (under FIRST it holds writes back until
/// a timeout degrades it). With `on_sync_loss = "block"` a target is never degraded by
/// a timeout, so writes wait.
///
/// What this does not promise: under ANY and FIRST a listed target without a loss
/// record may lack writes that the other `k` hold (the policy never needed it), as in
/// PostgreSQL; which standby to promote is decided by who holds more.
pub fn quorum_gate_position(
    quorum: SyncQuorum,
    positions: impl IntoIterator<Item = Option<Seq>>,
) -> Seq {
    let held = positions.into_iter().flatten();
    match quorum {
        SyncQuorum::All => held.min().unwrap_or(Seq::MAX),
        SyncQuorum::First(k) => held.take(k.max(1)).min().unwrap_or(Seq::MAX),
        SyncQuorum::Any(k) => {
            // Bounded by the number of configured targets.
            let mut v: Vec<Seq> = held.collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            let i = k.clamp(1, v.len().max(1)) - 1;
            v.get(i).copied().unwrap_or(Seq::MAX)
        }
    }
}

/// The journal may release only what every target holds (`Seq::MAX` with none).
/// Replaces ferryd `Replication::release_floor`'s fold.
pub fn release_floor(floors: impl IntoIterator<Item = Seq>) -> Seq {
    floors.into_iter().min().unwrap_or(Seq::MAX)
}

/// Of the [`TargetLifecycle::switch_candidate`]s `(key, acked)`, the one furthest
/// behind: it is what holds the journal. Replaces the `min_by_key` in ferryd
/// `overflow::monitor`.
pub fn choose_switch<K>(candidates: impl IntoIterator<Item = (K, Seq)>) -> Option<K> {
    candidates
        .into_iter()
        .min_by_key(|(_, acked)| *acked)
        .map(|(k, _)| k)
}

/// How full the journal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalFill {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

impl JournalFill {
    fn at_least(&self, percent: u64) -> bool {
        self.used_bytes.saturating_mul(100) >= self.capacity_bytes.max(1).saturating_mul(percent)
    }

    /// Flush the dirty maps on every monitor round ([`PRESSURE_PERCENT`]).
    pub fn flush_pressure(&self) -> bool {
        self.at_least(PRESSURE_PERCENT)
    }

    /// Switch the holder to bitmap mode, abandon holding resyncs ([`SWITCH_PERCENT`]).
    pub fn overflowing(&self) -> bool {
        self.at_least(SWITCH_PERCENT)
    }
}
