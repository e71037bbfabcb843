//! NBD protocol server (fixed newstyle handshake; simple, structured and
//! extended replies; `base:allocation` block status), generic over an
//! [`Export`] looked up by name in an [`ExportRegistry`]. What is supported,
//! the negotiation order and the limits are listed in `nbd/README.md`.
//!
//! * [`proto`]  — pure wire encode/decode and request validation (no I/O).
//! * `server` — the accept loop and the transmission phase's request loop.
//! * `handshake` — option haggling up to the export entered, including the
//!   `NBD_OPT_STARTTLS` policy (which options are answered before TLS).
//! * `tls` — the connection set-up: plain or upgraded to TLS, handed to the
//!   transmission phase as generic read/write halves; [`TlsServer`], one
//!   rustls configuration per provider, picked per ClientHello.
//! * `reply` — reply shapes and the writer task.
//! * `exec` — running a request against the export, building its reply.
//! * `refusals` — per-connection rate-limited logging of refused requests.
//! * [`admission`] — the connection cap: the longest-idle connection makes
//!   room for a new one; busy ones are never displaced (also used by
//!   ferryd's control socket and metrics endpoint).
//! * [`stats`]  — counters the embedding daemon reads (refused requests,
//!   connections, negotiated header styles).
//! * `mem`    — in-memory / file-backed exports and a map registry, used by
//!   tests and benchmarks (feature `test-util`).
//! * `testclient` — a blocking raw NBD client plus an in-process server
//!   harness for integration tests (feature `test-util`, hidden from docs).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub mod admission;
mod exec;
mod handshake;
#[cfg(feature = "test-util")]
pub mod mem;
pub mod proto;
mod refusals;
mod reply;
mod server;
pub mod stats;
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod testclient;
mod tls;

#[cfg(feature = "test-util")]
pub use mem::{FileExport, MapRegistry, MemExport};
pub use server::serve;
pub use stats::ServerStats;
pub use tls::{suite_name, TlsServer};
/// The rustls this crate is built against, for building a [`TlsPolicy`].
pub use tokio_rustls::rustls;

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

    /// Allocation status of `[offset, offset + len)` for `base:allocation`
    /// block status and sparse reads: at most `max` extents, contiguous from
    /// `offset`, each non-empty, together covering a prefix of the range
    /// (the server asks again for the rest, or treats it as data). The
    /// default, one data extent, is always correct for an export that
    /// cannot tell: "data" only means "not known to be a hole".
    fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Extent>, ExportError>> + Send {
        let _ = (offset, max);
        async move { Ok(vec![Extent::data(len)]) }
    }

    /// `NBD_CMD_CACHE`: the client will soon access this range. A hint; the
    /// default does nothing and succeeds, as the spec allows.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), ExportError>> + Send {
        let _ = (offset, len);
        async { Ok(()) }
    }

    /// Whether `write_zeroes` is faster than writing the zeroes as data.
    /// When `false`, write-zeroes requests with `NBD_CMD_FLAG_FAST_ZERO` get
    /// ENOTSUP at once, so a copying client (qemu-img convert, nbdcopy)
    /// skips pre-zeroing instead of paying for it twice.
    fn fast_zero(&self) -> bool {
        false
    }
}

/// One run of an export's address space with one allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated, contents unknown.
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// Unallocated and reading as zeroes.
    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// `base:allocation` status flags.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.hole {
            f |= proto::STATE_HOLE;
        }
        if self.zero {
            f |= proto::STATE_ZERO;
        }
        f
    }
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

/// Default maximum READ/WRITE payload: 64 MiB, twice the 32 MiB every
/// client may assume, so large sequential copies need half the requests.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// Default cap on concurrent connections ([`ServerConfig::max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default time a client has to finish the handshake: what qemu-nbd uses
/// (its `--handshake-limit`), long enough for TLS over a slow link.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted (advertised as the maximum block
    /// size). Larger reads get EINVAL; larger writes drop the connection
    /// because their payload cannot be skipped safely. A connection holds
    /// at most twice this in payload bytes (requests read, replies not yet
    /// written), whatever its requests ask for.
    pub max_payload: u32,
    /// Requests processed concurrently per connection; further requests are
    /// not read off the socket until one completes (TCP backpressure).
    pub max_inflight_per_conn: usize,
    /// How long `serve` waits after shutdown for connections to finish their
    /// in-flight requests before abandoning them.
    pub shutdown_grace: Duration,
    /// Counters shared with the embedding daemon (clone the `Arc` before
    /// handing the config over, then read it while the server runs).
    pub stats: Arc<ServerStats>,
    /// Whether clients may or must upgrade to TLS with `NBD_OPT_STARTTLS`.
    pub tls: TlsPolicy,
    /// Connections at once (at least 1). When reached, a new connection
    /// displaces the one that has been in its handshake longest; when every
    /// connection is in transmission, it is closed at once. Both are counted
    /// in [`ServerStats`] and logged rate-limited.
    pub max_connections: usize,
    /// A client that has not entered transmission by then is dropped.
    pub handshake_timeout: Duration,
    /// A session with no request for this long and none in flight is
    /// closed; `None`: never (an attached but quiet disk is normal).
    pub idle_timeout: Option<Duration>,
}

/// TLS policy of an NBD server. The rustls configurations come from the
/// embedder: certificates, client authentication, protocol versions and the
/// `CryptoProvider`s (ring, ferry-gmtls's SM suites, or one per connection
/// from both: [`TlsServer`]) are its choice, so this crate names no provider.
#[derive(Debug, Clone, Default)]
pub enum TlsPolicy {
    /// Plain NBD only: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// Clients may upgrade with `NBD_OPT_STARTTLS` or stay plain; every
    /// export is served both ways.
    Optional(TlsServer),
    /// The spec's forced TLS: before the upgrade every option except
    /// `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD`, so nothing about
    /// the exports is revealed to an unencrypted client.
    Require(TlsServer),
}

impl TlsPolicy {
    /// The TLS configurations, unless TLS is off.
    pub fn server(&self) -> Option<&TlsServer> {
        match self {
            TlsPolicy::Off => None,
            TlsPolicy::Optional(c) | TlsPolicy::Require(c) => Some(c),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_inflight_per_conn: 128,
            shutdown_grace: Duration::from_secs(10),
            stats: Arc::default(),
            tls: TlsPolicy::Off,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: None,
        }
    }
}
