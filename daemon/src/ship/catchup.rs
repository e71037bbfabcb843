//! Journal overflow on the primary: a target that falls so far behind that keeping
//! its records would overflow the journal is tracked in a persisted dirty-region
//! bitmap instead ([`crate::ship::dirty::DirtyMap`], one per volume), the journal is
//! released without it, and on its next connection only the dirty regions are
//! copied (a *resync*), then streaming goes on. Clients never wait on a target in
//! bitmap mode, and never get an error because of one.
//!
//! Modes of a target (`ferry_proto::target::Tracking`, which decides every change of
//! it; `tracking` in status):
//! * **streaming**: its durable ack holds the journal's release floor.
//! * **bitmap**: the regions of every record after its ack are marked; it no longer
//!   holds the floor beyond what is durably marked.
//! * **resyncing**: a session is copying the dirty regions; the floor is held at the
//!   copy's snapshot so the stream can go on after it.
//!
//! **Switch** (monitor thread, when the journal is `SWITCH_PERCENT` full and a
//! streaming target's ack is below the checkpoint): live marking starts first (every
//! durable record from then on is marked in memory by the [`ShipFeed`]
//! hook), then the maps are created, every journal record after the target's ack up to
//! the durable position is read back and marked, and the maps are flushed with
//! `base_seq` = the ack and `through_seq` = every record up to it marked. Only then does
//! the target stop holding the floor, and its session is ended.
//!
//! **The crash rule**: a mark protects its region only once flushed, so a bitmap-mode
//! target holds the floor at its maps' flushed `through_seq` (the checkpointer never
//! releases a record whose mark is not durable). The monitor flushes at least every
//! second, and every 50 ms while the journal is half full. A failed flush is logged
//! loudly and retried; meanwhile the floor stays where it was (writes may wait for
//! journal space, never fail). After a restart the maps are reopened and the journal
//! records after their `through_seq` are marked again.
//!
//! **Resync** (the target's session, see proto/PROTOCOL.md "Bitmap resync"):
//! snapshot = the primary's applied position (at least the standby's), every dirty
//! region is read from the base volumes while writes go on and shipped (zero ranges
//! as zero extents), then ResyncEnd with the durable position; streaming resumes after
//! the snapshot. The copy's batches go packed (zstd, to a V3 standby with `compress`)
//! and under the target's bandwidth cap as bulk traffic (`ship::wan`). Marks are never cleared during a copy: an interrupted resync is
//! simply run again. The maps are deleted once the target acknowledges the end
//! point durable.
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use ferry_journal::{Op, Seq};
use ferry_proto::wire::{Frame, Heartbeat, ResyncBegin, ResyncData, ResyncEnd, ResyncExtent};
use ferry_transport::quic::PrimarySession;
use tokio::sync::{mpsc, watch};

use crate::ship::dirty::DirtyMap;
use crate::ship::feed::ShipFeed;
use crate::ship::target::{lifecycle_now, maps_in_use, RegionBits, Shared, TargetState};
use crate::ship::wan::Outgoing;
use crate::ship::TargetList;
use crate::store::base::Base;
use ferry_api::config::Config;
use ferry_journal::now_ns;
use ferry_proto::target::{
    choose_switch, FullReason, FullSwitch, HelloPlan, JournalFill, PlanStart, SessionStart,
    SwitchToBitmap, SWITCH_RETRY,
};
use ferry_proto::wan::Class;

const MONITOR_EVERY: Duration = Duration::from_millis(50);
/// Bytes read from a base volume per extent of a copy.
const PIECE: u64 = 1 << 20;
/// A ResyncData frame is cut once it carries this many data bytes.
const BATCH_BYTES: usize = 4 << 20;
/// Extents per ResyncData frame at most (zero extents cost no data bytes).
const BATCH_EXTENTS: usize = 4096;
/// Copy batches read ahead of the network (bounded memory: ~16 MiB).
const READ_AHEAD_BATCHES: usize = 4;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Where the maps of all targets live: `<metadata_dir>/dirty/<target>/<volume>.map`.
pub fn dirty_dir(cfg: &Config) -> PathBuf {
    cfg.node.metadata_dir.join("dirty")
}

fn map_path(dir: &Path, target: &str, volume: &str) -> PathBuf {
    dir.join(target).join(format!("{volume}.map"))
}

/// The lowest `through_seq` of any complete set of persisted maps: a restart must
/// not release journal records after it (their marks were not durable). `Seq::MAX`
/// when no target is in bitmap mode. Read before the journal's startup release.
pub fn persisted_floor(cfg: &Config) -> Seq {
    let dir = dirty_dir(cfg);
    let Some(r) = cfg.replication.as_ref() else {
        return Seq::MAX;
    };
    let mut floor = Seq::MAX;
    for t in &r.targets {
        // A damaged map is replaced by a full one at start-up: nothing in the journal
        // is needed for it (every region will be dirty), so only readable maps count.
        let through = cfg
            .volumes
            .iter()
            .map(|v| map_path(&dir, &t.name, &v.name))
            .filter(|p| p.exists())
            .filter_map(|p| DirtyMap::open(&p).ok())
            .map(|m| m.through_seq())
            .min();
        if let Some(through) = through {
            floor = floor.min(through);
        }
    }
    floor
}

