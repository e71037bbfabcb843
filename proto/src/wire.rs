//! ferry's replication wire format: versioned, checksummed frames. No IO.
//!
//! Every frame is a fixed 32-byte little-endian header followed by a payload
//! whose layout depends on the frame type. The byte layouts are documented in
//! `proto/PROTOCOL.md`; the header is:
//!
//! ```text
//!  0      4        6      8       10        12         20           24            28           32
//!  +------+--------+------+-------+---------+----------+------------+-------------+------------+
//!  |magic |version |type  |flags  |reserved |epoch     |payload_len |payload_crc  |header_crc  |
//!  |u32   |u16     |u16   |u16    |u16 = 0  |u64       |u32         |u32 (CRC32C) |u32 (CRC32C)|
//!  +------+--------+------+-------+---------+----------+------------+-------------+------------+
//! ```
//!
//! The header CRC covers bytes 0..28, i.e. it also covers the payload CRC, so a
//! receiver can trust `payload_len` (and stop waiting for a corrupt length's
//! worth of bytes) before the payload has arrived.
//!
//! Decoding never panics and never allocates more than the input justifies:
//! every count is checked against the bytes that remain before a `Vec` is
//! sized from it. Record data in a decoded [`WriteSet`] are [`Bytes`] slices of
//! the received frame buffer, so the standby's journal writer can take them
//! without a copy.

use bytes::{BufMut, Bytes, BytesMut};
use ferry_codec::{rd_u16, rd_u32, rd_u64};
use thiserror::Error;

/// Global journal sequence number (one sequence for all volumes of a daemon).
/// 0 means "nothing": a node with no durable data resumes from 0.
pub type Seq = u64;
/// Role epoch, bumped on every role change; frames from an older epoch are
/// refused (fencing).
pub type Epoch = u64;

/// Protocol versions this build knows.
///
/// Changelog (one line per version; never reuse a number):
/// - `V1` (1): initial protocol — 32-byte header, Hello/HelloAck/WriteSet/Ack/Heartbeat/Error;
///   later in V1 (frame types a V1 peer without them refuses as unknown, so
///   nothing is misread): Handover/HandoverAck (16, 17), VerifyResult (18), and the
///   bitmap resync frames ResyncBegin/ResyncData/ResyncEnd (7, 8, 9).
/// - `V2` (2): optional tails — a primary's Heartbeat carries the target's sync loss
///   ([`SyncLoss`]), ResyncBegin/ResyncEnd carry the primary's clock. Only a frame
///   that carries a tail is a V2 frame (header version 2); every other frame is
///   encoded exactly as in V1, and a tail is sent only to a peer that negotiated V2.
/// - `V3` (3): the Packed frame (type 10, [`crate::packed`]): a WriteSet or ResyncData
///   payload compressed with zstd and/or with all-zero write records sent as their
///   length only. Only a Packed frame is a V3 frame; it is sent only to a peer that
///   negotiated V3 (an older peer gets the plain frames).
/// - `V4` (4): received acks (DRBD's protocol B) — a HelloAck may carry a tail asking
///   the standby to acknowledge write-sets it has *received* (checked and queued for
///   its journal) before they are durable ([`HelloAck::received_acks`]), and an Ack
///   may carry a tail with that position ([`Ack::received_seq`]). Only a HelloAck
///   that asks and an Ack whose received position is past its durable one are V4
///   frames; the primary asks only a peer that negotiated V4, and a standby sends V4
///   acks only when asked, so older peers never see one.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    V1 = 1,
    V2 = 2,
    V3 = 3,
    V4 = 4,
}

impl ProtocolVersion {
    pub const fn as_u16(self) -> u16 {
        self as u16
    }
}

/// Oldest version this build can speak.
pub const MIN_SUPPORTED_VERSION: ProtocolVersion = ProtocolVersion::V1;
/// Newest version this build can speak; what `encode` writes into headers.
pub const MAX_SUPPORTED_VERSION: ProtocolVersion = ProtocolVersion::V4;

/// `b"FRY1"` read as a little-endian u32, so a hex dump of a frame starts with "FRY1".
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
pub const HEADER_LEN: usize = 32;
/// Default bound on a frame's payload. A write-set is sealed well below this on
/// the primary (size limit), so a larger length can only be corruption or abuse.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024 * 1024;
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_VOLUMES: usize = 256;
pub const MAX_REASON_LEN: usize = 1024;
/// A bookmark label carried in a seal record's data.
pub const MAX_SEAL_LABEL_LEN: usize = 256;
/// Bound on records per write-set, independent of the payload bound, so a
/// receiver's per-write-set bookkeeping stays small.
pub const MAX_RECORDS_PER_WRITE_SET: usize = 131_072;
/// Bound on extents per ResyncData frame (same reasoning).
pub const MAX_RESYNC_EXTENTS: usize = 65_536;

pub(crate) const WRITE_SET_FIXED_LEN: usize = 32;
pub(crate) const RECORD_HEADER_LEN: usize = 32;
const HELLO_FIXED_LEN: usize = 48;
/// Bit 0 of a V4 HelloAck's flags: send received acks.
pub const HELLO_ACK_RECEIVED_ACKS: u32 = 1;
const VOLUME_FIXED_LEN: usize = 17;
pub(crate) const RESYNC_EXTENT_HEADER_LEN: usize = 24;

// Compile-time layout checks: a change here is a protocol change.
const _: () = assert!(HEADER_LEN == 4 + 2 + 2 + 2 + 2 + 8 + 4 + 4 + 4);
const _: () = assert!(RECORD_HEADER_LEN == 8 + 8 + 4 + 4 + 1 + 3 + 4);
const _: () = assert!(HELLO_FIXED_LEN == 2 + 2 + 1 + 1 + 2 + 16 + 16 + 8);
const _: () = assert!(RESYNC_EXTENT_HEADER_LEN == 8 + 4 + 4 + 1 + 3 + 4);
const _: () = assert!(MAX_PAYLOAD_LEN <= u32::MAX as usize);

/// Frame type codes (header bytes 6..8).
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    Hello = 1,
    HelloAck = 2,
    WriteSet = 3,
    Ack = 4,
    Heartbeat = 5,
    Error = 6,
    /// Primary → standby, data stream: a bitmap resync starts (see [`ResyncBegin`]).
    ResyncBegin = 7,
    /// Primary → standby, data stream: current contents of dirty regions.
    ResyncData = 8,
    /// Primary → standby, data stream: the copy is complete; streaming follows.
    ResyncEnd = 9,
    /// Primary → standby, data stream (V3): a WriteSet or ResyncData packed (zstd,
    /// zero records as their length) — see [`crate::packed`].
    Packed = 10,
    /// Planned switchover, primary → standby: "take over at `seq`".
    Handover = 16,
    /// Standby → primary: "I hold `seq` and am the primary of `new_epoch`".
    HandoverAck = 17,
    /// Standby → primary: chunk digests of a volume at a verify point.
    VerifyResult = 18,
    /// Primary → standby during a resync: "send the digests of your replica".
    DigestRequest = 19,
}

impl FrameType {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::WriteSet,
            4 => Self::Ack,
            5 => Self::Heartbeat,
            6 => Self::Error,
            7 => Self::ResyncBegin,
            8 => Self::ResyncData,
            9 => Self::ResyncEnd,
            10 => Self::Packed,
            16 => Self::Handover,
            17 => Self::HandoverAck,
            18 => Self::VerifyResult,
            19 => Self::DigestRequest,
            _ => return None,
        })
    }
}

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary = 1,
    Standby = 2,
}

impl Role {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Primary),
            2 => Some(Self::Standby),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeGeometry {
    pub id: u32,
    /// Operator label, ≤ [`MAX_NAME_LEN`] bytes of UTF-8. Not part of the
    /// geometry check: renaming a volume must not break replication.
    pub name: String,
    pub size_bytes: u64,
    /// Power of two, ≥ 512.
    pub block_size: u32,
}

