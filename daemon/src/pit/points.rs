//! Recovery points: the targets an operator names (sequence, time, bookmark), their
//! resolution to a reachable write-set boundary, and the list of retained points.
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail};
use ferry_journal::UndoLog;

use super::Pit;
use ferry_api::timefmt::format_rfc3339;

/// A recovery point named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Seq(u64),
    /// ns since the Unix epoch (primary clock).
    Time(u64),
    Bookmark(String),
}

/// A resolved point: the replica state right after `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Point {
    pub seq: u64,
    /// Primary timestamp of the write-set ending at `seq` (0 if unknown: the oldest
    /// boundary, whose write-set's entry is gone).
    pub timestamp_ns: u64,
}

impl Pit {
    /// Resolves a target to a reachable point at or below the applied position.
    pub fn resolve(&self, t: &Target) -> anyhow::Result<Point> {
        let undo = self.undo.lock();
        self.resolve_locked(&undo, t)
    }

    pub(super) fn resolve_locked(&self, undo: &UndoLog, t: &Target) -> anyhow::Result<Point> {
        if let Some(why) = self.broken.lock().clone() {
            bail!("no recovery points: {why}");
        }
        let resync = self.meta.resync_state()?;
        let applied = self.applied.load(Ordering::Acquire);
        let seq = match t {
            Target::Seq(s) => *s,
            Target::Bookmark(name) => {
                let b = self
                    .meta
                    .bookmarks()?
                    .into_iter()
                    .find(|b| &b.name == name)
                    .ok_or_else(|| anyhow!("no bookmark named '{name}' on this node"))?;
                b.seq
            }
            Target::Time(ns) => {
                let Some(p) = undo.find_by_time(*ns) else {
                    let oldest = undo
                        .points()
                        .first()
                        .map(|p| format_rfc3339(p.timestamp_ns));
                    bail!(
                        "{} is before the oldest retained point ({})",
                        format_rfc3339(*ns),
                        oldest
                            .as_deref()
                            .unwrap_or("none: no write-set applied yet")
                    );
                };
                p.seq.min(applied)
            }
        };
        if let Some(r) = resync.filter(|r| seq > r.from) {
            bail!(
                "point {seq} is not available: the replica is inconsistent while it is \
                 resynced from the primary (its last consistent point is {}; it is \
                 consistent again once {} is applied)",
                r.from,
                if r.through > 0 {
                    r.through.to_string()
                } else {
                    "the copy's end point".to_string()
                }
            );
        }
        if seq > applied {
            bail!("point {seq} is not applied on this standby yet (applied: {applied})");
        }
        if seq == applied {
            let ts = undo
                .find_by_seq(seq)
                .filter(|p| p.seq == seq)
                .map_or(0, |p| p.timestamp_ns);
            return Ok(Point {
                seq,
                timestamp_ns: ts,
            });
        }
        // Validates the boundary (inside a write-set, or older than retained).
        let after = undo
            .points_after(seq)
            .map_err(|e| anyhow!("point {seq}: {e}"))?;
        if after.is_empty() {
            bail!("point {seq}: the undo log holds nothing after it (applied: {applied})");
        }
        let ts = undo
            .find_by_seq(seq)
            .filter(|p| p.seq == seq)
            .map_or(0, |p| p.timestamp_ns);
        Ok(Point {
            seq,
            timestamp_ns: ts,
        })
    }
    /// Retained points, oldest first (at most `limit`, newest kept).
    pub fn points(&self, limit: usize) -> Vec<Point> {
        let undo = self.undo.lock();
        let p: Vec<_> = undo.recovery_points().collect();
        p[p.len().saturating_sub(limit)..]
            .iter()
            .map(|p| Point {
                seq: p.seq,
                timestamp_ns: p.timestamp_ns,
            })
            .collect()
    }

    /// Whether bookmark seq `seq` is still reachable.
    pub fn reachable(&self, seq: u64) -> bool {
        let undo = self.undo.lock();
        let applied = self.applied.load(Ordering::Acquire);
        seq == applied || (seq < applied && undo.points_after(seq).is_ok_and(|a| !a.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::testrig::rig;
    use ferry_journal::Op;

    #[test]
    fn targets_resolve_or_say_why_not() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(
            1_000,
            &[(Op::Write, 0, 4096, 1), (Op::Write, 8192, 4096, 2)],
        );
        r.apply(2_000, &[(Op::Write, 0, 4096, 3), (Op::Seal, 0, 0, 7)]);
        r.apply(3_000, &[(Op::Write, 0, 4096, 4)]);
        let p = |t| r.pit.resolve(&t).map(|p| p.seq).map_err(|e| e.to_string());
        assert_eq!(p(Target::Seq(2)), Ok(2));
        assert_eq!(p(Target::Seq(0)), Ok(0));
        assert_eq!(p(Target::Bookmark("mark7".into())), Ok(4));
        assert_eq!(p(Target::Time(2_500)), Ok(4));
        assert_eq!(p(Target::Time(1_000_000)), Ok(5));
        assert!(p(Target::Seq(1)).unwrap_err().contains("inside write-set"));
        assert!(p(Target::Seq(9)).unwrap_err().contains("not applied"));
        assert!(p(Target::Time(999))
            .unwrap_err()
            .contains("before the oldest"));
        assert!(p(Target::Bookmark("nope".into()))
            .unwrap_err()
            .contains("no bookmark"));
        // The bookmark came with the stream.
        let b = r.applier.meta.bookmarks().unwrap();
        assert_eq!(
            (b[0].name.as_str(), b[0].seq, b[0].timestamp_ns),
            ("mark7", 4, 2_000)
        );
    }
}
