//! One archive target's loop: open the archive, make sure it has a base every later
//! pack can start from, then stream write-sets from the journal into packs. Errors
//! other than "another primary archives here" (or a refusal of the archive) retry
//! the whole session with backoff, from what the archive holds durably: nothing in
//! memory is trusted across a session.
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ferry_archive::compact::{self, CompactOptions, Grid};
use ferry_archive::format::base::CHUNK_SIZE;
use ferry_archive::format::manifest::{Kind, Manifest, Volume};
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::{ArchiveStore, StoreError};
use ferry_journal::{now_ns, Journal, Seq};
use ferry_proto::wire::{self, RecordOp};
use tokio::sync::watch;

use crate::archive::ArchiveState;
use crate::primary::volume::Group;
use crate::ship::feed::{DurableSeq, Tail};
use crate::ship::reader::{ReaderThread, ShipSource};
use crate::store::base::Base;
use crate::verify::chunks::HashParams;
use crate::verify::{Request, Snapshot};

/// Write-sets formed ahead of the uploads.
const READ_AHEAD: usize = 16;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Prefix of the seal that marks a base image's point (not a `#verify ` label, so a
/// standby treats it as a plain seal).
const BASE_LABEL: &str = "#archive-base ";

/// What every archive target of the primary works from.
pub struct ArchiveContext {
    /// The cluster id (hex), the archive's owner.
    pub cluster: String,
    pub epoch: u64,
    /// Where this primary forked from its old primary (a primary by promotion).
    pub fork: Option<Seq>,
    pub journal: Arc<Journal>,
    pub bases: Vec<Arc<Base>>,
    pub group: Arc<Group>,
    pub tail: Arc<Tail>,
    pub durable: Arc<DurableSeq>,
    /// The node's `[encryption]` key: the archive's packs and chunks are sealed with
    /// it (archive/FORMAT.md, "Encryption").
    pub kek: Option<ferry_gm::atrest::Kek>,
}

impl ArchiveContext {
    fn volumes(&self) -> Vec<Volume> {
        self.bases
            .iter()
            .map(|b| Volume {
                id: b.id,
                name: b.name.clone(),
                size: b.size,
            })
            .collect()
    }
}

/// Starts one task per archive target; each ends when `shutdown` turns true.
pub fn start(
    ctx: Arc<ArchiveContext>,
    targets: &[Arc<ArchiveState>],
    shutdown: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    targets
        .iter()
        .map(|t| {
            let (ctx, t, mut stop) = (ctx.clone(), t.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = run_target(ctx, t.clone()) => {}
                    // Not "stopped": the journal stays held for the next start.
                    _ = stop.wait_for(|s| *s) => t.set_phase("shutting-down", None),
                }
            })
        })
        .collect()
}

/// Sessions until a fatal error: a lost manifest race or a refusal means another
/// (newer) primary owns the archive, or it is not this cluster's; retrying would not
/// change that, so the target stops and says why.
async fn run_target(ctx: Arc<ArchiveContext>, t: Arc<ArchiveState>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let Err(e) = session(&ctx, &t).await;
        let why = format!("{e:#}");
        if is_fatal(&e) {
            tracing::error!(target = %t.name, url = %t.url, "archive target stopped: {why}");
            t.set_phase("stopped", Some(why));
            return;
        }
        tracing::warn!(target = %t.name, url = %t.url, "archive: {why}; retrying in {backoff:?}");
        t.set_phase("retrying", Some(why));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn is_fatal(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<StoreError>(),
        Some(
            StoreError::LostRace { .. }
                | StoreError::Refused(_)
                | StoreError::KeyNeeded(_)
                | StoreError::WrongKey { .. }
                | StoreError::NotEncrypted(_)
        )
    )
}