/// Wires overflow tracking into a primary: gives every target the shared state,
/// reopens persisted maps (a target in bitmap mode before a restart resumes in it),
/// registers the marking hook and starts the monitor thread (stops with `stop`).
/// The monitor follows `targets` as a reload changes it; the shared state is
/// returned for the targets a reload adds ([`add_target`]).
pub fn start(
    sh: Shared,
    targets: &TargetList,
    feed: &ShipFeed,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Arc<Shared>> {
    let sh = Arc::new(sh);
    let now = targets.read().clone();
    for t in &now {
        add_target(&sh, t)?;
    }
    feed.track(now);
    let (monitor_sh, list) = (sh.clone(), targets.clone());
    std::thread::Builder::new()
        .name("ferry-overflow".into())
        .spawn(move || monitor(&monitor_sh, &list, stop))
        .context("starting the journal overflow monitor")?;
    Ok(sh)
}

/// Gives a target the shared state and reopens its persisted maps (at start, or when
/// a reload adds it or changes its mode).
pub fn add_target(sh: &Arc<Shared>, t: &TargetState) -> anyhow::Result<()> {
    let _ = t.track.shared.set(sh.clone());
    load(t, sh).with_context(|| format!("reopening the dirty maps of target '{}'", t.name))
}

/// Deletes a removed target's maps: should it be added again later, stale maps must
/// not pass for marks of everything it missed (it is then resynced from its Hello).
pub fn forget_target(sh: &Shared, name: &str) -> anyhow::Result<()> {
    let dir = sh.dir.join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", dir.display()))),
    }
}

