//! Real QUIC on 127.0.0.1: mutual TLS, certificate refusals, the ferry
//! handshake over the control stream, and write-sets on their own stream.
//! Every test is bounded by `TEST_TIMEOUT`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_proto::session::{plan_resume, LocalIdentity};
use ferry_proto::wire::*;
use ferry_transport::pki::ClusterCa;
use ferry_transport::quic::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const EPOCH: Epoch = 3;
const CLUSTER_A: [u8; 16] = [0xaa; 16];
const CLUSTER_B: [u8; 16] = [0xbb; 16];

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn material(ca: &ClusterCa, name: &str) -> TlsMaterial {
    let node = ca.issue_node(name).expect("issue node cert");
    TlsMaterial::from_pem(ca.cert_pem(), &node).expect("TLS material")
}

fn identity(name: &str, role: Role, peer: &str) -> LocalIdentity {
    let (min_version, max_version) = LocalIdentity::supported_versions();
    LocalIdentity {
        cluster_id: CLUSTER_A,
        node_id: [name.len() as u8; 16],
        node_name: name.to_string(),
        role,
        epoch: EPOCH,
        min_version,
        max_version,
        volumes: vec![VolumeGeometry {
            id: 1,
            name: "vol1".into(),
            size_bytes: 1 << 30,
            block_size: 4096,
        }],
        expected_peer_name: peer.to_string(),
    }
}

/// A write-set of `n` writes of `len` bytes each, with data derived from
/// the seq so corruption or reordering is visible.
fn write_set(first: Seq, n: u64, len: usize) -> WriteSet {
    let records = (0..n)
        .map(|i| {
            let seq = first + i;
            let data: Vec<u8> = (0..len).map(|j| (seq as usize * 31 + j) as u8).collect();
            WireRecord {
                seq,
                volume: 1,
                op: RecordOp::Write,
                offset: seq * len as u64,
                length: len as u32,
                data: Bytes::from(data),
            }
        })
        .collect();
    WriteSet {
        epoch: EPOCH,
        first_seq: first,
        last_seq: first + n - 1,
        timestamp_ns: first * 1000,
        records,
    }
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out after {TEST_TIMEOUT:?}"))
}

/// Standby endpoint expecting `expected_client`, and the address it listens on.
fn standby_endpoint(
    tls: &TlsMaterial,
    expected_client: &str,
    opts: &TransportOptions,
) -> (quinn::Endpoint, SocketAddr) {
    let cfg = server_config(tls, expected_client, opts).expect("server config");
    let ep = listen(localhost(), cfg).expect("listen");
    let addr = ep.local_addr().expect("local addr");
    (ep, addr)
}

/// Dials `addr` as a client with `tls`, expecting a server named `expected`,
/// while the standby accepts. Returns both sides' results.
async fn dial_and_accept(
    client_tls: &TlsMaterial,
    expected_server: &str,
    server: &quinn::Endpoint,
    addr: SocketAddr,
) -> (
    Result<quinn::Connection, QuicError>,
    Result<quinn::Connection, QuicError>,
) {
    let opts = TransportOptions::default();
    let cfg = client_config(client_tls, expected_server, &opts).expect("client config");
    let client = client_endpoint(localhost()).expect("client endpoint");
    let (c, s) = tokio::join!(connect(&client, cfg, addr, expected_server), async {
        accept(server).await.expect("endpoint open")
    });
    // TLS 1.3: the client finishes its handshake before the server has
    // checked the client certificate, so a server-side refusal shows on the
    // client only at its first use of the connection.
    let c = match c {
        Ok(conn) => match conn.open_uni().await {
            Ok(mut s) => match s.write_all(b"x").await {
                Ok(()) => match conn.closed().await {
                    quinn::ConnectionError::LocallyClosed => Ok(conn),
                    e => Err(QuicError::Connection(e)),
                },
                Err(e) => Err(QuicError::Write(e)),
            },
            Err(e) => Err(QuicError::Connection(e)),
        },
        Err(e) => Err(e),
    };
    (c, s)
}

