//! A persisted dirty-region bitmap for one (target, volume).
//!
//! Why it exists: when a replication target falls so far behind that keeping its
//! unacknowledged records would overflow the journal, the primary switches that target
//! to *bitmap mode*: it marks here the regions of the records it is about to release
//! without the target's ack, marks every region written from then on, lets the
//! journal go, and later resyncs only the dirty regions. Failback uses the same map
//! for "regions written since the fork point".
//!
//! * The volume is cut into fixed regions (`region_size`, a power of two, at least
//!   4 KiB, default [`DEFAULT_REGION_SIZE`]); one bit per region, so memory is
//!   `volume_size / region_size / 8` bytes (1 TiB at 64 KiB regions: 2 MiB).
//! * [`DirtyMap::mark`] and [`DirtyMap::clear_range`] change only memory;
//!   [`DirtyMap::flush`] makes the current image durable. Marking is conservative
//!   (every region a range touches), clearing is conservative the other way (only
//!   regions the range covers entirely), so neither ever loses a byte that must be
//!   resynced.
//! * Durability scheme: the whole image is written to `<path>.tmp`, fsynced, renamed
//!   over `<path>`, and the directory fsynced. The file is therefore always one
//!   complete image, old or new; there is no in-place update to tear. A rewrite of the
//!   whole image per flush is cheap at these sizes and keeps recovery trivial (no log
//!   to replay). A leftover `.tmp` is an unfinished flush and is deleted on open.
//!
//! The byte layout, checksums and crash cases are in `daemon/DIRTY-FORMAT.md`.
//!
//! Caller contract (what makes the map safe to rely on):
//! * A mark protects its region only once a [`DirtyMap::flush`] that started after the
//!   mark has returned `Ok`. Do not release journal records whose regions were just
//!   marked (and do not acknowledge anything that relies on the map) before that.
//! * Clear a region only after its resynced data is durable on the target. Losing a
//!   clear in a crash is harmless (the region is resynced again); losing a mark is not,
//!   which is what the rule above prevents.
//! * One owner per file: nothing here locks the file against a second process.
//!
//! Synchronous std IO only; no async.
use ferry_codec::{rd_u16, rd_u32, rd_u64};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Header length in bytes; the bitmap follows it.
pub const HEADER_LEN: usize = 64;
/// File magic.
pub const MAGIC: [u8; 8] = *b"FERRYDRT";
/// Current format version (the only one this code reads or writes).
pub const FORMAT_VERSION: u16 = 1;
/// Default region size: 64 KiB.
pub const DEFAULT_REGION_SIZE: u64 = 64 << 10;
/// Smallest region size: one 4 KiB block.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region size (1 GiB). Larger regions would make every resync of a single
/// dirty 4 KiB write absurdly expensive; the field could hold up to 2 GiB.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Most regions a map may have (2^32: a 512 MiB bitmap). Bounds every allocation made
/// from a header read off disk, together with the actual file length.
pub const MAX_REGIONS: u64 = 1 << 32;
/// Suffix appended to the file name for an unfinished flush.
pub const TMP_SUFFIX: &str = ".tmp";

// The shipper that owns a map may move it between threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<DirtyMap>();
    assert_send::<DirtyError>();
};

/// Errors of [`DirtyMap`]. Everything read from disk is validated; corruption is
/// reported with the file and what was wrong, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A system call failed.
    #[error("dirty map {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The file is shorter than its header says (or than a header).
    #[error("dirty map {path}: truncated: {len} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    /// The file is not a dirty map at all.
    #[error("dirty map {path}: bad magic {found:02x?} (not a ferry dirty map)")]
    BadMagic { path: PathBuf, found: [u8; 8] },
    /// The header checksum does not match: the header was damaged.
    #[error("dirty map {path}: header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    /// A valid header of a format version this code does not read.
    #[error(
        "dirty map {path}: format version {found}; this ferryd reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, found: u16 },
    /// A checksummed header with an impossible field (written by a buggy or foreign
    /// writer, since the checksum rules out damage).
    #[error("dirty map {path}: invalid header field `{field}`: {message}")]
    BadHeader {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    /// Bytes after the bitmap.
    #[error("dirty map {path}: {len} bytes, expected exactly {expected} (trailing data)")]
    TrailingData {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    /// The bitmap checksum does not match: the bitmap was damaged.
    #[error("dirty map {path}: bitmap checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BitmapCrc {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    /// The bitmap checksums but contradicts the header (bits past the last region,
    /// or a population count that differs from `dirty_count`).
    #[error("dirty map {path}: bitmap inconsistent with header: {message}")]
    Inconsistent { path: PathBuf, message: String },
    /// Bad parameters to [`DirtyMap::create`].
    #[error("dirty map {path}: invalid parameters: {message}")]
    InvalidParams { path: PathBuf, message: String },
    /// A byte range outside the volume (a caller bug; nothing was changed).
    #[error("dirty map: range {offset}+{len} is outside the volume of {volume_size} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        volume_size: u64,
    },
}

/// The decoded, validated header. Also what [`encode_header`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    region_size: u32,
    volume_size: u64,
    generation: u64,
    base_seq: u64,
    through_seq: u64,
    dirty_count: u64,
    bitmap_crc: u32,
}

