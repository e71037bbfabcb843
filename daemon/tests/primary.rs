//! End-to-end tests of a primary: real ferryd processes, real NBD clients (qemu-io,
//! qemu-img), SIGKILL and SIGTERM.
use std::path::Path;
use std::time::Duration;

use ferryd::testkit::{
    acked_writes, assert_qemu_io_ok, primary_config, qemu_io, set_volume_cache, skip_without,
    spawn_qemu_io, Node,
};

const MIB: u64 = 1 << 20;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn qemu_io_patterns_survive_restart() {
    if skip_without("qemu-io", "qemu_io_patterns_survive_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(
        dir.path(),
        &[("vol0", 64 * MIB), ("vol1", 16 * MIB)],
        64 * MIB,
        4 * MIB,
    );
    let mut node = Node::start(ferryd(), &cfg);
    let url = node.url("vol0");
    let out = qemu_io(
        &url,
        &cmds(&[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -f -P 0x11 1M 64k",
            "flush",
            "read -P 0x11 1M 64k",
            "write -P 0xcd 2M 512",
            "read -P 0xcd 2M 512",
            "read -P 0 2097664 3584",
            "discard 0 64k",
            "read -P 0 0 64k",
            "read -P 0xab 64k 960k",
            "write -z 4M 128k",
            "read -P 0 4M 128k",
            "aio_write -P 0x22 8M 4k",
            "aio_write -P 0x33 9M 4k",
            "aio_flush",
            "read -P 0x22 8M 4k",
            "read -P 0x33 9M 4k",
            "write -P 0x7e 63M 1M",
        ]),
    );
    assert_qemu_io_ok(&out);
    // The second volume is a separate export of the same consistency group.
    assert_qemu_io_ok(&qemu_io(
        &node.url("vol1"),
        &cmds(&["write -P 0x99 0 4k", "read -P 0x99 0 4k"]),
    ));
    let st = node.status();
    assert_eq!(st["role"], "primary");
    assert!(st["last_seq"].as_u64().unwrap() >= 8, "{st}");
    assert_eq!(st["journal"]["capacity_bytes"].as_u64().unwrap(), 64 * MIB);

    let code = node.terminate();
    assert!(
        code.success(),
        "SIGTERM must drain and exit 0: {code}\n{}",
        node.log_text()
    );
    // A clean shutdown checkpoints: the base file alone holds the data.
    let img = std::fs::read(dir.path().join("primary/vol0.img")).unwrap();
    assert!(img[64 << 10..1 << 20].iter().all(|&b| b == 0xab));
    assert!(img[..64 << 10].iter().all(|&b| b == 0));
    assert!(img[(1 << 20)..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x11));

    let node = Node::start(ferryd(), &cfg);
    assert_qemu_io_ok(&qemu_io(
        &node.url("vol0"),
        &cmds(&[
            "read -P 0xab 64k 960k",
            "read -P 0x11 1M 64k",
            "read -P 0x22 8M 4k",
            "read -P 0x7e 63M 1M",
        ]),
    ));
    assert_qemu_io_ok(&qemu_io(&node.url("vol1"), &cmds(&["read -P 0x99 0 4k"])));
}

#[test]
fn qemu_img_convert_round_trips_an_image() {
    if skip_without("qemu-img", "qemu_img_convert_round_trips_an_image") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 32 * MIB)], 64 * MIB, 4 * MIB);
    let node = Node::start(ferryd(), &cfg);
    // A source image with data and holes.
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 32 * MIB as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        if (i * 8) % (8 << 20) < (6 << 20) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(&src, &data).unwrap();
    let url = node.url("vol0");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&url)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert into ferryd failed");
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "images differ: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

