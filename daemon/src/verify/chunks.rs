//! Chunk digests of a volume (or a byte range of it) and their diff, for initial sync
//! and online verify.
//!
//! Both sides hash the same range with the same [`HashParams`]; the side that ships
//! data compares the lists with [`diff`] and gets the byte ranges to send, each either
//! [`SyncAction::Data`] (ship the bytes) or [`SyncAction::Zero`] (the other side should
//! zero or punch the range: no data crosses the wire for it).
//!
//! * A chunk is [`ChunkDigest::Zero`] if it holds only zeros, whether it is a hole
//!   (skipped with `SEEK_DATA`/`SEEK_HOLE` without reading) or allocated zeros (read,
//!   then found zero); otherwise [`ChunkDigest::Data`] with its digest. So a sparse
//!   file hashes in time proportional to its allocated data, and a hole and a written
//!   zero block compare equal.
//! * Digest: xxh3-128 (fast, the default) or SM3 (for deployments that require a
//!   national-standard cryptographic hash), both keyed with the list's `seed`. Why a
//!   seed: xxh3 is not collision resistant against an adversary, and the data is the
//!   guest's; with a seed the sync initiator picks at random per run, a guest cannot
//!   prepare two different blocks that collide and so make a sync skip a chunk.
//! * Bytes of the range that lie past the end of the file read as zeros (a base is
//!   never shorter than its volume, so this only matters for odd callers).
//! * The list has a compact, versioned wire encoding ([`ChunkList::encode`],
//!   [`ChunkList::decode`]): a zero chunk costs one bit.
//!
//! Consistency: the hash of a file being written concurrently is of no single point in
//! time; callers hash a quiesced volume or track writes during the pass (e.g. with a
//! dirty map, `ship::dirty`) and resync those regions afterwards.
//!
//! `SEEK_DATA`/`SEEK_HOLE` move the file offset of the descriptor; everything in ferryd
//! uses positional IO (`pread`/`pwrite`) on bases, so that is harmless.
//!
//! Synchronous std IO only; no async.
use ferry_codec::{rd_u32, rd_u64};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Smallest chunk size (one 4 KiB block).
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// Largest chunk size (64 MiB): the hashing buffer is one chunk.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Default chunk size: 64 KiB, the default dirty-map region size too, so a verify
/// mismatch maps onto whole dirty regions.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

/// Wire encoding: magic, version, header length.
pub const LIST_MAGIC: [u8; 4] = *b"FCHK";
pub const LIST_VERSION: u8 = 1;
pub const LIST_HEADER_LEN: usize = 48;

/// Digest algorithm of a chunk list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkHash {
    /// xxh3-128 with the list's seed; 16-byte digests.
    Xxh3,
    /// SM3 over `seed (8 bytes LE) || chunk`; 32-byte digests.
    Sm3,
}

impl ChunkHash {
    /// The algorithm's id in the wire encoding.
    pub fn id(self) -> u8 {
        match self {
            ChunkHash::Xxh3 => 1,
            ChunkHash::Sm3 => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<ChunkHash> {
        match id {
            1 => Some(ChunkHash::Xxh3),
            2 => Some(ChunkHash::Sm3),
            _ => None,
        }
    }

    /// The name in `[verify] digest`.
    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Xxh3 => "xxh3",
            ChunkHash::Sm3 => "sm3",
        }
    }

    /// Bytes of one digest on the wire.
    pub fn digest_len(self) -> usize {
        match self {
            ChunkHash::Xxh3 => 16,
            ChunkHash::Sm3 => 32,
        }
    }
}

/// A chunk digest. xxh3-128 uses the first 16 bytes (the `u128` little-endian) and
/// leaves the rest zero; SM3 uses all 32.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", hex::encode(self.0))
    }
}

/// What one chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkDigest {
    /// Only zeros (a hole, or allocated zeros).
    Zero,
    /// Anything else, with its digest.
    Data(Digest),
}

/// How to cut and hash a range. Both sides of a comparison must use equal parameters
/// ([`diff`] refuses otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub algo: ChunkHash,
    /// A power of two in `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    pub chunk_size: u64,
    /// Keys the digests; pick it at random per sync or verify run (see module docs).
    pub seed: u64,
}

impl From<ferry_api::config::DigestKind> for ChunkHash {
    fn from(d: ferry_api::config::DigestKind) -> ChunkHash {
        match d {
            ferry_api::config::DigestKind::Xxh3 => ChunkHash::Xxh3,
            ferry_api::config::DigestKind::Sm3 => ChunkHash::Sm3,
        }
    }
}

impl HashParams {
    /// xxh3-128, [`DEFAULT_CHUNK_SIZE`], a random seed.
    pub fn random_xxh3() -> Result<HashParams, ChunkError> {
        HashParams::random(ChunkHash::Xxh3)
    }

    /// `algo`, [`DEFAULT_CHUNK_SIZE`], a random seed.
    pub fn random(algo: ChunkHash) -> Result<HashParams, ChunkError> {
        let mut s = [0u8; 8];
        getrandom::getrandom(&mut s)
            .map_err(|e| ChunkError::InvalidParams(format!("no random seed: {e}")))?;
        Ok(HashParams {
            algo,
            chunk_size: DEFAULT_CHUNK_SIZE,
            seed: u64::from_le_bytes(s),
        })
    }

    fn check(&self) -> Result<(), ChunkError> {
        let c = self.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
            return Err(ChunkError::InvalidParams(format!(
                "chunk_size {c} must be a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
            )));
        }
        Ok(())
    }
}

