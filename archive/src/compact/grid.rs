//! The retention grid as compaction uses it: which points a level keeps, and — pure,
//! for tests and `archive list` — which points the grid requires at a given time.
//!
//! Levels follow the grid's tiers: level 0 holds the packs as uploaded (every
//! write-set), level `k ≥ 1` holds points thinned to tier `k`'s period. A pack moves
//! from level `k-1` to `k` once its newest point is older than tier `k-1`'s horizon,
//! and is dropped once its newest point is older than the longest horizon (and a base
//! newer than it exists). Periods nest (each a multiple of the one before, checked by
//! the parser), so the last point of a coarse bucket is also the last of its finer
//! bucket: thinning again as a point ages never needs a point an earlier pass dropped.

/// Nanoseconds per second.
const NS: u64 = 1_000_000_000;

/// One tier: one point per `period_ns` while younger than `horizon_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub period_ns: u64,
    pub horizon_ns: u64,
}

/// A validated retention grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// Every write-set stays while younger than this (0: none).
    every_for_ns: u64,
    tiers: Vec<Tier>,
}

/// A restorable point: a write-set's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub end_seq: u64,
    pub timestamp_ns: u64,
    /// The write-set ends with a bookmark (a seal whose label is not internal).
    pub bookmark: bool,
}

impl Grid {
    /// `every_for_ns` (0: no every-write-set tier) and the tiers, horizons and periods
    /// growing, each period a multiple of the previous one.
    pub fn new(every_for_ns: u64, tiers: Vec<Tier>) -> Result<Grid, String> {
        let mut horizon = every_for_ns;
        let mut period = 0;
        for (i, t) in tiers.iter().enumerate() {
            let bad = |why: &str| Err(format!("retention tier {}: {why}", i + 1));
            if t.period_ns == 0 || t.period_ns > t.horizon_ns {
                return bad("period zero or longer than its horizon");
            }
            if t.horizon_ns <= horizon {
                return bad("horizon not longer than the previous one");
            }
            if t.period_ns <= period || (period > 0 && !t.period_ns.is_multiple_of(period)) {
                return bad("period not a longer multiple of the previous one");
            }
            (horizon, period) = (t.horizon_ns, t.period_ns);
        }
        if horizon == 0 {
            return Err("retention grid without any tier".into());
        }
        Ok(Grid {
            every_for_ns,
            tiers,
        })
    }

    /// The highest level (one per thinning tier).
    pub fn levels(&self) -> u8 {
        self.tiers.len() as u8
    }

    /// How old a point may get at `level` before it moves up (or, at the top, out).
    pub fn horizon(&self, level: u8) -> u64 {
        match level {
            0 => self.every_for_ns,
            k => self.tiers[(k as usize - 1).min(self.tiers.len() - 1)].horizon_ns,
        }
    }

    /// The thinning period of `level` (≥ 1).
    pub fn period(&self, level: u8) -> u64 {
        self.tiers[(level.max(1) as usize - 1).min(self.tiers.len() - 1)].period_ns
    }

    /// Points and bookmarks older than this are compacted away.
    pub fn longest(&self) -> u64 {
        self.tiers
            .last()
            .map_or(self.every_for_ns, |t| t.horizon_ns)
    }

    /// A level's packs are cut at multiples of this (time since the Unix epoch), so a
    /// pack spans at most ~1/24 of its tier and moves up soon after its points do.
    pub fn window(&self, level: u8) -> u64 {
        let p = self.period(level);
        let span = (self.horizon(level) / 24).max(p);
        span.div_ceil(p) * p
    }

    /// Which of `points` (oldest first) the grid requires at `now`: every write-set
    /// younger than the first horizon, bookmarks younger than the longest, and the
    /// last point of each period-bucket of the tier its age falls in. The newest point
    /// is always required.
    pub fn required(&self, points: &[Point], now: u64) -> Vec<bool> {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let age = now.saturating_sub(p.timestamp_ns);
                let Some(next) = points.get(i + 1) else {
                    return age < self.longest();
                };
                if age < self.every_for_ns || (p.bookmark && age < self.longest()) {
                    return true;
                }
                self.tiers
                    .iter()
                    .find(|t| age < t.horizon_ns)
                    .is_some_and(|t| {
                        p.timestamp_ns / t.period_ns != next.timestamp_ns / t.period_ns
                    })
            })
            .collect()
    }
}

