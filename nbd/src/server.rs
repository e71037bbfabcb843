//! NBD server: accept loop, fixed-newstyle handshake, transmission phase.
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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::proto::{self, Action, Caps, Mode, Request};
use crate::refusals::{RefusalLog, Verdict};
use crate::{Export, ExportError, ExportRegistry, Extent, ServerConfig, ServerStats};

/// Socket buffer sizes: large enough to batch many 4 KiB requests/replies per
/// syscall, small enough to be irrelevant per connection.
const READ_BUF: usize = 256 * 1024;
const WRITE_BUF: usize = 256 * 1024;
/// A client that has not finished option haggling by then is dropped, so
/// idle half-open handshakes cannot pin server resources forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Smallest max_payload we accept: below this the advertised preferred block
/// size (4096) would exceed the maximum, which the spec forbids.
const MIN_PAYLOAD: u32 = 4096;
const PREFERRED_BLOCK: u32 = 4096;
/// Upper bound on `max_inflight_per_conn`.
const MAX_INFLIGHT_CAP: usize = 65536;
/// Most descriptors in one block status reply. The spec suggests at most
/// 2^20; 4096 keeps a reply (and the export's work for it) small while a
/// client walking a fragmented export still needs few requests.
const MAX_STATUS_EXTENTS: usize = 4096;
/// Byte permits a block status request holds: its reply (16 bytes per
/// extended descriptor) plus the export's extent list.
const STATUS_REPLY_BYTES: u32 =
    (MAX_STATUS_EXTENTS * (16 + std::mem::size_of::<Extent>()) + 8) as u32;
/// Reads at least this large (with chunked replies, without DF) ask the
/// export for holes first and send them as OFFSET_HOLE chunks. Smaller
/// reads skip the lookup: they are the latency-critical random I/O, and a
/// hole in a few KiB saves next to nothing on the wire.
const SPARSE_READ_MIN: u32 = 64 << 10;
/// Most content chunks in one sparse read reply; past that, the rest of
/// the range is sent as data.
const MAX_READ_EXTENTS: usize = 64;
/// Trim and write-zeroes are passed to the export in pieces of at most this
/// size (the export API has 32-bit lengths; 64-bit ones arrive with
/// extended headers). 1 GiB: aligned, and few calls for any real request.
const LARGE_OP_PIECE: u32 = 1 << 30;

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
    });
    info!(addr = ?listener.local_addr().ok(), "NBD server listening");
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
                    conns.spawn(handle_conn(
                        sock,
                        peer,
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

/// Resolves once shutdown is requested (or can no longer be signalled).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Why a connection ended; decides the log level of the disconnect message.
enum End {
    /// NBD_OPT_ABORT or NBD_CMD_DISC.
    ClientDisc,
    /// EOF between messages.
    Eof,
    Shutdown,
    /// The writer failed (client gone); details were logged by the writer.
    WriterGone,
    /// Protocol violation by the client: hard disconnect.
    Protocol(String),
    Io(io::Error),
}

impl End {
    fn from_read(e: io::Error, what: &str) -> End {
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
    registry: Arc<R>,
    cfg: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
) {
    cfg.stats.connection_opened();
    run_conn(sock, peer, registry, &cfg, shutdown).await;
    cfg.stats.connection_closed();
}

async fn run_conn<R: ExportRegistry>(
    sock: TcpStream,
    peer: SocketAddr,
    registry: Arc<R>,
    cfg: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    // Replies are latency-critical small writes; never let Nagle hold them.
    if let Err(e) = sock.set_nodelay(true) {
        debug!(%peer, error = %e, "TCP_NODELAY failed");
    }
    info!(%peer, "NBD client connected");
    let (rd, wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(READ_BUF, rd);
    let mut wr = BufWriter::with_capacity(WRITE_BUF, wr);

    let hs = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, &*registry, cfg)) => {
            match r {
                Ok(r) => r,
                Err(_) => Err(End::Protocol("handshake timed out".into())),
            }
        }
        _ = shutdown_requested(&mut shutdown) => Err(End::Shutdown),
    };
    let neg = match hs {
        Ok(n) => n,
        Err(end) => {
            log_end(peer, "-", end);
            return;
        }
    };
    let name = neg.export.name().to_owned();
    info!(%peer, export = %name, mode = ?neg.mode, block_status = neg.block_status,
          "NBD client entered transmission");
    let end = transmission(rd, wr, neg, peer, cfg, shutdown).await;
    log_end(peer, &name, end);
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
        End::Io(e) => info!(%peer, export, error = %e, "NBD connection I/O error"),
    }
}

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    typ: u32,
    data: &[u8],
) -> Result<(), End> {
    wr.write_all(&proto::encode_opt_reply(option, typ, data))
        .await
        .map_err(End::Io)
}

