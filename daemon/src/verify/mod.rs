//! Online verify: chunk digests of a volume *as it was at one sequence* while writes
//! continue, on the primary and on each standby, compared by the primary.
//!
//! The point is a seal record labelled `#verify …` in the ordered stream, so both
//! sides hash the same image without stopping writes:
//! * A [`Snapshot`] is armed at the seal's sequence `S` (on the primary from the seal's
//!   completion, which runs before any later record's; on a standby when its applier
//!   reaches the seal).
//! * Copy-before-write: before a record after `S` changes a range of a chunk that is
//!   not hashed yet, the bytes it overwrites are saved (the first save of a byte wins:
//!   it holds the byte as of `S`, since earlier overlapping records are applied first).
//! * A hasher thread waits until everything up to `S` is applied, then hashes every
//!   chunk from the base with the saved bytes patched in, under the same lock that
//!   writers take, so a chunk is never hashed half-changed.
//!
//! Saved bytes are bounded ([`MAX_SAVED`]): a verify under a write load that would
//! exceed it fails with that reason instead of growing without limit.
//!
//! The digest (xxh3 or SM3) is the node's `[verify] digest` ([`set_digest`] at start,
//! [`node_digest`]): the primary puts it in the `#verify` label and in the resync's digest
//! request; a standby whose own setting differs answers with an error naming both
//! ([`check_digest`]) instead of hashing, so a cluster that must compare with SM3 never
//! silently compares with xxh3.
pub mod chunks;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ferry_journal::Seq;
use parking_lot::{Mutex, RwLock};

use crate::store::base::Base;
use crate::verify::chunks::{digest, ChunkDigest, ChunkHash, ChunkList, HashParams};

/// Bytes of before-images a verify may hold in memory.
pub const MAX_SAVED: u64 = 256 << 20;
/// Prefix of the seal label that carries a verify request in the stream.
pub const LABEL_PREFIX: &str = "#verify ";
/// At most this many chunks per volume (the digest list must fit one frame).
const MAX_CHUNKS: u64 = 1 << 16;

/// The node's `[verify] digest`: 1 = xxh3, 2 = SM3 ([`ChunkHash::id`]). One per
/// process (a ferryd runs one node), set once at start from the config.
static DIGEST: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

/// Sets the node's digest (at start, from [`ferry_api::config::Config::verify_digest`]).
pub fn set_digest(algo: ChunkHash) {
    DIGEST.store(algo.id(), Ordering::Relaxed);
}

/// The digest this node compares with.
pub fn node_digest() -> ChunkHash {
    ChunkHash::from_id(DIGEST.load(Ordering::Relaxed)).unwrap_or(ChunkHash::Xxh3)
}

/// Whether a comparison the primary asked for uses this node's digest; the error says
/// both and what to do.
pub fn check_digest(requested: ChunkHash) -> Result<(), String> {
    digest_refusal(node_digest(), requested)
}

fn digest_refusal(mine: ChunkHash, requested: ChunkHash) -> Result<(), String> {
    if requested == mine {
        return Ok(());
    }
    Err(format!(
        "digest mismatch: the primary compares with {}, this node's [verify] digest is {}: set the same [verify] digest on every node of the cluster",
        requested.name(),
        mine.name()
    ))
}

/// What a verify compares: the id, the hash parameters and the volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub params: HashParams,
    /// Volume ids; empty = every volume.
    pub volumes: Vec<u32>,
}

impl Request {
    /// Chunk size for a volume of `size` bytes: at least 64 KiB, and few enough chunks
    /// that one volume's digests fit one frame.
    pub fn chunk_size_for(size: u64) -> u64 {
        (size.div_ceil(MAX_CHUNKS))
            .next_power_of_two()
            .max(crate::verify::chunks::DEFAULT_CHUNK_SIZE)
    }

    /// The seal label: `#verify <id> <algo> <chunk_size> <seed> <vol,vol,…|*>`.
    pub fn label(&self) -> String {
        let vols = if self.volumes.is_empty() {
            "*".to_string()
        } else {
            self.volumes
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "{LABEL_PREFIX}{} {} {} {} {vols}",
            self.id,
            self.params.algo.id(),
            self.params.chunk_size,
            self.params.seed
        )
    }

