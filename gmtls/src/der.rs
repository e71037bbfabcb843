//! The few DER encodings certificates need (X.690), written by hand: a
//! tag-length-value writer and the primitive types ferry's certificates use.
//! Only encodes; parsing is left to webpki and x509-parser.

/// Universal tags used here.
pub(crate) mod tag {
    pub const BOOLEAN: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const UTC_TIME: u8 = 0x17;
    pub const GENERALIZED_TIME: u8 = 0x18;
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
}

/// `tag || length || content`, with the definite length in its shortest form.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A SEQUENCE of already-encoded elements.
pub(crate) fn sequence(items: &[&[u8]]) -> Vec<u8> {
    tlv(tag::SEQUENCE, &items.concat())
}

/// A non-negative INTEGER from big-endian magnitude bytes (minimal encoding).
pub(crate) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let skip = magnitude.iter().take_while(|&&b| b == 0).count();
    let trimmed = &magnitude[skip..];
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    // A leading 1 bit would make the value negative.
    if trimmed.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(trimmed);
    tlv(tag::INTEGER, &content)
}

/// An OBJECT IDENTIFIER from its arcs (first two arcs must be valid: 0..=2, <40).
pub(crate) fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut content = Vec::new();
    if let [a, b, rest @ ..] = arcs {
        base128(&mut content, a * 40 + b);
        for &arc in rest {
            base128(&mut content, arc);
        }
    }
    tlv(tag::OID, &content)
}

fn base128(out: &mut Vec<u8>, value: u64) {
    let mut groups = vec![(value & 0x7f) as u8];
    let mut v = value >> 7;
    while v > 0 {
        groups.push(0x80 | (v & 0x7f) as u8);
        v >>= 7;
    }
    out.extend(groups.iter().rev());
}

/// A BIT STRING of whole bytes (no unused bits).
pub(crate) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(bytes.len() + 1);
    content.push(0);
    content.extend_from_slice(bytes);
    tlv(tag::BIT_STRING, &content)
}

/// A one-byte named-bit BIT STRING (X.509 KeyUsage): bit 0 is the byte's MSB; DER
/// drops trailing zero bits and states how many.
pub(crate) fn named_bits(bits: u8) -> Vec<u8> {
    let unused = if bits == 0 {
        0
    } else {
        bits.trailing_zeros() as u8
    };
    tlv(tag::BIT_STRING, &[unused, bits])
}

/// Context-specific constructed `[n]` (explicit tagging).
pub(crate) fn explicit(n: u8, inner: &[u8]) -> Vec<u8> {
    tlv(0xa0 | n, inner)
}

/// Context-specific primitive `[n]` (implicit tagging of a primitive value).
pub(crate) fn implicit_primitive(n: u8, content: &[u8]) -> Vec<u8> {
    tlv(0x80 | n, content)
}

/// X.509 Time for 00:00:00 UTC on `year-month-day`: UTCTime through 2049,
/// GeneralizedTime from 2050 (RFC 5280 §4.1.2.5).
pub(crate) fn time(year: i32, month: u32, day: u32) -> Vec<u8> {
    if (1950..2050).contains(&year) {
        let s = format!("{:02}{month:02}{day:02}000000Z", year % 100);
        tlv(tag::UTC_TIME, s.as_bytes())
    } else {
        let s = format!("{year:04}{month:02}{day:02}000000Z");
        tlv(tag::GENERALIZED_TIME, s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_x690_examples() {
        assert_eq!(tlv(tag::OCTET_STRING, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(
            tlv(tag::OCTET_STRING, &[0; 300])[..4],
            [0x04, 0x82, 0x01, 0x2c]
        );
        assert_eq!(unsigned_integer(&[0x00, 0x7f]), [0x02, 0x01, 0x7f]);
        assert_eq!(unsigned_integer(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(unsigned_integer(&[]), [0x02, 0x01, 0x00]);
        // 1.2.840.10045.2.1 (id-ecPublicKey), the well-known encoding.
        assert_eq!(
            oid(&[1, 2, 840, 10045, 2, 1]),
            [0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]
        );
        // digitalSignature | keyCertSign | cRLSign: 1 unused bit.
        assert_eq!(named_bits(0x86), [0x03, 0x02, 0x01, 0x86]);
        assert_eq!(named_bits(0x80), [0x03, 0x02, 0x07, 0x80]);
        assert_eq!(time(2025, 1, 1), tlv(tag::UTC_TIME, b"250101000000Z"));
        assert_eq!(
            time(2050, 1, 1),
            tlv(tag::GENERALIZED_TIME, b"20500101000000Z")
        );
    }
}
