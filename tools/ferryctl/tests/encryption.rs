//! Encryption at rest end to end (journal/FORMAT.md "Encryption at rest"): an
//! encrypted primary and standby made by `ferryctl init --encrypt` replicate
//! byte-identically, their journal segments hold no plaintext, a restart with a
//! wrong, missing or loosely permitted key is refused with a clear error, and a
//! restart with the right key recovers and goes on replicating.
mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_api::config::Config;
use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

/// The marker written through NBD: a run of this byte must never show up in a
/// journal segment (a 512-byte run in ciphertext has probability ~2^-4096).
const MARK: u8 = 0xa7;

fn segments(journal: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn has_marker(bytes: &[u8]) -> bool {
    bytes.windows(512).any(|w| w.iter().all(|&b| b == MARK))
}

/// The key file a node's config names, and the key id `ferryctl keygen` prints.
fn key_file(config: &Path) -> PathBuf {
    Config::load(config)
        .unwrap()
        .encryption
        .expect("[encryption] in the config made by init --encrypt")
        .key_file
}

fn set_key_file(config: &Path, key: &Path) {
    let mut cfg = Config::load(config).unwrap();
    cfg.encryption.as_mut().unwrap().key_file = key.to_path_buf();
    std::fs::write(config, cfg.to_toml()).unwrap();
}

/// `ferryctl keygen --out PATH`: the new key's id.
fn keygen(path: &Path) -> String {
    let out = Command::new(ferryctl())
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let id = text
        .split("key id ")
        .nth(1)
        .and_then(|r| r.get(..16))
        .unwrap_or_else(|| panic!("no key id in {text:?}"));
    id.to_string()
}

/// The key id in a key file (third word of its key line).
fn key_id_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("ferry-sm4-kek-v1 "))
        .expect("key line");
    line.split_whitespace().nth(2).unwrap().to_string()
}

/// Starts ferryd on `config` expecting it to refuse: its stderr once it exited.
fn refused_start(config: &Path) -> String {
    let mut child = Command::new(ferryd())
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferryd started although its key is wrong ({})",
                config.display()
            );
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
    assert!(!status.success(), "ferryd exited 0: {err}");
    for line in err.lines().filter(|l| l.starts_with("ferryd:")) {
        eprintln!("refused as expected: {line}");
    }
    err
}

#[test]
fn encrypted_pair_replicates_and_refuses_a_wrong_key() {
    if skip_without(
        "qemu-io",
        "encrypted_pair_replicates_and_refuses_a_wrong_key",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            encrypt: true,
            ..Init::default()
        },
    );
    let (pkey, skey) = (key_file(&pcfg), key_file(&scfg));
    for k in [&pkey, &skey] {
        assert_eq!(
            std::fs::metadata(k).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let pid = key_id_of(&pkey);
    assert_ne!(pid, key_id_of(&skey), "one key per node");

    let standby = Node::start(&ferryd(), &scfg);
    let mut primary = Node::start(&ferryd(), &pcfg);
    let writes: Vec<String> = (0..200u64)
        .map(|i| format!("write -P {MARK} {} 64k", i * 65536 % (60 << 20)))
        .collect();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &writes));
    let last = wait_caught_up(&primary, &standby);
    assert!(last >= 200, "last_seq {last}");
    let (pvol, svol) = (
        dir.path().join("primary/vol0.img"),
        dir.path().join("dr1/vol0.img"),
    );
    same_file(&pvol, &svol);
    // The grep works (the volumes are not encrypted: only the journal is)...
    assert!(has_marker(&std::fs::read(&pvol).unwrap()));
    // ...and finds nothing in either node's journal segments.
    for node in ["primary", "dr1"] {
        let segs = segments(&dir.path().join(node).join("journal"));
        assert!(!segs.is_empty());
        for seg in segs {
            let bytes = std::fs::read(&seg).unwrap();
            assert!(!has_marker(&bytes), "plaintext marker in {}", seg.display());
        }
    }

    // Restarts of the primary: another key, no key file, a group-readable key.
    assert!(primary.terminate().success());
    let other = dir.path().join("other.key");
    let other_id = keygen(&other);
    set_key_file(&pcfg, &other);
    let err = refused_start(&pcfg);
    assert!(
        err.contains(&pid) && err.contains(&other_id) && err.contains("wrong key"),
        "wrong key: {err}"
    );
    set_key_file(&pcfg, &dir.path().join("missing.key"));
    let err = refused_start(&pcfg);
    assert!(err.contains("missing.key"), "missing key: {err}");
    set_key_file(&pcfg, &pkey);
    std::fs::set_permissions(&pkey, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = refused_start(&pcfg);
    assert!(err.contains("chmod 600"), "loose key file: {err}");
    std::fs::set_permissions(&pkey, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The right key: recovers everything and replicates on.
    let primary = Node::start(&ferryd(), &pcfg);
    assert!(seq(&primary.status(), "/last_seq") >= last);
    let more: Vec<String> = (0..50u64)
        .map(|i| format!("write -P {} {} 4k", i % 200 + 1, (i * 7 + 3) * 4096))
        .collect();
    assert_qemu_io_ok(&qemu_io(&primary.url("vol0"), &more));
    wait_caught_up(&primary, &standby);
    same_file(&pvol, &svol);
}

/// The undo segments of a standby (its `[pit]` undo log).
fn undo_segments(config: &Path) -> Vec<PathBuf> {
    let dir = Config::load(config).unwrap().undo_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "undo"))
        .collect();
    v.sort();
    v
}

