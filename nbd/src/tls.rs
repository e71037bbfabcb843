//! Connection set-up up to transmission: the handshake on the plain socket
//! and, after `NBD_OPT_STARTTLS`, the TLS handshake and a second round of
//! option haggling inside TLS. Hands the transmission phase buffered
//! read/write halves of whichever stream the session ended up on; the
//! transmission code is generic over them, so it exists once.
//!
//! [`TlsServer`] holds one rustls configuration per set of suites: a rustls
//! `CryptoProvider` is one consistent set, and a national-crypto (RFC 8998)
//! handshake must not mix SM and standard algorithms. Each connection's
//! ClientHello is read first and picks the configuration whose cipher suites
//! the client offers; a client that offers none is refused with a log line
//! naming both sides' suites.
//!
//! The handshake reads unbuffered and writes through a small buffer; the
//! transmission phase's large buffers are allocated only once a client has
//! entered it. A connection that never finishes its handshake (a flood of
//! idle sockets) so costs a few KiB, not half a MiB.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, server::Acceptor, CipherSuite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tracing::info;

use crate::admission::Slot;
use crate::handshake::{greet, haggle, Haggled, Negotiated, TlsPhase};
use crate::server::End;
use crate::{ExportRegistry, ServerConfig, TlsPolicy};

/// Socket buffer sizes in transmission: large enough to batch many 4 KiB
/// requests/replies per syscall, small enough to be irrelevant per session.
const READ_BUF: usize = 256 * 1024;
const WRITE_BUF: usize = 256 * 1024;
/// Write buffer during the handshake: option replies are small and each
/// option's replies are flushed together.
const HANDSHAKE_WRITE_BUF: usize = 4096;

/// Buffered halves of one connection's stream.
pub(crate) struct Halves<R, W> {
    pub(crate) rd: BufReader<R>,
    pub(crate) wr: BufWriter<W>,
}

impl<R: AsyncRead, W: AsyncWrite + Unpin> Halves<R, W> {
    /// The transmission buffers around the handshake's streams. Nothing was
    /// read ahead (the handshake reads unbuffered) and nothing is left to
    /// write (every option's replies are flushed), so no byte is lost.
    async fn for_transmission(rd: R, mut wr: BufWriter<W>) -> Result<Self, End> {
        wr.flush().await.map_err(End::Io)?;
        Ok(Halves {
            rd: BufReader::with_capacity(READ_BUF, rd),
            wr: BufWriter::with_capacity(WRITE_BUF, wr.into_inner()),
        })
    }
}

/// The handshake's write side: a small buffer, flushed after every option.
fn handshake_writer<W: AsyncWrite>(wr: W) -> BufWriter<W> {
    BufWriter::with_capacity(HANDSHAKE_WRITE_BUF, wr)
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
    slot: &Slot,
) -> Result<Session<R::E>, End> {
    let (mut rd, wr) = sock.into_split();
    let mut wr = handshake_writer(wr);
    let no_zeroes = greet(&mut rd, &mut wr).await?;
    let phase = match cfg.tls {
        TlsPolicy::Off => TlsPhase::Unavailable,
        TlsPolicy::Optional(_) => TlsPhase::Offered,
        TlsPolicy::Require(_) => TlsPhase::Required,
    };
    match haggle(&mut rd, &mut wr, registry, cfg, no_zeroes, phase, slot).await? {
        Haggled::Go(neg) => {
            let halves = Halves::for_transmission(rd, wr).await?;
            return Ok(Session::Plain(halves, neg));
        }
        Haggled::StartTls => {}
    }
    // The TLS handshake is waiting on the client: it may be displaced then.
    slot.idle();
    let (mut rd, mut wr) = upgrade(rd, wr, peer, &cfg.tls).await?;
    match haggle(
        &mut rd,
        &mut wr,
        registry,
        cfg,
        no_zeroes,
        TlsPhase::Active,
        slot,
    )
    .await?
    {
        Haggled::Go(neg) => Ok(Session::Tls(Halves::for_transmission(rd, wr).await?, neg)),
        // `TlsPhase::Active` answers STARTTLS with an error; never here.
        Haggled::StartTls => Err(End::Protocol("STARTTLS inside TLS".into())),
    }
}

