//! x86-64 SIMD backends. All `unsafe` of the crate lives under this module: the
//! `#[target_feature]` functions may only run on CPUs with those features, and the
//! safe wrappers here are reached only through a [`Backend`](crate::Backend) that
//! passed [`Backend::is_available`](crate::Backend::is_available) (or, for GHASH, a
//! [`GhashBackend`](crate::ghash::GhashBackend) chosen after the same kind of check).
//!
//! Every backend processes whole groups of blocks with the same instruction sequence
//! whatever the data: the S-box is computed by GF(2^8) affine/inversion instructions
//! (GFNI) or by AESENCLAST plus PSHUFB lookups of 16-entry tables held in registers
//! (AES-NI); none indexes memory by secret data.

mod avx2;
mod gfni512;
pub(crate) mod ghash;

/// SM4 on AVX-512 + GFNI.
pub(crate) fn crypt_blocks_avx512_gfni(rk: &[u32; 32], data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx512Gfni.is_available());
    // SAFETY: only reached for Backend::Avx512Gfni, which a cipher holds only after
    // Backend::is_available confirmed avx512f, avx512bw, avx512vl and gfni.
    unsafe { gfni512::crypt_blocks(rk, data) }
}

/// SM4 on AVX2 + GFNI.
pub(crate) fn crypt_blocks_avx2_gfni(rk: &[u32; 32], data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx2Gfni.is_available());
    // SAFETY: only reached for Backend::Avx2Gfni, which a cipher holds only after
    // Backend::is_available confirmed avx2 and gfni.
    unsafe { avx2::gfni::crypt_blocks(rk, data) }
}

/// SM4 on AVX2 + AES-NI.
pub(crate) fn crypt_blocks_avx2_aesni(rk: &[u32; 32], data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx2AesNi.is_available());
    // SAFETY: only reached for Backend::Avx2AesNi, which a cipher holds only after
    // Backend::is_available confirmed avx2 and aes.
    unsafe { avx2::aesni::crypt_blocks(rk, data) }
}

/// SM4-CTR keystream (32-bit counter) XORed into `data` on AVX-512 + GFNI.
pub(crate) fn ctr32_xor_avx512_gfni(rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx512Gfni.is_available());
    // SAFETY: as for crypt_blocks_avx512_gfni.
    unsafe { gfni512::ctr32_xor(rk, counter, data) }
}

/// SM4-CTR keystream (32-bit counter) XORed into `data` on AVX2 + GFNI.
pub(crate) fn ctr32_xor_avx2_gfni(rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx2Gfni.is_available());
    // SAFETY: as for crypt_blocks_avx2_gfni.
    unsafe { avx2::gfni::ctr32_xor(rk, counter, data) }
}

/// SM4 on AVX2 + VAES.
pub(crate) fn crypt_blocks_avx2_vaes(rk: &[u32; 32], data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx2Vaes.is_available());
    // SAFETY: only reached for Backend::Avx2Vaes, which a cipher holds only after
    // Backend::is_available confirmed avx2, aes and vaes.
    unsafe { avx2::vaes::crypt_blocks(rk, data) }
}

/// SM4-CTR keystream (32-bit counter) XORed into `data` on AVX2 + VAES.
pub(crate) fn ctr32_xor_avx2_vaes(rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx2Vaes.is_available());
    // SAFETY: as for crypt_blocks_avx2_vaes.
    unsafe { avx2::vaes::ctr32_xor(rk, counter, data) }
}

/// SM4-CTR keystream (32-bit counter) XORed into `data` on AVX2 + AES-NI.
pub(crate) fn ctr32_xor_avx2_aesni(rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    debug_assert!(crate::Backend::Avx2AesNi.is_available());
    // SAFETY: as for crypt_blocks_avx2_aesni.
    unsafe { avx2::aesni::ctr32_xor(rk, counter, data) }
}

/// Affine maps around the AES-field inversion that make up SM4's S-box:
/// S(x) = POST . inv_aes(PRE . x + PRE_C) + POST_C (derived and checked by
/// gm/tools/derive_sbox.py; the matrices are in GF2P8AFFINEQB's qword layout).
pub(crate) const GFNI_PRE: i64 = 0x4c28_7db9_1a22_505d;
pub(crate) const GFNI_PRE_C: i32 = 0x3e;
pub(crate) const GFNI_POST: i64 = 0xf3ab_34a9_74a6_b589_u64 as i64;
pub(crate) const GFNI_POST_C: i32 = 0xd3;
