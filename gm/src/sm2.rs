//! SM2 (GB/T 32918) over curveSM2: signatures with the default distinguishing ID and
//! elliptic-curve Diffie-Hellman, as thin wrappers over RustCrypto's `sm2` and
//! `elliptic-curve` (constant-time scalar multiplication from fiat-crypto field
//! arithmetic).
//!
//! The wrappers fix the choices ferry makes once: the distinguishing ID is the
//! standard's default `1234567812345678`, signatures are the 64-byte r || s form,
//! public keys SEC1 bytes, and signing is deterministic (RFC 6979 style, so no RNG
//! failure can leak the key). The ECDH secret is the x-coordinate of the shared point;
//! it is not the full GB/T 32918.3 key-agreement protocol (no Z values, KDF or
//! confirmation hashes), so feed it to a KDF with both parties' identities.

use crate::Error;
use elliptic_curve::{ecdh, Generate};
use sm2::dsa::signature::{Signer, Verifier};
use sm2::dsa::{Signature, SigningKey, VerifyingKey};
use sm2::{NonZeroScalar, PublicKey, SecretKey};

/// The default distinguishing ID of GB/T 32918 (and GM/T 0009).
pub const DEFAULT_DISTID: &str = "1234567812345678";

/// Length of an SM2 signature (r || s).
pub const SIGNATURE_LEN: usize = 64;

/// An SM2 private signing key bound to [`DEFAULT_DISTID`].
#[derive(Clone)]
pub struct Sm2SigningKey(SigningKey);

impl core::fmt::Debug for Sm2SigningKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm2SigningKey").finish_non_exhaustive()
    }
}

impl Sm2SigningKey {
    /// A new random key from the operating system's RNG.
    pub fn generate() -> Result<Sm2SigningKey, Error> {
        let secret = SecretKey::try_generate().map_err(|_| Error::Rng)?;
        Sm2SigningKey::from_secret(&secret)
    }

    /// The key with this 32-byte big-endian secret scalar (refused if zero or not
    /// below the group order).
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Sm2SigningKey, Error> {
        let secret = SecretKey::from_slice(bytes).map_err(|_| Error::InvalidKey)?;
        Sm2SigningKey::from_secret(&secret)
    }

    fn from_secret(secret: &SecretKey) -> Result<Sm2SigningKey, Error> {
        SigningKey::new(DEFAULT_DISTID, secret)
            .map(Sm2SigningKey)
            .map_err(|_| Error::InvalidKey)
    }

    /// The secret scalar, big-endian (for storing the key; handle as a secret).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes().into()
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> Sm2VerifyingKey {
        Sm2VerifyingKey(self.0.verifying_key().clone())
    }

    /// Signs `msg` (hashed with SM3 after the Z value of the ID and public key).
    pub fn sign(&self, msg: &[u8]) -> Result<[u8; SIGNATURE_LEN], Error> {
        let sig: Signature = self.0.try_sign(msg).map_err(|_| Error::Signature)?;
        Ok(sig.to_bytes().into())
    }
}

/// An SM2 public key for verifying, bound to [`DEFAULT_DISTID`].
#[derive(Clone, Debug)]
pub struct Sm2VerifyingKey(VerifyingKey);

impl Sm2VerifyingKey {
    /// Parses a SEC1 public key (compressed or uncompressed); refused if not a point of
    /// curveSM2.
    pub fn from_sec1_bytes(bytes: &[u8]) -> Result<Sm2VerifyingKey, Error> {
        VerifyingKey::from_sec1_bytes(DEFAULT_DISTID, bytes)
            .map(Sm2VerifyingKey)
            .map_err(|_| Error::InvalidKey)
    }

    /// The uncompressed SEC1 encoding (65 bytes).
    pub fn to_sec1_bytes(&self) -> Vec<u8> {
        self.0.to_sec1_bytes().into_vec()
    }

    /// Checks `signature` over `msg`.
    pub fn verify(&self, msg: &[u8], signature: &[u8; SIGNATURE_LEN]) -> Result<(), Error> {
        let sig = Signature::from_slice(signature).map_err(|_| Error::Signature)?;
        self.0.verify(msg, &sig).map_err(|_| Error::Signature)
    }
}

/// A private key for ECDH on curveSM2.
pub struct Sm2EcdhKey(NonZeroScalar);

impl core::fmt::Debug for Sm2EcdhKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm2EcdhKey").finish_non_exhaustive()
    }
}

impl Sm2EcdhKey {
    /// A new random key from the operating system's RNG.
    pub fn generate() -> Result<Sm2EcdhKey, Error> {
        let secret = SecretKey::try_generate().map_err(|_| Error::Rng)?;
        Ok(Sm2EcdhKey(secret.to_nonzero_scalar()))
    }

