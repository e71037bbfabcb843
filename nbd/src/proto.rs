//! Pure NBD wire encoding/decoding: fixed newstyle handshake, simple,
//! structured and extended replies, compact and extended requests, and the
//! metadata-context option payloads.
//!
//! Nothing in here performs I/O: every function takes or returns byte
//! buffers so that the parsing rules can be unit-tested and fuzzed in
//! isolation, and so that the server's I/O code never has to interpret raw
//! network bytes itself. All decoders are total: malformed input yields an
//! error value, never a panic.
//!
//! Constants are taken from `doc/proto.md` of the NetworkBlockDevice/nbd
//! repository.

use super::ExportFlags;

// ---- magics ----------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server in the greeting and by the client before
/// every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic prefixed to every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC` (compact, non-extended headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_EXTENDED_REQUEST_MAGIC` (32-byte requests after EXTENDED_HEADERS).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_STRUCTURED_REPLY_MAGIC` (20-byte chunk headers).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC` (32-byte chunk headers).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- handshake flags -------------------------------------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- transmission flags ----------------------------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- options ---------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands --------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- structured / extended replies -----------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---- metadata contexts -----------------------------------------------------

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its context id (ids are per connection and opaque to the client; one
/// context needs one fixed id).
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// ---- error values (NBD-defined, not host errno) -----------------------------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---- sizes -----------------------------------------------------------------

/// Server greeting: NBDMAGIC + IHAVEOPT + handshake flags.
pub const GREETING_LEN: usize = 18;
/// Client option header: IHAVEOPT + option + length.
pub const OPT_HEADER_LEN: usize = 16;
/// Request header (compact form).
pub const REQUEST_LEN: usize = 28;
/// Request header (extended form).
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// The spec caps strings (export names, messages) at 4096 bytes.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload we are willing to buffer. GO/INFO carry a name
/// (<= 4096) plus a list of 16-bit info requests; 8 KiB leaves room for any
/// sane request list while bounding what a hostile client can make us
/// allocate during the handshake.
pub const MAX_OPTION_LEN: u32 = 8192;

/// The server greeting sent on connect.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Client flags after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decode the client's 32-bit flags. The spec requires the server to drop
/// the connection on unknown bits, hence `Err` carries the offending value.
pub fn decode_client_flags(b: [u8; 4]) -> Result<ClientFlags, u32> {
    let v = u32::from_be_bytes(b);
    if v & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(v);
    }
    Ok(ClientFlags {
        fixed_newstyle: v & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: v & FLAG_C_NO_ZEROES != 0,
    })
}

/// Option header sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptHeader {
    pub option: u32,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptHeaderError {
    #[error("bad option magic {0:#018x}")]
    BadMagic(u64),
}

pub fn decode_opt_header(b: &[u8; OPT_HEADER_LEN]) -> Result<OptHeader, OptHeaderError> {
    let magic = be_u64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(OptHeaderError::BadMagic(magic));
    }
    Ok(OptHeader {
        option: be_u32(&b[8..12]),
        len: be_u32(&b[12..16]),
    })
}

/// Encode a fixed-newstyle option reply (header + payload).
pub fn encode_opt_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    // Payloads we build are bounded (names <= 4096, infos of fixed size), so
    // the length always fits; saturate rather than panic regardless.
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `NBD_REP_SERVER` payload for `NBD_OPT_LIST`.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_INFO_EXPORT` payload.
pub fn encode_info_export(size: u64, tflags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&tflags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` payload.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + name.len());
    v.extend_from_slice(&INFO_NAME.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and (unless
/// NO_ZEROES was negotiated) 124 reserved zero bytes.
pub fn encode_export_name_reply(size: u64, tflags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + 124);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        v.resize(10 + 124, 0);
    }
    v
}

/// Parsed payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoRequestError {
    /// Lengths inconsistent with the option length, or the name is not UTF-8.
    #[error("malformed INFO/GO payload: {0}")]
    Invalid(&'static str),
    /// Export name longer than the spec's 4096-byte string limit.
    #[error("export name too long ({0} bytes)")]
    TooBig(u32),
}

