//! SM2 signatures for rustls: signature scheme sm2sig_sm3 (0x0708) for TLS 1.3
//! CertificateVerify, and SM2-with-SM3 certificate signatures for webpki.
//!
//! The two differ only in the SM2 distinguishing ID hashed into Z (GB/T 32918.2):
//! RFC 8998 §3.2.1 fixes `TLSv1.3+GM+Cipher+Suite` for handshake signatures, while
//! certificates use GM/T 0009's default `1234567812345678` (what OpenSSL and other
//! SM2 CAs sign with). Signatures are DER `SEQUENCE { r, s }` in both places.

use std::sync::Arc;

use ferry_gm::DEFAULT_DISTID;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{
    AlgorithmIdentifier, InvalidSignature, PrivateKeyDer, SignatureVerificationAlgorithm,
    SubjectPublicKeyInfoDer,
};
use rustls::sign::{Signer, SigningKey};
use rustls::{Error, SignatureAlgorithm, SignatureScheme};
use sm2::dsa::signature::{Signer as _, Verifier as _};
use sm2::pkcs8::{DecodePrivateKey, EncodePublicKey};

/// The distinguishing ID of sm2sig_sm3 in TLS 1.3 (RFC 8998 §3.2.1).
pub const TLS13_DISTID: &str = "TLSv1.3+GM+Cipher+Suite";

/// DER contents of the AlgorithmIdentifier of an SM2 public key: id-ecPublicKey
/// (1.2.840.10045.2.1) with the named curve sm2p256v1 (1.2.156.10197.1.301), as
/// GB/T 20518 and RFC 8998 certificates carry it.
pub const SM2_PUBLIC_KEY_ALG_ID: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
    0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d, // sm2p256v1
];

/// DER contents of the AlgorithmIdentifier of SM2-with-SM3 signatures
/// (1.2.156.10197.1.501, no parameters).
pub const SM2_SM3_SIGNATURE_ALG_ID: &[u8] =
    &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75];

/// SM2 has no code in the TLS 1.2 SignatureAlgorithm registry; rustls consults this
/// only for TLS 1.2 suites, which this provider has none of. 0xe0 is private use.
pub const SM2_SIGNATURE_ALGORITHM: SignatureAlgorithm = SignatureAlgorithm::Unknown(0xe0);

/// SM2-with-SM3 verification under one distinguishing ID.
#[derive(Debug)]
pub struct Sm2Sm3Verify {
    distid: &'static str,
}

/// Certificate signatures (default distinguishing ID).
pub static SM2_SM3_CERT: Sm2Sm3Verify = Sm2Sm3Verify {
    distid: DEFAULT_DISTID,
};

/// TLS 1.3 handshake signatures (RFC 8998's distinguishing ID).
pub static SM2_SM3_TLS13: Sm2Sm3Verify = Sm2Sm3Verify {
    distid: TLS13_DISTID,
};

impl SignatureVerificationAlgorithm for Sm2Sm3Verify {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let key = sm2::dsa::VerifyingKey::from_sec1_bytes(self.distid, public_key)
            .map_err(|_| InvalidSignature)?;
        let sig = sm2::dsa::Signature::from_der(signature).map_err(|_| InvalidSignature)?;
        key.verify(message, &sig).map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SM2_PUBLIC_KEY_ALG_ID)
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SM2_SM3_SIGNATURE_ALG_ID)
    }
}

/// What the provider verifies: SM2-with-SM3 certificate chains, and sm2sig_sm3
/// handshake signatures.
pub static SUPPORTED_SIG_ALGS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[&SM2_SM3_CERT],
    mapping: &[(
        SignatureScheme::Unknown(crate::SM2SIG_SM3_ID),
        &[&SM2_SM3_TLS13],
    )],
};

/// Loads SM2 private keys (PKCS#8 or SEC1 DER on curveSM2) for rustls.
#[derive(Debug)]
pub struct Sm2KeyProvider;

