//! SM4 on AVX-512 + GFNI: 16 blocks per zmm word set, four sets interleaved.
//!
//! The blocks are transposed so that zmm register w holds word w of 16 blocks; a round
//! is then a dozen instructions on whole registers, the S-box two GFNI affine
//! instructions (GF2P8AFFINEQB for SM4's input affine map into the AES field,
//! GF2P8AFFINEINVQB for the inversion and the output affine map).

use super::{GFNI_POST, GFNI_POST_C, GFNI_PRE, GFNI_PRE_C};
use core::arch::x86_64::*;

/// Independent 16-block groups in flight, to hide the GFNI latency.
const GROUPS: usize = 4;
const GROUP_BYTES: usize = 256;

/// Encrypts `data` (a multiple of 16 bytes) in place.
///
/// # Safety
/// The CPU supports avx512f, avx512bw, avx512vl and gfni.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
pub(super) unsafe fn crypt_blocks(rk: &[u32; 32], data: &mut [u8]) {
    let mut wide = data.chunks_exact_mut(GROUPS * GROUP_BYTES);
    for chunk in &mut wide {
        crypt_groups::<GROUPS>(rk, chunk);
    }
    let rest = wide.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; GROUPS * GROUP_BYTES];
        let groups = rest.len().div_ceil(GROUP_BYTES);
        let buf = &mut buf[..groups * GROUP_BYTES];
        buf[..rest.len()].copy_from_slice(rest);
        match groups {
            1 => crypt_groups::<1>(rk, buf),
            2 => crypt_groups::<2>(rk, buf),
            3 => crypt_groups::<3>(rk, buf),
            _ => crypt_groups::<GROUPS>(rk, buf),
        }
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

/// 32 rounds on `G` groups of 16 blocks; `chunk` is exactly `G * 256` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
fn crypt_groups<const G: usize>(rk: &[u32; 32], chunk: &mut [u8]) {
    assert_eq!(chunk.len(), G * GROUP_BYTES);
    let mut x = [[_mm512_setzero_si512(); 4]; G];
    for (g, words) in x.iter_mut().enumerate() {
        let mut v = [_mm512_setzero_si512(); 4];
        for (j, vj) in v.iter_mut().enumerate() {
            let at = g * GROUP_BYTES + 64 * j;
            // SAFETY: at + 64 <= chunk.len() (asserted above); unaligned load.
            *vj = byteswap(unsafe { _mm512_loadu_si512(chunk[at..at + 64].as_ptr().cast()) });
        }
        *words = transpose(v);
    }
    let out = encrypt_words(rk, x);
    for (g, v) in out.iter().enumerate() {
        for (j, vj) in v.iter().enumerate() {
            let at = g * GROUP_BYTES + 64 * j;
            // SAFETY: at + 64 <= chunk.len(); unaligned store.
            unsafe { _mm512_storeu_si512(chunk[at..at + 64].as_mut_ptr().cast(), *vj) };
        }
    }
}