/// A dirty-region bitmap backed by one file. See the module docs for the contract.
#[derive(Debug)]
pub struct DirtyMap {
    path: PathBuf,
    region_shift: u32,
    volume_size: u64,
    regions: u64,
    /// Generation of the image on disk (bumped before each flush attempt).
    generation: u64,
    base_seq: u64,
    through_seq: u64,
    /// One bit per region, region `i` in word `i / 64`, bit `i % 64`. Bits past
    /// `regions` are always zero (so searches and counts need no masking at the end).
    bits: Vec<u64>,
    count: u64,
    /// The memory image differs from the last durable one.
    changed: bool,
}

impl DirtyMap {
    /// Creates a new, all-clean map and makes it durable before returning (same
    /// tmp + rename scheme as [`flush`](Self::flush)); replaces an existing file.
    /// `region_size`: a power of two in `MIN_REGION_SIZE..=MAX_REGION_SIZE`.
    pub fn create(path: &Path, volume_size: u64, region_size: u64) -> Result<DirtyMap, DirtyError> {
        let invalid = |message: String| DirtyError::InvalidParams {
            path: path.to_path_buf(),
            message,
        };
        if let Err(m) = check_geometry(volume_size, region_size) {
            return Err(invalid(m));
        }
        let region_shift = region_size.trailing_zeros();
        let regions = region_count(volume_size, region_shift);
        let mut map = DirtyMap {
            path: path.to_path_buf(),
            region_shift,
            volume_size,
            regions,
            generation: 0,
            base_seq: 0,
            through_seq: 0,
            bits: vec![0; words_for(regions)],
            count: 0,
            changed: true,
        };
        map.flush()?;
        Ok(map)
    }

    /// Opens and fully validates an existing map (header, length, both checksums,
    /// padding bits, population count). Deletes a leftover `<path>.tmp` first: it is
    /// a flush that never returned, so the image at `path` is the promised one.
    pub fn open(path: &Path) -> Result<DirtyMap, DirtyError> {
        remove_if_exists(&tmp_path(path))?;
        let io = |op: &'static str| {
            move |source| DirtyError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let mut file = File::open(path).map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        if len < HEADER_LEN as u64 {
            return Err(DirtyError::Truncated {
                path: path.to_path_buf(),
                len,
                expected: HEADER_LEN as u64,
            });
        }
        let mut hb = [0u8; HEADER_LEN];
        file.read_exact(&mut hb).map_err(io("read header"))?;
        let h = decode_header(path, &hb)?;
        let region_shift = h.region_size.trailing_zeros();
        let regions = region_count(h.volume_size, region_shift);
        let words = words_for(regions);
        // Compared with the real length before allocating anything from the header.
        let expected = HEADER_LEN as u64 + words as u64 * 8;
        if len < expected {
            return Err(DirtyError::Truncated {
                path: path.to_path_buf(),
                len,
                expected,
            });
        }
        if len > expected {
            return Err(DirtyError::TrailingData {
                path: path.to_path_buf(),
                len,
                expected,
            });
        }
        let mut raw = vec![0u8; words * 8];
        file.read_exact(&mut raw).map_err(io("read bitmap"))?;
        let computed = bitmap_crc(h.generation, &raw);
        if computed != h.bitmap_crc {
            return Err(DirtyError::BitmapCrc {
                path: path.to_path_buf(),
                stored: h.bitmap_crc,
                computed,
            });
        }
        let bits: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        drop(raw);
        let inconsistent = |message: String| DirtyError::Inconsistent {
            path: path.to_path_buf(),
            message,
        };
        if let Some(&last) = bits.last() {
            let used = regions - (words as u64 - 1) * 64; // 1..=64 bits used in the last word
            if used < 64 && last >> used != 0 {
                return Err(inconsistent(format!(
                    "bits set past the last region ({regions} regions)"
                )));
            }
        }
        let count: u64 = bits.iter().map(|w| w.count_ones() as u64).sum();
        if count != h.dirty_count {
            return Err(inconsistent(format!(
                "{count} regions set, header says {}",
                h.dirty_count
            )));
        }
        Ok(DirtyMap {
            path: path.to_path_buf(),
            region_shift,
            volume_size: h.volume_size,
            regions,
            generation: h.generation,
            base_seq: h.base_seq,
            through_seq: h.through_seq,
            bits,
            count,
            changed: false,
        })
    }

    /// Deletes the map at `path` (and any leftover `.tmp`), then fsyncs the directory,
    /// e.g. when a target leaves bitmap mode. A missing file is not an error.
    pub fn remove(path: &Path) -> Result<(), DirtyError> {
        remove_if_exists(&tmp_path(path))?;
        remove_if_exists(path)?;
        sync_parent(path)
    }