    pub fn parse(label: &str) -> anyhow::Result<Request> {
        let rest = label
            .strip_prefix(LABEL_PREFIX)
            .ok_or_else(|| anyhow!("not a verify label"))?;
        let f: Vec<&str> = rest.split(' ').collect();
        let [id, algo, chunk, seed, vols] = f.as_slice() else {
            bail!("verify label {label:?}: expected 5 fields");
        };
        let num = |s: &str, what: &str| {
            s.parse::<u64>()
                .map_err(|_| anyhow!("verify label {label:?}: bad {what}"))
        };
        let algo = u8::try_from(num(algo, "algorithm")?)
            .ok()
            .and_then(ChunkHash::from_id)
            .ok_or_else(|| anyhow!("verify label {label:?}: unknown algorithm"))?;
        let volumes = if *vols == "*" {
            Vec::new()
        } else {
            vols.split(',')
                .map(|v| {
                    v.parse::<u32>()
                        .map_err(|_| anyhow!("verify label {label:?}: bad volume"))
                })
                .collect::<anyhow::Result<_>>()?
        };
        Ok(Request {
            id: num(id, "id")?,
            params: HashParams {
                algo,
                chunk_size: num(chunk, "chunk size")?,
                seed: num(seed, "seed")?,
            },
            volumes,
        })
    }
}

/// One volume's hashing state.
struct VolState {
    base: Arc<Base>,
    inner: Mutex<VolInner>,
}

#[derive(Default)]
struct VolInner {
    hashed: Vec<Option<ChunkDigest>>,
    /// Saved before-images: start → bytes (non-overlapping).
    saved: BTreeMap<u64, Vec<u8>>,
}

/// A verify armed at one sequence on one node.
pub struct Snapshot {
    pub req: Request,
    /// `u64::MAX` until armed (nothing is saved before that).
    seq: AtomicU64,
    vols: Vec<VolState>,
    saved_bytes: AtomicU64,
    /// [`MAX_SAVED`] (smaller in tests).
    max_saved: u64,
    failed: Mutex<Option<String>>,
}

impl Snapshot {
    pub fn new(req: Request, bases: &[Arc<Base>]) -> anyhow::Result<Arc<Snapshot>> {
        let mut vols = Vec::new();
        for b in bases {
            if !req.volumes.is_empty() && !req.volumes.contains(&b.id) {
                continue;
            }
            let n = b.size.div_ceil(req.params.chunk_size);
            if n > MAX_CHUNKS * 2 {
                bail!(
                    "volume '{}': chunk size {} gives {n} chunks (at most {})",
                    b.name,
                    req.params.chunk_size,
                    MAX_CHUNKS * 2
                );
            }
            vols.push(VolState {
                base: b.clone(),
                inner: Mutex::new(VolInner {
                    hashed: vec![None; n as usize],
                    saved: BTreeMap::new(),
                }),
            });
        }
        if vols.is_empty() {
            bail!("no volume to verify");
        }
        Ok(Arc::new(Snapshot {
            req,
            seq: AtomicU64::new(u64::MAX),
            vols,
            saved_bytes: AtomicU64::new(0),
            max_saved: MAX_SAVED,
            failed: Mutex::new(None),
        }))
    }

    /// Fixes the point: the image right after `seq`.
    pub fn arm(&self, seq: Seq) {
        self.seq.store(seq, Ordering::Release);
    }

    pub fn seq(&self) -> Option<Seq> {
        let s = self.seq.load(Ordering::Acquire);
        (s != u64::MAX).then_some(s)
    }

    fn fail(&self, why: String) {
        let mut f = self.failed.lock();
        if f.is_none() {
            tracing::warn!(id = self.req.id, "verify: {why}");
            *f = Some(why);
        }
    }

