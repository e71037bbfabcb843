//! A read-only view of one volume at one archived point, served straight from the
//! bucket: what `ferryctl archive export` puts behind NBD.
//!
//! Opening reads the manifest, the base's chunk list and the extent index of each pack
//! after the base up to the point (a range read of the pack's start: pack version 2;
//! older or sealed packs are read whole), and keeps only an index: the base's chunk
//! ids (one per MiB) and the runs the packs wrote (`map::RunMap`). No chunk and no
//! pack body is read at open, so the time to the first read does not grow with the
//! volume, and only with the number of writes since its base, not their bytes.
//! Reads fetch a chunk or a pack on first use, check it (a chunk against its SM3 id, a
//! pack against the manifest's SM3, and its index against its body) and keep it in a
//! bounded cache (`cache::Cache`).
mod cache;
pub(crate) mod map;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::format::base::{chunk_object, Base, CHUNK_SIZE};
use crate::format::manifest::Entry;
use crate::restore::{fetch_pack, get_checked, index_plan, plan, Plan, Target};
use crate::store::{ArchiveStore, StoreError};
use map::{RunMap, Src};

#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Bytes of fetched objects kept (chunks and pack bodies).
    pub cache_bytes: u64,
    /// Keep them as files here instead of in memory.
    pub cache_dir: Option<PathBuf>,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            cache_bytes: 256 << 20,
            cache_dir: None,
        }
    }
}

/// What a view shows and what opening it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewInfo {
    pub volume: String,
    pub size: u64,
    pub seq: u64,
    pub timestamp_ns: u64,
    pub base_seq: u64,
    /// Packs read whole while opening (no extent index: version 1, or sealed).
    pub packs_read: u64,
    /// Packs whose extent index alone was read while opening.
    pub indexes_read: u64,
    /// Bytes read from the store while opening (manifest not counted).
    pub bytes_read: u64,
    pub runs: u64,
    /// Base chunks stored (the others are all zeros).
    pub chunks_stored: u64,
    pub open_time: Duration,
}

/// One run of the view's address space with one allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewExtent {
    pub len: u64,
    /// Nothing stored: a zero chunk of the base never written after, or a range the
    /// packs trimmed or zeroed. Reads as zeros.
    pub hole: bool,
}

pub struct ArchiveView {
    store: ArchiveStore,
    info: ViewInfo,
    /// Per base chunk: its SM3 (the object's name), `None` for all zeros.
    chunks: Vec<Option<[u8; 32]>>,
    /// The packs the runs point into (`Src::Pack::pack` indexes this).
    packs: Vec<Entry>,
    runs: RunMap,
    cache: Mutex<cache::Cache>,
}

impl ArchiveView {
    /// Opens volume `name` at `target`: reads the index only (see the module doc).
    pub async fn open(
        store: ArchiveStore,
        name: &str,
        target: &Target,
        opts: ViewOptions,
    ) -> Result<ArchiveView, StoreError> {
        let started = Instant::now();
        let p = plan(&store, name, target).await?;
        let chunks = base_chunks(&store, &p).await?;
        let mut view = ArchiveView {
            info: ViewInfo {
                volume: name.to_string(),
                size: p.vol.size,
                seq: p.seq,
                timestamp_ns: p.base.last_ts,
                base_seq: p.base.last_seq,
                packs_read: 0,
                indexes_read: 0,
                bytes_read: 0,
                runs: 0,
                chunks_stored: chunks.iter().flatten().count() as u64,
                open_time: Duration::ZERO,
            },
            chunks,
            packs: Vec::new(),
            runs: RunMap::default(),
            cache: Mutex::new(cache::Cache::new(opts.cache_bytes, opts.cache_dir)?),
            store,
        };
        view.index_packs(&p).await?;
        view.info.runs = view.runs.len() as u64;
        view.info.open_time = started.elapsed();
        Ok(view)
    }

    pub fn info(&self) -> &ViewInfo {
        &self.info
    }

    /// Bytes the cache holds now (at most the configured limit).
    pub fn cached_bytes(&self) -> u64 {
        self.lock_cache().used()
    }

