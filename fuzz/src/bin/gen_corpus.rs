//! Writes the seed corpora under `<out>/<target>/` (default `corpus`): frames of
//! every type from the real encoder, real NBD client conversations, request
//! headers, and a few mutation lists for the journal and undo targets (whose logs
//! are built by the targets themselves from `ferry_fuzz`'s templates). Seeds are
//! named by content hash, so rerunning it is idempotent.
//!
//! Run from `fuzz/`: `cargo +nightly run --bin gen_corpus -- corpus`.

use std::fs;
use std::path::Path;

use bytes::Bytes;
use ferry_nbd::proto::{self as nbd, Request};
use ferry_proto::wire::{
    self, Ack, DigestRequest, ErrorCode, ErrorFrame, Frame, Handover, HandoverAck, Heartbeat,
    Hello, HelloAck, RecordOp, ResyncBegin, ResyncData, ResyncEnd, ResyncExtent, Role,
    VerifyResult, VolumeGeometry, WireRecord, WriteSet,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let out = Path::new(&out);
    let frames = frames();
    let mut stream = vec![2u8];
    for f in &frames {
        let bytes = wire::encode(f)?;
        let mut seed = vec![0u8];
        seed.extend_from_slice(&bytes);
        save(out, "wire_frame", &seed)?;
        stream.extend_from_slice(&bytes);
        // The session target takes frames inside arbitrary-encoded ops; a raw
        // frame is still a useful start for its byte-level mutations.
        save(out, "session", &bytes)?;
    }
    save(out, "wire_frame", &stream)?;
    for conv in nbd_conversations() {
        save(out, "nbd_options", &conv)?;
    }
    for (i, r) in requests().iter().enumerate() {
        // header (32 bytes), mode, force_magic, size, flags, fast_zero,
        // block_status, max_payload: the target's `Input` in arbitrary's layout.
        let (mode, mut seed) = if i % 3 == 2 {
            (2u8, nbd::encode_extended_request(r).to_vec())
        } else {
            (i as u8 % 2, nbd::encode_request(r).to_vec())
        };
        seed.resize(32, 0);
        seed.extend_from_slice(&[mode, 0]);
        seed.extend_from_slice(&(1u64 << 20).to_le_bytes());
        seed.extend_from_slice(&[if i % 2 == 0 { 0x3e } else { 0x01 }, 1, 1]);
        seed.extend_from_slice(&(64u32 << 10).to_le_bytes());
        save(out, "nbd_request", &seed)?;
    }
    config_seeds(out)?;
    #[cfg(feature = "daemon")]
    daemon_seeds(out)?;
    audit_seeds(out)?;
    for seed in mutation_seeds() {
        save(out, "journal_recovery", &seed)?;
        save(out, "undo_open", &seed)?;
    }
    Ok(())
}

fn save(out: &Path, target: &str, data: &[u8]) -> std::io::Result<()> {
    let dir = out.join(target);
    fs::create_dir_all(&dir)?;
    let name = format!("seed-{:08x}-{}", crc32c::crc32c(data), data.len());
    fs::write(dir.join(name), data)
}

fn frames() -> Vec<Frame> {
    let mut frames = session_frames();
    frames.extend(verify_and_resync_frames());
    frames.extend(packed_frames(&frames));
    frames
}

/// Packed frames (V3) of the data frames among `frames`: raw and zstd, with a
/// zero-filled write among the write-set's records.
fn packed_frames(frames: &[Frame]) -> Vec<Frame> {
    use ferry_proto::packed::Packed;
    let mut out = Vec::new();
    for f in frames {
        let mut f = f.clone();
        if let Frame::WriteSet(ws) = &mut f {
            let last = ws.last_seq + 1;
            ws.records.push(WireRecord {
                seq: last,
                volume: 1,
                op: RecordOp::Write,
                offset: 0,
                length: 8192,
                data: Bytes::from(vec![0u8; 8192]),
            });
            ws.last_seq = last;
        }
        if matches!(f, Frame::WriteSet(_) | Frame::ResyncData(_)) {
            for level in [None, Some(1)] {
                if let Ok(p) = Packed::pack(f.clone(), level) {
                    out.push(Frame::Packed(p));
                }
            }
        }
    }
    out
}

