//! ferryd: the ferry daemon.
//!
//! Module map (see ARCHITECTURE.md), by role. Folders depend downwards only
//! (`daemon/tests/module_graph.rs` keeps it so): `node` → `ops` → `replica` → `pit` →
//! `primary` → `ship` → `verify` → `store` → `config`, `nbd`, `timefmt`, `size`.
//! * [`node`]    — start-up, recovery, checkpoints, both roles' run loops and control
//!   handlers, role changes, shutdown.
//! * [`store`]   — node-local storage: backing stores ([`store::base`]) and the crash-safe
//!   metadata ([`store::meta`], redb).
//! * [`primary`] — the primary write path: volumes and the NBD export (its TLS policy:
//!   [`primary::nbd_tls`]), ordered application to the bases ([`primary::apply`]),
//!   frontend metrics.
//! * [`ship`]    — primary side of replication: the feed from the write path, per-target
//!   state and the sync gate, shipper sessions, catch-up (bitmap mode, resync copy), the
//!   persisted dirty map.
//! * [`replica`] — standby side: standby state and journal, sessions, the replica
//!   applier, the standby half of a resync.
//! * [`pit`]     — standby point-in-time recovery: undo capture, retention, views, rollback.
//! * [`verify`]  — online verify and chunk digests.
//! * [`ops`]     — control socket and roles, audit log, metrics endpoint, systemd
//!   notifications.
//! * [`archive`] — the cold tier on the primary: archive targets (base and pack
//!   uploads, compaction, the journal's release floor) and seeding a standby from an
//!   archive.
//!
//! These docs are for ferryd's developers (`cargo doc -p ferryd --document-private-items`,
//! which CI builds with warnings denied): module docs name the private items that do the
//! work, so links to private items are allowed.
//!
//! Shared with other crates: `ferry_nbd` (the NBD server), `ferry_api` (configuration,
//! byte sizes, RFC 3339 times, the control protocol, audit-line hashing).
#![allow(rustdoc::private_intra_doc_links)]

pub mod archive;
/// The command line, shared with the man page generator.
pub mod cli;
pub mod node;
pub mod ops;
pub mod pit;
pub mod primary;
pub mod replica;
pub mod ship;
pub mod store;
#[doc(hidden)]
pub mod testkit;
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
