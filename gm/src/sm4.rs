//! The SM4 block cipher (GB/T 32907): key schedule and the block interface over the
//! backends.
//!
//! The key schedule runs the S-box through the portable circuit, so it is constant
//! time on every backend.

use crate::backend::{self, Backend};
use crate::portable::sbox_word;
use crate::Error;
use zeroize::Zeroize;

/// System parameter FK.
const FK: [u32; 4] = [0xa3b1_bac6, 0x56aa_3350, 0x677d_9197, 0xb270_22dc];

/// SM4 with an expanded key, bound to one backend. The round keys are wiped on drop.
#[derive(Clone)]
pub struct Sm4 {
    rk_enc: [u32; 32],
    rk_dec: [u32; 32],
    backend: Backend,
}

impl Drop for Sm4 {
    fn drop(&mut self) {
        self.rk_enc.zeroize();
        self.rk_dec.zeroize();
    }
}

impl core::fmt::Debug for Sm4 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print round keys.
        f.debug_struct("Sm4")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Sm4 {
    /// Expands `key` for the process's selected backend ([`Backend::selected`]).
    pub fn new(key: &[u8; 16]) -> Sm4 {
        Sm4::expand(key, Backend::selected())
    }

    /// Expands `key` for `backend`, refused when this CPU lacks its features.
    pub fn with_backend(key: &[u8; 16], backend: Backend) -> Result<Sm4, Error> {
        if !backend.is_available() {
            return Err(Error::BackendUnavailable(backend));
        }
        Ok(Sm4::expand(key, backend))
    }

    fn expand(key: &[u8; 16], backend: Backend) -> Sm4 {
        let rk_enc = key_schedule(key);
        let mut rk_dec = rk_enc;
        rk_dec.reverse();
        Sm4 {
            rk_enc,
            rk_dec,
            backend,
        }
    }

    /// The backend this key runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Encrypts each block in place (ECB: the building block of the modes).
    pub fn encrypt_blocks(&self, blocks: &mut [[u8; 16]]) {
        self.encrypt_bytes(blocks.as_flattened_mut());
    }

    /// Decrypts each block in place.
    pub fn decrypt_blocks(&self, blocks: &mut [[u8; 16]]) {
        backend::crypt_blocks(self.backend, &self.rk_dec, blocks.as_flattened_mut());
    }

    /// Encrypts one block in place.
    pub fn encrypt_block(&self, block: &mut [u8; 16]) {
        self.encrypt_bytes(block);
    }

    /// Decrypts one block in place.
    pub fn decrypt_block(&self, block: &mut [u8; 16]) {
        backend::crypt_blocks(self.backend, &self.rk_dec, block);
    }

    /// XORs the keystream of counter blocks `counter`, `counter` + 1 (in the low 32
    /// bits, wrapping), ... into `data`.
    pub(crate) fn ctr32_xor(&self, counter: u128, data: &mut [u8]) {
        backend::ctr32_xor(self.backend, &self.rk_enc, counter, data);
    }

    /// Encrypts whole blocks held in a byte slice whose length is a multiple of 16.
    pub(crate) fn encrypt_bytes(&self, data: &mut [u8]) {
        backend::crypt_blocks(self.backend, &self.rk_enc, data);
    }
}

/// The 32 round keys: K_i = MK_i ^ FK_i, rk_i = K_{i+4} = K_i ^ T'(K_{i+1} ^ K_{i+2} ^
/// K_{i+3} ^ CK_i) with T' = L' o τ and L'(B) = B ^ (B <<< 13) ^ (B <<< 23).
fn key_schedule(key: &[u8; 16]) -> [u32; 32] {
    let mut k = [0u32; 4];
    for (i, w) in k.iter_mut().enumerate() {
        *w = u32::from_be_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]])
            ^ FK[i];
    }
    let mut rk = [0u32; 32];
    for (i, r) in rk.iter_mut().enumerate() {
        let b = sbox_word(k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ ck(i));
        k[i % 4] ^= b ^ b.rotate_left(13) ^ b.rotate_left(23);
        *r = k[i % 4];
    }
    k.zeroize();
    rk
}

/// CK_i: byte j is (4i + j) * 7 mod 256.
fn ck(i: usize) -> u32 {
    let mut w = 0u32;
    for j in 0..4 {
        w = (w << 8) | (((4 * i + j) * 7) % 256) as u32;
    }
    w
}
