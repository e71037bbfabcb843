//! NBD over TLS (`NBD_OPT_STARTTLS`): the forced and optional policies with
//! the in-project raw client (what is answered before TLS, state forgotten
//! across the upgrade, client certificates), then real clients: nbdinfo and
//! nbdcopy (libnbd, GnuTLS) and qemu-img (qemu's TLS x509 credentials).
//! Certificates are made per test with rcgen in a temporary directory laid
//! out as libnbd and qemu expect (`ca-cert.pem`, `client-cert.pem`,
//! `client-key.pem`). A server offering both the SM suites (ferry-gmtls,
//! SM2 certificates from a gm cluster CA) and the standard ones picks the
//! configuration per ClientHello: the raw client with the gm provider
//! negotiates TLS_SM4_GCM_SM3, the tools the standard suites, on one server.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_gmtls::cert::GmClusterCa;
use ferry_nbd::proto::*;
use ferry_nbd::rustls::{self, pki_types::CertificateDer, pki_types::PrivateKeyDer};
use ferry_nbd::testclient::{TestClient, TestServer};
use ferry_nbd::{MapRegistry, MemExport, ServerConfig, ServerStats, TlsPolicy, TlsServer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

const SIZE: usize = 4 << 20;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A test CA and what it issued.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// One issued certificate and its key, PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server certificate for 127.0.0.1 and localhost, or a client one.
    fn issue(&self, server: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        p.distinguished_name.push(
            DnType::CommonName,
            if server { "localhost" } else { "client" },
        );
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    Arc::new(roots)
}

/// The server's rustls configuration: TLS 1.3, and client certificates
/// from `client_ca` required when it is given.
fn server_tls(ca: &Ca, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
    let leaf = ca.issue(true);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let builder = match client_ca {
        Some(cca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(cca), provider())
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(vec![leaf.cert_der], leaf.key_der)
            .unwrap(),
    )
}

/// The raw client's rustls configuration, with a client certificate if given.
fn client_tls(ca: &Ca, cert: Option<Leaf>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca));
    Arc::new(match cert {
        Some(l) => builder
            .with_client_auth_cert(vec![l.cert_der], l.key_der)
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// The SM suites only (ferry-gmtls): the node certificate `primary` of a
/// gm cluster CA, no client certificates.
fn gm_server_tls(ca: &GmClusterCa) -> Arc<rustls::ServerConfig> {
    let node = ca.issue_node("primary").unwrap();
    let config = rustls::ServerConfig::builder_with_provider(ferry_gmtls::provider_arc())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![node.cert_der().unwrap()],
            node.private_key_der().unwrap(),
        )
        .unwrap();
    Arc::new(config)
}

/// A client speaking only the SM suites, trusting the gm CA.
fn gm_client_tls(ca: &GmClusterCa) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(ferry_gmtls::provider_arc())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

fn gm_ca() -> GmClusterCa {
    GmClusterCa::generate([7; 16]).unwrap()
}

fn server(tls: TlsPolicy) -> (TestServer, Arc<MemExport>) {
    let (srv, vol, _) = server_stats(tls);
    (srv, vol)
}

fn server_stats(tls: TlsPolicy) -> (TestServer, Arc<MemExport>, Arc<ServerStats>) {
    init_tracing();
    let vol = Arc::new(MemExport::new("vol0", SIZE));
    let other = Arc::new(MemExport::new("secret-name", 1 << 20));
    let reg = Arc::new(MapRegistry::new(vec![vol.clone(), other]));
    let cfg = ServerConfig {
        shutdown_grace: Duration::from_secs(5),
        tls,
        ..ServerConfig::default()
    };
    let stats = cfg.stats.clone();
    (TestServer::start(reg, cfg), vol, stats)
}

/// Write, flush and read back through an open session.
fn round_trip(c: &mut TestClient) {
    let data = vec![0x5au8; 64 << 10];
    assert_eq!(c.write(4096, &data, 0).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    assert_eq!(c.read(4096, data.len() as u32).unwrap(), Ok(data));
}

#[test]
fn require_refuses_every_option_before_starttls_and_reveals_nothing() {
    let ca = Ca::new("server ca");
    let (srv, _vol) = server(TlsPolicy::Require(server_tls(&ca, None).into()));
    let mut c = TestClient::start(srv.addr).unwrap();
    // Same answer whatever the option or the name asked for, so not even
    // which exports exist can be probed in the clear.
    assert_eq!(c.list().unwrap(), Err(REP_ERR_TLS_REQD));
    assert_eq!(c.info("vol0").unwrap(), Err(REP_ERR_TLS_REQD));
    assert_eq!(c.info("no-such").unwrap(), Err(REP_ERR_TLS_REQD));
    assert_eq!(c.go("").unwrap(), Err(REP_ERR_TLS_REQD));
    for opt in [
        OPT_GO,
        OPT_LIST,
        OPT_STRUCTURED_REPLY,
        OPT_EXTENDED_HEADERS,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        99,
    ] {
        c.send_option(opt, b"\0\0\0\x04vol0\0\0").unwrap();
        let r = c.read_opt_reply().unwrap();
        assert_eq!((r.option, r.typ), (opt, REP_ERR_TLS_REQD));
        let text = String::from_utf8_lossy(&r.data);
        assert!(!text.contains("vol0") && !text.contains("secret"), "{text}");
    }
    // Nothing was negotiated in the clear, so nothing is undone: TLS, then
    // the full session.
    assert_eq!(
        c.starttls(client_tls(&ca, None), "localhost").unwrap(),
        Ok(())
    );
    assert_eq!(
        c.list().unwrap(),
        Ok(vec!["vol0".to_string(), "secret-name".into()])
    );
    assert_eq!(c.extended_headers().unwrap(), REP_ACK);
    let info = c.go("vol0").unwrap().unwrap();
    assert_eq!(info.size, SIZE as u64);
    round_trip(&mut c);
    srv.shutdown().0.unwrap();
}

#[test]
fn require_hangs_up_on_export_name_before_tls() {
    let ca = Ca::new("server ca");
    let (srv, _vol) = server(TlsPolicy::Require(server_tls(&ca, None).into()));
    let mut c = TestClient::start(srv.addr).unwrap();
    // EXPORT_NAME has no error reply: the only safe answer is to hang up,
    // without the export's size and flags.
    c.send_option(OPT_EXPORT_NAME, b"vol0").unwrap();
    let mut first = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(c.stream(), &mut first), Ok(0) | Err(_)),
        "server answered EXPORT_NAME in the clear"
    );
}

