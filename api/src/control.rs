//! The control protocol: one JSON request per line, one JSON response per line, over
//! the daemon's Unix socket (`{"cmd":"status"}`), the roles requests need, and the
//! client side ([`call`]) that `ferryctl` uses. The server (socket, peer credentials,
//! access decisions, auditing) is ferryd's.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Control roles, ordered: each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Status and lists.
    Viewer,
    /// Bookmarks, point-in-time exports, verify, pause/resume.
    Operator,
    /// Role changes, rollback, full resync, reload.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// Every control command, implemented or planned, with the role it needs. A request
/// naming a planned command is classified (and denied or refused as not implemented)
/// by this table; implemented ones must agree with [`Request::required_role`] (tested).
pub const COMMANDS: &[(&str, Role)] = &[
    ("status", Role::Viewer),
    ("list_bookmarks", Role::Viewer),
    ("list_pits", Role::Viewer),
    ("bookmark", Role::Operator),
    ("pit_export", Role::Operator),
    ("pit_unexport", Role::Operator),
    ("verify", Role::Operator),
    ("pause", Role::Operator),
    ("resume", Role::Operator),
    ("drill_report", Role::Operator),
    ("promote", Role::Admin),
    ("demote", Role::Admin),
    ("switchover", Role::Admin),
    ("rollback", Role::Admin),
    ("full_resync", Role::Admin),
    ("reload", Role::Admin),
];

/// The role a command needs, for any command in [`COMMANDS`].
pub fn command_role(cmd: &str) -> Option<Role> {
    COMMANDS.iter().find(|(c, _)| *c == cmd).map(|(_, r)| *r)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Primary: seal the current write-set with a named marker.
    #[serde(rename = "bookmark")]
    BookmarkCreate {
        name: String,
    },
    ListBookmarks,
    /// Standby: the point-in-time window, recent points and open views.
    ListPits {
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Standby: serve `volume` as it was at `target` over NBD on `listen`.
    PitExport {
        volume: String,
        target: PointSpec,
        listen: String,
        #[serde(default)]
        writable: bool,
    },
    /// Standby: stop serving a view (`id`, or the only one) and drop its overlay.
    PitUnexport {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        all: bool,
    },
    /// Standby: stop following the primary (sessions end, new ones are refused).
    Pause,
    Resume,
    /// Primary: compare the volumes (or one) with every streaming standby at one point
    /// of the stream, while writes continue; lists the differing ranges.
    Verify {
        #[serde(default)]
        volume: Option<String>,
    },
    /// Standby: become the primary of a new epoch (optionally at a point).
    Promote {
        #[serde(default)]
        target: Option<PointSpec>,
        #[serde(default)]
        force: bool,
    },
    /// Outdated primary: rejoin as a standby of the node that superseded it.
    Demote,
    /// Primary: hand the primary role to a caught-up standby, losslessly.
    Switchover {
        #[serde(default)]
        to: Option<String>,
    },
    /// Standby: the result of a DR drill (`ferryctl drill`), recorded in the audit
    /// log; the daemon checks the fields and keeps nothing else.
    DrillReport(DrillReport),
    /// Standby: roll the replica back to `target` (all volumes of the group).
    Rollback {
        volume: String,
        target: PointSpec,
        #[serde(default)]
        group: bool,
    },
    /// Re-read the node's config file and apply what can change live (all or
    /// nothing; what needs a restart is refused, naming each key).
    Reload,
}

/// What `ferryctl drill` proved, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillReport {
    pub volume: String,
    /// The recovery point the drill exported.
    pub seq: u64,
    /// Its time (RFC 3339), as the view reported it.
    pub point_time: String,
    pub passed: bool,
    /// From the drill's start to a usable view (milliseconds).
    pub rto_ms: u64,
    /// The point's age when the drill started (milliseconds).
    pub rpo_ms: u64,
    /// `filesystem` or `command`.
    pub check: String,
    /// One line: what the check found, or why the drill failed
    /// (at most [`MAX_DRILL_SUMMARY`] bytes).
    pub summary: String,
}

