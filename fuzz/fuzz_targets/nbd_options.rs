//! The NBD handshake: the input is everything a client sends after the greeting
//! (client flags, options, then transmission requests). It goes to the real server
//! (`ferry_nbd::serve` over loopback TCP with in-memory exports, started once per
//! process) and the server must answer and close the connection once the client
//! has finished sending, never hang or panic. The pure option decoders (INFO/GO,
//! META_CONTEXT) run on the same bytes, with round trips where the encoding is canonical.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_nbd::proto::{self, InfoRequest, MetaRequest, GREETING_LEN, IHAVEOPT, OPT_HEADER_LEN};
use ferry_nbd::{ExportFlags, MapRegistry, MemExport, ServerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    decoders(data);
    converse(server(), data);
});

/// The option header and GO/INFO payload decoders on raw bytes.
fn decoders(data: &[u8]) {
    if let Some(h) = data.get(..OPT_HEADER_LEN) {
        let h: [u8; OPT_HEADER_LEN] = h.try_into().expect("16 bytes");
        if let Ok(oh) = proto::decode_opt_header(&h) {
            let mut again = IHAVEOPT.to_be_bytes().to_vec();
            again.extend_from_slice(&oh.option.to_be_bytes());
            again.extend_from_slice(&oh.len.to_be_bytes());
            assert_eq!(again, h, "option header round trip");
        }
    }
    if let Ok(req) = proto::decode_info_request(data) {
        assert_eq!(
            encode_info_request(&req),
            data,
            "INFO/GO payload round trip"
        );
    }
    if let Ok(req) = proto::decode_meta_request(data) {
        assert_eq!(
            encode_meta_request(&req),
            data,
            "META_CONTEXT payload round trip"
        );
    }
    if let Some(f) = data.get(..4) {
        let _ = proto::decode_client_flags(f.try_into().expect("4 bytes"));
    }
}

/// The GO/INFO payload layout `decode_info_request` parses (the crate has no encoder:
/// only clients send it).
fn encode_info_request(r: &InfoRequest) -> Vec<u8> {
    let mut v = (r.name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(r.name.as_bytes());
    v.extend_from_slice(&(r.infos.len() as u16).to_be_bytes());
    for i in &r.infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The LIST/SET_META_CONTEXT payload layout `decode_meta_request` parses.
fn encode_meta_request(r: &MetaRequest) -> Vec<u8> {
    let mut v = (r.name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(r.name.as_bytes());
    v.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
    for q in &r.queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// One connection: read the greeting, send the input while draining the server's
/// replies (so reply backpressure cannot deadlock us), half-close, read to EOF.
/// Single-threaded, non-blocking: a helper thread per input would make LeakSanitizer
/// report the thread's own bookkeeping as a leak when it outlives the input.
fn converse(addr: SocketAddr, data: &[u8]) {
    let mut sock = TcpStream::connect(addr).expect("connect to the fuzz server");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut greeting = [0u8; GREETING_LEN];
    sock.read_exact(&mut greeting).expect("greeting");
    assert_eq!(greeting, proto::encode_greeting());
    sock.set_nonblocking(true).expect("non-blocking");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 64 << 10];
    let (mut sent, mut writing) = (0usize, true);
    loop {
        let mut progress = false;
        if writing {
            match sock.write(&data[sent..]) {
                Ok(n) => {
                    sent += n;
                    progress = n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // The server hung up early (bad option): expected, keep reading.
                Err(_) => writing = false,
            }
            if sent == data.len() {
                let _ = sock.shutdown(Shutdown::Write);
                writing = false;
            }
        }
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => progress = true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("reading from the server: {e}"),
        }
        if !progress {
            assert!(
                Instant::now() < deadline,
                "server did not close the connection"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// The server, started on first use: two in-memory exports (one read-only), a small
/// payload limit so size checks are reachable.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind loopback");
                tx.send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                let ro = ExportFlags {
                    read_only: true,
                    can_trim: false,
                    can_write_zeroes: false,
                    can_multi_conn: true,
                    send_fua: false,
                    send_flush: true,
                };
                let registry = MapRegistry::new(vec![
                    Arc::new(MemExport::new("disk", 1 << 20)),
                    Arc::new(MemExport::new("ro", 64 << 10).with_flags(ro)),
                ]);
                let cfg = ServerConfig {
                    max_payload: 64 << 10,
                    max_inflight_per_conn: 8,
                    shutdown_grace: Duration::from_secs(1),
                    ..ServerConfig::default()
                };
                // Never signalled: the server lives as long as the fuzz process.
                let (_keep, shutdown) = tokio::sync::watch::channel(false);
                ferry_nbd::serve(listener, Arc::new(registry), cfg, shutdown)
                    .await
                    .expect("serve");
            });
        });
        rx.recv().expect("server address")
    })
}
