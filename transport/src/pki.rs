//! Cluster PKI: one self-signed CA per ferry cluster and one certificate per
//! node, signed by it.
//!
//! A node certificate carries two DNS subject alternative names:
//!
//! * the node name (`primary`, `dr1`, …) — what a peer checks against the
//!   node it expects to talk to;
//! * `<cluster-id-hex>.cluster.ferry` — the cluster the node belongs to, so a
//!   certificate from a CA that was (wrongly) shared between clusters is still
//!   refused, and an error can say which cluster a stray peer belongs to.
//!
//! The CA's subject is `CN=ferry cluster <cluster-id-hex> CA`. Keys are ECDSA
//! P-256 (small, fast to verify, supported by every rustls provider), or SM2 in a
//! cluster that speaks the national suites ([`TlsSuite::Gm`]): those
//! certificates are issued by `ferry_gmtls::cert` with the same names, and
//! everything here reads them unchanged. Private
//! keys are written with mode 0600 from the moment the file is created, never
//! chmod-ed afterwards, so there is no window in which they are readable.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

/// Suffix of the SAN that names a node's cluster: `<32 hex>.cluster.ferry`.
pub const CLUSTER_SAN_SUFFIX: &str = ".cluster.ferry";
/// Longest node name a certificate can carry (one DNS label).
pub const MAX_NODE_NAME_LEN: usize = 63;

/// Validity of a CA certificate, in years from the start of the current year.
const CA_VALIDITY_YEARS: i32 = 20;
/// Validity of a node certificate. Long, because ferry has no automatic
/// renewal yet; rotating means issuing a new one with `issue_node`.
const NODE_VALIDITY_YEARS: i32 = 10;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName { name: String, reason: &'static str },
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("invalid certificate: {0}")]
    Certificate(String),
    #[error("SM2 certificate: {0}")]
    Gm(#[from] ferry_gmtls::cert::CertError),
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// Which TLS 1.3 suites a cluster speaks. Decided by its CA's key: a cluster
/// whose CA is SM2 speaks only RFC 8998's TLS_SM4_GCM_SM3 / curveSM2 /
/// sm2sig_sm3 (ferry-gmtls), any other only the standard suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSuite {
    Standard,
    Gm,
}

/// DER of the named curve sm2p256v1 (1.2.156.10197.1.301), the parameter of an
/// SM2 key's `id-ecPublicKey` algorithm identifier.
const SM2_CURVE_OID_DER: &[u8] = &[0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d];

/// The suite a cluster speaks, from its CA certificate's public key.
pub fn ca_suite(der: &CertificateDer<'_>) -> Result<TlsSuite> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    let curve = cert
        .public_key()
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    Ok(match curve {
        Some(oid) if oid.as_bytes() == SM2_CURVE_OID_DER => TlsSuite::Gm,
        _ => TlsSuite::Standard,
    })
}

