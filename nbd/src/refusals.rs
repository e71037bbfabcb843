//! Rate-limited logging of refused requests, per connection: a client
//! that sends a stream of invalid requests must not flood the log (or slow
//! the server with formatting). The first few refusals are logged at WARN
//! with their details; after that only a summary of how many were
//! suppressed, at most once per interval, and once more when the
//! connection ends. Time is passed in, so the policy is unit-tested
//! without sleeping.

use std::time::{Duration, Instant};

/// Refusals logged in full per connection.
pub const DETAILED: u64 = 5;
/// Minimum time between two summaries.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// What to log for one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log this refusal with its details.
    Detail,
    /// Log a summary: this many refusals were not logged since the last line.
    Summary(u64),
    /// Log nothing.
    Quiet,
}

#[derive(Debug)]
pub struct RefusalLog {
    total: u64,
    suppressed: u64,
    last_summary: Option<Instant>,
}

impl RefusalLog {
    pub fn new() -> RefusalLog {
        RefusalLog {
            total: 0,
            suppressed: 0,
            last_summary: None,
        }
    }

    /// Refusals seen on this connection.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Account one refusal at `now`.
    pub fn refuse(&mut self, now: Instant) -> Verdict {
        self.total += 1;
        if self.total <= DETAILED {
            return Verdict::Detail;
        }
        self.suppressed += 1;
        let due = match self.last_summary {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= SUMMARY_EVERY,
        };
        if !due {
            return Verdict::Quiet;
        }
        self.last_summary = Some(now);
        Verdict::Summary(std::mem::take(&mut self.suppressed))
    }

    /// Refusals not yet reported, for the connection's last log line.
    pub fn finish(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_then_summaries_per_interval() {
        let mut l = RefusalLog::new();
        let t0 = Instant::now();
        for _ in 0..DETAILED {
            assert_eq!(l.refuse(t0), Verdict::Detail);
        }
        // The first suppressed refusal summarises at once (count 1), then
        // the log stays quiet until the interval has passed.
        assert_eq!(l.refuse(t0), Verdict::Summary(1));
        for _ in 0..100 {
            assert_eq!(l.refuse(t0 + Duration::from_secs(1)), Verdict::Quiet);
        }
        assert_eq!(l.refuse(t0 + SUMMARY_EVERY), Verdict::Summary(101));
        assert_eq!(l.refuse(t0 + SUMMARY_EVERY), Verdict::Quiet);
        assert_eq!(l.finish(), 1);
        assert_eq!(l.finish(), 0);
        assert_eq!(l.total(), DETAILED + 103);
    }
}
