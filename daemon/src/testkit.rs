//! Support for tests that run real ferryd processes: temp node directories, spawning
//! with a bounded wait for readiness, SIGKILL/SIGTERM by PID, and real NBD clients.
//! Not part of the product API.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

use std::time::{Duration, Instant};

use ferry_api::config::{
    format_id, Config, ControlConfig, JournalConfig, NbdConfig, NodeConfig, Role, VolumeConfig,
};
use ferry_api::size::ByteSize;

pub use ferry_testkit::{have, skip, skip_without};

/// Writes a primary config under `dir` (volumes created sparse), NBD on an OS port.
pub fn primary_config(
    dir: &Path,
    volumes: &[(&str, u64)],
    journal_size: u64,
    segment_size: u64,
) -> PathBuf {
    let data = dir.join("primary");
    std::fs::create_dir_all(&data).expect("create node dir");
    let cfg = Config {
        node: NodeConfig {
            name: "primary".into(),
            role: Role::Primary,
            cluster_id: format_id(&[0x5a; 16]),
            metadata_dir: data.clone(),
        },
        journal: JournalConfig {
            dir: data.join("journal"),
            size: ByteSize(journal_size),
            segment_size: ByteSize(segment_size),
            engine: Default::default(),
            recovery: Default::default(),
            checkpoint_interval_ms: 500,
            inflight_batches: 1,
            writer_nice: ferry_api::config::DEFAULT_WRITER_NICE,
        },
        nbd: Some(NbdConfig::plain("127.0.0.1:0")),
        tls: None,
        replication: None,
        metrics: None,
        pit: None,
        access: None,
        audit: None,
        verify: None,
        encryption: None,
        cluster: None,
        control: ControlConfig {
            socket: data.join("ferryd.sock"),
        },
        volumes: volumes
            .iter()
            .map(|(name, size)| {
                let path = data.join(format!("{name}.img"));
                let f = std::fs::File::create(&path).expect("create volume file");
                f.set_len(*size).expect("size volume file");
                VolumeConfig {
                    name: name.to_string(),
                    path,
                    size: ByteSize(*size),
                    cache: Default::default(),
                }
            })
            .collect(),
    };
    let path = dir.join("primary.toml");
    std::fs::write(&path, cfg.to_toml()).expect("write config");
    path
}

/// Adds `[metrics] listen = "127.0.0.1:0"` to a config written by this module; the
/// bound address is then in [`Node::metrics`].
pub fn enable_metrics(config: &Path) {
    let mut cfg = Config::load(config).expect("load config");
    cfg.metrics = Some(ferry_api::config::MetricsConfig {
        listen: "127.0.0.1:0".into(),
    });
    std::fs::write(config, cfg.to_toml()).expect("write config");
}

/// Sets every volume's `cache` mode in a config written by this module (or any
/// config file).
pub fn set_volume_cache(config: &Path, cache: ferry_api::config::CacheMode) {
    let mut cfg = Config::load(config).expect("load config");
    for v in &mut cfg.volumes {
        v.cache = cache;
    }
    std::fs::write(config, cfg.to_toml()).expect("write config");
}

/// A running ferryd, killed by its own PID when dropped.
pub struct Node {
    child: Option<Child>,
    pub pid: u32,
    /// The bound NBD address (primaries only).
    pub nbd: Option<SocketAddr>,
    /// The bound metrics endpoint (`[metrics]` configured, see [`enable_metrics`]).
    pub metrics: Option<SocketAddr>,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Node {
    /// Starts `ferryd --config CONFIG` and waits (bounded) for its ready line.
    pub fn start(ferryd: &Path, config: &Path) -> Node {
        Node::start_env(ferryd, config, &[])
    }

    /// `start` with extra environment variables (testing hooks).
    pub fn start_env(ferryd: &Path, config: &Path, env: &[(&str, &str)]) -> Node {
        let log = config.with_extension(format!("{}.log", std::process::id()));
        let log = unique_log(&log);
        let logf = std::fs::File::create(&log).expect("create log");
        let mut child = Command::new(ferryd)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", ferryd.display()));
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ferryd ready: ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let mut node = Node {
            child: Some(child),
            pid,
            nbd: None,
            metrics: None,
            config: config.to_path_buf(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                node.nbd = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("nbd="))
                    .and_then(|a| a.parse().ok());
                node.metrics = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("metrics="))
                    .and_then(|a| a.parse().ok());
                node
            }
            Err(_) => {
                let status = node
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "ferryd did not become ready within 60 s (exit: {status:?}); log:\n{}",
                    node.log_text()
                );
            }
        }
    }

    pub fn url(&self, volume: &str) -> String {
        let nbd = self.nbd.expect("this node serves no NBD (a standby?)");
        format!("nbd://{nbd}/{volume}")
    }

    /// Polls `status` until `pred` holds (bounded), returning the last status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            if pred(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last status: {st:#}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL by PID and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("node already stopped");
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                // SAFETY: as above.
                unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
                let _ = c.wait();
                panic!(
                    "ferryd did not exit within 60 s of SIGTERM; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let cfg = Config::load(&self.config).expect("config");
        let r = ferry_api::control::call(&cfg.control.socket, &ferry_api::control::Request::Status)
            .expect("status call");
        assert!(r.ok, "status failed: {:?}", r.error);
        r.result.expect("status result")
    }
}

