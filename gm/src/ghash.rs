//! GHASH (the GCM authenticator), computed as POLYVAL (RFC 8452, appendix A):
//! GHASH(H, X) = rev(POLYVAL(mulX(rev H), rev X_1, ...)) where rev reverses the bytes
//! of a block. In POLYVAL's bit order a block is a little-endian 128-bit polynomial,
//! so carry-less multiply instructions need no bit reflection, and the portable code
//! works on plain `u128`s.
//!
//! The portable multiply is constant time: carry-less 64x64 products come from integer
//! multiplications of operands with holes (every fourth bit kept, so carries never
//! reach a kept bit), as in BearSSL's ghash_ctmul64; the reduction is shifts and XORs.

use crate::backend::Backend;
use zeroize::Zeroize;

/// Powers of H kept for aggregated (one reduction per many blocks) hashing.
pub(crate) const POWERS: usize = 16;

/// The GHASH multiplier implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GhashBackend {
    Portable,
    /// PCLMULQDQ, 8 blocks per reduction.
    #[cfg(target_arch = "x86_64")]
    Pclmul,
    /// VPCLMULQDQ on zmm, 16 blocks per reduction (PCLMULQDQ for the tail).
    #[cfg(target_arch = "x86_64")]
    Vpclmul,
}

impl GhashBackend {
    /// The multiplier that goes with an SM4 backend: carry-less multiply instructions
    /// for the SIMD backends when the CPU has them, the portable code otherwise (and
    /// always when the portable SM4 was asked for).
    pub(crate) fn for_backend(backend: Backend) -> GhashBackend {
        #[cfg(target_arch = "x86_64")]
        {
            let pclmul = std::is_x86_feature_detected!("pclmulqdq")
                && std::is_x86_feature_detected!("ssse3");
            let vpclmul = pclmul
                && std::is_x86_feature_detected!("vpclmulqdq")
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw");
            match backend {
                Backend::Portable => GhashBackend::Portable,
                Backend::Avx512Gfni if vpclmul => GhashBackend::Vpclmul,
                _ if pclmul => GhashBackend::Pclmul,
                _ => GhashBackend::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = backend;
            GhashBackend::Portable
        }
    }
}

/// H and its powers, in POLYVAL form: `powers[i]` is H^(i+1). Wiped on drop (H is as
/// secret as the key for forging tags).
#[derive(Clone)]
pub(crate) struct GhashKey {
    powers: [u128; POWERS],
    backend: GhashBackend,
}

impl Drop for GhashKey {
    fn drop(&mut self) {
        self.powers.zeroize();
    }
}

impl GhashKey {
    /// The key for hash subkey `h` (the encryption of the zero block).
    pub(crate) fn new(h: &[u8; 16], backend: GhashBackend) -> GhashKey {
        let h = mul_x(u128::from_be_bytes(*h));
        let mut powers = [0u128; POWERS];
        powers[0] = h;
        for i in 1..POWERS {
            powers[i] = dot(powers[i - 1], h);
        }
        GhashKey { powers, backend }
    }

    pub(crate) fn backend(&self) -> GhashBackend {
        self.backend
    }
}

/// A running GHASH.
pub(crate) struct Ghash<'k> {
    key: &'k GhashKey,
    acc: u128,
}

impl<'k> Ghash<'k> {
    pub(crate) fn new(key: &'k GhashKey) -> Ghash<'k> {
        Ghash { key, acc: 0 }
    }

    /// Absorbs `data`, zero-padding a final partial block (GCM pads AAD and ciphertext
    /// separately, so each call ends on a block boundary).
    pub(crate) fn update_padded(&mut self, data: &[u8]) {
        let full = data.len() - data.len() % 16;
        self.update_blocks(&data[..full]);
        if full < data.len() {
            let mut block = [0u8; 16];
            block[..data.len() - full].copy_from_slice(&data[full..]);
            self.update_blocks(&block);
        }
    }

    fn update_blocks(&mut self, blocks: &[u8]) {
        match self.key.backend {
            GhashBackend::Portable => update_portable(&self.key.powers, &mut self.acc, blocks),
            #[cfg(target_arch = "x86_64")]
            GhashBackend::Pclmul => {
                crate::x86::ghash::update_pclmul(&self.key.powers, &mut self.acc, blocks)
            }
            #[cfg(target_arch = "x86_64")]
            GhashBackend::Vpclmul => {
                crate::x86::ghash::update_vpclmul(&self.key.powers, &mut self.acc, blocks)
            }
        }
    }

    /// Absorbs the lengths block (bit lengths of AAD and ciphertext) and returns the
    /// hash.
    pub(crate) fn finalize(mut self, aad_len: u64, ct_len: u64) -> [u8; 16] {
        let lens = (u128::from(aad_len * 8) << 64) | u128::from(ct_len * 8);
        self.update_blocks(&lens.to_be_bytes());
        self.acc.to_be_bytes()
    }
}

/// Portable update: one block at a time, Horner's rule, with H's halves prepared once.
fn update_portable(powers: &[u128; POWERS], acc: &mut u128, blocks: &[u8]) {
    let h = Prepared::new(powers[0]);
    for block in blocks.chunks_exact(16) {
        let mut b = [0u8; 16];
        b.copy_from_slice(block);
        let (lo, hi) = h.clmul128(*acc ^ u128::from_be_bytes(b));
        *acc = reduce(lo, hi);
    }
}

/// mulX_POLYVAL: multiplication by x, reduced modulo x^128 + x^127 + x^126 + x^121 + 1,
/// with a mask instead of a branch.
fn mul_x(v: u128) -> u128 {
    let carry = 0u128.wrapping_sub(v >> 127);
    (v << 1) ^ (carry & ((1 << 127) | (1 << 126) | (1 << 121) | 1))
}

/// POLYVAL's dot(a, b) = a * b * x^-128 in constant time.
pub(crate) fn dot(a: u128, b: u128) -> u128 {
    let (lo, hi) = Prepared::new(b).clmul128(a);
    reduce(lo, hi)
}

/// Montgomery reduction of the 256-bit product hi:lo: two folds of the low 64 bits by
/// x^63 + x^62 + x^57 (the high half of POLYVAL's reduction constant 0xc2..01).
pub(crate) fn reduce(lo: u128, hi: u128) -> u128 {
    let mut t = lo;
    for _ in 0..2 {
        let v = u128::from(t as u64);
        t = t.rotate_left(64) ^ (v << 63) ^ (v << 62) ^ (v << 57);
    }
    hi ^ t
}

/// One operand of 128x128 carry-less products, split for Karatsuba (low half, high
/// half, their XOR) and bit-reversed: the low 64 bits of a 64x64 product come from
/// `bmul64` of the operands, the high 64 bits from `bmul64` of the reversed operands.
struct Prepared {
    halves: [u64; 3],
    reversed: [u64; 3],
}

impl Prepared {
    fn new(b: u128) -> Prepared {
        let halves = [b as u64, (b >> 64) as u64, (b as u64) ^ ((b >> 64) as u64)];
        Prepared {
            halves,
            reversed: halves.map(u64::reverse_bits),
        }
    }

