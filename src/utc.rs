//! UTC timestamps with millisecond precision, in the two spellings walsync uses.
//!
//! - Compact, inside object names: `20261121T094423.123Z` (ISO 8601 basic format). It has no
//!   `:` (awkward in file names) and no `-` (the field separator of object names), and it
//!   sorts as a plain string in time order.
//! - RFC 3339, for people and JSON: `2026-11-21T09:44:23.123Z`. `--point-in-time` accepts any
//!   RFC 3339 time, with `Z` or a numeric offset, with or without fractional seconds.
//!
//! The calendar arithmetic is the days-from-civil algorithm (proleptic Gregorian calendar),
//! small enough that a date crate would not earn its place. `jiff` was in the dependency tree
//! (rusty-s3 signed with it), but measured on the release binary (2026-11-23) its
//! `Timestamp` parser added 11 KiB, and even formatting through its `strftime` and building
//! times with its calendar added 256 and 640 bytes more than these few lines. SigV4 signing
//! (src/storage/sigv4.rs) now takes its timestamps from here too.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// A moment in UTC, as milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcTime(i64);

impl UtcTime {
    pub fn now() -> UtcTime {
        let millis = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        };
        UtcTime(millis)
    }

    pub fn from_millis(millis: i64) -> UtcTime {
        UtcTime(millis)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    /// `20261121T094423.123Z`, the spelling inside object names.
    pub fn to_compact(self) -> String {
        let (y, mo, d, h, mi, s, ms) = self.fields();
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}.{ms:03}Z")
    }

    /// Parse the compact spelling exactly as [`UtcTime::to_compact`] writes it.
    pub fn parse_compact(text: &str) -> Option<UtcTime> {
        let b = text.as_bytes();
        if b.len() != 20 || b[8] != b'T' || b[15] != b'.' || b[19] != b'Z' {
            return None;
        }
        let num = |range: std::ops::Range<usize>| -> Option<i64> {
            let s = text.get(range)?;
            if !s.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        let millis = num(16..19)?;
        let base = from_fields(
            num(0..4)?,
            num(4..6)?,
            num(6..8)?,
            num(9..11)?,
            num(11..13)?,
            num(13..15)?,
        )?;
        Some(UtcTime(base + millis))
    }

    /// `2026-11-21T09:44:23.123Z`.
    pub fn to_rfc3339(self) -> String {
        let (y, mo, d, h, mi, s, ms) = self.fields();
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }

    /// Parse an RFC 3339 time such as `2026-01-10T12:00:00Z`, `2026-01-10T12:00:00.5+02:00`.
    /// Digits past milliseconds are truncated.
    pub fn parse_rfc3339(text: &str) -> Result<UtcTime> {
        parse_rfc3339(text).ok_or_else(|| {
            Error::invalid(format!(
                "{text:?} is not an RFC 3339 time (expected e.g. 2026-01-10T12:00:00Z)"
            ))
        })
    }

    /// Year, month, day, hour, minute, second, millisecond.
    fn fields(self) -> (i64, i64, i64, i64, i64, i64, i64) {
        let days = self.0.div_euclid(86_400_000);
        let rem = self.0.rem_euclid(86_400_000);
        let (y, mo, d) = civil_from_days(days);
        let secs = rem / 1000;
        (y, mo, d, secs / 3600, secs / 60 % 60, secs % 60, rem % 1000)
    }
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

fn parse_rfc3339(text: &str) -> Option<UtcTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let mut millis = from_fields(
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    )?;
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let ms_digits = &frac[..digits.min(3)];
        let scale = [100, 10, 1][ms_digits.len() - 1];
        millis += ms_digits.parse::<i64>().ok()? * scale;
        rest = &frac[digits..];
    }
    let offset_minutes = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let d = |c: u8| i64::from(c - b'0');
            let (h, m) = (d(*h1) * 10 + d(*h2), d(*m1) * 10 + d(*m2));
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'-' {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    Some(UtcTime(millis - offset_minutes * 60_000))
}

