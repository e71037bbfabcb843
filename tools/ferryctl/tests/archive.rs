//! The archive target end to end, with real processes: a primary archiving to a
//! `file://` directory; `ferryctl archive restore` at a bookmark and at the newest
//! point equals the primary's volume as it was then (read over NBD with qemu-img);
//! a SIGKILLed primary resumes its archive with no gap; `ferryctl archive export`
//! serves a point over NBD equal to the volume then, with its holes, and names a
//! changed object on the read that needs it; an encrypted archive is exported with its
//! key (`--key-file`) and refused without it or with another.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

const TEST: &str = "archive_restores_equal_the_primary_and_resume_after_sigkill";

/// Waits until the archive target holds everything the primary made durable.
fn wait_archived(primary: &Node) -> u64 {
    let last = seq(&primary.status(), "/durable_seq");
    let st = primary.wait_status(
        "the archive to hold the durable sequence",
        Duration::from_secs(60),
        |st| {
            st["archives"][0]["state"] == "archiving" && seq(st, "/archives/0/archived_seq") >= last
        },
    );
    assert_eq!(st["archives"][0]["kind"], "archive", "{st:#}");
    assert!(seq(&st, "/archives/0/bytes_uploaded") > 0, "{st:#}");
    last
}

/// `ferryctl status` (text and JSON) shows what the archive holds and stores.
fn status_shows_the_archive(pcfg: &Path, archived: u64) {
    let st = ctl_json(pcfg, &["status"]);
    let a = &st["archives"][0];
    assert!(a["stored_bytes"].as_u64() > Some(0), "{a:#}");
    assert!(a["compression_ratio"].as_f64() > Some(1.0), "{a:#}");
    assert!(a["oldest_point"]["seq"].is_u64(), "{a:#}");
    assert!(a["last_upload"].is_string(), "{a:#}");
    let o = ctl(pcfg, &["status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("archive    cold "))
        .unwrap_or_else(|| panic!("no archive line:\n{text}"));
    assert!(
        line.contains(&format!("archived seq {archived}"))
            && line.contains("lag ")
            && line.contains("uploaded "),
        "{line}"
    );
    assert!(!line.contains("last never"), "{line}");
    assert!(
        text.contains(&format!("stored {} bytes (compression ", a["stored_bytes"]))
            && text.contains(&format!("oldest point seq {} (", a["oldest_point"]["seq"])),
        "{text}"
    );
}

/// `ferryctl archive restore --url URL --volume vol0 POINT --to OUT --json`.
fn restore(url: &str, point: &[&str], out: &Path) -> serde_json::Value {
    restore_env(url, point, out, &[])
}

fn restore_env(url: &str, point: &[&str], out: &Path, env: &[(&str, &str)]) -> serde_json::Value {
    let o = Command::new(ferryctl())
        .envs(env.iter().copied())
        .args(["archive", "restore", "--url", url, "--volume", "vol0"])
        .args(point)
        .arg("--to")
        .arg(out)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "archive restore {point:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The primary's /metrics text (init gives every node a metrics endpoint).
fn metrics(node: &Node) -> String {
    use std::io::{Read, Write};
    let addr = node.metrics.expect("a metrics endpoint");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

fn list(url: &str) -> serde_json::Value {
    let o = Command::new(ferryctl())
        .args(["archive", "list", "--url", url, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A primary (its standby not started: the archive works alone) with an archive
/// target in `dir/archive`; returns its config and the archive's URL.
fn init(dir: &Path) -> (PathBuf, String) {
    let url = format!("file://{}", dir.join("archive").display());
    (init_with(dir, &url), url)
}

fn init_with(dir: &Path, url: &str) -> PathBuf {
    let (pcfg, _) = init_pair(
        dir,
        &Init {
            volume: "vol0:32MiB",
            ..Init::default()
        },
    );
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.push_str(&format!(
        "\n[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"{url}\"\nflush_interval = 2\n"
    ));
    std::fs::write(&pcfg, text).unwrap();
    pcfg
}

#[test]
fn archive_restores_equal_the_primary_and_resume_after_sigkill() {
    if skip_without("qemu-img", TEST) || skip_without("qemu-io", TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, url) = init(dir.path());
    let mut primary = Node::start(&ferryd(), &pcfg);
    let nbd = primary.url("vol0");

    // A (over data written before the base would be the same: the base holds it).
    assert_qemu_io_ok(&qemu_io(
        &nbd,
        &writes(0xa1, &[0, 1 << 20, 20 << 20], 65536),
    ));
    let a = image_of(&nbd, &dir.path().join("a.img"));
    let bm = ctl_json(&pcfg, &["bookmark", "create", "before-b"]);
    assert_eq!(bm["name"], "before-b");
    let mut b_cmds = writes(0xb2, &[4096, 1 << 20, 30 << 20], 8192);
    b_cmds.push("discard 20971520 32768".into());
    b_cmds.push("write -z 65536 16384".into());
    assert_qemu_io_ok(&qemu_io(&nbd, &b_cmds));
    let b = image_of(&nbd, &dir.path().join("b.img"));
    let at_b = wait_archived(&primary);
    let m = metrics(&primary);
    for family in [
        "ferry_archive_archived_seq{target=\"cold\"}",
        "ferry_archive_uploaded_bytes{target=\"cold\"}",
        "ferry_archive_lag_seconds{target=\"cold\"}",
        "ferry_archive_stored_bytes{target=\"cold\"}",
        "ferry_archive_compression_ratio{target=\"cold\"}",
        "ferry_archive_oldest_point_timestamp_seconds{target=\"cold\"}",
        "ferry_archive_last_upload_timestamp_seconds{target=\"cold\"}",
    ] {
        assert!(m.contains(family), "{family} missing:\n{m}");
    }
    status_shows_the_archive(&pcfg, at_b);

    let out = dir.path().join("restored.img");
    let r = restore(&url, &["--bookmark", "before-b"], &out);
    assert_same("restore --bookmark", &std::fs::read(&out).unwrap(), &a);
    assert_eq!(r["seq"], bm["seq"], "{r:#}");
    let r = restore(&url, &["--latest"], &out);
    assert_same("restore --latest", &std::fs::read(&out).unwrap(), &b);
    assert!(seq(&r, "/seq") >= at_b, "{r:#}");
    let l = list(&url);
    assert_eq!(
        (l["bases"].as_u64(), l["volumes"][0]["name"].as_str()),
        (Some(1), Some("vol0")),
        "{l:#}"
    );

    // C, then SIGKILL before the archive's next flush is due; the restarted primary
    // resumes from what the archive holds, with no gap and no new base.
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xc3, &[0, 2 << 20], 131072)));
    primary.kill();
    let primary = Node::start(&ferryd(), &pcfg);
    let nbd = primary.url("vol0");
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xd4, &[8 << 20], 65536)));
    let d = image_of(&nbd, &dir.path().join("d.img"));
    wait_archived(&primary);
    restore(&url, &["--latest"], &out);
    assert_same(
        "restore --latest after SIGKILL",
        &std::fs::read(&out).unwrap(),
        &d,
    );
    restore(&url, &["--bookmark", "before-b"], &out);
    assert_same(
        "restore --bookmark after SIGKILL",
        &std::fs::read(&out).unwrap(),
        &a,
    );
    let l = list(&url);
    assert_eq!(l["bases"], 1, "{l:#}");
    assert!(l["packs"].as_u64() >= Some(2), "{l:#}");
}

/// moto's S3 server on loopback, killed by PID on drop (as in archive/tests/s3.rs).
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn moto_server");
    let moto = Moto { child, port };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "moto_server did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Create the bucket (moto takes unsigned requests).
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "PUT /ferry-test HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "bucket creation: {out}");
    moto
}

