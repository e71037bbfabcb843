//! NBD server: accept loop, connection lifetime and the transmission phase's
//! request loop (the handshake and TLS upgrade are in `tls` and `handshake`,
//! replies in `reply`, the requests' execution in `exec`). The request loop
//! is generic over the stream halves, plain TCP or TLS.
//!
//! Connections are admitted through [`Admission`]: at most
//! `max_connections`, the longest-idle handshake making room for a newcomer;
//! a client has `handshake_timeout` to enter transmission and, if configured,
//! a session ends after `idle_timeout` without requests.
//!
//! Per connection there are three kinds of tasks:
//! * the connection task reads requests off the socket (through a
//!   `BufReader`), validates them with [`proto::validate_request`] and spawns
//!   one task per request, bounded by a per-connection semaphore (count) and a
//!   byte budget (payload memory);
//! * request tasks call the export and send their reply into a bounded
//!   channel, together with the permits, so memory is released only once the
//!   reply has been written;
//! * one writer task owns the socket's write half and writes each reply
//!   (header then data) atomically, flushing its `BufWriter` whenever the
//!   reply queue drains, which batches replies under load without delaying
//!   them when idle.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::admission::{Admission, Slot};
use crate::exec::{execute, STATUS_REPLY_BYTES};
use crate::handshake::Negotiated;
use crate::proto::{self, Action, Caps, Request};
use crate::refusals::{RefusalLog, Verdict};
use crate::reply::{errno_text, writer_task, Permits, Reply, ReplyTo};
use crate::tls::{negotiate, Halves, Session};
use crate::{Export, ExportRegistry, ServerConfig, ServerStats};

