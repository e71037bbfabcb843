//! Fencing by epoch across role changes, with real ferryd processes and a userspace
//! UDP proxy in front of each node's replication address (a partition drops every
//! datagram between the nodes): a primary replaced while it was partitioned away
//! must refuse writes once the link heals, whichever node was promoted and however
//! often roles changed before (ferry-torture seed 101).
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

const VOLUME: &str = "vol0";
const VOLUME_BYTES: u64 = 8 << 20;
const CLUSTER: [u8; 16] = [0x3c; 16];
/// Short enough that a partitioned session ends (and a healed link redials) quickly.
const TEST_ENV: [(&str, &str); 1] = [(ferryd::node::IDLE_TIMEOUT_ENV, "1500")];

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

/// One node's config: `listen` is its own replication address, `peer` the other
/// node (its name and the proxy in front of it).
fn node_config(
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
        }),
        replication: Some(ReplicationConfig {
            listen: listen.to_string(),
            primary: "primary".into(),
            sync_timeout_ms: 1000,
            tail_bytes: ByteSize(8 << 20),
            async_linger_us: 0,
            archives: Vec::new(),
            targets: vec![TargetConfig {
                name: peer.0.into(),
                address: format!("127.0.0.1:{}", peer.1),
                mode: ReplicationMode::Sync,
            }],
        }),
        metrics: None,
        pit: None,
        access: None,
        control: ControlConfig {
            socket: data.join("ferryd.sock"),
        },
        volumes: vec![VolumeConfig {
            name: VOLUME.into(),
            path: data.join(format!("{VOLUME}.img")),
            size: ByteSize(VOLUME_BYTES),
        }],
    }
}

/// Writes the node's directory, volume, TLS identity and config; returns the path.
fn write_node(dir: &Path, cfg: &Config, ca: &ferry_transport::pki::ClusterCa) -> PathBuf {
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
fn cluster(dir: &Path) -> ([PathBuf; 2], [LossyLink; 2]) {
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

fn partition(links: &[LossyLink; 2], on: bool) {
    for l in links {
        l.pause(on);
    }
}

/// A control request that must succeed; its result.
fn control(node: &Node, req: &Request) -> serde_json::Value {
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
fn status(node: &Node) -> Option<serde_json::Value> {
    let cfg = Config::load(&node.config).ok()?;
    let r = call(&cfg.control.socket, &Request::Status).ok()?;
    r.result.filter(|_| r.ok)
}

fn wait(
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
fn primary_of(node: &Node, epoch: u64) -> SocketAddr {
    let st = wait(
        node,
        &format!("the primary of epoch {epoch}"),
        Duration::from_secs(60),
        |st| st["role"] == "primary" && st["epoch"] == epoch && st["nbd"]["listen"].is_string(),
    );
    st["nbd"]["listen"].as_str().unwrap().parse().unwrap()
}

fn block(tag: u8) -> Vec<u8> {
    vec![tag; 4096]
}

/// Writes `tag`'s block at `offset` and flushes: the NBD error of the write (0: ok).
fn write(addr: SocketAddr, offset: u64, tag: u8) -> u32 {
    let (mut c, _) = TestClient::open(addr, VOLUME).unwrap();
    match c.write(offset, &block(tag), 0).unwrap() {
        0 => c.flush().unwrap(),
        err => err,
    }
}

fn read(addr: SocketAddr, offset: u64) -> Vec<u8> {
    let (mut c, _) = TestClient::open(addr, VOLUME).unwrap();
    c.read(offset, 4096).unwrap().expect("read refused")
}

/// Failover both ways, each while the old primary is partitioned away: after the
/// link heals, the old primary learns the newer epoch and refuses writes, and the new
/// primary holds every acknowledged write. The second failover is ferry-torture seed
/// 101: the promoted node used to expect its own name from the primary it replaced
/// (so that one's dial failed in TLS), and the old primary, dialled by the new one,
/// heard the newer epoch and did not fence itself: two nodes accepted writes.
#[test]
fn a_primary_replaced_while_partitioned_refuses_writes_once_it_hears_the_newer_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ([pcfg, scfg], links) = cluster(dir.path());
    let dr1 = Node::start_env(ferryd(), &scfg, &TEST_ENV);
    let primary = Node::start_env(ferryd(), &pcfg, &TEST_ENV);
    wait(&primary, "dr1 to stream", Duration::from_secs(30), |st| {
        st["targets"][0]["state"] == "streaming"
    });
    let p_addr = primary_of(&primary, 1);
    assert_eq!(write(p_addr, 0, 0xa1), 0, "a write on the first primary");

    // Failover 1: primary -> dr1 (epoch 2), the old primary partitioned away.
    partition(&links, true);
    control(
        &dr1,
        &Request::Promote {
            target: None,
            force: true,
        },
    );
    let d_addr = primary_of(&dr1, 2);
    assert_eq!(write(d_addr, 4096, 0xb2), 0, "a write on dr1, epoch 2");
    partition(&links, false);
    let st = wait(
        &primary,
        "the old primary to learn epoch 2",
        Duration::from_secs(60),
        |st| st["outdated"].is_object(),
    );
    assert_eq!(
        (
            st["outdated"]["epoch"].as_u64(),
            st["outdated"]["by"].as_str()
        ),
        (Some(2), Some("dr1")),
        "{st:#}"
    );
    assert_ne!(
        write(p_addr, 8192, 0xee),
        0,
        "the outdated primary accepted a write"
    );
    control(&primary, &Request::Demote);
    wait(
        &dr1,
        "dr1 to stream to the demoted primary",
        Duration::from_secs(60),
        |st| {
            st["targets"][0]["state"] == "streaming"
                && st["targets"][0]["acked_seq"].as_u64() >= st["durable_seq"].as_u64()
        },
    );

    // Failover 2: dr1 -> primary (epoch 3), dr1 partitioned away.
    partition(&links, true);
    control(
        &primary,
        &Request::Promote {
            target: None,
            force: true,
        },
    );
    let p_addr = primary_of(&primary, 3);
    assert_eq!(write(p_addr, 12288, 0xc3), 0, "a write on primary, epoch 3");
    partition(&links, false);
    let st = wait(
        &dr1,
        "dr1 to learn epoch 3",
        Duration::from_secs(60),
        |st| st["outdated"].is_object(),
    );
    assert_eq!(
        (
            st["outdated"]["epoch"].as_u64(),
            st["outdated"]["by"].as_str()
        ),
        (Some(3), Some("primary")),
        "{st:#}"
    );
    assert!(st["writes_refused"].is_string(), "{st:#}");
    assert_ne!(
        write(d_addr, 16384, 0xee),
        0,
        "the outdated dr1 accepted a write"
    );

    // Every acknowledged write is on the primary of epoch 3; the refused one nowhere.
    for (offset, tag) in [(0, 0xa1), (4096, 0xb2), (12288, 0xc3)] {
        assert!(
            read(p_addr, offset) == block(tag),
            "the write at {offset} is lost"
        );
    }
    assert!(
        read(p_addr, 16384) == block(0),
        "a refused write reached the primary"
    );
}
