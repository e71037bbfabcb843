//! Compaction on a `file://` store, against a model of the volume at every write-set:
//! every point the retention grid requires stays restorable, byte-identical, after
//! passes at later and later times; points are only ever dropped, never invented; a
//! crash after the merged packs' upload, or after the manifest but before the deletes,
//! leaves a restorable archive whose garbage a later pass collects; of two racing
//! compactors one wins and nothing is lost; a writer continues over a compaction;
//! object lock keeps every object.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use ferry_archive::compact::grid::secs;
use ferry_archive::compact::{self, gc, level_of, CompactOptions, Grid, Tier};
use ferry_archive::format::manifest::{Kind, Volume};
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::restore::{restore, Target};
use ferry_archive::view::{ArchiveView, ViewOptions};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::ArchiveStore;

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// The model's first write-set time (ns), so ages are never negative.
const T0: u64 = 1_000_000_000_000;

fn volumes() -> Vec<Volume> {
    vec![Volume {
        id: 0,
        name: "vol0".into(),
        size: SIZE,
    }]
}

/// The volume at every write-set boundary: end → (time, image, bookmark).
struct Model {
    data: Vec<u8>,
    seq: u64,
    points: BTreeMap<u64, (u64, Vec<u8>, bool)>,
}

impl Model {
    fn new() -> Model {
        Model {
            data: vec![0; SIZE as usize],
            seq: 0,
            points: BTreeMap::new(),
        }
    }

    /// One write-set at `ts`: 4k overwrites of a small hot set (so merging saves
    /// bytes), a zeroed block, and a bookmark when `mark`.
    fn write_set(&mut self, ts: u64, mark: Option<&str>) -> WriteSet {
        let mut records = Vec::new();
        for i in 0..3 {
            self.seq += 1;
            let block = (self.seq * 7 + i * 13) % 48;
            let off = block * BLOCK;
            let fill = (self.seq % 251) as u8 + 1;
            self.data[off as usize..(off + BLOCK) as usize].fill(fill);
            records.push(Record {
                seq: self.seq,
                volume: 0,
                offset: off,
                len: BLOCK as u32,
                op: Op::Write(Bytes::from(vec![fill; BLOCK as usize])),
            });
        }
        self.seq += 1;
        let off = (self.seq % 40) * BLOCK + 512;
        self.data[off as usize..(off + 1024) as usize].fill(0);
        records.push(Record {
            seq: self.seq,
            volume: 0,
            offset: off,
            len: 1024,
            op: Op::Zero,
        });
        if let Some(label) = mark {
            self.seq += 1;
            records.push(Record {
                seq: self.seq,
                volume: 0,
                offset: 0,
                len: label.len() as u32,
                op: Op::Seal(label.into()),
            });
        }
        self.points
            .insert(self.seq, (ts, self.data.clone(), mark.is_some()));
        WriteSet {
            end_seq: self.seq,
            timestamp_ns: ts,
            records,
        }
    }

    fn grid_points(&self) -> Vec<compact::Point> {
        self.points
            .iter()
            .map(|(&end_seq, (ts, _, mark))| compact::Point {
                end_seq,
                timestamp_ns: *ts,
                bookmark: *mark,
            })
            .collect()
    }
}

/// Every write-set for 60 s, one per 10 s for 5 min, one per minute for 1 h.
fn grid() -> Grid {
    Grid::new(
        secs(60),
        vec![
            Tier {
                period_ns: secs(10),
                horizon_ns: secs(300),
            },
            Tier {
                period_ns: secs(60),
                horizon_ns: secs(3600),
            },
        ],
    )
    .unwrap()
}

fn options() -> CompactOptions {
    CompactOptions {
        pack_bytes: 256 << 10,
        grace: Duration::ZERO,
        ..CompactOptions::new(grid())
    }
}

fn url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

