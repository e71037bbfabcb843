//! Serve one in-memory export over NBD, for trying clients by hand and for
//! quick measurements (`qemu-img bench`, `nbdinfo`, `nbdcopy`):
//!
//! ```text
//! cargo run --release -p ferry-nbd --features test-util --example serve_mem -- 127.0.0.1:10809 256 fill
//! cargo run --release -p ferry-nbd --features test-util --example serve_mem -- 127.0.0.1:10809 256 fill tls=/tmp/nbd-certs
//! ```
//!
//! Arguments: listen address, size in MiB, then optionally `fill` to write
//! the whole export first (otherwise it starts as one hole) and `tls=DIR` to
//! offer TLS (`NBD_OPT_STARTTLS`, optional: plain clients are served too, so
//! one run compares both). With `tls=DIR` a throw-away CA and a server
//! certificate for 127.0.0.1/localhost are made, and the CA is written to
//! `DIR/ca-cert.pem`, the layout libnbd (`tls-certificates=DIR`) and qemu
//! (`tls-creds-x509,dir=DIR,endpoint=client`) read. Runs until killed.

use std::path::Path;
use std::sync::Arc;

use ferry_nbd::rustls;
use ferry_nbd::{MapRegistry, MemExport, ServerConfig, TlsPolicy};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let rest: Vec<String> = args.collect();
    let fill = rest.iter().any(|a| a == "fill");
    let tls = match rest.iter().find_map(|a| a.strip_prefix("tls=")) {
        Some(dir) => TlsPolicy::Optional(tls_config(Path::new(dir))?.into()),
        None => TlsPolicy::Off,
    };
    let vol = Arc::new(MemExport::new("vol0", mib << 20).with_fast_zero(true));
    if fill {
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
        for m in 0..mib {
            vol.fill(m << 20, &chunk);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("serving vol0 ({mib} MiB) on nbd://{}/vol0", l.local_addr()?);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let reg = Arc::new(MapRegistry::new(vec![vol]));
        let cfg = ServerConfig {
            tls,
            ..ServerConfig::default()
        };
        ferry_nbd::serve(l, reg, cfg, rx).await
    })
}

/// A new CA (written to `dir/ca-cert.pem`) and a server certificate from it.
fn tls_config(dir: &Path) -> std::io::Result<Arc<rustls::ServerConfig>> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().map_err(std::io::Error::other)?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = p.self_signed(&ca_key).map_err(std::io::Error::other)?;
    let key = KeyPair::generate().map_err(std::io::Error::other)?;
    let mut p =
        CertificateParams::new(vec!["localhost".to_string()]).map_err(std::io::Error::other)?;
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = p
        .signed_by(&key, &ca, &ca_key)
        .map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("ca-cert.pem"), ca.pem())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], private)
        .map_err(std::io::Error::other)?;
    Ok(Arc::new(config))
}
