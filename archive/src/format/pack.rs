//! A pack: consecutive whole write-sets of one epoch, compressed, in one object.
//! Pure: bytes in, bytes out (zstd is computation, not IO). Layout in FORMAT.md.
//!
//! Decoding never trusts a length it has not checked against the bytes it holds and
//! against [`MAX_RAW_LEN`]: a pack comes from a bucket other people can write to.
use bytes::Bytes;
use ferry_codec::{rd_u16, rd_u32, rd_u64, wr_u16, wr_u32, wr_u64};
use sm3::{Digest, Sm3};

use super::FormatError;

pub const MAGIC: [u8; 8] = *b"FERRYPK\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 72;
pub const DIGEST_LEN: usize = 32;
/// Largest uncompressed body a reader accepts (and a writer makes): memory for one
/// pack stays bounded whatever the object claims.
pub const MAX_RAW_LEN: usize = 128 << 20;
/// Largest single write payload (ferry's NBD frontend accepts at most 64 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
const FLAG_ZSTD: u16 = 1;
const WS_HEADER_LEN: usize = 20;
const REC_HEADER_LEN: usize = 25;

/// What a record does to its volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write(Bytes),
    /// Discard: reads as zeros afterwards (the archive does not keep holes apart).
    Trim,
    Zero,
    /// A named point (bookmark) at the end of a write-set; `offset`/`len` unused.
    Seal(String),
}

impl Op {
    fn kind(&self) -> u8 {
        match self {
            Op::Write(_) => 1,
            Op::Trim => 2,
            Op::Zero => 3,
            Op::Seal(_) => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub volume: u32,
    pub offset: u64,
    /// Bytes affected (for a write, the payload's length).
    pub len: u32,
    pub op: Op,
}

/// A write-set: the unit of consistency; restore points are their ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSet {
    /// Sequence of the write-set's last record (its boundary).
    pub end_seq: u64,
    /// The primary's time of the write-set (ns since the Unix epoch).
    pub timestamp_ns: u64,
    pub records: Vec<Record>,
}

impl WriteSet {
    /// Bytes this write-set takes in a pack body.
    pub fn encoded_len(&self) -> usize {
        WS_HEADER_LEN
            + self
                .records
                .iter()
                .map(|r| REC_HEADER_LEN + payload(&r.op).len())
                .sum::<usize>()
    }
}

fn payload(op: &Op) -> &[u8] {
    match op {
        Op::Write(b) => b,
        Op::Seal(l) => l.as_bytes(),
        Op::Trim | Op::Zero => &[],
    }
}

/// A pack's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackHeader {
    pub epoch: u64,
    pub write_sets: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub raw_len: u32,
    pub body_len: u32,
}

/// An encoded pack and what its manifest entry needs.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub header: PackHeader,
    /// SM3 of the header and body: the object's last 32 bytes.
    pub sm3: [u8; 32],
}

/// Encodes `sets` (non-empty, in order) of `epoch`; `level` is zstd's.
pub fn encode(epoch: u64, sets: &[WriteSet], level: i32) -> Result<Encoded, FormatError> {
    let (Some(first), Some(last)) = (sets.first(), sets.last()) else {
        return Err(FormatError::Invalid(
            "a pack holds at least one write-set".into(),
        ));
    };
    let raw = encode_body(sets)?;
    let body =
        zstd::bulk::compress(&raw, level).map_err(|e| FormatError::Compress(e.to_string()))?;
    let first_seq = first.records.first().map_or(first.end_seq, |r| r.seq);
    let header = PackHeader {
        epoch,
        write_sets: sets.len() as u32,
        first_seq,
        last_seq: last.end_seq,
        first_ts: first.timestamp_ns,
        last_ts: last.timestamp_ns,
        raw_len: raw.len() as u32,
        body_len: body.len() as u32,
    };
    let mut bytes = vec![0u8; HEADER_LEN];
    write_header(&mut bytes, &header);
    bytes.extend_from_slice(&body);
    let sm3: [u8; 32] = Sm3::digest(&bytes).into();
    bytes.extend_from_slice(&sm3);
    Ok(Encoded { bytes, header, sm3 })
}