/// Option-haggling state of one connection.
struct Haggle<'a, R: ExportRegistry> {
    registry: &'a R,
    cfg: &'a ServerConfig,
    no_zeroes: bool,
    mode: Mode,
    /// Canonical name of the export `base:allocation` was selected for.
    meta_for: Option<String>,
}

/// What the handshake hands to the transmission phase.
struct Negotiated<E> {
    export: Arc<E>,
    mode: Mode,
    block_status: bool,
}

/// Outcome of one option.
enum Step<E> {
    Continue,
    Go(Arc<E>),
}

/// Fixed-newstyle handshake. Returns the export to serve and what was
/// negotiated, or how the connection ended.
async fn handshake<R, Rd, W>(
    rd: &mut Rd,
    wr: &mut W,
    registry: &R,
    cfg: &ServerConfig,
) -> Result<Negotiated<R::E>, End>
where
    R: ExportRegistry,
    Rd: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::encode_greeting())
        .await
        .map_err(End::Io)?;
    wr.flush().await.map_err(End::Io)?;
    let mut cf = [0u8; 4];
    rd.read_exact(&mut cf)
        .await
        .map_err(|e| End::from_read(e, "client flags"))?;
    let cflags = proto::decode_client_flags(cf)
        .map_err(|v| End::Protocol(format!("unknown client flags {v:#x}")))?;
    let mut h = Haggle {
        registry,
        cfg,
        no_zeroes: cflags.no_zeroes,
        mode: Mode::Simple,
        meta_for: None,
    };
    loop {
        let (option, data) = read_option(rd, wr).await?;
        let step = h.option(wr, option, &data).await?;
        wr.flush().await.map_err(End::Io)?;
        if let Step::Go(export) = step {
            // Contexts selected for another export do not carry over (the
            // client may not send BLOCK_STATUS then; it gets EINVAL).
            let block_status = h.meta_for.as_deref() == Some(export.name());
            return Ok(Negotiated {
                export,
                mode: h.mode,
                block_status,
            });
        }
    }
}

/// Read one option header and its (bounded) payload.
async fn read_option<Rd, W>(rd: &mut Rd, wr: &mut W) -> Result<(u32, Vec<u8>), End>
where
    Rd: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut h = [0u8; proto::OPT_HEADER_LEN];
    match rd.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(End::Eof),
        Err(e) => return Err(End::Io(e)),
    }
    let oh = proto::decode_opt_header(&h).map_err(|e| End::Protocol(e.to_string()))?;
    if oh.len > proto::MAX_OPTION_LEN {
        // We cannot skip the payload without reading up to 4 GiB, so
        // tell the client why and hang up (spec allows a hard
        // disconnect for denial-of-service behaviour).
        let _ = send_opt_reply(wr, oh.option, proto::REP_ERR_TOO_BIG, b"option too large").await;
        let _ = wr.flush().await;
        return Err(End::Protocol(format!(
            "option {} length {} exceeds limit {}",
            oh.option,
            oh.len,
            proto::MAX_OPTION_LEN
        )));
    }
    let mut data = vec![0u8; oh.len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(|e| End::from_read(e, "option payload"))?;
    Ok((oh.option, data))
}