/// Milliseconds since the epoch for a calendar date and time, or None if a field is out of range.
fn from_fields(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return None;
    }
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s.min(59);
    Some(secs * 1000)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        // 2026-01-10T12:00:00Z is 1768046400 seconds after the epoch.
        let t = UtcTime::from_millis(1_768_046_400_123);
        assert_eq!(t.to_rfc3339(), "2026-01-10T12:00:00.123Z");
        assert_eq!(t.to_compact(), "20260110T120000.123Z");
        assert_eq!(UtcTime::from_millis(0).to_compact(), "19700101T000000.000Z");
        // A leap day.
        assert_eq!(
            UtcTime::from_millis(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn compact_round_trips_and_sorts_in_time_order() {
        let mut previous = String::new();
        for millis in [0, 1, 999, 86_399_999, 951_782_400_000, 1_768_046_400_123] {
            let t = UtcTime::from_millis(millis);
            let s = t.to_compact();
            assert_eq!(UtcTime::parse_compact(&s), Some(t), "{s}");
            assert!(s > previous, "{s} should sort after {previous}");
            previous = s;
        }
        assert_eq!(UtcTime::parse_compact("20260110T120000.123"), None);
        assert_eq!(UtcTime::parse_compact("20261310T120000.123Z"), None);
    }

    #[test]
    fn parses_rfc3339_variants() {
        let z = UtcTime::parse_rfc3339("2026-01-10T12:00:00Z").unwrap();
        assert_eq!(z.millis(), 1_768_046_400_000);
        let frac = UtcTime::parse_rfc3339("2026-01-10T12:00:00.5Z").unwrap();
        assert_eq!(frac.millis(), 1_768_046_400_500);
        let nanos = UtcTime::parse_rfc3339("2026-01-10T12:00:00.123456789Z").unwrap();
        assert_eq!(nanos.millis(), 1_768_046_400_123);
        let east = UtcTime::parse_rfc3339("2026-01-10T14:00:00+02:00").unwrap();
        assert_eq!(east, z);
        let west = UtcTime::parse_rfc3339("2026-01-10T07:30:00-04:30").unwrap();
        assert_eq!(west, z);
    }

    /// jiff, the date library walsync left for these few lines (see the module doc), as an
    /// oracle: the same instants, spellings and parses, over many random and edge values.
    mod oracle {
        use super::*;
        use jiff::Timestamp;

        use crate::test_random::Random;

        /// Milliseconds of 0000-01-01T00:00:00Z, the first instant whose year spells with
        /// four digits, as object names need, and of 9999-12-30T22:00:00Z, the last one
        /// jiff represents (so that any offset keeps it within year 9999).
        const FIRST: i64 = -62_167_219_200_000;
        const LAST: i64 = 253_402_207_200_000;

        /// Instants worth checking one by one: the epoch, leap days and the century rules,
        /// month and year ends, the ends of the four-digit years.
        fn edges() -> Vec<i64> {
            let mut edges = vec![FIRST, LAST, 0, -1, 1, 999, 1000, -999, -1000];
            for date in [
                "0000-02-29",
                "0001-01-01",
                "0400-02-29",
                "1600-02-29",
                "1899-12-31",
                "1900-02-28",
                "1900-03-01",
                "1969-12-31",
                "1970-01-01",
                "1999-12-31",
                "2000-02-29",
                "2000-03-01",
                "2024-02-29",
                "2038-01-19",
                "2100-02-28",
                "2100-03-01",
                "2400-02-29",
                "9999-12-30",
            ] {
                let start = format!("{date}T00:00:00Z").parse::<Timestamp>().unwrap();
                let ms = start.as_millisecond();
                edges.extend([ms - 1, ms, ms + 1, ms + 86_399_999]);
            }
            edges.retain(|ms| (FIRST..=LAST).contains(ms));
            edges
        }

        /// What jiff parses `text` to, in whole milliseconds (rounded down, as walsync
        /// truncates the digits past milliseconds), or None if it refuses it.
        fn jiff_millis(text: &str) -> Option<i64> {
            let t = text.parse::<Timestamp>().ok()?;
            Some(t.as_nanosecond().div_euclid(1_000_000) as i64)
        }

        #[test]
        fn formats_as_jiff_does_and_parses_back() {
            let mut random = Random(20);
            let instants = edges()
                .into_iter()
                .chain((0..20_000).map(|_| random.range(FIRST, LAST)));
            for ms in instants {
                let t = UtcTime::from_millis(ms);
                let oracle = Timestamp::from_millisecond(ms).unwrap();
                let rfc3339 = oracle.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
                let compact = oracle.strftime("%Y%m%dT%H%M%S%.3fZ").to_string();
                assert_eq!(t.to_rfc3339(), rfc3339, "{ms}");
                assert_eq!(t.to_compact(), compact, "{ms}");
                assert_eq!(UtcTime::parse_rfc3339(&rfc3339).ok(), Some(t), "{rfc3339}");
                assert_eq!(UtcTime::parse_compact(&compact), Some(t), "{compact}");
                assert_eq!(jiff_millis(&rfc3339), Some(ms), "{rfc3339}");
            }
        }

        /// A random RFC 3339 time: any date and time of years 0001-9998, `T`, `t` or a
        /// space, 0 to 9 fraction digits, `Z`, `z` or an offset up to ±23:59.
        fn random_rfc3339(random: &mut Random) -> String {
            let year = random.range(1, 9998);
            let month = random.range(1, 12);
            let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
            let days = match month {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let day = random.range(1, days);
            let separator = ["T", "t", " "][random.range(0, 2) as usize];
            let (h, m, s) = (
                random.range(0, 23),
                random.range(0, 59),
                random.range(0, 59),
            );
            let digits = random.range(0, 9) as usize;
            let fraction: String = (0..digits)
                .map(|_| char::from(b'0' + random.range(0, 9) as u8))
                .collect();
            let fraction = if digits == 0 {
                String::new()
            } else {
                format!(".{fraction}")
            };
            let offset = match random.range(0, 3) {
                0 => "Z".to_string(),
                1 => "z".to_string(),
                _ => format!(
                    "{}{:02}:{:02}",
                    ["+", "-"][random.range(0, 1) as usize],
                    random.range(0, 23),
                    random.range(0, 59)
                ),
            };
            format!(
                "{year:04}-{month:02}-{day:02}{separator}{h:02}:{m:02}:{s:02}{fraction}{offset}"
            )
        }

        #[test]
        fn parses_rfc3339_as_jiff_does() {
            let mut random = Random(3339);
            let edges = [
                "2016-12-31T23:59:60Z",
                "2016-12-31T23:59:60.999+00:00",
                "1970-01-01T00:00:00-00:00",
                "1970-01-01T00:00:00.000000001+23:59",
                "1969-12-31T23:59:59.999999999Z",
                "0000-01-01T00:00:00+00:01",
                "0000-01-01T00:00:00-23:59",
                "9999-12-30T21:59:59.999999999Z",
            ];
            let randoms = (0..20_000).map(|_| random_rfc3339(&mut random));
            for text in edges.into_iter().map(str::to_string).chain(randoms) {
                let ours = UtcTime::parse_rfc3339(&text).map(UtcTime::millis).ok();
                assert_eq!(ours, jiff_millis(&text), "{text}");
            }
        }

        /// `text` with one or two characters changed, dropped or added.
        fn mutate(random: &mut Random, text: &str) -> String {
            const ALPHABET: &[u8] = b"0123456789:-+.TZtz 9";
            let mut text = text.as_bytes().to_vec();
            for _ in 0..random.range(1, 2) {
                let at = random.range(0, text.len() as i64 - 1) as usize;
                let c = ALPHABET[random.range(0, ALPHABET.len() as i64 - 1) as usize];
                match random.range(0, 2) {
                    0 => text[at] = c,
                    1 => drop(text.remove(at)),
                    _ => text.insert(at, c),
                }
            }
            String::from_utf8(text).unwrap()
        }

        /// Strings near valid ones: whatever walsync accepts, jiff accepts too, as the same
        /// instant. (jiff accepts more: ISO 8601 forms RFC 3339 does not have, such as
        /// `+0200` or `T12`.)
        #[test]
        fn accepts_nothing_jiff_refuses() {
            let mut random = Random(7);
            let mut accepted = 0;
            // Days and times that do not exist, one step past the last that does. (jiff takes
            // offsets up to ±25:59, which RFC 3339 does not: its offset hours are 00-23.)
            let edges = [
                "1900-02-29T00:00:00Z",
                "2100-02-29T00:00:00Z",
                "2023-02-29T00:00:00Z",
                "2024-02-30T00:00:00Z",
                "2024-04-31T00:00:00Z",
                "2024-13-01T00:00:00Z",
                "2024-00-10T00:00:00Z",
                "2024-01-00T00:00:00Z",
                "2024-01-10T24:00:00Z",
                "2024-01-10T23:60:00Z",
                "2024-01-10T23:59:61Z",
                "2024-01-10T23:59:59+23:60",
            ];
            for text in edges {
                assert_eq!(jiff_millis(text), None, "jiff takes {text}");
                assert!(UtcTime::parse_rfc3339(text).is_err(), "{text} accepted");
            }
            for _ in 0..50_000 {
                let valid = random_rfc3339(&mut random);
                let text = mutate(&mut random, &valid);
                // RFC 3339 allows any number of fraction digits; jiff reads at most 9.
                let fraction = text
                    .split_once('.')
                    .map_or(0, |(_, f)| f.bytes().take_while(u8::is_ascii_digit).count());
                if let Ok(ours) = UtcTime::parse_rfc3339(&text) {
                    accepted += 1;
                    if fraction <= 9 {
                        assert_eq!(Some(ours.millis()), jiff_millis(&text), "{text:?}");
                    }
                }
            }
            assert!(accepted > 1_000, "only {accepted} mutations parsed");
        }

        /// The same for the compact spelling of object names, spelled for jiff as RFC 3339.
        #[test]
        fn accepts_no_compact_time_jiff_refuses() {
            let mut random = Random(8);
            let mut accepted = 0;
            for _ in 0..50_000 {
                let name = UtcTime::from_millis(random.range(FIRST, LAST)).to_compact();
                let text = mutate(&mut random, &name);
                let Some(ours) = UtcTime::parse_compact(&text) else {
                    continue;
                };
                accepted += 1;
                let spelled = format!(
                    "{}-{}-{}T{}:{}:{}{}",
                    &text[..4],
                    &text[4..6],
                    &text[6..8],
                    &text[9..11],
                    &text[11..13],
                    &text[13..15],
                    &text[15..]
                );
                assert_eq!(Some(ours.millis()), jiff_millis(&spelled), "{text:?}");
            }
            assert!(accepted > 1_000, "only {accepted} mutations parsed");
        }
    }

    #[test]
    fn rejects_malformed_rfc3339() {
        for bad in [
            "",
            "2026-01-10",
            "2026-01-10T12:00:00",
            "2026-02-30T12:00:00Z",
            "2026-01-10T25:00:00Z",
            "2026-01-10T12:00:00.Z",
            "2026-01-10T12:00:00+2:00",
            "yesterday",
        ] {
            assert!(UtcTime::parse_rfc3339(bad).is_err(), "{bad:?} accepted");
        }
    }
}
