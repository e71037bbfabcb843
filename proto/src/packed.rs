//! The Packed frame (type 10, protocol V3): a WriteSet or ResyncData as it travels
//! to a peer that negotiated V3 — compressed with zstd, and/or with every all-zero
//! write record sent as its length only. Pure: bytes in, bytes out (zstd is
//! computation, not IO). Which frames are packed, and how hard, is decided by
//! [`crate::wan::Packer`].
//!
//! Payload (after the usual 32-byte header, version 3, type 10):
//!
//! ```text
//!  0  2  inner_type   3 WriteSet or 8 ResyncData
//!  2  1  codec        0 none (the body is the raw body), 1 zstd (one zstd frame)
//!  3  1  reserved     zero
//!  4  4  raw_len      length of the raw body, ≤ the receiver's payload limit
//!  8  n  body
//! ```
//!
//! The raw body is the inner frame's payload, except that in a write-set record byte
//! 25 (reserved in V1) is `form`: 0, the data follow as in V1; 1, a zero-filled write
//! (op write, `data_len` 0: the record's data are `length` zero bytes). The standby
//! rebuilds exactly the record the primary journaled, so its journal, digests, verify
//! and recovery points cannot tell the difference.
//!
//! Bounds: `raw_len` is checked against the payload limit before anything is
//! decompressed; the decompressor writes into a buffer of exactly `raw_len` bytes (a
//! zstd bomb fails when it would exceed it, and a short one fails the length check);
//! a write-set's zero-filled records count against the same limit, as the plain
//! frame would, before their zeros are made.

use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::{
    self, DecodeError, EncodeError, Epoch, Frame, FrameType, Reader, RecordOp, WriteSet,
    HEADER_LEN, MAX_PAYLOAD_LEN, RECORD_HEADER_LEN,
};

/// Bytes of the Packed payload before the body.
pub const PACKED_FIXED_LEN: usize = 8;

/// `form` of a write-set record in a packed body: the data follow.
const FORM_DATA: u8 = 0;
/// `form` of a write-set record in a packed body: a write of `length` zero bytes.
const FORM_ZERO: u8 = 1;

/// Zero data handed out for zero-filled records up to this size without an allocation.
const STATIC_ZEROS: usize = 1 << 20;
static ZEROS: [u8; STATIC_ZEROS] = [0; STATIC_ZEROS];

/// How the body is coded (payload byte 2).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    None = 0,
    Zstd = 1,
}

impl Codec {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::None),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A packed data frame: the body as on the wire and the frame it decodes to. Built by
/// [`Packed::pack`] (or [`crate::wan::Packer`]) or by decoding; re-encoding emits the
/// body as it is, so the encoding is canonical whatever the compressor does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    codec: Codec,
    raw_len: u32,
    body: Bytes,
    inner: Box<Frame>,
}

impl Packed {
    /// Packs a WriteSet or ResyncData: zero-filled writes as their length, the body
    /// compressed with zstd at `level` when `Some` (kept whatever the result: a
    /// policy that falls back to the raw body is [`crate::wan::Packer`]'s).
    pub fn pack(inner: Frame, level: Option<i32>) -> Result<Packed, EncodeError> {
        let (raw, _) = raw_body(&inner)?;
        match level {
            None => Packed::assemble(inner, raw.freeze(), None),
            Some(l) => {
                let z = compress(&raw, l)?;
                Packed::assemble(inner, raw.freeze(), Some(z))
            }
        }
    }

