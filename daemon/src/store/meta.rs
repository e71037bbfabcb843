//! Node metadata: small, rarely written, and it must survive any crash.
//!
//! Kept in redb, whose commits are crash-safe (copy-on-write B-tree with a checksummed
//! commit slot, fsynced before `commit` returns). Keys are short strings, values are
//! fixed-width little-endian integers or raw ids, so the store carries no serialisation
//! format of its own to version. A `format` key records the layout version.
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("ferry_meta");
/// Version of the key/value layout below. Bump with an upgrade step in `open`.
pub const META_FORMAT: u64 = 1;

const K_FORMAT: &str = "format";
const K_NODE_ID: &str = "node_id";
const K_CLUSTER_ID: &str = "cluster_id";
const K_EPOCH: &str = "epoch";
const K_CHECKPOINT: &str = "checkpoint_seq";
const K_NEXT_VOLUME: &str = "next_volume_id";
const VOLUME_PREFIX: &str = "volume/";
const BOOKMARK_PREFIX: &str = "bookmark/";
/// Rollback in progress (`target seq`, 8 bytes) or done (`target seq`, then
/// `1u8`): see `pit::rollback`.
const K_ROLLBACK: &str = "rollback";
/// Role changes (promote, demote, switchover) override the config's `node.role`:
/// `"primary"` or `"standby"`.
const K_ROLE: &str = "role";
/// The primary a demoted node follows (overrides `replication.primary`).
const K_PRIMARY_NAME: &str = "primary_name";
/// Fork point of the current epoch: the last sequence of the previous epoch this
/// node holds (8 bytes).
const K_FORK_SEQ: &str = "fork_seq";
/// A promotion's cut: the epoch it started (8 bytes), then the last sequence of the
/// previous epoch the node's journal held then (8 bytes). The records after the fork
/// point up to the cut were undone by the rollback the promotion made: they are no
/// part of the new history, so they are never shipped and never replayed (the same
/// transaction moves the checkpoint to the cut). The new epoch's first write is the
/// cut + 1: a sequence never given to a discarded record. Only read while that epoch
/// is current (a later role change makes it stale without touching it).
const K_FORK_CUT: &str = "fork_cut";
/// How the current epoch's fork came about: `"switchover"` (a planned, lossless
/// handover), or empty for a promotion.
const K_FORK_BY: &str = "fork_by";
/// Set when this primary learned of a newer epoch: that epoch (8 bytes), then the
/// name of the node that told it.
const K_OUTDATED: &str = "outdated";
/// `rejoined/<target>` → fork seq: the target followed this primary from at or before
/// that fork point (a later fork makes it stale).
const REJOINED_PREFIX: &str = "rejoined/";
/// A standby being resynced from its primary's dirty-region bitmap: `from`,
/// `snapshot`, `through` (8 bytes each) and a `copied` byte (0/1); empty = none.
/// See [`ResyncState`].
const K_RESYNC: &str = "resync";
/// The sequence a standby's journal was last skipped to (`Journal::skip_to`, 8
/// bytes): the jump is durable in the journal only with the first record after it,
/// so recovery repeats it from here when the journal ends below.
const K_JOURNAL_SKIP: &str = "journal_skip";
/// A standby seeded from an archive (`ferryctl archive seed`): the point's sequence
/// and the epoch it was started in (8 bytes each). Written once, with the epoch, the
/// checkpoint and the journal's jump to that point, at its first start.
const K_SEEDED: &str = "seeded";
/// A standby paused by an operator (`ferryctl pause`): the reason shown in status;
/// empty = not paused. Kept across restarts: an operator who froze the replica (to
/// keep it as it is during an incident) must not find it following the primary
/// again because the service restarted.
const K_PAUSED: &str = "paused";
/// Primary: `sync_loss/<target>` = the sequence (u64 LE) after which writes were
/// acknowledged without that sync target; absent or empty once it holds them all.
/// Written before any such write is acknowledged (`ship::target::SyncGate`).
const SYNC_LOSS_PREFIX: &str = "sync_loss/";
/// Primary: `horizon/<target>` = its crash horizon (u64 LE; absent or empty: none):
/// this journal's last sequence when the primary started, kept until a session with
/// the target has shown it holds nothing past it. A primary ships records before its
/// own journal holds them (`ship::feed`), so after a crash a standby may hold records
/// the restarted journal lost and reuses the sequences of. A crash is not told apart
/// from a clean stop (after which no target is past the horizon): a start gives a
/// horizon to each target shipped to since the previous start (`shipped/<target>`),
/// keeping an older, lower one. A target never shipped to (a standby seeded from the
/// archive) gets none: it holds only records this journal held durably.
const HORIZON_PREFIX: &str = "horizon/";
/// Primary: `shipped/<target>` = 1 (empty: no): a session shipped (or may have
/// shipped) records to the target since this primary started. See `HORIZON_PREFIX`.
const SHIPPED_PREFIX: &str = "shipped/";
/// Standby: the sync loss its primary last told it of (u64 LE; empty: none). Kept
/// across restarts: the node may be partitioned from the primary from then on, and
/// `promote` must still refuse.
const K_HEARD_SYNC_LOSS: &str = "heard_sync_loss";
/// Primary: `resync_required/<target>` = `[1]` while that standby's request for a
/// full resync (its `ResyncRequired` refusal) is not yet carried by durable dirty
/// maps; empty or absent otherwise.
const RESYNC_REQUIRED_PREFIX: &str = "resync_required/";
/// Standby: `[1]` once it followed a newer epoch through its relay (cascading) until
/// a resync from the relay begins: its journal may hold records of the old epoch past
/// the new primary's fork, which the relay cannot know, so it refuses the relay's
/// write-sets with `ResyncRequired` (a full resync compared by digest).
const K_RELAY_RESYNC: &str = "relay_resync";

