//! The audit log of control servers in their own processes (issue 16 path 9):
//!
//! * a process killed (SIGKILL) while a state-changing request is being carried out
//!   leaves its intent in the audit log, without an outcome; the verifier reports it,
//!   and the log reopens and goes on after it. That server runs in a child process
//!   (this test binary, run again with `FERRY_AUDIT_CRASH_CHILD` set) whose `pause`
//!   handler never returns, as a long action (a rollback, a promote) would not before
//!   the kill;
//! * a real ferryd rotates its log by `[audit] max_file_size`, keeps `keep_files`, and
//!   audits a bookmark as an intent and its outcome.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::audit::{self, AuditEntry, Outcome};
use ferry_api::control::{Request, Response};
use ferryd::ops::audit::AuditLog;
use ferryd::ops::control::{self, Access, Handler};
use ferryd::testkit::{primary_config, Node};

const CHILD: &str = "FERRY_AUDIT_CRASH_CHILD";

/// The child: serves the control socket in `dir` until it is killed.
fn child(dir: &Path) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let access = Access::from_config(None);
        let audit = Arc::new(AuditLog::open(&dir.join("audit.log")).expect("audit log"));
        let listener = control::bind(&dir.join("ctl.sock"), &access)
            .await
            .expect("bind");
        let handler: Handler = Arc::new(|req| match req {
            Request::Pause => loop {
                std::thread::sleep(Duration::from_secs(60));
            },
            _ => Response::ok(serde_json::json!({})),
        });
        let (_stop, rx) = tokio::sync::watch::channel(false);
        control::serve(
            listener,
            dir.join("ctl.sock"),
            handler,
            access,
            Some(audit),
            rx,
        )
        .await;
    });
    unreachable!("the control server runs until the process is killed")
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn sigkill_between_intent_and_outcome_leaves_the_intent_reported() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(&PathBuf::from(dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit.log");
    let sock = dir.path().join("ctl.sock");
    let mut server = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_between_intent_and_outcome_leaves_the_intent_reported",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the control socket", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    // Answered before the kill: a batched line, written but maybe not fsynced yet.
    let r = ferry_api::control::call(&sock, &Request::Status).unwrap();
    assert!(r.ok, "{r:?}");
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    conn.write_all(b"{\"cmd\":\"pause\"}\n").unwrap();
    wait_for("the intent line", || {
        lines(&log_path).iter().any(|l| l["result"] == "intent")
    });
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    let report = audit::verify(&log_path).unwrap();
    assert_eq!(report.entries, 2, "status, then pause's intent");
    assert_eq!(report.open_intents.len(), 1, "{:?}", report.open_intents);
    let open = &report.open_intents[0];
    assert_eq!((open.seq, open.request.as_str()), (2, "pause"));
    let l = lines(&log_path);
    assert_eq!(l[1]["args"], serde_json::json!({"cmd": "pause"}));

    // The restarted daemon goes on after the intent; it stays reported.
    let log = AuditLog::open(&log_path).unwrap();
    log.append(AuditEntry {
        uid: Some(0),
        gid: Some(0),
        pid: Some(1),
        role: None,
        request: "status".into(),
        args: serde_json::json!({"cmd": "status"}),
        result: Outcome::Ok,
        message: None,
    })
    .unwrap();
    drop(log);
    let report = audit::verify(&log_path).unwrap();
    assert_eq!(report.entries, 3);
    assert_eq!(report.open_intents.len(), 1);
    assert_eq!(report.open_intents[0].seq, 2);
}

#[test]
fn ferryd_rotates_its_audit_log_by_config_and_audits_intents() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 4 * MIB)], 16 * MIB, 2 * MIB);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[audit]\nmax_file_size = \"64KiB\"\nkeep_files = 2\n");
    std::fs::write(&cfg, text).unwrap();
    let mut node = Node::start(Path::new(env!("CARGO_BIN_EXE_ferryd")), &cfg);
    let sock = dir.path().join("primary/ferryd.sock");
    // About 350 bytes a line: 600 lines fill three 64 KiB files and start a fourth.
    for _ in 0..600 {
        let r = ferry_api::control::call(&sock, &Request::Status).unwrap();
        assert!(r.ok, "{r:?}");
    }
    let bookmark = Request::BookmarkCreate {
        name: "after-status".into(),
    };
    let r = ferry_api::control::call(&sock, &bookmark).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(node.terminate().success(), "{}", node.log_text());

    let active = dir.path().join("primary/audit.log");
    let report = audit::files::verify_chain(&active).unwrap();
    let names: Vec<_> = report.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names.len(),
        3,
        "two rotated files kept, and the active one: {names:?}"
    );
    assert_eq!(names[2], "audit.log");
    let from = report
        .continues_from
        .clone()
        .expect("the oldest files were removed");
    assert!(from.prev_file.starts_with("audit.log.0000"), "{from:?}");
    assert!(report.open_intents.is_empty(), "{:?}", report.open_intents);
    let l = lines(&active);
    let (intent, outcome) = (&l[l.len() - 2], &l[l.len() - 1]);
    assert_eq!(intent["request"], "bookmark");
    assert_eq!(intent["result"], "intent");
    assert_eq!(outcome["result"], "ok");
    assert_eq!(outcome["intent"], intent["seq"]);
    // Every request and every rotation header is one line of the chain.
    let rotations: u64 = names[1].rsplit('.').next().unwrap().parse().unwrap();
    assert!(rotations >= 3, "{names:?}");
    assert_eq!(outcome["seq"].as_u64(), Some(602 + rotations));
}
