//! Encryption at rest (FORMAT.md "Encryption at rest"): golden bytes of an encrypted
//! segment header and batch, every tamper refused with a precise error, and whole
//! journals: no plaintext on disk, reopen with the right key, refusal of a missing
//! or wrong key, a torn tail, and a plaintext journal that starts encrypting.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use ferry_gm::atrest::{DataKey, Kek, KEY_ID_LEN};
use ferry_journal::format::*;
use ferry_journal::*;

const KEK_BYTES: [u8; 16] = *b"0123456789abcdef";
const MARKER: &[u8] = b"FERRY-PLAINTEXT-MARKER-";

fn kek() -> Arc<Kek> {
    Arc::new(Kek::from_bytes(&KEK_BYTES))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn header() -> SegmentHeader {
    SegmentHeader {
        segment_no: 1,
        cluster_id: CLUSTER,
        first_seq: 42,
        segment_size: 1 << 20,
        max_inflight: 1,
        seq_jump: false,
    }
}

/// The version 2 header: the v1 fields (version 2) with their own CRC at 60, the key
/// id, the wrapped data key, reserved zeros, and a CRC over 0..124.
#[test]
fn golden_encrypted_segment_header() {
    let kek = Kek::from_bytes(&KEK_BYTES);
    let h = header();
    let dk = DataKey::from_bytes(&[0x11; 16]);
    let aad = segment_key_aad(&h, kek.id());
    let wrapped = kek.wrap_with_nonce(&dk, &aad, &[0x22; 12]).unwrap();
    let info = SegmentKeyInfo {
        key_id: kek.id(),
        wrapped,
    };
    let b = encode_segment_header_encrypted(&h, &info);
    assert_eq!(&b[0..8], b"FERRYSEG");
    assert_eq!(&b[8..10], &[2, 0], "version 2");
    assert_eq!(
        u32::from_le_bytes(b[60..64].try_into().unwrap()),
        salted_crc(1, &b[..60]),
        "bytes 0..64 keep the v1 layout and checksum"
    );
    assert_eq!(&b[64..72], &kek.id().0);
    assert_eq!(&b[72..84], &[0x22; 12], "wrap nonce");
    assert_eq!(&b[116..124], &[0; 8], "reserved");
    assert_eq!(
        u32::from_le_bytes(b[124..128].try_into().unwrap()),
        salted_crc(1, &b[..124])
    );
    assert_eq!(hex(&b[64..124]), GOLDEN_KEY_PART);
    let mut block = vec![0u8; BLOCK_SIZE];
    block[..128].copy_from_slice(&b);
    assert_eq!(decode_segment_header_any(&block, 1), Ok((h, Some(info))));
    // The v1-only decoder refuses rather than misreads.
    assert_eq!(
        decode_segment_header(&block, 1),
        Err(FormatError::UnsupportedVersion(2))
    );
    let back = kek.unwrap(&info.wrapped, &aad).unwrap();
    let mut probe = [0u8; 16];
    let tag = back.seal(1, 1, b"", &mut probe).unwrap();
    let mut probe2 = [0u8; 16];
    assert_eq!(dk.seal(1, 1, b"", &mut probe2).unwrap(), tag);
    // A torn write that kept the first 64 bytes only: bad header, not misread.
    let mut torn = block.clone();
    torn[64..128].fill(0);
    assert!(matches!(
        decode_segment_header_any(&torn, 1),
        Err(FormatError::HeaderCrc { .. })
    ));
}

/// Key id, wrap nonce, wrapped key (the ciphertext equals ferry-gm's known answer
/// for the same keys and nonce: only the tag depends on the header), reserved.
const GOLDEN_KEY_PART: &str = concat!(
    "7facb18cf132385d",
    "222222222222222222222222",
    "649793007d486fbbf369c5851c65b20f",
    "3f071efa9038254a5b3d4f6765e4fb15",
    "0000000000000000",
);

fn params() -> BatchParams {
    BatchParams {
        segment_no: 1,
        cluster_id: CLUSTER,
        epoch: 3,
        first_seq: 42,
        timestamp_ns: 1_700_000_000_000_000_000,
    }
}

fn sealed_batch(offset: u64) -> (BatchHeader, Vec<u8>) {
    let dk = DataKey::from_bytes(&[0x11; 16]);
    let recs = [
        Record::write(7, 8192, Bytes::from_static(b"hello")),
        Record::seal(7, Bytes::new()),
    ];
    let mut out = vec![0u8; BLOCK_SIZE];
    let (h, n) = encode_batch_sealed(&mut out, &params(), &recs, &dk, offset).unwrap();
    out.truncate(n);
    (h, out)
}

fn body_of(h: &BatchHeader, batch: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&batch[BATCH_HEADER_LEN..BATCH_HEADER_LEN + h.body_len as usize])
}