/// Decode the GO/INFO payload:
/// `u32 name_len, name, u16 n, n * u16 info type`, with the total length
/// required to match exactly (the spec leaves no room for trailing bytes).
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, InfoRequestError> {
    let name_len = data
        .get(0..4)
        .map(be_u32)
        .ok_or(InfoRequestError::Invalid("shorter than name length field"))?;
    if name_len as usize > MAX_STRING_LEN {
        return Err(InfoRequestError::TooBig(name_len));
    }
    let name_end = 4usize + name_len as usize;
    let name = data.get(4..name_end).ok_or(InfoRequestError::Invalid(
        "name length exceeds option length",
    ))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| InfoRequestError::Invalid("export name is not UTF-8"))?;
    let n = data
        .get(name_end..name_end + 2)
        .map(be_u16)
        .ok_or(InfoRequestError::Invalid("missing info request count"))?;
    let list = &data[name_end + 2..];
    if list.len() != 2 * n as usize {
        return Err(InfoRequestError::Invalid(
            "info request count does not match option length",
        ));
    }
    Ok(InfoRequest {
        name: name.to_owned(),
        infos: list.chunks_exact(2).map(be_u16).collect(),
    })
}

/// Header style negotiated during the handshake; decides the request
/// header size and every reply's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Mode {
    /// No option negotiated: compact requests, simple replies only.
    #[default]
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: compact requests, structured chunks for
    /// reads and block status (simple replies allowed for the rest).
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests with 64-bit lengths,
    /// every reply an extended chunk.
    Extended,
}

impl Mode {
    /// Length of a request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            Mode::Extended => EXTENDED_REQUEST_LEN,
            _ => REQUEST_LEN,
        }
    }
}

/// What the server advertises for an export on one connection: the
/// export's own capabilities plus what the negotiated mode makes possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub flags: ExportFlags,
    pub mode: Mode,
}

/// Transmission flags advertised for an export. Only what the export can
/// actually do is advertised: the client is allowed to rely on every bit.
/// CACHE is always advertised (an export without a cache hook accepts it
/// as a no-op, which the spec allows); FAST_ZERO with WRITE_ZEROES (an
/// export whose zeroing is not fast answers fast requests with ENOTSUP at
/// once, which the spec counts as a fast answer); DF once replies can be
/// chunked.
pub fn transmission_flags(c: &Caps) -> u16 {
    let f = &c.flags;
    let mut t = TFLAG_HAS_FLAGS | TFLAG_SEND_CACHE;
    if f.read_only {
        t |= TFLAG_READ_ONLY;
    }
    if f.send_flush {
        t |= TFLAG_SEND_FLUSH;
    }
    if f.send_fua {
        t |= TFLAG_SEND_FUA;
    }
    if f.can_trim && !f.read_only {
        t |= TFLAG_SEND_TRIM;
    }
    if f.can_write_zeroes && !f.read_only {
        t |= TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if f.can_multi_conn {
        t |= TFLAG_CAN_MULTI_CONN;
    }
    if c.mode != Mode::Simple {
        t |= TFLAG_SEND_DF;
    }
    t
}

/// A decoded request header (either form). `len` is 64 bits wide because
/// extended requests carry 64-bit effect lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u64,
}

