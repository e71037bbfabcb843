//! Little-endian fixed-width fields, the one codec behind every ferry format (journal
//! segments and batches, the undo log, the dirty-region map, chunk lists, wire frames).
//!
//! Readers take the whole buffer and an offset, as the format code reads fixed layouts
//! whose length it has checked once up front (`b.len() >= HEADER_LEN`); an offset past
//! the end is a bug in that check and panics like any slice index. Writers append.
#![forbid(unsafe_code)]

/// The `N` bytes at `at`.
#[inline]
fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// The little-endian `u16` at byte offset `at`.
#[inline]
pub fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(field(b, at))
}

/// The little-endian `u32` at byte offset `at`.
#[inline]
pub fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(field(b, at))
}

/// The little-endian `u64` at byte offset `at`.
#[inline]
pub fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(field(b, at))
}

/// Writes `v` little-endian at byte offset `at`.
#[inline]
pub fn wr_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at byte offset `at`.
#[inline]
pub fn wr_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at byte offset `at`.
#[inline]
pub fn wr_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_bytes() {
        let mut b = [0u8; 14];
        wr_u16(&mut b, 0, 0x0102);
        wr_u32(&mut b, 2, 0x0304_0506);
        wr_u64(&mut b, 6, 0x0708_090a_0b0c_0d0e);
        assert_eq!(b, [2, 1, 6, 5, 4, 3, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 9, 8, 7]);
        assert_eq!(rd_u16(&b, 0), 0x0102);
        assert_eq!(rd_u32(&b, 2), 0x0304_0506);
        assert_eq!(rd_u64(&b, 6), 0x0708_090a_0b0c_0d0e);
    }

    #[test]
    #[should_panic]
    fn a_read_past_the_end_is_a_bug() {
        rd_u32(&[0u8; 3], 0);
    }

    proptest! {
        #[test]
        fn round_trip(v16: u16, v32: u32, v64: u64, at in 0usize..8) {
            let mut b = vec![0u8; at + 14];
            wr_u16(&mut b, at, v16);
            wr_u32(&mut b, at + 2, v32);
            wr_u64(&mut b, at + 6, v64);
            prop_assert_eq!(rd_u16(&b, at), v16);
            prop_assert_eq!(rd_u32(&b, at + 2), v32);
            prop_assert_eq!(rd_u64(&b, at + 6), v64);
        }
    }
}
