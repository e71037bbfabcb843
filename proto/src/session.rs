//! Replication session state machines: no IO, no clock, no async.
//!
//! Like quinn-proto, these types only decide; the caller owns sockets, timers
//! and the journal, feeds events in (`push`, `on_ack`, `on_write_set`, …) and
//! sends what comes out. Times are passed in as arguments, so every behaviour
//! is deterministic and a simulation can drive both sides in one thread.
//!
//! Positions are cumulative sequence numbers ("every seq ≤ N"):
//!
//! ```text
//!  primary (Sender)          applied ≤ durable ≤ received ≤ sent ≤ last_queued
//!  standby (Receiver)        applied ≤ durable ≤ received
//! ```
//!
//! The primary learns the standby's received position only if it asked for received
//! acks (V4, `HelloAck::received_acks`); otherwise it sees received == durable.
//!
//! A connection is: both sides exchange `Hello` (validated by
//! [`validate_hello`]), the primary answers with `HelloAck` carrying the
//! resume sequence ([`plan_resume`]), then write-sets flow one way and acks the
//! other. Any protocol error ends the connection; the next one resumes after
//! the standby's durable position, so nothing is lost and nothing is applied twice.

use std::collections::VecDeque;

use thiserror::Error;

use crate::wire::{
    Ack, Epoch, ErrorCode, ErrorFrame, Hello, HelloAck, ProtocolVersion, RecordOp, Role, Seq,
    VolumeGeometry, WireRecord, WriteSet, MAX_SUPPORTED_VERSION, MIN_SUPPORTED_VERSION,
};

// ---------------------------------------------------------------------------
// Sender (primary, one per target)

/// The sequence after `last`. Positions come from the peer and from persisted
/// cursors, so `Seq::MAX` is reachable by corruption and must not overflow.
fn next_seq(last: Seq) -> Result<Seq, SenderError> {
    last.checked_add(1)
        .ok_or(SenderError::SeqExhausted { last })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderConfig {
    /// Wire bytes sent but not yet acknowledged durable. One write-set is
    /// always allowed in flight even if larger, so a big write-set cannot
    /// wedge the session.
    pub max_inflight_bytes: u64,
    pub max_inflight_write_sets: usize,
    /// Bound on the retransmit queue (sent-unacked + not yet sent). When full,
    /// `push` refuses and the caller leaves the write-set in the journal
    /// (and eventually switches the target to dirty-region tracking).
    pub max_queued_write_sets: usize,
    /// The same bound in wire bytes: write-sets are up to megabytes each, so a
    /// count alone lets a lagging target hold gigabytes of the primary's memory.
    /// One write-set is always accepted into an empty queue, even if larger.
    pub max_queued_bytes: u64,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            max_inflight_bytes: 64 * 1024 * 1024,
            max_inflight_write_sets: 64,
            max_queued_write_sets: 4096,
            // The in-flight window plus a read-ahead of at most half as much again.
            max_queued_bytes: 96 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SenderError {
    #[error("write-set starts at {got}, expected {expected} (queue must be contiguous)")]
    NotContiguous { expected: Seq, got: Seq },
    #[error("write-set epoch {got} differs from session epoch {session}")]
    EpochMismatch { session: Epoch, got: Epoch },
    #[error("send queue full ({limit} write-sets)")]
    QueueFull { limit: usize },
    #[error("send queue full ({limit} bytes)")]
    QueueBytesFull { limit: u64 },
    #[error("ack from stale epoch {got} (session epoch {session})")]
    StaleEpoch { session: Epoch, got: Epoch },
    #[error("peer is at newer epoch {got} (session epoch {session}): this node must fence")]
    PeerEpochNewer { session: Epoch, got: Epoch },
    #[error("ack for seq {acked} beyond last sent seq {sent}")]
    AckBeyondSent { acked: Seq, sent: Seq },
    #[error("{which} went backwards: {previous} -> {got}")]
    AckWentBackwards {
        which: &'static str,
        previous: Seq,
        got: Seq,
    },
    #[error("ack applied {applied} beyond durable {durable}")]
    AppliedBeyondDurable { applied: Seq, durable: Seq },
    #[error("ack received {received} below durable {durable}")]
    ReceivedBelowDurable { received: Seq, durable: Seq },
    #[error("peer resumes at {resume}, below its acknowledged durable position {durable}: it lost acknowledged data")]
    ResumeBehindDurable { resume: Seq, durable: Seq },
    #[error(
        "peer resumes at {resume}, beyond anything queued ({last_queued}): histories diverged"
    )]
    PeerAhead { resume: Seq, last_queued: Seq },
    /// Everything through `Seq::MAX` is queued (or held by the peer): no sequence
    /// can follow. Only a corrupt cursor or a hostile peer gets a session here.
    #[error("sequence space exhausted after {last}")]
    SeqExhausted { last: Seq },
    /// A write-set whose range is empty or backwards: queuing it would move
    /// `last_queued` behind `sent` (no frame can carry one either).
    #[error("write-set range {first}..={last} is empty")]
    EmptyWriteSet { first: Seq, last: Seq },
}

