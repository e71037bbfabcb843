//! Start-up and crash recovery of a node: the metadata store (with a role recorded by
//! the last role change), journal options, journal recovery and replay of every
//! journaled record after the checkpoint onto the bases, for either role.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_journal::{Journal, JournalOptions, Op, Seq};

use crate::pit::Pit;
use crate::replica::applier::Applier;
use crate::store::base::{find_base, Base};
use crate::store::meta::{Meta, RollbackState};
use ferry_api::config::{Config, Role};

/// Journal queue depth; also the number of writes that may wait for the journal at once.
pub(crate) const JOURNAL_QUEUE: usize = 1024;

pub struct Recovered {
    pub meta: Arc<Meta>,
    pub journal: Arc<Journal>,
    pub bases: Vec<Arc<Base>>,
    pub checkpoint: Seq,
    /// Applies write-sets on a standby (with undo capture when PIT is on).
    pub applier: Arc<Applier>,
    /// The replica's applied position on a standby (shared with the PIT store).
    pub applied: Arc<AtomicU64>,
    /// A standby that was rolled back no longer follows its primary.
    pub rollback: Option<RollbackState>,
}

pub fn journal_options(cfg: &Config) -> JournalOptions {
    let mut o = JournalOptions::new(cfg.journal.dir.clone(), cfg.cluster_id());
    o.segment_size = cfg.journal.segment_size.0;
    o.capacity = cfg.journal.size.0;
    o.engine = cfg.journal.engine;
    o.recovery = cfg.journal.recovery;
    o.queue_records = JOURNAL_QUEUE;
    o.max_inflight_batches = cfg.journal.inflight_batches as usize;
    // Callbacks never block (a primary's wake the waiting request and feed the
    // shippers' tail; a standby's hand the record to its applier, whose budget is
    // taken before the append: replica::standby): run them on the writer thread.
    o.inline_completions = true;
    o.writer_nice = cfg.journal.writer_nice;
    o
}

/// Steps 2–4 above, on the metadata store `open_meta` opened (step 1). Blocking;
/// runs before the runtime serves anything.
pub fn recover(cfg: &Config, meta: Meta) -> anyhow::Result<Recovered> {
    // A standby restored from the archive starts its journal at the seeded point.
    crate::archive::seed::apply(cfg, &meta)?;
    let bases = open_bases(cfg, &meta)?;
    let kek = at_rest_key(cfg)?;
    let (journal, checkpoint) = open_journal(cfg, &meta, kek.clone())?;
    let journal = Arc::new(journal);
    let standby = cfg.node.role == Role::Standby;
    let rollback = if standby {
        meta.rollback_state()?
    } else {
        None
    };
    let meta = Arc::new(meta);
    let applied = Arc::new(AtomicU64::new(checkpoint));
    let pit = if standby && cfg.pit().enabled {
        Some(Pit::open(
            cfg.undo_dir(),
            cfg.cluster_id(),
            cfg.pit(),
            meta.clone(),
            bases.clone(),
            applied.clone(),
            kek,
        )?)
    } else {
        None
    };
    if matches!(rollback, Some(RollbackState::InProgress { .. })) && pit.is_none() {
        bail!(
            "a rollback is in progress on this standby but [pit] is disabled; enable it again so the rollback can finish"
        );
    }
    let applier = Arc::new(Applier {
        bases: bases.clone(),
        meta: meta.clone(),
        pit: pit.clone(),
        verify: Default::default(),
        applied: applied.clone(),
        outbox: Default::default(),
        resync: Arc::new(crate::replica::transition::ResyncStatus::load(&meta)?),
    });
    let replayed = match rollback {
        // A rolled-back replica must not be rolled forward by the journal (the
        // checkpoint covered everything before the rollback started).
        Some(_) => 0,
        None if standby => replay_standby(&journal, &applier, checkpoint)?,
        None => replay(&journal, &bases, checkpoint)?,
    };
    // Through the journal's end whenever it holds anything past the checkpoint, even
    // when nothing was applied (only seals): otherwise the group's applied position
    // starts below the journal's end and a quiesce waits for a record that is never
    // applied. A rolled-back replica keeps its checkpoint (nothing was replayed).
    let checkpoint = if rollback.is_none() && journal.durable_seq() > checkpoint {
        checkpoint_replay(&journal, &bases, &meta, replayed)?
    } else {
        checkpoint
    };
    // Releases are not persisted by the journal (the checkpoint in the metadata is the
    // durable record of them), so segments at or below it reappear after a restart.
    // A target in bitmap mode still needs the records whose marks were not flushed.
    let floor = if standby {
        Seq::MAX
    } else {
        crate::ship::catchup::persisted_floor(cfg)
    };
    journal.release_through(checkpoint.min(floor))?;
    applied.store(journal.durable_seq(), Ordering::Release);
    end_replayed_resync(&journal, &applier, &meta)?;
    if let (Some(RollbackState::InProgress { target }), Some(pit)) = (rollback, &pit) {
        tracing::warn!(target, "finishing the rollback interrupted by a restart");
        pit.finish_rollback(target)?;
    }
    let rollback = meta.rollback_state()?;
    if let Some(RollbackState::Done { target }) = rollback {
        applied.store(target, Ordering::Release);
    }
    Ok(Recovered {
        meta,
        journal,
        bases,
        checkpoint,
        applier,
        applied,
        rollback,
    })
}

