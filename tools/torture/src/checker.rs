//! Reading a volume back and holding it to the model's rule (see [`crate::model`]):
//! through NBD on a primary, or straight from a node's backing file.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_nbd::testclient::TestClient;

use crate::block::BLOCK;
use crate::model::{Bad, Model};

/// Blocks per NBD read.
const CHUNK: usize = 64;

/// What one check found.
pub struct Outcome {
    /// Blocks that had a promised generation to hold.
    pub promised: usize,
    pub bad: Vec<Bad>,
}

fn judge(model: &Model, first: usize, data: &[u8], acked: bool, bad: &mut Vec<Bad>) {
    for (i, b) in data.chunks(BLOCK).enumerate() {
        if let Err(e) = model.check(first + i, b, acked) {
            bad.push(e);
        }
    }
}

/// Reads every block of `volume` through NBD at `addr`.
pub fn via_nbd(addr: SocketAddr, volume: &str, model: &Model, acked: bool) -> Result<Outcome> {
    let (mut c, info) = TestClient::open(addr, volume).context("NBD open for the check")?;
    let n = model.blocks.len();
    if info.size < (n * BLOCK) as u64 {
        bail!(
            "export is {} bytes, the workload wrote {} blocks",
            info.size,
            n
        );
    }
    let mut bad = Vec::new();
    for first in (0..n).step_by(CHUNK) {
        let count = CHUNK.min(n - first);
        let data = c
            .read((first * BLOCK) as u64, (count * BLOCK) as u32)
            .context("NBD read for the check")?;
        match data {
            Ok(d) => judge(model, first, &d, acked, &mut bad),
            Err(errno) => bail!("NBD read of block {first} failed: error {errno}"),
        }
    }
    let _ = c.disconnect();
    Ok(Outcome {
        promised: model.promised_blocks(),
        bad,
    })
}

/// Reads every block from a node's backing file.
pub fn via_file(path: &Path, model: &Model, acked: bool) -> Result<Outcome> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut bad = Vec::new();
    let mut buf = vec![0u8; CHUNK * BLOCK];
    let n = model.blocks.len();
    for first in (0..n).step_by(CHUNK) {
        let count = CHUNK.min(n - first);
        f.read_exact(&mut buf[..count * BLOCK])
            .with_context(|| format!("read {}", path.display()))?;
        judge(model, first, &buf[..count * BLOCK], acked, &mut bad);
    }
    Ok(Outcome {
        promised: model.promised_blocks(),
        bad,
    })
}

/// The first block where two backing files differ (`None`: byte-identical).
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    let (x, y) = (
        std::fs::read(a).with_context(|| format!("read {}", a.display()))?,
        std::fs::read(b).with_context(|| format!("read {}", b.display()))?,
    );
    if x.len() != y.len() {
        return Ok(Some(x.len().min(y.len()) as u64 / BLOCK as u64));
    }
    Ok(x.iter()
        .zip(&y)
        .position(|(p, q)| p != q)
        .map(|i| (i / BLOCK) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::encode;

    #[test]
    fn a_file_with_a_lost_promised_write_is_caught_and_a_difference_located() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Model::new(9, 4, true);
        let mut img = vec![0u8; 4 * BLOCK];
        for b in 0..3 {
            let g = m.attempt(b);
            m.acked(b, g);
            img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&encode(9, b as u64, g));
        }
        let good = dir.path().join("good.img");
        std::fs::write(&good, &img).unwrap();
        let out = via_file(&good, &m, false).unwrap();
        assert!(out.bad.is_empty() && out.promised == 3);
        // Block 1 promised at generation 2 but the file still holds generation 1.
        let g = m.attempt(1);
        m.acked(1, g);
        let out = via_file(&good, &m, false).unwrap();
        assert_eq!(out.bad.len(), 1);
        assert_eq!(
            (out.bad[0].block, out.bad[0].found.as_str()),
            (1, "generation 1")
        );
        img[2 * BLOCK + 100] ^= 0xff;
        let torn = dir.path().join("torn.img");
        std::fs::write(&torn, &img).unwrap();
        assert_eq!(first_difference(&good, &torn).unwrap(), Some(2));
        assert_eq!(first_difference(&good, &good).unwrap(), None);
    }
}