/// The same through an S3 server: the primary and ferryctl take the endpoint and
/// credentials from the AWS_* environment.
#[test]
fn archive_on_s3_restores_a_bookmark_and_the_newest_point() {
    const S3_TEST: &str = "archive_on_s3_restores_a_bookmark_and_the_newest_point";
    if skip_without("qemu-img", S3_TEST)
        || skip_without("qemu-io", S3_TEST)
        || skip_without("moto_server", S3_TEST)
    {
        return;
    }
    let moto = start_moto();
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://ferry-test/cluster1";
    let pcfg = init_with(dir.path(), url);
    let primary = Node::start_env(&ferryd(), &pcfg, &env);
    let nbd = primary.url("vol0");
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xa1, &[0, 3 << 20], 65536)));
    let a = image_of(&nbd, &dir.path().join("a.img"));
    ctl_json(&pcfg, &["bookmark", "create", "a"]);
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xb2, &[8192, 5 << 20], 8192)));
    let b = image_of(&nbd, &dir.path().join("b.img"));
    wait_archived(&primary);
    let out = dir.path().join("restored.img");
    restore_env(url, &["--bookmark", "a"], &out, &env);
    assert_same("s3 restore --bookmark", &std::fs::read(&out).unwrap(), &a);
    restore_env(url, &["--latest"], &out, &env);
    assert_same("s3 restore --latest", &std::fs::read(&out).unwrap(), &b);
    let e = export(url, &["--bookmark", "a"], dir.path(), &env);
    let got = image_of(e.uri(), &dir.path().join("exported.img"));
    assert_same("s3 export --bookmark", &got, &a);
}

