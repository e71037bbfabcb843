//! ferryd configuration (TOML), read by ferryd and written by `ferryctl init`.
//!
//! Every error names the offending key: syntax and type errors come from the `toml`
//! parser (which reports the key path and line), semantic checks from [`Config::validate`].
//! Relative paths are resolved against the directory holding the config file, so a
//! config directory can be moved as a whole.
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

// `journal.engine` and `journal.recovery` are the journal's own enums (serialised
// through ferry-journal's `serde` feature), not config-side mirrors mapped onto them:
// one definition, so a new engine or mode cannot be forgotten in a mapping.
pub use ferry_journal::{EngineChoice, RecoveryMode};

use crate::size::ByteSize;
pub use crate::sync_policy::SyncPolicy;

/// Smallest volume granule: NBD clients address bytes, but the journal and the base
/// volume are 4 KiB-aligned worlds, and block devices have at least 512-byte sectors.
pub const VOLUME_ALIGN: u64 = 4096;
pub const MAX_VOLUMES: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub journal: JournalConfig,
    /// Required on a primary; on a standby it is where volumes are served once promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdConfig>,
    pub control: ControlConfig,
    /// Certificates for replication (mutual TLS); required with `[replication]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
    #[serde(rename = "volume", default)]
    pub volumes: Vec<VolumeConfig>,
    /// Control socket access and the audit log (`[access]`); absent: defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessConfig>,
    /// Audit log rotation and batching (`[audit]`); absent: defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditConfig>,
    /// Optional HTTP endpoint for /metrics, /healthz and /readyz; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// Point-in-time recovery on a standby (`[pit]`); absent: on, with defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pit: Option<PitConfig>,
    /// How replicas are compared (`[verify]`); absent: the cluster's default digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyConfig>,
    /// Encryption at rest of the journal (`[encryption]`); absent: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
    /// Every node of the cluster (`[[cluster.node]]`); absent: this node knows only
    /// its `[replication]` peers, as before membership existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: the membership, the same in every node's config. With it a standby
/// follows whichever member is the primary of the highest epoch it hears of, and a
/// node that becomes the primary ships to every other member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(rename = "node", default)]
    pub nodes: Vec<ClusterNode>,
}

/// One member: its name (the TLS name of its certificate), its replication address
/// and the mode a primary ships to it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub name: String,
    /// Its `replication.listen` (`HOST:PORT`).
    pub address: String,
    /// `sync` or `async` (default): how a primary ships to it.
    #[serde(default)]
    pub mode: ReplicationMode,
    /// Cascading: the member that relays to this one (`via = "dr1"`). The primary
    /// does not ship to it unless it is that member itself (after a promotion); the
    /// member named ships to it from its own journal. Always async.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// With `via`: what the primary does while the relay is down
    /// ([`ViaFallback::Primary`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_fallback: Option<ViaFallback>,
}

/// `[[cluster.node]] via_fallback`: while a relayed member's relay is away from the
/// primary, the primary ships to the member itself (`primary`, the default), or the
/// member waits for its relay (`stay`, saving the primary's uplink).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViaFallback {
    #[default]
    Primary,
    Stay,
}

/// `[verify]`: the chunk digest of `ferryctl verify` and of the resync that compares
/// digests before copying (failback, catch-up by digest).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Absent: `sm3` in a gm cluster (`tls.suite = "gm"`), `xxh3` otherwise
    /// ([`Config::verify_digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<DigestKind>,
}

/// `verify.digest`: the chunk digest both sides compute. Every node of a cluster must
/// resolve to the same one: a standby refuses a comparison in another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestKind {
    /// xxh3-128, keyed with a per-run random seed: fast, not a cryptographic hash.
    Xxh3,
    /// SM3 (GB/T 32905) over the seed and the chunk: the national cryptographic hash.
    Sm3,
}

impl DigestKind {
    pub fn name(self) -> &'static str {
        match self {
            DigestKind::Xxh3 => "xxh3",
            DigestKind::Sm3 => "sm3",
        }
    }
}

/// `[encryption]`: the node's key-encryption key (ring) for data at rest. With it,
/// journal and undo segments are written encrypted (SM4-GCM, journal/FORMAT.md
/// "Encryption at rest", "Encrypted undo segments"); the file is read at start (`keyfile::read_key_file`) and a missing,
/// unreadable, group/world-accessible or wrong key refuses the start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The key file (`ferryctl keygen`), mode 0600, relative to the config file.
    pub key_file: PathBuf,
}

/// `[pit]`: the standby's undo log and its retention. Ignored on a primary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitConfig {
    /// Keep before-images so the replica can be viewed or rolled back (default true).
    /// Off: the standby applies without undo (faster apply, no recovery points).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Undo log directory (default `<metadata_dir>/undo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Size limit of the undo log: oldest points go first, bookmarked or not.
    #[serde(default = "default_pit_max_bytes")]
    pub max_bytes: ByteSize,
    /// Age limit in seconds (0: none): older points go, except bookmarked ones.
    #[serde(default = "default_pit_max_age_secs")]
    pub max_age_secs: u64,
    /// Undo segment file size: the unit in which retention frees space.
    #[serde(default = "default_pit_segment_size")]
    pub segment_size: ByteSize,
}

fn default_true() -> bool {
    true
}
fn default_pit_max_bytes() -> ByteSize {
    ByteSize(4 << 30)
}
fn default_pit_max_age_secs() -> u64 {
    7 * 86_400
}
fn default_pit_segment_size() -> ByteSize {
    ByteSize(64 << 20)
}

impl Default for PitConfig {
    fn default() -> Self {
        PitConfig {
            enabled: true,
            dir: None,
            max_bytes: default_pit_max_bytes(),
            max_age_secs: default_pit_max_age_secs(),
            segment_size: default_pit_segment_size(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `HOST:PORT` of the metrics endpoint (e.g. `127.0.0.1:9640`); port 0 lets the OS
    /// choose (the bound address is on the ready line). Plain HTTP without
    /// authentication: keep it on loopback or a management network.
    pub listen: String,
}

/// Default mode of the control socket: owner and group may connect; roles decide.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

fn default_socket_mode() -> u32 {
    DEFAULT_SOCKET_MODE
}

/// Users and groups (numeric ids) holding a control role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principals {
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Matched against the peer's primary and supplementary groups.
    #[serde(default)]
    pub gids: Vec<u32>,
}

/// `[access]`: who may use the control socket, and where requests are audited.
/// uid 0 and the daemon's own user are always admin; anyone not listed is denied.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Audit log (default `<node.metadata_dir>/audit.log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    /// Mode of the control socket file (default 0o660; write `0o660` in TOML).
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// Group (gid) of the control socket file (default: the daemon's group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<u32>,
    /// Everything: role changes (promote, demote, switchover) and rollback.
    #[serde(default)]
    pub admins: Principals,
    /// Bookmarks, point-in-time exports, verify, pause/resume.
    #[serde(default)]
    pub operators: Principals,
    /// Status and lists.
    #[serde(default)]
    pub viewers: Principals,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            audit_log: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            admins: Principals::default(),
            operators: Principals::default(),
            viewers: Principals::default(),
        }
    }
}

/// `[audit]`: rotation by size, and how often the appends of read-only requests are
/// fsynced. State-changing requests are always fsynced before their answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Rotate the active file once it holds this much (it may exceed it by one line).
    #[serde(default = "default_audit_max_file_size")]
    pub max_file_size: ByteSize,
    /// Rotated files kept besides the active one; older ones are deleted (0: keep all).
    #[serde(default = "default_audit_keep_files")]
    pub keep_files: u32,
    /// Read-only and refused requests: their lines are written at once and fsynced at
    /// most this long afterwards (milliseconds)…
    #[serde(default = "default_audit_sync_interval_ms")]
    pub sync_interval_ms: u64,
    /// …or once this many of them are waiting, whichever comes first.
    #[serde(default = "default_audit_sync_lines")]
    pub sync_lines: u32,
    /// A checkpoint line signed with the node's certificate key (`[tls] key`) every
    /// this many lines, and one at a clean stop (api/AUDIT.md, format 3).
    #[serde(default = "default_audit_checkpoint_every")]
    pub checkpoint_every: u64,
}

fn default_audit_max_file_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_audit_keep_files() -> u32 {
    16
}
fn default_audit_sync_interval_ms() -> u64 {
    100
}
fn default_audit_sync_lines() -> u32 {
    64
}
fn default_audit_checkpoint_every() -> u64 {
    1000
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_file_size: default_audit_max_file_size(),
            keep_files: default_audit_keep_files(),
            sync_interval_ms: default_audit_sync_interval_ms(),
            sync_lines: default_audit_sync_lines(),
            checkpoint_every: default_audit_checkpoint_every(),
        }
    }
}

impl AuditConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("audit.{k}"), m));
        if self.max_file_size.0 < 64 << 10 {
            return bad(
                "max_file_size",
                format!(
                    "{}: at least 64KiB (a line can be that long)",
                    self.max_file_size
                ),
            );
        }
        if !(1..=10_000).contains(&self.sync_interval_ms) {
            return bad(
                "sync_interval_ms",
                format!("{}: 1..=10000", self.sync_interval_ms),
            );
        }
        if self.sync_lines == 0 {
            return bad("sync_lines", "must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.checkpoint_every) {
            return bad(
                "checkpoint_every",
                format!("{}: 1..=1000000", self.checkpoint_every),
            );
        }
        Ok(())
    }
}

impl Config {
    /// The chunk digest of verify and resync: `verify.digest`, else SM3 in a gm cluster
    /// (a deployment that requires the national algorithms compares with one, and
    /// every node of the cluster reads the same `tls.suite`), else xxh3.
    pub fn verify_digest(&self) -> DigestKind {
        match self.verify.as_ref().and_then(|v| v.digest) {
            Some(d) => d,
            None if self
                .tls
                .as_ref()
                .is_some_and(|t| t.suite == TlsSuiteConfig::Gm) =>
            {
                DigestKind::Sm3
            }
            None => DigestKind::Xxh3,
        }
    }

    /// The audit log: `access.audit_log`, or `<node.metadata_dir>/audit.log`.
    pub fn audit_log_path(&self) -> PathBuf {
        self.access
            .as_ref()
            .and_then(|a| a.audit_log.clone())
            .unwrap_or_else(|| self.node.metadata_dir.join("audit.log"))
    }

    fn validate_access(&self) -> Result<(), (String, String)> {
        let Some(a) = &self.access else {
            return Ok(());
        };
        let bad = |k: &str, m: String| Err((format!("access.{k}"), m));
        if a.audit_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return bad("audit_log", "must not be empty".into());
        }
        if a.socket_mode & !0o777 != 0 {
            return bad(
                "socket_mode",
                format!("{:#o}: only permission bits (at most 0o777)", a.socket_mode),
            );
        }
        if a.socket_mode & 0o600 != 0o600 {
            return bad(
                "socket_mode",
                format!(
                    "{:#o}: the owner needs read and write (0o600)",
                    a.socket_mode
                ),
            );
        }
        if a.socket_group == Some(u32::MAX) {
            return bad("socket_group", "4294967295 is not a group id".into());
        }
        let roles = [
            ("admins", &a.admins),
            ("operators", &a.operators),
            ("viewers", &a.viewers),
        ];
        let mut uids = std::collections::HashMap::new();
        let mut gids = std::collections::HashMap::new();
        for (role, p) in roles {
            for (kind, ids, seen) in [("uids", &p.uids, &mut uids), ("gids", &p.gids, &mut gids)] {
                for id in ids {
                    if let Some(other) = seen.insert(*id, role) {
                        return bad(
                            &format!("{role}.{kind}"),
                            format!("{id} is also listed in access.{other}.{kind}: give each id one role"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), issued by the cluster CA for `node.name`.
    pub cert: PathBuf,
    /// This node's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// The TLS 1.3 suites of the replication link. The cluster CA's key decides
    /// what a node can speak (ECDSA: standard, SM2: gm); this states the intent,
    /// and ferryd refuses to start when the CA says otherwise.
    #[serde(default, skip_serializing_if = "TlsSuiteConfig::is_standard")]
    pub suite: TlsSuiteConfig,
}

/// `tls.suite`: the standard TLS 1.3 suites (AES-GCM, ChaCha20, ECDSA) or the
/// national ones of RFC 8998 (SM4-GCM, SM3, SM2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsSuiteConfig {
    #[default]
    Standard,
    Gm,
}

impl TlsSuiteConfig {
    pub fn is_standard(&self) -> bool {
        *self == TlsSuiteConfig::Standard
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsSuiteConfig::Standard => "standard",
            TlsSuiteConfig::Gm => "gm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// A client's write (or flush) is acknowledged only once the target has it durable.
    Sync,
    /// The target trails by the replication lag; writes never wait for it.
    #[default]
    Async,
}

impl std::fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicationMode::Sync => "sync",
            ReplicationMode::Async => "async",
        })
    }
}

/// What a sync target's missed `sync_timeout_ms` does (`on_sync_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnSyncLoss {
    /// Writes go on without the target (it is degraded, recorded durably and told, so
    /// promoting it refuses without `--force`) until it has caught up.
    #[default]
    Degrade,
    /// Writes (their replies) wait until the target holds them, however long: no
    /// acknowledged write is ever missing on it (PostgreSQL's synchronous replication).
    Block,
}

