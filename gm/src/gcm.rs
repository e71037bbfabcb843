//! SM4-GCM (NIST SP 800-38D with SM4, as in RFC 8998): 12-byte nonces, 16-byte tags.
//!
//! Sealing encrypts and hashes 4 KiB at a time so the ciphertext is hashed while in
//! cache. Messages up to 4 KiB take E(J0) from the same keystream pass as their
//! counter blocks. Opening hashes the whole ciphertext and checks the tag (in constant time)
//! before decrypting anything, so a refused message leaves the buffer as it was.

use crate::ctr::{self, Increment};
use crate::ghash::{Ghash, GhashBackend, GhashKey};
use crate::{Backend, Error, Sm4};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// Tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Longest plaintext GCM allows: 2^39 - 256 bits.
pub const MAX_PLAINTEXT_LEN: u64 = (1 << 36) - 32;
/// Longest AAD whose bit length fits GCM's 64-bit length field.
const MAX_AAD_LEN: u64 = (1 << 61) - 1;
/// Bytes encrypted then hashed per step while sealing.
const STEP: usize = 4096;
/// Messages up to this long (QUIC packets, journal records) get E(J0) from the same
/// keystream pass as their counter blocks (see `seal_small`).
const SMALL: usize = 4096;

/// An SM4-GCM key.
#[derive(Clone)]
pub struct Sm4Gcm {
    cipher: Sm4,
    ghash: GhashKey,
}

impl core::fmt::Debug for Sm4Gcm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm4Gcm")
            .field("backend", &self.cipher.backend())
            .field("ghash", &self.ghash.backend())
            .finish_non_exhaustive()
    }
}

impl Sm4Gcm {
    /// A key on the process's selected backend.
    pub fn new(key: &[u8; 16]) -> Sm4Gcm {
        Sm4Gcm::from_cipher(Sm4::new(key))
    }

    /// A key on a chosen backend (GHASH follows it: carry-less multiply instructions
    /// for the SIMD backends, the portable multiplier for [`Backend::Portable`]).
    pub fn with_backend(key: &[u8; 16], backend: Backend) -> Result<Sm4Gcm, Error> {
        Ok(Sm4Gcm::from_cipher(Sm4::with_backend(key, backend)?))
    }

    fn from_cipher(cipher: Sm4) -> Sm4Gcm {
        let mut h = [0u8; 16];
        cipher.encrypt_block(&mut h);
        let ghash = GhashKey::new(&h, GhashBackend::for_backend(cipher.backend()));
        h.zeroize();
        Sm4Gcm { cipher, ghash }
    }

    /// The SM4 backend in use.
    pub fn backend(&self) -> Backend {
        self.cipher.backend()
    }

    /// Encrypts `buf` in place and returns the tag over `aad` and the ciphertext.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Error> {
        check_lengths(aad, buf)?;
        let j0 = j0(nonce);
        if buf.len() <= SMALL {
            return Ok(self.seal_small(j0, aad, buf));
        }
        let mut counter = Increment::Low32.advance(j0, 1);
        let mut ghash = Ghash::new(&self.ghash);
        ghash.update_padded(aad);
        for step in buf.chunks_mut(STEP) {
            ctr::apply(&self.cipher, &mut counter, Increment::Low32, step);
            ghash.update_padded(step);
        }
        Ok(self.tag(j0, ghash, aad.len(), buf.len()))
    }

    /// Checks `tag` over `aad` and the ciphertext in `buf`, then decrypts `buf` in
    /// place. On [`Error::Authentication`] `buf` is unchanged.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Error> {
        check_lengths(aad, buf)?;
        let j0 = j0(nonce);
        if buf.len() <= SMALL {
            return self.open_small(j0, aad, buf, tag);
        }
        let mut ghash = Ghash::new(&self.ghash);
        ghash.update_padded(aad);
        ghash.update_padded(buf);
        let expected = self.tag(j0, ghash, aad.len(), buf.len());
        if !bool::from(expected.ct_eq(tag)) {
            return Err(Error::Authentication);
        }
        let mut counter = Increment::Low32.advance(j0, 1);
        ctr::apply(&self.cipher, &mut counter, Increment::Low32, buf);
        Ok(())
    }

    /// Sealing a short message: one keystream pass over counter blocks J0, J0 + 1,
    /// ... gives E(J0) for the tag along with the message's keystream. Encrypting J0
    /// on its own would cost a whole pass of the backend's round latency (as much as
    /// 16-64 blocks), which for a 1.2-1.5 KB QUIC packet is a third of the work.
    fn seal_small(&self, j0: u128, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let mut ks = [0u8; TAG_LEN + SMALL];
        let ks = &mut ks[..TAG_LEN + buf.len()];
        self.cipher.ctr32_xor(j0, ks);
        let (mask, stream) = ks.split_at(TAG_LEN);
        for (b, k) in buf.iter_mut().zip(stream) {
            *b ^= k;
        }
        let mut ghash = Ghash::new(&self.ghash);
        ghash.update_padded(aad);
        ghash.update_padded(buf);
        let tag = masked_tag(mask, ghash, aad.len(), buf.len());
        ks.zeroize();
        tag
    }

    /// Opening a short message: the tag is checked before the keystream (computed in
    /// the same single pass as E(J0)) touches `buf`.
    fn open_small(
        &self,
        j0: u128,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Error> {
        let mut ghash = Ghash::new(&self.ghash);
        ghash.update_padded(aad);
        ghash.update_padded(buf);
        let mut ks = [0u8; TAG_LEN + SMALL];
        let ks = &mut ks[..TAG_LEN + buf.len()];
        self.cipher.ctr32_xor(j0, ks);
        let (mask, stream) = ks.split_at(TAG_LEN);
        let expected = masked_tag(mask, ghash, aad.len(), buf.len());
        let ok = bool::from(expected.ct_eq(tag));
        if ok {
            for (b, k) in buf.iter_mut().zip(stream) {
                *b ^= k;
            }
        }
        ks.zeroize();
        if ok {
            Ok(())
        } else {
            Err(Error::Authentication)
        }
    }

    /// E(J0) ^ GHASH.
    fn tag(&self, j0: u128, ghash: Ghash<'_>, aad_len: usize, ct_len: usize) -> [u8; TAG_LEN] {
        let s = ghash.finalize(aad_len as u64, ct_len as u64);
        let mut tag = j0.to_be_bytes();
        self.cipher.encrypt_block(&mut tag);
        for (t, s) in tag.iter_mut().zip(s) {
            *t ^= s;
        }
        tag
    }
}