/// Step 2: the configured base volumes (refuses a store smaller than configured).
fn open_bases(cfg: &Config, meta: &Meta) -> anyhow::Result<Vec<Arc<Base>>> {
    let mut bases = Vec::with_capacity(cfg.volumes.len());
    for v in &cfg.volumes {
        let id = meta.volume_id(&v.name)?;
        bases.push(Arc::new(Base::open(id, &v.name, &v.path, v.size.0)?));
    }
    Ok(bases)
}

/// Step 3: journal recovery; returns the journal and the metadata checkpoint, which
/// the journal must reach.
/// Encryption at rest: the key file is read and checked before the journal and the
/// undo log are opened; they then refuse segments under a key the file does not
/// hold (naming both ids). The file may hold older keys after a rotation: they
/// still open the segments sealed under them.
fn at_rest_key(cfg: &Config) -> anyhow::Result<Option<Arc<ferry_gm::atrest::Kek>>> {
    let Some(enc) = &cfg.encryption else {
        return Ok(None);
    };
    let kek = ferry_api::keyfile::read_key_file(&enc.key_file)
        .context("[encryption] key_file: refusing to start")?;
    let older: Vec<String> = kek.older_ids().iter().map(|i| i.to_string()).collect();
    tracing::info!(key_id = %kek.id(), older = ?older, "encryption at rest (journal, undo log): SM4-GCM");
    Ok(Some(Arc::new(kek)))
}

fn open_journal(
    cfg: &Config,
    meta: &Meta,
    kek: Option<Arc<ferry_gm::atrest::Kek>>,
) -> anyhow::Result<(Journal, Seq)> {
    let mut opts = journal_options(cfg);
    opts.epoch = meta.epoch()?;
    opts.encryption = kek;
    let started = Instant::now();
    let (journal, report) = Journal::open(opts)
        .with_context(|| format!("opening journal {}", cfg.journal.dir.display()))?;
    tracing::info!(
        engine = journal.engine_name(),
        first_seq = report.first_seq,
        last_seq = report.last_seq,
        truncated_bytes = report.truncated_bytes,
        truncated_batches = report.truncated_batches,
        "journal recovered in {:?}",
        started.elapsed()
    );
    if let Some(reason) = journal.fallback_reason() {
        tracing::warn!("journal io engine fell back to std IO: {reason}");
    }
    // A standby's journal that jumped after a resync copy records the jump only with
    // the first record after it; the metadata holds it until then.
    let skip = meta.journal_skip()?;
    if journal.last_seq() < skip {
        journal
            .skip_to(skip)
            .context("repeating the journal's jump after a resync")?;
    }
    let checkpoint = meta.checkpoint()?;
    check_journal_reaches(journal.last_seq(), checkpoint, &cfg.journal.dir)?;
    Ok((journal, checkpoint))
}