impl std::fmt::Display for OnSyncLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnSyncLoss::Degrade => "degrade",
            OnSyncLoss::Block => "block",
        })
    }
}

fn default_sync_timeout_ms() -> u64 {
    5000
}
/// Default `replication.async_linger_us`: 1 ms.
pub const DEFAULT_ASYNC_LINGER_US: u64 = 1000;
fn default_async_linger_us() -> u64 {
    DEFAULT_ASYNC_LINGER_US
}
/// Most `replication.async_linger_us` accepted: the RPO it adds must stay small.
pub const MAX_ASYNC_LINGER_US: u64 = 100_000;
fn default_tail_bytes() -> ByteSize {
    ByteSize(64 << 20)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawReplication", into = "RawReplication")]
pub struct ReplicationConfig {
    /// This node's QUIC address (`HOST:PORT`); standbys accept their primary here.
    pub listen: String,
    /// Name of the cluster's primary node: a standby accepts only this peer.
    pub primary: String,
    /// How long a write waits for an unreachable sync target before that target is
    /// degraded to async (loudly: logged and shown in status). Clients never get an
    /// error because a target is slow or gone.
    #[serde(default = "default_sync_timeout_ms")]
    pub sync_timeout_ms: u64,
    /// Memory for recent durable records: a shipper that is current sends from here;
    /// one that is further behind reads journal segments.
    #[serde(default = "default_tail_bytes")]
    pub tail_bytes: ByteSize,
    /// Async targets only: once new records are durable, their shipper waits this
    /// many microseconds before sending, so the records that arrive meanwhile travel
    /// in the same write-set. Fewer, larger write-sets cut the per-write-set work on
    /// both nodes (QUIC packets, the standby's journal batches, acks); it adds at
    /// most this much to the RPO. A shipper that is behind never waits. 0: send at
    /// once. Sync targets never wait (the client's write does).
    #[serde(default = "default_async_linger_us")]
    pub async_linger_us: u64,
    /// `sync = "ANY 1 (dr1, dr2)"`: the sync policy — the listed targets are sync
    /// (whatever their `mode`), the others async, and a write is acknowledged once
    /// the policy is met. `None`: every `mode = "sync"` target must hold it.
    pub sync: Option<SyncPolicy>,
    /// On the primary: the standbys to ship to (`[[replication.target]]` without a
    /// `kind`, or `kind = "standby"`).
    pub targets: Vec<TargetConfig>,
    /// On the primary: the archives (`[[replication.target]] kind = "archive"`), the
    /// cold tier in object storage. A standby ignores them until promoted.
    pub archives: Vec<ArchiveTargetConfig>,
}

/// An archive target: write-set packs and base images in an object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveTargetConfig {
    pub name: String,
    /// `s3://bucket/prefix` (credentials and endpoint from the `AWS_*` environment) or
    /// `file:///dir`.
    pub url: String,
    /// A pack is uploaded at least this often while write-sets wait (seconds).
    pub flush_interval_s: u64,
    /// Which points stay restorable as they age; compaction thins and merges the packs
    /// to it. `None`: every point is kept, nothing is compacted.
    pub retention: Option<crate::grid::RetentionGrid>,
    /// A new base image at least this often (seconds), so a restore replays at most
    /// this much of packs; also what lets compaction drop packs past the grid.
    pub base_interval_s: Option<u64>,
    /// Objects are locked (WORM) this many days after upload: compaction's garbage
    /// collection never deletes a younger one (archive/FORMAT.md, "Object lock").
    pub object_lock_days: Option<u64>,
    /// Position among the `[[replication.target]]` sections (for error keys and to
    /// write them back in order).
    pub index: usize,
    /// What was configured that an archive target does not take (refused by
    /// `validate`, naming the key).
    pub address: Option<String>,
    pub mode: Option<ReplicationMode>,
}

/// Default `flush_interval` of an archive target (seconds).
pub const DEFAULT_ARCHIVE_FLUSH_INTERVAL_S: u64 = 10;

/// `[[replication.target]]` as written: a standby (QUIC) or an archive target.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<ReplicationMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_sync_loss: Option<OnSyncLoss>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_lag_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    flush_interval: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compress: Option<Compress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bandwidth: Option<String>,
    retention: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_interval: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object_lock_days: Option<u64>,
}

/// `[replication]` as written; targets split by kind in [`ReplicationConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    listen: String,
    primary: String,
    #[serde(default = "default_sync_timeout_ms")]
    sync_timeout_ms: u64,
    #[serde(default = "default_tail_bytes")]
    tail_bytes: ByteSize,
    #[serde(default = "default_async_linger_us")]
    async_linger_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sync: Option<String>,
    #[serde(rename = "target", default, skip_serializing_if = "Vec::is_empty")]
    targets: Vec<RawTarget>,
}

impl TryFrom<RawReplication> for ReplicationConfig {
    type Error = String;

    fn try_from(r: RawReplication) -> Result<Self, String> {
        let sync = r
            .sync
            .as_deref()
            .map(SyncPolicy::parse)
            .transpose()
            .map_err(|e| format!("replication.sync: {e}"))?;
        let mut targets = Vec::new();
        let mut archives = Vec::new();
        for (i, t) in r.targets.into_iter().enumerate() {
            match t.kind.as_deref() {
                None | Some("standby") => targets.push(standby_target(t, i, sync.as_ref())?),
                Some("archive") => archives.push(archive_target(t, i)?),
                Some(k) => {
                    return Err(format!(
                        "{}: '{k}' (use \"standby\" or \"archive\")",
                        target_key(i, "kind")
                    ))
                }
            }
        }
        Ok(ReplicationConfig {
            listen: r.listen,
            primary: r.primary,
            sync_timeout_ms: r.sync_timeout_ms,
            tail_bytes: r.tail_bytes,
            async_linger_us: r.async_linger_us,
            sync,
            targets,
            archives,
        })
    }
}

/// The config key of field `f` of the `i`th `[[replication.target]]`.
fn target_key(i: usize, f: &str) -> String {
    format!("replication.target[{i}].{f}")
}

/// A `[[replication.target]]` of kind standby (the `i`th): its keys checked. With a
/// sync policy, it is sync if and only if the policy lists it.
fn standby_target(
    t: RawTarget,
    i: usize,
    sync: Option<&SyncPolicy>,
) -> Result<TargetConfig, String> {
    let key = |f: &str| target_key(i, f);
    let mode = t.mode.unwrap_or_default();
    let is_sync = sync.map_or(mode == ReplicationMode::Sync, |p| p.lists(&t.name));
    if let Some(p) = sync.filter(|_| !is_sync && mode == ReplicationMode::Sync) {
        return Err(format!(
            "replication.sync: '{}' has mode = \"sync\" ({}) but '{p}' does not list it \
             (list it, or drop its mode: the policy decides which targets are sync)",
            t.name,
            key("mode")
        ));
    }
    if !is_sync && t.on_sync_loss == Some(OnSyncLoss::Block) {
        return Err(format!(
            "{}: \"block\" needs a sync target ({}; writes never wait for an async target)",
            key("on_sync_loss"),
            if sync.is_some() {
                "listed in replication.sync"
            } else {
                "mode = \"sync\""
            }
        ));
    }
    let wan = TargetWan {
        compress: t.compress.unwrap_or_default(),
        max_bandwidth: t
            .max_bandwidth
            .as_deref()
            .map(crate::size::parse_bandwidth)
            .transpose()
            .map_err(|e| format!("{}: {e}", key("max_bandwidth")))?,
    };
    if let Some(s) = t.max_lag_seconds.filter(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(format!(
            "{}: {s} (seconds, more than 0; leave it out for no pacing)",
            key("max_lag_seconds")
        ));
    }
    for (f, set) in [
        ("url", t.url.is_some()),
        ("flush_interval", t.flush_interval.is_some()),
        ("retention", t.retention.is_some()),
        ("base_interval", t.base_interval.is_some()),
        ("object_lock_days", t.object_lock_days.is_some()),
    ] {
        if set {
            return Err(format!(
                "{}: only an archive target (kind = \"archive\") takes it",
                key(f)
            ));
        }
    }
    Ok(TargetConfig {
        name: t.name,
        address: t.address.ok_or_else(|| {
            format!(
                "{}: missing (a standby target's QUIC HOST:PORT)",
                key("address")
            )
        })?,
        mode,
        on_sync_loss: t.on_sync_loss.unwrap_or_default(),
        wan,
        max_lag_seconds: t.max_lag_seconds,
    })
}

/// A `[[replication.target]]` of kind archive (the `i`th): the standby-only keys
/// refused, its own checked (address and mode are kept for `validate_archives`).
fn archive_target(t: RawTarget, i: usize) -> Result<ArchiveTargetConfig, String> {
    let key = |f: &str| target_key(i, f);
    if t.max_lag_seconds.is_some() {
        return Err(format!(
            "{}: only a standby target paces writes",
            key("max_lag_seconds")
        ));
    }
    if t.on_sync_loss.is_some() {
        return Err(format!(
            "{}: an archive target is always async",
            key("on_sync_loss")
        ));
    }
    if t.compress.is_some() || t.max_bandwidth.is_some() {
        return Err(format!(
            "{}: only a standby target takes compress and max_bandwidth",
            key(if t.compress.is_some() {
                "compress"
            } else {
                "max_bandwidth"
            })
        ));
    }
    Ok(ArchiveTargetConfig {
        name: t.name,
        url: t.url.ok_or_else(|| {
            format!(
                "{}: missing (s3://bucket/prefix or file:///dir)",
                key("url")
            )
        })?,
        flush_interval_s: t.flush_interval.unwrap_or(DEFAULT_ARCHIVE_FLUSH_INTERVAL_S),
        retention: t
            .retention
            .as_deref()
            .map(crate::grid::RetentionGrid::parse)
            .transpose()
            .map_err(|e| format!("{}: {e}", key("retention")))?,
        base_interval_s: t.base_interval,
        object_lock_days: t.object_lock_days,
        index: i,
        address: t.address,
        mode: t.mode,
    })
}

impl From<ReplicationConfig> for RawReplication {
    fn from(r: ReplicationConfig) -> Self {
        let mut targets: Vec<RawTarget> = r
            .targets
            .into_iter()
            .map(|t| RawTarget {
                name: t.name,
                kind: None,
                address: Some(t.address),
                mode: Some(t.mode),
                // The default stays unwritten (configs written before it existed).
                on_sync_loss: (t.on_sync_loss != OnSyncLoss::Degrade).then_some(t.on_sync_loss),
                max_lag_seconds: t.max_lag_seconds,
                url: None,
                flush_interval: None,
                // Defaults stay unwritten.
                compress: (t.wan.compress != Compress::Off).then_some(t.wan.compress),
                max_bandwidth: t.wan.max_bandwidth.map(crate::size::format_bandwidth),
                retention: None,
                base_interval: None,
                object_lock_days: None,
            })
            .collect();
        for a in r.archives {
            let at = a.index.min(targets.len());
            targets.insert(
                at,
                RawTarget {
                    name: a.name,
                    kind: Some("archive".into()),
                    address: a.address,
                    mode: a.mode,
                    on_sync_loss: None,
                    max_lag_seconds: None,
                    url: Some(a.url),
                    flush_interval: Some(a.flush_interval_s),
                    compress: None,
                    max_bandwidth: None,
                    retention: a.retention.map(|g| g.text),
                    base_interval: a.base_interval_s,
                    object_lock_days: a.object_lock_days,
                },
            );
        }
        RawReplication {
            listen: r.listen,
            primary: r.primary,
            sync_timeout_ms: r.sync_timeout_ms,
            tail_bytes: r.tail_bytes,
            async_linger_us: r.async_linger_us,
            sync: r.sync.map(|p| p.to_string()),
            targets,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// The standby's QUIC address (`HOST:PORT`).
    pub address: String,
    #[serde(default)]
    pub mode: ReplicationMode,
    /// A sync target's missed timeout: degrade it (default) or make writes wait.
    #[serde(default)]
    pub on_sync_loss: OnSyncLoss,
    /// WAN efficiency: compression and the bandwidth cap (default: neither).
    #[serde(default)]
    pub wan: TargetWan,
    /// Pacing: while this target streams and its lag is above this many seconds,
    /// write replies wait for it to come back under (None: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_seconds: Option<f64>,
}

/// A standby target's WAN settings (`compress`, `max_bandwidth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetWan {
    /// `compress = "zstd"`: data frames go zstd-compressed at an adaptive level when
    /// that saves bytes (to a standby that speaks protocol V3).
    #[serde(default)]
    pub compress: Compress,
    /// `max_bandwidth`: bytes per second put on the wire at most; `None`: no cap.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
}

/// `[[replication.target]] compress`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    #[default]
    Off,
    Zstd,
}