/// Sent by both sides first thing on a connection (symmetric, so neither side
/// waits a round trip for the other's identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Carried in the frame header.
    pub epoch: Epoch,
    pub min_version: u16,
    pub max_version: u16,
    pub cluster_id: [u8; 16],
    pub node_id: [u8; 16],
    pub node_name: String,
    pub role: Role,
    pub volumes: Vec<VolumeGeometry>,
    /// Last sequence durable on the sender. From a standby: the primary resumes
    /// after it. From a primary: its newest journaled sequence (informational;
    /// lets the standby see how far behind it is before data flows).
    pub resume_position: Seq,
}

/// Sent by the primary only, after it validated the standby's Hello: the
/// version both will speak and the sequence after which it resumes shipping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub epoch: Epoch,
    pub version: u16,
    pub resume_seq: Seq,
    /// V4 tail: the primary asks for received acks ([`Ack::received_seq`]): it has
    /// client writes whose replies wait until this standby has received them (a sync
    /// target of a writeback volume). `false`: a V1 HelloAck (durable acks only).
    pub received_acks: bool,
}

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordOp {
    Write = 1,
    Trim = 2,
    WriteZeroes = 3,
    /// Seals a write-set / names a bookmark; data is an optional label.
    Seal = 4,
}

impl RecordOp {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Write,
            2 => Self::Trim,
            3 => Self::WriteZeroes,
            4 => Self::Seal,
            _ => return None,
        })
    }

    /// Whether the record's `data` must be exactly `length` bytes (otherwise empty).
    fn carries_data(self) -> bool {
        matches!(self, Self::Write | Self::Seal)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireRecord {
    pub seq: Seq,
    pub volume: u32,
    pub op: RecordOp,
    pub offset: u64,
    pub length: u32,
    /// `length` bytes for Write and Seal, empty for Trim and WriteZeroes.
    pub data: Bytes,
}

/// An ordered write-set: records `first_seq..=last_seq`, contiguous, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSet {
    /// Carried in the frame header.
    pub epoch: Epoch,
    pub first_seq: Seq,
    pub last_seq: Seq,
    /// Primary's wall clock when the write-set was sealed (for RPO / PIT).
    pub timestamp_ns: u64,
    pub records: Vec<WireRecord>,
}

impl WriteSet {
    /// Payload bytes this write-set occupies on the wire (header excluded).
    pub fn payload_len(&self) -> usize {
        self.records.iter().fold(WRITE_SET_FIXED_LEN, |acc, r| {
            acc.saturating_add(RECORD_HEADER_LEN)
                .saturating_add(r.data.len())
        })
    }

    /// Full frame length on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN.saturating_add(self.payload_len())
    }

    /// The part of this write-set after `seq`: used to trim a partially
    /// overlapping resend (receiver) or a partially acknowledged entry (sender).
    /// `None` if nothing remains. Record data are shared, not copied.
    pub fn after(&self, seq: Seq) -> Option<WriteSet> {
        if seq >= self.last_seq {
            return None;
        }
        if seq < self.first_seq {
            return Some(self.clone());
        }
        let records: Vec<WireRecord> = self
            .records
            .iter()
            .filter(|r| r.seq > seq)
            .cloned()
            .collect();
        Some(WriteSet {
            epoch: self.epoch,
            first_seq: seq + 1,
            last_seq: self.last_seq,
            timestamp_ns: self.timestamp_ns,
            records,
        })
    }
}

/// Every position is cumulative: "every seq ≤ this is received / durable / applied",
/// and `applied_seq ≤ received_durable_seq ≤ received_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub epoch: Epoch,
    pub received_durable_seq: Seq,
    /// Always ≤ `received_durable_seq` (the standby applies only what is durable).
    pub applied_seq: Seq,
    /// Every seq ≤ this passed the standby's checks and is queued for its journal
    /// (held in its memory: a primary crash alone does not lose it; a standby crash
    /// before it is durable does). V4 tail, sent only to a primary that asked
    /// ([`HelloAck::received_acks`]) and only when above `received_durable_seq`; a V1
    /// ack means `received_seq == received_durable_seq`.
    pub received_seq: Seq,
}

impl Ack {
    /// A durable ack (V1 layout: nothing received beyond what is durable).
    pub fn durable(epoch: Epoch, durable: Seq, applied: Seq) -> Ack {
        Ack {
            epoch,
            received_durable_seq: durable,
            applied_seq: applied,
            received_seq: durable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub epoch: Epoch,
    /// Sender's clock. Only the sender compares it, so clocks need not agree.
    pub sent_at_ns: u64,
    /// In a reply, the `sent_at_ns` of the heartbeat it answers, so the peer measures
    /// RTT on its own clock; 0 in a heartbeat that answers nothing.
    pub echo_ns: u64,
    /// Sender's newest sequence (primary: journaled; standby: durable).
    pub last_seq: Seq,
    /// V2 tail, primary → standby only: whether this standby is recorded as having
    /// lost sync (see [`SyncLoss`]). `None`: a V1 heartbeat (says nothing).
    pub sync_loss: Option<SyncLoss>,
}

/// What a primary's V2 heartbeat tells its standby about synchronous replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncLoss {
    /// Every write the primary acknowledged is on this standby (or it is async).
    None,
    /// A sync target degraded at `seq`: the primary acknowledged writes after it that
    /// this standby may not hold, so promoting it may lose acknowledged writes.
    DegradedAt(Seq),
}

/// Error codes carried in an Error frame. Unknown codes from a newer peer are
/// kept as [`ErrorCode::Unknown`] rather than failing the decode: the
/// connection is ending anyway and the reason text is still worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    WrongCluster,
    WrongNode,
    StaleEpoch,
    VersionMismatch,
    GeometryMismatch,
    Gap,
    RoleMismatch,
    /// The peer claims data this node never had (histories diverged).
    Diverged,
    /// The resume point is no longer in the primary's journal.
    ResyncRequired,
    /// A frame failed to decode or broke the protocol.
    Protocol,
    Internal,
    Unknown(u32),
}

impl ErrorCode {
    pub fn to_u32(self) -> u32 {
        match self {
            Self::WrongCluster => 1,
            Self::WrongNode => 2,
            Self::StaleEpoch => 3,
            Self::VersionMismatch => 4,
            Self::GeometryMismatch => 5,
            Self::Gap => 6,
            Self::RoleMismatch => 7,
            Self::Diverged => 8,
            Self::ResyncRequired => 9,
            Self::Protocol => 10,
            Self::Internal => 11,
            Self::Unknown(v) => v,
        }
    }

    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::WrongCluster,
            2 => Self::WrongNode,
            3 => Self::StaleEpoch,
            4 => Self::VersionMismatch,
            5 => Self::GeometryMismatch,
            6 => Self::Gap,
            7 => Self::RoleMismatch,
            8 => Self::Diverged,
            9 => Self::ResyncRequired,
            10 => Self::Protocol,
            11 => Self::Internal,
            other => Self::Unknown(other),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub epoch: Epoch,
    pub code: ErrorCode,
    /// ≤ [`MAX_REASON_LEN`] bytes of UTF-8.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    WriteSet(WriteSet),
    Ack(Ack),
    Heartbeat(Heartbeat),
    Error(ErrorFrame),
    Handover(Handover),
    HandoverAck(HandoverAck),
    VerifyResult(VerifyResult),
    ResyncBegin(ResyncBegin),
    ResyncData(ResyncData),
    ResyncEnd(ResyncEnd),
    DigestRequest(DigestRequest),
    /// A WriteSet or ResyncData as packed on the wire (V3): holds both the wire body
    /// and the frame it decodes to.
    Packed(crate::packed::Packed),
}

/// Asks a standby being resynced for the chunk digests of its replica volumes (as
/// they are: nothing is written to them before the copy starts); it answers with one
/// [`VerifyResult`] per volume carrying `id`. Chunks that already match are not copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestRequest {
    pub epoch: Epoch,
    pub id: u64,
    pub chunk_size: u64,
    pub seed: u64,
    /// Hash algorithm id (`chunks::ChunkHash::id`).
    pub algo: u32,
}

