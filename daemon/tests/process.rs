//! The ferryd process as an operator meets it: a bad config is reported once, plainly,
//! naming the key; `--check-config`; logs in a file carry no colour codes; a second
//! ferryd on the same node names the first one's pid.
use std::path::Path;
use std::process::Command;

use ferryd::testkit::{primary_config, Node};

const MIB: u64 = 1 << 20;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn bad_config(dir: &Path) -> std::path::PathBuf {
    let cfg = primary_config(dir, &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("size = \"4MiB\""), "{text}");
    std::fs::write(&cfg, text.replace("size = \"4MiB\"", "size = \"12XB\"")).unwrap();
    cfg
}

#[test]
fn a_bad_config_is_reported_once_plainly_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = bad_config(dir.path());
    let out = Command::new(ferryd())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("12XB").count(), 1, "printed once: {err}");
    assert!(err.contains("key `volume[0].size`"), "{err}");
    assert!(!out.stderr.contains(&0x1b), "no ANSI escapes: {err:?}");
}

#[test]
fn check_config_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    let out = Command::new(ferryd())
        .arg("--check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("config OK"), "{stdout}");
    // Nothing was started: no journal, no metadata, no lock file.
    let data = dir.path().join("primary");
    assert!(!data.join("journal").exists());
    assert!(!data.join("ferryd.pid").exists());

    let bad_dir = tempfile::tempdir().unwrap();
    let bad = bad_config(bad_dir.path());
    let out = Command::new(ferryd())
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `volume[0].size`"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_second_ferryd_names_the_first_and_logs_have_no_colours() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    let mut first = Node::start(ferryd(), &cfg);
    let out = Command::new(ferryd())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let meta = dir.path().join("primary");
    assert!(
        err.contains(&format!(
            "another ferryd (pid {}) runs this node (metadata {})",
            first.pid,
            meta.display()
        )),
        "{err}"
    );
    assert!(!err.contains("Database already open"), "{err}");
    assert!(first.terminate().success(), "{}", first.log_text());
    // The first one's stderr went to a file: plain text, no colour codes.
    let log = std::fs::read(&first.log).unwrap();
    assert!(!log.is_empty());
    assert!(
        !log.contains(&0x1b),
        "ESC in a log file: {}",
        String::from_utf8_lossy(&log)
    );
    // Its lock went with it: the node starts again.
    let again = Node::start(ferryd(), &cfg);
    drop(again);
}
