//! Control socket server: one JSON request per line, one JSON response per line, over a
//! Unix socket. `ferryctl` is the client; the protocol types and the client
//! ([`ferry_api::control::call`]) are ferry-api's ([`ferry_api::control`]). Requests: `{"cmd":"status"}`.
//!
//! Access: every connection's peer credentials (`SO_PEERCRED`, and `SO_PEERGROUPS` for
//! supplementary groups) resolve to a [`Role`] through the [`Access`] policy in force
//! when each request is read ([`SharedAccess`]: a reload replaces it); each
//! request needs a role ([`Request::required_role`], [`command_role`] for the planned
//! commands). Anyone without the role gets
//! `permission denied: <cmd> needs <role>, uid N has <role|no role>`. Every request —
//! allowed, denied or failed — is appended to the audit log ([`crate::ops::audit`]) before
//! its response is sent. A state-changing one ([`ferry_api::audit::changes_state`]) is
//! two durable lines: its intent before the handler runs, its outcome after; the rest
//! are batched (written at once, fsynced within `[audit] sync_interval_ms`), so that
//! read-only requests cannot make the daemon fsync once per request. Handlers are
//! synchronous and run on the blocking pool, never on a runtime worker (`run_handler`).
//!
//! Limits: at most [`MAX_CONNECTIONS`] connections; at the cap a new one displaces
//! the connection that has waited longest for its next request (so a flood of idle
//! connections never keeps `ferryctl status` out), and only when every connection
//! has a request in progress is the newcomer closed at once. A request line must
//! arrive within [`READ_TIMEOUT`].
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::ops::audit::AuditLog;
use ferry_api::audit::{AuditEntry, Outcome};
use ferry_api::config::{AccessConfig, Principals};
use ferry_nbd::admission::{Admission, Full, Slot};
// The protocol (shared with ferryctl) lives in ferry-api.
use ferry_api::control::{command_role, Request, Response, Role};

/// How long shutdown waits for requests already read to be answered.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// Requests read but not answered yet. Shutdown waits for them (bounded by
/// [`ANSWER_GRACE`]): a request may itself end the run — a role change re-executes the
/// daemon once the runtime is gone — and its answer must still reach the client, or
/// `ferryctl promote` reports `malformed response from ferryd: ""` for a promote that
/// happened.
#[derive(Default)]
struct InFlight(std::sync::atomic::AtomicUsize);

/// One request between being read and being answered.
struct Answering<'a>(&'a InFlight);