/// Reopens a target's persisted maps, if it was in bitmap mode.
fn load(t: &TargetState, sh: &Shared) -> anyhow::Result<()> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for b in &sh.bases {
        let p = map_path(&sh.dir, &t.name, &b.name);
        if p.exists() {
            found.push((b, p));
        } else {
            missing.push(b);
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    let durable = sh.journal.durable_seq();
    let mut opened = Vec::new();
    for (b, p) in &found {
        let m = match DirtyMap::open(p) {
            Ok(m) if m.volume_size() == b.size => Ok(m),
            Ok(m) => Err(format!(
                "it is for {} bytes, the volume has {}",
                m.volume_size(),
                b.size
            )),
            Err(e) => Err(e.to_string()),
        };
        opened.push((*b, p.clone(), m));
    }
    // A switch writes every map with through_seq 0 first: one still at 0 means the
    // switch never finished (a crash while creating or filling the maps). The target
    // held the floor at its ack until then, so nothing relies on these maps.
    if opened
        .iter()
        .any(|(_, _, m)| m.as_ref().is_ok_and(|m| m.through_seq() == 0))
    {
        tracing::warn!(target = %t.name, "discarding dirty maps of an unfinished switch to bitmap mode");
        for (b, p, _) in &opened {
            DirtyMap::remove(p).with_context(|| format!("removing the map of '{}'", b.name))?;
        }
        return Ok(());
    }
    let base = opened
        .iter()
        .filter_map(|(_, _, m)| m.as_ref().ok().map(|m| m.base_seq()))
        .min()
        .unwrap_or(0);
    let mut maps = Vec::new();
    let unusable = opened.into_iter().chain(missing.into_iter().map(|b| {
        let p = map_path(&sh.dir, &t.name, &b.name);
        (
            b,
            p,
            Err("it is missing (a volume added since?)".to_string()),
        )
    }));
    for (b, p, m) in unusable {
        match m {
            Ok(m) => maps.push((b.id, m)),
            Err(why) => {
                // Whatever it said is lost: every region is dirty (a full copy).
                tracing::error!(
                    target = %t.name,
                    volume = %b.name,
                    "dirty map unusable ({why}); resyncing the whole volume"
                );
                let mut m = DirtyMap::create(&p, b.size, sh.region_size)?;
                m.mark_all();
                m.set_seqs(base, durable);
                m.flush()?;
                maps.push((b.id, m));
            }
        }
    }
    let through = maps.iter().map(|(_, m)| m.through_seq()).min().unwrap_or(0);
    {
        let mut inner = t.track.inner.lock();
        inner.maps = maps;
        t.track.count_dirty(&inner);
    }
    t.track.start_live(sh, through);
    t.update(|lc| lc.reopened_in_bitmap(base, through));
    // Marks after `through` were not durable: the journal still holds those records.
    mark_from_journal(t, sh, through, durable)?;
    tracing::warn!(
        target = %t.name,
        base_seq = base,
        through,
        dirty_bytes = t.track.dirty_bytes.load(Ordering::Relaxed),
        "target resumes in bitmap mode (it will be resynced from its dirty regions)"
    );
    Ok(())
}

/// Marks every journal record in `(after, upto]` in the target's maps. If the
/// journal no longer holds them, marks everything (a full copy is always safe). The
/// journal is read without holding the maps' lock (status stays responsive).
fn mark_from_journal(t: &TargetState, sh: &Shared, after: Seq, upto: Seq) -> anyhow::Result<()> {
    if upto <= after {
        return Ok(());
    }
    let mut bits: Vec<(u32, RegionBits)> = sh
        .bases
        .iter()
        .map(|b| (b.id, RegionBits::new(b.size, sh.region_size)))
        .collect();
    let res = (|| -> anyhow::Result<()> {
        for e in sh.journal.reader(after + 1)? {
            let e = e?;
            if e.seq > upto {
                break;
            }
            let r = &e.record;
            if r.op == Op::Seal || r.length == 0 {
                continue;
            }
            match bits.iter_mut().find(|(v, _)| *v == r.volume) {
                Some((_, b)) => b.mark(r.offset, u64::from(r.length)),
                None => bail!(
                    "record {} is for volume id {}, not configured",
                    e.seq,
                    r.volume
                ),
            }
        }
        Ok(())
    })();
    let mut inner = t.track.inner.lock();
    match res {
        Ok(()) => {
            for (vol, mut b) in bits {
                if let Some((_, m)) = inner.maps.iter_mut().find(|(v, _)| *v == vol) {
                    for (off, len) in b.take() {
                        m.mark(off, len)?;
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(
                target = %t.name,
                "cannot read journal records {}..={upto} to mark them ({}); marking every region",
                after + 1,
                crate::error_chain(&e)
            );
            for (_, m) in inner.maps.iter_mut() {
                m.mark_all();
            }
        }
    }
    t.track.count_dirty(&inner);
    Ok(())
}

fn monitor(sh: &Shared, list: &TargetList, stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        std::thread::sleep(MONITOR_EVERY);
        let targets = list.read().clone();
        let fill = JournalFill {
            used_bytes: sh.journal.used_bytes(),
            capacity_bytes: sh.journal.capacity_bytes(),
        };
        for t in &targets {
            t.flush(fill.flush_pressure());
        }
        if !fill.overflowing() {
            continue;
        }
        let checkpoint = (sh.checkpoint)();
        // A resync holds the journal from its snapshot on until the target has caught
        // up: if that fills it, writes would wait for the resync. They must not wait
        // for a target: the resync is abandoned (back to bitmap mode, marks intact) and
        // runs again on the next connection.
        for t in &targets {
            if t.update(|lc| lc.abandon_resync(checkpoint)) {
                tracing::warn!(
                    target = %t.name,
                    journal_used = fill.used_bytes,
                    journal_capacity = fill.capacity_bytes,
                    "the journal filled up during the target's resync: abandoning it (it \
                     starts again on the next connection; a larger journal lets a resync \
                     finish under this write load)"
                );
                t.track.kick.notify_waiters();
            }
        }
        // The streaming target furthest behind, if it is what holds the journal.
        let now = lifecycle_now();
        let holder = choose_switch(targets.iter().filter_map(|t| {
            t.read(|lc| lc.switch_candidate(checkpoint, now))
                .map(|acked| (t, acked))
        }));
        if let Some(t) = holder {
            if let Err(e) = switch(t, sh, fill) {
                tracing::error!(
                    target = %t.name,
                    "switching to bitmap mode failed: {}; the target keeps holding the journal \
                     (writes may wait for space, never fail); retrying in {SWITCH_RETRY:?}",
                    crate::error_chain(&e)
                );
            }
        }
    }
}

/// Streaming → bitmap; see the module docs for the order of the steps.
fn switch(t: &TargetState, sh: &Shared, fill: JournalFill) -> anyhow::Result<()> {
    let started = Instant::now();
    let Some(sw) = t.update(|lc| lc.begin_overflow_switch()) else {
        return Ok(());
    };
    let acked = sw.base;
    let marked_through = enter_bitmap(t, sh, sw)?;
    tracing::warn!(
        target = %t.name,
        acked,
        marked_through,
        dirty_bytes = t.track.dirty_bytes.load(Ordering::Relaxed),
        journal_used = fill.used_bytes,
        journal_capacity = fill.capacity_bytes,
        "target fell too far behind for the journal: switched to bitmap mode in {:?} \
         (the journal is released without it; it will be resynced from its dirty regions, \
         and its recovery points after {acked} are lost)",
        started.elapsed()
    );
    Ok(())
}

/// Before a session whose plan is a full resync starts: a streaming target whose
/// resume point the journal no longer holds (its records were released while it was
/// away, e.g. by a restart of this primary, which does not persist acks), or that
/// diverged after a failover, is switched to bitmap mode with every region dirty, so
/// it is resynced (the digest comparison at the start of the copy then skips what it
/// already holds) instead of being refused for good; a target already in bitmap mode
/// gets every region marked. The lifecycle decides which
/// (`TargetLifecycle::begin_full_switch`); nothing for other plans. Blocking.
pub fn switch_full(t: &TargetState, plan: &HelloPlan) -> anyhow::Result<()> {
    let Some(decision) = t.update(|lc| lc.begin_full_switch(plan))? else {
        return Ok(());
    };
    match decision {
        FullSwitch::MarkAll => mark_all_maps(t),
        FullSwitch::Create(sw) => {
            let Some(sh) = t.track.shared.get().cloned() else {
                t.update(|lc| lc.switch_failed(lifecycle_now()));
                bail!("overflow tracking is not set up");
            };
            enter_bitmap(t, &sh, sw)?;
            let why = match plan.start {
                PlanStart::Resync {
                    full: Some(FullReason::StandbyRequired),
                } => "the standby refused a write-set and required a resync",
                PlanStart::Resync {
                    full: Some(FullReason::Failback { .. }),
                } => "the target wrote past the fork",
                PlanStart::Resync {
                    full: Some(FullReason::ForkCut { .. }),
                } => "streaming would cross the records the promotion discarded",
                _ => "the journal no longer holds what the target needs",
            };
            tracing::warn!(
                target = %t.name,
                from = sw.base,
                first_available = sh.journal.first_available_seq(),
                "{why}: every region is a resync candidate"
            );
            Ok(())
        }
    }
}

/// A target already in bitmap mode that needs a full resync (a failback: it wrote
/// past the fork, in regions no map of this history marked, since the maps start at
/// this primary's old position): marks every region and makes that durable before
/// the caller records the target as rejoined (after which a restart would no longer
/// resync it in full). Blocking.
fn mark_all_maps(t: &TargetState) -> anyhow::Result<()> {
    let mut inner = t.track.inner.lock();
    let Some((base, flushed)) = maps_in_use(t.read(|lc| lc.tracking())) else {
        return Ok(());
    };
    let through = t.track.merge(&mut inner)?.max(flushed);
    for (_, m) in inner.maps.iter_mut() {
        m.mark_all();
        m.set_seqs(base, through);
        m.flush()?;
    }
    // What the monitor's flush would have recorded (the marks merged above are durable).
    t.update(|lc| lc.marks_flushed(through));
    inner.last_flush = Some(Instant::now());
    t.track.count_dirty(&inner);
    tracing::warn!(
        target = %t.name,
        base,
        "the target wrote past the fork while tracked in a bitmap: every region is a resync candidate"
    );
    Ok(())
}

/// Carries out the lifecycle's switch `sw`: creates the target's maps (every region
/// dirty for a full switch; else the journal's records after `sw.base` are marked),
/// flushes them and reports bitmap mode entered, so the target stops holding the
/// journal and writes stop waiting for it (and an overflowed session is ended). On
/// an error everything is undone and the lifecycle told: the target keeps streaming.
/// Returns the position the maps are durable through.
fn enter_bitmap(t: &TargetState, sh: &Shared, sw: SwitchToBitmap) -> anyhow::Result<Seq> {
    let base = sw.base;
    let all = sw.all_dirty();
    t.track.start_live(sh, base);
    // Every record completed after this read is marked live (the hook saw `active`);
    // every one before it is in the journal up to `d0`.
    let d0 = sh.journal.durable_seq();
    let res = (|| -> anyhow::Result<Seq> {
        let mut maps = Vec::new();
        for b in &sh.bases {
            let p = map_path(&sh.dir, &t.name, &b.name);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut m = DirtyMap::create(&p, b.size, sh.region_size)?;
            if all {
                m.mark_all();
            }
            maps.push((b.id, m));
        }
        t.track.inner.lock().maps = maps;
        if !all {
            mark_from_journal(t, sh, base, d0)?;
        }
        let mut inner = t.track.inner.lock();
        let through = t.track.merge(&mut inner)?.max(d0);
        for (_, m) in inner.maps.iter_mut() {
            m.set_seqs(base, through);
            m.flush()?;
        }
        inner.last_flush = Some(Instant::now());
        t.track.count_dirty(&inner);
        Ok(through)
    })();
    let through = match res {
        Ok(through) => through,
        Err(e) => {
            t.track.stop_live();
            t.track.inner.lock().maps.clear();
            for b in &sh.bases {
                let _ = DirtyMap::remove(&map_path(&sh.dir, &t.name, &b.name));
            }
            t.update(|lc| lc.switch_failed(lifecycle_now()));
            return Err(e);
        }
    };
    // Degrades the target: writes must not wait for a target that is resynced later.
    let entered = t.update(|lc| lc.bitmap_entered(through));
    if let Some(s) = &sh.sync {
        s.recompute();
    }
    if entered.end_session {
        t.track.kick.notify_waiters();
    }
    Ok(through)
}

/// Starts a resync for a session whose standby resumes from `from`: returns the
/// snapshot (the stream continues after it) and the bytes to copy. Blocking.
fn begin_resync(t: &TargetState, sh: &Shared, from: Seq) -> anyhow::Result<(Seq, u64)> {
    // The snapshot must cover what the standby holds: records are shipped once
    // durable, applied here a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (sh.applied)() < from {
        if Instant::now() > deadline {
            bail!("the primary did not apply sequence {from} (the standby's position) within 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // The floor is held at the snapshot from here on. A checkpoint computed just
    // before may still release a little past it; then the stream's journal reader
    // finds the snapshot's successor released, the session ends and the resync runs
    // again (the maps are intact): a retry, never a gap.
    let snapshot = (sh.applied)();
    let mut inner = t.track.inner.lock();
    let base = t.read(|lc| maps_in_use(lc.tracking()).map(|(base, _)| base));
    let start = t.update(|lc| lc.resync_begin(from, snapshot))?;
    // Every record up to the snapshot was marked by the time it was applied.
    t.track.merge(&mut inner)?;
    if start.mark_all {
        // The standby holds less than it acknowledged (restored from an older copy?):
        // the map does not cover what it misses. Copy everything.
        tracing::warn!(
            target = %t.name,
            from,
            base_seq = base,
            "the standby resumes before the bitmap's start: resyncing every region"
        );
        for (_, m) in inner.maps.iter_mut() {
            m.mark_all();
        }
    }
    t.track.count_dirty(&inner);
    Ok((snapshot, t.track.dirty_bytes.load(Ordering::Relaxed)))
}

/// The copy's reader (its own thread): the current contents of every dirty region,
/// in ResyncData batches, over a bounded channel.
fn read_copy(
    t: Arc<TargetState>,
    sh: Arc<Shared>,
    epoch: u64,
    tx: mpsc::Sender<anyhow::Result<ResyncData>>,
) {
    let mut batch: Vec<ResyncExtent> = Vec::new();
    let mut batch_bytes = 0usize;
    let send = |batch: &mut Vec<ResyncExtent>, bytes: &mut usize| -> bool {
        *bytes = 0;
        if batch.is_empty() {
            return true;
        }
        let extents = std::mem::take(batch);
        tx.blocking_send(Ok(ResyncData { epoch, extents })).is_ok()
    };
    for base in &sh.bases {
        let mut at = 0u64;
        loop {
            let next = {
                let inner = t.track.inner.lock();
                inner
                    .maps
                    .iter()
                    .find(|(v, _)| *v == base.id)
                    .and_then(|(_, m)| m.next_dirty_range(at))
            };
            let Some((off, len)) = next else { break };
            let end = off + len;
            let mut pos = off.max(at);
            while pos < end {
                let n = (end - pos).min(PIECE);
                let data = match read_piece(base, pos, n) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(anyhow!(
                            "reading {}+{n} of {} for the resync: {e}",
                            pos,
                            base.path.display()
                        )));
                        return;
                    }
                };
                batch_bytes += data.as_ref().map_or(0, |d| d.len());
                match (batch.last_mut(), &data) {
                    // Adjacent zero ranges travel as one extent.
                    (Some(last), None)
                        if last.data.is_none()
                            && last.volume == base.id
                            && last.offset + u64::from(last.length) == pos
                            && u64::from(last.length) + n <= u64::from(u32::MAX / 2) =>
                    {
                        last.length += n as u32
                    }
                    _ => batch.push(ResyncExtent {
                        volume: base.id,
                        offset: pos,
                        length: n as u32,
                        data,
                    }),
                }
                if (batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_EXTENTS)
                    && !send(&mut batch, &mut batch_bytes)
                {
                    return;
                }
                pos += n;
            }
            at = end;
        }
    }
    send(&mut batch, &mut batch_bytes);
}

/// `None` when the range holds only zeros (a hole or zeroed blocks).
fn read_piece(base: &Base, offset: u64, len: u64) -> std::io::Result<Option<bytes::Bytes>> {
    use std::os::unix::fs::FileExt;
    if crate::store::base::is_hole(&base.file, offset, len) {
        return Ok(None);
    }
    let mut buf = BytesMut::zeroed(len as usize);
    base.file.read_exact_at(&mut buf, offset)?;
    if buf.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    Ok(Some(buf.freeze()))
}

/// Runs the copy phase of a resync session (see the module docs and PROTOCOL.md):
/// ResyncBegin, the dirty regions, ResyncEnd. Returns the snapshot: streaming
/// continues after it.
pub async fn resync_copy(
    t: &Arc<TargetState>,
    s: &mut PrimarySession,
    from: Seq,
    epoch: u64,
) -> anyhow::Result<Seq> {
    let sh = t
        .track
        .shared
        .get()
        .cloned()
        .ok_or_else(|| anyhow!("overflow tracking is not set up"))?;
    let started = Instant::now();
    let (snapshot, total) = tokio::task::block_in_place(|| begin_resync(t, &sh, from))?;
    tracing::info!(target = %t.name, from, snapshot, total_bytes = total, "resync started");
    // The primary's clock goes with the snapshot and the end (to a V2 standby): the
    // standby stamps the transition's recovery points with it, not its own clock.
    let v2 = s.negotiated.has_v2_tails();
    s.data
        .send_frame(&Frame::ResyncBegin(ResyncBegin {
            epoch,
            from_seq: from,
            snapshot_seq: snapshot,
            total_bytes: total,
            region_size: sh.region_size as u32,
            primary_time_ns: v2.then(now_ns),
        }))
        .await?;
    // Ship only what differs: the standby's replica is untouched until the first
    // ResyncData, so its digests describe it exactly. Any failure here just copies
    // every dirty region (always correct).
    if let Err(e) = filter_by_digests(t, s, &sh, epoch).await {
        tracing::warn!(target = %t.name, "resync: comparing digests failed ({e:#}); copying every dirty region");
    }
    let (bytes, data_bytes) = send_copy(t, s, &sh, epoch).await?;
    let through = sh.journal.durable_seq();
    let SessionStart::Stream { after: snapshot } =
        t.update(|lc| lc.resync_copied(through, sh.journal.durable_seq()))
    else {
        bail!("the lifecycle did not resume streaming after the resync copy");
    };
    s.data
        .send_frame(&Frame::ResyncEnd(ResyncEnd {
            epoch,
            through_seq: through,
            bytes,
            data_bytes,
            primary_time_ns: v2.then(now_ns),
        }))
        .await?;
    tracing::info!(
        target = %t.name,
        from,
        snapshot,
        through,
        bytes,
        data_bytes,
        "resync copy sent in {:?}; streaming resumes after {snapshot}",
        started.elapsed()
    );
    Ok(snapshot)
}

/// Sends the dirty regions' current contents (read by a thread of its own) while
/// answering the standby's heartbeats; returns the bytes sent (all, and as data).
async fn send_copy(
    t: &Arc<TargetState>,
    s: &mut PrimarySession,
    sh: &Arc<Shared>,
    epoch: u64,
) -> anyhow::Result<(u64, u64)> {
    let (tx, rx) = mpsc::channel(READ_AHEAD_BATCHES);
    let thread = {
        let (t, sh) = (t.clone(), sh.clone());
        std::thread::Builder::new()
            .name(format!("ferry-resync-{}", t.name))
            .spawn(move || read_copy(t, sh, epoch, tx))
            .context("spawning the resync reader thread")?
    };
    // Joined when the copy ends, however it ends.
    let mut copy = CopyThread {
        rx,
        thread: Some(thread),
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    let (mut bytes, mut data_bytes) = (0u64, 0u64);
    // The batch the bandwidth cap holds back, with its (covered, data) bytes.
    let mut held: Option<(Outgoing, u64, u64)> = None;
    let mut read_all = false;
    loop {
        if let Some((o, n, d)) = held.take_if(|(o, ..)| o.release_at <= Instant::now()) {
            s.data.send_frame(&o.frame).await?;
            t.wan.sent(&o);
            bytes += n;
            data_bytes += d;
            t.track.resync_bytes.fetch_add(n, Ordering::Relaxed);
            t.track.resync_data_bytes.fetch_add(d, Ordering::Relaxed);
        }
        if read_all && held.is_none() {
            break;
        }
        let release = held
            .as_ref()
            .map(|(o, ..)| tokio::time::Instant::from_std(o.release_at));
        tokio::select! {
            _ = crate::ship::wan::sleep_until(release), if release.is_some() => {}
            batch = copy.rx.recv(), if held.is_none() && !read_all => match batch {
                Some(b) => {
                    let b = b?;
                    let n: u64 = b.extents.iter().map(|x| u64::from(x.length)).sum();
                    let d: u64 = b.extents.iter().filter_map(|x| x.data.as_ref()).map(|x| x.len() as u64).sum();
                    let o = tokio::task::block_in_place(|| t.wan.prepare(Frame::ResyncData(b), Class::Bulk))?;
                    held = Some((o, n, d));
                }
                None => read_all = true,
            },
            frame = s.control_recv.recv_frame() => match frame? {
                Some(Frame::Heartbeat(hb)) => {
                    if hb.echo_ns != 0 {
                        t.rtt_us.store(now_ns().saturating_sub(hb.echo_ns) / 1000, Ordering::Relaxed);
                    }
                }
                // Nothing past `from` is acknowledged during a copy.
                Some(Frame::Ack(_)) | Some(Frame::VerifyResult(_)) => {}
                Some(Frame::Error(e)) => bail!("standby refused the resync: {:?}: {}", e.code, e.reason),
                Some(other) => bail!("unexpected {:?} frame during a resync", other.frame_type()),
                None => bail!("standby closed the control stream"),
            },
            _ = t.track.kicked() => bail!("resync abandoned: the journal filled up during it"),
            _ = heartbeat.tick() => {
                if t.read(|lc| lc.must_end_session()).is_some() {
                    bail!("resync abandoned: the journal filled up during it");
                }
                s.control_send
                    .send_frame(&Frame::Heartbeat(Heartbeat {
                        epoch,
                        sent_at_ns: now_ns(),
                        echo_ns: 0,
                        last_seq: sh.journal.durable_seq(),
                        sync_loss: t.heartbeat_sync_loss(s.negotiated),
                    }))
                    .await?;
            }
        }
    }
    Ok((bytes, data_bytes))
}

/// The copy's reader thread and its batches. Dropping it closes the channel and
/// joins the thread (it returns at its next send, after at most one batch read).
struct CopyThread {
    rx: mpsc::Receiver<anyhow::Result<ResyncData>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for CopyThread {
    fn drop(&mut self) {
        self.rx.close();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a resync reader thread panicked");
            }
        }
    }
}

/// Clears from the dirty maps every region whose content already matches the
/// standby's (chunk digests, chunk = region, keyed with a fresh random seed).
///
/// Safe after the snapshot is fixed: a region equal now needs no copy, and every
/// write after the snapshot is streamed after the copy anyway (writes are absolute,
/// so replaying them over equal content converges). Saves the copy of regions both
/// sides already hold: a stale replica, or a failed-over primary rejoining with
/// writes of its own after the fork (only the regions either side changed differ).
async fn filter_by_digests(
    t: &Arc<TargetState>,
    s: &mut PrimarySession,
    sh: &Arc<Shared>,
    epoch: u64,
) -> anyhow::Result<()> {
    use crate::verify::chunks::{hash_range, ChunkList, HashParams};
    if t.track.dirty_bytes.load(Ordering::Relaxed) == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let params = HashParams {
        chunk_size: sh.region_size,
        ..HashParams::random(crate::verify::node_digest())?
    };
    // The seed is random per run: it doubles as the exchange's id.
    let id = params.seed;
    s.control_send
        .send_frame(&Frame::DigestRequest(ferry_proto::wire::DigestRequest {
            epoch,
            id,
            chunk_size: params.chunk_size,
            seed: params.seed,
            algo: u32::from(params.algo.id()),
        }))
        .await?;
    // Ours, meanwhile, on the blocking pool.
    let bases = sh.bases.clone();
    let local = tokio::task::spawn_blocking(move || {
        bases
            .iter()
            .map(|b| hash_range(&b.file, 0, b.size, params).map(|l| (b.id, l)))
            .collect::<Result<Vec<_>, _>>()
    });
    let mut remote: Vec<(u32, ChunkList)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while remote.len() < sh.bases.len() {
        let frame = tokio::time::timeout_at(deadline, s.control_recv.recv_frame())
            .await
            .map_err(|_| anyhow!("no digests from the standby within 10 min"))??;
        match frame {
            Some(Frame::VerifyResult(v)) if v.id == id => {
                if !v.ok {
                    bail!(
                        "the standby could not hash volume {}: {}",
                        v.volume,
                        String::from_utf8_lossy(&v.body)
                    );
                }
                remote.push((v.volume, ChunkList::decode(&v.body)?));
            }
            Some(Frame::Heartbeat(_)) | Some(Frame::Ack(_)) | Some(Frame::VerifyResult(_)) => {}
            Some(Frame::Error(e)) => bail!("standby refused: {:?}: {}", e.code, e.reason),
            Some(other) => bail!(
                "unexpected {:?} frame while waiting for digests",
                other.frame_type()
            ),
            None => bail!("standby closed the control stream"),
        }
    }
    let local = local.await??;
    let mut inner = t.track.inner.lock();
    let mut skipped = 0u64;
    for (vol, mine) in &local {
        let Some((_, theirs)) = remote.iter().find(|(v, _)| v == vol) else {
            bail!("the standby sent no digests for volume {vol}");
        };
        if theirs.params != mine.params
            || theirs.len != mine.len
            || theirs.digests.len() != mine.digests.len()
        {
            bail!("the standby's digests of volume {vol} do not match this volume's layout");
        }
        let Some((_, map)) = inner.maps.iter_mut().find(|(v, _)| v == vol) else {
            continue;
        };
        for (i, (a, b)) in mine.digests.iter().zip(&theirs.digests).enumerate() {
            let (off, len) = mine.chunk_range(i);
            // Equal data, or both zero (a zero region would ship as a zero extent,
            // which costs nothing, but skipping it is still less work).
            if a == b && map.is_dirty(off, len) {
                map.clear_range(off, len)?;
                skipped += len;
            }
        }
    }
    t.track.count_dirty(&inner);
    drop(inner);
    tracing::info!(
        target = %t.name,
        skipped_bytes = skipped,
        still_dirty = t.track.dirty_bytes.load(Ordering::Relaxed),
        "resync: regions the standby already holds are not copied (digests compared in {:?})",
        started.elapsed()
    );
    Ok(())
}

/// The lifecycle completed the resync (the target holds its end point durably):
/// the maps go, the target holds the floor with its ack again. Blocking (file
/// deletions).
pub fn complete_resync(t: &TargetState) {
    let tr = &t.track;
    let Some(sh) = tr.shared.get() else { return };
    let mut inner = tr.inner.lock();
    tr.stop_live();
    inner.maps.clear();
    tr.dirty_bytes.store(0, Ordering::Relaxed);
    for b in &sh.bases {
        if let Err(e) = DirtyMap::remove(&map_path(&sh.dir, &t.name, &b.name)) {
            // Left behind, it only makes the next start resync this target again.
            tracing::error!(target = %t.name, "removing a dirty map after the resync: {e}");
        }
    }
    tracing::info!(
        target = %t.name,
        lost = ?t.snapshot().points_lost,
        "resync complete: the target is streaming again"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::target::tests::{plan, target};
    use ferry_api::config::ReplicationMode;
    use ferry_journal::{Journal, Record};
    use ferry_proto::target::{EffectiveMode, SwitchKind, Tracking};

    /// The tracking mode as status names it.
    fn mode(t: &TargetState) -> &'static str {
        t.snapshot().tracking.as_str()
    }

    /// A plan whose session resyncs in full from `resume` (the journal released it).
    fn full_plan(resume: Seq) -> HelloPlan {
        let mut p = plan(resume, true);
        p.start = PlanStart::Resync {
            full: Some(FullReason::JournalReleased),
        };
        p
    }

    fn no_fill() -> JournalFill {
        JournalFill {
            used_bytes: 0,
            capacity_bytes: 1,
        }
    }

    /// Runs a resync session through the lifecycle from `from` to an ack of its end
    /// point, then carries out the completion.
    fn finish_resync(t: &TargetState, from: Seq) {
        let out = t.update(|lc| {
            lc.connecting();
            lc.session_started(&plan(from, true), from, from);
            lc.resync_begin(from, from).unwrap();
            lc.resync_copied(from, from);
            lc.on_ack(from, from, from)
        });
        assert!(out.resync_complete);
        complete_resync(t);
    }

    #[test]
    fn region_bits_mark_coalesce_and_clip() {
        let mut b = RegionBits::new(10 * 4096 + 100, 4096);
        assert!(b.take().is_empty());
        b.mark(0, 1);
        b.mark(4095, 2); // regions 0 and 1
        b.mark(5 * 4096, 4096); // region 5 exactly
        b.mark(10 * 4096 + 50, 1000); // the short last region, clipped
        b.mark(0, 0);
        b.mark(1 << 40, 10); // past the end: ignored
        assert_eq!(
            b.take(),
            vec![(0, 2 * 4096), (5 * 4096, 4096), (10 * 4096, 100)]
        );
        assert!(b.take().is_empty(), "take clears");
        // Many regions across word boundaries coalesce into one range.
        let mut b = RegionBits::new(1 << 30, 65536);
        b.mark(63 * 65536, 3 * 65536);
        b.mark(200 * 65536 + 1, 1);
        assert_eq!(
            b.take(),
            vec![(63 * 65536, 3 * 65536), (200 * 65536, 65536)]
        );
    }

    struct Rig {
        dir: tempfile::TempDir,
        sh: Arc<Shared>,
        cfg: Config,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let mut o = ferry_journal::JournalOptions::new(dir.path().join("j"), [1; 16]);
        o.segment_size = 1 << 20;
        o.capacity = 8 << 20;
        o.engine = ferry_journal::EngineChoice::Std;
        let (journal, _) = Journal::open(o).unwrap();
        let path = dir.path().join("v0.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let base = Arc::new(Base::open(0, "v0", &path, 4 << 20).unwrap());
        let journal = Arc::new(journal);
        let j = journal.clone();
        let cfg = Config::parse(&format!(
            r#"
[node]
name = "primary"
role = "primary"
cluster_id = "00112233445566778899aabbccddeeff"
metadata_dir = "{}"
[journal]
dir = "j"
size = "8MiB"
[control]
socket = "s"
[replication]
listen = "127.0.0.1:7000"
primary = "primary"
[[replication.target]]
name = "dr1"
address = "127.0.0.1:7001"
[[volume]]
name = "v0"
path = "{}"
size = "4MiB"
"#,
            dir.path().display(),
            path.display()
        ))
        .unwrap();
        let sh = Arc::new(Shared {
            journal,
            bases: vec![base],
            applied: Arc::new(move || j.durable_seq()),
            checkpoint: Arc::new(|| 0),
            sync: None,
            dir: dir.path().join("dirty"),
            region_size: 65536,
        });
        Rig { dir, sh, cfg }
    }

    impl Rig {
        fn target(&self) -> Arc<TargetState> {
            let t = crate::ship::target_states(&self.cfg, 0, |_| false).remove(0);
            let _ = t.track.shared.set(self.sh.clone());
            t
        }

        /// Journals a 4 KiB write at `offset`, calling the marking hook as the
        /// journal's completion path would.
        fn write(&self, t: &TargetState, offset: u64) -> Seq {
            let rec = Record::write(0, offset, bytes::Bytes::from(vec![1u8; 4096]));
            let seq = self.sh.journal.append_wait(rec.clone()).unwrap();
            t.track.on_durable(seq, &rec);
            seq
        }

        fn dirty(&self, t: &TargetState) -> Vec<(u64, u64)> {
            let inner = t.track.inner.lock();
            inner.maps[0].1.dirty_ranges().collect()
        }
    }

    /// A full resync of a target already in bitmap mode (a failback past the fork:
    /// its maps start at this primary's old position) marks every region, durably
    /// (the maps reopened after a restart still have them all).
    #[test]
    fn a_full_switch_of_a_bitmap_target_marks_every_region_durably() {
        let r = rig();
        let t = r.target();
        for i in 0..4u64 {
            r.write(&t, i * 65536);
        }
        t.streaming_at(2);
        switch(&t, &r.sh, no_fill()).unwrap();
        assert_eq!(r.dirty(&t), vec![(2 * 65536, 2 * 65536)]);
        switch_full(&t, &full_plan(3)).unwrap();
        assert_eq!(mode(&t), "bitmap");
        assert_eq!(r.dirty(&t), vec![(0, 4 << 20)]);
        assert_eq!(t.floor(), 4, "the marks through 4 stay durable");
        drop(t);
        let t = r.target();
        load(&t, &r.sh).unwrap();
        assert_eq!(r.dirty(&t), vec![(0, 4 << 20)]);
    }

    /// Switch, live marks, the crash rule (the floor follows durable marks only),
    /// restart, an unfinished switch and a failed flush.
    #[test]
    fn bitmap_mode_marks_flushes_and_survives_a_restart() {
        let r = rig();
        let t = r.target();
        for i in 0..10u64 {
            r.write(&t, i * 65536);
        }
        t.streaming_at(5);
        switch(&t, &r.sh, no_fill()).unwrap();
        assert_eq!(mode(&t), "bitmap");
        // Records 6..=10 wrote regions 5..=9.
        assert_eq!(r.dirty(&t), vec![(5 * 65536, 5 * 65536)]);
        assert_eq!(t.floor(), 10, "every record up to 10 durably marked");
        // New writes are marked live; the floor moves only with a flush.
        let s = r.write(&t, 40 * 65536 + 100);
        assert_eq!(t.floor(), 10);
        t.flush(true);
        assert_eq!(t.floor(), s);
        assert_eq!(
            r.dirty(&t),
            vec![(5 * 65536, 5 * 65536), (40 * 65536, 65536)]
        );
        // A flush that fails holds the floor (and keeps the marks in memory).
        let tdir = r.sh.dir.join("dr1");
        let saved = r.dir.path().join("saved");
        std::fs::rename(&tdir, &saved).unwrap();
        let s2 = r.write(&t, 50 * 65536);
        t.flush(true);
        assert_eq!(t.floor(), s, "held while the flush fails");
        std::fs::rename(&saved, &tdir).unwrap();
        t.flush(true);
        assert_eq!(t.floor(), s2);
        // One more write, not flushed, then a "restart": the maps are reopened and
        // the journal records after their through_seq are marked again.
        r.write(&t, 60 * 65536);
        assert_eq!(persisted_floor(&r.cfg), s2);
        drop(t);
        let t = r.target();
        load(&t, &r.sh).unwrap();
        assert_eq!(mode(&t), "bitmap");
        assert_eq!(t.floor(), s2);
        assert_eq!(
            r.dirty(&t),
            vec![
                (5 * 65536, 5 * 65536),
                (40 * 65536, 65536),
                (50 * 65536, 65536),
                (60 * 65536, 65536)
            ]
        );
        assert_eq!(t.snapshot().effective_mode, EffectiveMode::Degraded);
        // Completing a resync removes the maps.
        finish_resync(&t, s2);
        assert_eq!(mode(&t), "streaming");
        assert_eq!(persisted_floor(&r.cfg), Seq::MAX);
        // An unfinished switch (a map still at through_seq 0) is discarded at load.
        DirtyMap::create(&map_path(&r.sh.dir, "dr1", "v0"), 4 << 20, 65536).unwrap();
        let t = r.target();
        load(&t, &r.sh).unwrap();
        assert_eq!(mode(&t), "streaming");
        assert!(!map_path(&r.sh.dir, "dr1", "v0").exists());
        // A target whose next record is gone is switched with every region dirty.
        switch_full(&t, &full_plan(3)).unwrap();
        assert_eq!(mode(&t), "bitmap");
        assert_eq!(r.dirty(&t), vec![(0, 4 << 20)]);
        assert_eq!(t.track.dirty_bytes.load(Ordering::Relaxed), 4 << 20);
    }

    #[test]
    fn floor_depends_on_the_mode() {
        let t = target("a", ReplicationMode::Sync, 10);
        assert_eq!(t.floor(), 10, "streaming: the ack");
        t.update(|lc| lc.begin_overflow_switch());
        assert_eq!(t.floor(), 10, "switching: still the ack");
        t.update(|lc| lc.bitmap_entered(50));
        assert_eq!(t.floor(), 50, "bitmap: what is durably marked");
        t.update(|lc| {
            lc.connecting();
            lc.session_started(&plan(10, true), 10, 10);
            lc.resync_begin(10, 40).unwrap();
        });
        assert_eq!(t.floor(), 40, "resyncing: the snapshot");
        t.update(|lc| lc.resync_copied(100, 100));
        t.update(|lc| lc.on_ack(45, 45, 100));
        assert_eq!(t.floor(), 45, "resyncing: the ack once past it");
        t.update(|lc| lc.on_ack(60, 60, 100));
        assert_eq!(t.floor(), 50, "never past the durable marks");
        let switching = Tracking::Switching {
            base: 0,
            kind: SwitchKind::Overflow,
        };
        assert_eq!(switching.as_str(), "streaming");
    }
}
