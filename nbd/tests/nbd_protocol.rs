//! NBD server protocol tests with the in-project raw client: handshake
//! paths, hostile input, concurrency, multi-connection and graceful
//! shutdown. Every hostile case also checks that a second, concurrently
//! connected good client keeps working.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_nbd::mem::ALL_FLAGS;
use ferry_nbd::proto::{self, *};
use ferry_nbd::testclient::{TestClient, TestServer};
use ferry_nbd::{ExportFlags, MapRegistry, MemExport, ServerConfig};

const VOL0_SIZE: usize = 16 << 20;
const VOL1_SIZE: usize = 4 << 20;
const RO_SIZE: usize = 1 << 20;
const MAX_PAYLOAD: u32 = 1 << 20;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn cfg() -> ServerConfig {
    ServerConfig {
        max_payload: MAX_PAYLOAD,
        max_inflight_per_conn: 16,
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    }
}

fn registry(delay: Duration) -> Arc<MapRegistry<MemExport>> {
    let ro = ExportFlags {
        read_only: true,
        ..ALL_FLAGS
    };
    Arc::new(MapRegistry::new(vec![
        Arc::new(MemExport::new("vol0", VOL0_SIZE).with_delay(delay)),
        Arc::new(MemExport::new("vol1", VOL1_SIZE).with_delay(delay)),
        Arc::new(MemExport::new("ro", RO_SIZE).with_flags(ro)),
    ]))
}

fn start() -> TestServer {
    init_tracing();
    TestServer::start(registry(Duration::ZERO), cfg())
}

/// A good client parked on vol1 that must keep working throughout.
struct Good {
    c: TestClient,
    round: u8,
}

impl Good {
    fn new(srv: &TestServer) -> Good {
        let (c, _) = TestClient::open(srv.addr, "vol1").expect("good client open");
        Good { c, round: 0 }
    }

    fn check(&mut self) {
        self.round = self.round.wrapping_add(1);
        let data = vec![self.round; 4096];
        let off = u64::from(self.round) * 4096;
        assert_eq!(self.c.write(off, &data, 0).expect("good write"), 0);
        assert_eq!(
            self.c.read(off, 4096).expect("good read"),
            Ok(data),
            "good client read back wrong data"
        );
    }
}

#[test]
fn handshake_options() {
    let srv = start();
    let mut good = Good::new(&srv);
    let mut c = TestClient::start(srv.addr).unwrap();

    // LIST: every export, in order.
    assert_eq!(
        c.list().unwrap(),
        Ok(vec!["vol0".to_string(), "vol1".into(), "ro".into()])
    );
    // Unknown option and TLS: ERR_UNSUP, session continues. (Structured
    // replies and extended headers are accepted: see structured.rs.)
    c.send_option(99, b"junk").unwrap();
    let r = c.read_opt_reply().unwrap();
    assert_eq!((r.option, r.typ), (99, REP_ERR_UNSUP));
    c.send_option(OPT_STARTTLS, &[]).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_UNSUP);
    // LIST with data is invalid.
    c.send_option(OPT_LIST, b"x").unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    // INFO: unknown name, then a good one with block sizes.
    assert_eq!(c.info("nope").unwrap(), Err(REP_ERR_UNKNOWN));
    let info = c.info("vol0").unwrap().unwrap();
    assert_eq!(info.size, VOL0_SIZE as u64);
    assert_eq!(info.block_size, Some((1, 4096, MAX_PAYLOAD)));
    assert_eq!(info.name.as_deref(), Some("vol0"));
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    assert_eq!(info.tflags, want);
    // Malformed GO payload (count does not match length): ERR_INVALID.
    c.send_option(OPT_GO, &[0, 0, 0, 0, 0, 5]).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    // Name longer than 4096 (but option within bounds): ERR_TOO_BIG.
    let mut big = Vec::new();
    big.extend_from_slice(&5000u32.to_be_bytes());
    big.extend_from_slice(&[b'a'; 5000]);
    big.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(OPT_GO, &big).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_TOO_BIG);
    // GO unknown, then empty name → default export (vol0).
    assert_eq!(c.go("missing").unwrap(), Err(REP_ERR_UNKNOWN));
    let info = c.go("").unwrap().unwrap();
    assert_eq!(info.size, VOL0_SIZE as u64);
    assert_eq!(c.write(0, b"hello", 0).unwrap(), 0);
    assert_eq!(c.read(0, 5).unwrap(), Ok(b"hello".to_vec()));
    c.disconnect().unwrap();

    // ABORT: ACK then close.
    let mut c = TestClient::start(srv.addr).unwrap();
    c.send_option(OPT_ABORT, &[]).unwrap();
    let r = c.read_opt_reply().unwrap();
    assert_eq!((r.option, r.typ), (OPT_ABORT, REP_ACK));
    assert!(c.expect_closed());
    good.check();
}