impl InFlight {
    fn begin(&self) -> Answering<'_> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Answering(self)
    }

    /// Until every request read so far is answered (or its connection failed).
    async fn drained(&self) {
        while self.0.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Longest request line accepted; requests are tiny.
const MAX_REQUEST: usize = 64 << 10;
/// Control connections at once (see the module doc for what happens at the cap).
pub const MAX_CONNECTIONS: usize = 64;
/// A connection whose next request line does not arrive in this time is closed
/// (ferryctl sends its request at once).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the accept loop waits for displaced connections to close before refusing.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// Minimum time between two log lines about refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Who may do what on the control socket, and how the socket file is shared.
#[derive(Debug, Clone)]
pub struct Access {
    /// uid 0 is admin.
    pub root_is_admin: bool,
    /// The daemon's own uid is admin (it owns the data, the keys and the process).
    pub owner_uid: Option<u32>,
    pub admins: Principals,
    pub operators: Principals,
    pub viewers: Principals,
    /// Mode of the socket file (default 0o660).
    pub socket_mode: u32,
    /// Group of the socket file (default: the daemon's).
    pub socket_group: Option<u32>,
}

impl Access {
    /// Denies everyone; socket mode 0o660. Build test policies from here.
    pub fn deny_all() -> Access {
        Access {
            root_is_admin: false,
            owner_uid: None,
            admins: Principals::default(),
            operators: Principals::default(),
            viewers: Principals::default(),
            socket_mode: ferry_api::config::DEFAULT_SOCKET_MODE,
            socket_group: None,
        }
    }

    /// The daemon's policy: root and the daemon's own user are admins, plus the
    /// `[access]` section's users and groups (none when the section is absent).
    pub fn from_config(cfg: Option<&AccessConfig>) -> Access {
        let d = AccessConfig::default();
        let cfg = cfg.unwrap_or(&d);
        Access {
            root_is_admin: true,
            // SAFETY: geteuid has no preconditions and cannot fail.
            owner_uid: Some(unsafe { libc::geteuid() }),
            admins: cfg.admins.clone(),
            operators: cfg.operators.clone(),
            viewers: cfg.viewers.clone(),
            socket_mode: cfg.socket_mode,
            socket_group: cfg.socket_group,
        }
    }

    /// Adds uids and gids to a role.
    pub fn grant(mut self, role: Role, uids: &[u32], gids: &[u32]) -> Access {
        let p = match role {
            Role::Admin => &mut self.admins,
            Role::Operator => &mut self.operators,
            Role::Viewer => &mut self.viewers,
        };
        p.uids.extend_from_slice(uids);
        p.gids.extend_from_slice(gids);
        self
    }

    /// The highest role of a peer with this uid and these groups (primary and
    /// supplementary), or `None`.
    pub fn role_of(&self, uid: u32, gids: &[u32]) -> Option<Role> {
        let has = |p: &Principals| p.uids.contains(&uid) || gids.iter().any(|g| p.gids.contains(g));
        if (self.root_is_admin && uid == 0) || self.owner_uid == Some(uid) || has(&self.admins) {
            Some(Role::Admin)
        } else if has(&self.operators) {
            Some(Role::Operator)
        } else if has(&self.viewers) {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// The access policy in force, shared by the control server and a reload: each request
/// resolves its peer's role from it when it is read, so a grant or a revocation
/// applies to the next request, also on a connection already open.
#[derive(Debug, Clone)]
pub struct SharedAccess(Arc<parking_lot::RwLock<Access>>);

impl SharedAccess {
    pub fn new(access: Access) -> SharedAccess {
        SharedAccess(Arc::new(parking_lot::RwLock::new(access)))
    }

    /// A copy of the policy now.
    pub fn get(&self) -> Access {
        self.0.read().clone()
    }

    /// Replaces the policy (a reload).
    pub fn set(&self, access: Access) {
        *self.0.write() = access;
    }

    fn role_of(&self, uid: u32, gids: &[u32]) -> Option<Role> {
        self.0.read().role_of(uid, gids)
    }
}

impl From<Access> for SharedAccess {
    fn from(access: Access) -> SharedAccess {
        SharedAccess::new(access)
    }
}

/// Answers one checked request. Runs on the blocking pool (`run_handler`): it may
/// block, and may call `Handle::current().block_on` for async work.
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Binds the control socket. A leftover socket file from a crashed daemon is replaced;
/// a socket that still answers means another ferryd owns this node: refuse.
/// The socket gets `access.socket_mode` and, if set, `access.socket_group`.
pub async fn bind(path: &Path, access: &Access) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("control socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "control socket {} is live: another ferryd is running with this config",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    if let Some(gid) = access.socket_group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("chgrp {gid} control socket {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.socket_mode))
        .with_context(|| {
            format!(
                "chmod {:o} control socket {}",
                access.socket_mode,
                path.display()
            )
        })?;
    Ok(listener)
}

/// Serves control connections until `shutdown`: each peer's role comes from `access`,
/// each request is audited to `audit` (fsynced) before its response is sent.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    handler: Handler,
    access: impl Into<SharedAccess>,
    audit: Option<Arc<AuditLog>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let limits = Limits::default();
    serve_limited(listener, path, handler, access, audit, shutdown, limits).await
}

/// How many control connections, and how long one may wait with no request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// [`serve`] with other limits (tests use small ones).
pub async fn serve_limited(
    listener: UnixListener,
    path: PathBuf,
    handler: Handler,
    access: impl Into<SharedAccess>,
    audit: Option<Arc<AuditLog>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    limits: Limits,
) {
    let access: SharedAccess = access.into();
    let inflight = Arc::new(InFlight::default());
    let admission = Admission::new(limits.max_connections);
    let mut refusals = Refusals::default();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(slot) = refusals.admit(&admission).await else {
                        drop(stream);
                        continue;
                    };
                    let h = handler.clone();
                    let access = access.clone();
                    let audit = audit.clone();
                    let inflight = inflight.clone();
                    tokio::spawn(async move {
                        let conn = Conn { slot: &slot, read_timeout: limits.read_timeout };
                        let served = serve_one(stream, h, &access, audit, &inflight, conn).await;
                        if let Err(e) = served {
                            tracing::debug!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    if tokio::time::timeout(ANSWER_GRACE, inflight.drained())
        .await
        .is_err()
    {
        tracing::warn!("control: shutting down with requests unanswered after {ANSWER_GRACE:?}");
    }
    // Batched lines are in the file already; a clean stop makes them durable too.
    if let Some(log) = audit {
        let synced = tokio::task::spawn_blocking(move || log.sync())
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        if let Err(e) = synced {
            tracing::error!("control: audit log sync at shutdown: {e:#}");
        }
    }
}

/// One admitted connection's place and its read timeout.
struct Conn<'a> {
    slot: &'a Slot,
    read_timeout: Duration,
}

/// Connections refused at the cap, logged at most once per [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct Refusals {
    unlogged: u64,
    last_log: Option<std::time::Instant>,
}

impl Refusals {
    /// A slot for a new connection, or `None` when every connection has a request
    /// in progress (counted, and logged rate-limited).
    async fn admit(&mut self, admission: &Arc<Admission>) -> Option<Slot> {
        match admission.admit_waiting(EVICTION_WAIT).await {
            Ok((slot, evicted)) => {
                if evicted {
                    tracing::debug!("control: closing the longest-idle connection to make room");
                }
                Some(slot)
            }
            Err(Full::AllBusy | Full::Evicting) => {
                self.unlogged += 1;
                let now = std::time::Instant::now();
                if self.last_log.is_none_or(|t| now - t >= REFUSAL_LOG_EVERY) {
                    tracing::warn!(
                        refused = std::mem::take(&mut self.unlogged),
                        max = admission.max(),
                        "control: every connection has a request in progress; refusing new ones"
                    );
                    self.last_log = Some(now);
                }
                None
            }
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
    pub role: Option<Role>,
    /// Why the credentials could not be read.
    pub cred_error: Option<String>,
}

impl Peer {
    fn of(stream: &UnixStream, access: &SharedAccess) -> Peer {
        match stream.peer_cred() {
            Ok(c) => {
                let mut groups = vec![c.gid()];
                groups.extend(peer_groups(stream.as_raw_fd()));
                Peer {
                    uid: Some(c.uid()),
                    gid: Some(c.gid()),
                    pid: c.pid(),
                    role: access.role_of(c.uid(), &groups),
                    groups,
                    cred_error: None,
                }
            }
            Err(e) => Peer {
                uid: None,
                gid: None,
                pid: None,
                groups: Vec::new(),
                role: None,
                cred_error: Some(e.to_string()),
            },
        }
    }

    /// The role under the policy in force now (a reload may have changed it since
    /// the connection was opened).
    fn refresh(&mut self, access: &SharedAccess) {
        self.role = self.uid.and_then(|uid| access.role_of(uid, &self.groups));
    }

    fn denial(&self, what: &str, needs: Role) -> String {
        let has = self.role.map_or("no role".to_string(), |r| r.to_string());
        match (self.uid, &self.cred_error) {
            (Some(uid), _) => {
                format!("permission denied: {what} needs {needs}, uid {uid} has {has}")
            }
            (None, e) => format!(
                "permission denied: {what} needs {needs}, peer credentials unavailable: {}",
                e.as_deref().unwrap_or("unknown")
            ),
        }
    }
}

/// The peer's supplementary groups at connect time (`SO_PEERGROUPS`, Linux ≥ 4.13);
/// empty where unsupported.
fn peer_groups(fd: std::os::unix::io::RawFd) -> Vec<u32> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: the buffer is valid for `len` bytes and getsockopt writes at most that.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<u32>();
        if rc == 0 {
            groups.truncate(n);
            return groups;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 65536 {
            groups.resize(n, 0);
            continue;
        }
        return Vec::new();
    }
}

/// A request line, checked: answered at once (refused, malformed, not implemented), or
/// to be run by the handler.
enum Checked {
    Answered {
        request: String,
        args: serde_json::Value,
        result: Outcome,
        resp: Response,
    },
    Run {
        request: String,
        args: serde_json::Value,
        req: Request,
    },
}

/// Checks one request line: its size, its form, and the peer's role.
fn check(line: &str, peer: &Peer) -> Checked {
    let answered = |request: &str, args, result, msg: String| Checked::Answered {
        request: request.to_string(),
        args,
        result,
        resp: Response::err(msg),
    };
    if line.len() > MAX_REQUEST {
        let msg = format!("request longer than {MAX_REQUEST} bytes");
        let args = serde_json::Value::String(format!("<{} bytes>", line.len()));
        return match peer.role {
            Some(_) => answered("?", args, Outcome::Error, msg),
            None => {
                let msg = peer.denial("request", Role::Viewer);
                answered("?", args, Outcome::Denied, msg)
            }
        };
    }
    let text = line.trim();
    let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let args = value
        .clone()
        .unwrap_or_else(|| serde_json::Value::String(text.to_string()));
    let cmd = value
        .as_ref()
        .and_then(|v| v.get("cmd"))
        .and_then(|c| c.as_str())
        .map(str::to_string);
    let parsed = serde_json::from_str::<Request>(text);
    let what = cmd.clone().unwrap_or_else(|| "?".into());
    let needs = match &parsed {
        Ok(req) => req.required_role(),
        Err(_) => cmd
            .as_deref()
            .and_then(command_role)
            .unwrap_or(Role::Viewer),
    };
    if peer.role.is_none_or(|r| r < needs) {
        let msg = peer.denial(cmd.as_deref().unwrap_or("request"), needs);
        return answered(&what, args, Outcome::Denied, msg);
    }
    match parsed {
        Ok(req) => Checked::Run {
            request: what,
            args,
            req,
        },
        Err(e) => {
            let msg = match cmd.as_deref().filter(|c| command_role(c).is_some()) {
                Some(c) => format!("{c}: not implemented by this ferryd"),
                None => format!("bad request: {e}"),
            };
            answered(&what, args, Outcome::Error, msg)
        }
    }
}

/// How a line goes into the audit log.
#[derive(Debug, Clone, Copy)]
enum Append {
    /// Changes nothing (read-only, refused): fsynced with others, shortly after.
    Batched,
    /// A record (a drill's result): durable before the answer.
    Durable,
    /// Before a state-changing request is carried out: durable first.
    Intent,
    /// After it, naming the intent's seq: durable before the answer.
    Outcome(u64),
}

/// Appends one line on a blocking thread (fsync); returns its seq.
async fn audit_line(log: &Arc<AuditLog>, how: Append, entry: AuditEntry) -> anyhow::Result<u64> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || match how {
        Append::Batched => log.append_batched(entry),
        Append::Durable => log.append(entry),
        Append::Intent => log.append_intent(entry),
        Append::Outcome(intent) => log.append_outcome(intent, entry),
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r)
}

/// Runs a checked request and audits it: a state-changing one as a durable intent
/// before the handler and a durable outcome after it (no intent, no action); anything
/// else as one batched line. Returns the response to send.
async fn run_audited(
    checked: Checked,
    peer: &Peer,
    handler: &Handler,
    audit: Option<&Arc<AuditLog>>,
) -> Response {
    let entry = |request: &str, args, result, message| AuditEntry {
        uid: peer.uid,
        gid: peer.gid,
        pid: peer.pid,
        role: peer.role,
        request: request.to_string(),
        args,
        result,
        message,
    };
    let (request, args, result, resp, how) = match checked {
        Checked::Answered {
            request,
            args,
            result,
            resp,
        } => (request, args, result, resp, Append::Batched),
        Checked::Run { request, args, req } => {
            let mut how = if ferry_api::audit::is_record(&req) {
                Append::Durable
            } else {
                Append::Batched
            };
            if let (Some(log), true) = (audit, ferry_api::audit::changes_state(&req)) {
                let intent = entry(&request, args.clone(), Outcome::Intent, None);
                match audit_line(log, Append::Intent, intent).await {
                    Ok(seq) => how = Append::Outcome(seq),
                    Err(e) => {
                        let e = crate::error_chain(&e);
                        tracing::error!("control: audit log: {e}");
                        return Response::err(format!(
                            "{request} was not done: its intent could not be audited: {e}"
                        ));
                    }
                }
            }
            let resp = run_handler(handler, req).await;
            let result = if resp.ok { Outcome::Ok } else { Outcome::Error };
            (request, args, result, resp, how)
        }
    };
    if result == Outcome::Denied {
        tracing::warn!(uid = ?peer.uid, pid = ?peer.pid, "control: {}", resp.error.as_deref().unwrap_or(""));
    }
    let Some(log) = audit else {
        return resp;
    };
    let line = entry(&request, args, result, resp.error.clone());
    match audit_line(log, how, line).await {
        Ok(_) => resp,
        Err(e) => {
            let e = crate::error_chain(&e);
            tracing::error!("control: audit log: {e}");
            Response::err(match result {
                Outcome::Ok => format!("{request} was done but could not be audited: {e}"),
                _ => format!(
                    "{} (and could not be audited: {e})",
                    resp.error.as_deref().unwrap_or("error")
                ),
            })
        }
    }
}

/// Runs the handler on the blocking pool, never on a runtime worker: handlers are
/// synchronous and some take seconds (a demote's checkpoint, a verify, a `pause`'s
/// fsync). On a worker, a handler that blocks without `block_in_place` stalls more than
/// its own connection: ferryd runs one worker on a two-core host, and with several
/// workers the one a handler blocks may be the one that last polled the I/O driver,
/// which then stays unpolled (the others sleep until woken) — no accept, no read, no
/// timer anywhere in the daemon until the handler returns. A handler's own
/// `block_in_place` runs its closure in place on a blocking thread.
async fn run_handler(handler: &Handler, req: Request) -> Response {
    let handler = handler.clone();
    match tokio::task::spawn_blocking(move || handler(req)).await {
        Ok(resp) => resp,
        // A panicking handler ends its connection's task, as when it ran there.
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Response::err("not run: the daemon is shutting down"),
        },
    }
}

async fn serve_one(
    stream: UnixStream,
    handler: Handler,
    access: &SharedAccess,
    audit: Option<Arc<AuditLog>>,
    inflight: &InFlight,
    conn: Conn<'_>,
) -> anyhow::Result<()> {
    let Conn { slot, read_timeout } = conn;
    let mut peer = Peer::of(&stream, access);
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        slot.idle();
        let read = tokio::select! {
            r = tokio::time::timeout(read_timeout, lines.read_line(&mut line)) => r,
            _ = slot.evicted() => return Ok(()),
        };
        let n = read.map_err(|_| anyhow::anyhow!("no request within {read_timeout:?}"))??;
        if n == 0 || !slot.busy() {
            return Ok(());
        }
        let _answering = inflight.begin();
        peer.refresh(access);
        let resp = run_audited(check(&line, &peer), &peer, &handler, audit.as_ref()).await;
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_resolve_highest_first() {
        let a = Access::deny_all()
            .grant(Role::Viewer, &[1000], &[50])
            .grant(Role::Operator, &[], &[60])
            .grant(Role::Admin, &[7], &[]);
        assert_eq!(a.role_of(0, &[0]), None);
        assert_eq!(a.role_of(1000, &[1000]), Some(Role::Viewer));
        assert_eq!(a.role_of(1001, &[1001, 50]), Some(Role::Viewer));
        assert_eq!(a.role_of(1001, &[50, 60]), Some(Role::Operator));
        assert_eq!(a.role_of(7, &[60]), Some(Role::Admin));
        assert_eq!(a.role_of(2000, &[2000]), None);
        let d = Access::from_config(None);
        assert_eq!(d.role_of(0, &[0]), Some(Role::Admin));
        assert_eq!(d.socket_mode, 0o660);
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }

    /// What a request line comes to without the audit log: (request type, arguments,
    /// outcome, response).
    fn decide(
        line: &str,
        peer: &Peer,
        handler: &Handler,
    ) -> (String, serde_json::Value, Outcome, Response) {
        match check(line, peer) {
            Checked::Answered {
                request,
                args,
                result,
                resp,
            } => (request, args, result, resp),
            Checked::Run { request, args, req } => {
                let resp = handler(req);
                let result = if resp.ok { Outcome::Ok } else { Outcome::Error };
                (request, args, result, resp)
            }
        }
    }

    #[test]
    fn decisions_and_messages() {
        let h: Handler = Arc::new(|_| Response::ok(serde_json::json!({})));
        let peer = |role| Peer {
            uid: Some(1000),
            gid: Some(1000),
            pid: Some(1),
            groups: vec![1000],
            role,
            cred_error: None,
        };
        let (what, _, out, r) = decide("{\"cmd\":\"status\"}\n", &peer(Some(Role::Viewer)), &h);
        assert_eq!((what.as_str(), out, r.ok), ("status", Outcome::Ok, true));
        let (_, _, out, r) = decide("{\"cmd\":\"promote\"}", &peer(Some(Role::Operator)), &h);
        assert_eq!(out, Outcome::Denied);
        assert_eq!(
            r.error.unwrap(),
            "permission denied: promote needs admin, uid 1000 has operator"
        );
        let (_, _, out, r) = decide("{\"cmd\":\"status\"}", &peer(None), &h);
        assert_eq!(out, Outcome::Denied);
        assert_eq!(
            r.error.unwrap(),
            "permission denied: status needs viewer, uid 1000 has no role"
        );
        let (_, _, out, r) = decide("{\"cmd\":\"full_resync\"}", &peer(Some(Role::Admin)), &h);
        assert_eq!(out, Outcome::Error);
        assert_eq!(
            r.error.unwrap(),
            "full_resync: not implemented by this ferryd"
        );
        let (what, args, out, r) = decide("nonsense", &peer(Some(Role::Viewer)), &h);
        assert_eq!((what.as_str(), out), ("?", Outcome::Error));
        assert_eq!(args, serde_json::json!("nonsense"));
        assert!(r.error.unwrap().starts_with("bad request"));
    }

    /// Issue 17: a flood of idle connections (more than the cap, none sending a
    /// request) never keeps `ferryctl status` out; a connection that sends nothing is
    /// closed after the read timeout; and when every connection has a request in
    /// progress, a newcomer is closed at once.
    /// A multi-threaded runtime with `workers` worker threads.
    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The test's side of held requests: each one says it entered its handler, and
    /// waits there for one release.
    struct Held {
        release: std::sync::mpsc::Sender<()>,
        entered: std::sync::mpsc::Receiver<()>,
    }

    /// The handler's side: [`Hold::run`] blocks its thread until released.
    struct Hold {
        entered: parking_lot::Mutex<std::sync::mpsc::Sender<()>>,
        release: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Held {
        fn new() -> (Held, Hold) {
            let (release_tx, release_rx) = std::sync::mpsc::channel();
            let (entered_tx, entered_rx) = std::sync::mpsc::channel();
            let held = Held {
                release: release_tx,
                entered: entered_rx,
            };
            let hold = Hold {
                entered: parking_lot::Mutex::new(entered_tx),
                release: parking_lot::Mutex::new(release_rx),
            };
            (held, hold)
        }
    }

    impl Hold {
        fn run(&self) -> Response {
            let _ = self.entered.lock().send(());
            let _ = self.release.lock().recv();
            Response::ok(serde_json::json!({}))
        }
    }

    /// The control server's read timeout in the test below.
    const READ_TIMEOUT: Duration = Duration::from_secs(1);

    /// The peer closed `conn`: end of file, not an error such as our read timeout.
    fn assert_eof(conn: &mut std::os::unix::net::UnixStream, what: &str) {
        use std::io::Read;
        match conn.read(&mut [0u8; 1]) {
            Ok(0) => {}
            Ok(_) => panic!("{what}: got an answer"),
            Err(e) => panic!("{what}: not closed ({e})"),
        }
    }

    #[test]
    fn idle_connections_never_block_a_request() {
        // The held requests below block their threads: handlers run on the blocking
        // pool, so two workers serve everything else however many are held.
        let rt = runtime(2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let access = Access::from_config(None);
        let listener = rt.block_on(bind(&path, &access)).unwrap();
        let (held, hold) = Held::new();
        let (release_tx, entered_rx) = (held.release, held.entered);
        let handler: Handler = Arc::new(move |req| match req {
            // A request that holds its connection busy until the test says so.
            Request::Demote => hold.run(),
            _ => Response::ok(serde_json::json!({"status": "ok"})),
        });
        let limits = Limits {
            max_connections: 4,
            read_timeout: READ_TIMEOUT,
        };
        let server = serve_limited(
            listener,
            path.clone(),
            handler,
            access,
            None,
            stop_rx,
            limits,
        );
        let thread = std::thread::spawn(move || rt.block_on(server));
        let flood: Vec<_> = (0..50)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        let status = ferry_api::control::call(&path, &Request::Status).expect("answered");
        assert!(status.ok, "{status:?}");
        // The idle ones still open are closed by the read timeout.
        // (An end of file, not our own read timeout, which is far longer.)
        let mut last = flood.into_iter().last().unwrap();
        last.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        assert_eof(&mut last, "an idle connection is closed");
        // Every connection busy: a newcomer is refused at once.
        let busy: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || ferry_api::control::call(&p, &Request::Demote))
            })
            .collect();
        for _ in 0..4 {
            entered_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the four held requests reach their handlers");
        }
        // Refused at once, not served: a connection given a slot would be closed
        // only by the read timeout (the margin is wide against a loaded machine).
        let mut late = std::os::unix::net::UnixStream::connect(&path).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let t = std::time::Instant::now();
        assert_eof(
            &mut late,
            "a newcomer is refused while every handler is busy",
        );
        assert!(
            t.elapsed() < READ_TIMEOUT * 3 / 4,
            "closed after {:?}, as by the read timeout ({READ_TIMEOUT:?}), not refused",
            t.elapsed()
        );
        for _ in 0..4 {
            release_tx.send(()).unwrap();
        }
        for b in busy {
            assert!(b.join().unwrap().expect("answered").ok);
        }
        drop(_stop_tx);
        thread.join().unwrap();
    }

    /// `req` on `path`, answered within `within` (a stalled server fails the test
    /// instead of hanging it).
    fn call_within(path: &Path, req: &Request, within: Duration) -> Response {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(within)).unwrap();
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        s.write_all(&line).unwrap();
        let mut resp = String::new();
        if let Err(e) = std::io::BufReader::new(s).read_line(&mut resp) {
            panic!("{} not answered within {within:?}: {e}", req.name());
        }
        serde_json::from_str(&resp).unwrap()
    }

    /// A request in progress holds its own connection only: handlers are synchronous
    /// and may block (a demote's checkpoint takes seconds), and on ferryd's single
    /// runtime worker (a two-core host) one that blocked the worker stopped every
    /// connection, and the rest of the daemon, until it returned. The daemon's own
    /// pattern for async work inside a handler (`block_in_place` + `block_on`) works
    /// where handlers run.
    #[test]
    fn a_held_request_never_stalls_the_server() {
        let rt = runtime(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let access = Access::from_config(None);
        let listener = rt.block_on(bind(&path, &access)).unwrap();
        let (held, hold) = Held::new();
        let (release_tx, entered_rx) = (held.release, held.entered);
        let handler: Handler = Arc::new(move |req| match req {
            // Blocks outright until the test releases it.
            Request::Demote => hold.run(),
            Request::Verify { .. } => tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Response::ok(serde_json::json!({"slept": true}))
                })
            }),
            _ => Response::ok(serde_json::json!({"status": "ok"})),
        });
        let server = rt.spawn(serve(
            listener,
            path.clone(),
            handler,
            access,
            None,
            stop_rx,
        ));
        let p = path.clone();
        let held = std::thread::spawn(move || ferry_api::control::call(&p, &Request::Demote));
        entered_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the held request reaches its handler");
        let within = Duration::from_secs(10);
        let status = call_within(&path, &Request::Status, within);
        assert!(status.ok, "{status:?}");
        let verify = call_within(&path, &Request::Verify { volume: None }, within);
        assert_eq!(verify.result, Some(serde_json::json!({"slept": true})));
        release_tx.send(()).unwrap();
        assert!(held.join().unwrap().expect("answered").ok);
        stop_tx.send(true).unwrap();
        rt.block_on(server).unwrap();
    }

    /// A role change ends the run from inside its own request (the handler stops the
    /// node): the response must still reach the client before the server is gone.
    /// (Seen as `malformed response from ferryd: "": EOF` after promote and demote.)
    #[test]
    fn a_request_that_stops_the_server_still_gets_its_answer() {
        let rt = runtime(2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let access = Access::from_config(None);
        let listener = rt.block_on(bind(&path, &access)).unwrap();
        let s = stop_tx.clone();
        let handler: Handler = Arc::new(move |_| {
            // What a role change does: ask for the end of the run, then answer. The
            // answer takes a moment to build, as promote's checkpoint does.
            let _ = s.send(true);
            std::thread::sleep(Duration::from_millis(200));
            Response::ok(serde_json::json!({"restarting": true}))
        });
        // Audited as in the daemon: the append is a blocking task the request awaits.
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let server = rt.spawn(serve(
            listener,
            path.clone(),
            handler,
            access,
            Some(audit),
            stop_rx,
        ));
        let client = std::thread::spawn(move || ferry_api::control::call(&path, &Request::Demote));
        // As the daemon does: once the server task ends, the runtime goes (and the
        // process re-executes itself).
        rt.block_on(server).unwrap();
        drop(rt);
        let answer = client.join().unwrap().expect("the client got an answer");
        assert!(answer.ok, "{answer:?}");
        assert_eq!(answer.result, Some(serde_json::json!({"restarting": true})));
    }
}
