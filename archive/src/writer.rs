//! The writing side, as the primary's archive target drives it: write-sets in, in
//! sequence order; packs cut at write-set boundaries once they reach a size; each pack
//! uploaded before the manifest that names it, and the manifest's new generation
//! created only if absent. A crash between the two leaves an unreferenced pack (rewritten
//! by the retry, which has the same name); the archive never references a missing one.
use crate::format::base::{Base, BASE_FORMAT, CHUNK_SIZE};
use crate::format::manifest::{Entry, Kind, Manifest, Volume};
use crate::format::pack::{self, WriteSet};
use crate::format::sealed::ObjectKind;
use crate::format::sm3_hex;
use crate::store::{ArchiveStore, StoreError};

/// Default pack size: a few MiB of write-sets before compression.
pub const DEFAULT_PACK_BYTES: usize = 8 << 20;
/// Commits retried over compactions that won the race for the next generation.
const COMMIT_ATTEMPTS: usize = 16;

pub struct ArchiveWriter {
    store: ArchiveStore,
    manifest: Manifest,
    epoch: u64,
    pending: Vec<WriteSet>,
    pending_bytes: usize,
    pack_bytes: usize,
    level: i32,
    packed: PackedBytes,
}

/// Packs this writer uploaded: their write-sets' bytes before and after compression.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PackedBytes {
    pub raw: u64,
    pub stored: u64,
}

/// What a base upload did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BaseStats {
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Chunks already in the store (unchanged since an earlier base).
    pub reused_chunks: u64,
    pub uploaded_bytes: u64,
}

impl ArchiveWriter {
    /// Opens the archive for `epoch` (creating its first manifest): refused when it
    /// belongs to another cluster, has other volumes, or a newer epoch writes there.
    /// With a key on `store` ([`ArchiveStore::with_kek`]) a new archive is encrypted
    /// and an existing one must be encrypted with that key.
    pub async fn open(
        store: ArchiveStore,
        cluster: &str,
        volumes: Vec<Volume>,
        epoch: u64,
    ) -> Result<ArchiveWriter, StoreError> {
        let manifest = match store.latest_manifest().await? {
            Some(m) => check_owner(m, cluster, &volumes, epoch)?,
            None => {
                let m = match store.kek() {
                    None => Manifest::new(cluster, volumes, epoch),
                    Some(k) => Manifest::new_encrypted(cluster, volumes, epoch, k.id().to_string()),
                };
                if !store.create(&Manifest::object_name(0), m.to_json()).await? {
                    return Err(StoreError::LostRace { generation: 0 });
                }
                m
            }
        };
        Ok(ArchiveWriter {
            store,
            manifest,
            epoch,
            pending: Vec::new(),
            pending_bytes: 0,
            pack_bytes: DEFAULT_PACK_BYTES,
            level: 3,
            packed: PackedBytes::default(),
        })
    }

    pub fn with_pack_bytes(mut self, bytes: usize) -> Self {
        self.pack_bytes = bytes.clamp(1, pack::MAX_RAW_LEN / 2);
        self
    }

    /// The newest sequence the archive holds durably (the journal may release up to it).
    pub fn archived_seq(&self) -> u64 {
        self.manifest.last_pack_seq()
    }

