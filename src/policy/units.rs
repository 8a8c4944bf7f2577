//! Sizes (`"256M"`), durations (`"1m30s"`) and percentages (`"50%"`).
//!
//! Grammar, all case-insensitive, no spaces anywhere:
//!
//! - size: `<number>[K|M|G|T][B|iB]` or a bare `B` suffix, e.g. `"4096"`,
//!   `"512K"`, `"256M"`, `"1GiB"`, `"1.5G"`. Suffixes are powers of 1024.
//!   A decimal fraction is allowed only with a K/M/G/T suffix and is rounded
//!   down to whole bytes. A TOML integer is a number of bytes.
//! - duration: one or more `<integer><unit>` parts with units `h`, `m`, `s`,
//!   `ms`, `us`, `ns`, largest first and each at most once: `"30s"`,
//!   `"500ms"`, `"1m30s"`, `"1h"`.
//! - percent: `<integer>%`, e.g. `"50%"`; above 100 means more than one CPU.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// A value that does not follow the size, duration or percent grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: {reason}")]
pub struct UnitError {
    /// "size", "duration" or "percentage".
    pub kind: &'static str,
    /// The text as written.
    pub input: String,
    /// What is wrong and what would be valid.
    pub reason: String,
}

impl UnitError {
    fn new(kind: &'static str, input: &str, reason: impl Into<String>) -> Self {
        Self { kind, input: input.to_owned(), reason: reason.into() }
    }
}

const SIZE_HINT: &str = "expected a number with an optional K, M, G or T suffix, e.g. \"256M\"";
const DURATION_HINT: &str = "expected a whole number with a unit h, m, s or ms, e.g. \"30s\", \"500ms\" or \"1m30s\"";
const PERCENT_HINT: &str = "expected a whole number followed by '%', e.g. \"50%\"";

/// A number of bytes. Displays in the shortest exact form (`"256M"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const SIZE_UNITS: [(char, u64); 4] = [('T', 1 << 40), ('G', 1 << 30), ('M', 1 << 20), ('K', 1 << 10)];

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        Self(n << 10)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n << 20)
    }
    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Self(n << 30)
    }
    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, UnitError> {
        let err = |reason: &str| UnitError::new("size", input, reason);
        if input.is_empty() {
            return Err(err(SIZE_HINT));
        }
        if input.starts_with('-') {
            return Err(err("a size cannot be negative"));
        }
        let upper = input.to_ascii_uppercase();
        let number_end = upper.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(upper.len());
        let (number, suffix) = upper.split_at(number_end);
        let unit = match suffix {
            "" | "B" => 1,
            _ => {
                let mut chars = suffix.chars();
                let letter = chars.next().unwrap_or(' ');
                let rest = chars.as_str();
                let Some(&(_, mult)) = SIZE_UNITS.iter().find(|(l, _)| *l == letter) else {
                    return Err(err(SIZE_HINT));
                };
                if !matches!(rest, "" | "B" | "IB") {
                    return Err(err(SIZE_HINT));
                }
                mult
            }
        };
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (number, None),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(SIZE_HINT));
        }
        let too_large = || err("too large; a size must be below 16777216T (2^64 bytes)");
        let whole: u64 = whole.parse().map_err(|_| too_large())?;
        let mut bytes = whole.checked_mul(unit).ok_or_else(too_large)?;
        if let Some(fraction) = fraction {
            if unit == 1 {
                return Err(err("a fraction needs a K, M, G or T suffix; bytes are whole numbers"));
            }
            if fraction.is_empty() || fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(SIZE_HINT));
            }
            let digits: u64 = fraction.parse().map_err(|_| err(SIZE_HINT))?;
            let scale = 10u64.pow(u32::try_from(fraction.len()).map_err(|_| err(SIZE_HINT))?);
            // unit <= 2^40 and digits < 10^9 < 2^30: fits in u128 without overflow.
            let extra = u128::from(digits) * u128::from(unit) / u128::from(scale);
            let extra = u64::try_from(extra).map_err(|_| too_large())?;
            bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (letter, mult) in SIZE_UNITS {
                if self.0.is_multiple_of(mult) {
                    return write!(f, "{}{letter}", self.0 / mult);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A CPU share in percent of one CPU: `"50%"` is `Percent(50)`, `"150%"` is
/// one and a half CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(pub u32);

impl FromStr for Percent {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, UnitError> {
        let err = |reason: &str| UnitError::new("percentage", input, reason);
        let Some(number) = input.strip_suffix('%') else {
            return Err(err(PERCENT_HINT));
        };
        if number.starts_with('-') {
            return Err(err("a percentage cannot be negative"));
        }
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(PERCENT_HINT));
        }
        number.parse().map(Self).map_err(|_| err("too large; the largest percentage is 4294967295%"))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Duration units, largest first, in nanoseconds.
const DURATION_UNITS: [(&str, u128); 6] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses `"30s"`, `"500ms"`, `"1m30s"`, `"1h"` (see the module docs).
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let err = |reason: &str| UnitError::new("duration", input, reason);
    if input.starts_with('-') {
        return Err(err("a duration cannot be negative"));
    }
    let lower = input.to_ascii_lowercase();
    let mut rest = lower.as_str();
    if rest.is_empty() {
        return Err(err(DURATION_HINT));
    }
    let mut total: u128 = 0;
    // Index into DURATION_UNITS of the next unit allowed (units go largest first).
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (digits, tail) = rest.split_at(digits_end);
        if digits.is_empty() {
            return Err(err(DURATION_HINT));
        }
        let unit_end = tail.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        if unit.is_empty() {
            return Err(if tail.starts_with('.') {
                err("fractions are not allowed; use a smaller unit, e.g. \"1500ms\" for 1.5s")
            } else {
                err(&format!("missing unit; {DURATION_HINT}"))
            });
        }
        let Some(index) = DURATION_UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(err(&format!("unknown unit {unit:?}; {DURATION_HINT}")));
        };
        if index < next_unit {
            return Err(err("each unit may appear once, largest first, e.g. \"1h30m\" or \"1m30s\""));
        }
        next_unit = index + 1;
        let value: u128 = digits.parse().map_err(|_| err("too large"))?;
        total = value
            .checked_mul(DURATION_UNITS[index].1)
            .and_then(|n| n.checked_add(total))
            .ok_or_else(|| err("too large"))?;
        rest = tail;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("too large"))?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| err("too large"))?;
    Ok(Duration::new(secs, nanos))
}