/// A journal that ends before the checkpoint was replaced or truncated: starting
/// would lose the writes after the checkpoint.
fn check_journal_reaches(last: Seq, checkpoint: Seq, dir: &std::path::Path) -> anyhow::Result<()> {
    if last < checkpoint {
        bail!(
            "journal {} ends at sequence {last} but the metadata checkpoint is {checkpoint}: \
             the journal directory was replaced or truncated; refusing to start (writes after the checkpoint would be lost)",
            dir.display()
        );
    }
    Ok(())
}

/// Step 4's end: fsyncs the replayed bases and records the new checkpoint.
fn checkpoint_replay(
    journal: &Journal,
    bases: &[Arc<Base>],
    meta: &Meta,
    replayed: u64,
) -> anyhow::Result<Seq> {
    for b in bases {
        b.sync()
            .with_context(|| format!("fsync {} after replay", b.path.display()))?;
    }
    let upto = journal.durable_seq();
    meta.set_checkpoint(upto)?;
    tracing::info!(
        replayed,
        checkpoint = upto,
        "journal replayed onto base volumes"
    );
    Ok(upto)
}

/// A resync whose end point was applied just before a crash (the metadata was not
/// cleared yet): the replay applied it again, so the transition is over.
fn end_replayed_resync(journal: &Journal, applier: &Applier, meta: &Meta) -> anyhow::Result<()> {
    if let Some(r) = applier
        .resync
        .get()
        .filter(|r| r.copied && journal.durable_seq() >= r.through)
    {
        meta.set_resync_state(None)?;
        applier.resync.set(None);
        tracing::info!(
            from = r.from,
            through = r.through,
            "resync complete: the replica is a consistent image again"
        );
    }
    Ok(())
}

/// A standby's replay: records the undo log already covers are re-applied as they
/// are; later ones are grouped into write-sets (journal batches, cut at seals) and
/// go through the applier, so their before-images are captured first. Their
/// timestamps are the standby's journal times (the primary's were not persisted),
/// at most the shipping delay later than the primary's.
fn replay_standby(journal: &Journal, applier: &Applier, checkpoint: Seq) -> anyhow::Result<u64> {
    if journal.last_seq() <= checkpoint {
        return Ok(0);
    }
    let covered = applier
        .pit
        .as_ref()
        .and_then(|p| p.newest_seq())
        .unwrap_or(0);
    let mut n = 0u64;
    let mut ws: Vec<(Seq, ferry_journal::Record)> = Vec::new();
    let mut ws_batch = (0, 0);
    for entry in journal.reader(checkpoint + 1)? {
        let e = entry.context("reading the journal for replay")?;
        let batch = (e.meta.last_seq, e.meta.timestamp_ns);
        if !ws.is_empty() && batch != ws_batch {
            applier.apply_write_set(ws_batch.1, &ws)?;
            ws.clear();
        }
        n += 1;
        if e.seq <= covered {
            // Undo already holds this write-set's before-images.
            let r = &e.record;
            if let Some(base) = replay_target(&applier.bases, e.seq, r)? {
                base.apply(r.op, r.offset, r.length, &r.data)
                    .with_context(|| {
                        format!("replaying record {} onto {}", e.seq, base.path.display())
                    })?;
            }
            continue;
        }
        // Refuse an unknown volume or a range beyond it before capturing anything.
        replay_target(&applier.bases, e.seq, &e.record)?;
        let seal = e.record.op == Op::Seal;
        ws_batch = batch;
        ws.push((e.seq, e.record));
        if seal {
            applier.apply_write_set(ws_batch.1, &ws)?;
            ws.clear();
        }
    }
    if !ws.is_empty() {
        applier.apply_write_set(ws_batch.1, &ws)?;
    }
    Ok(n)
}