impl SenderError {
    /// The code to put in an Error frame before closing the connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::StaleEpoch { .. } | Self::PeerEpochNewer { .. } => ErrorCode::StaleEpoch,
            Self::PeerAhead { .. } | Self::ResumeBehindDurable { .. } => ErrorCode::Diverged,
            Self::AckBeyondSent { .. }
            | Self::AckWentBackwards { .. }
            | Self::AppliedBeyondDurable { .. }
            | Self::ReceivedBelowDurable { .. } => ErrorCode::Protocol,
            Self::NotContiguous { .. }
            | Self::EpochMismatch { .. }
            | Self::QueueFull { .. }
            | Self::QueueBytesFull { .. }
            | Self::SeqExhausted { .. }
            | Self::EmptyWriteSet { .. } => ErrorCode::Internal,
        }
    }
}

/// What an ack changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckOutcome {
    pub durable_seq: Seq,
    pub applied_seq: Seq,
    /// Received by the standby (≥ `durable_seq`; equal unless it sends received acks).
    pub received_seq: Seq,
    /// Write-sets fully acknowledged durable and dropped from the queue by this ack.
    pub released_write_sets: usize,
}

#[derive(Debug)]
struct Entry {
    ws: WriteSet,
    /// Wire bytes (`encoded_len`), what the window and lag_bytes count.
    bytes: u64,
}

/// Primary-side state for one target.
///
/// The queue is also the retransmit buffer: it holds every write-set after the
/// target's durable ack, so a reconnect resumes from memory. After a primary
/// restart, create a new `Sender` starting at the standby's resume position
/// and push write-sets read back from the journal.
#[derive(Debug)]
pub struct Sender {
    epoch: Epoch,
    config: SenderConfig,
    queue: VecDeque<Entry>,
    /// Index in `queue` of the next write-set to transmit; everything before
    /// it is in flight.
    next_unsent: usize,
    inflight_bytes: u64,
    queued_bytes: u64,
    sent_seq: Seq,
    /// Received by the peer (V4 received acks); `durable_seq` from an older peer.
    received_seq: Seq,
    durable_seq: Seq,
    applied_seq: Seq,
    last_queued_seq: Seq,
}

impl Sender {
    /// `start_after`: the target's durable position (from its Hello, or the
    /// persisted target cursor); the first pushed write-set must begin at
    /// `start_after + 1`.
    pub fn new(epoch: Epoch, config: SenderConfig, start_after: Seq) -> Self {
        Self {
            epoch,
            config,
            queue: VecDeque::new(),
            next_unsent: 0,
            inflight_bytes: 0,
            queued_bytes: 0,
            sent_seq: start_after,
            received_seq: start_after,
            durable_seq: start_after,
            applied_seq: start_after,
            last_queued_seq: start_after,
        }
    }

    /// Queues a sealed write-set for transmission.
    pub fn push(&mut self, ws: WriteSet) -> Result<(), SenderError> {
        if ws.epoch != self.epoch {
            return Err(SenderError::EpochMismatch {
                session: self.epoch,
                got: ws.epoch,
            });
        }
        let expected = next_seq(self.last_queued_seq)?;
        if ws.first_seq != expected {
            return Err(SenderError::NotContiguous {
                expected,
                got: ws.first_seq,
            });
        }
        if ws.last_seq < ws.first_seq {
            return Err(SenderError::EmptyWriteSet {
                first: ws.first_seq,
                last: ws.last_seq,
            });
        }
        let bytes = ws.encoded_len() as u64;
        self.room_for(bytes)?;
        self.last_queued_seq = ws.last_seq;
        self.queued_bytes += bytes;
        self.queue.push_back(Entry { ws, bytes });
        Ok(())
    }

    /// Whether `push` would take `ws` as far as the queue's bounds go: a caller that
    /// must not lose the write-set to a full queue asks first, and keeps it.
    pub fn has_room(&self, ws: &WriteSet) -> Result<(), SenderError> {
        self.room_for(ws.encoded_len() as u64)
    }

    fn room_for(&self, bytes: u64) -> Result<(), SenderError> {
        if self.queue.len() >= self.config.max_queued_write_sets {
            return Err(SenderError::QueueFull {
                limit: self.config.max_queued_write_sets,
            });
        }
        if !self.queue.is_empty() && self.queued_bytes + bytes > self.config.max_queued_bytes {
            return Err(SenderError::QueueBytesFull {
                limit: self.config.max_queued_bytes,
            });
        }
        Ok(())
    }

    /// The next write-set to send, if the window allows. The returned value
    /// shares its record data with the queue (cheap `Bytes` clones).
    pub fn poll_transmit(&mut self) -> Option<WriteSet> {
        let entry = self.queue.get(self.next_unsent)?;
        let inflight = self.next_unsent;
        if inflight >= self.config.max_inflight_write_sets {
            return None;
        }
        if inflight > 0 && self.inflight_bytes + entry.bytes > self.config.max_inflight_bytes {
            return None;
        }
        self.next_unsent += 1;
        self.inflight_bytes += entry.bytes;
        self.sent_seq = entry.ws.last_seq;
        Some(entry.ws.clone())
    }

