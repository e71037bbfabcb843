//! QUIC glue: mutual TLS 1.3 between cluster nodes, framed streams, the
//! handshake exchange, and reconnect backoff.
//!
//! This module only moves bytes and checks identities; every protocol decision
//! (version choice, resume point, acks) is made by `session` so it stays
//! testable without sockets.
//!
//! * The **primary dials** (QUIC client), each **standby listens** (QUIC
//!   server). ALPN is [`ALPN`] (`ferry/1`).
//! * Both sides present a certificate issued by the cluster CA
//!   ([`crate::pki`]). Each side checks the chain against the CA, that the
//!   peer's cluster SAN is this cluster, and that the peer's node-name SAN is
//!   the configured peer: TLS authenticates the node before a single ferry
//!   frame is read.
//! * Suites follow the cluster CA's key ([`TlsSuite`]): ECDSA means rustls's
//!   ring provider, SM2 means ferry-gmtls (RFC 8998 TLS_SM4_GCM_SM3, curveSM2,
//!   sm2sig_sm3; QUIC Initial packets stay AES-128-GCM as RFC 9001 requires).
//!   The peer checks above are the same in both.
//! * Streams: the primary opens one **bidirectional control stream** (Hello,
//!   HelloAck, Error, then Acks and Heartbeats) and, after the handshake, one
//!   **unidirectional data stream** that carries only WriteSets. QUIC flow
//!   control is per stream, so an 8 MiB write-set in flight never delays an
//!   ack or heartbeat behind it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use thiserror::Error;

use crate::pki::{self, cluster_hex, NodeIdentity, PkiError, TlsSuite};
use ferry_proto::session::{validate_hello, HandshakeError, LocalIdentity, Negotiated};
use ferry_proto::wire::{
    encode, encode_write_set_vectored, DecodeError, EncodeError, ErrorCode, ErrorFrame, Frame,
    FrameDecoder, Hello, HelloAck, Seq, WriteSet, MAX_PAYLOAD_LEN,
};

/// ALPN protocol id. A new major transport layout gets a new id, so an old
/// node fails the TLS handshake with a clear "no application protocol" error
/// instead of misparsing frames.
pub const ALPN: &[u8] = b"ferry/1";

/// How long a side that refused the peer keeps the connection open after its
/// Error frame, so the frame is delivered before the close discards it.
const ERROR_LINGER: Duration = Duration::from_millis(500);
/// Largest chunk taken from a QUIC stream at once.
const READ_CHUNK: usize = 256 * 1024;

/// Tunables of a QUIC connection.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// QUIC PING interval while idle, so NAT/firewall state and the idle
    /// timer stay alive between write-sets.
    pub keep_alive: Duration,
    /// A connection with no packets from the peer for this long is dead;
    /// the primary then reconnects (with [`Backoff`]) and resumes.
    pub idle_timeout: Duration,
    /// Largest frame payload accepted from the peer (≤ [`MAX_PAYLOAD_LEN`]).
    pub max_frame_len: usize,
    /// Per-stream receive window. Sized so a whole large write-set can be in
    /// flight on a long fat link without waiting for window updates.
    pub stream_receive_window: u32,
    /// Connection-wide receive window (all streams).
    pub receive_window: u32,
    /// Upper bound of path MTU discovery (UDP payload bytes this side may send).
    /// [`TransportOptions::toward`] sets it from the route's MTU.
    pub mtu_upper_bound: u16,
}

/// Largest UDP payload ferry sends or accepts. Why this value: quinn sends up to 10
/// datagrams per GSO call and Linux refuses a GSO send above 64 KiB in total; larger
/// datagrams make whole batches fail, which PLPMTUD takes for a black hole (the path
/// then drops to 1200 bytes). On loopback or jumbo-frame links 6500-byte datagrams
/// carry a 4 KiB write in one packet instead of three: measured with `e2e` (4k random
/// writes QD32, async standby), ~15% less CPU per GiB on both nodes together.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// quinn's default discovery bound (an Ethernet MTU of 1500 minus IPv6 and UDP headers).
pub const DEFAULT_MTU_UPPER_BOUND: u16 = 1452;