/// A bitmap resync starts (primary → standby, first frame on the data stream of
/// a session with a target in bitmap mode). The standby's last consistent point
/// is `from_seq`; what follows are the current contents of every region written
/// since (ResyncData), then ResyncEnd, then write-sets from `snapshot_seq + 1` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncBegin {
    pub epoch: Epoch,
    /// The standby's resume position from its Hello (echoed, checked).
    pub from_seq: Seq,
    /// Every record up to it is reflected in the copied data; the stream resumes
    /// after it. `>= from_seq`.
    pub snapshot_seq: Seq,
    /// Bytes the copy will cover (dirty regions at the start; informational).
    pub total_bytes: u64,
    /// The dirty map's region size (informational).
    pub region_size: u32,
    /// V2 tail: the primary's wall clock when the snapshot was taken (what the
    /// standby stamps the transition's recovery points with). `None`: a V1 frame.
    pub primary_time_ns: Option<u64>,
}

/// One range of a volume in a ResyncData frame: its current bytes, or zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncExtent {
    pub volume: u32,
    pub offset: u64,
    /// Bytes covered, > 0.
    pub length: u32,
    /// `None`: the range holds zeros (a hole or zeroed blocks), no bytes are sent.
    pub data: Option<Bytes>,
}

/// Current contents of dirty regions (primary → standby, data stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncData {
    pub epoch: Epoch,
    /// 1 ..= [`MAX_RESYNC_EXTENTS`].
    pub extents: Vec<ResyncExtent>,
}

impl ResyncData {
    /// Payload bytes on the wire.
    pub fn payload_len(&self) -> usize {
        self.extents.iter().fold(8usize, |acc, x| {
            acc.saturating_add(RESYNC_EXTENT_HEADER_LEN)
                .saturating_add(x.data.as_ref().map_or(0, |d| d.len()))
        })
    }
}

/// The copy is complete (primary → standby, data stream). Once every record up to
/// `through_seq` is applied over the copied data, the replica is a consistent
/// image of the primary again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncEnd {
    pub epoch: Epoch,
    /// The primary's durable position when the copy ended.
    pub through_seq: Seq,
    /// Bytes the copy covered (data and zero extents) and bytes sent as data.
    pub bytes: u64,
    pub data_bytes: u64,
    /// V2 tail: the primary's wall clock when the copy ended. `None`: a V1 frame.
    pub primary_time_ns: Option<u64>,
}

/// A standby's answer to a verify request that travelled in the stream as a seal
/// label: the digests of one volume at that point, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyResult {
    pub epoch: Epoch,
    pub id: u64,
    pub volume: u32,
    /// `true`: `body` is an encoded chunk list; `false`: `body` is a UTF-8 reason.
    pub ok: bool,
    pub body: Bytes,
}

/// Planned switchover: the primary has stopped taking writes and every record up to
/// `seq` is durable on the standby; the standby is to become the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    pub epoch: Epoch,
    /// The primary's last journaled sequence (the fork point of the new epoch).
    pub seq: Seq,
}

