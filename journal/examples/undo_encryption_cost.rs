//! What encrypting the undo log costs: durable appends (O_DIRECT + fdatasync, as the
//! standby's capture does) of write-set-sized entries, and 4 KiB view reads in place
//! (`UndoImageReader`), each plain and sealed, in alternating rounds.
//!
//! `cargo run --release -p ferry-journal --example undo_encryption_cost -- DIR SECS ROUNDS`
//! prints the median of each and the sealed/plain ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_gm::atrest::Kek;
use ferry_journal::undo::{
    extent_data_offsets, EntryKind, UndoEntry, UndoExtent, UndoImageReader, UndoLog,
};

const SEGMENT: u64 = 32 << 20;

/// Appends entries of `extents` × `size` bytes for `secs`; returns MB/s of
/// before-image bytes.
fn appends(dir: &Path, key: Option<Arc<Kek>>, extents: usize, size: usize, secs: f64) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let (mut log, _) = UndoLog::open_with_key(dir, [1; 16], SEGMENT, key).expect("open");
    let data = Bytes::from((0..size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    let start = Instant::now();
    let mut seq = 1u64;
    let mut bytes = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let e = UndoEntry {
            first_seq: seq,
            last_seq: seq,
            timestamp_ns: seq,
            extents: (0..extents)
                .map(|i| {
                    UndoExtent::data(
                        0,
                        (seq * extents as u64 + i as u64) * size as u64,
                        data.clone(),
                    )
                })
                .collect(),
            kind: EntryKind::WriteSet,
        };
        log.append(&e).expect("append");
        // Retention keeps the file system from filling: keep the newest segments.
        if log.segment_count() > 4 {
            let cut: Vec<u64> = log.release_points().map(|p| p.seq).collect();
            if let Some(&s) = cut.first() {
                log.release_before(s).expect("release");
            }
        }
        bytes += (extents * size) as u64;
        seq += 1;
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Random 4 KiB reads of before-images in place for `secs` (page cache warm);
/// returns reads per second.
fn view_reads(dir: &Path, key: Option<Arc<Kek>>, secs: f64) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let (mut log, _) = UndoLog::open_with_key(dir, [1; 16], SEGMENT, key.clone()).expect("open");
    let data = Bytes::from(vec![7u8; 1 << 20]);
    // 24 MiB of entries: all in segment 1.
    for seq in 1..=24u64 {
        let e = UndoEntry {
            first_seq: seq,
            last_seq: seq,
            timestamp_ns: seq,
            extents: vec![UndoExtent::data(0, seq << 20, data.clone())],
            kind: EntryKind::WriteSet,
        };
        log.append(&e).expect("append");
    }
    let mut spots = Vec::new();
    for p in log.points() {
        let e = log.read_entry(&p.position).expect("read");
        let at = extent_data_offsets(&p.position, &e)[0].expect("data");
        spots.push((p.position, at));
    }
    let reader = UndoImageReader::open(dir, 1, key.as_deref()).expect("reader");
    let mut buf = vec![0u8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (pos, at) = spots[(x % spots.len() as u64) as usize];
        // Unaligned offsets: most reads span two seal chunks.
        let off = (x >> 20) % ((1 << 20) - 4096);
        reader.read_image(&pos, at + off, &mut buf).expect("read");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// CPU only: MB/s of encoding one 8 MiB entry, plain or sealed.
fn encode(key: Option<&ferry_gm::atrest::DataKey>, secs: f64) -> f64 {
    let data = Bytes::from(vec![7u8; 1 << 20]);
    let e = UndoEntry {
        first_seq: 1,
        last_seq: 1,
        timestamp_ns: 1,
        extents: (0..8)
            .map(|i| UndoExtent::data(0, i << 20, data.clone()))
            .collect(),
        kind: EntryKind::WriteSet,
    };
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let b = match key {
            Some(dk) => ferry_journal::undo::encode_sealed_undo_entry(&e, 1, 4096, dk),
            None => ferry_journal::undo::encode_undo_entry(&e, 1),
        };
        std::hint::black_box(b.expect("encode"));
        n += 8 << 20;
    }
    n as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(
        args.get(1)
            .map(String::as_str)
            .unwrap_or("/var/tmp/undo-enc-bench"),
    );
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let kek = Arc::new(Kek::from_bytes(&[7; 16]));
    let dk = ferry_gm::atrest::DataKey::from_bytes(&[9; 16]);
    let (mut plain, mut sealed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(encode(None, secs));
        sealed.push(encode(Some(&dk), secs));
    }
    let (p, s) = (median(plain), median(sealed));
    println!("encode one 8 MiB entry (CPU, one thread): plain {p:.0} MB/s, sealed {s:.0} MB/s, ratio {:.2}", s / p);
    let cases: [(&str, usize, usize); 2] = [
        (
            "write-set of 32 x 4 KiB before-images (128 KiB entries)",
            32,
            4096,
        ),
        ("8 MiB capture pieces (8 x 1 MiB before-images)", 8, 1 << 20),
    ];
    for (name, extents, size) in cases {
        let (mut plain, mut sealed) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            plain.push(appends(dir, None, extents, size, secs));
            sealed.push(appends(dir, Some(kek.clone()), extents, size, secs));
        }
        let (p, s) = (median(plain), median(sealed));
        println!(
            "append, {name}: plain {p:.0} MB/s, sealed {s:.0} MB/s, ratio {:.2}",
            s / p
        );
    }
    let (mut plain, mut sealed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(view_reads(dir, None, secs));
        sealed.push(view_reads(dir, Some(kek.clone()), secs));
    }
    let (p, s) = (median(plain), median(sealed));
    println!("view reads, 4 KiB unaligned, page cache warm: plain {p:.0}/s, sealed {s:.0}/s, ratio {:.2}", s / p);
    let _ = std::fs::remove_dir_all(dir);
}