    pub fn on_ack(&mut self, ack: &Ack) -> Result<AckOutcome, SenderError> {
        if ack.epoch < self.epoch {
            return Err(SenderError::StaleEpoch {
                session: self.epoch,
                got: ack.epoch,
            });
        }
        if ack.epoch > self.epoch {
            return Err(SenderError::PeerEpochNewer {
                session: self.epoch,
                got: ack.epoch,
            });
        }
        let (durable, applied) = (ack.received_durable_seq, ack.applied_seq);
        let received = ack.received_seq;
        if applied > durable {
            return Err(SenderError::AppliedBeyondDurable { applied, durable });
        }
        if received < durable {
            return Err(SenderError::ReceivedBelowDurable { received, durable });
        }
        // Received ≥ durable: this bounds both (durable named first, as before V4).
        if received > self.sent_seq {
            return Err(SenderError::AckBeyondSent {
                acked: if durable > self.sent_seq {
                    durable
                } else {
                    received
                },
                sent: self.sent_seq,
            });
        }
        if durable < self.durable_seq {
            return Err(SenderError::AckWentBackwards {
                which: "received_durable_seq",
                previous: self.durable_seq,
                got: durable,
            });
        }
        if applied < self.applied_seq {
            return Err(SenderError::AckWentBackwards {
                which: "applied_seq",
                previous: self.applied_seq,
                got: applied,
            });
        }
        // A standby asked for received acks reports its received position in every
        // ack, so it never goes back (one that was not reports it equal to durable).
        if received < self.received_seq {
            return Err(SenderError::AckWentBackwards {
                which: "received_seq",
                previous: self.received_seq,
                got: received,
            });
        }
        self.received_seq = received;
        self.durable_seq = durable;
        self.applied_seq = applied;
        let released = self.release_through(durable);
        Ok(AckOutcome {
            durable_seq: durable,
            applied_seq: applied,
            received_seq: received,
            released_write_sets: released,
        })
    }

    /// Drops write-sets the peer holds durably; trims one it holds in part
    /// (possible when the primary regrouped write-sets after a restart).
    fn release_through(&mut self, durable: Seq) -> usize {
        let mut released = 0;
        while let Some(front) = self.queue.front() {
            if front.ws.last_seq > durable {
                break;
            }
            let bytes = front.bytes;
            self.queue.pop_front();
            released += 1;
            self.queued_bytes -= bytes;
            if self.next_unsent > 0 {
                self.next_unsent -= 1;
                self.inflight_bytes -= bytes;
            }
        }
        if let Some(front) = self.queue.front_mut() {
            if front.ws.first_seq <= durable {
                if let Some(rest) = front.ws.after(durable) {
                    let new_bytes = rest.encoded_len() as u64;
                    let shrink = front.bytes - new_bytes;
                    self.queued_bytes -= shrink;
                    if self.next_unsent > 0 {
                        self.inflight_bytes -= shrink;
                    }
                    front.ws = rest;
                    front.bytes = new_bytes;
                }
            }
        }
        released
    }

    /// On a new connection: the standby's Hello says it holds everything
    /// through `peer_resume_seq` durably. Drops what it has, marks everything
    /// after it unsent, and returns the first sequence that will be resent.
    pub fn reset_for_resume(&mut self, peer_resume_seq: Seq) -> Result<Seq, SenderError> {
        if peer_resume_seq < self.durable_seq {
            return Err(SenderError::ResumeBehindDurable {
                resume: peer_resume_seq,
                durable: self.durable_seq,
            });
        }
        if peer_resume_seq > self.last_queued_seq {
            return Err(SenderError::PeerAhead {
                resume: peer_resume_seq,
                last_queued: self.last_queued_seq,
            });
        }
        let next = next_seq(peer_resume_seq)?;
        // Everything up to the resume point counts as sent so release_through
        // can account for it; then rewind the window.
        self.sent_seq = self.sent_seq.max(peer_resume_seq);
        self.durable_seq = peer_resume_seq;
        // The peer drained what it had received before resuming (or lost it).
        self.received_seq = peer_resume_seq;
        self.release_through(peer_resume_seq);
        self.next_unsent = 0;
        self.inflight_bytes = 0;
        self.sent_seq = peer_resume_seq;
        Ok(next)
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }
    pub fn received_seq(&self) -> Seq {
        self.received_seq
    }
    pub fn applied_seq(&self) -> Seq {
        self.applied_seq
    }
    pub fn sent_seq(&self) -> Seq {
        self.sent_seq
    }
    pub fn last_queued_seq(&self) -> Seq {
        self.last_queued_seq
    }
    pub fn inflight_write_sets(&self) -> usize {
        self.next_unsent
    }
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }
    pub fn queued_write_sets(&self) -> usize {
        self.queue.len()
    }
    /// Wire bytes queued and not yet acknowledged durable (sent or not).
    pub fn lag_bytes(&self) -> u64 {
        self.queued_bytes
    }
    /// Primary timestamp of the oldest write-set not yet acknowledged durable.
    pub fn oldest_unacked_timestamp_ns(&self) -> Option<u64> {
        self.queue.front().map(|e| e.ws.timestamp_ns)
    }
    /// RPO for this target: age of the oldest unacknowledged write-set at
    /// `now_ns` (primary clock), 0 when fully caught up.
    pub fn lag_seconds(&self, now_ns: u64) -> f64 {
        self.oldest_unacked_timestamp_ns()
            .map_or(0.0, |ts| now_ns.saturating_sub(ts) as f64 / 1e9)
    }
}