/// The digests of the chunks of `[offset, offset + len)`: chunk `i` covers
/// `offset + i * chunk_size` up to the next chunk or the end of the range (so only the
/// last chunk may be short). `offset` need not be chunk-aligned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkList {
    pub params: HashParams,
    pub offset: u64,
    pub len: u64,
    pub digests: Vec<ChunkDigest>,
}

impl ChunkList {
    /// Byte range `(offset, len)` of chunk `i` (`i < digests.len()`).
    pub fn chunk_range(&self, i: usize) -> (u64, u64) {
        let start = self.offset + i as u64 * self.params.chunk_size;
        let end = (start + self.params.chunk_size).min(self.offset + self.len);
        (start, end - start)
    }

    /// Bytes in data (non-zero) chunks: what a full ship of this list would send.
    pub fn data_bytes(&self) -> u64 {
        (0..self.digests.len())
            .filter(|&i| matches!(self.digests[i], ChunkDigest::Data(_)))
            .map(|i| self.chunk_range(i).1)
            .sum()
    }
}

/// Errors of hashing, decoding and diffing.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk hashing: {op} at offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("chunk hashing: invalid parameters: {0}")]
    InvalidParams(String),
    #[error("chunk list: {have} bytes, need at least {need}")]
    Truncated { need: usize, have: usize },
    #[error("chunk list: bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("chunk list: version {0}; this ferryd reads version {LIST_VERSION}")]
    UnsupportedVersion(u8),
    #[error("chunk list: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("chunk list: invalid field `{field}`: {message}")]
    BadField {
        field: &'static str,
        message: String,
    },
    #[error("chunk list: {have} bytes, the header implies exactly {expected}")]
    LengthMismatch { expected: u64, have: usize },
    #[error(
        "chunk lists differ in {what}: local {local}, remote {remote}; they cannot be compared"
    )]
    Mismatch {
        what: &'static str,
        local: String,
        remote: String,
    },
}

// ---------------------------------------------------------------- hashing

/// [`hash_range`] over the whole file `[0, size)`.
pub fn hash_chunks(file: &File, size: u64, params: HashParams) -> Result<ChunkList, ChunkError> {
    hash_range(file, 0, size, params)
}

/// Digests of the chunks of `[offset, offset + len)` of `file`. Holes are skipped with
/// `SEEK_DATA`/`SEEK_HOLE` (falling back to reading everything where the file system
/// or device does not support them); only chunks that overlap data are read.
pub fn hash_range(
    file: &File,
    offset: u64,
    len: u64,
    params: HashParams,
) -> Result<ChunkList, ChunkError> {
    hash_range_counted(file, offset, len, params, &mut 0)
}

/// As [`hash_range`], adding the bytes read to `read` (tests check hole skipping with
/// it, without timing).
fn hash_range_counted(
    file: &File,
    offset: u64,
    len: u64,
    params: HashParams,
    read: &mut u64,
) -> Result<ChunkList, ChunkError> {
    params.check()?;
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| {
            ChunkError::InvalidParams(format!(
                "range {offset}+{len} exceeds the largest file offset"
            ))
        })?;
    let cs = params.chunk_size;
    let count = len.div_ceil(cs);
    if count > u32::MAX as u64 {
        return Err(ChunkError::InvalidParams(format!(
            "{count} chunks exceed the {} a list can hold; hash smaller ranges",
            u32::MAX
        )));
    }
    let mut digests = Vec::with_capacity(count as usize);
    let mut buf = vec![0u8; cs.min(len) as usize];
    // Current knowledge of the file's layout: the next data extent at or after the
    // position it was asked for. `None` = ask again.
    let mut extent: Option<Extent> = None;
    let mut pos = offset;
    while pos < end {
        let c_end = (pos + cs).min(end);
        // A chunk is read iff it overlaps data. `ds >= pos` for a fresh answer and
        // `de > pos` for a kept one, so overlap is just `ds < c_end`.
        let must_read = match extent {
            Some(Extent::Data(ds, de)) if de > pos => ds < c_end,
            Some(Extent::NoMore) => false,
            Some(Extent::Unsupported) => true,
            _ => {
                let e = next_extent(file, pos)?;
                extent = Some(e);
                match e {
                    Extent::Data(ds, _) => ds < c_end,
                    Extent::NoMore => false,
                    Extent::Unsupported => true,
                }
            }
        };
        if must_read {
            let n = (c_end - pos) as usize;
            let chunk = &mut buf[..n];
            read_full_at(file, chunk, pos)?;
            *read += n as u64;
            digests.push(classify(chunk, &params));
        } else {
            digests.push(ChunkDigest::Zero);
        }
        pos = c_end;
    }
    Ok(ChunkList {
        params,
        offset,
        len,
        digests,
    })
}

#[derive(Debug, Clone, Copy)]
enum Extent {
    /// Data in `[start, end)`; `end` may be `u64::MAX` if the hole could not be found.
    Data(u64, u64),
    /// No data at or after the position asked (the rest is hole or past EOF).
    NoMore,
    /// The file system or device cannot tell: read everything.
    Unsupported,
}

