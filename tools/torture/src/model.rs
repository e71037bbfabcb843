//! What the workload did to every block, and the checker's rule.
//!
//! Per block: the last generation *attempted* (sent, answer unknown or failed), the
//! last *acknowledged* and the last *promised* (a FLUSH issued after its write was
//! acknowledged has returned; with `--cache writethrough`, acknowledged = promised).
//! A block read back is accepted only if it is well formed and its generation lies in
//! `[promised, attempted]` (zeros only while nothing was promised): anything older
//! is a lost promised write, anything newer or malformed is corruption.

use crate::block::{decode, Content};

#[derive(Debug, Clone, Copy, Default)]
pub struct BlockState {
    pub attempted: u64,
    pub acked: u64,
    pub promised: u64,
}

/// The workload's history, shared by the writer and the checker.
#[derive(Debug)]
pub struct Model {
    pub seed: u64,
    pub blocks: Vec<BlockState>,
    /// `(block, generation)` acknowledged since the last FLUSH was issued.
    pub unflushed: Vec<(usize, u64)>,
    pub writethrough: bool,
}

/// One block that broke the rule.
#[derive(Debug, Clone)]
pub struct Bad {
    pub block: usize,
    pub found: String,
    pub state: BlockState,
}

impl Model {
    pub fn new(seed: u64, blocks: usize, writethrough: bool) -> Model {
        Model {
            seed,
            blocks: vec![BlockState::default(); blocks],
            unflushed: Vec::new(),
            writethrough,
        }
    }

    /// The next generation for `block`, recorded as attempted.
    pub fn attempt(&mut self, block: usize) -> u64 {
        let b = &mut self.blocks[block];
        b.attempted += 1;
        b.attempted
    }

    pub fn acked(&mut self, block: usize, gen: u64) {
        let b = &mut self.blocks[block];
        b.acked = b.acked.max(gen);
        if self.writethrough {
            b.promised = b.promised.max(gen);
        } else {
            self.unflushed.push((block, gen));
        }
    }

    /// A FLUSH is about to go out: what it will promise once it returns.
    pub fn flush_issued(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.unflushed)
    }

    pub fn flushed(&mut self, covered: &[(usize, u64)]) {
        for &(block, gen) in covered {
            let b = &mut self.blocks[block];
            b.promised = b.promised.max(gen);
        }
    }

    /// The floor the checker holds a block to: promised, or with `acked` the
    /// acknowledged generation (the stricter writethrough reading).
    fn floor(&self, block: usize, acked: bool) -> u64 {
        let b = self.blocks[block];
        if acked {
            b.acked
        } else {
            b.promised
        }
    }

    /// Checks block `block` read as `data` against the rule (floor per `acked`).
    pub fn check(&self, block: usize, data: &[u8], acked: bool) -> Result<(), Bad> {
        let st = self.blocks[block];
        let floor = self.floor(block, acked);
        let bad = |found: String| Bad {
            block,
            found,
            state: st,
        };
        match decode(self.seed, block as u64, data) {
            Content::Zeros if floor == 0 => Ok(()),
            Content::Zeros => Err(bad("zeros".into())),
            Content::Gen(g) if (floor..=st.attempted).contains(&g) && g > 0 => Ok(()),
            Content::Gen(g) => Err(bad(format!("generation {g}"))),
            Content::Bad(why) => Err(bad(why.into())),
        }
    }

    /// Blocks with a promised generation (what a check verifies beyond zeros).
    pub fn promised_blocks(&self) -> usize {
        self.blocks.iter().filter(|b| b.promised > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::encode;

    #[test]
    fn the_rule_accepts_the_window_and_nothing_else() {
        let mut m = Model::new(1, 4, true);
        assert!(
            m.check(0, &vec![0; 4096], true).is_ok(),
            "never written: zeros"
        );
        let g1 = m.attempt(0);
        m.acked(0, g1);
        let g2 = m.attempt(0); // never answered
        assert!(m.check(0, &encode(1, 0, g1), true).is_ok());
        assert!(
            m.check(0, &encode(1, 0, g2), true).is_ok(),
            "attempted may land"
        );
        assert!(
            m.check(0, &vec![0; 4096], true).is_err(),
            "promised then lost"
        );
        assert!(
            m.check(0, &encode(1, 0, 3), true).is_err(),
            "never attempted"
        );
        assert!(m.check(0, &encode(1, 1, g1), true).is_err(), "misplaced");
    }

    #[test]
    fn writeback_promises_only_after_a_flush() {
        let mut m = Model::new(1, 2, false);
        let g = m.attempt(1);
        m.acked(1, g);
        assert!(
            m.check(1, &vec![0; 4096], false).is_ok(),
            "not yet promised"
        );
        assert!(
            m.check(1, &vec![0; 4096], true).is_err(),
            "but acknowledged"
        );
        let covered = m.flush_issued();
        m.flushed(&covered);
        assert!(m.check(1, &vec![0; 4096], false).is_err());
    }
}