// ---------------------------------------------------------------------------
// Receiver (standby)

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiveError {
    #[error("frame from stale epoch {got} (session epoch {session})")]
    StaleEpoch { session: Epoch, got: Epoch },
    #[error("frame from epoch {got} during session epoch {session}: re-handshake required")]
    EpochChanged { session: Epoch, got: Epoch },
    #[error("gap: expected write-set starting at {expected}, got {got}")]
    Gap { expected: Seq, got: Seq },
    #[error("{which} {seq} beyond {limit_name} {limit}")]
    Beyond {
        which: &'static str,
        seq: Seq,
        limit_name: &'static str,
        limit: Seq,
    },
    #[error("{which} went backwards: {previous} -> {got}")]
    WentBackwards {
        which: &'static str,
        previous: Seq,
        got: Seq,
    },
    /// A record for a volume this standby does not have.
    #[error("record {seq} is for volume id {volume}, which this standby does not have")]
    UnknownVolume { seq: Seq, volume: u32 },
    /// A record that would write outside its volume (it would grow the replica).
    #[error(
        "record {seq} covers {offset}+{length} of volume id {volume}, beyond its {size} bytes"
    )]
    OutOfRange {
        seq: Seq,
        volume: u32,
        offset: u64,
        length: u32,
        size: u64,
    },
}

impl ReceiveError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::StaleEpoch { .. } | Self::EpochChanged { .. } => ErrorCode::StaleEpoch,
            Self::Gap { .. } => ErrorCode::Gap,
            Self::Beyond { .. } | Self::WentBackwards { .. } => ErrorCode::Internal,
            // The stream cannot go on past a record the replica cannot take: the
            // standby asks for a resync instead (nothing of the write-set was kept).
            Self::UnknownVolume { .. } | Self::OutOfRange { .. } => ErrorCode::ResyncRequired,
        }
    }

    /// The Error frame a standby sends before ending the session. The reason is cut
    /// to the wire limit on a character boundary so encoding cannot fail.
    pub fn to_error_frame(&self, epoch: Epoch) -> ErrorFrame {
        error_frame(epoch, self.code(), self.to_string())
    }
}