/// An archive added to a primary that already holds data: its base is taken while a
/// client writes (copy-before-write keeps the base at its sealed point), and the
/// newest restore equals the volume once the writes stopped.
#[test]
fn an_archive_added_under_writes_restores_the_volume() {
    const T: &str = "an_archive_added_under_writes_restores_the_volume";
    if skip_without("qemu-img", T) || skip_without("qemu-io", T) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, _) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:32MiB",
            ..Init::default()
        },
    );
    let mut primary = Node::start(&ferryd(), &pcfg);
    let offsets: Vec<u64> = (0..32u64).map(|i| i << 20).collect();
    assert_qemu_io_ok(&qemu_io(
        &primary.url("vol0"),
        &writes(0x11, &offsets, 262144),
    ));
    assert!(primary.terminate().success());

    let url = format!("file://{}", dir.path().join("archive").display());
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.push_str(&format!(
        "\n[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"{url}\"\nflush_interval = 1\n"
    ));
    std::fs::write(&pcfg, text).unwrap();
    let primary = Node::start(&ferryd(), &pcfg);
    let nbd = primary.url("vol0");
    let load = ferryd::testkit::spawn_qemu_io(&nbd, &mixed_workload(7, 400, 32 << 20, None));
    load.finish();
    let want = image_of(&nbd, &dir.path().join("want.img"));
    wait_archived(&primary);
    let out = dir.path().join("restored.img");
    restore(&url, &["--latest"], &out);
    assert_same("restore --latest", &std::fs::read(&out).unwrap(), &want);
    let l = list(&url);
    assert_eq!(l["bases"], 1, "{l:#}");
}

/// `ferryctl archive export` running in the background (killed on drop), its stderr
/// in a file, and the JSON line it printed once ready.
struct Exported {
    child: std::process::Child,
    info: serde_json::Value,
    stderr: PathBuf,
}

