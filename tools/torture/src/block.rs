//! The self-describing 4 KiB block the workload writes: a header naming what it is
//! (magic, block number, generation, run seed) and a checksum over the whole block,
//! the rest pseudo-random from (seed, block, generation). A checker can tell from the
//! bytes alone which write a block holds, or that it is torn, misplaced or garbage.

pub const BLOCK: usize = 4096;
const MAGIC: u64 = 0x6665_7272_7954_4f52; // "ferryTOR"
/// Header: magic, block, generation, seed (u64 LE each), then the checksum.
const SUM_AT: usize = 32;
const PAYLOAD_AT: usize = 40;

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zeros: never written (or written zeros, which the workload never does).
    Zeros,
    /// A well-formed block of this generation.
    Gen(u64),
    /// Anything else, with the reason.
    Bad(&'static str),
}

/// SplitMix64 step: the payload generator (and the schedule's RNG elsewhere).
pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a 64 over the block with the checksum field taken as zero.
fn checksum(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (i, &x) in b.iter().enumerate() {
        let x = if (SUM_AT..PAYLOAD_AT).contains(&i) {
            0
        } else {
            x
        };
        h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn payload(seed: u64, block: u64, gen: u64, out: &mut [u8]) {
    let mut x = seed ^ block.rotate_left(24) ^ gen.rotate_left(48);
    for c in out.chunks_mut(8) {
        let v = splitmix(&mut x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// The block `block` at generation `gen` of run `seed`.
pub fn encode(seed: u64, block: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (i, v) in [MAGIC, block, gen, seed].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    payload(seed, block, gen, &mut b[PAYLOAD_AT..]);
    let sum = checksum(&b);
    b[SUM_AT..PAYLOAD_AT].copy_from_slice(&sum.to_le_bytes());
    b
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(a)
}

/// Classifies the 4 KiB `b` read back from block `block` of run `seed`.
pub fn decode(seed: u64, block: u64, b: &[u8]) -> Content {
    if b.len() != BLOCK {
        return Content::Bad("short block");
    }
    if b.iter().all(|&x| x == 0) {
        return Content::Zeros;
    }
    if u64_at(b, 0) != MAGIC {
        return Content::Bad("no magic (garbage or torn)");
    }
    if u64_at(b, 1) != block {
        return Content::Bad("another block's data (misplaced write)");
    }
    if u64_at(b, 3) != seed {
        return Content::Bad("another run's data");
    }
    if u64_at(b, 4) != checksum(b) {
        return Content::Bad("checksum mismatch (torn or corrupted)");
    }
    let gen = u64_at(b, 2);
    let mut want = vec![0u8; BLOCK - PAYLOAD_AT];
    payload(seed, block, gen, &mut want);
    if want != b[PAYLOAD_AT..] {
        return Content::Bad("payload differs from its generation's");
    }
    Content::Gen(gen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let b = encode(7, 42, 3);
        assert_eq!(decode(7, 42, &b), Content::Gen(3));
        assert_eq!(
            decode(7, 43, &b),
            Content::Bad("another block's data (misplaced write)")
        );
        assert_eq!(decode(8, 42, &b), Content::Bad("another run's data"));
        assert_eq!(decode(7, 42, &vec![0; BLOCK]), Content::Zeros);
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&encode(7, 42, 4)[2048..]);
        assert_eq!(
            decode(7, 42, &torn),
            Content::Bad("checksum mismatch (torn or corrupted)")
        );
        let mut garbage = b.clone();
        garbage[0] ^= 1;
        assert_eq!(
            decode(7, 42, &garbage),
            Content::Bad("no magic (garbage or torn)")
        );
        assert_ne!(encode(7, 42, 3), encode(7, 42, 4));
    }
}