/// `mask` (E(J0)) ^ GHASH.
fn masked_tag(mask: &[u8], ghash: Ghash<'_>, aad_len: usize, ct_len: usize) -> [u8; TAG_LEN] {
    let s = ghash.finalize(aad_len as u64, ct_len as u64);
    let mut tag = [0u8; TAG_LEN];
    for ((t, m), s) in tag.iter_mut().zip(mask).zip(s) {
        *t = m ^ s;
    }
    tag
}

fn check_lengths(aad: &[u8], buf: &[u8]) -> Result<(), Error> {
    if buf.len() as u64 > MAX_PLAINTEXT_LEN || aad.len() as u64 > MAX_AAD_LEN {
        return Err(Error::TooLong);
    }
    Ok(())
}

/// J0 = nonce || 0^31 || 1 for 96-bit nonces.
fn j0(nonce: &[u8; NONCE_LEN]) -> u128 {
    let mut b = [0u8; 16];
    b[..NONCE_LEN].copy_from_slice(nonce);
    b[15] = 1;
    u128::from_be_bytes(b)
}

/// RustCrypto's AEAD interface (`aead` 0.6), so `Sm4Gcm` drops in where generic AEAD
/// code is used. Keys come from [`Backend::selected`].
impl aead::AeadCore for Sm4Gcm {
    type NonceSize = aead::consts::U12;
    type TagSize = aead::consts::U16;
    const TAG_POSITION: aead::TagPosition = aead::TagPosition::Postfix;
}

impl aead::KeySizeUser for Sm4Gcm {
    type KeySize = aead::consts::U16;
}

impl aead::KeyInit for Sm4Gcm {
    fn new(key: &aead::Key<Self>) -> Self {
        Sm4Gcm::new(&(*key).into())
    }
}

impl aead::AeadInOut for Sm4Gcm {
    fn encrypt_inout_detached(
        &self,
        nonce: &aead::Nonce<Self>,
        associated_data: &[u8],
        buffer: aead::inout::InOutBuf<'_, '_, u8>,
    ) -> aead::Result<aead::Tag<Self>> {
        let nonce: [u8; NONCE_LEN] = (*nonce).into();
        let buf = buffer.into_out_with_copied_in();
        let tag = self
            .seal_in_place(&nonce, associated_data, buf)
            .map_err(|_| aead::Error)?;
        Ok(tag.into())
    }

    /// On a refused tag the output holds the (copied) ciphertext, never plaintext.
    fn decrypt_inout_detached(
        &self,
        nonce: &aead::Nonce<Self>,
        associated_data: &[u8],
        buffer: aead::inout::InOutBuf<'_, '_, u8>,
        tag: &aead::Tag<Self>,
    ) -> aead::Result<()> {
        let nonce: [u8; NONCE_LEN] = (*nonce).into();
        let tag: [u8; TAG_LEN] = (*tag).into();
        let buf = buffer.into_out_with_copied_in();
        self.open_in_place(&nonce, associated_data, buf, &tag)
            .map_err(|_| aead::Error)
    }
}
