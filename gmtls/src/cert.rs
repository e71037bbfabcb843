//! SM2 certificates for a gm cluster: a self-signed SM2 cluster CA and node
//! certificates it signs with SM2-with-SM3 (GB/T 20518 / RFC 8998 shape:
//! id-ecPublicKey keys on sm2p256v1, signature algorithm 1.2.156.10197.1.501).
//!
//! The names are exactly those of ferry-transport's ECDSA PKI so its readers and
//! peer checks work unchanged: the CA's subject is `CN=ferry cluster <hex> CA,
//! O=ferry`; a node certificate has `CN=<node>, OU=ferry cluster <hex>, O=ferry`
//! and the DNS SANs `<node>` and `<hex>.cluster.ferry`, key usage
//! digitalSignature, extended key usage serverAuth and clientAuth. The CA is
//! CA:true with path length 0.
//!
//! rcgen cannot sign with SM2, so the DER is written here (`crate::der`); keys
//! are PKCS#8 (`PRIVATE KEY` PEM), certificates `CERTIFICATE` PEM.

use std::time::{SystemTime, UNIX_EPOCH};

use ferry_gm::{sm3_digest, Sm2SigningKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sm2::pkcs8::der::pem;
use sm2::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use thiserror::Error;

use crate::der::{self, tag};

/// Suffix of the SAN naming a node's cluster (as ferry-transport's PKI).
pub const CLUSTER_SAN_SUFFIX: &str = ".cluster.ferry";
/// Validity of a CA certificate in years (as ferry-transport's PKI).
const CA_VALIDITY_YEARS: i32 = 20;
/// Validity of a node certificate in years (as ferry-transport's PKI).
const NODE_VALIDITY_YEARS: i32 = 10;
/// Key identifiers: the first 20 bytes of SM3 over the public key (RFC 7093 §2
/// method 1 with SM3 in place of SHA-256).
const KEY_ID_LEN: usize = 20;

const OID_CN: &[u64] = &[2, 5, 4, 3];
const OID_OU: &[u64] = &[2, 5, 4, 11];
const OID_O: &[u64] = &[2, 5, 4, 10];
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const OID_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const OID_EXT_KEY_USAGE: &[u64] = &[2, 5, 29, 37];
const OID_SAN: &[u64] = &[2, 5, 29, 17];
const OID_SKI: &[u64] = &[2, 5, 29, 14];
const OID_AKI: &[u64] = &[2, 5, 29, 35];
const OID_SERVER_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
const OID_CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];
/// KeyUsage bits (bit 0 is the MSB): digitalSignature, keyCertSign, cRLSign.
const KU_DIGITAL_SIGNATURE: u8 = 0x80;
const KU_KEY_CERT_SIGN: u8 = 0x04;
const KU_CRL_SIGN: u8 = 0x02;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("SM2 key: {0}")]
    Key(String),
    #[error("random number generator failed")]
    Rng,
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("invalid certificate: {0}")]
    Certificate(String),
    #[error("invalid node name {0:?}: one DNS label of lowercase letters, digits and '-'")]
    NodeName(String),
}

pub type Result<T, E = CertError> = std::result::Result<T, E>;

/// A gm cluster CA: its certificate and SM2 private key.
pub struct GmClusterCa {
    cluster_id: [u8; 16],
    cert_der: Vec<u8>,
    /// The encoded subject Name, reused byte for byte as node certificates'
    /// issuer (chain building compares names as bytes).
    subject: Vec<u8>,
    key_id: [u8; KEY_ID_LEN],
    key: sm2::SecretKey,
}

impl std::fmt::Debug for GmClusterCa {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmClusterCa")
            .field("cluster_id", &hex(&self.cluster_id))
            .finish_non_exhaustive()
    }
}

/// A node's SM2 certificate and private key (PEM); `key_pem` is secret.
#[derive(Clone)]
pub struct GmNodeCert {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for GmNodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmNodeCert")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl GmNodeCert {
    /// The certificate (DER) for rustls.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>> {
        cert_der_from_pem(&self.cert_pem)
    }

    /// The PKCS#8 private key (DER) for rustls; load it with the gm provider.
    pub fn private_key_der(&self) -> Result<PrivateKeyDer<'static>> {
        private_key_der_from_pem(&self.key_pem)
    }
}