    /// Adds the runs of every write-set after the base up to the point, from the
    /// packs' extent indexes; the bodies of packs read whole go to the cache, as the
    /// first reads are likely to want them.
    async fn index_packs(&mut self, p: &Plan) -> Result<(), StoreError> {
        let store = self.store.clone();
        let cache = &self.cache;
        let indexed = index_plan(&store, p, |e, body| {
            cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(&e.name, body)
        })
        .await?;
        self.runs = indexed.runs;
        self.packs = p.packs.clone();
        self.info.timestamp_ns = indexed.timestamp_ns;
        self.info.packs_read = indexed.packs_read;
        self.info.indexes_read = indexed.indexes_read;
        self.info.bytes_read += indexed.bytes_read;
        Ok(())
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, cache::Cache> {
        // The cache holds no invariant a panicking holder could break half-way that a
        // later get would trust beyond its bounds checks.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `len` bytes from `offset` (within the volume) as they were at the point. Fails,
    /// naming the object, when one is missing or does not match its hash.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.info.size)
            .ok_or_else(|| StoreError::Refused(format!("read {offset}+{len} past the end")))?;
        let mut out = vec![0u8; len as usize];
        let mut at = offset;
        for (s, e, src) in self.runs.runs(offset, end) {
            self.read_base(
                at,
                s,
                &mut out[(at - offset) as usize..(s - offset) as usize],
            )
            .await?;
            if let Src::Pack { pack, at: body_at } = src {
                let b = self.pack_bytes(pack, body_at, e - s).await?;
                out[(s - offset) as usize..(e - offset) as usize].copy_from_slice(&b);
            }
            at = e;
        }
        self.read_base(at, end, &mut out[(at - offset) as usize..])
            .await?;
        Ok(out)
    }

    /// `[from, to)` from the base's chunks into `out` (zeroed already).
    async fn read_base(&self, from: u64, to: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let mut at = from;
        while at < to {
            let i = at / CHUNK_SIZE;
            let n = (to - at).min((i + 1) * CHUNK_SIZE - at);
            if let Some(id) = self.chunks.get(i as usize).copied().flatten() {
                let b = self.chunk_bytes(i, &id, at - i * CHUNK_SIZE, n).await?;
                let o = (at - from) as usize;
                out[o..o + n as usize].copy_from_slice(&b);
            }
            at += n;
        }
        Ok(())
    }

    async fn chunk_bytes(
        &self,
        index: u64,
        id: &[u8; 32],
        at: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        let id = hex::encode(id);
        let name = chunk_object(&id);
        if let Some(b) = self.lock_cache().get(&name, at, len) {
            return Ok(b);
        }
        let want = (self.info.size - index * CHUNK_SIZE).min(CHUNK_SIZE) as usize;
        let (data, _) = self.store.get_chunk(&id, want).await?;
        let data = Bytes::from(data);
        self.lock_cache().put(&name, data.clone());
        Ok(data.slice(at as usize..(at + len) as usize))
    }

    async fn pack_bytes(&self, pack: u32, at: u64, len: u64) -> Result<Bytes, StoreError> {
        let e = &self.packs[pack as usize];
        if let Some(b) = self.lock_cache().get(&e.name, at, len) {
            return Ok(b);
        }
        let (raw, _) = fetch_pack(&self.store, e).await?;
        let part = raw
            .get(at as usize..(at + len) as usize)
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| StoreError::Refused(format!("{}: shorter than indexed", e.name)))?;
        self.lock_cache().put(&e.name, raw);
        Ok(part)
    }

    /// Allocation of `[offset, offset + len)`: at most `max` extents, contiguous from
    /// `offset`, adjacent ones of the same status merged.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<ViewExtent> {
        let end = offset.saturating_add(len).min(self.info.size);
        let mut out: Vec<ViewExtent> = Vec::new();
        let mut push = |len: u64, hole: bool| match out.last_mut() {
            Some(l) if l.hole == hole => l.len += len,
            _ => out.push(ViewExtent { len, hole }),
        };
        let mut at = offset;
        for (s, e, src) in self.runs.runs(offset, end) {
            self.base_extents(at, s, &mut push);
            push(e - s, src == Src::Zero);
            at = e;
        }
        self.base_extents(at, end, &mut push);
        out.truncate(max.max(1));
        out
    }

    fn base_extents(&self, from: u64, to: u64, push: &mut impl FnMut(u64, bool)) {
        let mut at = from;
        while at < to {
            let i = at / CHUNK_SIZE;
            let n = (to - at).min((i + 1) * CHUNK_SIZE - at);
            push(n, self.chunks.get(i as usize).is_none_or(|c| c.is_none()));
            at += n;
        }
    }
}

/// The base's chunk list, checked against the manifest and the volume.
async fn base_chunks(store: &ArchiveStore, p: &Plan) -> Result<Vec<Option<[u8; 32]>>, StoreError> {
    let name = &p.base.name;
    let json = get_checked(store, &p.base).await?;
    let base = Base::from_json(&json).map_err(|source| StoreError::Format {
        name: name.clone(),
        source,
    })?;
    if base.size != p.vol.size {
        return Err(StoreError::Refused(format!(
            "{name}: base of {} bytes for a {} byte volume",
            base.size, p.vol.size
        )));
    }
    base.chunks
        .iter()
        .map(|c| match c {
            None => Ok(None),
            Some(id) => {
                let mut b = [0u8; 32];
                hex::decode_to_slice(id, &mut b).map_err(|_| {
                    StoreError::Refused(format!("{name}: chunk id '{id}' is not SM3 hex"))
                })?;
                Ok(Some(b))
            }
        })
        .collect()
}
