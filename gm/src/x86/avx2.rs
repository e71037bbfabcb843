//! SM4 on AVX2: 8 blocks per ymm word set, four sets interleaved. One skeleton, three
//! S-boxes: GFNI affine instructions, or AESENCLAST (128-bit AES-NI or 256-bit VAES)
//! between two PSHUFB-evaluated affine maps, for AVX2 CPUs without GFNI.
//!
//! AVX2 has no 32-bit rotate, so L uses L(t) = t ^ (t <<< 24) ^ ((t ^ (t <<< 8) ^
//! (t <<< 16)) <<< 2), the byte rotations done by PSHUFB.

use core::arch::x86_64::*;

/// Independent 8-block groups in flight: the round is latency-bound, and 4 measured
/// faster than 2 (+30%) and no slower than 6.
const GROUPS: usize = 4;
const GROUP_BYTES: usize = 128;

/// Defines `crypt_blocks` for one S-box; `$features` are the target features, `$sbox`
/// the S-box function (defined with the same features).
macro_rules! avx2_sm4 {
    ($features:literal, $sbox:ident) => {
        /// Encrypts `data` (a multiple of 16 bytes) in place.
        ///
        /// # Safety
        /// The CPU supports every feature in the `target_feature` list.
        #[target_feature(enable = $features)]
        pub(in crate::x86) unsafe fn crypt_blocks(rk: &[u32; 32], data: &mut [u8]) {
            let mut wide = data.chunks_exact_mut(GROUPS * GROUP_BYTES);
            for chunk in &mut wide {
                crypt_groups::<GROUPS>(rk, chunk);
            }
            let mut single = wide.into_remainder().chunks_exact_mut(GROUP_BYTES);
            for chunk in &mut single {
                crypt_groups::<1>(rk, chunk);
            }
            let rest = single.into_remainder();
            if !rest.is_empty() {
                let mut buf = [0u8; GROUP_BYTES];
                buf[..rest.len()].copy_from_slice(rest);
                crypt_groups::<1>(rk, &mut buf);
                rest.copy_from_slice(&buf[..rest.len()]);
            }
        }

        /// 32 rounds on `G` groups of 8 blocks; `chunk` is exactly `G * 128` bytes.
        #[target_feature(enable = $features)]
        fn crypt_groups<const G: usize>(rk: &[u32; 32], chunk: &mut [u8]) {
            assert_eq!(chunk.len(), G * GROUP_BYTES);
            let mut x = [[_mm256_setzero_si256(); 4]; G];
            for (g, words) in x.iter_mut().enumerate() {
                let mut v = [_mm256_setzero_si256(); 4];
                for (j, vj) in v.iter_mut().enumerate() {
                    let at = g * GROUP_BYTES + 32 * j;
                    // SAFETY: at + 32 <= chunk.len() (asserted above); unaligned load.
                    let raw = unsafe { _mm256_loadu_si256(chunk[at..at + 32].as_ptr().cast()) };
                    *vj = _mm256_shuffle_epi8(raw, shuffle(BSWAP32));
                }
                *words = transpose(v);
            }
            let out = encrypt_words(rk, x);
            for (g, v) in out.iter().enumerate() {
                for (j, vj) in v.iter().enumerate() {
                    let at = g * GROUP_BYTES + 32 * j;
                    // SAFETY: at + 32 <= chunk.len(); unaligned store.
                    unsafe { _mm256_storeu_si256(chunk[at..at + 32].as_mut_ptr().cast(), *vj) };
                }
            }
        }

        /// XORs into `data` the keystream of counter blocks `prefix || ctr`, `prefix
        /// || ctr + 1`, ... (32-bit counter, wrapping).
        ///
        /// # Safety
        /// The CPU supports every feature in the `target_feature` list.
        #[target_feature(enable = $features)]
        pub(in crate::x86) unsafe fn ctr32_xor(rk: &[u32; 32], counter: u128, data: &mut [u8]) {
            let mut ctr = counter as u32;
            let mut wide = data.chunks_exact_mut(GROUPS * GROUP_BYTES);
            for chunk in &mut wide {
                ctr32_groups::<GROUPS>(rk, counter, ctr, chunk);
                ctr = ctr.wrapping_add((GROUPS * 8) as u32);
            }
            for chunk in wide.into_remainder().chunks_mut(GROUP_BYTES) {
                if chunk.len() == GROUP_BYTES {
                    ctr32_groups::<1>(rk, counter, ctr, chunk);
                } else {
                    let mut buf = [0u8; GROUP_BYTES];
                    buf[..chunk.len()].copy_from_slice(chunk);
                    ctr32_groups::<1>(rk, counter, ctr, &mut buf);
                    chunk.copy_from_slice(&buf[..chunk.len()]);
                }
                ctr = ctr.wrapping_add(8);
            }
        }

        /// Counter blocks built in transposed form: register dword 4L + p holds block
        /// 2p + L.
        #[target_feature(enable = $features)]
        fn ctr32_groups<const G: usize>(rk: &[u32; 32], counter: u128, ctr: u32, chunk: &mut [u8]) {
            assert_eq!(chunk.len(), G * GROUP_BYTES);
            let offsets = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
            let word = |w: u32| _mm256_set1_epi32((counter >> (96 - 32 * w)) as u32 as i32);
            let mut x = [[_mm256_setzero_si256(); 4]; G];
            for (g, words) in x.iter_mut().enumerate() {
                let base = _mm256_set1_epi32(ctr.wrapping_add(8 * g as u32) as i32);
                *words = [word(0), word(1), word(2), _mm256_add_epi32(base, offsets)];
            }
            let out = encrypt_words(rk, x);
            for (g, v) in out.iter().enumerate() {
                for (j, vj) in v.iter().enumerate() {
                    let at = g * GROUP_BYTES + 32 * j;
                    let p = chunk[at..at + 32].as_mut_ptr();
                    // SAFETY: at + 32 <= chunk.len() (asserted above); unaligned load
                    // and store.
                    unsafe {
                        _mm256_storeu_si256(
                            p.cast(),
                            _mm256_xor_si256(*vj, _mm256_loadu_si256(p.cast())),
                        )
                    };
                }
            }
        }

        /// The 32 rounds on transposed words; returns the output blocks in memory
        /// order (transposed back and byte-swapped).
        #[inline]
        #[target_feature(enable = $features)]
        fn encrypt_words<const G: usize>(
            rk: &[u32; 32],
            mut x: [[__m256i; 4]; G],
        ) -> [[__m256i; 4]; G] {
            for &k in rk {
                let k = _mm256_set1_epi32(k as i32);
                for words in x.iter_mut() {
                    let [x0, x1, x2, x3] = *words;
                    let t = $sbox(_mm256_xor_si256(
                        _mm256_xor_si256(x1, x2),
                        _mm256_xor_si256(x3, k),
                    ));
                    *words = [x1, x2, x3, _mm256_xor_si256(x0, linear(t))];
                }
            }
            for words in x.iter_mut() {
                // Output is (X35, X34, X33, X32).
                words.reverse();
                *words = transpose(*words).map(|v| _mm256_shuffle_epi8(v, shuffle(BSWAP32)));
            }
            x
        }

        /// L, SM4's linear layer, on every 32-bit lane.
        #[inline]
        #[target_feature(enable = $features)]
        fn linear(t: __m256i) -> __m256i {
            let r8 = _mm256_shuffle_epi8(t, shuffle(ROL8));
            let r16 = _mm256_shuffle_epi8(t, shuffle(ROL16));
            let r24 = _mm256_shuffle_epi8(t, shuffle(ROL24));
            let u = _mm256_xor_si256(t, _mm256_xor_si256(r8, r16));
            let rol2 = _mm256_or_si256(_mm256_slli_epi32::<2>(u), _mm256_srli_epi32::<30>(u));
            _mm256_xor_si256(_mm256_xor_si256(t, r24), rol2)
        }

        /// A 16-byte pattern in both 128-bit lanes.
        #[inline]
        #[target_feature(enable = $features)]
        fn shuffle(bytes: [u8; 16]) -> __m256i {
            let v = u128::from_le_bytes(bytes);
            let (lo, hi) = (v as u64 as i64, (v >> 64) as u64 as i64);
            _mm256_set_epi64x(hi, lo, hi, lo)
        }

        /// 4x4 transpose of 32-bit words inside each 128-bit lane (an involution).
        #[inline]
        #[target_feature(enable = $features)]
        fn transpose([a, b, c, d]: [__m256i; 4]) -> [__m256i; 4] {
            let t0 = _mm256_unpacklo_epi32(a, b);
            let t1 = _mm256_unpacklo_epi32(c, d);
            let t2 = _mm256_unpackhi_epi32(a, b);
            let t3 = _mm256_unpackhi_epi32(c, d);
            [
                _mm256_unpacklo_epi64(t0, t1),
                _mm256_unpackhi_epi64(t0, t1),
                _mm256_unpacklo_epi64(t2, t3),
                _mm256_unpackhi_epi64(t2, t3),
            ]
        }
    };
}