    /// a * b as (low, high) 128-bit halves. Bit reversal is linear, so the reversed
    /// operands and the Karatsuba middle term are combined before reversing back: five
    /// reversals per product instead of nine.
    fn clmul128(&self, a: u128) -> (u128, u128) {
        let (a0, a1) = (a as u64, (a >> 64) as u64);
        let (r0, r1) = (a0.reverse_bits(), a1.reverse_bits());
        let [b0, b1, b2] = self.halves;
        let [s0, s1, s2] = self.reversed;
        let (l_lo, l_hi, l_mid) = (bmul64(a0, b0), bmul64(a1, b1), bmul64(a0 ^ a1, b2));
        let (p_lo, p_hi, p_mid) = (bmul64(r0, s0), bmul64(r1, s1), bmul64(r0 ^ r1, s2));
        let lo = u128::from(l_lo) | (u128::from(p_lo.reverse_bits() >> 1) << 64);
        let hi = u128::from(l_hi) | (u128::from(p_hi.reverse_bits() >> 1) << 64);
        let mid = u128::from(l_mid ^ l_lo ^ l_hi)
            | (u128::from((p_mid ^ p_lo ^ p_hi).reverse_bits() >> 1) << 64);
        (lo ^ (mid << 64), hi ^ (mid >> 64))
    }
}

/// Low 64 bits of the carry-less product x * y, by integer multiplication of
/// operands keeping every fourth bit: a column of one partial product sums at most 15
/// ones below bit 60 (so its carries stay in the three bits above it, which are
/// masked off), and the columns that can reach 16 carry past bit 63.
fn bmul64(x: u64, y: u64) -> u64 {
    const M: [u64; 4] = [
        0x1111_1111_1111_1111,
        0x2222_2222_2222_2222,
        0x4444_4444_4444_4444,
        0x8888_8888_8888_8888,
    ];
    let xs = M.map(|m| x & m);
    let ys = M.map(|m| y & m);
    let mut z = 0;
    for (k, m) in M.iter().enumerate() {
        // Partial products whose bit positions are k mod 4.
        let mut zk = 0u64;
        for (i, xi) in xs.iter().enumerate() {
            zk ^= xi.wrapping_mul(ys[(k + 4 - i) % 4]);
        }
        z |= zk & m;
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Schoolbook carry-less product, bit by bit.
    fn naive(a: u128, b: u128) -> (u128, u128) {
        let (mut lo, mut hi) = (0u128, 0u128);
        for i in 0..128 {
            if (b >> i) & 1 == 1 {
                lo ^= a << i;
                if i > 0 {
                    hi ^= a >> (128 - i);
                }
            }
        }
        (lo, hi)
    }

    #[test]
    fn constant_time_clmul_matches_the_schoolbook_product() {
        let mut x = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210_u128;
        let mut y = 0xffff_0000_ffff_0000_8000_0000_0000_0001_u128;
        for _ in 0..500 {
            assert_eq!(Prepared::new(y).clmul128(x), naive(x, y), "{x:#x} * {y:#x}");
            x = x
                .wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                .rotate_left(17)
                ^ 1;
            y = y
                .wrapping_mul(0xd1b5_4a32_d192_ed03_8cb9_2ba7_2f3d_8dd7)
                .rotate_left(29);
        }
        assert_eq!(
            Prepared::new(u128::MAX).clmul128(u128::MAX),
            naive(u128::MAX, u128::MAX)
        );
    }
}