/// Lowercase hex of a cluster id, as used in certificate names.
pub fn cluster_hex(cluster_id: &[u8; 16]) -> String {
    cluster_id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_cluster_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The cluster SAN for `cluster_id`.
pub fn cluster_san(cluster_id: &[u8; 16]) -> String {
    format!("{}{CLUSTER_SAN_SUFFIX}", cluster_hex(cluster_id))
}

/// Node names must be one DNS label (lowercase letters, digits, `-`, not at
/// either end): they travel as DNS SANs and as the TLS server name, and
/// webpki only matches syntactically valid DNS names.
pub fn validate_node_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(PkiError::InvalidNodeName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_NODE_NAME_LEN {
        return bad("must be 1..=63 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return bad("must not be all digits");
    }
    Ok(())
}

/// January 1st of the current UTC year (approximate year from the Unix time;
/// a day either way does not matter for validity bounds this coarse).
fn this_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn set_validity(params: &mut CertificateParams, years: i32) {
    // Start a year back so small clock skew between hosts (or a node whose
    // clock is behind) never makes a fresh certificate "not yet valid".
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// A cluster's certificate authority (certificate and private key).
pub struct ClusterCa {
    cluster_id: [u8; 16],
    /// The CA certificate as distributed (what peers trust).
    cert_pem: String,
    /// rcgen's view of the CA, used only as the issuer when signing.
    issuer: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_id", &cluster_hex(&self.cluster_id))
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA for `cluster_id` (ECDSA P-256, CA:true, path
    /// length 0: it signs node certificates only, never intermediates).
    pub fn generate(cluster_id: [u8; 16]) -> Result<Self> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("ferry cluster {} CA", cluster_hex(&cluster_id)),
        );
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY_YEARS);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cluster_id,
            cert_pem: cert.pem(),
            issuer: cert,
            key,
        })
    }

    /// Loads a CA from its certificate and key PEM. The cluster id is read
    /// back from the certificate's common name.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = parse_cert_pem(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Pem("no CERTIFICATE block".into()))?;
        let cluster_id = ca_cluster_id(&der)?;
        // rcgen signs with a `Certificate`; rebuilding one from the parsed
        // parameters keeps the subject and key identifier of the original,
        // so node certificates chain to the distributed CA certificate.
        let params = CertificateParams::from_ca_cert_der(&der)?;
        let issuer = params.self_signed(&key)?;
        if key_matches(&der, &key)? {
            Ok(Self {
                cluster_id,
                cert_pem: cert_pem.to_string(),
                issuer,
                key,
            })
        } else {
            Err(PkiError::Certificate(
                "CA private key does not match the CA certificate".into(),
            ))
        }
    }

    pub fn cluster_id(&self) -> [u8; 16] {
        self.cluster_id
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Keep it off the nodes if possible.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a certificate for node `name` with SANs `name` and
    /// `<cluster>.cluster.ferry`, usable as both TLS client and server (a node
    /// dials as primary and listens as standby after a role change).
    pub fn issue_node(&self, name: &str) -> Result<NodeIdentity> {
        validate_node_name(name)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(vec![name.to_string(), cluster_san(&self.cluster_id)])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(
            DnType::OrganizationalUnitName,
            format!("ferry cluster {}", cluster_hex(&self.cluster_id)),
        );
        dn.push(DnType::OrganizationName, "ferry");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, NODE_VALIDITY_YEARS);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(NodeIdentity {
            name: name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`.
    pub fn write_pem_files(&self, dir: &Path) -> Result<()> {
        write_public(&dir.join("ca.pem"), &self.cert_pem)?;
        write_private(&dir.join("ca.key"), &self.key_pem())
    }

    /// Reads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_pem(
            &read_to_string(&dir.join("ca.pem"))?,
            &read_to_string(&dir.join("ca.key"))?,
        )
    }
}

/// A cluster CA of either kind, for the tools that create clusters: ECDSA
/// (rcgen) for the standard suites, SM2 (ferry-gmtls) for the gm ones. Both
/// issue node certificates with the same names and write the same files.
pub enum AnyClusterCa {
    /// Boxed: rcgen's CA is several times the size of the SM2 one.
    Standard(Box<ClusterCa>),
    Gm(ferry_gmtls::cert::GmClusterCa),
}

impl std::fmt::Debug for AnyClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standard(ca) => ca.fmt(f),
            Self::Gm(ca) => ca.fmt(f),
        }
    }
}

impl AnyClusterCa {
    /// A new CA for `cluster_id` whose certificates speak `suite`.
    pub fn generate(cluster_id: [u8; 16], suite: TlsSuite) -> Result<Self> {
        Ok(match suite {
            TlsSuite::Standard => Self::Standard(Box::new(ClusterCa::generate(cluster_id)?)),
            TlsSuite::Gm => Self::Gm(ferry_gmtls::cert::GmClusterCa::generate(cluster_id)?),
        })
    }

    /// Reads `ca.pem` and `ca.key` from `dir`, of whichever kind the certificate is.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_pem = read_to_string(&dir.join("ca.pem"))?;
        let key_pem = read_to_string(&dir.join("ca.key"))?;
        let der = parse_cert_pem(&cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Pem("no CERTIFICATE block".into()))?;
        Ok(match ca_suite(&der)? {
            TlsSuite::Standard => {
                Self::Standard(Box::new(ClusterCa::from_pem(&cert_pem, &key_pem)?))
            }
            TlsSuite::Gm => Self::Gm(ferry_gmtls::cert::GmClusterCa::from_pem(
                &cert_pem, &key_pem,
            )?),
        })
    }

    pub fn suite(&self) -> TlsSuite {
        match self {
            Self::Standard(_) => TlsSuite::Standard,
            Self::Gm(_) => TlsSuite::Gm,
        }
    }

    pub fn cluster_id(&self) -> [u8; 16] {
        match self {
            Self::Standard(ca) => ca.cluster_id(),
            Self::Gm(ca) => ca.cluster_id(),
        }
    }

    /// The CA certificate (PEM) the nodes trust.
    pub fn cert_pem(&self) -> String {
        match self {
            Self::Standard(ca) => ca.cert_pem().to_string(),
            Self::Gm(ca) => ca.cert_pem(),
        }
    }

    /// A node certificate and key, as [`ClusterCa::issue_node`].
    pub fn issue_node(&self, name: &str) -> Result<NodeIdentity> {
        validate_node_name(name)?;
        match self {
            Self::Standard(ca) => ca.issue_node(name),
            Self::Gm(ca) => {
                let node = ca.issue_node(name)?;
                Ok(NodeIdentity {
                    name: node.name,
                    cert_pem: node.cert_pem,
                    key_pem: node.key_pem,
                })
            }
        }
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `dir`.
    pub fn write_pem_files(&self, dir: &Path) -> Result<()> {
        match self {
            Self::Standard(ca) => ca.write_pem_files(dir),
            Self::Gm(ca) => {
                write_public(&dir.join("ca.pem"), &ca.cert_pem())?;
                write_private(&dir.join("ca.key"), &ca.key_pem()?)
            }
        }
    }
}

/// Whether `key` is the key pair of the certificate `der` (compares the
/// SubjectPublicKeyInfo's key bits).
fn key_matches(der: &CertificateDer<'_>, key: &KeyPair) -> Result<bool> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// The cluster id in a CA certificate's common name (`ferry cluster <hex> CA`).
pub fn ca_cluster_id(der: &CertificateDer<'_>) -> Result<[u8; 16]> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    if !cert.is_ca() {
        return Err(PkiError::Certificate("not a CA certificate".into()));
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("");
    cn.strip_prefix("ferry cluster ")
        .and_then(|rest| rest.strip_suffix(" CA"))
        .and_then(parse_cluster_hex)
        .ok_or_else(|| {
            PkiError::Certificate(format!(
                "CA common name {cn:?} is not 'ferry cluster <32 hex> CA'"
            ))
        })
}

/// A node's certificate and private key (PEM). `key_pem` is secret.
#[derive(Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Writes `<name>.pem` (0644) and `<name>.key` (0600) into `dir`.
    pub fn write_pem_files(&self, dir: &Path) -> Result<()> {
        validate_node_name(&self.name)?;
        write_public(&dir.join(format!("{}.pem", self.name)), &self.cert_pem)?;
        write_private(&dir.join(format!("{}.key", self.name)), &self.key_pem)
    }

    /// Reads `<name>.pem` and `<name>.key` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Self> {
        validate_node_name(name)?;
        Ok(Self {
            name: name.to_string(),
            cert_pem: read_to_string(&dir.join(format!("{name}.pem")))?,
            key_pem: read_to_string(&dir.join(format!("{name}.key")))?,
        })
    }

    /// The certificate chain (DER) for rustls.
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>> {
        let chain = parse_cert_pem(&self.cert_pem)?;
        if chain.is_empty() {
            return Err(PkiError::Pem("no CERTIFICATE block".into()));
        }
        Ok(chain)
    }

    /// The private key (PKCS#8 DER) for rustls.
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>> {
        parse_key_pem(&self.key_pem)
    }

    /// The names inside this node's own certificate.
    pub fn cert_names(&self) -> Result<CertNames> {
        let chain = self.cert_chain()?;
        cert_names(&chain[0])
    }
}

/// Every `CERTIFICATE` block of a PEM text, in order.
pub fn parse_cert_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| PkiError::Pem(e.to_string()))?;
        if block.label == "CERTIFICATE" {
            out.push(CertificateDer::from(block.contents));
        }
    }
    Ok(out)
}

/// A private key PEM (PKCS#8, as written by this module or by
/// `ferry_gmtls::cert` for SM2) as DER.
pub fn parse_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    match KeyPair::from_pem(pem) {
        Ok(key) => Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        ))),
        // rcgen (ring) knows no SM2; an SM2 key is loaded by the gm provider.
        Err(rcgen_err) => ferry_gmtls::cert::private_key_der_from_pem(pem)
            .map_err(|_| PkiError::Generate(rcgen_err)),
    }
}

/// What a node certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    /// DNS SANs other than the cluster SAN (normally exactly one: the node name).
    pub node_names: Vec<String>,
    /// From the `<hex>.cluster.ferry` SAN, if present and well formed.
    pub cluster_id: Option<[u8; 16]>,
}

/// Reads the node names and cluster id from a certificate's DNS SANs. Used
/// on peer certificates, so it never panics on malformed input.
pub fn cert_names(der: &CertificateDer<'_>) -> Result<CertNames> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    let mut names = CertNames {
        node_names: Vec::new(),
        cluster_id: None,
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Certificate(e.to_string()))?;
    if let Some(san) = san {
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = gn {
                match dns.strip_suffix(CLUSTER_SAN_SUFFIX) {
                    Some(hex) => names.cluster_id = parse_cluster_hex(hex),
                    None => names.node_names.push(dns.to_string()),
                }
            }
        }
    }
    Ok(names)
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_with_mode(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(io)?;
    // `mode` only applies when the file is created; an existing key file
    // with looser permissions is tightened before the secret is written.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let current = f.metadata().map_err(io)?.permissions().mode() & 0o777;
        if current & !mode != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io)?;
        }
    }
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    write_with_mode(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    write_with_mode(path, contents, 0o644)
}
