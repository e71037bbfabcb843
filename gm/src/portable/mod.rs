//! Portable constant-time SM4: 64 blocks at a time, bitsliced in `u64` words.
//!
//! Bit k of word `slice[w][b]` is bit b of 32-bit word w of block k. SM4's rotations
//! become index permutations, its XORs whole-word XORs, and the S-box the boolean
//! circuit of `circuit.rs`: the sequence of operations is the same for every key and
//! every input, with no table lookup and no branch on data (round-key bits become
//! all-zero/all-one masks by arithmetic). The same circuit, on a single word, drives
//! the key schedule.

mod circuit;

use core::ops::{BitAnd, BitXor, Not};
use zeroize::Zeroize;

/// The lanes the S-box circuit runs on.
pub(crate) trait Word:
    Copy + BitXor<Output = Self> + BitAnd<Output = Self> + Not<Output = Self>
{
}
impl Word for u32 {}
impl Word for u64 {}

/// Blocks per bitsliced batch (one per bit of a `u64`).
pub(crate) const BATCH_BLOCKS: usize = 64;
const BATCH_BYTES: usize = BATCH_BLOCKS * 16;

/// τ, SM4's byte-wise S-box on one word, in constant time: the four bytes become four
/// lanes of the bitsliced circuit.
pub(crate) fn sbox_word(x: u32) -> u32 {
    let mut bits = [0u32; 8];
    for (i, bit) in bits.iter_mut().enumerate() {
        for m in 0..4 {
            *bit |= ((x >> (8 * m + i)) & 1) << m;
        }
    }
    let out = circuit::sbox(&bits);
    let mut y = 0;
    for (i, bit) in out.iter().enumerate() {
        for m in 0..4 {
            y |= ((bit >> m) & 1) << (8 * m + i);
        }
    }
    y
}

/// Encrypts (or, with reversed round keys, decrypts) `data` in place; its length is
/// a multiple of 16. A short last batch is padded in a stack buffer.
pub(crate) fn crypt_blocks(rk: &[u32; 32], data: &mut [u8]) {
    debug_assert_eq!(data.len() % 16, 0);
    let mut masks = round_key_masks(rk);
    let rk = &masks;
    let mut chunks = data.chunks_exact_mut(BATCH_BYTES);
    for chunk in &mut chunks {
        crypt_batch(rk, chunk);
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; BATCH_BYTES];
        buf[..rest.len()].copy_from_slice(rest);
        crypt_batch(rk, &mut buf);
        rest.copy_from_slice(&buf[..rest.len()]);
        buf.zeroize();
    }
    // Expanded key material does not outlive the call on the stack.
    masks.zeroize();
}

/// Bitsliced state: `x[w][b]`, word w (0..4) and bit b (0..32) of all 64 blocks.
type State = [[u64; 32]; 4];

/// Round key bits as bitsliced words: `masks[r][b]` is all ones when bit b of round
/// key r is set (by arithmetic, not a branch), ready to XOR into 64 blocks.
type RoundKeyMasks = [[u64; 32]; 32];

fn round_key_masks(rk: &[u32; 32]) -> RoundKeyMasks {
    core::array::from_fn(|r| {
        core::array::from_fn(|b| 0u64.wrapping_sub(u64::from((rk[r] >> b) & 1)))
    })
}

fn crypt_batch(rk: &RoundKeyMasks, data: &mut [u8]) {
    let mut x = load(data);
    for r in (0..32).step_by(4) {
        // The four words take turns being the one updated, so no data moves.
        round(&mut x, 0, [1, 2, 3], &rk[r]);
        round(&mut x, 1, [2, 3, 0], &rk[r + 1]);
        round(&mut x, 2, [3, 0, 1], &rk[r + 2]);
        round(&mut x, 3, [0, 1, 2], &rk[r + 3]);
    }
    // Output is (X35, X34, X33, X32): the words in reverse order.
    x.reverse();
    store(&x, data);
}