async fn restored(store: &ArchiveStore, seq: u64, dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("out.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    restore(store, "vol0", &Target::Seq(seq), &f)
        .await
        .unwrap_or_else(|e| panic!("restore {seq}: {e}"));
    std::fs::read(&path).unwrap()
}

/// An archive of `n` write-sets, one per second from T0, in small level-0 packs
/// (a bookmark every 97th); the base at sequence 0.
async fn archive(store: &ArchiveStore, n: u64) -> (ArchiveWriter, Model) {
    let mut w = ArchiveWriter::open(store.clone(), "c1", volumes(), 1)
        .await
        .unwrap()
        .with_pack_bytes(32 << 10);
    w.upload_base(0, 0, T0 - 1, |_| Ok(vec![0; SIZE as usize]))
        .await
        .unwrap();
    let mut m = Model::new();
    for i in 0..n {
        let mark = (i % 97 == 5).then(|| format!("bm-{i}"));
        if w.push(m.write_set(T0 + secs(i), mark.as_deref())).unwrap() {
            w.flush().await.unwrap();
        }
    }
    w.flush().await.unwrap();
    (w, m)
}

/// The archive's points now: each a model point, and each restoring its bytes;
/// every point the grid requires at `now` among them.
async fn check(store: &ArchiveStore, m: &Model, now: u64, out: &std::path::Path) -> usize {
    let manifest = store.latest_manifest().await.unwrap().unwrap();
    let held: BTreeSet<u64> = compact::points(store, &manifest)
        .await
        .unwrap()
        .iter()
        .map(|p| p.end_seq)
        .collect();
    let pts = m.grid_points();
    let need = grid().required(&pts, now);
    for (p, need) in pts.iter().zip(need) {
        assert!(
            !need || held.contains(&p.end_seq),
            "point {} (age {} s) is required but gone",
            p.end_seq,
            (now - p.timestamp_ns) / 1_000_000_000
        );
    }
    // Every point when few (a restore replays the packs from the base: quadratic),
    // else a spread of them and every bookmark.
    let step = held.len() / 80 + 1;
    for (i, &seq) in held.iter().enumerate() {
        let (_, img, mark) = m.points.get(&seq).expect("a point the model has");
        if i % step == 0 || *mark || i + 1 == held.len() {
            assert!(
                restored(store, seq, out).await == *img,
                "point {seq} differs"
            );
        }
    }
    held.len()
}

fn stored_bytes(dir: &std::path::Path) -> u64 {
    walk(dir).iter().map(|p| p.metadata().unwrap().len()).sum()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn every_required_point_survives_compaction_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let (_w, m) = archive(&store, 900).await;
    let last = T0 + secs(899);
    let before = check(&store, &m, last, out.path()).await;
    assert_eq!(before, 900);
    let bytes_before = stored_bytes(dir.path());
    let mut held = before;
    // Passes as time goes by: points only ever go away.
    for later in [30, 200, 400, 1000, 2500] {
        let now = last + secs(later);
        let (r, g) = compact::compact(&store, &options(), now)
            .await
            .unwrap()
            .unwrap_or_default();
        let now_held = check(&store, &m, now, out.path()).await;
        assert!(now_held <= held, "{later}: {now_held} > {held}");
        held = now_held;
        eprintln!("after +{later} s: {held} points, {r:?}, {g:?}");
    }
    let manifest = store.latest_manifest().await.unwrap().unwrap();
    let levels: BTreeSet<u8> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Pack)
        .map(|e| level_of(&e.name))
        .collect();
    assert!(levels.contains(&2), "{levels:?}");
    assert!(held < 100, "{held} points after an hour and a half");
    // A view (what `archive export` serves) of merged packs reads the same bytes.
    let points: Vec<u64> = compact::points(&store, &manifest)
        .await
        .unwrap()
        .iter()
        .map(|p| p.end_seq)
        .collect();
    for &seq in points.iter().step_by(7).chain(points.last()) {
        let view = ArchiveView::open(
            store.clone(),
            "vol0",
            &Target::Seq(seq),
            ViewOptions::default(),
        )
        .await
        .unwrap();
        let got = view.read(0, SIZE).await.unwrap();
        assert!(got == m.points[&seq].1, "view at {seq} differs");
    }
    let bytes_after = stored_bytes(dir.path());
    assert!(
        bytes_after * 3 < bytes_before,
        "{bytes_after} of {bytes_before} bytes left"
    );
}