impl Request {
    /// Bytes of payload that follow this header on the wire: a WRITE's data
    /// (compact form), or whatever PAYLOAD_LEN announces (extended form).
    ///
    /// A WRITE always carries its data: the spec says an extended-mode
    /// client MUST set PAYLOAD_LEN on it, but qemu's client (10.0) does not,
    /// and qemu's server accepts that; so do we.
    pub fn payload_len(&self, mode: Mode) -> u64 {
        let has_payload = self.typ == CMD_WRITE
            || (mode == Mode::Extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if has_payload {
            self.len
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

/// Decode a compact (28-byte) request header.
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, RequestError> {
    let magic = be_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    Ok(Request {
        flags: be_u16(&b[4..6]),
        typ: be_u16(&b[6..8]),
        handle: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        len: u64::from(be_u32(&b[24..28])),
    })
}

/// Decode a request header of the negotiated form; `b` holds exactly
/// `mode.request_len()` bytes (anything else is a bad header).
pub fn decode_request_in(mode: Mode, b: &[u8]) -> Result<Request, RequestError> {
    if mode != Mode::Extended {
        let a: &[u8; REQUEST_LEN] = b.try_into().map_err(|_| RequestError::BadMagic(0))?;
        return decode_request(a);
    }
    if b.len() != EXTENDED_REQUEST_LEN {
        return Err(RequestError::BadMagic(0));
    }
    let magic = be_u32(&b[0..4]);
    if magic != EXTENDED_REQUEST_MAGIC {
        return Err(RequestError::BadMagic(magic));
    }
    Ok(Request {
        flags: be_u16(&b[4..6]),
        typ: be_u16(&b[6..8]),
        handle: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        len: be_u64(&b[24..32]),
    })
}

/// Encode a compact request header (used by the test client and the fuzz
/// tests). The compact form has 32 length bits: larger lengths are cut to
/// their low 32 bits, which is exactly what a misbehaving client would send.
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.typ.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&(r.len as u32).to_be_bytes());
    b
}

/// Encode an extended request header.
pub fn encode_extended_request(r: &Request) -> [u8; EXTENDED_REQUEST_LEN] {
    let mut b = [0u8; EXTENDED_REQUEST_LEN];
    b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.typ.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..32].copy_from_slice(&r.len.to_be_bytes());
    b
}

pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Longest chunk head [`encode_chunk`] produces: an extended header plus
/// the fixed part of an OFFSET_HOLE payload.
pub const MAX_CHUNK_HEAD: usize = EXTENDED_REPLY_LEN + 12;

/// A reply chunk's header followed by the fixed part of its payload,
/// inline; the variable part (data, extents, message) travels separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    buf: [u8; MAX_CHUNK_HEAD],
    len: u8,
}

impl ChunkHead {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// Mark this chunk as the reply's last (`NBD_REPLY_FLAG_DONE`).
    pub fn set_done(&mut self) {
        self.buf[5] |= REPLY_FLAG_DONE as u8;
    }
}

/// Identifies the request a chunk answers (extended headers echo its offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTo {
    pub mode: Mode,
    pub handle: u64,
    pub req_offset: u64,
}

/// Encode a structured (mode Structured) or extended (mode Extended) chunk
/// header whose payload is `fixed` followed by `rest_len` more bytes.
/// `fixed` is at most 12 bytes (callers pass constant-size prefixes).
pub fn encode_chunk(to: ChunkTo, flags: u16, typ: u16, fixed: &[u8], rest_len: usize) -> ChunkHead {
    let mut h = ChunkHead {
        buf: [0u8; MAX_CHUNK_HEAD],
        len: 0,
    };
    let fixed = &fixed[..fixed.len().min(12)];
    let payload = (fixed.len() + rest_len) as u64;
    let b = &mut h.buf;
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&to.handle.to_be_bytes());
    let hl = if to.mode == Mode::Extended {
        b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b[16..24].copy_from_slice(&to.req_offset.to_be_bytes());
        b[24..32].copy_from_slice(&payload.to_be_bytes());
        EXTENDED_REPLY_LEN
    } else {
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        // Payloads are bounded by the maximum payload plus a fixed overhead
        // in compact mode, so they fit; saturate rather than wrap anyway.
        let p = u32::try_from(payload).unwrap_or(u32::MAX);
        b[16..20].copy_from_slice(&p.to_be_bytes());
        STRUCTURED_REPLY_LEN
    };
    b[hl..hl + fixed.len()].copy_from_slice(fixed);
    h.len = (hl + fixed.len()) as u8;
    h
}

/// OFFSET_DATA chunk head; the `len` data bytes follow it.
pub fn encode_offset_data(to: ChunkTo, done: bool, offset: u64, len: usize) -> ChunkHead {
    encode_chunk(
        to,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        &offset.to_be_bytes(),
        len,
    )
}

