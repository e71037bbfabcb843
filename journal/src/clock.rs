//! The one wall clock of a ferry node: nanoseconds since the Unix epoch.
//!
//! The journal stamps every batch with it, and the daemon compares those stamps with
//! its own readings (lag in seconds, retention windows, point-in-time targets, undo
//! entries). Every timestamp compared with a journal stamp must come from this same
//! function, so the daemon uses [`now_ns`] rather than a clock of its own.
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch; 0 if the system clock reads before 1970.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_does_not_go_back_between_two_reads() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 1_577_836_800_000_000_000, "clock reads {a}");
        assert!(b >= a);
    }
}
