//! Cluster PKI: generated certificates parse with the expected names, key
//! files are private, and PEM survives a write/load round trip.

use std::os::unix::fs::PermissionsExt;

use ferry_transport::pki::*;

const CLUSTER: [u8; 16] = [0xab; 16];

#[test]
fn generated_node_certificate_carries_name_and_cluster() {
    let ca = ClusterCa::generate(CLUSTER).expect("generate CA");
    assert_eq!(ca.cluster_id(), CLUSTER);
    let node = ca.issue_node("dr1").expect("issue node");
    let names = node.cert_names().expect("parse node cert");
    assert_eq!(names.node_names, vec!["dr1".to_string()]);
    assert_eq!(names.cluster_id, Some(CLUSTER));

    let ca_der = parse_cert_pem(ca.cert_pem()).expect("CA PEM");
    assert_eq!(ca_der.len(), 1);
    assert_eq!(ca_cluster_id(&ca_der[0]).expect("CA cluster id"), CLUSTER);
    let (_, parsed) = x509_parser::parse_x509_certificate(ca_der[0].as_ref()).expect("CA DER");
    assert!(parsed.is_ca());
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(str::to_string);
    assert_eq!(
        cn.as_deref(),
        Some(format!("ferry cluster {} CA", cluster_hex(&CLUSTER)).as_str())
    );
    node.private_key().expect("node key parses");
}

#[test]
fn node_names_must_be_dns_labels() {
    let ca = ClusterCa::generate(CLUSTER).expect("generate CA");
    for bad in ["", "Primary", "dr_1", "-dr", "a.b", "123", &"x".repeat(64)] {
        let err = ca.issue_node(bad).expect_err(bad);
        assert!(err.to_string().contains("invalid node name"), "{err}");
    }
}

#[test]
fn pem_files_round_trip_and_keys_are_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate(CLUSTER).expect("generate CA");
    ca.write_pem_files(dir.path()).expect("write CA");
    let node = ca.issue_node("primary").expect("issue");
    node.write_pem_files(dir.path()).expect("write node");

    let mode = |f: &str| {
        std::fs::metadata(dir.path().join(f))
            .expect(f)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("ca.key"), 0o600, "CA key must be private");
    assert_eq!(mode("primary.key"), 0o600, "node key must be private");
    assert_eq!(mode("ca.pem"), 0o644);
    assert_eq!(mode("primary.pem"), 0o644);

    // An existing key file with loose permissions is tightened on rewrite.
    std::fs::set_permissions(
        dir.path().join("primary.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    node.write_pem_files(dir.path()).expect("rewrite node");
    assert_eq!(mode("primary.key"), 0o600);

    let loaded = NodeIdentity::load(dir.path(), "primary").expect("load node");
    assert_eq!(loaded.cert_pem, node.cert_pem);
    assert_eq!(loaded.key_pem, node.key_pem);

    // A reloaded CA keeps its id and issues certificates that still chain
    // to the original CA certificate (checked by the handshake tests; here:
    // same issuer name, same cluster SAN).
    let ca2 = ClusterCa::load(dir.path()).expect("load CA");
    assert_eq!(ca2.cluster_id(), CLUSTER);
    assert_eq!(ca2.cert_pem(), ca.cert_pem());
    let dr2 = ca2.issue_node("dr2").expect("issue from loaded CA");
    assert_eq!(dr2.cert_names().expect("names").cluster_id, Some(CLUSTER));

    // A key that is not the CA's is refused.
    let other = ClusterCa::generate(CLUSTER).expect("other CA");
    let err = ClusterCa::from_pem(ca.cert_pem(), &other.key_pem()).expect_err("mismatched key");
    assert!(err.to_string().contains("does not match"), "{err}");
}
