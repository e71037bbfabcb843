//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use ferry_journal::{EngineChoice, JournalOptions, RecoveryMode};

pub const CLUSTER: [u8; 16] = *b"ferry-test-clust";
pub const MIB: u64 = 1 << 20;

/// Engines to run a test against. io_uring is skipped, with the reason printed,
/// where the kernel or a seccomp profile does not allow it.
pub fn engines() -> Vec<EngineChoice> {
    let mut v = vec![EngineChoice::Std];
    match ferry_journal::engine::probe_io_uring() {
        Ok(()) => v.push(EngineChoice::IoUring),
        Err(reason) => {
            ferry_testkit::skip("io_uring variant", &reason.to_string());
        }
    }
    v
}

pub fn opts(dir: &Path, engine: EngineChoice) -> JournalOptions {
    let mut o = JournalOptions::new(dir, CLUSTER);
    o.segment_size = MIB;
    o.capacity = 8 * MIB;
    o.engine = engine;
    o.recovery = RecoveryMode::TolerateTornTail;
    o.max_batch_bytes = 256 << 10;
    o.queue_records = 64;
    o
}

/// Deterministic payload for `seq`: verifiable after a crash.
pub fn payload(seq: u64, len: usize) -> Bytes {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    Bytes::from(v)
}

/// Small deterministic PRNG (no extra dependency).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
