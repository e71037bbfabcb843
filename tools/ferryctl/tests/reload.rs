//! `ferryctl reload` on running ferryd processes, beyond targets (replication.rs has
//! those): the metrics endpoint moves (the new address bound before the old one
//! closes; a taken address refuses the reload and the old one keeps serving), a
//! standby's point-in-time retention limits apply at once, and access grants apply to
//! the next control request; SIGHUP reloads a standby as `ferryctl reload` does. Each
//! time the same process (same PID, one recovery).
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_api::config::Config;
use ferryd::testkit::{assert_qemu_io_ok, qemu_io, skip_without, Node};

/// The status line of `GET path` at `addr`, or `None` when nothing answers there.
fn http_status(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().next().map(str::to_string)
}

/// Polls until `ok` holds (bounded, naming what it waited for).
fn eventually(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rewrites `config` with `edit` applied.
fn edit(config: &Path, edit: impl FnOnce(&mut Config)) {
    let mut cfg = Config::load(config).unwrap();
    edit(&mut cfg);
    std::fs::write(config, cfg.to_toml()).unwrap();
}

/// The node is the process the test started, which recovered its journal once.
fn same_process(node: &Node) {
    assert!(Path::new(&format!("/proc/{}", node.pid)).exists());
    assert_eq!(
        node.log_text().matches("journal recovered").count(),
        1,
        "ferryd restarted: {}",
        node.log_text()
    );
}

fn reload_ok(config: &Path) -> String {
    let out = ctl(config, &["reload"]);
    assert!(out.status.success(), "reload: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_reload_moves_the_metrics_endpoint_and_refuses_a_taken_port() {
    let dir = tempfile::tempdir().unwrap();
    let pcfg = lone_primary(dir.path());
    let primary = Node::start(&ferryd(), &pcfg);
    let old = primary.metrics.expect("init configures [metrics]");
    assert_eq!(
        http_status(old, "/metrics").as_deref(),
        Some("HTTP/1.1 200 OK")
    );

    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let new = free.local_addr().unwrap();
    drop(free);
    edit(&pcfg, |c| {
        c.metrics.as_mut().unwrap().listen = new.to_string()
    });
    let said = reload_ok(&pcfg);
    assert!(
        said.contains(&format!("metrics endpoint {old} -> {new}")),
        "{said}"
    );
    assert_eq!(
        http_status(new, "/metrics").as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    eventually("the old metrics port to close", || {
        http_status(old, "/metrics").is_none()
    });

    // A taken address: refused with the reason, the endpoint stays where it was.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    edit(&pcfg, |c| {
        c.metrics.as_mut().unwrap().listen = taken_addr.to_string()
    });
    let out = ctl(&pcfg, &["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("metrics.listen"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains(&format!("stays on {new}")), "{err}");
    assert_eq!(
        http_status(new, "/metrics").as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    drop(taken);
    same_process(&primary);
}

#[test]
fn a_reload_lowers_a_running_standbys_retention_at_once() {
    if skip_without(
        "qemu-io",
        "a_reload_lowers_a_running_standbys_retention_at_once",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (pcfg, scfg) = init_pair(
        dir.path(),
        &Init {
            volume: "vol0:32MiB",
            mode: "sync",
            ..Init::default()
        },
    );
    let mut text = std::fs::read_to_string(&scfg).unwrap();
    text.push_str("\n[pit]\nmax_bytes = \"64MiB\"\nsegment_size = \"1MiB\"\n");
    std::fs::write(&scfg, text).unwrap();
    let standby = Node::start(&ferryd(), &scfg);
    let primary = Node::start(&ferryd(), &pcfg);
    let url = primary.url("vol0");
    // Data everywhere first, so later writes have non-zero before-images.
    let fill = |b: u8, off: u64, len: u64| vec![format!("write -P {b} {off} {len}")];
    assert_qemu_io_ok(&qemu_io(&url, &fill(1, 0, 16 << 20)));
    for i in 0..8u64 {
        assert_qemu_io_ok(&qemu_io(&url, &fill(2 + i as u8, i << 20, 1 << 20)));
    }
    let last = seq(&primary.status(), "/durable_seq");
    standby.wait_status(
        "the standby to apply everything",
        Duration::from_secs(60),
        |st| seq(st, "/applied_seq") >= last,
    );
    let before = standby.status()["pit"].clone();
    assert_eq!(seq(&before, "/max_bytes"), 64 << 20, "{before:#}");
    assert!(seq(&before, "/used_bytes") > 4 << 20, "{before:#}");

    let mut text = std::fs::read_to_string(&scfg).unwrap();
    text = text.replace("max_bytes = \"64MiB\"", "max_bytes = \"3MiB\"");
    std::fs::write(&scfg, text).unwrap();
    let said = reload_ok(&scfg);
    assert!(said.contains("pit retention: max_bytes 3145728"), "{said}");
    // In force at once: status shows the new limit and the window within it.
    let after = standby.status()["pit"].clone();
    assert_eq!(seq(&after, "/max_bytes"), 3 << 20, "{after:#}");
    assert!(seq(&after, "/used_bytes") <= 3 << 20, "{after:#}");
    assert!(
        seq(&after, "/oldest/seq") > seq(&before, "/oldest/seq"),
        "{before:#} -> {after:#}"
    );
    let audit = std::fs::read_to_string(
        Config::load(&scfg)
            .unwrap()
            .node
            .metadata_dir
            .join("audit.log"),
    )
    .unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"request\":\"reload-applied\"") && l.contains("pit retention")),
        "{audit}"
    );
    // SIGHUP reloads a standby too: the limit raised again.
    let text = std::fs::read_to_string(&scfg).unwrap();
    std::fs::write(
        &scfg,
        text.replace("max_bytes = \"3MiB\"", "max_bytes = \"64MiB\""),
    )
    .unwrap();
    // SAFETY: signalling the standby this test started, by its PID.
    unsafe { libc::kill(standby.pid as i32, libc::SIGHUP) };
    standby.wait_status("SIGHUP to raise the limit", Duration::from_secs(30), |st| {
        seq(st, "/pit/max_bytes") == 64 << 20
    });
    same_process(&standby);
}

#[test]
fn a_reload_revokes_and_grants_control_roles_for_the_next_request() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!(
            "SKIP a_reload_revokes_and_grants_control_roles_for_the_next_request: needs root \
             to ask as another user (nobody)"
        );
        return;
    }
    if !ferryctl()
        .metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    {
        eprintln!(
            "SKIP a_reload_revokes_and_grants_control_roles_for_the_next_request: ferryctl \
             is not executable by others"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pcfg = lone_primary(dir.path());
    for p in [dir.path(), &dir.path().join("primary")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut text = std::fs::read_to_string(&pcfg).unwrap();
    text.push_str("\n[access]\nsocket_mode = 0o666\nviewers = { uids = [65534] }\n");
    std::fs::write(&pcfg, &text).unwrap();
    std::fs::set_permissions(&pcfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let primary = Node::start(&ferryd(), &pcfg);
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(ferryctl())
            .arg("--config")
            .arg(&pcfg)
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["status"]);
    assert!(out.status.success(), "a viewer: {out:?}");

    // Revoked: the next request is denied.
    std::fs::write(&pcfg, text.replace("viewers = { uids = [65534] }\n", "")).unwrap();
    let said = reload_ok(&pcfg);
    assert!(said.contains("access grants"), "{said}");
    let out = as_nobody(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        err.contains("permission denied: status needs viewer, uid 65534 has no role"),
        "{err}"
    );

    // Granted as operator: status (viewer) and a bookmark (operator) are allowed.
    let text = text.replace("viewers = {", "operators = {");
    std::fs::write(&pcfg, &text).unwrap();
    reload_ok(&pcfg);
    let out = as_nobody(&["bookmark", "create", "granted"]);
    assert!(out.status.success(), "an operator: {out:?}");
    let out = as_nobody(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reload needs admin"), "{err}");
    same_process(&primary);
}
