//! The standby side: receive write-sets, journal, apply, ack; the standby half of a resync.
pub mod applier;
pub mod resync;
pub mod session;
pub mod standby;
pub mod transition;
