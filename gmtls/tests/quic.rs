//! TLS 1.3 with TLS_SM4_GCM_SM3 over QUIC, end to end: an in-memory rustls QUIC
//! handshake that reads back the negotiated suite and group, a real quinn
//! connection on 127.0.0.1 exchanging data both ways, and gm against standard
//! peers (both directions) failing with a clear error.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_gmtls::cert::{GmClusterCa, GmNodeCert};
use ferry_gmtls::{aead, hash, kx, quic as gmquic};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::crypto::{ActiveKeyExchange, CipherSuiteCommon, CryptoProvider, SupportedKxGroup};
use rustls::pki_types::ServerName;
use rustls::quic::{self, HeaderProtectionKey, PacketKey};
use rustls::server::WebPkiClientVerifier;
use rustls::{NamedGroup, RootCertStore, SupportedCipherSuite, Tls13CipherSuite};

const CLUSTER: [u8; 16] = *b"gm-test-cluster!";

struct GmCluster {
    ca: GmClusterCa,
    primary: GmNodeCert,
    dr1: GmNodeCert,
}

fn gm_cluster() -> GmCluster {
    let ca = GmClusterCa::generate(CLUSTER).unwrap();
    let primary = ca.issue_node("primary").unwrap();
    let dr1 = ca.issue_node("dr1").unwrap();
    GmCluster { ca, primary, dr1 }
}

fn roots(ca: rustls::pki_types::CertificateDer<'static>) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    Arc::new(roots)
}

fn gm_server_tls(
    provider: Arc<CryptoProvider>,
    ca: &GmClusterCa,
    node: &GmNodeCert,
) -> rustls::ServerConfig {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca.cert_der()), provider.clone())
            .build()
            .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![node.cert_der().unwrap()],
            node.private_key_der().unwrap(),
        )
        .unwrap()
}

fn gm_client_tls(
    provider: Arc<CryptoProvider>,
    ca: &GmClusterCa,
    node: &GmNodeCert,
) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca.cert_der()))
        .with_client_auth_cert(
            vec![node.cert_der().unwrap()],
            node.private_key_der().unwrap(),
        )
        .unwrap()
}

fn quinn_server(tls: rustls::ServerConfig, gm: bool) -> quinn::ServerConfig {
    let tls = Arc::new(tls);
    let crypto = if gm {
        quinn::crypto::rustls::QuicServerConfig::with_initial(tls, gmquic::initial_suite().unwrap())
    } else {
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)
    };
    quinn::ServerConfig::with_crypto(Arc::new(crypto.unwrap()))
}

fn quinn_client(tls: rustls::ClientConfig, gm: bool) -> quinn::ClientConfig {
    let tls = Arc::new(tls);
    let crypto = if gm {
        quinn::crypto::rustls::QuicClientConfig::with_initial(tls, gmquic::initial_suite().unwrap())
    } else {
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)
    };
    quinn::ClientConfig::new(Arc::new(crypto.unwrap()))
}

/// A standard cluster (ring, ECDSA P-256, rcgen as ferry-transport's PKI).
fn std_tls() -> (rustls::ServerConfig, rustls::ClientConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let node = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (vec![cert.der().clone()], key)
    };
    let (primary_chain, primary_key) = node("primary");
    let (dr1_chain, dr1_key) = node("dr1");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca.der().clone()), provider.clone())
            .build()
            .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(dr1_chain, dr1_key)
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca.der().clone()))
        .with_client_auth_cert(primary_chain, primary_key)
        .unwrap();
    (server, client)
}

// ---------------------------------------------------------------------------
// Recording wrappers: quinn does not expose the negotiated suite or group, so
// the quinn test's provider records which of its pieces the handshake used.

#[derive(Debug)]
struct RecordingKx {
    started: AtomicBool,
}

impl SupportedKxGroup for RecordingKx {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        self.started.store(true, Ordering::SeqCst);
        kx::CURVE_SM2.start()
    }

    fn name(&self) -> NamedGroup {
        kx::CURVE_SM2.name()
    }
}

struct RecordingQuic {
    packet_keys: AtomicUsize,
}

impl quic::Algorithm for RecordingQuic {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn PacketKey> {
        self.packet_keys.fetch_add(1, Ordering::SeqCst);
        quic::Algorithm::packet_key(&gmquic::SM4_GCM_QUIC, key, iv)
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn HeaderProtectionKey> {
        quic::Algorithm::header_protection_key(&gmquic::SM4_GCM_QUIC, key)
    }

