//! SM4 on AVX2: 8 blocks per ymm word set, several sets interleaved. One skeleton, three
//! round functions: GFNI affine instructions for the S-box, or AESENCLAST (128-bit
//! AES-NI or 256-bit VAES) with the affine maps and the linear layer fused into
//! PSHUFB lookups of 16-entry tables held in registers, for AVX2 CPUs without GFNI.
//!
//! AVX2 has no 32-bit rotate, so the GFNI round's L uses L(t) = t ^ (t <<< 24) ^ ((t ^
//! (t <<< 8) ^ (t <<< 16)) <<< 2), the byte rotations done by PSHUFB.

use core::arch::x86_64::*;
use zeroize::Zeroize;

const GROUP_BYTES: usize = 128;

/// Defines `crypt_blocks` and `ctr32_xor` for one round function with `$groups`
/// independent 8-block groups in flight; `$features` are the target features. The
/// module supplies (with the same features) `round(x0, x1, x2, x3, k, &consts())`,
/// `enter` and `leave` (state words into and out of the round's domain) and
/// `prepare_keys` (round keys into that domain).
macro_rules! avx2_sm4 {
    ($features:literal, $groups:expr) => {
        const GROUPS: usize = $groups;

        /// Encrypts `data` (a multiple of 16 bytes) in place.
        ///
        /// # Safety
        /// The CPU supports every feature in the `target_feature` list.
        #[target_feature(enable = $features)]
        pub(in crate::x86) unsafe fn crypt_blocks(rk: &[u32; 32], data: &mut [u8]) {
            let mut keys = prepare_keys(rk);
            let mut wide = data.chunks_exact_mut(GROUPS * GROUP_BYTES);
            for chunk in &mut wide {
                crypt_groups::<GROUPS>(&keys, chunk);
            }
            let mut single = wide.into_remainder().chunks_exact_mut(GROUP_BYTES);
            for chunk in &mut single {
                crypt_groups::<1>(&keys, chunk);
            }
            let rest = single.into_remainder();
            if !rest.is_empty() {
                let mut buf = [0u8; GROUP_BYTES];
                buf[..rest.len()].copy_from_slice(rest);
                crypt_groups::<1>(&keys, &mut buf);
                rest.copy_from_slice(&buf[..rest.len()]);
            }
            keys.zeroize();
        }

        /// 32 rounds on `G` groups of 8 blocks; `chunk` is exactly `G * 128` bytes.
        #[target_feature(enable = $features)]
        fn crypt_groups<const G: usize>(keys: &[u32; 32], chunk: &mut [u8]) {
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
                *words = transpose(v).map(|w| enter(w));
            }
            let out = encrypt_words(keys, x);
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
            let mut keys = prepare_keys(rk);
            // The three words every counter block shares, in the round's domain once.
            let word = |w: u32| enter(_mm256_set1_epi32((counter >> (96 - 32 * w)) as u32 as i32));
            let prefix = [word(0), word(1), word(2)];
            let mut ctr = counter as u32;
            let mut wide = data.chunks_exact_mut(GROUPS * GROUP_BYTES);
            for chunk in &mut wide {
                ctr32_groups::<GROUPS>(&keys, prefix, ctr, chunk);
                ctr = ctr.wrapping_add((GROUPS * 8) as u32);
            }
            for chunk in wide.into_remainder().chunks_mut(GROUP_BYTES) {
                if chunk.len() == GROUP_BYTES {
                    ctr32_groups::<1>(&keys, prefix, ctr, chunk);
                } else {
                    let mut buf = [0u8; GROUP_BYTES];
                    buf[..chunk.len()].copy_from_slice(chunk);
                    ctr32_groups::<1>(&keys, prefix, ctr, &mut buf);
                    chunk.copy_from_slice(&buf[..chunk.len()]);
                }
                ctr = ctr.wrapping_add(8);
            }
            keys.zeroize();
        }

        /// Counter blocks built in transposed form: register dword 4L + p holds block
        /// 2p + L. `prefix` holds the first three words, already entered.
        #[target_feature(enable = $features)]
        fn ctr32_groups<const G: usize>(
            keys: &[u32; 32],
            prefix: [__m256i; 3],
            ctr: u32,
            chunk: &mut [u8],
        ) {
            assert_eq!(chunk.len(), G * GROUP_BYTES);
            let offsets = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
            let mut x = [[_mm256_setzero_si256(); 4]; G];
            for (g, words) in x.iter_mut().enumerate() {
                let base = _mm256_set1_epi32(ctr.wrapping_add(8 * g as u32) as i32);
                let [w0, w1, w2] = prefix;
                *words = [w0, w1, w2, enter(_mm256_add_epi32(base, offsets))];
            }
            let out = encrypt_words(keys, x);
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

        /// The 32 rounds on transposed, entered words; returns the output blocks in
        /// memory order (left, transposed back and byte-swapped).
        #[inline]
        #[target_feature(enable = $features)]
        fn encrypt_words<const G: usize>(
            keys: &[u32; 32],
            mut x: [[__m256i; 4]; G],
        ) -> [[__m256i; 4]; G] {
            let c = consts();
            for &k in keys {
                let k = _mm256_set1_epi32(k as i32);
                for words in x.iter_mut() {
                    let [x0, x1, x2, x3] = *words;
                    *words = [x1, x2, x3, round(x0, x1, x2, x3, k, &c)];
                }
            }
            for words in x.iter_mut() {
                // Output is (X35, X34, X33, X32).
                words.reverse();
                *words = transpose(words.map(|w| leave(w)))
                    .map(|v| _mm256_shuffle_epi8(v, shuffle(BSWAP32)));
            }
            x
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
    //! AVX2 + GFNI: the S-box as two GF(2^8) affine instructions, L by shifts and byte
    //! rotations; the state stays in SM4's own domain.
    use super::super::{GFNI_POST, GFNI_POST_C, GFNI_PRE, GFNI_PRE_C};
    use super::*;

    // 4 groups measured faster than 2 (+30%) and no slower than 6.
    avx2_sm4!("avx2,gfni", 4);

    #[inline]
    fn consts() {}

    /// X0 ^ L(τ(X1 ^ X2 ^ X3 ^ rk)).
    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn round(x0: __m256i, x1: __m256i, x2: __m256i, x3: __m256i, k: __m256i, _: &()) -> __m256i {
        let t = _mm256_xor_si256(_mm256_xor_si256(x1, x2), _mm256_xor_si256(x3, k));
        let t = _mm256_gf2p8affine_epi64_epi8::<GFNI_PRE_C>(t, _mm256_set1_epi64x(GFNI_PRE));
        let t = _mm256_gf2p8affineinv_epi64_epi8::<GFNI_POST_C>(t, _mm256_set1_epi64x(GFNI_POST));
        _mm256_xor_si256(x0, linear(t))
    }

    /// L, SM4's linear layer, on every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn linear(t: __m256i) -> __m256i {
        let r8 = _mm256_shuffle_epi8(t, shuffle(ROL8));
        let r16 = _mm256_shuffle_epi8(t, shuffle(ROL16));
        let r24 = _mm256_shuffle_epi8(t, shuffle(ROL24));
        let u = _mm256_xor_si256(t, _mm256_xor_si256(r8, r16));
        let rol2 = _mm256_or_si256(_mm256_slli_epi32::<2>(u), _mm256_srli_epi32::<30>(u));
        _mm256_xor_si256(_mm256_xor_si256(t, r24), rol2)
    }

    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn enter(v: __m256i) -> __m256i {
        v
    }

    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn leave(v: __m256i) -> __m256i {
        v
    }

    #[inline]
    #[target_feature(enable = "avx2,gfni")]
    fn prepare_keys(rk: &[u32; 32]) -> [u32; 32] {
        *rk
    }
}

/// The AESENCLAST-based rounds (see `aes_round!`) keep the state in the domain of
/// PRE's linear part: Y = M.X bytewise, where PRE(x) = M.x ^ PRE(0) is SM4's input
/// affine map into the AES field. Then PRE(X1 ^ X2 ^ X3 ^ rk) = Y1 ^ Y2 ^ Y3 ^
/// PRE(rk): no input map per round, PRE applied to the round keys once. The output
/// side, M.L(POST(a)) for the AESENCLAST result a, is computed as below.
mod tables {
    /// A bytewise affine map as two PSHUFB tables: `f(x) = lo[x & 15] ^ hi[x >> 4]`.
    #[derive(Clone, Copy)]
    pub(super) struct Nibbles {
        pub lo: [u8; 16],
        pub hi: [u8; 16],
    }

    /// PRE (SM4's input affine map into the AES field) and POST (the AES affine map
    /// undone, then SM4's output map), from gm/tools/derive_sbox.py.
    pub(super) const PRE: Nibbles = Nibbles {
        lo: [
            0x3e, 0xb2, 0x0e, 0x82, 0xbb, 0x37, 0x8b, 0x07, 0xa1, 0x2d, 0x91, 0x1d, 0x24, 0xa8,
            0x14, 0x98,
        ],
        hi: [
            0x00, 0xdc, 0x2e, 0xf2, 0xc5, 0x19, 0xeb, 0x37, 0x08, 0xd4, 0x26, 0xfa, 0xcd, 0x11,
            0xe3, 0x3f,
        ],
    };
    pub(super) const POST: Nibbles = Nibbles {
        lo: [
            0x6c, 0xd4, 0xa6, 0x1e, 0x52, 0xea, 0x98, 0x20, 0x0b, 0xb3, 0xc1, 0x79, 0x35, 0x8d,
            0xff, 0x47,
        ],
        hi: [
            0x00, 0xe0, 0x50, 0xb0, 0x9d, 0x7d, 0xcd, 0x2d, 0xc0, 0x20, 0x90, 0x70, 0x5d, 0xbd,
            0x0d, 0xed,
        ],
    };

    /// The maps the rounds evaluate, each tabulated by [`tabulate`].
    #[derive(Clone, Copy)]
    pub(super) enum Map {
        /// M: state words into the domain.
        Enter,
        /// M^-1: out of it.
        Leave,
        /// G0 = M.(I ^ A).POST and G3 = M.(I ^ B).POST, where A(b) = b << 2 and B(b) =
        /// b >> 6 within a byte, so that a 32-bit rotation by 2 is A ^ R8.B (R8: rotate
        /// the word by one byte). Expanding L = I ^ R24 ^ rol2.(I ^ R8 ^ R16) gives
        /// M.L.POST = G0 ^ R8.(G0 ^ G3) ^ R16.(G0 ^ G3) ^ R24.G3 = (I ^ R8 ^ R16).(G0 ^
        /// R8.G3): two lookups of the AESENCLAST output and three byte rotations. (The
        /// constants are uniform across a word's bytes, so rotations keep them.)
        G0,
        G3,
    }

    const fn eval(t: &Nibbles, x: u8) -> u8 {
        t.lo[(x & 15) as usize] ^ t.hi[(x >> 4) as usize]
    }

    /// M, the linear part of PRE.
    const fn m(x: u8) -> u8 {
        eval(&PRE, x) ^ eval(&PRE, 0)
    }

    pub(super) const fn apply(map: Map, x: u8) -> u8 {
        match map {
            Map::Enter => m(x),
            Map::Leave => {
                // M is invertible (PRE is a bijection): search its preimage.
                let mut y = 0u8;
                while m(y) != x {
                    y += 1;
                }
                y
            }
            Map::G0 => {
                let s = eval(&POST, x);
                m(s ^ (s << 2))
            }
            Map::G3 => {
                let s = eval(&POST, x);
                m(s ^ (s >> 6))
            }
        }
    }

    /// The PSHUFB tables of an affine bytewise map.
    pub(super) const fn tabulate(map: Map) -> Nibbles {
        let mut t = Nibbles {
            lo: [0; 16],
            hi: [0; 16],
        };
        let mut i = 0;
        while i < 16 {
            t.lo[i] = apply(map, i as u8);
            t.hi[i] = apply(map, (i as u8) << 4) ^ apply(map, 0);
            i += 1;
        }
        t
    }

    pub(super) const ENTER: Nibbles = tabulate(Map::Enter);
    pub(super) const LEAVE: Nibbles = tabulate(Map::Leave);
    pub(super) const G0: Nibbles = tabulate(Map::G0);
    pub(super) const G3: Nibbles = tabulate(Map::G3);

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every map is affine, so its two tables reproduce it on all 256 bytes, and
        /// LEAVE undoes ENTER.
        #[test]
        fn tables_evaluate_their_maps() {
            for map in [Map::Enter, Map::Leave, Map::G0, Map::G3] {
                let t = tabulate(map);
                for x in 0..=255u8 {
                    assert_eq!(eval(&t, x), apply(map, x));
                }
            }
            for x in 0..=255u8 {
                assert_eq!(eval(&LEAVE, eval(&ENTER, x)), x);
            }
        }
    }
}