impl GmClusterCa {
    /// A new self-signed SM2 CA for `cluster_id`.
    pub fn generate(cluster_id: [u8; 16]) -> Result<Self> {
        let key = new_secret()?;
        let subject = name(&[
            (OID_CN, &format!("ferry cluster {} CA", hex(&cluster_id))),
            (OID_O, "ferry"),
        ]);
        let spki = spki_der(&key)?;
        let key_id = key_id(&spki);
        let extensions = [
            extension(
                OID_BASIC_CONSTRAINTS,
                true,
                &der::sequence(&[
                    &der::tlv(tag::BOOLEAN, &[0xff]),
                    &der::unsigned_integer(&[0]),
                ]),
            ),
            extension(
                OID_KEY_USAGE,
                true,
                &der::named_bits(KU_DIGITAL_SIGNATURE | KU_KEY_CERT_SIGN | KU_CRL_SIGN),
            ),
            extension(OID_SKI, false, &der::tlv(tag::OCTET_STRING, &key_id)),
        ];
        let tbs = tbs_certificate(&subject, &subject, CA_VALIDITY_YEARS, &spki, &extensions)?;
        let cert_der = sign_certificate(&tbs, &key)?;
        Ok(Self {
            cluster_id,
            cert_der,
            subject,
            key_id,
            key,
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key PEM; refuses a key that is
    /// not the certificate's or a certificate that is not a ferry cluster CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = sm2::SecretKey::from_pkcs8_pem(key_pem)
            .map_err(|e| CertError::Key(format!("CA private key: {e}")))?;
        let cert = cert_der_from_pem(cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| CertError::Certificate(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(CertError::Certificate("not a CA certificate".into()));
        }
        let cluster_id = ca_cluster_id(&parsed)?;
        let spki = spki_der(&key)?;
        if parsed.tbs_certificate.subject_pki.raw != spki.as_slice() {
            return Err(CertError::Certificate(
                "CA private key does not match the CA certificate".into(),
            ));
        }
        Ok(Self {
            cluster_id,
            subject: parsed.tbs_certificate.subject.as_raw().to_vec(),
            key_id: key_id(&spki),
            cert_der: cert.to_vec(),
            key,
        })
    }

    pub fn cluster_id(&self) -> [u8; 16] {
        self.cluster_id
    }

    /// The CA certificate (DER), what peers trust.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// The CA private key, PKCS#8 PEM. Keep it off the nodes if possible.
    pub fn key_pem(&self) -> Result<String> {
        key_pem(&self.key)
    }

    /// Issues a node certificate for `name` with SANs `name` and
    /// `<cluster>.cluster.ferry`, for TLS client and server use.
    pub fn issue_node(&self, node: &str) -> Result<GmNodeCert> {
        check_dns_label(node)?;
        let key = new_secret()?;
        let cluster = hex(&self.cluster_id);
        let subject = name(&[
            (OID_CN, node),
            (OID_OU, &format!("ferry cluster {cluster}")),
            (OID_O, "ferry"),
        ]);
        let spki = spki_der(&key)?;
        let cluster_san = format!("{cluster}{CLUSTER_SAN_SUFFIX}");
        let sans = der::sequence(&[
            &der::implicit_primitive(2, node.as_bytes()),
            &der::implicit_primitive(2, cluster_san.as_bytes()),
        ]);
        let extensions = [
            // CA:false, stated explicitly (an empty BasicConstraints).
            extension(OID_BASIC_CONSTRAINTS, true, &der::sequence(&[])),
            extension(OID_KEY_USAGE, true, &der::named_bits(KU_DIGITAL_SIGNATURE)),
            extension(
                OID_EXT_KEY_USAGE,
                false,
                &der::sequence(&[&der::oid(OID_SERVER_AUTH), &der::oid(OID_CLIENT_AUTH)]),
            ),
            extension(OID_SAN, false, &sans),
            extension(OID_SKI, false, &der::tlv(tag::OCTET_STRING, &key_id(&spki))),
            extension(
                OID_AKI,
                false,
                &der::sequence(&[&der::implicit_primitive(0, &self.key_id)]),
            ),
        ];
        let tbs = tbs_certificate(
            &self.subject,
            &subject,
            NODE_VALIDITY_YEARS,
            &spki,
            &extensions,
        )?;
        let cert_der = sign_certificate(&tbs, &self.key)?;
        Ok(GmNodeCert {
            name: node.to_string(),
            cert_pem: pem_encode("CERTIFICATE", &cert_der),
            key_pem: key_pem(&key)?,
        })
    }
}

/// The first CERTIFICATE block of a PEM text.
pub fn cert_der_from_pem(pem_text: &str) -> Result<CertificateDer<'static>> {
    for block in x509_parser::pem::Pem::iter_from_buffer(pem_text.as_bytes()) {
        let block = block.map_err(|e| CertError::Pem(e.to_string()))?;
        if block.label == "CERTIFICATE" {
            return Ok(CertificateDer::from(block.contents));
        }
    }
    Err(CertError::Pem("no CERTIFICATE block".into()))
}

/// An SM2 PKCS#8 private key PEM as DER (checked to be an SM2 key).
pub fn private_key_der_from_pem(pem_text: &str) -> Result<PrivateKeyDer<'static>> {
    let key = sm2::SecretKey::from_pkcs8_pem(pem_text)
        .map_err(|e| CertError::Key(format!("SM2 PKCS#8 private key: {e}")))?;
    let doc = key
        .to_pkcs8_der()
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        doc.as_bytes().to_vec(),
    )))
}