fn encode_body(sets: &[WriteSet]) -> Result<Vec<u8>, FormatError> {
    let total: usize = sets.iter().map(WriteSet::encoded_len).sum();
    if total > MAX_RAW_LEN {
        return Err(FormatError::Invalid(format!(
            "{total} bytes of write-sets exceed a pack's {MAX_RAW_LEN}"
        )));
    }
    let mut out = Vec::with_capacity(total);
    let mut prev = 0u64;
    for ws in sets {
        if ws.end_seq <= prev {
            return Err(FormatError::Invalid(format!(
                "write-set {} is not after {prev}",
                ws.end_seq
            )));
        }
        prev = ws.end_seq;
        let mut h = [0u8; WS_HEADER_LEN];
        wr_u64(&mut h, 0, ws.end_seq);
        wr_u64(&mut h, 8, ws.timestamp_ns);
        wr_u32(&mut h, 16, ws.records.len() as u32);
        out.extend_from_slice(&h);
        for r in &ws.records {
            encode_record(&mut out, r, ws.end_seq)?;
        }
    }
    Ok(out)
}

fn encode_record(out: &mut Vec<u8>, r: &Record, end_seq: u64) -> Result<(), FormatError> {
    let p = payload(&r.op);
    if r.seq > end_seq {
        return Err(FormatError::Invalid(format!(
            "record {} after its write-set's end {end_seq}",
            r.seq
        )));
    }
    if p.len() > MAX_PAYLOAD as usize {
        return Err(FormatError::Invalid(format!(
            "a {} byte payload exceeds {MAX_PAYLOAD}",
            p.len()
        )));
    }
    let mut h = [0u8; REC_HEADER_LEN];
    wr_u64(&mut h, 0, r.seq);
    wr_u32(&mut h, 8, r.volume);
    h[12] = r.op.kind();
    wr_u64(&mut h, 13, r.offset);
    let len = match &r.op {
        Op::Write(b) => b.len() as u32,
        Op::Seal(l) => l.len() as u32,
        Op::Trim | Op::Zero => r.len,
    };
    wr_u32(&mut h, 21, len);
    out.extend_from_slice(&h);
    out.extend_from_slice(p);
    Ok(())
}

fn write_header(b: &mut [u8], h: &PackHeader) {
    b[0..8].copy_from_slice(&MAGIC);
    wr_u16(b, 8, VERSION);
    wr_u16(b, 10, FLAG_ZSTD);
    wr_u32(b, 12, h.write_sets);
    wr_u64(b, 16, h.epoch);
    wr_u64(b, 24, h.first_seq);
    wr_u64(b, 32, h.last_seq);
    wr_u64(b, 40, h.first_ts);
    wr_u64(b, 48, h.last_ts);
    wr_u32(b, 56, h.raw_len);
    wr_u32(b, 60, h.body_len);
    let crc = crc32c::crc32c(&b[..64]);
    wr_u32(b, 64, crc);
    wr_u32(b, 68, 0);
}

/// Checks magic, version, header CRC and lengths; returns the header.
pub fn decode_header(b: &[u8]) -> Result<PackHeader, FormatError> {
    if b.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            need: HEADER_LEN,
            have: b.len(),
        });
    }
    if b[0..8] != MAGIC {
        return Err(FormatError::Invalid("not a ferry pack (bad magic)".into()));
    }
    let version = rd_u16(b, 8);
    if version != VERSION {
        return Err(FormatError::Version(version));
    }
    if rd_u32(b, 64) != crc32c::crc32c(&b[..64]) {
        return Err(FormatError::Checksum("pack header"));
    }
    if rd_u16(b, 10) != FLAG_ZSTD {
        return Err(FormatError::Invalid(format!(
            "unknown pack flags {:#x}",
            rd_u16(b, 10)
        )));
    }
    let h = PackHeader {
        write_sets: rd_u32(b, 12),
        epoch: rd_u64(b, 16),
        first_seq: rd_u64(b, 24),
        last_seq: rd_u64(b, 32),
        first_ts: rd_u64(b, 40),
        last_ts: rd_u64(b, 48),
        raw_len: rd_u32(b, 56),
        body_len: rd_u32(b, 60),
    };
    if h.raw_len as usize > MAX_RAW_LEN {
        return Err(FormatError::Invalid(format!(
            "pack claims {} raw bytes (max {MAX_RAW_LEN})",
            h.raw_len
        )));
    }
    if h.first_seq > h.last_seq {
        return Err(FormatError::Invalid(
            "pack's first sequence is after its last".into(),
        ));
    }
    Ok(h)
}

