//! TLS for the NBD frontend: turns the `[nbd] tls*` settings into ferry-nbd's
//! [`TlsPolicy`]: TLS 1.3 with the standard suites (the ring provider), the
//! SM suites of RFC 8998 (ferry-gmtls), or both, one rustls configuration per
//! set with its own certificate, chosen per ClientHello by ferry-nbd. Loaded
//! before any listener opens, so a bad certificate stops start-up with an
//! error naming its key instead of failing clients one by one.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use ferry_transport::pki;

use ferry_api::config::{Config, NbdConfig, NbdTls, NbdTlsSuite, TlsSuiteConfig};
use ferry_nbd::rustls::{self, crypto::CryptoProvider, server::WebPkiClientVerifier};
use ferry_nbd::{TlsPolicy, TlsServer};

/// The NBD TLS policy `cfg` asks for.
pub fn policy(cfg: &Config) -> anyhow::Result<TlsPolicy> {
    let Some(n) = cfg.nbd.as_ref().filter(|n| !n.tls.is_off()) else {
        return Ok(TlsPolicy::Off);
    };
    let suite = cfg
        .nbd_tls_suite(n)
        .ok_or_else(|| anyhow!("nbd.tls_cert: no NBD server certificate configured"))?;
    let server = tls_server(cfg, n, suite)?;
    Ok(match n.tls {
        NbdTls::Require => TlsPolicy::Require(server),
        NbdTls::Optional => TlsPolicy::Optional(server),
        NbdTls::Off => TlsPolicy::Off,
    })
}

/// The configurations of `suite`: the SM one first, so that a client offering
/// both sets gets the national suites (what a gm deployment is for); clients
/// offering only the standard suites (GnuTLS: qemu, libnbd) get the other.
fn tls_server(cfg: &Config, n: &NbdConfig, suite: NbdTlsSuite) -> anyhow::Result<TlsServer> {
    let gm = suite
        .gm()
        .then(|| server_config(cfg, n, Suite::Gm))
        .transpose()?;
    let standard = suite
        .standard()
        .then(|| server_config(cfg, n, Suite::Standard))
        .transpose()?;
    let mut configs = gm.into_iter().chain(standard);
    let first = configs
        .next()
        .ok_or_else(|| anyhow!("nbd.tls_suite: offers no suite"))?;
    Ok(configs.fold(TlsServer::new(first), TlsServer::or))
}

/// One set of suites, with the provider and certificate keys that go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suite {
    Standard,
    Gm,
}

impl Suite {
    fn provider(self) -> Arc<CryptoProvider> {
        match self {
            // ring, as for replication.
            Suite::Standard => Arc::new(rustls::crypto::ring::default_provider()),
            Suite::Gm => ferry_gmtls::provider_arc(),
        }
    }

    fn cluster(self) -> TlsSuiteConfig {
        match self {
            Suite::Standard => TlsSuiteConfig::Standard,
            Suite::Gm => TlsSuiteConfig::Gm,
        }
    }
}

/// The server certificate of `suite` and its key, with the keys naming them:
/// `nbd.tls_cert`/`tls_key` (standard) or `nbd.tls_gm_cert`/`tls_gm_key` (SM),
/// else the node's cluster certificate from `[tls]` when the cluster speaks
/// that set.
fn cert_source<'a>(
    cfg: &'a Config,
    n: &'a NbdConfig,
    suite: Suite,
) -> anyhow::Result<(&'static str, &'a Path, &'static str, &'a Path)> {
    let own = match suite {
        Suite::Standard => (&n.tls_cert, &n.tls_key, "nbd.tls_cert", "nbd.tls_key"),
        Suite::Gm => (
            &n.tls_gm_cert,
            &n.tls_gm_key,
            "nbd.tls_gm_cert",
            "nbd.tls_gm_key",
        ),
    };
    match (own, &cfg.tls) {
        ((Some(c), Some(k), ck, kk), _) => Ok((ck, c, kk, k)),
        ((None, None, _, _), Some(t)) if t.suite == suite.cluster() => {
            Ok(("tls.cert", &t.cert, "tls.key", &t.key))
        }
        // validate() rules these out.
        ((_, _, ck, _), _) => Err(anyhow!("{ck}: no NBD server certificate configured")),
    }
}

/// The rustls configuration of one suite set: its server certificate and,
/// with `nbd.tls_ca`, required client certificates from those CAs (checked
/// with that set's signature algorithms: an SM client needs an SM2
/// certificate from an SM2 CA in the file).
fn server_config(
    cfg: &Config,
    n: &NbdConfig,
    suite: Suite,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = suite.provider();
    let (cert_key, cert, key_key, key) = cert_source(cfg, n, suite)?;
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
    let kind = match suite {
        Suite::Standard => "for the standard suites (ECDSA, RSA or Ed25519)",
        Suite::Gm => "for the SM suites (SM2)",
    };
    let config = builder.with_single_cert(chain, private).with_context(|| {
        format!(
            "{cert_key} and {key_key}: {} with {} is not a usable certificate and key {kind}",
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

    /// The providers of a policy's configurations, by their first suite.
    fn suites(p: &TlsPolicy) -> Vec<String> {
        let server = p.server().expect("TLS on");
        server
            .configs()
            .iter()
            .map(|c| ferry_nbd::suite_name(c.crypto_provider().cipher_suites[0].suite()))
            .collect()
    }

    #[test]
    fn a_gm_cluster_offers_the_sm_suites_and_the_standard_ones_with_their_own_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        let gm = pki::AnyClusterCa::generate(cfg.cluster_id(), pki::TlsSuite::Gm).unwrap();
        gm.write_pem_files(dir.path()).unwrap();
        gm.issue_node("primary")
            .unwrap()
            .write_pem_files(dir.path())
            .unwrap();
        cfg.tls = Some(TlsConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("primary.pem"),
            key: dir.path().join("primary.key"),
            suite: TlsSuiteConfig::Gm,
        });
        // The cluster's SM2 certificate alone: the SM suites alone.
        cfg.nbd.as_mut().unwrap().tls = NbdTls::Require;
        assert_eq!(suites(&policy(&cfg).unwrap()), ["TLS_SM4_GCM_SM3"]);
        // A standard certificate for GnuTLS clients: both, the SM suites first.
        let std_dir = dir.path().join("std");
        std::fs::create_dir_all(&std_dir).unwrap();
        let ca = pki::ClusterCa::generate(cfg.cluster_id()).unwrap();
        ca.issue_node("primary")
            .unwrap()
            .write_pem_files(&std_dir)
            .unwrap();
        let n = cfg.nbd.as_mut().unwrap();
        n.tls_cert = Some(std_dir.join("primary.pem"));
        n.tls_key = Some(std_dir.join("primary.key"));
        let both = suites(&policy(&cfg).unwrap());
        assert_eq!(both[0], "TLS_SM4_GCM_SM3");
        assert!(both.len() == 2 && both[1].starts_with("TLS13_"), "{both:?}");
        // An ECDSA certificate where the SM2 one belongs is named as such.
        let n = cfg.nbd.as_mut().unwrap();
        n.tls_gm_cert = n.tls_cert.take();
        n.tls_gm_key = n.tls_key.take();
        n.tls_suite = Some(NbdTlsSuite::Gm);
        let err = format!("{:#}", policy(&cfg).unwrap_err());
        assert!(
            err.starts_with("nbd.tls_gm_cert and nbd.tls_gm_key") && err.contains("(SM2)"),
            "{err}"
        );
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
