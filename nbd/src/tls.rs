//! Connection set-up up to transmission: the handshake on the plain socket
//! and, after `NBD_OPT_STARTTLS`, the TLS handshake and a second round of
//! option haggling inside TLS. Hands the transmission phase buffered
//! read/write halves of whichever stream the session ended up on; the
//! transmission code is generic over them, so it exists once.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::handshake::{greet, haggle, Haggled, Negotiated, TlsPhase};
use crate::server::End;
use crate::{ExportRegistry, ServerConfig, TlsPolicy};

/// Socket buffer sizes: large enough to batch many 4 KiB requests/replies per
/// syscall, small enough to be irrelevant per connection.
const READ_BUF: usize = 256 * 1024;
const WRITE_BUF: usize = 256 * 1024;

/// Buffered halves of one connection's stream.
pub(crate) struct Halves<R, W> {
    pub(crate) rd: BufReader<R>,
    pub(crate) wr: BufWriter<W>,
}

impl<R: AsyncRead, W: AsyncWrite> Halves<R, W> {
    fn new(rd: R, wr: W) -> Self {
        Halves {
            rd: BufReader::with_capacity(READ_BUF, rd),
            wr: BufWriter::with_capacity(WRITE_BUF, wr),
        }
    }
}

type Tls = TlsStream<TcpStream>;

/// A negotiated session, on the plain socket or inside TLS.
pub(crate) enum Session<E> {
    Plain(Halves<OwnedReadHalf, OwnedWriteHalf>, Negotiated<E>),
    Tls(Halves<ReadHalf<Tls>, WriteHalf<Tls>>, Negotiated<E>),
}

/// The whole handshake of one connection (the caller bounds its time).
pub(crate) async fn negotiate<R: ExportRegistry>(
    sock: TcpStream,
    peer: SocketAddr,
    registry: &R,
    cfg: &ServerConfig,
) -> Result<Session<R::E>, End> {
    let (rd, wr) = sock.into_split();
    let mut plain = Halves::new(rd, wr);
    let no_zeroes = greet(&mut plain.rd, &mut plain.wr).await?;
    let phase = match cfg.tls {
        TlsPolicy::Off => TlsPhase::Unavailable,
        TlsPolicy::Optional(_) => TlsPhase::Offered,
        TlsPolicy::Require(_) => TlsPhase::Required,
    };
    let (rd, wr) = (&mut plain.rd, &mut plain.wr);
    match haggle(rd, wr, registry, cfg, no_zeroes, phase).await? {
        Haggled::Go(neg) => return Ok(Session::Plain(plain, neg)),
        Haggled::StartTls => {}
    }
    let mut tls = upgrade(plain, peer, &cfg.tls).await?;
    let (rd, wr) = (&mut tls.rd, &mut tls.wr);
    match haggle(rd, wr, registry, cfg, no_zeroes, TlsPhase::Active).await? {
        Haggled::Go(neg) => Ok(Session::Tls(tls, neg)),
        // `TlsPhase::Active` answers STARTTLS with an error; never here.
        Haggled::StartTls => Err(End::Protocol("STARTTLS inside TLS".into())),
    }
}

/// The TLS handshake on the socket the plain halves came from.
async fn upgrade(
    plain: Halves<OwnedReadHalf, OwnedWriteHalf>,
    peer: SocketAddr,
    policy: &TlsPolicy,
) -> Result<Halves<ReadHalf<Tls>, WriteHalf<Tls>>, End> {
    let Some(config) = policy.server_config() else {
        // STARTTLS is acknowledged only when a configuration exists.
        return Err(End::Protocol("STARTTLS without a TLS configuration".into()));
    };
    // Bytes the client sent after STARTTLS but before seeing our ACK would
    // otherwise be taken as part of the TLS session's plaintext (the
    // STARTTLS command-injection class of attacks): refuse them.
    if !plain.rd.buffer().is_empty() {
        return Err(End::Protocol(
            "client sent data after STARTTLS before the TLS handshake".into(),
        ));
    }
    // The handshake flushed the STARTTLS ACK; nothing is left buffered.
    let sock = plain
        .rd
        .into_inner()
        .reunite(plain.wr.into_inner())
        .map_err(|_| End::Protocol("socket halves do not match".into()))?;
    let stream = TlsAcceptor::from(config.clone())
        .accept(sock)
        .await
        .map_err(End::Tls)?;
    let conn = stream.get_ref().1;
    info!(%peer,
          version = ?conn.protocol_version(),
          suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()),
          client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty()),
          "NBD client upgraded to TLS");
    let (rd, wr) = tokio::io::split(stream);
    Ok(Halves::new(rd, wr))
}