/// SIGKILL ferryd while qemu-io writes; every write qemu-io saw acknowledged must read
/// back after a restart (the journal is replayed onto the base).
#[test]
fn sigkill_during_workload_loses_no_acknowledged_write() {
    if skip_without(
        "qemu-io",
        "sigkill_during_workload_loses_no_acknowledged_write",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A small journal with small segments so the run crosses segments and checkpoints.
    let cfg = primary_config(dir.path(), &[("vol0", 64 * MIB)], 16 * MIB, 2 * MIB);
    // Every acknowledged write survives only in writethrough: the default turns
    // writeback at the first flush (tests/cache_modes.rs checks what it keeps).
    set_volume_cache(&cfg, ferry_api::config::CacheMode::Writethrough);
    for round in 0..3u64 {
        let mut node = Node::start(ferryd(), &cfg);
        let url = node.url("vol0");
        // 1000 non-overlapping 32 KiB writes, each with its own pattern byte; a flush
        // every 10 writes. qemu-io runs them one after another and prints "wrote" for
        // each acknowledged one.
        let mut list = Vec::new();
        for i in 0..1000u64 {
            let pat = ((i + round * 7) % 251) + 1;
            list.push(format!("write -P {pat} {} 32k", (i * 64) << 10));
            if i % 10 == 9 {
                list.push("flush".into());
            }
        }
        let run = spawn_qemu_io(&url, &list);
        // Kill once the daemon has journaled a round-dependent number of records, so
        // the kill lands mid-workload however fast this machine is.
        let start_seq = node.status()["last_seq"].as_u64().unwrap();
        let target = start_seq + [150, 420, 780][round as usize];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while node.status()["last_seq"].as_u64().unwrap() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "workload made no progress to seq {target} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        node.kill();
        let stdout = run.finish();
        let acked = acked_writes(&stdout, 32768);
        assert!(
            !acked.is_empty(),
            "no write completed before the kill; qemu-io said:\n{stdout}"
        );
        eprintln!(
            "round {round}: {} writes acknowledged before SIGKILL",
            acked.len()
        );
        assert!(
            acked.len() < 1000,
            "the kill came after the workload finished; the test proved nothing"
        );

        let node = Node::start(ferryd(), &cfg);
        let mut verify = Vec::new();
        for off in &acked {
            let i = (off >> 10) / 64;
            let pat = ((i + round * 7) % 251) + 1;
            verify.push(format!("read -P {pat} {off} 32k"));
        }
        for chunk in verify.chunks(200) {
            assert_qemu_io_ok(&qemu_io(&node.url("vol0"), chunk));
        }
        drop(node);
    }
}

#[test]
fn bad_config_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("size = \"4MiB\"", "size = \"4001\"")).unwrap();
    let out = std::process::Command::new(ferryd())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("volume[0].size"),
        "error must name the key: {err}"
    );

    // A backing file smaller than the configured size is refused, naming the volume.
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("primary/vol0.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let out = std::process::Command::new(ferryd())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vol0") && err.contains("refusing"), "{err}");
}

/// A journal record for a volume that was removed from the config must stop start-up
/// (naming it), never be dropped; restoring the volume's section lets replay finish.
#[test]
fn replay_refuses_to_drop_records_of_an_unconfigured_volume() {
    if skip_without(
        "qemu-io",
        "replay_refuses_to_drop_records_of_an_unconfigured_volume",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(
        dir.path(),
        &[("vol0", 4 * MIB), ("vol1", 4 * MIB)],
        16 * MIB,
        2 * MIB,
    );
    let full = std::fs::read_to_string(&cfg).unwrap().replace(
        "checkpoint_interval_ms = 500",
        "checkpoint_interval_ms = 600000",
    );
    assert!(full.contains("checkpoint_interval_ms = 600000"), "{full}");
    std::fs::write(&cfg, &full).unwrap();
    let mut node = Node::start(ferryd(), &cfg);
    assert_qemu_io_ok(&qemu_io(&node.url("vol1"), &cmds(&["write -P 0x42 0 64k"])));
    node.kill(); // no checkpoint: the write lives only in the journal (and page cache)

    let vol1 = full
        .find("[[volume]]\nname = \"vol1\"")
        .expect("vol1 section");
    std::fs::write(&cfg, &full[..vol1]).unwrap();
    let out = std::process::Command::new(ferryd())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "start-up must refuse");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("volume id 1") && err.contains("not in the config"),
        "{err}"
    );

    std::fs::write(&cfg, &full).unwrap();
    let node = Node::start(ferryd(), &cfg);
    assert_qemu_io_ok(&qemu_io(&node.url("vol1"), &cmds(&["read -P 0x42 0 64k"])));
}