/// OFFSET_HOLE chunk (complete).
pub fn encode_offset_hole(to: ChunkTo, done: bool, offset: u64, len: u32) -> ChunkHead {
    let mut p = [0u8; 12];
    p[0..8].copy_from_slice(&offset.to_be_bytes());
    p[8..12].copy_from_slice(&len.to_be_bytes());
    encode_chunk(to, done_flag(done), REPLY_TYPE_OFFSET_HOLE, &p, 0)
}

/// NONE chunk with DONE: success without payload.
pub fn encode_none(to: ChunkTo) -> ChunkHead {
    encode_chunk(to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[], 0)
}

/// Payload of an ERROR (no offset) or ERROR_OFFSET chunk: error, message
/// length, message, then the offset if any. Messages are cut to the
/// spec's 4096-byte string limit.
pub fn error_payload(error: u32, msg: &str, offset: Option<u64>) -> Vec<u8> {
    let mut m = msg.as_bytes();
    if m.len() > MAX_STRING_LEN {
        let mut end = MAX_STRING_LEN;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        m = &m[..end];
    }
    let mut v = Vec::with_capacity(6 + m.len() + 8);
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(m.len() as u16).to_be_bytes());
    v.extend_from_slice(m);
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

/// Head of an error chunk whose payload is [`error_payload`]'s output.
pub fn encode_error(to: ChunkTo, done: bool, with_offset: bool, payload_len: usize) -> ChunkHead {
    let typ = if with_offset {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    encode_chunk(to, done_flag(done), typ, &[], payload_len)
}

/// One `base:allocation` extent as sent in a status chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u64,
    pub flags: u32,
}

/// Payload of a BLOCK_STATUS (compact) or BLOCK_STATUS_EXT (extended)
/// chunk for one context. Compact descriptors carry 32-bit lengths: the
/// caller passes lengths that fit (a compact request's length does).
pub fn block_status_payload(mode: Mode, context: u32, d: &[Descriptor]) -> (u16, Vec<u8>) {
    if mode == Mode::Extended {
        let mut v = Vec::with_capacity(8 + 16 * d.len());
        v.extend_from_slice(&context.to_be_bytes());
        v.extend_from_slice(&(d.len() as u32).to_be_bytes());
        for e in d {
            v.extend_from_slice(&e.len.to_be_bytes());
            v.extend_from_slice(&u64::from(e.flags).to_be_bytes());
        }
        (REPLY_TYPE_BLOCK_STATUS_EXT, v)
    } else {
        let mut v = Vec::with_capacity(4 + 8 * d.len());
        v.extend_from_slice(&context.to_be_bytes());
        for e in d {
            v.extend_from_slice(&u32::try_from(e.len).unwrap_or(u32::MAX).to_be_bytes());
            v.extend_from_slice(&e.flags.to_be_bytes());
        }
        (REPLY_TYPE_BLOCK_STATUS, v)
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Parsed payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// Decode `u32 name_len, name, u32 n, n * (u32 len, query)`; the total
/// must match exactly and every string must be UTF-8 within 4096 bytes.
pub fn decode_meta_request(data: &[u8]) -> Result<MetaRequest, &'static str> {
    let mut rest = data;
    let name = take_string(&mut rest)?;
    let n = take_u32(&mut rest)?;
    // Each query needs at least its 4-byte length: a count beyond that is
    // a lie, and checking first bounds the allocation below.
    if n as usize > rest.len() / 4 {
        return Err("query count exceeds option length");
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(take_string(&mut rest)?);
    }
    if !rest.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(MetaRequest { name, queries })
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, &'static str> {
    let v = rest.get(0..4).map(be_u32).ok_or("truncated length field")?;
    *rest = &rest[4..];
    Ok(v)
}

fn take_string(rest: &mut &[u8]) -> Result<String, &'static str> {
    let n = take_u32(rest)? as usize;
    if n > MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    let s = rest.get(..n).ok_or("string length exceeds option length")?;
    let s = std::str::from_utf8(s).map_err(|_| "string is not UTF-8")?;
    *rest = &rest[n..];
    Ok(s.to_owned())
}

