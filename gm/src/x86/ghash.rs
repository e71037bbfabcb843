//! GHASH (in POLYVAL form, see `crate::ghash`) with carry-less multiply instructions:
//! PCLMULQDQ on 8 blocks, or VPCLMULQDQ on 16 blocks (4 per zmm), per reduction.
//! Aggregation: acc' = (acc ^ X_1) H^n ^ X_2 H^(n-1) ^ ... ^ X_n H, the products summed
//! unreduced and one Montgomery reduction at the end.

use crate::ghash::POWERS;
use core::arch::x86_64::*;

/// GHASH update with PCLMULQDQ; `blocks` is a multiple of 16 bytes.
pub(crate) fn update_pclmul(powers: &[u128; POWERS], acc: &mut u128, blocks: &[u8]) {
    // SAFETY: GhashBackend::Pclmul is only chosen (GhashBackend::for_backend) after
    // detecting pclmulqdq and ssse3.
    unsafe { pclmul_blocks(powers, acc, blocks) }
}

/// GHASH update with VPCLMULQDQ; `blocks` is a multiple of 16 bytes.
pub(crate) fn update_vpclmul(powers: &[u128; POWERS], acc: &mut u128, blocks: &[u8]) {
    // SAFETY: GhashBackend::Vpclmul is only chosen (GhashBackend::for_backend) after
    // detecting vpclmulqdq, avx512f, avx512bw, pclmulqdq and ssse3.
    unsafe { vpclmul_blocks(powers, acc, blocks) }
}

#[target_feature(enable = "pclmulqdq,ssse3")]
fn load128(v: &u128) -> __m128i {
    // SAFETY: reads the 16 bytes of `v`; unaligned load.
    unsafe { _mm_loadu_si128((v as *const u128).cast()) }
}

#[target_feature(enable = "pclmulqdq,ssse3")]
fn store128(v: __m128i) -> u128 {
    let mut out = 0u128;
    // SAFETY: writes the 16 bytes of `out`; unaligned store.
    unsafe { _mm_storeu_si128((&mut out as *mut u128).cast(), v) };
    out
}

/// A block as a POLYVAL element: its bytes reversed.
#[target_feature(enable = "pclmulqdq,ssse3")]
fn load_block(block: &[u8]) -> __m128i {
    assert_eq!(block.len(), 16);
    // SAFETY: block is 16 bytes (asserted); unaligned load.
    let v = unsafe { _mm_loadu_si128(block.as_ptr().cast()) };
    _mm_shuffle_epi8(
        v,
        _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    )
}

/// Montgomery reduction of hi:lo (as `crate::ghash::reduce`).
#[target_feature(enable = "pclmulqdq,ssse3")]
fn reduce(lo: __m128i, hi: __m128i) -> __m128i {
    let poly = _mm_set_epi64x(0xc200_0000_0000_0000_u64 as i64, 1);
    let t = _mm_xor_si128(
        _mm_shuffle_epi32::<78>(lo),
        _mm_clmulepi64_si128::<0x10>(lo, poly),
    );
    let t = _mm_xor_si128(
        _mm_shuffle_epi32::<78>(t),
        _mm_clmulepi64_si128::<0x10>(t, poly),
    );
    _mm_xor_si128(hi, t)
}

#[target_feature(enable = "pclmulqdq,ssse3")]
fn pclmul_blocks(powers: &[u128; POWERS], acc: &mut u128, blocks: &[u8]) {
    let mut a = load128(acc);
    for group in blocks.chunks(8 * 16) {
        let n = group.len() / 16;
        let (mut lo, mut hi, mut mid) = (
            _mm_setzero_si128(),
            _mm_setzero_si128(),
            _mm_setzero_si128(),
        );
        for (i, block) in group.chunks_exact(16).enumerate() {
            let mut x = load_block(block);
            if i == 0 {
                x = _mm_xor_si128(x, a);
            }
            let h = load128(&powers[n - 1 - i]);
            lo = _mm_xor_si128(lo, _mm_clmulepi64_si128::<0x00>(x, h));
            hi = _mm_xor_si128(hi, _mm_clmulepi64_si128::<0x11>(x, h));
            mid = _mm_xor_si128(mid, _mm_clmulepi64_si128::<0x01>(x, h));
            mid = _mm_xor_si128(mid, _mm_clmulepi64_si128::<0x10>(x, h));
        }
        lo = _mm_xor_si128(lo, _mm_slli_si128::<8>(mid));
        hi = _mm_xor_si128(hi, _mm_srli_si128::<8>(mid));
        a = reduce(lo, hi);
    }
    *acc = store128(a);
}

#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,ssse3")]
fn vpclmul_blocks(powers: &[u128; POWERS], acc: &mut u128, blocks: &[u8]) {
    const GROUP: usize = 16 * 16;
    // Block j of a group is multiplied by H^(16-j): lane l of register k by
    // powers[15 - 4k - l].
    let mut h = [_mm512_setzero_si512(); 4];
    for (k, hk) in h.iter_mut().enumerate() {
        let lanes: [u128; 4] = core::array::from_fn(|l| powers[15 - 4 * k - l]);
        // SAFETY: reads the 64 bytes of `lanes`; unaligned load.
        *hk = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
    }
    let rev = _mm512_broadcast_i32x4(_mm_set_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ));
    let mut a = load128(acc);
    let mut groups = blocks.chunks_exact(GROUP);
    for group in &mut groups {
        let (mut lo, mut hi, mut mid) = (
            _mm512_setzero_si512(),
            _mm512_setzero_si512(),
            _mm512_setzero_si512(),
        );
        for (k, hk) in h.iter().enumerate() {
            // SAFETY: 64k + 64 <= GROUP = group.len(); unaligned load.
            let raw = unsafe { _mm512_loadu_si512(group[64 * k..64 * k + 64].as_ptr().cast()) };
            let mut x = _mm512_shuffle_epi8(raw, rev);
            if k == 0 {
                x = _mm512_xor_si512(x, _mm512_zextsi128_si512(a));
            }
            lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128::<0x00>(x, *hk));
            hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128::<0x11>(x, *hk));
            mid = _mm512_ternarylogic_epi64::<0x96>(
                mid,
                _mm512_clmulepi64_epi128::<0x01>(x, *hk),
                _mm512_clmulepi64_epi128::<0x10>(x, *hk),
            );
        }
        lo = _mm512_xor_si512(lo, _mm512_bslli_epi128::<8>(mid));
        hi = _mm512_xor_si512(hi, _mm512_bsrli_epi128::<8>(mid));
        a = reduce(fold_lanes(lo), fold_lanes(hi));
    }
    *acc = store128(a);
    pclmul_blocks(powers, acc, groups.remainder());
}

/// XOR of the four 128-bit lanes.
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,ssse3")]
fn fold_lanes(v: __m512i) -> __m128i {
    let a = _mm_xor_si128(
        _mm512_extracti32x4_epi32::<0>(v),
        _mm512_extracti32x4_epi32::<1>(v),
    );
    let b = _mm_xor_si128(
        _mm512_extracti32x4_epi32::<2>(v),
        _mm512_extracti32x4_epi32::<3>(v),
    );
    _mm_xor_si128(a, b)
}
