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

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::proto::{self, Action};
use super::{Export, ExportError, ExportRegistry, ServerConfig};

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
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, &*registry, &cfg)) => {
            match r {
                Ok(r) => r,
                Err(_) => Err(End::Protocol("handshake timed out".into())),
            }
        }
        _ = shutdown_requested(&mut shutdown) => Err(End::Shutdown),
    };
    let export = match hs {
        Ok(e) => e,
        Err(end) => {
            log_end(peer, "-", end);
            return;
        }
    };
    let name = export.name().to_owned();
    info!(%peer, export = %name, "NBD client entered transmission");
    let end = transmission(rd, wr, export, peer, &cfg, shutdown).await;
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

/// Fixed-newstyle handshake. Returns the export to serve, or how the
/// connection ended.
async fn handshake<R, Rd, W>(
    rd: &mut Rd,
    wr: &mut W,
    registry: &R,
    cfg: &ServerConfig,
) -> Result<Arc<R::E>, End>
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

    let resolve = |name: &str| -> Option<Arc<R::E>> {
        if name.is_empty() {
            registry.default_export().and_then(|n| registry.lookup(&n))
        } else {
            registry.lookup(name)
        }
    };

    loop {
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
            let _ =
                send_opt_reply(wr, oh.option, proto::REP_ERR_TOO_BIG, b"option too large").await;
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

        match oh.option {
            proto::OPT_EXPORT_NAME => {
                // This option cannot fail gracefully: any problem means
                // terminating the session, as the spec mandates.
                if data.len() > proto::MAX_STRING_LEN {
                    return Err(End::Protocol("EXPORT_NAME name too long".into()));
                }
                let name = std::str::from_utf8(&data)
                    .map_err(|_| End::Protocol("EXPORT_NAME name is not UTF-8".into()))?;
                let export = resolve(name)
                    .ok_or_else(|| End::Protocol(format!("EXPORT_NAME unknown export {name:?}")))?;
                let tflags = proto::transmission_flags(&export.flags());
                wr.write_all(&proto::encode_export_name_reply(
                    export.size(),
                    tflags,
                    cflags.no_zeroes,
                ))
                .await
                .map_err(End::Io)?;
                wr.flush().await.map_err(End::Io)?;
                return Ok(export);
            }
            proto::OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send_opt_reply(wr, oh.option, proto::REP_ACK, &[]).await;
                let _ = wr.flush().await;
                return Err(End::ClientDisc);
            }
            proto::OPT_LIST => {
                if data.is_empty() {
                    for name in registry.names() {
                        send_opt_reply(
                            wr,
                            oh.option,
                            proto::REP_SERVER,
                            &proto::encode_rep_server(&name),
                        )
                        .await?;
                    }
                    send_opt_reply(wr, oh.option, proto::REP_ACK, &[]).await?;
                } else {
                    send_opt_reply(wr, oh.option, proto::REP_ERR_INVALID, b"LIST takes no data")
                        .await?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                match proto::decode_info_request(&data) {
                    Err(proto::InfoRequestError::TooBig(n)) => {
                        warn!(len = n, "INFO/GO export name too long");
                        send_opt_reply(wr, oh.option, proto::REP_ERR_TOO_BIG, b"name too long")
                            .await?;
                    }
                    Err(e @ proto::InfoRequestError::Invalid(_)) => {
                        warn!(error = %e, "malformed INFO/GO option");
                        send_opt_reply(
                            wr,
                            oh.option,
                            proto::REP_ERR_INVALID,
                            e.to_string().as_bytes(),
                        )
                        .await?;
                    }
                    Ok(req) => match resolve(&req.name) {
                        None => {
                            info!(export = %req.name, "client asked for unknown export");
                            send_opt_reply(
                                wr,
                                oh.option,
                                proto::REP_ERR_UNKNOWN,
                                b"unknown export",
                            )
                            .await?;
                        }
                        Some(export) => {
                            let tflags = proto::transmission_flags(&export.flags());
                            send_opt_reply(
                                wr,
                                oh.option,
                                proto::REP_INFO,
                                &proto::encode_info_export(export.size(), tflags),
                            )
                            .await?;
                            if req.infos.contains(&proto::INFO_NAME) {
                                send_opt_reply(
                                    wr,
                                    oh.option,
                                    proto::REP_INFO,
                                    &proto::encode_info_name(export.name()),
                                )
                                .await?;
                            }
                            // Always sent: min 1 means no alignment demands,
                            // max tells the client our payload limit.
                            send_opt_reply(
                                wr,
                                oh.option,
                                proto::REP_INFO,
                                &proto::encode_info_block_size(1, PREFERRED_BLOCK, cfg.max_payload),
                            )
                            .await?;
                            send_opt_reply(wr, oh.option, proto::REP_ACK, &[]).await?;
                            if oh.option == proto::OPT_GO {
                                wr.flush().await.map_err(End::Io)?;
                                return Ok(export);
                            }
                        }
                    },
                }
            }
            other => {
                // Includes STRUCTURED_REPLY (simple replies only), STARTTLS
                // and meta contexts: the session continues.
                debug!(option = other, "unsupported NBD option");
                send_opt_reply(wr, other, proto::REP_ERR_UNSUP, &[]).await?;
            }
        }
        wr.flush().await.map_err(End::Io)?;
    }
}

