//! A node's status as the control socket's `status` request answers it (and
//! `ferryctl status --json` prints it): one snapshot, [`NodeStatus`], with the parts
//! both roles share and the role's own part ([`RoleStatus`]).
//!
//! The daemon builds one snapshot per request and serialises it; its metrics
//! endpoint renders from the same snapshot; ferryctl deserialises it. The JSON is
//! the one the daemon served before the status was typed, key for key: a key that
//! was `null` is an `Option` serialised as `null`, a key that was absent is skipped
//! (`skip_serializing_if`), and `role` tags the role's part.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One node's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The configured node name.
    pub node: String,
    pub epoch: u64,
    /// Last sequence assigned (a primary) or held durably (a standby).
    pub last_seq: u64,
    pub durable_seq: u64,
    /// Highest contiguous sequence applied to the volumes.
    pub applied_seq: u64,
    /// Sequence of the last checkpoint (bases fsynced up to it).
    pub checkpoint_seq: u64,
    pub journal: JournalStatus,
    pub volumes: Vec<VolumeStatus>,
    /// Replication targets (a standby has none).
    pub targets: Vec<TargetStatus>,
    /// The cluster as this node sees it: every `[cluster]` member (absent without one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<MemberStatus>,
    #[serde(flatten)]
    pub role: RoleStatus,
}

/// One member of the cluster, as the node answering `status` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    /// Its replication address (`[[cluster.node]] address`).
    pub address: String,
    /// `primary` or `standby` when this node knows (itself; the primary it follows;
    /// a target it ships to), else `unknown`.
    pub role: String,
    /// Its epoch when this node knows it (itself, or a peer in session with it).
    pub epoch: Option<u64>,
    /// `true` for this node itself and for a peer it is in session with now.
    pub connected: bool,
    /// What this node sees: `self`, a target's state (`streaming`, `resyncing`, …),
    /// `following` (the primary this standby follows) or `not in session`.
    pub state: String,
}

/// The role's own part of the status; serialised as `"role": "primary"` or
/// `"role": "standby"` next to its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum RoleStatus {
    Primary(PrimaryStatus),
    /// Boxed: the larger part by far.
    Standby(Box<StandbyStatus>),
}

impl RoleStatus {
    /// `primary` or `standby`, as in the JSON.
    pub fn name(&self) -> &'static str {
        match self {
            RoleStatus::Primary(_) => "primary",
            RoleStatus::Standby(_) => "standby",
        }
    }
}

/// The journal's fill, engine and write counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalStatus {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    /// IO engine in use.
    pub engine: String,
    /// Why the engine fell back to std IO (`null`: no fallback).
    pub fallback_reason: Option<String>,
    /// Oldest sequence still held.
    pub first_seq: u64,
    pub batches: u64,
    pub records: u64,
    pub bytes_written: u64,
    /// Summed duration of durable batch writes.
    pub write_seconds: f64,
}

/// A configured volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size_bytes: u64,
    pub path: PathBuf,
    /// `nbd://ADDR/NAME` on a primary; absent on a standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// The configured `cache` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// The mode writes get now on a primary (`writeback` or `writethrough`; a
    /// `writethrough-until-flush` volume turns writeback at its first FLUSH); absent
    /// on a standby.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_effective: Option<String>,
}

/// A primary's own status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// A base write failed: the group refuses writes until restart.
    pub failed: bool,
    /// A newer primary told this one it is outdated.
    pub outdated: Option<OutdatedStatus>,
    /// Why writes are refused (a fence), if they are.
    pub writes_refused: Option<String>,
    /// Where this primary forked from its old primary (a primary by promotion or
    /// switchover).
    pub fork_seq: Option<u64>,
    /// How: `switchover` or `promotion` (with `fork_seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork_by: Option<String>,
    /// `replication.sync` as configured (`ANY 1 (dr1, dr2)`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_policy: Option<String>,
    pub nbd: NbdStatus,
    /// Archive targets (`kind = "archive"`); absent when none is configured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archives: Vec<ArchiveStatus>,
}