    /// Our public key, uncompressed SEC1 (65 bytes), for the peer.
    pub fn public_key_sec1(&self) -> Vec<u8> {
        PublicKey::from_secret_scalar(&self.0)
            .to_sec1_bytes()
            .into_vec()
    }

    /// The shared secret with the peer whose SEC1 public key is `peer`: the
    /// x-coordinate of our scalar times their point. A peer key that is not a point of
    /// curveSM2 (or is the identity) is refused.
    pub fn agree(&self, peer: &[u8]) -> Result<[u8; 32], Error> {
        let peer = PublicKey::from_sec1_bytes(peer).map_err(|_| Error::InvalidKey)?;
        let shared = ecdh::diffie_hellman(self.0, peer.as_affine());
        Ok((*shared.raw_secret_bytes()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_changes() {
        let key = Sm2SigningKey::generate().unwrap();
        let vk = key.verifying_key();
        let sig = key.sign(b"journal segment 7").unwrap();
        vk.verify(b"journal segment 7", &sig).unwrap();
        assert_eq!(vk.verify(b"journal segment 8", &sig), Err(Error::Signature));
        let mut bad = sig;
        bad[10] ^= 1;
        assert_eq!(vk.verify(b"journal segment 7", &bad), Err(Error::Signature));
        let other = Sm2SigningKey::generate().unwrap().verifying_key();
        assert_eq!(
            other.verify(b"journal segment 7", &sig),
            Err(Error::Signature)
        );
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("test hex"))
            .collect()
    }

    /// GM/T 0003.5 (GB/T 32918.5) appendix A: the curveSM2 signature example with the
    /// default ID. Signing there used a fixed nonce; ours is deterministic from the
    /// key, so the example checks key derivation and verification.
    #[test]
    fn standard_example_key_and_signature() {
        let d = unhex("3945208F 7B2144B1 3F36E38A C6D39F95 88939369 2860B51A 42FB81EF 4DF7C5B8");
        let key = Sm2SigningKey::from_bytes(&d.try_into().unwrap()).unwrap();
        let public = unhex(
            "04 09F9DF31 1E5421A1 50DD7D16 1E4BC5C6 72179FAD 1833FC07 6BB08FF3 56F35020
                CCEA490C E26775A5 2DC6EA71 8CC1AA60 0AED05FB F35E084A 6632F607 2DA9AD13",
        );
        assert_eq!(key.verifying_key().to_sec1_bytes(), public);
        let sig: [u8; 64] = unhex(
            "F5A03B06 48D2C463 0EEAC513 E1BB81A1 5944DA38 27D5B741 43AC7EAC EEE720B3
             B1B6AA29 DF212FD8 763182BC 0D421CA1 BB9038FD 1F7F42D4 840B69C4 85BBC1AA",
        )
        .try_into()
        .unwrap();
        let vk = Sm2VerifyingKey::from_sec1_bytes(&public).unwrap();
        vk.verify(b"message digest", &sig).unwrap();
        assert_eq!(vk.verify(b"message digesT", &sig), Err(Error::Signature));
        let ours = key.sign(b"message digest").unwrap();
        vk.verify(b"message digest", &ours).unwrap();
    }

    #[test]
    fn keys_round_trip_through_bytes() {
        let key = Sm2SigningKey::generate().unwrap();
        let again = Sm2SigningKey::from_bytes(&key.to_bytes()).unwrap();
        let sig = again.sign(b"m").unwrap();
        let vk = Sm2VerifyingKey::from_sec1_bytes(&key.verifying_key().to_sec1_bytes()).unwrap();
        vk.verify(b"m", &sig).unwrap();
        assert_eq!(
            Sm2SigningKey::from_bytes(&[0; 32]).unwrap_err(),
            Error::InvalidKey
        );
        assert_eq!(
            Sm2VerifyingKey::from_sec1_bytes(&[4; 65]).unwrap_err(),
            Error::InvalidKey
        );
    }

    #[test]
    fn ecdh_parties_agree_and_strangers_do_not() {
        let a = Sm2EcdhKey::generate().unwrap();
        let b = Sm2EcdhKey::generate().unwrap();
        let c = Sm2EcdhKey::generate().unwrap();
        let ab = a.agree(&b.public_key_sec1()).unwrap();
        assert_eq!(ab, b.agree(&a.public_key_sec1()).unwrap());
        assert_ne!(ab, a.agree(&c.public_key_sec1()).unwrap());
        assert_ne!(ab, [0; 32]);
        let mut off_curve = b.public_key_sec1();
        off_curve[64] ^= 1;
        assert_eq!(a.agree(&off_curve).unwrap_err(), Error::InvalidKey);
    }
}