#[test]
fn optional_serves_plain_and_tls_clients() {
    let ca = Ca::new("server ca");
    let (srv, _vol, stats) = server_stats(TlsPolicy::Optional(server_tls(&ca, None).into()));
    let (mut plain, info) = TestClient::open(srv.addr, "vol0").unwrap();
    assert_eq!(info.size, SIZE as u64);
    round_trip(&mut plain);
    assert_eq!(stats.snapshot().tls_sessions_total, 0);
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(
        c.starttls(client_tls(&ca, None), "localhost").unwrap(),
        Ok(())
    );
    c.go("vol0").unwrap().unwrap();
    round_trip(&mut c);
    // Both sessions at once, on one server.
    round_trip(&mut plain);
    assert_eq!(stats.snapshot().tls_sessions_total, 1);
    drop((c, plain));
    srv.shutdown().0.unwrap();
}

#[test]
fn starttls_forgets_what_was_negotiated_in_the_clear() {
    let ca = Ca::new("server ca");
    let (srv, _vol) = server(TlsPolicy::Optional(server_tls(&ca, None).into()));
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.structured_reply().unwrap(), REP_ACK);
    assert_eq!(
        c.starttls(client_tls(&ca, None), "localhost").unwrap(),
        Ok(())
    );
    c.mode = Mode::Simple;
    // Structured replies are no longer in force: selecting a context needs
    // them first, and asking for them again is accepted, not "already".
    c.send_option(OPT_SET_META_CONTEXT, &meta_request("vol0"))
        .unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    // STARTTLS inside TLS is a client error; the session goes on.
    c.send_option(OPT_STARTTLS, &[]).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    assert_eq!(c.structured_reply().unwrap(), REP_ACK);
    c.go("vol0").unwrap().unwrap();
    round_trip(&mut c);
    srv.shutdown().0.unwrap();
}

/// SET/LIST_META_CONTEXT payload for `base:allocation` on `export`.
fn meta_request(export: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    b.extend_from_slice(BASE_ALLOCATION.as_bytes());
    b
}

#[test]
fn starttls_with_data_is_invalid_and_off_is_unsupported() {
    let ca = Ca::new("server ca");
    let (srv, _vol) = server(TlsPolicy::Require(server_tls(&ca, None).into()));
    let mut c = TestClient::start(srv.addr).unwrap();
    c.send_option(OPT_STARTTLS, b"x").unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    assert_eq!(
        c.starttls(client_tls(&ca, None), "localhost").unwrap(),
        Ok(())
    );
    c.go("vol0").unwrap().unwrap();
    drop(srv);

    let (srv, _vol) = server(TlsPolicy::Off);
    let mut c = TestClient::start(srv.addr).unwrap();
    let refused = c.starttls(client_tls(&ca, None), "localhost").unwrap();
    assert_eq!(refused, Err(REP_ERR_UNSUP));
    c.go("vol0").unwrap().unwrap();
}