#[inline(always)]
fn round(x: &mut State, dst: usize, src: [usize; 3], rk: &[u64; 32]) {
    let mut t = [0u64; 32];
    for (b, tb) in t.iter_mut().enumerate() {
        *tb = x[src[0]][b] ^ x[src[1]][b] ^ x[src[2]][b] ^ rk[b];
    }
    let mut s = [0u64; 32];
    for m in 0..4 {
        let byte: [u64; 8] = core::array::from_fn(|i| t[8 * m + i]);
        s[8 * m..8 * m + 8].copy_from_slice(&circuit::sbox(&byte));
    }
    // L(B) = B ^ (B <<< 2) ^ (B <<< 10) ^ (B <<< 18) ^ (B <<< 24); bit b of B <<< r is
    // bit b - r of B.
    for b in 0..32 {
        x[dst][b] ^=
            s[b] ^ s[(b + 30) % 32] ^ s[(b + 22) % 32] ^ s[(b + 14) % 32] ^ s[(b + 8) % 32];
    }
}

/// Transposes the batch into bit slices: big-endian words, two 64x64 bit transposes.
fn load(data: &[u8]) -> State {
    let mut lo = [0u64; 64];
    let mut hi = [0u64; 64];
    for (k, block) in data.chunks_exact(16).enumerate() {
        lo[k] = u64::from_be_bytes(block[..8].try_into().expect("8 bytes"));
        hi[k] = u64::from_be_bytes(block[8..].try_into().expect("8 bytes"));
    }
    transpose64(&mut lo);
    transpose64(&mut hi);
    let mut x = [[0u64; 32]; 4];
    // Row b of a transposed matrix is bit b of every block's u64: bits 32..64 are the
    // first word, bits 0..32 the second.
    x[0].copy_from_slice(&lo[32..]);
    x[1].copy_from_slice(&lo[..32]);
    x[2].copy_from_slice(&hi[32..]);
    x[3].copy_from_slice(&hi[..32]);
    x
}

fn store(x: &State, data: &mut [u8]) {
    let mut lo = [0u64; 64];
    let mut hi = [0u64; 64];
    lo[32..].copy_from_slice(&x[0]);
    lo[..32].copy_from_slice(&x[1]);
    hi[32..].copy_from_slice(&x[2]);
    hi[..32].copy_from_slice(&x[3]);
    transpose64(&mut lo);
    transpose64(&mut hi);
    for (k, block) in data.chunks_exact_mut(16).enumerate() {
        block[..8].copy_from_slice(&lo[k].to_be_bytes());
        block[8..].copy_from_slice(&hi[k].to_be_bytes());
    }
}

/// In-place transpose of a 64x64 bit matrix: afterwards bit k of `a[i]` is what bit i
/// of `a[k]` was. Six rounds of swapping ever smaller sub-blocks.
fn transpose64(a: &mut [u64; 64]) {
    let mut j = 32;
    let mut m: u64 = 0x0000_0000_FFFF_FFFF;
    while j != 0 {
        let mut k = 0;
        while k < 64 {
            let t = ((a[k] >> j) ^ a[k + j]) & m;
            a[k + j] ^= t;
            a[k] ^= t << j;
            k = (k + j + 1) & !j;
        }
        j >>= 1;
        m ^= m << j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::SBOX;

    #[test]
    fn circuit_matches_the_sbox_table_on_every_byte() {
        for x in 0..=255u32 {
            let word = x | (x << 8) | (x << 16) | (x << 24);
            let s = u32::from(SBOX[x as usize]);
            assert_eq!(
                sbox_word(word),
                s | (s << 8) | (s << 16) | (s << 24),
                "x = {x:#x}"
            );
        }
    }

    #[test]
    fn transpose64_is_a_transpose() {
        let mut a = [0u64; 64];
        let mut seed = 0x1234_5678_9abc_def0u64;
        for v in a.iter_mut() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *v = seed;
        }
        let mut t = a;
        transpose64(&mut t);
        for (i, ti) in t.iter().enumerate() {
            for (k, ak) in a.iter().enumerate() {
                assert_eq!((ti >> k) & 1, (ak >> i) & 1);
            }
        }
    }
}