/// PSHUFB patterns on little-endian 32-bit lanes.
const BSWAP32: [u8; 16] = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12];
const ROL8: [u8; 16] = [3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14];
const ROL16: [u8; 16] = [2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13];
const ROL24: [u8; 16] = [1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12];

pub(super) mod gfni {
    //! AVX2 + GFNI: the S-box as two GF(2^8) affine instructions.
    use super::super::{GFNI_POST, GFNI_POST_C, GFNI_PRE, GFNI_PRE_C};
    use super::*;

    avx2_sm4!("avx2,gfni", sbox);

    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn sbox(t: __m256i) -> __m256i {
        let t = _mm256_gf2p8affine_epi64_epi8::<GFNI_PRE_C>(t, _mm256_set1_epi64x(GFNI_PRE));
        _mm256_gf2p8affineinv_epi64_epi8::<GFNI_POST_C>(t, _mm256_set1_epi64x(GFNI_POST))
    }
}

/// Nibble tables of PRE (SM4's input affine map into the AES field, constant folded
/// into the low table) and POST (the AES affine map undone, SM4's output map
/// applied), from gm/tools/derive_sbox.py.
const PRE_LO: [u8; 16] = [
    0x3e, 0xb2, 0x0e, 0x82, 0xbb, 0x37, 0x8b, 0x07, 0xa1, 0x2d, 0x91, 0x1d, 0x24, 0xa8, 0x14, 0x98,
];
const PRE_HI: [u8; 16] = [
    0x00, 0xdc, 0x2e, 0xf2, 0xc5, 0x19, 0xeb, 0x37, 0x08, 0xd4, 0x26, 0xfa, 0xcd, 0x11, 0xe3, 0x3f,
];
const POST_LO: [u8; 16] = [
    0x6c, 0xd4, 0xa6, 0x1e, 0x52, 0xea, 0x98, 0x20, 0x0b, 0xb3, 0xc1, 0x79, 0x35, 0x8d, 0xff, 0x47,
];
const POST_HI: [u8; 16] = [
    0x00, 0xe0, 0x50, 0xb0, 0x9d, 0x7d, 0xcd, 0x2d, 0xc0, 0x20, 0x90, 0x70, 0x5d, 0xbd, 0x0d, 0xed,
];
/// Inverse ShiftRows: AESENCLAST's ShiftRows then puts every byte back in place.
const INV_SHIFT_ROWS: [u8; 16] = [0, 13, 10, 7, 4, 1, 14, 11, 8, 5, 2, 15, 12, 9, 6, 3];