impl<R: ExportRegistry> Haggle<'_, R> {
    fn resolve(&self, name: &str) -> Option<Arc<R::E>> {
        if name.is_empty() {
            self.registry
                .default_export()
                .and_then(|n| self.registry.lookup(&n))
        } else {
            self.registry.lookup(name)
        }
    }

    fn caps(&self, export: &R::E) -> Caps {
        Caps {
            flags: export.flags(),
            mode: self.mode,
        }
    }

    async fn option<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<Step<R::E>, End> {
        match option {
            proto::OPT_EXPORT_NAME => self.export_name(wr, data).await.map(Step::Go),
            proto::OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_opt_reply(wr, option, proto::REP_ACK, &[]).await;
                let _ = wr.flush().await;
                Err(End::ClientDisc)
            }
            proto::OPT_LIST => self.list(wr, data).await.map(|()| Step::Continue),
            proto::OPT_INFO | proto::OPT_GO => self.info_go(wr, option, data).await,
            proto::OPT_STRUCTURED_REPLY | proto::OPT_EXTENDED_HEADERS => {
                let (typ, msg) = self.header_style(option, data);
                send_opt_reply(wr, option, typ, msg.as_bytes()).await?;
                Ok(Step::Continue)
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.meta_context(wr, option, data).await?;
                Ok(Step::Continue)
            }
            other => {
                // STARTTLS and anything unknown: the session continues.
                debug!(option = other, "unsupported NBD option");
                send_opt_reply(wr, other, proto::REP_ERR_UNSUP, &[]).await?;
                Ok(Step::Continue)
            }
        }
    }

    /// OPT_EXPORT_NAME cannot fail gracefully: any problem means
    /// terminating the session, as the spec mandates.
    async fn export_name<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        data: &[u8],
    ) -> Result<Arc<R::E>, End> {
        if self.mode == Mode::Extended {
            // Its reply cannot tell the client which headers follow.
            return Err(End::Protocol(
                "EXPORT_NAME after extended headers were negotiated".into(),
            ));
        }
        if data.len() > proto::MAX_STRING_LEN {
            return Err(End::Protocol("EXPORT_NAME name too long".into()));
        }
        let name = std::str::from_utf8(data)
            .map_err(|_| End::Protocol("EXPORT_NAME name is not UTF-8".into()))?;
        let export = self
            .resolve(name)
            .ok_or_else(|| End::Protocol(format!("EXPORT_NAME unknown export {name:?}")))?;
        let tflags = proto::transmission_flags(&self.caps(&export));
        wr.write_all(&proto::encode_export_name_reply(
            export.size(),
            tflags,
            self.no_zeroes,
        ))
        .await
        .map_err(End::Io)?;
        Ok(export)
    }

    async fn list<W: AsyncWrite + Unpin>(&mut self, wr: &mut W, data: &[u8]) -> Result<(), End> {
        let option = proto::OPT_LIST;
        if !data.is_empty() {
            return send_opt_reply(wr, option, proto::REP_ERR_INVALID, b"LIST takes no data").await;
        }
        for name in self.registry.names() {
            let rep = proto::encode_rep_server(&name);
            send_opt_reply(wr, option, proto::REP_SERVER, &rep).await?;
        }
        send_opt_reply(wr, option, proto::REP_ACK, &[]).await
    }

    async fn info_go<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<Step<R::E>, End> {
        let req = match proto::decode_info_request(data) {
            Err(proto::InfoRequestError::TooBig(n)) => {
                warn!(len = n, "INFO/GO export name too long");
                send_opt_reply(wr, option, proto::REP_ERR_TOO_BIG, b"name too long").await?;
                return Ok(Step::Continue);
            }
            Err(e @ proto::InfoRequestError::Invalid(_)) => {
                warn!(error = %e, "malformed INFO/GO option");
                let msg = e.to_string();
                send_opt_reply(wr, option, proto::REP_ERR_INVALID, msg.as_bytes()).await?;
                return Ok(Step::Continue);
            }
            Ok(req) => req,
        };
        let Some(export) = self.resolve(&req.name) else {
            info!(export = %req.name, "client asked for unknown export");
            send_opt_reply(wr, option, proto::REP_ERR_UNKNOWN, b"unknown export").await?;
            return Ok(Step::Continue);
        };
        let tflags = proto::transmission_flags(&self.caps(&export));
        let info = proto::encode_info_export(export.size(), tflags);
        send_opt_reply(wr, option, proto::REP_INFO, &info).await?;
        if req.infos.contains(&proto::INFO_NAME) {
            let info = proto::encode_info_name(export.name());
            send_opt_reply(wr, option, proto::REP_INFO, &info).await?;
        }
        // Always sent: min 1 means no alignment demands, max tells the
        // client our payload limit.
        let info = proto::encode_info_block_size(1, PREFERRED_BLOCK, self.cfg.max_payload);
        send_opt_reply(wr, option, proto::REP_INFO, &info).await?;
        send_opt_reply(wr, option, proto::REP_ACK, &[]).await?;
        Ok(if option == proto::OPT_GO {
            Step::Go(export)
        } else {
            Step::Continue
        })
    }

    /// STRUCTURED_REPLY / EXTENDED_HEADERS: the reply type and message.
    /// Either resets the selected metadata contexts, whose reply shape
    /// depends on the header style.
    fn header_style(&mut self, option: u32, data: &[u8]) -> (u32, &'static str) {
        if !data.is_empty() {
            return (proto::REP_ERR_INVALID, "option takes no data");
        }
        let want = if option == proto::OPT_EXTENDED_HEADERS {
            Mode::Extended
        } else {
            Mode::Structured
        };
        if self.mode == want {
            return (proto::REP_ERR_INVALID, "already negotiated");
        }
        if self.mode == Mode::Extended {
            // Spec: extended headers take precedence; no downgrade.
            return (proto::REP_ERR_EXT_HEADER_REQD, "extended headers in use");
        }
        self.mode = want;
        self.meta_for = None;
        (proto::REP_ACK, "")
    }

    async fn meta_context<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<(), End> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_for = None;
        }
        if self.mode == Mode::Simple {
            let msg = b"negotiate structured replies or extended headers first";
            return send_opt_reply(wr, option, proto::REP_ERR_INVALID, msg).await;
        }
        let req = match proto::decode_meta_request(data) {
            Ok(r) => r,
            Err(why) => {
                return send_opt_reply(wr, option, proto::REP_ERR_INVALID, why.as_bytes()).await
            }
        };
        let Some(export) = self.resolve(&req.name) else {
            return send_opt_reply(wr, option, proto::REP_ERR_UNKNOWN, b"unknown export").await;
        };
        // LIST with no query lists everything; otherwise only what a query
        // names. Unknown namespaces and leaves are ignored, as required.
        let selected = if set {
            req.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
        } else {
            req.queries.is_empty() || req.queries.iter().any(|q| proto::list_query_matches(q))
        };
        if selected {
            // LIST replies carry id 0 (reserved); SET's id is the real one.
            let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
            let rep = proto::encode_meta_context(id, proto::BASE_ALLOCATION);
            send_opt_reply(wr, option, proto::REP_META_CONTEXT, &rep).await?;
            if set {
                self.meta_for = Some(export.name().to_owned());
            }
        }
        send_opt_reply(wr, option, proto::REP_ACK, &[]).await
    }
}

