//! Standby side of a bitmap resync (the primary side is `ship::catchup`).
//!
//! A primary that tracked this standby in a dirty-region bitmap (it fell too far
//! behind for the journal) sends, on the data stream, `ResyncBegin{from, snapshot}`,
//! the current contents of the dirty regions (`ResyncData`), `ResyncEnd{through}`,
//! then write-sets from `snapshot + 1` on (proto/PROTOCOL.md, "Bitmap resync").
//! Here:
//!
//! * **Begin**: the applier is drained (every journaled record applied), the bases
//!   are fsynced and the metadata records, in one transaction, the transition
//!   (`from`, `snapshot`), the journal's jump target and the checkpoint: no restart
//!   may replay journaled records over copied data. Then the journal jumps to
//!   `snapshot` (`Journal::skip_to`) and the undo log gets the transition's first
//!   entry (`RESYNC_START`, spanning the records the copy replaces).
//! * **Data**: per batch, the before-images go to the undo log first (a resync entry,
//!   not a recovery point), then the bytes to the replica. So rolling back to `from`
//!   works at any moment, also after a crash.
//! * **End**: the bases are fsynced, then the metadata marks the copy done with
//!   `through` and moves the checkpoint to `snapshot`; the receiver jumps to
//!   `snapshot` and acks it. Write-sets up to `through` are applied as resync undo
//!   entries; the one that reaches `through` ends the transition (`pit::Applier`).
//!
//! While the metadata records a transition, status says `inconsistent` and no point
//! after `from` is offered (views, rollback, promote). A standby restarted in the
//! middle of a copy advertises `from` as its resume position and refuses write-sets
//! until the primary sends a new ResyncBegin (the same transition continues).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use ferry_journal::{Op, Record, Seq};
use ferry_proto::wire::{ResyncBegin, ResyncData, ResyncEnd, ResyncExtent};

use crate::replica::standby::Standby;
use crate::store::base::Base;
use crate::store::meta::ResyncState;
use ferry_journal::now_ns;

/// Testing hook: milliseconds to sleep after each resync batch a standby applies,
/// so a test can SIGKILL it in the middle of a copy. Never set in production.
pub const RESYNC_PAUSE_ENV: &str = "FERRYD_TEST_RESYNC_PAUSE_MS";

/// A copy in progress in the current session.
#[derive(Debug)]
pub struct Copy {
    pub from: Seq,
    pub snapshot: Seq,
    /// The primary's clock at the snapshot (ResyncBegin's V2 tail; this node's clock
    /// from a V1 primary): the time of the copy's undo entries.
    pub primary_time_ns: u64,
    pub bytes: u64,
    pub batches: u64,
    started: Instant,
    pause: Option<Duration>,
}

/// `ResyncBegin`: see the module docs. `advertised` is the resume position this
/// session's Hello carried.
pub(crate) fn begin(sb: &Standby, b: &ResyncBegin, advertised: Seq) -> anyhow::Result<Copy> {
    if b.from_seq != advertised {
        bail!(
            "ResyncBegin from {} but this standby resumed from {advertised}",
            b.from_seq
        );
    }
    let applier = &sb.applier;
    wait_applied(sb)?;
    let here = sb.journal.durable_seq();
    if b.snapshot_seq < here {
        bail!(
            "ResyncBegin snapshot {} is below this standby's journal ({here})",
            b.snapshot_seq
        );
    }
    let st = record_transition(sb, b, here)?;
    clear_relay_resync(sb)?;
    // Nothing is left to apply up to the snapshot: the copy stands in for it.
    sb.set_applied(b.snapshot_seq);
    // Recovery points carry the primary's time (as write-sets do): the standby's
    // clock may be anywhere. Only a V1 primary leaves it to this node's clock.
    let primary_time_ns = b.primary_time_ns.unwrap_or_else(now_ns);
    if let Some(pit) = &applier.pit {
        pit.begin_resync(here, b.snapshot_seq, primary_time_ns)?;
    }
    applier.resync.copied_bytes.store(0, Ordering::Relaxed);
    applier
        .resync
        .total_bytes
        .store(b.total_bytes, Ordering::Relaxed);
    tracing::warn!(
        from = st.from,
        resume = here,
        snapshot = b.snapshot_seq,
        total_bytes = b.total_bytes,
        "resync from the primary's dirty-region bitmap started: the replica is inconsistent \
         until it completes (its last consistent point, {}, stays reachable)",
        st.from
    );
    let pause = test_pause();
    Ok(Copy {
        from: st.from,
        snapshot: b.snapshot_seq,
        primary_time_ns,
        bytes: 0,
        batches: 0,
        started: Instant::now(),
        pause,
    })
}