#[test]
fn golden_encrypted_batch() {
    let (h, b) = sealed_batch(4096);
    assert_eq!(b.len(), BLOCK_SIZE);
    assert_eq!(&b[0..4], b"FRYB");
    assert_eq!(&b[4..6], &[2, 0], "version 2");
    assert!(h.encrypted);
    // Two record headers, 5 data bytes, 16-byte tag.
    assert_eq!(h.body_len, 32 + 5 + 32 + 16);
    assert_eq!(h.body_crc, salted_crc(1, &body_of(&h, &b)));
    assert_eq!(decode_batch_header(&b, 1), Ok(h));
    assert_eq!(
        hex(&b[..BATCH_HEADER_LEN + h.body_len as usize]),
        GOLDEN_BATCH
    );
    assert!(is_zero(&b[BATCH_HEADER_LEN + h.body_len as usize..]));
    assert!(
        !b.windows(5).any(|w| w == b"hello"),
        "no plaintext in the batch"
    );
    let dk = DataKey::from_bytes(&[0x11; 16]);
    let recs = decode_batch_body_at(&h, &body_of(&h, &b), 4096, Some(&dk)).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].0, 42);
    assert_eq!(recs[0].1.data, Bytes::from_static(b"hello"));
    assert_eq!(recs[1].1.op, Op::Seal);
}

/// Header (version 2, body_len 85, CRC of the ciphertext), ciphertext, tag.
const GOLDEN_BATCH: &str = concat!(
    "4652594202000100010000000000000066657272792d746573742d636c7573740300000000000000",
    "2a000000000000002b0000000000000000002a36fe9c971702000000550000000078e70648754376f8",
    "9f25e826142a8524e7d32160a2be31c99767893e2c7b7cbb162314093f3ba9960f2c98b4f4883a2256",
    "b73e5d9b16fd085194d389e5d9a608820be98ef9429d9238450d474a34349270bc04cbd2914ab34453",
    "e242",
);

/// Rewrites the body CRC and the header (as an attacker who knows the format
/// would): only the SM4-GCM tag can tell.
fn refresh_crcs(h: &BatchHeader, b: &mut [u8]) -> BatchHeader {
    let body = BATCH_HEADER_LEN..BATCH_HEADER_LEN + h.body_len as usize;
    let h2 = BatchHeader {
        body_crc: salted_crc(h.segment_no, &b[body]),
        ..*h
    };
    b[..BATCH_HEADER_LEN].copy_from_slice(&encode_batch_header(&h2));
    h2
}

