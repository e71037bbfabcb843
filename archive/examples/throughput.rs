//! Archive throughput on one store: write-sets archived as packs (encode, zstd, SM3,
//! put, manifest) against a plain put of the same bytes in objects of the pack size,
//! and a restore of the result. The store is a fresh directory, or a fresh prefix under
//! the URL given (`s3://…` with the AWS_* environment).
//!
//! `cargo run --release -p ferry-archive --example throughput -- [URL] [MiB]`
use std::time::Instant;

use bytes::Bytes;
use ferry_archive::format::manifest::Volume;
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::restore::{restore, Target};
use ferry_archive::writer::{ArchiveWriter, DEFAULT_PACK_BYTES};
use ferry_archive::ArchiveStore;

const WRITE: usize = 64 << 10;
const PER_SET: usize = 64;

/// 64 KiB writes, every other 4 KiB block pseudo-random and the rest zeros: about
/// 2:1 for zstd, as a guess at a mixed workload.
fn write_sets(mib: usize) -> Vec<WriteSet> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut seq = 0u64;
    let writes = (mib << 20) / WRITE;
    let mut sets = Vec::new();
    for chunk in 0..writes.div_ceil(PER_SET) {
        let mut records = Vec::new();
        for i in 0..PER_SET.min(writes - chunk * PER_SET) {
            let mut data = vec![0u8; WRITE];
            for block in data.chunks_mut(8192) {
                for w in block[..4096].chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            seq += 1;
            records.push(Record {
                seq,
                volume: 0,
                offset: ((chunk * PER_SET + i) * WRITE) as u64,
                len: WRITE as u32,
                op: Op::Write(Bytes::from(data)),
            });
        }
        sets.push(WriteSet {
            end_seq: seq,
            timestamp_ns: seq,
            records,
        });
    }
    sets
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = tempfile::tempdir()?;
    let base = args
        .get(1)
        .filter(|u| !u.is_empty())
        .cloned()
        .unwrap_or_else(|| format!("file://{}", dir.path().display()));
    let mib: usize = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let run = format!("{}/run-{}", base.trim_end_matches('/'), std::process::id());
    let size = (mib as u64) << 20;
    let store = ArchiveStore::open(&format!("{run}/archive"))?;
    let vols = vec![Volume {
        id: 0,
        name: "vol0".into(),
        size,
    }];
    let mut w = ArchiveWriter::open(store.clone(), "bench", vols, 1).await?;
    w.upload_base(0, 0, 0, |i| {
        Ok(vec![0; ((size - (i << 20)).min(1 << 20)) as usize])
    })
    .await?;
    let sets = write_sets(mib);
    let raw: u64 = sets.iter().map(|s| s.encoded_len() as u64).sum();

    let t = Instant::now();
    for ws in sets {
        if w.push(ws)? {
            w.flush().await?;
        }
    }
    w.flush().await?;
    let archive_s = t.elapsed().as_secs_f64();
    let packed = w.packed();

    // The same bytes, uncompressed and unhashed, in objects of the pack size.
    let plain = ArchiveStore::open(&format!("{run}/plain"))?;
    let object = vec![0x5au8; DEFAULT_PACK_BYTES];
    let t = Instant::now();
    let mut put = 0u64;
    let mut n = 0;
    while put < raw {
        let len = (raw - put).min(object.len() as u64) as usize;
        plain
            .put(&format!("o/{n:08}"), object[..len].to_vec())
            .await?;
        put += len as u64;
        n += 1;
    }
    let plain_s = t.elapsed().as_secs_f64();

    let out = dir.path().join("restored.img");
    let f = std::fs::File::create(&out)?;
    let t = Instant::now();
    let r = restore(&store, "vol0", &Target::Latest, &f).await?;
    let restore_s = t.elapsed().as_secs_f64();

    println!("store {run}");
    println!(
        "archive: {raw} write-set bytes in {archive_s:.2} s = {:.1} MB/s ({} bytes stored, ratio {:.2})",
        mb_s(raw, archive_s),
        packed.stored,
        raw as f64 / packed.stored.max(1) as f64
    );
    println!(
        "plain put: {put} bytes in {n} objects in {plain_s:.2} s = {:.1} MB/s",
        mb_s(put, plain_s)
    );
    println!(
        "restore: {size} bytes ({} downloaded, {} packs) in {restore_s:.2} s = {:.1} MB/s of volume",
        r.bytes_downloaded,
        r.packs_read,
        mb_s(size, restore_s)
    );
    Ok(())
}
