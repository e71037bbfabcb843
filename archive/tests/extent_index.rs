//! The packs' extent index (pack version 2) on a `file://` store: a view opens a point
//! from the indexes alone (no pack body read), a restore downloads only the packs
//! whose bytes survive at the point, archives of version-1 packs (no index) and mixed
//! ones restore and view exactly as before, and a changed index is named.
use bytes::Bytes;
use ferry_archive::format::manifest::{Kind, Manifest, Volume};
use ferry_archive::format::pack::{self, Op, Record, WriteSet};
use ferry_archive::format::sm3_hex;
use ferry_archive::restore::{restore, RestoreReport, Target};
use ferry_archive::view::{ArchiveView, ViewOptions};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::ArchiveStore;

const SIZE: u64 = 4 << 20;

fn volumes() -> Vec<Volume> {
    vec![Volume {
        id: 0,
        name: "vol0".into(),
        size: SIZE,
    }]
}

/// `len` bytes zstd cannot shrink, starting with `fill` (a pack of them is about as
/// large as its writes, so reading its index alone reads much less).
fn noise(fill: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ fill as u64;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    v[0] = fill;
    v
}

/// One write-set writing `noise(fill)` over `[offset, offset + len)`.
fn write_set(seq: &mut u64, image: &mut [u8], offset: u64, len: u64, fill: u8) -> WriteSet {
    *seq += 1;
    let data = noise(fill, len as usize);
    image[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    WriteSet {
        end_seq: *seq,
        timestamp_ns: *seq * 1_000,
        records: vec![Record {
            seq: *seq,
            volume: 0,
            offset,
            len: len as u32,
            op: Op::Write(Bytes::from(data)),
        }],
    }
}

/// An archive of a zero base and one pack per write-set: pack 1 writes the first MiB,
/// pack 2 overwrites all of it, pack 3 writes the third MiB, pack 4 trims inside it.
/// Returns the store and the image at the newest point.
async fn archive(dir: &std::path::Path) -> (ArchiveStore, Vec<u8>) {
    let store = ArchiveStore::open(&format!("file://{}", dir.display())).unwrap();
    let mut w = ArchiveWriter::open(store.clone(), "c1", volumes(), 1)
        .await
        .unwrap();
    w.upload_base(0, 0, 0, |_| Ok(vec![0; 1 << 20]))
        .await
        .unwrap();
    let mut image = vec![0u8; SIZE as usize];
    let mut seq = 0;
    for (offset, len, fill) in [(0, 1 << 20, 1u8), (0, 1 << 20, 2), (2 << 20, 1 << 20, 3)] {
        w.push(write_set(&mut seq, &mut image, offset, len, fill))
            .unwrap();
        w.flush().await.unwrap();
    }
    seq += 1;
    image[(2 << 20) + 4096..(2 << 20) + 8192].fill(0);
    w.push(WriteSet {
        end_seq: seq,
        timestamp_ns: seq * 1_000,
        records: vec![Record {
            seq,
            volume: 0,
            offset: (2 << 20) + 4096,
            len: 4096,
            op: Op::Trim,
        }],
    })
    .unwrap();
    w.flush().await.unwrap();
    (store, image)
}

async fn restored(store: &ArchiveStore, target: Target) -> (RestoreReport, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.img");
    let f = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let r = restore(store, "vol0", &target, &f)
        .await
        .unwrap_or_else(|e| panic!("restore {target:?}: {e}"));
    (r, std::fs::read(&path).unwrap())
}

async fn read_all(view: &ArchiveView) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < SIZE {
        let n = (SIZE - at).min(1 << 20);
        out.extend(view.read(at, n).await.unwrap());
        at += n;
    }
    out
}

fn pack_bytes(m: &Manifest) -> u64 {
    m.entries
        .iter()
        .filter(|e| e.kind == Kind::Pack)
        .map(|e| e.bytes)
        .sum()
}