/// One session: open, base if needed, then stream until an error.
async fn session(
    ctx: &ArchiveContext,
    t: &ArchiveState,
) -> anyhow::Result<std::convert::Infallible> {
    let store =
        ArchiveStore::open_locked(&t.url, t.policy.object_lock_days)?.with_kek(ctx.kek.clone());
    let mut w = ArchiveWriter::open(store.clone(), &ctx.cluster, ctx.volumes(), ctx.epoch).await?;
    // Ends with the session (dropped): a new session starts a new one.
    let _compactor = t
        .policy
        .retention
        .clone()
        .map(|g| Compactor::spawn(store, g, t.name.clone()));
    // Reachable again: hold the journal from what the archive holds (after an
    // overflow the gap check below finds the journal released and takes a new base).
    t.hold_again();
    t.new_session();
    t.note_archive(w.manifest(), w.packed());
    let ids: Vec<u32> = ctx.bases.iter().map(|b| b.id).collect();
    let mut at = held_point(w.manifest(), &ids, ctx.journal.first_available_seq());
    check_history(w.manifest().epoch, ctx.epoch, ctx.fork, at)?;
    if at.is_none() || at.is_some_and(|a| ctx.journal.first_available_seq() > a + 1) {
        t.set_phase("base", None);
        let (seq, ts, bytes) = upload_bases(ctx, &mut w, &t.name).await?;
        t.add_uploaded(bytes);
        t.set_archived(seq, ts);
        t.note_archive(w.manifest(), w.packed());
        at = Some(seq);
    }
    let from = at.unwrap_or(0);
    if from > ctx.journal.durable_seq() {
        return Err(StoreError::Refused(format!(
            "the archive holds sequence {from}, past this primary's journal ({}): it holds another history",
            ctx.journal.durable_seq()
        ))
        .into());
    }
    t.set_archived(from, newest_ts(w.manifest()));
    t.set_phase("archiving", None);
    let src = ShipSource {
        journal: ctx.journal.clone(),
        tail: ctx.tail.clone(),
        // The archive holds this history: never a record a crash could still lose.
        upto: ctx.durable.clone(),
        durable: ctx.durable.clone(),
        linger: Duration::ZERO,
    };
    let reader = ReaderThread::spawn(
        &format!("archive-{}", t.name),
        src,
        from + 1,
        ctx.epoch,
        READ_AHEAD,
    )?;
    stream(ctx, t, &mut w, reader).await
}

/// Write-sets in, packs out: a pack when the writer says one is due, and at least
/// every `flush_interval` while write-sets wait; a new base when `base_interval`
/// has passed since the newest one.
async fn stream(
    ctx: &ArchiveContext,
    t: &ArchiveState,
    w: &mut ArchiveWriter,
    mut reader: ReaderThread,
) -> anyhow::Result<std::convert::Infallible> {
    let mut tick = tokio::time::interval(t.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (due, base) = tokio::select! {
            ws = reader.recv() => {
                let ws = ws.ok_or_else(|| anyhow!("the journal reader stopped"))??;
                (w.push(pack_write_set(ws))?, false)
            }
            _ = tick.tick() => (w.pushed_seq() > w.archived_seq(), base_due(t, w.manifest())),
        };
        if due || base {
            flush(t, w).await?;
        }
        if base {
            t.set_phase("base", None);
            let (seq, ts, bytes) = upload_bases(ctx, w, &t.name).await?;
            t.add_uploaded(bytes);
            t.note_archive(w.manifest(), w.packed());
            tracing::info!(target = %t.name, seq, ts, bytes, "archive: periodic base image committed");
            t.set_phase("archiving", None);
        }
    }
}

/// Whether `base_interval` has passed since the newest base (by the primary's clock,
/// the one base times are taken with).
fn base_due(t: &ArchiveState, m: &Manifest) -> bool {
    let Some(every) = t.policy.base_interval else {
        return false;
    };
    let newest = m
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Base)
        .map(|e| e.last_ts)
        .max()
        .unwrap_or(0);
    now_ns().saturating_sub(newest) >= every.as_nanos() as u64
}

/// The compaction task of one session: a pass every [`compact_every`] of the grid;
/// a failed pass is logged and retried at the next (it leaves garbage at worst).
/// Aborted when dropped.
struct Compactor(tokio::task::JoinHandle<()>);

