//! Compaction and retention: packs merged into coarser levels, thinned to the
//! retention grid ([`grid`]), packs and bases past the grid dropped, and the objects
//! no manifest needs any more collected ([`gc`]). FORMAT.md, "Compaction".
//!
//! A pass: read the newest manifest, plan which runs of packs move up a level and
//! which entries expire, upload the merged packs ([`prepare`]), then create the next
//! manifest generation only if absent ([`commit`]): a writer or another compactor that
//! got there first makes this one re-read and re-apply its change on top when every
//! pack it merged is still there (a writer only appends), or give up when not
//! (another compactor merged them: its outputs are garbage, collected later). Objects
//! are deleted only by [`gc::collect`], after the manifest that dropped them is
//! durable, and only once older than the grace period: a crash anywhere leaves
//! garbage, never a manifest naming a missing object.
pub mod gc;
pub mod grid;
mod merge;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::format::manifest::{Entry, Kind, Manifest, CHAIN_SEED};
use crate::format::pack::{self, Op, WriteSet};
use crate::format::sealed::ObjectKind;
use crate::format::sm3_hex;
use crate::restore::get_checked;
use crate::store::{ArchiveStore, StoreError};
pub use grid::{Grid, Point, Tier};
use merge::Merger;

/// Default size of a merged pack (uncompressed write-sets).
pub const DEFAULT_PACK_BYTES: usize = 32 << 20;
/// Default grace: a manifest younger than this stays usable by readers, and an
/// unreferenced object younger than this may be an upload about to be committed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Manifest commits retried over writers that won the race.
const COMMIT_ATTEMPTS: usize = 16;

#[derive(Debug, Clone)]
pub struct CompactOptions {
    pub grid: Grid,
    /// zstd level of merged packs.
    pub level: i32,
    /// A merged pack is cut once it holds this many bytes of write-sets.
    pub pack_bytes: usize,
    /// Payload bytes a merge may hold before it must keep a point (bounds memory; a
    /// point kept for it is one more restorable point, never one less).
    pub group_bytes: usize,
    /// Stored bytes of input packs one pass merges at most (bounds a pass's time).
    pub max_input_bytes: u64,
    pub grace: Duration,
}

impl CompactOptions {
    pub fn new(grid: Grid) -> CompactOptions {
        CompactOptions {
            grid,
            level: 3,
            pack_bytes: DEFAULT_PACK_BYTES,
            group_bytes: DEFAULT_PACK_BYTES,
            max_input_bytes: 4 << 30,
            grace: DEFAULT_GRACE,
        }
    }
}

/// What a pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub runs: u64,
    pub packs_in: u64,
    pub packs_out: u64,
    /// Stored bytes read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub sets_in: u64,
    pub sets_out: u64,
    /// Packs and bases past the grid, no longer in the manifest.
    pub dropped: u64,
    pub dropped_bytes: u64,
}

/// One planned merge: consecutive packs of one epoch and level into level `level`.
#[derive(Debug, Clone)]
struct Run {
    level: u8,
    epoch: u64,
    inputs: Vec<Entry>,
}

/// A pass's work, uploaded but not yet in a manifest.
#[derive(Debug)]
pub struct Prepared {
    /// The manifest the pass planned on.
    pub from: Manifest,
    /// `(inputs, outputs)` per run.
    merges: Vec<(Vec<Entry>, Vec<Entry>)>,
    drop: Vec<Entry>,
    pub report: CompactReport,
    started: Instant,
}

impl Prepared {
    /// Whether committing would change anything.
    pub fn is_empty(&self) -> bool {
        self.merges.is_empty() && self.drop.is_empty()
    }

    /// The merged packs' names (uploaded, not yet referenced).
    pub fn outputs(&self) -> impl Iterator<Item = &str> {
        self.merges
            .iter()
            .flat_map(|(_, o)| o.iter().map(|e| e.name.as_str()))
    }
}

/// A whole pass: merge, commit, collect. `now_ns` is the clock the write-sets' times
/// come from (the primary's); the collection compares with the store's modification
/// times, so it uses the wall clock. `Ok(None)`: nothing to do, or another compactor
/// merged the same packs first.
pub async fn compact(
    store: &ArchiveStore,
    opts: &CompactOptions,
    now_ns: u64,
) -> Result<Option<(CompactReport, gc::GcReport)>, StoreError> {
    let Some(p) = prepare(store, opts, now_ns).await? else {
        return Ok(None);
    };
    let report = p.report.clone();
    if commit(store, p, opts.grace).await?.is_none() {
        return Ok(None);
    }
    let collected = gc::collect(store, opts.grace, wall_clock_ns()).await?;
    Ok(Some((report, collected)))
}

