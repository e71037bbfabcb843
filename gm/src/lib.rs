//! ferry-gm: the Chinese national (GM/T, "guomi") algorithms ferry needs, on their own:
//! SM4 (GB/T 32907) in constant time with SIMD backends chosen at run time, SM4-CTR,
//! SM4-GCM (RFC 8998), SM3 and SM2 signatures and key exchange, and the at-rest
//! key scheme built on them ([`atrest`]: key file, wrapped data keys, nonce rule).
//!
//! SM4 never looks up a table with secret data: the portable backend is bitsliced,
//! the x86-64 backends compute the S-box with GFNI or AES-NI instructions. See the
//! crate README for the constant-time argument per backend and measured speeds.
//!
//! ```
//! use ferry_gm::Sm4Gcm;
//! let gcm = Sm4Gcm::new(&[7; 16]);
//! let mut msg = *b"block 42 of the journal";
//! let tag = gcm.seal_in_place(&[1; 12], b"header", &mut msg).unwrap();
//! gcm.open_in_place(&[1; 12], b"header", &mut msg, &tag).unwrap();
//! assert_eq!(&msg, b"block 42 of the journal");
//! ```

// unsafe is confined to the x86 SIMD module (target_feature calls, unaligned loads).
#![deny(unsafe_code)]

pub mod atrest;
mod backend;
mod ctr;
mod gcm;
mod ghash;
mod portable;
#[cfg(test)]
mod reference;
mod sm2;
mod sm3;
mod sm4;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

pub use backend::{Backend, BACKEND_ENV};
pub use ctr::Sm4Ctr;
pub use gcm::{Sm4Gcm, MAX_PLAINTEXT_LEN, NONCE_LEN, TAG_LEN};
pub use sm2::{Sm2EcdhKey, Sm2SigningKey, Sm2VerifyingKey, DEFAULT_DISTID, SIGNATURE_LEN};
pub use sm3::{sm3_digest, Digest, Sm3};
pub use sm4::Sm4;

/// What can go wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CPU lacks a feature the requested backend needs.
    #[error("SM4 backend {} is not available on this CPU", .0.name())]
    BackendUnavailable(Backend),
    /// The tag does not match: wrong key, nonce, AAD, ciphertext or tag.
    #[error("authentication failed")]
    Authentication,
    /// Plaintext or AAD longer than GCM allows.
    #[error("message too long for GCM")]
    TooLong,
    /// An SM2 private or public key that is not valid for curveSM2.
    #[error("invalid SM2 key")]
    InvalidKey,
    /// An SM2 signature that does not verify (or could not be made).
    #[error("SM2 signature invalid")]
    Signature,
    /// The operating system's random number generator failed.
    #[error("system random number generator failed")]
    Rng,
}