/// Full setup: mutual TLS, then the ferry handshake on both sides.
async fn session_pair(
    standby_opts: &TransportOptions,
) -> (
    PrimarySession,
    StandbySession,
    quinn::Endpoint,
    quinn::Endpoint,
) {
    let ca = ClusterCa::generate(CLUSTER_A).expect("CA");
    let primary_tls = material(&ca, "primary");
    let standby_tls = material(&ca, "dr1");
    let (server, addr) = standby_endpoint(&standby_tls, "primary", standby_opts);
    let client = client_endpoint(localhost()).expect("client endpoint");
    let opts = TransportOptions::default();
    let cfg = client_config(&primary_tls, "dr1", &opts).expect("client config");

    let primary = identity("primary", Role::Primary, "dr1");
    let standby = identity("dr1", Role::Standby, "primary");
    let (p, s) = tokio::join!(
        async {
            let conn = connect(&client, cfg, addr, "dr1").await?;
            primary_handshake(conn, &primary, 0, &opts, |neg, peer| {
                plan_resume(neg, EPOCH, peer.resume_position, 1, 0)
            })
            .await
        },
        async {
            let conn = accept(&server).await.expect("endpoint open")?;
            standby_handshake(conn, &standby, 0, standby_opts).await
        }
    );
    let p = p.expect("primary handshake");
    let s = s.expect("standby handshake");
    (p, s, client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_handshake_and_write_sets_round_trip() {
    bounded("round trip", async {
        let (mut p, mut s, _c, _s) = session_pair(&TransportOptions::default()).await;
        assert_eq!(p.peer_hello.node_name, "dr1");
        assert_eq!(s.peer_hello.node_name, "primary");
        assert_eq!(p.negotiated, s.negotiated);
        assert_eq!(s.hello_ack.resume_seq, 0);

        let sent: Vec<WriteSet> = (0..3).map(|i| write_set(1 + i * 4, 4, 4096)).collect();
        for ws in &sent {
            p.data.send_write_set(ws).await.expect("send write-set");
        }
        p.data.finish().expect("finish data");

        let mut data = s.accept_data().await.expect("accept data stream");
        for want in &sent {
            let got = data.recv_frame().await.expect("recv").expect("frame");
            assert_eq!(got, Frame::WriteSet(want.clone()), "record data intact");
            let ack = Ack {
                epoch: EPOCH,
                received_durable_seq: want.last_seq,
                applied_seq: want.last_seq,
                received_seq: want.last_seq,
            };
            s.control_send
                .send_frame(&Frame::Ack(ack))
                .await
                .expect("send ack");
        }
        assert!(
            data.recv_frame().await.expect("clean end").is_none(),
            "finished stream ends on a frame boundary"
        );

        for want in &sent {
            match p.control_recv.recv_frame().await.expect("recv ack") {
                Some(Frame::Ack(a)) => assert_eq!(a.received_durable_seq, want.last_seq),
                other => panic!("expected Ack, got {other:?}"),
            }
        }
        let hb = Heartbeat {
            epoch: EPOCH,
            sent_at_ns: 42,
            echo_ns: 0,
            last_seq: 12,
            sync_loss: None,
        };
        p.control_send
            .send_frame(&Frame::Heartbeat(hb))
            .await
            .expect("heartbeat");
        assert_eq!(
            s.control_recv.recv_frame().await.expect("recv hb"),
            Some(Frame::Heartbeat(hb))
        );
    })
    .await;
}

/// Runs both handshakes over a fresh mutual-TLS connection; `standby_resume`
/// is the standby's durable seq, the primary's journal holds `1..=last`.
async fn handshakes(
    primary: LocalIdentity,
    standby: LocalIdentity,
    standby_resume: Seq,
    last: Seq,
) -> (
    Result<PrimarySession, QuicError>,
    Result<StandbySession, QuicError>,
) {
    let ca = ClusterCa::generate(CLUSTER_A).expect("CA");
    let opts = TransportOptions::default();
    let (server, addr) = standby_endpoint(&material(&ca, "dr1"), "primary", &opts);
    let client = client_endpoint(localhost()).expect("client endpoint");
    let cfg = client_config(&material(&ca, "primary"), "dr1", &opts).expect("client config");
    tokio::join!(
        async {
            let conn = connect(&client, cfg, addr, "dr1").await?;
            primary_handshake(conn, &primary, last, &opts, |neg, peer| {
                plan_resume(neg, EPOCH, peer.resume_position, 1, last)
            })
            .await
        },
        async {
            let conn = accept(&server).await.expect("endpoint open")?;
            standby_handshake(conn, &standby, standby_resume, &opts).await
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_carry_error_codes() {
    bounded("handshake refusals", async {
        // Both sides validate the other's Hello, so both see the mismatch.
        let primary = identity("primary", Role::Primary, "dr1");
        let mut standby = identity("dr1", Role::Standby, "primary");
        standby.volumes[0].size_bytes *= 2;
        let (p, s) = handshakes(primary, standby, 0, 0).await;
        let p = p.expect_err("primary must refuse");
        assert_eq!(p.error_code(), ErrorCode::GeometryMismatch, "{p}");
        let s = s.expect_err("standby must refuse");
        assert_eq!(s.error_code(), ErrorCode::GeometryMismatch, "{s}");

        // Only the primary can tell that the standby claims data it never
        // journaled; the standby learns it from the Error frame.
        let primary = identity("primary", Role::Primary, "dr1");
        let standby = identity("dr1", Role::Standby, "primary");
        let (p, s) = handshakes(primary, standby, 10, 5).await;
        assert_eq!(
            p.expect_err("primary must refuse").error_code(),
            ErrorCode::Diverged
        );
        match s.expect_err("standby must be refused") {
            QuicError::PeerRefused { code, reason } => {
                assert_eq!(code, ErrorCode::Diverged);
                assert!(reason.contains("diverged"), "{reason}");
            }
            other => panic!("standby should see the primary's Error frame, got {other}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_cluster_is_refused() {
    bounded("foreign CA", async {
        let ca_a = ClusterCa::generate(CLUSTER_A).expect("CA A");
        let ca_b = ClusterCa::generate(CLUSTER_B).expect("CA B");
        let opts = TransportOptions::default();
        let (server, addr) = standby_endpoint(&material(&ca_a, "dr1"), "primary", &opts);

        // An intruder that trusts cluster A's CA but holds a cluster B cert:
        // the standby (server) refuses it.
        let b_node = ca_b.issue_node("primary").expect("B node");
        let intruder = TlsMaterial {
            cluster_id: CLUSTER_A,
            ca_cert: ferry_transport::pki::parse_cert_pem(ca_a.cert_pem()).expect("A PEM")[0]
                .clone(),
            cert_chain: b_node.cert_chain().expect("chain"),
            key: b_node.private_key().expect("key"),
        };
        let (c, s) = dial_and_accept(&intruder, "dr1", &server, addr).await;
        let s = s
            .expect_err("standby must refuse a foreign certificate")
            .to_string();
        assert!(
            s.contains("peer certificate is not signed by this cluster's CA"),
            "standby error: {s}"
        );
        assert!(
            s.contains(&"bb".repeat(16)),
            "names the foreign cluster: {s}"
        );
        let c = c
            .expect_err("intruder must not get a connection")
            .to_string();
        assert!(
            c.contains("not signed by this cluster's CA"),
            "client error: {c}"
        );

        // A cluster B primary dialling cluster A's standby refuses the
        // standby's certificate itself.
        let b_primary = material(&ca_b, "primary");
        let (c, _s) = dial_and_accept(&b_primary, "dr1", &server, addr).await;
        let c = c.expect_err("client must refuse").to_string();
        assert!(
            c.contains("peer certificate is not signed by this cluster's CA")
                && c.contains(&"aa".repeat(16)),
            "client error: {c}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_name_is_refused() {
    bounded("wrong name", async {
        let ca = ClusterCa::generate(CLUSTER_A).expect("CA");
        let opts = TransportOptions::default();
        let (server, addr) = standby_endpoint(&material(&ca, "dr1"), "primary", &opts);

        // Right CA, but not the primary this standby serves.
        let (c, s) = dial_and_accept(&material(&ca, "dr2"), "dr1", &server, addr).await;
        let s = s.expect_err("standby must refuse").to_string();
        assert!(
            s.contains("peer is 'dr2', expected 'primary'"),
            "standby error: {s}"
        );
        assert!(c.is_err(), "client must not get a usable connection");

        // The primary expects dr9 but reaches dr1.
        let (c, _s) = dial_and_accept(&material(&ca, "primary"), "dr9", &server, addr).await;
        let c = c.expect_err("client must refuse").to_string();
        assert!(
            c.contains("peer is 'dr1', expected 'dr9'"),
            "client error: {c}"
        );
    })
    .await;
}

/// A standby that knows its cluster's members admits each of them (and names the
/// one that connected), and still refuses a node that is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_admitting_several_members_refuses_the_others() {
    bounded("several names", async {
        let ca = ClusterCa::generate(CLUSTER_A).expect("CA");
        let opts = TransportOptions::default();
        let names = ["primary".to_string(), "dr1".to_string()];
        let cfg = ferry_transport::quic::server_config_for(&material(&ca, "dr2"), &names, &opts)
            .expect("server config");
        let server = listen(localhost(), cfg).expect("listen");
        let addr = server.local_addr().expect("local addr");
        for member in ["primary", "dr1"] {
            let client_cfg =
                client_config(&material(&ca, member), "dr2", &opts).expect("client config");
            let client = client_endpoint(localhost()).expect("client endpoint");
            let (c, s) = tokio::join!(connect(&client, client_cfg, addr, "dr2"), async {
                accept(&server).await.expect("endpoint open")
            });
            let s = s.unwrap_or_else(|e| panic!("{member} refused: {e}"));
            assert_eq!(
                ferry_transport::quic::peer_node_names(&s),
                vec![member.to_string()]
            );
            c.expect("client connection").close(0u32.into(), b"done");
        }
        let (c, s) = dial_and_accept(&material(&ca, "dr3"), "dr2", &server, addr).await;
        let s = s
            .expect_err("a node not listed must be refused")
            .to_string();
        assert!(s.contains("expected 'primary,dr1'"), "standby error: {s}");
        assert!(c.is_err(), "client must not get a usable connection");
        assert!(
            ferry_transport::quic::server_config_for(&material(&ca, "dr2"), &[], &opts).is_err()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    bounded("no client cert", async {
        let ca = ClusterCa::generate(CLUSTER_A).expect("CA");
        let opts = TransportOptions::default();
        let (server, addr) = standby_endpoint(&material(&ca, "dr1"), "primary", &opts);

        // A plain TLS client that trusts the cluster CA but has no certificate.
        let mut roots = rustls::RootCertStore::empty();
        for c in ferry_transport::pki::parse_cert_pem(ca.cert_pem()).expect("CA PEM") {
            roots.add(c).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic client tls");
        let cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let client = client_endpoint(localhost()).expect("client endpoint");

        let (c, s) = tokio::join!(
            async {
                let conn = connect(&client, cfg, addr, "dr1").await?;
                // The refusal may land before, during or after this write; either
                // way the connection's close reason says why, so ask it, not the write.
                if let Ok(mut st) = conn.open_uni().await {
                    let _ = st.write_all(b"hello").await;
                }
                Err::<(), QuicError>(QuicError::Connection(conn.closed().await))
            },
            async { accept(&server).await.expect("endpoint open") }
        );
        let s = s.expect_err("standby must refuse").to_string();
        assert!(
            s.to_lowercase().contains("certificate"),
            "standby error names the missing certificate: {s}"
        );
        let c = c.expect_err("client must be closed").to_string();
        assert!(c.contains("certificate"), "client error: {c}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_flow_while_a_large_write_set_is_in_flight() {
    bounded("large write-set", async {
        // A small data-stream window on the standby: the 8 MiB write-set
        // cannot complete until the standby reads it, so the primary's send is
        // provably still in progress while the acks below arrive.
        let standby_opts = TransportOptions {
            stream_receive_window: 1024 * 1024,
            ..TransportOptions::default()
        };
        let (p, mut s, _c, _s) = session_pair(&standby_opts).await;
        let PrimarySession {
            mut data,
            mut control_recv,
            ..
        } = p;

        let big = write_set(1, 128, 64 * 1024); // 128 × 64 KiB = 8 MiB
        let big_clone = big.clone();
        let sender =
            tokio::spawn(async move { data.send_write_set(&big_clone).await.map(|()| data) });

        // Heartbeat-style acks on the control stream while the data stream is
        // blocked by flow control. The standby has not touched the data stream.
        for i in 0..20u64 {
            let hb = Heartbeat {
                epoch: EPOCH,
                sent_at_ns: i + 1,
                echo_ns: 0,
                last_seq: 0,
                sync_loss: None,
            };
            s.control_send
                .send_frame(&Frame::Heartbeat(hb))
                .await
                .expect("standby heartbeat");
            match control_recv.recv_frame().await.expect("primary recv") {
                Some(Frame::Heartbeat(got)) => assert_eq!(got, hb),
                other => panic!("expected Heartbeat, got {other:?}"),
            }
        }
        assert!(
            !sender.is_finished(),
            "8 MiB write-set should still be blocked on the 1 MiB stream window"
        );

        let mut rx = s.accept_data().await.expect("accept data");
        let got = rx
            .recv_frame()
            .await
            .expect("recv write-set")
            .expect("frame");
        assert_eq!(got, Frame::WriteSet(big.clone()), "8 MiB of records intact");
        sender.await.expect("sender task").expect("write-set sent");

        let ack = Ack {
            epoch: EPOCH,
            received_durable_seq: big.last_seq,
            applied_seq: 0,
            received_seq: big.last_seq,
        };
        s.control_send
            .send_frame(&Frame::Ack(ack))
            .await
            .expect("ack");
        assert_eq!(
            control_recv.recv_frame().await.expect("recv ack"),
            Some(Frame::Ack(ack))
        );
    })
    .await;
}

#[test]
fn datagram_bound_follows_the_route_mtu() {
    // Ethernet: 1500 - IPv4 (20) - UDP (8); IPv6 headers are 40 bytes.
    assert_eq!(udp_payload_bound(1500, false), 1472);
    assert_eq!(udp_payload_bound(1500, true), 1452);
    // Loopback and jumbo frames: capped so a GSO batch of 10 stays under 64 KiB.
    assert_eq!(udp_payload_bound(65536, false), MAX_UDP_PAYLOAD);
    assert_eq!(udp_payload_bound(9000, true), MAX_UDP_PAYLOAD);
    assert!(10 * u32::from(MAX_UDP_PAYLOAD) < 65_507);
    // Never below QUIC's minimum.
    assert_eq!(udp_payload_bound(576, false), 1200);
    assert_eq!(udp_payload_bound(0, true), 1200);
    // Unknown route MTU: quinn's default bound.
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(
        TransportOptions::default()
            .toward(peer, None)
            .mtu_upper_bound,
        DEFAULT_MTU_UPPER_BOUND
    );
    assert_eq!(
        TransportOptions::default()
            .toward(peer, Some(65536))
            .mtu_upper_bound,
        MAX_UDP_PAYLOAD
    );
}

/// On loopback a connection bounded by the route's MTU discovers datagrams larger
/// than Ethernet's, and data crosses it intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_connections_discover_large_datagrams() {
    bounded("large datagrams", async {
        let ca = ClusterCa::generate(CLUSTER_A).expect("CA");
        let (server, addr) = standby_endpoint(
            &material(&ca, "dr1"),
            "primary",
            &TransportOptions::default(),
        );
        let opts = TransportOptions::default().toward(addr, Some(65536));
        let cfg = client_config(&material(&ca, "primary"), "dr1", &opts).expect("client config");
        let client = client_endpoint(localhost()).expect("client endpoint");
        let (c, s) = tokio::join!(connect(&client, cfg, addr, "dr1"), async {
            accept(&server).await.expect("endpoint open")
        });
        let (c, s) = (c.expect("client connection"), s.expect("server connection"));
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut r = s.accept_uni().await.expect("accept stream");
            let got = r.read_to_end(4 << 20).await.expect("read");
            (got, s)
        });
        let mut w = c.open_uni().await.expect("open stream");
        w.write_all(&data).await.expect("write");
        w.finish().expect("finish");
        let (got, _s) = reader.await.expect("reader task");
        assert!(got == data, "1 MiB crossed intact");
        // Discovery runs after the handshake; keep the path busy until it is done.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mtu = c.stats().path.current_mtu;
            if mtu > DEFAULT_MTU_UPPER_BOUND {
                assert!(mtu <= MAX_UDP_PAYLOAD, "path MTU {mtu} above the bound");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "path MTU still {mtu} after 10 s on loopback (bound {})",
                opts.mtu_upper_bound
            );
            let _ = c.send_datagram(Bytes::from_static(b"ping"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
