//! End to end: a ferryd primary with `[nbd] tls = "require"`, its cluster
//! certificate as the NBD server certificate and a separate client CA
//! (`nbd.tls_ca`) for the hypervisors' certificates, driven by qemu-img and
//! qemu-io over TLS (qemu's x509 credentials); a plain client gets nothing.
use std::path::Path;
use std::process::Command;

use ferry_api::config::{Config, NbdTls, TlsConfig};
use ferry_transport::pki::ClusterCa;
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