/// The first data extent at or after `from`.
fn next_extent(file: &File, from: u64) -> Result<Extent, ChunkError> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor we borrow; integer arguments only. `from` is at
    // most i64::MAX (checked by the caller).
    let data = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(Extent::NoMore),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Extent::Unsupported),
            _ => Err(ChunkError::Io {
                op: "lseek(SEEK_DATA)",
                offset: from,
                source: e,
            }),
        };
    }
    // SAFETY: as above; `data` is a non-negative offset the kernel returned.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // The file shrank under us, or no SEEK_HOLE: reading decides.
            Some(libc::ENXIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                Ok(Extent::Data(data as u64, u64::MAX))
            }
            _ => Err(ChunkError::Io {
                op: "lseek(SEEK_HOLE)",
                offset: data as u64,
                source: e,
            }),
        };
    }
    Ok(Extent::Data(data as u64, hole as u64))
}

/// Fills `buf` from `offset`; bytes past the end of the file are zeros.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), ChunkError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ChunkError::Io {
                    op: "read",
                    offset: offset + done as u64,
                    source,
                })
            }
        }
    }
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    // OR-fold 64-byte blocks without an early exit inside a block, so the compiler
    // vectorises it; exit between blocks at the first non-zero one.
    let blocks = b.chunks_exact(64);
    let rest = blocks.remainder();
    blocks
        .map(|c| c.iter().fold(0u8, |a, &x| a | x))
        .all(|x| x == 0)
        && rest.iter().all(|&x| x == 0)
}

fn classify(chunk: &[u8], p: &HashParams) -> ChunkDigest {
    if is_zero(chunk) {
        return ChunkDigest::Zero;
    }
    ChunkDigest::Data(digest(p.algo, p.seed, chunk))
}

/// The digest of one chunk's bytes.
pub fn digest(algo: ChunkHash, seed: u64, data: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    match algo {
        ChunkHash::Xxh3 => {
            let h = xxhash_rust::xxh3::xxh3_128_with_seed(data, seed);
            out[..16].copy_from_slice(&h.to_le_bytes());
        }
        ChunkHash::Sm3 => {
            use sm3::{Digest as _, Sm3};
            let mut h = Sm3::new();
            h.update(seed.to_le_bytes());
            h.update(data);
            out.copy_from_slice(&h.finalize());
        }
    }
    Digest(out)
}

// ---------------------------------------------------------------- wire encoding

impl ChunkList {
    /// Encodes the list (version 1). All integers little-endian.
    ///
    /// ```text
    /// header (48 bytes)
    /// | off | size | field      | notes                                              |
    /// |   0 |    4 | magic      | "FCHK"                                             |
    /// |   4 |    1 | version    | 1                                                  |
    /// |   5 |    1 | algo       | 1 = xxh3-128 (16-byte digests), 2 = SM3 (32 bytes) |
    /// |   6 |    2 | flags      | 0 (rejected otherwise)                             |
    /// |   8 |    4 | chunk_size | power of two, 4 KiB ..= 64 MiB                     |
    /// |  12 |    4 | count      | chunks; must equal ceil(len / chunk_size)          |
    /// |  16 |    8 | offset     | first byte of the range; offset + len <= i64::MAX  |
    /// |  24 |    8 | len        | bytes in the range                                 |
    /// |  32 |    8 | seed       | digest key                                         |
    /// |  40 |    4 | data_count | chunks that are Data (= bits set in the bitmap)    |
    /// |  44 |    4 | crc        | CRC32C of bytes 0..44, continued over the body     |
    /// body
    ///   bitmap : ceil(count / 8) bytes; chunk i is bit (i % 8) of byte (i / 8),
    ///            1 = Data, 0 = Zero; bits past `count` are 0
    ///   digests: data_count * digest_len bytes, the Data chunks' digests in order
    /// ```
    ///
    /// The total length is exactly `48 + ceil(count / 8) + data_count * digest_len`,
    /// so a decoder checks it before touching the body. The CRC guards against bugs
    /// and storage of lists, not the network (QUIC/TLS already does).
    pub fn encode(&self) -> Vec<u8> {
        let count = self.digests.len();
        let dl = self.params.algo.digest_len();
        let data_count = self
            .digests
            .iter()
            .filter(|d| matches!(d, ChunkDigest::Data(_)))
            .count();
        let bitmap_len = count.div_ceil(8);
        let mut out = vec![0u8; LIST_HEADER_LEN + bitmap_len + data_count * dl];
        out[0..4].copy_from_slice(&LIST_MAGIC);
        out[4] = LIST_VERSION;
        out[5] = self.params.algo.id();
        // 6..8 flags: 0
        out[8..12].copy_from_slice(&(self.params.chunk_size as u32).to_le_bytes());
        out[12..16].copy_from_slice(&(count as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out[32..40].copy_from_slice(&self.params.seed.to_le_bytes());
        out[40..44].copy_from_slice(&(data_count as u32).to_le_bytes());
        let mut at = LIST_HEADER_LEN + bitmap_len;
        for (i, d) in self.digests.iter().enumerate() {
            if let ChunkDigest::Data(h) = d {
                out[LIST_HEADER_LEN + i / 8] |= 1 << (i % 8);
                out[at..at + dl].copy_from_slice(&h.0[..dl]);
                at += dl;
            }
        }
        let crc = list_crc(&out);
        out[44..48].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates an encoded list. Checks, in order: length of the
    /// header, magic, version, CRC (over everything received), fields, exact length,
    /// bitmap padding and population. Allocation is bounded by the input length.
    pub fn decode(b: &[u8]) -> Result<ChunkList, ChunkError> {
        if b.len() < LIST_HEADER_LEN {
            return Err(ChunkError::Truncated {
                need: LIST_HEADER_LEN,
                have: b.len(),
            });
        }
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[0..4]);
        if magic != LIST_MAGIC {
            return Err(ChunkError::BadMagic(magic));
        }
        if b[4] != LIST_VERSION {
            return Err(ChunkError::UnsupportedVersion(b[4]));
        }
        let stored = rd_u32(b, 44);
        let computed = list_crc(b);
        if stored != computed {
            return Err(ChunkError::Crc { stored, computed });
        }
        let bad = |field: &'static str, message: String| ChunkError::BadField { field, message };
        let algo =
            ChunkHash::from_id(b[5]).ok_or_else(|| bad("algo", format!("unknown id {}", b[5])))?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(bad("flags", format!("{flags:#06x}, no flags are defined")));
        }
        let params = HashParams {
            algo,
            chunk_size: rd_u32(b, 8) as u64,
            seed: rd_u64(b, 32),
        };
        params
            .check()
            .map_err(|e| bad("chunk_size", e.to_string()))?;
        let count = rd_u32(b, 12) as u64;
        let offset = rd_u64(b, 16);
        let len = rd_u64(b, 24);
        let data_count = rd_u32(b, 40) as u64;
        if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
            return Err(bad("len", format!("range {offset}+{len} exceeds i64::MAX")));
        }
        if count != len.div_ceil(params.chunk_size) {
            return Err(bad(
                "count",
                format!(
                    "{count} chunks, but {len} bytes in chunks of {} make {}",
                    params.chunk_size,
                    len.div_ceil(params.chunk_size)
                ),
            ));
        }
        if data_count > count {
            return Err(bad(
                "data_count",
                format!("{data_count} exceeds count {count}"),
            ));
        }
        let dl = algo.digest_len();
        let bitmap_len = count.div_ceil(8) as usize;
        // u64 arithmetic: cannot overflow (count, data_count < 2^32).
        let expected = LIST_HEADER_LEN as u64 + bitmap_len as u64 + data_count * dl as u64;
        if b.len() as u64 != expected {
            return Err(ChunkError::LengthMismatch {
                expected,
                have: b.len(),
            });
        }
        let bitmap = &b[LIST_HEADER_LEN..LIST_HEADER_LEN + bitmap_len];
        let used = (count % 8) as u32;
        if used != 0 && bitmap[bitmap_len - 1] >> used != 0 {
            return Err(bad("bitmap", "bits set past the last chunk".into()));
        }
        let set: u64 = bitmap.iter().map(|x| x.count_ones() as u64).sum();
        if set != data_count {
            return Err(bad(
                "data_count",
                format!("{data_count}, but the bitmap marks {set} data chunks"),
            ));
        }
        let mut digests = Vec::with_capacity(count as usize);
        let mut at = LIST_HEADER_LEN + bitmap_len;
        for i in 0..count as usize {
            if bitmap[i / 8] >> (i % 8) & 1 == 1 {
                let mut d = [0u8; 32];
                d[..dl].copy_from_slice(&b[at..at + dl]);
                at += dl;
                digests.push(ChunkDigest::Data(Digest(d)));
            } else {
                digests.push(ChunkDigest::Zero);
            }
        }
        Ok(ChunkList {
            params,
            offset,
            len,
            digests,
        })
    }
}