/// `NBD_REP_META_CONTEXT` payload.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Whether a LIST query names `base:allocation` (exactly, or via the
/// `base:` namespace wildcard the spec requires for LIST).
pub fn list_query_matches(q: &str) -> bool {
    q == BASE_ALLOCATION || q == "base:"
}

/// Per-connection facts request validation depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub size: u64,
    pub caps: Caps,
    /// The export zeroes faster than it writes (FAST_ZERO may proceed).
    pub fast_zero: bool,
    pub max_payload: u32,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

/// What the server must do with a request after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        len: u32,
        /// NBD_CMD_FLAG_DF: one content chunk.
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    /// Zero-length data command inside the export: reply success without
    /// calling the export. The spec leaves zero-length behaviour
    /// unspecified; a no-op is what qemu-nbd does and cannot hurt.
    Noop,
    Disconnect,
}

/// Flags valid per command, before negotiation is taken into account.
fn flags_allowed(typ: u16) -> u16 {
    let per_cmd = match typ {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    // FUA is valid on every command once SEND_FUA is advertised (spec:
    // "the server MUST accept all commands with this bit set"); the
    // caller checks that. PAYLOAD_LEN is checked against the mode.
    CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN | per_cmd
}

/// Validate a request against the export and the negotiated session.
/// `Err(errno)` is the NBD error for the reply. Whether a payload must still
/// be consumed is the caller's concern ([`Request::payload_len`]).
pub fn validate_request(r: &Request, s: &Session) -> Result<Action, u32> {
    let f = &s.caps.flags;
    let tflags = transmission_flags(&s.caps);
    let known = CMD_FLAG_FUA
        | CMD_FLAG_NO_HOLE
        | CMD_FLAG_DF
        | CMD_FLAG_REQ_ONE
        | CMD_FLAG_FAST_ZERO
        | CMD_FLAG_PAYLOAD_LEN;
    if r.flags & !known != 0 || r.flags & !flags_allowed(r.typ) != 0 {
        return Err(EINVAL);
    }
    if r.flags & CMD_FLAG_FUA != 0 && tflags & TFLAG_SEND_FUA == 0 {
        return Err(EINVAL);
    }
    // DF needs chunked replies; PAYLOAD_LEN exists only in extended mode
    // and only WRITE takes a payload here (no BLOCK_STATUS_PAYLOAD).
    if r.flags & CMD_FLAG_DF != 0 && tflags & TFLAG_SEND_DF == 0 {
        return Err(EINVAL);
    }
    // PAYLOAD_LEN: extended mode only, and only WRITE takes a payload here
    // (optional there, see `Request::payload_len`).
    if r.flags & CMD_FLAG_PAYLOAD_LEN != 0 && (s.caps.mode != Mode::Extended || r.typ != CMD_WRITE)
    {
        return Err(EINVAL);
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    match r.typ {
        CMD_DISC => return Ok(Action::Disconnect),
        CMD_FLUSH => {
            if tflags & TFLAG_SEND_FLUSH == 0 {
                return Err(EINVAL);
            }
            // offset/length are reserved; accept non-zero values leniently
            // because there is nothing they could mean.
            return Ok(Action::Flush);
        }
        CMD_READ | CMD_CACHE => {}
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => check_writable(r, f, tflags, s.fast_zero)?,
        CMD_BLOCK_STATUS => {
            if !s.block_status {
                return Err(EINVAL);
            }
            // A zero-length query could not be answered with the one
            // non-empty extent a successful reply needs.
            if r.len == 0 {
                return Err(EINVAL);
            }
        }
        // RESIZE and anything unknown: not advertised.
        _ => return Err(EINVAL),
    }
    if (r.typ == CMD_READ || r.typ == CMD_WRITE) && r.len > u64::from(s.max_payload) {
        return Err(EINVAL);
    }
    let end = r.offset.checked_add(r.len).ok_or(EINVAL)?;
    if end > s.size {
        // Spec: writes beyond the end SHOULD fail with ENOSPC; everything
        // else out of range is an invalid argument.
        return Err(if r.typ == CMD_WRITE || r.typ == CMD_WRITE_ZEROES {
            ENOSPC
        } else {
            EINVAL
        });
    }
    if r.len == 0 {
        return Ok(Action::Noop);
    }
    Ok(action_for(r, fua))
}

/// Write-type checks: read-only exports, advertised capabilities, and the
/// fast-zero promise.
fn check_writable(r: &Request, f: &ExportFlags, tflags: u16, fast_zero: bool) -> Result<(), u32> {
    if f.read_only {
        return Err(EPERM);
    }
    match r.typ {
        CMD_TRIM if tflags & TFLAG_SEND_TRIM == 0 => Err(EINVAL),
        CMD_WRITE_ZEROES if tflags & TFLAG_SEND_WRITE_ZEROES == 0 => Err(EINVAL),
        // Spec: a fast-zero request that cannot be honoured fails at once
        // with ENOTSUP so the client falls back to regular writes.
        CMD_WRITE_ZEROES if r.flags & CMD_FLAG_FAST_ZERO != 0 && !fast_zero => Err(ENOTSUP),
        _ => Ok(()),
    }
}

/// The action for a request that passed every check (`r.len > 0`, READ and
/// WRITE within the maximum payload, so their lengths fit 32 bits).
fn action_for(r: &Request, fua: bool) -> Action {
    let (offset, len) = (r.offset, r.len);
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    match r.typ {
        CMD_READ => Action::Read {
            offset,
            len: len32,
            df: r.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Action::Write {
            offset,
            len: len32,
            fua,
        },
        CMD_TRIM => Action::Trim { offset, len, fua },
        CMD_CACHE => Action::Cache { offset, len },
        CMD_BLOCK_STATUS => Action::BlockStatus {
            offset,
            len,
            req_one: r.flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => Action::WriteZeroes {
            offset,
            len,
            fua,
            may_trim: r.flags & CMD_FLAG_NO_HOLE == 0,
        },
    }
}

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw() -> ExportFlags {
        ExportFlags {
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
            send_fua: true,
            send_flush: true,
        }
    }

    fn sess(size: u64, flags: ExportFlags, max_payload: u32) -> Session {
        Session {
            size,
            caps: Caps {
                flags,
                mode: Mode::Simple,
            },
            fast_zero: false,
            max_payload,
            block_status: false,
        }
    }

    fn req(typ: u16, flags: u16, offset: u64, len: u64) -> Request {
        Request {
            flags,
            typ,
            handle: 7,
            offset,
            len,
        }
    }

    #[test]
    fn request_roundtrip() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 1 << 40, 4096);
        assert_eq!(decode_request(&encode_request(&r)), Ok(r));
        let mut b = encode_request(&r);
        b[0] ^= 1;
        assert!(decode_request(&b).is_err());
    }

    #[test]
    fn validation_rules() {
        let f = rw();
        let s = sess(1 << 20, f, 1 << 25);
        let v = |r| validate_request(&r, &s);
        assert_eq!(
            v(req(CMD_READ, 0, 0, 512)),
            Ok(Action::Read {
                offset: 0,
                len: 512,
                df: false
            })
        );
        assert_eq!(v(req(CMD_READ, 0, 1 << 20, 1)), Err(EINVAL));
        assert_eq!(v(req(CMD_WRITE, 0, 1 << 20, 1)), Err(ENOSPC));
        assert_eq!(v(req(CMD_READ, 0, u64::MAX, 2)), Err(EINVAL));
        assert_eq!(v(req(CMD_READ, 0, 0, (1 << 25) + 1)), Err(EINVAL));
        assert_eq!(v(req(CMD_READ, 0, 0, 0)), Ok(Action::Noop));
        assert_eq!(v(req(CMD_READ, 0, (1 << 20) + 1, 0)), Err(EINVAL));
        assert_eq!(v(req(99, 0, 0, 0)), Err(EINVAL));
        assert_eq!(v(req(CMD_BLOCK_STATUS, 0, 0, 1)), Err(EINVAL));
        assert_eq!(v(req(CMD_READ, 1 << 9, 0, 1)), Err(EINVAL));
        assert_eq!(v(req(CMD_READ, CMD_FLAG_DF, 0, 1)), Err(EINVAL));
        assert_eq!(v(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1)), Err(EINVAL));
        assert_eq!(
            v(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1)),
            Err(ENOTSUP)
        );
        assert_eq!(
            v(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1)),
            Ok(Action::WriteZeroes {
                offset: 0,
                len: 1,
                fua: false,
                may_trim: false
            })
        );
        assert_eq!(v(req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)), Ok(Action::Flush));
        let ro = ExportFlags {
            read_only: true,
            ..f
        };
        assert_eq!(
            validate_request(&req(CMD_WRITE, 0, 0, 1), &sess(10, ro, 100)),
            Err(EPERM)
        );
        assert_eq!(
            validate_request(&req(CMD_TRIM, 0, 0, 1), &sess(10, ro, 100)),
            Err(EPERM)
        );
        let no_fua = ExportFlags {
            send_fua: false,
            ..f
        };
        assert_eq!(
            validate_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &sess(10, no_fua, 100)),
            Err(EINVAL)
        );
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            decode_info_request(&d),
            Ok(InfoRequest {
                name: "vol".into(),
                infos: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert!(decode_info_request(&d[..d.len() - 1]).is_err());
        assert!(decode_info_request(&[0, 0, 0]).is_err());
        assert!(matches!(
            decode_info_request(&[0, 0, 0x20, 0]),
            Err(InfoRequestError::TooBig(_))
        ));
        assert!(decode_info_request(&[0, 0, 0, 9, 1]).is_err());
    }

    #[test]
    fn extended_request_roundtrip_and_payload_rules() {
        let r = req(CMD_TRIM, 0, 1 << 40, 6 << 30);
        let b = encode_extended_request(&r);
        assert_eq!(b[0..4], EXTENDED_REQUEST_MAGIC.to_be_bytes());
        assert_eq!(decode_request_in(Mode::Extended, &b), Ok(r));
        assert!(decode_request_in(Mode::Simple, &b).is_err(), "wrong length");
        assert!(decode_request_in(Mode::Extended, &encode_request(&r)).is_err());
        // Payload: WRITE always; PAYLOAD_LEN only counts in extended mode.
        let w = req(CMD_WRITE, 0, 0, 512);
        assert_eq!(w.payload_len(Mode::Extended), 512);
        let rd = req(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 100);
        assert_eq!(rd.payload_len(Mode::Extended), 100);
        assert_eq!(rd.payload_len(Mode::Structured), 0);
        let mut s = sess(1 << 20, rw(), 1 << 20);
        assert_eq!(validate_request(&rd, &s), Err(EINVAL));
        s.caps.mode = Mode::Extended;
        assert_eq!(validate_request(&rd, &s), Err(EINVAL));
        let wp = req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512);
        assert!(matches!(
            validate_request(&wp, &s),
            Ok(Action::Write { .. })
        ));
    }

    #[test]
    fn negotiated_features_in_validation() {
        let mut s = sess(1 << 20, rw(), 1 << 20);
        let df = req(CMD_READ, CMD_FLAG_DF, 0, 4096);
        assert_eq!(validate_request(&df, &s), Err(EINVAL), "DF needs chunks");
        let bs = req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096);
        assert_eq!(validate_request(&bs, &s), Err(EINVAL), "no context");
        s.caps.mode = Mode::Structured;
        s.block_status = true;
        assert_eq!(
            validate_request(&df, &s),
            Ok(Action::Read {
                offset: 0,
                len: 4096,
                df: true
            })
        );
        assert_eq!(
            validate_request(&bs, &s),
            Ok(Action::BlockStatus {
                offset: 0,
                len: 4096,
                req_one: true
            })
        );
        assert_eq!(
            validate_request(&req(CMD_BLOCK_STATUS, 0, 0, 0), &s),
            Err(EINVAL)
        );
        assert_eq!(
            validate_request(&req(CMD_TRIM, CMD_FLAG_DF, 0, 1), &s),
            Err(EINVAL)
        );
        let fz = req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096);
        assert_eq!(validate_request(&fz, &s), Err(ENOTSUP));
        s.fast_zero = true;
        assert!(matches!(
            validate_request(&fz, &s),
            Ok(Action::WriteZeroes { .. })
        ));
        assert_eq!(
            validate_request(&req(CMD_CACHE, 0, 0, 1 << 20), &s),
            Ok(Action::Cache {
                offset: 0,
                len: 1 << 20
            })
        );
        let t = transmission_flags(&s.caps);
        for f in [TFLAG_SEND_DF, TFLAG_SEND_CACHE, TFLAG_SEND_FAST_ZERO] {
            assert_ne!(t & f, 0);
        }
    }

    #[test]
    fn chunk_golden_bytes() {
        let to = ChunkTo {
            mode: Mode::Structured,
            handle: 0x0102_0304_0506_0708,
            req_offset: 4096,
        };
        let h = encode_offset_hole(to, true, 4096, 512);
        let want: Vec<u8> = [
            &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2][..],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[0, 0, 0, 12],
            &[0, 0, 0, 0, 0, 0, 0x10, 0],
            &[0, 0, 2, 0],
        ]
        .concat();
        assert_eq!(h.as_bytes(), &want[..]);
        let ext = ChunkTo {
            mode: Mode::Extended,
            ..to
        };
        let mut d = encode_offset_data(ext, false, 8192, 100);
        d.set_done();
        let want: Vec<u8> = [
            &[0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 1][..],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[0, 0, 0, 0, 0, 0, 0x10, 0],
            &[0, 0, 0, 0, 0, 0, 0, 108],
            &[0, 0, 0, 0, 0, 0, 0x20, 0],
        ]
        .concat();
        assert_eq!(d.as_bytes(), &want[..]);
        assert_eq!(
            error_payload(EIO, "bad", Some(7)),
            [&[0, 0, 0, 5, 0, 3][..], b"bad", &[0, 0, 0, 0, 0, 0, 0, 7]].concat()
        );
        let long = "é".repeat(3000);
        let p = error_payload(EIO, &long, None);
        assert_eq!(
            u16::from_be_bytes([p[4], p[5]]),
            4096,
            "cut at a char boundary"
        );
        let d = [Descriptor {
            len: 4096,
            flags: STATE_HOLE | STATE_ZERO,
        }];
        let (t, p) = block_status_payload(Mode::Structured, 1, &d);
        assert_eq!(t, REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(p, [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3]);
        let (t, p) = block_status_payload(Mode::Extended, 1, &d);
        assert_eq!(t, REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(
            p,
            [
                &[0, 0, 0, 1, 0, 0, 0, 1][..],
                &[0, 0, 0, 0, 0, 0, 0x10, 0],
                &[0, 0, 0, 0, 0, 0, 0, 3]
            ]
            .concat()
        );
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "x:y"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            decode_meta_request(&d),
            Ok(MetaRequest {
                name: "vol".into(),
                queries: vec!["base:allocation".into(), "x:y".into()]
            })
        );
        assert!(decode_meta_request(&d[..d.len() - 1]).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(decode_meta_request(&extra).is_err());
        // A count larger than the bytes could hold fails before allocating.
        let huge = [&[0, 0, 0, 0][..], &[0xff, 0xff, 0xff, 0xff]].concat();
        assert!(decode_meta_request(&huge).is_err());
        assert!(list_query_matches("base:") && list_query_matches(BASE_ALLOCATION));
        assert!(!list_query_matches("base:other"));
    }

    #[test]
    fn client_flags() {
        assert!(decode_client_flags([0, 0, 0, 4]).is_err());
        assert_eq!(
            decode_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
    }
}