/// The standby's answer to [`Handover`]: it holds `seq` durably and has recorded
/// itself as the primary of `new_epoch` (the old primary follows it from there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverAck {
    pub epoch: Epoch,
    pub seq: Seq,
    pub new_epoch: Epoch,
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::HelloAck(_) => FrameType::HelloAck,
            Self::WriteSet(_) => FrameType::WriteSet,
            Self::Ack(_) => FrameType::Ack,
            Self::Heartbeat(_) => FrameType::Heartbeat,
            Self::Handover(_) => FrameType::Handover,
            Self::HandoverAck(_) => FrameType::HandoverAck,
            Self::VerifyResult(_) => FrameType::VerifyResult,
            Self::DigestRequest(_) => FrameType::DigestRequest,
            Self::ResyncBegin(_) => FrameType::ResyncBegin,
            Self::ResyncData(_) => FrameType::ResyncData,
            Self::ResyncEnd(_) => FrameType::ResyncEnd,
            Self::Packed(_) => FrameType::Packed,
            Self::Error(_) => FrameType::Error,
        }
    }

    pub fn epoch(&self) -> Epoch {
        match self {
            Self::Hello(f) => f.epoch,
            Self::HelloAck(f) => f.epoch,
            Self::WriteSet(f) => f.epoch,
            Self::Ack(f) => f.epoch,
            Self::Heartbeat(f) => f.epoch,
            Self::Error(f) => f.epoch,
            Self::Handover(f) => f.epoch,
            Self::HandoverAck(f) => f.epoch,
            Self::VerifyResult(f) => f.epoch,
            Self::DigestRequest(f) => f.epoch,
            Self::ResyncBegin(f) => f.epoch,
            Self::ResyncData(f) => f.epoch,
            Self::ResyncEnd(f) => f.epoch,
            Self::Packed(f) => f.epoch(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    Header,
    Payload,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("bad magic {got:#010x} (expected {MAGIC:#010x}): not a ferry frame")]
    BadMagic { got: u32 },
    #[error("unsupported protocol version {got} (supported {min}..={max})")]
    UnsupportedVersion { got: u16, min: u16, max: u16 },
    #[error("unknown frame type {got}")]
    UnknownFrameType { got: u16 },
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("payload of {len} bytes exceeds limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("{which:?} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        which: ChecksumKind,
        stored: u32,
        computed: u32,
    },
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// A previous error lost the stream's framing; the connection must be dropped.
    #[error("decoder poisoned by an earlier error")]
    Poisoned,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("payload of {len} bytes exceeds limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

/// A field that breaks a frame invariant; shared by encoder and decoder so
/// that whatever encodes also decodes.
#[derive(Debug)]
pub(crate) struct Invalid {
    field: &'static str,
    reason: String,
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

impl From<Invalid> for DecodeError {
    fn from(i: Invalid) -> Self {
        DecodeError::InvalidField {
            field: i.field,
            reason: i.reason,
        }
    }
}

impl From<Invalid> for EncodeError {
    fn from(i: Invalid) -> Self {
        EncodeError::InvalidField {
            field: i.field,
            reason: i.reason,
        }
    }
}

// ---------------------------------------------------------------------------
// Validation (shared by encode and decode)

fn check_name(field: &'static str, name: &str, max: usize) -> Result<(), Invalid> {
    if name.len() > max {
        return Err(invalid(field, format!("{} bytes > {max}", name.len())));
    }
    Ok(())
}

fn validate_hello(h: &Hello) -> Result<(), Invalid> {
    if h.min_version == 0 || h.min_version > h.max_version {
        return Err(invalid(
            "hello.version_range",
            format!("min {} max {}", h.min_version, h.max_version),
        ));
    }
    check_name("hello.node_name", &h.node_name, MAX_NAME_LEN)?;
    if h.volumes.len() > MAX_VOLUMES {
        return Err(invalid(
            "hello.volumes",
            format!("{} volumes > {MAX_VOLUMES}", h.volumes.len()),
        ));
    }
    for (i, v) in h.volumes.iter().enumerate() {
        check_name("hello.volume.name", &v.name, MAX_NAME_LEN)?;
        if v.block_size < 512 || !v.block_size.is_power_of_two() {
            return Err(invalid(
                "hello.volume.block_size",
                format!(
                    "volume {}: {} is not a power of two ≥ 512",
                    v.id, v.block_size
                ),
            ));
        }
        if v.size_bytes % u64::from(v.block_size) != 0 {
            return Err(invalid(
                "hello.volume.size_bytes",
                format!(
                    "volume {}: {} is not a multiple of {}",
                    v.id, v.size_bytes, v.block_size
                ),
            ));
        }
        // Bounded by MAX_VOLUMES, so quadratic is 64K comparisons at most.
        if h.volumes[..i].iter().any(|w| w.id == v.id) {
            return Err(invalid("hello.volume.id", format!("duplicate id {}", v.id)));
        }
    }
    Ok(())
}

fn validate_record(r: &WireRecord) -> Result<(), Invalid> {
    let expected_data = if r.op.carries_data() {
        r.length as usize
    } else {
        0
    };
    if r.data.len() != expected_data {
        return Err(invalid(
            "record.data",
            format!(
                "seq {}: {:?} of length {} carries {} data bytes",
                r.seq,
                r.op,
                r.length,
                r.data.len()
            ),
        ));
    }
    match r.op {
        RecordOp::Seal if r.data.len() > MAX_SEAL_LABEL_LEN => {
            return Err(invalid(
                "record.length",
                format!(
                    "seq {}: seal label {} bytes > {MAX_SEAL_LABEL_LEN}",
                    r.seq, r.length
                ),
            ));
        }
        RecordOp::Write | RecordOp::Trim | RecordOp::WriteZeroes if r.length == 0 => {
            return Err(invalid(
                "record.length",
                format!("seq {}: zero-length {:?}", r.seq, r.op),
            ));
        }
        _ => {}
    }
    if r.offset.checked_add(u64::from(r.length)).is_none() {
        return Err(invalid(
            "record.offset",
            format!(
                "seq {}: offset {} + length {} overflows",
                r.seq, r.offset, r.length
            ),
        ));
    }
    Ok(())
}

pub(crate) fn validate_write_set(ws: &WriteSet) -> Result<(), Invalid> {
    if ws.first_seq == 0 || ws.first_seq > ws.last_seq {
        return Err(invalid(
            "write_set.seq_range",
            format!("first {} last {}", ws.first_seq, ws.last_seq),
        ));
    }
    // Records are the contiguous range first..=last: this is what lets the
    // receiver detect gaps and trim overlaps by sequence alone.
    let span = ws.last_seq - ws.first_seq;
    if span >= MAX_RECORDS_PER_WRITE_SET as u64 || ws.records.len() as u64 != span + 1 {
        return Err(invalid(
            "write_set.records",
            format!(
                "{} records for seq range {}..={} (max {MAX_RECORDS_PER_WRITE_SET})",
                ws.records.len(),
                ws.first_seq,
                ws.last_seq
            ),
        ));
    }
    for (i, r) in ws.records.iter().enumerate() {
        let want = ws.first_seq + i as u64;
        if r.seq != want {
            return Err(invalid(
                "record.seq",
                format!("record {i} has seq {}, expected {want}", r.seq),
            ));
        }
        validate_record(r)?;
    }
    Ok(())
}

fn validate_ack(a: &Ack) -> Result<(), Invalid> {
    if a.received_durable_seq > a.received_seq {
        return Err(invalid(
            "ack.received_seq",
            format!(
                "received {} < received durable {}",
                a.received_seq, a.received_durable_seq
            ),
        ));
    }
    if a.applied_seq > a.received_durable_seq {
        return Err(invalid(
            "ack.applied_seq",
            format!(
                "applied {} > received durable {}",
                a.applied_seq, a.received_durable_seq
            ),
        ));
    }
    Ok(())
}

pub(crate) fn validate_resync_data(d: &ResyncData) -> Result<(), Invalid> {
    if d.extents.is_empty() || d.extents.len() > MAX_RESYNC_EXTENTS {
        return Err(invalid(
            "resync_data.extents",
            format!("{} extents (1..={MAX_RESYNC_EXTENTS})", d.extents.len()),
        ));
    }
    for (i, x) in d.extents.iter().enumerate() {
        if x.length == 0 {
            return Err(invalid("resync_extent.length", format!("extent {i}: 0")));
        }
        if x.offset.checked_add(u64::from(x.length)).is_none() {
            return Err(invalid(
                "resync_extent.offset",
                format!("extent {i}: {} + {} overflows", x.offset, x.length),
            ));
        }
        if let Some(data) = &x.data {
            if data.len() != x.length as usize {
                return Err(invalid(
                    "resync_extent.data",
                    format!("extent {i}: {} bytes for length {}", data.len(), x.length),
                ));
            }
        }
    }
    Ok(())
}

fn validate_frame(frame: &Frame) -> Result<(), Invalid> {
    match frame {
        Frame::ResyncBegin(b) if b.snapshot_seq < b.from_seq => Err(invalid(
            "resync_begin.snapshot_seq",
            format!("{} is below from_seq {}", b.snapshot_seq, b.from_seq),
        )),
        Frame::ResyncBegin(_) | Frame::ResyncEnd(_) => Ok(()),
        Frame::ResyncData(d) => validate_resync_data(d),
        Frame::Hello(h) => validate_hello(h),
        Frame::HelloAck(_) | Frame::Heartbeat(_) | Frame::Handover(_) => Ok(()),
        Frame::HandoverAck(a) if a.new_epoch <= a.epoch => Err(invalid(
            "handover_ack.new_epoch",
            format!("{} is not above the epoch {}", a.new_epoch, a.epoch),
        )),
        Frame::HandoverAck(_) => Ok(()),
        Frame::VerifyResult(v) if v.body.len() > MAX_PAYLOAD_LEN - 16 => Err(invalid(
            "verify_result.body",
            format!("{} bytes > {}", v.body.len(), MAX_PAYLOAD_LEN - 16),
        )),
        Frame::VerifyResult(_) | Frame::DigestRequest(_) => Ok(()),
        Frame::WriteSet(ws) => validate_write_set(ws),
        Frame::Ack(a) => validate_ack(a),
        Frame::Error(e) => check_name("error.reason", &e.reason, MAX_REASON_LEN),
        // Checked when built (`Packed::pack`) and when decoded.
        Frame::Packed(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Encoding

/// The version of a frame's layout: V2 if it carries a V2 tail, V4 if a V4 tail,
/// else V1 (so a V1 peer reads every frame a newer sender sends it: the sender adds
/// tails only after negotiating their version).
pub fn frame_version(frame: &Frame) -> ProtocolVersion {
    match frame {
        Frame::Ack(a) if a.received_seq > a.received_durable_seq => return ProtocolVersion::V4,
        Frame::HelloAck(a) if a.received_acks => return ProtocolVersion::V4,
        _ => {}
    }
    let tail = match frame {
        Frame::Heartbeat(hb) => hb.sync_loss.is_some(),
        Frame::ResyncBegin(b) => b.primary_time_ns.is_some(),
        Frame::ResyncEnd(e) => e.primary_time_ns.is_some(),
        Frame::Packed(_) => return ProtocolVersion::V3,
        _ => false,
    };
    if tail {
        ProtocolVersion::V2
    } else {
        ProtocolVersion::V1
    }
}

fn write_header(
    out: &mut [u8],
    (frame_type, version): (FrameType, ProtocolVersion),
    epoch: Epoch,
    payload_len: usize,
    payload_crc: u32,
) {
    debug_assert!(out.len() >= HEADER_LEN);
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&version.as_u16().to_le_bytes());
    h[6..8].copy_from_slice(&(frame_type as u16).to_le_bytes());
    // 8..10 flags and 10..12 reserved stay zero in V1.
    h[12..20].copy_from_slice(&epoch.to_le_bytes());
    // Caller checked payload_len ≤ MAX_PAYLOAD_LEN ≤ u32::MAX.
    h[20..24].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&header_crc.to_le_bytes());
    out[..HEADER_LEN].copy_from_slice(&h);
}

fn put_hello(out: &mut BytesMut, h: &Hello) {
    out.put_u16_le(h.min_version);
    out.put_u16_le(h.max_version);
    out.put_u8(h.role as u8);
    out.put_u8(h.node_name.len() as u8); // validated ≤ 64
    out.put_u16_le(h.volumes.len() as u16); // validated ≤ 256
    out.put_slice(&h.cluster_id);
    out.put_slice(&h.node_id);
    out.put_u64_le(h.resume_position);
    out.put_slice(h.node_name.as_bytes());
    for v in &h.volumes {
        out.put_u32_le(v.id);
        out.put_u32_le(v.block_size);
        out.put_u64_le(v.size_bytes);
        out.put_u8(v.name.len() as u8); // validated ≤ 64
        out.put_slice(v.name.as_bytes());
    }
}

pub(crate) fn put_write_set_fixed(out: &mut BytesMut, ws: &WriteSet) {
    out.put_u64_le(ws.first_seq);
    out.put_u64_le(ws.last_seq);
    out.put_u64_le(ws.timestamp_ns);
    out.put_u32_le(ws.records.len() as u32); // validated ≤ MAX_RECORDS_PER_WRITE_SET
    out.put_u32_le(0); // reserved
}

pub(crate) fn put_record_header(out: &mut BytesMut, r: &WireRecord) {
    out.put_u64_le(r.seq);
    out.put_u64_le(r.offset);
    out.put_u32_le(r.volume);
    out.put_u32_le(r.length);
    out.put_u8(r.op as u8);
    out.put_slice(&[0u8; 3]); // reserved
    out.put_u32_le(r.data.len() as u32); // validated == length or 0
}

pub(crate) fn put_payload(out: &mut BytesMut, frame: &Frame) {
    match frame {
        Frame::Hello(h) => put_hello(out, h),
        Frame::HelloAck(a) => put_hello_ack(out, a),
        Frame::WriteSet(ws) => put_write_set(out, ws),
        Frame::Ack(a) => put_ack(out, a),
        Frame::Heartbeat(hb) => put_heartbeat(out, hb),
        Frame::Handover(h) => out.put_u64_le(h.seq),
        Frame::DigestRequest(d) => put_digest_request(out, d),
        Frame::VerifyResult(v) => put_verify_result(out, v),
        Frame::HandoverAck(a) => put_handover_ack(out, a),
        Frame::ResyncBegin(b) => put_resync_begin(out, b),
        Frame::ResyncData(d) => put_resync_data(out, d),
        Frame::ResyncEnd(e) => put_resync_end(out, e),
        Frame::Packed(p) => p.put_payload(out),
        Frame::Error(e) => put_error(out, e),
    }
}

/// The V4 tail (received acks asked for) only when set: a HelloAck without it reads
/// as V1 (durable acks only).
fn put_hello_ack(out: &mut BytesMut, a: &HelloAck) {
    out.put_u16_le(a.version);
    out.put_u16_le(0);
    out.put_u32_le(0);
    out.put_u64_le(a.resume_seq);
    if a.received_acks {
        out.put_u32_le(HELLO_ACK_RECEIVED_ACKS);
        out.put_u32_le(0); // reserved
    }
}

fn put_write_set(out: &mut BytesMut, ws: &WriteSet) {
    put_write_set_fixed(out, ws);
    for r in &ws.records {
        put_record_header(out, r);
        out.put_slice(&r.data);
    }
}

/// `received_seq` (V4 tail) only when above the durable one: a V1 ack means the
/// two are equal.
fn put_ack(out: &mut BytesMut, a: &Ack) {
    out.put_u64_le(a.received_durable_seq);
    out.put_u64_le(a.applied_seq);
    if a.received_seq > a.received_durable_seq {
        out.put_u64_le(a.received_seq);
    }
}

/// The sync-loss tail (V2) only when there is one: `None` is a V1 heartbeat.
fn put_heartbeat(out: &mut BytesMut, hb: &Heartbeat) {
    out.put_u64_le(hb.sent_at_ns);
    out.put_u64_le(hb.echo_ns);
    out.put_u64_le(hb.last_seq);
    if let Some(loss) = hb.sync_loss {
        let (flags, at) = match loss {
            SyncLoss::None => (0u32, 0u64),
            SyncLoss::DegradedAt(at) => (1, at),
        };
        out.put_u32_le(flags);
        out.put_u32_le(0); // reserved
        out.put_u64_le(at);
    }
}

fn put_digest_request(out: &mut BytesMut, d: &DigestRequest) {
    out.put_u64_le(d.id);
    out.put_u64_le(d.chunk_size);
    out.put_u64_le(d.seed);
    out.put_u32_le(d.algo);
    out.put_u32_le(0);
}

fn put_verify_result(out: &mut BytesMut, v: &VerifyResult) {
    out.put_u64_le(v.id);
    out.put_u32_le(v.volume);
    out.put_u32_le(u32::from(!v.ok));
    out.put_slice(&v.body);
}

fn put_handover_ack(out: &mut BytesMut, a: &HandoverAck) {
    out.put_u64_le(a.seq);
    out.put_u64_le(a.new_epoch);
}

/// The primary's clock (V2 tail) only when known: `None` is a V1 frame.
fn put_resync_begin(out: &mut BytesMut, b: &ResyncBegin) {
    out.put_u64_le(b.from_seq);
    out.put_u64_le(b.snapshot_seq);
    out.put_u64_le(b.total_bytes);
    out.put_u32_le(b.region_size);
    out.put_u32_le(0); // reserved
    if let Some(t) = b.primary_time_ns {
        out.put_u64_le(t);
    }
}

fn put_resync_data(out: &mut BytesMut, d: &ResyncData) {
    out.put_u32_le(d.extents.len() as u32); // validated ≤ MAX_RESYNC_EXTENTS
    out.put_u32_le(0); // reserved
    for x in &d.extents {
        out.put_u64_le(x.offset);
        out.put_u32_le(x.volume);
        out.put_u32_le(x.length);
        out.put_u8(if x.data.is_some() { 1 } else { 2 });
        out.put_slice(&[0u8; 3]); // reserved
        match &x.data {
            Some(d) => {
                out.put_u32_le(d.len() as u32); // validated == length
                out.put_slice(d);
            }
            None => out.put_u32_le(0),
        }
    }
}

/// The primary's clock (V2 tail) only when known: `None` is a V1 frame.
fn put_resync_end(out: &mut BytesMut, e: &ResyncEnd) {
    out.put_u64_le(e.through_seq);
    out.put_u64_le(e.bytes);
    out.put_u64_le(e.data_bytes);
    if let Some(t) = e.primary_time_ns {
        out.put_u64_le(t);
    }
}

fn put_error(out: &mut BytesMut, e: &ErrorFrame) {
    out.put_u32_le(e.code.to_u32());
    out.put_u16_le(e.reason.len() as u16); // validated ≤ 1024
    out.put_u16_le(0);
    out.put_slice(e.reason.as_bytes());
}

/// Encodes one frame (copying record data; see [`encode_write_set_vectored`]
/// for the sender's copy-free path).
///
/// Returns an error rather than writing a frame the peer would reject: an
/// invariant broken here is a local bug, best caught before it costs a
/// reconnect.
pub fn encode(frame: &Frame) -> Result<BytesMut, EncodeError> {
    validate_frame(frame)?;
    // Refuse an oversized write-set or resync batch before allocating for it.
    let big = match frame {
        Frame::WriteSet(ws) => Some(ws.payload_len()),
        Frame::ResyncData(d) => Some(d.payload_len()),
        Frame::Packed(p) => Some(p.payload_len()),
        _ => None,
    };
    if let Some(len) = big.filter(|&l| l > MAX_PAYLOAD_LEN) {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let mut out = BytesMut::with_capacity(HEADER_LEN + big.unwrap_or(128));
    out.put_bytes(0, HEADER_LEN);
    put_payload(&mut out, frame);
    let payload_len = out.len() - HEADER_LEN;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(EncodeError::TooLarge {
            len: payload_len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let payload_crc = crc32c::crc32c(&out[HEADER_LEN..]);
    write_header(
        &mut out,
        (frame.frame_type(), frame_version(frame)),
        frame.epoch(),
        payload_len,
        payload_crc,
    );
    Ok(out)
}

/// Encodes a write-set as a list of buffers for a vectored write: frame and
/// record headers live in one allocation (sliced), record data are the
/// caller's own `Bytes`, so no record data are copied.
pub fn encode_write_set_vectored(ws: &WriteSet) -> Result<Vec<Bytes>, EncodeError> {
    validate_write_set(ws)?;
    let payload_len = ws.payload_len();
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(EncodeError::TooLarge {
            len: payload_len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    let meta_len = HEADER_LEN + WRITE_SET_FIXED_LEN + RECORD_HEADER_LEN * ws.records.len();
    let mut meta = BytesMut::with_capacity(meta_len);
    meta.put_bytes(0, HEADER_LEN);
    put_write_set_fixed(&mut meta, ws);
    // Offsets in `meta` after which a record's data goes on the wire.
    let mut cuts: Vec<(usize, &Bytes)> = Vec::new();
    for r in &ws.records {
        put_record_header(&mut meta, r);
        if !r.data.is_empty() {
            cuts.push((meta.len(), &r.data));
        }
    }
    // The CRC runs over the payload in wire order: metadata pieces
    // interleaved with record data.
    let mut crc = 0u32;
    let mut prev = HEADER_LEN;
    for (cut, data) in &cuts {
        crc = crc32c::crc32c_append(crc, &meta[prev..*cut]);
        crc = crc32c::crc32c_append(crc, data);
        prev = *cut;
    }
    crc = crc32c::crc32c_append(crc, &meta[prev..]);
    write_header(
        &mut meta,
        (FrameType::WriteSet, ProtocolVersion::V1),
        ws.epoch,
        payload_len,
        crc,
    );

    let meta = meta.freeze();
    let mut parts = Vec::with_capacity(cuts.len() * 2 + 1);
    let mut prev = 0;
    for (cut, data) in cuts {
        parts.push(meta.slice(prev..cut));
        parts.push(data.clone());
        prev = cut;
    }
    if prev < meta.len() {
        parts.push(meta.slice(prev..));
    }
    Ok(parts)
}

// ---------------------------------------------------------------------------
// Decoding

/// The validated fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub frame_type: FrameType,
    pub flags: u16,
    pub epoch: Epoch,
    pub payload_len: usize,
    pub payload_crc: u32,
}

/// Parses and checks a frame header. Checks run in the order that makes each
/// later field trustworthy: magic (is this ours at all), header CRC (are the
/// other fields intact), then version, type, flags and length.
pub fn decode_header(buf: &[u8], max_payload_len: usize) -> Result<FrameHeader, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let magic = rd_u32(buf, 0);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { got: magic });
    }
    let stored = rd_u32(buf, 28);
    let computed = crc32c::crc32c(&buf[0..28]);
    if stored != computed {
        return Err(DecodeError::BadChecksum {
            which: ChecksumKind::Header,
            stored,
            computed,
        });
    }
    let version = rd_u16(buf, 4);
    let (min, max) = (
        MIN_SUPPORTED_VERSION.as_u16(),
        MAX_SUPPORTED_VERSION.as_u16(),
    );
    if version < min || version > max {
        return Err(DecodeError::UnsupportedVersion {
            got: version,
            min,
            max,
        });
    }
    let raw_type = rd_u16(buf, 6);
    let frame_type =
        FrameType::from_u16(raw_type).ok_or(DecodeError::UnknownFrameType { got: raw_type })?;
    let flags = rd_u16(buf, 8);
    if flags != 0 {
        return Err(DecodeError::InvalidField {
            field: "header.flags",
            reason: format!("{flags:#06x}: no flags are defined in v{version}"),
        });
    }
    let reserved = rd_u16(buf, 10);
    if reserved != 0 {
        return Err(DecodeError::InvalidField {
            field: "header.reserved",
            reason: format!("{reserved:#06x}, must be zero"),
        });
    }
    let payload_len = rd_u32(buf, 20) as usize;
    if payload_len > max_payload_len {
        return Err(DecodeError::TooLarge {
            len: payload_len,
            max: max_payload_len,
        });
    }
    Ok(FrameHeader {
        version,
        frame_type,
        flags,
        epoch: rd_u64(buf, 12),
        payload_len,
        payload_crc: rd_u32(buf, 24),
    })
}

/// Bounds-checked cursor over a payload. Reads return `Truncated` with
/// positions relative to the payload start.
pub(crate) struct Reader {
    pub(crate) buf: Bytes,
    pub(crate) pos: usize,
}

impl Reader {
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let need = self.pos.saturating_add(n);
        if need > self.buf.len() {
            return Err(DecodeError::Truncated {
                need,
                have: self.buf.len(),
            });
        }
        let out = self.buf.slice(self.pos..need);
        self.pos = need;
        Ok(out)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&b);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// The rest of the payload (a variable-length tail), zero-copy.
    pub(crate) fn rest(&mut self) -> Bytes {
        let out = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        out
    }
    pub(crate) fn string(
        &mut self,
        field: &'static str,
        len: usize,
    ) -> Result<String, DecodeError> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|e| DecodeError::InvalidField {
            field,
            reason: format!("not UTF-8: {e}"),
        })
    }
    pub(crate) fn zero(&mut self, field: &'static str, n: usize) -> Result<(), DecodeError> {
        let b = self.take(n)?;
        if b.iter().any(|&x| x != 0) {
            return Err(DecodeError::InvalidField {
                field,
                reason: "reserved bytes must be zero".into(),
            });
        }
        Ok(())
    }
    /// Every payload must be consumed exactly: trailing bytes mean the sender
    /// and receiver disagree about the layout.
    pub(crate) fn finish(self, field: &'static str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::InvalidField {
                field,
                reason: format!("{} trailing bytes", self.remaining()),
            });
        }
        Ok(())
    }
}