/// XORs into `data` the keystream of counter blocks `prefix || ctr`, `prefix ||
/// ctr + 1`, ... (32-bit counter, wrapping), for GCM and (between carries) CTR.
///
/// # Safety
/// The CPU supports avx512f, avx512bw, avx512vl and gfni.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
pub(super) unsafe fn ctr32_xor(rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    let mut ctr = counter as u32;
    let mut wide = data.chunks_exact_mut(GROUPS * GROUP_BYTES);
    for chunk in &mut wide {
        ctr32_groups::<GROUPS>(rk, counter, ctr, chunk);
        ctr = ctr.wrapping_add((GROUPS * 16) as u32);
    }
    let rest = wide.into_remainder();
    if !rest.is_empty() {
        // The last one to four groups (the last one partial, padded) in one
        // interleaved pass: a packet-sized message's tail then costs one pass of the
        // round latency instead of one per group.
        let mut buf = [0u8; GROUPS * GROUP_BYTES];
        let groups = rest.len().div_ceil(GROUP_BYTES);
        let buf = &mut buf[..groups * GROUP_BYTES];
        buf[..rest.len()].copy_from_slice(rest);
        match groups {
            1 => ctr32_groups::<1>(rk, counter, ctr, buf),
            2 => ctr32_groups::<2>(rk, counter, ctr, buf),
            3 => ctr32_groups::<3>(rk, counter, ctr, buf),
            _ => ctr32_groups::<GROUPS>(rk, counter, ctr, buf),
        }
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}

/// The counter blocks are built directly in transposed form: three words are the
/// same in every block, the fourth counts. Register dword 4L + p holds block 4p + L
/// (see `transpose`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
fn ctr32_groups<const G: usize>(rk: &[u32; 32], counter: u128, ctr: u32, chunk: &mut [u8]) {
    assert_eq!(chunk.len(), G * GROUP_BYTES);
    let offsets = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    let word = |w: u32| _mm512_set1_epi32((counter >> (96 - 32 * w)) as u32 as i32);
    let mut x = [[_mm512_setzero_si512(); 4]; G];
    for (g, words) in x.iter_mut().enumerate() {
        let base = _mm512_set1_epi32(ctr.wrapping_add(16 * g as u32) as i32);
        *words = [word(0), word(1), word(2), _mm512_add_epi32(base, offsets)];
    }
    let out = encrypt_words(rk, x);
    for (g, v) in out.iter().enumerate() {
        for (j, vj) in v.iter().enumerate() {
            let at = g * GROUP_BYTES + 64 * j;
            let p = chunk[at..at + 64].as_mut_ptr();
            // SAFETY: at + 64 <= chunk.len() (asserted above); unaligned load and store.
            unsafe {
                _mm512_storeu_si512(
                    p.cast(),
                    _mm512_xor_si512(*vj, _mm512_loadu_si512(p.cast())),
                )
            };
        }
    }
}

/// The 32 rounds on transposed words; returns the output blocks in memory order
/// (transposed back and byte-swapped), four registers per group.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
fn encrypt_words<const G: usize>(rk: &[u32; 32], mut x: [[__m512i; 4]; G]) -> [[__m512i; 4]; G] {
    for &k in rk {
        let k = _mm512_set1_epi32(k as i32);
        for words in x.iter_mut() {
            let [x0, x1, x2, x3] = *words;
            *words = [x1, x2, x3, round(x0, x1, x2, x3, k)];
        }
    }
    for words in x.iter_mut() {
        // Output is (X35, X34, X33, X32).
        words.reverse();
        *words = transpose(*words).map(|v| byteswap(v));
    }
    x
}

/// X0 ^ L(τ(X1 ^ X2 ^ X3 ^ rk)).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
fn round(x0: __m512i, x1: __m512i, x2: __m512i, x3: __m512i, k: __m512i) -> __m512i {
    let t = _mm512_xor_si512(_mm512_ternarylogic_epi32::<0x96>(x1, x2, x3), k);
    let t = _mm512_gf2p8affine_epi64_epi8::<GFNI_PRE_C>(t, _mm512_set1_epi64(GFNI_PRE));
    let t = _mm512_gf2p8affineinv_epi64_epi8::<GFNI_POST_C>(t, _mm512_set1_epi64(GFNI_POST));
    let a = _mm512_ternarylogic_epi32::<0x96>(x0, t, _mm512_rol_epi32::<2>(t));
    let b =
        _mm512_ternarylogic_epi32::<0x96>(a, _mm512_rol_epi32::<10>(t), _mm512_rol_epi32::<18>(t));
    _mm512_xor_si512(b, _mm512_rol_epi32::<24>(t))
}

/// SM4 words are big-endian: reverse the bytes of every 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
fn byteswap(v: __m512i) -> __m512i {
    let m = _mm512_broadcast_i32x4(_mm_set_epi8(
        12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
    ));
    _mm512_shuffle_epi8(v, m)
}

/// 4x4 transpose of 32-bit words inside every 128-bit lane: four registers of four
/// blocks each become four registers of one word each (and back: it is an involution).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
fn transpose([a, b, c, d]: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_unpacklo_epi32(a, b);
    let t1 = _mm512_unpacklo_epi32(c, d);
    let t2 = _mm512_unpackhi_epi32(a, b);
    let t3 = _mm512_unpackhi_epi32(c, d);
    [
        _mm512_unpacklo_epi64(t0, t1),
        _mm512_unpackhi_epi64(t0, t1),
        _mm512_unpacklo_epi64(t2, t3),
        _mm512_unpackhi_epi64(t2, t3),
    ]
}
