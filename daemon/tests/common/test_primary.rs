//! A test "primary" for a real standby: its config and TLS material, the QUIC
//! handshake, hand-crafted write-sets and the standby's answers (ferry-proto frames
//! over ferry-transport). Shared by the test targets that feed a standby.
#![allow(dead_code)] // each test target uses part of it

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
use ferryd::testkit::{free_udp_port, primary_config};

pub const MIB: u64 = 1 << 20;
const CLUSTER: [u8; 16] = [0x5a; 16];

/// A standby config under `dir` with one 1 MiB volume (point-in-time recovery on or
/// off), and the TLS material of the primary it accepts.
pub fn standby_config(dir: &Path, pit: bool) -> (PathBuf, SocketAddr, TlsMaterial) {
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
        suite: Default::default(),
    });
    std::fs::write(&path, cfg.to_toml()).expect("write config");
    let tls = TlsMaterial::from_pem(ca.cert_pem(), &primary).expect("primary TLS");
    (path, listen, tls)
}

/// Connects as the primary in `epoch` and completes the handshake.
pub async fn connect(standby: SocketAddr, tls: &TlsMaterial, epoch: u64) -> PrimarySession {
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

pub fn write_set(epoch: u64, first: Seq, offset: u64, fill: u8) -> WriteSet {
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
pub enum Answer {
    Error(ErrorCode, String),
    Durable(Seq),
    /// Why no answer came (read through `Debug` in the failure messages).
    #[allow(dead_code)]
    Closed(String),
}

pub async fn answer(s: &mut PrimarySession, ws: WriteSet) -> Answer {
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
