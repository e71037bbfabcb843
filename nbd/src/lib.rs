//! NBD protocol server (fixed newstyle handshake, simple replies only),
//! generic over an [`Export`] looked up by name in an [`ExportRegistry`].
//!
//! * [`proto`]  — pure wire encode/decode and request validation (no I/O).
//! * [`server`] — the accept loop, handshake and transmission phase.
//! * `mem`    — in-memory / file-backed exports and a map registry, used by
//!   tests and benchmarks (feature `test-util`).
//! * `testclient` — a blocking raw NBD client plus an in-process server
//!   harness for integration tests (feature `test-util`, hidden from docs).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "test-util")]
pub mod mem;
pub mod proto;
mod server;
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod testclient;

#[cfg(feature = "test-util")]
pub use mem::{FileExport, MapRegistry, MemExport};
pub use server::serve;

/// What an export can do; turned into NBD transmission flags verbatim, so
/// every `true` here is a promise to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportFlags {
    pub read_only: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    /// Only set if flush/FUA effects are visible across all connections.
    pub can_multi_conn: bool,
    pub send_fua: bool,
    pub send_flush: bool,
}

/// Errors an export may return; each maps to one NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space")]
    NoSpace,
    #[error("read-only or fenced: {0}")]
    ReadOnly(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("shutting down")]
    ShuttingDown,
}

impl ExportError {
    /// The NBD error value sent to the client.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            ExportError::Io(_) => proto::EIO,
            ExportError::NoSpace => proto::ENOSPC,
            ExportError::ReadOnly(_) => proto::EPERM,
            ExportError::Invalid(_) => proto::EINVAL,
            ExportError::ShuttingDown => proto::ESHUTDOWN,
        }
    }
}

/// A block device exported over NBD.
///
/// The server validates every request before calling into the export:
/// `offset + len <= size()` always holds, `len > 0`, reads and writes are at
/// most `ServerConfig::max_payload` bytes, and write-type calls are never
/// made on a read-only export or for capabilities the flags do not claim.
/// Calls may arrive concurrently, from many connections.
pub trait Export: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    fn flags(&self) -> ExportFlags;
    /// Must return exactly `len` bytes; anything else is reported as EIO.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<bytes::Bytes, ExportError>> + Send;
    fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
}

/// Name → export lookup, consulted during every handshake (so exports can
/// come and go while the server runs).
pub trait ExportRegistry: Send + Sync + 'static {
    type E: Export;
    fn lookup(&self, name: &str) -> Option<Arc<Self::E>>;
    fn names(&self) -> Vec<String>;
    /// Export used when the client asks for the empty name.
    fn default_export(&self) -> Option<String>;
}

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted (advertised as the maximum block
    /// size). Larger reads get EINVAL; larger writes drop the connection
    /// because their payload cannot be skipped safely.
    pub max_payload: u32,
    /// Requests processed concurrently per connection; further requests are
    /// not read off the socket until one completes (TCP backpressure).
    pub max_inflight_per_conn: usize,
    /// How long `serve` waits after shutdown for connections to finish their
    /// in-flight requests before abandoning them.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            max_inflight_per_conn: 128,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}
