//! An encrypted archive end to end on a `file://` store: restore and a view with the
//! key give back the volume; no stored object holds the plaintext; chunks are still
//! reused; a missing or wrong key is refused naming the key ids; a tampered chunk or
//! pack is named; a key never changes an archive's encryption half-way.
use bytes::Bytes;
use ferry_archive::format::base::chunk_object;
use ferry_archive::format::manifest::Volume;
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::format::sm3_hex;
use ferry_archive::restore::{restore, Target};
use ferry_archive::view::{ArchiveView, ViewOptions};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::{ArchiveStore, StoreError};
use ferry_gm::atrest::Kek;

const SIZE: u64 = 3 << 20;
const MARKER: &[u8] = b"FERRY-PLAINTEXT-MARKER-0123456789";

fn kek(b: u8) -> Kek {
    Kek::from_bytes(&[b; 16])
}

fn volumes() -> Vec<Volume> {
    vec![Volume {
        id: 0,
        name: "vol0".into(),
        size: SIZE,
    }]
}

fn store(dir: &std::path::Path, key: Option<Kek>) -> ArchiveStore {
    ArchiveStore::open(&format!("file://{}", dir.display()))
        .unwrap()
        .with_kek(key)
}

/// `n` bytes of pseudo-random data (which zstd stores as literals) with the marker
/// at the start of every 4 KiB: the plaintext a leak would show.
fn marked(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for block in v.chunks_mut(4096) {
        let k = MARKER.len().min(block.len());
        block[..k].copy_from_slice(&MARKER[..k]);
    }
    v
}

fn holds_marker(files: &[std::path::PathBuf]) -> Vec<String> {
    files
        .iter()
        .filter(|p| {
            let b = std::fs::read(p).unwrap();
            b.windows(MARKER.len()).any(|w| w == MARKER)
        })
        .map(|p| p.display().to_string())
        .collect()
}

fn write_set(seq: u64, offset: u64) -> WriteSet {
    WriteSet {
        end_seq: seq,
        timestamp_ns: seq * 1000,
        records: vec![Record {
            seq,
            volume: 0,
            offset,
            len: 8192,
            op: Op::Write(Bytes::from(marked(8192))),
        }],
    }
}

/// An encrypted archive: a base (chunk 0 marked, chunk 2 zero), then three packs.
/// Returns the volume's expected image after the last pack.
async fn build(st: &ArchiveStore) -> Vec<u8> {
    let mut img = vec![0u8; SIZE as usize];
    img[..1 << 20].copy_from_slice(&marked(1 << 20));
    img[(1 << 20)..(2 << 20)].fill(3);
    let mut w = ArchiveWriter::open(st.clone(), "c1", volumes(), 1)
        .await
        .unwrap()
        .with_pack_bytes(1);
    let base = img.clone();
    let s = w
        .upload_base(0, 0, 0, |i| {
            Ok(base[(i << 20) as usize..((i + 1) << 20) as usize].to_vec())
        })
        .await
        .unwrap();
    assert_eq!((s.chunks, s.zero_chunks, s.reused_chunks), (3, 1, 0));
    for seq in 1..=3 {
        let off = (2 << 20) + seq * 65536;
        img[off as usize..off as usize + 8192].copy_from_slice(&marked(8192));
        w.push(write_set(seq, off)).unwrap();
        w.flush().await.unwrap();
    }
    // A second base of the same image reuses every chunk (keyed ids are stable).
    let again = img.clone();
    let s = w
        .upload_base(0, 3, 3000, |i| {
            Ok(again[(i << 20) as usize..((i + 1) << 20) as usize].to_vec())
        })
        .await
        .unwrap();
    assert_eq!(s.reused_chunks, 2, "{s:?}");
    img
}

async fn restore_to(st: &ArchiveStore, target: Target) -> Result<Vec<u8>, StoreError> {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("o.img");
    let f = std::fs::File::create(&path).unwrap();
    restore(st, "vol0", &target, &f).await?;
    Ok(std::fs::read(&path).unwrap())
}

fn stored_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn restores_with_the_key_and_stores_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path(), Some(kek(1)));
    let img = build(&st).await;
    assert!(restore_to(&st, Target::Latest).await.unwrap() == img);
    let at0 = restore_to(&st, Target::Seq(0)).await.unwrap();
    assert_eq!(&at0[..MARKER.len()], MARKER);

    let view = ArchiveView::open(st.clone(), "vol0", &Target::Latest, ViewOptions::default())
        .await
        .unwrap();
    assert!(view.read(0, SIZE).await.unwrap() == img);

    let m = st.latest_manifest().await.unwrap().unwrap();
    assert_eq!(m.format, 2);
    assert_eq!(m.encryption.unwrap().key_id, kek(1).id().to_string());
    let files = stored_files(dir.path());
    assert!(files
        .iter()
        .any(|p| p.to_string_lossy().contains("/chunks/")));
    assert_eq!(
        holds_marker(&files),
        Vec::<String>::new(),
        "plaintext stored"
    );
    // The control: the same archive unencrypted shows the marker in its chunks and
    // packs, so the check above can fail.
    let plain = tempfile::tempdir().unwrap();
    build(&store(plain.path(), None)).await;
    let leaks = holds_marker(&stored_files(plain.path()));
    assert!(
        leaks.iter().any(|p| p.contains("/chunks/")) && leaks.iter().any(|p| p.contains("/packs/")),
        "{leaks:?}"
    );
    // A keyed id: the chunk is not findable by the SM3 of its plaintext.
    let plain_id = sm3_hex(&[&img[..1 << 20]]);
    assert!(!dir.path().join(chunk_object(&plain_id)).exists());
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_refused_naming_the_ids() {
    let dir = tempfile::tempdir().unwrap();
    build(&store(dir.path(), Some(kek(1)))).await;
    let id = kek(1).id().to_string();
    let other = kek(2).id().to_string();

    let e = restore_to(&store(dir.path(), None), Target::Latest)
        .await
        .map(drop)
        .expect_err("refused");
    assert!(
        matches!(e, StoreError::KeyNeeded(_)) && e.to_string().contains(&id),
        "{e}"
    );
    let e = restore_to(&store(dir.path(), Some(kek(2))), Target::Latest)
        .await
        .map(drop)
        .expect_err("refused");
    let text = e.to_string();
    assert!(text.contains(&id) && text.contains(&other), "{text}");
    let e = ArchiveWriter::open(store(dir.path(), None), "c1", volumes(), 2)
        .await
        .map(drop)
        .expect_err("refused");
    assert!(e.to_string().contains(&id), "{e}");

    // A plain archive never takes encrypted objects later.
    let plain = tempfile::tempdir().unwrap();
    ArchiveWriter::open(store(plain.path(), None), "c1", volumes(), 1)
        .await
        .unwrap();
    let e = ArchiveWriter::open(store(plain.path(), Some(kek(1))), "c1", volumes(), 1)
        .await
        .map(drop)
        .expect_err("refused");
    assert!(matches!(e, StoreError::NotEncrypted(_)), "{e}");
}