/// Permits held by a request until its reply has been written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Header bytes of one reply message: a simple reply, or a chunk header
/// with the fixed part of its payload.
enum Head {
    Simple([u8; proto::SIMPLE_REPLY_LEN]),
    Chunk(proto::ChunkHead),
}

impl Head {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Head::Simple(b) => b,
            Head::Chunk(c) => c.as_bytes(),
        }
    }
}

/// One message on the wire: header, then the body if any.
struct Part {
    head: Head,
    body: Option<Bytes>,
}

/// A complete reply: every part is written back to back, so chunks of one
/// reply are never interleaved with other replies (allowed, but pointless).
struct Reply {
    first: Part,
    rest: Vec<Part>,
    _permits: Option<Permits>,
}

/// The request a reply answers, and how replies look on this connection.
#[derive(Debug, Clone, Copy)]
struct ReplyTo {
    mode: Mode,
    typ: u16,
    handle: u64,
    offset: u64,
}

impl ReplyTo {
    fn chunk(&self) -> proto::ChunkTo {
        proto::ChunkTo {
            mode: self.mode,
            handle: self.handle,
            req_offset: self.offset,
        }
    }

    /// Replies to this request are chunks (READ once structured replies are
    /// on, everything once extended headers are).
    fn chunked(&self) -> bool {
        match self.mode {
            Mode::Simple => false,
            Mode::Structured => self.typ == proto::CMD_READ,
            Mode::Extended => true,
        }
    }
}