/// An Error frame with `reason` cut to the wire limit on a character boundary.
fn error_frame(epoch: Epoch, code: ErrorCode, mut reason: String) -> ErrorFrame {
    let mut cut = reason.len().min(crate::wire::MAX_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    reason.truncate(cut);
    ErrorFrame {
        epoch,
        code,
        reason,
    }
}

/// Whether a received record fits the standby's volumes: a data record (write,
/// trim, write-zeroes) must name a volume of `volumes` and end within it. Seals
/// carry no range. Checked before anything of a write-set is journaled.
pub fn check_record_range(r: &WireRecord, volumes: &[VolumeGeometry]) -> Result<(), ReceiveError> {
    if r.op == RecordOp::Seal {
        return Ok(());
    }
    let v = volumes
        .iter()
        .find(|v| v.id == r.volume)
        .ok_or(ReceiveError::UnknownVolume {
            seq: r.seq,
            volume: r.volume,
        })?;
    match r.offset.checked_add(u64::from(r.length)) {
        Some(end) if end <= v.size_bytes => Ok(()),
        _ => Err(ReceiveError::OutOfRange {
            seq: r.seq,
            volume: r.volume,
            offset: r.offset,
            length: r.length,
            size: v.size_bytes,
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// New data: journal it. Already trimmed to the part after what was
    /// received before, so it starts exactly at the expected sequence.
    Accept(WriteSet),
    /// Nothing new (a resend after reconnect): drop it, send this ack so the
    /// primary learns our position even if the original ack was lost.
    Duplicate(Ack),
}

/// Standby-side state for the connection from the primary.
///
/// `received_seq` runs ahead of `durable_seq` while accepted write-sets are
/// being journaled. A reconnect waits for those appends to finish (see
/// [`Receiver::resume_position`]); if the standby process restarts instead, a
/// new `Receiver` starts from the journal's durable position.
#[derive(Debug, Clone)]
pub struct Receiver {
    epoch: Epoch,
    received_seq: Seq,
    durable_seq: Seq,
    applied_seq: Seq,
    /// The standby's volumes, when known: every accepted record must fit one.
    volumes: Option<Vec<VolumeGeometry>>,
    /// The primary asked for received acks (V4 `HelloAck::received_acks`): every ack
    /// carries `received_seq`, and one goes out for each accepted write-set.
    received_acks: bool,
}

impl Receiver {
    /// `applied_seq` above `durable_seq` is clamped: the standby never applies
    /// what is not durable, so a larger value can only be a stale cursor.
    pub fn new(epoch: Epoch, durable_seq: Seq, applied_seq: Seq) -> Self {
        Self {
            epoch,
            received_seq: durable_seq,
            durable_seq,
            applied_seq: applied_seq.min(durable_seq),
            volumes: None,
            received_acks: false,
        }
    }

    /// Acks carry the received position (the primary asked, in a V4 HelloAck).
    pub fn with_received_acks(mut self, on: bool) -> Self {
        self.received_acks = on;
        self
    }

    /// After [`Received::Accept`]: the ack telling the primary the write-set was
    /// received, if it asked for received acks (`None`: it did not, or nothing is
    /// received beyond what is durable).
    pub fn received_ack(&self) -> Option<Ack> {
        (self.received_acks && self.received_seq > self.durable_seq).then(|| self.ack())
    }

    /// Also checks every accepted record against the standby's `volumes`
    /// ([`check_record_range`]): a write-set with a record outside them is refused
    /// whole, and the position does not move. Without it only order is checked.
    pub fn with_volumes(mut self, volumes: Vec<VolumeGeometry>) -> Self {
        self.volumes = Some(volumes);
        self
    }

    /// What to advertise as `Hello::resume_position` on a new connection, or
    /// `None` while accepted write-sets are still being journaled.
    ///
    /// Why wait: if the standby advertised `durable` while appends beyond it
    /// were still in flight, those appends could complete and be acked before
    /// the primary resent them, and the primary would rightly reject an ack
    /// for data it has not sent on this connection. Draining first makes
    /// `received == durable == resume` at the start of every connection.
    pub fn resume_position(&self) -> Option<Seq> {
        (self.received_seq == self.durable_seq).then_some(self.durable_seq)
    }

    pub fn on_write_set(&mut self, ws: WriteSet) -> Result<Received, ReceiveError> {
        self.check_epoch(ws.epoch)?;
        if ws.last_seq <= self.received_seq {
            return Ok(Received::Duplicate(self.ack()));
        }
        let expected = self.received_seq + 1;
        if ws.first_seq > expected {
            return Err(ReceiveError::Gap {
                expected,
                got: ws.first_seq,
            });
        }
        let ws = if ws.first_seq < expected {
            match ws.after(self.received_seq) {
                Some(rest) => rest,
                // Unreachable given last_seq > received_seq; treated as a duplicate
                // rather than trusting that reasoning with a panic.
                None => return Ok(Received::Duplicate(self.ack())),
            }
        } else {
            ws
        };
        if let Some(volumes) = &self.volumes {
            for r in &ws.records {
                check_record_range(r, volumes)?;
            }
        }
        self.received_seq = ws.last_seq;
        Ok(Received::Accept(ws))
    }

    /// The standby journal holds everything through `seq`. Returns the ack to send.
    pub fn mark_durable(&mut self, seq: Seq) -> Result<Ack, ReceiveError> {
        self.durable_seq = advance(
            ("durable", self.durable_seq, seq),
            ("received", self.received_seq),
        )?;
        Ok(self.ack())
    }

    /// The replica holds everything through `seq`. Returns the ack to send.
    pub fn mark_applied(&mut self, seq: Seq) -> Result<Ack, ReceiveError> {
        self.applied_seq = advance(
            ("applied", self.applied_seq, seq),
            ("durable", self.durable_seq),
        )?;
        Ok(self.ack())
    }

    /// A bitmap resync copied the primary's dirty regions as of `snapshot` (every
    /// record up to it is reflected in the replica, durably) and the stream goes on
    /// after it: all three positions move there. Only between write-sets (nothing
    /// received beyond what is durable) and never backwards. Returns the ack to send.
    pub fn resynced(&mut self, snapshot: Seq) -> Result<Ack, ReceiveError> {
        if self.received_seq != self.durable_seq {
            return Err(ReceiveError::Beyond {
                which: "received",
                seq: self.received_seq,
                limit_name: "durable (a resync needs a drained receiver)",
                limit: self.durable_seq,
            });
        }
        if snapshot < self.received_seq {
            return Err(ReceiveError::WentBackwards {
                which: "resync snapshot",
                previous: self.received_seq,
                got: snapshot,
            });
        }
        self.received_seq = snapshot;
        self.durable_seq = snapshot;
        self.applied_seq = snapshot;
        Ok(self.ack())
    }

    /// Refuses frames from another epoch: older means a fenced primary, newer
    /// means roles changed and the connection must be re-established.
    pub fn check_epoch(&self, got: Epoch) -> Result<(), ReceiveError> {
        if got < self.epoch {
            return Err(ReceiveError::StaleEpoch {
                session: self.epoch,
                got,
            });
        }
        if got > self.epoch {
            return Err(ReceiveError::EpochChanged {
                session: self.epoch,
                got,
            });
        }
        Ok(())
    }

    /// The ack of the current positions (the received one only if the primary asked).
    pub fn ack(&self) -> Ack {
        Ack {
            epoch: self.epoch,
            received_durable_seq: self.durable_seq,
            applied_seq: self.applied_seq,
            received_seq: if self.received_acks {
                self.received_seq
            } else {
                self.durable_seq
            },
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    pub fn received_seq(&self) -> Seq {
        self.received_seq
    }
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }
    pub fn applied_seq(&self) -> Seq {
        self.applied_seq
    }
}

// ---------------------------------------------------------------------------
// Handshake

/// This node's identity plus what it expects of its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    pub cluster_id: [u8; 16],
    pub node_id: [u8; 16],
    pub node_name: String,
    pub role: Role,
    pub epoch: Epoch,
    pub min_version: u16,
    pub max_version: u16,
    pub volumes: Vec<VolumeGeometry>,
    /// The configured name of the node at the other end.
    pub expected_peer_name: String,
}

impl LocalIdentity {
    /// A Hello for this node advertising `resume_position`.
    pub fn hello(&self, resume_position: Seq) -> Hello {
        Hello {
            epoch: self.epoch,
            min_version: self.min_version,
            max_version: self.max_version,
            cluster_id: self.cluster_id,
            node_id: self.node_id,
            node_name: self.node_name.clone(),
            role: self.role,
            volumes: self.volumes.clone(),
            resume_position,
        }
    }

    /// Versions this build supports, for config-less callers.
    pub fn supported_versions() -> (u16, u16) {
        (
            MIN_SUPPORTED_VERSION.as_u16(),
            MAX_SUPPORTED_VERSION.as_u16(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Highest version both sides support.
    pub version: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error("peer belongs to cluster {got:02x?}, expected {expected:02x?}")]
    WrongCluster { expected: [u8; 16], got: [u8; 16] },
    #[error("peer is node {got:?}, expected {expected:?}")]
    WrongNode { expected: String, got: String },
    #[error("peer role {peer:?} cannot pair with local role {local:?}")]
    RoleMismatch { local: Role, peer: Role },
    #[error("peer epoch {peer} is older than local epoch {local}")]
    StaleEpoch { local: Epoch, peer: Epoch },
    #[error(
        "peer epoch {peer} is newer than local epoch {local}: this node is outdated and must fence"
    )]
    LocalEpochStale { local: Epoch, peer: Epoch },
    #[error(
        "no common protocol version: local {local_min}..={local_max}, peer {peer_min}..={peer_max}"
    )]
    VersionMismatch {
        local_min: u16,
        local_max: u16,
        peer_min: u16,
        peer_max: u16,
    },
    #[error("volume {volume}: {reason}")]
    GeometryMismatch { volume: u32, reason: String },
    #[error("peer resumes at {resume}, beyond the primary's last seq {last}: histories diverged")]
    Diverged { resume: Seq, last: Seq },
    #[error("peer resumes at {resume} but the journal starts at {oldest}: resync required")]
    ResyncRequired { resume: Seq, oldest: Seq },
    /// The peer holds writes of an older epoch past this primary's fork point.
    #[error("histories diverged after a failover: {detail}")]
    ForkDiverged {
        detail: String,
        /// The peer's resume position: once this primary's history passes it, the
        /// peer is resynced instead of refused.
        peer_resume: Seq,
    },
}

impl HandshakeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::WrongCluster { .. } => ErrorCode::WrongCluster,
            Self::WrongNode { .. } => ErrorCode::WrongNode,
            Self::RoleMismatch { .. } => ErrorCode::RoleMismatch,
            Self::StaleEpoch { .. } | Self::LocalEpochStale { .. } => ErrorCode::StaleEpoch,
            Self::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            Self::GeometryMismatch { .. } => ErrorCode::GeometryMismatch,
            Self::Diverged { .. } | Self::ForkDiverged { .. } => ErrorCode::Diverged,
            Self::ResyncRequired { .. } => ErrorCode::ResyncRequired,
        }
    }

    /// The Error frame to send before closing. The reason is cut to the wire
    /// limit on a character boundary so encoding cannot fail.
    pub fn to_error_frame(&self, epoch: Epoch) -> ErrorFrame {
        error_frame(epoch, self.code(), self.to_string())
    }
}