impl std::fmt::Display for Compress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compress::Off => "off",
            Compress::Zstd => "zstd",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; also the name in its TLS certificate once replication is set up.
    pub name: String,
    pub role: Role,
    /// Cluster id, 32 hex digits. It binds every journal batch and frame to the cluster.
    pub cluster_id: String,
    /// Directory of the node's metadata store (`meta.redb`).
    pub metadata_dir: PathBuf,
}

fn default_segment_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_checkpoint_interval_ms() -> u64 {
    30000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Total journal size; writes wait (they never fail) while it is full.
    pub size: ByteSize,
    #[serde(default = "default_segment_size")]
    pub segment_size: ByteSize,
    #[serde(default)]
    pub engine: EngineChoice,
    #[serde(default)]
    pub recovery: RecoveryMode,
    /// Upper bound between checkpoints (base volumes fsynced, journal released).
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Durable batch writes in flight at once (1..=8, io_uring only). Recovery then
    /// truncates up to that many batches as a torn tail (journal/FORMAT.md).
    #[serde(default = "default_inflight_batches")]
    pub inflight_batches: u32,
    /// Nice value of the journal writer thread (-20..=19; 0 leaves it alone). Every
    /// acknowledged write waits for it, so it should get the CPU as soon as its
    /// device write completes: -10 measured ~5% more 4k QD32 write IOPS on 2 busy
    /// cores (the durable write's completion-to-wake-up time shrank). Lowering it
    /// needs CAP_SYS_NICE (the systemd unit grants it); without, a warning is logged
    /// and the writer runs at the process's priority.
    #[serde(default = "default_writer_nice")]
    pub writer_nice: i32,
}

/// Default `journal.writer_nice`.
pub const DEFAULT_WRITER_NICE: i32 = -10;
fn default_writer_nice() -> i32 {
    DEFAULT_WRITER_NICE
}

fn default_inflight_batches() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    pub listen: String,
    /// NBD over TLS (`NBD_OPT_STARTTLS`); default off.
    #[serde(default, skip_serializing_if = "NbdTls::is_off")]
    pub tls: NbdTls,
    /// Server certificate (PEM) for NBD clients; default: `[tls] cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM); default: `[tls] key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) for client certificates: when set, every TLS client
    /// must present a certificate issued by one of them; absent: none is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Which TLS 1.3 suites NBD clients get (see [`NbdTlsSuite`]); absent: every
    /// set whose certificate is configured ([`Config::nbd_tls_suite`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_suite: Option<NbdTlsSuite>,
    /// SM2 server certificate (PEM) for the SM suites; default: `[tls] cert` in a
    /// gm cluster (`[tls] suite = "gm"`). `tls_cert` is then the standard one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_gm_cert: Option<PathBuf>,
    /// Its private key (PEM); default: `[tls] key` in a gm cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_gm_key: Option<PathBuf>,
    /// NBD connections at once (default 64, 1 to 65536). At the cap a new
    /// connection displaces the one that has waited longest in its handshake; when
    /// every connection is in a session it is closed at once. Both are counted and
    /// logged (rate-limited). Each session may use up to 128 MiB of request buffers
    /// under load, so the cap also bounds memory.
    #[serde(
        default = "default_nbd_max_connections",
        skip_serializing_if = "is_default_nbd_max_connections"
    )]
    pub max_connections: u32,
    /// Seconds a client has to finish the NBD handshake, TLS included (default 10,
    /// as qemu-nbd; 1 to 3600). Idle sockets that never negotiate are dropped then.
    #[serde(
        default = "default_nbd_handshake_timeout_secs",
        skip_serializing_if = "is_default_nbd_handshake_timeout_secs"
    )]
    pub handshake_timeout_secs: u64,
    /// Seconds a session may go without a request (and none in flight) before it is
    /// closed; 0 (the default) = never. Off by default because a quiet session is
    /// normal for a block device: a VM whose guest does no I/O for hours, or the
    /// kernel's nbd client, must not lose its disk; most clients do not reconnect
    /// on their own. Set it where clients are short-lived tools (backups, copies)
    /// that may leave sessions behind.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub idle_timeout_secs: u64,
}

/// Default of `nbd.max_connections`.
pub const DEFAULT_NBD_MAX_CONNECTIONS: u32 = 64;
/// Default of `nbd.handshake_timeout_secs`.
pub const DEFAULT_NBD_HANDSHAKE_TIMEOUT_SECS: u64 = 10;

fn default_nbd_max_connections() -> u32 {
    DEFAULT_NBD_MAX_CONNECTIONS
}
fn is_default_nbd_max_connections(v: &u32) -> bool {
    *v == DEFAULT_NBD_MAX_CONNECTIONS
}
fn default_nbd_handshake_timeout_secs() -> u64 {
    DEFAULT_NBD_HANDSHAKE_TIMEOUT_SECS
}
fn is_default_nbd_handshake_timeout_secs(v: &u64) -> bool {
    *v == DEFAULT_NBD_HANDSHAKE_TIMEOUT_SECS
}
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl NbdConfig {
    /// A plain NBD listener on `listen`.
    pub fn plain(listen: impl Into<String>) -> NbdConfig {
        NbdConfig {
            listen: listen.into(),
            tls: NbdTls::Off,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_suite: None,
            tls_gm_cert: None,
            tls_gm_key: None,
            max_connections: DEFAULT_NBD_MAX_CONNECTIONS,
            handshake_timeout_secs: DEFAULT_NBD_HANDSHAKE_TIMEOUT_SECS,
            idle_timeout_secs: 0,
        }
    }
}

/// `nbd.tls`: whether NBD clients may or must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTls {
    /// Plain NBD only.
    #[default]
    Off,
    /// Clients choose: STARTTLS is offered, plain sessions are served too.
    Optional,
    /// Nothing but STARTTLS before TLS (export names included).
    Require,
}

impl NbdTls {
    pub fn is_off(&self) -> bool {
        *self == NbdTls::Off
    }
}

/// `nbd.tls_suite`: the TLS 1.3 suites offered to NBD clients. qemu, libnbd and
/// the kernel's tools (GnuTLS) speak only the standard suites, so a gm cluster
/// usually wants `both`: each connection's ClientHello picks the set, an SM
/// client (one offering TLS_SM4_GCM_SM3) gets the SM suites and the SM2
/// certificate, any other the standard suites and the standard certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NbdTlsSuite {
    /// AES-GCM / ChaCha20, ECDSA certificates: `tls_cert`, or a standard
    /// cluster's certificate.
    Standard,
    /// RFC 8998 only (TLS_SM4_GCM_SM3, curveSM2, sm2sig_sm3), SM2 certificates:
    /// `tls_gm_cert`, or a gm cluster's certificate.
    Gm,
    /// The SM suites to clients that offer them, the standard ones to others.
    Both,
}

impl NbdTlsSuite {
    pub fn name(self) -> &'static str {
        match self {
            NbdTlsSuite::Standard => "standard",
            NbdTlsSuite::Gm => "gm",
            NbdTlsSuite::Both => "both",
        }
    }

    pub fn standard(self) -> bool {
        self != NbdTlsSuite::Gm
    }

    pub fn gm(self) -> bool {
        self != NbdTlsSuite::Standard
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    /// Backing file or block device.
    pub path: PathBuf,
    pub size: ByteSize,
    /// When a write's reply is sent (`cache`): see [`CacheMode`]. Left out of written
    /// configs when it is the default, so configs written before it stay unchanged.
    #[serde(default, skip_serializing_if = "CacheMode::is_default")]
    pub cache: CacheMode,
}

/// A volume's write cache mode (`volume.cache`): what an NBD write's reply promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// A reply means the write holds its place in the journal's order and is visible
    /// to reads; only FLUSH, and a write with FUA, promise durability (locally and on
    /// every sync target), like a disk with a volatile write cache.
    Writeback,
    /// A reply means durable in the journal (and on every sync target).
    Writethrough,
    /// Writethrough until the volume sees its first FLUSH (the client shows it knows
    /// to flush), then writeback until the daemon restarts (Ceph RBD's rule).
    #[default]
    WritethroughUntilFlush,
}

