//! A real standby fed hand-crafted frame streams by a test "primary" (ferry-proto
//! frames over ferry-transport's QUIC with the cluster's TLS): order and range
//! checks happen before anything is journaled or written (issue 16, path 7).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use ferry_api::config::{Config, PitConfig, ReplicationConfig, Role, TlsConfig};
use ferry_proto::session::{plan_resume, LocalIdentity};
use ferry_proto::wire::{
    ErrorCode, Frame, RecordOp, Role as WireRole, Seq, VolumeGeometry, WireRecord, WriteSet,
};
use ferry_transport::pki::ClusterCa;
use ferry_transport::quic::{self, PrimarySession, TlsMaterial, TransportOptions};
use ferryd::testkit::{free_udp_port, primary_config, Node};

const MIB: u64 = 1 << 20;
const CLUSTER: [u8; 16] = [0x5a; 16];

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

/// A standby config under `dir` with one 1 MiB volume (point-in-time recovery on or
/// off), and the TLS material of the primary it accepts.
fn standby_config(dir: &Path, pit: bool) -> (PathBuf, SocketAddr, TlsMaterial) {
    let path = primary_config(dir, &[("vol0", MIB)], 64 * MIB, 4 * MIB);
    let mut cfg = Config::load(&path).expect("load config");
    let port = free_udp_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    cfg.node.name = "standby".into();
    cfg.node.role = Role::Standby;
    cfg.nbd = None;
    cfg.pit = Some(toml::from_str::<PitConfig>(&format!("enabled = {pit}")).expect("pit section"));
    cfg.replication = Some(
        toml::from_str::<ReplicationConfig>(&format!(
            "listen = \"{listen}\"\nprimary = \"primary\""
        ))
        .expect("replication section"),
    );
    let ca = ClusterCa::generate(CLUSTER).expect("cluster CA");
    let standby = ca.issue_node("standby").expect("standby certificate");
    let primary = ca.issue_node("primary").expect("primary certificate");
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let write = |name: &str, text: &str| {
        let p = pki.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        p
    };
    cfg.tls = Some(TlsConfig {
        ca: write("ca.pem", ca.cert_pem()),
        cert: write("standby.pem", &standby.cert_pem),
        key: write("standby.key", &standby.key_pem),
    });
    std::fs::write(&path, cfg.to_toml()).expect("write config");
    let tls = TlsMaterial::from_pem(ca.cert_pem(), &primary).expect("primary TLS");
    (path, listen, tls)
}