/// Longest drill summary kept in the audit log: a line, not the check's output.
pub const MAX_DRILL_SUMMARY: usize = 512;

/// A recovery point as an operator names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointSpec {
    Seq(u64),
    /// RFC 3339, parsed by the daemon.
    At(String),
    Bookmark(String),
}

impl Request {
    /// The role this request needs. Exhaustive on purpose: a new request must say.
    pub fn required_role(&self) -> Role {
        match self {
            Request::Status | Request::ListBookmarks | Request::ListPits { .. } => Role::Viewer,
            Request::BookmarkCreate { .. }
            | Request::PitExport { .. }
            | Request::PitUnexport { .. }
            | Request::Pause
            | Request::Resume
            | Request::DrillReport(_)
            | Request::Verify { .. } => Role::Operator,
            Request::Rollback { .. }
            | Request::Promote { .. }
            | Request::Demote
            | Request::Reload
            | Request::Switchover { .. } => Role::Admin,
        }
    }

    /// The `cmd` name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::BookmarkCreate { .. } => "bookmark",
            Request::ListBookmarks => "list_bookmarks",
            Request::ListPits { .. } => "list_pits",
            Request::PitExport { .. } => "pit_export",
            Request::PitUnexport { .. } => "pit_unexport",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::DrillReport(_) => "drill_report",
            Request::Rollback { .. } => "rollback",
            Request::Promote { .. } => "promote",
            Request::Verify { .. } => "verify",
            Request::Demote => "demote",
            Request::Switchover { .. } => "switchover",
            Request::Reload => "reload",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(v: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            result: Some(v),
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: None,
        }
    }
}

/// Why [`call`] got no response. The messages are what `ferryctl` prints (after
/// `ferryctl: `, with the cause appended).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No daemon listens on the socket (or it may not be opened).
    #[error("cannot reach ferryd at {} (is it running with this config?)", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// The socket exists but its mode, owner or directory keeps this user out: ferryd
    /// is probably running fine, so "is it running?" would send the operator astray.
    #[error(
        "the control socket {} exists but this user may not use it: {access} (run ferryctl as a user that may, e.g. with sudo, or see [access] socket_group/socket_mode in the config)",
        socket.display()
    )]
    Denied {
        socket: PathBuf,
        /// Who may: `owner root, group ferry, mode 0660`.
        access: String,
        source: std::io::Error,
    },
    /// Setting the timeout or sending the request failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Encode(serde_json::Error),
    /// The daemon closed the connection or did not answer within the timeout.
    #[error("reading ferryd's response")]
    Read(#[source] std::io::Error),
    #[error("malformed response from ferryd: {text:?}")]
    Malformed {
        text: String,
        source: serde_json::Error,
    },
}

/// Client side, used by `ferryctl`: one request, one response.
pub fn call(socket: &Path, req: &Request) -> Result<Response, CallError> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|source| connect_error(socket, source))?;
    // A rollback rewrites every range changed since its target: allow it an hour.
    let timeout = match req {
        Request::Rollback { .. } | Request::Promote { .. } | Request::Verify { .. } => {
            Duration::from_secs(3600)
        }
        _ => Duration::from_secs(30),
    };
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(CallError::Encode)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reader = std::io::BufReader::new(s);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(CallError::Read)?;
    serde_json::from_str(&resp).map_err(|source| CallError::Malformed { text: resp, source })
}

/// Names what keeps us out when `connect` is refused for permissions; anything else
/// means no daemon listens there.
fn connect_error(socket: &Path, source: std::io::Error) -> CallError {
    use std::os::unix::fs::MetadataExt;
    if source.kind() != std::io::ErrorKind::PermissionDenied {
        return CallError::Connect {
            socket: socket.to_path_buf(),
            source,
        };
    }
    let access = match std::fs::metadata(socket) {
        Ok(m) => format!(
            "owner {}, group {}, mode {:04o} (the owner and the group may connect when they have write permission)",
            account_name("/etc/passwd", m.uid()),
            account_name("/etc/group", m.gid()),
            m.mode() & 0o7777
        ),
        // Not even its attributes are readable: a directory on the way is closed.
        Err(_) => "a directory on its path is closed to this user".to_string(),
    };
    CallError::Denied {
        socket: socket.to_path_buf(),
        access,
        source,
    }
}