impl Reply {
    fn single(first: Part, permits: Option<Permits>) -> Reply {
        Reply {
            first,
            rest: Vec::new(),
            _permits: permits,
        }
    }

    /// Success without data.
    fn ok(to: ReplyTo, permits: Option<Permits>) -> Reply {
        let head = if to.chunked() {
            Head::Chunk(proto::encode_none(to.chunk()))
        } else {
            Head::Simple(proto::encode_simple_reply(to.handle, 0))
        };
        Reply::single(Part { head, body: None }, permits)
    }

    /// Failure of the whole request. Once chunks are possible the error
    /// travels as an ERROR chunk, which carries a message for humans (the
    /// spec prefers it, and READ must never get a simple reply then).
    fn error(to: ReplyTo, errno: u32, msg: &str, permits: Option<Permits>) -> Reply {
        if to.mode == Mode::Simple {
            let head = Head::Simple(proto::encode_simple_reply(to.handle, errno));
            return Reply::single(Part { head, body: None }, permits);
        }
        Reply::single(error_part(to, true, errno, msg, None), permits)
    }

    /// A read's data in one piece.
    fn data(to: ReplyTo, data: Bytes, permits: Permits) -> Reply {
        let head = if to.mode == Mode::Simple {
            Head::Simple(proto::encode_simple_reply(to.handle, 0))
        } else {
            Head::Chunk(proto::encode_offset_data(
                to.chunk(),
                true,
                to.offset,
                data.len(),
            ))
        };
        Reply::single(
            Part {
                head,
                body: Some(data),
            },
            Some(permits),
        )
    }
}

fn error_part(to: ReplyTo, done: bool, errno: u32, msg: &str, at: Option<u64>) -> Part {
    let payload = proto::error_payload(errno, msg, at);
    Part {
        head: Head::Chunk(proto::encode_error(
            to.chunk(),
            done,
            at.is_some(),
            payload.len(),
        )),
        body: Some(Bytes::from(payload)),
    }
}

