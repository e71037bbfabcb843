//! ferryctl as an operator meets it without a cluster running: every option documented
//! in `help`, a closed pipe ends it quietly, `init` gives nodes on one host their own
//! ports, and a control socket this user may not open is named as such.
mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use ferry_api::config::Config;

/// Every subcommand path: `["init"]`, `["bookmark", "create"]`, …
fn subcommand_paths(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
    // clap's own `help` subcommands (added when the command is built) take no options.
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut path = prefix.to_vec();
        path.push(sub.get_name().to_string());
        out.push(path.clone());
        subcommand_paths(sub, &path, out);
    }
}

/// Entries of the `Options:` and `Arguments:` sections without a description: an
/// entry line (indented less than a continuation, starting with `-`, `<` or `[`) with no text after its spec and no
/// continuation line below.
fn undocumented(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut bad = Vec::new();
    let mut in_section = false;
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            in_section = matches!(line.trim_end(), "Options:" | "Arguments:");
            continue;
        }
        let entry = in_section
            && !line.starts_with("          ")
            && line.trim_start().starts_with(['-', '<', '[']);
        if !entry {
            continue;
        }
        let has_text = line
            .trim_start()
            .split_once("  ")
            .is_some_and(|(_, d)| !d.trim().is_empty());
        let next_is_text = lines
            .get(i + 1)
            .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
        if !has_text && !next_is_text {
            bad.push(line.trim().to_string());
        }
    }
    bad
}

#[test]
fn every_option_of_every_subcommand_has_a_description() {
    let mut paths = Vec::new();
    subcommand_paths(&ferryctl::cli::command(), &[], &mut paths);
    assert!(paths.len() >= 15, "{paths:?}");
    let mut missing = Vec::new();
    for path in std::iter::once(Vec::new()).chain(paths) {
        let out = Command::new(ferryctl())
            .arg("help")
            .args(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "help {path:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains("Options:"), "help {path:?}:\n{help}");
        for entry in undocumented(&help) {
            missing.push(format!("ferryctl help {}: {entry}", path.join(" ")));
        }
        if path == ["init"] {
            assert!(!help.contains("--config"), "init reads no config:\n{help}");
        }
        if path == ["status"] {
            assert!(help.contains("--config <FILE>"), "{help}");
        }
    }
    assert!(
        missing.is_empty(),
        "options without a description:\n{}",
        missing.join("\n")
    );
    // The checker itself finds a bare entry.
    assert_eq!(
        undocumented("Options:\n      --dir <DIR>\n  -h, --help  Print help\n"),
        ["--dir <DIR>"]
    );
}

/// A pipe whose reading end is already closed: the first write gets EPIPE.
fn closed_pipe() -> std::fs::File {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills two descriptors that we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: closing the reading end we own; the writing end becomes the File.
    unsafe { libc::close(fds[0]) };
    unsafe { std::fs::File::from_raw_fd(fds[1]) }
}

#[test]
fn a_closed_pipe_ends_ferryctl_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ferryctl())
        .args(["init", "--dir"])
        .arg(dir.path())
        .args(["--volume", "vol0:4MiB", "--nbd", "127.0.0.1:0"])
        .args(["--journal-size", "16MiB", "--segment-size", "4MiB"])
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.is_empty(), "quietly: {err}");
    assert!(
        out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
        "{:?}",
        out.status
    );
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn init_gives_nodes_on_one_host_their_own_nbd_and_metrics_ports() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(ferryctl())
        .args(["init", "--dir"])
        .arg(dir.path())
        .args(["--volume", "vol0:4MiB", "--nbd", "127.0.0.1:10809"])
        .args(["--journal-size", "16MiB", "--segment-size", "4MiB"])
        .args(["--primary", "127.0.0.1:7001"])
        .args([
            "--standby",
            "dr1=127.0.0.1:7002",
            "--standby",
            "dr2=127.0.0.1:7003",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut nbd = Vec::new();
    let mut metrics = Vec::new();
    for node in ["primary", "dr1", "dr2"] {
        let path = dir.path().join(format!("{node}.toml"));
        let cfg = Config::load(&path).unwrap();
        nbd.push(port(&cfg.nbd.unwrap().listen));
        let m = cfg.metrics.expect("[metrics] for every node").listen;
        assert!(
            m.starts_with("127.0.0.1:"),
            "{node}: metrics on loopback: {m}"
        );
        metrics.push(port(&m));
        // ferryd accepts what init writes.
        let check = Command::new(ferryd())
            .arg("--check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    assert_eq!(nbd, [10809, 10810, 10811]);
    assert_eq!(metrics, [9640, 9641, 9642]);
}

#[test]
fn a_socket_this_user_may_not_open_is_named_as_such() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg_path = lone_primary(dir.path());
    let socket = Config::load(&cfg_path).unwrap().control.socket;
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut cmd = Command::new(ferryctl());
    cmd.args(["status", "--config"]).arg(&cfg_path);
    // SAFETY: getuid has no preconditions.
    let mode = if unsafe { libc::getuid() } == 0 {
        // root passes every permission check: ask as nobody, whom a 0660 root socket
        // keeps out.
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
        for p in [dir.path(), &dir.path().join("primary")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        0o660
    } else {
        0o000
    };
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode)).unwrap();
    if !Path::new(ferryctl())
        .metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    {
        eprintln!("SKIP a_socket_this_user_may_not_open_is_named_as_such: ferryctl is not executable by others");
        return;
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exists but this user may not use it"), "{err}");
    assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
    assert!(!err.contains("is it running"), "{err}");
}