fn unique_log(base: &Path) -> PathBuf {
    for i in 0.. {
        let p = base.with_extension(format!("{i}.log"));
        if !p.exists() {
            return p;
        }
    }
    unreachable!()
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free UDP port on 127.0.0.1 (for QUIC listeners whose address must be written
/// into another node's config before either starts).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local addr").port()
}

/// Runs qemu-io on an NBD URL with the given commands (bounded by `timeout` seconds).
pub fn qemu_io(url: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("120").arg("qemu-io").arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(url);
    c.output().expect("run qemu-io")
}

/// qemu-io running in the background, its output drained as it comes (a full pipe
/// would stall the workload and with it the test).
pub struct BackgroundQemuIo {
    child: Child,
    reader: std::thread::JoinHandle<std::io::Result<String>>,
}

pub fn spawn_qemu_io(url: &str, cmds: &[String]) -> BackgroundQemuIo {
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(cmds.iter().flat_map(|c| ["-c", c.as_str()]))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io");
    let mut pipe = child.stdout.take().expect("stdout piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut s).map(|_| s)
    });
    BackgroundQemuIo { child, reader }
}

impl BackgroundQemuIo {
    /// Waits for qemu-io to end (it does once its server is gone) and returns stdout.
    pub fn finish(mut self) -> String {
        let _ = self.child.wait();
        self.reader
            .join()
            .expect("reader thread")
            .expect("read qemu-io output")
    }
}

/// Offsets of the `len`-byte writes qemu-io reports as acknowledged.
pub fn acked_writes(stdout: &str, len: u64) -> Vec<u64> {
    let prefix = format!("wrote {len}/{len} bytes at offset ");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|o| o.trim().parse().ok())
        .collect()
}

/// Asserts a qemu-io run succeeded with no verification failure.
pub fn assert_qemu_io_ok(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !stdout.contains("Pattern verification failed")
            && !stdout.contains("error")
            && !stderr.contains("error"),
        "qemu-io failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

/// Runs a command that must succeed; returns its trimmed stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// nbdfuse + loop device + mount point (a filesystem on an NBD export without kernel
/// NBD), torn down in reverse order on drop.
pub struct Attached {
    fuse: Option<Child>,
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    pub mnt: Option<PathBuf>,
}

impl Attached {
    /// Exposes `url` as `dir/fuse/nbd` and attaches a loop device to it (read-only
    /// with `read_only`).
    pub fn new(url: &str, dir: &Path, read_only: bool) -> Attached {
        let fuse_dir = dir.join("fuse");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        let fuse = Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut a = Attached {
            fuse: Some(fuse),
            fuse_dir,
            loopdev: None,
            mnt: None,
        };
        let file = a.fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut losetup = Command::new("losetup");
        losetup.args(["-f", "--show", "--direct-io=off"]);
        if read_only {
            losetup.arg("-r");
        }
        let dev = run(losetup.arg(&file));
        a.loopdev = Some(dev);
        a
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().expect("loop device")
    }

    /// Mounts the loop device on `mnt` with extra `mount` arguments.
    pub fn mount(&mut self, mnt: &Path, args: &[&str]) {
        std::fs::create_dir_all(mnt).unwrap();
        run(Command::new("mount").args(args).arg(self.dev()).arg(mnt));
        self.mnt = Some(mnt.to_path_buf());
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(m) = self.mnt.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if let Some(d) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&d).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.fuse_dir)
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.fuse.take() {
            // SAFETY: signalling our own child by its PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}
