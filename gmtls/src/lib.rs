//! ferry-gmtls: TLS 1.3 with the Chinese national (SM) cipher suites of RFC 8998 as
//! a rustls [`CryptoProvider`], usable by quinn for QUIC, plus SM2 certificates.
//!
//! What the provider holds, and nothing else (a gm cluster speaks only gm):
//!
//! * cipher suite `TLS_SM4_GCM_SM3` (0x00C6): SM4-GCM records, HKDF over HMAC-SM3,
//!   and QUIC packet protection with SM4-GCM and header protection with SM4 in
//!   ECB mode, exactly as RFC 9001 §5.4.3 does with AES ([`quic`]);
//! * key exchange group `curveSM2` (0x0029): ECDHE on the SM2 curve ([`kx`]);
//! * signature scheme `sm2sig_sm3` (0x0708) for signing and verifying handshakes, and
//!   SM2-with-SM3 certificate signatures for webpki ([`sign`]);
//! * the operating system's random number generator.
//!
//! [`cert`] issues SM2 cluster CAs and node certificates with the same names as
//! ferry-transport's ECDSA PKI, so its peer checks work unchanged.
//!
//! QUIC Initial packets are always protected with AES-128-GCM (RFC 9001 §5.2)
//! whatever the negotiated suite: quinn needs that suite from a standard provider,
//! see [`quic::initial_suite`].
//!
//! The SM primitives (SM4, SM4-GCM, SM3, SM2 ECDH) are ferry-gm's; SM2 signatures use
//! RustCrypto's `sm2` directly because TLS 1.3 needs a different distinguishing ID
//! from the one certificates use.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, GetRandomFailed, SecureRandom};
use rustls::{CipherSuite, NamedGroup, SignatureScheme, SupportedCipherSuite};

pub mod aead;
pub mod cert;
mod der;
pub mod hash;
pub mod kx;
pub mod quic;
pub mod sign;

/// TLS_SM4_GCM_SM3 (RFC 8998 §2).
pub const TLS_SM4_GCM_SM3_ID: u16 = 0x00c6;
/// sm2sig_sm3 (RFC 8998 §2).
pub const SM2SIG_SM3_ID: u16 = 0x0708;
/// curveSM2 (RFC 8998 §2).
pub const CURVE_SM2_ID: u16 = 0x0029;

/// The suite as rustls names it (rustls has no constant of its own for it).
pub fn tls_sm4_gcm_sm3() -> CipherSuite {
    CipherSuite::from(TLS_SM4_GCM_SM3_ID)
}

/// The signature scheme as rustls names it.
pub fn sm2sig_sm3() -> SignatureScheme {
    SignatureScheme::from(SM2SIG_SM3_ID)
}

/// The key exchange group as rustls names it.
pub fn curve_sm2() -> NamedGroup {
    NamedGroup::from(CURVE_SM2_ID)
}

/// TLS_SM4_GCM_SM3, with QUIC support.
pub static TLS13_SM4_GCM_SM3: SupportedCipherSuite =
    SupportedCipherSuite::Tls13(&aead::TLS13_SM4_GCM_SM3_SUITE);

/// The gm provider: only TLS_SM4_GCM_SM3, curveSM2 and sm2sig_sm3.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: vec![TLS13_SM4_GCM_SM3],
        kx_groups: vec![&kx::CURVE_SM2],
        signature_verification_algorithms: sign::SUPPORTED_SIG_ALGS,
        secure_random: &OsRandom,
        key_provider: &sign::Sm2KeyProvider,
    }
}

/// [`provider`] behind an `Arc`, as rustls's config builders take it.
pub fn provider_arc() -> Arc<CryptoProvider> {
    Arc::new(provider())
}

/// The operating system's RNG (getrandom), the same source ferry-gm's keys use.
#[derive(Debug)]
struct OsRandom;

impl SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        getrandom::getrandom(buf).map_err(|_| GetRandomFailed)
    }
}
