//! ferry-api: what the daemon (`ferryd`) and the operator CLI (`ferryctl`) share, so
//! that the CLI does not link the daemon.
//!
//! * [`config`]  — the TOML configuration, validated with errors that name the key.
//! * [`keys`]    — every config key and whether a reload can change it live.
//! * [`size`]    — byte sizes (`64MiB`) in the config and on the command line.
//! * [`timefmt`] — RFC 3339 parsing and formatting, and the one civil-date routine.
//! * [`grid`]    — an archive target's retention grid (`retention = "…"`).
//! * [`sync_policy`] — `[replication] sync = "ANY k (…)"`: which targets acknowledge a write.
//! * [`control`] — the control socket protocol (requests, responses, roles) and its client.
//! * [`audit`]   — the audit log's line format, canonical SM3 hashing and chain verifier.
//! * [`status`]  — a node's status snapshot (the `status` request's answer), typed.
//! * [`keyfile`] — the at-rest key file on disk: read and checked at start, created
//!   0600 by `ferryctl keygen` / `init --encrypt`.
pub mod audit;
pub mod config;
pub mod control;
pub mod grid;
pub mod keyfile;
pub mod keys;
pub mod size;
pub mod status;
pub mod sync_policy;
pub mod timefmt;