/// Past the longest horizon the oldest packs go once a newer base exists; the old
/// base goes with them; what remains still restores exactly.
#[tokio::test]
async fn packs_past_the_grid_go_once_a_newer_base_exists() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let (mut w, mut m) = archive(&store, 300).await;
    let base_seq = m.seq;
    let image = m.data.clone();
    w.upload_base(0, base_seq, T0 + secs(300), |_| Ok(image.clone()))
        .await
        .unwrap();
    for i in 300..400 {
        w.push(m.write_set(T0 + secs(i), None)).unwrap();
    }
    w.flush().await.unwrap();
    // The first 300 s are past the hour; the rest not.
    let now = T0 + secs(300 + 3600);
    compact::compact(&store, &options(), now).await.unwrap();
    let manifest = store.latest_manifest().await.unwrap().unwrap();
    let bases: Vec<u64> = manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Base)
        .map(|e| e.last_seq)
        .collect();
    assert_eq!(bases, vec![base_seq], "the old base is dropped");
    assert!(manifest
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Pack)
        .all(|e| e.last_seq > base_seq));
    check(&store, &m, now, out.path()).await;
    let f = std::fs::File::create(out.path().join("x")).unwrap();
    let e = restore(&store, "vol0", &Target::Seq(10), &f)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no base image"), "{e}");
    assert!(restored(&store, base_seq, out.path()).await == m.points[&base_seq].1);
}