/// One frame of each session kind: handshake, streaming, errors, handover.
fn session_frames() -> Vec<Frame> {
    let rec = |seq, op, data: &'static [u8], length| WireRecord {
        seq,
        volume: 1,
        op,
        offset: seq * 4096,
        length,
        data: Bytes::from_static(data),
    };
    vec![
        Frame::Hello(Hello {
            epoch: 7,
            min_version: 1,
            max_version: 1,
            cluster_id: [1; 16],
            node_id: [2; 16],
            node_name: "sb1".into(),
            role: Role::Standby,
            volumes: vec![VolumeGeometry {
                id: 1,
                name: "db".into(),
                size_bytes: 1 << 20,
                block_size: 4096,
            }],
            resume_position: 42,
        }),
        Frame::HelloAck(HelloAck {
            epoch: 7,
            version: 1,
            resume_seq: 42,
            received_acks: false,
        }),
        Frame::HelloAck(HelloAck {
            epoch: 7,
            version: 4,
            resume_seq: 42,
            received_acks: true,
        }),
        Frame::WriteSet(WriteSet {
            epoch: 7,
            first_seq: 43,
            last_seq: 46,
            timestamp_ns: 1_700_000_000_000_000_000,
            records: vec![
                rec(43, RecordOp::Write, b"hello world, 16b", 16),
                rec(44, RecordOp::Trim, b"", 8192),
                rec(45, RecordOp::WriteZeroes, b"", 4096),
                rec(46, RecordOp::Seal, b"label", 5),
            ],
        }),
        Frame::Ack(Ack {
            epoch: 7,
            received_durable_seq: 46,
            applied_seq: 44,
            received_seq: 46,
        }),
        Frame::Ack(Ack {
            epoch: 7,
            received_durable_seq: 46,
            applied_seq: 44,
            received_seq: 52,
        }),
        Frame::Heartbeat(Heartbeat {
            epoch: 7,
            sent_at_ns: 99,
            echo_ns: 98,
            last_seq: 46,
            sync_loss: None,
        }),
        Frame::Error(ErrorFrame {
            epoch: 7,
            code: ErrorCode::Gap,
            reason: "gap at 47".into(),
        }),
        Frame::Handover(Handover { epoch: 7, seq: 46 }),
        Frame::HandoverAck(HandoverAck {
            epoch: 7,
            seq: 46,
            new_epoch: 8,
        }),
    ]
}

/// One frame of each verify and resync kind.
fn verify_and_resync_frames() -> Vec<Frame> {
    vec![
        Frame::VerifyResult(VerifyResult {
            epoch: 7,
            id: 3,
            volume: 1,
            ok: true,
            body: Bytes::from_static(b"{\"chunks\":4}"),
        }),
        Frame::ResyncBegin(ResyncBegin {
            epoch: 7,
            from_seq: 10,
            snapshot_seq: 46,
            total_bytes: 1 << 20,
            region_size: 65536,
            primary_time_ns: None,
        }),
        Frame::ResyncData(ResyncData {
            epoch: 7,
            extents: vec![
                ResyncExtent {
                    volume: 1,
                    offset: 0,
                    length: 4,
                    data: Some(Bytes::from_static(b"abcd")),
                },
                ResyncExtent {
                    volume: 1,
                    offset: 65536,
                    length: 65536,
                    data: None,
                },
            ],
        }),
        Frame::ResyncEnd(ResyncEnd {
            epoch: 7,
            through_seq: 46,
            bytes: 65540,
            data_bytes: 4,
            primary_time_ns: None,
        }),
        Frame::DigestRequest(DigestRequest {
            epoch: 7,
            id: 3,
            chunk_size: 1 << 20,
            seed: 5,
            algo: 1,
        }),
    ]
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = nbd::IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn req(typ: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        typ,
        handle: u64::from(typ) << 8 | offset,
        offset,
        len: u64::from(len),
    }
}