/// Permits held by a request until its reply has been written.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Reply {
    header: [u8; proto::SIMPLE_REPLY_LEN],
    data: Option<Bytes>,
    _permits: Option<Permits>,
}

impl Reply {
    fn new(handle: u64, error: u32, data: Option<Bytes>, permits: Option<Permits>) -> Reply {
        Reply {
            header: proto::encode_simple_reply(handle, error),
            data,
            _permits: permits,
        }
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
    wr.write_all(&r.header).await?;
    if let Some(d) = &r.data {
        wr.write_all(d).await?;
    }
    Ok(())
}

async fn transmission<E: Export>(
    mut rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    export: Arc<E>,
    peer: SocketAddr,
    cfg: &ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let flags = export.flags();
    let max_payload = cfg.max_payload;
    let count_sem = Arc::new(Semaphore::new(cfg.max_inflight_per_conn));
    // Payload bytes held per connection (write payloads read, read data not
    // yet written). Twice the max payload so one maximal request never
    // starves behind another.
    let byte_budget = (max_payload as usize).saturating_mul(2);
    let byte_sem = Arc::new(Semaphore::new(byte_budget));
    let (tx, rx) = mpsc::channel::<Reply>(cfg.max_inflight_per_conn + 16);
    let writer = tokio::spawn(writer_task(rx, wr, peer));

    let end = loop {
        // Wait for the next request without consuming anything, so that
        // shutdown between requests never loses a partially read header.
        let eof = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break End::Shutdown,
            _ = tx.closed() => break End::WriterGone,
            r = rd.fill_buf() => match r {
                Ok(b) => b.is_empty(),
                Err(e) => break End::Io(e),
            },
        };
        if eof {
            break End::Eof;
        }
        let mut hdr = [0u8; proto::REQUEST_LEN];
        let r = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break End::Shutdown,
            r = rd.read_exact(&mut hdr) => r,
        };
        if let Err(e) = r {
            break End::from_read(e, "request header");
        }
        let req = match proto::decode_request(&hdr) {
            Ok(r) => r,
            Err(e) => break End::Protocol(e.to_string()),
        };
        if req.typ == proto::CMD_WRITE && req.len > max_payload {
            // The payload would have to be skipped byte by byte (up to
            // 4 GiB); the stream cannot be resynchronised cheaply.
            break End::Protocol(format!(
                "write length {} exceeds max payload {max_payload}",
                req.len
            ));
        }
        let action = match proto::validate_request(&req, export.size(), &flags, max_payload) {
            Ok(a) => a,
            Err(errno) => {
                warn!(%peer, handle = req.handle, typ = req.typ, flags = req.flags,
                      offset = req.offset, len = req.len, errno, "rejecting invalid NBD request");
                if req.typ == proto::CMD_WRITE {
                    // Consume (without buffering) the payload to stay in sync.
                    let mut take = (&mut rd).take(u64::from(req.len));
                    match tokio::io::copy(&mut take, &mut tokio::io::sink()).await {
                        Ok(n) if n == u64::from(req.len) => {}
                        Ok(_) => {
                            break End::Protocol(
                                "client closed connection mid-write payload".into(),
                            )
                        }
                        Err(e) => break End::from_read(e, "write payload"),
                    }
                }
                if tx
                    .send(Reply::new(req.handle, errno, None, None))
                    .await
                    .is_err()
                {
                    break End::WriterGone;
                }
                continue;
            }
        };
        let count = match count_sem.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break End::WriterGone, // semaphore never closes
        };
        let data_len = match action {
            Action::Read { len, .. } | Action::Write { len, .. } => len,
            _ => 0,
        };
        let bytes = if data_len > 0 {
            match byte_sem.clone().acquire_many_owned(data_len).await {
                Ok(p) => Some(p),
                Err(_) => break End::WriterGone,
            }
        } else {
            None
        };
        let permits = Permits {
            _count: count,
            _bytes: bytes,
        };
        let handle = req.handle;
        let payload = match action {
            Action::Disconnect => break End::ClientDisc,
            Action::Noop => {
                if tx
                    .send(Reply::new(handle, 0, None, Some(permits)))
                    .await
                    .is_err()
                {
                    break End::WriterGone;
                }
                continue;
            }
            Action::Write { len, .. } => match read_payload(&mut rd, len).await {
                Ok(p) => Some(p),
                Err(e) => break End::from_read(e, "write payload"),
            },
            _ => None,
        };
        let export = export.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = execute(&*export, action, payload, handle, permits, peer).await;
            // The writer is gone only if the client is; nothing to do then.
            let _ = tx.send(reply).await;
        });
    };
    // In-flight request tasks hold their own senders; the writer drains
    // their replies and exits once the last one is sent.
    drop(tx);
    drop(rd);
    if let Err(e) = writer.await {
        warn!(%peer, error = %e, "NBD writer task failed");
    }
    end
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

