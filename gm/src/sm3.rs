//! SM3 (GB/T 32905): RustCrypto's `sm3`, re-exported so ferry code names one crate for
//! all the GM algorithms.

pub use sm3::{Digest, Sm3};

/// The SM3 digest of `data`.
pub fn sm3_digest(data: &[u8]) -> [u8; 32] {
    Sm3::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GB/T 32905 appendix A examples 1 and 2.
    #[test]
    fn standard_examples() {
        assert_eq!(
            sm3_digest(b"abc"),
            hex32("66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0")
        );
        assert_eq!(
            sm3_digest(&b"abcd".repeat(16)),
            hex32("debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732")
        );
    }

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("test hex");
        }
        out
    }
}
