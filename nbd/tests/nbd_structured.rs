//! Protocol tests for the NBD extensions with the in-project raw client:
//! structured replies (sparse reads, error chunks, DF), metadata contexts
//! and block status, extended headers (64-bit lengths, extended chunks),
//! CACHE, FAST_ZERO, and the refused-request counter. The new reply shapes
//! are checked byte for byte against the spec's layouts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_nbd::mem::ALL_FLAGS;
use ferry_nbd::proto::*;
use ferry_nbd::testclient::{parse_status, Chunk, Msg, TestClient, TestServer};
use ferry_nbd::{
    Export, ExportError, ExportFlags, MapRegistry, MemExport, ServerConfig, ServerStats,
};

const SIZE: usize = 4 << 20;
const K: u64 = 1024;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// vol0: hole except 4 KiB of 0xaa at 64 KiB (fast zeroing);
/// slow: same size, zeroing not fast.
fn start() -> (TestServer, Arc<MemExport>, Arc<ServerStats>) {
    init_tracing();
    let vol = Arc::new(MemExport::new("vol0", SIZE).with_fast_zero(true));
    vol.fill(64 << 10, &[0xaa; 4096]);
    let slow = Arc::new(MemExport::new("slow", SIZE));
    let cfg = ServerConfig {
        max_payload: 1 << 20,
        ..ServerConfig::default()
    };
    let stats = cfg.stats.clone();
    let reg = Arc::new(MapRegistry::new(vec![vol.clone(), slow]));
    (TestServer::start(reg, cfg), vol, stats)
}

fn be16(v: u16) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// Expected bytes of a structured (20-byte) chunk header.
fn sr_head(flags: u16, typ: u16, handle: u64, len: u32) -> Vec<u8> {
    [
        be32(STRUCTURED_REPLY_MAGIC),
        be16(flags),
        be16(typ),
        be64(handle),
        be32(len),
    ]
    .concat()
}

/// Expected bytes of an extended (32-byte) chunk header.
fn ext_head(flags: u16, typ: u16, handle: u64, offset: u64, len: u64) -> Vec<u8> {
    [
        be32(EXTENDED_REPLY_MAGIC),
        be16(flags),
        be16(typ),
        be64(handle),
        be64(offset),
        be64(len),
    ]
    .concat()
}

/// Client in structured mode with base:allocation selected on `export`.
fn structured(srv: &TestServer, export: &str) -> TestClient {
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.structured_reply().unwrap(), REP_ACK);
    let sel = c
        .meta_context(OPT_SET_META_CONTEXT, export, &[BASE_ALLOCATION])
        .unwrap();
    assert_eq!(sel, Ok(vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.into())]));
    let info = c.go(export).unwrap().unwrap();
    assert_ne!(info.tflags & TFLAG_SEND_DF, 0);
    c
}

#[test]
fn negotiation_of_structured_replies_and_meta_contexts() {
    let (srv, _, _) = start();
    let mut c = TestClient::start(srv.addr).unwrap();
    // Meta contexts need structured replies first.
    let r = c.meta_context(OPT_LIST_META_CONTEXT, "vol0", &[]).unwrap();
    assert_eq!(r, Err(REP_ERR_INVALID));
    // DF is not advertised in simple mode.
    let info = c.info("vol0").unwrap().unwrap();
    assert_eq!(info.tflags & TFLAG_SEND_DF, 0);
    c.send_option(OPT_STRUCTURED_REPLY, b"x").unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    assert_eq!(c.structured_reply().unwrap(), REP_ACK);
    assert_eq!(c.structured_reply().unwrap(), REP_ERR_INVALID, "twice");
    let base = vec![(0, BASE_ALLOCATION.to_string())];
    let list = |c: &mut TestClient, q: &[&str]| c.meta_context(OPT_LIST_META_CONTEXT, "vol0", q);
    assert_eq!(
        list(&mut c, &[]).unwrap(),
        Ok(base.clone()),
        "no query: all"
    );
    assert_eq!(
        list(&mut c, &["base:"]).unwrap(),
        Ok(base.clone()),
        "namespace"
    );
    assert_eq!(list(&mut c, &["base:allocation"]).unwrap(), Ok(base));
    assert_eq!(
        list(&mut c, &["x-other:thing"]).unwrap(),
        Ok(vec![]),
        "unknown ignored"
    );
    let r = c.meta_context(OPT_LIST_META_CONTEXT, "nope", &[]).unwrap();
    assert_eq!(r, Err(REP_ERR_UNKNOWN));
    // SET ignores unknown queries and the bare namespace.
    let r = c
        .meta_context(OPT_SET_META_CONTEXT, "vol0", &["base:", "x-a:b"])
        .unwrap();
    assert_eq!(r, Ok(vec![]));
    // Malformed: query count larger than the payload.
    let mut bad = [be32(4), b"vol0".to_vec(), be32(3)].concat();
    bad.extend_from_slice(&be32(1));
    c.send_option(OPT_SET_META_CONTEXT, &bad).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().typ, REP_ERR_INVALID);
    // Context selected for vol0, then GO to "slow": no block status there.
    let r = c
        .meta_context(OPT_SET_META_CONTEXT, "vol0", &[BASE_ALLOCATION])
        .unwrap();
    assert_eq!(r.unwrap().len(), 1);
    c.go("slow").unwrap().unwrap();
    assert_eq!(c.block_status(0, 4096, 0).unwrap(), Err(EINVAL));
    assert_eq!(c.write(0, &[1; 512], 0).unwrap(), 0);
    c.disconnect().unwrap();
}