#[test]
fn every_batch_tamper_is_refused() {
    let dk = DataKey::from_bytes(&[0x11; 16]);
    let (h, b) = sealed_batch(4096);
    let open = |h: &BatchHeader, b: &[u8], off: u64, k: Option<&DataKey>| {
        decode_batch_body_at(h, &body_of(h, b), off, k).map(|_| ())
    };
    let body_len = h.body_len as usize;
    for i in 0..body_len * 8 {
        let mut t = b.clone();
        t[BATCH_HEADER_LEN + i / 8] ^= 1 << (i % 8);
        // As torn or rotted: the CRC over the ciphertext catches it, without a key.
        assert!(matches!(
            open(&h, &t, 4096, None),
            Err(FormatError::BodyCrc { .. })
        ));
        // Forged with a fixed-up CRC (ciphertext bits, then tag bits): the tag.
        let h2 = refresh_crcs(&h, &mut t);
        assert_eq!(
            open(&h2, &t, 4096, Some(&dk)),
            Err(FormatError::Authentication),
            "bit {i}"
        );
    }
    // Header fields are authenticated too (here: the epoch and the seq range).
    for h2 in [
        BatchHeader { epoch: 4, ..h },
        BatchHeader {
            first_seq: 43,
            last_seq: 44,
            ..h
        },
    ] {
        let mut t = b.clone();
        t[..BATCH_HEADER_LEN].copy_from_slice(&encode_batch_header(&h2));
        assert_eq!(
            open(&h2, &t, 4096, Some(&dk)),
            Err(FormatError::Authentication)
        );
    }
    // The same batch moved to another offset, or read with another key / no key.
    assert_eq!(
        open(&h, &b, 8192, Some(&dk)),
        Err(FormatError::Authentication)
    );
    assert_eq!(
        open(&h, &b, 4096, Some(&DataKey::from_bytes(&[0x12; 16]))),
        Err(FormatError::Authentication)
    );
    assert_eq!(open(&h, &b, 4096, None), Err(FormatError::KeyRequired));
    // A plaintext batch where a key is expected.
    let plain = encode_batch_vec(&params(), &[Record::trim(1, 0, 4096)]).unwrap();
    let ph = decode_batch_header(&plain, 1).unwrap();
    assert!(matches!(
        open(&ph, &plain, 4096, Some(&dk)),
        Err(FormatError::Invalid(_))
    ));
    open(&h, &b, 4096, Some(&dk)).unwrap();
}

fn open_err(o: JournalOptions) -> JournalError {
    match Journal::open(o) {
        Ok(_) => panic!("the journal opened"),
        Err(e) => e,
    }
}

fn enc_opts(dir: &Path, engine: EngineChoice, key: Option<Arc<Kek>>) -> JournalOptions {
    let mut o = opts(dir, engine);
    o.encryption = key;
    o
}

fn marker_payload(seq: Seq) -> Bytes {
    let mut v = MARKER.repeat(4096 / MARKER.len() + 1);
    v.truncate(4096 - 8);
    v.extend_from_slice(&seq.to_le_bytes());
    Bytes::from(v)
}

fn append_markers(j: &Journal, n: u64) {
    for _ in 0..n {
        let seq = j.last_seq() + 1;
        assert_eq!(
            j.append_wait(Record::write(1, seq * 4096, marker_payload(seq)))
                .unwrap(),
            seq
        );
    }
}

fn check_markers(j: &Journal, through: Seq) {
    let mut next = 1;
    for e in j.reader(1).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.seq, next);
        assert_eq!(e.record.data, marker_payload(e.seq));
        next += 1;
    }
    assert_eq!(next, through + 1);
}

fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Version of the header in segment file `p` (0: unused).
fn header_version(p: &Path) -> u16 {
    let b = std::fs::read(p).unwrap();
    u16::from_le_bytes([b[8], b[9]])
}

#[test]
fn encrypted_journal_keeps_no_plaintext_and_reopens_with_its_key() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(enc_opts(dir.path(), engine, Some(kek()))).unwrap();
        append_markers(&j, 300);
        check_markers(&j, 300);
        j.close().unwrap();
        let segs = segment_paths(dir.path());
        assert!(segs.len() >= 2, "300 x 4 KiB spans segments of 1 MiB");
        for p in &segs {
            let bytes = std::fs::read(p).unwrap();
            assert!(!contains(&bytes, MARKER), "plaintext in {}", p.display());
            assert!(matches!(header_version(p), 0 | 2));
        }
        // The right key: everything back, and appends continue (in a new segment).
        let (j, report) = Journal::open(enc_opts(dir.path(), engine, Some(kek()))).unwrap();
        assert_eq!(report.last_seq, 300);
        check_markers(&j, 300);
        append_markers(&j, 5);
        check_markers(&j, 305);
        j.close().unwrap();
        let (j, _) = Journal::open(enc_opts(dir.path(), engine, Some(kek()))).unwrap();
        check_markers(&j, 305);
        j.close().unwrap();
    }
}