/// Now, in ns since the Unix epoch.
pub fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Plans on the newest manifest and uploads the merged packs; `None` when there is
/// nothing to do (or no archive).
pub async fn prepare(
    store: &ArchiveStore,
    opts: &CompactOptions,
    now_ns: u64,
) -> Result<Option<Prepared>, StoreError> {
    let started = Instant::now();
    let Some(m) = store.latest_manifest().await? else {
        return Ok(None);
    };
    let drop = expired(&m, &opts.grid, now_ns);
    let dropped: HashSet<&str> = drop.iter().map(|e| e.name.as_str()).collect();
    let runs = plan_runs(&m, opts, now_ns, &dropped);
    let mut report = CompactReport {
        dropped: drop.len() as u64,
        dropped_bytes: drop.iter().map(|e| e.bytes).sum(),
        ..CompactReport::default()
    };
    let mut merges = Vec::new();
    for run in runs {
        let outputs = merge_run(store, opts, &run, &mut report).await?;
        report.runs += 1;
        merges.push((run.inputs, outputs));
    }
    let p = Prepared {
        from: m,
        merges,
        drop,
        report,
        started,
    };
    Ok((!p.is_empty()).then_some(p))
}

/// Creates the next manifest generation with `p` applied; on a lost race re-applies
/// it to the winner's manifest. `Ok(None)`: the packs it merged are gone (another
/// compactor won): its uploads are left for [`gc::collect`].
pub async fn commit(
    store: &ArchiveStore,
    p: Prepared,
    grace: Duration,
) -> Result<Option<u64>, StoreError> {
    let mut on = p.from.clone();
    for _ in 0..COMMIT_ATTEMPTS {
        // Uploads older than half the grace may be collected before the manifest
        // naming them lands: never commit them.
        // (No grace: the caller knows no other process uploads or reads.)
        if !grace.is_zero() && p.started.elapsed() > grace / 2 {
            return Err(StoreError::Refused(format!(
                "compaction took {:?}, over half the grace period {grace:?}: not committed (its uploads are collected later)",
                p.started.elapsed()
            )));
        }
        let Some(next) = apply(&on, &p.merges, &p.drop)? else {
            return Ok(None);
        };
        // A created generation is ours only if none newer exists (an old number
        // whose holder was collected is a lost race too).
        if store
            .create(&Manifest::object_name(next.generation), next.to_json())
            .await?
            && !store.newer_manifest(next.generation).await?
        {
            return Ok(Some(next.generation));
        }
        match store.latest_manifest().await? {
            Some(m) if m.generation > on.generation => on = m,
            _ => return Ok(None),
        }
    }
    Err(StoreError::Refused(format!(
        "compaction lost the manifest race {COMMIT_ATTEMPTS} times in a row"
    )))
}

/// `m` with every merge's inputs replaced by its outputs and `drop` removed, as the
/// next generation (the chain rebuilt); `None` when an input or dropped entry is no
/// longer in `m` exactly (same name and SM3).
fn apply(
    m: &Manifest,
    merges: &[(Vec<Entry>, Vec<Entry>)],
    drop: &[Entry],
) -> Result<Option<Manifest>, StoreError> {
    let mut first: HashMap<&str, &[Entry]> = HashMap::new();
    let mut gone: HashMap<&str, &str> = HashMap::new();
    for (inputs, outputs) in merges {
        if let Some(i) = inputs.first() {
            first.insert(&i.name, outputs);
        }
        gone.extend(inputs.iter().map(|e| (e.name.as_str(), e.sm3.as_str())));
    }
    gone.extend(drop.iter().map(|e| (e.name.as_str(), e.sm3.as_str())));
    let present = m
        .entries
        .iter()
        .filter(|e| gone.get(e.name.as_str()) == Some(&e.sm3.as_str()))
        .count();
    if present != gone.len() {
        return Ok(None);
    }
    let mut next = Manifest {
        entries: Vec::new(),
        head: CHAIN_SEED.to_string(),
        generation: m.generation + 1,
        ..m.clone()
    };
    let bad = |source| StoreError::Format {
        name: "compacted manifest".into(),
        source,
    };
    for e in &m.entries {
        if let Some(outputs) = first.get(e.name.as_str()) {
            for o in outputs.iter() {
                next.push(o.clone()).map_err(bad)?;
            }
        } else if !gone.contains_key(e.name.as_str()) {
            next.push(e.clone()).map_err(bad)?;
        }
    }
    Ok(Some(next))
}

