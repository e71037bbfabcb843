//! The control socket in-process: roles from peer credentials, denial messages, and the
//! audit trail (written before the response; state-changing requests as an fsynced
//! intent before the action and an fsynced outcome after it, the rest fsynced in
//! batches).
use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use ferry_api::audit;
use ferry_api::control::{Request, Response, Role};
use ferryd::ops::audit::AuditLog;
use ferryd::ops::control::{self, Access, Handler};

/// Sends one raw request line, returns the response.
fn raw(sock: &Path, line: &str) -> Response {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut resp = String::new();
    std::io::BufReader::new(s).read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap()
}

fn handler() -> Handler {
    Arc::new(|req| match req {
        Request::Status => Response::ok(serde_json::json!({"node": "test"})),
        Request::Pause => Response::ok(serde_json::json!({"paused": "by test"})),
        other => Response::err(format!("{} is not served by this test", other.name())),
    })
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Server {
    sock: std::path::PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(dir: &Path, access: Access, audit: Option<Arc<AuditLog>>) -> Server {
    let sock = dir.join("ctl/ferryd.sock");
    let listener = control::bind(&sock, &access).await.unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(control::serve(
        listener,
        sock.clone(),
        handler(),
        access,
        audit,
        rx,
    ));
    Server { sock, stop, task }
}

impl Server {
    async fn call(&self, line: &'static str) -> Response {
        let sock = self.sock.clone();
        tokio::task::spawn_blocking(move || raw(&sock, line))
            .await
            .unwrap()
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
        assert!(!self.sock.exists(), "socket removed on shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_reads_status_but_admin_requests_are_denied_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // No root-is-admin rule in this policy: tests run as root, and root must be just a
    // viewer here.
    let access = Access::deny_all().grant(Role::Viewer, &[uid], &[]);
    let log_path = dir.path().join("audit.log");
    let audit = Arc::new(AuditLog::open(&log_path).unwrap());
    let srv = start(dir.path(), access, Some(audit)).await;
    let mode = std::fs::metadata(&srv.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "default socket mode");

    // control::call (ferryctl's client) still works.
    let sock = srv.sock.clone();
    let r = tokio::task::spawn_blocking(move || ferry_api::control::call(&sock, &Request::Status))
        .await
        .unwrap()
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.result.unwrap()["node"], "test");
    // The entry is durable before the response: no waiting here.
    assert_eq!(audit_lines(&log_path).len(), 1);

    let r = srv.call(r#"{"cmd":"promote","force":true}"#).await;
    assert!(!r.ok);
    assert_eq!(
        r.error.as_deref(),
        Some(format!("permission denied: promote needs admin, uid {uid} has viewer").as_str())
    );
    let r = srv
        .call(r#"{"cmd":"bookmark","name":"before-upgrade"}"#)
        .await;
    assert_eq!(
        r.error.as_deref(),
        Some(format!("permission denied: bookmark needs operator, uid {uid} has viewer").as_str())
    );
    let r = srv.call("not json").await;
    assert!(r.error.unwrap().starts_with("bad request"));

    let lines = audit_lines(&log_path);
    assert_eq!(lines.len(), 4);
    let status = &lines[0];
    assert_eq!(status["seq"], 1);
    assert_eq!(status["prev"], audit::GENESIS);
    assert_eq!(status["uid"], uid);
    assert_eq!(status["gid"], gid);
    assert_eq!(status["pid"], std::process::id());
    assert_eq!(status["role"], "viewer");
    assert_eq!(status["request"], "status");
    assert_eq!(status["args"], serde_json::json!({"cmd": "status"}));
    assert_eq!(status["result"], "ok");
    assert!(status["time"].as_str().unwrap().ends_with('Z'));
    assert!(status["unix_ns"].as_u64().unwrap() > 1_600_000_000_000_000_000);
    let promote = &lines[1];
    assert_eq!(promote["seq"], 2);
    assert_eq!(promote["request"], "promote");
    assert_eq!(
        promote["args"],
        serde_json::json!({"cmd": "promote", "force": true})
    );
    assert_eq!(promote["result"], "denied");
    assert_eq!(
        promote["message"],
        format!("permission denied: promote needs admin, uid {uid} has viewer")
    );
    assert_eq!(lines[2]["result"], "denied");
    assert_eq!(lines[3]["request"], "?");
    assert_eq!(lines[3]["args"], "not json");
    assert_eq!(lines[3]["result"], "error");
    let report = audit::verify(&log_path).unwrap();
    assert_eq!(report.entries, 4);
    assert_eq!(report.last_hash, lines[3]["hash"].as_str().unwrap());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_role_is_denied_everything_and_roles_come_from_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let log_path = dir.path().join("audit.log");
    let audit = Arc::new(AuditLog::open(&log_path).unwrap());
    let srv = start(dir.path(), Access::deny_all(), Some(audit.clone())).await;
    let r = srv.call(r#"{"cmd":"status"}"#).await;
    assert_eq!(
        r.error.as_deref(),
        Some(format!("permission denied: status needs viewer, uid {uid} has no role").as_str())
    );
    srv.stop().await;
    let l = audit_lines(&log_path);
    assert_eq!(l[0]["role"], serde_json::Value::Null);
    assert_eq!(l[0]["result"], "denied");

    // Operator through the primary group; a planned admin command is still denied,
    // an operator command passes the check (and is not implemented yet).
    let access = Access::deny_all().grant(Role::Operator, &[], &[gid]);
    let srv = start(dir.path(), access, Some(audit)).await;
    assert!(srv.call(r#"{"cmd":"status"}"#).await.ok);
    let r = srv.call(r#"{"cmd":"rollback"}"#).await;
    assert_eq!(
        r.error.as_deref(),
        Some(format!("permission denied: rollback needs admin, uid {uid} has operator").as_str())
    );
    let r = srv.call(r#"{"cmd":"verify"}"#).await;
    assert_eq!(
        r.error.as_deref(),
        Some("verify is not served by this test")
    );
    // An implemented operator command reaches the handler.
    let r = srv.call(r#"{"cmd":"pause"}"#).await;
    assert!(r.ok, "{r:?}");
    srv.stop().await;
    // Both servers appended to one chain: five requests, and pause, which changes
    // state, is two lines (its intent, then its outcome).
    let report = audit::verify(&log_path).unwrap();
    assert_eq!(report.entries, 6);
    assert!(report.open_intents.is_empty(), "{:?}", report.open_intents);
}

/// Issue 16 path 9: a state-changing request is audited twice, durably: its intent
/// before the handler runs (the handler sees it in the log), its outcome after, linked
/// by the intent's seq. Read-only and refused requests are one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_changing_request_is_an_intent_then_its_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit.log");
    let audit = Arc::new(AuditLog::open(&log_path).unwrap());
    let sock = dir.path().join("ctl/ferryd.sock");
    let access = Access::from_config(None);
    let listener = control::bind(&sock, &access).await.unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let seen = log_path.clone();
    let h: Handler = Arc::new(move |req| {
        // What the log holds while the action runs.
        let lines = audit_lines(&seen);
        let last = lines.last().cloned().unwrap_or_default();
        match req {
            Request::Pause => Response::ok(serde_json::json!({"last": last})),
            Request::Resume => Response::err("not paused"),
            other => Response::ok(serde_json::json!({"cmd": other.name()})),
        }
    });
    let task = tokio::spawn(control::serve(
        listener,
        sock.clone(),
        h,
        access,
        Some(audit.clone()),
        rx,
    ));
    let srv = Server { sock, stop, task };
    let fsyncs = audit.fsyncs();
    let r = srv.call(r#"{"cmd":"pause"}"#).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(
        audit.fsyncs(),
        fsyncs + 2,
        "intent and outcome, each fsynced"
    );
    let during = &r.result.unwrap()["last"];
    assert_eq!(during["result"], "intent");
    assert_eq!(during["request"], "pause");
    assert_eq!(during["seq"], 1);
    let r = srv.call(r#"{"cmd":"resume"}"#).await;
    assert_eq!(r.error.as_deref(), Some("not paused"));
    assert!(srv.call(r#"{"cmd":"status"}"#).await.ok);
    srv.stop().await;
    let lines = audit_lines(&log_path);
    let summary: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["seq"].as_u64().unwrap(),
                l["request"].as_str().unwrap().to_string(),
                l["result"].as_str().unwrap().to_string(),
                l["intent"].as_u64(),
            )
        })
        .collect();
    let want = [
        (1, "pause", "intent", None),
        (2, "pause", "ok", Some(1)),
        (3, "resume", "intent", None),
        (4, "resume", "error", Some(3)),
        (5, "status", "ok", None),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(s, r, o, i)| (*s, r.to_string(), o.to_string(), *i))
        .collect();
    assert_eq!(summary, want);
    assert_eq!(lines[3]["message"], "not paused");
    assert_eq!(lines[0]["message"], serde_json::Value::Null);
    assert_eq!(lines[0]["args"], serde_json::json!({"cmd": "pause"}));
    assert_eq!(lines[0]["uid"], lines[1]["uid"]);
    assert!(audit::verify(&log_path).unwrap().open_intents.is_empty());
}

/// Issue 17 (limits): a viewer asking `status` in a loop cannot make the daemon fsync
/// once per request: read-only lines are batched (one fsync per 100 ms or 64 lines),
/// and every line is in the log after a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_in_a_loop_shares_fsyncs_and_loses_no_line() {
    const REQUESTS: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit.log");
    let audit = Arc::new(AuditLog::open(&log_path).unwrap());
    let srv = start(dir.path(), Access::from_config(None), Some(audit.clone())).await;
    let sock = srv.sock.clone();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        // One connection, as a polling dashboard keeps.
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = std::io::BufReader::new(s);
        for _ in 0..REQUESTS {
            w.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
            let mut resp = String::new();
            r.read_line(&mut resp).unwrap();
            assert!(resp.starts_with("{\"ok\":true"), "{resp}");
        }
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    let fsyncs = audit.fsyncs();
    srv.stop().await;
    drop(audit);
    eprintln!("{REQUESTS} status requests in {elapsed:?}: {fsyncs} fsyncs");
    assert!(
        fsyncs <= REQUESTS / 10,
        "{fsyncs} fsyncs for {REQUESTS} read-only requests"
    );
    let report = audit::verify(&log_path).unwrap();
    assert_eq!(report.entries, REQUESTS);
    let lines = audit_lines(&log_path);
    assert!(lines.iter().all(|l| l["request"] == "status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_and_group_come_from_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let gid = unsafe { libc::getegid() };
    let mut access = Access::from_config(None);
    access.socket_mode = 0o600;
    access.socket_group = Some(gid);
    let srv = start(dir.path(), access, None).await;
    let md = std::fs::metadata(&srv.sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&md), gid);
    // The daemon's own user (and root) is admin under the config policy.
    let r = srv.call(r#"{"cmd":"full_resync"}"#).await;
    assert_eq!(
        r.error.as_deref(),
        Some("full_resync: not implemented by this ferryd")
    );
    srv.stop().await;
}