    /// Marks every region that `[offset, offset + len)` touches (in memory). An empty
    /// range marks nothing. A range past the end of the volume is refused whole.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<(), DirtyError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.region_shift;
        let last = (offset + len - 1) >> self.region_shift;
        self.set_bits(first, last + 1, true);
        Ok(())
    }

    /// Marks the whole volume (e.g. a target whose state is unknown).
    pub fn mark_all(&mut self) {
        self.set_bits(0, self.regions, true);
    }

    /// Clears the regions that `[offset, offset + len)` covers *entirely* (in memory);
    /// a region only partly covered stays dirty. The last region of a volume whose
    /// size is not a multiple of the region size counts as covered when the range
    /// reaches the end of the volume. A range past the end is refused whole.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> Result<(), DirtyError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let rs = self.region_size();
        let first = offset.div_ceil(rs);
        let stop = if end == self.volume_size {
            self.regions
        } else {
            end >> self.region_shift
        };
        if first < stop {
            self.set_bits(first, stop, false);
        }
        Ok(())
    }

    /// Whether any region that `[offset, offset + len)` touches is dirty. The part of
    /// the range past the end of the volume is ignored.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.volume_size {
            return false;
        }
        let end = offset.saturating_add(len).min(self.volume_size);
        let first = offset >> self.region_shift;
        let last = (end - 1) >> self.region_shift;
        self.find(first, true).is_some_and(|i| i <= last)
    }

    /// The first run of dirty regions at or after the region holding byte `from`, as
    /// `(offset, len)` in bytes, coalesced and clipped to the volume size. The offset
    /// is region-aligned, so it may be below `from`. For a resync loop that clears as
    /// it goes (the iterator of [`dirty_ranges`](Self::dirty_ranges) borrows the map).
    pub fn next_dirty_range(&self, from: u64) -> Option<(u64, u64)> {
        if from >= self.volume_size {
            return None;
        }
        let start = self.find(from >> self.region_shift, true)?;
        let stop = self.find(start, false).unwrap_or(self.regions);
        let off = start << self.region_shift;
        let end = (stop << self.region_shift).min(self.volume_size);
        Some((off, end - off))
    }

    /// All dirty runs, coalesced, in ascending order, as `(offset, len)` in bytes.
    pub fn dirty_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut from = 0u64;
        std::iter::from_fn(move || {
            let (off, len) = self.next_dirty_range(from)?;
            from = off + len;
            Some((off, len))
        })
    }

    /// Number of dirty regions.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes covered by dirty regions (the last, partial region counts its real size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.count << self.region_shift;
        let tail = self.volume_size & (self.region_size() - 1);
        if tail != 0 && self.bit(self.regions - 1) {
            bytes -= self.region_size() - tail;
        }
        bytes
    }

    /// Makes the current image durable: write `<path>.tmp`, fsync it, rename it over
    /// `<path>`, fsync the directory. Does nothing if nothing changed since the last
    /// successful flush. On error the memory image is intact and a later flush
    /// rewrites everything, so a failed flush can simply be retried.
    pub fn flush(&mut self) -> Result<(), DirtyError> {
        if !self.changed {
            return Ok(());
        }
        // Bumped per attempt, so two different images never share a generation even if
        // an attempt fails after its rename. Never to u64::MAX, which `open` refuses:
        // only a forged header gets this far.
        let Some(next) = self.generation.checked_add(1).filter(|&g| g != u64::MAX) else {
            return Err(DirtyError::BadHeader {
                path: self.path.clone(),
                field: "generation",
                message: format!("{}: no later image can be written", self.generation),
            });
        };
        self.generation = next;
        let image = self.encode();
        let tmp = tmp_path(&self.path);
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| DirtyError::Io {
                path: p,
                op,
                source,
            }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(&image).map_err(io("write", &tmp))?;
        // sync_all, not sync_data: the file is new, its size and inode must be durable.
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io("rename .tmp over", &self.path))?;
        sync_parent(&self.path)?;
        self.changed = false;
        Ok(())
    }

    /// Whether the memory image differs from the durable one.
    pub fn needs_flush(&self) -> bool {
        self.changed
    }

    /// Sets the two caller-defined sequence fields persisted with the map (on the
    /// next flush). Intended meaning, bitmap mode: `base_seq` = the target's durable
    /// ack when bitmap mode began, `through_seq` = every record up to it has been
    /// marked; failback: `base_seq` = the fork point. This module does not interpret
    /// them.
    pub fn set_seqs(&mut self, base_seq: u64, through_seq: u64) {
        if (base_seq, through_seq) != (self.base_seq, self.through_seq) {
            self.base_seq = base_seq;
            self.through_seq = through_seq;
            self.changed = true;
        }
    }

    pub fn base_seq(&self) -> u64 {
        self.base_seq
    }

    pub fn through_seq(&self) -> u64 {
        self.through_seq
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    pub fn region_size(&self) -> u64 {
        1 << self.region_shift
    }

    /// Number of regions (bits) in the map.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Generation of the last image written (1 after `create`, +1 per flush attempt).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DirtyError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.volume_size => Ok(()),
            _ => Err(DirtyError::OutOfRange {
                offset,
                len,
                volume_size: self.volume_size,
            }),
        }
    }

    fn bit(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets or clears bits `[start, stop)` (`stop <= regions`), word by word, keeping
    /// `count` exact.
    fn set_bits(&mut self, start: u64, stop: u64, value: bool) {
        let mut i = start;
        while i < stop {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (stop - (i - lo)).min(64); // exclusive, within this word
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.bits[w];
            let new = if value { old | mask } else { old & !mask };
            if new != old {
                let flipped = (old ^ new).count_ones() as u64;
                if value {
                    self.count += flipped;
                } else {
                    self.count -= flipped;
                }
                self.bits[w] = new;
                self.changed = true;
            }
            i = i - lo + hi;
        }
    }

    /// First region index `>= from` whose bit equals `value`, if any below `regions`.
    fn find(&self, from: u64, value: bool) -> Option<u64> {
        if from >= self.regions {
            return None;
        }
        let mut w = (from / 64) as usize;
        let flip = if value { 0 } else { u64::MAX };
        // Bits below `from` in the first word are masked out.
        let mut word = (self.bits[w] ^ flip) & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = w as u64 * 64 + word.trailing_zeros() as u64;
                return (i < self.regions).then_some(i);
            }
            w += 1;
            if w >= self.bits.len() {
                return None;
            }
            word = self.bits[w] ^ flip;
        }
    }

    fn header(&self, bitmap: &[u8]) -> Header {
        Header {
            region_size: self.region_size() as u32,
            volume_size: self.volume_size,
            generation: self.generation,
            base_seq: self.base_seq,
            through_seq: self.through_seq,
            dirty_count: self.count,
            bitmap_crc: bitmap_crc(self.generation, bitmap),
        }
    }

    /// The complete file image: header then bitmap.
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN + self.bits.len() * 8];
        for (dst, w) in out[HEADER_LEN..].chunks_exact_mut(8).zip(&self.bits) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        let h = self.header(&out[HEADER_LEN..]);
        out[..HEADER_LEN].copy_from_slice(&encode_header(&h));
        out
    }
}