/// CRC32C of header bytes 0..44, continued over the body (bytes 48..).
fn list_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[0..44]), &b[LIST_HEADER_LEN..])
}

// ---------------------------------------------------------------- diff

/// What the receiving side must do with a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncAction {
    /// Ship the local bytes.
    Data,
    /// Local is all zeros, remote is not: the remote zeroes (or punches) the range; no
    /// data is shipped.
    Zero,
}

/// A run of adjacent chunks with the same action, in chunk indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRun {
    pub chunks: Range<usize>,
    pub action: SyncAction,
}

/// A byte range to fix on the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRange {
    pub offset: u64,
    pub len: u64,
    pub action: SyncAction,
}

/// Per chunk: equal digests (including Zero/Zero) need nothing; local Zero needs
/// [`SyncAction::Zero`]; any other difference needs [`SyncAction::Data`]. Adjacent
/// chunks with the same action are coalesced into one run (maximal runs, ascending).
/// The slices must have equal lengths and come from equal [`HashParams`].
pub fn diff_chunks(
    local: &[ChunkDigest],
    remote: &[ChunkDigest],
) -> Result<Vec<ChunkRun>, ChunkError> {
    if local.len() != remote.len() {
        return Err(ChunkError::Mismatch {
            what: "chunk count",
            local: local.len().to_string(),
            remote: remote.len().to_string(),
        });
    }
    let mut runs: Vec<ChunkRun> = Vec::new();
    for (i, (l, r)) in local.iter().zip(remote).enumerate() {
        let action = match (l, r) {
            _ if l == r => continue,
            (ChunkDigest::Zero, _) => SyncAction::Zero,
            (ChunkDigest::Data(_), _) => SyncAction::Data,
        };
        match runs.last_mut() {
            Some(run) if run.chunks.end == i && run.action == action => run.chunks.end = i + 1,
            _ => runs.push(ChunkRun {
                chunks: i..i + 1,
                action,
            }),
        }
    }
    Ok(runs)
}