async fn writer_task(
    mut rx: mpsc::Receiver<Reply>,
    mut wr: BufWriter<OwnedWriteHalf>,
    peer: SocketAddr,
) {
    let res: io::Result<()> = async {
        while let Some(r) = rx.recv().await {
            write_reply(&mut wr, r).await?;
            // Batch whatever is already queued, then flush once. Replies tend to come
            // in bursts (one journal batch completes many requests at once), so yield
            // once before flushing: request tasks woken together get to queue their
            // replies, and one send carries them all. Syscalls are the dominant cost
            // per request on small machines and VMs.
            loop {
                while let Ok(r) = rx.try_recv() {
                    write_reply(&mut wr, r).await?;
                }
                tokio::task::yield_now().await;
                if rx.is_empty() {
                    break;
                }
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    }
    .await;
    if let Err(e) = res {
        debug!(%peer, error = %e, "NBD reply write failed");
    }
}

async fn write_reply(wr: &mut BufWriter<OwnedWriteHalf>, r: Reply) -> io::Result<()> {
    for p in std::iter::once(&r.first).chain(r.rest.iter()) {
        wr.write_all(p.head.as_bytes()).await?;
        if let Some(d) = &p.body {
            wr.write_all(d).await?;
        }
    }
    Ok(())
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

async fn transmission<E: Export>(
    mut rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    neg: Negotiated<E>,
    peer: SocketAddr,
    cfg: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> End {
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
    async fn request(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
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
    async fn refuse(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
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

/// A short human-readable reason for an NBD error value (sent in error
/// chunks; the server log has the details).
fn errno_text(errno: u32) -> &'static str {
    match errno {
        proto::EPERM => "operation not permitted (read-only export)",
        proto::EIO => "input/output error",
        proto::ENOMEM => "out of memory",
        proto::EINVAL => "invalid request",
        proto::ENOSPC => "beyond the end of the export, or no space",
        proto::EOVERFLOW => "request too large",
        proto::ENOTSUP => "not supported (zeroing is not fast)",
        proto::ESHUTDOWN => "server shutting down",
        _ => "request failed",
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

/// Run one validated request against the export and build its reply.
async fn execute<E: Export>(
    export: &E,
    action: Action,
    body: Bytes,
    to: ReplyTo,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    let res: Result<(), ExportError> = match action {
        Action::Read { offset, len, df } => {
            return read(export, to, offset, len, df, permits, peer).await
        }
        Action::BlockStatus {
            offset,
            len,
            req_one,
        } => return block_status(export, to, offset, len, req_one, permits, peer).await,
        Action::Write { offset, fua, .. } => export.write(offset, body, fua).await,
        Action::Flush => export.flush().await,
        Action::Trim { offset, len, fua } => {
            let r = in_pieces(offset, len, |o, l| export.trim(o, l)).await;
            flush_if(export, r, fua).await
        }
        Action::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => {
            let r = in_pieces(offset, len, |o, l| export.write_zeroes(o, l, may_trim)).await;
            flush_if(export, r, fua).await
        }
        Action::Cache { offset, len } => export.cache(offset, len).await,
        // Handled inline by the reader; listed for exhaustiveness.
        Action::Noop | Action::Disconnect => Ok(()),
    };
    match res {
        Ok(()) => Reply::ok(to, Some(permits)),
        Err(e) => export_error(to, e, permits, peer),
    }
}

fn export_error(to: ReplyTo, e: ExportError, permits: Permits, peer: SocketAddr) -> Reply {
    let handle = to.handle;
    match e {
        ExportError::Io(_) => warn!(%peer, handle, error = %e, "NBD export I/O error"),
        _ => debug!(%peer, handle, error = %e, "NBD export request failed"),
    }
    let errno = e.nbd_errno();
    Reply::error(to, errno, errno_text(errno), Some(permits))
}

/// Trim and write-zeroes lengths are 64-bit with extended headers but the
/// export API takes 32 bits: cut the range into aligned pieces, in order,
/// stopping at the first failure.
async fn in_pieces<F, Fut>(offset: u64, len: u64, mut f: F) -> Result<(), ExportError>
where
    F: FnMut(u64, u32) -> Fut,
    Fut: Future<Output = Result<(), ExportError>>,
{
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(u64::from(LARGE_OP_PIECE)) as u32;
        f(offset + done, n).await?;
        done += u64::from(n);
    }
    Ok(())
}

async fn flush_if<E: Export>(
    export: &E,
    r: Result<(), ExportError>,
    fua: bool,
) -> Result<(), ExportError> {
    // The export API has no FUA on trim/zero; a flush afterwards gives the
    // same durability guarantee.
    r?;
    if fua {
        export.flush().await?;
    }
    Ok(())
}

/// READ: one data reply, or (structured, large enough, no DF) content
/// chunks that send holes as OFFSET_HOLE instead of zeroes.
async fn read<E: Export>(
    export: &E,
    to: ReplyTo,
    offset: u64,
    len: u32,
    df: bool,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    if to.mode == Mode::Simple || df || len < SPARSE_READ_MIN {
        return match read_exact(export, offset, len).await {
            Ok(d) => Reply::data(to, d, permits),
            Err(e) => export_error(to, e, permits, peer),
        };
    }
    let extents = match export
        .extents(offset, u64::from(len), MAX_READ_EXTENTS)
        .await
    {
        Ok(v) => runs(v, u64::from(len), MAX_READ_EXTENTS, true),
        Err(e) => {
            // Allocation status is an optimisation here: read it all.
            debug!(%peer, error = %e, "extents for a sparse read failed");
            vec![Extent::data(u64::from(len))]
        }
    };
    let mut parts = Vec::with_capacity(extents.len());
    let mut pos = offset;
    for e in extents {
        // Extents never exceed the read's 32-bit length.
        let n = e.len as u32;
        if e.zero {
            parts.push(Part {
                head: Head::Chunk(proto::encode_offset_hole(to.chunk(), false, pos, n)),
                body: None,
            });
        } else {
            match read_exact(export, pos, n).await {
                Ok(d) => parts.push(Part {
                    head: Head::Chunk(proto::encode_offset_data(to.chunk(), false, pos, d.len())),
                    body: Some(d),
                }),
                Err(e) => {
                    warn!(%peer, handle = to.handle, error = %e, "NBD export read failed");
                    let errno = e.nbd_errno();
                    parts.push(error_part(to, false, errno, errno_text(errno), Some(pos)));
                    break;
                }
            }
        }
        pos += e.len;
    }
    // Everything was read before the first byte is sent, so the last chunk
    // can carry DONE: no error can follow it.
    chunks_reply(to, parts, permits)
}

/// Build a reply from chunks, setting DONE on the last one.
fn chunks_reply(to: ReplyTo, mut parts: Vec<Part>, permits: Permits) -> Reply {
    let Some(mut last) = parts.pop() else {
        return Reply::ok(to, Some(permits));
    };
    if let Head::Chunk(h) = &mut last.head {
        h.set_done();
    }
    parts.push(last);
    let mut it = parts.into_iter();
    let first = it.next().unwrap_or_else(|| Part {
        head: Head::Chunk(proto::encode_none(to.chunk())),
        body: None,
    });
    Reply {
        first,
        rest: it.collect(),
        _permits: Some(permits),
    }
}

/// A read that must return exactly `len` bytes; anything else would
/// desynchronise the client's stream, so it becomes an I/O error.
async fn read_exact<E: Export>(export: &E, offset: u64, len: u32) -> Result<Bytes, ExportError> {
    let d = export.read(offset, len).await?;
    if d.len() != len as usize {
        return Err(ExportError::Io(format!(
            "export returned {} bytes for a {len}-byte read",
            d.len()
        )));
    }
    Ok(d)
}

/// Normalise an export's extent list for a request of `len` bytes: drop
/// empty extents, cut at `len`, merge neighbours with equal status, keep at
/// most `max` (at least one); whatever the list leaves uncovered of a read
/// becomes data when `fill` is set, so a sparse read covers its range.
fn runs(v: Vec<Extent>, len: u64, max: usize, fill: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(v.len().min(max));
    let mut covered = 0u64;
    for e in v {
        if covered >= len {
            break;
        }
        let n = e.len.min(len - covered);
        if n == 0 {
            continue;
        }
        let full = out.len() >= max.max(1);
        match out.last_mut() {
            Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += n,
            _ if full => break,
            _ => out.push(Extent { len: n, ..e }),
        }
        covered += n;
    }
    if fill && covered < len {
        match out.last_mut() {
            Some(l) if !l.hole && !l.zero => l.len += len - covered,
            // Possibly one run past `max`: still bounded.
            _ => out.push(Extent::data(len - covered)),
        }
    }
    out
}

/// BLOCK_STATUS for `base:allocation`: one status chunk (with DONE), at
/// most MAX_STATUS_EXTENTS descriptors (one with REQ_ONE).
async fn block_status<E: Export>(
    export: &E,
    to: ReplyTo,
    offset: u64,
    len: u64,
    req_one: bool,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
    let extents = match export.extents(offset, len, max).await {
        Ok(v) => v,
        Err(e) => return export_error(to, e, permits, peer),
    };
    // A prefix is a valid answer; the client asks again for the rest.
    let mut runs = runs(extents, len, max, false);
    if to.mode != Mode::Extended {
        // Compact requests have 32-bit lengths, so their extents fit; this
        // only guards against an inconsistent export.
        runs.retain(|e| e.len <= u64::from(u32::MAX));
    }
    if runs.is_empty() {
        runs.push(Extent::data(len.min(u64::from(u32::MAX))));
    }
    let d: Vec<proto::Descriptor> = runs
        .iter()
        .map(|e| proto::Descriptor {
            len: e.len,
            flags: e.flags(),
        })
        .collect();
    let (typ, payload) = proto::block_status_payload(to.mode, proto::BASE_ALLOCATION_ID, &d);
    let head = proto::encode_chunk(to.chunk(), proto::REPLY_FLAG_DONE, typ, &[], payload.len());
    Reply::single(
        Part {
            head: Head::Chunk(head),
            body: Some(Bytes::from(payload)),
        },
        Some(permits),
    )
}