impl rustls::crypto::KeyProvider for Sm2KeyProvider {
    fn load_private_key(
        &self,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, Error> {
        Ok(Arc::new(Sm2TlsKey::from_der(&key_der)?))
    }
}

/// An SM2 private key that signs TLS 1.3 handshakes with sm2sig_sm3.
#[derive(Clone)]
pub struct Sm2TlsKey {
    key: sm2::dsa::SigningKey,
}

impl std::fmt::Debug for Sm2TlsKey {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sm2TlsKey").finish_non_exhaustive()
    }
}

impl Sm2TlsKey {
    /// From a PKCS#8 or SEC1 DER private key; anything else (or a key on another
    /// curve) is refused.
    pub fn from_der(key_der: &PrivateKeyDer<'_>) -> Result<Self, Error> {
        let secret = match key_der {
            PrivateKeyDer::Pkcs8(der) => sm2::SecretKey::from_pkcs8_der(der.secret_pkcs8_der())
                .map_err(|e| Error::General(format!("SM2 PKCS#8 private key: {e}")))?,
            PrivateKeyDer::Sec1(der) => sm2::SecretKey::from_sec1_der(der.secret_sec1_der())
                .map_err(|e| Error::General(format!("SM2 SEC1 private key: {e}")))?,
            _ => {
                return Err(Error::General(
                    "SM2 private keys must be PKCS#8 or SEC1".into(),
                ))
            }
        };
        let key = sm2::dsa::SigningKey::new(TLS13_DISTID, &secret)
            .map_err(|_| Error::General("invalid SM2 private key".into()))?;
        Ok(Self { key })
    }
}

impl SigningKey for Sm2TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&crate::sm2sig_sm3())
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        let spki = self.key.verifying_key().to_public_key_der().ok()?;
        Some(SubjectPublicKeyInfoDer::from(spki.as_bytes().to_vec()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SM2_SIGNATURE_ALGORITHM
    }
}

impl Signer for Sm2TlsKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let sig: sm2::dsa::Signature = self
            .key
            .try_sign(message)
            .map_err(|_| Error::General("SM2 signing failed".into()))?;
        Ok(sig.to_der().as_bytes().to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        crate::sm2sig_sm3()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::der;
    use sm2::pkcs8::EncodePrivateKey;

    #[test]
    fn algorithm_identifiers_encode_the_sm2_oids() {
        let mut public = der::oid(&[1, 2, 840, 10045, 2, 1]);
        public.extend(der::oid(&[1, 2, 156, 10197, 1, 301]));
        assert_eq!(SM2_PUBLIC_KEY_ALG_ID, &public[..]);
        assert_eq!(
            SM2_SM3_SIGNATURE_ALG_ID,
            &der::oid(&[1, 2, 156, 10197, 1, 501])[..]
        );
        // RustCrypto's SPKI for an SM2 key carries the same AlgorithmIdentifier.
        let key = sm2::SecretKey::from_slice(&[7; 32]).unwrap();
        let spki = key.public_key().to_public_key_der().unwrap();
        let expected = der::tlv(der::tag::SEQUENCE, SM2_PUBLIC_KEY_ALG_ID);
        assert!(spki
            .as_bytes()
            .windows(expected.len())
            .any(|w| w == expected));
    }

    #[test]
    fn tls_signatures_use_the_rfc8998_distinguishing_id() {
        let secret = sm2::SecretKey::from_slice(&[9; 32]).unwrap();
        let der = secret.to_pkcs8_der().unwrap();
        let key =
            Sm2TlsKey::from_der(&PrivateKeyDer::Pkcs8(der.as_bytes().to_vec().into())).unwrap();
        assert!(key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .is_none());
        let signer = key.choose_scheme(&[crate::sm2sig_sm3()]).unwrap();
        let sig = signer.sign(b"transcript").unwrap();
        let public = secret.public_key().to_sec1_bytes();
        SM2_SM3_TLS13
            .verify_signature(&public, b"transcript", &sig)
            .unwrap();
        assert!(SM2_SM3_CERT
            .verify_signature(&public, b"transcript", &sig)
            .is_err());
        assert!(SM2_SM3_TLS13
            .verify_signature(&public, b"transcripT", &sig)
            .is_err());
    }
}