/// The key id (hex) a sealed undo segment's header names (format version 3,
/// flags ALIGNED | SEALED, key id at 64..72), or `None` for a plaintext one.
fn undo_key_id(seg: &Path) -> Option<String> {
    let b = std::fs::read(seg).unwrap();
    (b[8..12] == [3, 0, 3, 0]).then(|| b[64..72].iter().map(|x| format!("{x:02x}")).collect())
}

fn ferryctl_ok(args: &[&str]) -> String {
    let out = Command::new(ferryctl()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ferryctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Point-in-time recovery on an encrypted standby: the undo log is sealed (no
/// before-image byte in its files), a view at a bookmark and a rollback to it are
/// exact; after `ferryctl key rotate` and a restart, new undo segments are sealed
/// under the new key, the old ones stay readable (the view is still exact), and the
/// old key cannot be retired while they need it.
#[test]
fn encrypted_standby_pit_views_rollback_and_rotation() {
    let name = "encrypted_standby_pit_views_rollback_and_rotation";
    if skip_without("qemu-io", name) || skip_without("qemu-img", name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            encrypt: true,
            ..Init::default()
        },
    );
    let skey = key_file(&scfg);
    let old_id = key_id_of(&skey);
    let mut standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    // A: the marker everywhere B will overwrite, so B's before-images are markers.
    let a_cmds: Vec<String> = (0..64u64)
        .map(|i| format!("write -P {MARK} {} 64k", i * 65536))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &a_cmds));
    let a = image_of(&url, &dir.path().join("a.img"));
    ctl_json(&pcfg, &["bookmark", "create", "before-b"]);
    for round in 0..4u64 {
        let b_cmds: Vec<String> = (0..16u64)
            .map(|i| format!("write -P {} {} 64k", 0xb0 + round, (i * 4 + round) * 65536))
            .collect();
        assert_qemu_io_ok(&qemu_io(&url, &b_cmds));
    }
    wait_caught_up(&primary, &standby);
    let segs = undo_segments(&scfg);
    assert!(!segs.is_empty(), "no undo segments");
    for seg in &segs {
        let bytes = std::fs::read(seg).unwrap();
        assert!(
            !has_marker(&bytes),
            "plaintext before-image in {}",
            seg.display()
        );
        assert_eq!(
            undo_key_id(seg).as_deref(),
            Some(old_id.as_str()),
            "{}",
            seg.display()
        );
    }
    let view = |what: &str| {
        let v = ctl_json(
            &scfg,
            &[
                "pit",
                "export",
                "--volume",
                "vol0",
                "--bookmark",
                "before-b",
                "--listen",
                "127.0.0.1:0",
            ],
        );
        let uri = v["uri"].as_str().unwrap().to_string();
        let got = image_of(&uri, &dir.path().join(format!("{what}.img")));
        assert_same(what, &got, &a);
        let out = ctl(&scfg, &["pit", "unexport"]);
        assert!(out.status.success(), "unexport: {out:?}");
    };
    view("view at the bookmark");

    // Rotate the standby's key and restart it: the older key stays in the ring.
    assert!(standby.terminate().success());
    let out = ferryctl_ok(&["key", "rotate", "--key-file", skey.to_str().unwrap()]);
    let new_id = key_id_of_current(&skey);
    assert_ne!(new_id, old_id);
    assert!(out.contains(&new_id) && out.contains(&old_id), "{out}");
    let list = ferryctl_ok(&["key", "list", "--key-file", skey.to_str().unwrap()]);
    assert!(
        list.contains(&format!("current {new_id}")) && list.contains(&old_id),
        "{list}"
    );
    let standby = Node::start(&ferryd(), &scfg);
    let c_cmds: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {MARK} {} 64k", (i * 4 + 1) * 65536))
        .collect();
    assert_qemu_io_ok(&qemu_io(&url, &c_cmds));
    wait_caught_up(&primary, &standby);
    let ids: Vec<Option<String>> = undo_segments(&scfg)
        .iter()
        .map(|s| undo_key_id(s))
        .collect();
    assert!(ids.contains(&Some(old_id.clone())), "{ids:?}");
    assert_eq!(
        ids.last().unwrap().as_deref(),
        Some(new_id.as_str()),
        "{ids:?}"
    );
    for seg in undo_segments(&scfg) {
        assert!(
            !has_marker(&std::fs::read(&seg).unwrap()),
            "{}",
            seg.display()
        );
    }
    view("view at the bookmark after rotation");
    // Retiring the old key is refused while undo segments need it.
    let out = Command::new(ferryctl())
        .arg("--config")
        .arg(&scfg)
        .args(["key", "retire", "--key-file"])
        .arg(&skey)
        .args(["--id", &old_id])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("still unwraps"),
        "{err}"
    );
    assert_eq!(key_id_of_current(&skey), new_id);

    // Rollback to the bookmark, across old-key and new-key segments: exact.
    let out = ctl(
        &scfg,
        &["rollback", "--volume", "vol0", "--bookmark", "before-b"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replica = Config::load(&scfg).unwrap().volumes[0].path.clone();
    assert_same(
        "replica after the rollback",
        &std::fs::read(replica).unwrap(),
        &a,
    );
}

/// The current key's id (the last key line) of a key file.
fn key_id_of_current(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .rfind(|l| l.starts_with("ferry-sm4-kek-v1 "))
        .expect("key line");
    line.split_whitespace().nth(2).unwrap().to_string()
}
