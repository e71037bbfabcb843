//! `ferry-transport`: ferry's replication transport (the IO half).
//!
//! * [`pki`] — the cluster CA and node certificates (rcgen, PEM files).
//! * [`nodesig`] — signatures by a node's certificate key outside TLS (the audit
//!   log's checkpoints).
//! * [`quic`] — quinn/rustls glue: mutual TLS 1.3 with cluster-membership
//!   checks, framed streams, the Hello exchange, reconnect backoff.
//!
//! The QUIC glue only moves bytes; all protocol decisions live in the pure
//! `ferry-proto` crate (wire format, session state machines) so they can be
//! tested and fuzzed deterministically. Byte layouts and semantics:
//! `proto/PROTOCOL.md`.

#![forbid(unsafe_code)]

pub mod nodesig;
pub mod pki;
pub mod quic;