/// `name (id)` from a passwd- or group-format file, or the bare id.
fn account_name(file: &str, id: u32) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let num = f.nth(1)?.parse::<u32>().ok()?;
            (num == id).then(|| format!("{name} ({id})"))
        })
        .next()
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_denied_names_who_may_connect() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).unwrap();
        // root may connect whatever the mode, so the refusal is the kernel's answer
        // for any other user, fed in as such.
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = connect_error(&sock, denied);
        assert!(matches!(e, CallError::Denied { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "the control socket {} exists but this user may not use it: owner ",
                sock.display()
            )),
            "{text}"
        );
        assert!(text.contains("mode 0660"), "{text}");
        assert!(!text.contains("is it running"), "{text}");
        // Any other failure still asks whether ferryd runs.
        let gone = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(connect_error(&sock, gone)
            .to_string()
            .contains("is it running with this config?"));
    }

    #[test]
    fn account_names_come_from_the_account_files() {
        assert_eq!(account_name("/etc/passwd", 0), "root (0)");
        assert_eq!(account_name("/nonexistent", 4242), "4242");
    }

    #[test]
    fn call_round_trips_and_names_failures() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let e = call(&sock, &Request::Status).unwrap_err();
        assert!(matches!(e, CallError::Connect { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "cannot reach ferryd at {} (is it running with this config?)",
                sock.display()
            )
        );
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for reply in ["{\"ok\":true,\"result\":{\"node\":\"n\"}}\n", "not json\n"] {
                let (s, _) = listener.accept().unwrap();
                let mut r = std::io::BufReader::new(s);
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert_eq!(line, "{\"cmd\":\"status\"}\n");
                r.get_mut().write_all(reply.as_bytes()).unwrap();
            }
        });
        let r = call(&sock, &Request::Status).unwrap();
        assert!(r.ok && r.error.is_none());
        assert_eq!(r.result.unwrap()["node"], "n");
        let e = call(&sock, &Request::Status).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed response from ferryd: \"not json\\n\""
        );
        server.join().unwrap();
    }

    #[test]
    fn requests_agree_with_the_command_table() {
        // One entry per request variant.
        let at = PointSpec::Seq(1);
        for req in [
            Request::Status,
            Request::BookmarkCreate { name: "b".into() },
            Request::ListBookmarks,
            Request::ListPits { limit: None },
            Request::PitExport {
                volume: "v".into(),
                target: at.clone(),
                listen: "127.0.0.1:0".into(),
                writable: false,
            },
            Request::PitUnexport {
                id: None,
                all: false,
            },
            Request::Pause,
            Request::Resume,
            Request::Rollback {
                volume: "v".into(),
                target: at.clone(),
                group: false,
            },
            Request::Promote {
                target: None,
                force: false,
            },
            Request::Demote,
            Request::Switchover { to: None },
            Request::Reload,
            Request::Verify { volume: None },
            Request::DrillReport(DrillReport {
                volume: "v".into(),
                seq: 7,
                point_time: "2026-12-07T00:00:00Z".into(),
                passed: true,
                rto_ms: 1200,
                rpo_ms: 3000,
                check: "filesystem".into(),
                summary: "ext4: fsck clean".into(),
            }),
        ] {
            let v = serde_json::to_value(&req).unwrap();
            assert_eq!(v["cmd"], req.name());
            assert_eq!(command_role(req.name()), Some(req.required_role()));
        }
        let mut names: Vec<_> = COMMANDS.iter().map(|(c, _)| c).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COMMANDS.len());
    }
}