impl Drop for Exported {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exported {
    fn uri(&self) -> &str {
        self.info["uri"].as_str().unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn export(url: &str, point: &[&str], dir: &Path, env: &[(&str, &str)]) -> Exported {
    use std::io::BufRead;
    let stderr = dir.join(format!("export-{}.err", point.join("").replace('/', "_")));
    let mut child = Command::new(ferryctl())
        .envs(env.iter().copied())
        .args(["archive", "export", "--url", url])
        .args(point)
        .args(["--listen", "127.0.0.1:0", "--cache-bytes", "4MiB", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info = serde_json::from_str(&line).unwrap_or(serde_json::Value::Null);
    let e = Exported {
        child,
        info,
        stderr,
    };
    assert!(
        e.info.is_object(),
        "archive export {point:?}: {}",
        e.stderr()
    );
    e
}

/// `qemu-img map` of `uri`: (start, length, data) per run.
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    let o = Command::new("qemu-img")
        .args(["map", "-f", "raw", "--output=json", uri])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            (n("start"), n("length"), e["data"].as_bool().unwrap())
        })
        .collect()
}

fn data_at(map: &[(u64, u64, bool)], offset: u64) -> bool {
    let run = map.iter().find(|r| r.0 <= offset && offset < r.0 + r.1);
    run.unwrap_or_else(|| panic!("{offset} not mapped: {map:?}"))
        .2
}

#[test]
fn archive_export_serves_a_bookmark_with_holes_and_names_a_changed_chunk() {
    const T: &str = "archive_export_serves_a_bookmark_with_holes_and_names_a_changed_chunk";
    if skip_without("qemu-img", T) || skip_without("qemu-io", T) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, _) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:32MiB",
            ..Init::default()
        },
    );
    // Data before the archive: its base holds the chunk at 8 MiB.
    let mut primary = Node::start(&ferryd(), &pcfg);
    assert_qemu_io_ok(&qemu_io(
        &primary.url("vol0"),
        &writes(0x11, &[8 << 20], 1 << 20),
    ));
    assert!(primary.terminate().success());
    let url = format!("file://{}", dir.path().join("archive").display());
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.push_str(&format!(
        "\n[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"{url}\"\nflush_interval = 1\n"
    ));
    std::fs::write(&pcfg, text).unwrap();
    let primary = Node::start(&ferryd(), &pcfg);
    let nbd = primary.url("vol0");
    assert_qemu_io_ok(&qemu_io(&nbd, &writes(0xa1, &[0, 1 << 20], 65536)));
    let a = image_of(&nbd, &dir.path().join("a.img"));
    ctl_json(&pcfg, &["bookmark", "create", "before-b"]);
    let mut b_cmds = writes(0xb2, &[4096, 30 << 20], 8192);
    b_cmds.push("discard 0 4096".into());
    assert_qemu_io_ok(&qemu_io(&nbd, &b_cmds));
    let b = image_of(&nbd, &dir.path().join("b.img"));
    wait_archived(&primary);

    let at_a = export(&url, &["--bookmark", "before-b"], dir.path(), &[]);
    let got = image_of(at_a.uri(), &dir.path().join("got-a.img"));
    assert_same("export --bookmark", &got, &a);
    let m = map(at_a.uri());
    assert!(data_at(&m, 0) && data_at(&m, 8 << 20), "{m:?}");
    // Never written: zero chunks of the base, holes over NBD.
    assert!(!data_at(&m, 16 << 20) && !data_at(&m, 30 << 20), "{m:?}");
    let latest = export(&url, &["--latest"], dir.path(), &[]);
    let got = image_of(latest.uri(), &dir.path().join("got-b.img"));
    assert_same("export --latest", &got, &b);
    assert!(data_at(&map(latest.uri()), 30 << 20));
    drop((at_a, latest));

    // A changed chunk: the read that needs it fails and the object is named; the
    // others still read.
    let chunk = ferry_archive::format::base::chunk_object(&ferry_archive::format::sm3_hex(&[
        &[0x11u8; 1 << 20],
    ]));
    let path = dir.path().join("archive").join(&chunk);
    let mut z = std::fs::read(&path).unwrap();
    let last = z.len() - 1;
    z[last] ^= 0x55;
    std::fs::write(&path, z).unwrap();
    let e = export(&url, &["--latest"], dir.path(), &[]);
    let read = |at: &str| {
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", &format!("read {at} 4k"), e.uri()])
            .output()
            .unwrap()
    };
    let o = read("8M");
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        out.contains("Input/output error"),
        "read of the changed chunk: {out}"
    );
    assert!(
        e.stderr().contains(&chunk),
        "object not named: {}",
        e.stderr()
    );
    assert_qemu_io_ok(&read("1M"));
}

/// Pseudo-random bytes (stored by zstd as literals) with `marker` at the start of
/// every 4 KiB: plaintext that would show in any object holding it unencrypted.
fn marked_data(n: usize, marker: &[u8]) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for block in v.chunks_mut(4096) {
        block[..marker.len()].copy_from_slice(marker);
    }
    v
}

/// The files under `dir` whose bytes contain `marker`.
fn files_holding(dir: &Path, marker: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if std::fs::read(&p)
                .unwrap()
                .windows(marker.len())
                .any(|w| w == marker)
            {
                found.push(p);
            }
        }
    }
    found
}

