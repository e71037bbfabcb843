//! The standby side: receive write-sets, journal, apply, ack; the standby half of a resync.
pub mod resync;
pub mod session;
