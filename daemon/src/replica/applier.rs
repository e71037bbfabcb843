//! The replica applier: applies received write-sets and resync batches to the
//! replica volumes, with undo capture first when point-in-time recovery is on, and
//! records bookmarks and starts verifies carried as labelled seals. With capture on,
//! what it is handed is applied in units bounded by the bytes their capture reads
//! ([`UNIT_CAPTURE_MAX`]), each its own recovery point.
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::Context;
use ferry_journal::{EntryKind, Op, Record, Seq};

use crate::pit::Pit;
use crate::replica::transition::ResyncStatus;
use crate::store::base::{find_base, Base};
use crate::store::meta::{Bookmark, Meta};
use crate::verify::{Outbox, Verifier};

/// Before-image bytes one apply unit reads at most: the lengths its records
/// overwrite (a trim or a zeroing counts its whole range, though it carries no
/// data). A queue of many large trims is applied as several units, each its own
/// recovery point, rather than one whose capture, and replay after a crash, grow
/// with the size of the discard. One larger record is a unit of its own (its
/// before-images go to the undo log in bounded pieces).
pub const UNIT_CAPTURE_MAX: u64 = 64 << 20;

/// Applies write-sets to the replica, with undo capture when PIT is on.
pub struct Applier {
    pub bases: Vec<Arc<Base>>,
    pub meta: Arc<Meta>,
    pub pit: Option<Arc<Pit>>,
    /// Online verifies armed on this standby (copy-before-write before each apply).
    pub verify: Arc<Verifier>,
    /// The replica's applied position (verify hashers wait on it).
    pub applied: Arc<AtomicU64>,
    /// Where verify answers go for the replication session.
    pub outbox: Arc<Outbox>,
    /// A bitmap resync transition in progress on this standby (mirrors the metadata).
    pub resync: Arc<ResyncStatus>,
}

impl Applier {
    /// Applies one write-set (records `first..=last`, stamped `ts` by the primary).
    /// With PIT on, its before-images are durable first. Bookmarks (labelled seals)
    /// are recorded once applied. During a resync transition a write-set that ends
    /// before its `through` point is no recovery point (a resync undo entry); the
    /// first one that reaches it ends the transition.
    /// Any journal prefix is a consistent state, so the records are applied in
    /// units cut at record boundaries by [`UNIT_CAPTURE_MAX`] when PIT is on.
    pub fn apply_write_set(&self, ts: u64, recs: &[(Seq, Record)]) -> anyhow::Result<()> {
        if self.pit.is_none() {
            return self.apply_unit(ts, recs);
        }
        for unit in capture_units(recs, UNIT_CAPTURE_MAX) {
            self.apply_unit(ts, unit)?;
        }
        Ok(())
    }

    /// Applies one unit: before-images first (PIT on), then the records; the end of
    /// the unit is a recovery point.
    fn apply_unit(&self, ts: u64, recs: &[(Seq, Record)]) -> anyhow::Result<()> {
        let (Some(&(first, _)), Some(&(last, _))) = (recs.first(), recs.last()) else {
            return Ok(());
        };
        let window = self.resync.get();
        let kind = match window {
            Some(w) if !w.copied || last < w.through => EntryKind::Resync,
            _ => EntryKind::WriteSet,
        };
        if let Some(pit) = &self.pit {
            pit.capture(first, last, ts, recs, kind)?;
        }
        self.apply_records(ts, recs)?;
        if let Some(pit) = &self.pit {
            pit.retain(last);
        }
        if let Some(w) = window.filter(|w| w.copied && last >= w.through) {
            self.meta
                .set_resync_state(None)
                .context("recording the end of the resync")?;
            self.resync.set(None);
            tracing::info!(
                from = w.from,
                through = w.through,
                applied = last,
                "resync complete: the replica is a consistent image again"
            );
        }
        Ok(())
    }

    /// Applies one batch of a resync copy (records over ranges of the replica, all
    /// "after" `snapshot`): before-images first (a resync undo entry), then the data.
    pub fn apply_resync_batch(
        &self,
        snapshot: Seq,
        ts: u64,
        recs: &[(Seq, Record)],
    ) -> anyhow::Result<()> {
        if let Some(pit) = &self.pit {
            pit.capture(snapshot + 1, snapshot, ts, recs, EntryKind::Resync)?;
        }
        self.apply_records(ts, recs)
    }