#[test]
fn bytes_sent_before_the_starttls_ack_end_the_session() {
    let ca = Ca::new("server ca");
    let (srv, _vol) = server(TlsPolicy::Require(server_tls(&ca, None).into()));
    let mut c = TestClient::start(srv.addr).unwrap();
    // STARTTLS and a plaintext option in one segment: a server that kept the
    // buffered option would run it as if it came through TLS.
    let mut b = Vec::new();
    for (opt, len) in [(OPT_STARTTLS, 0u32), (OPT_LIST, 0)] {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    }
    c.send(&b).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ACK);
    assert!(c.expect_closed(), "server kept plaintext sent before TLS");
    // The server is still fine for others.
    let mut ok = TestClient::start(srv.addr).unwrap();
    assert_eq!(
        ok.starttls(client_tls(&ca, None), "localhost").unwrap(),
        Ok(())
    );
    ok.go("vol0").unwrap().unwrap();
}

#[test]
fn client_certificates_are_checked_when_required() {
    let ca = Ca::new("server ca");
    let clients = Ca::new("client ca");
    let rogue = Ca::new("rogue ca");
    let (srv, _vol) = server(TlsPolicy::Require(server_tls(&ca, Some(&clients)).into()));
    // From the right CA: served.
    let mut c = TestClient::start(srv.addr).unwrap();
    let good = client_tls(&ca, Some(clients.issue(false)));
    assert_eq!(c.starttls(good, "localhost").unwrap(), Ok(()));
    c.go("vol0").unwrap().unwrap();
    round_trip(&mut c);
    // From another CA, or none at all: the TLS session is refused (with TLS
    // 1.3 the client learns it at its first read), and no export is named.
    for cert in [Some(rogue.issue(false)), None] {
        let mut c = TestClient::start(srv.addr).unwrap();
        let refused = c
            .starttls(client_tls(&ca, cert), "localhost")
            .and_then(|_| c.list());
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "client without a valid certificate was served: {refused:?}"
        );
    }
    srv.shutdown().0.unwrap();
}

#[test]
fn both_suites_give_sm_clients_the_sm_suite_and_the_others_the_standard_one() {
    let gm = gm_ca();
    let ca = Ca::new("server ca");
    let tls = TlsServer::new(gm_server_tls(&gm)).or(server_tls(&ca, None));
    let (srv, vol, stats) = server_stats(TlsPolicy::Require(tls));
    // The SM client: TLS_SM4_GCM_SM3 with the SM2 certificate (verified by
    // the client against the gm CA under the node's name).
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.starttls(gm_client_tls(&gm), "primary").unwrap(), Ok(()));
    assert_eq!(c.tls_suite(), Some(ferry_gmtls::tls_sm4_gcm_sm3()));
    c.go("vol0").unwrap().unwrap();
    round_trip(&mut c);
    let sm_data: Vec<u8> = (0..1 << 20).map(|i| (i % 241) as u8).collect();
    assert_eq!(c.write(1 << 20, &sm_data, 0).unwrap(), 0);
    assert_eq!(c.read(1 << 20, 1 << 20).unwrap(), Ok(sm_data.clone()));
    assert_eq!(vol.snapshot(1 << 20, 1 << 20), sm_data);
    // A standard client on the same server: a standard suite and the ECDSA
    // certificate, at the same time as the SM session.
    let mut s = TestClient::start(srv.addr).unwrap();
    assert_eq!(
        s.starttls(client_tls(&ca, None), "localhost").unwrap(),
        Ok(())
    );
    let suite = s.tls_suite().unwrap();
    assert!(
        suite.as_str().is_some_and(|n| n.starts_with("TLS13_")),
        "{suite:?}"
    );
    s.go("vol0").unwrap().unwrap();
    assert_eq!(s.read(1 << 20, 1 << 20).unwrap(), Ok(sm_data));
    round_trip(&mut c);
    assert_eq!(stats.snapshot().tls_sessions_total, 2);
    drop((c, s));
    srv.shutdown().0.unwrap();
}

#[test]
fn gm_only_refuses_a_standard_client() {
    let gm = gm_ca();
    let ca = Ca::new("server ca");
    let (srv, _vol, stats) = server_stats(TlsPolicy::Require(gm_server_tls(&gm).into()));
    let mut c = TestClient::start(srv.addr).unwrap();
    let refused = c
        .starttls(client_tls(&ca, None), "localhost")
        .and_then(|_| c.list());
    let err = refused.expect_err("a standard client was served by a gm-only server");
    // rustls's alert: no common suite (handshake_failure).
    assert!(err.to_string().contains("HandshakeFailure"), "{err}");
    // The SM client still gets in.
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.starttls(gm_client_tls(&gm), "primary").unwrap(), Ok(()));
    c.go("vol0").unwrap().unwrap();
    round_trip(&mut c);
    assert_eq!(stats.snapshot().tls_sessions_total, 1);
    drop(c);
    srv.shutdown().0.unwrap();
}

