//! Signatures by a node's own certificate key, outside TLS: the audit log's signed
//! checkpoints (`api/AUDIT.md`, format 3). Whoever holds the cluster CA (and so the
//! node's certificate) can check them; only the node's private key makes them.
//!
//! The algorithm follows the key, which follows the cluster (`ferryctl init --crypto`):
//!
//! * SM2 node key (gm cluster): SM2 with SM3 and the default distinguishing ID
//!   `1234567812345678` (GB/T 32918.2, GM/T 0009), the same as certificate signatures
//!   (not RFC 8998's TLS 1.3 ID);
//! * ECDSA P-256 node key (standard cluster): ECDSA with SHA-256.
//!
//! Signatures are DER (`SEQUENCE { r INTEGER, s INTEGER }`) for both, as inside X.509.
//! A certificate is named by its fingerprint: the hex SM3 of its DER.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::SignatureScheme;
use sm3::{Digest, Sm3};
use thiserror::Error;

use crate::pki::{ca_suite, parse_cert_pem, parse_key_pem, TlsSuite};

/// `alg` of an SM2-with-SM3 signature.
pub const ALG_SM2_SM3: &str = "sm2-sm3";
/// `alg` of an ECDSA P-256 with SHA-256 signature.
pub const ALG_ECDSA_P256_SHA256: &str = "ecdsa-p256-sha256";

#[derive(Debug, Error)]
pub enum SigError {
    #[error("node certificate: {0}")]
    Cert(String),
    #[error("node private key: {0}")]
    Key(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("{0}")]
    Verify(String),
}

/// The hex SM3 of a certificate's DER: how a checkpoint names the certificate whose
/// key signed it.
pub fn cert_fingerprint(der: &CertificateDer<'_>) -> String {
    hex::encode(Sm3::digest(der.as_ref()))
}

fn first_cert(cert_pem: &str) -> Result<CertificateDer<'static>, SigError> {
    parse_cert_pem(cert_pem)
        .map_err(|e| SigError::Cert(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| SigError::Cert("no CERTIFICATE block".into()))
}

enum Key {
    Sm2(sm2::dsa::SigningKey),
    Ecdsa(Arc<dyn rustls::sign::SigningKey>),
}

/// A node's private key, ready to sign, with its certificate's fingerprint.
pub struct NodeSigner {
    key: Key,
    alg: &'static str,
    cert: String,
}

impl std::fmt::Debug for NodeSigner {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner")
            .field("alg", &self.alg)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl NodeSigner {
    /// From the node's certificate and private key (PEM, as `ferryctl init` writes
    /// them). The key must be the certificate's: a signature that its own certificate
    /// does not verify is refused here rather than discovered by an auditor.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<NodeSigner, SigError> {
        let cert = first_cert(cert_pem)?;
        let suite = ca_suite(&cert).map_err(|e| SigError::Cert(e.to_string()))?;
        let der = parse_key_pem(key_pem).map_err(|e| SigError::Key(e.to_string()))?;
        let (key, alg) = match suite {
            TlsSuite::Gm => (Key::Sm2(sm2_key(&der)?), ALG_SM2_SM3),
            TlsSuite::Standard => {
                let k = rustls::crypto::ring::sign::any_ecdsa_type(&der)
                    .map_err(|e| SigError::Key(e.to_string()))?;
                (Key::Ecdsa(k), ALG_ECDSA_P256_SHA256)
            }
        };
        let signer = NodeSigner {
            key,
            alg,
            cert: cert_fingerprint(&cert),
        };
        let probe = b"ferry node key check";
        let sig = signer.sign(probe)?;
        verify_with_cert(&cert, alg, probe, &sig)
            .map_err(|_| SigError::Key("the private key does not match the certificate".into()))?;
        Ok(signer)
    }

    /// The signature algorithm (`sm2-sm3` or `ecdsa-p256-sha256`).
    pub fn alg(&self) -> &'static str {
        self.alg
    }

    /// The signing certificate's fingerprint ([`cert_fingerprint`]).
    pub fn cert(&self) -> &str {
        &self.cert
    }

    /// Signs `msg`; the signature is DER.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SigError> {
        match &self.key {
            Key::Sm2(k) => {
                use sm2::dsa::signature::Signer;
                let sig: sm2::dsa::Signature =
                    k.try_sign(msg).map_err(|e| SigError::Sign(e.to_string()))?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            Key::Ecdsa(k) => {
                let signer = k
                    .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
                    .ok_or_else(|| SigError::Key("not an ECDSA P-256 key".into()))?;
                signer.sign(msg).map_err(|e| SigError::Sign(e.to_string()))
            }
        }
    }
}

fn sm2_key(der: &PrivateKeyDer<'_>) -> Result<sm2::dsa::SigningKey, SigError> {
    use sm2::pkcs8::DecodePrivateKey;
    let secret = match der {
        PrivateKeyDer::Pkcs8(d) => sm2::SecretKey::from_pkcs8_der(d.secret_pkcs8_der())
            .map_err(|e| SigError::Key(format!("SM2 PKCS#8: {e}")))?,
        PrivateKeyDer::Sec1(d) => sm2::SecretKey::from_sec1_der(d.secret_sec1_der())
            .map_err(|e| SigError::Key(format!("SM2 SEC1: {e}")))?,
        _ => return Err(SigError::Key("SM2 keys must be PKCS#8 or SEC1".into())),
    };
    sm2::dsa::SigningKey::new(ferry_gm::DEFAULT_DISTID, &secret)
        .map_err(|_| SigError::Key("invalid SM2 private key".into()))
}