/// Formats a duration in the form [`parse_duration`] reads: `"30s"`,
/// `"500ms"`, `"1m30s"`, `"0s"`.
pub fn format_duration(d: Duration) -> String {
    let mut rest = d.as_nanos();
    if rest == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, nanos) in DURATION_UNITS {
        let n = rest / nanos;
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
            rest %= nanos;
        }
    }
    out
}

/// `serialize_with` helper: a duration as its [`format_duration`] string.
pub(crate) fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        let cases = [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("512K", 512 << 10),
            ("512k", 512 << 10),
            ("256M", 256 << 20),
            ("256MB", 256 << 20),
            ("256MiB", 256 << 20),
            ("256mib", 256 << 20),
            ("1G", 1 << 30),
            ("1.5G", 3 << 29),
            ("0.5K", 512),
            ("2T", 2 << 40),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn sizes_reject() {
        for text in
            ["", "M", "256Q", "10 M", " 10M", "10M ", "-1M", "1.5", "1.G", ".5G", "1KK", "1MiBB", "1e3", "0x10", "+1M"]
        {
            assert!(text.parse::<ByteSize>().is_err(), "{text:?} should be rejected");
        }
        let e = "256Q".parse::<ByteSize>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"invalid size "256Q": expected a number with an optional K, M, G or T suffix, e.g. "256M""#
        );
        let e = "-1M".parse::<ByteSize>().unwrap_err();
        assert_eq!(e.reason, "a size cannot be negative");
        let e = "16384P".parse::<ByteSize>().unwrap_err();
        assert_eq!(e.reason, SIZE_HINT, "P is not a suffix");
        for overflow in ["18446744073709551616", "16777216T", "99999999999999999999999G"] {
            let e = overflow.parse::<ByteSize>().unwrap_err();
            assert!(e.reason.starts_with("too large"), "{overflow}: {e}");
        }
    }

    #[test]
    fn sizes_display_round_trip() {
        let cases = [
            (0, "0"),
            (1000, "1000"),
            (4096, "4K"),
            (256 << 20, "256M"),
            (3 << 29, "1536M"),
            (1 << 30, "1G"),
            (5 << 40, "5T"),
        ];
        for (bytes, text) in cases {
            assert_eq!(ByteSize(bytes).to_string(), text);
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)));
        }
    }

    #[test]
    fn percent_parse() {
        assert_eq!("50%".parse::<Percent>(), Ok(Percent(50)));
        assert_eq!("150%".parse::<Percent>(), Ok(Percent(150)));
        assert_eq!("0%".parse::<Percent>(), Ok(Percent(0)));
        assert_eq!(Percent(25).to_string(), "25%");
        for text in ["", "%", "50", "50 %", "12.5%", "-5%", "5%%", "a%", "4294967296%"] {
            assert!(text.parse::<Percent>().is_err(), "{text:?} should be rejected");
        }
        assert_eq!(
            "50".parse::<Percent>().unwrap_err().to_string(),
            r#"invalid percentage "50": expected a whole number followed by '%', e.g. "50%""#
        );
        assert_eq!("-5%".parse::<Percent>().unwrap_err().reason, "a percentage cannot be negative");
    }

    #[test]
    fn durations_parse() {
        let ms = Duration::from_millis;
        let cases = [
            ("30s", ms(30_000)),
            ("500ms", ms(500)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1m30s", ms(90_000)),
            ("1h30m", ms(5_400_000)),
            ("1s500ms", ms(1_500)),
            ("30S", ms(30_000)),
            ("0s", ms(0)),
            ("250us", Duration::from_micros(250)),
        ];
        for (text, d) in cases {
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn durations_reject() {
        for text in [
            "",
            "30",
            "s",
            "30x",
            "1.5s",
            "30 s",
            "30s ",
            "-1s",
            "30s1m",
            "1s1s",
            "1m 30s",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} should be rejected");
        }
        assert_eq!(
            parse_duration("30").unwrap_err().to_string(),
            r#"invalid duration "30": missing unit; expected a whole number with a unit h, m, s or ms, e.g. "30s", "500ms" or "1m30s""#
        );
        assert!(parse_duration("1.5s").unwrap_err().reason.contains("1500ms"));
        assert!(parse_duration("30x").unwrap_err().reason.starts_with("unknown unit \"x\""));
        assert_eq!(parse_duration("-1s").unwrap_err().reason, "a duration cannot be negative");
        let huge = format!("{}h", u64::MAX);
        assert_eq!(parse_duration(&huge).unwrap_err().reason, "too large");
    }

    #[test]
    fn durations_format_round_trip() {
        let ms = Duration::from_millis;
        let cases = [
            (ms(0), "0s"),
            (ms(30_000), "30s"),
            (ms(500), "500ms"),
            (ms(90_000), "1m30s"),
            (ms(3_600_000), "1h"),
            (ms(1_500), "1s500ms"),
            (Duration::from_nanos(1_001), "1us1ns"),
        ];
        for (d, text) in cases {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }
}