/// A certificate directory as libnbd and qemu's x509 credentials expect.
/// `ca-cert.pem` must hold the client certificate's issuer as well: qemu
/// checks its own certificate against it before connecting.
fn client_dir(cas: &[&Ca], cert: &Leaf) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    w(
        "ca-cert.pem",
        &cas.iter().map(|c| c.pem()).collect::<String>(),
    );
    w("client-cert.pem", &cert.cert_pem);
    w("client-key.pem", &cert.key_pem);
    dir
}

fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A tool that lacks TLS support (libnbd or qemu built without GnuTLS)
/// skips loudly instead of failing.
fn tls_unsupported(tool: &str, out: &str) -> bool {
    let lower = out.to_lowercase();
    (lower.contains("tls") && (lower.contains("not supported") || lower.contains("not compiled")))
        && ferry_testkit::skip(module_path!(), &format!("{tool} lacks TLS support: {out}"))
}

/// A forced-TLS server with client certificates, and the directory a
/// client needs for it. With `gm`, the server offers the SM suites first
/// (what ferryd does with `nbd.tls_suite = "both"`); the tools, which speak
/// only the standard suites, must get the standard configuration.
fn tool_setup(gm: bool) -> (TestServer, Arc<MemExport>, tempfile::TempDir) {
    let ca = Ca::new("server ca");
    let clients = Ca::new("client ca");
    let standard = server_tls(&ca, Some(&clients));
    let tls = match gm {
        true => TlsServer::new(gm_server_tls(&gm_ca())).or(standard),
        false => TlsServer::new(standard),
    };
    let (srv, vol) = server(TlsPolicy::Require(tls));
    // One directory holds both CAs (the server's, to verify the server) and
    // the client's certificate from the client CA.
    let dir = client_dir(&[&ca, &clients], &clients.issue(false));
    (srv, vol, dir)
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls() {
    nbdinfo_and_nbdcopy(false);
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls_with_the_sm_suites_offered_first() {
    nbdinfo_and_nbdcopy(true);
}

fn nbdinfo_and_nbdcopy(gm: bool) {
    if ferry_testkit::skip_without("nbdinfo", module_path!())
        || ferry_testkit::skip_without("nbdcopy", module_path!())
    {
        return;
    }
    let (srv, vol, dir) = tool_setup(gm);
    let d = dir.path().display();
    let uri = format!("nbds://{}/vol0?tls-certificates={d}", srv.addr);
    let (ok, out) = run("nbdinfo", &["--json", &uri]);
    if !ok && tls_unsupported("nbdinfo", &out) {
        return;
    }
    assert!(ok, "nbdinfo {uri}: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exports"][0]["export-size"], SIZE as u64, "{out}");
    assert_eq!(v["TLS"], true, "{out}");
    // Plain nbd:// is refused by the forced-TLS server.
    let (ok, out) = run("nbdinfo", &[&srv.uri("vol0")]);
    assert!(!ok, "plain nbdinfo was served: {out}");

    // nbdcopy both ways through TLS, then compare.
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let (ok, out) = run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    assert!(ok, "nbdcopy to {uri}: {out}");
    assert_eq!(vol.snapshot(0, SIZE), data, "export differs after nbdcopy");
    let (ok, out) = run("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert!(ok, "nbdcopy from {uri}: {out}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    srv.shutdown().0.unwrap();
}

#[test]
fn qemu_img_info_and_convert_over_tls() {
    qemu_img_info_and_convert(false);
}

#[test]
fn qemu_img_info_and_convert_over_tls_with_the_sm_suites_offered_first() {
    qemu_img_info_and_convert(true);
}

fn qemu_img_info_and_convert(gm: bool) {
    if ferry_testkit::skip_without("qemu-img", module_path!()) {
        return;
    }
    let (srv, vol, dir) = tool_setup(gm);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.path().display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=vol0,tls-creds=tls0",
        srv.port()
    );
    let (ok, out) = run(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    if !ok && tls_unsupported("qemu-img", &out) {
        return;
    }
    assert!(ok, "qemu-img info: {out}");
    assert!(out.contains(&format!("({SIZE} bytes)")), "{out}");

    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 13 % 253) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let (ok, out) = run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "-n",
            "-f",
            "raw",
            src.to_str().unwrap(),
            "--target-image-opts",
            &opts,
        ],
    );
    assert!(ok, "qemu-img convert to the export: {out}");
    assert_eq!(
        vol.snapshot(0, SIZE),
        data,
        "export differs after qemu-img convert"
    );
    let (ok, out) = run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            back.to_str().unwrap(),
        ],
    );
    assert!(ok, "qemu-img convert from the export: {out}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    srv.shutdown().0.unwrap();
}
