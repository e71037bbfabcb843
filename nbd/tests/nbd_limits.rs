//! Limits under hostile load: the connection cap (idle handshakes make room
//! for a real client, sessions in transmission are never displaced and a
//! newcomer is refused instead), the handshake timeout and the idle timeout,
//! each checked through the server's counters and a real client's view.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_nbd::stats::StatsSnapshot;
use ferry_nbd::testclient::{TestClient, TestServer};
use ferry_nbd::{MapRegistry, MemExport, ServerConfig, ServerStats};

const SIZE: usize = 1 << 20;

fn server(cfg: ServerConfig) -> (TestServer, Arc<ServerStats>) {
    let stats = cfg.stats.clone();
    let vol = Arc::new(MemExport::new("vol0", SIZE));
    (
        TestServer::start(Arc::new(MapRegistry::new(vec![vol])), cfg),
        stats,
    )
}

/// Polls the counters until `ok` holds (bounded): the server updates them
/// on its own threads.
fn wait_stats(stats: &ServerStats, what: &str, ok: impl Fn(&StatsSnapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats.snapshot();
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A write and its read-back through a fresh session.
fn write_and_read_back(c: &mut TestClient, byte: u8) {
    let data = vec![byte; 4096];
    assert_eq!(c.write(8192, &data, 0).unwrap(), 0);
    assert_eq!(c.read(8192, 4096).unwrap().unwrap(), data);
}

#[test]
fn idle_handshakes_make_room_for_a_real_client() {
    let (srv, stats) = server(ServerConfig {
        max_connections: 4,
        ..ServerConfig::default()
    });
    // Far more idle sockets than the cap, none sending a byte.
    let flood: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    wait_stats(&stats, "the flood was admitted by evictions", |s| {
        s.evicted_connections_total >= 36 && s.connections_active <= 4
    });
    let (mut c, _) = TestClient::open(srv.addr, "vol0").expect("a real client gets in");
    write_and_read_back(&mut c, 0xa5);
    let s = stats.snapshot();
    assert_eq!(s.refused_connections_total, 0, "{s:?}");
    drop(flood);
    c.disconnect().unwrap();
}

#[test]
fn sessions_in_transmission_are_never_displaced_and_a_newcomer_is_refused() {
    let (srv, stats) = server(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    });
    let (mut a, _) = TestClient::open(srv.addr, "vol0").unwrap();
    let (mut b, _) = TestClient::open(srv.addr, "vol0").unwrap();
    let mut late = TestClient::connect(srv.addr).unwrap();
    let mut first = [0u8; 1];
    let got = late.stream().read(&mut first).unwrap_or(0);
    assert_eq!(got, 0, "closed at once, without a greeting");
    wait_stats(&stats, "the newcomer was counted", |s| {
        s.refused_connections_total == 1
    });
    write_and_read_back(&mut a, 1);
    write_and_read_back(&mut b, 2);
    assert_eq!(stats.snapshot().evicted_connections_total, 0);
    a.disconnect().unwrap();
    // A slot is free again.
    wait_stats(&stats, "one session left", |s| s.connections_active == 1);
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    write_and_read_back(&mut c, 3);
}

#[test]
fn a_client_that_does_not_finish_the_handshake_is_dropped() {
    let (srv, stats) = server(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    let mut idle = TestClient::connect(srv.addr).unwrap();
    idle.read_greeting().unwrap();
    let t = Instant::now();
    assert!(idle.expect_closed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    wait_stats(&stats, "the timeout was counted", |s| {
        s.handshake_timeouts_total == 1 && s.connections_active == 0
    });
    // A client that goes straight through is not affected.
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    write_and_read_back(&mut c, 4);
    assert_eq!(stats.snapshot().handshake_timeouts_total, 1);
}

#[test]
fn a_quiet_session_is_closed_after_the_idle_timeout_only_when_configured() {
    let (srv, stats) = server(ServerConfig {
        idle_timeout: Some(Duration::from_millis(400)),
        ..ServerConfig::default()
    });
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    // Requests keep it alive.
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        write_and_read_back(&mut c, i);
    }
    assert!(c.expect_closed(), "closed once quiet");
    wait_stats(&stats, "the idle timeout was counted", |s| {
        s.idle_timeouts_total == 1
    });

    // The default: no idle timeout.
    let (srv, stats) = server(ServerConfig::default());
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    write_and_read_back(&mut c, 9);
    assert_eq!(stats.snapshot().idle_timeouts_total, 0);
}