fn decode_hello(r: &mut Reader, epoch: Epoch) -> Result<Hello, DecodeError> {
    let min_version = r.u16()?;
    let max_version = r.u16()?;
    let raw_role = r.u8()?;
    let role = Role::from_u8(raw_role).ok_or_else(|| DecodeError::InvalidField {
        field: "hello.role",
        reason: format!("unknown role {raw_role}"),
    })?;
    let name_len = usize::from(r.u8()?);
    let volume_count = usize::from(r.u16()?);
    if volume_count > MAX_VOLUMES {
        return Err(DecodeError::InvalidField {
            field: "hello.volumes",
            reason: format!("{volume_count} volumes > {MAX_VOLUMES}"),
        });
    }
    let cluster_id = r.array()?;
    let node_id = r.array()?;
    let resume_position = r.u64()?;
    if name_len > MAX_NAME_LEN {
        return Err(DecodeError::InvalidField {
            field: "hello.node_name",
            reason: format!("{name_len} bytes > {MAX_NAME_LEN}"),
        });
    }
    let node_name = r.string("hello.node_name", name_len)?;
    if volume_count * VOLUME_FIXED_LEN > r.remaining() {
        return Err(DecodeError::Truncated {
            need: r.pos + volume_count * VOLUME_FIXED_LEN,
            have: r.buf.len(),
        });
    }
    // volume_count ≤ 256 was checked above, so this allocation is bounded.
    let mut volumes = Vec::with_capacity(volume_count);
    for _ in 0..volume_count {
        let id = r.u32()?;
        let block_size = r.u32()?;
        let size_bytes = r.u64()?;
        let len = usize::from(r.u8()?);
        if len > MAX_NAME_LEN {
            return Err(DecodeError::InvalidField {
                field: "hello.volume.name",
                reason: format!("{len} bytes > {MAX_NAME_LEN}"),
            });
        }
        let name = r.string("hello.volume.name", len)?;
        volumes.push(VolumeGeometry {
            id,
            name,
            size_bytes,
            block_size,
        });
    }
    Ok(Hello {
        epoch,
        min_version,
        max_version,
        cluster_id,
        node_id,
        node_name,
        role,
        volumes,
        resume_position,
    })
}