/// Applies every journaled record after `checkpoint` to the bases, in order.
fn replay(journal: &Journal, bases: &[Arc<Base>], checkpoint: Seq) -> anyhow::Result<u64> {
    let mut n = 0u64;
    if journal.last_seq() <= checkpoint {
        return Ok(0);
    }
    for entry in journal.reader(checkpoint + 1)? {
        let e = entry.context("reading the journal for replay")?;
        let r = &e.record;
        let Some(base) = replay_target(bases, e.seq, r)? else {
            continue;
        };
        base.apply(r.op, r.offset, r.length, &r.data)
            .with_context(|| format!("replaying record {} onto {}", e.seq, base.path.display()))?;
        n += 1;
    }
    Ok(n)
}

/// The base a journaled record applies to (`None` for a seal), or why replay must
/// stop rather than drop or misapply it.
fn replay_target<'a>(
    bases: &'a [Arc<Base>],
    seq: Seq,
    r: &ferry_journal::Record,
) -> anyhow::Result<Option<&'a Arc<Base>>> {
    if r.op == Op::Seal {
        return Ok(None);
    }
    let base =
        find_base(bases, r.volume, seq).context("refusing to start rather than drop the record")?;
    let end = r.offset.checked_add(r.length as u64);
    if end.is_none_or(|end| end > base.size) {
        bail!(
            "journal record {seq} writes {}+{} beyond volume '{}' ({} bytes); was the volume shrunk?",
            r.offset,
            r.length,
            base.name,
            base.size
        );
    }
    Ok(Some(base))
}

/// Opens the metadata store and applies a role recorded by promote, demote or
/// switchover over the config's (the role decides how recovery replays).
pub(crate) fn open_meta(cfg: &mut Config) -> anyhow::Result<Meta> {
    let meta = Meta::open(&cfg.node.metadata_dir, cfg.cluster_id())?;
    if let Some(role) = meta.role_override()? {
        let role = match role.as_str() {
            "primary" => Role::Primary,
            "standby" => Role::Standby,
            other => bail!("metadata records an unknown role '{other}'"),
        };
        if role != cfg.node.role {
            tracing::warn!(
                config = ?cfg.node.role,
                recorded = ?role,
                "running in the role recorded by the last role change, not the config's"
            );
        }
        cfg.node.role = role;
    }
    if let (Some(name), Some(r)) = (meta.primary_name()?, cfg.replication.as_mut()) {
        r.primary = name;
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(volume: u32, op: Op, offset: u64, length: u32) -> ferry_journal::Record {
        ferry_journal::Record {
            volume,
            op,
            offset,
            length,
            data: bytes::Bytes::new(),
        }
    }

    #[test]
    fn a_seal_replays_onto_no_volume_and_an_unknown_volume_stops_replay() {
        let seal = record(0, Op::Seal, 0, 0);
        assert!(replay_target(&[], 7, &seal).unwrap().is_none());
        let Err(err) = replay_target(&[], 8, &record(3, Op::Trim, 0, 4096)) else {
            panic!("a record of an unknown volume was accepted");
        };
        assert!(
            format!("{err:#}").contains("refusing to start rather than drop the record"),
            "{err:#}"
        );
    }

    #[test]
    fn a_journal_ending_before_the_checkpoint_is_refused() {
        let dir = std::path::Path::new("/srv/journal");
        check_journal_reaches(10, 10, dir).unwrap();
        check_journal_reaches(11, 10, dir).unwrap();
        let err = check_journal_reaches(9, 10, dir).unwrap_err().to_string();
        assert!(
            err.contains("ends at sequence 9 but the metadata checkpoint is 10"),
            "{err}"
        );
    }
}