/// Checks a peer's Hello against this node. Check order puts the checks that
/// reveal a misdirected connection (cluster, version, role, name) before the
/// ones that reveal a stale or misconfigured peer (epoch, geometry), so the
/// error names the most fundamental problem.
pub fn validate_hello(local: &LocalIdentity, peer: &Hello) -> Result<Negotiated, HandshakeError> {
    if peer.cluster_id != local.cluster_id {
        return Err(HandshakeError::WrongCluster {
            expected: local.cluster_id,
            got: peer.cluster_id,
        });
    }
    // Epochs first, before roles and names: a primary that dials a node which was
    // promoted in a newer epoch (also a primary now) must learn that it is outdated,
    // not just that the roles do not pair.
    if peer.epoch < local.epoch {
        return Err(HandshakeError::StaleEpoch {
            local: local.epoch,
            peer: peer.epoch,
        });
    }
    if peer.epoch > local.epoch {
        return Err(HandshakeError::LocalEpochStale {
            local: local.epoch,
            peer: peer.epoch,
        });
    }
    let low = local.min_version.max(peer.min_version);
    let high = local.max_version.min(peer.max_version);
    if low > high {
        return Err(HandshakeError::VersionMismatch {
            local_min: local.min_version,
            local_max: local.max_version,
            peer_min: peer.min_version,
            peer_max: peer.max_version,
        });
    }
    let roles_pair = matches!(
        (local.role, peer.role),
        (Role::Primary, Role::Standby) | (Role::Standby, Role::Primary)
    );
    if !roles_pair {
        return Err(HandshakeError::RoleMismatch {
            local: local.role,
            peer: peer.role,
        });
    }
    if peer.node_name != local.expected_peer_name {
        return Err(HandshakeError::WrongNode {
            expected: local.expected_peer_name.clone(),
            got: peer.node_name.clone(),
        });
    }
    check_geometry(&local.volumes, &peer.volumes)?;
    Ok(Negotiated { version: high })
}

