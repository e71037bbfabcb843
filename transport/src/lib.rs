//! `ferry-transport`: ferry's replication transport.
//!
//! * [`wire`] — versioned, checksummed frames and a streaming decoder (no IO).
//! * [`session`] — sender (primary) and receiver (standby) state machines and
//!   handshake validation (no IO, no clock: times are arguments).
//!
//! * [`pki`] — the cluster CA and node certificates (rcgen, PEM files).
//! * [`quic`] — quinn/rustls glue: mutual TLS 1.3 with cluster-membership
//!   checks, framed streams, the Hello exchange, reconnect backoff.
//!
//! The QUIC glue only moves bytes; all protocol decisions stay in `wire` and
//! `session` so they can be tested and fuzzed deterministically. Byte layouts
//! and semantics: `PROTOCOL.md`.

#![forbid(unsafe_code)]

pub mod pki;
pub mod quic;
pub mod session;
pub mod wire;
