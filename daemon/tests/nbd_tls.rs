//! End to end: a ferryd primary with `[nbd] tls = "require"`, its cluster
//! certificate as the NBD server certificate and a separate client CA
//! (`nbd.tls_ca`) for the hypervisors' certificates, driven by qemu-img and
//! qemu-io over TLS (qemu's x509 credentials); a plain client gets nothing.
//! Then a gm cluster's primary (`ferryctl init --crypto gm` certificates):
//! the SM suites with its SM2 cluster certificate and the standard ones with
//! `nbd.tls_cert`, chosen per client (an SM client negotiates
//! TLS_SM4_GCM_SM3, nbdinfo the standard suites), and with the SM suites
//! alone a standard client is refused and the log says why.
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ferry_api::config::{Config, NbdTls, NbdTlsSuite, TlsConfig, TlsSuiteConfig};
use ferry_nbd::rustls;
use ferry_nbd::testclient::TestClient;
use ferry_transport::pki::{AnyClusterCa, ClusterCa, TlsSuite};
use ferryd::testkit::{primary_config, skip, skip_without, Node};

const MIB: u64 = 1 << 20;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
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

/// A client CA and a client certificate from it, PEM: (ca, cert, key). With
/// the key usages qemu insists on (digitalSignature and keyEncipherment).
fn client_credentials() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "hypervisors");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["hypervisor-1".to_string()]).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "hypervisor-1");
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn primary_serves_volumes_over_required_tls_with_client_certificates() {
    let name = "primary_serves_volumes_over_required_tls_with_client_certificates";
    if skip_without("qemu-img", name) || skip_without("qemu-io", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = primary_config(dir.path(), &[("vol0", 16 * MIB)], 64 * MIB, 4 * MIB);
    let mut cfg = Config::load(&path).unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = ClusterCa::generate(cfg.cluster_id()).unwrap();
    ca.write_pem_files(&pki).unwrap();
    ca.issue_node("primary")
        .unwrap()
        .write_pem_files(&pki)
        .unwrap();
    cfg.tls = Some(TlsConfig {
        ca: pki.join("ca.pem"),
        cert: pki.join("primary.pem"),
        key: pki.join("primary.key"),
        suite: Default::default(),
    });
    let nbd = cfg.nbd.as_mut().unwrap();
    nbd.tls = NbdTls::Require;
    let (client_ca, client_cert, client_key) = client_credentials();
    std::fs::write(pki.join("clients.pem"), &client_ca).unwrap();
    nbd.tls_ca = Some(pki.join("clients.pem"));
    std::fs::write(&path, cfg.to_toml()).unwrap();

    // The client's directory: both CAs (qemu checks its own certificate
    // against ca-cert.pem too) and the client's certificate.
    let cdir = dir.path().join("client");
    std::fs::create_dir_all(&cdir).unwrap();
    let cas = format!("{}{client_ca}", ca.cert_pem());
    std::fs::write(cdir.join("ca-cert.pem"), cas).unwrap();
    std::fs::write(cdir.join("client-cert.pem"), client_cert).unwrap();
    std::fs::write(cdir.join("client-key.pem"), client_key).unwrap();

    let node = Node::start(ferryd(), &path);
    let addr = node.nbd.expect("primary serves NBD");
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        cdir.display()
    );
    // The cluster certificate names the node, not its address.
    let opts = format!(
        "driver=nbd,host={},port={},export=vol0,tls-creds=tls0,tls-hostname=primary",
        addr.ip(),
        addr.port()
    );
    let (ok, out) = run(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    if !ok && out.to_lowercase().contains("tls") && out.contains("not supported") {
        skip(name, &format!("qemu lacks TLS support: {out}"));
        return;
    }
    assert!(ok, "qemu-img info over TLS: {out}");
    assert!(out.contains(&format!("({} bytes)", 16 * MIB)), "{out}");
    let (ok, out) = run(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
        ],
    );
    assert!(
        ok && !out.contains("failed") && !out.to_lowercase().contains("error"),
        "qemu-io over TLS: {out}"
    );
    // A plain client learns nothing, not even the size.
    let (ok, out) = run("qemu-img", &["info", &node.url("vol0")]);
    assert!(!ok && !out.contains("bytes)"), "plain client served: {out}");
    assert!(out.contains("TLS"), "{out}");
}