/// The TLS handshake on the socket the plain halves came from.
async fn upgrade(
    rd: OwnedReadHalf,
    wr: BufWriter<OwnedWriteHalf>,
    peer: SocketAddr,
    policy: &TlsPolicy,
) -> Result<(ReadHalf<Tls>, BufWriter<WriteHalf<Tls>>), End> {
    let Some(server) = policy.server() else {
        // STARTTLS is acknowledged only when a configuration exists.
        return Err(End::Protocol("STARTTLS without a TLS configuration".into()));
    };
    // Bytes the client sent after STARTTLS but before seeing our ACK must
    // never be taken as part of the TLS session's plaintext (the STARTTLS
    // command-injection class of attacks). The handshake reads unbuffered,
    // so such bytes are still in the socket and reach rustls as (invalid)
    // TLS records: the TLS handshake fails.
    // The handshake flushed the STARTTLS ACK; nothing is left buffered.
    let sock = rd
        .reunite(wr.into_inner())
        .map_err(|_| End::Protocol("socket halves do not match".into()))?;
    let start = LazyConfigAcceptor::new(Acceptor::default(), sock)
        .await
        .map_err(End::Tls)?;
    let offered = start.client_hello().cipher_suites().to_vec();
    let stream = match server.choose(&offered) {
        Ok(config) => start.into_stream(config.clone()).await.map_err(End::Tls)?,
        Err(first) => {
            // Run the handshake anyway so that rustls sends the client its
            // handshake_failure alert; it cannot succeed.
            let e = start.into_stream(first.clone()).await.err();
            return Err(End::Tls(io::Error::other(format!(
                "the client offers none of this server's TLS 1.3 cipher suites \
                 (server: {}; client: {}){}",
                names(&server.suites()),
                names(&offered),
                e.map(|e| format!(": {e}")).unwrap_or_default()
            ))));
        }
    };
    let conn = stream.get_ref().1;
    info!(%peer,
          version = ?conn.protocol_version(),
          suite = conn.negotiated_cipher_suite().map(|s| suite_name(s.suite())),
          client_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty()),
          "NBD client upgraded to TLS");
    let (rd, wr) = tokio::io::split(stream);
    Ok((rd, handshake_writer(wr)))
}

/// The TLS configurations an NBD server offers, in order of preference: one
/// per crypto provider (for example the SM suites first, then the standard
/// ones). A connection gets the first whose provider has a cipher suite the
/// client's ClientHello offers, so a client speaking only the standard
/// suites (GnuTLS in qemu and libnbd) is served by the standard
/// configuration and a national-crypto client by the SM one, each with its
/// own certificate, and no handshake mixes the two sets.
#[derive(Debug, Clone)]
pub struct TlsServer {
    configs: Vec<Arc<rustls::ServerConfig>>,
}

impl TlsServer {
    /// One configuration: what it can negotiate, or nothing.
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsServer {
        TlsServer {
            configs: vec![config],
        }
    }

    /// `config` for clients that offer none of the suites before it.
    pub fn or(mut self, config: Arc<rustls::ServerConfig>) -> TlsServer {
        self.configs.push(config);
        self
    }

    /// The configurations, most preferred first.
    pub fn configs(&self) -> &[Arc<rustls::ServerConfig>] {
        &self.configs
    }

    /// Every cipher suite offered, most preferred first.
    pub fn suites(&self) -> Vec<CipherSuite> {
        self.configs
            .iter()
            .flat_map(|c| c.crypto_provider().cipher_suites.iter())
            .map(|s| s.suite())
            .collect()
    }

    /// The first configuration with a suite the client offers, else (as
    /// the error) the first configuration, to refuse the client with.
    fn choose(
        &self,
        offered: &[CipherSuite],
    ) -> Result<&Arc<rustls::ServerConfig>, &Arc<rustls::ServerConfig>> {
        self.configs
            .iter()
            .find(|c| {
                c.crypto_provider()
                    .cipher_suites
                    .iter()
                    .any(|s| offered.contains(&s.suite()))
            })
            .ok_or(&self.configs[0])
    }
}

impl From<Arc<rustls::ServerConfig>> for TlsServer {
    fn from(config: Arc<rustls::ServerConfig>) -> TlsServer {
        TlsServer::new(config)
    }
}

/// A cipher suite's IANA name; rustls 0.23 has no name for RFC 8998's.
pub fn suite_name(s: CipherSuite) -> String {
    match (s.as_str(), u16::from(s)) {
        (Some(name), _) => name.to_string(),
        (None, 0x00c6) => "TLS_SM4_GCM_SM3".into(),
        (None, 0x00c7) => "TLS_SM4_CCM_SM3".into(),
        (None, n) => format!("0x{n:04x}"),
    }
}

fn names(suites: &[CipherSuite]) -> String {
    let v: Vec<String> = suites.iter().map(|s| suite_name(*s)).collect();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_names() {
        assert_eq!(
            suite_name(CipherSuite::TLS13_AES_128_GCM_SHA256),
            "TLS13_AES_128_GCM_SHA256"
        );
        assert_eq!(suite_name(CipherSuite::from(0x00c6)), "TLS_SM4_GCM_SM3");
        assert_eq!(suite_name(CipherSuite::from(0xfafa)), "0xfafa");
    }
}