#[tokio::test]
async fn views_and_restores_read_only_the_packs_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let (store, image) = archive(dir.path()).await;
    let m = store.latest_manifest().await.unwrap().unwrap();

    let v = ArchiveView::open(
        store.clone(),
        "vol0",
        &Target::Latest,
        ViewOptions::default(),
    )
    .await
    .unwrap();
    let i = v.info().clone();
    assert_eq!((i.packs_read, i.indexes_read), (0, 4), "{i:?}");
    assert!(
        i.bytes_read < pack_bytes(&m) / 4,
        "opening read {} of {} pack bytes",
        i.bytes_read,
        pack_bytes(&m)
    );
    assert_eq!(v.cached_bytes(), 0, "no pack body read at open");
    assert!(read_all(&v).await == image, "view differs");

    // The first pack's bytes were all overwritten by the second, and the trim-only
    // pack needs no body: two packs downloaded, two skipped.
    let (r, got) = restored(&store, Target::Latest).await;
    assert!(got == image, "restore differs");
    assert_eq!(
        (
            r.packs_read,
            r.packs_skipped,
            r.indexes_read,
            r.write_sets_applied
        ),
        (2, 2, 4, 4),
        "{r:?}"
    );
    // At the first point only the first pack is needed.
    let (r, got) = restored(&store, Target::Seq(1)).await;
    assert!(got[..1 << 20] == noise(1, 1 << 20)[..] && got[1 << 20..].iter().all(|&b| b == 0));
    assert_eq!((r.packs_read, r.packs_skipped), (1, 0), "{r:?}");
}

/// Rewrites every pack (or the first `n`) in version 1 and commits a manifest naming
/// the rewritten objects: an archive as ferry wrote it before the extent index.
async fn downgrade(store: &ArchiveStore, n: usize) {
    let old = store.latest_manifest().await.unwrap().unwrap();
    let mut m = Manifest::new(&old.cluster, old.volumes.clone(), old.epoch);
    let mut done = 0;
    for e in &old.entries {
        let mut e = e.clone();
        if e.kind == Kind::Pack && done < n {
            done += 1;
            let b = store.get(&e.name).await.unwrap();
            let (_, sets) = pack::decode(&b).unwrap();
            let v1 = pack::encode_version(e.epoch, &sets, 3, pack::VERSION_1).unwrap();
            e.bytes = v1.bytes.len() as u64;
            e.sm3 = sm3_hex(&[&v1.bytes]);
            store.put(&e.name, v1.bytes).await.unwrap();
        }
        m.push(e).unwrap();
    }
    m.generation = old.generation + 1;
    assert!(store
        .create(&Manifest::object_name(m.generation), m.to_json())
        .await
        .unwrap());
}

#[tokio::test]
async fn archives_of_version_1_packs_and_mixed_ones_still_restore_and_view() {
    for n in [2, usize::MAX] {
        let dir = tempfile::tempdir().unwrap();
        let (store, image) = archive(dir.path()).await;
        downgrade(&store, n).await;
        let old = n.min(4) as u64;
        let v = ArchiveView::open(
            store.clone(),
            "vol0",
            &Target::Latest,
            ViewOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            (v.info().packs_read, v.info().indexes_read),
            (old, 4 - old),
            "{:?}",
            v.info()
        );
        assert!(read_all(&v).await == image, "view of {n} old packs differs");
        let (r, got) = restored(&store, Target::Latest).await;
        assert!(got == image, "restore of {n} old packs differs");
        assert_eq!(r.indexes_read, 4 - old, "{r:?}");
        let (_, got) = restored(&store, Target::Seq(2)).await;
        assert!(got[..1 << 20] == noise(2, 1 << 20)[..]);
    }
}

#[tokio::test]
async fn a_changed_extent_index_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = archive(dir.path()).await;
    let m = store.latest_manifest().await.unwrap().unwrap();
    let e = m.entries.iter().find(|e| e.kind == Kind::Pack).unwrap();
    let path = dir.path().join(&e.name);
    let mut b = std::fs::read(&path).unwrap();
    let h = pack::decode_header(&b).unwrap();
    let r = pack::index_range(&h).unwrap();
    b[r.start as usize + 3] ^= 0x10;
    std::fs::write(&path, &b).unwrap();
    let err = ArchiveView::open(
        store.clone(),
        "vol0",
        &Target::Latest,
        ViewOptions::default(),
    )
    .await
    .err()
    .expect("a changed index opened");
    assert!(err.to_string().contains(&e.name), "{err}");
    let f = tempfile::tempfile().unwrap();
    let err = restore(&store, "vol0", &Target::Latest, &f)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&e.name), "{err}");
}
