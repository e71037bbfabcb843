//! The archive end to end on a `file://` store: write-sets in, restore at a bookmark,
//! a sequence, a time and the latest point, byte-identical to a model of the volume;
//! base images reuse unchanged chunks; a changed, missing or reordered object is named;
//! a stale writer (an older epoch, or one that lost the race for a manifest
//! generation) is refused. A view (what `archive export` serves) reads each point as
//! restore writes it, reports holes, and names a changed chunk on the read needing it.
use bytes::Bytes;
use ferry_archive::format::base::chunk_object;
use ferry_archive::format::manifest::Volume;
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::format::sm3_hex;
use ferry_archive::restore::{restore, Target};
use ferry_archive::view::{ArchiveView, ViewOptions};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::{ArchiveStore, StoreError};

const SIZE: u64 = 4 << 20;

fn volumes() -> Vec<Volume> {
    vec![Volume {
        id: 0,
        name: "vol0".into(),
        size: SIZE,
    }]
}

/// The volume as the primary sees it, and its image at every write-set boundary.
struct Model {
    data: Vec<u8>,
    seq: u64,
    snapshots: Vec<(u64, u64, Vec<u8>)>,
}

impl Model {
    fn new() -> Model {
        Model {
            data: vec![0; SIZE as usize],
            seq: 0,
            snapshots: vec![(0, 0, vec![0; SIZE as usize])],
        }
    }

    /// A write-set of `n` writes and a trim, timestamped `ts`, optionally sealed.
    fn write_set(&mut self, n: u64, fill: u8, ts: u64, seal: Option<&str>) -> WriteSet {
        let mut records = Vec::new();
        for i in 0..n {
            self.seq += 1;
            let off = (self.seq * 37 + i * 4096 * 7) % (SIZE - 65536) / 512 * 512;
            let len = 512 * (1 + (self.seq % 64));
            self.data[off as usize..(off + len) as usize].fill(fill);
            records.push(Record {
                seq: self.seq,
                volume: 0,
                offset: off,
                len: len as u32,
                op: Op::Write(Bytes::from(vec![fill; len as usize])),
            });
        }
        self.seq += 1;
        let off = (self.seq * 4096) % (SIZE - 8192);
        self.data[off as usize..(off + 8192) as usize].fill(0);
        records.push(Record {
            seq: self.seq,
            volume: 0,
            offset: off,
            len: 8192,
            op: Op::Trim,
        });
        if let Some(label) = seal {
            self.seq += 1;
            records.push(Record {
                seq: self.seq,
                volume: 0,
                offset: 0,
                len: label.len() as u32,
                op: Op::Seal(label.into()),
            });
        }
        self.snapshots.push((self.seq, ts, self.data.clone()));
        WriteSet {
            end_seq: self.seq,
            timestamp_ns: ts,
            records,
        }
    }

    fn at(&self, seq: u64) -> &[u8] {
        &self
            .snapshots
            .iter()
            .find(|s| s.0 == seq)
            .expect("a boundary")
            .2
    }
}

fn url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

async fn restored(store: &ArchiveStore, target: Target, dir: &std::path::Path) -> (u64, Vec<u8>) {
    let path = dir.join("out.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let r = restore(store, "vol0", &target, &f)
        .await
        .unwrap_or_else(|e| panic!("restore {target:?}: {e}"));
    (r.seq, std::fs::read(&path).unwrap())
}

async fn writer(store: &ArchiveStore, epoch: u64) -> Result<ArchiveWriter, StoreError> {
    Ok(ArchiveWriter::open(store.clone(), "c1", volumes(), epoch)
        .await?
        .with_pack_bytes(64 << 10))
}

fn zero_chunk(_: u64) -> std::io::Result<Vec<u8>> {
    Ok(vec![0; 1 << 20])
}

#[tokio::test]
async fn restores_any_boundary_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(&dir.path().join("bucket"))).unwrap();
    let mut w = writer(&store, 1).await.unwrap();
    w.upload_base(0, 0, 0, zero_chunk).await.unwrap();
    let mut m = Model::new();
    for i in 0..30u64 {
        let seal = (i == 11).then_some("nightly");
        if w.push(m.write_set(1 + i % 5, i as u8 + 1, 1_000 * (i + 1), seal))
            .unwrap()
        {
            w.flush().await.unwrap();
        }
    }
    let last = w.flush().await.unwrap();
    assert_eq!(last, m.seq);
    assert!(w.manifest().entries.len() > 3, "several packs expected");
    let out = tempfile::tempdir().unwrap();

    let (seq, img) = restored(&store, Target::Latest, out.path()).await;
    assert_eq!(seq, m.seq);
    assert!(img == m.data, "latest differs");
    let bookmark = m.snapshots[12].0;
    let (seq, img) = restored(&store, Target::Bookmark("nightly".into()), out.path()).await;
    assert_eq!(seq, bookmark);
    assert!(img == m.at(bookmark), "bookmark differs");
    let s7 = m.snapshots[7].0;
    let (_, img) = restored(&store, Target::Seq(s7), out.path()).await;
    assert!(img == m.at(s7), "seq {s7} differs");
    // A time between two write-sets restores the earlier one.
    let (seq, img) = restored(&store, Target::Time(20_500), out.path()).await;
    assert_eq!(seq, m.snapshots[20].0);
    assert!(img == m.snapshots[20].2);
    // Not a boundary: refused, not rounded.
    let f = std::fs::File::create(out.path().join("x")).unwrap();
    let e = restore(&store, "vol0", &Target::Seq(s7 - 1), &f)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a write-set boundary"), "{e}");
}