/// `ferryctl archive restore` that must fail; its stderr.
fn restore_refused(url: &str, key: &[&str], out: &Path) -> String {
    let o = Command::new(ferryctl())
        .args([
            "archive", "restore", "--url", url, "--volume", "vol0", "--latest",
        ])
        .args(key)
        .arg("--to")
        .arg(out)
        .output()
        .unwrap();
    assert!(!o.status.success(), "restore {key:?} accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_encrypted_node_archives_sealed_objects_restored_only_with_its_key() {
    const T: &str = "an_encrypted_node_archives_sealed_objects_restored_only_with_its_key";
    if skip_without("qemu-img", T) || skip_without("qemu-io", T) {
        return;
    }
    const MARKER: &[u8] = b"FERRY-COLD-TIER-PLAINTEXT-MARKER";
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("archive").display());
    let (pcfg, _) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:32MiB",
            encrypt: true,
            ..Init::default()
        },
    );
    let text = std::fs::read_to_string(&pcfg).unwrap();
    let key_file = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("key_file = "))
        .map(|v| pcfg.parent().unwrap().join(v.trim_matches('"')))
        .unwrap_or_else(|| panic!("no key_file in {text}"));
    let key_file = key_file.to_str().unwrap().to_string();
    std::fs::write(
        &pcfg,
        format!(
            "{text}\n[[replication.target]]\nname = \"cold\"\nkind = \"archive\"\nurl = \"{url}\"\nflush_interval = 1\n"
        ),
    )
    .unwrap();
    let src = dir.path().join("marked.bin");
    std::fs::write(&src, marked_data(1 << 20, MARKER)).unwrap();
    let primary = Node::start(&ferryd(), &pcfg);
    let nbd = primary.url("vol0");
    let mut cmds: Vec<String> = [0u64, 5, 17]
        .iter()
        .map(|mib| format!("write -s {} {} 1048576", src.display(), mib << 20))
        .collect();
    cmds.push("flush".into());
    assert_qemu_io_ok(&qemu_io(&nbd, &cmds));
    let want = image_of(&nbd, &dir.path().join("want.img"));
    wait_archived(&primary);

    let out = dir.path().join("restored.img");
    let o = Command::new(ferryctl())
        .args([
            "archive", "restore", "--url", &url, "--volume", "vol0", "--latest",
        ])
        .args(["--key-file", &key_file, "--to"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same("restore with the key", &std::fs::read(&out).unwrap(), &want);
    assert_eq!(
        files_holding(&dir.path().join("archive"), MARKER),
        Vec::<PathBuf>::new(),
        "plaintext in the archive"
    );

    let key_id = ferry_gm_key_id(&key_file);
    let o = Command::new(ferryctl())
        .args([
            "archive",
            "list",
            "--url",
            &url,
            "--json",
            "--key-file",
            &key_file,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l["encryption_key_id"], key_id.as_str(), "{l:#}");
    let e = restore_refused(&url, &[], &out);
    assert!(
        e.contains("encrypted with key") && e.contains(&key_id),
        "{e}"
    );
    let other = dir.path().join("other.key");
    let o = Command::new(ferryctl())
        .args(["keygen", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let other_id = ferry_gm_key_id(other.to_str().unwrap());
    let e = restore_refused(&url, &["--key-file", other.to_str().unwrap()], &out);
    assert!(e.contains(&key_id) && e.contains(&other_id), "{e}");

    // The same point served over NBD with the key, read by qemu-img: the primary's
    // bytes; without the key or with another, the export is refused before it serves.
    let e = export(
        &url,
        &["--latest", "--key-file", &key_file],
        dir.path(),
        &[],
    );
    let got = image_of(e.uri(), &dir.path().join("exported.img"));
    assert_same("encrypted export --latest", &got, &want);
    drop(e);
    for (args, named) in [
        (vec!["--latest"], vec![key_id.as_str()]),
        (
            vec!["--latest", "--key-file", other.to_str().unwrap()],
            vec![key_id.as_str(), other_id.as_str()],
        ),
    ] {
        let err = export_refused(&url, &args);
        assert!(
            err.contains("encrypted with key") && named.iter().all(|id| err.contains(id)),
            "export {args:?}: {err}"
        );
    }
}

/// `ferryctl archive export` that must exit with an error (not serve); its stderr.
fn export_refused(url: &str, args: &[&str]) -> String {
    let mut child = Command::new(ferryctl())
        .args(["archive", "export", "--url", url, "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("archive export {args:?} served instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "archive export {args:?} exited 0: {err}");
    err
}

/// The key id written on a key file's key line (its third word).
fn ferry_gm_key_id(path: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find(|l| l.starts_with("ferry-sm4-kek-v1 "))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no key line in {path}"))
        .to_string()
}
