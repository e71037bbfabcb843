//! The NBD handshake: the input is everything a client sends after the greeting
//! (client flags, options, then transmission requests). It goes to the real server
//! (`ferry_nbd::serve` over loopback TCP with in-memory exports, started once per
//! process) and the server must answer and close the connection once the client
//! has finished sending, never hang or panic. The pure option decoders run on the
//! same bytes, with round trips where the encoding is canonical.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_nbd::proto::{self, InfoRequest, GREETING_LEN, IHAVEOPT, OPT_HEADER_LEN};
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
        assert_eq!(encode_info_request(&req), data, "INFO/GO payload round trip");
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

/// One connection: read the greeting, send the input while draining the server's
/// replies (so reply backpressure cannot deadlock us), half-close, read to EOF.
fn converse(addr: SocketAddr, data: &[u8]) {
    let mut sock = TcpStream::connect(addr).expect("connect to the fuzz server");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut greeting = [0u8; GREETING_LEN];
    sock.read_exact(&mut greeting).expect("greeting");
    assert_eq!(greeting, proto::encode_greeting());
    let mut wr = sock.try_clone().expect("clone socket");
    std::thread::scope(|s| {
        s.spawn(move || {
            // The server may hang up early (bad option): a failed write is expected.
            let _ = wr.write_all(data);
            let _ = wr.shutdown(Shutdown::Write);
        });
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match sock.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("server did not close the connection: {e}"),
            }
        }
    });
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