#[test]
fn export_name_option() {
    let srv = start();
    let mut good = Good::new(&srv);
    for no_zeroes in [false, true] {
        let mut c = TestClient::connect(srv.addr).unwrap();
        c.read_greeting().unwrap();
        let f = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&f.to_be_bytes()).unwrap();
        let (size, tflags) = c.export_name("vol1", no_zeroes).unwrap();
        assert_eq!(size, VOL1_SIZE as u64);
        assert_ne!(tflags & TFLAG_HAS_FLAGS, 0);
        assert_eq!(c.read(0, 16).unwrap().map(|v| v.len()), Ok(16));
        c.disconnect().unwrap();
    }
    // Read-only export advertises READ_ONLY and no write-type capabilities.
    let mut c = TestClient::start(srv.addr).unwrap();
    let (_, tflags) = c.export_name("ro", true).unwrap();
    assert_ne!(tflags & TFLAG_READ_ONLY, 0);
    assert_eq!(tflags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    // Unknown name: the only possible answer is closing the session.
    let mut c = TestClient::start(srv.addr).unwrap();
    c.send_option(OPT_EXPORT_NAME, b"nope").unwrap();
    assert!(c.expect_closed());
    good.check();
}

#[test]
fn hostile_handshakes_disconnect() {
    let srv = start();
    let mut good = Good::new(&srv);
    // Unknown client flags.
    let mut c = TestClient::connect(srv.addr).unwrap();
    c.read_greeting().unwrap();
    c.send(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(c.expect_closed());
    good.check();
    // Bad option magic.
    let mut c = TestClient::start(srv.addr).unwrap();
    c.send(&[0x42; 16]).unwrap();
    assert!(c.expect_closed());
    good.check();
    // Oversized option length: ERR_TOO_BIG, then hang-up (never allocates).
    let mut c = TestClient::start(srv.addr).unwrap();
    c.send_option_header(OPT_GO, 0xffff_fff0).unwrap();
    let r = c.read_opt_reply().unwrap();
    assert_eq!((r.option, r.typ), (OPT_GO, REP_ERR_TOO_BIG));
    assert!(c.expect_closed());
    good.check();
    // Truncated option payload then close.
    let mut c = TestClient::start(srv.addr).unwrap();
    c.send_option_header(OPT_GO, 100).unwrap();
    c.send(&[0; 10]).unwrap();
    c.shutdown_write().unwrap();
    assert!(c.expect_closed());
    // Vanish in the middle of the greeting exchange.
    let mut c = TestClient::connect(srv.addr).unwrap();
    c.send(&[0, 0]).unwrap();
    c.shutdown_write().unwrap();
    assert!(c.expect_closed());
    good.check();
}

#[test]
fn hostile_requests_get_exact_errors() {
    let srv = start();
    let mut good = Good::new(&srv);
    let (mut c, info) = TestClient::open(srv.addr, "vol0").unwrap();
    let size = info.size;
    let mut check = |c: &mut TestClient, typ, flags, off, len: u32, want: u32, what: &str| {
        assert_eq!(c.cmd(typ, flags, off, len.into()).unwrap(), want, "{what}");
        good.check();
    };
    check(
        &mut c,
        CMD_READ,
        0,
        size - 10,
        11,
        EINVAL,
        "read beyond end",
    );
    check(&mut c, CMD_READ, 0, size + 4096, 1, EINVAL, "read past end");
    check(
        &mut c,
        CMD_READ,
        0,
        u64::MAX - 10,
        4096,
        EINVAL,
        "offset+len overflow",
    );
    check(&mut c, CMD_TRIM, 0, size, 1, EINVAL, "trim beyond end");
    check(
        &mut c,
        CMD_WRITE_ZEROES,
        0,
        size - 1,
        2,
        ENOSPC,
        "zero beyond end",
    );
    check(
        &mut c,
        CMD_READ,
        0,
        0,
        MAX_PAYLOAD + 1,
        EINVAL,
        "oversized read",
    );
    check(&mut c, 42, 0, 0, 1, EINVAL, "unknown command");
    check(&mut c, CMD_CACHE, 0, 0, 1, 0, "cache is a hint, accepted");
    check(&mut c, CMD_CACHE, 0, size, 1, EINVAL, "cache beyond end");
    check(
        &mut c,
        CMD_BLOCK_STATUS,
        0,
        0,
        1,
        EINVAL,
        "block status not negotiated",
    );
    check(&mut c, CMD_READ, 1 << 12, 0, 1, EINVAL, "unknown flag");
    check(
        &mut c,
        CMD_READ,
        CMD_FLAG_DF,
        0,
        1,
        EINVAL,
        "DF without structured replies",
    );
    check(
        &mut c,
        CMD_TRIM,
        CMD_FLAG_NO_HOLE,
        0,
        1,
        EINVAL,
        "NO_HOLE on trim",
    );
    check(
        &mut c,
        CMD_WRITE_ZEROES,
        CMD_FLAG_FAST_ZERO,
        0,
        1,
        ENOTSUP,
        "fast zero",
    );
    check(
        &mut c,
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        0,
        512,
        0,
        "zero+no_hole+fua",
    );
    check(&mut c, CMD_TRIM, CMD_FLAG_FUA, 0, 512, 0, "trim+fua");
    check(&mut c, CMD_FLUSH, 0, 0, 0, 0, "flush");
    // Zero-length requests inside the export: successful no-ops, no data.
    check(&mut c, CMD_READ, 0, size, 0, 0, "zero-length read at end");
    check(&mut c, CMD_TRIM, 0, 0, 0, 0, "zero-length trim");
    check(
        &mut c,
        CMD_READ,
        0,
        size + 1,
        0,
        EINVAL,
        "zero-length read past end",
    );
    assert_eq!(c.write(size, &[], 0).unwrap(), 0, "zero-length write");
    // Writes with payload beyond the end: ENOSPC and payload consumed.
    assert_eq!(c.write(size - 100, &[1; 200], 0).unwrap(), ENOSPC);
    assert_eq!(
        c.write(0, &[9; 16], 1 << 9).unwrap(),
        EINVAL,
        "write bad flag"
    );
    // Still in sync after all that.
    assert_eq!(c.write(4096, &[7; 512], CMD_FLAG_FUA).unwrap(), 0);
    assert_eq!(c.read(4096, 512).unwrap(), Ok(vec![7; 512]));
    // Oversized write: can't resync, server hangs up.
    let h = c.alloc_handle();
    c.send_request(CMD_WRITE, 0, h, 0, u64::from(MAX_PAYLOAD) + 1, &[])
        .unwrap();
    assert!(c.expect_closed());
    good.check();
    // Bad request magic: hang up.
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    let mut hdr = proto::encode_request(&Request {
        flags: 0,
        typ: CMD_READ,
        handle: 1,
        offset: 0,
        len: 1,
    });
    hdr[0] = 0;
    c.send(&hdr).unwrap();
    assert!(c.expect_closed());
    good.check();
}

#[test]
fn read_only_export_rejects_writes() {
    let srv = start();
    let mut good = Good::new(&srv);
    let (mut c, info) = TestClient::open(srv.addr, "ro").unwrap();
    assert_ne!(info.tflags & TFLAG_READ_ONLY, 0);
    assert_eq!(c.write(0, &[1; 4096], 0).unwrap(), EPERM);
    // Payload was consumed: the next request parses fine.
    assert_eq!(c.read(0, 4096).unwrap(), Ok(vec![0; 4096]));
    assert_eq!(c.cmd(CMD_TRIM, 0, 0, 4096).unwrap(), EPERM);
    assert_eq!(c.cmd(CMD_WRITE_ZEROES, 0, 0, 4096).unwrap(), EPERM);
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect().unwrap();
    good.check();
}

#[test]
fn truncated_frames_and_vanishing_clients() {
    init_tracing();
    // Slow export so requests are genuinely in flight when clients vanish.
    let srv = TestServer::start(registry(Duration::from_millis(30)), cfg());
    let mut good = Good::new(&srv);
    // Truncated request header then close.
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    c.send(
        &proto::encode_request(&Request {
            flags: 0,
            typ: CMD_READ,
            handle: 1,
            offset: 0,
            len: 512,
        })[..10],
    )
    .unwrap();
    c.shutdown_write().unwrap();
    assert!(c.expect_closed());
    good.check();
    // Truncated write payload then close.
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    c.send_request(CMD_WRITE, 0, 1, 0, 65536, &[5; 1000])
        .unwrap();
    c.shutdown_write().unwrap();
    assert!(c.expect_closed());
    good.check();
    // Requests in flight, then the client disappears without reading.
    for _ in 0..3 {
        let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
        for h in 0..40u64 {
            c.send_request(CMD_WRITE, 0, h, h * 4096, 4096, &[3; 4096])
                .unwrap();
            c.send_request(CMD_READ, 0, 1000 + h, h * 4096, 4096, &[])
                .unwrap();
        }
        drop(c);
        good.check();
    }
    // Requests in flight, half-close: all replies still arrive, then EOF.
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    for h in 0..8u64 {
        c.send_request(CMD_WRITE, 0, h, h * 512, 512, &[h as u8; 512])
            .unwrap();
    }
    c.shutdown_write().unwrap();
    let mut seen: Vec<u64> = (0..8)
        .map(|_| c.read_reply().unwrap())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(c.expect_closed());
    good.check();
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let srv = start();
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    // 100 pipelined writes (more than max_inflight) then reads of them.
    let n = 100u64;
    for h in 0..n {
        c.send_request(CMD_WRITE, 0, h, h * 8192, 8192, &[h as u8; 8192])
            .unwrap();
    }
    let mut got = vec![false; n as usize];
    for _ in 0..n {
        let (e, h) = c.read_reply().unwrap();
        assert_eq!(e, 0);
        assert!(
            !std::mem::replace(&mut got[h as usize], true),
            "duplicate reply {h}"
        );
    }
    for h in 0..n {
        c.send_request(CMD_READ, 0, h, h * 8192, 8192, &[]).unwrap();
    }
    for _ in 0..n {
        let (e, h) = c.read_reply().unwrap();
        assert_eq!(e, 0);
        assert_eq!(
            c.recv(8192).unwrap(),
            vec![h as u8; 8192],
            "data for handle {h}"
        );
    }
    // A maximal payload round-trips.
    let big: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(1 << 20, &big, 0).unwrap(), 0);
    assert_eq!(c.read(1 << 20, MAX_PAYLOAD).unwrap(), Ok(big));
    c.disconnect().unwrap();
}