/// Block status of a real volume comes from the base file's holes (SEEK_DATA/SEEK_HOLE):
/// after writes at 1 MiB and 5 MiB of a fresh sparse volume, qemu-img map reports exactly
/// those ranges as data and the rest as zero holes, and qemu-img compare -s agrees with a
/// sparse image of the same layout.
#[test]
fn qemu_img_map_shows_the_volumes_holes() {
    if skip_without("qemu-img", "qemu_img_map_shows_the_volumes_holes")
        || skip_without("qemu-io", "qemu_img_map_shows_the_volumes_holes")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !reports_holes(dir.path()) {
        eprintln!("SKIP: the test directory's file system reports no holes (SEEK_DATA)");
        return;
    }
    let cfg = primary_config(dir.path(), &[("vol0", 8 * MIB)], 64 * MIB, 4 * MIB);
    let node = Node::start(ferryd(), &cfg);
    let url = node.url("vol0");
    assert_qemu_io_ok(&qemu_io(
        &url,
        &cmds(&["write -P 0x11 1M 64k", "write -P 0x22 5M 128k"]),
    ));
    let out = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img map: {text}");
    let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
    let data: Vec<(u64, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["data"].as_bool() == Some(true))
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(MIB, 64 << 10), (5 * MIB, 128 << 10)], "{text}");
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["data"].as_bool() == Some(false))
            .all(|r| r["zero"].as_bool() == Some(true)),
        "holes must read as zero: {text}"
    );
}

/// Whether SEEK_DATA finds no data in a fresh sparse file here (file systems without hole
/// support report the whole file as data, which ferryd then rightly reports too).
fn reports_holes(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(dir.join("probe")).unwrap();
    f.set_len(MIB).unwrap();
    // SAFETY: lseek on a valid fd; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

/// A journal whose only records after the checkpoint are seals (a bookmark taken, then
/// SIGKILL before the next checkpoint): recovery must checkpoint through them. Before,
/// replay counted only records applied to a volume, left the checkpoint below the last
/// seal, and the group's applied position never reached the journal's end, so a
/// switchover or demote waited 30 s and failed ("durable N, applied N-1").
#[test]
fn a_trailing_seal_is_checkpointed_at_recovery() {
    if skip_without("qemu-io", "a_trailing_seal_is_checkpointed_at_recovery") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    let mut c = ferry_api::config::Config::load(&cfg).unwrap();
    c.journal.checkpoint_interval_ms = 3_600_000;
    std::fs::write(&cfg, c.to_toml()).unwrap();
    let mut node = Node::start(ferryd(), &cfg);
    assert_qemu_io_ok(&qemu_io(&node.url("vol0"), &cmds(&["write -P 0x5a 0 64k"])));
    // A clean stop checkpoints the write.
    assert!(node.terminate().success());
    let mut node = Node::start(ferryd(), &cfg);
    let r = ferry_api::control::call(
        &c.control.socket,
        &ferry_api::control::Request::BookmarkCreate { name: "b1".into() },
    )
    .expect("bookmark call");
    assert!(r.ok, "{r:?}");
    let sealed = node.status()["durable_seq"].as_u64().unwrap();
    node.kill();
    let node = Node::start(ferryd(), &cfg);
    let st = node.status();
    assert_eq!(st["last_seq"].as_u64(), Some(sealed), "{st:#}");
    assert_eq!(
        st["checkpoint_seq"].as_u64(),
        Some(sealed),
        "recovery left the trailing seal above the checkpoint: {st:#}"
    );
}