/// A crash after the merged packs are uploaded, before the manifest: the archive is
/// as before; the orphans are collected; a new pass does the work.
#[tokio::test]
async fn a_crash_before_the_manifest_leaves_only_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let (_w, m) = archive(&store, 400).await;
    let now = T0 + secs(1000);
    let p = compact::prepare(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    let orphans: Vec<String> = p.outputs().map(String::from).collect();
    assert!(!orphans.is_empty());
    drop(p);
    assert_eq!(check(&store, &m, T0 + secs(399), out.path()).await, 400);
    let g = gc::collect(&store, Duration::ZERO, ferry_now())
        .await
        .unwrap();
    assert!(g.deleted >= orphans.len() as u64, "{g:?}");
    for o in &orphans {
        assert!(!dir.path().join(o).exists(), "{o} not collected");
    }
    compact::compact(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    check(&store, &m, now, out.path()).await;
}

/// A crash after the manifest, before the deletes: the merged inputs stay as
/// garbage, the archive restores from the new manifest; a later collection deletes
/// them; a grace period keeps young garbage.
#[tokio::test]
async fn a_crash_before_the_deletes_leaves_only_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let (_w, m) = archive(&store, 400).await;
    let now = T0 + secs(1000);
    let p = compact::prepare(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    let old = p.from.clone();
    compact::commit(&store, p, Duration::from_secs(3600))
        .await
        .unwrap()
        .unwrap();
    let gone: Vec<String> = old
        .entries
        .iter()
        .filter(|e| e.kind == Kind::Pack)
        .map(|e| e.name.clone())
        .collect();
    assert!(gone.iter().all(|n| dir.path().join(n).exists()));
    check(&store, &m, now, out.path()).await;
    let young = gc::collect(&store, Duration::from_secs(3600), ferry_now())
        .await
        .unwrap();
    assert_eq!(young.deleted, 0, "everything is younger than the grace");
    let g = gc::collect(&store, Duration::ZERO, ferry_now())
        .await
        .unwrap();
    assert!(g.deleted > gone.len() as u64 / 2, "{g:?}");
    let manifests = std::fs::read_dir(dir.path().join("manifest"))
        .unwrap()
        .count();
    assert_eq!(manifests, 1, "older generations collected");
    check(&store, &m, now, out.path()).await;
}

/// Two compactors on the same manifest: the first commit wins, the second finds its
/// inputs gone and stands down; nothing is lost, its uploads are garbage.
#[tokio::test]
async fn of_two_racing_compactors_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let (_w, m) = archive(&store, 400).await;
    let now = T0 + secs(1000);
    let a = compact::prepare(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    let b = compact::prepare(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    let (a_out, b_out): (Vec<String>, Vec<String>) = (
        a.outputs().map(String::from).collect(),
        b.outputs().map(String::from).collect(),
    );
    assert!(a_out.iter().all(|n| !b_out.contains(n)), "names differ");
    let grace = Duration::from_secs(3600);
    assert!(compact::commit(&store, a, grace).await.unwrap().is_some());
    assert!(compact::commit(&store, b, grace).await.unwrap().is_none());
    let manifest = store.latest_manifest().await.unwrap().unwrap();
    assert!(manifest.entries.iter().any(|e| a_out.contains(&e.name)));
    assert!(!manifest.entries.iter().any(|e| b_out.contains(&e.name)));
    check(&store, &m, now, out.path()).await;
    gc::collect(&store, Duration::ZERO, ferry_now())
        .await
        .unwrap();
    assert!(b_out.iter().all(|n| !dir.path().join(n).exists()));
    check(&store, &m, now, out.path()).await;
}

/// A compaction commits between a writer's packs: the writer's next commit finds
/// the compacted generation, adds to it, and loses nothing.
#[tokio::test]
async fn a_writer_continues_over_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let (mut w, mut m) = archive(&store, 400).await;
    let now = T0 + secs(1000);
    compact::compact(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    // A second pass while the writer is idle: the generation it would create next
    // was committed and then collected; creating it again must not count as a commit.
    compact::compact(&store, &options(), now + secs(2000))
        .await
        .unwrap()
        .unwrap();
    let next = w.manifest().generation + 1;
    assert!(!dir
        .path()
        .join(format!("manifest/{next:020}.json"))
        .exists());
    for i in 400..420 {
        w.push(m.write_set(T0 + secs(i), None)).unwrap();
    }
    assert_eq!(w.flush().await.unwrap(), m.seq);
    assert!(w.manifest().entries.iter().any(|e| level_of(&e.name) > 0));
    let newest = store.latest_manifest().await.unwrap().unwrap();
    assert_eq!(
        newest.last_pack_seq(),
        m.seq,
        "the writer's packs are the newest's"
    );
    check(&store, &m, now + secs(2000), out.path()).await;
    // A compactor racing the writer the other way: its commit re-applies on top.
    let p = compact::prepare(&store, &options(), now + secs(3000))
        .await
        .unwrap()
        .unwrap();
    w.push(m.write_set(T0 + secs(420), None)).unwrap();
    w.flush().await.unwrap();
    assert!(compact::commit(&store, p, Duration::from_secs(3600))
        .await
        .unwrap()
        .is_some());
    let manifest = store.latest_manifest().await.unwrap().unwrap();
    assert_eq!(manifest.last_pack_seq(), m.seq, "the writer's pack kept");
    check(&store, &m, now + secs(3000), out.path()).await;
}

/// An encrypted archive compacts the same: merged packs are sealed under their own
/// names, and restore opens them with the key.
#[tokio::test]
async fn an_encrypted_archive_compacts_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let kek = ferry_gm::atrest::Kek::from_bytes(&[7; 16]);
    let store = ArchiveStore::open(&url(dir.path()))
        .unwrap()
        .with_kek(Some(kek));
    let (_w, m) = archive(&store, 300).await;
    let now = T0 + secs(1000);
    let (r, _) = compact::compact(&store, &options(), now)
        .await
        .unwrap()
        .unwrap();
    assert!(r.packs_out > 0 && r.sets_out < r.sets_in, "{r:?}");
    let merged = walk(dir.path())
        .into_iter()
        .find(|p| p.to_string_lossy().contains("/L1/"))
        .expect("a merged pack");
    assert_eq!(&std::fs::read(merged).unwrap()[..8], b"FERRYEO\0", "sealed");
    check(&store, &m, now, out.path()).await;
}

/// Under object lock nothing younger than the lock is deleted; the archive is
/// compacted all the same.
#[tokio::test]
async fn object_lock_keeps_every_object() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open_locked(&url(dir.path()), Some(1)).unwrap();
    let (_w, m) = archive(&store, 400).await;
    let files = walk(dir.path()).len();
    // The file store's clock is real time: the lock holds for a day from now.
    let now = ferry_now();
    let opts = options();
    // (Compaction's clock is the write-sets' one, collection's the store's.)
    let p = compact::prepare(&store, &opts, T0 + secs(1000))
        .await
        .unwrap()
        .unwrap();
    compact::commit(&store, p, Duration::from_secs(3600))
        .await
        .unwrap()
        .unwrap();
    let g = gc::collect(&store, Duration::ZERO, now).await.unwrap();
    assert_eq!(g.deleted, 0, "{g:?}");
    assert!(g.locked > 0, "{g:?}");
    assert!(
        walk(dir.path()).len() > files,
        "nothing deleted, merged packs added"
    );
    let young = store.list_meta("packs").await.unwrap().remove(0);
    let e = store.delete(&young, now).await.unwrap_err();
    assert!(
        e.to_string().contains("under object lock for 1 days"),
        "{e}"
    );
    check(&store, &m, T0 + secs(1000), out.path()).await;
    // A day later the lock has expired.
    let g = gc::collect(&store, Duration::ZERO, now + secs(86_400 + 60))
        .await
        .unwrap();
    assert!(g.deleted > 0 && g.locked == 0, "{g:?}");
    check(&store, &m, T0 + secs(1000), out.path()).await;
}

fn ferry_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