#[tokio::test]
async fn tampered_and_swapped_objects_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(dir.path(), Some(kek(1)));
    build(&st).await;
    let m = st.latest_manifest().await.unwrap().unwrap();
    let base =
        ferry_archive::format::base::Base::from_json(&st.get(&m.entries[0].name).await.unwrap())
            .unwrap();
    let ids: Vec<String> = base.chunks.iter().flatten().cloned().collect();
    let (a, b) = (chunk_object(&ids[0]), chunk_object(&ids[1]));
    let (pa, pb) = (dir.path().join(&a), dir.path().join(&b));
    let original = std::fs::read(&pa).unwrap();

    let mut bad = original.clone();
    let last = bad.len() - 20;
    bad[last] ^= 1;
    std::fs::write(&pa, &bad).unwrap();
    let e = restore_to(&st, Target::Seq(0))
        .await
        .map(drop)
        .expect_err("refused");
    assert!(
        e.to_string().contains(&a) && e.to_string().contains("authentication"),
        "{e}"
    );
    // Another chunk's valid sealed bytes under this name: refused as well.
    std::fs::copy(&pb, &pa).unwrap();
    let e = restore_to(&st, Target::Seq(0))
        .await
        .map(drop)
        .expect_err("refused");
    assert!(e.to_string().contains(&a), "{e}");
    std::fs::write(&pa, &original).unwrap();
    restore_to(&st, Target::Seq(0)).await.unwrap();

    // A pack is pinned by the manifest's SM3 of its stored bytes (no key needed).
    let pack = m.entries[1].name.clone();
    let pp = dir.path().join(&pack);
    let mut bad = std::fs::read(&pp).unwrap();
    bad[200] ^= 1;
    std::fs::write(&pp, &bad).unwrap();
    // (At sequence 2: base 0 and packs 1-2; the latest point is the second base.)
    let e = restore_to(&store(dir.path(), None), Target::Seq(2)).await;
    assert!(
        matches!(e, Err(StoreError::KeyNeeded(_))),
        "the key is checked first"
    );
    let e = restore_to(&st, Target::Seq(2))
        .await
        .map(drop)
        .expect_err("refused");
    assert!(e.to_string().contains(&pack), "{e}");
}

/// Key rotation: with a ring whose current key is new, an archive begun under the
/// old key still restores, keeps its chunk ids (a base of the same image reuses
/// every chunk), and new objects are sealed under the new key; a ring without the
/// archive's key is refused.
#[tokio::test]
async fn a_rotated_ring_keeps_the_archive_and_seals_new_objects_under_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let img = build(&store(dir.path(), Some(kek(1)))).await;
    let before = stored_files(dir.path());
    let ring = Kek::ring(vec![kek(1), kek(2)]).unwrap();
    let st = store(dir.path(), Some(ring));
    assert!(restore_to(&st, Target::Latest).await.unwrap() == img);
    let mut w = ArchiveWriter::open(st.clone(), "c1", volumes(), 1)
        .await
        .unwrap()
        .with_pack_bytes(1);
    let again = img.clone();
    let s = w
        .upload_base(0, 3, 4000, |i| {
            Ok(again[(i << 20) as usize..((i + 1) << 20) as usize].to_vec())
        })
        .await
        .unwrap();
    // Every chunk of this image is stored already (build's second base).
    assert_eq!(
        (s.reused_chunks, s.uploaded_bytes),
        (s.chunks, 0),
        "chunk ids keyed by the archive's key: {s:?}"
    );
    let mut img2 = img.clone();
    let off = (2 << 20) + 9 * 65536;
    img2[off as usize..off as usize + 8192].copy_from_slice(&marked(8192));
    w.push(write_set(9, off)).unwrap();
    w.flush().await.unwrap();
    assert!(restore_to(&st, Target::Latest).await.unwrap() == img2);
    let new: Vec<_> = stored_files(dir.path())
        .into_iter()
        .filter(|p| !before.contains(p) && p.to_string_lossy().contains("/packs/"))
        .collect();
    assert!(!new.is_empty());
    for p in &new {
        let b = std::fs::read(p).unwrap();
        let id = ferry_archive::format::sealed::key_id(&b).unwrap();
        assert_eq!(id, kek(2).id(), "{} sealed under the old key", p.display());
    }
    let only_new = store(dir.path(), Some(kek(2)));
    assert!(matches!(
        only_new.latest_manifest().await,
        Err(StoreError::WrongKey { .. })
    ));
}