#[test]
fn structured_reads_golden_bytes() {
    let (srv, vol, _) = start();
    let mut c = structured(&srv, "vol0");
    // Small read: one OFFSET_DATA chunk carrying DONE.
    c.send_request(CMD_READ, 0, 7, 64 * K, 4096, &[]).unwrap();
    let got = c.recv(20 + 8 + 4096).unwrap();
    let want = [
        sr_head(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 4104),
        be64(64 * K),
        vec![0xaa; 4096],
    ]
    .concat();
    assert_eq!(got, want);
    // Large read over hole/data/hole: the holes are OFFSET_HOLE chunks.
    let before = vol.bytes_read();
    c.send_request(CMD_READ, 0, 8, 0, 128 * K, &[]).unwrap();
    let hole1 = [
        sr_head(0, REPLY_TYPE_OFFSET_HOLE, 8, 12),
        be64(0),
        be32(64 << 10),
    ]
    .concat();
    assert_eq!(c.recv(hole1.len()).unwrap(), hole1);
    let data = [
        sr_head(0, REPLY_TYPE_OFFSET_DATA, 8, 4104),
        be64(64 * K),
        vec![0xaa; 4096],
    ]
    .concat();
    assert_eq!(c.recv(data.len()).unwrap(), data);
    let hole2 = [
        sr_head(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 8, 12),
        be64(68 * K),
        be32(60 << 10),
    ]
    .concat();
    assert_eq!(c.recv(hole2.len()).unwrap(), hole2);
    assert_eq!(vol.bytes_read() - before, 4096, "only the data was read");
    // DF: one data chunk with the zeroes present.
    let h = c.alloc_handle();
    c.send_request(CMD_READ, CMD_FLAG_DF, h, 0, 128 * K, &[])
        .unwrap();
    let chunks = c.read_chunks(h).unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].typ, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(chunks[0].payload.len(), 8 + (128 << 10));
    // The reassembling reader agrees with the export.
    let r = c.read(60 * K, 8192).unwrap().unwrap();
    assert_eq!(r, vol.snapshot(60 << 10, 8192));
    // A refused read: an ERROR chunk (never a simple reply for READ).
    c.send_request(CMD_READ, 0, 9, SIZE as u64, 1, &[]).unwrap();
    let Msg::Chunk(e) = c.read_msg().unwrap() else {
        panic!("simple reply to a READ in structured mode")
    };
    assert_eq!(
        (e.flags, e.typ, e.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9)
    );
    assert_eq!(e.payload[..4], be32(EINVAL)[..]);
    let mlen = u16::from_be_bytes([e.payload[4], e.payload[5]]) as usize;
    assert!(mlen > 0 && e.payload.len() == 6 + mlen, "{e:?}");
    // Zero-length read: a NONE chunk.
    c.send_request(CMD_READ, 0, 10, 0, 0u64, &[]).unwrap();
    assert_eq!(
        c.recv(20).unwrap(),
        sr_head(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 10, 0)
    );
    // Writes succeed with simple replies (allowed), errors as chunks.
    c.send_request(CMD_WRITE, 0, 11, 0, 512u64, &[3; 512])
        .unwrap();
    assert_eq!(
        c.read_msg().unwrap(),
        Msg::Simple {
            error: 0,
            handle: 11
        }
    );
    c.send_request(CMD_TRIM, CMD_FLAG_DF, 12, 0, 512u64, &[])
        .unwrap();
    let Msg::Chunk(e) = c.read_msg().unwrap() else {
        panic!("expected an error chunk")
    };
    assert_eq!(e.error(), Some(EINVAL), "DF on TRIM");
    c.disconnect().unwrap();
}