/// The cluster id in a CA's common name `ferry cluster <32 hex> CA`.
fn ca_cluster_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<[u8; 16]> {
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("");
    cn.strip_prefix("ferry cluster ")
        .and_then(|rest| rest.strip_suffix(" CA"))
        .and_then(parse_hex16)
        .ok_or_else(|| {
            CertError::Certificate(format!(
                "CA common name {cn:?} is not 'ferry cluster <32 hex> CA'"
            ))
        })
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A node name must be usable as one DNS label (ferry-transport's pki applies
/// its stricter rules before issuing).
fn check_dns_label(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(CertError::NodeName(name.to_string()))
    }
}

fn new_secret() -> Result<sm2::SecretKey> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    // Rejection sampling: a uniformly random 256-bit string is a valid scalar
    // (non-zero, below the order) except with probability about 2^-32.
    for _ in 0..64 {
        getrandom::getrandom(&mut bytes[..]).map_err(|_| CertError::Rng)?;
        if let Ok(key) = sm2::SecretKey::from_slice(&bytes[..]) {
            return Ok(key);
        }
    }
    Err(CertError::Rng)
}

fn key_pem(key: &sm2::SecretKey) -> Result<String> {
    key.to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| CertError::Key(e.to_string()))
}

fn spki_der(key: &sm2::SecretKey) -> Result<Vec<u8>> {
    key.public_key()
        .to_public_key_der()
        .map(|doc| doc.as_bytes().to_vec())
        .map_err(|e| CertError::Key(e.to_string()))
}

fn key_id(spki: &[u8]) -> [u8; KEY_ID_LEN] {
    let digest = sm3_digest(spki);
    let mut out = [0u8; KEY_ID_LEN];
    out.copy_from_slice(&digest[..KEY_ID_LEN]);
    out
}

fn pem_encode(label: &str, der_bytes: &[u8]) -> String {
    // Base64 of a byte string cannot fail; an empty string would only come from
    // a bug, and then parsing it back fails loudly.
    pem::encode_string(label, LineEnding::LF, der_bytes).unwrap_or_default()
}

/// A Name of one attribute per RDN, UTF8String values, in the given order.
fn name(attrs: &[(&[u64], &str)]) -> Vec<u8> {
    let rdns: Vec<Vec<u8>> = attrs
        .iter()
        .map(|(oid, value)| {
            let atv = der::sequence(&[
                &der::oid(oid),
                &der::tlv(tag::UTF8_STRING, value.as_bytes()),
            ]);
            der::tlv(tag::SET, &atv)
        })
        .collect();
    der::tlv(tag::SEQUENCE, &rdns.concat())
}

fn extension(oid: &[u64], critical: bool, value: &[u8]) -> Vec<u8> {
    let id = der::oid(oid);
    let value = der::tlv(tag::OCTET_STRING, value);
    if critical {
        der::sequence(&[&id, &der::tlv(tag::BOOLEAN, &[0xff]), &value])
    } else {
        // DER omits DEFAULT FALSE.
        der::sequence(&[&id, &value])
    }
}

fn sm2_sm3_algorithm() -> Vec<u8> {
    der::tlv(tag::SEQUENCE, crate::sign::SM2_SM3_SIGNATURE_ALG_ID)
}

/// Current UTC year (approximate, as ferry-transport's PKI: a day either way does
/// not matter for bounds this coarse).
fn this_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn tbs_certificate(
    issuer: &[u8],
    subject: &[u8],
    years: i32,
    spki: &[u8],
    extensions: &[Vec<u8>],
) -> Result<Vec<u8>> {
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|_| CertError::Rng)?;
    // Positive and exactly 16 bytes long (RFC 5280 §4.1.2.2 allows up to 20).
    serial[0] = (serial[0] & 0x7f) | 0x40;
    // Start a year back so clock skew never makes a fresh certificate "not yet
    // valid" (as ferry-transport's PKI).
    let year = this_year();
    let validity = der::sequence(&[&der::time(year - 1, 1, 1), &der::time(year + years, 1, 1)]);
    let ext_refs: Vec<&[u8]> = extensions.iter().map(Vec::as_slice).collect();
    Ok(der::sequence(&[
        &der::explicit(0, &der::unsigned_integer(&[2])),
        &der::unsigned_integer(&serial),
        &sm2_sm3_algorithm(),
        issuer,
        &validity,
        subject,
        spki,
        &der::explicit(3, &der::sequence(&ext_refs)),
    ]))
}

/// `Certificate ::= SEQUENCE { tbs, SM2-with-SM3, BIT STRING signature }`, the
/// signature over the TBS DER with the default distinguishing ID.
fn sign_certificate(tbs: &[u8], key: &sm2::SecretKey) -> Result<Vec<u8>> {
    let secret = zeroize::Zeroizing::new(<[u8; 32]>::from(key.to_bytes()));
    let signer = Sm2SigningKey::from_bytes(&secret).map_err(|e| CertError::Key(e.to_string()))?;
    let raw = signer
        .sign(tbs)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let sig = sm2::dsa::Signature::from_slice(&raw).map_err(|e| CertError::Key(e.to_string()))?;
    Ok(der::sequence(&[
        tbs,
        &sm2_sm3_algorithm(),
        &der::bit_string(sig.to_der().as_bytes()),
    ]))
}
