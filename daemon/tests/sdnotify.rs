//! The systemd notification protocol against a fake `NOTIFY_SOCKET` (a Unix datagram
//! socket bound in a temp dir, as systemd's): the module in-process, and a real ferryd
//! started as systemd would start a `Type=notify` service with `WatchdogSec=`.
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferryd::ops::sdnotify::{self, Notifier, State};
use ferryd::testkit::primary_config;

const MIB: u64 = 1 << 20;

fn recv(sock: &UnixDatagram) -> Option<String> {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv on the fake notify socket: {e}"),
    }
}

/// Kills the child and fails with what was received and its log.
fn fail(child: &mut Child, log: &Path, what: String, msgs: &[String]) -> ! {
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    panic!(
        "{what}\nnotifications received: {msgs:?}\nferryd log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The module alone: path and abstract sockets, the environment, the watchdog
/// variables. One test, because it changes this process's environment.
#[test]
fn notifies_a_fake_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let rx = UnixDatagram::bind(&path).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Unset: a no-op.
    std::env::remove_var("NOTIFY_SOCKET");
    assert!(!sdnotify::notify(&[State::Ready]).unwrap());

    std::env::set_var("NOTIFY_SOCKET", &path);
    assert!(sdnotify::notify(&[State::Ready, State::Status("serving")]).unwrap());
    assert_eq!(recv(&rx).as_deref(), Some("READY=1\nSTATUS=serving"));
    assert!(sdnotify::notify(&[State::Watchdog]).unwrap());
    assert_eq!(recv(&rx).as_deref(), Some("WATCHDOG=1"));
    assert!(sdnotify::notify(&[State::Stopping]).unwrap());
    assert_eq!(recv(&rx).as_deref(), Some("STOPPING=1"));

    // systemd's own socket is abstract (`@/org/freedesktop/systemd1/notify/...`).
    let name = format!(
        "ferry-test-notify-{}-{:?}",
        std::process::id(),
        Instant::now()
    );
    let abs = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&addr).unwrap()
    };
    abs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
    assert!(sdnotify::notify(&[State::Ready]).unwrap());
    assert_eq!(recv(&abs).as_deref(), Some("READY=1"));

    // Errors are returned: a bad address, a socket nobody listens on.
    std::env::set_var("NOTIFY_SOCKET", "relative/notify");
    assert!(sdnotify::notify(&[State::Ready]).is_err());
    let gone = Notifier::new(dir.path().join("nobody").as_os_str()).unwrap();
    assert!(gone.notify(&[State::Ready]).is_err());
    std::env::remove_var("NOTIFY_SOCKET");

    // Watchdog: half the timeout, only for the process WATCHDOG_PID names.
    std::env::set_var("WATCHDOG_USEC", "3000000");
    std::env::remove_var("WATCHDOG_PID");
    assert_eq!(
        sdnotify::watchdog_interval(),
        Some(Duration::from_millis(1500))
    );
    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
    assert_eq!(
        sdnotify::watchdog_interval(),
        Some(Duration::from_millis(1500))
    );
    std::env::set_var("WATCHDOG_PID", (std::process::id() + 1).to_string());
    assert_eq!(sdnotify::watchdog_interval(), None);
    std::env::remove_var("WATCHDOG_PID");
    std::env::remove_var("WATCHDOG_USEC");
    assert_eq!(sdnotify::watchdog_interval(), None);
}

/// A real ferryd under a fake service manager: READY=1 once it serves (after its
/// ready line: recovery done, listeners open), WATCHDOG=1 at half of WATCHDOG_USEC
/// while it runs, STOPPING=1 on SIGTERM, then exit 0.
#[test]
fn ferryd_reports_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = primary_config(dir.path(), &[("vol0", 16 * MIB)], 64 * MIB, 4 * MIB);
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let log = dir.path().join("ferryd.log");
    let watchdog = Duration::from_millis(400);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferryd"))
        .arg("--config")
        .arg(&cfg)
        .env("FERRY_LOG", "info")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        // systemd sets WATCHDOG_PID to the service's PID; unset means "whoever reads it".
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn ferryd");
    let stdout = child.stdout.take().unwrap();
    let (tx, ready_lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ferryd ready: ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let log_text = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
    let has = |msg: &str, line: &str| msg.lines().any(|l| l == line);

    // READY=1, bounded.
    let mut msgs: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !msgs.iter().any(|m| has(m, "READY=1")) {
        if Instant::now() > deadline {
            fail(
                &mut child,
                &log,
                "no READY=1 from ferryd within 60 s (is daemon.rs calling sdnotify::notify(&[State::Ready, ..]) after its ready line?)".into(),
                &msgs,
            );
        }
        msgs.extend(recv(&sock));
    }
    // The ready line was printed before READY=1, so it is (about to be) in the pipe;
    // the listeners it names accept connections.
    let line = match ready_lines.recv_timeout(Duration::from_secs(5)) {
        Ok(l) => l,
        Err(_) => fail(
            &mut child,
            &log,
            "READY=1 but no `ferryd ready:` line".into(),
            &msgs,
        ),
    };
    let Some(nbd) = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nbd="))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
    else {
        fail(&mut child, &log, format!("no nbd= in {line:?}"), &msgs);
    };
    if let Err(e) = std::net::TcpStream::connect(nbd) {
        fail(
            &mut child,
            &log,
            format!("READY=1 but the NBD listener {nbd} refuses: {e}"),
            &msgs,
        );
    }
    if !dir.path().join("primary/ferryd.sock").exists() {
        fail(
            &mut child,
            &log,
            "READY=1 but no control socket".into(),
            &msgs,
        );
    }

    // Watchdog pings at WATCHDOG_USEC/2 = 200 ms: ~10 in 2 s; at least 3 even on a
    // loaded CI machine.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if let Some(m) = recv(&sock) {
            pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
            msgs.push(m);
        }
    }
    if pings < 3 {
        fail(
            &mut child,
            &log,
            format!("{pings} WATCHDOG=1 in 2 s with WATCHDOG_USEC={watchdog:?}: expected one per ~200 ms"),
            &msgs,
        );
    }

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: signalling our own child by its PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        msgs.extend(recv(&sock));
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() > deadline {
            fail(
                &mut child,
                &log,
                "ferryd did not exit within 60 s of SIGTERM".into(),
                &msgs,
            );
        }
    };
    while let Some(m) = recv(&sock) {
        msgs.push(m);
    }
    assert!(
        status.success(),
        "SIGTERM must drain and exit 0: {status}\n{}",
        log_text(&log)
    );
    assert!(
        msgs.iter().any(|m| has(m, "STOPPING=1")),
        "no STOPPING=1 after SIGTERM; notifications: {msgs:?}\n{}",
        log_text(&log)
    );
}
