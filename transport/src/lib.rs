//! `ferry-transport`: ferry's replication transport.
//!
//! * [`wire`] — versioned, checksummed frames and a streaming decoder (no IO).
//! * [`session`] — sender (primary) and receiver (standby) state machines and
//!   handshake validation (no IO, no clock: times are arguments).
//!
//! The QUIC glue (quinn) will live beside these and only move bytes; all
//! protocol decisions stay here so they can be tested and fuzzed
//! deterministically. Byte layouts and semantics: `PROTOCOL.md`.

#![forbid(unsafe_code)]

pub mod session;
pub mod wire;
pub mod pki;
pub mod quic;