    fn aead_key_len(&self) -> usize {
        quic::Algorithm::aead_key_len(&gmquic::SM4_GCM_QUIC)
    }
}

struct Recorded {
    kx: &'static RecordingKx,
    quic: &'static RecordingQuic,
    provider: Arc<CryptoProvider>,
}

/// The gm provider with TLS_SM4_GCM_SM3 and curveSM2 swapped for recording
/// copies (same code underneath). Leaked: rustls wants `'static` pieces.
fn recorded_gm_provider() -> Recorded {
    let kx: &'static RecordingKx = Box::leak(Box::new(RecordingKx {
        started: AtomicBool::new(false),
    }));
    let quic: &'static RecordingQuic = Box::leak(Box::new(RecordingQuic {
        packet_keys: AtomicUsize::new(0),
    }));
    let gm = &aead::TLS13_SM4_GCM_SM3_SUITE;
    let suite: &'static Tls13CipherSuite = Box::leak(Box::new(Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: gm.common.suite,
            hash_provider: &hash::SM3,
            confidentiality_limit: gm.common.confidentiality_limit,
        },
        hkdf_provider: gm.hkdf_provider,
        aead_alg: gm.aead_alg,
        quic: Some(quic),
    }));
    let mut provider = ferry_gmtls::provider();
    provider.cipher_suites = vec![SupportedCipherSuite::Tls13(suite)];
    provider.kx_groups = vec![kx];
    Recorded {
        kx,
        quic,
        provider: Arc::new(provider),
    }
}

// ---------------------------------------------------------------------------

/// rustls's own QUIC state machines, in memory: both sides agree on
/// TLS_SM4_GCM_SM3 and curveSM2, and the 1-RTT packet keys each derives (HKDF-SM3)
/// protect a packet the other opens.
#[test]
fn rustls_quic_handshake_negotiates_sm_suite() {
    let c = gm_cluster();
    let provider = ferry_gmtls::provider_arc();
    let server_tls = Arc::new(gm_server_tls(provider.clone(), &c.ca, &c.dr1));
    let client_tls = Arc::new(gm_client_tls(provider, &c.ca, &c.primary));
    let name = ServerName::try_from("dr1").unwrap();
    let mut client =
        quic::ClientConnection::new(client_tls, quic::Version::V1, name, b"client-tp".to_vec())
            .unwrap();
    let mut server =
        quic::ServerConnection::new(server_tls, quic::Version::V1, b"server-tp".to_vec()).unwrap();

    let (mut client_1rtt, mut server_1rtt) = (None, None);
    for _ in 0..16 {
        let mut buf = Vec::new();
        if let Some(quic::KeyChange::OneRtt { keys, .. }) = client.write_hs(&mut buf) {
            client_1rtt = Some(keys);
        }
        if !buf.is_empty() {
            server.read_hs(&buf).unwrap();
        }
        let mut buf = Vec::new();
        if let Some(quic::KeyChange::OneRtt { keys, .. }) = server.write_hs(&mut buf) {
            server_1rtt = Some(keys);
        }
        if !buf.is_empty() {
            client.read_hs(&buf).unwrap();
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());

    for side in [
        (
            client.negotiated_cipher_suite(),
            client.negotiated_key_exchange_group(),
        ),
        (
            server.negotiated_cipher_suite(),
            server.negotiated_key_exchange_group(),
        ),
    ] {
        assert_eq!(u16::from(side.0.unwrap().suite()), 0x00c6);
        assert_eq!(u16::from(side.1.unwrap().name()), 0x0029);
    }
    assert_eq!(client.quic_transport_parameters(), Some(&b"server-tp"[..]));

    let (client_keys, server_keys) = (client_1rtt.unwrap(), server_1rtt.unwrap());
    let header = [0x41, 0xaa, 0xbb, 0x01];
    let mut payload = b"replicated block".to_vec();
    let tag = client_keys
        .local
        .packet
        .encrypt_in_place(7, &header, &mut payload)
        .unwrap();
    assert_ne!(&payload[..], b"replicated block");
    payload.extend_from_slice(tag.as_ref());
    let plain = server_keys
        .remote
        .packet
        .decrypt_in_place(7, &header, &mut payload)
        .unwrap();
    assert_eq!(plain, b"replicated block");
    // Header protection round-trips with the peer's key as well.
    let sample = [0x5a; 16];
    let (mut first, mut pn) = (0x41u8, [0x00, 0x07]);
    client_keys
        .local
        .header
        .encrypt_in_place(&sample, &mut first, &mut pn)
        .unwrap();
    assert_ne!((first, pn), (0x41, [0x00, 0x07]));
    server_keys
        .remote
        .header
        .decrypt_in_place(&sample, &mut first, &mut pn)
        .unwrap();
    assert_eq!((first, pn), (0x41, [0x00, 0x07]));
}

/// Binds a quinn server on 127.0.0.1:0 and a client endpoint.
fn endpoints(server: quinn::ServerConfig) -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = quinn::Endpoint::server(server, any).unwrap();
    let addr = server.local_addr().unwrap();
    let client = quinn::Endpoint::client(any).unwrap();
    (server, client, addr)
}

