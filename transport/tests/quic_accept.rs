//! A standby's [`Acceptor`] under a stalled handshake (issue 17): one peer sends
//! the first datagram of its handshake (a QUIC Initial) and nothing more; a real
//! primary connecting meanwhile must get through at once, and the stalled one is
//! dropped after the handshake timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_transport::pki::ClusterCa;
use ferry_transport::quic::*;
use tokio::net::UdpSocket;

const CLUSTER: [u8; 16] = [0xaa; 16];
const STALL_TIMEOUT: Duration = Duration::from_secs(3);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn material(ca: &ClusterCa, name: &str) -> TlsMaterial {
    let node = ca.issue_node(name).expect("issue node cert");
    TlsMaterial::from_pem(ca.cert_pem(), &node).expect("TLS material")
}

/// A relay that passes only the first datagram it gets (the client's first
/// Initial) on to `server`, from a socket of its own, and drops everything else
/// in both directions: a handshake that starts and never goes on. Returns the
/// address to dial and the relay's sending address (what the server sees).
async fn first_datagram_only(server: SocketAddr) -> (SocketAddr, SocketAddr) {
    let front = UdpSocket::bind(localhost()).await.expect("bind relay");
    let back = UdpSocket::bind(localhost()).await.expect("bind relay");
    let (dial, seen_as) = (front.local_addr().unwrap(), back.local_addr().unwrap());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let (n, _) = front.recv_from(&mut buf).await.expect("first datagram");
        back.send_to(&buf[..n], server).await.expect("forward it");
        // Swallow the rest, keeping both sockets open.
        let mut other = vec![0u8; 65536];
        loop {
            tokio::select! {
                _ = front.recv_from(&mut buf) => {}
                _ = back.recv_from(&mut other) => {}
            }
        }
    });
    (dial, seen_as)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_never_holds_up_another_peer() {
    let ca = ClusterCa::generate(CLUSTER).expect("CA");
    let (primary_tls, standby_tls) = (material(&ca, "primary"), material(&ca, "dr1"));
    let opts = TransportOptions::default();
    let server_cfg = server_config(&standby_tls, "primary", &opts).expect("server config");
    let server = listen(localhost(), server_cfg).expect("listen");
    let addr = server.local_addr().expect("local addr");
    let mut acceptor = Acceptor::new(&server, STALL_TIMEOUT);

    // The stalling peer: a real QUIC client whose handshake is cut after one datagram.
    let (relay, stalled_as) = first_datagram_only(addr).await;
    let staller = client_endpoint(localhost()).expect("client endpoint");
    let cfg = client_config(&primary_tls, "dr1", &opts).expect("client config");
    let stalled = tokio::spawn(async move {
        let _ = connect(&staller, cfg, relay, "dr1").await;
    });
    // The standby takes the stalled handshake in before the real peer arrives.
    let started = Instant::now();
    let first = tokio::time::timeout(Duration::from_millis(500), acceptor.next()).await;
    assert!(first.is_err(), "nothing can finish yet: {first:?}");

    let client = client_endpoint(localhost()).expect("client endpoint");
    let cfg = client_config(&primary_tls, "dr1", &opts).expect("client config");
    let t = Instant::now();
    let (c, s) = tokio::join!(connect(&client, cfg, addr, "dr1"), acceptor.next());
    let _c = c.expect("the real peer connects");
    let s = s
        .expect("endpoint open")
        .expect("the real peer is accepted");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        s.remote_address(),
        client.local_addr().expect("client address")
    );

    // The stalled handshake ends with its timeout, naming the peer.
    let next = tokio::time::timeout(STALL_TIMEOUT * 2, acceptor.next())
        .await
        .expect("the stalled handshake times out")
        .expect("endpoint open");
    match next {
        Err(QuicError::HandshakeTimeout { peer, after }) => {
            assert_eq!((peer, after), (stalled_as, STALL_TIMEOUT));
        }
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= STALL_TIMEOUT);
    stalled.abort();
}