/// Checks `sig` (DER) over `msg` with the public key of `cert`, under `alg`; the
/// algorithm must be the one the certificate's key is for.
pub fn verify_with_cert(
    cert: &CertificateDer<'_>,
    alg: &str,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), SigError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| SigError::Cert(e.to_string()))?;
    let public = parsed.public_key().subject_public_key.data.as_ref();
    let want = match ca_suite(cert).map_err(|e| SigError::Cert(e.to_string()))? {
        TlsSuite::Gm => ALG_SM2_SM3,
        TlsSuite::Standard => ALG_ECDSA_P256_SHA256,
    };
    if alg != want {
        return Err(SigError::Verify(format!(
            "signed with {alg}, but the certificate's key is for {want}"
        )));
    }
    let bad = |_| SigError::Verify("signature does not verify".into());
    if alg == ALG_SM2_SM3 {
        use rustls::pki_types::SignatureVerificationAlgorithm;
        return ferry_gmtls::sign::SM2_SM3_CERT
            .verify_signature(public, msg, sig)
            .map_err(bad);
    }
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let (_, verifiers) = algs
        .mapping
        .iter()
        .find(|(s, _)| *s == SignatureScheme::ECDSA_NISTP256_SHA256)
        .ok_or_else(|| SigError::Verify("no ECDSA P-256 verifier".into()))?;
    if verifiers
        .iter()
        .any(|v| v.verify_signature(public, msg, sig).is_ok())
    {
        Ok(())
    } else {
        Err(SigError::Verify("signature does not verify".into()))
    }
}

/// The certificates a verifier knows, by fingerprint.
#[derive(Debug, Default, Clone)]
pub struct CertSet {
    certs: Vec<(String, CertificateDer<'static>)>,
}

impl CertSet {
    /// Adds every certificate of a PEM text (a node's certificate, or several after
    /// a re-issue: checkpoints made before it name the old one).
    pub fn add_pem(&mut self, pem: &str) -> Result<(), SigError> {
        let certs = parse_cert_pem(pem).map_err(|e| SigError::Cert(e.to_string()))?;
        if certs.is_empty() {
            return Err(SigError::Cert("no CERTIFICATE block".into()));
        }
        for c in certs {
            self.certs.push((cert_fingerprint(&c), c));
        }
        Ok(())
    }

    /// The fingerprints known.
    pub fn fingerprints(&self) -> Vec<&str> {
        self.certs.iter().map(|(f, _)| f.as_str()).collect()
    }

    /// Checks a signature by the certificate with fingerprint `cert`.
    pub fn verify(&self, alg: &str, cert: &str, msg: &[u8], sig: &[u8]) -> Result<(), SigError> {
        let (_, der) = self
            .certs
            .iter()
            .find(|(f, _)| f == cert)
            .ok_or_else(|| {
                SigError::Verify(format!(
                    "signed by certificate {cert}, which is not the one given (or the fingerprint was edited)"
                ))
            })?;
        verify_with_cert(der, alg, msg, sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::AnyClusterCa;

    fn signer_and_certs(suite: TlsSuite) -> (NodeSigner, CertSet) {
        let ca = AnyClusterCa::generate([7; 16], suite).unwrap();
        let node = ca.issue_node("primary").unwrap();
        let signer = NodeSigner::from_pem(&node.cert_pem, &node.key_pem).unwrap();
        let mut certs = CertSet::default();
        certs.add_pem(&node.cert_pem).unwrap();
        (signer, certs)
    }

    #[test]
    fn node_keys_sign_and_their_certificates_verify() {
        for (suite, alg) in [
            (TlsSuite::Gm, ALG_SM2_SM3),
            (TlsSuite::Standard, ALG_ECDSA_P256_SHA256),
        ] {
            let (signer, certs) = signer_and_certs(suite);
            assert_eq!(signer.alg(), alg);
            let sig = signer.sign(b"head").unwrap();
            certs.verify(alg, signer.cert(), b"head", &sig).unwrap();
            let e = certs.verify(alg, signer.cert(), b"hexd", &sig).unwrap_err();
            assert_eq!(e.to_string(), "signature does not verify");
            let e = certs
                .verify(alg, &"00".repeat(32), b"head", &sig)
                .unwrap_err();
            assert!(e.to_string().contains("not the one given"), "{e}");
        }
    }

    #[test]
    fn another_nodes_key_or_algorithm_is_refused() {
        let (a, _) = signer_and_certs(TlsSuite::Gm);
        let (_, other) = signer_and_certs(TlsSuite::Gm);
        let fp = other.fingerprints()[0].to_string();
        let sig = a.sign(b"head").unwrap();
        let e = other.verify(ALG_SM2_SM3, &fp, b"head", &sig).unwrap_err();
        assert_eq!(e.to_string(), "signature does not verify");
        let e = other
            .verify(ALG_ECDSA_P256_SHA256, &fp, b"head", &sig)
            .unwrap_err();
        assert!(
            e.to_string().contains("certificate's key is for sm2-sm3"),
            "{e}"
        );
        // A key that is not the certificate's.
        let ca = AnyClusterCa::generate([7; 16], TlsSuite::Gm).unwrap();
        let n1 = ca.issue_node("primary").unwrap();
        let n2 = ca.issue_node("dr1").unwrap();
        let e = NodeSigner::from_pem(&n1.cert_pem, &n2.key_pem).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
