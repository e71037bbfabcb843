//! SM4 in counter mode: a 128-bit big-endian counter ([`Sm4Ctr`], the usual CTR
//! interface), and GCM's 32-bit counter (crate-internal).
//!
//! The SIMD backends build the counter blocks in registers and XOR the keystream in
//! as it leaves the cipher; the portable one encrypts batches of counter blocks in a
//! buffer. Either way every backend runs its full parallel width.

use crate::{Backend, Error, Sm4};
use zeroize::Zeroize;

/// Counter blocks per keystream batch (2 KiB: a multiple of every backend's width).
const KS_BLOCKS: usize = 128;

/// Which counter bits advance.
#[derive(Clone, Copy)]
pub(crate) enum Increment {
    /// The whole block, as a 128-bit big-endian integer.
    Full128,
    /// The last four bytes only (GCM's inc32).
    Low32,
}

impl Increment {
    /// The counter `n` blocks after `c`.
    pub(crate) fn advance(self, c: u128, n: u64) -> u128 {
        match self {
            Increment::Full128 => c.wrapping_add(u128::from(n)),
            Increment::Low32 => (c & !0xffff_ffff) | u128::from((c as u32).wrapping_add(n as u32)),
        }
    }
}

/// XORs the keystream of counter blocks `*counter`, next, ... into `data`; `*counter`
/// ends one past the last block used (a final partial block uses a whole one).
///
/// The backends count in the low 32 bits only; a 128-bit counter is split where
/// those bits wrap, so the carry happens between calls.
pub(crate) fn apply(cipher: &Sm4, counter: &mut u128, inc: Increment, data: &mut [u8]) {
    let mut rest = data;
    while !rest.is_empty() {
        let blocks = rest.len().div_ceil(16) as u64;
        let n = match inc {
            Increment::Low32 => blocks,
            Increment::Full128 => blocks.min((1u64 << 32) - u64::from(*counter as u32)),
        };
        let take = rest.len().min(n as usize * 16);
        let (piece, tail) = rest.split_at_mut(take);
        cipher.ctr32_xor(*counter, piece);
        *counter = inc.advance(*counter, n);
        rest = tail;
    }
}

/// The backend-independent CTR loop (used by the portable backend): counter blocks
/// written to a buffer, encrypted together, XORed in.
pub(crate) fn ctr32_xor_generic(backend: Backend, rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    let mut ks = [0u8; KS_BLOCKS * 16];
    let mut c = counter;
    for chunk in data.chunks_mut(KS_BLOCKS * 16) {
        let blocks = chunk.len().div_ceil(16);
        for block in ks[..blocks * 16].chunks_exact_mut(16) {
            block.copy_from_slice(&c.to_be_bytes());
            c = Increment::Low32.advance(c, 1);
        }
        crate::backend::crypt_blocks(backend, rk, &mut ks[..blocks * 16]);
        for (d, k) in chunk.iter_mut().zip(&ks) {
            *d ^= *k;
        }
    }
    ks.zeroize();
}

/// SM4-CTR with a 128-bit big-endian counter, as a stream cipher: successive calls
/// continue the keystream (byte-compatible with RustCrypto's `Ctr128BE<Sm4>`).
#[derive(Clone, Debug)]
pub struct Sm4Ctr {
    cipher: Sm4,
    counter: u128,
    /// Keystream left over from a partial block, used from `spare_at` on.
    spare: [u8; 16],
    spare_at: usize,
}

impl Drop for Sm4Ctr {
    fn drop(&mut self) {
        self.spare.zeroize();
    }
}

impl Sm4Ctr {
    /// A stream with `key` and initial counter block `iv`, on the selected backend.
    pub fn new(key: &[u8; 16], iv: &[u8; 16]) -> Sm4Ctr {
        Sm4Ctr::from_cipher(Sm4::new(key), iv)
    }

    /// As [`Sm4Ctr::new`] on a chosen backend.
    pub fn with_backend(key: &[u8; 16], iv: &[u8; 16], backend: Backend) -> Result<Sm4Ctr, Error> {
        Ok(Sm4Ctr::from_cipher(Sm4::with_backend(key, backend)?, iv))
    }

    fn from_cipher(cipher: Sm4, iv: &[u8; 16]) -> Sm4Ctr {
        Sm4Ctr {
            cipher,
            counter: u128::from_be_bytes(*iv),
            spare: [0; 16],
            spare_at: 16,
        }
    }

    /// XORs the next `data.len()` keystream bytes into `data` (encrypts or decrypts).
    pub fn apply_keystream(&mut self, data: &mut [u8]) {
        let take = data.len().min(16 - self.spare_at);
        let (head, rest) = data.split_at_mut(take);
        for (d, k) in head.iter_mut().zip(&self.spare[self.spare_at..]) {
            *d ^= *k;
        }
        self.spare_at += take;
        let full = rest.len() - rest.len() % 16;
        let (body, tail) = rest.split_at_mut(full);
        apply(&self.cipher, &mut self.counter, Increment::Full128, body);
        if !tail.is_empty() {
            self.spare = [0; 16];
            apply(
                &self.cipher,
                &mut self.counter,
                Increment::Full128,
                &mut self.spare,
            );
            for (d, k) in tail.iter_mut().zip(&self.spare) {
                *d ^= *k;
            }
            self.spare_at = tail.len();
        }
    }
}
