//! Which SM4 and GHASH implementation runs: detected once per process from the CPU,
//! overridable with `FERRY_GM_BACKEND` (read once) or per key with
//! [`Sm4::with_backend`](crate::Sm4::with_backend).
//!
//! A [`Backend`] value stored in a cipher has been checked by [`Backend::is_available`];
//! the SIMD modules rely on that for the safety of their `#[target_feature]` calls.

use std::sync::OnceLock;

/// An SM4 implementation. All are constant time; they differ in speed and in the CPU
/// features they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// Bitsliced, 64 blocks at a time, any CPU. GHASH by constant-time integer
    /// multiplication.
    Portable,
    /// x86-64 AVX2 + AES-NI: the S-box through AESENCLAST, its affine maps and the
    /// linear layer fused into PSHUFB lookups, 64 blocks at a time. GHASH with
    /// PCLMULQDQ.
    Avx2AesNi,
    /// x86-64 AVX2 + VAES: as `Avx2AesNi` with one 256-bit AESENCLAST per register
    /// (AMD Zen 3 has VAES but no GFNI). GHASH with PCLMULQDQ.
    Avx2Vaes,
    /// x86-64 AVX2 + GFNI: the S-box as two GF(2^8) affine instructions on ymm,
    /// 32 blocks at a time. GHASH with PCLMULQDQ.
    Avx2Gfni,
    /// x86-64 AVX-512 (F, BW, VL) + GFNI: as `Avx2Gfni` on zmm, 64 blocks at a time.
    /// GHASH with VPCLMULQDQ when present.
    Avx512Gfni,
}

/// The environment variable that forces a backend for the whole process
/// (`portable`, `avx2-aesni`, `avx2-vaes`, `avx2-gfni`, `avx512-gfni`).
pub const BACKEND_ENV: &str = "FERRY_GM_BACKEND";

impl Backend {
    /// Every backend, fastest first.
    pub const ALL: [Backend; 5] = [
        Backend::Avx512Gfni,
        Backend::Avx2Gfni,
        Backend::Avx2Vaes,
        Backend::Avx2AesNi,
        Backend::Portable,
    ];

    /// The name `FERRY_GM_BACKEND` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::Avx2AesNi => "avx2-aesni",
            Backend::Avx2Vaes => "avx2-vaes",
            Backend::Avx2Gfni => "avx2-gfni",
            Backend::Avx512Gfni => "avx512-gfni",
        }
    }

    /// The backend called `name`, if any.
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Whether this CPU has every feature the backend needs.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2AesNi => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("aes")
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2Vaes => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("aes")
                    && std::is_x86_feature_detected!("vaes")
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2Gfni => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("gfni")
            }
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512Gfni => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("gfni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest backend this CPU supports.
    pub fn detect() -> Backend {
        Backend::ALL
            .into_iter()
            .find(|b| b.is_available())
            .unwrap_or(Backend::Portable)
    }

    /// The process default: `FERRY_GM_BACKEND` if it names an available backend,
    /// otherwise [`Backend::detect`]. Decided once.
    pub fn selected() -> Backend {
        static SELECTED: OnceLock<Backend> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            std::env::var(BACKEND_ENV)
                .ok()
                .and_then(|v| Backend::from_name(v.trim()))
                .filter(|b| b.is_available())
                .unwrap_or_else(Backend::detect)
        })
    }
}

/// Encrypts `data` (a multiple of 16 bytes) in place with round keys `rk` (reversed
/// round keys decrypt). `backend` has passed [`Backend::is_available`].
pub(crate) fn crypt_blocks(backend: Backend, rk: &[u32; 32], data: &mut [u8]) {
    match backend {
        Backend::Portable => crate::portable::crypt_blocks(rk, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2AesNi => crate::x86::crypt_blocks_avx2_aesni(rk, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2Vaes => crate::x86::crypt_blocks_avx2_vaes(rk, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2Gfni => crate::x86::crypt_blocks_avx2_gfni(rk, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512Gfni => crate::x86::crypt_blocks_avx512_gfni(rk, data),
        #[cfg(not(target_arch = "x86_64"))]
        _ => crate::portable::crypt_blocks(rk, data),
    }
}

/// XORs into `data` the keystream of counter blocks `counter`, then `counter` with
/// its low 32 bits incremented (wrapping, GCM's inc32), and so on; a final partial
/// block uses part of a whole keystream block. `backend` has passed
/// [`Backend::is_available`].
pub(crate) fn ctr32_xor(backend: Backend, rk: &[u32; 32], counter: u128, data: &mut [u8]) {
    match backend {
        Backend::Portable => crate::ctr::ctr32_xor_generic(backend, rk, counter, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2AesNi => crate::x86::ctr32_xor_avx2_aesni(rk, counter, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2Vaes => crate::x86::ctr32_xor_avx2_vaes(rk, counter, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx2Gfni => crate::x86::ctr32_xor_avx2_gfni(rk, counter, data),
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512Gfni => crate::x86::ctr32_xor_avx512_gfni(rk, counter, data),
        #[cfg(not(target_arch = "x86_64"))]
        _ => crate::ctr::ctr32_xor_generic(backend, rk, counter, data),
    }
}