/// Defines `affine` and `sbox` for an AESENCLAST-based S-box: S(x) =
/// POST(AESENCLAST(PRE(x))), PRE and POST affine maps evaluated as two 16-entry PSHUFB
/// lookups (one per nibble) from registers, AESENCLAST's ShiftRows undone in advance
/// by one more PSHUFB. `$aesenclast` runs AESENCLAST with a zero key on a ymm.
macro_rules! aes_sbox {
    ($features:literal, $aesenclast:ident) => {
        #[inline]
        #[target_feature(enable = $features)]
        fn affine(x: __m256i, lo: [u8; 16], hi: [u8; 16]) -> __m256i {
            let nib = _mm256_set1_epi8(0x0f);
            let l = _mm256_and_si256(x, nib);
            let h = _mm256_and_si256(_mm256_srli_epi16::<4>(x), nib);
            _mm256_xor_si256(
                _mm256_shuffle_epi8(shuffle(lo), l),
                _mm256_shuffle_epi8(shuffle(hi), h),
            )
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn sbox(t: __m256i) -> __m256i {
            // The byte permutation first: the affine map is byte-wise, so the order
            // does not matter, and LLVM would otherwise apply it to both of the
            // map's lookups.
            let t = _mm256_shuffle_epi8(t, shuffle(INV_SHIFT_ROWS));
            affine($aesenclast(affine(t, PRE_LO, PRE_HI)), POST_LO, POST_HI)
        }
    };
}

pub(super) mod aesni {
    //! AVX2 + AES-NI: two 128-bit AESENCLASTs per ymm (for CPUs without VAES).
    use super::*;

    avx2_sm4!("avx2,aes", sbox);
    aes_sbox!("avx2,aes", aesenclast);

    #[inline]
    #[target_feature(enable = "avx2,aes")]
    fn aesenclast(y: __m256i) -> __m256i {
        let zero = _mm_setzero_si128();
        let lo = _mm_aesenclast_si128(_mm256_castsi256_si128(y), zero);
        let hi = _mm_aesenclast_si128(_mm256_extracti128_si256::<1>(y), zero);
        _mm256_set_m128i(hi, lo)
    }
}

pub(super) mod vaes {
    //! AVX2 + VAES: one 256-bit AESENCLAST per ymm (e.g. AMD Zen 3, which has VAES but
    //! no GFNI).
    use super::*;

    avx2_sm4!("avx2,aes,vaes", sbox);
    aes_sbox!("avx2,aes,vaes", aesenclast);

    #[inline]
    #[target_feature(enable = "avx2,aes,vaes")]
    fn aesenclast(y: __m256i) -> __m256i {
        _mm256_aesenclast_epi128(y, _mm256_setzero_si256())
    }
}
