//! A primary and a standby `dr1` as real ferryd processes, each replication address
//! behind a userspace UDP proxy (partitions), with their configs, TLS identities and
//! small NBD and control helpers: shared by the fencing and failpoint tests.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_api::config::{
    format_id, Config, ControlConfig, JournalConfig, NbdConfig, NodeConfig, ReplicationConfig,
    ReplicationMode, Role, TargetConfig, TlsConfig, VolumeConfig,
};
use ferry_api::control::{call, Request};
use ferry_api::size::ByteSize;
use ferry_nbd::testclient::TestClient;
use ferry_testkit::udp_proxy::LossyLink;
use ferryd::testkit::{free_udp_port, Node};

pub const VOLUME: &str = "vol0";
pub const VOLUME_BYTES: u64 = 8 << 20;
pub const CLUSTER: [u8; 16] = [0x3c; 16];
/// Short enough that a partitioned session ends (and a healed link redials) quickly.
pub const TEST_ENV: [(&str, &str); 1] = [(ferryd::node::IDLE_TIMEOUT_ENV, "1500")];

pub fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

/// One node's config: `listen` is its own replication address, `peer` the other
/// node (its name and the proxy in front of it).
pub fn node_config(
    dir: &Path,
    name: &str,
    role: Role,
    listen: SocketAddr,
    peer: (&str, u16),
) -> Config {
    let data = dir.join(name);
    let tls = data.join("tls");
    Config {
        node: NodeConfig {
            name: name.into(),
            role,
            cluster_id: format_id(&CLUSTER),
            metadata_dir: data.clone(),
        },
        journal: JournalConfig {
            dir: data.join("journal"),
            size: ByteSize(32 << 20),
            segment_size: ByteSize(4 << 20),
            engine: Default::default(),
            recovery: Default::default(),
            checkpoint_interval_ms: 500,
            inflight_batches: 1,
            writer_nice: ferry_api::config::DEFAULT_WRITER_NICE,
        },
        nbd: Some(NbdConfig::plain("127.0.0.1:0")),
        tls: Some(TlsConfig {
            ca: tls.join("ca.pem"),
            cert: tls.join(format!("{name}.pem")),
            key: tls.join(format!("{name}.key")),
            suite: Default::default(),
        }),
        replication: Some(ReplicationConfig {
            listen: listen.to_string(),
            primary: "primary".into(),
            sync_timeout_ms: 1000,
            tail_bytes: ByteSize(8 << 20),
            async_linger_us: 0,
            archives: Vec::new(),
            sync: None,
            targets: vec![TargetConfig {
                name: peer.0.into(),
                address: format!("127.0.0.1:{}", peer.1),
                mode: ReplicationMode::Sync,
                on_sync_loss: Default::default(),
                wan: Default::default(),
                max_lag_seconds: None,
            }],
        }),
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
        volumes: vec![VolumeConfig {
            name: VOLUME.into(),
            path: data.join(format!("{VOLUME}.img")),
            size: ByteSize(VOLUME_BYTES),
            cache: Default::default(),
        }],
    }
}

/// Writes the node's directory, volume, TLS identity and config; returns the path.
pub fn write_node(dir: &Path, cfg: &Config, ca: &ferry_transport::pki::ClusterCa) -> PathBuf {
    let name = &cfg.node.name;
    let tls = dir.join(name).join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let f = std::fs::File::create(&cfg.volumes[0].path).unwrap();
    f.set_len(VOLUME_BYTES).unwrap();
    ca.issue_node(name).unwrap().write_pem_files(&tls).unwrap();
    std::fs::write(tls.join("ca.pem"), ca.cert_pem()).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg.to_toml()).unwrap();
    path
}

/// The two nodes' configs and the proxies in front of their replication addresses:
/// `[primary, dr1]` each way.
pub fn cluster(dir: &Path) -> ([PathBuf; 2], [LossyLink; 2]) {
    let listen = [free_udp_port(), free_udp_port()].map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let links = listen.map(|a| LossyLink::new(a).unwrap());
    let ca = ferry_transport::pki::ClusterCa::generate(CLUSTER).unwrap();
    let p = node_config(
        dir,
        "primary",
        Role::Primary,
        listen[0],
        ("dr1", links[1].port),
    );
    let s = node_config(
        dir,
        "dr1",
        Role::Standby,
        listen[1],
        ("primary", links[0].port),
    );
    ([write_node(dir, &p, &ca), write_node(dir, &s, &ca)], links)
}

pub fn partition(links: &[LossyLink; 2], on: bool) {
    for l in links {
        l.pause(on);
    }
}

/// A control request that must succeed; its result.
pub fn control(node: &Node, req: &Request) -> serde_json::Value {
    let cfg = Config::load(&node.config).unwrap();
    let r = call(&cfg.control.socket, req).unwrap();
    assert!(
        r.ok,
        "{}: {:?}\nlog:\n{}",
        req.name(),
        r.error,
        node.log_text()
    );
    r.result.unwrap_or_default()
}

/// The node's status once it answers (a role change restarts it in place).
pub fn status(node: &Node) -> Option<serde_json::Value> {
    let cfg = Config::load(&node.config).ok()?;
    let r = call(&cfg.control.socket, &Request::Status).ok()?;
    r.result.filter(|_| r.ok)
}

pub fn wait(
    node: &Node,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(node);
        if let Some(st) = st.as_ref().filter(|st| pred(st)) {
            return st.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last status: {st:#?}\nlog:\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node's NBD address while it serves as the primary of `epoch`.
pub fn primary_of(node: &Node, epoch: u64) -> SocketAddr {
    let st = wait(
        node,
        &format!("the primary of epoch {epoch}"),
        Duration::from_secs(60),
        |st| st["role"] == "primary" && st["epoch"] == epoch && st["nbd"]["listen"].is_string(),
    );
    st["nbd"]["listen"].as_str().unwrap().parse().unwrap()
}

pub fn block(tag: u8) -> Vec<u8> {
    vec![tag; 4096]
}

/// Writes `tag`'s block at `offset` and flushes: the NBD error of the write (0: ok).
pub fn write(addr: SocketAddr, offset: u64, tag: u8) -> u32 {
    let (mut c, _) = TestClient::open(addr, VOLUME).unwrap();
    match c.write(offset, &block(tag), 0).unwrap() {
        0 => c.flush().unwrap(),
        err => err,
    }
}

pub fn read(addr: SocketAddr, offset: u64) -> Vec<u8> {
    let (mut c, _) = TestClient::open(addr, VOLUME).unwrap();
    c.read(offset, 4096).unwrap().expect("read refused")
}
