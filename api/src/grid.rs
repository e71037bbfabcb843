//! An archive target's retention grid (`retention = "every write-set for 1h, 1 per
//! minute for 24h, 1 per hour for 30d"`): which points of the cold tier stay
//! restorable as they age. Parsed here so a config error names the key and the tier;
//! what the grid keeps and how compaction enforces it is `ferry_archive::compact`.
use std::fmt;
use std::time::Duration;

/// The parsed grid: an optional "every write-set" tier first, then tiers of one point
/// per `period`, each reaching further back than the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionGrid {
    /// Every write-set stays restorable while younger than this.
    pub every_for: Option<Duration>,
    /// `(period, horizon)`: one point per `period` while younger than `horizon`.
    pub tiers: Vec<(Duration, Duration)>,
    /// The text as configured (written back unchanged).
    pub text: String,
}

impl RetentionGrid {
    /// The longest horizon: older points (and bookmarks) are compacted away.
    pub fn longest(&self) -> Duration {
        self.tiers
            .last()
            .map(|t| t.1)
            .or(self.every_for)
            .unwrap_or_default()
    }

    /// Parses the comma-separated tiers; the error names the tier and what is wrong.
    pub fn parse(text: &str) -> Result<RetentionGrid, String> {
        let mut grid = RetentionGrid {
            every_for: None,
            tiers: Vec::new(),
            text: text.to_string(),
        };
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.iter().all(|p| p.is_empty()) {
            return Err("empty: give tiers like \"every write-set for 1h, 1 per minute for 24h, 1 per hour for 30d\"".into());
        }
        let (mut last_period, mut last_horizon) = (Duration::ZERO, Duration::ZERO);
        for (i, part) in parts.iter().enumerate() {
            let at = |why: String| format!("tier {} ('{part}'): {why}", i + 1);
            let (period, horizon) = parse_tier(part).map_err(at)?;
            if horizon <= last_horizon {
                return Err(at(format!(
                    "its horizon {} is not longer than the previous tier's {}",
                    show(horizon),
                    show(last_horizon)
                )));
            }
            match period {
                None if i > 0 => {
                    return Err(at("only the first tier can keep every write-set".into()))
                }
                None => grid.every_for = Some(horizon),
                Some(p) => {
                    if p <= last_period {
                        return Err(at(format!(
                            "its period {} is not longer than the previous tier's {}",
                            show(p),
                            show(last_period)
                        )));
                    }
                    if last_period > Duration::ZERO
                        && !p.as_secs().is_multiple_of(last_period.as_secs())
                    {
                        // Nested buckets: a point kept as the last of its coarser bucket
                        // was also the last of its finer one, so thinning again as it
                        // ages never needs a point an earlier pass dropped.
                        return Err(at(format!(
                            "its period {} is not a multiple of the previous tier's {}",
                            show(p),
                            show(last_period)
                        )));
                    }
                    if p > horizon {
                        return Err(at(format!(
                            "one point per {} cannot fit in {}",
                            show(p),
                            show(horizon)
                        )));
                    }
                    last_period = p;
                    grid.tiers.push((p, horizon));
                }
            }
            last_horizon = horizon;
        }
        Ok(grid)
    }
}

impl fmt::Display for RetentionGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `every write-set for DUR` or `1 per PERIOD for DUR`: `(None | Some(period), horizon)`.
fn parse_tier(t: &str) -> Result<(Option<Duration>, Duration), String> {
    let (what, horizon) = t
        .rsplit_once(" for ")
        .ok_or("expected 'every write-set for DURATION' or '1 per PERIOD for DURATION'")?;
    let horizon = parse_duration(horizon.trim())?;
    let what = what.trim();
    if what == "every write-set" {
        return Ok((None, horizon));
    }
    let period = what
        .strip_prefix("1 per ")
        .ok_or(format!(
            "'{what}': expected 'every write-set' or '1 per PERIOD'"
        ))?
        .trim();
    // "1 per minute" reads as one per 1 minute.
    let period = match parse_duration(period) {
        Ok(p) => p,
        Err(_) => parse_duration(&format!("1 {period}"))?,
    };
    Ok((Some(period), horizon))
}

/// `30d`, `24h`, `90 s`, `5 minutes`, `1 week`: a positive whole number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a number and a unit (s, m, h, d, w)"))?;
    let secs = match unit {
        "s" | "sec" | "second" | "seconds" => 1,
        "m" | "min" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 7 * 86_400,
        "" => return Err(format!("'{s}': no unit (s, m, h, d, w)")),
        u => return Err(format!("'{s}': unknown unit '{u}' (s, m, h, d, w)")),
    };
    if n == 0 {
        return Err(format!("'{s}': must be more than zero"));
    }
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{s}': too long"))
}

/// A duration in the largest unit that divides it (`86400s` shows as `1d`).
fn show(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s > 0 && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn the_issue_s_grid_parses() {
        let g = RetentionGrid::parse(
            "every write-set for 1h, 1 per minute for 24h, 1 per hour for 30d",
        )
        .unwrap();
        assert_eq!(g.every_for, Some(Duration::from_secs(H)));
        assert_eq!(
            g.tiers,
            vec![
                (Duration::from_secs(60), Duration::from_secs(24 * H)),
                (Duration::from_secs(H), Duration::from_secs(30 * 24 * H)),
            ]
        );
        assert_eq!(g.longest(), Duration::from_secs(30 * 24 * H));
        let g = RetentionGrid::parse("1 per 5 minutes for 2 days").unwrap();
        assert_eq!(g.every_for, None);
        assert_eq!(
            g.tiers,
            vec![(Duration::from_secs(300), Duration::from_secs(2 * 86_400))]
        );
        assert_eq!(
            RetentionGrid::parse("every write-set for 90s")
                .unwrap()
                .longest(),
            Duration::from_secs(90)
        );
    }

    #[test]
    fn errors_name_the_tier_and_the_fault() {
        for (text, want) in [
            ("", "empty"),
            ("every write-set for 1h, 1 per minute for 30m", "tier 2 ('1 per minute for 30m'): its horizon 30m is not longer than the previous tier's 1h"),
            ("1 per hour for 1d, 1 per minute for 30d", "tier 2 ('1 per minute for 30d'): its period 1m is not longer than the previous tier's 1h"),
            ("1 per minute for 1d, every write-set for 30d", "only the first tier can keep every write-set"),
            ("1 per day for 1h", "one point per 1d cannot fit in 1h"),
            ("1 per 2m for 1h, 1 per 3m for 2h", "its period 3m is not a multiple of the previous tier's 2m"),
            ("every write-set for 1 fortnight", "unknown unit 'fortnight'"),
            ("every write-set for 0h", "must be more than zero"),
            ("every write-set for 12", "no unit"),
            ("keep all", "expected 'every write-set for DURATION'"),
            ("2 per minute for 1h", "'2 per minute': expected 'every write-set' or '1 per PERIOD'"),
            ("1 per minute for 1h,", "tier 2 (''): expected"),
        ] {
            let e = RetentionGrid::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