#[test]
fn missing_or_wrong_key_is_refused_naming_the_key_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(enc_opts(dir.path(), EngineChoice::Std, Some(kek()))).unwrap();
    append_markers(&j, 3);
    j.close().unwrap();
    let before: Vec<Vec<u8>> = segment_paths(dir.path())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let id = kek().id().to_string();
    assert_eq!(id.len(), 2 * KEY_ID_LEN);

    let e = open_err(enc_opts(dir.path(), EngineChoice::Std, None));
    assert!(matches!(e, JournalError::KeyRequired { .. }), "{e}");
    assert!(e.to_string().contains(&id), "{e}");

    let other = Arc::new(Kek::from_bytes(&[7; 16]));
    let e = open_err(enc_opts(dir.path(), EngineChoice::Std, Some(other.clone())));
    assert!(matches!(e, JournalError::WrongKey { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&id) && msg.contains(&other.id().to_string()),
        "{msg}"
    );

    // Nothing was repaired or written by the refused opens.
    let after: Vec<Vec<u8>> = segment_paths(dir.path())
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(before == after, "a refused open changed the segment files");
    let (j, _) = Journal::open(enc_opts(dir.path(), EngineChoice::Std, Some(kek()))).unwrap();
    check_markers(&j, 3);
}

/// Flips `bit` of `file` at `at` and stores the file back.
fn flip(file: &Path, at: usize) {
    let mut b = std::fs::read(file).unwrap();
    b[at] ^= 1;
    std::fs::write(file, b).unwrap();
}

#[test]
fn tampered_segments_are_refused_not_truncated() {
    let setup = || {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(enc_opts(dir.path(), EngineChoice::Std, Some(kek()))).unwrap();
        append_markers(&j, 3);
        j.close().unwrap();
        let seg = segment_paths(dir.path())[0].clone();
        (dir, seg)
    };
    // Ciphertext of the first batch altered and its CRCs fixed up: refused.
    let (dir, seg) = setup();
    let mut b = std::fs::read(&seg).unwrap();
    let h = decode_batch_header(&b[4096..], 1).unwrap();
    b[4096 + BATCH_HEADER_LEN + 100] ^= 1;
    refresh_crcs(&h, &mut b[4096..]);
    std::fs::write(&seg, &b).unwrap();
    let e = open_err(enc_opts(dir.path(), EngineChoice::Std, Some(kek())));
    assert!(
        matches!(&e, JournalError::Corruption { offset: 4096, reason, .. } if reason.contains("authentication")),
        "{e}"
    );

    // Wrapped data key altered, header CRC fixed up: refused, naming the header.
    let (dir, seg) = setup();
    let mut b = std::fs::read(&seg).unwrap();
    b[90] ^= 1;
    let crc = salted_crc(1, &b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, &b).unwrap();
    let e = open_err(enc_opts(dir.path(), EngineChoice::Std, Some(kek())));
    assert!(
        matches!(&e, JournalError::Corruption { reason, .. } if reason.contains("wrapped data key")),
        "{e}"
    );

    // The key id in the header altered: refused as a wrong key (checked first).
    let (dir, seg) = setup();
    let mut b = std::fs::read(&seg).unwrap();
    b[64] ^= 1;
    let crc = salted_crc(1, &b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, &b).unwrap();
    let e = open_err(enc_opts(dir.path(), EngineChoice::Std, Some(kek())));
    assert!(matches!(e, JournalError::WrongKey { .. }), "{e}");

    // A flipped bit without fixing the CRC is a torn-looking tail in the last batch:
    // truncated as before (never accepted).
    let (dir, seg) = setup();
    let b = std::fs::read(&seg).unwrap();
    let mut pos = 4096;
    let mut last = pos;
    while let Ok(h) = decode_batch_header(&b[pos..], 1) {
        last = pos;
        pos += h.disk_len() as usize;
    }
    flip(&seg, last + BATCH_HEADER_LEN + 10);
    let (j, report) = Journal::open(enc_opts(dir.path(), EngineChoice::Std, Some(kek()))).unwrap();
    assert_eq!(report.truncated_batches, 1);
    let last_seq = report.last_seq;
    assert!(last_seq < 3);
    check_markers(&j, last_seq);
    // New appends go to a new segment with a new data key.
    append_markers(&j, 2);
    check_markers(&j, last_seq + 2);
    j.close().unwrap();
    let segs = segment_paths(dir.path());
    assert_eq!(
        header_version(&segs[1]),
        2,
        "appends after reopen activate a new segment"
    );
}