/// Verifies the whole object (length, SM3) and decodes its write-sets.
pub fn decode(b: &[u8]) -> Result<(PackHeader, Vec<WriteSet>), FormatError> {
    let (h, _, sets) = decode_shared(b)?;
    Ok((h, sets))
}

/// As [`decode`], and also returns the uncompressed body: every `Op::Write` payload is
/// a slice of it (no copy), so [`payload_offset`] locates a write inside the body. What
/// an archive view keeps to serve reads from a cached body by offset.
pub fn decode_shared(b: &[u8]) -> Result<(PackHeader, Bytes, Vec<WriteSet>), FormatError> {
    let h = decode_header(b)?;
    let end = HEADER_LEN + h.body_len as usize;
    if b.len() != end + DIGEST_LEN {
        return Err(FormatError::Truncated {
            need: end + DIGEST_LEN,
            have: b.len(),
        });
    }
    let sm3: [u8; 32] = Sm3::digest(&b[..end]).into();
    if sm3[..] != b[end..] {
        return Err(FormatError::Checksum("pack contents (SM3)"));
    }
    let raw = zstd::bulk::decompress(&b[HEADER_LEN..end], h.raw_len as usize)
        .map_err(|e| FormatError::Compress(e.to_string()))?;
    if raw.len() != h.raw_len as usize {
        return Err(FormatError::Invalid(
            "pack body's length differs from its header".into(),
        ));
    }
    let raw = Bytes::from(raw);
    let sets = decode_body(&raw, h.write_sets)?;
    check_bounds(&h, &sets)?;
    Ok((h, raw, sets))
}

/// Where `payload` (a write's data from [`decode_shared`]) starts in `raw`, that call's
/// body; `None` for bytes that are not a slice of it.
pub fn payload_offset(raw: &Bytes, payload: &Bytes) -> Option<usize> {
    let off = (payload.as_ptr() as usize).checked_sub(raw.as_ptr() as usize)?;
    (off.checked_add(payload.len())? <= raw.len()).then_some(off)
}

fn check_bounds(h: &PackHeader, sets: &[WriteSet]) -> Result<(), FormatError> {
    match sets.last() {
        Some(last) if last.end_seq == h.last_seq => Ok(()),
        _ => Err(FormatError::Invalid(
            "the pack's write-sets do not end at its last sequence".into(),
        )),
    }
}

/// Bounds-checked reads over a decompressed body.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(FormatError::Truncated {
                need: self.at.saturating_add(n),
                have: self.b.len(),
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
}

fn decode_body(raw: &Bytes, count: u32) -> Result<Vec<WriteSet>, FormatError> {
    let mut c = Cursor { b: raw, at: 0 };
    let mut sets = Vec::new();
    let mut prev = 0u64;
    for _ in 0..count {
        let h = c.take(WS_HEADER_LEN)?;
        let (end_seq, ts, n) = (rd_u64(h, 0), rd_u64(h, 8), rd_u32(h, 16));
        if end_seq <= prev {
            return Err(FormatError::Invalid(format!(
                "write-set {end_seq} is not after {prev}"
            )));
        }
        prev = end_seq;
        let mut records = Vec::new();
        for _ in 0..n {
            records.push(decode_record(&mut c, raw, end_seq)?);
        }
        sets.push(WriteSet {
            end_seq,
            timestamp_ns: ts,
            records,
        });
    }
    if c.at != raw.len() {
        return Err(FormatError::Invalid(
            "bytes after the pack's last write-set".into(),
        ));
    }
    Ok(sets)
}

