//! `ferry-proto`: ferry's replication protocol as pure code (no IO, no clock,
//! no async).
//!
//! * [`wire`] — versioned, checksummed frames and a streaming decoder.
//! * [`session`] — sender (primary) and receiver (standby) state machines and
//!   handshake validation (times are arguments).
//! * [`target`] — one replication target's lifecycle on the primary (session phase,
//!   journal tracking, degraded, handover) and the decisions taken on it.
//!
//! `ferry-transport` moves the bytes (QUIC, mutual TLS, PKI); every protocol
//! decision lives here so it can be tested and simulated deterministically.
//! Byte layouts and semantics: `PROTOCOL.md`.

#![forbid(unsafe_code)]

pub mod session;
pub mod target;
pub mod wire;