    /// Called before record `seq` changes `[offset, offset + len)` of `base`.
    fn before_write(&self, seq: Seq, base: &Base, offset: u64, len: u64) {
        if seq <= self.seq.load(Ordering::Acquire) || len == 0 {
            return;
        }
        let Some(v) = self.vols.iter().find(|v| v.base.id == base.id) else {
            return;
        };
        let cs = self.req.params.chunk_size;
        let end = (offset + len).min(v.base.size);
        let mut g = v.inner.lock();
        let mut at = offset;
        while at < end {
            let chunk = at / cs;
            let chunk_end = ((chunk + 1) * cs).min(end);
            let unhashed = g.hashed.get(chunk as usize).is_some_and(|d| d.is_none());
            if unhashed {
                // Save the parts of this piece not saved yet (first save wins).
                let mut gaps = Vec::new();
                let mut cursor = at;
                if let Some((&s, b)) = g.saved.range(..=at).next_back() {
                    cursor = cursor.max(s + b.len() as u64);
                }
                for (&s, b) in g.saved.range(at..chunk_end) {
                    if s > cursor {
                        gaps.push((cursor, s));
                    }
                    cursor = cursor.max(s + b.len() as u64);
                }
                if cursor < chunk_end {
                    gaps.push((cursor, chunk_end));
                }
                for (s, e) in gaps {
                    let n = e - s;
                    if self.saved_bytes.fetch_add(n, Ordering::Relaxed) + n > self.max_saved {
                        drop(g);
                        self.fail(format!(
                            "more than {} bytes overwritten during the verify; retry when writes are lighter",
                            self.max_saved
                        ));
                        return;
                    }
                    let mut buf = vec![0u8; n as usize];
                    if let Err(e) = base.file.read_exact_at(&mut buf, s) {
                        drop(g);
                        self.fail(format!("reading {} at {s}: {e}", base.path.display()));
                        return;
                    }
                    g.saved.insert(s, buf);
                }
            }
            at = chunk_end;
        }
    }

