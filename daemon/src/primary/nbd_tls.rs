//! TLS for the NBD frontend: turns the `[nbd] tls*` settings into ferry-nbd's
//! [`TlsPolicy`] (a rustls server configuration, TLS 1.3, the ring provider).
//! Loaded before any listener opens, so a bad certificate stops start-up with
//! an error naming its key instead of failing clients one by one.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use ferry_transport::pki;

use ferry_api::config::{Config, NbdConfig, NbdTls};
use ferry_nbd::rustls::{self, crypto::CryptoProvider, server::WebPkiClientVerifier};
use ferry_nbd::TlsPolicy;

/// The NBD TLS policy `cfg` asks for.
pub fn policy(cfg: &Config) -> anyhow::Result<TlsPolicy> {
    let Some(n) = cfg.nbd.as_ref().filter(|n| !n.tls.is_off()) else {
        return Ok(TlsPolicy::Off);
    };
    // ring, as for replication; the SM suites will come as another provider.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = server_config(cfg, n, provider)?;
    Ok(match n.tls {
        NbdTls::Require => TlsPolicy::Require(server),
        NbdTls::Optional => TlsPolicy::Optional(server),
        NbdTls::Off => TlsPolicy::Off,
    })
}

/// The server certificate (`nbd.tls_cert`/`tls_key`, else the node's cluster
/// certificate from `[tls]`) and, with `nbd.tls_ca`, required client
/// certificates from those CAs.
pub fn server_config(
    cfg: &Config,
    n: &NbdConfig,
    provider: Arc<CryptoProvider>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (cert_key, cert, key_key, key) = match (&n.tls_cert, &n.tls_key, &cfg.tls) {
        (Some(c), Some(k), _) => ("nbd.tls_cert", c, "nbd.tls_key", k),
        (None, None, Some(t)) => ("tls.cert", &t.cert, "tls.key", &t.key),
        // validate() rules these out.
        _ => {
            return Err(anyhow!(
                "nbd.tls_cert: no NBD server certificate configured"
            ))
        }
    };
    let chain = certs(cert_key, cert)?;
    let pem = read(key_key, key)?;
    let private = pki::parse_key_pem(&pem)
        .with_context(|| format!("{key_key}: {} is not a usable private key", key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the crypto provider does not support TLS 1.3")?;
    let builder = match &n.tls_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("nbd.tls_ca", ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("nbd.tls_ca: {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("nbd.tls_ca: {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, private).with_context(|| {
        format!(
            "{cert_key} and {key_key}: {} with {} is not a usable certificate and key",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(config))
}

fn read(key: &str, path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{key}: reading {}", path.display()))
}

/// Every certificate in a PEM file; none is an error.
fn certs(
    key: &str,
    path: &Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs = pki::parse_cert_pem(&read(key, path)?)
        .with_context(|| format!("{key}: {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{key}: {} holds no certificate", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;
    use ferry_api::config::TlsConfig;

    fn config(dir: &Path) -> Config {
        let path = testkit::primary_config(dir, &[("vol0", 1 << 20)], 64 << 20, 16 << 20);
        Config::load(&path).unwrap()
    }

    #[test]
    fn off_by_default_and_the_cluster_certificate_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        assert!(matches!(policy(&cfg).unwrap(), TlsPolicy::Off));
        let ca = pki::ClusterCa::generate(cfg.cluster_id()).unwrap();
        ca.write_pem_files(dir.path()).unwrap();
        ca.issue_node("primary")
            .unwrap()
            .write_pem_files(dir.path())
            .unwrap();
        cfg.tls = Some(TlsConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("primary.pem"),
            key: dir.path().join("primary.key"),
            suite: Default::default(),
        });
        cfg.nbd.as_mut().unwrap().tls = NbdTls::Optional;
        assert!(matches!(policy(&cfg).unwrap(), TlsPolicy::Optional(_)));
        // The cluster CA as the client CA: nodes' certificates as NBD clients.
        cfg.nbd.as_mut().unwrap().tls = NbdTls::Require;
        cfg.nbd.as_mut().unwrap().tls_ca = Some(dir.path().join("ca.pem"));
        assert!(matches!(policy(&cfg).unwrap(), TlsPolicy::Require(_)));
        // A key that is not the certificate's.
        let other = ca.issue_node("other").unwrap();
        std::fs::write(dir.path().join("primary.key"), other.key_pem).unwrap();
        let err = format!("{:#}", policy(&cfg).unwrap_err());
        assert!(err.contains("tls.cert and tls.key"), "{err}");
    }

    #[test]
    fn bad_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let nbd = cfg.nbd.as_mut().unwrap();
        nbd.tls = NbdTls::Require;
        nbd.tls_cert = Some(dir.path().join("missing.pem"));
        nbd.tls_key = Some(dir.path().join("missing.key"));
        let err = format!("{:#}", policy(&cfg).unwrap_err());
        assert!(err.starts_with("nbd.tls_cert: reading"), "{err}");
        std::fs::write(dir.path().join("missing.pem"), "not a certificate").unwrap();
        let err = format!("{:#}", policy(&cfg).unwrap_err());
        assert!(
            err.contains("nbd.tls_cert") && err.contains("no certificate"),
            "{err}"
        );
    }
}