/// A pack's level, from its name (`…/L<k>/…`; level 0: the uploaded packs).
pub fn level_of(name: &str) -> u8 {
    name.split('/')
        .find_map(|p| p.strip_prefix('L')?.parse().ok())
        .unwrap_or(0)
}

fn volume_of(base: &Entry) -> Option<u32> {
    let stem = base.name.strip_suffix(".json")?;
    stem.rsplit_once('-')?.1.parse().ok()
}

/// Entries past the grid: the oldest packs whose every point is older than the
/// longest horizon, up to the newest base (of every volume) at or before them, and the
/// bases older than that base. The newest pack always stays (it is where the
/// writer continues).
fn expired(m: &Manifest, grid: &Grid, now_ns: u64) -> Vec<Entry> {
    let packs: Vec<&Entry> = m.entries.iter().filter(|e| e.kind == Kind::Pack).collect();
    let old = packs
        .iter()
        .take(packs.len().saturating_sub(1))
        .take_while(|e| e.last_ts.saturating_add(grid.longest()) <= now_ns)
        .map(|e| e.last_seq)
        .max();
    let Some(limit) = old else {
        return Vec::new();
    };
    let bases = m.entries.iter().filter(|e| e.kind == Kind::Base);
    let mut keep_from: HashMap<u32, u64> = HashMap::new();
    for v in &m.volumes {
        let newest = bases
            .clone()
            .filter(|b| volume_of(b) == Some(v.id) && b.last_seq <= limit)
            .map(|b| b.last_seq)
            .max();
        match newest {
            Some(s) => keep_from.insert(v.id, s),
            None => return Vec::new(),
        };
    }
    let floor = keep_from.values().copied().min().unwrap_or(0);
    m.entries
        .iter()
        .filter(|e| match e.kind {
            Kind::Pack => e.last_seq <= floor,
            Kind::Base => volume_of(e)
                .and_then(|v| keep_from.get(&v))
                .is_some_and(|&from| e.last_seq < from),
        })
        .cloned()
        .collect()
}

/// Runs of consecutive packs (one epoch, one level) whose window is complete and
/// older than their level's horizon: they move up one level.
fn plan_runs(
    m: &Manifest,
    opts: &CompactOptions,
    now_ns: u64,
    dropped: &HashSet<&str>,
) -> Vec<Run> {
    let grid = &opts.grid;
    let mut runs: Vec<Run> = Vec::new();
    let mut budget = opts.max_input_bytes;
    let mut open = false;
    for e in m
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Pack && !dropped.contains(e.name.as_str()))
    {
        let from = level_of(&e.name);
        let to = from + 1;
        let due = to <= grid.levels() && {
            let w = grid.window(to);
            let cutoff = now_ns.saturating_sub(grid.horizon(from));
            e.last_ts / w < cutoff / w
        };
        if !due || budget < e.bytes {
            open = false;
            continue;
        }
        budget -= e.bytes;
        match runs.last_mut() {
            Some(r) if open && r.level == to && r.epoch == e.epoch => r.inputs.push(e.clone()),
            _ => runs.push(Run {
                level: to,
                epoch: e.epoch,
                inputs: vec![e.clone()],
            }),
        }
        open = true;
    }
    runs
}

/// A write-set ends with a bookmark: a seal whose label is not internal (`#…`).
fn is_bookmark(ws: &WriteSet) -> bool {
    ws.records
        .iter()
        .any(|r| matches!(&r.op, Op::Seal(l) if !l.starts_with('#')))
}

