//! RFC 3339 timestamps for point-in-time commands, without a date-time crate, and the
//! one proleptic Gregorian civil-date conversion ([`days_from_civil`],
//! [`civil_from_days`]) that every timestamp in ferry (audit log, benchmark reports)
//! is formatted with.
//!
//! Operators type `--at 2026-11-24T20:15:00+08:00` (a UTC offset is the norm where
//! the national standard applies) or `...Z`; points carry nanoseconds since the Unix
//! epoch. Only what RFC 3339 allows is accepted: a misread timestamp would pick the
//! wrong recovery point, so anything ambiguous is refused with the reason.

/// Parses an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`) to ns since
/// the Unix epoch. `t` may also be a space or lowercase `t`/`z` (RFC 3339 §5.6 note).
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let err =
        |m: &str| format!("'{s}' is not an RFC 3339 time ({m}); e.g. 2026-11-24T20:15:00+08:00");
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(err("too short"));
    }
    let num = |r: std::ops::Range<usize>| -> Result<u64, String> {
        let part = s.get(r).ok_or_else(|| err("not ASCII"))?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(err("expected digits"));
        }
        part.parse::<u64>().map_err(|_| err("expected digits"))
    };
    let sep = |i: usize, c: &[u8]| -> Result<(), String> {
        if c.contains(&b[i]) {
            Ok(())
        } else {
            Err(err(&format!(
                "expected '{}' at position {}",
                c[0] as char,
                i + 1
            )))
        }
    };
    let year = num(0..4)?;
    sep(4, b"-")?;
    let month = num(5..7)?;
    sep(7, b"-")?;
    let day = num(8..10)?;
    sep(10, b"Tt ")?;
    let hour = num(11..13)?;
    sep(13, b":")?;
    let min = num(14..16)?;
    sep(16, b":")?;
    let sec = num(17..19)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(err("no such date"));
    }
    // A leap second (60) is refused: the primary's clock never stamps one.
    if hour > 23 || min > 59 || sec > 59 {
        return Err(err("time of day out of range"));
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return Err(err("empty fraction"));
        }
        // Beyond nanoseconds the digits cannot change the chosen point: truncate.
        let kept = &digits[..digits.len().min(9)];
        nanos = kept.parse::<u64>().map_err(|_| err("bad fraction"))?
            * 10u64.pow(9 - kept.len() as u32);
    }
    let offset_secs: i64 = match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)? as i64;
            let om = num(i + 4..i + 6)? as i64;
            if oh > 23 || om > 59 {
                return Err(err("offset out of range"));
            }
            let o = oh * 3600 + om * 60;
            if c == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return Err(err("expected Z or a ±HH:MM offset at the end")),
    };
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = days * 86_400 + (hour * 3600 + min * 60 + sec) as i64 - offset_secs;
    if secs < 0 {
        return Err(err("before 1970"));
    }
    Ok(secs as u64 * 1_000_000_000 + nanos)
}

/// Formats ns since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let ms = (ns % 1_000_000_000) / 1_000_000;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (`m` 1..=12, `d`
/// 1..=31), negative before 1970. H. Hinnant's public-domain civil calendar algorithm.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian `(year, month 1..=12, day 1..=31)` of a day count since
/// 1970-01-01 (the inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339("2026-11-24T12:00:00Z"),
            Ok(1_795_521_600 * 1_000_000_000)
        );
        // The same instant written in Beijing time.
        assert_eq!(
            parse_rfc3339("2026-11-24T20:00:00+08:00"),
            parse_rfc3339("2026-11-24T12:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T11:30:00-00:30"),
            parse_rfc3339("2026-11-24t12:00:00z")
        );
        assert_eq!(parse_rfc3339("1970-01-01 00:00:01.5Z"), Ok(1_500_000_000));
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00.1234567899Z"),
            Ok(123_456_789)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z").map(|_| ()), Ok(()));
    }

    #[test]
    fn refuses_what_is_not_rfc3339() {
        for bad in [
            "",
            "2026-11-24",
            "2026-11-24T12:00:00",      // no offset: ambiguous
            "2026-11-24T12:00:00+0800", // offset without colon
            "2026-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T12:00:60Z",
            "2026-11-24T12:00:00.Z",
            "2026-11-24T12:00:00Zjunk",
            "1969-12-31T23:59:59Z",
            "２０２６-11-24T12:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        for z in -800_000..800_000i64 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn formats_and_round_trips() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_795_521_600 * 1_000_000_000 + 7_000_000),
            "2026-11-24T12:00:00.007Z"
        );
        for ns in [0u64, 951_782_400_123_000_000, 4_102_444_799_999_000_000] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ns)), Ok(ns));
        }
    }
}