/// Connects as the primary in `epoch` and completes the handshake.
async fn connect(standby: SocketAddr, tls: &TlsMaterial, epoch: u64) -> PrimarySession {
    let opts = TransportOptions::default();
    let client = quic::client_config(tls, "standby", &opts).expect("client config");
    let endpoint = quic::client_endpoint("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    let conn = quic::connect(&endpoint, client, standby, "standby")
        .await
        .expect("connect to the standby");
    let (min_version, max_version) = LocalIdentity::supported_versions();
    let local = LocalIdentity {
        cluster_id: CLUSTER,
        node_id: [7; 16],
        node_name: "primary".into(),
        role: WireRole::Primary,
        epoch,
        min_version,
        max_version,
        volumes: vec![VolumeGeometry {
            id: 0,
            name: "vol0".into(),
            size_bytes: MIB,
            block_size: 4096,
        }],
        expected_peer_name: "standby".into(),
    };
    quic::primary_handshake(conn, &local, 0, &opts, |neg, hello| {
        plan_resume(neg, epoch, hello.resume_position, 1, hello.resume_position)
    })
    .await
    .expect("handshake with the standby")
}

fn write_set(epoch: u64, first: Seq, offset: u64, fill: u8) -> WriteSet {
    WriteSet {
        epoch,
        first_seq: first,
        last_seq: first,
        timestamp_ns: 1,
        records: vec![WireRecord {
            seq: first,
            volume: 0,
            op: RecordOp::Write,
            offset,
            length: 4096,
            data: Bytes::from(vec![fill; 4096]),
        }],
    }
}

/// What the standby answers a write-set with: its Error frame, or the first ack
/// that holds the write-set durably (heartbeats are skipped).
#[derive(Debug)]
enum Answer {
    Error(ErrorCode, String),
    Durable(Seq),
    /// Why no answer came (read through `Debug` in the failure messages).
    #[allow(dead_code)]
    Closed(String),
}

async fn answer(s: &mut PrimarySession, ws: WriteSet) -> Answer {
    s.data.send_write_set(&ws).await.expect("send write-set");
    let wait = async {
        loop {
            match s.control_recv.recv_frame().await {
                Ok(Some(Frame::Error(e))) => return Answer::Error(e.code, e.reason),
                Ok(Some(Frame::Ack(a))) if a.received_durable_seq >= ws.last_seq => {
                    return Answer::Durable(a.received_durable_seq)
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Answer::Closed("control stream ended".into()),
                Err(e) => return Answer::Closed(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or(Answer::Closed("no answer within 20 s".into()))
}

/// With point-in-time recovery on, undo capture used to catch the range only after
/// the record was journaled and acked: apply stopped and the restart's replay
/// refused the record.
#[test]
fn standby_refuses_out_of_range_and_out_of_order_write_sets_before_writing() {
    refuses_before_writing(true);
}

/// Without it, nothing caught the range: the replica file grew.
#[test]
fn standby_without_pit_refuses_out_of_range_write_sets_before_writing() {
    refuses_before_writing(false);
}

/// Out of range, then out of order, then a valid write-set: the first two are
/// refused with Error frames and leave nothing behind; the standby applies the third
/// and restarts cleanly.
fn refuses_before_writing(pit: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr, tls) = standby_config(dir.path(), pit);
    let img = dir.path().join("primary/vol0.img");
    let mut node = Node::start(ferryd(), &cfg);
    let epoch = node.status()["epoch"].as_u64().expect("epoch");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A record that ends past the 1 MiB replica.
        let mut s = connect(addr, &tls, epoch).await;
        match answer(&mut s, write_set(epoch, 1, MIB - 512, 0xee)).await {
            Answer::Error(ErrorCode::ResyncRequired, why) => {
                assert!(why.contains("beyond"), "{why}")
            }
            other => {
                panic!("an out-of-range record was not refused with a resync request: {other:?}")
            }
        }
        // A write-set after a gap (the standby holds nothing yet: 1 comes next).
        let mut s = connect(addr, &tls, epoch).await;
        match answer(&mut s, write_set(epoch, 3, 0, 0xdd)).await {
            Answer::Error(ErrorCode::Gap, why) => assert!(why.contains("expected"), "{why}"),
            other => {
                panic!("an out-of-order write-set was not refused with an Error frame: {other:?}")
            }
        }
        // Nothing moved: the next valid write-set is sequence 1.
        let mut s = connect(addr, &tls, epoch).await;
        match answer(&mut s, write_set(epoch, 1, 0, 0xab)).await {
            Answer::Durable(1) => {}
            other => panic!("a valid write-set after the refusals: {other:?}"),
        }
    });
    let st = node.wait_status("the valid write applied", Duration::from_secs(20), |st| {
        st["applied_seq"].as_u64() == Some(1)
    });
    assert_eq!(st["apply_error"], serde_json::Value::Null, "{st:#}");
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        MIB,
        "the replica grew"
    );
    let code = node.terminate();
    assert!(code.success(), "{code}\n{}", node.log_text());

    let node = Node::start(ferryd(), &cfg);
    let st = node.status();
    assert_eq!(st["durable_seq"], 1, "{st:#}");
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        MIB,
        "the replica grew"
    );
    let data = std::fs::read(&img).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0xab));
    assert!(
        data[4096..].iter().all(|&b| b == 0),
        "only the valid write landed"
    );
}