#[test]
fn block_status_base_allocation() {
    let (srv, vol, _) = start();
    let mut c = structured(&srv, "vol0");
    let hz = STATE_HOLE | STATE_ZERO;
    // Golden bytes of a compact status chunk.
    c.send_request(CMD_BLOCK_STATUS, 0, 5, 0, 128 * K, &[])
        .unwrap();
    let want = [
        sr_head(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5, 4 + 3 * 8),
        be32(BASE_ALLOCATION_ID),
        be32(64 << 10),
        be32(hz),
        be32(4096),
        be32(0),
        be32(60 << 10),
        be32(hz),
    ]
    .concat();
    assert_eq!(c.recv(want.len()).unwrap(), want);
    // REQ_ONE: one extent, within the request.
    let one = c.block_status(0, 128 * K, CMD_FLAG_REQ_ONE).unwrap();
    assert_eq!(one, Ok((BASE_ALLOCATION_ID, vec![(64 * K, hz)])));
    // Allocated zeroes (NO_HOLE) are ZERO only; a trim makes a hole; a
    // write in the middle of a hole is data.
    assert_eq!(
        c.cmd(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 64 * K, 4096)
            .unwrap(),
        0
    );
    assert_eq!(c.write(256 * K, &[1; 8192], 0).unwrap(), 0);
    let st = c.block_status(0, 512 * K, 0).unwrap().unwrap().1;
    let want = vec![
        (64 * K, hz),
        (4 * K, STATE_ZERO),
        (188 * K, hz),
        (8 * K, 0),
        (248 * K, hz),
    ];
    assert_eq!(st, want);
    assert_eq!(c.cmd(CMD_TRIM, 0, 256 * K, 8192).unwrap(), 0);
    let st = c.block_status(192 * K, 128 * K, 0).unwrap().unwrap().1;
    assert_eq!(st, vec![(128 * K, hz)]);
    // Invalid: zero length, beyond the end, unknown flag.
    assert_eq!(c.block_status(0, 0, 0).unwrap(), Err(EINVAL));
    assert_eq!(c.block_status(SIZE as u64, 1, 0).unwrap(), Err(EINVAL));
    assert_eq!(c.block_status(0, 1, CMD_FLAG_DF).unwrap(), Err(EINVAL));
    assert_eq!(vol.snapshot(256 << 10, 8192), vec![0; 8192]);
    c.disconnect().unwrap();
    // Without SET_META_CONTEXT: EINVAL.
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.structured_reply().unwrap(), REP_ACK);
    c.go("vol0").unwrap().unwrap();
    assert_eq!(c.block_status(0, 4096, 0).unwrap(), Err(EINVAL));
    c.disconnect().unwrap();
}

