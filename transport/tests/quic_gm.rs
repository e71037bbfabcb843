//! A cluster whose CA is SM2 (ferry-gmtls) speaks TLS 1.3 with RFC 8998's
//! TLS_SM4_GCM_SM3 over QUIC through the same `server_config` / `client_config`,
//! and every peer check of the standard mode still holds: cluster CA, cluster
//! id, node name. A gm node and a standard node refuse each other.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_gmtls::cert::GmClusterCa;
use ferry_transport::pki::{self, ClusterCa, NodeIdentity, TlsSuite};
use ferry_transport::quic::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const CLUSTER_A: [u8; 16] = [0xaa; 16];
const CLUSTER_B: [u8; 16] = [0xbb; 16];

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out after {TEST_TIMEOUT:?}"))
}

fn gm_node(ca: &GmClusterCa, name: &str) -> NodeIdentity {
    let node = ca.issue_node(name).expect("issue SM2 node cert");
    NodeIdentity {
        name: node.name,
        cert_pem: node.cert_pem,
        key_pem: node.key_pem,
    }
}

fn gm_material(ca: &GmClusterCa, name: &str) -> TlsMaterial {
    TlsMaterial::from_pem(&ca.cert_pem(), &gm_node(ca, name)).expect("gm TLS material")
}

fn std_material(ca: &ClusterCa, name: &str) -> TlsMaterial {
    let node = ca.issue_node(name).expect("issue node cert");
    TlsMaterial::from_pem(ca.cert_pem(), &node).expect("TLS material")
}

fn standby(tls: &TlsMaterial, expected_client: &str) -> (quinn::Endpoint, SocketAddr) {
    let cfg = server_config(tls, expected_client, &TransportOptions::default()).expect("server");
    let ep = listen(localhost(), cfg).expect("listen");
    let addr = ep.local_addr().expect("local addr");
    (ep, addr)
}

/// Dials as `client_tls` expecting `expected_server` while the standby accepts;
/// a connection counts as made only once a stream write got through (TLS 1.3
/// clients finish before the server has checked their certificate).
async fn dial(
    client_tls: &TlsMaterial,
    expected_server: &str,
    server: &quinn::Endpoint,
    addr: SocketAddr,
) -> (Result<(), String>, Result<(), String>) {
    let cfg = client_config(client_tls, expected_server, &TransportOptions::default())
        .expect("client config");
    let client = client_endpoint(localhost()).expect("client endpoint");
    let client_side = async {
        let conn = connect(&client, cfg, addr, expected_server).await?;
        let mut s = conn.open_uni().await?;
        s.write_all(b"gm").await?;
        s.finish()?;
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(_) => Ok(()),
            e => Err(QuicError::Connection(e)),
        }
    };
    let server_side = async {
        let conn = accept(server).await.expect("endpoint open")?;
        let mut recv = conn.accept_uni().await?;
        let data = recv
            .read_to_end(64)
            .await
            .map_err(|e| QuicError::Protocol(e.to_string()))?;
        assert_eq!(data, b"gm");
        conn.close(0u32.into(), b"done");
        Ok::<_, QuicError>(())
    };
    let (c, s) = tokio::join!(client_side, server_side);
    (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
}

#[test]
fn transport_pki_reads_gm_certificates() {
    let ca = GmClusterCa::generate(CLUSTER_A).expect("CA");
    let ca_der = pki::parse_cert_pem(&ca.cert_pem())
        .expect("CA PEM")
        .remove(0);
    assert_eq!(pki::ca_cluster_id(&ca_der).expect("cluster id"), CLUSTER_A);
    assert_eq!(pki::ca_suite(&ca_der).expect("suite"), TlsSuite::Gm);
    let node = gm_node(&ca, "dr1");
    let names = node.cert_names().expect("names");
    assert_eq!(names.node_names, vec!["dr1".to_string()]);
    assert_eq!(names.cluster_id, Some(CLUSTER_A));
    // The SM2 key loads (rcgen cannot; the gm provider's loader does).
    assert!(node.private_key().is_ok());
    assert_eq!(
        gm_material(&ca, "dr1").suite().expect("suite"),
        TlsSuite::Gm
    );

    let std_ca = ClusterCa::generate(CLUSTER_A).expect("std CA");
    assert_eq!(
        std_material(&std_ca, "dr1").suite().expect("suite"),
        TlsSuite::Standard
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gm_cluster_connects_and_keeps_every_peer_check() {
    bounded("gm cluster", async {
        let ca = GmClusterCa::generate(CLUSTER_A).expect("CA");
        let (server, addr) = standby(&gm_material(&ca, "dr1"), "primary");

        let (c, s) = dial(&gm_material(&ca, "primary"), "dr1", &server, addr).await;
        c.expect("gm primary connects");
        s.expect("gm standby accepts");

        // Right CA, wrong node name: refused by the standby.
        let (c, s) = dial(&gm_material(&ca, "dr2"), "dr1", &server, addr).await;
        let s = s.expect_err("standby must refuse dr2");
        assert!(
            s.contains("peer is 'dr2', expected 'primary'"),
            "standby: {s}"
        );
        assert!(c.is_err());

        // The primary expects dr9 but reaches dr1: refused by the client.
        let (c, _) = dial(&gm_material(&ca, "primary"), "dr9", &server, addr).await;
        let c = c.expect_err("client must refuse dr1");
        assert!(c.contains("peer is 'dr1', expected 'dr9'"), "client: {c}");

        // Another gm cluster's node that trusts our CA: not signed by it.
        let other = GmClusterCa::generate(CLUSTER_B).expect("CA B");
        let stranger = gm_node(&other, "primary");
        let intruder = TlsMaterial {
            cluster_id: CLUSTER_A,
            ca_cert: pki::parse_cert_pem(&ca.cert_pem())
                .expect("A PEM")
                .remove(0),
            cert_chain: stranger.cert_chain().expect("chain"),
            key: stranger.private_key().expect("key"),
        };
        let (c, s) = dial(&intruder, "dr1", &server, addr).await;
        let s = s.expect_err("standby must refuse a foreign certificate");
        assert!(
            s.contains("peer certificate is not signed by this cluster's CA"),
            "standby: {s}"
        );
        assert!(
            s.contains(&"bb".repeat(16)),
            "names the foreign cluster: {s}"
        );
        assert!(c.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gm_and_standard_nodes_refuse_each_other() {
    bounded("gm vs standard", async {
        let gm_ca = GmClusterCa::generate(CLUSTER_A).expect("gm CA");
        let std_ca = ClusterCa::generate(CLUSTER_A).expect("std CA");
        for (server_tls, client_tls) in [
            (gm_material(&gm_ca, "dr1"), std_material(&std_ca, "primary")),
            (std_material(&std_ca, "dr1"), gm_material(&gm_ca, "primary")),
        ] {
            let (server, addr) = standby(&server_tls, "primary");
            let (c, s) = dial(&client_tls, "dr1", &server, addr).await;
            let (c, s) = (
                c.expect_err("client refused"),
                s.expect_err("server refused"),
            );
            eprintln!("client: {c}\nserver: {s}");
            for e in [&c, &s] {
                assert!(
                    e.contains("TLS suites differ: one node speaks the gm (SM2/SM3/SM4) suites"),
                    "unclear error: {e}"
                );
            }
        }
    })
    .await;
}