    /// Hashes every chunk as of the armed sequence. `applied` must report the
    /// node's applied position; waits (bounded) until it reaches the point.
    pub fn hash_all(
        &self,
        applied: impl Fn() -> Seq,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(u32, ChunkList)>> {
        self.wait_applied(applied, timeout)?;
        let p = self.req.params;
        let mut out = Vec::new();
        for v in &self.vols {
            let n = v.inner.lock().hashed.len();
            let mut buf = vec![0u8; p.chunk_size as usize];
            for i in 0..n {
                let start = i as u64 * p.chunk_size;
                let len = p.chunk_size.min(v.base.size - start) as usize;
                self.take_chunk(v, i, &mut buf[..len], |b| {
                    if b.iter().all(|&x| x == 0) {
                        ChunkDigest::Zero
                    } else {
                        ChunkDigest::Data(digest(p.algo, p.seed, b))
                    }
                })?;
            }
            let digests = v
                .inner
                .lock()
                .hashed
                .iter()
                .map(|d| d.unwrap_or(ChunkDigest::Zero))
                .collect();
            out.push((
                v.base.id,
                ChunkList {
                    params: p,
                    offset: 0,
                    len: v.base.size,
                    digests,
                },
            ));
        }
        Ok(out)
    }

    /// Waits (bounded) until the point is armed and applied (`applied` reports the
    /// node's applied position).
    pub fn wait_applied(&self, applied: impl Fn() -> Seq, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.seq() {
                if applied() >= s {
                    return Ok(());
                }
            }
            if let Some(f) = self.failed.lock().clone() {
                bail!("{f}");
            }
            if Instant::now() > deadline {
                bail!("the snapshot point was not applied within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Chunk `i` (of the request's chunk size) of volume `volume` as of the point,
    /// for a copy of the image (the archive's base); call after
    /// [`wait_applied`](Self::wait_applied), each chunk once: its saved bytes are dropped.
    pub fn read_chunk(&self, volume: u32, i: usize) -> anyhow::Result<Vec<u8>> {
        let v = self
            .vols
            .iter()
            .find(|v| v.base.id == volume)
            .ok_or_else(|| anyhow!("volume {volume} is not in this snapshot"))?;
        let cs = self.req.params.chunk_size;
        let start = i as u64 * cs;
        if start >= v.base.size {
            bail!("chunk {i} is past the end of volume {volume}");
        }
        let mut buf = vec![0u8; cs.min(v.base.size - start) as usize];
        // The digest slot only marks the chunk done (no later save needed).
        self.take_chunk(v, i, &mut buf, |_| ChunkDigest::Zero)?;
        Ok(buf)
    }

    /// Reads chunk `i` of `v` as of the point into `b` (the base's bytes with the
    /// saved before-images patched in, under the lock writers take, so a chunk is
    /// never read half-changed), records `done(b)` for it and drops its saved bytes.
    fn take_chunk(
        &self,
        v: &VolState,
        i: usize,
        b: &mut [u8],
        done: impl FnOnce(&[u8]) -> ChunkDigest,
    ) -> anyhow::Result<()> {
        if let Some(f) = self.failed.lock().clone() {
            bail!("{f}");
        }
        let start = i as u64 * self.req.params.chunk_size;
        let mut g = v.inner.lock();
        v.base
            .file
            .read_exact_at(b, start)
            .map_err(|e| anyhow!("reading {} at {start}: {e}", v.base.path.display()))?;
        // Patch in the bytes as of the point.
        let end = start + b.len() as u64;
        let first = g.saved.range(..start).next_back().map(|(&s, _)| s);
        let keys: Vec<u64> = first
            .into_iter()
            .chain(g.saved.range(start..end).map(|(&s, _)| s))
            .collect();
        for s in keys {
            let data = &g.saved[&s];
            let (ps, pe) = (s.max(start), (s + data.len() as u64).min(end));
            if ps < pe {
                b[(ps - start) as usize..(pe - start) as usize]
                    .copy_from_slice(&data[(ps - s) as usize..(pe - s) as usize]);
            }
        }
        g.hashed[i] = Some(done(b));
        // This chunk's saved bytes are no longer needed.
        let drop_keys: Vec<u64> = g.saved.range(start..end).map(|(&s, _)| s).collect();
        for k in drop_keys {
            if let Some(b) = g.saved.remove(&k) {
                self.saved_bytes
                    .fetch_sub(b.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// The verifies armed on a node, consulted before every base write.
#[derive(Default)]
pub struct Verifier {
    active: RwLock<Vec<Arc<Snapshot>>>,
}

impl Verifier {
    /// Called before record `seq` changes a base; cheap when nothing is armed.
    pub fn before_write(&self, seq: Seq, base: &Base, offset: u64, len: u64) {
        let active = self.active.read();
        for s in active.iter() {
            s.before_write(seq, base, offset, len);
        }
    }

    /// No verify running (so no write needs a before-image saved).
    pub fn is_idle(&self) -> bool {
        self.active.read().is_empty()
    }

    pub fn add(&self, s: Arc<Snapshot>) {
        self.active.write().push(s);
    }

    pub fn remove(&self, id: u64) {
        self.active.write().retain(|s| s.req.id != id);
    }
}

/// A standby's verify answer for one volume: encoded digests, or why not.
#[derive(Debug)]
pub struct Outcome {
    pub id: u64,
    pub volume: u32,
    pub result: Result<Vec<u8>, String>,
}

/// Where a standby's hasher threads leave their answers for the replication session
/// (one session at a time holds the receiver).
pub struct Outbox {
    pub tx: tokio::sync::mpsc::Sender<Outcome>,
    pub rx: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Outcome>>,
}

impl Default for Outbox {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        Outbox {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

/// Standby side: the applier reached a verify seal at `seq`. Arms a snapshot there
/// and hashes it on a thread of its own; answers land in `outbox`.
pub fn start_on_standby(
    label: &str,
    seq: Seq,
    bases: &[Arc<Base>],
    verifier: &Arc<Verifier>,
    applied: Arc<AtomicU64>,
    outbox: Arc<Outbox>,
) {
    let req = match Request::parse(label) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(seq, "ignoring a malformed verify request: {e:#}");
            return;
        }
    };
    let id = req.id;
    let vols = req.volumes.clone();
    if let Err(e) = check_digest(req.params.algo) {
        tracing::warn!(id, "verify refused: {e}");
        // One answer per volume the primary waits for.
        for b in bases
            .iter()
            .filter(|b| vols.is_empty() || vols.contains(&b.id))
        {
            let _ = outbox.tx.try_send(Outcome {
                id,
                volume: b.id,
                result: Err(e.clone()),
            });
        }
        return;
    }
    let snap = match Snapshot::new(req, bases) {
        Ok(s) => s,
        Err(e) => {
            let _ = outbox.tx.try_send(Outcome {
                id,
                volume: vols.first().copied().unwrap_or(0),
                result: Err(format!("{e:#}")),
            });
            return;
        }
    };
    snap.arm(seq);
    verifier.add(snap.clone());
    let verifier = verifier.clone();
    let spawned = std::thread::Builder::new()
        .name("ferry-verify".into())
        .spawn(move || {
            let r = snap.hash_all(|| applied.load(Ordering::Acquire), Duration::from_secs(600));
            verifier.remove(id);
            match r {
                Ok(lists) => {
                    for (volume, list) in lists {
                        let _ = outbox.tx.blocking_send(Outcome {
                            id,
                            volume,
                            result: Ok(list.encode()),
                        });
                    }
                }
                Err(e) => {
                    for v in &snap.vols {
                        let _ = outbox.tx.blocking_send(Outcome {
                            id,
                            volume: v.base.id,
                            result: Err(format!("{e:#}")),
                        });
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("verify: cannot start the hasher thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_journal::Op;

    #[test]
    fn a_digest_other_than_the_nodes_is_refused_naming_both() {
        assert!(digest_refusal(ChunkHash::Sm3, ChunkHash::Sm3).is_ok());
        assert!(digest_refusal(ChunkHash::Xxh3, ChunkHash::Xxh3).is_ok());
        assert_eq!(
            digest_refusal(ChunkHash::Sm3, ChunkHash::Xxh3).unwrap_err(),
            "digest mismatch: the primary compares with xxh3, this node's [verify] digest is sm3: set the same [verify] digest on every node of the cluster"
        );
        assert_eq!(
            ChunkHash::from(ferry_api::config::DigestKind::Sm3),
            ChunkHash::Sm3
        );
    }

    #[test]
    fn labels_round_trip_and_refuse_garbage() {
        let r = Request {
            id: 7,
            params: HashParams {
                algo: ChunkHash::Xxh3,
                chunk_size: 65536,
                seed: 99,
            },
            volumes: vec![0, 3],
        };
        assert_eq!(Request::parse(&r.label()).unwrap(), r);
        let all = Request {
            volumes: vec![],
            ..r.clone()
        };
        assert_eq!(Request::parse(&all.label()).unwrap(), all);
        assert!(r.label().len() <= 256);
        for bad in [
            "#verify 1 2",
            "#verify x 1 65536 9 *",
            "#verify 1 77 65536 9 *",
            "bookmark",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Request::chunk_size_for(1 << 30), 65536);
        assert_eq!(Request::chunk_size_for(1 << 40), 16 << 20);
    }

    /// Writes after the point change the base but not the digests of the point.
    #[test]
    fn digests_are_of_the_point_despite_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let size = 1u64 << 20;
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let base = Arc::new(Base::open(0, "v", &path, size).unwrap());
        base.apply(Op::Write, 0, 200_000, &vec![5u8; 200_000])
            .unwrap();
        let params = HashParams {
            algo: ChunkHash::Xxh3,
            chunk_size: 65536,
            seed: 1,
        };
        let expected = crate::verify::chunks::hash_chunks(&base.file, size, params).unwrap();
        let v = Verifier::default();
        let snap = Snapshot::new(
            Request {
                id: 1,
                params,
                volumes: vec![],
            },
            std::slice::from_ref(&base),
        )
        .unwrap();
        v.add(snap.clone());
        // A record before the arm point is part of the image (nothing saved).
        snap.arm(10);
        v.before_write(10, &base, 0, 10);
        // Records after it: saved first, then applied.
        for (seq, off, len, fill) in [
            (11u64, 1000u64, 70_000u64, 9u8),
            (12, 1500, 10, 8),
            (13, 900_000, 5000, 7),
        ] {
            v.before_write(seq, &base, off, len);
            base.apply(Op::Write, off, len as u32, &vec![fill; len as usize])
                .unwrap();
        }
        let got = snap.hash_all(|| 13, Duration::from_secs(5)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.digests, expected.digests);
        // Once hashed, later writes save nothing.
        v.before_write(14, &base, 0, 4096);
        assert_eq!(snap.saved_bytes.load(Ordering::Relaxed), 0);
        v.remove(1);
    }

    /// Past its memory bound a verify fails and says why; writes are not affected.
    #[test]
    fn too_many_overwritten_bytes_fail_the_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let base = Arc::new(Base::open(0, "v", &path, 1 << 20).unwrap());
        let params = HashParams {
            algo: ChunkHash::Xxh3,
            chunk_size: 65536,
            seed: 1,
        };
        let mut snap = Snapshot::new(
            Request {
                id: 2,
                params,
                volumes: vec![],
            },
            std::slice::from_ref(&base),
        )
        .unwrap();
        Arc::get_mut(&mut snap).unwrap().max_saved = 8192;
        snap.arm(5);
        snap.before_write(6, &base, 0, 4096);
        snap.before_write(7, &base, 65536, 8192);
        base.apply(Op::Write, 65536, 8192, &[1; 8192]).unwrap();
        let err = snap.hash_all(|| 7, Duration::from_secs(5)).unwrap_err();
        assert!(
            err.to_string().contains("more than 8192 bytes overwritten"),
            "{err}"
        );
    }
}