/// Everything journaled must be applied before the copy overwrites the replica
/// (and the checkpoint `begin` records claims it).
fn wait_applied(sb: &Standby) -> anyhow::Result<()> {
    let journal = &sb.journal;
    let deadline = Instant::now() + Duration::from_secs(30);
    while journal.durable_seq() < journal.last_seq() || sb.applied_seq() < journal.durable_seq() {
        if let Some(e) = sb.state.apply_error.lock().clone() {
            bail!("cannot resync: the replica applier stopped ({e})");
        }
        if Instant::now() > deadline {
            bail!(
                "cannot resync: the replica did not apply the journal within 30 s \
                 (durable {}, applied {})",
                journal.durable_seq(),
                sb.applied_seq()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The transition made durable before any copied byte lands: the bases fsynced, then
/// the metadata's one transaction (see the module docs), then the journal (and the
/// relay feed) continued after the snapshot.
fn record_transition(sb: &Standby, b: &ResyncBegin, here: Seq) -> anyhow::Result<ResyncState> {
    let applier = &sb.applier;
    for base in &applier.bases {
        base.sync()
            .with_context(|| format!("resync: fsync {}", base.path.display()))?;
    }
    let prev = applier.resync.get();
    let st = ResyncState {
        // A transition interrupted earlier goes on: its start stays the last
        // consistent point.
        from: prev.map_or(here, |p| p.from),
        snapshot: b.snapshot_seq,
        through: 0,
        copied: false,
    };
    applier
        .meta
        .begin_resync(&st, here)
        .context("recording the resync")?;
    applier.resync.set(Some(st));
    sb.journal
        .skip_to(b.snapshot_seq)
        .context("continuing the journal after the resync snapshot")?;
    if let Some(f) = &sb.feed {
        f.skipped_to(b.snapshot_seq);
    }
    Ok(st)
}

/// The resync the relay was asked for (a full one) is under way: the copy replaces
/// whatever this node held of the old epoch, so the request is cleared.
fn clear_relay_resync(sb: &Standby) -> anyhow::Result<()> {
    if sb.state.relay_resync.load(Ordering::Acquire) {
        sb.applier
            .meta
            .set_relay_resync(false)
            .context("clearing the request for a resync from the relay")?;
        sb.state.relay_resync.store(false, Ordering::Release);
    }
    Ok(())
}

/// The test hook's pause after each batch ([`RESYNC_PAUSE_ENV`]), if set.
fn test_pause() -> Option<Duration> {
    std::env::var(RESYNC_PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// One `ResyncData` batch: before-images to the undo log, then the bytes.
pub(crate) fn data(sb: &Standby, c: &mut Copy, d: ResyncData) -> anyhow::Result<()> {
    let applier = &sb.applier;
    let (recs, bytes) = batch_records(&applier.bases, c.snapshot, d.extents)?;
    applier.apply_resync_batch(c.snapshot, c.primary_time_ns, &recs)?;
    c.bytes += bytes;
    c.batches += 1;
    applier
        .resync
        .copied_bytes
        .fetch_add(bytes, Ordering::Relaxed);
    if let Some(p) = c.pause {
        std::thread::sleep(p);
    }
    Ok(())
}

/// A batch's extents as records stamped `snapshot` (zeros as trims: a hole punched
/// on a file, zeroed on a device, see `Base::apply`), checked against the volumes,
/// and the bytes they cover.
fn batch_records(
    bases: &[Arc<Base>],
    snapshot: Seq,
    extents: Vec<ResyncExtent>,
) -> anyhow::Result<(Vec<(Seq, Record)>, u64)> {
    let mut recs = Vec::with_capacity(extents.len());

    let mut bytes = 0u64;
    for x in extents {
        let base = bases
            .iter()
            .find(|b| b.id == x.volume)
            .ok_or_else(|| anyhow!("resync data for volume id {}, not in the config", x.volume))?;
        if x.offset
            .checked_add(u64::from(x.length))
            .is_none_or(|e| e > base.size)
        {
            bail!(
                "resync data {}+{} beyond volume '{}' ({} bytes)",
                x.offset,
                x.length,
                base.name,
                base.size
            );
        }
        bytes += u64::from(x.length);
        let (op, data) = match x.data {
            Some(data) => (Op::Write, data),
            // Zeros: a hole punched on a file, zeroed on a device (Base::apply).
            None => (Op::Trim, Bytes::new()),
        };
        recs.push((
            snapshot,
            Record {
                volume: x.volume,
                op,
                offset: x.offset,
                length: x.length,
                data,
            },
        ));
    }
    Ok((recs, bytes))
}

/// `ResyncEnd`: the copy is durable; the transition ends once `through` is applied
/// (at once if nothing was written on the primary during the copy).
pub(crate) fn end(sb: &Standby, c: &Copy, e: &ResyncEnd) -> anyhow::Result<()> {
    let applier = &sb.applier;
    for base in &applier.bases {
        base.sync()
            .with_context(|| format!("resync: fsync {}", base.path.display()))?;
    }
    let st = applier
        .resync
        .get()
        .ok_or_else(|| anyhow!("ResyncEnd without a resync in progress"))?;
    if e.through_seq <= c.snapshot {
        // The copy alone is the primary's image at the snapshot.
        if let Some(pit) = &applier.pit {
            pit.end_resync_marker(c.snapshot, e.primary_time_ns.unwrap_or_else(now_ns))?;
        }
        applier.meta.end_resync_copy(None, c.snapshot)?;
        applier.resync.set(None);
    } else {
        let done = ResyncState {
            through: e.through_seq,
            copied: true,
            ..st
        };
        applier.meta.end_resync_copy(Some(&done), c.snapshot)?;
        applier.resync.set(Some(done));
    }
    tracing::info!(
        from = c.from,
        snapshot = c.snapshot,
        through = e.through_seq,
        bytes = c.bytes,
        batches = c.batches,
        "resync copy complete in {:?}; the replica is consistent again once {} is applied",
        c.started.elapsed(),
        e.through_seq.max(c.snapshot)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_become_records_at_the_snapshot_checked_against_the_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let bases = vec![Arc::new(Base::open(7, "v", &path, 1 << 20).unwrap())];
        let x = |volume, offset, length, data: Option<&[u8]>| ResyncExtent {
            volume,
            offset,
            length,
            data: data.map(Bytes::copy_from_slice),
        };
        let (recs, bytes) = batch_records(
            &bases,
            42,
            vec![x(7, 0, 3, Some(b"abc")), x(7, 4096, 8192, None)],
        )
        .unwrap();
        assert_eq!(bytes, 3 + 8192);
        assert_eq!(recs.len(), 2);
        assert!(recs.iter().all(|(s, _)| *s == 42));
        assert_eq!(
            (
                recs[0].1.op,
                recs[0].1.offset,
                recs[0].1.length,
                &recs[0].1.data[..]
            ),
            (Op::Write, 0, 3, &b"abc"[..])
        );
        assert_eq!(
            (
                recs[1].1.op,
                recs[1].1.offset,
                recs[1].1.length,
                recs[1].1.data.len()
            ),
            (Op::Trim, 4096, 8192, 0)
        );
        let err = batch_records(&bases, 42, vec![x(8, 0, 1, None)]).unwrap_err();
        assert!(err.to_string().contains("volume id 8"), "{err}");
        let err = batch_records(&bases, 42, vec![x(7, (1 << 20) - 1, 2, None)]).unwrap_err();
        assert!(err.to_string().contains("beyond volume 'v'"), "{err}");
        let err = batch_records(&bases, 42, vec![x(7, u64::MAX, 1, None)]).unwrap_err();
        assert!(err.to_string().contains("beyond volume"), "{err}");
    }
}