    /// Sequence of the newest write-set handed in (archived or pending).
    pub fn pushed_seq(&self) -> u64 {
        self.pending
            .last()
            .map_or(self.archived_seq(), |w| w.end_seq)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// What the packs uploaded since [`open`](Self::open) held, raw and compressed.
    pub fn packed(&self) -> PackedBytes {
        self.packed
    }

    /// Queues a write-set; `true` when a pack is due ([`flush`](Self::flush)). A
    /// write-set the archive already holds (a resend after a restart) is skipped.
    pub fn push(&mut self, ws: WriteSet) -> Result<bool, StoreError> {
        if ws.end_seq <= self.pushed_seq() {
            return Ok(false);
        }
        let len = ws.encoded_len();
        if len > pack::MAX_RAW_LEN {
            return Err(StoreError::Refused(format!(
                "write-set {} is {len} bytes, over a pack's limit",
                ws.end_seq
            )));
        }
        self.pending_bytes += len;
        self.pending.push(ws);
        Ok(self.pending_bytes >= self.pack_bytes)
    }

    /// Uploads the pending write-sets as packs and commits the manifest; returns the
    /// archived sequence.
    pub async fn flush(&mut self) -> Result<u64, StoreError> {
        while !self.pending.is_empty() {
            let n = self.next_pack_len();
            let sets: Vec<WriteSet> = self.pending.drain(..n).collect();
            self.pending_bytes -= sets.iter().map(WriteSet::encoded_len).sum::<usize>();
            self.upload_pack(&sets).await?;
        }
        Ok(self.archived_seq())
    }

    /// How many pending write-sets make the next pack: up to the pack size (at least
    /// one write-set, whatever its size).
    fn next_pack_len(&self) -> usize {
        let mut total = 0;
        for (i, ws) in self.pending.iter().enumerate() {
            total += ws.encoded_len();
            if total >= self.pack_bytes {
                return i + 1;
            }
        }
        self.pending.len()
    }

    async fn upload_pack(&mut self, sets: &[WriteSet]) -> Result<(), StoreError> {
        let e =
            pack::encode(self.epoch, sets, self.level).map_err(|source| StoreError::Format {
                name: "new pack".into(),
                source,
            })?;
        let h = e.header;
        let name = format!(
            "packs/{:08}/{:020}-{:020}.fpk",
            self.epoch, h.first_seq, h.last_seq
        );
        // Compressed, then sealed when encrypted; the manifest pins the stored bytes
        // (so integrity is checkable without the key).
        let stored = self.store.seal(ObjectKind::Pack, &name, e.bytes)?;
        let bytes = stored.len() as u64;
        let sm3 = sm3_hex(&[&stored]);
        self.store.put(&name, stored).await?;
        self.packed.raw += h.raw_len as u64;
        self.packed.stored += bytes;
        let entry = Entry {
            kind: Kind::Pack,
            name,
            epoch: self.epoch,
            first_seq: h.first_seq,
            last_seq: h.last_seq,
            first_ts: h.first_ts,
            last_ts: h.last_ts,
            bytes,
            sm3,
            chain: String::new(),
        };
        self.commit(entry).await
    }

    /// Adds `entry` in a new manifest generation, created only if absent. A generation
    /// a compactor created first ([`crate::compact`]: same epoch, the same packs
    /// reached) is taken as the new base and the entry added to it; any other winner
    /// is another writer, and this one has lost.
    async fn commit(&mut self, entry: Entry) -> Result<(), StoreError> {
        for _ in 0..COMMIT_ATTEMPTS {
            let mut next = self.manifest.clone();
            next.push(entry.clone())
                .map_err(|source| StoreError::Format {
                    name: "manifest".into(),
                    source,
                })?;
            next.generation += 1;
            next.epoch = self.epoch;
            if self
                .store
                .create(&Manifest::object_name(next.generation), next.to_json())
                .await?
                && !self.store.newer_manifest(next.generation).await?
            {
                self.manifest = next;
                return Ok(());
            }
            let lost = StoreError::LostRace {
                generation: next.generation,
            };
            match self.store.latest_manifest().await? {
                Some(m) if self.compacted(&m) => self.manifest = m,
                _ => return Err(lost),
            }
        }
        Err(StoreError::Refused(format!(
            "manifest: {COMMIT_ATTEMPTS} compactions in a row won the race for the next generation"
        )))
    }

    /// Whether `m` is this writer's manifest compacted: same epoch, a newer generation
    /// that reaches exactly the packs this writer committed (compaction merges and
    /// drops entries, never appends).
    fn compacted(&self, m: &Manifest) -> bool {
        m.epoch == self.epoch
            && m.generation > self.manifest.generation
            && m.last_pack_seq() == self.manifest.last_pack_seq()
            && m.cluster == self.manifest.cluster
    }

    /// Uploads `volume` as it is at `seq` (the caller guarantees the reader sees exactly
    /// that point, e.g. a paused replica or a copy-on-write snapshot): unchanged and
    /// zero chunks cost nothing. `read_chunk(i)` returns chunk `i` (short at the end).
    pub async fn upload_base(
        &mut self,
        volume: u32,
        seq: u64,
        timestamp_ns: u64,
        mut read_chunk: impl FnMut(u64) -> std::io::Result<Vec<u8>>,
    ) -> Result<BaseStats, StoreError> {
        let size = self.volume_size(volume)?;
        let held = self.newest_base_chunks(volume).await?;
        let mut stats = BaseStats::default();
        let mut chunks = Vec::with_capacity(Base::chunk_count(size) as usize);
        for i in 0..Base::chunk_count(size) {
            let data = read_chunk(i)?;
            let want = (size - i * CHUNK_SIZE).min(CHUNK_SIZE) as usize;
            if data.len() != want {
                return Err(StoreError::Refused(format!(
                    "chunk {i} of volume {volume}: read {} bytes, expected {want}",
                    data.len()
                )));
            }
            stats.chunks += 1;
            let id = self.store.chunk_id(&data);
            match &id {
                None => stats.zero_chunks += 1,
                Some(id) if held.contains(id) => stats.reused_chunks += 1,
                Some(id) => {
                    stats.uploaded_bytes += self.store.put_chunk(id, &data, self.level).await?
                }
            }
            chunks.push(id);
        }
        let base = Base {
            format: BASE_FORMAT,
            volume,
            size,
            chunk_size: CHUNK_SIZE,
            seq,
            chunks,
        };
        let json = base.to_json();
        let name = Base::object_name(self.epoch, seq, volume);
        let entry = Entry {
            kind: Kind::Base,
            name: name.clone(),
            epoch: self.epoch,
            first_seq: seq,
            last_seq: seq,
            first_ts: timestamp_ns,
            last_ts: timestamp_ns,
            bytes: json.len() as u64,
            sm3: sm3_hex(&[&json]),
            chain: String::new(),
        };
        self.store.put(&name, json).await?;
        self.commit(entry).await?;
        Ok(stats)
    }

    /// The chunk ids of `volume`'s newest base in the manifest: what a new base may
    /// reuse without uploading. Only those: compaction's garbage collection deletes
    /// chunks no kept base names, but never one of the newest base (a base is dropped
    /// only once a newer one is committed), so a reused chunk cannot vanish between
    /// this check and the new base's commit.
    async fn newest_base_chunks(
        &self,
        volume: u32,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let suffix = format!("-{volume}.json");
        let newest = self
            .manifest
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Base && e.name.ends_with(&suffix))
            .max_by_key(|e| e.last_seq);
        let Some(e) = newest else {
            return Ok(Default::default());
        };
        let json = crate::restore::get_checked(&self.store, e).await?;
        let base = Base::from_json(&json).map_err(|source| StoreError::Format {
            name: e.name.clone(),
            source,
        })?;
        Ok(base.chunks.into_iter().flatten().collect())
    }

    fn volume_size(&self, volume: u32) -> Result<u64, StoreError> {
        self.manifest
            .volumes
            .iter()
            .find(|v| v.id == volume)
            .map(|v| v.size)
            .ok_or_else(|| StoreError::Refused(format!("volume {volume} is not in this archive")))
    }
}

fn check_owner(
    m: Manifest,
    cluster: &str,
    volumes: &[Volume],
    epoch: u64,
) -> Result<Manifest, StoreError> {
    if m.cluster != cluster {
        return Err(StoreError::Refused(format!(
            "the archive belongs to cluster {}, not {cluster}",
            m.cluster
        )));
    }
    if m.volumes != volumes {
        return Err(StoreError::Refused(
            "the archive holds other volumes (names, ids or sizes differ)".into(),
        ));
    }
    if m.epoch > epoch {
        return Err(StoreError::Refused(format!(
            "epoch {} archives here; this writer's epoch {epoch} is stale",
            m.epoch
        )));
    }
    Ok(m)
}