/// Smallest max_payload we accept: below this the advertised preferred block
/// size (4096) would exceed the maximum, which the spec forbids.
const MIN_PAYLOAD: u32 = 4096;
/// Longest the accept loop waits for evicted connections to close before
/// refusing a newcomer instead.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// Upper bound on `max_inflight_per_conn`.
const MAX_INFLIGHT_CAP: usize = 65536;
/// Serve NBD on `listener` until `shutdown` becomes `true` (or its sender is
/// dropped). On shutdown: stop accepting, stop reading new requests, finish
/// in-flight requests and send their replies, close. Returns once every
/// connection is done, or after `cfg.shutdown_grace` (remaining connections
/// are then aborted).
pub async fn serve<R: ExportRegistry>(
    listener: TcpListener,
    registry: Arc<R>,
    cfg: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let cfg = Arc::new(ServerConfig {
        max_payload: cfg.max_payload.max(MIN_PAYLOAD),
        // Clamped so absurd values cannot overflow the semaphore or channel.
        max_inflight_per_conn: cfg.max_inflight_per_conn.clamp(1, MAX_INFLIGHT_CAP),
        shutdown_grace: cfg.shutdown_grace,
        stats: cfg.stats.clone(),
        tls: cfg.tls.clone(),
        max_connections: cfg.max_connections.max(1),
        handshake_timeout: cfg.handshake_timeout,
        idle_timeout: cfg.idle_timeout.filter(|d| !d.is_zero()),
    });
    info!(addr = ?listener.local_addr().ok(), max_connections = cfg.max_connections,
          "NBD server listening");
    let admission = Admission::new(cfg.max_connections);
    let mut limit_log = RefusalLog::new();
    let mut conns = JoinSet::new();
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                // A dropped sender can never signal again: treat as shutdown.
                if changed.is_err() {
                    break;
                }
            }
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "NBD connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let admitted = admit(&admission, peer, &cfg.stats, &mut limit_log).await;
                    let Some(slot) = admitted else {
                        drop(sock);
                        continue;
                    };
                    conns.spawn(handle_conn(
                        sock,
                        peer,
                        slot,
                        registry.clone(),
                        cfg.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends are transient; back off
                    // instead of spinning or tearing the server down.
                    warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    info!(
        connections = conns.len(),
        "NBD server shutting down, draining connections"
    );
    let drain = async {
        while let Some(done) = conns.join_next().await {
            if let Err(e) = done {
                warn!(error = %e, "NBD connection task failed");
            }
        }
    };
    if tokio::time::timeout(cfg.shutdown_grace, drain)
        .await
        .is_err()
    {
        warn!(
            remaining = conns.len(),
            "NBD shutdown grace period expired, aborting connections"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    info!("NBD server stopped");
    Ok(())
}

/// A slot for a new connection from `peer`, or `None` (the connection is
/// closed at once) when every slot holds a session in transmission. Both a
/// refusal and an eviction are counted and logged, rate-limited: a flood
/// must not flood the log. While the evicted connections are still closing,
/// accepting pauses (newcomers wait in the kernel's backlog), bounded.
async fn admit(
    admission: &Arc<Admission>,
    peer: SocketAddr,
    stats: &ServerStats,
    log: &mut RefusalLog,
) -> Option<Slot> {
    let (slot, what) = match admission.admit_waiting(EVICTION_WAIT).await {
        Ok((slot, false)) => return Some(slot),
        Ok((slot, true)) => {
            stats.evicted_connection();
            (
                Some(slot),
                "closing the longest-waiting handshake to make room",
            )
        }
        Err(_) => {
            stats.refused_connection();
            (None, "every connection is in use: refusing the new one")
        }
    };
    let max = admission.max();
    match log.refuse(Instant::now()) {
        Verdict::Detail => warn!(%peer, max, "NBD connection limit reached: {what}"),
        Verdict::Summary(n) => warn!(suppressed = n, total = log.total(), max,
            "NBD connection limit keeps being reached (refused and evicted connections are counted in the server's stats)"),
        Verdict::Quiet => {}
    }
    slot
}

/// Resolves once shutdown is requested (or can no longer be signalled).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Why a connection ended; decides the log level of the disconnect message.
pub(crate) enum End {
    /// NBD_OPT_ABORT or NBD_CMD_DISC.
    ClientDisc,
    /// EOF between messages.
    Eof,
    Shutdown,
    /// The writer failed (client gone); details were logged by the writer.
    WriterGone,
    /// Protocol violation by the client: hard disconnect.
    Protocol(String),
    /// Closed to make room for a new connection at the connection cap.
    Evicted,
    /// The handshake took longer than `handshake_timeout`.
    HandshakeTimeout,
    /// No request for `idle_timeout`.
    Idle,
    /// The TLS handshake failed (bad or missing client certificate, no
    /// common suite, not TLS at all).
    Tls(io::Error),
    Io(io::Error),
}

impl End {
    pub(crate) fn from_read(e: io::Error, what: &str) -> End {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            End::Protocol(format!("client closed connection mid-{what}"))
        } else {
            End::Io(e)
        }
    }
}

async fn handle_conn<R: ExportRegistry>(
    sock: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    registry: Arc<R>,
    cfg: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) {
    cfg.stats.connection_opened();
    run_conn(sock, peer, slot, registry, &cfg, shutdown).await;
    cfg.stats.connection_closed();
}

async fn run_conn<R: ExportRegistry>(
    sock: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    registry: Arc<R>,
    cfg: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    // Replies are latency-critical small writes; never let Nagle hold them.
    if let Err(e) = sock.set_nodelay(true) {
        debug!(%peer, error = %e, "TCP_NODELAY failed");
    }
    info!(%peer, "NBD client connected");
    let hs = tokio::select! {
        r = tokio::time::timeout(cfg.handshake_timeout, negotiate(sock, peer, &*registry, cfg, &slot)) => {
            r.unwrap_or_else(|_| {
                cfg.stats.handshake_timeout();
                Err(End::HandshakeTimeout)
            })
        }
        _ = slot.evicted() => Err(End::Evicted),
        _ = shutdown_requested(&mut shutdown) => Err(End::Shutdown),
    };
    // A session in transmission is never displaced by newcomers (it may be
    // a disk in use); one chosen in the instant before is closed now.
    let session = match hs {
        Ok(s) if slot.busy() => s,
        Ok(_) => {
            log_end(peer, "-", End::Evicted);
            return;
        }
        Err(end) => {
            log_end(peer, "-", end);
            return;
        }
    };
    let (name, end) = match session {
        Session::Plain(halves, neg) => enter(halves, neg, peer, false, cfg, shutdown).await,
        Session::Tls(halves, neg) => enter(halves, neg, peer, true, cfg, shutdown).await,
    };
    log_end(peer, &name, end);
}

/// Run the transmission phase on the negotiated stream; returns the export
/// name (for the disconnect message) and how the session ended.
async fn enter<E, R, W>(
    halves: Halves<R, W>,
    neg: Negotiated<E>,
    peer: SocketAddr,
    tls: bool,
    cfg: &ServerConfig,
    shutdown: watch::Receiver<bool>,
) -> (String, End)
where
    E: Export,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let name = neg.export.name().to_owned();
    info!(%peer, export = %name, mode = ?neg.mode, block_status = neg.block_status, tls,
          "NBD client entered transmission");
    if tls {
        cfg.stats.tls_session();
    }
    let end = transmission(halves.rd, halves.wr, neg, peer, cfg, shutdown).await;
    (name, end)
}

fn log_end(peer: SocketAddr, export: &str, end: End) {
    match end {
        End::ClientDisc => info!(%peer, export, "NBD client disconnected"),
        End::Eof => info!(%peer, export, "NBD client closed connection"),
        End::Shutdown => info!(%peer, export, "NBD connection closed for shutdown"),
        End::WriterGone => info!(%peer, export, "NBD connection closed (reply write failed)"),
        End::Protocol(reason) => {
            warn!(%peer, export, %reason, "NBD protocol error, disconnecting client")
        }
        End::Evicted => {
            debug!(%peer, "NBD connection closed in its handshake to make room for a new one")
        }
        End::HandshakeTimeout => info!(%peer, "NBD client did not finish the handshake in time"),
        End::Idle => info!(%peer, export, "NBD session closed after its idle timeout"),
        End::Tls(e) => warn!(%peer, error = %e, "NBD TLS handshake failed"),
        End::Io(e) => info!(%peer, export, error = %e, "NBD connection I/O error"),
    }
}

/// The transmission phase of one connection: its export, its negotiated
/// session, its limits and its reply queue.
struct Conn<E: Export> {
    export: Arc<E>,
    peer: SocketAddr,
    session: proto::Session,
    count_sem: Arc<Semaphore>,
    byte_sem: Arc<Semaphore>,
    byte_budget: u32,
    tx: mpsc::Sender<Reply>,
    refusals: RefusalLog,
    stats: Arc<ServerStats>,
}

/// Why the request loop stops.
type Stop = End;

async fn transmission<E, R, W>(
    mut rd: BufReader<R>,
    wr: BufWriter<W>,
    neg: Negotiated<E>,
    peer: SocketAddr,
    cfg: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> End
where
    E: Export,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let export = neg.export;
    cfg.stats.session_mode(neg.mode);
    // Payload bytes held per connection (write payloads read, read data and
    // status replies not yet written). Twice the max payload so one maximal
    // request never starves behind another.
    let byte_budget = cfg.max_payload.saturating_mul(2);
    let (tx, rx) = mpsc::channel::<Reply>(cfg.max_inflight_per_conn + 16);
    let writer = tokio::spawn(writer_task(rx, wr, peer));
    let mut conn = Conn {
        session: proto::Session {
            size: export.size(),
            caps: Caps {
                flags: export.flags(),
                mode: neg.mode,
            },
            fast_zero: export.fast_zero(),
            max_payload: cfg.max_payload,
            block_status: neg.block_status,
        },
        export,
        peer,
        count_sem: Arc::new(Semaphore::new(cfg.max_inflight_per_conn)),
        byte_sem: Arc::new(Semaphore::new(byte_budget as usize)),
        byte_budget,
        tx,
        refusals: RefusalLog::new(),
        stats: cfg.stats.clone(),
    };
    let max_inflight = cfg.max_inflight_per_conn;
    let end = loop {
        // Wait for the next request without consuming anything, so that
        // shutdown between requests never loses a partially read header.
        let eof = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break End::Shutdown,
            _ = conn.tx.closed() => break End::WriterGone,
            r = rd.fill_buf() => match r {
                Ok(b) => b.is_empty(),
                Err(e) => break End::Io(e),
            },
            _ = idle_for(cfg.idle_timeout) => {
                // A long request still running is not idleness.
                if conn.count_sem.available_permits() < max_inflight {
                    continue;
                }
                cfg.stats.idle_timeout();
                break End::Idle;
            }
        };
        if eof {
            break End::Eof;
        }
        let mut hdr = [0u8; proto::EXTENDED_REQUEST_LEN];
        let hdr = &mut hdr[..neg.mode.request_len()];
        let r = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break End::Shutdown,
            r = rd.read_exact(hdr) => r,
        };
        if let Err(e) = r {
            break End::from_read(e, "request header");
        }
        let req = match proto::decode_request_in(neg.mode, hdr) {
            Ok(r) => r,
            Err(e) => break End::Protocol(e.to_string()),
        };
        if let Err(stop) = conn.request(&mut rd, req).await {
            break stop;
        }
    };
    let suppressed = conn.refusals.finish();
    if suppressed > 0 {
        warn!(%peer, suppressed, total = conn.refusals.total(),
              "NBD requests refused on this connection and not logged individually");
    }
    // In-flight request tasks hold their own senders; the writer drains
    // their replies and exits once the last one is sent.
    drop(conn);
    drop(rd);
    if let Err(e) = writer.await {
        warn!(%peer, error = %e, "NBD writer task failed");
    }
    end
}