/// Seconds to nanoseconds (tests and callers that think in seconds).
pub const fn secs(s: u64) -> u64 {
    s * NS
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn issue_grid() -> Grid {
        Grid::new(
            secs(3600),
            vec![
                Tier {
                    period_ns: secs(60),
                    horizon_ns: secs(24 * 3600),
                },
                Tier {
                    period_ns: secs(3600),
                    horizon_ns: secs(30 * 86_400),
                },
            ],
        )
        .unwrap()
    }

    fn pt(ts_s: u64) -> Point {
        Point {
            end_seq: ts_s,
            timestamp_ns: secs(ts_s),
            bookmark: false,
        }
    }

    #[test]
    fn the_issue_s_grid_keeps_what_it_says() {
        let g = issue_grid();
        let now = secs(40 * 86_400);
        // Every 10 s for the last 40 days.
        let pts: Vec<Point> = (0..40 * 8640).map(|i| pt(i * 10)).collect();
        let keep = g.required(&pts, now);
        let kept: Vec<&Point> = pts
            .iter()
            .zip(&keep)
            .filter(|x| *x.1)
            .map(|x| x.0)
            .collect();
        let age = |p: &Point| (now - p.timestamp_ns) / NS;
        // Younger than 1 h: all of them (ages 10 s .. 3590 s).
        assert_eq!(kept.iter().filter(|p| age(p) < 3600).count(), 359);
        // 1 h .. 24 h: one per minute (the minute's last point).
        let minute = kept
            .iter()
            .filter(|p| (3600..86_400).contains(&age(p)))
            .count();
        assert_eq!(minute, 23 * 60);
        // 24 h .. 30 d: one per hour.
        let hour = kept
            .iter()
            .filter(|p| (86_400..30 * 86_400).contains(&age(p)))
            .count();
        assert_eq!(hour, 29 * 24);
        assert!(kept.iter().all(|p| age(p) < 30 * 86_400));
        assert!(keep[keep.len() - 1], "the newest point is always kept");
        for p in kept.iter().filter(|p| (3600..86_400).contains(&age(p))) {
            assert_eq!((p.timestamp_ns / NS) % 60, 50, "the minute's last point");
        }
    }

    #[test]
    fn bookmarks_live_as_long_as_the_longest_horizon() {
        let g = issue_grid();
        let now = secs(40 * 86_400);
        let mut pts: Vec<Point> = (0..40 * 8640).map(|i| pt(i * 10)).collect();
        let (young, old) = (pts.len() - 200_000, 10);
        pts[young].bookmark = true;
        pts[old].bookmark = true;
        let keep = g.required(&pts, now);
        assert!(keep[young]);
        assert!(!keep[old], "older than 30 d: gone");
    }

    #[test]
    fn windows_and_levels() {
        let g = issue_grid();
        assert_eq!(g.levels(), 2);
        assert_eq!(g.window(1), secs(3600));
        assert_eq!(g.window(2), secs(30 * 3600));
        assert_eq!(g.horizon(0), secs(3600));
        assert_eq!(g.horizon(2), g.longest());
        assert!(Grid::new(0, vec![]).is_err());
        assert!(Grid::new(
            0,
            vec![
                Tier {
                    period_ns: 2,
                    horizon_ns: 10
                },
                Tier {
                    period_ns: 3,
                    horizon_ns: 20
                }
            ]
        )
        .is_err());
    }

    proptest! {
        /// Thinning is monotone in time: a point not required now is never required
        /// later (compaction may drop it for good), and a required point older than
        /// the every-write-set tier was the last of its bucket at every finer tier.
        #[test]
        fn a_dropped_point_never_comes_back(
            gaps in proptest::collection::vec(1u64..400, 1..300),
            step in 1u64..5000,
            marks in proptest::collection::vec(any::<bool>(), 300),
        ) {
            let g = Grid::new(secs(600), vec![
                Tier { period_ns: secs(60), horizon_ns: secs(7200) },
                Tier { period_ns: secs(600), horizon_ns: secs(86_400) },
            ]).unwrap();
            let mut ts = 0;
            let pts: Vec<Point> = gaps.iter().zip(&marks).map(|(g, &m)| {
                ts += g;
                Point { end_seq: ts, timestamp_ns: secs(ts), bookmark: m }
            }).collect();
            let t0 = secs(ts);
            let earlier = g.required(&pts, t0);
            let later = g.required(&pts, t0 + secs(step));
            for i in 0..pts.len() {
                prop_assert!(!later[i] || earlier[i], "point {i} dropped at t0, required later");
            }
        }
    }
}