fn check_geometry(volume_size: u64, region_size: u64) -> Result<(), String> {
    if !region_size.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size)
    {
        return Err(format!(
            "region_size {region_size} must be a power of two in {MIN_REGION_SIZE}..={MAX_REGION_SIZE}"
        ));
    }
    if volume_size == 0 {
        return Err("volume_size is 0".into());
    }
    let regions = region_count(volume_size, region_size.trailing_zeros());
    if regions > MAX_REGIONS {
        return Err(format!(
            "{regions} regions of {region_size} bytes exceed the limit of {MAX_REGIONS}; use larger regions"
        ));
    }
    Ok(())
}

fn region_count(volume_size: u64, shift: u32) -> u64 {
    volume_size.div_ceil(1u64 << shift)
}

fn words_for(regions: u64) -> usize {
    regions.div_ceil(64) as usize
}

/// CRC32C of the bitmap, salted with the image's generation (the CRC state is first
/// run over the 8 little-endian bytes of `generation`). Why: it binds the bitmap to
/// the header that names it, so a bitmap paired with another image's header (however
/// that might happen) does not validate even if both are intact.
fn bitmap_crc(generation: u64, bitmap: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), bitmap)
}

fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 10..12 flags: 0
    b[12..16].copy_from_slice(&h.region_size.to_le_bytes());
    b[16..24].copy_from_slice(&h.volume_size.to_le_bytes());
    b[24..32].copy_from_slice(&h.generation.to_le_bytes());
    b[32..40].copy_from_slice(&h.base_seq.to_le_bytes());
    b[40..48].copy_from_slice(&h.through_seq.to_le_bytes());
    b[48..56].copy_from_slice(&h.dirty_count.to_le_bytes());
    b[56..60].copy_from_slice(&h.bitmap_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Checks in this order: magic, header CRC, version, fields. The CRC comes before the
/// version because every version keeps magic, version and `header_crc` (over bytes
/// 0..60) where they are: a CRC-valid header with another version was written on
/// purpose by another ferryd, a CRC-invalid one is damage.
fn decode_header(path: &Path, b: &[u8; HEADER_LEN]) -> Result<Header, DirtyError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[0..8]);
    if magic != MAGIC {
        return Err(DirtyError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let stored = rd_u32(b, 60);
    let computed = crc32c::crc32c(&b[0..60]);
    if stored != computed {
        return Err(DirtyError::HeaderCrc {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    let version = rd_u16(b, 8);
    if version != FORMAT_VERSION {
        return Err(DirtyError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let bad = |field: &'static str, message: String| DirtyError::BadHeader {
        path: path.to_path_buf(),
        field,
        message,
    };
    let flags = rd_u16(b, 10);
    if flags != 0 {
        return Err(bad("flags", format!("{flags:#06x}, no flags are defined")));
    }
    let h = Header {
        region_size: rd_u32(b, 12),
        volume_size: rd_u64(b, 16),
        generation: rd_u64(b, 24),
        base_seq: rd_u64(b, 32),
        through_seq: rd_u64(b, 40),
        dirty_count: rd_u64(b, 48),
        bitmap_crc: rd_u32(b, 56),
    };
    check_geometry(h.volume_size, h.region_size as u64)
        .map_err(|m| bad("region_size/volume_size", m))?;
    if h.generation == 0 {
        return Err(bad(
            "generation",
            "0; the first image is generation 1".into(),
        ));
    }
    // `flush` bumps it: the last value would overflow there (or wrap to 0, which
    // this check refuses) instead of writing a newer image.
    if h.generation == u64::MAX {
        return Err(bad("generation", format!("{}, no later image", u64::MAX)));
    }
    let regions = region_count(h.volume_size, h.region_size.trailing_zeros());
    if h.dirty_count > regions {
        return Err(bad(
            "dirty_count",
            format!("{} exceeds the {regions} regions", h.dirty_count),
        ));
    }
    Ok(h)
}

/// `<path>.tmp` (the suffix is appended to the whole file name).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

fn remove_if_exists(p: &Path) -> Result<(), DirtyError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DirtyError::Io {
            path: p.to_path_buf(),
            op: "delete",
            source,
        }),
    }
}

/// fsync of the directory holding `path`, so a rename or delete in it is durable.
fn sync_parent(path: &Path) -> Result<(), DirtyError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DirtyError::Io {
            path: dir.to_path_buf(),
            op: "fsync directory",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RS: u64 = 4096;

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn create_mark_flush_reopen() {
        let d = tmpdir();
        let p = d.path().join("t1.vol0.dirty");
        let mut m = DirtyMap::create(&p, 10 * RS + 100, RS).unwrap();
        assert_eq!(m.regions(), 11);
        assert_eq!(m.count(), 0);
        assert_eq!(m.generation(), 1);
        m.mark(RS - 1, 2).unwrap(); // touches regions 0 and 1
        m.mark(10 * RS + 50, 1).unwrap(); // the partial last region
        assert_eq!(m.count(), 3);
        assert_eq!(m.dirty_bytes(), 2 * RS + 100);
        assert!(m.needs_flush());
        m.set_seqs(7, 42);
        m.flush().unwrap();
        assert!(!m.needs_flush());
        let r = DirtyMap::open(&p).unwrap();
        assert_eq!(r.count(), 3);
        assert_eq!(r.generation(), 2);
        assert_eq!((r.base_seq(), r.through_seq()), (7, 42));
        assert_eq!(
            r.dirty_ranges().collect::<Vec<_>>(),
            vec![(0, 2 * RS), (10 * RS, 100)]
        );
        assert!(r.is_dirty(0, 1));
        assert!(!r.is_dirty(2 * RS, 8 * RS));
        assert!(r.is_dirty(2 * RS, 8 * RS + 1));
        assert!(!r.is_dirty(20 * RS, 1));
    }

    #[test]
    fn flush_without_change_is_a_noop() {
        let d = tmpdir();
        let p = d.path().join("m");
        let mut m = DirtyMap::create(&p, RS * 8, RS).unwrap();
        m.flush().unwrap();
        assert_eq!(m.generation(), 1);
        m.mark(0, 1).unwrap();
        m.mark(0, 1).unwrap();
        m.flush().unwrap();
        assert_eq!(m.generation(), 2);
        m.mark(0, 1).unwrap(); // already dirty: no change
        assert!(!m.needs_flush());
    }

    #[test]
    fn clear_only_fully_covered_regions() {
        let d = tmpdir();
        let p = d.path().join("m");
        let mut m = DirtyMap::create(&p, 4 * RS + 10, RS).unwrap();
        m.mark_all();
        assert_eq!(m.count(), 5);
        m.clear_range(1, RS).unwrap(); // covers no region entirely
        assert_eq!(m.count(), 5);
        m.clear_range(0, 2 * RS - 1).unwrap(); // region 0 only
        assert_eq!(m.count(), 4);
        m.clear_range(4 * RS, 10).unwrap(); // partial last region, reaching the end
        assert_eq!(m.count(), 3);
        assert_eq!(m.dirty_ranges().collect::<Vec<_>>(), vec![(RS, 3 * RS)]);
        m.clear_range(0, 4 * RS + 10).unwrap();
        assert_eq!(m.count(), 0);
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn out_of_range_and_empty() {
        let d = tmpdir();
        let p = d.path().join("m");
        let mut m = DirtyMap::create(&p, 8 * RS, RS).unwrap();
        assert!(matches!(
            m.mark(8 * RS, 1),
            Err(DirtyError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.mark(u64::MAX, 2),
            Err(DirtyError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.clear_range(1, 8 * RS),
            Err(DirtyError::OutOfRange { .. })
        ));
        m.mark(8 * RS, 0).unwrap();
        m.mark(3 * RS, 0).unwrap();
        assert_eq!(m.count(), 0);
        assert!(!m.is_dirty(0, 0));
        assert_eq!(m.next_dirty_range(0), None);
    }

    #[test]
    fn invalid_parameters() {
        let d = tmpdir();
        let p = d.path().join("m");
        for (vs, rs) in [
            (1 << 20, 2048),
            (1 << 20, 3 * 4096),
            (1 << 20, 1 << 31),
            (0, 4096),
            (u64::MAX, 4096),
        ] {
            assert!(
                matches!(
                    DirtyMap::create(&p, vs, rs),
                    Err(DirtyError::InvalidParams { .. })
                ),
                "{vs} {rs}"
            );
        }
        assert!(!p.exists());
    }

    #[test]
    fn large_map_word_boundaries() {
        let d = tmpdir();
        let p = d.path().join("m");
        // 1000 regions: 16 words, the last one partly used.
        let mut m = DirtyMap::create(&p, 1000 * RS, RS).unwrap();
        m.mark(63 * RS, 2 * RS).unwrap(); // regions 63, 64: across a word boundary
        m.mark(128 * RS, 128 * RS).unwrap(); // two whole words
        m.mark(999 * RS, RS).unwrap();
        m.flush().unwrap();
        let r = DirtyMap::open(&p).unwrap();
        assert_eq!(
            r.dirty_ranges().collect::<Vec<_>>(),
            vec![(63 * RS, 2 * RS), (128 * RS, 128 * RS), (999 * RS, RS)]
        );
        assert_eq!(r.count(), 2 + 128 + 1);
        assert_eq!(r.next_dirty_range(64 * RS + 5), Some((64 * RS, RS)));
        assert_eq!(r.next_dirty_range(1000 * RS), None);
    }

    /// Pins the encoding: any change to the layout, CRC definitions or field order
    /// changes these bytes and must come with a version bump (DIRTY-FORMAT.md).
    #[test]
    fn golden_bytes() {
        let d = tmpdir();
        let p = d.path().join("golden");
        // 65 regions of 4 KiB, the last one 100 bytes: two bitmap words.
        let mut m = DirtyMap::create(&p, 64 * RS + 100, RS).unwrap();
        m.mark(0, 1).unwrap(); // region 0
        m.mark(RS * 8, RS * 2).unwrap(); // regions 8, 9
        m.mark(64 * RS, 1).unwrap(); // region 64 (bit 0 of word 1)
        m.set_seqs(0x1122, 0x3344);
        m.flush().unwrap();
        let bytes = fs::read(&p).unwrap();
        let expected: Vec<u8> = [
            &b"FERRYDRT"[..],
            &[1, 0],                         // version
            &[0, 0],                         // flags
            &[0x00, 0x10, 0, 0],             // region_size 4096
            &[0x64, 0, 0x04, 0, 0, 0, 0, 0], // volume_size 0x40064
            &[2, 0, 0, 0, 0, 0, 0, 0],       // generation
            &[0x22, 0x11, 0, 0, 0, 0, 0, 0], // base_seq
            &[0x44, 0x33, 0, 0, 0, 0, 0, 0], // through_seq
            &[4, 0, 0, 0, 0, 0, 0, 0],       // dirty_count
            &GOLDEN_BITMAP_CRC,              // bitmap_crc
            &GOLDEN_HEADER_CRC,              // header_crc
            &[0x01, 0x03, 0, 0, 0, 0, 0, 0], // word 0: bits 0, 8, 9
            &[0x01, 0, 0, 0, 0, 0, 0, 0],    // word 1: bit 0 (region 64)
        ]
        .concat();
        assert_eq!(bytes, expected);
        // The CRCs above are literals; check they follow the documented definitions.
        assert_eq!(
            u32::from_le_bytes(GOLDEN_BITMAP_CRC),
            crc32c::crc32c_append(crc32c::crc32c(&2u64.to_le_bytes()), &bytes[64..])
        );
        assert_eq!(
            u32::from_le_bytes(GOLDEN_HEADER_CRC),
            crc32c::crc32c(&bytes[0..60])
        );
    }
    const GOLDEN_BITMAP_CRC: [u8; 4] = [0xd9, 0x68, 0x2b, 0xe6];
    const GOLDEN_HEADER_CRC: [u8; 4] = [0x9f, 0xa2, 0x3e, 0xb6];

    // ------------------------------------------------------------ corrupt files

    fn sample(d: &tempfile::TempDir) -> PathBuf {
        let p = d.path().join("m");
        let mut m = DirtyMap::create(&p, 200 * RS, RS).unwrap();
        m.mark(5 * RS, 70 * RS).unwrap();
        m.flush().unwrap();
        p
    }

    fn rewrite(p: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = fs::read(p).unwrap();
        f(&mut b);
        fs::write(p, b).unwrap();
    }

    /// Recomputes the header CRC, to build CRC-valid headers with bad fields.
    fn reseal(b: &mut [u8]) {
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Found by the `dirty_map` fuzz target (fuzz/): a CRC-valid map at the largest
    /// generation opened, and its next flush overflowed `generation += 1`; one below
    /// it flushed an image that `open` then refused.
    #[test]
    fn largest_generation_is_refused_on_open() {
        let d = tmpdir();
        let p = sample(&d);
        rewrite(&p, |b| {
            b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
            let crc = bitmap_crc(u64::MAX, &b[HEADER_LEN..]);
            b[56..60].copy_from_slice(&crc.to_le_bytes());
            reseal(b);
        });
        let e = DirtyMap::open(&p).expect_err("generation u64::MAX accepted");
        assert!(
            matches!(
                e,
                DirtyError::BadHeader {
                    field: "generation",
                    ..
                }
            ),
            "{e}"
        );
        // One below opens, but its flush must not write the image open refuses.
        rewrite(&p, |b| {
            b[24..32].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
            let crc = bitmap_crc(u64::MAX - 1, &b[HEADER_LEN..]);
            b[56..60].copy_from_slice(&crc.to_le_bytes());
            reseal(b);
        });
        let mut m = DirtyMap::open(&p).expect("generation u64::MAX - 1 opens");
        m.mark_all();
        let e = m.flush().expect_err("flush to generation u64::MAX");
        assert!(
            matches!(
                e,
                DirtyError::BadHeader {
                    field: "generation",
                    ..
                }
            ),
            "{e}"
        );
        DirtyMap::open(&p).expect("the image on disk is untouched");
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let d = tmpdir();
        let p = sample(&d);
        let good = fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x40;
            fs::write(&p, &b).unwrap();
            let e = DirtyMap::open(&p).expect_err("flipped byte accepted");
            let expected_kind = match i {
                0..=7 => matches!(e, DirtyError::BadMagic { .. }),
                8..=63 => matches!(e, DirtyError::HeaderCrc { .. }),
                _ => matches!(e, DirtyError::BitmapCrc { .. }),
            };
            assert!(expected_kind, "byte {i}: {e}");
        }
    }

    #[test]
    fn truncated_files() {
        let d = tmpdir();
        let p = sample(&d);
        let good = fs::read(&p).unwrap();
        for len in [0, 1, 63, 64, 65, good.len() - 1] {
            fs::write(&p, &good[..len]).unwrap();
            let e = DirtyMap::open(&p).unwrap_err();
            assert!(
                matches!(e, DirtyError::Truncated { len: l, .. } if l == len as u64),
                "{len}: {e}"
            );
        }
        fs::write(&p, [&good[..], &[0u8][..]].concat()).unwrap();
        assert!(matches!(
            DirtyMap::open(&p),
            Err(DirtyError::TrailingData { .. })
        ));
    }

    #[test]
    fn wrong_version_and_bad_fields() {
        let d = tmpdir();
        let p = sample(&d);
        rewrite(&p, |b| {
            b[8..10].copy_from_slice(&2u16.to_le_bytes());
            reseal(b);
        });
        let e = DirtyMap::open(&p).unwrap_err();
        assert!(
            matches!(e, DirtyError::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("version 2"), "{e}");

        type Edit = fn(&mut Vec<u8>);
        let cases: [(&str, Edit); 5] = [
            ("flags", |b| b[10] = 1),
            ("region_size", |b| {
                b[12..16].copy_from_slice(&3000u32.to_le_bytes())
            }),
            ("region_size", |b| {
                b[16..24].copy_from_slice(&0u64.to_le_bytes())
            }),
            ("generation", |b| {
                b[24..32].copy_from_slice(&0u64.to_le_bytes())
            }),
            ("dirty_count", |b| {
                b[48..56].copy_from_slice(&201u64.to_le_bytes())
            }),
        ];
        for (field, f) in cases {
            let p = sample(&d);
            rewrite(&p, |b| {
                f(b);
                reseal(b);
            });
            let e = DirtyMap::open(&p).unwrap_err();
            assert!(
                matches!(&e, DirtyError::BadHeader { field: got, .. } if got.starts_with(field)),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn crc_valid_but_inconsistent_bitmap() {
        let d = tmpdir();
        // A count that disagrees with the bits.
        let p = sample(&d);
        rewrite(&p, |b| {
            b[48..56].copy_from_slice(&3u64.to_le_bytes());
            reseal(b);
        });
        assert!(matches!(
            DirtyMap::open(&p),
            Err(DirtyError::Inconsistent { .. })
        ));
        // A padding bit past the last region (200 regions: word 3 uses 8 bits).
        let p = sample(&d);
        rewrite(&p, |b| {
            b[64 + 3 * 8 + 1] |= 1; // region 200
            let gen = rd_u64(b, 24);
            let crc = bitmap_crc(gen, &b[64..]);
            b[56..60].copy_from_slice(&crc.to_le_bytes());
            let n = rd_u64(b, 48) + 1;
            b[48..56].copy_from_slice(&n.to_le_bytes());
            reseal(b);
        });
        let e = DirtyMap::open(&p).unwrap_err();
        assert!(matches!(e, DirtyError::Inconsistent { .. }), "{e}");
        // A bitmap from another generation (same bits, salt differs).
        let p = sample(&d);
        rewrite(&p, |b| {
            let gen = rd_u64(b, 24) + 1;
            b[24..32].copy_from_slice(&gen.to_le_bytes());
            reseal(b);
        });
        assert!(matches!(
            DirtyMap::open(&p),
            Err(DirtyError::BitmapCrc { .. })
        ));
    }

    #[test]
    fn not_a_map_and_missing() {
        let d = tmpdir();
        let p = d.path().join("m");
        fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            DirtyMap::open(&p),
            Err(DirtyError::BadMagic { .. })
        ));
        let e = DirtyMap::open(&d.path().join("absent")).unwrap_err();
        assert!(
            matches!(&e, DirtyError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
    }

    // ------------------------------------------------------------ crash safety

    #[test]
    fn leftover_tmp_is_ignored_and_deleted() {
        let d = tmpdir();
        let p = d.path().join("m");
        let mut m = DirtyMap::create(&p, 16 * RS, RS).unwrap();
        m.mark(0, RS).unwrap();
        m.flush().unwrap();
        // A crash mid-flush of a later image: a half-written tmp (any content).
        let mut newer = m.encode();
        newer.truncate(70);
        fs::write(tmp_path(&p), &newer).unwrap();
        let r = DirtyMap::open(&p).unwrap();
        assert_eq!(r.dirty_ranges().collect::<Vec<_>>(), vec![(0, RS)]);
        assert!(!tmp_path(&p).exists());
        // A complete tmp whose rename never happened is also discarded: that flush
        // never returned, so the older image is the promised one.
        let mut m = r;
        m.mark(5 * RS, RS).unwrap();
        m.generation += 1;
        fs::write(tmp_path(&p), m.encode()).unwrap();
        let r = DirtyMap::open(&p).unwrap();
        assert_eq!(r.count(), 1);
        assert!(!tmp_path(&p).exists());
        // The flush after reopening works over a stale tmp too.
        fs::write(tmp_path(&p), b"junk").unwrap();
        let mut m = r;
        m.mark(5 * RS, RS).unwrap();
        m.flush().unwrap();
        assert_eq!(DirtyMap::open(&p).unwrap().count(), 2);
    }

    #[test]
    fn tmp_without_a_map_means_never_created() {
        let d = tmpdir();
        let p = d.path().join("m");
        fs::write(tmp_path(&p), b"partial create").unwrap();
        assert!(matches!(DirtyMap::open(&p), Err(DirtyError::Io { .. })));
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn remove_deletes_map_and_tmp() {
        let d = tmpdir();
        let p = d.path().join("m");
        DirtyMap::create(&p, 16 * RS, RS).unwrap();
        fs::write(tmp_path(&p), b"x").unwrap();
        DirtyMap::remove(&p).unwrap();
        assert!(!p.exists() && !tmp_path(&p).exists());
        DirtyMap::remove(&p).unwrap(); // idempotent
    }

    #[test]
    fn failed_flush_keeps_memory_and_retries() {
        let d = tmpdir();
        let p = d.path().join("m");
        let mut m = DirtyMap::create(&p, 16 * RS, RS).unwrap();
        m.mark(3 * RS, 1).unwrap();
        // Make the tmp path a directory so creating the tmp file fails.
        fs::create_dir(tmp_path(&p)).unwrap();
        assert!(matches!(m.flush(), Err(DirtyError::Io { .. })));
        assert!(m.needs_flush());
        fs::remove_dir(tmp_path(&p)).unwrap();
        m.flush().unwrap();
        let r = DirtyMap::open(&p).unwrap();
        assert_eq!(r.dirty_ranges().collect::<Vec<_>>(), vec![(3 * RS, RS)]);
        assert_eq!(r.generation(), 3); // the failed attempt consumed generation 2
    }

    // ------------------------------------------------------------ model tests

    #[derive(Debug, Clone)]
    enum Step {
        Mark(u64, u64),
        Clear(u64, u64),
        MarkAll,
        Flush,
    }

    fn step(vs: u64) -> impl Strategy<Value = Step> {
        let range = (0..=vs).prop_flat_map(move |o| (Just(o), 0..=(vs - o)));
        prop_oneof![
            4 => range.clone().prop_map(|(o, l)| Step::Mark(o, l)),
            4 => range.prop_map(|(o, l)| Step::Clear(o, l)),
            1 => Just(Step::MarkAll),
            2 => Just(Step::Flush),
        ]
    }

    /// Ranges of the model's dirty regions, coalesced and clipped, by brute force.
    fn model_ranges(model: &[bool], rs: u64, vs: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &d) in model.iter().enumerate() {
            if !d {
                continue;
            }
            let off = i as u64 * rs;
            let len = rs.min(vs - off);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_a_bool_per_region_model(
            (vs, steps) in (1u64..=300 * 4096).prop_flat_map(|vs| {
                (Just(vs), proptest::collection::vec(step(vs), 0..40))
            })
        ) {
            let d = tmpdir();
            let p = d.path().join("m");
            let mut m = DirtyMap::create(&p, vs, RS).unwrap();
            let n = vs.div_ceil(RS) as usize;
            let mut model = vec![false; n];
            let mut durable = model.clone();
            for s in steps {
                match s {
                    Step::Mark(o, l) => {
                        m.mark(o, l).unwrap();
                        if l > 0 {
                            for r in (o / RS)..=((o + l - 1) / RS) {
                                model[r as usize] = true;
                            }
                        }
                    }
                    Step::Clear(o, l) => {
                        m.clear_range(o, l).unwrap();
                        for (r, bit) in model.iter_mut().enumerate() {
                            let rs = r as u64 * RS;
                            let re = (rs + RS).min(vs);
                            if o <= rs && re <= o + l {
                                *bit = false;
                            }
                        }
                    }
                    Step::MarkAll => {
                        m.mark_all();
                        model.iter_mut().for_each(|b| *b = true);
                    }
                    Step::Flush => {
                        m.flush().unwrap();
                        durable = model.clone();
                    }
                }
                let want = model_ranges(&model, RS, vs);
                prop_assert_eq!(m.dirty_ranges().collect::<Vec<_>>(), want.clone());
                prop_assert_eq!(m.count(), model.iter().filter(|b| **b).count() as u64);
                prop_assert_eq!(m.dirty_bytes(), want.iter().map(|r| r.1).sum::<u64>());
            }
            for (r, &bit) in model.iter().enumerate() {
                prop_assert_eq!(m.is_dirty(r as u64 * RS, 1), bit);
            }
            // Reopen: exactly the last flushed image.
            drop(m);
            let r = DirtyMap::open(&p).unwrap();
            prop_assert_eq!(r.dirty_ranges().collect::<Vec<_>>(), model_ranges(&durable, RS, vs));
        }
    }
}