    /// A frame from its raw body and, if compressed, the zstd body.
    pub(crate) fn assemble(
        inner: Frame,
        raw: Bytes,
        zstd: Option<Bytes>,
    ) -> Result<Packed, EncodeError> {
        let raw_len = raw.len();
        let (codec, body) = match zstd {
            Some(z) => (Codec::Zstd, z),
            None => (Codec::None, raw),
        };
        let payload = PACKED_FIXED_LEN + body.len();
        for len in [raw_len, payload] {
            if len > MAX_PAYLOAD_LEN {
                return Err(EncodeError::TooLarge {
                    len,
                    max: MAX_PAYLOAD_LEN,
                });
            }
        }
        Ok(Packed {
            codec,
            raw_len: raw_len as u32,
            body,
            inner: Box::new(inner),
        })
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.epoch()
    }
    pub fn codec(&self) -> Codec {
        self.codec
    }
    /// The raw body's length (the body once decompressed).
    pub fn raw_len(&self) -> usize {
        self.raw_len as usize
    }
    /// The frame this one carries (a WriteSet or a ResyncData).
    pub fn inner(&self) -> &Frame {
        &self.inner
    }
    pub fn into_inner(self) -> Frame {
        *self.inner
    }
    /// Payload bytes on the wire (header excluded).
    pub fn payload_len(&self) -> usize {
        PACKED_FIXED_LEN + self.body.len()
    }
    /// The whole frame's length on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    pub(crate) fn put_payload(&self, out: &mut BytesMut) {
        out.put_u16_le(self.inner.frame_type() as u16);
        out.put_u8(self.codec as u8);
        out.put_u8(0); // reserved
        out.put_u32_le(self.raw_len);
        out.put_slice(&self.body);
    }

    /// Decodes a Packed payload; `max_payload_len` bounds the raw body and what a
    /// write-set expands to.
    pub(crate) fn decode(
        r: &mut Reader,
        epoch: Epoch,
        max_payload_len: usize,
    ) -> Result<Packed, DecodeError> {
        let raw_type = r.u16()?;
        let inner_type = match FrameType::from_u16(raw_type) {
            Some(t @ (FrameType::WriteSet | FrameType::ResyncData)) => t,
            _ => {
                return Err(DecodeError::InvalidField {
                    field: "packed.inner_type",
                    reason: format!("{raw_type} (only 3 WriteSet and 8 ResyncData are packed)"),
                })
            }
        };
        let raw_codec = r.u8()?;
        let codec = Codec::from_u8(raw_codec).ok_or_else(|| DecodeError::InvalidField {
            field: "packed.codec",
            reason: format!("unknown codec {raw_codec} (0 none, 1 zstd)"),
        })?;
        r.zero("packed.reserved", 1)?;
        let raw_len = r.u32()? as usize;
        // Before anything is decompressed: the body may never expand past what a
        // plain frame could carry.
        if raw_len > max_payload_len {
            return Err(DecodeError::TooLarge {
                len: raw_len,
                max: max_payload_len,
            });
        }
        let body = r.rest();
        let raw = match codec {
            Codec::None if body.len() != raw_len => {
                return Err(DecodeError::InvalidField {
                    field: "packed.raw_len",
                    reason: format!("{raw_len}, but the uncompressed body is {}", body.len()),
                })
            }
            Codec::None => body.clone(),
            Codec::Zstd => decompress(&body, raw_len)?,
        };
        let mut rr = Reader { buf: raw, pos: 0 };
        let inner = match inner_type {
            FrameType::WriteSet => {
                let ws = wire::decode_write_set_body(&mut rr, epoch, Some(max_payload_len))?;
                wire::validate_write_set(&ws)?;
                Frame::WriteSet(ws)
            }
            _ => {
                let d = wire::decode_resync_data(&mut rr, epoch)?;
                wire::validate_resync_data(&d)?;
                Frame::ResyncData(d)
            }
        };
        rr.finish("packed.body")?;
        Ok(Packed {
            codec,
            raw_len: raw_len as u32,
            body,
            inner: Box::new(inner),
        })
    }
}

/// The raw body of `inner` (a WriteSet or ResyncData) and how many of its write
/// records travel zero-filled. Validates the frame as `encode` would.
pub fn raw_body(inner: &Frame) -> Result<(BytesMut, usize), EncodeError> {
    match inner {
        Frame::WriteSet(ws) => {
            wire::validate_write_set(ws)?;
            check_plain(ws.payload_len())?;
            Ok(write_set_body(ws))
        }
        Frame::ResyncData(d) => {
            wire::validate_resync_data(d)?;
            check_plain(d.payload_len())?;
            let mut out = BytesMut::with_capacity(d.payload_len());
            wire::put_payload(&mut out, inner);
            Ok((out, 0))
        }
        other => Err(EncodeError::InvalidField {
            field: "packed.inner_type",
            reason: format!(
                "{:?} (only WriteSet and ResyncData are packed)",
                other.frame_type()
            ),
        }),
    }
}