fn decode_write_set(r: &mut Reader, epoch: Epoch) -> Result<WriteSet, DecodeError> {
    decode_write_set_body(r, epoch, None)
}

/// A write-set's payload. `packed`: the body of a Packed frame (V3), whose records
/// may be zero-filled writes (`form` 1 in byte 25, see [`crate::packed`]); the
/// value is the bound on the plain payload the write-set expands to, checked before
/// any zero data is made.
pub(crate) fn decode_write_set_body(
    r: &mut Reader,
    epoch: Epoch,
    packed: Option<usize>,
) -> Result<WriteSet, DecodeError> {
    let first_seq = r.u64()?;
    let last_seq = r.u64()?;
    let timestamp_ns = r.u64()?;
    let count = r.u32()? as usize;
    r.zero("write_set.reserved", 4)?;
    // Bound the allocation by both the protocol limit and what the payload
    // can actually hold, before trusting `count`.
    if count > MAX_RECORDS_PER_WRITE_SET || count.saturating_mul(RECORD_HEADER_LEN) > r.remaining()
    {
        return Err(DecodeError::InvalidField {
            field: "write_set.record_count",
            reason: format!(
                "{count} records cannot fit in {} bytes (max {MAX_RECORDS_PER_WRITE_SET})",
                r.remaining()
            ),
        });
    }
    let mut records = Vec::with_capacity(count);
    let mut plain_len = WRITE_SET_FIXED_LEN;
    for _ in 0..count {
        let seq = r.u64()?;
        let offset = r.u64()?;
        let volume = r.u32()?;
        let length = r.u32()?;
        let raw_op = r.u8()?;
        let op = RecordOp::from_u8(raw_op).ok_or_else(|| DecodeError::InvalidField {
            field: "record.op",
            reason: format!("seq {seq}: unknown op {raw_op}"),
        })?;
        let zero_filled = match packed {
            None => {
                r.zero("record.reserved", 3)?;
                false
            }
            Some(_) => {
                let form = r.u8()?;
                r.zero("record.reserved", 2)?;
                crate::packed::record_form(seq, op, form)?
            }
        };
        let data_len = r.u32()? as usize;
        let data = if zero_filled {
            if data_len != 0 {
                return Err(DecodeError::InvalidField {
                    field: "record.data_len",
                    reason: format!("seq {seq}: a zero-filled write carries {data_len} bytes"),
                });
            }
            // Bounded before it is made: the write-set as a plain frame must fit.
            plain_len = crate::packed::expand_check(plain_len, length as usize, packed)?;
            crate::packed::zeros(length as usize)
        } else {
            plain_len = crate::packed::expand_check(plain_len, data_len, packed)?;
            // Zero-copy: a slice of the frame buffer.
            r.take(data_len)?
        };
        records.push(WireRecord {
            seq,
            volume,
            op,
            offset,
            length,
            data,
        });
    }
    Ok(WriteSet {
        epoch,
        first_seq,
        last_seq,
        timestamp_ns,
        records,
    })
}