/// One archive target (the cold tier in object storage) as the primary sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveStatus {
    pub name: String,
    /// Always `archive`.
    pub kind: String,
    pub url: String,
    /// `starting`, `base` (uploading a base image), `archiving`, `retrying`,
    /// `overflowed` (the journal filled up while it was behind: it no longer holds
    /// the journal, and takes a new base once the archive is reachable) or
    /// `stopped` (a newer primary archives there, or the archive refused this one;
    /// it no longer holds the journal), `shutting-down`.
    pub state: String,
    /// Newest write-set boundary the archive holds durably (the journal keeps
    /// everything after it).
    pub archived_seq: u64,
    /// Time between the newest archived write-set and the primary's newest record.
    pub lag_seconds: f64,
    pub bytes_uploaded: u64,
    pub last_error: Option<String>,
    /// When this primary last uploaded to the archive (a pack or a base), RFC 3339.
    #[serde(default)]
    pub last_upload: Option<String>,
    /// Bytes of the packs and base indexes the archive's newest manifest names. Base
    /// chunks (content-addressed, shared between bases) are not listed there and not
    /// counted; this primary's chunk uploads are in `bytes_uploaded`.
    #[serde(default)]
    pub stored_bytes: u64,
    /// Write-set bytes per stored byte over the packs this primary uploaded since it
    /// started; none before the first.
    #[serde(default)]
    pub compression_ratio: Option<f64>,
    /// The oldest point a restore can reach: the archive's oldest base.
    #[serde(default)]
    pub oldest_point: Option<PitPoint>,
}

/// Which epoch, and which node, made this primary outdated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutdatedStatus {
    pub epoch: u64,
    pub by: String,
}

/// The NBD server's bound address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdStatus {
    pub listen: String,
}

/// How the shipper serves a target: the one definition is the target lifecycle's
/// (`ferry_proto::target`, which decides it). ferry-proto stays free of serde, so the
/// status JSON form (its [`EffectiveMode::status_str`]) is written and read here
/// ([`effective_mode_json`]).
pub use ferry_proto::target::EffectiveMode;

/// `effective_mode` in the status JSON: `sync`, `async` or `async (degraded)`.
pub mod effective_mode_json {
    use super::EffectiveMode;
    use serde::{de, Deserialize, Deserializer, Serializer};

    const ALL: [EffectiveMode; 3] = [
        EffectiveMode::Sync,
        EffectiveMode::Async,
        EffectiveMode::Degraded,
    ];

    pub fn serialize<S: Serializer>(m: &EffectiveMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.status_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EffectiveMode, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        ALL.into_iter()
            .find(|m| m.status_str() == text)
            .ok_or_else(|| {
                de::Error::unknown_variant(&text, &["sync", "async", "async (degraded)"])
            })
    }
}

/// One replication target as the primary sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub address: String,
    /// The configured mode (`sync` or `async`).
    pub mode: String,
    #[serde(with = "effective_mode_json")]
    pub effective_mode: EffectiveMode,
    /// The shipper's state (`connecting`, `streaming`, …).
    pub state: String,
    /// Highest sequence the target holds durably.
    pub acked_seq: u64,
    /// Highest sequence the target applied to its replica.
    pub applied_seq: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub rtt_us: u64,
    pub last_error: Option<String>,
    /// A sync target that lost sync at this sequence: writes after it were
    /// acknowledged without it (recorded durably, told to the standby) until it
    /// holds them all again.
    #[serde(default)]
    pub sync_loss_at: Option<u64>,
    /// `on_sync_loss = "block"`: client writes are waiting for this target past the
    /// sync timeout.
    #[serde(default)]
    pub writes_blocked: bool,
    #[serde(flatten)]
    pub track: TrackStatus,
    /// Bytes on the wire against bytes written (compression, zero blocks, the cap).
    #[serde(default)]
    pub wire: WireStatus,
}