fn requests() -> Vec<Request> {
    vec![
        req(nbd::CMD_READ, 0, 0, 4096),
        req(nbd::CMD_WRITE, nbd::CMD_FLAG_FUA, 4096, 8),
        req(nbd::CMD_FLUSH, 0, 0, 0),
        req(nbd::CMD_TRIM, 0, 8192, 4096),
        req(nbd::CMD_WRITE_ZEROES, nbd::CMD_FLAG_NO_HOLE, 0, 512),
        req(nbd::CMD_READ, 0, (1 << 20) - 1, 2),
        req(nbd::CMD_DISC, 0, 0, 0),
    ]
}

/// Client byte streams after the greeting.
fn nbd_conversations() -> Vec<Vec<u8>> {
    let flags = (nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let transmission = || {
        let mut v = Vec::new();
        for r in requests() {
            v.extend_from_slice(&nbd::encode_request(&r));
            if r.typ == nbd::CMD_WRITE {
                v.extend_from_slice(&[0xab; 8]);
            }
        }
        v
    };
    let mut go = flags.clone();
    go.extend(opt(nbd::OPT_LIST, &[]));
    go.extend(opt(
        nbd::OPT_INFO,
        &info_payload("disk", &[nbd::INFO_NAME, nbd::INFO_BLOCK_SIZE]),
    ));
    go.extend(opt(nbd::OPT_STRUCTURED_REPLY, &[]));
    go.extend(opt(nbd::OPT_GO, &info_payload("disk", &[])));
    go.extend(transmission());
    let mut export_name = nbd::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    export_name.extend(opt(nbd::OPT_EXPORT_NAME, b"ro"));
    export_name.extend(transmission());
    let mut abort = flags.clone();
    abort.extend(opt(nbd::OPT_GO, &info_payload("nope", &[])));
    abort.extend(opt(nbd::OPT_ABORT, &[]));
    // Structured replies, base:allocation, block status; then extended headers.
    let mut meta = (4u32).to_be_bytes().to_vec();
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(15u32).to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    let mut structured = flags.clone();
    structured.extend(opt(nbd::OPT_STRUCTURED_REPLY, &[]));
    structured.extend(opt(nbd::OPT_LIST_META_CONTEXT, &meta));
    structured.extend(opt(nbd::OPT_SET_META_CONTEXT, &meta));
    structured.extend(opt(nbd::OPT_GO, &info_payload("disk", &[])));
    structured.extend_from_slice(&nbd::encode_request(&req(
        nbd::CMD_BLOCK_STATUS,
        0,
        0,
        1 << 16,
    )));
    structured.extend_from_slice(&nbd::encode_request(&req(
        nbd::CMD_READ,
        nbd::CMD_FLAG_DF,
        0,
        512,
    )));
    let mut extended = flags.clone();
    extended.extend(opt(nbd::OPT_EXTENDED_HEADERS, &[]));
    extended.extend(opt(nbd::OPT_SET_META_CONTEXT, &meta));
    extended.extend(opt(nbd::OPT_GO, &info_payload("disk", &[])));
    for r in requests() {
        extended.extend_from_slice(&nbd::encode_extended_request(&r));
        if r.typ == nbd::CMD_WRITE {
            extended.extend_from_slice(&[0xcd; 8]);
        }
    }
    let mut default = flags;
    default.extend(opt(nbd::OPT_GO, &info_payload("", &[nbd::INFO_NAME])));
    default.extend_from_slice(&nbd::encode_request(&req(nbd::CMD_WRITE, 0, 0, 16)));
    default.extend_from_slice(&[1; 16]);
    vec![go, export_name, abort, default, structured, extended]
}

/// The shipped example configurations, as written and as `ferryctl init` writes a
/// configuration (`Config::to_toml`).
fn config_seeds(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if !p.to_string_lossy().ends_with(".toml.example") {
            continue;
        }
        let text = fs::read_to_string(&p)?;
        save(out, "config", text.as_bytes())?;
        let cfg = ferry_api::config::Config::parse(&text)?;
        save(out, "config", cfg.to_toml().as_bytes())?;
    }
    Ok(())
}