/// Same volume ids on both sides with identical size and block size. Names
/// are labels and may differ.
fn check_geometry(local: &[VolumeGeometry], peer: &[VolumeGeometry]) -> Result<(), HandshakeError> {
    for l in local {
        let Some(p) = peer.iter().find(|p| p.id == l.id) else {
            return Err(HandshakeError::GeometryMismatch {
                volume: l.id,
                reason: "missing on peer".into(),
            });
        };
        if p.size_bytes != l.size_bytes || p.block_size != l.block_size {
            return Err(HandshakeError::GeometryMismatch {
                volume: l.id,
                reason: format!(
                    "local {} bytes / {}-byte blocks, peer {} bytes / {}-byte blocks",
                    l.size_bytes, l.block_size, p.size_bytes, p.block_size
                ),
            });
        }
    }
    if let Some(p) = peer.iter().find(|p| !local.iter().any(|l| l.id == p.id)) {
        return Err(HandshakeError::GeometryMismatch {
            volume: p.id,
            reason: "not configured locally".into(),
        });
    }
    Ok(())
}

/// Primary side, after [`validate_hello`]: decides where shipping resumes for
/// a standby whose Hello says it holds `peer_resume` durably, given the
/// journal's retained range `oldest_available..=last`.
pub fn plan_resume(
    negotiated: Negotiated,
    epoch: Epoch,
    peer_resume: Seq,
    oldest_available: Seq,
    last: Seq,
) -> Result<HelloAck, HandshakeError> {
    if peer_resume > last {
        return Err(HandshakeError::Diverged {
            resume: peer_resume,
            last,
        });
    }
    // The next record the standby needs must still be in the journal (or the
    // standby is already caught up).
    if peer_resume < last && peer_resume + 1 < oldest_available {
        return Err(HandshakeError::ResyncRequired {
            resume: peer_resume,
            oldest: oldest_available,
        });
    }
    Ok(HelloAck {
        epoch,
        version: negotiated.version,
        resume_seq: peer_resume,
        received_acks: false,
    })
}

/// Resume plan for a target the primary resyncs from its dirty-region bitmap: the
/// journal need not hold the standby's next record (the copy replaces it), so only
/// a standby claiming more than the primary has is refused (`Diverged`).
pub fn plan_resync(
    negotiated: Negotiated,
    epoch: Epoch,
    peer_resume: Seq,
    last: Seq,
) -> Result<HelloAck, HandshakeError> {
    if peer_resume > last {
        return Err(HandshakeError::Diverged {
            resume: peer_resume,
            last,
        });
    }
    Ok(HelloAck {
        epoch,
        version: negotiated.version,
        resume_seq: peer_resume,
        received_acks: false,
    })
}

/// The [`ProtocolVersion`] for a negotiated number, if this build knows it.
pub fn known_version(v: u16) -> Option<ProtocolVersion> {
    [
        ProtocolVersion::V1,
        ProtocolVersion::V2,
        ProtocolVersion::V3,
        ProtocolVersion::V4,
    ]
    .into_iter()
    .find(|k| k.as_u16() == v)
}

impl Negotiated {
    /// Whether the peer reads V2 tails (a primary's sync loss in heartbeats, its
    /// clock in ResyncBegin/ResyncEnd).
    pub fn has_v2_tails(&self) -> bool {
        self.version >= ProtocolVersion::V2.as_u16()
    }

    /// Whether the peer reads Packed frames (V3: zstd-compressed data frames and
    /// zero-filled writes sent as their length).
    pub fn has_packed(&self) -> bool {
        self.version >= ProtocolVersion::V3.as_u16()
    }

    /// Whether the peer can be asked for received acks (V4: `HelloAck::received_acks`,
    /// `Ack::received_seq`).
    pub fn has_received_acks(&self) -> bool {
        self.version >= ProtocolVersion::V4.as_u16()
    }
}

