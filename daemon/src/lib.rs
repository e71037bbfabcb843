//! ferryd: the ferry daemon.
//!
//! Module map (see ARCHITECTURE.md):
//! * [`apply`]    — ordered, parallel application of journaled records to the bases.
//! * [`config`]   — TOML configuration, validated with errors that name the key.
//! * [`meta`]     — crash-safe node metadata (redb): node id, cluster id, epoch, checkpoint.
//! * [`volume`]   — protected volumes: the journal-first write path and the NBD export.
//! * [`nbd`]      — the NBD protocol server (fixed newstyle), generic over an export.
//! * [`control`]  — the control socket (JSON lines over a Unix socket).
//! * [`daemon`]   — start-up, recovery, checkpointing, shutdown.
pub mod apply;
pub mod config;
pub mod control;
pub mod daemon;
pub mod meta;
pub mod nbd;
pub mod size;
#[doc(hidden)]
pub mod testkit;
pub mod volume;
