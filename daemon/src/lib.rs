//! ferryd: the ferry daemon.
//!
//! Module map (see ARCHITECTURE.md):
//! * [`apply`]    — ordered, parallel application of journaled records to the bases.
//! * [`config`]   — TOML configuration, validated with errors that name the key (ferry-api).
//! * [`meta`]     — crash-safe node metadata (redb): node id, cluster id, epoch, checkpoint.
//! * [`volume`]   — protected volumes: the journal-first write path and the NBD export.
//! * [`replication`] — primary side: shippers, sync gate, lag accounting.
//! * [`standby`]  — standby side: receive, journal, apply, ack.
//! * [`pit`]      — standby point-in-time recovery: undo capture, retention, views, rollback.
//! * [`overflow`] — journal overflow on the primary: bitmap mode per target, resync copy.
//! * [`resync`]   — standby side of a bitmap resync.
//! * [`timefmt`]  — RFC 3339 parsing and formatting for point-in-time commands (ferry-api).
//! * [`verify`]   — online verify: chunk digests at a point in the stream, copy-before-write.
//! * [`nbd`]      — the NBD protocol server (re-export of the `ferry-nbd` crate).
//! * [`metrics`]  — Prometheus metrics and the /metrics, /healthz, /readyz endpoint.
//! * [`control`]  — the control socket (JSON lines over a Unix socket), roles from peer credentials.
//! * [`audit`]    — the hash-chained (SM3) audit log of control requests.
//! * [`daemon`]   — start-up, recovery, checkpointing, shutdown.
//! * [`sdnotify`] — systemd readiness, status and watchdog notifications (no libsystemd).
pub mod apply;
pub mod audit;
pub mod chunks;
pub mod control;
pub mod daemon;
pub mod dirty;
pub mod meta;
pub mod metrics;
pub use ferry_nbd as nbd;
pub mod overflow;
pub mod pit;
pub mod replication;
pub mod resync;
pub mod sdnotify;
pub mod standby;
#[doc(hidden)]
pub mod testkit;
pub mod verify;
pub mod volume;

// Moved to ferry-api (shared with ferryctl); re-exported so that `crate::config::…`,
// `crate::size::…` and `crate::timefmt::…` keep their paths.
pub use ferry_api::{config, size, timefmt};

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