/// Merges one run into packs of its level: a write-set is kept when it is the last
/// of its period-bucket in the run, a bookmark, the run's last, or when the merge
/// reached its byte bound; the others merge into the next kept one.
async fn merge_run(
    store: &ArchiveStore,
    opts: &CompactOptions,
    run: &Run,
    report: &mut CompactReport,
) -> Result<Vec<Entry>, StoreError> {
    let period = opts.grid.period(run.level);
    let mut merger = Merger::default();
    let mut last: Option<(u64, bool)> = None;
    let mut out = Output::new(run, opts);
    for e in &run.inputs {
        report.packs_in += 1;
        report.bytes_in += e.bytes;
        for ws in pack_sets(store, e).await? {
            report.sets_in += 1;
            let ends_point =
                last.is_some_and(|(ts, mark)| mark || ts / period != ws.timestamp_ns / period);
            let full = merger.bytes() + ws.encoded_len() > opts.group_bytes;
            if !merger.is_empty() && (ends_point || full) {
                out.push(store, merger.emit()).await?;
            }
            merger.add(&ws);
            last = Some((ws.timestamp_ns, is_bookmark(&ws)));
        }
    }
    out.push(store, merger.emit()).await?;
    let outputs = out.finish(store).await?;
    report.packs_out += outputs.len() as u64;
    report.bytes_out += outputs.iter().map(|e| e.bytes).sum::<u64>();
    report.sets_out += out.sets;
    Ok(outputs)
}

/// Merged write-sets gathered into packs: cut at the pack size and at the level's
/// window boundaries.
struct Output {
    epoch: u64,
    level: u8,
    zstd: i32,
    pack_bytes: usize,
    window: u64,
    pending: Vec<WriteSet>,
    pending_bytes: usize,
    done: Vec<Entry>,
    sets: u64,
}

impl Output {
    fn new(run: &Run, opts: &CompactOptions) -> Output {
        Output {
            epoch: run.epoch,
            level: run.level,
            zstd: opts.level,
            pack_bytes: opts.pack_bytes,
            window: opts.grid.window(run.level),
            pending: Vec::new(),
            pending_bytes: 0,
            done: Vec::new(),
            sets: 0,
        }
    }

    async fn push(&mut self, store: &ArchiveStore, ws: Option<WriteSet>) -> Result<(), StoreError> {
        let Some(ws) = ws else { return Ok(()) };
        let len = ws.encoded_len();
        let cut = self.pending.last().is_some_and(|p| {
            self.pending_bytes + len > self.pack_bytes
                || p.timestamp_ns / self.window != ws.timestamp_ns / self.window
        });
        if cut {
            self.upload(store).await?;
        }
        self.sets += 1;
        self.pending_bytes += len;
        self.pending.push(ws);
        Ok(())
    }

    async fn finish(&mut self, store: &ArchiveStore) -> Result<Vec<Entry>, StoreError> {
        self.upload(store).await?;
        Ok(std::mem::take(&mut self.done))
    }

    async fn upload(&mut self, store: &ArchiveStore) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let sets = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let e =
            pack::encode(self.epoch, &sets, self.zstd).map_err(|source| StoreError::Format {
                name: "merged pack".into(),
                source,
            })?;
        let h = e.header;
        let name = format!(
            "packs/{:08}/L{}/{:020}-{:020}-{}.fpk",
            self.epoch,
            self.level,
            h.first_seq,
            h.last_seq,
            unique_token(&e.sm3)
        );
        let stored = store.seal(ObjectKind::Pack, &name, e.bytes)?;
        let entry = Entry {
            kind: Kind::Pack,
            name: name.clone(),
            epoch: self.epoch,
            first_seq: h.first_seq,
            last_seq: h.last_seq,
            first_ts: h.first_ts,
            last_ts: h.last_ts,
            bytes: stored.len() as u64,
            sm3: sm3_hex(&[&stored]),
            chain: String::new(),
        };
        store.put(&name, stored).await?;
        self.done.push(entry);
        Ok(())
    }
}

/// A name part no other compactor produces: merged packs of the same range made by two
/// racing compactors (or sealed twice) differ in bytes, and an object's name must
/// always hold the same bytes.
fn unique_token(sm3: &[u8; 32]) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = wall_clock_ns();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    sm3_hex(&[
        sm3,
        &now.to_le_bytes(),
        &std::process::id().to_le_bytes(),
        &n.to_le_bytes(),
    ])[..16]
        .to_string()
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

/// Every restorable point of `m`'s packs (reads every pack): for `archive list` and
/// tests. Memory: one entry per write-set.
pub async fn points(store: &ArchiveStore, m: &Manifest) -> Result<Vec<Point>, StoreError> {
    let mut out = Vec::new();
    for e in m.entries.iter().filter(|e| e.kind == Kind::Pack) {
        for ws in pack_sets(store, e).await? {
            out.push(Point {
                end_seq: ws.end_seq,
                timestamp_ns: ws.timestamp_ns,
                bookmark: is_bookmark(&ws),
            });
        }
    }
    Ok(out)
}