/// A real dirty-region map file and real chunk lists (mode byte 0: no fix-up).
#[cfg(feature = "daemon")]
fn daemon_seeds(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use ferryd::ship::dirty::DirtyMap;
    use ferryd::verify::chunks::{hash_chunks, ChunkHash, HashParams};
    let dir = ferry_fuzz::Scratch::new("gen");
    fs::create_dir_all(&dir.0)?;
    let path = dir.0.join("map");
    let mut map = DirtyMap::create(&path, (1 << 20) + 4096, 64 << 10)?;
    map.mark(0, 4096)?;
    map.mark(300 << 10, 200 << 10)?;
    map.set_seqs(10, 42);
    map.flush()?;
    let mut seed = vec![0u8];
    seed.extend(fs::read(&path)?);
    save(out, "dirty_map", &seed)?;
    let data = dir.0.join("data");
    let mut bytes = vec![0u8; 3 * 4096 + 100];
    bytes[5000..6000].fill(0xab);
    fs::write(&data, &bytes)?;
    let f = fs::File::open(&data)?;
    for algo in [ChunkHash::from_id(1), ChunkHash::from_id(2)]
        .into_iter()
        .flatten()
    {
        let params = HashParams {
            algo,
            chunk_size: 4096,
            seed: 7,
        };
        let list = hash_chunks(&f, bytes.len() as u64, params)?;
        let mut seed = vec![0u8];
        seed.extend(list.encode());
        save(out, "chunk_list", &seed)?;
    }
    Ok(())
}

/// Sealed audit logs as the `Raw` variant of the target's input (a zero variant
/// index, then the bytes).
fn audit_seeds(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use ferry_api::audit::{seal, AuditEntry, Outcome, GENESIS};
    for n in [1usize, 3] {
        let mut log = vec![0u8; 4];
        let mut prev = GENESIS.to_string();
        for i in 0..n {
            let entry = AuditEntry {
                uid: Some(1000),
                gid: Some(1000),
                pid: Some(4242),
                role: None,
                request: if i == 1 {
                    "switchover".into()
                } else {
                    "status".into()
                },
                args: serde_json::json!({"cmd": "status", "n": i, "note": "é✓"}),
                result: if i == 2 { Outcome::Denied } else { Outcome::Ok },
                message: (i == 2).then(|| "not allowed".to_string()),
            };
            let s = seal(
                i as u64 + 1,
                1_700_000_000_000_000_000 + i as u64,
                &prev,
                &entry,
            )?;
            log.extend_from_slice(s.line.as_bytes());
            log.push(b'\n');
            prev = s.full_hash;
        }
        save(out, "audit_verify", &log)?;
    }
    Ok(())
}

/// Mutation lists in `arbitrary`'s encoding are opaque; a few byte strings of
/// different lengths give the fuzzer varied starting lists.
fn mutation_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![],
        vec![0, 0, 0x10, 0, 0, 0x01],
        vec![3, 1, 0x00, 0x20, 0, 0],
        vec![5, 2],
        vec![2, 0, 0x40, 0x10, 0, 0, 0xff, 0x0f, 4, 1, 0x00, 0x10],
        b"\x01\x00\x00\x10\x00\x00\x08ferry!!!\x00\x01\x00\x00\x00\x02".to_vec(),
    ]
}
