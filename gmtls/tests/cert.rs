//! SM2 certificates use the SM2 algorithm identifiers, survive a PEM round trip of
//! the CA, and are signed SM2-with-SM3 by the CA's key. (That ferry-transport's
//! PKI reads their names is tested in ferry-transport, which depends on this crate.)

use ferry_gmtls::cert::{CertError, GmClusterCa};
use ferry_gmtls::sign::{SM2_PUBLIC_KEY_ALG_ID, SM2_SM3_CERT, SM2_SM3_SIGNATURE_ALG_ID};
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm};
use x509_parser::prelude::*;

const CLUSTER: [u8; 16] = *b"cert-shape-test!";

/// Checks `cert`'s signature with `issuer`'s public key, as webpki would.
fn signed_by(cert: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> bool {
    let (_, cert) = parse_x509_certificate(cert.as_ref()).unwrap();
    let (_, issuer) = parse_x509_certificate(issuer.as_ref()).unwrap();
    SM2_SM3_CERT
        .verify_signature(
            &issuer.public_key().subject_public_key.data,
            cert.tbs_certificate.as_ref(),
            &cert.signature_value.data,
        )
        .is_ok()
}

#[test]
fn certificates_use_sm2_identifiers_and_chain() {
    let ca = GmClusterCa::generate(CLUSTER).unwrap();
    let node = ca.issue_node("primary").unwrap();
    let node_der = node.cert_der().unwrap();
    let (_, parsed) = parse_x509_certificate(node_der.as_ref()).unwrap();
    // AlgorithmIdentifier contents, byte for byte as webpki compares them.
    let sig_alg = &parsed.signature_algorithm;
    assert_eq!(sig_alg.algorithm.as_bytes(), &SM2_SM3_SIGNATURE_ALG_ID[2..]);
    assert!(sig_alg.parameters.is_none());
    let spki = &parsed.tbs_certificate.subject_pki.algorithm;
    assert_eq!(spki.algorithm.as_bytes(), &SM2_PUBLIC_KEY_ALG_ID[2..9]);
    assert_eq!(
        parsed.issuer().as_raw(),
        parse_x509_certificate(ca.cert_der().as_ref())
            .unwrap()
            .1
            .subject()
            .as_raw()
    );
    assert!(signed_by(&node_der, &ca.cert_der()));
    assert!(signed_by(&ca.cert_der(), &ca.cert_der()));
    let other = GmClusterCa::generate(CLUSTER).unwrap();
    assert!(!signed_by(&node_der, &other.cert_der()));
}

#[test]
fn ca_round_trips_through_pem_and_refuses_a_foreign_key() {
    let ca = GmClusterCa::generate(CLUSTER).unwrap();
    let key_pem = ca.key_pem().unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let loaded = GmClusterCa::from_pem(&ca.cert_pem(), &key_pem).unwrap();
    assert_eq!(loaded.cluster_id(), CLUSTER);
    assert_eq!(loaded.cert_der(), ca.cert_der());
    // Nodes issued by the reloaded CA chain to the original certificate.
    let node = loaded.issue_node("dr2").unwrap();
    assert!(signed_by(&node.cert_der().unwrap(), &ca.cert_der()));

    let other = GmClusterCa::generate(CLUSTER).unwrap();
    let err = GmClusterCa::from_pem(&ca.cert_pem(), &other.key_pem().unwrap()).unwrap_err();
    assert!(matches!(err, CertError::Certificate(_)), "{err}");
    // A node certificate is not a CA.
    let err = GmClusterCa::from_pem(&node.cert_pem, &key_pem).unwrap_err();
    assert!(matches!(err, CertError::Certificate(_)), "{err}");
}

#[test]
fn bad_node_names_are_refused() {
    let ca = GmClusterCa::generate(CLUSTER).unwrap();
    for name in ["", "Primary", "-dr1", "dr1-", "a.b", &"x".repeat(64)] {
        assert!(
            matches!(ca.issue_node(name), Err(CertError::NodeName(_))),
            "{name:?} accepted"
        );
    }
}