pub(crate) fn decode_resync_data(r: &mut Reader, epoch: Epoch) -> Result<ResyncData, DecodeError> {
    let count = r.u32()? as usize;
    r.zero("resync_data.reserved", 4)?;
    // Bounded by the protocol limit and by what the payload can hold.
    if count > MAX_RESYNC_EXTENTS || count.saturating_mul(RESYNC_EXTENT_HEADER_LEN) > r.remaining()
    {
        return Err(DecodeError::InvalidField {
            field: "resync_data.extent_count",
            reason: format!(
                "{count} extents cannot fit in {} bytes (max {MAX_RESYNC_EXTENTS})",
                r.remaining()
            ),
        });
    }
    let mut extents = Vec::with_capacity(count);
    for i in 0..count {
        let offset = r.u64()?;
        let volume = r.u32()?;
        let length = r.u32()?;
        let kind = r.u8()?;
        r.zero("resync_extent.reserved", 3)?;
        let data_len = r.u32()? as usize;
        let data = match kind {
            1 => Some(r.take(data_len)?), // zero-copy slice of the frame
            2 if data_len == 0 => None,
            2 => {
                return Err(DecodeError::InvalidField {
                    field: "resync_extent.data_len",
                    reason: format!("extent {i}: a zero extent carries {data_len} bytes"),
                })
            }
            k => {
                return Err(DecodeError::InvalidField {
                    field: "resync_extent.kind",
                    reason: format!("extent {i}: unknown kind {k}"),
                })
            }
        };
        extents.push(ResyncExtent {
            volume,
            offset,
            length,
            data,
        });
    }
    Ok(ResyncData { epoch, extents })
}

fn decode_hello_ack(r: &mut Reader, h: &FrameHeader) -> Result<HelloAck, DecodeError> {
    let version = r.u16()?;
    r.zero("hello_ack.reserved", 6)?;
    let mut a = HelloAck {
        epoch: h.epoch,
        version,
        resume_seq: r.u64()?,
        received_acks: false,
    };
    if has_v4_tail(h) {
        let flags = r.u32()?;
        r.zero("hello_ack.reserved", 4)?;
        // The only flag, and the tail exists only to carry it.
        if flags != HELLO_ACK_RECEIVED_ACKS {
            return Err(DecodeError::InvalidField {
                field: "hello_ack.flags",
                reason: format!(
                    "{flags:#x} (a V4 HelloAck carries exactly {HELLO_ACK_RECEIVED_ACKS:#x})"
                ),
            });
        }
        a.received_acks = true;
    }
    Ok(a)
}

fn decode_ack(r: &mut Reader, h: &FrameHeader) -> Result<Ack, DecodeError> {
    let durable = r.u64()?;
    let applied = r.u64()?;
    let received = if has_v4_tail(h) { r.u64()? } else { durable };
    if has_v4_tail(h) && received <= durable {
        // Such an ack is a V1 ack: one layout per version.
        return Err(DecodeError::InvalidField {
            field: "ack.received_seq",
            reason: format!("V4 tail {received} is not above received durable {durable}"),
        });
    }
    Ok(Ack {
        epoch: h.epoch,
        received_durable_seq: durable,
        applied_seq: applied,
        received_seq: received,
    })
}

fn decode_handover_ack(r: &mut Reader, epoch: Epoch) -> Result<HandoverAck, DecodeError> {
    let a = HandoverAck {
        epoch,
        seq: r.u64()?,
        new_epoch: r.u64()?,
    };
    if a.new_epoch <= a.epoch {
        return Err(DecodeError::InvalidField {
            field: "handover_ack.new_epoch",
            reason: format!("{} is not above the epoch {}", a.new_epoch, a.epoch),
        });
    }
    Ok(a)
}

fn decode_digest_request(r: &mut Reader, epoch: Epoch) -> Result<DigestRequest, DecodeError> {
    let d = DigestRequest {
        epoch,
        id: r.u64()?,
        chunk_size: r.u64()?,
        seed: r.u64()?,
        algo: r.u32()?,
    };
    r.zero("digest_request.reserved", 4)?;
    Ok(d)
}

fn decode_verify_result(r: &mut Reader, epoch: Epoch) -> Result<VerifyResult, DecodeError> {
    let id = r.u64()?;
    let volume = r.u32()?;
    let status = r.u32()?;
    if status > 1 {
        return Err(DecodeError::InvalidField {
            field: "verify_result.status",
            reason: format!("{status} (0 or 1)"),
        });
    }
    Ok(VerifyResult {
        epoch,
        id,
        volume,
        ok: status == 0,
        body: r.rest(),
    })
}

fn decode_resync_begin(r: &mut Reader, h: &FrameHeader) -> Result<ResyncBegin, DecodeError> {
    let mut b = ResyncBegin {
        epoch: h.epoch,
        from_seq: r.u64()?,
        snapshot_seq: r.u64()?,
        total_bytes: r.u64()?,
        region_size: r.u32()?,
        primary_time_ns: None,
    };
    r.zero("resync_begin.reserved", 4)?;
    b.primary_time_ns = v2_time(r, h)?;
    Ok(b)
}