impl<E: Export> Conn<E> {
    async fn send(&self, reply: Reply) -> Result<(), Stop> {
        self.tx.send(reply).await.map_err(|_| End::WriterGone)
    }

    /// Validate one request and start it (or answer it at once).
    async fn request<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut BufReader<R>,
        req: Request,
    ) -> Result<(), Stop> {
        let mode = self.session.caps.mode;
        let payload = req.payload_len(mode);
        if payload > u64::from(self.session.max_payload) {
            // The payload would have to be skipped byte by byte (up to
            // 4 GiB, or 2^64 with extended headers); the stream cannot be
            // resynchronised cheaply.
            return Err(End::Protocol(format!(
                "payload length {payload} exceeds max payload {}",
                self.session.max_payload
            )));
        }
        let to = ReplyTo {
            mode,
            typ: req.typ,
            handle: req.handle,
            offset: req.offset,
        };
        let action = match proto::validate_request(&req, &self.session) {
            Ok(a) => a,
            Err(errno) => return self.refuse(rd, &req, payload, to, errno).await,
        };
        let data_len = match action {
            Action::Read { len, .. } | Action::Write { len, .. } => len,
            // Bounded status reply plus the export's extent list.
            Action::BlockStatus { .. } => STATUS_REPLY_BYTES.min(self.byte_budget),
            _ => 0,
        };
        let permits = self.permits(data_len).await?;
        let body = match action {
            Action::Disconnect => return Err(End::ClientDisc),
            Action::Noop => return self.send(Reply::ok(to, Some(permits))).await,
            Action::Write { len, .. } => read_payload(rd, len)
                .await
                .map_err(|e| End::from_read(e, "write payload"))?,
            _ => Bytes::new(),
        };
        let export = self.export.clone();
        let tx = self.tx.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            let reply = execute(&*export, action, body, to, permits, peer).await;
            // The writer is gone only if the client is; nothing to do then.
            let _ = tx.send(reply).await;
        });
        Ok(())
    }

    async fn permits(&self, bytes: u32) -> Result<Permits, Stop> {
        // The semaphores are never closed; an error cannot happen.
        let count = self
            .count_sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| End::WriterGone)?;
        let bytes = if bytes > 0 {
            let p = self.byte_sem.clone().acquire_many_owned(bytes).await;
            Some(p.map_err(|_| End::WriterGone)?)
        } else {
            None
        };
        Ok(Permits {
            _count: count,
            _bytes: bytes,
        })
    }

    /// Answer a request validation refused: count it, log it (rate-limited),
    /// skip its payload (without buffering it) to stay in sync, reply.
    async fn refuse<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut BufReader<R>,
        req: &Request,
        payload: u64,
        to: ReplyTo,
        errno: u32,
    ) -> Result<(), Stop> {
        self.stats.refused();
        let peer = self.peer;
        match self.refusals.refuse(Instant::now()) {
            Verdict::Detail => warn!(%peer, handle = req.handle, typ = req.typ, flags = req.flags,
                offset = req.offset, len = req.len, errno, "rejecting invalid NBD request"),
            Verdict::Summary(n) => warn!(%peer, suppressed = n, total = self.refusals.total(),
                "NBD client keeps sending invalid requests; further ones are summarised"),
            Verdict::Quiet => {}
        }
        if payload > 0 {
            let mut take = (&mut *rd).take(payload);
            match tokio::io::copy(&mut take, &mut tokio::io::sink()).await {
                Ok(n) if n == payload => {}
                Ok(_) => {
                    return Err(End::Protocol(
                        "client closed connection mid-write payload".into(),
                    ))
                }
                Err(e) => return Err(End::from_read(e, "write payload")),
            }
        }
        self.send(Reply::error(to, errno, errno_text(errno), None))
            .await
    }
}

/// Resolves after `timeout`, or never without one.
async fn idle_for(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

/// Read exactly `len` payload bytes into a fresh buffer without zero-filling
/// it first (`read_buf` writes into spare capacity).
async fn read_payload<Rd: AsyncRead + Unpin>(rd: &mut Rd, len: u32) -> io::Result<Bytes> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let mut take = (&mut *rd).take((len - buf.len()) as u64);
        if take.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}
