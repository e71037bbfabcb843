//! Restore: a volume as it was at one write-set boundary, from the newest base at or
//! before it plus the packs after that base, every object checked against the
//! manifest's SM3 (and the manifest's chain) before any of its bytes are used.
//!
//! The packs' extent indexes (pack version 2) are read first, by range: they say
//! which bytes of the volume each pack's writes still hold at the point. Only packs
//! with such bytes are downloaded, and from each only those runs are written; a pack
//! whose writes were all overwritten before the point, or that wrote other volumes
//! only, is not read at all. Packs without an index (version 1, or sealed in an
//! encrypted archive, which cannot be read in part) are read whole to index them.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::format::base::{Base, CHUNK_SIZE};
use crate::format::manifest::{Entry, Kind, Manifest, Volume};
use crate::format::pack::{self, ExtentOp, IndexedSet, WriteSet};
use crate::format::sealed::{self, ObjectKind};
use crate::format::sm3_hex;
use crate::store::{ArchiveStore, StoreError};
use crate::view::map::{RunMap, Src};

/// A first range read of a pack takes this much: its header and, usually, its whole
/// extent index (about 30 bytes per record) in one request.
const INDEX_PROBE: u64 = 64 << 10;
/// Bodies of packs read whole while indexing, kept for the apply that follows (beyond
/// this they are read again): memory stays bounded whatever the archive holds.
const KEEP_BODIES: u64 = 256 << 20;

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
    /// Packs downloaded whole (to index them or for their bytes).
    pub packs_read: u64,
    /// Packs of the plan whose bytes were not needed (overwritten before the point,
    /// or of other volumes): only their index was read.
    pub packs_skipped: u64,
    /// Packs whose extent index was read by range.
    pub indexes_read: u64,
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

/// A pack checked against its manifest entry, decoded: its body and write-sets.
pub(crate) async fn fetch_pack(
    store: &ArchiveStore,
    e: &Entry,
) -> Result<(Bytes, Vec<WriteSet>), StoreError> {
    let b = get_checked(store, e).await?;
    let b = store.unseal(ObjectKind::Pack, &e.name, b)?;
    let (_, raw, sets) = pack::decode_shared(&b).map_err(|source| StoreError::Format {
        name: e.name.clone(),
        source,
    })?;
    Ok((raw, sets))
}

/// A pack's extent index and what reading it took.
pub(crate) struct PackIndex {
    pub sets: Vec<IndexedSet>,
    /// The uncompressed body, when the whole pack had to be read for the index.
    pub body: Option<Bytes>,
    /// Bytes read from the store.
    pub read: u64,
}

