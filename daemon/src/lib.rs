//! ferryd: the ferry daemon.
//!
//! Module map (see ARCHITECTURE.md), by role:
//! * [`node`]    — start-up, recovery, checkpointing, role changes, shutdown.
//! * [`store`]   — node-local storage: crash-safe metadata (redb).
//! * [`primary`] — the primary write path: volumes, NBD export, ordered application.
//! * [`ship`]    — primary side of replication: shippers, sync gate, catch-up (bitmap
//!   mode, resync copy), the persisted dirty map.
//! * [`replica`] — standby side: receive, journal, apply, ack; standby half of a resync.
//! * [`pit`]     — standby point-in-time recovery: undo capture, retention, views, rollback.
//! * [`verify`]  — online verify: chunk digests at a point in the stream.
//! * [`ops`]     — control socket, audit log, metrics endpoint, systemd notifications.
//! * [`nbd`]     — the NBD protocol server (fixed newstyle), generic over an export.
//! * [`config`], [`size`], [`timefmt`] — configuration, byte sizes, RFC 3339 times.
pub mod config;
pub mod nbd;
pub mod node;
pub mod ops;
pub mod pit;
pub mod primary;
pub mod replica;
pub mod ship;
pub mod size;
pub mod store;
#[doc(hidden)]
pub mod testkit;
pub mod timefmt;
pub mod verify;

/// Formats an error with its causes, skipping a cause whose text the previous message
/// already ends with (many library errors print their source and also expose it).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}