#[tokio::test]
async fn a_restarted_writer_resumes_and_skips_what_the_archive_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let mut w = writer(&store, 1).await.unwrap();
    w.upload_base(0, 0, 0, zero_chunk).await.unwrap();
    let mut m = Model::new();
    let sets: Vec<WriteSet> = (0..10)
        .map(|i| m.write_set(2, i + 1, 100 + i as u64, None))
        .collect();
    for ws in &sets[..6] {
        w.push(ws.clone()).unwrap();
    }
    w.flush().await.unwrap();
    drop(w);
    let mut w = writer(&store, 1).await.unwrap();
    assert_eq!(w.archived_seq(), sets[5].end_seq);
    for ws in &sets {
        // The first six are a resend after the restart: skipped.
        w.push(ws.clone()).unwrap();
    }
    w.flush().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let (seq, img) = restored(&store, Target::Latest, out.path()).await;
    assert_eq!(seq, m.seq);
    assert!(img == m.data);
}

#[tokio::test]
async fn bases_reuse_unchanged_chunks_and_store_no_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let mut w = writer(&store, 1).await.unwrap();
    let mut img = vec![0u8; SIZE as usize];
    img[..(1 << 20)].fill(7);
    img[(2 << 20)..(3 << 20)].fill(9);
    let chunk = |img: &Vec<u8>, i: u64| img[(i << 20) as usize..((i + 1) << 20) as usize].to_vec();
    let s = w
        .upload_base(0, 0, 0, |i| Ok(chunk(&img, i)))
        .await
        .unwrap();
    assert_eq!((s.chunks, s.zero_chunks, s.reused_chunks), (4, 2, 0));
    img[(3 << 20) + 5] = 1;
    let s = w
        .upload_base(0, 0, 0, |i| Ok(chunk(&img, i)))
        .await
        .unwrap();
    assert_eq!((s.zero_chunks, s.reused_chunks), (1, 2), "{s:?}");
    let out = tempfile::tempdir().unwrap();
    let (_, got) = restored(&store, Target::Seq(0), out.path()).await;
    assert!(got == img);
}

#[tokio::test]
async fn changed_missing_and_reordered_objects_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let mut w = writer(&store, 1).await.unwrap();
    w.upload_base(0, 0, 0, zero_chunk).await.unwrap();
    let mut m = Model::new();
    for i in 0..12 {
        w.push(m.write_set(3, i + 1, i as u64, None)).unwrap();
        w.flush().await.unwrap();
    }
    let pack = w.manifest().entries[3].name.clone();
    let path = dir.path().join(&pack);
    let original = std::fs::read(&path).unwrap();
    let out = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(out.path().join("o")).unwrap();

    let mut changed = original.clone();
    changed[100] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    let e = restore(&store, "vol0", &Target::Latest, &f)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&pack), "{e}");

    std::fs::remove_file(&path).unwrap();
    let e = restore(&store, "vol0", &Target::Latest, &f)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&pack), "{e}");
    std::fs::write(&path, &original).unwrap();

    // Reorder two entries in the newest manifest: the chain names the break.
    let gen = w.manifest().generation;
    let mpath = dir.path().join(format!("manifest/{gen:020}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    v["entries"].as_array_mut().unwrap().swap(2, 3);
    std::fs::write(&mpath, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = restore(&store, "vol0", &Target::Latest, &f)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("hash chain"), "{e}");
}

#[tokio::test]
async fn a_stale_writer_cannot_write_over_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let mut old = writer(&store, 1).await.unwrap();
    old.upload_base(0, 0, 0, zero_chunk).await.unwrap();
    let mut m = Model::new();
    old.push(m.write_set(1, 1, 1, None)).unwrap();
    old.flush().await.unwrap();
    // Failover: the new primary (epoch 2) archives here too.
    let mut new = writer(&store, 2).await.unwrap();
    new.push(m.write_set(1, 2, 2, None)).unwrap();
    new.flush().await.unwrap();
    // The old one, still running, loses: its next generation exists already.
    old.push(m.write_set(1, 3, 3, None)).unwrap();
    let e = old.flush().await.unwrap_err();
    assert!(matches!(e, StoreError::LostRace { .. }), "{e}");
    // Restarted, it is refused outright.
    let e = writer(&store, 1).await.err().expect("stale epoch refused");
    assert!(e.to_string().contains("stale"), "{e}");
    // Another cluster's writer is refused too.
    let e = ArchiveWriter::open(store.clone(), "other", volumes(), 3)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("belongs to cluster"), "{e}");
}

