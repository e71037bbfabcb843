//! Control socket server: one JSON request per line, one JSON response per line, over a
//! Unix socket. `ferryctl` is the client; the protocol types and the client
//! ([`call`]) are ferry-api's ([`ferry_api::control`]). Requests: `{"cmd":"status"}`.
//!
//! Access: every connection's peer credentials (`SO_PEERCRED`, and `SO_PEERGROUPS` for
//! supplementary groups) resolve to a [`Role`] through the [`Access`] policy; each
//! request needs a role ([`Request::required_role`], [`command_role`] for the planned
//! commands). Anyone without the role gets
//! `permission denied: <cmd> needs <role>, uid N has <role|no role>`. Every request —
//! allowed, denied or failed — is appended to the audit log ([`crate::ops::audit`]) and made
//! durable before its response is sent.
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{AccessConfig, Principals};
use crate::ops::audit::{AuditEntry, AuditLog, Outcome};
// The protocol (shared with ferryctl) lives in ferry-api; re-exported so that
// `crate::ops::control::Request` and friends keep their paths.
pub use ferry_api::control::{
    call, command_role, CallError, PointSpec, Request, Response, Role, COMMANDS,
};

/// Longest request line accepted; requests are tiny.
const MAX_REQUEST: usize = 64 << 10;

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
            socket_mode: crate::config::DEFAULT_SOCKET_MODE,
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
    access: Access,
    audit: Option<Arc<AuditLog>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let access = Arc::new(access);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            // Reap finished connections so the set stays as small as what is in flight.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let h = handler.clone();
                    let access = access.clone();
                    let audit = audit.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_one(stream, h, &access, audit).await {
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
    // Answer what is in flight before the node stops: a switchover or promote asks for
    // the restart itself and is answered after that, and the runtime's end (or the
    // re-exec) would otherwise cut its answer off (ferryctl saw an empty response).
    let drained = tokio::time::timeout(CONTROL_DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "control requests still running after {CONTROL_DRAIN:?} of shutdown: abandoned"
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// How long shutdown waits for control requests in flight to be answered.
const CONTROL_DRAIN: Duration = Duration::from_secs(5);

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
    fn of(stream: &UnixStream, access: &Access) -> Peer {
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

/// Decides one request line: (request type, arguments, outcome, response).
fn decide(
    line: &str,
    peer: &Peer,
    handler: &Handler,
) -> (String, serde_json::Value, Outcome, Response) {
    if line.len() > MAX_REQUEST {
        let msg = format!("request longer than {MAX_REQUEST} bytes");
        let args = serde_json::Value::String(format!("<{} bytes>", line.len()));
        return match peer.role {
            Some(_) => ("?".into(), args, Outcome::Error, Response::err(msg)),
            None => {
                let msg = peer.denial("request", Role::Viewer);
                ("?".into(), args, Outcome::Denied, Response::err(msg))
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
        return (what, args, Outcome::Denied, Response::err(msg));
    }
    let resp = match parsed {
        Ok(req) => handler(req),
        Err(e) => match cmd.as_deref().filter(|c| command_role(c).is_some()) {
            Some(c) => Response::err(format!("{c}: not implemented by this ferryd")),
            None => Response::err(format!("bad request: {e}")),
        },
    };
    let outcome = if resp.ok { Outcome::Ok } else { Outcome::Error };
    (what, args, outcome, resp)
}

async fn serve_one(
    stream: UnixStream,
    handler: Handler,
    access: &Access,
    audit: Option<Arc<AuditLog>>,
) -> anyhow::Result<()> {
    let peer = Peer::of(&stream, access);
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64 * 16));
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines.read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let (request, args, result, mut resp) = decide(&line, &peer, &handler);
        if result == Outcome::Denied {
            tracing::warn!(uid = ?peer.uid, pid = ?peer.pid, "control: {}", resp.error.as_deref().unwrap_or(""));
        }
        if let Some(log) = &audit {
            let entry = AuditEntry {
                uid: peer.uid,
                gid: peer.gid,
                pid: peer.pid,
                role: peer.role,
                request: request.clone(),
                args,
                result,
                message: resp.error.clone(),
            };
            let log = log.clone();
            let written = tokio::task::spawn_blocking(move || log.append(entry))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
            if let Err(e) = written {
                let e = crate::error_chain(&e);
                tracing::error!("control: audit log: {e}");
                resp = Response::err(match result {
                    Outcome::Ok => format!("{request} was done but could not be audited: {e}"),
                    _ => format!(
                        "{} (and could not be audited: {e})",
                        resp.error.as_deref().unwrap_or("error")
                    ),
                });
            }
        }
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
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
}
