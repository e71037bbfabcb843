//! Interoperability tests against real NBD clients: qemu-io, qemu-img,
//! nbdinfo and nbdcopy. Each test skips (loudly) if its tool is missing.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ferry_nbd::testclient::TestServer;
use ferry_nbd::{FileExport, MapRegistry, MemExport, ServerConfig};

const SIZE: usize = 8 << 20;

/// Is `tool` installed? If not, the calling test is skipped loudly (a failure under
/// CI, where .ci/run installs every tool: ferry_testkit).
fn have(tool: &str) -> bool {
    !ferry_testkit::skip_without(tool, module_path!())
}

/// Run a tool; returns (success, combined output).
fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn cfg() -> ServerConfig {
    ServerConfig {
        max_inflight_per_conn: 128,
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

fn mem_server() -> (TestServer, Arc<MemExport>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let vol = Arc::new(MemExport::new("vol0", SIZE));
    let other = Arc::new(MemExport::new("other", 1 << 20));
    let reg = Arc::new(MapRegistry::new(vec![vol.clone(), other]));
    (TestServer::start(reg, cfg()), vol)
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let (ok, out) = run("qemu-io", &args);
    let lower = out.to_lowercase();
    assert!(
        ok && !out.contains("Pattern verification failed")
            && !lower.contains("error")
            && !lower.contains("failed"),
        "qemu-io {cmds:?} failed (ok={ok}):\n{out}"
    );
}

#[test]
fn qemu_io_read_write_flush_discard_zero_fua_aio() {
    if !have("qemu-io") {
        return;
    }
    let (srv, vol) = mem_server();
    let uri = srv.uri("vol0");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "flush",
            // MemExport zeroes trimmed ranges, so discard reads back as 0.
            "discard 0 64k",
            "read -P 0 0 64k",
            "read -P 0xab 64k 960k",
            "write -P 0x11 1M 64k",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            // FUA write.
            "write -f -P 0x33 2M 128k",
            "read -P 0x33 2M 128k",
            // Unaligned offsets and lengths (min block size is 1).
            "write -P 0x44 3000001 12345",
            "read -P 0x44 3000001 12345",
            // Last bytes of the device.
            "write -P 0x55 8384512 4096",
            "read -P 0x55 8384512 4096",
            // Concurrent AIO.
            "aio_write -P 0x61 4M 64k",
            "aio_write -P 0x62 5M 64k",
            "aio_write -P 0x63 6M 1M",
            "aio_flush",
            "read -P 0x61 4M 64k",
            "read -P 0x62 5M 64k",
            "read -P 0x63 6M 1M",
        ],
    );
    // Cross-check the export's actual contents, not just qemu's view.
    assert_eq!(vol.snapshot(0, 65536), vec![0; 65536]);
    assert_eq!(vol.snapshot(65536, 4096), vec![0xab; 4096]);
    assert_eq!(vol.snapshot(2 << 20, 4096), vec![0x33; 4096]);
    assert_eq!(vol.snapshot(3_000_001, 12345), vec![0x44; 12345]);
    assert!(
        vol.flush_count() >= 2,
        "flush and FUA must reach the export"
    );
    // Unknown export fails cleanly.
    let (ok, out) = run(
        "qemu-io",
        &["-f", "raw", &srv.uri("nope"), "-c", "read 0 512"],
    );
    assert!(!ok || out.to_lowercase().contains("fail"), "{out}");
}

#[test]
fn qemu_io_file_export() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; SIZE]).unwrap();
    let exp = Arc::new(FileExport::open("disk", &path, false).unwrap());
    let srv = TestServer::start(Arc::new(MapRegistry::new(vec![exp])), cfg());
    qemu_io(
        &srv.uri("disk"),
        &[
            "write -P 0x7e 0 2M",
            "write -f -P 0x7f 2M 64k",
            "flush",
            "discard 0 64k",
            "read -P 0 0 64k",
            "write -z 1M 64k",
            "read -P 0 1M 64k",
            "read -P 0x7e 64k 960k",
            "read -P 0x7f 2M 64k",
        ],
    );
    let data = std::fs::read(&path).unwrap();
    assert_eq!(&data[65536..65536 + 4096], &[0x7e; 4096][..]);
    assert_eq!(&data[1 << 20..(1 << 20) + 65536], &[0u8; 65536][..]);
}

#[test]
fn nbdinfo_lists_and_describes_exports() {
    if !have("nbdinfo") {
        return;
    }
    let (srv, _) = mem_server();
    let base = format!("nbd://{}", srv.addr);
    let (ok, out) = run("nbdinfo", &["--list", &base]);
    assert!(ok, "{out}");
    assert!(out.contains("vol0") && out.contains("other"), "{out}");
    let (ok, out) = run("nbdinfo", &["--size", &srv.uri("vol0")]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), SIZE.to_string());
    let (ok, out) = run("nbdinfo", &[&srv.uri("vol0")]);
    assert!(ok, "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("block_size_maximum: 67108864"), "{out}");
    let (ok, out) = run("nbdinfo", &["--size", &srv.uri("missing")]);
    assert!(!ok, "unknown export must fail: {out}");
}

#[test]
fn qemu_img_convert_compare_and_nbdcopy() {
    if !have("qemu-img") {
        return;
    }
    let (srv, vol) = mem_server();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Deterministic pseudo-random content with some zero runs.
    let mut x: u32 = 0x1234_5678;
    let data: Vec<u8> = (0..SIZE)
        .map(|i| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if (i / 65536) % 5 == 0 {
                0
            } else {
                (x >> 24) as u8
            }
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    let uri = srv.uri("vol0");
    let src_s = src.to_str().unwrap();
    let (ok, out) = run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    assert!(ok, "qemu-img convert: {out}");
    let (ok, out) = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(ok, "qemu-img compare: {out}");
    assert!(vol.snapshot(0, SIZE) == data, "export content differs");
    // A differing image must be detected (sanity check of the comparison).
    let other = dir.path().join("other.raw");
    std::fs::write(&other, vec![1u8; SIZE]).unwrap();
    let (ok, _) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            other.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(!ok);
    if have("nbdcopy") {
        // nbdcopy uses several connections since we advertise multi-conn.
        let dst = dir.path().join("copy.raw");
        let (ok, out) = run("nbdcopy", &[&uri, dst.to_str().unwrap()]);
        assert!(ok, "nbdcopy: {out}");
        assert!(
            std::fs::read(&dst).unwrap() == data,
            "nbdcopy content differs"
        );
    }
}
