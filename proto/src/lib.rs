//! `ferry-proto`: ferry's replication protocol as pure code (no IO, no clock,
//! no async).
//!
//! * [`wire`] — versioned, checksummed frames and a streaming decoder.
//! * [`session`] — sender (primary) and receiver (standby) state machines and
//!   handshake validation (times are arguments).
//! * [`target`] — one replication target's lifecycle on the primary (session phase,
//!   journal tracking, degraded, handover) and the decisions taken on it.
//! * [`packed`] — the Packed frame (V3): data frames compressed with zstd and with
//!   zero-filled writes sent as their length.
//! * [`wan`] — a target's WAN policy: what is packed and how hard (adaptive zstd
//!   level, incompressible data skipped), and the bandwidth cap's token bucket.
//!
//! `ferry-transport` moves the bytes (QUIC, mutual TLS, PKI); every protocol
//! decision lives here so it can be tested and simulated deterministically.
//! Byte layouts and semantics: `PROTOCOL.md`.

#![forbid(unsafe_code)]

pub mod packed;
pub mod session;
pub mod target;
pub mod wan;
pub mod wire;