#[test]
fn plaintext_journal_keeps_its_old_segments_readable_once_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(enc_opts(dir.path(), EngineChoice::Std, None)).unwrap();
    append_markers(&j, 4);
    j.close().unwrap();
    let segs = segment_paths(dir.path());
    assert_eq!(header_version(&segs[0]), 1);
    assert!(contains(&std::fs::read(&segs[0]).unwrap(), MARKER));

    let (j, _) = Journal::open(enc_opts(dir.path(), EngineChoice::Std, Some(kek()))).unwrap();
    append_markers(&j, 4);
    check_markers(&j, 8);
    j.close().unwrap();
    let segs = segment_paths(dir.path());
    assert_eq!(header_version(&segs[1]), 2);
    let b = std::fs::read(&segs[1]).unwrap();
    assert!(!contains(&b, MARKER));
    // Now the key is needed.
    let e = open_err(enc_opts(dir.path(), EngineChoice::Std, None));
    assert!(matches!(e, JournalError::KeyRequired { .. }), "{e}");
}

/// Depth 2 (two batch writes in flight): the first of two batches torn, the second
/// whole, in an encrypted segment whose header records depth 2 — recovery discards
/// both, as for plaintext (the CRC over the ciphertext finds the tear).
#[test]
fn pipelined_torn_tail_in_an_encrypted_segment() {
    if !engines().contains(&EngineChoice::IoUring) {
        return; // engines() printed the SKIP reason
    }
    let dir = tempfile::tempdir().unwrap();
    let mut o = enc_opts(dir.path(), EngineChoice::IoUring, Some(kek()));
    o.max_inflight_batches = 2;
    let (j, _) = Journal::open(o.clone()).unwrap();
    append_markers(&j, 3);
    j.close().unwrap();
    let seg = segment_paths(dir.path())[0].clone();
    let b = std::fs::read(&seg).unwrap();
    let (sh, key) = decode_segment_header_any(&b, 1).unwrap();
    assert!(key.is_some());
    assert_eq!(sh.max_inflight, 2);
    let mut batches = Vec::new();
    let mut pos = 4096;
    while let Ok(h) = decode_batch_header(&b[pos..], 1) {
        batches.push((pos, h));
        pos += h.disk_len() as usize;
    }
    assert_eq!(batches.len(), 3, "one record per batch (append_wait)");
    let (at, h) = batches[1];
    flip(&seg, at + BATCH_HEADER_LEN + h.body_len as usize / 2);
    let (j, rep) = Journal::open(o).unwrap();
    assert_eq!(
        (rep.truncated_batches, rep.last_seq),
        (2, 1),
        "{:?}",
        rep.events
    );
    assert!(
        rep.events
            .iter()
            .any(|e| e.contains("discarded 2 batches, seqs 2..3")),
        "{:?}",
        rep.events
    );
    check_markers(&j, 1);
}