async fn view_of(store: &ArchiveStore, target: Target, opts: ViewOptions) -> ArchiveView {
    ArchiveView::open(store.clone(), "vol0", &target, opts)
        .await
        .unwrap_or_else(|e| panic!("view {target:?}: {e}"))
}

/// The whole volume through `view`, in reads of an odd size that straddle chunks.
async fn read_all(view: &ArchiveView) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < SIZE {
        let n = (SIZE - at).min(300_001);
        out.extend(view.read(at, n).await.unwrap());
        at += n;
    }
    out
}

fn hole_at(view: &ArchiveView, offset: u64) -> bool {
    let e = view.extents(offset, 1, 1);
    assert_eq!(e.len(), 1);
    e[0].hole
}

#[tokio::test]
async fn a_view_reads_each_point_as_restore_does_holes_included() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open(&url(dir.path())).unwrap();
    let mut w = writer(&store, 1).await.unwrap();
    // A base holding data in chunks 0 and 2; the write-sets touch only chunk 0.
    let mut m = Model::new();
    m.data[..(1 << 20)].fill(7);
    m.data[(2 << 20)..(3 << 20)].fill(9);
    m.snapshots[0].2 = m.data.clone();
    let img = m.data.clone();
    w.upload_base(0, 0, 0, |i| {
        Ok(img[(i << 20) as usize..((i + 1) << 20) as usize].to_vec())
    })
    .await
    .unwrap();
    for i in 0..20u64 {
        let seal = (i == 8).then_some("nightly");
        w.push(m.write_set(1 + i % 4, i as u8 + 1, 1_000 * (i + 1), seal))
            .unwrap();
        w.flush().await.unwrap();
    }
    let mem = ViewOptions::default();
    let v = view_of(&store, Target::Latest, mem.clone()).await;
    assert_eq!(v.info().seq, m.seq);
    assert!(read_all(&v).await == m.data, "latest differs");
    let bookmark = m.snapshots[9].0;
    let v = view_of(&store, Target::Bookmark("nightly".into()), mem.clone()).await;
    assert_eq!(v.info().seq, bookmark);
    assert!(read_all(&v).await == m.at(bookmark), "bookmark differs");
    let s3 = m.snapshots[3].0;
    let disk = ViewOptions {
        cache_bytes: (1 << 20) + 4096,
        cache_dir: Some(dir.path().join("cache")),
    };
    let v = view_of(&store, Target::Seq(s3), disk).await;
    assert!(
        read_all(&v).await == m.at(s3),
        "seq {s3} through a disk cache differs"
    );
    assert!(v.cached_bytes() <= (1 << 20) + 4096, "cache over its limit");
    let e = ArchiveView::open(store.clone(), "vol0", &Target::Seq(s3 - 1), mem.clone())
        .await
        .err()
        .expect("not a boundary");
    assert!(e.to_string().contains("not a write-set boundary"), "{e}");

    // Holes: the base's zero chunks 1 and 3 (never written after) and what a trim left.
    let v = view_of(&store, Target::Latest, mem.clone()).await;
    assert!(hole_at(&v, 1 << 20) && hole_at(&v, (2 << 20) - 1) && hole_at(&v, 3 << 20));
    assert!(!hole_at(&v, 2 << 20) && !hole_at(&v, (1 << 20) - 1));
    let all = v.extents(0, SIZE, usize::MAX);
    assert_eq!(all.iter().map(|e| e.len).sum::<u64>(), SIZE);
    assert!(
        all.windows(2).all(|w| w[0].hole != w[1].hole),
        "not merged: {all:?}"
    );

    // A changed chunk is named on the read that needs it; other reads still work.
    let id = sm3_hex(&[&img[(2 << 20)..(3 << 20)]]);
    let name = chunk_object(&id);
    let path = dir.path().join(&name);
    let mut z = std::fs::read(&path).unwrap();
    let last = z.len() - 1;
    z[last] ^= 0x55;
    std::fs::write(&path, z).unwrap();
    let v = view_of(&store, Target::Latest, mem).await;
    let e = v.read((2 << 20) + 4096, 4096).await.unwrap_err();
    assert!(e.to_string().contains(&name), "{e}");
    assert_eq!(v.read(0, 4096).await.unwrap(), m.data[..4096]);
}