/// A standby's resync transition: while it is recorded the replica is not a
/// consistent image, and no point after `from` is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncState {
    /// The last consistent point (the standby's position when the transition began).
    pub from: u64,
    /// The primary's snapshot point of the latest copy; the journal continues after it.
    pub snapshot: u64,
    /// Consistent again once every record up to it is applied (0 until known).
    pub through: u64,
    /// The latest copy completed (its data durable, the checkpoint at `snapshot`).
    pub copied: bool,
}

impl ResyncState {
    fn encode(&self) -> [u8; 25] {
        let mut v = [0u8; 25];
        v[..8].copy_from_slice(&self.from.to_le_bytes());
        v[8..16].copy_from_slice(&self.snapshot.to_le_bytes());
        v[16..24].copy_from_slice(&self.through.to_le_bytes());
        v[24] = u8::from(self.copied);
        v
    }
}

/// A primary that learned it was superseded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outdated {
    pub epoch: u64,
    pub by: String,
}

/// A named recovery point: the seal record `seq`, stamped `timestamp_ns` by the
/// primary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Bookmark {
    pub name: String,
    pub seq: u64,
    pub timestamp_ns: u64,
}

/// The standby's rollback state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackState {
    /// Started (target persisted) and not finished: finish it before anything else.
    InProgress { target: u64 },
    /// The replica was rolled back to `target` and no longer follows the primary.
    Done { target: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("metadata store {path}: key `{key}` is corrupt: {message}")]
    Corrupt {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error("metadata store {path} belongs to cluster {found}, but the config names cluster {expected}; refusing to mix clusters")]
    WrongCluster {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("metadata store {path} has layout version {found}; this ferryd understands up to {META_FORMAT}")]
    TooNew { path: PathBuf, found: u64 },
}

pub struct Meta {
    db: Database,
    path: PathBuf,
    pub node_id: [u8; 16],
    pub cluster_id: [u8; 16],
}

impl Meta {
    /// Opens (or creates) `dir/meta.redb`. On first open, records the cluster id and a
    /// fresh random node id; afterwards refuses a config naming another cluster.
    pub fn open(dir: &Path, cluster_id: [u8; 16]) -> Result<Meta, MetaError> {
        std::fs::create_dir_all(dir).map_err(|e| MetaError::Store {
            path: dir.to_path_buf(),
            message: format!("cannot create directory: {e}"),
        })?;
        let path = dir.join("meta.redb");
        let err = |e: &dyn std::fmt::Display| MetaError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        let db = Database::create(&path).map_err(|e| err(&e))?;
        let mut meta = Meta {
            db,
            path: path.clone(),
            node_id: [0; 16],
            cluster_id,
        };
        match meta.get_raw(K_FORMAT)? {
            None => {
                let mut node_id = [0u8; 16];
                getrandom::getrandom(&mut node_id).map_err(|e| err(&e))?;
                meta.put_many(&[
                    (K_FORMAT, &META_FORMAT.to_le_bytes()),
                    (K_NODE_ID, &node_id),
                    (K_CLUSTER_ID, &cluster_id),
                    (K_EPOCH, &1u64.to_le_bytes()),
                    (K_CHECKPOINT, &0u64.to_le_bytes()),
                ])?;
                meta.node_id = node_id;
            }
            Some(_) => {
                let format = meta.get_u64(K_FORMAT)?;
                if format > META_FORMAT {
                    return Err(MetaError::TooNew {
                        path,
                        found: format,
                    });
                }
                meta.node_id = meta.get_id(K_NODE_ID)?;
                let found = meta.get_id(K_CLUSTER_ID)?;
                if found != cluster_id {
                    return Err(MetaError::WrongCluster {
                        path,
                        found: ferry_api::config::format_id(&found),
                        expected: ferry_api::config::format_id(&cluster_id),
                    });
                }
            }
        }
        Ok(meta)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn epoch(&self) -> Result<u64, MetaError> {
        self.get_u64(K_EPOCH)
    }

    pub fn set_epoch(&self, epoch: u64) -> Result<(), MetaError> {
        self.put_many(&[(K_EPOCH, &epoch.to_le_bytes())])
    }

    /// Highest journal sequence known applied to the base volumes *and* fsynced there.
    pub fn checkpoint(&self) -> Result<u64, MetaError> {
        self.get_u64(K_CHECKPOINT)
    }

    pub fn set_checkpoint(&self, seq: u64) -> Result<(), MetaError> {
        self.put_many(&[(K_CHECKPOINT, &seq.to_le_bytes())])
    }

    /// The persistent id of volume `name`, assigned on first sight. Journal records
    /// carry ids, not names, so the mapping must outlive config edits.
    pub fn volume_id(&self, name: &str) -> Result<u32, MetaError> {
        let key = format!("{VOLUME_PREFIX}{name}");
        let txn = self.db.begin_write().map_err(|e| self.store_err(e))?;
        let id = {
            let mut table = txn.open_table(TABLE).map_err(|e| self.store_err(e))?;
            let existing = table
                .get(key.as_str())
                .map_err(|e| self.store_err(e))?
                .map(|g| g.value().to_vec());
            match existing {
                Some(raw) => {
                    return raw
                        .as_slice()
                        .try_into()
                        .map(u32::from_le_bytes)
                        .map_err(|_| MetaError::Corrupt {
                            path: self.path.clone(),
                            key: "volume/<name>",
                            message: format!("{} bytes for volume '{name}', expected 4", raw.len()),
                        });
                }
                None => {
                    let next = table
                        .get(K_NEXT_VOLUME)
                        .map_err(|e| self.store_err(e))?
                        .map(|g| g.value().to_vec());
                    let id = match next {
                        None => 0u32,
                        Some(raw) => {
                            raw.as_slice()
                                .try_into()
                                .map(u32::from_le_bytes)
                                .map_err(|_| MetaError::Corrupt {
                                    path: self.path.clone(),
                                    key: K_NEXT_VOLUME,
                                    message: format!("{} bytes, expected 4", raw.len()),
                                })?
                        }
                    };
                    let after = id.checked_add(1).ok_or_else(|| MetaError::Corrupt {
                        path: self.path.clone(),
                        key: K_NEXT_VOLUME,
                        message: "volume ids exhausted".into(),
                    })?;
                    table
                        .insert(key.as_str(), id.to_le_bytes().as_slice())
                        .map_err(|e| self.store_err(e))?;
                    table
                        .insert(K_NEXT_VOLUME, after.to_le_bytes().as_slice())
                        .map_err(|e| self.store_err(e))?;
                    id
                }
            }
        };
        txn.commit().map_err(|e| self.store_err(e))?;
        Ok(id)
    }

    /// Records bookmark `name`; refuses a name already taken by another point.
    pub fn add_bookmark(&self, b: &Bookmark) -> Result<(), MetaError> {
        let key = format!("{BOOKMARK_PREFIX}{}", b.name);
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&b.seq.to_le_bytes());
        v[8..].copy_from_slice(&b.timestamp_ns.to_le_bytes());
        self.put_many(&[(key.as_str(), &v)])
    }