#[test]
fn extended_headers_golden_bytes() {
    let (srv, _, stats) = start();
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.extended_headers().unwrap(), REP_ACK);
    assert_eq!(c.structured_reply().unwrap(), REP_ERR_EXT_HEADER_REQD);
    let sel = c
        .meta_context(OPT_SET_META_CONTEXT, "vol0", &[BASE_ALLOCATION])
        .unwrap();
    assert_eq!(sel.unwrap().len(), 1);
    c.go("vol0").unwrap().unwrap();
    // A write (with PAYLOAD_LEN): NONE chunk echoing the request offset.
    let flags = CMD_FLAG_PAYLOAD_LEN;
    c.send_request(CMD_WRITE, flags, 21, 8192, 512u64, &[5; 512])
        .unwrap();
    assert_eq!(
        c.recv(32).unwrap(),
        ext_head(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 21, 8192, 0)
    );
    // qemu's client omits PAYLOAD_LEN on writes; accepted the same way.
    c.send_request(CMD_WRITE, 0, 22, 0, 512u64, &[6; 512])
        .unwrap();
    assert_eq!(
        c.recv(32).unwrap(),
        ext_head(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 22, 0, 0)
    );
    // A small read: extended OFFSET_DATA.
    c.send_request(CMD_READ, 0, 23, 8192, 512u64, &[]).unwrap();
    let want = [
        ext_head(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 23, 8192, 520),
        be64(8192),
        vec![5; 512],
    ]
    .concat();
    assert_eq!(c.recv(want.len()).unwrap(), want);
    // Block status: the 64-bit variant.
    c.send_request(CMD_BLOCK_STATUS, 0, 24, 0, 128 * K, &[])
        .unwrap();
    let hz = u64::from(STATE_HOLE | STATE_ZERO);
    let want = [
        ext_head(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            24,
            0,
            8 + 6 * 16,
        ),
        be32(BASE_ALLOCATION_ID),
        be32(6),
        be64(4096),
        be64(0),
        be64(4096),
        be64(hz),
        be64(4096),
        be64(0),
        be64(52 << 10),
        be64(hz),
        be64(4096),
        be64(0),
        be64(60 << 10),
        be64(hz),
    ]
    .concat();
    assert_eq!(c.recv(want.len()).unwrap(), want);
    // A refused command: extended ERROR chunk.
    c.send_request(CMD_FLUSH, CMD_FLAG_DF, 25, 0, 0u64, &[])
        .unwrap();
    let Msg::Chunk(e) = c.read_msg().unwrap() else {
        panic!("simple reply under extended headers")
    };
    assert_eq!(
        (e.typ, e.req_offset, e.error()),
        (REPLY_TYPE_ERROR, Some(0), Some(EINVAL))
    );
    // PAYLOAD_LEN on a READ: payload skipped, EINVAL, still in sync.
    c.send_request(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 26, 0, 100u64, &[9; 100])
        .unwrap();
    let chunks = c.read_chunks(26).unwrap();
    assert_eq!(chunks.last().and_then(Chunk::error), Some(EINVAL));
    assert_eq!(c.read(0, 512).unwrap(), Ok(vec![6; 512]));
    assert!(stats.snapshot().extended_sessions_total >= 1);
    // A payload above the maximum cannot be skipped: hang up.
    c.send_request(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 27, 0, 2 << 20, &[])
        .unwrap();
    assert!(c.expect_closed());
}

/// An 8 GiB export that is one hole and records the calls it gets, to
/// show 64-bit effect lengths reach it in pieces and the default
/// `Export::extents` answers one data extent.
struct Big {
    trims: AtomicU64,
    trimmed: AtomicU64,
}

const BIG: u64 = 8 << 30;

impl Export for Big {
    fn name(&self) -> &str {
        "big"
    }
    fn size(&self) -> u64 {
        BIG
    }
    fn flags(&self) -> ExportFlags {
        ALL_FLAGS
    }
    async fn read(&self, _: u64, len: u32) -> Result<Bytes, ExportError> {
        Ok(Bytes::from(vec![0; len as usize]))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), ExportError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }
    async fn trim(&self, _: u64, len: u32) -> Result<(), ExportError> {
        self.trims.fetch_add(1, Ordering::Relaxed);
        self.trimmed.fetch_add(len.into(), Ordering::Relaxed);
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> Result<(), ExportError> {
        Err(ExportError::Io("not expected".into()))
    }
}

#[test]
fn extended_headers_64_bit_lengths() {
    init_tracing();
    let big = Arc::new(Big {
        trims: AtomicU64::new(0),
        trimmed: AtomicU64::new(0),
    });
    let srv = TestServer::start(
        Arc::new(MapRegistry::new(vec![big.clone()])),
        ServerConfig::default(),
    );
    let mut c = TestClient::start(srv.addr).unwrap();
    assert_eq!(c.extended_headers().unwrap(), REP_ACK);
    let sel = c.meta_context(OPT_SET_META_CONTEXT, "big", &[BASE_ALLOCATION]);
    assert_eq!(sel.unwrap().unwrap().len(), 1);
    let info = c.go("big").unwrap().unwrap();
    assert_eq!(
        info.block_size,
        Some((1, 4096, 64 << 20)),
        "64 MiB max payload"
    );
    // A 6 GiB trim (beyond any 32-bit length) reaches the export in pieces.
    assert_eq!(c.cmd(CMD_TRIM, 0, 1 << 30, 6 << 30).unwrap(), 0);
    assert_eq!(big.trimmed.load(Ordering::Relaxed), 6 << 30);
    assert_eq!(big.trims.load(Ordering::Relaxed), 6);
    // Block status over 7 GiB: one 64-bit data extent (the default).
    let st = c.block_status(1 << 30, 7 << 30, 0).unwrap();
    assert_eq!(st, Ok((BASE_ALLOCATION_ID, vec![(7 << 30, 0)])));
    // A 64 MiB read (the new maximum) works; one byte more does not.
    let r = c.read(0, 64 << 20).unwrap().unwrap();
    assert_eq!(r.len(), 64 << 20);
    assert_eq!(c.cmd(CMD_READ, 0, 0, (64 << 20) + 1).unwrap(), EINVAL);
    // 64-bit overflow of offset + length.
    assert_eq!(c.cmd(CMD_TRIM, 0, 1, u64::MAX).unwrap(), EINVAL);
    c.disconnect().unwrap();
}