    fn apply_records(&self, ts: u64, recs: &[(Seq, Record)]) -> anyhow::Result<()> {
        for (seq, r) in recs {
            if r.op == Op::Seal {
                // Labels starting with '#' are control markers (no bookmark name can).
                if let Some(label) = std::str::from_utf8(&r.data)
                    .ok()
                    .filter(|l| l.starts_with(crate::verify::LABEL_PREFIX))
                {
                    crate::verify::start_on_standby(
                        label,
                        *seq,
                        &self.bases,
                        &self.verify,
                        self.applied.clone(),
                        self.outbox.clone(),
                    );
                    continue;
                }
                // Other control markers (an archive's base point) are no bookmark.
                if !r.data.is_empty() && !r.data.starts_with(b"#") {
                    let b = Bookmark {
                        name: String::from_utf8_lossy(&r.data).into_owned(),
                        seq: *seq,
                        timestamp_ns: ts,
                    };
                    self.meta
                        .add_bookmark(&b)
                        .with_context(|| format!("recording bookmark '{}'", b.name))?;
                    tracing::info!(name = %b.name, seq, "bookmark received");
                }
                continue;
            }
            let base = find_base(&self.bases, r.volume, *seq)?;
            self.verify
                .before_write(*seq, base, r.offset, r.length as u64);
            base.apply(r.op, r.offset, r.length, &r.data)
                .with_context(|| format!("applying record {seq} to {}", base.path.display()))?;
        }
        Ok(())
    }
}

/// Bytes of before-images capturing `r` reads at most.
fn capture_cost(r: &Record) -> u64 {
    if r.op == Op::Seal {
        0
    } else {
        u64::from(r.length)
    }
}

/// `recs` cut at record boundaries into units whose capture reads at most `max`
/// bytes (a single larger record alone). Records that capture nothing (seals)
/// never start a unit: a seal stays the end of the records before it.
fn capture_units(recs: &[(Seq, Record)], max: u64) -> Vec<&[(Seq, Record)]> {
    let mut units = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, (_, r)) in recs.iter().enumerate() {
        let cost = capture_cost(r);
        if cost > 0 && bytes > 0 && bytes.saturating_add(cost) > max {
            units.push(&recs[start..i]);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(cost);
    }
    if start < recs.len() {
        units.push(&recs[start..]);
    }
    units
}

/// An applier without PIT over one zeroed 1 MiB volume `volume` in `dir`, with its
/// metadata there too: the rig of the applier's and the apply loop's unit tests.
#[cfg(test)]
pub(crate) fn scratch_applier(dir: &std::path::Path, volume: u32) -> Applier {
    let path = dir.join("v.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .expect("a scratch volume");
    Applier {
        bases: vec![Arc::new(
            Base::open(volume, "v", &path, 1 << 20).expect("base"),
        )],
        meta: Arc::new(Meta::open(&dir.join("meta"), [1; 16]).expect("metadata")),
        pit: None,
        verify: Default::default(),
        applied: Default::default(),
        outbox: Default::default(),
        resync: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// Units are cut by the bytes their capture reads, never before a seal, and a
    /// record larger than the bound is a unit alone.
    #[test]
    fn units_are_bounded_by_capture_bytes() {
        let rec = |op, length| Record {
            volume: 0,
            op,
            offset: 0,
            length,
            data: Bytes::new(),
        };
        let recs: Vec<(Seq, Record)> = [
            (Op::Trim, 40),
            (Op::Write, 30),
            (Op::Seal, 0),
            (Op::WriteZeroes, 100),
            (Op::Trim, 10),
            (Op::Trim, 10),
            (Op::Seal, 0),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (op, len))| (i as u64 + 1, rec(op, len)))
        .collect();
        let cuts: Vec<Vec<u64>> = capture_units(&recs, 50)
            .iter()
            .map(|u| u.iter().map(|(s, _)| *s).collect())
            .collect();
        assert_eq!(cuts, vec![vec![1], vec![2, 3], vec![4], vec![5, 6, 7]]);
        assert_eq!(capture_units(&recs, u64::MAX).len(), 1);
        assert!(capture_units(&[], 50).is_empty());
    }

    /// Without PIT: records land on their volume, a labelled seal is a bookmark, an
    /// unknown volume is an error (never a dropped record).
    #[test]
    fn write_sets_land_on_their_volume_and_seals_become_bookmarks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let applier = scratch_applier(dir.path(), 5);
        let rec = |volume, op, offset, data: &[u8], length| Record {
            volume,
            op,
            offset,
            length,
            data: Bytes::copy_from_slice(data),
        };
        applier
            .apply_write_set(
                77,
                &[
                    (1, rec(5, Op::Write, 4096, &[9; 8192], 8192)),
                    (2, rec(5, Op::Trim, 8192, &[], 4096)),
                    (3, rec(5, Op::Seal, 0, b"nightly", 0)),
                ],
            )
            .unwrap();
        let img = std::fs::read(&path).unwrap();
        assert!(img[4096..8192].iter().all(|&b| b == 9));
        assert!(img[8192..12288].iter().all(|&b| b == 0), "trim left data");
        assert!(img[..4096].iter().chain(&img[12288..]).all(|&b| b == 0));
        let b = applier.meta.bookmarks().unwrap();
        assert_eq!(
            (b[0].name.as_str(), b[0].seq, b[0].timestamp_ns),
            ("nightly", 3, 77)
        );
        let e = applier
            .apply_write_set(78, &[(4, rec(6, Op::Write, 0, &[1], 1))])
            .unwrap_err();
        assert!(e.to_string().contains("volume id 6"), "{e}");
        assert!(
            applier.apply_write_set(79, &[]).is_ok(),
            "an empty write-set"
        );
    }
}