#[test]
fn multi_connection_write_flush_read() {
    let srv = start();
    let (mut a, ia) = TestClient::open(srv.addr, "vol0").unwrap();
    let (mut b, ib) = TestClient::open(srv.addr, "vol0").unwrap();
    assert_ne!(ia.tflags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(ia, ib);
    let ta = std::thread::spawn(move || {
        for i in 0..64u64 {
            assert_eq!(a.write(i * 4096, &[0xaa; 4096], 0).unwrap(), 0);
        }
        a
    });
    let tb = std::thread::spawn(move || {
        for i in 0..64u64 {
            assert_eq!(b.write((1 << 20) + i * 4096, &[0xbb; 4096], 0).unwrap(), 0);
        }
        b
    });
    let mut a = ta.join().unwrap();
    let mut b = tb.join().unwrap();
    assert_eq!(a.flush().unwrap(), 0);
    for c in [&mut a, &mut b] {
        assert_eq!(c.read(0, 64 * 4096).unwrap(), Ok(vec![0xaa; 64 * 4096]));
        assert_eq!(
            c.read(1 << 20, 64 * 4096).unwrap(),
            Ok(vec![0xbb; 64 * 4096])
        );
    }
    a.disconnect().unwrap();
    b.disconnect().unwrap();
}

#[test]
fn graceful_shutdown_finishes_in_flight() {
    init_tracing();
    let srv = TestServer::start(registry(Duration::from_millis(300)), cfg());
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    // An idle connection must not hold up shutdown.
    let (mut idle, _) = TestClient::open(srv.addr, "vol1").unwrap();
    // One still in option haggling, too.
    let mut haggling = TestClient::start(srv.addr).unwrap();
    for h in 0..4u64 {
        c.send_request(CMD_WRITE, 0, h, h * 4096, 4096, &[1; 4096])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let addr = srv.addr;
    let t = std::thread::spawn(move || srv.shutdown());
    for _ in 0..4 {
        let (e, _) = c.read_reply().unwrap();
        assert_eq!(e, 0, "in-flight request must complete during shutdown");
    }
    assert!(c.expect_closed());
    assert!(idle.expect_closed());
    assert!(haggling.expect_closed());
    let (res, took) = t.join().unwrap();
    res.unwrap();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    // Listener is gone.
    assert!(TestClient::connect(addr).is_err());
}

fn fuzz_server() -> &'static TestServer {
    static SRV: OnceLock<TestServer> = OnceLock::new();
    SRV.get_or_init(|| {
        init_tracing();
        TestServer::start(registry(Duration::ZERO), cfg())
    })
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Bytes that start like a request header more often than chance would,
    /// so the fuzzer reaches validation and payload handling.
    fn request_ish() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            (
                any::<u16>(),
                0u16..10,
                any::<u64>(),
                0u32..70_000,
                proptest::collection::vec(any::<u8>(), 0..128)
            )
                .prop_map(|(flags, typ, offset, len, tail)| {
                    let mut v = proto::encode_request(&Request {
                        flags: flags & 0x1f,
                        typ,
                        handle: 9,
                        offset: offset % (VOL0_SIZE as u64 + 4096),
                        len: len.into(),
                    })
                    .to_vec();
                    v.extend(tail);
                    v
                }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_break_the_server(
            pre in proptest::collection::vec(request_ish(), 1..4),
            in_handshake in any::<bool>(),
        ) {
            let srv = fuzz_server();
            let mut c = if in_handshake {
                TestClient::start(srv.addr).unwrap()
            } else {
                TestClient::open(srv.addr, "vol0").unwrap().0
            };
            for chunk in &pre {
                // The server may hang up mid-way; that is a valid outcome.
                if c.send(chunk).is_err() {
                    break;
                }
            }
            let _ = c.shutdown_write();
            prop_assert!(c.expect_closed(), "server neither replied to completion nor closed");
            // The server still serves a fresh client correctly.
            let (mut g, _) = TestClient::open(srv.addr, "vol1").unwrap();
            prop_assert_eq!(g.write(0, &[0x5a; 512], 0).unwrap(), 0);
            prop_assert_eq!(g.read(0, 512).unwrap(), Ok(vec![0x5a; 512]));
            g.disconnect().unwrap();
        }
    }
}