/// A packed frame never carries more than its plain form could.
fn check_plain(len: usize) -> Result<(), EncodeError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_PAYLOAD_LEN,
        });
    }
    Ok(())
}

fn write_set_body(ws: &WriteSet) -> (BytesMut, usize) {
    let zero: Vec<bool> = ws.records.iter().map(is_zero_write).collect();
    let len = ws
        .records
        .iter()
        .zip(&zero)
        .fold(wire::WRITE_SET_FIXED_LEN, |acc, (r, &z)| {
            acc + RECORD_HEADER_LEN + if z { 0 } else { r.data.len() }
        });
    let mut out = BytesMut::with_capacity(len);
    wire::put_write_set_fixed(&mut out, ws);
    for (r, &z) in ws.records.iter().zip(&zero) {
        let at = out.len();
        wire::put_record_header(&mut out, r);
        if z {
            out[at + 25] = FORM_ZERO;
            out[at + 28..at + 32].copy_from_slice(&0u32.to_le_bytes());
        } else {
            out.put_slice(&r.data);
        }
    }
    (out, zero.iter().filter(|&&z| z).count())
}

/// A write whose data are all zeros (travels as its length).
pub fn is_zero_write(r: &wire::WireRecord) -> bool {
    r.op == RecordOp::Write && !r.data.is_empty() && is_zero(&r.data)
}

/// Whether `b` holds only zeros. Random data fail on the first bytes; zeros are
/// checked a page at a time with a loop the compiler vectorises.
pub fn is_zero(b: &[u8]) -> bool {
    let (head, rest) = b.split_at(b.len().min(16));
    head.iter().all(|&x| x == 0)
        && rest
            .chunks(4096)
            .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// The zstd body of `raw` at `level`.
pub fn compress(raw: &[u8], level: i32) -> Result<Bytes, EncodeError> {
    zstd::bulk::compress(raw, level)
        .map(Bytes::from)
        .map_err(|e| EncodeError::InvalidField {
            field: "packed.body",
            reason: format!("zstd: {e}"),
        })
}

/// Decompresses into a buffer of exactly `raw_len` bytes: more is refused by zstd
/// itself (destination too small), less by the length check.
fn decompress(body: &[u8], raw_len: usize) -> Result<Bytes, DecodeError> {
    let raw = zstd::bulk::decompress(body, raw_len).map_err(|e| DecodeError::InvalidField {
        field: "packed.body",
        reason: format!("zstd body does not decompress to at most {raw_len} bytes: {e}"),
    })?;
    if raw.len() != raw_len {
        return Err(DecodeError::InvalidField {
            field: "packed.raw_len",
            reason: format!("{raw_len}, but the zstd body decompresses to {}", raw.len()),
        });
    }
    Ok(Bytes::from(raw))
}

/// Whether a packed write-set record with `form` is zero-filled.
pub(crate) fn record_form(seq: u64, op: RecordOp, form: u8) -> Result<bool, DecodeError> {
    match form {
        FORM_DATA => Ok(false),
        FORM_ZERO if op == RecordOp::Write => Ok(true),
        FORM_ZERO => Err(DecodeError::InvalidField {
            field: "record.form",
            reason: format!("seq {seq}: a {op:?} cannot be zero-filled (only a write)"),
        }),
        f => Err(DecodeError::InvalidField {
            field: "record.form",
            reason: format!("seq {seq}: unknown form {f} (0 data, 1 zero-filled)"),
        }),
    }
}

/// The plain payload length after one more record with `data_len` bytes of data;
/// refused once past `limit` (a packed write-set's bound; `None`: no bound here).
pub(crate) fn expand_check(
    plain: usize,
    data_len: usize,
    limit: Option<usize>,
) -> Result<usize, DecodeError> {
    let next = plain
        .saturating_add(RECORD_HEADER_LEN)
        .saturating_add(data_len);
    match limit {
        Some(max) if next > max => Err(DecodeError::TooLarge { len: next, max }),
        _ => Ok(next),
    }
}

/// `len` zero bytes (shared, not allocated, up to 1 MiB).
pub(crate) fn zeros(len: usize) -> Bytes {
    if len <= STATIC_ZEROS {
        Bytes::from_static(&ZEROS[..len])
    } else {
        Bytes::from(vec![0u8; len])
    }
}