fn decode_record(c: &mut Cursor, raw: &Bytes, end_seq: u64) -> Result<Record, FormatError> {
    let h = c.take(REC_HEADER_LEN)?;
    let (seq, volume, kind, offset, len) = (
        rd_u64(h, 0),
        rd_u32(h, 8),
        h[12],
        rd_u64(h, 13),
        rd_u32(h, 21),
    );
    if seq > end_seq {
        return Err(FormatError::Invalid(format!(
            "record {seq} after its write-set's end {end_seq}"
        )));
    }
    if offset.checked_add(len as u64).is_none() {
        return Err(FormatError::Invalid(format!(
            "record {seq}: offset {offset} + {len} overflows"
        )));
    }
    let op = match kind {
        1 => {
            let at = c.at;
            c.take(len as usize)?;
            Op::Write(raw.slice(at..at + len as usize))
        }
        2 => Op::Trim,
        3 => Op::Zero,
        4 => {
            let l = c.take(len as usize)?;
            Op::Seal(String::from_utf8(l.to_vec()).map_err(|_| {
                FormatError::Invalid(format!("record {seq}: seal label is not UTF-8"))
            })?)
        }
        k => {
            return Err(FormatError::Invalid(format!(
                "record {seq}: unknown kind {k}"
            )))
        }
    };
    Ok(Record {
        seq,
        volume,
        offset,
        len,
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<WriteSet> {
        vec![
            WriteSet {
                end_seq: 3,
                timestamp_ns: 1_000,
                records: vec![
                    Record {
                        seq: 2,
                        volume: 0,
                        offset: 4096,
                        len: 4,
                        op: Op::Write(Bytes::from_static(b"abcd")),
                    },
                    Record {
                        seq: 3,
                        volume: 1,
                        offset: 0,
                        len: 8192,
                        op: Op::Trim,
                    },
                ],
            },
            WriteSet {
                end_seq: 5,
                timestamp_ns: 2_000,
                records: vec![
                    Record {
                        seq: 4,
                        volume: 0,
                        offset: 512,
                        len: 512,
                        op: Op::Zero,
                    },
                    Record {
                        seq: 5,
                        volume: 0,
                        offset: 0,
                        len: 7,
                        op: Op::Seal("nightly".into()),
                    },
                ],
            },
        ]
    }

    /// The layout in FORMAT.md, byte for byte: a change to it must be deliberate (and
    /// bump VERSION).
    #[test]
    fn golden_bytes() {
        let e = encode(9, &sample(), 3).unwrap();
        let want_header = "4645525259504b00010001000200000009000000000000000200000000000000\
                           0500000000000000e803000000000000d007000000000000";
        assert_eq!(hex::encode(&e.bytes[..56]), want_header);
        let raw = encode_body(&sample()).unwrap();
        assert_eq!(
            hex::encode(&raw[..WS_HEADER_LEN + REC_HEADER_LEN]),
            "0300000000000000e8030000000000000200000002000000000000000000000001001000000000000004000000"
        );
        assert_eq!(rd_u32(&e.bytes, 56) as usize, raw.len());
        let (h, sets) = decode(&e.bytes).unwrap();
        assert_eq!(
            (h.epoch, h.first_seq, h.last_seq, h.write_sets),
            (9, 2, 5, 2)
        );
        assert_eq!(sets, sample());
    }

    #[test]
    fn any_flipped_byte_or_cut_is_refused() {
        let e = encode(1, &sample(), 3).unwrap();
        for i in 0..e.bytes.len() {
            let mut b = e.bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {i} accepted");
        }
        for n in 0..e.bytes.len() {
            assert!(decode(&e.bytes[..n]).is_err(), "cut at {n} accepted");
        }
    }

    #[test]
    fn a_header_claiming_a_huge_body_is_refused_before_allocation() {
        let mut e = encode(1, &sample(), 3).unwrap();
        wr_u32(&mut e.bytes, 56, u32::MAX);
        let crc = crc32c::crc32c(&e.bytes[..64]);
        wr_u32(&mut e.bytes, 64, crc);
        assert!(matches!(decode(&e.bytes), Err(FormatError::Invalid(_))));
    }

    proptest! {
        #[test]
        fn round_trip(lens in proptest::collection::vec(0usize..3000, 1..20), fill in any::<u8>()) {
            let mut sets = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let seq = i as u64 + 1;
                sets.push(WriteSet {
                    end_seq: seq,
                    timestamp_ns: i as u64,
                    records: vec![Record { seq, volume: i as u32 % 3, offset: (i * 4096) as u64, len: *len as u32, op: Op::Write(Bytes::from(vec![fill; *len])) }],
                });
            }
            let e = encode(2, &sets, 1).unwrap();
            let (_, got) = decode(&e.bytes).unwrap();
            prop_assert_eq!(got, sets);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&b);
        }
    }
}