/// A receiver position moving from `previous` to `seq`: never past `limit` (the
/// position it trails: applied ≤ durable ≤ received), never backwards.
fn advance(
    (which, previous, seq): (&'static str, Seq, Seq),
    (limit_name, limit): (&'static str, Seq),
) -> Result<Seq, ReceiveError> {
    if seq > limit {
        return Err(ReceiveError::Beyond {
            which,
            seq,
            limit_name,
            limit,
        });
    }
    if seq < previous {
        return Err(ReceiveError::WentBackwards {
            which,
            previous,
            got: seq,
        });
    }
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const EPOCH: Epoch = 3;

    fn volume(id: u32, size_bytes: u64) -> VolumeGeometry {
        VolumeGeometry {
            id,
            name: format!("v{id}"),
            size_bytes,
            block_size: 4096,
        }
    }

    fn record(seq: Seq, volume: u32, op: RecordOp, offset: u64, length: u32) -> WireRecord {
        let data = match op {
            RecordOp::Write => Bytes::from(vec![7u8; length as usize]),
            _ => Bytes::new(),
        };
        WireRecord {
            seq,
            volume,
            op,
            offset,
            length,
            data,
        }
    }

    fn write_set(records: Vec<WireRecord>) -> WriteSet {
        WriteSet {
            epoch: EPOCH,
            first_seq: records[0].seq,
            last_seq: records[records.len() - 1].seq,
            timestamp_ns: 1,
            records,
        }
    }

    #[test]
    fn a_record_must_name_a_volume_and_end_within_it() {
        let vols = [volume(0, 1 << 20), volume(2, 8192)];
        let ok = |r: WireRecord| check_record_range(&r, &vols);
        assert_eq!(ok(record(1, 0, RecordOp::Write, 0, 4096)), Ok(()));
        assert_eq!(
            ok(record(1, 0, RecordOp::Write, (1 << 20) - 4096, 4096)),
            Ok(()),
            "up to the end"
        );
        assert_eq!(ok(record(1, 2, RecordOp::Trim, 4096, 4096)), Ok(()));
        assert_eq!(
            ok(record(1, 9, RecordOp::Seal, 0, 0)),
            Ok(()),
            "seals carry no range"
        );
        assert_eq!(
            ok(record(4, 0, RecordOp::Write, 1 << 20, 512)),
            Err(ReceiveError::OutOfRange {
                seq: 4,
                volume: 0,
                offset: 1 << 20,
                length: 512,
                size: 1 << 20
            })
        );
        assert!(matches!(
            ok(record(5, 2, RecordOp::WriteZeroes, 4096, 8192)),
            Err(ReceiveError::OutOfRange { seq: 5, .. })
        ));
        assert!(
            matches!(
                ok(record(6, 0, RecordOp::Trim, u64::MAX - 10, 4096)),
                Err(ReceiveError::OutOfRange { .. })
            ),
            "an offset that overflows"
        );
        assert_eq!(
            ok(record(7, 1, RecordOp::Write, 0, 512)),
            Err(ReceiveError::UnknownVolume { seq: 7, volume: 1 })
        );
    }

    /// A write-set with one record outside the replica is refused whole, with a
    /// resync request, and the receiver does not move: the next valid write-set at
    /// the same position is accepted.
    #[test]
    fn the_receiver_refuses_a_write_set_that_leaves_the_volumes() {
        let mut rx = Receiver::new(EPOCH, 10, 10).with_volumes(vec![volume(0, 1 << 20)]);
        let bad = write_set(vec![
            record(11, 0, RecordOp::Write, 0, 4096),
            record(12, 0, RecordOp::Write, (1 << 20) - 512, 4096),
        ]);
        let e = rx.on_write_set(bad).unwrap_err();
        assert!(matches!(e, ReceiveError::OutOfRange { seq: 12, .. }), "{e}");
        assert_eq!(e.code(), ErrorCode::ResyncRequired);
        let frame = e.to_error_frame(EPOCH);
        assert_eq!(
            (frame.epoch, frame.code),
            (EPOCH, ErrorCode::ResyncRequired)
        );
        assert!(frame.reason.contains("record 12"), "{}", frame.reason);
        assert_eq!(
            rx.received_seq(),
            10,
            "nothing of the refused write-set counts"
        );
        let good = write_set(vec![record(11, 0, RecordOp::Write, 0, 4096)]);
        assert_eq!(rx.on_write_set(good.clone()), Ok(Received::Accept(good)));
        assert_eq!(rx.received_seq(), 11);
    }

    /// A write-set after a gap is refused with an Error frame naming the gap.
    #[test]
    fn a_gap_is_refused_with_an_error_frame() {
        let mut rx = Receiver::new(EPOCH, 10, 10).with_volumes(vec![volume(0, 1 << 20)]);
        let e = rx
            .on_write_set(write_set(vec![record(13, 0, RecordOp::Write, 0, 512)]))
            .unwrap_err();
        assert_eq!(
            e,
            ReceiveError::Gap {
                expected: 11,
                got: 13
            }
        );
        let frame = e.to_error_frame(EPOCH);
        assert_eq!(frame.code, ErrorCode::Gap);
        assert!(
            frame.reason.contains("expected write-set starting at 11"),
            "{}",
            frame.reason
        );
        assert_eq!(rx.received_seq(), 10);
    }

    #[test]
    fn error_frame_reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(crate::wire::MAX_REASON_LEN);
        let f = error_frame(1, ErrorCode::Internal, long);
        assert!(f.reason.len() <= crate::wire::MAX_REASON_LEN);
        assert!(f.reason.chars().all(|c| c == 'é'));
    }
}