impl Compactor {
    fn spawn(store: ArchiveStore, grid: Grid, name: String) -> Compactor {
        let every = compact_every(&grid);
        let opts = CompactOptions::new(grid);
        Compactor(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match compact::compact(&store, &opts, now_ns()).await {
                    Ok(Some((r, g))) => tracing::info!(
                        target = %name, runs = r.runs, packs_in = r.packs_in, packs_out = r.packs_out,
                        bytes_in = r.bytes_in, bytes_out = r.bytes_out, sets_in = r.sets_in,
                        sets_out = r.sets_out, dropped = r.dropped, deleted = g.deleted,
                        deleted_bytes = g.deleted_bytes, locked = g.locked,
                        "archive: compacted"
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(target = %name, "archive compaction: {e}"),
                }
            }
        }))
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often compaction looks: half the finest horizon or period, within 1 s .. 60 s.
fn compact_every(g: &Grid) -> Duration {
    let finest = match g.horizon(0) {
        0 => g.period(1),
        h => h.min(g.period(1)),
    };
    Duration::from_nanos(finest / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

async fn flush(t: &ArchiveState, w: &mut ArchiveWriter) -> anyhow::Result<()> {
    // By the writer's own count: a compaction may have rewritten the manifest's
    // entries under it, so the entries added are not the tail any more.
    let before = w.packed().stored;
    let seq = w.flush().await?;
    t.add_uploaded(w.packed().stored.saturating_sub(before));
    t.set_archived(seq, newest_ts(w.manifest()));
    t.note_archive(w.manifest(), w.packed());
    Ok(())
}

/// After a failover the archive may hold the old primary's write-sets past the fork:
/// records this primary never had, at sequences it reuses. Continuing would skip its
/// own write-sets up to there (a resend is skipped by sequence) and mix the two
/// histories in restores, so the target stops and says so.
fn check_history(
    archive_epoch: u64,
    epoch: u64,
    fork: Option<Seq>,
    held: Option<Seq>,
) -> Result<(), StoreError> {
    match (fork, held) {
        (Some(fork), Some(held)) if archive_epoch < epoch && held > fork => {
            Err(StoreError::Refused(format!(
                "the archive holds the old primary's write-sets through sequence {held}, past this primary's fork at {fork}: archive to a new URL"
            )))
        }
        _ => Ok(()),
    }
}

/// What the archive holds for this primary to continue from: its newest pack's end,
/// or its newest base if later; `None` while a volume has no base at all. A periodic
/// base committed before the packs reached it (a crash right after it) continues
/// from the packs while the journal (first available: `journal_first`) still holds
/// what follows them, so no point between them goes missing.
fn held_point(m: &Manifest, volumes: &[u32], journal_first: Seq) -> Option<Seq> {
    let bases = m.entries.iter().filter(|e| e.kind == Kind::Base);
    let (mut newest_base, mut packs_reachable) = (0, true);
    let packs = m.last_pack_seq();
    for id in volumes {
        let suffix = format!("-{id}.json");
        let of_volume = bases.clone().filter(|e| e.name.ends_with(&suffix));
        let seq = of_volume.clone().map(|e| e.last_seq).max()?;
        newest_base = newest_base.max(seq);
        packs_reachable &= of_volume.clone().any(|e| e.last_seq <= packs);
    }
    if packs > 0 && packs < newest_base && packs_reachable && journal_first <= packs + 1 {
        return Some(packs);
    }
    Some(packs.max(newest_base))
}

fn newest_ts(m: &Manifest) -> u64 {
    m.entries.iter().map(|e| e.last_ts).max().unwrap_or(0)
}

/// Uploads every volume as it is at one sealed point `S`, without stopping writes:
/// the copy-before-write snapshot that online verify uses (armed by the seal's journal
/// completion, which runs before any later record is applied; the bytes a later
/// record overwrites are saved first, bounded by `verify::MAX_SAVED`). A base at the
/// checkpoint would need the applier held for the whole upload; one taken while
/// writes are paused would stall clients for as long. `S` is a write-set boundary
/// (a seal), so the packs continue exactly after it. Returns `(S, time, bytes)`.
async fn upload_bases(
    ctx: &ArchiveContext,
    w: &mut ArchiveWriter,
    name: &str,
) -> anyhow::Result<(Seq, u64, u64)> {
    let params = HashParams {
        chunk_size: CHUNK_SIZE,
        ..HashParams::random_xxh3()?
    };
    let req = Request {
        id: params.seed,
        params,
        volumes: Vec::new(),
    };
    let snap = Snapshot::new(req, &ctx.bases)?;
    ctx.group.gate.verify.add(snap.clone());
    let result = async {
        let arm = snap.clone();
        let label = format!("{BASE_LABEL}{name}");
        let seq = ctx
            .group
            .seal_then(
                bytes::Bytes::from(label.into_bytes()),
                Some(Box::new(move |s| arm.arm(s))),
            )
            .map_err(|e| anyhow!("sealing the base point: {e}"))?
            .ok_or_else(|| anyhow!("the base point was not journaled"))?;
        let (waiting, gate) = (snap.clone(), ctx.group.gate.clone());
        tokio::task::spawn_blocking(move || {
            waiting.wait_applied(|| gate.applied_seq(), Duration::from_secs(600))
        })
        .await??;
        let ts = now_ns();
        let mut bytes = 0;
        for b in &ctx.bases {
            let s = snap.clone();
            let id = b.id;
            let stats = w
                .upload_base(id, seq, ts, move |i| {
                    tokio::task::block_in_place(|| s.read_chunk(id, i as usize))
                        .map_err(std::io::Error::other)
                })
                .await
                .with_context(|| format!("base image of volume '{}'", b.name))?;
            bytes += stats.uploaded_bytes;
            tracing::info!(volume = %b.name, seq, chunks = stats.chunks, zero = stats.zero_chunks, reused = stats.reused_chunks, uploaded = stats.uploaded_bytes, "archive: base image uploaded");
        }
        Ok::<_, anyhow::Error>((seq, ts, bytes))
    }
    .await;
    ctx.group.gate.verify.remove(snap.req.id);
    result
}

/// The archive's write-set of a shipped one: same records, same boundary and time.
pub(crate) fn pack_write_set(ws: wire::WriteSet) -> WriteSet {
    let records = ws
        .records
        .into_iter()
        .map(|r| {
            let (op, len) = match r.op {
                RecordOp::Write => (Op::Write(r.data), r.length),
                RecordOp::Trim => (Op::Trim, r.length),
                RecordOp::WriteZeroes => (Op::Zero, r.length),
                RecordOp::Seal => {
                    let label = String::from_utf8_lossy(&r.data).into_owned();
                    let len = label.len() as u32;
                    (Op::Seal(label), len)
                }
            };
            Record {
                seq: r.seq,
                volume: r.volume,
                offset: r.offset,
                len,
                op,
            }
        })
        .collect();
    WriteSet {
        end_seq: ws.last_seq,
        timestamp_ns: ws.timestamp_ns,
        records,
    }
}

/// Starts the primary's archive targets (none configured: nothing). The journal
/// feed's in-memory tail is turned on so a current archive reads from memory.
#[allow(clippy::too_many_arguments)]
pub fn start_on_primary(
    cfg: &ferry_api::config::Config,
    epoch: u64,
    fork: Option<Seq>,
    journal: &Arc<Journal>,
    bases: &[Arc<Base>],
    group: &Arc<Group>,
    archives: &crate::archive::Archives,
    shutdown: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(r) = cfg
        .replication
        .as_ref()
        .filter(|_| !archives.targets.is_empty())
    else {
        return Vec::new();
    };
    // An encrypted node never archives in the clear: no key, no archive targets.
    let kek = match &cfg.encryption {
        None => None,
        Some(enc) => match ferry_api::keyfile::read_key_file(&enc.key_file) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!("archive targets not started: [encryption] key_file: {e:#}");
                return Vec::new();
            }
        },
    };
    group.feed.enable(r.tail_bytes.0 as usize);
    let ctx = Arc::new(ArchiveContext {
        cluster: cfg
            .cluster_id()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        epoch,
        fork,
        journal: journal.clone(),
        bases: bases.to_vec(),
        group: group.clone(),
        tail: group.feed.tail.clone(),
        durable: group.feed.durable(),
        kek,
    });
    start(ctx, &archives.targets, shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A promoted primary continues an archive that stops at or before its fork, and
    /// refuses one holding the old primary's write-sets past it; its own epoch's
    /// archive is always its own history.
    #[test]
    fn an_archive_past_the_fork_of_an_older_epoch_is_refused() {
        assert!(check_history(1, 2, Some(100), Some(100)).is_ok());
        assert!(check_history(1, 2, None, Some(500)).is_ok());
        assert!(check_history(2, 2, Some(100), Some(500)).is_ok());
        assert!(check_history(1, 2, Some(100), None).is_ok());
        let e = check_history(1, 2, Some(100), Some(101)).unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{e}");
        assert!(is_fatal(&e.into()));
        assert!(!is_fatal(&anyhow::Error::from(StoreError::Io(
            std::io::Error::other("x")
        ))));
    }

    /// A periodic base ahead of the packs (a crash right after it): continue from the
    /// packs while the journal holds what follows them, else from the base.
    #[test]
    fn a_base_ahead_of_the_packs_continues_from_the_packs_while_the_journal_can() {
        use ferry_archive::format::manifest::Entry;
        let entry = |kind, name: &str, first, last| Entry {
            kind,
            name: name.into(),
            epoch: 1,
            first_seq: first,
            last_seq: last,
            first_ts: 0,
            last_ts: 0,
            bytes: 1,
            sm3: String::new(),
            chain: String::new(),
        };
        let mut m = Manifest::new("c", Vec::new(), 1);
        assert_eq!(held_point(&m, &[0], 1), None, "no base yet");
        m.push(entry(Kind::Base, "bases/00000001/0-0.json", 0, 0))
            .unwrap();
        assert_eq!(held_point(&m, &[0], 1), Some(0));
        m.push(entry(Kind::Pack, "packs/a", 1, 10)).unwrap();
        m.push(entry(Kind::Base, "bases/00000001/20-0.json", 20, 20))
            .unwrap();
        assert_eq!(held_point(&m, &[0], 11), Some(10));
        assert_eq!(held_point(&m, &[0], 12), Some(20), "journal released");
        assert_eq!(held_point(&m, &[0, 1], 1), None, "volume 1 has no base");
    }

    /// Every record kind keeps its sequence, volume, range and payload; a seal keeps
    /// its label (its length is the label's); the boundary and time are the
    /// write-set's.
    #[test]
    fn shipped_write_sets_become_archive_write_sets() {
        let rec = |seq, op, offset, length, data: &'static [u8]| wire::WireRecord {
            seq,
            volume: 1,
            op,
            offset,
            length,
            data: Bytes::from_static(data),
        };
        let ws = wire::WriteSet {
            epoch: 3,
            first_seq: 10,
            last_seq: 13,
            timestamp_ns: 77,
            records: vec![
                rec(10, RecordOp::Write, 4096, 4, b"abcd"),
                rec(11, RecordOp::Trim, 8192, 65536, b""),
                rec(12, RecordOp::WriteZeroes, 0, 4096, b""),
                rec(13, RecordOp::Seal, 0, 5, b"bm-01"),
            ],
        };
        let p = pack_write_set(ws);
        assert_eq!((p.end_seq, p.timestamp_ns), (13, 77));
        let got: Vec<_> = p
            .records
            .iter()
            .map(|r| (r.seq, r.volume, r.offset, r.len, r.op.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 1, 4096, 4, Op::Write(Bytes::from_static(b"abcd"))),
                (11, 1, 8192, 65536, Op::Trim),
                (12, 1, 0, 4096, Op::Zero),
                (13, 1, 0, 5, Op::Seal("bm-01".into())),
            ]
        );
    }
}
