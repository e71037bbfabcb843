//! Bytes stored per byte written with compaction, and compaction's throughput: a
//! workload of incompressible writes spread over `HOURS` hours of write-set times is
//! archived on a fresh `file://` directory (8 MiB packs), then compacted under the
//! issue's grid ("every write-set for 1h, 1 per minute for 24h, 1 per hour for 30d")
//! as if 2 hours, 2 days and 31 days had passed (a new base and one more write-set
//! before the last), the
//! garbage collected at once (no grace). Stored bytes are every file's size
//! (packs, bases, chunks, manifests).
//!
//! `cargo run --release -p ferry-archive --example compaction -- rand4k|seq1m [MiB] [HOURS] [VOLUME_MiB]`
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_archive::compact::grid::secs;
use ferry_archive::compact::{self, CompactOptions, Grid, Tier};
use ferry_archive::format::manifest::Volume;
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::ArchiveStore;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        for w in v.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
        v
    }
}

fn issue_grid() -> Grid {
    Grid::new(
        secs(3600),
        vec![
            Tier {
                period_ns: secs(60),
                horizon_ns: secs(86_400),
            },
            Tier {
                period_ns: secs(3600),
                horizon_ns: secs(30 * 86_400),
            },
        ],
    )
    .expect("a valid grid")
}

fn stored(dir: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("readable").flatten() {
        let p = e.path();
        n += if p.is_dir() {
            stored(&p)
        } else {
            p.metadata().map_or(0, |m| m.len())
        };
    }
    n
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let workload = args.get(1).map_or("rand4k", String::as_str).to_string();
    let mib: u64 = args.get(2).map_or(Ok(512), |s| s.parse())?;
    let hours: u64 = args.get(3).map_or(Ok(4), |s| s.parse())?;
    let vol_mib: u64 = args.get(4).map_or(Ok(128), |s| s.parse())?;
    let write = match workload.as_str() {
        "rand4k" => 4096u64,
        "seq1m" => 1 << 20,
        w => return Err(format!("workload '{w}': rand4k or seq1m").into()),
    };
    let size = vol_mib << 20;
    let dir = tempfile::tempdir()?;
    let store = ArchiveStore::open(&format!("file://{}", dir.path().display()))?;
    let vols = vec![Volume {
        id: 0,
        name: "vol0".into(),
        size,
    }];
    let mut w = ArchiveWriter::open(store.clone(), "bench", vols, 1).await?;
    let t0 = compact::wall_clock_ns() - secs(40 * 86_400);
    w.upload_base(0, 0, t0, |_| Ok(vec![0; 1 << 20])).await?;
    let mut image = vec![0u8; size as usize];
    let writes = (mib << 20) / write;
    // Four writes per write-set (a burst of client writes), evenly spread in time.
    let per_set = 4u64;
    let sets = writes.div_ceil(per_set);
    let step = secs(hours * 3600) / sets.max(1);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut seq, mut at) = (0u64, 0u64);
    let started = Instant::now();
    for s in 0..sets {
        let mut records = Vec::new();
        for _ in 0..per_set.min(writes - s * per_set) {
            let off = match write {
                4096 => (rng.next() % (size / 4096)) * 4096,
                _ => {
                    let o = at;
                    at = (at + write) % size;
                    o
                }
            };
            let data = rng.fill(write as usize);
            image[off as usize..(off + write) as usize].copy_from_slice(&data);
            seq += 1;
            records.push(Record {
                seq,
                volume: 0,
                offset: off,
                len: write as u32,
                op: Op::Write(Bytes::from(data)),
            });
        }
        let ws = WriteSet {
            end_seq: seq,
            timestamp_ns: t0 + s * step,
            records,
        };
        if w.push(ws)? {
            w.flush().await?;
        }
    }
    w.flush().await?;
    let written = writes * write;
    let end = t0 + sets * step;
    println!(
        "{workload}: {} MiB written in {sets} write-sets over {hours} h on a {vol_mib} MiB volume ({:.1?} to archive)",
        written >> 20,
        started.elapsed()
    );
    let report = |what: &str, bytes: u64| {
        println!(
            "  {what:<28} stored {:>8.1} MiB = {:.3} bytes per byte written",
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / written as f64
        );
    };
    report("uploaded (level 0)", stored(dir.path()));
    let opts = CompactOptions {
        grace: Duration::ZERO,
        max_input_bytes: u64::MAX,
        ..CompactOptions::new(issue_grid())
    };
    for (label, later) in [
        ("+2 h (1 per minute)", secs(2 * 3600)),
        ("+2 d (1 per hour)", secs(2 * 86_400)),
    ] {
        pass(&store, &opts, end + later, label).await?;
        report(label, stored(dir.path()));
    }
    let img = image.clone();
    w.upload_base(0, seq, end, |i| {
        let a = (i << 20) as usize;
        Ok(img[a..(a + (1 << 20)).min(img.len())].to_vec())
    })
    .await?;
    // The primary keeps writing: the newest pack (where the writer continues) is never
    // dropped, so one more write-set makes the workload's packs droppable.
    w.push(WriteSet {
        end_seq: seq + 1,
        timestamp_ns: end + secs(1),
        records: vec![Record {
            seq: seq + 1,
            volume: 0,
            offset: 0,
            len: 4096,
            op: Op::Write(Bytes::from(rng.fill(4096))),
        }],
    })?;
    w.flush().await?;
    report("+ a new base at the end", stored(dir.path()));
    pass(
        &store,
        &opts,
        end + secs(31 * 86_400),
        "+31 d (past the grid)",
    )
    .await?;
    report("+31 d (past the grid)", stored(dir.path()));
    Ok(())
}

async fn pass(
    store: &ArchiveStore,
    opts: &CompactOptions,
    now: u64,
    label: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let r = compact::compact(store, opts, now).await?;
    let took = t.elapsed();
    if let Some((r, g)) = r {
        let mb = r.bytes_in as f64 / 1e6;
        println!(
            "  {label}: {} packs ({:.1} MB, {} write-sets) -> {} packs ({:.1} MB, {} write-sets), {} dropped, {} objects deleted, in {took:.2?}: {:.1} MB/s of input",
            r.packs_in,
            mb,
            r.sets_in,
            r.packs_out,
            r.bytes_out as f64 / 1e6,
            r.sets_out,
            r.dropped,
            g.deleted,
            mb / took.as_secs_f64()
        );
    }
    Ok(())
}