impl CacheMode {
    fn is_default(&self) -> bool {
        *self == CacheMode::default()
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::WritethroughUntilFlush => "writethrough-until-flush",
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })?;
        Ok(cfg)
    }

    /// Parses TOML; the message names the key (`journal.size`, `volume[1].size`) and
    /// the line. The parser's own message points at the value but not at its key, and
    /// `size` alone is ambiguous: journal, volume and the undo log all have one.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| describe_parse_error(text, &e))
    }

    pub fn to_toml(&self) -> String {
        // Serialising our own plain structs cannot fail; an error would be a bug here.
        toml::to_string_pretty(self).unwrap_or_else(|e| panic!("config serialisation bug: {e}"))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.node.metadata_dir);
        abs(&mut self.journal.dir);
        abs(&mut self.control.socket);
        if let Some(p) = self.access.as_mut().and_then(|a| a.audit_log.as_mut()) {
            abs(p);
        }
        if let Some(n) = &mut self.nbd {
            for p in [
                &mut n.tls_cert,
                &mut n.tls_key,
                &mut n.tls_ca,
                &mut n.tls_gm_cert,
                &mut n.tls_gm_key,
            ]
            .into_iter()
            .flatten()
            {
                abs(p);
            }
        }
        if let Some(t) = &mut self.tls {
            abs(&mut t.ca);
            abs(&mut t.cert);
            abs(&mut t.key);
        }
        for v in &mut self.volumes {
            abs(&mut v.path);
        }
        if let Some(d) = self.pit.as_mut().and_then(|p| p.dir.as_mut()) {
            abs(d);
        }
        if let Some(e) = &mut self.encryption {
            abs(&mut e.key_file);
        }
    }

    /// The `[pit]` settings in force (defaults when the section is absent).
    pub fn pit(&self) -> PitConfig {
        self.pit.clone().unwrap_or_default()
    }

    /// Where the standby's undo log lives.
    pub fn undo_dir(&self) -> PathBuf {
        self.pit()
            .dir
            .unwrap_or_else(|| self.node.metadata_dir.join("undo"))
    }

    /// Semantic checks. Returns (key, message) for the first problem found.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.validate_access()?;
        if let Some(a) = &self.audit {
            a.validate()?;
        }
        self.validate_node()?;
        self.validate_journal()?;
        self.validate_nbd()?;
        self.validate_replication()?;
        self.validate_volumes()?;
        self.validate_metrics()?;
        self.validate_pit()?;
        self.validate_cluster()?;
        if self
            .encryption
            .as_ref()
            .is_some_and(|e| e.key_file.as_os_str().is_empty())
        {
            return Err(("encryption.key_file".into(), "must not be empty".into()));
        }
        Ok(())
    }

    /// Checks the node's name and cluster id.
    fn validate_node(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if !valid_name(&self.node.name) {
            return bad("node.name", name_rule(&self.node.name));
        }
        if let Err(e) = parse_cluster_id(&self.node.cluster_id) {
            return bad("node.cluster_id", e);
        }
        Ok(())
    }

    /// Checks the `[journal]` section.
    fn validate_journal(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        let seg = self.journal.segment_size.0;
        if seg < (1 << 20) || !seg.is_multiple_of(4096) {
            return bad(
                "journal.segment_size",
                format!("{seg} bytes: must be at least 1MiB and a multiple of 4KiB"),
            );
        }
        if self.journal.size.0 < 2 * seg {
            return bad(
                "journal.size",
                format!(
                    "{} is smaller than two segments ({}); the journal needs room to write one segment while releasing another",
                    self.journal.size,
                    ByteSize(2 * seg)
                ),
            );
        }
        if !(-20..=19).contains(&self.journal.writer_nice) {
            return bad(
                "journal.writer_nice",
                format!("{}: must be -20 to 19", self.journal.writer_nice),
            );
        }
        if !(1..=8).contains(&self.journal.inflight_batches) {
            return bad(
                "journal.inflight_batches",
                format!("{}: must be 1 to 8", self.journal.inflight_batches),
            );
        }
        if self.journal.checkpoint_interval_ms == 0 {
            return bad(
                "journal.checkpoint_interval_ms",
                "must be greater than 0".into(),
            );
        }
        Ok(())
    }

    /// Checks the `[nbd]` section (required on a primary).
    fn validate_nbd(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        match (&self.nbd, self.node.role) {
            (None, Role::Primary) => {
                return bad(
                    "nbd",
                    "a primary needs an [nbd] section with `listen`".into(),
                )
            }
            (Some(n), _) => {
                if let Err(e) = self.nbd_addr() {
                    return bad("nbd.listen", e);
                }
                validate_nbd_limits(n)?;
                self.validate_nbd_tls(n)?;
            }
            (None, Role::Standby) => {}
        }
        Ok(())
    }

    /// Checks the `[replication]` section (required on a standby) and its targets.
    fn validate_replication(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if let Some(r) = &self.replication {
            if self.tls.is_none() {
                return bad(
                    "tls",
                    "replication needs a [tls] section (ca, cert, key); `ferryctl init --standby` creates one".into(),
                );
            }
            if let Err(e) = parse_addr(&r.listen) {
                return bad("replication.listen", e);
            }
            if !valid_node_name(&r.primary) {
                return bad("replication.primary", node_name_rule(&r.primary));
            }
            if r.sync_timeout_ms == 0 {
                return bad(
                    "replication.sync_timeout_ms",
                    "must be greater than 0".into(),
                );
            }
            if r.async_linger_us > MAX_ASYNC_LINGER_US {
                return bad(
                    "replication.async_linger_us",
                    format!(
                        "{} is above {MAX_ASYNC_LINGER_US} (100 ms): it is added to the async RPO",
                        r.async_linger_us
                    ),
                );
            }
            // A standby's targets are whom it ships to once promoted (typically the
            // primary it follows now, for failback); ignored while it is a standby.
            if self.node.role == Role::Standby && r.primary == self.node.name {
                return bad(
                    "replication.primary",
                    format!("'{}' is this standby's own name", r.primary),
                );
            }
            let mut seen = HashSet::new();
            for (i, t) in r.targets.iter().enumerate() {
                let key = |f: &str| format!("replication.target[{i}].{f}");
                if !valid_node_name(&t.name) {
                    return bad(&key("name"), node_name_rule(&t.name));
                }
                if t.name == self.node.name || !seen.insert(t.name.as_str()) {
                    return bad(&key("name"), format!("'{}' is used twice", t.name));
                }
                if let Err(e) = parse_addr(&t.address) {
                    return bad(&key("address"), e);
                }
            }
            self.validate_archives(r, &mut seen)?;
            self.validate_sync_policy()?;
            if !valid_node_name(&self.node.name) {
                return bad("node.name", node_name_rule(&self.node.name));
            }
        } else if self.node.role == Role::Standby {
            return bad(
                "replication",
                "a standby needs a [replication] section (listen, primary)".into(),
            );
        }
        Ok(())
    }

    /// Checks `[cluster]`: valid unique names and addresses, this node among them, and
    /// a `[replication]` section (membership is about replication).
    fn validate_cluster(&self) -> Result<(), (String, String)> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let bad = |k: String, m: String| Err((k, m));
        if self.replication.is_none() {
            return bad(
                "cluster".into(),
                "membership needs a [replication] section".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, n) in c.nodes.iter().enumerate() {
            let key = |f: &str| format!("cluster.node[{i}].{f}");
            if !valid_node_name(&n.name) {
                return bad(key("name"), node_name_rule(&n.name));
            }
            if !names.insert(n.name.as_str()) {
                return bad(key("name"), format!("'{}' is listed twice", n.name));
            }
            if let Err(e) = parse_addr(&n.address) {
                return bad(key("address"), e);
            }
        }
        if !names.contains(self.node.name.as_str()) {
            return bad(
                "cluster.node".into(),
                format!("this node ('{}') is not a member", self.node.name),
            );
        }
        self.validate_via(c)
    }

    /// Checks every `via` (cascading): it names another member, the chain of relays
    /// ends (no loop), and the member it relays to is async everywhere a mode can be
    /// said (its own `mode`, a `[[replication.target]]` of its name, `replication.sync`):
    /// a relay acknowledges what it holds, not what the relayed node holds, so no
    /// write may wait for a relayed node.
    fn validate_via(&self, c: &ClusterConfig) -> Result<(), (String, String)> {
        for (i, n) in c.nodes.iter().enumerate() {
            let Some(via) = &n.via else {
                if n.via_fallback.is_some() {
                    return Err((
                        format!("cluster.node[{i}].via_fallback"),
                        format!("'{}' has no via: nothing to fall back from", n.name),
                    ));
                }
                continue;
            };
            let key = format!("cluster.node[{i}].via");
            if *via == n.name {
                return Err((key, format!("'{via}' cannot relay to itself")));
            }
            if !c.nodes.iter().any(|m| m.name == *via) {
                return Err((key, format!("'{via}' is not a member ([[cluster.node]])")));
            }
            if n.mode == ReplicationMode::Sync {
                return Err((
                    format!("cluster.node[{i}].mode"),
                    format!(
                        "'{}' is relayed (via = \"{via}\") and must be async: a relayed node \
                         cannot hold writes back (drop mode = \"sync\" or the via)",
                        n.name
                    ),
                ));
            }
            let mut hop = via.as_str();
            for _ in 0..c.nodes.len() {
                match c
                    .nodes
                    .iter()
                    .find(|m| m.name == hop)
                    .and_then(|m| m.via.as_deref())
                {
                    Some(next) if next == n.name => {
                        return Err((
                            key,
                            format!("relays loop back to '{}' through '{hop}'", n.name),
                        ))
                    }
                    Some(next) => hop = next,
                    None => break,
                }
            }
            let listed = self.replication.as_ref().and_then(|r| {
                r.targets
                    .iter()
                    .position(|t| t.name == n.name && t.mode == ReplicationMode::Sync)
            });
            if let Some(t) = listed {
                return Err((
                    target_key(t, "mode"),
                    format!(
                        "'{}' is relayed (cluster.node[{i}].via = \"{via}\") and must be async",
                        n.name
                    ),
                ));
            }
            if self.sync_policy().is_some_and(|p| p.lists(&n.name)) {
                return Err((
                    "replication.sync".into(),
                    format!(
                        "'{}' is relayed (cluster.node[{i}].via = \"{via}\") and must be async: \
                         a sync policy cannot list it",
                        n.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The member that relays to `name` (its `via`), if any.
    pub fn via_of(&self, name: &str) -> Option<&str> {
        self.cluster
            .iter()
            .flat_map(|c| c.nodes.iter())
            .find(|n| n.name == name)
            .and_then(|n| n.via.as_deref())
    }

    /// Whom this node ships to, as the primary, while their relay is down (cascading
    /// with `via_fallback = "primary"`): each relayed member (async) with its relay's
    /// name. Empty without `[cluster]`.
    pub fn fallback_targets(&self) -> Vec<(TargetConfig, String)> {
        let fallback = |name: &str| {
            self.cluster
                .iter()
                .flat_map(|c| c.nodes.iter())
                .find(|n| n.name == name)
                .is_some_and(|n| n.via_fallback.unwrap_or_default() == ViaFallback::Primary)
        };
        self.listed_ship_targets()
            .into_iter()
            .filter_map(|mut t| {
                let via = self.via_of(&t.name)?.to_string();
                if via == self.node.name || !fallback(&t.name) {
                    return None;
                }
                t.mode = ReplicationMode::Async;
                t.on_sync_loss = OnSyncLoss::Degrade;
                Some((t, via))
            })
            .collect()
    }

    /// Whom this node relays to as a standby (cascading): every target whose `via`
    /// names this node, always async, with its `[[replication.target]]` settings
    /// (compress, max_bandwidth) when it has an entry. Empty without `[cluster]`.
    pub fn relay_targets(&self) -> Vec<TargetConfig> {
        let mut targets = self.listed_ship_targets();
        targets.retain(|t| self.via_of(&t.name) == Some(self.node.name.as_str()));
        for t in &mut targets {
            t.mode = ReplicationMode::Async;
            t.on_sync_loss = OnSyncLoss::Degrade;
        }
        targets
    }

    /// `replication.sync` names only targets this node ships to (its own
    /// `[[replication.target]]`s and the other members) or this node itself, and
    /// every member with `mode = "sync"` is listed (the targets' own are checked as
    /// they are read). This node's own name is allowed so that every member's config
    /// can carry the same policy (as PostgreSQL's `synchronous_standby_names`): as
    /// the primary a node is never its own target, and the gate counts it as not
    /// holding writes back, so the policy is met by the others.
    fn validate_sync_policy(&self) -> Result<(), (String, String)> {
        let Some(p) = self.sync_policy() else {
            return Ok(());
        };
        let bad = |m: String| Err(("replication.sync".to_string(), m));
        let targets = self.listed_ship_targets();
        for n in p.names.iter().filter(|n| **n != self.node.name) {
            if !targets.iter().any(|t| t.name == *n) {
                return bad(format!(
                    "'{n}' is not a target ([[replication.target]] or [[cluster.node]])"
                ));
            }
        }
        if let Some(t) = targets
            .iter()
            .find(|t| t.mode == ReplicationMode::Sync && !p.lists(&t.name))
        {
            return bad(format!(
                "'{}' has mode = \"sync\" but '{p}' does not list it (list it, or drop its \
                 mode: the policy decides which targets are sync)",
                t.name
            ));
        }
        Ok(())
    }

    /// The other members (empty without `[cluster]`).
    pub fn peers(&self) -> Vec<&ClusterNode> {
        self.cluster
            .iter()
            .flat_map(|c| c.nodes.iter())
            .filter(|n| n.name != self.node.name)
            .collect()
    }

    /// Whom this node ships to as the primary: its `[[replication.target]]`s, then
    /// every other member not named there (with the member's mode). A config without
    /// `[cluster]` gives its targets alone, as before membership existed. With
    /// `replication.sync`, the targets it lists are sync and every other one async.
    /// A member whose `via` names another node is left out (its relay ships to it;
    /// [`Self::relay_targets`], [`Self::fallback_targets`]).
    pub fn ship_targets(&self) -> Vec<TargetConfig> {
        let mut targets = self.listed_ship_targets();
        // A relayed member gets its records from its relay, unless this node is the
        // relay (a relay promoted to primary ships to it directly).
        targets.retain(|t| self.via_of(&t.name).is_none_or(|via| via == self.node.name));
        if let Some(p) = self.replication.as_ref().and_then(|r| r.sync.as_ref()) {
            for t in &mut targets {
                t.mode = if p.lists(&t.name) {
                    ReplicationMode::Sync
                } else {
                    ReplicationMode::Async
                };
            }
        }
        targets
    }

    /// The sync policy (`replication.sync`), if any.
    pub fn sync_policy(&self) -> Option<&SyncPolicy> {
        self.replication.as_ref().and_then(|r| r.sync.as_ref())
    }

    /// [`Self::ship_targets`] with each target's own `mode`.
    fn listed_ship_targets(&self) -> Vec<TargetConfig> {
        let mut targets = self
            .replication
            .as_ref()
            .map(|r| r.targets.clone())
            .unwrap_or_default();
        for n in self.peers() {
            if !targets.iter().any(|t| t.name == n.name) {
                targets.push(TargetConfig {
                    name: n.name.clone(),
                    address: n.address.clone(),
                    mode: n.mode,
                    on_sync_loss: OnSyncLoss::default(),
                    wan: Default::default(),
                    max_lag_seconds: None,
                });
            }
        }
        targets
    }

    /// Checks the archive targets (`kind = "archive"`): a name like any target's, a
    /// URL the archive can open, no address, async only.
    fn validate_archives<'a>(
        &self,
        r: &'a ReplicationConfig,
        seen: &mut HashSet<&'a str>,
    ) -> Result<(), (String, String)> {
        let bad = |k: String, m: String| Err((k, m));
        for a in &r.archives {
            let key = |f: &str| format!("replication.target[{}].{f}", a.index);
            if !valid_node_name(&a.name) {
                return bad(key("name"), node_name_rule(&a.name));
            }
            if a.name == self.node.name || !seen.insert(a.name.as_str()) {
                return bad(key("name"), format!("'{}' is used twice", a.name));
            }
            if a.address.is_some() {
                return bad(
                    key("address"),
                    "an archive target has no address (it writes to its url)".into(),
                );
            }
            if a.mode == Some(ReplicationMode::Sync) {
                return bad(
                    key("mode"),
                    "an archive target is always async (writes never wait for object storage)"
                        .into(),
                );
            }
            let scheme_ok = ["s3://", "file:///"]
                .iter()
                .any(|p| a.url.starts_with(p) && a.url.len() > p.len());
            if !scheme_ok {
                return bad(
                    key("url"),
                    format!("'{}': use s3://BUCKET/PREFIX or file:///DIR", a.url),
                );
            }
            if a.flush_interval_s == 0 {
                return bad(key("flush_interval"), "must be at least 1 (seconds)".into());
            }
            if a.base_interval_s == Some(0) {
                return bad(key("base_interval"), "must be at least 1 (seconds)".into());
            }
            if a.object_lock_days == Some(0) {
                return bad(
                    key("object_lock_days"),
                    "must be at least 1 (days); leave it out for no object lock".into(),
                );
            }
        }
        Ok(())
    }

    /// Checks the `[[volume]]` sections.
    fn validate_volumes(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if self.volumes.is_empty() && self.node.role == Role::Primary {
            return bad(
                "volume",
                "a primary needs at least one [[volume]] section".into(),
            );
        }
        if self.volumes.len() > MAX_VOLUMES {
            return bad(
                "volume",
                format!("{} volumes; at most {MAX_VOLUMES}", self.volumes.len()),
            );
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = |f: &str| format!("volume[{i}].{f}");
            if !valid_name(&v.name) {
                return bad(&key("name"), name_rule(&v.name));
            }
            if !names.insert(v.name.as_str()) {
                return bad(&key("name"), format!("duplicate volume name '{}'", v.name));
            }
            if !paths.insert(v.path.as_path()) {
                return bad(
                    &key("path"),
                    format!("{} is used by two volumes", v.path.display()),
                );
            }
            if v.size.0 == 0 || !v.size.0.is_multiple_of(VOLUME_ALIGN) {
                return bad(
                    &key("size"),
                    format!(
                        "{} bytes: must be a positive multiple of {VOLUME_ALIGN}",
                        v.size.0
                    ),
                );
            }
        }
        Ok(())
    }

    /// Checks the `[metrics]` section.
    fn validate_metrics(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if let Some(m) = &self.metrics {
            if let Err(e) = parse_addr(&m.listen) {
                return bad("metrics.listen", e);
            }
        }
        Ok(())
    }

    /// Checks the `[pit]` section.
    fn validate_pit(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if let Some(p) = &self.pit {
            if p.segment_size.0 < (1 << 20) {
                return bad("pit.segment_size", "must be at least 1MiB".into());
            }
            if p.max_bytes.0 < 2 * p.segment_size.0 {
                return bad(
                    "pit.max_bytes",
                    format!(
                        "{} bytes: must hold at least two undo segments (pit.segment_size is {})",
                        p.max_bytes.0, p.segment_size.0
                    ),
                );
            }
            if p.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
                return bad("pit.dir", "must not be empty".into());
            }
        }
        Ok(())
    }

    /// `nbd.tls*`: a certificate and key from somewhere for every suite set
    /// offered when TLS is on, and no TLS setting that would silently do nothing.
    fn validate_nbd_tls(&self, n: &NbdConfig) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        let set = [
            ("nbd.tls_cert", &n.tls_cert),
            ("nbd.tls_key", &n.tls_key),
            ("nbd.tls_ca", &n.tls_ca),
            ("nbd.tls_gm_cert", &n.tls_gm_cert),
            ("nbd.tls_gm_key", &n.tls_gm_key),
        ];
        for (key, path) in set {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return bad(key, "must not be empty".into());
            }
            if n.tls.is_off() && path.is_some() {
                return bad(
                    key,
                    "is set but nbd.tls is \"off\": set tls = \"optional\" or \"require\", or remove it".into(),
                );
            }
        }
        if n.tls.is_off() && n.tls_suite.is_some() {
            return bad(
                "nbd.tls_suite",
                "is set but nbd.tls is \"off\": set tls = \"optional\" or \"require\", or remove it".into(),
            );
        }
        for (cert, key, c, k) in [
            ("nbd.tls_cert", "nbd.tls_key", &n.tls_cert, &n.tls_key),
            (
                "nbd.tls_gm_cert",
                "nbd.tls_gm_key",
                &n.tls_gm_cert,
                &n.tls_gm_key,
            ),
        ] {
            match (c, k) {
                (Some(_), None) => return bad(key, format!("{cert} is set without its key")),
                (None, Some(_)) => {
                    return bad(cert, format!("{key} is set without its certificate"))
                }
                _ => {}
            }
        }
        if n.tls.is_off() {
            return Ok(());
        }
        self.validate_nbd_tls_suite(n)
    }

    /// Each suite set offered has its certificate; no certificate is set for a
    /// set that is not offered.
    fn validate_nbd_tls_suite(&self, n: &NbdConfig) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        let (standard, gm) = self.nbd_tls_certs(n);
        let Some(suite) = self.nbd_tls_suite(n) else {
            return bad(
                "nbd.tls_cert",
                "NBD TLS needs tls_cert and tls_key, or a [tls] section whose cert and key are used".into(),
            );
        };
        let name = suite.name();
        if suite.standard() && !standard {
            return bad(
                "nbd.tls_cert",
                format!("nbd.tls_suite = \"{name}\" needs tls_cert and tls_key (ECDSA, RSA or Ed25519), or a standard cluster's [tls] certificate"),
            );
        }
        if suite.gm() && !gm {
            return bad(
                "nbd.tls_gm_cert",
                format!("nbd.tls_suite = \"{name}\" needs tls_gm_cert and tls_gm_key (SM2), or a gm cluster's [tls] certificate (ferryctl init --crypto gm)"),
            );
        }
        if !suite.standard() && n.tls_cert.is_some() {
            return bad("nbd.tls_cert", format!("is set but nbd.tls_suite = \"{name}\" offers no standard suite: set tls_suite = \"both\", or remove it"));
        }
        if !suite.gm() && n.tls_gm_cert.is_some() {
            return bad("nbd.tls_gm_cert", format!("is set but nbd.tls_suite = \"{name}\" offers no SM suite: set tls_suite = \"both\", or remove it"));
        }
        Ok(())
    }

    /// Whether an NBD certificate exists for the standard and the SM suites: the
    /// `[nbd]` one, else the cluster's certificate for its own suite set.
    fn nbd_tls_certs(&self, n: &NbdConfig) -> (bool, bool) {
        let cluster = self.tls.as_ref().map(|t| t.suite);
        (
            n.tls_cert.is_some() || cluster == Some(TlsSuiteConfig::Standard),
            n.tls_gm_cert.is_some() || cluster == Some(TlsSuiteConfig::Gm),
        )
    }

    /// The TLS suites NBD clients get: `nbd.tls_suite`, else every set that
    /// has a certificate (in a gm cluster: the SM suites with the cluster's SM2
    /// certificate, and the standard ones too when `nbd.tls_cert` is set).
    /// `None`: no certificate at all.
    pub fn nbd_tls_suite(&self, n: &NbdConfig) -> Option<NbdTlsSuite> {
        if let Some(s) = n.tls_suite {
            return Some(s);
        }
        match self.nbd_tls_certs(n) {
            (true, true) => Some(NbdTlsSuite::Both),
            (true, false) => Some(NbdTlsSuite::Standard),
            (false, true) => Some(NbdTlsSuite::Gm),
            (false, false) => None,
        }
    }

    pub fn nbd_addr(&self) -> Result<SocketAddr, String> {
        match &self.nbd {
            Some(n) => parse_addr(&n.listen),
            None => Err("no [nbd] section".into()),
        }
    }

    pub fn cluster_id(&self) -> [u8; 16] {
        // validate() has checked it; a default of zeros would only be reached by a bug.
        parse_cluster_id(&self.node.cluster_id).unwrap_or([0; 16])
    }
}