#[tokio::test]
async fn quinn_loopback_exchanges_data_over_sm_suite() {
    let c = gm_cluster();
    let server_rec = recorded_gm_provider();
    let client_rec = recorded_gm_provider();
    let server_cfg = quinn_server(
        gm_server_tls(server_rec.provider.clone(), &c.ca, &c.dr1),
        true,
    );
    let client_cfg = quinn_client(
        gm_client_tls(client_rec.provider.clone(), &c.ca, &c.primary),
        true,
    );
    let (server, client, addr) = endpoints(server_cfg);

    let serve = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let request = recv.read_to_end(1 << 20).await.unwrap();
        let mut reply = b"ack:".to_vec();
        reply.extend_from_slice(&request);
        send.write_all(&reply).await.unwrap();
        send.finish().unwrap();
        // Wait for the client to close, so the reply is not cut off.
        conn.closed().await;
        server.wait_idle().await;
    });

    let conn = client
        .connect_with(client_cfg, addr, "dr1")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let block: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    send.write_all(&block).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(&reply[..4], b"ack:");
    assert_eq!(&reply[4..], &block[..]);
    // The server presented the dr1 SM2 certificate.
    let certs = conn
        .peer_identity()
        .unwrap()
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .unwrap();
    assert_eq!(certs[0], c.dr1.cert_der().unwrap());
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    serve.await.unwrap();

    for rec in [&server_rec, &client_rec] {
        // The providers offer exactly one suite, 0x00C6, and one group, curveSM2 ...
        assert_eq!(rec.provider.cipher_suites.len(), 1);
        assert_eq!(u16::from(rec.provider.cipher_suites[0].suite()), 0x00c6);
        assert_eq!(u16::from(rec.provider.kx_groups[0].name()), 0x0029);
        // ... and the connection used them: curveSM2 key shares and SM4-GCM packet
        // keys (handshake and 1-RTT, both directions) from this suite.
        assert!(rec.kx.started.load(Ordering::SeqCst));
        assert!(rec.quic.packet_keys.load(Ordering::SeqCst) >= 4);
    }
}

/// Connects `client` to `server` and returns the client-side error text.
async fn refused(server: quinn::ServerConfig, client: quinn::ClientConfig) -> String {
    let (server, endpoint, addr) = endpoints(server);
    let serve = tokio::spawn(async move {
        let accepted = match server.accept().await {
            Some(incoming) => incoming.await.map(|_| ()).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        accepted
    });
    let result = endpoint.connect_with(client, addr, "dr1").unwrap().await;
    let client_err = match result {
        Ok(_) => panic!("handshake between gm and standard peers succeeded"),
        Err(e) => e.to_string(),
    };
    let server_err = match serve.await.unwrap() {
        Ok(()) => panic!("server accepted the mismatched peer"),
        Err(e) => e,
    };
    eprintln!("client: {client_err}\nserver: {server_err}");
    client_err
}

#[tokio::test]
async fn gm_client_refuses_standard_server() {
    let c = gm_cluster();
    let (std_server, _) = std_tls();
    let gm_client = gm_client_tls(ferry_gmtls::provider_arc(), &c.ca, &c.primary);
    let err = refused(
        quinn_server(std_server, false),
        quinn_client(gm_client, true),
    )
    .await;
    assert!(err.contains("peer is incompatible"), "unclear error: {err}");
}

#[tokio::test]
async fn standard_client_refuses_gm_server() {
    let c = gm_cluster();
    let (_, std_client) = std_tls();
    let gm_server = gm_server_tls(ferry_gmtls::provider_arc(), &c.ca, &c.dr1);
    let err = refused(
        quinn_server(gm_server, true),
        quinn_client(std_client, false),
    )
    .await;
    assert!(err.contains("peer is incompatible"), "unclear error: {err}");
}

/// A node of another gm cluster (another CA) is refused by webpki.
#[tokio::test]
async fn gm_peer_from_another_ca_is_refused() {
    let c = gm_cluster();
    let other = GmClusterCa::generate(*b"another-cluster!").unwrap();
    let stranger = other.issue_node("primary").unwrap();
    let provider = ferry_gmtls::provider_arc();
    let server = quinn_server(gm_server_tls(provider.clone(), &c.ca, &c.dr1), true);
    let client = quinn_client(gm_client_tls(provider, &other, &stranger), true);
    let err = refused(server, client).await;
    assert!(err.contains("UnknownIssuer"), "unclear error: {err}");
}