    pub fn remove_bookmark(&self, name: &str) -> Result<bool, MetaError> {
        let key = format!("{BOOKMARK_PREFIX}{name}");
        let txn = self.db.begin_write().map_err(|e| self.store_err(e))?;
        let removed = {
            let mut table = txn.open_table(TABLE).map_err(|e| self.store_err(e))?;
            let r = table
                .remove(key.as_str())
                .map_err(|e| self.store_err(e))?
                .is_some();
            r
        };
        txn.commit().map_err(|e| self.store_err(e))?;
        Ok(removed)
    }

    /// Every bookmark, by sequence.
    pub fn bookmarks(&self) -> Result<Vec<Bookmark>, MetaError> {
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.store_err(e)),
        };
        let mut out = Vec::new();
        // Keys sort as strings: '/' + 1 is '0', the first key past the prefix.
        let range = table
            .range(BOOKMARK_PREFIX.."bookmark0")
            .map_err(|e| self.store_err(e))?;
        for item in range {
            let (k, v) = item.map_err(|e| self.store_err(e))?;
            let v = v.value();
            if v.len() != 16 {
                return Err(MetaError::Corrupt {
                    path: self.path.clone(),
                    key: "bookmark/*",
                    message: format!("{}: {} bytes, expected 16", k.value(), v.len()),
                });
            }
            let mut seq = [0u8; 8];
            let mut ts = [0u8; 8];
            seq.copy_from_slice(&v[..8]);
            ts.copy_from_slice(&v[8..]);
            out.push(Bookmark {
                name: k.value()[BOOKMARK_PREFIX.len()..].to_string(),
                seq: u64::from_le_bytes(seq),
                timestamp_ns: u64::from_le_bytes(ts),
            });
        }
        out.sort_by_key(|b| b.seq);
        Ok(out)
    }

    pub fn rollback_state(&self) -> Result<Option<RollbackState>, MetaError> {
        let Some(raw) = self.get_raw(K_ROLLBACK)? else {
            return Ok(None);
        };
        let bad = |m: String| MetaError::Corrupt {
            path: self.path.clone(),
            key: K_ROLLBACK,
            message: m,
        };
        let mut t = [0u8; 8];
        match raw.len() {
            0 => Ok(None),
            8 | 9 => {
                t.copy_from_slice(&raw[..8]);
                let target = u64::from_le_bytes(t);
                match raw.get(8) {
                    None => Ok(Some(RollbackState::InProgress { target })),
                    Some(1) => Ok(Some(RollbackState::Done { target })),
                    Some(x) => Err(bad(format!("state byte {x}"))),
                }
            }
            n => Err(bad(format!("{n} bytes, expected 0, 8 or 9"))),
        }
    }

    pub fn set_rollback_state(&self, s: Option<RollbackState>) -> Result<(), MetaError> {
        let mut v = Vec::with_capacity(9);
        match s {
            None => {}
            Some(RollbackState::InProgress { target }) => {
                v.extend_from_slice(&target.to_le_bytes())
            }
            Some(RollbackState::Done { target }) => {
                v.extend_from_slice(&target.to_le_bytes());
                v.push(1);
            }
        }
        self.put_many(&[(K_ROLLBACK, &v)])
    }

    /// The standby's resync transition, if one is in progress.
    pub fn resync_state(&self) -> Result<Option<ResyncState>, MetaError> {
        let Some(raw) = self.get_raw(K_RESYNC)?.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let bad = |m: String| MetaError::Corrupt {
            path: self.path.clone(),
            key: K_RESYNC,
            message: m,
        };
        if raw.len() != 25 || raw[24] > 1 {
            return Err(bad(format!(
                "{} bytes (flag {:?}), expected 25",
                raw.len(),
                raw.get(24)
            )));
        }
        let u = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i..i + 8]);
            u64::from_le_bytes(b)
        };
        Ok(Some(ResyncState {
            from: u(0),
            snapshot: u(8),
            through: u(16),
            copied: raw[24] == 1,
        }))
    }

    /// Records (or clears) the resync transition.
    pub fn set_resync_state(&self, s: Option<ResyncState>) -> Result<(), MetaError> {
        match s {
            Some(s) => self.put_many(&[(K_RESYNC, &s.encode())]),
            None => self.put_many(&[(K_RESYNC, &[])]),
        }
    }

    /// One durable transaction at the start of a resync copy: the transition, the
    /// journal's jump target (`s.snapshot`) and the checkpoint (everything journaled
    /// so far is applied: no restart may replay it over copied data).
    pub fn begin_resync(&self, s: &ResyncState, checkpoint: u64) -> Result<(), MetaError> {
        self.put_many(&[
            (K_RESYNC, &s.encode()),
            (K_JOURNAL_SKIP, &s.snapshot.to_le_bytes()),
            (K_CHECKPOINT, &checkpoint.to_le_bytes()),
        ])
    }

    /// One durable transaction once a copy's data is durable on the replica: the
    /// transition marked copied (or cleared, `None`: consistent already) and the
    /// checkpoint moved to the snapshot (replay continues after it).
    pub fn end_resync_copy(
        &self,
        s: Option<&ResyncState>,
        checkpoint: u64,
    ) -> Result<(), MetaError> {
        let v = s.map(|s| s.encode());
        self.put_many(&[
            (K_RESYNC, v.as_ref().map_or(&[][..], |v| &v[..])),
            (K_CHECKPOINT, &checkpoint.to_le_bytes()),
        ])
    }

    /// Starts a new standby at an archived point `seq` of epoch `epoch`, in one durable
    /// transaction: the replica's volumes hold that point (the caller restored them),
    /// so the checkpoint is there and the empty journal jumps to it (recovery repeats
    /// the jump from `journal_skip`).
    pub fn apply_seed(&self, epoch: u64, seq: u64) -> Result<(), MetaError> {
        let mut seeded = [0u8; 16];
        seeded[..8].copy_from_slice(&seq.to_le_bytes());
        seeded[8..].copy_from_slice(&epoch.to_le_bytes());
        self.put_many(&[
            (K_EPOCH, &epoch.to_le_bytes()),
            (K_CHECKPOINT, &seq.to_le_bytes()),
            (K_JOURNAL_SKIP, &seq.to_le_bytes()),
            (K_SEEDED, &seeded),
        ])
    }

    /// The archived point this node was seeded at: `(seq, epoch)`.
    pub fn seeded(&self) -> Result<Option<(u64, u64)>, MetaError> {
        match self.get_raw(K_SEEDED)? {
            None => Ok(None),
            Some(v) if v.len() == 16 => {
                let word = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&v[i..i + 8]);
                    u64::from_le_bytes(b)
                };
                Ok(Some((word(0), word(8))))
            }
            Some(v) => Err(MetaError::Corrupt {
                path: self.path.clone(),
                key: K_SEEDED,
                message: format!("{} bytes, expected 16", v.len()),
            }),
        }
    }

    /// The sequence the journal was last skipped to (0 if never).
    pub fn journal_skip(&self) -> Result<u64, MetaError> {
        match self.get_raw(K_JOURNAL_SKIP)? {
            None => Ok(0),
            Some(_) => self.get_u64(K_JOURNAL_SKIP),
        }
    }

    /// The role set by a role change, overriding the config.
    pub fn role_override(&self) -> Result<Option<String>, MetaError> {
        self.get_str(K_ROLE)
    }

    pub fn primary_name(&self) -> Result<Option<String>, MetaError> {
        self.get_str(K_PRIMARY_NAME)
    }

    pub fn fork_seq(&self) -> Result<Option<u64>, MetaError> {
        match self.get_raw(K_FORK_SEQ)? {
            None => Ok(None),
            Some(_) => self.get_u64(K_FORK_SEQ).map(Some),
        }
    }

    pub fn outdated(&self) -> Result<Option<Outdated>, MetaError> {
        let Some(raw) = self.get_raw(K_OUTDATED)?.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        if raw.len() < 8 {
            return Err(MetaError::Corrupt {
                path: self.path.clone(),
                key: K_OUTDATED,
                message: format!("{} bytes, expected at least 8", raw.len()),
            });
        }
        let mut e = [0u8; 8];
        e.copy_from_slice(&raw[..8]);
        Ok(Some(Outdated {
            epoch: u64::from_le_bytes(e),
            by: String::from_utf8_lossy(&raw[8..]).into_owned(),
        }))
    }

    pub fn set_outdated(&self, o: &Outdated) -> Result<(), MetaError> {
        let mut v = o.epoch.to_le_bytes().to_vec();
        v.extend_from_slice(o.by.as_bytes());
        self.put_many(&[(K_OUTDATED, &v)])
    }

    /// One durable transaction for a role change: the new epoch, role, the primary to
    /// follow (standby) and the fork point (primary); clears `outdated`, a finished
    /// rollback, an operator pause and what belonged to the old role's replication —
    /// the sync loss a primary told this standby, the sync losses and resync requests
    /// of this primary's targets (the node starts a new life in the new epoch).
    pub fn change_role(
        &self,
        epoch: u64,
        role: &str,
        primary_name: Option<&str>,
        fork_seq: Option<u64>,
    ) -> Result<(), MetaError> {
        self.change_role_with(epoch, role, primary_name, fork_seq, &[])
    }

    /// [`Meta::change_role`] to the primary of `epoch` by promotion at `fork`, and in
    /// the same transaction the cut (`K_FORK_CUT`: the journal's last sequence, `cut`,
    /// at least `fork`) and the checkpoint moved to it. The replica holds the image at
    /// `fork`, which in the new history is the image at the cut (nothing follows the
    /// fork up to it). One transaction: a crash leaves either a standby (which neither
    /// ships nor replays its rolled-back tail, and computes the cut again at the next
    /// promote) or a primary whose tail is cut.
    pub fn promote(
        &self,
        epoch: u64,
        primary_name: Option<&str>,
        fork: u64,
        cut: u64,
    ) -> Result<(), MetaError> {
        let cut = cut.max(fork);
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&epoch.to_le_bytes());
        v[8..].copy_from_slice(&cut.to_le_bytes());
        let c = cut.to_le_bytes();
        self.change_role_with(
            epoch,
            "primary",
            primary_name,
            Some(fork),
            &[(K_FORK_CUT, &v), (K_CHECKPOINT, &c)],
        )
    }

    /// The current epoch's cut (see `K_FORK_CUT`) on a primary by role change: the
    /// fork point when the promotion discarded nothing or predates the record.
    pub fn fork_cut(&self) -> Result<Option<u64>, MetaError> {
        let Some(fork) = self.fork_seq()? else {
            return Ok(None);
        };
        let Some(raw) = self.get_raw(K_FORK_CUT)?.filter(|v| !v.is_empty()) else {
            return Ok(Some(fork));
        };
        if raw.len() != 16 {
            return Err(MetaError::Corrupt {
                path: self.path.clone(),
                key: K_FORK_CUT,
                message: format!("{} bytes, expected 16", raw.len()),
            });
        }
        let u = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let current = u(0) == self.epoch()?;
        Ok(Some(if current { u(8).max(fork) } else { fork }))
    }

    /// [`Meta::change_role`] with `extra` pairs in the same transaction.
    fn change_role_with(
        &self,
        epoch: u64,
        role: &str,
        primary_name: Option<&str>,
        fork_seq: Option<u64>,
        extra: &[(&str, &[u8])],
    ) -> Result<(), MetaError> {
        let fork = fork_seq.map(|f| f.to_le_bytes());
        let mut pairs: Vec<(&str, &[u8])> = vec![
            (K_EPOCH, &[]),
            (K_ROLE, role.as_bytes()),
            (K_PRIMARY_NAME, primary_name.unwrap_or("").as_bytes()),
            (K_OUTDATED, &[]),
            (K_ROLLBACK, &[]),
            (K_PAUSED, &[]),
            (K_HEARD_SYNC_LOSS, &[]),
        ];
        let e = epoch.to_le_bytes();
        pairs[0].1 = &e;
        if let Some(f) = &fork {
            pairs.push((K_FORK_SEQ, f));
            pairs.push((K_FORK_BY, &[]));
        }
        pairs.extend_from_slice(extra);
        // A fork makes every target resync past it: the crash horizons are moot.
        let stale = self.keys_with_prefixes(&[
            SYNC_LOSS_PREFIX,
            RESYNC_REQUIRED_PREFIX,
            HORIZON_PREFIX,
            SHIPPED_PREFIX,
        ])?;
        pairs.extend(stale.iter().map(|k| (k.as_str(), &[][..])));
        self.put_many(&pairs)
    }

    /// Every key starting with one of `prefixes`.
    fn keys_with_prefixes(&self, prefixes: &[&str]) -> Result<Vec<String>, MetaError> {
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.store_err(e)),
        };
        let mut keys = Vec::new();
        for prefix in prefixes {
            for entry in table.range(*prefix..).map_err(|e| self.store_err(e))? {
                let (k, _) = entry.map_err(|e| self.store_err(e))?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                keys.push(k.value().to_string());
            }
        }
        Ok(keys)
    }

    /// Records that the fork of the role change just made is a switchover's (not a
    /// promotion's). Written after [`Meta::change_role`]: a crash in between reads as
    /// a promotion, the cautious reading.
    pub fn set_fork_by_switchover(&self) -> Result<(), MetaError> {
        self.put_many(&[(K_FORK_BY, b"switchover")])
    }

    /// `"switchover"` or `"promotion"` on a primary by role change; `None` otherwise.
    pub fn fork_by(&self) -> Result<Option<&'static str>, MetaError> {
        if self.fork_seq()?.is_none() {
            return Ok(None);
        }
        Ok(Some(match self.get_str(K_FORK_BY)?.as_deref() {
            Some("switchover") => "switchover",
            _ => "promotion",
        }))
    }

    /// Why an operator paused this standby, if they did (see `K_PAUSED`).
    pub fn operator_pause(&self) -> Result<Option<String>, MetaError> {
        self.get_str(K_PAUSED)
    }

    /// Records (durably) or clears an operator pause.
    pub fn set_operator_pause(&self, reason: Option<&str>) -> Result<(), MetaError> {
        self.put_many(&[(K_PAUSED, reason.unwrap_or("").as_bytes())])
    }

    /// Whether target `name` has rejoined this primary at fork point `fork`.
    pub fn rejoined(&self, name: &str, fork: u64) -> Result<bool, MetaError> {
        let key = format!("{REJOINED_PREFIX}{name}");
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(self.store_err(e)),
        };
        let v = table.get(key.as_str()).map_err(|e| self.store_err(e))?;
        Ok(v.is_some_and(|v| v.value() == fork.to_le_bytes()))
    }

    pub fn set_rejoined(&self, name: &str, fork: u64) -> Result<(), MetaError> {
        if self.rejoined(name, fork)? {
            return Ok(());
        }
        let key = format!("{REJOINED_PREFIX}{name}");
        self.put_many(&[(key.as_str(), &fork.to_le_bytes())])
    }

    /// Primary: target `name`'s crash horizon, if it has one (see `HORIZON_PREFIX`).
    pub fn crash_horizon(&self, name: &str) -> Result<Option<u64>, MetaError> {
        let key = format!("{HORIZON_PREFIX}{name}");
        self.get_opt_u64(&key, "horizon")
    }

    /// Primary start: every target shipped to since the previous start gets `seq`
    /// (the journal's last sequence) as its crash horizon unless it has one (lower:
    /// the records past it are still unproven). Durable before it returns.
    pub fn arm_crash_horizons(&self, seq: u64) -> Result<(), MetaError> {
        let mut keys = Vec::new();
        for key in self.keys_with_prefixes(&[SHIPPED_PREFIX])? {
            let name = &key[SHIPPED_PREFIX.len()..];
            if self.get_opt_u64(&key, "shipped")?.is_none() {
                continue;
            }
            keys.push(key.clone());
            if self.crash_horizon(name)?.is_none() {
                keys.push(format!("{HORIZON_PREFIX}{name}"));
            }
        }
        let v = seq.to_le_bytes();
        let pairs: Vec<(&str, &[u8])> = keys
            .iter()
            .map(|k| {
                let value: &[u8] = if k.starts_with(SHIPPED_PREFIX) {
                    &[]
                } else {
                    &v
                };
                (k.as_str(), value)
            })
            .collect();
        if pairs.is_empty() {
            return Ok(());
        }
        self.put_many(&pairs)
    }

    /// A session with target `name` starts shipping: its position is proven (at or
    /// below its horizon, or its full resync is durably planned), so the horizon goes,
    /// and the next start gives it a new one. Durable before it returns.
    pub fn shipping_to(&self, name: &str) -> Result<(), MetaError> {
        let shipped = format!("{SHIPPED_PREFIX}{name}");
        if self.crash_horizon(name)?.is_none() && self.get_opt_u64(&shipped, "shipped")?.is_some() {
            return Ok(());
        }
        let horizon = format!("{HORIZON_PREFIX}{name}");
        self.put_many(&[
            (horizon.as_str(), &[][..]),
            (shipped.as_str(), &1u64.to_le_bytes()[..]),
        ])
    }

    /// Primary: the recorded sync loss of target `name` (see `SYNC_LOSS_PREFIX`).
    pub fn sync_loss(&self, name: &str) -> Result<Option<u64>, MetaError> {
        let key = format!("{SYNC_LOSS_PREFIX}{name}");
        self.get_opt_u64(&key, "sync_loss")
    }

    /// Records (durably) or clears target `name`'s sync loss.
    pub fn set_sync_loss(&self, name: &str, at: Option<u64>) -> Result<(), MetaError> {
        let key = format!("{SYNC_LOSS_PREFIX}{name}");
        let v = at.map(u64::to_le_bytes);
        self.put_many(&[(key.as_str(), v.as_ref().map_or(&[][..], |b| &b[..]))])
    }

    /// Primary: whether target `name` asked for a full resync not yet under way.
    pub fn resync_required(&self, name: &str) -> Result<bool, MetaError> {
        let key = format!("{RESYNC_REQUIRED_PREFIX}{name}");
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(self.store_err(e)),
        };
        let v = table.get(key.as_str()).map_err(|e| self.store_err(e))?;
        Ok(v.is_some_and(|v| v.value() == [1]))
    }

    /// Records (durably) or clears target `name`'s request for a full resync.
    pub fn set_resync_required(&self, name: &str, required: bool) -> Result<(), MetaError> {
        let key = format!("{RESYNC_REQUIRED_PREFIX}{name}");
        let v: &[u8] = if required { &[1] } else { &[] };
        self.put_many(&[(key.as_str(), v)])
    }

    /// Standby: whether it must ask its relay for a full resync (`K_RELAY_RESYNC`).
    pub fn relay_resync(&self) -> Result<bool, MetaError> {
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(self.store_err(e)),
        };
        let v = table.get(K_RELAY_RESYNC).map_err(|e| self.store_err(e))?;
        Ok(v.is_some_and(|v| v.value() == [1]))
    }

    /// Records (durably) or clears that this standby must ask its relay for a resync.
    pub fn set_relay_resync(&self, wanted: bool) -> Result<(), MetaError> {
        let v: &[u8] = if wanted { &[1] } else { &[] };
        self.put_many(&[(K_RELAY_RESYNC, v)])
    }

    /// Standby: the sync loss its primary told it of (see `K_HEARD_SYNC_LOSS`).
    pub fn heard_sync_loss(&self) -> Result<Option<u64>, MetaError> {
        self.get_opt_u64(K_HEARD_SYNC_LOSS, K_HEARD_SYNC_LOSS)
    }

    /// Records (durably) or clears what the primary told this standby.
    pub fn set_heard_sync_loss(&self, at: Option<u64>) -> Result<(), MetaError> {
        let v = at.map(u64::to_le_bytes);
        self.put_many(&[(K_HEARD_SYNC_LOSS, v.as_ref().map_or(&[][..], |b| &b[..]))])
    }

    /// An optional u64 under a (possibly computed) key: absent and empty are `None`.
    fn get_opt_u64(&self, key: &str, what: &'static str) -> Result<Option<u64>, MetaError> {
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        let Some(v) = table.get(key).map_err(|e| self.store_err(e))? else {
            return Ok(None);
        };
        match v.value() {
            [] => Ok(None),
            b => <[u8; 8]>::try_from(b)
                .map(|a| Some(u64::from_le_bytes(a)))
                .map_err(|_| MetaError::Corrupt {
                    path: self.path.clone(),
                    key: what,
                    message: format!("{} bytes, expected 8", b.len()),
                }),
        }
    }

    fn store_err(&self, e: impl std::fmt::Display) -> MetaError {
        MetaError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn get_raw(&self, key: &'static str) -> Result<Option<Vec<u8>>, MetaError> {
        let txn = self.db.begin_read().map_err(|e| self.store_err(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        let v = table.get(key).map_err(|e| self.store_err(e))?;
        Ok(v.map(|g| g.value().to_vec()))
    }

    /// A text value; absent and empty (a cleared key) are both `None`.
    fn get_str(&self, key: &'static str) -> Result<Option<String>, MetaError> {
        Ok(self
            .get_raw(key)?
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn get_fixed<const N: usize>(&self, key: &'static str) -> Result<[u8; N], MetaError> {
        let raw = self.get_raw(key)?.ok_or_else(|| MetaError::Corrupt {
            path: self.path.clone(),
            key,
            message: "missing".into(),
        })?;
        raw.as_slice().try_into().map_err(|_| MetaError::Corrupt {
            path: self.path.clone(),
            key,
            message: format!("{} bytes, expected {N}", raw.len()),
        })
    }

    fn get_u64(&self, key: &'static str) -> Result<u64, MetaError> {
        self.get_fixed::<8>(key).map(u64::from_le_bytes)
    }

    fn get_id(&self, key: &'static str) -> Result<[u8; 16], MetaError> {
        self.get_fixed::<16>(key)
    }

    /// One durable transaction for all pairs.
    fn put_many(&self, pairs: &[(&str, &[u8])]) -> Result<(), MetaError> {
        let txn = self.db.begin_write().map_err(|e| self.store_err(e))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| self.store_err(e))?;
            for (k, v) in pairs {
                table.insert(*k, *v).map_err(|e| self.store_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.store_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_refuses_other_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let cid = [7u8; 16];
        let node = {
            let m = Meta::open(dir.path(), cid).unwrap();
            assert_eq!(m.epoch().unwrap(), 1);
            assert_eq!(m.checkpoint().unwrap(), 0);
            m.set_checkpoint(42).unwrap();
            m.set_epoch(3).unwrap();
            m.node_id
        };
        let m = Meta::open(dir.path(), cid).unwrap();
        assert_eq!(m.node_id, node);
        assert_eq!(m.checkpoint().unwrap(), 42);
        assert_eq!(m.epoch().unwrap(), 3);
        assert_eq!(m.volume_id("a").unwrap(), 0);
        assert_eq!(m.volume_id("b").unwrap(), 1);
        assert_eq!(m.volume_id("a").unwrap(), 0);
        drop(m);
        let m = Meta::open(dir.path(), cid).unwrap();
        assert_eq!(m.volume_id("b").unwrap(), 1);
        assert_eq!(m.volume_id("c").unwrap(), 2);
        drop(m);
        let e = Meta::open(dir.path(), [8u8; 16])
            .err()
            .expect("must refuse");
        assert!(matches!(e, MetaError::WrongCluster { .. }), "{e}");
    }

    #[test]
    fn bookmarks_and_rollback_state_persist() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.bookmarks().unwrap(), vec![]);
        assert_eq!(m.rollback_state().unwrap(), None);
        let b = |name: &str, seq| Bookmark {
            name: name.into(),
            seq,
            timestamp_ns: seq * 10,
        };
        m.add_bookmark(&b("z-first", 5)).unwrap();
        m.add_bookmark(&b("a-second", 9)).unwrap();
        // Neighbouring keys are not bookmarks.
        m.volume_id("bookmark").unwrap();
        m.set_rollback_state(Some(RollbackState::InProgress { target: 7 }))
            .unwrap();
        drop(m);
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(
            m.bookmarks().unwrap(),
            vec![b("z-first", 5), b("a-second", 9)]
        );
        assert_eq!(
            m.rollback_state().unwrap(),
            Some(RollbackState::InProgress { target: 7 })
        );
        m.set_rollback_state(Some(RollbackState::Done { target: 7 }))
            .unwrap();
        assert_eq!(
            m.rollback_state().unwrap(),
            Some(RollbackState::Done { target: 7 })
        );
        assert!(m.remove_bookmark("z-first").unwrap());
        assert!(!m.remove_bookmark("z-first").unwrap());
        assert_eq!(m.bookmarks().unwrap(), vec![b("a-second", 9)]);
        m.set_rollback_state(None).unwrap();
        assert_eq!(m.rollback_state().unwrap(), None);
    }

    #[test]
    fn a_seed_sets_epoch_checkpoint_and_journal_jump_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.seeded().unwrap(), None);
        m.apply_seed(3, 1234).unwrap();
        drop(m);
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.seeded().unwrap(), Some((1234, 3)));
        assert_eq!(
            (
                m.epoch().unwrap(),
                m.checkpoint().unwrap(),
                m.journal_skip().unwrap()
            ),
            (3, 1234, 1234)
        );
    }

    #[test]
    fn resync_state_and_journal_skip_persist() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.resync_state().unwrap(), None);
        assert_eq!(m.journal_skip().unwrap(), 0);
        let s = ResyncState {
            from: 10,
            snapshot: 40,
            through: 0,
            copied: false,
        };
        m.begin_resync(&s, 10).unwrap();
        drop(m);
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.resync_state().unwrap(), Some(s));
        assert_eq!(
            (m.journal_skip().unwrap(), m.checkpoint().unwrap()),
            (40, 10)
        );
        let done = ResyncState {
            through: 55,
            copied: true,
            ..s
        };
        m.end_resync_copy(Some(&done), 40).unwrap();
        assert_eq!(m.resync_state().unwrap(), Some(done));
        assert_eq!(m.checkpoint().unwrap(), 40);
        m.set_resync_state(None).unwrap();
        assert_eq!(m.resync_state().unwrap(), None);
        assert_eq!(m.journal_skip().unwrap(), 40, "the jump target stays");
    }

    #[test]
    fn crash_horizons_go_to_targets_shipped_to_and_keep_the_lowest_unproven_position() {
        let dir = tempfile::tempdir().unwrap();
        let id = [7u8; 16];
        {
            let m = Meta::open(dir.path(), id).unwrap();
            m.arm_crash_horizons(5).unwrap();
            assert_eq!(m.crash_horizon("dr1").unwrap(), None, "never shipped to");
            m.shipping_to("dr1").unwrap();
            m.shipping_to("dr2").unwrap();
            m.arm_crash_horizons(10).unwrap();
            assert_eq!(m.crash_horizon("dr1").unwrap(), Some(10));
            m.shipping_to("dr2").unwrap();
            assert_eq!(m.crash_horizon("dr2").unwrap(), None, "proven");
            // A second start before dr1 came back: its records past 10 are still
            // unproven, so 10 stays; dr2 was shipped to again and gets the new one.
            m.arm_crash_horizons(25).unwrap();
        }
        let m = Meta::open(dir.path(), id).unwrap();
        assert_eq!(m.crash_horizon("dr1").unwrap(), Some(10));
        assert_eq!(m.crash_horizon("dr2").unwrap(), Some(25));
        m.arm_crash_horizons(30).unwrap();
        assert_eq!(
            m.crash_horizon("dr2").unwrap(),
            Some(25),
            "not shipped to since"
        );
        m.shipping_to("dr1").unwrap();
        assert_eq!(m.crash_horizon("dr1").unwrap(), None);
        // A role change (a fork) makes them moot.
        m.change_role(3, "standby", Some("p"), None).unwrap();
        assert_eq!(m.crash_horizon("dr2").unwrap(), None);
        m.arm_crash_horizons(40).unwrap();
        assert_eq!(m.crash_horizon("dr1").unwrap(), None, "the marker went too");
    }

    #[test]
    fn sync_losses_persist_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let id = [7u8; 16];
        {
            let m = Meta::open(dir.path(), id).unwrap();
            assert_eq!(m.sync_loss("dr1").unwrap(), None);
            assert_eq!(m.heard_sync_loss().unwrap(), None);
            m.set_sync_loss("dr1", Some(42)).unwrap();
            m.set_sync_loss("dr2", Some(0)).unwrap();
            m.set_heard_sync_loss(Some(17)).unwrap();
        }
        let m = Meta::open(dir.path(), id).unwrap();
        assert_eq!(m.sync_loss("dr1").unwrap(), Some(42));
        assert_eq!(m.sync_loss("dr2").unwrap(), Some(0), "zero is a position");
        assert_eq!(m.heard_sync_loss().unwrap(), Some(17));
        m.set_sync_loss("dr1", None).unwrap();
        m.set_heard_sync_loss(None).unwrap();
        assert!(!m.resync_required("dr1").unwrap());
        m.set_resync_required("dr1", true).unwrap();
        assert!(m.resync_required("dr1").unwrap());
        assert!(!m.resync_required("dr2").unwrap());
        m.set_resync_required("dr1", false).unwrap();
        assert!(!m.resync_required("dr1").unwrap());
        assert!(!m.relay_resync().unwrap());
        m.set_relay_resync(true).unwrap();
        assert!(m.relay_resync().unwrap());
        m.set_relay_resync(false).unwrap();
        assert!(!m.relay_resync().unwrap());
        assert_eq!(m.sync_loss("dr1").unwrap(), None);
        assert_eq!(m.heard_sync_loss().unwrap(), None);
    }

    #[test]
    fn role_changes_are_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.role_override().unwrap(), None);
        assert_eq!(m.outdated().unwrap(), None);
        m.set_outdated(&Outdated {
            epoch: 2,
            by: "dr1".into(),
        })
        .unwrap();
        m.set_rollback_state(Some(RollbackState::Done { target: 4 }))
            .unwrap();
        m.set_heard_sync_loss(Some(9)).unwrap();
        m.set_sync_loss("dr1", Some(3)).unwrap();
        m.set_sync_loss("dr2", Some(4)).unwrap();
        m.set_resync_required("dr1", true).unwrap();
        m.change_role(2, "standby", Some("dr1"), None).unwrap();
        drop(m);
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.epoch().unwrap(), 2);
        assert_eq!(m.role_override().unwrap().as_deref(), Some("standby"));
        assert_eq!(m.primary_name().unwrap().as_deref(), Some("dr1"));
        assert_eq!(
            (m.outdated().unwrap(), m.rollback_state().unwrap()),
            (None, None)
        );
        assert_eq!(m.fork_seq().unwrap(), None);
        assert_eq!(m.heard_sync_loss().unwrap(), None);
        assert_eq!(
            (m.sync_loss("dr1").unwrap(), m.sync_loss("dr2").unwrap()),
            (None, None)
        );
        assert!(!m.resync_required("dr1").unwrap());
        m.change_role(3, "primary", None, Some(77)).unwrap();
        assert_eq!(m.fork_by().unwrap(), Some("promotion"));
        m.set_fork_by_switchover().unwrap();
        assert_eq!(m.fork_by().unwrap(), Some("switchover"));
        m.change_role(3, "primary", None, Some(77)).unwrap();
        assert_eq!(
            m.fork_by().unwrap(),
            Some("promotion"),
            "a promotion resets it"
        );
        assert_eq!(m.fork_seq().unwrap(), Some(77));
        assert_eq!(m.primary_name().unwrap(), None);
    }

    /// A promotion with rollback: the cut and the checkpoint at it come with the role
    /// change; the cut reads as the fork once a later role change made a new epoch.
    #[test]
    fn a_promotion_records_its_cut_and_checkpoint_in_the_role_change() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.fork_cut().unwrap(), None, "no fork");
        m.set_checkpoint(30).unwrap();
        m.set_rollback_state(Some(RollbackState::Done { target: 17 }))
            .unwrap();
        m.promote(2, Some("primary"), 17, 49).unwrap();
        drop(m);
        let m = Meta::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(m.epoch().unwrap(), 2);
        assert_eq!(m.role_override().unwrap().as_deref(), Some("primary"));
        assert_eq!(m.fork_seq().unwrap(), Some(17));
        assert_eq!(m.fork_cut().unwrap(), Some(49));
        assert_eq!(m.checkpoint().unwrap(), 49, "the tail is never replayed");
        assert_eq!(m.rollback_state().unwrap(), None);
        assert_eq!(m.fork_by().unwrap(), Some("promotion"));
        // A switchover's take-over later: a new epoch and fork, no cut.
        m.change_role(3, "primary", Some("dr2"), Some(60)).unwrap();
        assert_eq!(m.fork_cut().unwrap(), Some(60));
        // A promotion that discarded nothing: the cut is the fork.
        m.promote(4, None, 70, 65).unwrap();
        assert_eq!(m.fork_cut().unwrap(), Some(70));
        m.change_role(5, "standby", Some("dr2"), None).unwrap();
        assert_eq!(
            m.fork_cut().unwrap(),
            Some(70),
            "the fork of the last promotion"
        );
    }
}