/// `HOST:PORT` with a numeric host (no name resolution at start-up: a DR daemon
/// must not depend on DNS to come up).
/// One line for a TOML error: `key `K`: MESSAGE (line L, column C)`, or the parser's
/// own text when it has no position (then there is no key to name either).
/// `nbd.max_connections`, `nbd.handshake_timeout_secs`: within their ranges.
fn validate_nbd_limits(n: &NbdConfig) -> Result<(), (String, String)> {
    if !(1..=65536).contains(&n.max_connections) {
        return Err((
            "nbd.max_connections".into(),
            format!("{}: must be 1 to 65536", n.max_connections),
        ));
    }
    if !(1..=3600).contains(&n.handshake_timeout_secs) {
        return Err((
            "nbd.handshake_timeout_secs".into(),
            format!("{}: must be 1 to 3600", n.handshake_timeout_secs),
        ));
    }
    Ok(())
}

fn describe_parse_error(text: &str, e: &toml::de::Error) -> String {
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return e.to_string().trim_end().to_string();
    };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = at - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let message = e.message().trim_end();
    match key_path_at(text, at) {
        Some(key) => format!("key `{key}`: {message} (line {line}, column {column})"),
        None => format!("{message} (line {line}, column {column})"),
    }
}

/// The dotted key whose line holds byte `at`: the nearest table header above it
/// (`[journal]` → `journal.`, the third `[[volume]]` → `volume[2].`) and the key left of
/// `=` on that line. Enough for the flat files ferry uses; `None` on a header line.
fn key_path_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let key = text[start..end].split_once('=')?.0.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let mut table: Option<String> = None;
    let mut headers = text[..start].lines().map(str::trim).rev();
    if let Some(h) = headers.find(|l| l.starts_with('[')) {
        let inner = |h: &str, open: &str, close: &str| {
            h.strip_prefix(open)
                .and_then(|r| r.split_once(close))
                .map(|(n, _)| n.trim().to_string())
        };
        table = match inner(h, "[[", "]]") {
            Some(name) => {
                let header = format!("[[{name}]]");
                let index = text[..start]
                    .lines()
                    .filter(|l| l.trim().replace(' ', "") == header.replace(' ', ""))
                    .count()
                    .saturating_sub(1);
                Some(format!("{name}[{index}]"))
            }
            None => inner(h, "[", "]"),
        };
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|e| format!("'{s}' is not HOST:PORT with a numeric address: {e}"))
}

/// Node names are also TLS names (a DNS label in the node's certificate).
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn node_name_rule(s: &str) -> String {
    format!("'{s}': node names are DNS labels: 1-63 of a-z 0-9 -, not starting or ending with '-'")
}

/// Names appear in export names, file names and certificates: keep them plain.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

fn name_rule(s: &str) -> String {
    format!("'{s}': names are 1-64 characters of A-Z a-z 0-9 . _ - and do not start with '.'")
}

pub fn parse_cluster_id(s: &str) -> Result<[u8; 16], String> {
    let s = s.trim();
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("'{s}' is not 32 hexadecimal digits"));
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