/// The discovery bound for a route of `route_mtu` bytes: the MTU minus IP and UDP
/// headers, within 1200 ..= [`MAX_UDP_PAYLOAD`]. Probing beyond a smaller MTU further
/// along the path is safe: lost probes only stop the search.
pub fn udp_payload_bound(route_mtu: u32, ipv6: bool) -> u16 {
    let headers = if ipv6 { 40 + 8 } else { 20 + 8 };
    route_mtu
        .saturating_sub(headers)
        .clamp(1200, u32::from(MAX_UDP_PAYLOAD)) as u16
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            max_frame_len: MAX_PAYLOAD_LEN,
            stream_receive_window: 16 * 1024 * 1024,
            receive_window: 32 * 1024 * 1024,
            mtu_upper_bound: DEFAULT_MTU_UPPER_BOUND,
        }
    }
}

impl TransportOptions {
    /// These options for a connection to `peer` over a route of `route_mtu` bytes (as
    /// the OS reports it; `None`: unknown): MTU discovery bounded by
    /// [`udp_payload_bound`], or quinn's default where the MTU is unknown.
    pub fn toward(mut self, peer: SocketAddr, route_mtu: Option<u32>) -> Self {
        self.mtu_upper_bound = route_mtu.map_or(DEFAULT_MTU_UPPER_BOUND, |m| {
            udp_payload_bound(m, peer.is_ipv6())
        });
        self
    }

    fn transport_config(&self) -> Result<Arc<quinn::TransportConfig>, QuicError> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout)
                .map_err(|e| QuicError::Config(format!("idle timeout: {e}")))?,
        ));
        t.stream_receive_window(self.stream_receive_window.into());
        t.receive_window(self.receive_window.into());
        // One control and one data stream per connection; a few spare for
        // a reconnect race, none for anything else.
        t.max_concurrent_bidi_streams(4u32.into());
        t.max_concurrent_uni_streams(4u32.into());
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu_upper_bound.min(MAX_UDP_PAYLOAD));
        t.mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }
}

/// Why a peer's certificate was refused. Carried inside the rustls error, so
/// it appears verbatim in the QUIC connection error on this side and (as the
/// CONNECTION_CLOSE reason) on the peer.
#[derive(Clone, PartialEq, Eq, Error)]
pub enum PeerCertError {
    #[error("peer certificate is not signed by this cluster's CA{}", .peer_cluster.as_ref().map(|c| format!(" (it names cluster {c})")).unwrap_or_default())]
    NotOurCa { peer_cluster: Option<String> },
    #[error("peer belongs to cluster {got}, expected cluster {expected}")]
    WrongCluster { expected: String, got: String },
    #[error("peer certificate names no cluster")]
    NoCluster,
    #[error("peer is '{got}', expected '{expected}'")]
    WrongNode { expected: String, got: String },
    #[error("peer certificate is unreadable: {0}")]
    Unreadable(String),
}