/// A standard server certificate for 127.0.0.1 from a fresh CA: (CA PEM,
/// certificate PEM, key PEM). libnbd checks the address it dialled.
fn loopback_server_credentials() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// An NBD client speaking only `provider`'s suites, trusting `ca`.
fn client_tls(
    provider: Arc<rustls::crypto::CryptoProvider>,
    ca: rustls::pki_types::CertificateDer<'static>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A gm cluster's primary (SM2 CA and node certificate) with forced NBD TLS:
/// its config path and the gm CA.
fn gm_primary(dir: &Path) -> (std::path::PathBuf, AnyClusterCa) {
    let path = primary_config(dir, &[("vol0", 16 * MIB)], 64 * MIB, 4 * MIB);
    let mut cfg = Config::load(&path).unwrap();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = AnyClusterCa::generate(cfg.cluster_id(), TlsSuite::Gm).unwrap();
    ca.write_pem_files(&pki).unwrap();
    ca.issue_node("primary")
        .unwrap()
        .write_pem_files(&pki)
        .unwrap();
    cfg.tls = Some(TlsConfig {
        ca: pki.join("ca.pem"),
        cert: pki.join("primary.pem"),
        key: pki.join("primary.key"),
        suite: TlsSuiteConfig::Gm,
    });
    cfg.nbd.as_mut().unwrap().tls = NbdTls::Require;
    std::fs::write(&path, cfg.to_toml()).unwrap();
    (path, ca)
}

#[test]
fn gm_cluster_serves_sm_clients_the_sm_suite_and_gnutls_clients_the_standard_one() {
    let dir = tempfile::tempdir().unwrap();
    let (path, gm) = gm_primary(dir.path());
    // nbd.tls_cert: the standard certificate; tls_suite is then "both".
    let (std_ca, std_cert, std_key) = loopback_server_credentials();
    let cdir = dir.path().join("client");
    std::fs::create_dir_all(&cdir).unwrap();
    std::fs::write(cdir.join("ca-cert.pem"), &std_ca).unwrap();
    std::fs::write(dir.path().join("nbd.pem"), std_cert).unwrap();
    std::fs::write(dir.path().join("nbd.key"), std_key).unwrap();
    let mut cfg = Config::load(&path).unwrap();
    let n = cfg.nbd.as_mut().unwrap();
    n.tls_cert = Some(dir.path().join("nbd.pem"));
    n.tls_key = Some(dir.path().join("nbd.key"));
    assert_eq!(
        cfg.nbd_tls_suite(cfg.nbd.as_ref().unwrap()),
        Some(NbdTlsSuite::Both)
    );
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let node = Node::start(ferryd(), &path);
    let addr = node.nbd.expect("primary serves NBD");

    // The SM client: TLS_SM4_GCM_SM3, the SM2 node certificate.
    let gm_ca = ferry_gmtls::cert::cert_der_from_pem(&gm.cert_pem()).unwrap();
    let mut c = TestClient::start(addr).unwrap();
    let tls = client_tls(ferry_gmtls::provider_arc(), gm_ca);
    assert_eq!(c.starttls(tls, "primary").unwrap(), Ok(()));
    assert_eq!(c.tls_suite(), Some(ferry_gmtls::tls_sm4_gcm_sm3()));
    c.go("vol0").unwrap().unwrap();
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 239) as u8).collect();
    assert_eq!(c.write(MIB, &data, 0).unwrap(), 0);
    assert_eq!(c.flush().unwrap(), 0);
    assert_eq!(c.read(MIB, MIB as u32).unwrap(), Ok(data));
    drop(c);
    let log = node.log_text();
    assert!(log.contains("TLS_SM4_GCM_SM3"), "{log}");

    // GnuTLS (libnbd) against the same listener: the standard suites.
    let name = "gm_cluster_serves_sm_clients_the_sm_suite_and_gnutls_clients_the_standard_one";
    if skip_without("nbdinfo", name) {
        return;
    }
    let uri = format!("nbds://{addr}/vol0?tls-certificates={}", cdir.display());
    let (ok, out) = run("nbdinfo", &["--json", &uri]);
    if !ok && out.to_lowercase().contains("tls") && out.contains("not supported") {
        skip(name, &format!("nbdinfo lacks TLS support: {out}"));
        return;
    }
    assert!(ok, "nbdinfo {uri}: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], true, "{out}");
    assert_eq!(v["exports"][0]["export-size"], 16 * MIB, "{out}");
}

#[test]
fn gm_only_nbd_refuses_a_standard_client_and_logs_why() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _gm) = gm_primary(dir.path());
    let node = Node::start(ferryd(), &path);
    let addr = node.nbd.expect("primary serves NBD");
    let (std_ca, _, _) = loopback_server_credentials();
    let ca = ferry_transport::pki::parse_cert_pem(&std_ca).unwrap();
    let tls = client_tls(
        Arc::new(rustls::crypto::ring::default_provider()),
        ca[0].clone(),
    );
    let mut c = TestClient::start(addr).unwrap();
    let refused = c.starttls(tls, "primary").and_then(|_| c.list());
    assert!(refused.is_err(), "standard client served: {refused:?}");
    // The reason is in ferryd's log, with both sides' suites.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let want = "offers none of this server's TLS 1.3 cipher suites (server: TLS_SM4_GCM_SM3; client: TLS13_";
    while !node.log_text().contains(want) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = node.log_text();
    assert!(log.contains(want), "{log}");
}
