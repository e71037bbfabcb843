//! The ferryd and ferryctl binaries and the processes this harness starts from them:
//! spawn with a bounded wait for the ready line, SIGKILL by the child's own PID (also
//! when dropped, so a panic or an error never leaves a daemon behind), status through
//! the control socket, ferryctl commands with their JSON answer.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::config::Config;
use ferry_api::control::{self, Request};

/// Written to a node's log before each start: the log is appended across restarts.
const START_MARK: &str = "=== ferry-torture: starting ferryd ===";

/// How long a daemon may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where ferryd and ferryctl are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub ferryd: PathBuf,
    pub ferryctl: PathBuf,
}

impl Bins {
    /// `dir`, or the directory of this executable (cargo puts every workspace binary
    /// in one target directory).
    pub fn find(dir: Option<&Path>) -> Result<Bins> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()?
                .parent()
                .ok_or_else(|| anyhow!("this executable has no directory"))?
                .to_path_buf(),
        };
        let b = Bins {
            ferryd: dir.join("ferryd"),
            ferryctl: dir.join("ferryctl"),
        };
        for p in [&b.ferryd, &b.ferryctl] {
            if !p.is_file() {
                bail!(
                    "{} is missing: build it (`cargo build -p ferryd -p ferryctl`) or pass --bin-dir",
                    p.display()
                );
            }
        }
        Ok(b)
    }

    /// `ferryctl --config CONFIG ARGS… --json`: the parsed answer, or its stderr.
    pub fn ctl(&self, config: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = Command::new(&self.ferryctl)
            .arg("--config")
            .arg(config)
            .args(args)
            .arg("--json")
            .output()
            .map_err(|e| format!("run ferryctl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "ferryctl {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// A running ferryd, SIGKILLed by its PID when dropped.
pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// Starts `ferryd --config CONFIG` (stderr appended to `log`) and waits for its
    /// ready line. A daemon that exits or stays silent is an error naming the log.
    pub fn start(bins: &Bins, config: &Path, log: &Path) -> Result<Daemon> {
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        writeln!(logf, "{START_MARK}")?;
        let mut child = Command::new(&bins.ferryd)
            .arg("--config")
            .arg(config)
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .with_context(|| format!("spawn {}", bins.ferryd.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("ferryd stdout not piped"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Drains stdout for the daemon's whole life (a full pipe would block it).
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("ferryd ready: ") {
                    let _ = tx.send(());
                }
            }
        });
        crate::cleanup::add_pid(child.id());
        let mut d = Daemon { child: Some(child) };
        if rx.recv_timeout(READY_TIMEOUT).is_err() {
            let exit = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            d.kill();
            bail!(
                "ferryd --config {} did not become ready within {READY_TIMEOUT:?} (exit: {exit:?}); last log lines:\n{}",
                config.display(),
                log_tail(log, 30)
            );
        }
        Ok(d)
    }

    /// Has the process exited (and been reaped)?
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID; no memory is involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
            crate::cleanup::remove_pid(c.id());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log file (for error messages and reports).
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(plain).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The log of the daemon's current instance (since the harness last started it).
pub fn current_log(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match text.rfind(START_MARK) {
        Some(i) => text[i..].to_string(),
        None => text,
    }
}

/// A log line without terminal colour codes, at most 400 characters.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in line.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out.chars().take(400).collect()
}

/// A node's status through its control socket; `None` while it is down or restarting.
pub fn status(config: &Path) -> Option<serde_json::Value> {
    let cfg = Config::load(config).ok()?;
    let r = control::call(&cfg.control.socket, &Request::Status).ok()?;
    r.ok.then_some(r.result?)
}

/// Polls `status` until `ok` holds; an error naming `what` and the last status after
/// `timeout`.
pub fn wait_status(
    config: &Path,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(config);
        if let Some(st) = st.as_ref().filter(|s| ok(s)) {
            return Ok(st.clone());
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}; last status: {}",
                st.map(|s| s.to_string())
                    .unwrap_or_else(|| "none (down)".into())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A primary's bound NBD address from its status.
pub fn nbd_addr(st: &serde_json::Value) -> Option<SocketAddr> {
    st["nbd"]["listen"].as_str()?.parse().ok()
}

pub fn seq(v: &serde_json::Value, p: &str) -> u64 {
    v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0)
}
