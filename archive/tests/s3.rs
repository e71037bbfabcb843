//! The archive against a real S3-protocol server on loopback (moto in server mode,
//! installed by .ci/run): packs, bases, the create-if-absent manifest and restore go
//! through the same HTTP API as AWS S3, MinIO or Ceph RGW; so do compaction's merged
//! packs, its conditional commit and garbage collection (held back by object lock).
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_archive::compact::{self, gc, CompactOptions, Grid, Tier};
use ferry_archive::format::manifest::Volume;
use ferry_archive::format::pack::{Op, Record, WriteSet};
use ferry_archive::restore::{restore, Target};
use ferry_archive::writer::ArchiveWriter;
use ferry_archive::{ArchiveStore, StoreError};

/// moto's server, killed by PID on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A raw HTTP request (moto accepts unsigned ones); returns the status line.
fn http(port: u16, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or("").to_string()
}

fn start_moto() -> Option<Moto> {
    if !ferry_testkit::have("moto_server") {
        ferry_testkit::skip(
            "archive s3 tests",
            "moto_server is not installed (.ci/run installs it: pip install 'moto[server]')",
        );
        return None;
    }
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moto_server");
    let moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen on {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(moto)
}

fn write_set(seq: u64, fill: u8, seal: Option<&str>) -> WriteSet {
    let mut records = vec![Record {
        seq,
        volume: 0,
        offset: seq * 8192,
        len: 8192,
        op: Op::Write(Bytes::from(vec![fill; 8192])),
    }];
    let mut end = seq;
    if let Some(l) = seal {
        end += 1;
        records.push(Record {
            seq: end,
            volume: 0,
            offset: 0,
            len: l.len() as u32,
            op: Op::Seal(l.into()),
        });
    }
    WriteSet {
        end_seq: end,
        timestamp_ns: seq,
        records,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_and_restore_through_an_s3_server() {
    let Some(moto) = start_moto() else { return };
    assert!(
        http(moto.port, "PUT", "/ferry-test").contains("200"),
        "bucket creation"
    );
    // The one test in this binary: the environment is the S3 client's configuration,
    // as an operator would give it (never in ferry's config).
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var(
        "AWS_ENDPOINT_URL",
        format!("http://127.0.0.1:{}", moto.port),
    );
    let store = ArchiveStore::open("s3://ferry-test/cluster1/archive").unwrap();
    let size = 2u64 << 20;
    let vols = vec![Volume {
        id: 0,
        name: "vol0".into(),
        size,
    }];
    let mut w = ArchiveWriter::open(store.clone(), "c1", vols.clone(), 1)
        .await
        .unwrap()
        .with_pack_bytes(16 << 10);
    let mut base = vec![0u8; size as usize];
    base[..4096].fill(0xee);
    let b = base.clone();
    w.upload_base(0, 0, 0, |i| {
        Ok(b[(i << 20) as usize..((i + 1) << 20) as usize].to_vec())
    })
    .await
    .unwrap();
    let mut model = base.clone();
    let mut at_bookmark = None;
    let mut seq = 1;
    for i in 0..40u8 {
        let seal = (i == 20).then_some("before-upgrade");
        let ws = write_set(seq, i + 1, seal);
        model[(seq * 8192) as usize..(seq * 8192 + 8192) as usize].fill(i + 1);
        seq = ws.end_seq + 1;
        w.push(ws).unwrap();
        if seal.is_some() {
            at_bookmark = Some(model.clone());
        }
    }
    w.flush().await.unwrap();
    assert!(
        store.list("packs").await.unwrap().len() > 2,
        "several packs in the bucket"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restored.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    restore(&store, "vol0", &Target::Latest, &f).await.unwrap();
    assert!(std::fs::read(&path).unwrap() == model, "latest differs");
    restore(
        &store,
        "vol0",
        &Target::Bookmark("before-upgrade".into()),
        &f,
    )
    .await
    .unwrap();
    assert!(
        std::fs::read(&path).unwrap() == *at_bookmark.as_ref().unwrap(),
        "bookmark differs"
    );

    // The conditional manifest write holds on a real S3 API: a stale writer loses.
    let mut stale = ArchiveWriter::open(store.clone(), "c1", vols.clone(), 1)
        .await
        .unwrap();
    let mut current = ArchiveWriter::open(store.clone(), "c1", vols, 2)
        .await
        .unwrap();
    current.push(write_set(seq, 0x77, None)).unwrap();
    current.flush().await.unwrap();
    model[(seq * 8192) as usize..(seq * 8192 + 8192) as usize].fill(0x77);
    stale.push(write_set(seq + 10, 0x66, None)).unwrap();
    let e = stale.flush().await.unwrap_err();
    assert!(matches!(e, StoreError::LostRace { .. }), "{e}");

    compaction_through_the_s3_api(&store, &model, &at_bookmark.unwrap_or_default()).await;
}

/// Compaction through the same API: merged packs, the conditional commit, the
/// collection held back by object lock (uploads with the checksum a locked bucket
/// needs), then done without it; the newest point and the bookmark restore as before.
async fn compaction_through_the_s3_api(store: &ArchiveStore, latest: &[u8], bookmark: &[u8]) {
    let url = "s3://ferry-test/cluster1/archive";
    let locked = ArchiveStore::open_locked(url, Some(1)).unwrap();
    // Write-set times are their sequences (ns): one point per 5 ns for 1000 ns.
    let grid = Grid::new(
        0,
        vec![Tier {
            period_ns: 5,
            horizon_ns: 1000,
        }],
    )
    .unwrap();
    let opts = CompactOptions {
        grace: Duration::ZERO,
        pack_bytes: 64 << 10,
        ..CompactOptions::new(grid)
    };
    let (r, g) = compact::compact(&locked, &opts, 200)
        .await
        .unwrap()
        .unwrap();
    assert!(r.packs_in > r.packs_out && r.sets_in > r.sets_out, "{r:?}");
    assert!(g.deleted == 0 && g.locked > 0, "{g:?}");
    let names = store.list("packs").await.unwrap();
    assert!(names.iter().any(|n| n.contains("/L1/")), "{names:?}");
    let check = |what: &'static str, target: Target, want: Vec<u8>| async move {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restored.img");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        restore(store, "vol0", &target, &f).await.unwrap();
        assert!(std::fs::read(&path).unwrap() == want, "{what} differs");
    };
    check("compacted latest", Target::Latest, latest.to_vec()).await;
    let g = gc::collect(store, Duration::ZERO, compact::wall_clock_ns())
        .await
        .unwrap();
    assert!(g.deleted > 0 && g.locked == 0, "{g:?}");
    check("collected latest", Target::Latest, latest.to_vec()).await;
    check(
        "collected bookmark",
        Target::Bookmark("before-upgrade".into()),
        bookmark.to_vec(),
    )
    .await;
}