/// [`diff_chunks`] of two lists of the same range and parameters, as byte ranges
/// (the last one clipped to the end of the range). Refuses lists that differ in
/// algorithm, chunk size, seed, offset or length: their digests are not comparable.
pub fn diff(local: &ChunkList, remote: &ChunkList) -> Result<Vec<SyncRange>, ChunkError> {
    let check = |what: &'static str, l: String, r: String| {
        if l == r {
            Ok(())
        } else {
            Err(ChunkError::Mismatch {
                what,
                local: l,
                remote: r,
            })
        }
    };
    let (lp, rp) = (&local.params, &remote.params);
    check(
        "algorithm",
        format!("{:?}", lp.algo),
        format!("{:?}", rp.algo),
    )?;
    check(
        "chunk size",
        lp.chunk_size.to_string(),
        rp.chunk_size.to_string(),
    )?;
    check("seed", lp.seed.to_string(), rp.seed.to_string())?;
    check(
        "offset",
        local.offset.to_string(),
        remote.offset.to_string(),
    )?;
    check("length", local.len.to_string(), remote.len.to_string())?;
    let runs = diff_chunks(&local.digests, &remote.digests)?;
    Ok(runs
        .into_iter()
        .map(|run| {
            let (start, _) = local.chunk_range(run.chunks.start);
            let (last, last_len) = local.chunk_range(run.chunks.end - 1);
            SyncRange {
                offset: start,
                len: last + last_len - start,
                action: run.action,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const KB: u64 = 1024;
    const MB: u64 = 1024 * KB;
    const GB: u64 = 1024 * MB;

    fn params(chunk: u64) -> HashParams {
        HashParams {
            algo: ChunkHash::Xxh3,
            chunk_size: chunk,
            seed: 0x5eed,
        }
    }

    fn d(b: u8) -> ChunkDigest {
        ChunkDigest::Data(Digest([b; 32]))
    }

    fn pattern(n: usize, salt: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31) ^ salt | 1)
            .collect()
    }

    /// Whether the temp file system reports holes (tmpfs, ext4, xfs, btrfs do).
    fn seek_hole_works() -> bool {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * MB).unwrap();
        f.write_all_at(&[1], 2 * MB).unwrap();
        f.sync_all().unwrap();
        matches!(next_extent(&f, 0), Ok(Extent::Data(s, e)) if s > 0 && e < 4 * MB)
    }

    #[test]
    fn sparse_and_dense_files_hash_alike() {
        let cs = 64 * KB;
        let size = 20 * cs + 1000; // last chunk short
        let writes: [(u64, Vec<u8>); 4] = [
            (3 * cs + 17, pattern(100, 1)),     // inside chunk 3
            (7 * cs - 10, pattern(20, 2)),      // straddles chunks 6 and 7
            (12 * cs, pattern(cs as usize, 3)), // exactly chunk 12
            (20 * cs + 999, vec![9]),           // last byte of the short chunk
        ];
        let sparse = tempfile::tempfile().unwrap();
        sparse.set_len(size).unwrap();
        for (o, b) in &writes {
            sparse.write_all_at(b, *o).unwrap();
        }
        // Same content, every byte allocated, including explicit zeros in chunk 15.
        let mut dense = tempfile::tempfile().unwrap();
        dense.write_all(&vec![0u8; size as usize]).unwrap();
        for (o, b) in &writes {
            dense.write_all_at(b, *o).unwrap();
        }
        let a = hash_chunks(&sparse, size, params(cs)).unwrap();
        let b = hash_chunks(&dense, size, params(cs)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.digests.len(), 21);
        let data: Vec<usize> = (0..21)
            .filter(|&i| matches!(a.digests[i], ChunkDigest::Data(_)))
            .collect();
        assert_eq!(data, vec![3, 6, 7, 12, 20]);
        assert_eq!(a.chunk_range(20), (20 * cs, 1000));
        assert_eq!(a.data_bytes(), 4 * cs + 1000);
        assert!(diff(&a, &b).unwrap().is_empty());
        // The digests are of the bytes: chunk 12 is the pattern.
        assert_eq!(
            a.digests[12],
            ChunkDigest::Data(digest(ChunkHash::Xxh3, 0x5eed, &pattern(cs as usize, 3)))
        );
    }

    #[test]
    fn sparse_8_gib_reads_only_allocated_chunks() {
        let f = tempfile::tempfile().unwrap();
        let size = 8 * GB;
        f.set_len(size).unwrap();
        let cs = 64 * KB;
        f.write_all_at(&pattern(4096, 7), 0).unwrap();
        f.write_all_at(&pattern(4096, 8), 3 * GB + 5 * cs).unwrap();
        f.write_all_at(&pattern(10, 9), size - 10).unwrap();
        f.sync_all().unwrap();
        if !seek_hole_works() {
            eprintln!("skipped: this file system does not report holes");
            return;
        }
        let mut read = 0;
        let list = hash_range_counted(&f, 0, size, params(cs), &mut read).unwrap();
        assert_eq!(list.digests.len() as u64, size / cs);
        let data: Vec<usize> = (0..list.digests.len())
            .filter(|&i| list.digests[i] != ChunkDigest::Zero)
            .collect();
        let mid = ((3 * GB + 5 * cs) / cs) as usize;
        assert_eq!(data, vec![0, mid, list.digests.len() - 1]);
        // A file system may allocate a little around a write, never gigabytes.
        assert!(read <= 16 * cs, "read {read} bytes of an 8 GiB sparse file");
        // Sub-range of it, unaligned, through the middle write.
        let sub = hash_range(&f, 3 * GB + 3 * cs + 1, 2 * cs, params(cs)).unwrap();
        assert_eq!(sub.digests.len(), 2);
        assert_eq!(sub.digests[0], ChunkDigest::Zero);
        assert!(matches!(sub.digests[1], ChunkDigest::Data(_)));
    }

    #[test]
    fn allocated_zeros_and_short_files_are_zero() {
        let cs = 4 * KB;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; 3 * cs as usize]).unwrap();
        f.write_all_at(&[1], cs + 5).unwrap();
        // Hash past the end of the 3-chunk file: the missing bytes read as zeros.
        let l = hash_chunks(&f, 5 * cs + 3, params(cs)).unwrap();
        let z = ChunkDigest::Zero;
        assert_eq!(l.digests.len(), 6);
        assert_eq!(
            [l.digests[0], l.digests[2], l.digests[3], l.digests[5]],
            [z; 4]
        );
        assert!(matches!(l.digests[1], ChunkDigest::Data(_)));
    }

    #[test]
    fn hash_range_matches_whole_file_when_aligned() {
        let cs = 4 * KB;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&pattern(40 * cs as usize, 5), 0).unwrap();
        f.set_len(64 * cs).unwrap();
        let all = hash_chunks(&f, 64 * cs, params(cs)).unwrap();
        let part = hash_range(&f, 10 * cs, 35 * cs, params(cs)).unwrap();
        assert_eq!(part.digests[..], all.digests[10..45]);
        assert_eq!(part.offset, 10 * cs);
        let empty = hash_range(&f, 5, 0, params(cs)).unwrap();
        assert!(empty.digests.is_empty());
    }

    #[test]
    fn algorithm_and_seed_change_digests() {
        let data = pattern(4096, 1);
        let x = digest(ChunkHash::Xxh3, 1, &data);
        assert_ne!(x, digest(ChunkHash::Xxh3, 2, &data));
        assert_eq!(x.0[16..], [0; 16]);
        let s = digest(ChunkHash::Sm3, 1, &data);
        assert_ne!(s, digest(ChunkHash::Sm3, 2, &data));
        assert_ne!(s.0[16..], [0; 16]);
        // SM3 is SM3(seed LE || data): pinned against the sm3 crate directly.
        use sm3::{Digest as _, Sm3};
        let want = Sm3::digest([&1u64.to_le_bytes()[..], &data].concat());
        assert_eq!(s.0[..], want[..]);
        assert_eq!(
            u128::from_le_bytes(x.0[..16].try_into().unwrap()),
            xxhash_rust::xxh3::xxh3_128_with_seed(&data, 1)
        );
    }

    #[test]
    fn invalid_params() {
        let f = tempfile::tempfile().unwrap();
        for cs in [0, 2048, 3 * 4096, 128 * MB] {
            assert!(matches!(
                hash_chunks(&f, 1, params(cs)),
                Err(ChunkError::InvalidParams(_))
            ));
        }
        assert!(matches!(
            hash_range(&f, u64::MAX - 1, 5, params(4096)),
            Err(ChunkError::InvalidParams(_))
        ));
    }

    // ------------------------------------------------------------ wire encoding

    /// Pins the wire encoding; a change needs a new version.
    #[test]
    fn golden_bytes() {
        let mut h1 = [0u8; 32];
        h1[..16].copy_from_slice(&[0xaa; 16]);
        let mut h2 = [0u8; 32];
        h2[..16].copy_from_slice(&(0x0102u128).to_le_bytes());
        let list = ChunkList {
            params: HashParams {
                algo: ChunkHash::Xxh3,
                chunk_size: 4096,
                seed: 0x0807060504030201,
            },
            offset: 0x10000,
            len: 9 * 4096 + 1, // 10 chunks
            digests: vec![
                ChunkDigest::Zero,
                ChunkDigest::Data(Digest(h1)),
                ChunkDigest::Zero,
                ChunkDigest::Zero,
                ChunkDigest::Zero,
                ChunkDigest::Zero,
                ChunkDigest::Zero,
                ChunkDigest::Zero,
                ChunkDigest::Zero,
                ChunkDigest::Data(Digest(h2)),
            ],
        };
        let b = list.encode();
        let expected: Vec<u8> = [
            &b"FCHK"[..],
            &[1, 1, 0, 0],                // version, algo xxh3, flags
            &[0x00, 0x10, 0, 0],          // chunk_size 4096
            &[10, 0, 0, 0],               // count
            &[0, 0, 1, 0, 0, 0, 0, 0],    // offset 0x10000
            &[1, 0x90, 0, 0, 0, 0, 0, 0], // len 0x9001
            &[1, 2, 3, 4, 5, 6, 7, 8],    // seed
            &[2, 0, 0, 0],                // data_count
            &GOLDEN_CRC,                  // crc
            &[0b0000_0010, 0b0000_0010],  // bitmap: chunks 1 and 9
            &[0xaa; 16],                  // digest of chunk 1
            &[2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // digest of chunk 9
        ]
        .concat();
        assert_eq!(b, expected);
        assert_eq!(u32::from_le_bytes(GOLDEN_CRC), list_crc(&b));
        assert_eq!(ChunkList::decode(&b).unwrap(), list);
    }
    const GOLDEN_CRC: [u8; 4] = [0x1a, 0xe0, 0x85, 0x39];

    /// An SM3 list (`[verify] digest = "sm3"`): algo 2, 32-byte digests.
    #[test]
    fn golden_bytes_sm3() {
        let list = ChunkList {
            params: HashParams {
                algo: ChunkHash::Sm3,
                chunk_size: 4096,
                seed: 0x0807060504030201,
            },
            offset: 0,
            len: 2 * 4096,
            digests: vec![ChunkDigest::Zero, ChunkDigest::Data(Digest([0x5a; 32]))],
        };
        let b = list.encode();
        let expected: Vec<u8> = [
            &b"FCHK"[..],
            &[1, 2, 0, 0],                // version, algo SM3, flags
            &[0x00, 0x10, 0, 0],          // chunk_size 4096
            &[2, 0, 0, 0],                // count
            &[0; 8],                      // offset 0
            &[0, 0x20, 0, 0, 0, 0, 0, 0], // len 0x2000
            &[1, 2, 3, 4, 5, 6, 7, 8],    // seed
            &[1, 0, 0, 0],                // data_count
            &GOLDEN_SM3_CRC,              // crc
            &[0b0000_0010],               // bitmap: chunk 1
            &[0x5a; 32],                  // digest of chunk 1
        ]
        .concat();
        assert_eq!(b, expected);
        assert_eq!(u32::from_le_bytes(GOLDEN_SM3_CRC), list_crc(&b));
        assert_eq!(ChunkList::decode(&b).unwrap(), list);
        // The digest itself: SM3 over the seed (8 bytes LE) and the chunk.
        let data = vec![7u8; 4096];
        let mut keyed = 0x0807060504030201u64.to_le_bytes().to_vec();
        keyed.extend_from_slice(&data);
        assert_eq!(
            digest(ChunkHash::Sm3, 0x0807060504030201, &data).0,
            <[u8; 32]>::from(<sm3::Sm3 as sm3::Digest>::digest(&keyed))
        );
    }
    const GOLDEN_SM3_CRC: [u8; 4] = [0xe2, 0xa1, 0x8a, 0xee];

    fn sample_list() -> ChunkList {
        ChunkList {
            params: HashParams {
                algo: ChunkHash::Sm3,
                chunk_size: 8192,
                seed: 3,
            },
            offset: 0,
            len: 11 * 8192,
            digests: (0..11u8)
                .map(|i| if i % 3 == 0 { ChunkDigest::Zero } else { d(i) })
                .collect(),
        }
    }

    #[test]
    fn every_byte_flip_and_truncation_is_refused() {
        let good = sample_list().encode();
        assert_eq!(ChunkList::decode(&good).unwrap(), sample_list());
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            let e = ChunkList::decode(&b).expect_err("flip accepted");
            let ok = match i {
                0..=3 => matches!(e, ChunkError::BadMagic(_)),
                4 => matches!(e, ChunkError::UnsupportedVersion(_)),
                _ => matches!(e, ChunkError::Crc { .. }),
            };
            assert!(ok, "byte {i}: {e}");
        }
        for len in 0..good.len() {
            let e = ChunkList::decode(&good[..len]).expect_err("truncation accepted");
            assert!(
                matches!(e, ChunkError::Truncated { .. } | ChunkError::Crc { .. }),
                "{len}: {e}"
            );
        }
    }

    /// Re-seals a modified encoding, to reach the checks behind the CRC.
    fn reseal(b: &mut [u8]) {
        let crc = list_crc(b);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn crc_valid_but_bad_fields() {
        let good = sample_list().encode();
        let field = |f: fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            reseal(&mut b);
            ChunkList::decode(&b).unwrap_err()
        };
        let is = |e: ChunkError, want: &str| match e {
            ChunkError::BadField { field, .. } => assert_eq!(field, want),
            other => panic!("expected BadField({want}), got {other}"),
        };
        is(field(|b| b[5] = 9), "algo");
        is(field(|b| b[6] = 1), "flags");
        is(
            field(|b| b[8..12].copy_from_slice(&5000u32.to_le_bytes())),
            "chunk_size",
        );
        is(
            field(|b| b[12..16].copy_from_slice(&12u32.to_le_bytes())),
            "count",
        );
        is(
            field(|b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes())),
            "len",
        );
        is(
            field(|b| b[40..44].copy_from_slice(&12u32.to_le_bytes())),
            "data_count",
        );
        // Padding bit past chunk 10 (11 chunks: byte 1 uses 3 bits).
        is(field(|b| b[LIST_HEADER_LEN + 1] |= 0x80), "bitmap");
        // A bitmap that marks one more data chunk than data_count.
        is(field(|b| b[LIST_HEADER_LEN] |= 1), "data_count");
        // Trailing and missing digest bytes.
        let mut b = good.clone();
        b.extend_from_slice(&[0; 32]);
        reseal(&mut b);
        assert!(matches!(
            ChunkList::decode(&b),
            Err(ChunkError::LengthMismatch { .. })
        ));
        let mut b = good.clone();
        b.truncate(good.len() - 32);
        reseal(&mut b);
        assert!(matches!(
            ChunkList::decode(&b),
            Err(ChunkError::LengthMismatch { .. })
        ));
        // A future version is reported as such, not as damage.
        let mut b = good.clone();
        b[4] = 2;
        assert!(matches!(
            ChunkList::decode(&b),
            Err(ChunkError::UnsupportedVersion(2))
        ));
    }

    fn digests(n: usize) -> impl Strategy<Value = Vec<ChunkDigest>> {
        proptest::collection::vec(
            prop_oneof![Just(ChunkDigest::Zero), (0u8..3).prop_map(d)],
            n,
        )
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            algo in prop_oneof![Just(ChunkHash::Xxh3), Just(ChunkHash::Sm3)],
            shift in 12u32..=26,
            seed in any::<u64>(),
            offset in 0u64..(1 << 40),
            tail in any::<u64>(),
            ds in (0usize..70).prop_flat_map(digests),
        ) {
            let cs = 1u64 << shift;
            let n = ds.len() as u64;
            // The last chunk holds 1..=cs bytes.
            let len = if n == 0 { 0 } else { (n - 1) * cs + 1 + tail % cs };
            // Digests as the algorithm produces them (xxh3: the tail is zero).
            let dl = algo.digest_len();
            let digests: Vec<ChunkDigest> = ds
                .into_iter()
                .map(|x| match x {
                    ChunkDigest::Data(Digest(mut h)) => {
                        h[dl..].fill(0);
                        ChunkDigest::Data(Digest(h))
                    }
                    z => z,
                })
                .collect();
            let list = ChunkList { params: HashParams { algo, chunk_size: cs, seed }, offset, len, digests };
            let b = list.encode();
            prop_assert_eq!(ChunkList::decode(&b).unwrap(), list);
        }

        #[test]
        fn diff_matches_a_naive_model(
            (l, r) in (0usize..60).prop_flat_map(|n| (digests(n), digests(n))),
            extra in 1u64..4096,
        ) {
            let cs = 4096;
            let n = l.len();
            // Chunk-level model: per chunk the action, or none.
            let want: Vec<Option<SyncAction>> = l.iter().zip(&r).map(|(a, b)| {
                if a == b { None }
                else if *a == ChunkDigest::Zero { Some(SyncAction::Zero) }
                else { Some(SyncAction::Data) }
            }).collect();
            let runs = diff_chunks(&l, &r).unwrap();
            let mut got = vec![None; n];
            for (k, run) in runs.iter().enumerate() {
                prop_assert!(!run.chunks.is_empty());
                for i in run.chunks.clone() { got[i] = Some(run.action); }
                if let Some(next) = runs.get(k + 1) {
                    prop_assert!(run.chunks.end <= next.chunks.start);
                    // Maximal: touching runs have different actions.
                    prop_assert!(run.chunks.end < next.chunks.start || run.action != next.action);
                }
            }
            prop_assert_eq!(&got, &want);
            // Byte ranges, with a short last chunk.
            let len = if n == 0 { 0 } else { (n as u64 - 1) * cs + extra };
            let mk = |ds: Vec<ChunkDigest>| ChunkList { params: params(cs), offset: 1 << 20, len, digests: ds };
            let (ll, rl) = (mk(l), mk(r));
            let ranges = diff(&ll, &rl).unwrap();
            prop_assert_eq!(ranges.len(), runs.len());
            for (rg, run) in ranges.iter().zip(&runs) {
                prop_assert_eq!(rg.offset, (1 << 20) + run.chunks.start as u64 * cs);
                let end = ((1 << 20) + run.chunks.end as u64 * cs).min((1 << 20) + len);
                prop_assert_eq!(rg.offset + rg.len, end);
                prop_assert_eq!(rg.action, run.action);
            }
        }
    }

    #[test]
    fn diff_refuses_incomparable_lists() {
        let a = sample_list();
        let mut b = sample_list();
        b.params.seed += 1;
        assert!(matches!(
            diff(&a, &b),
            Err(ChunkError::Mismatch { what: "seed", .. })
        ));
        let mut b = sample_list();
        b.params.algo = ChunkHash::Xxh3;
        assert!(matches!(
            diff(&a, &b),
            Err(ChunkError::Mismatch {
                what: "algorithm",
                ..
            })
        ));
        let mut b = sample_list();
        b.offset = 8192;
        assert!(matches!(
            diff(&a, &b),
            Err(ChunkError::Mismatch { what: "offset", .. })
        ));
        assert!(matches!(
            diff_chunks(&[ChunkDigest::Zero], &[]),
            Err(ChunkError::Mismatch { .. })
        ));
    }

    #[test]
    fn diff_of_files_end_to_end() {
        // Local has new data, a zeroed chunk and unchanged chunks; remote is older.
        let cs = 4 * KB;
        let local = tempfile::tempfile().unwrap();
        let remote = tempfile::tempfile().unwrap();
        local.set_len(16 * cs).unwrap();
        remote.set_len(16 * cs).unwrap();
        let same = pattern(2 * cs as usize, 1);
        local.write_all_at(&same, 0).unwrap();
        remote.write_all_at(&same, 0).unwrap();
        local
            .write_all_at(&pattern(3 * cs as usize, 2), 4 * cs)
            .unwrap(); // chunks 4..7 new
        remote
            .write_all_at(&pattern(cs as usize, 3), 10 * cs)
            .unwrap(); // 10: zero locally
        remote
            .write_all_at(&pattern(cs as usize, 4), 11 * cs)
            .unwrap(); // 11: zero locally
        let p = HashParams::random_xxh3()
            .map(|p| HashParams {
                chunk_size: cs,
                ..p
            })
            .unwrap();
        let l = hash_chunks(&local, 16 * cs, p).unwrap();
        let r = ChunkList::decode(&hash_chunks(&remote, 16 * cs, p).unwrap().encode()).unwrap();
        assert_eq!(
            diff(&l, &r).unwrap(),
            vec![
                SyncRange {
                    offset: 4 * cs,
                    len: 3 * cs,
                    action: SyncAction::Data
                },
                SyncRange {
                    offset: 10 * cs,
                    len: 2 * cs,
                    action: SyncAction::Zero
                },
            ]
        );
    }
}
