//! Restore: a volume as it was at one write-set boundary, from the newest base at or
//! before it plus the packs after that base, every object checked against the
//! manifest's SM3 (and the manifest's chain) before any of its bytes are used.
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::format::base::{Base, CHUNK_SIZE};
use crate::format::manifest::{Entry, Kind, Manifest, Volume};
use crate::format::pack::{self, Op, WriteSet};
use crate::format::sealed::ObjectKind;
use crate::format::sm3_hex;
use crate::store::{ArchiveStore, StoreError};

/// Which point to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The newest write-set the archive holds.
    Latest,
    /// Exactly this write-set boundary.
    Seq(u64),
    /// The newest write-set at or before this time (ns since the Unix epoch).
    Time(u64),
    /// The write-set sealed with this bookmark.
    Bookmark(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    /// The write-set boundary the output now holds.
    pub seq: u64,
    pub timestamp_ns: u64,
    pub base_seq: u64,
    pub packs_read: u64,
    pub write_sets_applied: u64,
    pub bytes_downloaded: u64,
}

pub(crate) async fn get_checked(
    store: &ArchiveStore,
    e: &Entry,
) -> Result<bytes::Bytes, StoreError> {
    let b = store.get(&e.name).await?;
    if b.len() as u64 != e.bytes || sm3_hex(&[&b]) != e.sm3 {
        return Err(StoreError::Digest {
            name: e.name.clone(),
        });
    }
    Ok(b)
}

async fn pack_sets(store: &ArchiveStore, e: &Entry) -> Result<Vec<WriteSet>, StoreError> {
    let b = get_checked(store, e).await?;
    let b = store.unseal(ObjectKind::Pack, &e.name, b)?;
    let (_, sets) = pack::decode(&b).map_err(|source| StoreError::Format {
        name: e.name.clone(),
        source,
    })?;
    Ok(sets)
}

fn packs(m: &Manifest) -> impl Iterator<Item = &Entry> {
    m.entries.iter().filter(|e| e.kind == Kind::Pack)
}

/// The boundary `target` names: packs are read to find a bookmark or a time.
async fn resolve(store: &ArchiveStore, m: &Manifest, target: &Target) -> Result<u64, StoreError> {
    match target {
        Target::Latest => Ok(m
            .last_pack_seq()
            .max(bases(m).map(|b| b.last_seq).max().unwrap_or(0))),
        Target::Seq(s) => Ok(*s),
        Target::Time(t) => {
            let mut best = bases(m)
                .filter(|b| b.last_ts <= *t)
                .map(|b| b.last_seq)
                .max();
            for e in packs(m).filter(|e| e.first_ts <= *t) {
                for ws in pack_sets(store, e).await? {
                    if ws.timestamp_ns <= *t {
                        best = best.max(Some(ws.end_seq));
                    }
                }
            }
            best.ok_or_else(|| {
                StoreError::Refused("no point in the archive is at or before that time".into())
            })
        }
        Target::Bookmark(name) => {
            for e in packs(m) {
                for ws in pack_sets(store, e).await? {
                    if ws
                        .records
                        .iter()
                        .any(|r| matches!(&r.op, Op::Seal(l) if l == name))
                    {
                        return Ok(ws.end_seq);
                    }
                }
            }
            Err(StoreError::Refused(format!(
                "bookmark '{name}' is not in the archive"
            )))
        }
    }
}

fn bases(m: &Manifest) -> impl Iterator<Item = &Entry> {
    m.entries.iter().filter(|e| e.kind == Kind::Base)
}

/// What restoring (or viewing) one volume at one point reads: the newest base at or
/// before the point and the packs after it that reach the point.
pub(crate) struct Plan {
    pub vol: Volume,
    /// The write-set boundary the target names.
    pub seq: u64,
    pub base: Entry,
    /// In sequence order; their write-sets after `base` and up to `seq` apply.
    pub packs: Vec<Entry>,
}