/// A frame of version 2 carries its tail; one of version 1 has none (the payload
/// must then end here: trailing bytes are an error as ever).
fn has_tail(h: &FrameHeader) -> bool {
    h.version >= ProtocolVersion::V2.as_u16()
}

/// A frame of version 4 (Ack, HelloAck) carries its V4 tail.
fn has_v4_tail(h: &FrameHeader) -> bool {
    h.version >= ProtocolVersion::V4.as_u16()
}

/// The primary's clock, the V2 tail of ResyncBegin and ResyncEnd.
fn v2_time(r: &mut Reader, h: &FrameHeader) -> Result<Option<u64>, DecodeError> {
    has_tail(h).then(|| r.u64()).transpose()
}

fn decode_heartbeat(r: &mut Reader, h: &FrameHeader) -> Result<Heartbeat, DecodeError> {
    let mut hb = Heartbeat {
        epoch: h.epoch,
        sent_at_ns: r.u64()?,
        echo_ns: r.u64()?,
        last_seq: r.u64()?,
        sync_loss: None,
    };
    if has_tail(h) {
        let flags = r.u32()?;
        r.zero("heartbeat.reserved", 4)?;
        let at = r.u64()?;
        hb.sync_loss = Some(match flags {
            0 if at == 0 => SyncLoss::None,
            1 => SyncLoss::DegradedAt(at),
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "heartbeat.sync_loss",
                    reason: format!("flags {flags:#x} with seq {at}"),
                })
            }
        });
    }
    Ok(hb)
}

fn decode_error(r: &mut Reader, epoch: Epoch) -> Result<ErrorFrame, DecodeError> {
    let code = ErrorCode::from_u32(r.u32()?);
    let len = usize::from(r.u16()?);
    r.zero("error.reserved", 2)?;
    if len > MAX_REASON_LEN {
        return Err(DecodeError::InvalidField {
            field: "error.reason",
            reason: format!("{len} bytes > {MAX_REASON_LEN}"),
        });
    }
    Ok(ErrorFrame {
        epoch,
        code,
        reason: r.string("error.reason", len)?,
    })
}

fn decode_payload(
    header: &FrameHeader,
    payload: Bytes,
    max_payload_len: usize,
) -> Result<Frame, DecodeError> {
    let epoch = header.epoch;
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let frame = match header.frame_type {
        FrameType::Hello => Frame::Hello(decode_hello(&mut r, epoch)?),
        FrameType::HelloAck => Frame::HelloAck(decode_hello_ack(&mut r, header)?),
        FrameType::WriteSet => Frame::WriteSet(decode_write_set(&mut r, epoch)?),
        FrameType::Ack => Frame::Ack(decode_ack(&mut r, header)?),
        FrameType::Heartbeat => Frame::Heartbeat(decode_heartbeat(&mut r, header)?),
        FrameType::Handover => Frame::Handover(Handover {
            epoch,
            seq: r.u64()?,
        }),
        FrameType::HandoverAck => Frame::HandoverAck(decode_handover_ack(&mut r, epoch)?),
        FrameType::DigestRequest => Frame::DigestRequest(decode_digest_request(&mut r, epoch)?),
        FrameType::VerifyResult => Frame::VerifyResult(decode_verify_result(&mut r, epoch)?),
        FrameType::ResyncBegin => Frame::ResyncBegin(decode_resync_begin(&mut r, header)?),
        FrameType::ResyncData => Frame::ResyncData(decode_resync_data(&mut r, epoch)?),
        FrameType::ResyncEnd => Frame::ResyncEnd(ResyncEnd {
            epoch,
            through_seq: r.u64()?,
            bytes: r.u64()?,
            data_bytes: r.u64()?,
            primary_time_ns: v2_time(&mut r, header)?,
        }),
        FrameType::Error => Frame::Error(decode_error(&mut r, epoch)?),
        FrameType::Packed => Frame::Packed(crate::packed::Packed::decode(
            &mut r,
            epoch,
            max_payload_len,
        )?),
    };
    r.finish("payload")?;
    // Same invariants the encoder enforces (contiguous seqs, op/data rules…).
    validate_frame(&frame)?;
    check_layout_version(header, &frame)?;
    Ok(frame)
}

/// One layout per version: a frame's header names the layout it was written in
/// (`frame_version`). A tail-less frame under version 2, anything but a Packed
/// frame under version 3, or anything but an Ack or HelloAck with its V4 tail under
/// version 4, is refused, so every decoded frame re-encodes to the bytes it came from.
fn check_layout_version(header: &FrameHeader, frame: &Frame) -> Result<(), DecodeError> {
    let layout = frame_version(frame).as_u16();
    if header.version == layout {
        return Ok(());
    }
    Err(DecodeError::InvalidField {
        field: "header.version",
        reason: format!(
            "a {:?} frame of this layout is version {layout}, header says {}",
            frame.frame_type(),
            header.version
        ),
    })
}

/// Decodes exactly one frame occupying all of `buf`, with the default payload limit.
pub fn decode(buf: Bytes) -> Result<Frame, DecodeError> {
    decode_with_limit(buf, MAX_PAYLOAD_LEN)
}

/// Decodes exactly one frame occupying all of `buf`.
pub fn decode_with_limit(buf: Bytes, max_payload_len: usize) -> Result<Frame, DecodeError> {
    let header = decode_header(&buf, max_payload_len)?;
    let total = HEADER_LEN + header.payload_len;
    if buf.len() < total {
        return Err(DecodeError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    if buf.len() > total {
        return Err(DecodeError::InvalidField {
            field: "frame",
            reason: format!("{} bytes after a {total}-byte frame", buf.len() - total),
        });
    }
    decode_frame_body(&header, buf.slice(HEADER_LEN..total), max_payload_len)
}

fn decode_frame_body(
    header: &FrameHeader,
    payload: Bytes,
    max_payload_len: usize,
) -> Result<Frame, DecodeError> {
    let computed = crc32c::crc32c(&payload);
    if computed != header.payload_crc {
        return Err(DecodeError::BadChecksum {
            which: ChecksumKind::Payload,
            stored: header.payload_crc,
            computed,
        });
    }
    decode_payload(header, payload, max_payload_len)
}

/// Streaming decoder: feed it bytes as they arrive, in chunks of any size,
/// and take complete frames out.
///
/// Any error poisons the decoder: after a bad header the stream's framing is
/// lost, so the only safe recovery is a new connection (which resumes from the
/// standby's durable position, so nothing is lost).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_payload_len: usize,
    /// Header of the frame whose payload we are waiting for (checked once).
    pending: Option<FrameHeader>,
    poisoned: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_PAYLOAD_LEN)
    }
}

impl FrameDecoder {
    pub fn new(max_payload_len: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_payload_len: max_payload_len.min(MAX_PAYLOAD_LEN),
            pending: None,
            poisoned: false,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The receive buffer, for callers that read from a socket straight into it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.poisoned {
            return Err(DecodeError::Poisoned);
        }
        let result = self.try_next();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn try_next(&mut self) -> Result<Option<Frame>, DecodeError> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                // Check a partial magic early so garbage fails fast instead of
                // waiting for a whole header's worth of it.
                let n = self.buf.len().min(4);
                if self.buf[..n] != MAGIC.to_le_bytes()[..n] {
                    let mut m = [0u8; 4];
                    m[..n].copy_from_slice(&self.buf[..n]);
                    return Err(DecodeError::BadMagic {
                        got: u32::from_le_bytes(m),
                    });
                }
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = decode_header(&self.buf[..HEADER_LEN], self.max_payload_len)?;
                self.pending = Some(h);
                h
            }
        };
        let total = HEADER_LEN + header.payload_len;
        if self.buf.len() < total {
            // Reserve once for the whole frame (bounded by max_payload_len).
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.pending = None;
        // split_to + freeze hands the frame's bytes over without copying, so
        // decoded record data point into this buffer.
        let frame = self.buf.split_to(total).freeze();
        decode_frame_body(&header, frame.slice(HEADER_LEN..), self.max_payload_len).map(Some)
    }
}