/// Inverse ShiftRows: AESENCLAST's ShiftRows then puts every byte back in place.
const INV_SHIFT_ROWS: [u8; 16] = [0, 13, 10, 7, 4, 1, 14, 11, 8, 5, 2, 15, 12, 9, 6, 3];

/// Defines `round`, `enter`, `leave` and `prepare_keys` for an AESENCLAST-based round
/// in the domain of `tables`: X4 = X0 ^ L(S(X1 ^ X2 ^ X3 ^ rk)) becomes Y4 = Y0 ^
/// (I ^ R8 ^ R16).(G0(a) ^ R8.G3(a)), a = AESENCLAST(Y1 ^ Y2 ^ Y3 ^ PRE(rk)) with a
/// zero key (the AES S-box is A_aes . inv + 0x63, which G0 and G3 absorb through
/// POST). Every lookup is a PSHUFB of a 16-entry table held in a register, indexed by
/// a nibble: no memory access depends on data. `$aesenclast` runs AESENCLAST with a
/// zero key on a ymm.
macro_rules! aes_round {
    ($features:literal, $aesenclast:ident) => {
        use super::tables::{Nibbles, ENTER, G0, G3, LEAVE, PRE};

        #[inline]
        #[target_feature(enable = $features)]
        fn lookup(t: &Nibbles, lo: __m256i, hi: __m256i) -> __m256i {
            _mm256_xor_si256(
                _mm256_shuffle_epi8(shuffle(t.lo), lo),
                _mm256_shuffle_epi8(shuffle(t.hi), hi),
            )
        }

        /// The nibbles of every byte: (x & 15, x >> 4).
        #[inline]
        #[target_feature(enable = $features)]
        fn nibbles(x: __m256i) -> (__m256i, __m256i) {
            let nib = _mm256_set1_epi8(0x0f);
            (
                _mm256_and_si256(x, nib),
                _mm256_and_si256(_mm256_srli_epi16::<4>(x), nib),
            )
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn affine(t: &Nibbles, x: __m256i) -> __m256i {
            let (lo, hi) = nibbles(x);
            lookup(t, lo, hi)
        }

        /// The byte permutations of a round. Passed through `black_box` so that LLVM
        /// sees unknown masks: with known ones it pushes the rotation of G3 through
        /// the XOR of its two lookups (two PSHUFBs for one) and lowers the 16-bit
        /// rotation to PSHUFLW + PSHUFHW (two instructions for one).
        #[derive(Clone, Copy)]
        struct Consts {
            inv_shift_rows: __m256i,
            rol8: __m256i,
            rol16: __m256i,
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn consts() -> Consts {
            core::hint::black_box(Consts {
                inv_shift_rows: shuffle(INV_SHIFT_ROWS),
                rol8: shuffle(ROL8),
                rol16: shuffle(ROL16),
            })
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn round(
            y0: __m256i,
            y1: __m256i,
            y2: __m256i,
            y3: __m256i,
            k: __m256i,
            c: &Consts,
        ) -> __m256i {
            let w = _mm256_xor_si256(_mm256_xor_si256(y1, y2), _mm256_xor_si256(y3, k));
            // AESENCLAST's ShiftRows undone in advance (the S-box is bytewise).
            let a = $aesenclast(_mm256_shuffle_epi8(w, c.inv_shift_rows));
            let (lo, hi) = nibbles(a);
            let g0 = lookup(&G0, lo, hi);
            let g3 = lookup(&G3, lo, hi);
            let p = _mm256_xor_si256(g0, _mm256_shuffle_epi8(g3, c.rol8));
            let r = _mm256_xor_si256(
                _mm256_shuffle_epi8(p, c.rol8),
                _mm256_shuffle_epi8(p, c.rol16),
            );
            _mm256_xor_si256(_mm256_xor_si256(y0, p), r)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn enter(v: __m256i) -> __m256i {
            affine(&ENTER, v)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn leave(v: __m256i) -> __m256i {
            affine(&LEAVE, v)
        }

        /// PRE applied to every byte of every round key (by the same constant-time
        /// lookups as the rounds).
        #[inline]
        #[target_feature(enable = $features)]
        fn prepare_keys(rk: &[u32; 32]) -> [u32; 32] {
            let mut out = [0u32; 32];
            for (src, dst) in rk.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                // SAFETY: src and dst are 8 u32s (32 bytes) each; unaligned load and
                // store.
                unsafe {
                    let k = _mm256_loadu_si256(src.as_ptr().cast());
                    _mm256_storeu_si256(dst.as_mut_ptr().cast(), affine(&PRE, k));
                }
            }
            out
        }
    };
}

pub(super) mod aesni {
    //! AVX2 + AES-NI: two 128-bit AESENCLASTs per ymm (for CPUs without VAES).
    use super::*;

    // 8 groups measured 10% faster than 4 and 25% faster than 3: the state spills to
    // the stack, but the loads and stores use ports the round leaves idle.
    avx2_sm4!("avx2,aes", 8);
    aes_round!("avx2,aes", aesenclast);

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

    // As for aesni.
    avx2_sm4!("avx2,aes,vaes", 8);
    aes_round!("avx2,aes,vaes", aesenclast);

    #[inline]
    #[target_feature(enable = "avx2,aes,vaes")]
    fn aesenclast(y: __m256i) -> __m256i {
        _mm256_aesenclast_epi128(y, _mm256_setzero_si256())
    }
}
