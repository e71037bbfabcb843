//! Interoperability with OpenSSL (3.x has SM2, SM3 and SM4): the SM2 certificates
//! this crate issues verify with `openssl verify`, and an sm2sig_sm3 handshake
//! signature verifies with `openssl pkeyutl` under RFC 8998's distinguishing ID.
//! Skipped loudly when `openssl` is missing.

use std::path::Path;
use std::process::Command;

use ferry_gmtls::cert::GmClusterCa;
use ferry_gmtls::sign::{Sm2TlsKey, TLS13_DISTID};
use rustls::sign::SigningKey;

fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openssl_verifies_certificates_and_handshake_signatures() {
    if !ferry_testkit::have("openssl") {
        ferry_testkit::skip(
            "openssl_verifies_certificates_and_handshake_signatures",
            "openssl not installed",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = GmClusterCa::generate(*b"openssl-interop!").unwrap();
    let node = ca.issue_node("primary").unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("node.pem"), &node.cert_pem).unwrap();

    // OpenSSL before 4.0 verifies SM2 certificates with an empty distinguishing
    // ID unless told; GM/T 0009 and this crate use the default.
    let (ok, text) = openssl(
        &[
            "verify",
            "-vfyopt",
            "distid:1234567812345678",
            "-CAfile",
            "ca.pem",
            "node.pem",
        ],
        dir.path(),
    );
    assert!(ok, "openssl verify refused the node certificate: {text}");
    assert!(text.contains("node.pem: OK"), "{text}");
    // `openssl verify` cannot pass the ID to a trust anchor's self-signature, so
    // check that one with pkeyutl over the TBS bytes.
    verify_self_signature(dir.path());

    let (ok, text) = openssl(&["x509", "-in", "node.pem", "-noout", "-text"], dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("SM2-with-SM3"), "{text}");
    let cluster_san = format!("DNS:{}.cluster.ferry", hex::encode(b"openssl-interop!"));
    assert!(
        text.contains(&format!("DNS:primary, {cluster_san}")),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );

    // A CertificateVerify-style signature from the node key.
    let key = Sm2TlsKey::from_der(&node.private_key_der().unwrap()).unwrap();
    let signer = key.choose_scheme(&[ferry_gmtls::sm2sig_sm3()]).unwrap();
    let message = b"TLS 1.3, server CertificateVerify\x00transcript hash stand-in";
    std::fs::write(dir.path().join("msg"), message).unwrap();
    std::fs::write(dir.path().join("sig"), signer.sign(message).unwrap()).unwrap();
    let (ok, text) = openssl(
        &[
            "x509", "-in", "node.pem", "-pubkey", "-noout", "-out", "pub.pem",
        ],
        dir.path(),
    );
    assert!(ok, "{text}");
    let distid = format!("distid:{TLS13_DISTID}");
    let verify = |distid: &str| {
        openssl(
            &[
                "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-digest", "sm3",
                "-in", "msg", "-sigfile", "sig", "-pkeyopt", distid,
            ],
            dir.path(),
        )
    };
    let (ok, text) = verify(&distid);
    assert!(ok, "openssl refused the sm2sig_sm3 signature: {text}");
    assert!(text.contains("Signature Verified Successfully"), "{text}");
    // The certificate ID does not verify it: the TLS ID is really in use.
    let (ok, _) = verify("distid:1234567812345678");
    assert!(
        !ok,
        "signature verified under the certificate distinguishing ID"
    );
}

/// Splits ca.pem into TBSCertificate and signature with `openssl asn1parse` and
/// verifies the SM2 self-signature with the default distinguishing ID.
fn verify_self_signature(dir: &Path) {
    let (ok, text) = openssl(
        &["x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der"],
        dir,
    );
    assert!(ok, "{text}");
    let der = std::fs::read(dir.join("ca.der")).unwrap();
    // Certificate ::= SEQUENCE { tbs, algorithm, BIT STRING }: the TBS starts
    // after the outer header, the signature value is the last element.
    let (ok, text) = openssl(&["asn1parse", "-inform", "DER", "-in", "ca.der"], dir);
    assert!(ok, "{text}");
    let bit_string_offset = text
        .lines()
        .rev()
        .find(|l| l.contains("BIT STRING"))
        .and_then(|l| l.split(':').next())
        .and_then(|o| o.trim().parse::<usize>().ok())
        .expect("signature BIT STRING in asn1parse output");
    let outer_header = if der[1] & 0x80 != 0 {
        2 + usize::from(der[1] & 0x7f)
    } else {
        2
    };
    let (ok, text) = openssl(
        &[
            "asn1parse",
            "-inform",
            "DER",
            "-in",
            "ca.der",
            "-strparse",
            &outer_header.to_string(),
            "-out",
            "tbs.der",
            "-noout",
        ],
        dir,
    );
    assert!(ok, "{text}");
    let (ok, text) = openssl(
        &[
            "asn1parse",
            "-inform",
            "DER",
            "-in",
            "ca.der",
            "-strparse",
            &bit_string_offset.to_string(),
            "-out",
            "casig.der",
            "-noout",
        ],
        dir,
    );
    assert!(ok, "{text}");
    let (ok, text) = openssl(
        &[
            "x509",
            "-in",
            "ca.pem",
            "-pubkey",
            "-noout",
            "-out",
            "capub.pem",
        ],
        dir,
    );
    assert!(ok, "{text}");
    let (ok, text) = openssl(
        &[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "capub.pem",
            "-rawin",
            "-digest",
            "sm3",
            "-in",
            "tbs.der",
            "-sigfile",
            "casig.der",
            "-pkeyopt",
            "distid:1234567812345678",
        ],
        dir,
    );
    assert!(ok, "openssl refused the CA self-signature: {text}");
    assert!(text.contains("Signature Verified Successfully"), "{text}");
}