#[test]
fn cache_fast_zero_and_refusal_counter() {
    let (srv, vol, stats) = start();
    let (mut c, info) = TestClient::open(srv.addr, "vol0").unwrap();
    assert_ne!(info.tflags & TFLAG_SEND_CACHE, 0);
    assert_ne!(info.tflags & TFLAG_SEND_FAST_ZERO, 0);
    assert_eq!(c.cmd(CMD_CACHE, 0, 0, SIZE as u64).unwrap(), 0);
    assert_eq!(c.write(0, &[9; 8192], 0).unwrap(), 0);
    // Fast export: FAST_ZERO proceeds.
    assert_eq!(
        c.cmd(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 8192)
            .unwrap(),
        0
    );
    assert_eq!(vol.snapshot(0, 8192), vec![0; 8192]);
    c.disconnect().unwrap();
    // Slow export: ENOTSUP at once, contents untouched.
    let (mut c, _) = TestClient::open(srv.addr, "slow").unwrap();
    assert_eq!(c.write(0, &[9; 4096], 0).unwrap(), 0);
    let before = stats.snapshot().refused_requests_total;
    assert_eq!(
        c.cmd(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096)
            .unwrap(),
        ENOTSUP
    );
    assert_eq!(c.read(0, 4096).unwrap(), Ok(vec![9; 4096]));
    // A burst of invalid requests: all answered, all counted (logging of
    // them is rate-limited; see refusals.rs).
    for _ in 0..50 {
        assert_eq!(c.cmd(99, 0, 0, 0).unwrap(), EINVAL);
    }
    assert_eq!(stats.snapshot().refused_requests_total - before, 51);
    assert!(stats.snapshot().connections_active >= 1);
    c.disconnect().unwrap();
}

#[test]
fn in_flight_bytes_stay_bounded() {
    init_tracing();
    // A slow export and 1 MiB reads: the connection may hold at most twice
    // the max payload, so at most two reads run at once however many the
    // client pipelines.
    let vol = Arc::new(MemExport::new("vol0", 16 << 20).with_delay(Duration::from_millis(50)));
    let cfg = ServerConfig {
        max_payload: 1 << 20,
        ..ServerConfig::default()
    };
    let srv = TestServer::start(Arc::new(MapRegistry::new(vec![vol.clone()])), cfg);
    let (mut c, _) = TestClient::open(srv.addr, "vol0").unwrap();
    let t = std::time::Instant::now();
    for h in 0..8u64 {
        c.send_request(CMD_READ, 0, h, h << 20, 1u64 << 20, &[])
            .unwrap();
    }
    for _ in 0..8 {
        let (e, _) = c.read_reply().unwrap();
        assert_eq!(e, 0);
        c.recv(1 << 20).unwrap();
    }
    // 8 reads, 2 at a time, 50 ms each: at least 4 rounds.
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(vol.bytes_read(), 8 << 20);
    c.disconnect().unwrap();
}

#[test]
fn status_chunk_parser_rejects_garbage() {
    let c = Chunk {
        flags: REPLY_FLAG_DONE,
        typ: REPLY_TYPE_BLOCK_STATUS_EXT,
        handle: 1,
        req_offset: Some(0),
        payload: [be32(1), be32(2), be64(1), be64(0)].concat(),
    };
    assert!(parse_status(&c).is_err(), "count says 2, one descriptor");
}
