//! The fault schedule: which fault comes next and its parameters, drawn from the
//! seed's own random stream, so `--seed N` replays the same schedule (the timing of
//! a real cluster still varies between runs).

use crate::block::splitmix;
use crate::cluster::{Area, AREAS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillPrimary,
    KillStandby,
    Partition,
    Flap,
    Lossy,
    Delay,
    /// On the primary (`true`) or the standby.
    DiskFull(bool, Area),
    Switchover,
    Failover,
}

impl Fault {
    /// The kind, for the per-kind counts.
    pub fn kind(self) -> &'static str {
        match self {
            Fault::KillPrimary => "sigkill primary",
            Fault::KillStandby => "sigkill standby",
            Fault::Partition => "partition",
            Fault::Flap => "flapping link",
            Fault::Lossy => "lossy link (drop/dup/reorder)",
            Fault::Delay => "delayed link",
            Fault::DiskFull(_, Area::Journal) => "disk full: journal",
            Fault::DiskFull(_, Area::Undo) => "disk full: undo log",
            Fault::DiskFull(_, Area::Replica) => "disk full: volume/replica",
            Fault::Switchover => "switchover (planned)",
            Fault::Failover => "failover (kill, promote --force, demote)",
        }
    }
}

/// The seed's random stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        splitmix(&mut self.0)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }

    /// The next fault; disk-full only where loop filesystems exist.
    pub fn fault(&mut self, disk: bool) -> Fault {
        // (weight, fault) — kills and partitions most often, role changes less.
        let table: [(u64, Fault); 9] = [
            (3, Fault::KillPrimary),
            (3, Fault::KillStandby),
            (3, Fault::Partition),
            (2, Fault::Flap),
            (2, Fault::Lossy),
            (1, Fault::Delay),
            (
                if disk { 3 } else { 0 },
                Fault::DiskFull(false, Area::Journal),
            ),
            (2, Fault::Switchover),
            (2, Fault::Failover),
        ];
        let total: u64 = table.iter().map(|(w, _)| w).sum();
        let mut r = self.range(0, total);
        for (w, f) in table {
            if r < w {
                return match f {
                    Fault::DiskFull(..) => {
                        let on_primary = self.next() % 2 == 0;
                        Fault::DiskFull(on_primary, AREAS[self.range(0, 3) as usize])
                    }
                    f => f,
                };
            }
            r -= w;
        }
        Fault::Partition
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_its_schedule_and_disk_faults_only_where_possible() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let sa: Vec<Fault> = (0..50).map(|_| a.fault(true)).collect();
        let sb: Vec<Fault> = (0..50).map(|_| b.fault(true)).collect();
        assert_eq!(sa, sb);
        assert!(sa.iter().any(|f| matches!(f, Fault::DiskFull(..))));
        let mut c = Rng::new(42);
        assert!((0..200).all(|_| !matches!(c.fault(false), Fault::DiskFull(..))));
    }
}