/// Resolves `target` for volume `name` against the newest manifest.
pub(crate) async fn plan(
    store: &ArchiveStore,
    name: &str,
    target: &Target,
) -> Result<Plan, StoreError> {
    let m = store
        .latest_manifest()
        .await?
        .ok_or_else(|| StoreError::Refused(format!("{} holds no archive", store.url())))?;
    let vol = m
        .volumes
        .iter()
        .find(|v| v.name == name)
        .ok_or_else(|| StoreError::Refused(format!("volume '{name}' is not in the archive")))?
        .clone();
    let seq = resolve(store, &m, target).await?;
    let base = bases(&m)
        .filter(|b| b.last_seq <= seq && b.name.ends_with(&format!("-{}.json", vol.id)))
        .max_by_key(|b| b.last_seq)
        .ok_or_else(|| {
            StoreError::Refused(format!(
                "no base image of '{name}' at or before sequence {seq}"
            ))
        })?
        .clone();
    let packs = packs(&m)
        .filter(|e| e.last_seq > base.last_seq && e.first_seq <= seq)
        .cloned()
        .collect();
    Ok(Plan {
        vol,
        seq,
        base,
        packs,
    })
}

/// The error for a point no write-set of the archive ends at.
pub(crate) fn not_a_boundary(seq: u64) -> StoreError {
    StoreError::Refused(format!(
        "sequence {seq} is not a write-set boundary held by the archive"
    ))
}

/// Restores volume `name` at `target` into `out` (a file or block device; sized to the
/// volume). Fails, naming the object, on any missing or changed object.
pub async fn restore(
    store: &ArchiveStore,
    name: &str,
    target: &Target,
    out: &File,
) -> Result<RestoreReport, StoreError> {
    let Plan {
        vol,
        seq,
        base,
        packs,
    } = plan(store, name, target).await?;
    let mut report = RestoreReport {
        seq,
        timestamp_ns: base.last_ts,
        base_seq: base.last_seq,
        packs_read: 0,
        write_sets_applied: 0,
        bytes_downloaded: 0,
    };
    if out.metadata()?.is_file() {
        out.set_len(0)?;
        out.set_len(vol.size)?;
    }
    report.bytes_downloaded += write_base(store, &base, vol.size, out).await?;
    let mut reached = base.last_seq == seq;
    for e in &packs {
        report.packs_read += 1;
        report.bytes_downloaded += e.bytes;
        for ws in pack_sets(store, e).await? {
            if ws.end_seq <= base.last_seq || ws.end_seq > seq {
                continue;
            }
            apply(&ws, vol.id, vol.size, out)?;
            report.write_sets_applied += 1;
            report.timestamp_ns = ws.timestamp_ns;
            reached |= ws.end_seq == seq;
        }
    }
    if !reached {
        return Err(not_a_boundary(seq));
    }
    out.sync_all()?;
    Ok(report)
}

async fn write_base(
    store: &ArchiveStore,
    e: &Entry,
    size: u64,
    out: &File,
) -> Result<u64, StoreError> {
    let json = get_checked(store, e).await?;
    let base = Base::from_json(&json).map_err(|source| StoreError::Format {
        name: e.name.clone(),
        source,
    })?;
    if base.size != size {
        return Err(StoreError::Refused(format!(
            "{}: base of {} bytes for a {size} byte volume",
            e.name, base.size
        )));
    }
    let mut downloaded = json.len() as u64;
    let zeros = vec![0u8; CHUNK_SIZE as usize];
    for (i, id) in base.chunks.iter().enumerate() {
        let off = i as u64 * CHUNK_SIZE;
        let len = (size - off).min(CHUNK_SIZE) as usize;
        let Some(id) = id else {
            out.write_all_at(&zeros[..len], off)?;
            continue;
        };
        let (data, stored) = store.get_chunk(id, len).await?;
        downloaded += stored;
        out.write_all_at(&data, off)?;
    }
    Ok(downloaded)
}

/// Applies one write-set's records of volume `id` (bounds checked: a record past the
/// volume's end is corruption, never a reason to grow the output).
fn apply(ws: &WriteSet, id: u32, size: u64, out: &File) -> Result<(), StoreError> {
    let zeros = vec![0u8; CHUNK_SIZE as usize];
    for r in ws.records.iter().filter(|r| r.volume == id) {
        if matches!(r.op, Op::Seal(_)) {
            continue;
        }
        if r.offset.saturating_add(r.len as u64) > size {
            return Err(StoreError::Refused(format!(
                "record {} reaches past the volume's end ({} + {} > {size})",
                r.seq, r.offset, r.len
            )));
        }
        match &r.op {
            Op::Write(b) => out.write_all_at(b, r.offset)?,
            Op::Trim | Op::Zero => {
                let mut at = r.offset;
                let end = r.offset + r.len as u64;
                while at < end {
                    let n = (end - at).min(CHUNK_SIZE) as usize;
                    out.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
            }
            Op::Seal(_) => {}
        }
    }
    Ok(())
}