/// What the data frames to one target cost on the wire since ferryd started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireStatus {
    /// `off`, `zstd`, or why configured compression is not in use (a standby that
    /// speaks an older protocol).
    pub compress: String,
    /// The zstd level the next compressed frame gets (0: not compressing).
    pub level: i32,
    /// Bytes of the data frames (write-sets, resync data) as plain frames: what was
    /// written, framed.
    pub payload_bytes: u64,
    /// Bytes put on the wire for them.
    pub wire_bytes: u64,
    /// `payload_bytes / wire_bytes`; `null` before the first frame.
    pub ratio: Option<f64>,
    /// Frames sent zstd-compressed.
    pub compressed_frames: u64,
    /// Bytes of all-zero writes that travelled as their length only.
    pub zero_bytes: u64,
    /// `max_bandwidth` in bytes per second; `null`: no cap.
    pub max_bandwidth: Option<u64>,
    /// Time frames waited for the cap.
    pub throttled_seconds: f64,
}

/// How the journal tracks a target: its fields sit in the target's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackStatus {
    /// `streaming` (the target holds the journal), `bitmap` (its writes are marked in
    /// a dirty-region map) or `resyncing` (its dirty regions are being copied).
    pub tracking: String,
    pub dirty_bytes: u64,
    pub resync_bytes: u64,
    pub resync_data_bytes: u64,
    /// Recovery points a resync made unusable on the target.
    pub points_lost: Option<PointsLost>,
}

/// Recovery points lost on a target by a resync: after `after_seq`, up to
/// `through_seq` (`null`: up to the end of the resync, not known yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsLost {
    pub after_seq: u64,
    pub through_seq: Option<u64>,
}

/// Whether the replica holds a consistent image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Consistent,
    /// A bitmap resync is in progress: no consistent image until it ends.
    Inconsistent,
}

/// A standby's own status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandbyStatus {
    /// Why the standby does not follow the primary (an operator pause, a rollback).
    pub paused: Option<String>,
    /// The applier stopped on this error.
    pub apply_error: Option<String>,
    pub replica: ReplicaState,
    pub resync: Option<ResyncStatus>,
    pub primary: UpstreamStatus,
    /// Primary clock time of the newest applied write-set (0 before the first).
    pub applied_primary_time_ns: u64,
    pub pit: PitStatus,
    /// The primary said this standby lost sync at this sequence: it may lack writes
    /// the primary acknowledged after it (`promote` refuses without `--force`).
    #[serde(default)]
    pub sync_loss_at: Option<u64>,
}

/// A bitmap resync transition in progress on a standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub from_seq: u64,
    pub snapshot_seq: u64,
    /// Where the replica is consistent again (`null`: not known yet).
    pub through_seq: Option<u64>,
    pub copied: bool,
    pub copied_bytes: u64,
    pub total_bytes: u64,
}

/// The primary a standby follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    /// This standby's replication listen address.
    pub listen: String,
    /// The connected primary's address.
    pub connected: Option<String>,
    /// Latest sequence the primary reported having.
    pub last_seq: u64,
    pub last_error: Option<String>,
    /// Cascading: the member that relays to this standby (`[[cluster.node]] via`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// A relayed standby's (with `via`) live session: from the primary, or the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Point-in-time recovery on a standby: `{"enabled": false}` when off, else the
/// window (and the exported views, in the node status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PitStatus {
    pub enabled: bool,
    #[serde(flatten)]
    pub window: Option<PitWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exports: Option<Vec<PitExport>>,
}

impl PitStatus {
    /// Point-in-time recovery is off.
    pub fn disabled() -> PitStatus {
        PitStatus {
            enabled: false,
            window: None,
            exports: None,
        }
    }
}

/// The retained recovery points and the undo log holding them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PitWindow {
    /// The undo log directory.
    pub dir: PathBuf,
    pub oldest: Option<PitPoint>,
    pub newest: Option<PitPoint>,
    pub points: u64,
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub max_age_secs: u64,
    /// Time spent capturing before-images.
    pub capture_seconds: f64,
    /// Why capture stopped (points unusable until restart).
    pub error: Option<String>,
    pub open_views: Vec<OpenView>,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitPoint {
    pub seq: u64,
    /// RFC 3339 form of `timestamp_ns`.
    pub time: String,
    pub timestamp_ns: u64,
}

/// An open point-in-time view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenView {
    pub id: u64,
    pub volume_id: u32,
    pub seq: u64,
}

/// A point-in-time view exported over NBD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitExport {
    pub id: u64,
    pub volume: String,
    pub seq: u64,
    pub time: String,
    pub listen: String,
    pub writable: bool,
}
