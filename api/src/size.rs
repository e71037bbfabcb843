//! Byte sizes in configuration and on the command line: `1048576`, `512KiB`, `64MiB`,
//! `1GiB`, `2TiB` (binary units; `K`, `M`, `G`, `T` and `KB`… are accepted as the same
//! binary units because block sizes are always powers of two).
//!
//! Bandwidths (`[[replication.target]] max_bandwidth`): bits per second with decimal
//! prefixes as links are specified (`200Mbit`, `1.5Gbit`, `800kbit`, also `Mbit/s` and
//! `Mbps`), or bytes per second with the same binary units as sizes (`50MB/s` =
//! `50MiB/s`, `512KiB/s`, `1000000B/s`).
use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("'{0}' is not a size: expected a number with an optional unit (KiB, MiB, GiB, TiB)")]
    Syntax(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(SizeError::Syntax(text.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Syntax(text.to_string())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// Formats with the largest binary unit that divides the value exactly.
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{}", n >> shift, unit);
        }
    }
    n.to_string()
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte size such as 1073741824 or \"1GiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The smallest bandwidth cap: 1 Mbit/s. Below it a 4 MiB write-set takes over half
/// a minute on the wire.
pub const MIN_BANDWIDTH_BYTES_PER_S: u64 = 125_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BandwidthError {
    #[error("'{0}' is not a bandwidth: expected a number and a unit, e.g. \"200Mbit\" (bits/s, decimal: kbit, Mbit, Gbit) or \"50MB/s\" (bytes/s, binary like sizes: KB/s = KiB/s, MB/s, GB/s)")]
    Syntax(String),
    #[error("'{text}': unknown unit '{unit}' (use bit, kbit, Mbit, Gbit (or …/s, …ps) for bits per second; B/s, KB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s for bytes per second)")]
    Unit { text: String, unit: String },
    #[error("'{0}' is below the minimum of 1Mbit (125000B/s)")]
    TooSmall(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Parses a bandwidth (see the module docs) into bytes per second.
pub fn parse_bandwidth(text: &str) -> Result<u64, BandwidthError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| BandwidthError::Syntax(text.to_string()))?;
    let unit = unit.trim();
    if unit.is_empty() {
        return Err(BandwidthError::Syntax(text.to_string()));
    }
    let per_byte = bandwidth_unit(unit).ok_or_else(|| BandwidthError::Unit {
        text: text.to_string(),
        unit: unit.to_string(),
    })?;
    let v = n * per_byte;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(BandwidthError::Overflow(text.to_string()));
    }
    let v = v.round() as u64;
    if v < MIN_BANDWIDTH_BYTES_PER_S {
        return Err(BandwidthError::TooSmall(text.to_string()));
    }
    Ok(v)
}

/// Bytes per second that one of `unit` is.
fn bandwidth_unit(unit: &str) -> Option<f64> {
    // Bits: "bit", "bit/s", "bps" with a decimal prefix (k/K, M, G, T).
    let bits = unit
        .strip_suffix("bit/s")
        .or_else(|| unit.strip_suffix("bit"))
        .or_else(|| unit.strip_suffix("bps"));
    if let Some(prefix) = bits {
        let scale = match prefix {
            "" => 1e0,
            "k" | "K" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            _ => return None,
        };
        return Some(scale / 8.0);
    }
    // Bytes: "B/s" with a binary prefix (K/KB/KiB …: the size units).
    let prefix = unit.strip_suffix("B/s")?;
    let shift = match prefix.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "ki" => 10,
        "m" | "mi" => 20,
        "g" | "gi" => 30,
        "t" | "ti" => 40,
        _ => return None,
    };
    Some((1u64 << shift) as f64)
}

/// Formats bytes per second so that [`parse_bandwidth`] reads it back exactly:
/// whole megabits as `Mbit`, whole MiB/s as `MiB/s`, otherwise `B/s`.
pub fn format_bandwidth(bytes_per_s: u64) -> String {
    if bytes_per_s.is_multiple_of(125_000) {
        return format!("{}Mbit", bytes_per_s / 125_000);
    }
    if bytes_per_s.is_multiple_of(1 << 20) {
        return format!("{}MiB/s", bytes_per_s >> 20);
    }
    format!("{bytes_per_s}B/s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bandwidths() {
        assert_eq!(parse_bandwidth("200Mbit"), Ok(25_000_000));
        assert_eq!(parse_bandwidth("200Mbit/s"), Ok(25_000_000));
        assert_eq!(parse_bandwidth(" 200 Mbps "), Ok(25_000_000));
        assert_eq!(parse_bandwidth("1.5Gbit"), Ok(187_500_000));
        assert_eq!(parse_bandwidth("8000kbit"), Ok(1_000_000));
        assert_eq!(
            parse_bandwidth("800kbit"),
            Err(BandwidthError::TooSmall("800kbit".into()))
        );
        assert_eq!(parse_bandwidth("50MB/s"), Ok(50 << 20));
        assert_eq!(parse_bandwidth("50MiB/s"), Ok(50 << 20));
        assert_eq!(parse_bandwidth("512KiB/s"), Ok(512 << 10));
        assert_eq!(parse_bandwidth("1000000B/s"), Ok(1_000_000));
        let e = parse_bandwidth("200").unwrap_err().to_string();
        assert!(e.contains("expected a number and a unit"), "{e}");
        let e = parse_bandwidth("200 Mbytes").unwrap_err().to_string();
        assert!(e.contains("unknown unit 'Mbytes'"), "{e}");
        let e = parse_bandwidth("50MB").unwrap_err().to_string();
        assert!(e.contains("unknown unit 'MB'"), "{e}");
        assert!(matches!(
            parse_bandwidth("fast"),
            Err(BandwidthError::Syntax(_))
        ));
        assert!(matches!(
            parse_bandwidth("1e9Gbit"),
            Err(BandwidthError::Unit { .. })
        ));
        assert!(matches!(
            parse_bandwidth("1.2.3Mbit"),
            Err(BandwidthError::Syntax(_))
        ));
        assert!(matches!(
            parse_bandwidth("99999999999999999999Tbit"),
            Err(BandwidthError::Overflow(_))
        ));
        for v in [125_000, 25_000_000, 50 << 20, 1_000_001] {
            assert_eq!(parse_bandwidth(&format_bandwidth(v)), Ok(v));
        }
        assert_eq!(format_bandwidth(25_000_000), "200Mbit");
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size(" 2 TiB "), Ok(2 << 40));
        assert_eq!(parse_size("512kb"), Ok(512 << 10));
        assert!(matches!(
            parse_size("12 parsecs"),
            Err(SizeError::Syntax(_))
        ));
        assert!(matches!(parse_size("MiB"), Err(SizeError::Syntax(_))));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(SizeError::Overflow(_))
        ));
        assert_eq!(parse_size(""), Err(SizeError::Empty));
    }

    #[test]
    fn formats_round_trip() {
        for n in [0, 1, 4096, 64 << 20, 3 << 30, (1 << 40) + 512] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
        assert_eq!(format_size(1 << 30), "1GiB");
    }
}