pub fn format_id(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
name = "primary"
role = "primary"
cluster_id = "00112233445566778899aabbccddeeff"
metadata_dir = "primary"

[journal]
dir = "primary/journal"
size = "256MiB"
segment_size = "16MiB"

[nbd]
listen = "127.0.0.1:10809"

[control]
socket = "primary/ferryd.sock"

[[volume]]
name = "vol0"
path = "primary/vol0.img"
size = "1GiB"
"#;

    fn invalid_key(text: &str) -> String {
        let cfg = Config::parse(text).expect("parses");
        cfg.validate().expect_err("should be invalid").0
    }

    #[test]
    fn good_config_parses_and_validates() {
        let cfg = Config::parse(GOOD).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.volumes[0].size.0, 1 << 30);
        assert_eq!(cfg.journal.engine, EngineChoice::Auto);
        assert_eq!(cfg.journal.recovery, RecoveryMode::TolerateTornTail);
        assert_eq!(cfg.cluster_id()[15], 0xff);
        // Round trip through our own serialiser.
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.volumes[0].name, "vol0");
    }

    fn with_targets(targets: &str) -> String {
        format!(
            "{GOOD}\n[tls]\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p.key\"\n\
             [replication]\nlisten = \"127.0.0.1:7000\"\nprimary = \"primary\"\n{targets}"
        )
    }

    /// Without `[cluster]` a node ships to its targets alone and has no peers (as
    /// before membership); with it, every other member is shipped to after the listed
    /// targets, a member listed there keeps the target's settings, and the section
    /// must name this node once and every member once.
    #[test]
    fn membership_adds_the_other_members_and_is_checked() {
        let target = "[[replication.target]]\nname = \"dr1\"\naddress = \"127.0.0.1:7001\"\nmode = \"sync\"\n";
        let cfg = Config::parse(&with_targets(target)).unwrap();
        cfg.validate().unwrap();
        assert!(cfg.peers().is_empty());
        let names = |c: &Config| {
            c.ship_targets()
                .into_iter()
                .map(|t| (t.name, t.mode))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&cfg),
            vec![("dr1".to_string(), ReplicationMode::Sync)]
        );
        let member = |n: &str, port: u16, mode: &str| {
            format!("[[cluster.node]]\nname = \"{n}\"\naddress = \"127.0.0.1:{port}\"\nmode = \"{mode}\"\n")
        };
        let members = member("primary", 7000, "sync")
            + &member("dr1", 7001, "async")
            + &member("dr2", 7002, "async");
        let cfg = Config::parse(&with_targets(&format!("{target}{members}"))).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.peers().len(), 2);
        assert_eq!(
            names(&cfg),
            vec![
                ("dr1".to_string(), ReplicationMode::Sync),
                ("dr2".to_string(), ReplicationMode::Async)
            ]
        );
        // Written back and read again, the membership is the same.
        assert_eq!(Config::parse(&cfg.to_toml()).unwrap().cluster, cfg.cluster);
        let without_me = member("dr1", 7001, "async") + &member("dr2", 7002, "async");
        assert_eq!(invalid_key(&with_targets(&without_me)), "cluster.node");
        let twice = member("primary", 7000, "sync")
            + &member("dr1", 7001, "async")
            + &member("dr1", 7003, "async");
        assert_eq!(invalid_key(&with_targets(&twice)), "cluster.node[2].name");
        let bad_addr = member("primary", 7000, "sync").replace("127.0.0.1:7000", "nowhere");
        assert_eq!(
            invalid_key(&with_targets(&bad_addr)),
            "cluster.node[0].address"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}\n{}", member("primary", 7000, "sync"))),
            "cluster"
        );
    }

    /// Cascading: a member with `via` is shipped to by the member it names, not by the
    /// primary (unless the primary is that member); it is async, and a sync mode for
    /// it anywhere, an unknown relay, itself or a loop is refused naming the key.
    #[test]
    fn via_moves_a_member_to_its_relay_and_is_checked() {
        let node = |n: &str, port: u16, extra: &str| {
            format!("[[cluster.node]]\nname = \"{n}\"\naddress = \"127.0.0.1:{port}\"\n{extra}")
        };
        let members = |far: &str| {
            node("primary", 7000, "") + &node("dr1", 7001, "") + &node("far", 7002, far)
        };
        let names = |ts: Vec<TargetConfig>| ts.into_iter().map(|t| t.name).collect::<Vec<_>>();
        let cfg = Config::parse(&with_targets(&members("via = \"dr1\"\n"))).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.via_of("far"), Some("dr1"));
        assert_eq!(names(cfg.ship_targets()), vec!["dr1"]);
        assert!(cfg.relay_targets().is_empty());
        assert_eq!(Config::parse(&cfg.to_toml()).unwrap().cluster, cfg.cluster);
        // dr1's view: it relays to far (async), and once promoted ships to it directly.
        let mut dr1 = cfg.clone();
        dr1.node.name = "dr1".into();
        assert_eq!(names(dr1.relay_targets()), vec!["far"]);
        assert_eq!(dr1.relay_targets()[0].mode, ReplicationMode::Async);
        assert_eq!(names(dr1.ship_targets()), vec!["primary", "far"]);
        let mut far = cfg.clone();
        far.node.name = "far".into();
        assert!(far.relay_targets().is_empty());
        // The primary falls back to far while dr1 is down (the default), dr1 never.
        let fb = cfg.fallback_targets();
        assert_eq!((fb[0].0.name.as_str(), fb[0].1.as_str()), ("far", "dr1"));
        assert!(dr1.fallback_targets().is_empty());
        let stay = Config::parse(&with_targets(&members(
            "via = \"dr1\"\nvia_fallback = \"stay\"\n",
        )))
        .unwrap();
        stay.validate().unwrap();
        assert!(stay.fallback_targets().is_empty());

        let err = |text: String| {
            let cfg = Config::parse(&text).expect("parses");
            cfg.validate().expect_err("should be invalid")
        };
        let (k, m) = err(with_targets(&members("via = \"dr1\"\nmode = \"sync\"\n")));
        assert_eq!(k, "cluster.node[2].mode");
        assert!(m.contains("relayed") && m.contains("async"), "{m}");
        let (k, m) = err(with_targets(&members("via = \"dr9\"\n")));
        assert_eq!(
            (k.as_str(), m.contains("not a member")),
            ("cluster.node[2].via", true),
            "{m}"
        );
        let (k, _) = err(with_targets(&members("via = \"far\"\n")));
        assert_eq!(k, "cluster.node[2].via");
        let (k, _) = err(with_targets(&members("via_fallback = \"stay\"\n")));
        assert_eq!(k, "cluster.node[2].via_fallback");
        let looped = node("primary", 7000, "")
            + &node("dr1", 7001, "via = \"far\"\n")
            + &node("far", 7002, "via = \"dr1\"\n");
        let (k, m) = err(with_targets(&looped));
        assert_eq!(k, "cluster.node[1].via");
        assert!(m.contains("loop"), "{m}");
        let sync_target = "[[replication.target]]\nname = \"far\"\naddress = \"127.0.0.1:7002\"\nmode = \"sync\"\n";
        let (k, _) = err(with_targets(&format!(
            "{sync_target}{}",
            members("via = \"dr1\"\n")
        )));
        assert_eq!(k, "replication.target[0].mode");
        let policy = format!(
            "sync = \"ANY 1 (dr1, far)\"\n{}",
            members("via = \"dr1\"\n")
        );
        let (k, m) = err(with_targets(&policy));
        assert_eq!(k, "replication.sync");
        assert!(m.contains("'far' is relayed"), "{m}");
    }

    /// `kind = "archive"` targets parse apart from the standbys, keep their place when
    /// written back, and every wrong key of one is named.
    #[test]
    fn archive_targets_parse_validate_and_name_their_keys() {
        let text = with_targets(
            "[[replication.target]]\nname = \"dr\"\naddress = \"127.0.0.1:7001\"\n\
             [[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"s3://b/p\"\n",
        );
        let cfg = Config::parse(&text).unwrap();
        cfg.validate().unwrap();
        let r = cfg.replication.as_ref().unwrap();
        assert_eq!(r.targets.len(), 1);
        assert_eq!(r.archives[0].url, "s3://b/p");
        assert_eq!(
            r.archives[0].flush_interval_s,
            DEFAULT_ARCHIVE_FLUSH_INTERVAL_S
        );
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.replication.unwrap().archives, r.archives);

        let archive = |extra: &str| {
            with_targets(&format!(
                "[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\n{extra}"
            ))
        };
        let key = "replication.target[0]";
        for (extra, field) in [
            ("url = \"s3://b\"\naddress = \"127.0.0.1:1\"\n", "address"),
            ("url = \"s3://b\"\nmode = \"sync\"\n", "mode"),
            ("url = \"http://b\"\n", "url"),
            (
                "url = \"file:///d\"\nflush_interval = 0\n",
                "flush_interval",
            ),
            ("url = \"file:///d\"\nbase_interval = 0\n", "base_interval"),
            (
                "url = \"file:///d\"\nobject_lock_days = 0\n",
                "object_lock_days",
            ),
        ] {
            assert_eq!(
                invalid_key(&archive(extra)),
                format!("{key}.{field}"),
                "{extra}"
            );
        }
        let e = Config::parse(&archive("")).unwrap_err().to_string();
        assert!(e.contains("replication.target[0].url"), "{e}");
        let e = Config::parse(&archive(
            "url = \"file:///d\"\nretention = \"every write-set for 1h, 1 per minute for 30m\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("replication.target[0].retention: tier 2"), "{e}");
        let grid = "every write-set for 1h, 1 per minute for 24h, 1 per hour for 30d";
        let cfg = Config::parse(&archive(&format!(
            "url = \"file:///d\"\nretention = \"{grid}\"\nbase_interval = 86400\nobject_lock_days = 7\n"
        )))
        .unwrap();
        cfg.validate().unwrap();
        let a = &cfg.replication.as_ref().unwrap().archives[0];
        assert_eq!(a.retention.as_ref().unwrap().tiers.len(), 2);
        assert_eq!(
            (a.base_interval_s, a.object_lock_days),
            (Some(86400), Some(7))
        );
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(&again.replication.unwrap().archives[0], a);
        let e = Config::parse(&with_targets(
            "[[replication.target]]\nname = \"dr\"\naddress = \"127.0.0.1:7001\"\nretention = \"every write-set for 1h\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("replication.target[0].retention"), "{e}");
        let e = Config::parse(&with_targets(
            "[[replication.target]]\nname = \"x\"\nkind = \"tape\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("replication.target[0].kind"), "{e}");
        // The name is shared with the standbys' namespace.
        let twice = with_targets(
            "[[replication.target]]\nname = \"dr\"\naddress = \"127.0.0.1:7001\"\n\
             [[replication.target]]\nname = \"dr\"\nkind = \"archive\"\nurl = \"file:///d\"\n",
        );
        assert_eq!(invalid_key(&twice), "replication.target[1].name");
    }

    /// `on_sync_loss`: default `degrade` (not written back), `block` kept; `block` on
    /// an async target and any value on an archive are refused, naming the key.
    #[test]
    fn on_sync_loss_parses_defaults_and_names_its_key() {
        let target = |extra: &str| {
            with_targets(&format!(
                "[[replication.target]]\nname = \"dr\"\naddress = \"127.0.0.1:7001\"\n{extra}"
            ))
        };
        let cfg = Config::parse(&target("mode = \"sync\"\n")).unwrap();
        let t = &cfg.replication.as_ref().unwrap().targets[0];
        assert_eq!(t.on_sync_loss, OnSyncLoss::Degrade);
        assert!(!cfg.to_toml().contains("on_sync_loss"), "{}", cfg.to_toml());
        let cfg = Config::parse(&target("mode = \"sync\"\non_sync_loss = \"block\"\n")).unwrap();
        assert_eq!(
            cfg.replication.as_ref().unwrap().targets[0].on_sync_loss,
            OnSyncLoss::Block
        );
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(
            again.replication.unwrap().targets[0].on_sync_loss,
            OnSyncLoss::Block
        );
        for text in [
            target("on_sync_loss = \"block\"\n"),
            with_targets(
                "[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\n\
                 url = \"s3://b/p\"\non_sync_loss = \"degrade\"\n",
            ),
        ] {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains("replication.target[0].on_sync_loss"), "{e}");
        }
        let e = Config::parse(&target("on_sync_loss = \"wait\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("wait"), "{e}");
    }

    /// `replication.sync`: the listed targets (own or members) are sync, the rest
    /// async, whatever their `mode`; written back as read; a bad policy, an unknown
    /// name, an unlisted `mode = "sync"` target or member, and `block` on an
    /// unlisted target are refused naming the key; this node's own name is allowed.
    #[test]
    fn sync_policy_decides_the_sync_targets_and_names_its_key() {
        let t = |n: &str, port: u16, extra: &str| {
            format!(
                "[[replication.target]]\nname = \"{n}\"\naddress = \"127.0.0.1:{port}\"\n{extra}"
            )
        };
        let member = |n: &str, port: u16, mode: &str| {
            format!("[[cluster.node]]\nname = \"{n}\"\naddress = \"127.0.0.1:{port}\"\nmode = \"{mode}\"\n")
        };
        let modes = |c: &Config| {
            c.ship_targets()
                .into_iter()
                .map(|t| (t.name, t.mode))
                .collect::<Vec<_>>()
        };
        let text = with_targets(&format!(
            "sync = \"ANY 1 (dr1, dr3)\"\n{}{}{}{}{}{}",
            t("dr1", 7001, "on_sync_loss = \"block\"\n"),
            t("dr2", 7002, "mode = \"async\"\n"),
            member("primary", 7000, "sync"),
            member("dr1", 7001, "async"),
            member("dr2", 7002, "async"),
            member("dr3", 7003, "async"),
        ));
        let cfg = Config::parse(&text).unwrap();
        cfg.validate().unwrap();
        let p = cfg.sync_policy().expect("policy");
        assert_eq!(p.quorum, ferry_proto::target::SyncQuorum::Any(1));
        assert_eq!(
            modes(&cfg),
            vec![
                ("dr1".to_string(), ReplicationMode::Sync),
                ("dr2".to_string(), ReplicationMode::Async),
                ("dr3".to_string(), ReplicationMode::Sync),
            ]
        );
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.sync_policy(), cfg.sync_policy());
        assert!(cfg.to_toml().contains("sync = \"ANY 1 (dr1, dr3)\""));
        // Without a policy nothing is written and the modes are the targets' own.
        let plain = Config::parse(&with_targets(&t("dr1", 7001, "mode = \"sync\"\n"))).unwrap();
        assert!(plain.sync_policy().is_none());
        assert!(!plain.to_toml().contains("sync ="), "{}", plain.to_toml());

        let parse_err = |text: &str| Config::parse(text).unwrap_err().to_string();
        for (policy, why) in [
            ("ANY 0 (dr1)", "the count must be 1 to 1"),
            ("ANY 1 (dr1, dr1)", "'dr1' is listed twice"),
            ("MOST 1 (dr1)", "use ANY or FIRST"),
        ] {
            let e = parse_err(&with_targets(&format!(
                "sync = \"{policy}\"\n{}",
                t("dr1", 7001, "")
            )));
            assert!(e.contains("replication.sync") && e.contains(why), "{e}");
        }
        let e = parse_err(&with_targets(&format!(
            "sync = \"dr1\"\n{}{}",
            t("dr1", 7001, ""),
            t("dr2", 7002, "mode = \"sync\"\n")
        )));
        assert!(
            e.contains("replication.sync") && e.contains("'dr2' has mode = \"sync\""),
            "{e}"
        );
        let e = parse_err(&with_targets(&format!(
            "sync = \"dr1\"\n{}{}",
            t("dr1", 7001, ""),
            t("dr2", 7002, "on_sync_loss = \"block\"\n")
        )));
        assert!(
            e.contains("replication.target[1].on_sync_loss")
                && e.contains("listed in replication.sync"),
            "{e}"
        );
        for text in [
            with_targets(&format!(
                "sync = \"ANY 1 (dr1, dr9)\"\n{}",
                t("dr1", 7001, "")
            )),
            with_targets(&format!(
                "sync = \"dr1\"\n{}{}{}",
                t("dr1", 7001, ""),
                member("primary", 7000, "async"),
                member("dr2", 7002, "sync")
            )),
        ] {
            assert_eq!(invalid_key(&text), "replication.sync", "{text}");
        }
        // This node's own name may be listed (one policy shared by every member's
        // config); it is never a target.
        let shared = with_targets(&format!(
            "sync = \"ANY 1 (primary, dr1)\"\n{}{}{}",
            member("primary", 7000, "async"),
            member("dr1", 7001, "async"),
            member("dr2", 7002, "async")
        ));
        let cfg = Config::parse(&shared).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            modes(&cfg),
            vec![
                ("dr1".to_string(), ReplicationMode::Sync),
                ("dr2".to_string(), ReplicationMode::Async),
            ]
        );
    }

    /// `compress` and `max_bandwidth`: off and unlimited by default (not written
    /// back), parsed and kept; a bad value, and either on an archive, name the key.
    #[test]
    fn wan_keys_parse_default_and_name_their_key() {
        let target = |extra: &str| {
            with_targets(&format!(
                "[[replication.target]]\nname = \"dr\"\naddress = \"127.0.0.1:7001\"\n{extra}"
            ))
        };
        let cfg = Config::parse(&target("")).unwrap();
        assert_eq!(
            cfg.replication.as_ref().unwrap().targets[0].wan,
            TargetWan::default()
        );
        let toml = cfg.to_toml();
        assert!(
            !toml.contains("compress") && !toml.contains("max_bandwidth"),
            "{toml}"
        );
        let cfg = Config::parse(&target(
            "compress = \"zstd\"\nmax_bandwidth = \"200Mbit\"\n",
        ))
        .unwrap();
        let want = TargetWan {
            compress: Compress::Zstd,
            max_bandwidth: Some(25_000_000),
        };
        assert_eq!(cfg.replication.as_ref().unwrap().targets[0].wan, want);
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.replication.unwrap().targets[0].wan, want);
        let cfg = Config::parse(&target("max_bandwidth = \"50MB/s\"\n")).unwrap();
        assert_eq!(
            cfg.replication.unwrap().targets[0].wan.max_bandwidth,
            Some(50 << 20)
        );
        let e = Config::parse(&target("max_bandwidth = \"200 Mbytes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("replication.target[0].max_bandwidth")
                && e.contains("unknown unit 'Mbytes'"),
            "{e}"
        );
        let e = Config::parse(&target("max_bandwidth = \"100kbit\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("below the minimum of 1Mbit"), "{e}");
        let e = Config::parse(&target("compress = \"lz4\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lz4"), "{e}");
        for extra in ["compress = \"zstd\"\n", "max_bandwidth = \"1Gbit\"\n"] {
            let text = with_targets(&format!(
                "[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"s3://b/p\"\n{extra}"
            ));
            let e = Config::parse(&text).unwrap_err().to_string();
            let key = extra.split(' ').next().unwrap();
            assert!(e.contains(&format!("replication.target[0].{key}")), "{e}");
        }
    }

    /// `max_lag_seconds`: off unless set (and not written back then), kept through a
    /// round trip, fractions allowed; zero, negative and archive targets refused,
    /// naming the key.
    #[test]
    fn max_lag_seconds_is_optional_positive_and_standby_only() {
        let target = |extra: &str| {
            with_targets(&format!(
                "[[replication.target]]\nname = \"dr\"\naddress = \"127.0.0.1:7001\"\n{extra}"
            ))
        };
        let cfg = Config::parse(&target("")).unwrap();
        assert_eq!(
            cfg.replication.as_ref().unwrap().targets[0].max_lag_seconds,
            None
        );
        assert!(
            !cfg.to_toml().contains("max_lag_seconds"),
            "{}",
            cfg.to_toml()
        );
        for (text, want) in [
            ("max_lag_seconds = 2\n", 2.0),
            ("max_lag_seconds = 0.5\n", 0.5),
        ] {
            let cfg = Config::parse(&target(text)).unwrap();
            let again = Config::parse(&cfg.to_toml()).unwrap();
            for c in [cfg, again] {
                assert_eq!(
                    c.replication.unwrap().targets[0].max_lag_seconds,
                    Some(want)
                );
            }
        }
        for text in [
            target("max_lag_seconds = 0\n"),
            target("max_lag_seconds = -1.5\n"),
            with_targets(
                "[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\n\
                 url = \"s3://b/p\"\nmax_lag_seconds = 1\n",
            ),
        ] {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains("replication.target[0].max_lag_seconds"), "{e}");
        }
    }

    #[test]
    fn every_bad_value_names_its_key() {
        assert_eq!(invalid_key(&GOOD.replace("1GiB", "1000")), "volume[0].size");
        assert_eq!(
            invalid_key(&GOOD.replace("127.0.0.1:10809", "localhost")),
            "nbd.listen"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("00112233445566778899aabbccddeeff", "xyz")),
            "node.cluster_id"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("size = \"256MiB\"", "size = \"16MiB\"")),
            "journal.size"
        );
        assert_eq!(
            invalid_key(&GOOD.replace("name = \"vol0\"", "name = \"a/b\"")),
            "volume[0].name"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}\n[metrics]\nlisten = \"localhost:9640\"\n")),
            "metrics.listen"
        );
        assert_eq!(
            invalid_key(&GOOD.replace(
                "segment_size = \"16MiB\"",
                "segment_size = \"16MiB\"\nwriter_nice = -21"
            )),
            "journal.writer_nice"
        );
        let repl = |linger: u64| {
            format!(
                "{GOOD}\n[tls]\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p.key\"\n\
                 [replication]\nlisten = \"127.0.0.1:7000\"\nprimary = \"primary\"\n\
                 async_linger_us = {linger}\n"
            )
        };
        Config::parse(&repl(MAX_ASYNC_LINGER_US))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            invalid_key(&repl(MAX_ASYNC_LINGER_US + 1)),
            "replication.async_linger_us"
        );
        let two =
            format!("{GOOD}\n[[volume]]\nname = \"vol0\"\npath = \"x.img\"\nsize = \"4KiB\"\n");
        assert_eq!(invalid_key(&two), "volume[1].name");
    }

    #[test]
    fn nbd_limits_default_parse_and_name_their_key() {
        let n = Config::parse(GOOD).unwrap().nbd.unwrap();
        assert_eq!(n.max_connections, DEFAULT_NBD_MAX_CONNECTIONS);
        assert_eq!(n.handshake_timeout_secs, 10);
        assert_eq!(n.idle_timeout_secs, 0, "off by default");
        let with = |extra: &str| GOOD.replace("[nbd]\n", &format!("[nbd]\n{extra}\n"));
        let cfg = Config::parse(&with(
            "max_connections = 8\nhandshake_timeout_secs = 3\nidle_timeout_secs = 600",
        ))
        .unwrap();
        cfg.validate().unwrap();
        let n = Config::parse(&cfg.to_toml()).unwrap().nbd.unwrap();
        assert_eq!(
            (
                n.max_connections,
                n.handshake_timeout_secs,
                n.idle_timeout_secs
            ),
            (8, 3, 600)
        );
        // Defaults are not written out (configs from `ferryctl init` stay short).
        let plain = Config::parse(GOOD).unwrap().to_toml();
        assert!(!plain.contains("max_connections"), "{plain}");
        assert_eq!(
            invalid_key(&with("max_connections = 0")),
            "nbd.max_connections"
        );
        assert_eq!(
            invalid_key(&with("handshake_timeout_secs = 0")),
            "nbd.handshake_timeout_secs"
        );
        let err = Config::parse(&with("idle_timeout_secs = \"10m\"")).unwrap_err();
        assert!(err.contains("nbd.idle_timeout_secs"), "{err}");
        let err = Config::parse(&with("max_connections = -1")).unwrap_err();
        assert!(err.contains("nbd.max_connections"), "{err}");
    }

    #[test]
    fn tls_suite_defaults_to_standard_and_round_trips() {
        let tls = |extra: &str| {
            format!("{GOOD}\n[tls]\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p.key\"\n{extra}")
        };
        let cfg = Config::parse(&tls("")).unwrap();
        assert_eq!(cfg.tls.as_ref().unwrap().suite, TlsSuiteConfig::Standard);
        // The default is not written, so standard configs stay as they were.
        assert!(!cfg.to_toml().contains("suite"));
        let cfg = Config::parse(&tls("suite = \"gm\"")).unwrap();
        assert_eq!(cfg.tls.as_ref().unwrap().suite, TlsSuiteConfig::Gm);
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.tls.unwrap().suite, TlsSuiteConfig::Gm);
        assert!(Config::parse(&tls("suite = \"sm\"")).is_err());
    }

    #[test]
    fn nbd_tls_settings_name_their_key() {
        let nbd = |extra: &str| {
            GOOD.replace(
                "listen = \"127.0.0.1:10809\"",
                &format!("listen = \"127.0.0.1:10809\"\n{extra}"),
            )
        };
        let cluster_tls = "\n[tls]\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p.key\"\n";
        // Default off; the node's cluster certificate is the default server one.
        let cfg = Config::parse(GOOD).unwrap();
        assert_eq!(cfg.nbd.as_ref().map(|n| n.tls), Some(NbdTls::Off));
        let with_cluster = format!("{}{cluster_tls}", nbd("tls = \"require\""));
        Config::parse(&with_cluster).unwrap().validate().unwrap();
        let own = nbd(
            "tls = \"optional\"\ntls_cert = \"n.pem\"\ntls_key = \"n.key\"\ntls_ca = \"c.pem\"",
        );
        let cfg = Config::parse(&own).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            Config::parse(&cfg.to_toml()).unwrap().nbd.unwrap().tls,
            NbdTls::Optional
        );

        assert_eq!(invalid_key(&nbd("tls = \"require\"")), "nbd.tls_cert");
        assert_eq!(
            invalid_key(&nbd("tls = \"require\"\ntls_cert = \"n.pem\"")),
            "nbd.tls_key"
        );
        assert_eq!(invalid_key(&nbd("tls_ca = \"c.pem\"")), "nbd.tls_ca");
        assert_eq!(
            invalid_key(&format!(
                "{}{cluster_tls}",
                nbd("tls = \"optional\"\ntls_ca = \"\"")
            )),
            "nbd.tls_ca"
        );
        let err = Config::parse(&nbd("tls = \"on\"")).unwrap_err();
        assert!(err.contains("tls") && err.contains("require"), "{err}");
    }

    #[test]
    fn nbd_tls_suite_follows_the_certificates_unless_set() {
        let nbd = |extra: &str, cluster: &str| {
            let text = GOOD.replace(
                "listen = \"127.0.0.1:10809\"",
                &format!("listen = \"127.0.0.1:10809\"\ntls = \"require\"\n{extra}"),
            );
            format!("{text}\n[tls]\nca = \"ca.pem\"\ncert = \"p.pem\"\nkey = \"p.key\"\n{cluster}")
        };
        let suite = |text: &str| {
            let cfg = Config::parse(text).unwrap();
            cfg.validate().unwrap();
            cfg.nbd_tls_suite(cfg.nbd.as_ref().unwrap()).unwrap()
        };
        let gm = "suite = \"gm\"";
        let own = "tls_cert = \"n.pem\"\ntls_key = \"n.key\"";
        let own_gm = "tls_gm_cert = \"g.pem\"\ntls_gm_key = \"g.key\"";
        // Derived: the cluster's own set, plus the other one's certificate.
        assert_eq!(suite(&nbd("", "")), NbdTlsSuite::Standard);
        assert_eq!(suite(&nbd("", gm)), NbdTlsSuite::Gm);
        assert_eq!(suite(&nbd(own, gm)), NbdTlsSuite::Both);
        assert_eq!(suite(&nbd(own_gm, "")), NbdTlsSuite::Both);
        // Set explicitly, and kept across a round trip.
        let text = nbd(&format!("{own}\ntls_suite = \"both\""), gm);
        let cfg = Config::parse(&text).unwrap();
        assert_eq!(suite(&cfg.to_toml()), NbdTlsSuite::Both);
        assert_eq!(suite(&nbd("tls_suite = \"gm\"", gm)), NbdTlsSuite::Gm);
        // A set without its certificate, a certificate the set does not use.
        assert_eq!(
            invalid_key(&nbd("tls_suite = \"gm\"", "")),
            "nbd.tls_gm_cert"
        );
        assert_eq!(
            invalid_key(&nbd("tls_suite = \"both\"", gm)),
            "nbd.tls_cert"
        );
        assert_eq!(
            invalid_key(&nbd(&format!("{own}\ntls_suite = \"gm\""), gm)),
            "nbd.tls_cert"
        );
        assert_eq!(
            invalid_key(&nbd(&format!("{own_gm}\ntls_suite = \"standard\""), "")),
            "nbd.tls_gm_cert"
        );
        assert_eq!(
            invalid_key(&nbd("tls_gm_cert = \"g.pem\"", "")),
            "nbd.tls_gm_key"
        );
        let off = GOOD.replace(
            "listen = \"127.0.0.1:10809\"",
            "listen = \"127.0.0.1:10809\"\ntls_suite = \"gm\"",
        );
        assert_eq!(invalid_key(&off), "nbd.tls_suite");
        assert!(Config::parse(&nbd("tls_suite = \"sm\"", "")).is_err());
    }

    #[test]
    fn journal_engine_and_recovery_are_spelled_as_before() {
        let with = |extra: &str| {
            GOOD.replace(
                "segment_size = \"16MiB\"",
                &format!("segment_size = \"16MiB\"\n{extra}"),
            )
        };
        for (word, engine) in [
            ("auto", EngineChoice::Auto),
            ("io_uring", EngineChoice::IoUring),
            ("std", EngineChoice::Std),
        ] {
            let cfg = Config::parse(&with(&format!("engine = \"{word}\""))).unwrap();
            assert_eq!(cfg.journal.engine, engine);
            assert!(cfg.to_toml().contains(&format!("engine = \"{word}\"")));
        }
        for (word, mode) in [
            ("tolerate-torn-tail", RecoveryMode::TolerateTornTail),
            ("absolute-consistency", RecoveryMode::AbsoluteConsistency),
        ] {
            let cfg = Config::parse(&with(&format!("recovery = \"{word}\""))).unwrap();
            assert_eq!(cfg.journal.recovery, mode);
            assert!(cfg.to_toml().contains(&format!("recovery = \"{word}\"")));
        }
        let e = Config::parse(&with("engine = \"uring\"")).unwrap_err();
        assert!(
            e.contains("unknown variant `uring`, expected one of `auto`, `io_uring`, `std`"),
            "{e}"
        );
        let e = Config::parse(&with("recovery = \"strict\"")).unwrap_err();
        assert!(
            e.contains(
                "unknown variant `strict`, expected `tolerate-torn-tail` or `absolute-consistency`"
            ),
            "{e}"
        );
    }

    /// `volume.cache`: the three words, the default when absent (left out of the
    /// written config), and a bad word named with the ones accepted.
    #[test]
    fn volume_cache_modes_parse_and_a_bad_one_is_named() {
        const VOL_PATH: &str = "path = \"primary/vol0.img\"";
        let cfg = Config::parse(GOOD).unwrap();
        assert_eq!(cfg.volumes[0].cache, CacheMode::WritethroughUntilFlush);
        assert!(
            !cfg.to_toml().contains("cache"),
            "the default is not written"
        );
        for (word, mode) in [
            ("writeback", CacheMode::Writeback),
            ("writethrough", CacheMode::Writethrough),
            (
                "writethrough-until-flush",
                CacheMode::WritethroughUntilFlush,
            ),
        ] {
            let text = GOOD.replace(VOL_PATH, &format!("{VOL_PATH}\ncache = \"{word}\""));
            let cfg = Config::parse(&text).unwrap();
            assert_eq!(cfg.volumes[0].cache, mode);
            assert_eq!(mode.name(), word);
            assert_eq!(
                Config::parse(&cfg.to_toml()).unwrap().volumes[0].cache,
                mode
            );
        }
        let text = GOOD.replace(VOL_PATH, &format!("{VOL_PATH}\ncache = \"write-back\""));
        let e = Config::parse(&text).unwrap_err();
        assert!(e.contains("cache"), "{e}");
        assert!(
            e.contains("unknown variant `write-back`, expected one of `writeback`, `writethrough`, `writethrough-until-flush`"),
            "{e}"
        );
    }

    #[test]
    fn parse_errors_name_the_key() {
        let e =
            Config::parse(&GOOD.replace("size = \"1GiB\"", "size = \"1 furlong\"")).unwrap_err();
        assert!(e.contains("size"), "{e}");
        assert!(e.contains("furlong"), "{e}");
        let e =
            Config::parse(&GOOD.replace("role = \"primary\"", "role = \"leader\"")).unwrap_err();
        assert!(e.contains("role") || e.contains("leader"), "{e}");
        let e = Config::parse(&format!("{GOOD}\nbogus = 1\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn size_and_duration_errors_name_their_key() {
        let vol2 =
            format!("{GOOD}\n[[volume]]\nname = \"vol1\"\npath = \"v1.img\"\nsize = \"2GiB\"\n");
        for (text, key) in [
            (
                GOOD.replace("size = \"256MiB\"", "size = \"12XB\""),
                "journal.size",
            ),
            (
                GOOD.replace("size = \"256MiB\"", "size = -5"),
                "journal.size",
            ),
            (
                GOOD.replace("size = \"256MiB\"", "size = true"),
                "journal.size",
            ),
            (
                GOOD.replace("segment_size = \"16MiB\"", "segment_size = \"16 MiBs\""),
                "journal.segment_size",
            ),
            (
                GOOD.replace("size = \"1GiB\"", "size = \"1 furlong\""),
                "volume[0].size",
            ),
            (
                vol2.replace("size = \"2GiB\"", "size = \"2GB!\""),
                "volume[1].size",
            ),
            (
                format!("{GOOD}\n[pit]\nmax_bytes = \"4XB\"\n"),
                "pit.max_bytes",
            ),
            (
                GOOD.replace(
                    "segment_size = \"16MiB\"",
                    "segment_size = \"16MiB\"\ncheckpoint_interval_ms = \"30s\"",
                ),
                "journal.checkpoint_interval_ms",
            ),
            (
                format!("{GOOD}\n[pit]\nmax_age_secs = -1\n"),
                "pit.max_age_secs",
            ),
        ] {
            let e = Config::parse(&text).unwrap_err();
            assert!(e.starts_with(&format!("key `{key}`: ")), "{key}: {e}");
            assert!(e.contains("(line "), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // A header line or an unknown table has no `key = value` to name.
        let e = Config::parse(&format!("{GOOD}\n[bogus]\n")).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn access_section() {
        let cfg = Config::parse(GOOD).unwrap();
        assert!(cfg.access.is_none());
        assert_eq!(cfg.audit_log_path(), Path::new("primary/audit.log"));
        let text = format!(
            "{GOOD}\n[access]\naudit_log = \"logs/audit.log\"\nsocket_mode = 0o660\nsocket_group = 1001\nadmins = {{ uids = [1000] }}\noperators = {{ gids = [1001] }}\nviewers = {{ uids = [1002], gids = [1003] }}\n"
        );
        let mut cfg = Config::parse(&text).unwrap();
        cfg.validate().unwrap();
        let a = cfg.access.clone().unwrap();
        assert_eq!(a.socket_mode, 0o660);
        assert_eq!(a.socket_group, Some(1001));
        assert_eq!(a.admins.uids, [1000]);
        assert_eq!(a.operators.gids, [1001]);
        assert_eq!(a.viewers.gids, [1003]);
        cfg.resolve_paths(Path::new("/etc/ferry"));
        assert_eq!(cfg.audit_log_path(), Path::new("/etc/ferry/logs/audit.log"));
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.access.unwrap().viewers.uids, [1002]);
        assert_eq!(
            invalid_key(&format!("{GOOD}\n[access]\nsocket_mode = 0o1777\n")),
            "access.socket_mode"
        );
        assert_eq!(
            invalid_key(&format!("{GOOD}\n[access]\nsocket_mode = 0o066\n")),
            "access.socket_mode"
        );
        assert_eq!(
            invalid_key(&format!(
                "{GOOD}\n[access]\nadmins = {{ uids = [5] }}\nviewers = {{ uids = [5] }}\n"
            )),
            "access.viewers.uids"
        );
        let e =
            Config::parse(&format!("{GOOD}\n[access]\nadmins = {{ users = [5] }}\n")).unwrap_err();
        assert!(e.contains("users"), "{e}");
        let e = Config::parse(&format!("{GOOD}\n[access]\nsuperusers = {{}}\n")).unwrap_err();
        assert!(e.contains("superusers"), "{e}");
    }

    #[test]
    fn verify_digest_defaults_to_sm3_in_a_gm_cluster() {
        let cfg = Config::parse(GOOD).unwrap();
        assert_eq!(cfg.verify_digest(), DigestKind::Xxh3);
        let cfg = Config::parse(&format!("{GOOD}\n[verify]\ndigest = \"sm3\"\n")).unwrap();
        assert_eq!(cfg.verify_digest(), DigestKind::Sm3);
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.verify_digest(), DigestKind::Sm3);
        let mut gm = Config::parse(GOOD).unwrap();
        gm.tls = Some(TlsConfig {
            ca: "ca.pem".into(),
            cert: "n.pem".into(),
            key: "n.key".into(),
            suite: TlsSuiteConfig::Gm,
        });
        assert_eq!(gm.verify_digest(), DigestKind::Sm3);
        gm.verify = Some(VerifyConfig {
            digest: Some(DigestKind::Xxh3),
        });
        assert_eq!(gm.verify_digest(), DigestKind::Xxh3);
        let e = Config::parse(&format!("{GOOD}\n[verify]\ndigest = \"md5\"\n")).unwrap_err();
        assert!(e.contains("md5") || e.contains("digest"), "{e}");
    }

    #[test]
    fn audit_section() {
        let cfg = Config::parse(GOOD).unwrap();
        assert!(cfg.audit.is_none());
        let d = AuditConfig::default();
        assert_eq!(
            (
                d.max_file_size.0,
                d.keep_files,
                d.sync_interval_ms,
                d.sync_lines
            ),
            (64 << 20, 16, 100, 64)
        );
        let text = format!(
            "{GOOD}\n[audit]\nmax_file_size = \"1MiB\"\nkeep_files = 0\nsync_interval_ms = 20\n"
        );
        let cfg = Config::parse(&text).unwrap();
        cfg.validate().unwrap();
        let a = cfg.audit.clone().unwrap();
        assert_eq!((a.max_file_size.0, a.keep_files), (1 << 20, 0));
        assert_eq!((a.sync_interval_ms, a.sync_lines), (20, 64));
        assert_eq!((d.checkpoint_every, a.checkpoint_every), (1000, 1000));
        let cp = Config::parse(&format!("{GOOD}\n[audit]\ncheckpoint_every = 50\n")).unwrap();
        assert_eq!(cp.audit.unwrap().checkpoint_every, 50);
        let again = Config::parse(&cfg.to_toml()).unwrap();
        assert_eq!(again.audit.unwrap().max_file_size.0, 1 << 20);
        for (body, key) in [
            ("max_file_size = \"4KiB\"", "audit.max_file_size"),
            ("sync_interval_ms = 0", "audit.sync_interval_ms"),
            ("sync_lines = 0", "audit.sync_lines"),
            ("checkpoint_every = 0", "audit.checkpoint_every"),
        ] {
            assert_eq!(invalid_key(&format!("{GOOD}\n[audit]\n{body}\n")), key);
        }
        let e = Config::parse(&format!("{GOOD}\n[audit]\nmax_files = 3\n")).unwrap_err();
        assert!(e.contains("max_files"), "{e}");
    }
}
