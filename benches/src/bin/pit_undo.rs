//! Point-in-time costs on a standby, measured in one run:
//! 1. replica apply throughput without undo capture, with it, and with the undo log
//!    encrypted at rest (same write-sets, same file, alternating rounds, medians);
//! 2. the time to open a point-in-time view on 1 GiB and 8 GiB sparse volumes with
//!    the same undo history, at an old point and at a recent one: it follows the undo
//!    written after the point, not the volume size.
//!
//! `cargo run --release -p ferry-benches --bin pit_undo [-- --mib 256 --rounds 3]`
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ferry_api::config::PitConfig;
use ferry_api::size::ByteSize;
use ferry_journal::{Op, Record, Seq};
use ferryd::pit::{Pit, Target};
use ferryd::replica::applier::Applier;
use ferryd::store::base::Base;
use ferryd::store::meta::Meta;

const CLUSTER: [u8; 16] = [7; 16];
const WRITE: u64 = 64 << 10;
const PER_SET: u64 = 16;

struct Rig {
    _dir: tempfile::TempDir,
    base: Arc<Base>,
    applier: Applier,
    applied: Arc<AtomicU64>,
    next: Seq,
}

/// Undo capture of a rig: none, plaintext, or sealed under an at-rest key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Undo {
    Off,
    Plain,
    Sealed,
}

fn rig(parent: &Path, size: u64, undo: Undo, prefill: bool) -> anyhow::Result<Rig> {
    let dir = tempfile::tempdir_in(parent)?;
    let path = dir.path().join("v.img");
    let f = std::fs::File::create(&path)?;
    f.set_len(size)?;
    if prefill {
        // Data everywhere: every write then has a non-zero before-image (worst case).
        use std::os::unix::fs::FileExt;
        let block = vec![0x5au8; 8 << 20];
        let mut at = 0;
        while at < size {
            f.write_all_at(&block, at)?;
            at += block.len() as u64;
        }
        f.sync_all()?;
    }
    let base = Arc::new(Base::open(0, "v", &path, size)?);
    let meta = Arc::new(Meta::open(&dir.path().join("meta"), CLUSTER)?);
    let applied = Arc::new(AtomicU64::new(0));
    let kek = (undo == Undo::Sealed).then(|| Arc::new(ferry_gm::atrest::Kek::from_bytes(&[9; 16])));
    let pit = if undo != Undo::Off {
        Some(Pit::open(
            dir.path().join("undo"),
            CLUSTER,
            PitConfig {
                max_bytes: ByteSize(64 << 30),
                max_age_secs: 0,
                ..PitConfig::default()
            },
            meta.clone(),
            vec![base.clone()],
            applied.clone(),
            kek,
        )?)
    } else {
        None
    };
    let applier = Applier {
        bases: vec![base.clone()],
        meta,
        pit,
        verify: Default::default(),
        applied: applied.clone(),
        outbox: Default::default(),
        resync: Default::default(),
    };
    Ok(Rig {
        _dir: dir,
        base,
        applier,
        applied,
        next: 1,
    })
}

impl Rig {
    /// One write-set of PER_SET random 64 KiB writes.
    fn apply_set(&mut self, x: &mut u64, data: &Bytes) -> anyhow::Result<()> {
        let blocks = self.base.size / WRITE;
        let recs: Vec<(Seq, Record)> = (0..PER_SET)
            .map(|_| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                let s = self.next;
                self.next += 1;
                (
                    s,
                    Record {
                        volume: 0,
                        op: Op::Write,
                        offset: (*x % blocks) * WRITE,
                        length: WRITE as u32,
                        data: data.clone(),
                    },
                )
            })
            .collect();
        let ts = self.next * 1_000_000;
        self.applier.apply_write_set(ts, &recs)?;
        self.applied.store(self.next - 1, Ordering::Release);
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> anyhow::Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let mib = arg("--mib", 256)?;
    let rounds = arg("--rounds", 3)?;
    let parent = std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into());
    let parent = Path::new(&parent);
    let data = Bytes::from(vec![0xa7u8; WRITE as usize]);
    let sets = (mib << 20) / (WRITE * PER_SET);

    println!("== replica apply, {mib} MiB of 64 KiB random writes over data, 16 per write-set, 1 GiB volume");
    let (mut with, mut without, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for undo in [Undo::Off, Undo::Plain, Undo::Sealed] {
            let mut r = rig(parent, 1 << 30, undo, true)?;
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round;
            let t = Instant::now();
            for _ in 0..sets {
                r.apply_set(&mut x, &data)?;
            }
            r.base.sync()?;
            let mbs = mib as f64 / t.elapsed().as_secs_f64();
            let (label, into) = match undo {
                Undo::Off => ("without undo", &mut without),
                Undo::Plain => ("with undo", &mut with),
                Undo::Sealed => ("sealed undo", &mut sealed),
            };
            println!("  round {round} {label:<12} {mbs:8.1} MB/s");
            into.push(mbs);
        }
    }
    let (w, wo, s) = (median(with), median(without), median(sealed));
    println!(
        "  median: without undo {wo:.1} MB/s, with undo {w:.1} MB/s: {:.2}x ({:.0}% overhead)",
        w / wo,
        (1.0 - w / wo) * 100.0
    );
    println!(
        "  median: undo encrypted at rest (SM4-GCM) {s:.1} MB/s: {:.2}x of plaintext undo",
        s / w
    );

    println!("== opening a view: same history (400 write-sets of 16 x 64 KiB) on sparse volumes");
    for gib in [1u64, 8] {
        let mut r = rig(parent, gib << 30, Undo::Plain, false)?;
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..400 {
            r.apply_set(&mut x, &data)?;
        }
        for (label, seq) in [
            ("oldest point (400 entries after it)", PER_SET),
            ("recent point (10 entries after it)", PER_SET * 390),
        ] {
            let mut times = Vec::new();
            for _ in 0..rounds.max(3) {
                let t = Instant::now();
                let pit = r
                    .applier
                    .pit
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("no pit"))?;
                let v = pit.open_view(r.base.clone(), &Target::Seq(seq), None)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                drop(v);
            }
            println!("  {gib} GiB volume, {label:<38} {:8.2} ms", median(times));
        }
    }
    Ok(())
}