/// The extent index of pack `e`: by range (header, then index) from a plain
/// version-2 pack, else from the whole pack. A range-read index is not covered by the
/// manifest's SM3 of the object (only the whole object is): it is checked by its own
/// SM3 in the CRC-checked header and against the entry's sequences, and again against
/// the body whenever the pack is read whole.
pub(crate) async fn pack_index(store: &ArchiveStore, e: &Entry) -> Result<PackIndex, StoreError> {
    let fmt = |source| StoreError::Format {
        name: e.name.clone(),
        source,
    };
    if store.kek().is_none() && e.bytes > 0 {
        let probe = store
            .get_range(&e.name, 0..e.bytes.min(INDEX_PROBE))
            .await?;
        if !sealed::is_sealed(&probe) {
            let h = pack::decode_header(&probe).map_err(fmt)?;
            if let Some(r) = pack::index_range(&h) {
                if h.object_len() as u64 != e.bytes
                    || (h.first_seq, h.last_seq, h.epoch) != (e.first_seq, e.last_seq, e.epoch)
                {
                    return Err(StoreError::Digest {
                        name: e.name.clone(),
                    });
                }
                let mut read = probe.len() as u64;
                let stored = if r.end <= probe.len() as u64 {
                    probe.slice(r.start as usize..r.end as usize)
                } else {
                    read += r.end - r.start;
                    store.get_range(&e.name, r).await?
                };
                let sets = pack::decode_index(&h, &stored).map_err(fmt)?;
                return Ok(PackIndex {
                    sets,
                    body: None,
                    read,
                });
            }
        }
    }
    let (raw, sets) = fetch_pack(store, e).await?;
    Ok(PackIndex {
        sets: pack::index_of(&sets),
        body: Some(raw),
        read: e.bytes,
    })
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
                for ws in pack_index(store, e).await?.sets {
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
                for ws in pack_index(store, e).await?.sets {
                    if ws
                        .extents
                        .iter()
                        .any(|r| matches!(&r.op, ExtentOp::Seal(l) if l == name))
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

/// What the packs of a plan still hold at its point, for its volume: runs of the
/// volume, each in one pack's body (or zeros), built from the packs' extent indexes.
pub(crate) struct PlanRuns {
    pub runs: RunMap,
    /// The newest applied write-set's time (the base's when none).
    pub timestamp_ns: u64,
    pub write_sets: u64,
    pub indexes_read: u64,
    /// Packs read whole to index them.
    pub packs_read: u64,
    pub bytes_read: u64,
}

/// Packs indexed at once: overlaps the store's latency, bounds memory.
const INDEX_PARALLEL: usize = 4;
/// Base chunks downloaded at once while restoring.
const CHUNK_PARALLEL: usize = 4;

/// Indexes the plan's packs, oldest first; `keep` gets the body of each pack that had
/// to be read whole (a cache may hold it for the reads that follow). Refuses a point
/// no write-set ends at, and a record past the volume's end (corruption, never a
/// reason to grow the output).
pub(crate) async fn index_plan(
    store: &ArchiveStore,
    p: &Plan,
    mut keep: impl FnMut(&Entry, Bytes),
) -> Result<PlanRuns, StoreError> {
    use futures::StreamExt;
    let mut out = PlanRuns {
        runs: RunMap::default(),
        timestamp_ns: p.base.last_ts,
        write_sets: 0,
        indexes_read: 0,
        packs_read: 0,
        bytes_read: 0,
    };
    let mut indexed = futures::stream::iter(p.packs.iter().cloned())
        .map(|e| async move { pack_index(store, &e).await.map(|i| (e, i)) })
        .buffered(INDEX_PARALLEL);
    let mut reached = p.base.last_seq == p.seq;
    let mut id = 0u32;
    while let Some(r) = indexed.next().await {
        let (e, idx) = r?;
        out.bytes_read += idx.read;
        match idx.body {
            Some(body) => {
                out.packs_read += 1;
                keep(&e, body);
            }
            None => out.indexes_read += 1,
        }
        for ws in idx
            .sets
            .iter()
            .filter(|ws| ws.end_seq > p.base.last_seq && ws.end_seq <= p.seq)
        {
            add_runs(&mut out.runs, ws, id, &p.vol, &e.name)?;
            out.timestamp_ns = ws.timestamp_ns;
            out.write_sets += 1;
            reached |= ws.end_seq == p.seq;
        }
        id += 1;
    }
    if !reached {
        return Err(not_a_boundary(p.seq));
    }
    Ok(out)
}

/// One write-set's extents of volume `vol` into `runs` (pack number `pack`).
fn add_runs(
    runs: &mut RunMap,
    ws: &IndexedSet,
    pack: u32,
    vol: &Volume,
    name: &str,
) -> Result<(), StoreError> {
    for r in ws.extents.iter().filter(|r| r.volume == vol.id) {
        let end = r.offset.saturating_add(r.len as u64);
        if !matches!(r.op, ExtentOp::Seal(_)) && end > vol.size {
            return Err(StoreError::Refused(format!(
                "{name}: record {} reaches past the volume's end ({} + {} > {})",
                r.seq, r.offset, r.len, vol.size
            )));
        }
        match r.op {
            ExtentOp::Write { body_at } => runs.insert(
                r.offset,
                end,
                Src::Pack {
                    pack,
                    at: body_at as u64,
                },
            ),
            ExtentOp::Trim | ExtentOp::Zero => runs.insert(r.offset, end, Src::Zero),
            ExtentOp::Seal(_) => {}
        }
    }
    Ok(())
}

/// Restores volume `name` at `target` into `out` (a file or block device; sized to the
/// volume). Fails, naming the object, on any missing or changed object.
pub async fn restore(
    store: &ArchiveStore,
    name: &str,
    target: &Target,
    out: &File,
) -> Result<RestoreReport, StoreError> {
    let p = plan(store, name, target).await?;
    if out.metadata()?.is_file() {
        out.set_len(0)?;
        out.set_len(p.vol.size)?;
    }
    let mut downloaded = write_base(store, &p.base, p.vol.size, out).await?;
    let mut kept: HashMap<String, Bytes> = HashMap::new();
    let mut kept_bytes = 0u64;
    let indexed = index_plan(store, &p, |e, body| {
        if kept_bytes + body.len() as u64 <= KEEP_BODIES {
            kept_bytes += body.len() as u64;
            kept.insert(e.name.clone(), body);
        }
    })
    .await?;
    downloaded += indexed.bytes_read;
    // Per pack, the runs it still holds: (volume offset, end, offset in its body).
    let mut by_pack: BTreeMap<u32, Vec<(u64, u64, u64)>> = BTreeMap::new();
    let zeros = vec![0u8; CHUNK_SIZE as usize];
    for (s, e, src) in indexed.runs.runs(0, p.vol.size) {
        match src {
            Src::Zero => write_zeros(out, &zeros, s, e)?,
            Src::Pack { pack, at } => by_pack.entry(pack).or_default().push((s, e, at)),
        }
    }
    let mut packs_read = indexed.packs_read;
    for (&pack, runs) in &by_pack {
        let e = &p.packs[pack as usize];
        let body = match kept.remove(&e.name) {
            Some(b) => b,
            None => {
                packs_read += 1;
                downloaded += e.bytes;
                fetch_pack(store, e).await?.0
            }
        };
        for &(s, end, at) in runs {
            let bytes = body
                .get(at as usize..(at + end - s) as usize)
                .ok_or_else(|| StoreError::Refused(format!("{}: shorter than indexed", e.name)))?;
            out.write_all_at(bytes, s)?;
        }
    }
    out.sync_all()?;
    Ok(RestoreReport {
        seq: p.seq,
        timestamp_ns: indexed.timestamp_ns,
        base_seq: p.base.last_seq,
        packs_read,
        packs_skipped: p.packs.len() as u64 - by_pack.len() as u64,
        indexes_read: indexed.indexes_read,
        write_sets_applied: indexed.write_sets,
        bytes_downloaded: downloaded,
    })
}

fn write_zeros(out: &File, zeros: &[u8], from: u64, to: u64) -> Result<(), StoreError> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        out.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
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
    use futures::StreamExt;
    let mut downloaded = json.len() as u64;
    let zeros = vec![0u8; CHUNK_SIZE as usize];
    // Chunks are fetched CHUNK_PARALLEL at a time (the store's latency overlapped,
    // memory bounded by as many chunks) and written in order.
    let mut chunks = futures::stream::iter(base.chunks.iter().enumerate())
        .map(|(i, id)| async move {
            let off = i as u64 * CHUNK_SIZE;
            let len = (size - off).min(CHUNK_SIZE) as usize;
            match id {
                None => Ok::<_, StoreError>((off, len, None)),
                Some(id) => Ok((off, len, Some(store.get_chunk(id, len).await?))),
            }
        })
        .buffered(CHUNK_PARALLEL);
    while let Some(c) = chunks.next().await {
        match c? {
            (off, len, None) => out.write_all_at(&zeros[..len], off)?,
            (off, _, Some((data, stored))) => {
                downloaded += stored;
                out.write_all_at(&data, off)?;
            }
        }
    }
    Ok(downloaded)
}