/// rustls formats `CertificateError::Other` with `Debug`; printing the
/// message here keeps the logged connection error readable.
impl std::fmt::Debug for PeerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl From<PeerCertError> for rustls::Error {
    fn from(e: PeerCertError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

#[derive(Debug, Error)]
pub enum QuicError {
    #[error("TLS/QUIC configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The TLS handshake found no common suite or key exchange group. Between
    /// ferry nodes that means one runs the national (gm, RFC 8998) suites and
    /// the other the standard ones: their cluster CAs differ in kind.
    #[error("connection: TLS suites differ: one node speaks the gm (SM2/SM3/SM4) suites and the other the standard ones; both must use the same cluster CA ({0})")]
    SuiteMismatch(quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream finish: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("bad frame from peer: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode frame: {0}")]
    Encode(#[from] EncodeError),
    /// This node refused the peer's Hello (an Error frame was sent).
    #[error("handshake refused: {0}")]
    Handshake(#[from] HandshakeError),
    /// The peer refused us with an Error frame.
    #[error("peer refused ({code:?}): {reason}")]
    PeerRefused { code: ErrorCode, reason: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("stream ended in the middle of a frame ({buffered} bytes buffered)")]
    TruncatedStream { buffered: usize },
    /// A peer's QUIC/TLS handshake did not finish in time (see [`Acceptor`]).
    #[error("the handshake from {peer} did not finish within {after:?}")]
    HandshakeTimeout { peer: SocketAddr, after: Duration },
}

impl QuicError {
    /// The Error-frame code to report this failure to the peer with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::Handshake(e) => e.code(),
            Self::Decode(_) | Self::Protocol(_) | Self::TruncatedStream { .. } => {
                ErrorCode::Protocol
            }
            Self::PeerRefused { code, .. } => *code,
            _ => ErrorCode::Internal,
        }
    }
}

// ---------------------------------------------------------------------------
// TLS material and certificate checks

/// What a node needs for mutual TLS: the cluster CA, its own certificate
/// chain and key, and the cluster id (read from the CA certificate).
#[derive(Debug)]
pub struct TlsMaterial {
    pub cluster_id: [u8; 16],
    pub ca_cert: CertificateDer<'static>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// From the cluster CA certificate (PEM) and this node's identity.
    pub fn from_pem(ca_cert_pem: &str, node: &NodeIdentity) -> Result<Self, QuicError> {
        let ca_cert = pki::parse_cert_pem(ca_cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| QuicError::Config("CA PEM holds no certificate".into()))?;
        let cluster_id = pki::ca_cluster_id(&ca_cert)?;
        Ok(Self {
            cluster_id,
            ca_cert,
            cert_chain: node.cert_chain()?,
            key: node.private_key()?,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, QuicError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_cert.clone())
            .map_err(|e| QuicError::Config(format!("cluster CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }
}

impl TlsMaterial {
    /// The suites this cluster speaks (from its CA's key, see [`TlsSuite`]).
    pub fn suite(&self) -> Result<TlsSuite, QuicError> {
        Ok(pki::ca_suite(&self.ca_cert)?)
    }
}

/// The provider for `suite`: a gm cluster offers only the RFC 8998 suite, group
/// and signature scheme, so it and a standard peer share nothing and the
/// handshake fails with "peer is incompatible" on both sides.
fn provider(suite: TlsSuite) -> Arc<CryptoProvider> {
    match suite {
        TlsSuite::Standard => Arc::new(rustls::crypto::ring::default_provider()),
        TlsSuite::Gm => ferry_gmtls::provider_arc(),
    }
}

/// QUIC Initial packets are AES-128-GCM whatever the suite (RFC 9001 §5.2); the
/// gm provider lacks it, so quinn gets it explicitly.
fn gm_initial_suite() -> Result<rustls::quic::Suite, QuicError> {
    ferry_gmtls::quic::initial_suite()
        .ok_or_else(|| QuicError::Config("no AES-128-GCM suite for QUIC Initial packets".into()))
}

/// The membership checks shared by both directions, run after the chain
/// verification by webpki. `chain` is webpki's verdict; a name mismatch from
/// webpki (client side) is not final because we report it ourselves.
fn check_peer(
    end_entity: &CertificateDer<'_>,
    chain: Result<(), rustls::Error>,
    cluster_id: &[u8; 16],
    expected_names: &[String],
) -> Result<(), rustls::Error> {
    let names = pki::cert_names(end_entity);
    match chain {
        Ok(()) => {}
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => {} // chain was fine; the name is checked below with a better message
        Err(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => {
            // Name the cluster the stray certificate claims, if readable: it
            // tells the operator which cluster's node is dialling the wrong host.
            let peer_cluster = names
                .ok()
                .and_then(|n| n.cluster_id)
                .map(|c| cluster_hex(&c));
            return Err(PeerCertError::NotOurCa { peer_cluster }.into());
        }
        Err(other) => return Err(other),
    }
    let names = names.map_err(|e| PeerCertError::Unreadable(e.to_string()))?;
    match names.cluster_id {
        None => return Err(PeerCertError::NoCluster.into()),
        Some(c) if c != *cluster_id => {
            return Err(PeerCertError::WrongCluster {
                expected: cluster_hex(cluster_id),
                got: cluster_hex(&c),
            }
            .into())
        }
        Some(_) => {}
    }
    if !names.node_names.iter().any(|n| expected_names.contains(n)) {
        return Err(PeerCertError::WrongNode {
            expected: expected_names.join(","),
            got: names.node_names.join(","),
        }
        .into());
    }
    Ok(())
}

/// Client side: webpki chain and name verification, then the cluster and
/// node-name checks with precise errors. The expected name is fixed per
/// config, not taken from the SNI argument, so a caller cannot dial the
/// right address with the wrong name and be accepted.
#[derive(Debug)]
struct StandbyVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    cluster_id: [u8; 16],
    expected: String,
}

impl ServerCertVerifier for StandbyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(self.expected.as_str())
            .map_err(|e| rustls::Error::General(format!("expected peer name: {e}")))?;
        let chain = self
            .inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
            .map(|_| ());
        check_peer(
            end_entity,
            chain,
            &self.cluster_id,
            std::slice::from_ref(&self.expected),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server side: webpki client-chain verification (client auth mandatory),
/// then the cluster and node-name checks.
#[derive(Debug)]
struct PrimaryVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster_id: [u8; 16],
    /// Any of these names is admitted (the primary, or every member of the cluster).
    expected: Vec<String>,
}

impl ClientCertVerifier for PrimaryVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ());
        check_peer(end_entity, chain, &self.cluster_id, &self.expected)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> QuicError + '_ {
    move |e| QuicError::Config(format!("{what}: {e}"))
}

/// QUIC server (standby) config: accepts only `expected_client` (the
/// primary's node name) holding a certificate from this cluster's CA.
pub fn server_config(
    tls: &TlsMaterial,
    expected_client: &str,
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, QuicError> {
    server_config_for(tls, &[expected_client.to_string()], opts)
}

/// [`server_config`] admitting any of `expected_clients` (a standby that knows the
/// cluster's members accepts each of them; the Hello then decides).
pub fn server_config_for(
    tls: &TlsMaterial,
    expected_clients: &[String],
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, QuicError> {
    if expected_clients.is_empty() {
        return Err(QuicError::Config("no peer name to accept".into()));
    }
    for n in expected_clients {
        pki::validate_node_name(n)?;
    }
    let suite = tls.suite()?;
    let provider = provider(suite);
    let inner = WebPkiClientVerifier::builder_with_provider(tls.roots()?, provider.clone())
        .build()
        .map_err(|e| QuicError::Config(format!("client verifier: {e}")))?;
    let verifier = Arc::new(PrimaryVerifier {
        inner,
        cluster_id: tls.cluster_id,
        expected: expected_clients.to_vec(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("server TLS versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(tls_err("server certificate"))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let cfg = Arc::new(cfg);
    let crypto = match suite {
        TlsSuite::Standard => quinn::crypto::rustls::QuicServerConfig::try_from(cfg),
        TlsSuite::Gm => {
            quinn::crypto::rustls::QuicServerConfig::with_initial(cfg, gm_initial_suite()?)
        }
    }
    .map_err(|e| QuicError::Config(format!("QUIC server TLS: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(opts.transport_config()?);
    Ok(server)
}

/// QUIC client (primary) config: connects only to `expected_server` (the
/// standby's node name) holding a certificate from this cluster's CA.
pub fn client_config(
    tls: &TlsMaterial,
    expected_server: &str,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, QuicError> {
    pki::validate_node_name(expected_server)?;
    let suite = tls.suite()?;
    let provider = provider(suite);
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(tls.roots()?, provider.clone())
            .build()
            .map_err(|e| QuicError::Config(format!("server verifier: {e}")))?;
    let verifier = Arc::new(StandbyVerifier {
        inner,
        cluster_id: tls.cluster_id,
        expected: expected_server.to_string(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("client TLS versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(tls.cert_chain.clone(), tls.key.clone_key())
        .map_err(tls_err("client certificate"))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let cfg = Arc::new(cfg);
    let crypto = match suite {
        TlsSuite::Standard => quinn::crypto::rustls::QuicClientConfig::try_from(cfg),
        TlsSuite::Gm => {
            quinn::crypto::rustls::QuicClientConfig::with_initial(cfg, gm_initial_suite()?)
        }
    }
    .map_err(|e| QuicError::Config(format!("QUIC client TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(opts.transport_config()?);
    Ok(client)
}

/// Socket buffer size asked for on QUIC endpoints. Why: the kernel default (~208 KiB)
/// holds only about a hundred Ethernet-sized datagrams; a standby whose runtime is
/// busy for a moment then drops packets (`RcvbufErrors`, seen under 4k random writes
/// here), and QUIC answers loss by retransmitting and shrinking its congestion
/// window. The kernel caps it at `net.core.rmem_max` / `wmem_max`; a lower result is
/// logged once per process with the sysctl to raise.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`] buffers.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    static CAPPED_WARNED: std::sync::Once = std::sync::Once::new();
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where allowed, as quinn's own constructor does.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice the size granted (bookkeeping overhead included).
    let recv = socket.recv_buffer_size().unwrap_or(0) / 2;
    let send = socket.send_buffer_size().unwrap_or(0) / 2;
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        // Once: a primary makes a new endpoint for every reconnect.
        CAPPED_WARNED.call_once(|| {
            tracing::warn!(
                recv,
                send,
                wanted = SOCKET_BUFFER,
                "QUIC socket buffers capped by net.core.rmem_max / wmem_max; raise them \
                 (sysctl -w net.core.rmem_max={SOCKET_BUFFER} net.core.wmem_max={SOCKET_BUFFER}) \
                 to avoid packet drops under load"
            )
        });
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, QuicError> {
    let bind_err = |e: std::io::Error| QuicError::Config(format!("bind {addr}: {e}"));
    let socket = udp_socket(addr).map_err(bind_err)?;
    // Accept datagrams up to MAX_UDP_PAYLOAD (advertised to the peer as
    // max_udp_payload_size); what each side sends is bounded by its discovery bound.
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| QuicError::Config(format!("max_udp_payload_size: {e}")))?;
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime)).map_err(bind_err)
}

/// A standby's listening endpoint.
pub fn listen(addr: SocketAddr, config: quinn::ServerConfig) -> Result<quinn::Endpoint, QuicError> {
    endpoint(addr, Some(config))
}

/// A primary's dialling endpoint bound to `bind` (port 0: any).
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, QuicError> {
    endpoint(bind, None)
}

/// Dials a standby. `expected_server` is also sent as SNI; the certificate
/// check itself uses the name fixed in `config`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    expected_server: &str,
) -> Result<quinn::Connection, QuicError> {
    endpoint
        .connect_with(config, addr, expected_server)?
        .await
        .map_err(connection_error)
}

/// Names a suite mismatch (rustls: "peer is incompatible", alert 40, on either
/// side) for what it is; every other connection error stays as quinn has it.
fn connection_error(e: quinn::ConnectionError) -> QuicError {
    if e.to_string().contains("peer is incompatible") {
        QuicError::SuiteMismatch(e)
    } else {
        QuicError::Connection(e)
    }
}

/// Accepts the next connection on a standby's endpoint; `None` once the
/// endpoint is closed. A refused TLS handshake is an `Err` naming the reason.
/// Awaits the handshake before taking the next connection: where peers other
/// than the expected one can reach the endpoint, use an [`Acceptor`].
pub async fn accept(endpoint: &quinn::Endpoint) -> Option<Result<quinn::Connection, QuicError>> {
    let incoming = endpoint.accept().await?;
    Some(incoming.await.map_err(connection_error))
}

/// Longest a peer's QUIC/TLS handshake may take on an [`Acceptor`] by default.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes an [`Acceptor`] runs at once; further peers are refused (QUIC's
/// CONNECTION_REFUSED) until one finishes, so a flood of Initials costs bounded
/// memory. A real primary retries with backoff.
pub const MAX_HANDSHAKES: usize = 16;

/// Accepts connections on a standby's endpoint with every handshake in a task of
/// its own, bounded by a timeout. [`accept`] awaits each handshake before taking the
/// next connection, so one peer that stalls its handshake (an Initial and nothing
/// more) held up every other peer until QUIC's idle timeout, again and again.
pub struct Acceptor {
    endpoint: quinn::Endpoint,
    handshakes: tokio::task::JoinSet<Result<quinn::Connection, QuicError>>,
    timeout: Duration,
}

impl Acceptor {
    pub fn new(endpoint: &quinn::Endpoint, timeout: Duration) -> Acceptor {
        Acceptor {
            endpoint: endpoint.clone(),
            handshakes: tokio::task::JoinSet::new(),
            timeout,
        }
    }

    /// The next finished handshake: a connection, or an `Err` naming why a peer was
    /// refused or timed out. `None` once the endpoint is closed. Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<quinn::Connection, QuicError>> {
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => self.start(incoming?),
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    return Some(done.unwrap_or_else(|e| {
                        Err(QuicError::Protocol(format!("handshake task: {e}")))
                    }));
                }
            }
        }
    }

    fn start(&mut self, incoming: quinn::Incoming) {
        if self.handshakes.len() >= MAX_HANDSHAKES {
            tracing::warn!(peer = %incoming.remote_address(),
                "refusing a QUIC connection: {MAX_HANDSHAKES} handshakes already in progress");
            incoming.refuse();
            return;
        }
        let after = self.timeout;
        self.handshakes.spawn(async move {
            let peer = incoming.remote_address();
            match tokio::time::timeout(after, async { incoming.await }).await {
                Ok(r) => r.map_err(connection_error),
                // Dropping the handshake closes the connection.
                Err(_) => Err(QuicError::HandshakeTimeout { peer, after }),
            }
        });
    }
}

// ---------------------------------------------------------------------------
// Framed streams

/// Sending half of a framed stream.
#[derive(Debug)]
pub struct FramedSend {
    stream: quinn::SendStream,
}

impl FramedSend {
    pub fn new(stream: quinn::SendStream) -> Self {
        Self { stream }
    }

    /// Encodes and writes one frame.
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), QuicError> {
        if let Frame::WriteSet(ws) = frame {
            return self.send_write_set(ws).await;
        }
        let buf = encode(frame)?.freeze();
        self.stream.write_chunk(buf).await?;
        Ok(())
    }

    /// Writes a write-set with its record data handed to QUIC as the
    /// caller's `Bytes` (reference-counted, not copied).
    pub async fn send_write_set(&mut self, ws: &WriteSet) -> Result<(), QuicError> {
        let mut chunks: Vec<Bytes> = encode_write_set_vectored(ws)?;
        self.stream.write_all_chunks(&mut chunks).await?;
        Ok(())
    }

    /// Ends the stream cleanly (the peer's `recv_frame` returns `Ok(None)`).
    pub fn finish(&mut self) -> Result<(), QuicError> {
        self.stream.finish()?;
        Ok(())
    }

    pub fn inner(&mut self) -> &mut quinn::SendStream {
        &mut self.stream
    }
}

/// Receiving half of a framed stream. Buffers at most one frame (bounded by
/// the decoder's payload limit) plus one read chunk.
#[derive(Debug)]
pub struct FramedRecv {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FramedRecv {
    pub fn new(stream: quinn::RecvStream, max_frame_len: usize) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(max_frame_len),
        }
    }

    /// The next frame; `Ok(None)` when the peer finished the stream on a
    /// frame boundary. Decode errors are final (the decoder is poisoned).
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>, QuicError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            match self.stream.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.feed(&chunk.bytes),
                None if self.decoder.buffered_len() == 0 => return Ok(None),
                None => {
                    return Err(QuicError::TruncatedStream {
                        buffered: self.decoder.buffered_len(),
                    })
                }
            }
        }
    }

    pub fn inner(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }
}

// ---------------------------------------------------------------------------
// Handshake

/// QUIC application close code for a ferry error: the Error-frame code, so a
/// peer that missed the frame still learns the reason class.
fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.to_u32())
}

/// Sends an Error frame, gives it a moment to arrive, then closes the
/// connection with the same code. Best effort: the connection is being torn
/// down anyway, so failures here are not reported.
pub async fn refuse(
    conn: &quinn::Connection,
    control: &mut FramedSend,
    frame: ErrorFrame,
) -> ErrorFrame {
    let _ = control.send_frame(&Frame::Error(frame.clone())).await;
    let _ = control.finish();
    // The peer closes once it has read the Error frame; don't wait longer.
    let _ = tokio::time::timeout(ERROR_LINGER, conn.closed()).await;
    conn.close(close_code(frame.code), frame.reason.as_bytes());
    frame
}

/// Closes the connection after a local failure, telling the peer why.
pub async fn close_with_error(
    conn: &quinn::Connection,
    control: &mut FramedSend,
    epoch: u64,
    err: &QuicError,
) {
    let mut reason = err.to_string();
    let mut cut = reason.len().min(ferry_proto::wire::MAX_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    reason.truncate(cut);
    refuse(
        conn,
        control,
        ErrorFrame {
            epoch,
            code: err.error_code(),
            reason,
        },
    )
    .await;
}

/// Reads the peer's Hello from the control stream.
async fn recv_hello(control: &mut FramedRecv) -> Result<Hello, QuicError> {
    match control.recv_frame().await? {
        Some(Frame::Hello(h)) => Ok(h),
        Some(Frame::Error(e)) => Err(QuicError::PeerRefused {
            code: e.code,
            reason: e.reason,
        }),
        Some(other) => Err(QuicError::Protocol(format!(
            "expected Hello, got {:?}",
            other.frame_type()
        ))),
        None => Err(QuicError::Protocol(
            "control stream ended before Hello".into(),
        )),
    }
}

/// The node names in the certificate the peer of `conn` presented (TLS verified it
/// against the cluster CA); empty when none can be read.
pub fn peer_node_names(conn: &quinn::Connection) -> Vec<String> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().and_then(|c| pki::cert_names(c).ok()))
        .map(|n| n.node_names)
        .unwrap_or_default()
}

/// A primary's established session with one standby.
#[derive(Debug)]
pub struct PrimarySession {
    pub conn: quinn::Connection,
    /// Acks, Heartbeats and Errors to/from the standby.
    pub control_send: FramedSend,
    pub control_recv: FramedRecv,
    /// WriteSets only (unidirectional, primary → standby).
    pub data: FramedSend,
    pub peer_hello: Hello,
    pub negotiated: Negotiated,
    pub hello_ack: HelloAck,
}

/// A standby's established session with its primary.
#[derive(Debug)]
pub struct StandbySession {
    pub conn: quinn::Connection,
    pub control_send: FramedSend,
    pub control_recv: FramedRecv,
    pub peer_hello: Hello,
    pub negotiated: Negotiated,
    pub hello_ack: HelloAck,
    max_frame_len: usize,
}

impl StandbySession {
    /// Accepts the primary's data stream. QUIC announces a stream only when
    /// its first bytes arrive, so this completes with the first write-set.
    pub async fn accept_data(&self) -> Result<FramedRecv, QuicError> {
        let recv = self.conn.accept_uni().await?;
        Ok(FramedRecv::new(recv, self.max_frame_len))
    }
}

/// Primary side of the handshake on a fresh connection: opens the control
/// stream, exchanges Hellos, validates the standby's, lets `plan` choose the
/// resume point (normally `session::plan_resume` over the journal's range),
/// sends HelloAck and opens the data stream. Any refusal is sent to the
/// standby as an Error frame and returned.
pub async fn primary_handshake<F>(
    conn: quinn::Connection,
    local: &LocalIdentity,
    last_seq: Seq,
    opts: &TransportOptions,
    plan: F,
) -> Result<PrimarySession, QuicError>
where
    F: FnOnce(Negotiated, &Hello) -> Result<HelloAck, HandshakeError>,
{
    let (send, recv) = conn.open_bi().await?;
    let mut control_send = FramedSend::new(send);
    let mut control_recv = FramedRecv::new(recv, opts.max_frame_len);
    control_send
        .send_frame(&Frame::Hello(local.hello(last_seq)))
        .await?;
    let result = async {
        let peer = recv_hello(&mut control_recv).await?;
        let negotiated = validate_hello(local, &peer)?;
        let ack = plan(negotiated, &peer)?;
        Ok::<_, QuicError>((peer, negotiated, ack))
    }
    .await;
    let (peer_hello, negotiated, hello_ack) = match result {
        Ok(v) => v,
        Err(e) => {
            // A peer's own refusal needs no answer; everything else does.
            if !matches!(e, QuicError::PeerRefused { .. } | QuicError::Connection(_)) {
                close_with_error(&conn, &mut control_send, local.epoch, &e).await;
            }
            return Err(e);
        }
    };
    control_send
        .send_frame(&Frame::HelloAck(hello_ack.clone()))
        .await?;
    let data = FramedSend::new(conn.open_uni().await?);
    Ok(PrimarySession {
        conn,
        control_send,
        control_recv,
        data,
        peer_hello,
        negotiated,
        hello_ack,
    })
}

/// Standby side of the handshake: accepts the control stream, exchanges
/// Hellos advertising `resume_position` (the durable seq, see
/// `Receiver::resume_position`), validates the primary's Hello and waits for
/// its HelloAck.
pub async fn standby_handshake(
    conn: quinn::Connection,
    local: &LocalIdentity,
    resume_position: Seq,
    opts: &TransportOptions,
) -> Result<StandbySession, QuicError> {
    standby_handshake_observed(conn, local, resume_position, opts, |_| {}).await
}

/// [`standby_handshake`] that shows the peer's Hello to `observe` before validating
/// it: a refused Hello (a newer epoch, a standby's position probe) still says who
/// sent it and in which role.
pub async fn standby_handshake_observed(
    conn: quinn::Connection,
    local: &LocalIdentity,
    resume_position: Seq,
    opts: &TransportOptions,
    observe: impl FnOnce(&Hello),
) -> Result<StandbySession, QuicError> {
    let (send, recv) = conn.accept_bi().await?;
    let mut control_send = FramedSend::new(send);
    let mut control_recv = FramedRecv::new(recv, opts.max_frame_len);
    control_send
        .send_frame(&Frame::Hello(local.hello(resume_position)))
        .await?;
    let result = async {
        let peer = recv_hello(&mut control_recv).await?;
        observe(&peer);
        let negotiated = validate_hello(local, &peer)?;
        let ack = match control_recv.recv_frame().await? {
            Some(Frame::HelloAck(a)) => a,
            Some(Frame::Error(e)) => {
                return Err(QuicError::PeerRefused {
                    code: e.code,
                    reason: e.reason,
                })
            }
            Some(other) => {
                return Err(QuicError::Protocol(format!(
                    "expected HelloAck, got {:?}",
                    other.frame_type()
                )))
            }
            None => {
                return Err(QuicError::Protocol(
                    "control stream ended before HelloAck".into(),
                ))
            }
        };
        // The primary must resume exactly where we said we are durable and
        // speak the version both computed; anything else is a bug on its side.
        if ack.version != negotiated.version || ack.resume_seq != resume_position {
            return Err(QuicError::Protocol(format!(
                "HelloAck version {} resume {} does not match negotiated version {} resume {}",
                ack.version, ack.resume_seq, negotiated.version, resume_position
            )));
        }
        if ack.received_acks && !negotiated.has_received_acks() {
            return Err(QuicError::Protocol(format!(
                "HelloAck asks for received acks, which version {} does not have",
                negotiated.version
            )));
        }
        Ok((peer, negotiated, ack))
    }
    .await;
    match result {
        Ok((peer_hello, negotiated, hello_ack)) => Ok(StandbySession {
            conn,
            control_send,
            control_recv,
            peer_hello,
            negotiated,
            hello_ack,
            max_frame_len: opts.max_frame_len,
        }),
        Err(e) => {
            if !matches!(e, QuicError::PeerRefused { .. } | QuicError::Connection(_)) {
                close_with_error(&conn, &mut control_send, local.epoch, &e).await;
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------
// Reconnect backoff

/// Exponential reconnect backoff with jitter. Pure: no clock, no global RNG
/// (a seeded xorshift), so it is deterministic under test and the caller
/// decides how to sleep.
///
/// Delay `n` (from 0 after `reset`) lies in
/// `[b·(1 − jitter), b]` where `b = min(initial · 2ⁿ, max)`: never above
/// `max`, and randomised downwards so a fleet of primaries that lost the
/// same standby does not redial in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Fraction of the delay that may be removed at random, in `[0, 1]`.
    jitter: f64,
    current: Duration,
    rng: u64,
}

impl Default for Backoff {
    /// 100 ms doubling to 10 s, 20 % jitter, per-process random seed.
    fn default() -> Self {
        Self::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            0.2,
            random_seed(),
        )
    }
}

/// A per-process seed without a clock or an RNG dependency: std's
/// `RandomState` is randomly keyed for each process.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x6665_7272_7921);
    h.finish()
}

impl Backoff {
    /// Upper bound on any delay: a day. Longer waits are a configuration error.
    pub const MAX_DELAY: Duration = Duration::from_secs(86_400);

    /// `jitter` is clamped to `[0, 1]`; `max` is raised to `initial` if lower.
    /// Both are capped at [`Backoff::MAX_DELAY`], which keeps the float
    /// jitter arithmetic finite.
    pub fn new(initial: Duration, max: Duration, jitter: f64, seed: u64) -> Self {
        let initial = initial.min(Self::MAX_DELAY);
        let max = max.min(Self::MAX_DELAY);
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        Self {
            initial,
            max: max.max(initial),
            jitter,
            current: initial,
            // xorshift must not start at 0 (it would stay 0).
            rng: seed | 1,
        }
    }

    /// The delay before the next attempt; doubles the base for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        // xorshift64*: plenty for spreading retries; not for secrets.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        base.mul_f64(1.0 - self.jitter * unit)
    }

    /// Back to `initial`, after a connection got through the handshake.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// Bounds of the next [`next_delay`](Self::next_delay) (for logs/tests).
    pub fn next_bounds(&self) -> (Duration, Duration) {
        (self.current.mul_f64(1.0 - self.jitter), self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_bounds_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 0.25, 42);
        let expected_bases = [100u64, 200, 400, 800, 1600, 2000, 2000, 2000];
        for base in expected_bases {
            let (lo, hi) = b.next_bounds();
            assert_eq!(hi, Duration::from_millis(base));
            let d = b.next_delay();
            assert!(d >= lo && d <= hi, "{d:?} outside [{lo:?}, {hi:?}]");
            assert!(d >= Duration::from_millis(base * 3 / 4));
        }
    }

    #[test]
    fn backoff_reset_restarts_at_initial() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 0.0, 7);
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn backoff_jitter_varies_and_is_deterministic_per_seed() {
        let delays = |seed| {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 0.5, seed);
            (0..32).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        let a = delays(1);
        assert_eq!(a, delays(1), "same seed, same sequence");
        assert_ne!(a, delays(2), "different seeds differ");
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 16, "jitter should spread delays: {a:?}");
        assert!(a
            .iter()
            .all(|d| *d >= Duration::from_millis(500) && *d <= Duration::from_secs(1)));
    }

    #[test]
    fn backoff_clamps_bad_parameters() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1), f64::NAN, 0);
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 7.0, 0);
        let d = b.next_delay();
        assert!(d <= Duration::from_secs(1));
        // Saturates instead of overflowing after many attempts.
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX, 0.5, 3);
        for _ in 0..200 {
            assert!(b.next_delay() <= Backoff::MAX_DELAY);
        }
    }
}
