//! The systemd notification protocol (`sd_notify(3)`) without libsystemd.
//!
//! Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a filesystem path, or an
//! abstract socket written `@name`); the service sends newline-separated `KEY=VALUE`
//! assignments in one datagram per call. Without `NOTIFY_SOCKET` (a terminal, a test,
//! `Type=simple`) every call is a no-op.
//!
//! The watchdog is driven by the caller: [`watchdog_interval`] says whether systemd
//! expects pings and how often, and the caller sends [`State::Watchdog`] from whatever
//! loop must prove itself alive (so a stalled loop misses the deadline and systemd
//! restarts the service). Errors are returned, never panics: a failed notification is
//! the caller's to log.
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// One assignment sent to the service manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State<'a> {
    /// `READY=1`: start-up finished (recovery done, listeners open).
    Ready,
    /// `STOPPING=1`: shutdown began (draining).
    Stopping,
    /// `WATCHDOG=1`: keep-alive ping.
    Watchdog,
    /// `STATUS=...`: one line shown by `systemctl status` (newlines become spaces).
    Status(&'a str),
    /// `EXTEND_TIMEOUT_USEC=...`: the current start/stop phase needs at least this
    /// much longer (e.g. a long journal replay that is still making progress).
    ExtendTimeout(Duration),
}

impl State<'_> {
    fn write(&self, out: &mut String) {
        match self {
            State::Ready => out.push_str("READY=1"),
            State::Stopping => out.push_str("STOPPING=1"),
            State::Watchdog => out.push_str("WATCHDOG=1"),
            State::Status(s) => {
                out.push_str("STATUS=");
                // A newline would start a new assignment; a NUL would truncate it.
                out.extend(
                    s.chars()
                        .map(|c| if c == '\n' || c == '\0' { ' ' } else { c }),
                );
            }
            State::ExtendTimeout(d) => {
                out.push_str(&format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()));
            }
        }
    }
}

/// The datagram for `states`: one assignment per line.
pub fn message(states: &[State]) -> String {
    let mut out = String::new();
    for (i, s) in states.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        s.write(&mut out);
    }
    out
}

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?}: not an absolute path or @abstract name")]
    BadAddress(String),
    #[error("notify socket {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("notify socket {addr}: short send ({sent} of {len} bytes)")]
    Short {
        addr: String,
        sent: usize,
        len: usize,
    },
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    addr: SocketAddr,
    display: String,
}

/// How long a send may block (the manager's queue is full) before it is an error.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

impl Notifier {
    /// The notifier named by `$NOTIFY_SOCKET`; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Notifier::new(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for an address in `NOTIFY_SOCKET` syntax: `/path` or `@abstract`.
    pub fn new(addr: &OsStr) -> Result<Notifier, NotifyError> {
        let display = addr.to_string_lossy().into_owned();
        let bytes = addr.as_bytes();
        let sock = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(Path::new(addr)),
            Some(b'@') if bytes.len() > 1 => abstract_addr(&bytes[1..]),
            // vsock: (systemd ≥ 253, for VMs) and relative paths are not supported.
            _ => return Err(NotifyError::BadAddress(display)),
        };
        let addr = sock.map_err(|source| NotifyError::Io {
            addr: display.clone(),
            source,
        })?;
        Ok(Notifier { addr, display })
    }

    /// Sends `states` in one datagram.
    pub fn notify(&self, states: &[State]) -> Result<(), NotifyError> {
        let io_err = |source| NotifyError::Io {
            addr: self.display.clone(),
            source,
        };
        let msg = message(states);
        let sock = UnixDatagram::unbound().map_err(io_err)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT)).map_err(io_err)?;
        let sent = sock
            .send_to_addr(msg.as_bytes(), &self.addr)
            .map_err(io_err)?;
        if sent != msg.len() {
            return Err(NotifyError::Short {
                addr: self.display.clone(),
                sent,
                len: msg.len(),
            });
        }
        Ok(())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// Sends `states` to `$NOTIFY_SOCKET`. `Ok(false)`: not running under a service
/// manager (nothing sent); `Ok(true)`: sent.
pub fn notify(states: &[State]) -> Result<bool, NotifyError> {
    match Notifier::from_env()? {
        Some(n) => n.notify(states).map(|()| true),
        None => Ok(false),
    }
}

/// How often to send [`State::Watchdog`]: half of `$WATCHDOG_USEC`, or `None` when
/// the watchdog is off (unset, zero or unparsable, or `$WATCHDOG_PID` names another
/// process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] for given variable values (as `sd_watchdog_enabled(3)`).
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        // Set but unparsable: not provably ours, so no pings (as libsystemd).
        if pid.trim().parse::<u32>().ok()? != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(message(&[State::Ready]), "READY=1");
        assert_eq!(
            message(&[State::Ready, State::Status("serving nbd://127.0.0.1:10809")]),
            "READY=1\nSTATUS=serving nbd://127.0.0.1:10809"
        );
        assert_eq!(message(&[State::Stopping]), "STOPPING=1");
        assert_eq!(message(&[State::Watchdog]), "WATCHDOG=1");
        assert_eq!(
            message(&[State::ExtendTimeout(Duration::from_secs(30))]),
            "EXTEND_TIMEOUT_USEC=30000000"
        );
        // A status cannot inject another assignment.
        assert_eq!(
            message(&[State::Status("bad\nREADY=1\0x")]),
            "STATUS=bad READY=1 x"
        );
        assert_eq!(message(&[]), "");
    }

    #[test]
    fn watchdog_intervals() {
        let half = |s| Some(Duration::from_micros(s));
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(
            watchdog_interval_from(Some("20000000"), None, 7),
            half(10_000_000)
        );
        assert_eq!(watchdog_interval_from(Some("3"), None, 7), half(1));
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some(""), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("-5"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("10s"), None, 7), None);
        assert_eq!(
            watchdog_interval_from(Some("1000"), Some("7"), 7),
            half(500)
        );
        assert_eq!(watchdog_interval_from(Some("1000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("1000"), Some("x"), 7), None);
    }

    #[test]
    fn addresses() {
        assert!(Notifier::new(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(Notifier::new(OsStr::new("@/org/freedesktop/systemd1/notify/1")).is_ok());
        for bad in ["relative/sock", "@", "vsock:2:1234"] {
            match Notifier::new(OsStr::new(bad)) {
                Err(NotifyError::BadAddress(a)) => assert_eq!(a, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // Longer than sun_path: an error, not a panic.
        let long = format!("/{}", "x".repeat(200));
        assert!(matches!(
            Notifier::new(OsStr::new(&long)),
            Err(NotifyError::Io { .. })
        ));
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.notify(&[State::Ready, State::Status("up")]).unwrap();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        // No listener any more: an error, returned.
        drop(rx);
        assert!(matches!(
            n.notify(&[State::Watchdog]),
            Err(NotifyError::Io { .. })
        ));
    }
}