async fn execute<E: Export>(
    export: &E,
    action: Action,
    payload: Option<Bytes>,
    handle: u64,
    permits: Permits,
    peer: SocketAddr,
) -> Reply {
    let res: Result<Option<Bytes>, ExportError> = match action {
        Action::Read { offset, len } => match export.read(offset, len).await {
            // A short or long buffer would desynchronise the client's
            // stream; report it as an I/O error instead.
            Ok(d) if d.len() == len as usize => Ok(Some(d)),
            Ok(d) => Err(ExportError::Io(format!(
                "export returned {} bytes for a {len}-byte read",
                d.len()
            ))),
            Err(e) => Err(e),
        },
        Action::Write { offset, fua, .. } => export
            .write(offset, payload.unwrap_or_default(), fua)
            .await
            .map(|()| None),
        Action::Flush => export.flush().await.map(|()| None),
        Action::Trim { offset, len, fua } => {
            // The export API has no FUA on trim/zero; a flush afterwards
            // gives the same durability guarantee.
            let r = export.trim(offset, len).await;
            flush_if(export, r, fua).await.map(|()| None)
        }
        Action::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => {
            let r = export.write_zeroes(offset, len, may_trim).await;
            flush_if(export, r, fua).await.map(|()| None)
        }
        // Handled inline by the reader; listed for exhaustiveness.
        Action::Noop | Action::Disconnect => Ok(None),
    };
    match res {
        Ok(data) => Reply::new(handle, 0, data, Some(permits)),
        Err(e) => {
            match e {
                ExportError::Io(_) => warn!(%peer, handle, error = %e, "NBD export I/O error"),
                _ => debug!(%peer, handle, error = %e, "NBD export request failed"),
            }
            Reply::new(handle, e.nbd_errno(), None, Some(permits))
        }
    }
}

async fn flush_if<E: Export>(
    export: &E,
    r: Result<(), ExportError>,
    fua: bool,
) -> Result<(), ExportError> {
    r?;
    if fua {
        export.flush().await?;
    }
    Ok(())
}
