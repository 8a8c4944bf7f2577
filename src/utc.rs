//! UTC calendar arithmetic for the ledger: day and hour boundaries, ISO
//! dates, without a time-zone database (budgets reset at UTC midnight).

use std::time::{SystemTime, UNIX_EPOCH};

pub const HOUR: i64 = 3600;
pub const DAY: i64 = 24 * HOUR;

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// The UTC midnight at or before `ts`.
pub fn day_start(ts: i64) -> i64 {
    ts - ts.rem_euclid(DAY)
}

/// The start of the UTC hour containing `ts`.
pub fn hour_start(ts: i64) -> i64 {
    ts - ts.rem_euclid(HOUR)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format(ts: i64) -> String {
    let (y, m, d) = civil_from_days(ts.div_euclid(DAY));
    let s = ts.rem_euclid(DAY);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / HOUR, (s % HOUR) / 60, s % 60)
}

#[derive(Debug, thiserror::Error)]
#[error("invalid date {0:?}: expected YYYY-MM-DD, e.g. 2025-01-31")]
pub struct DateError(String);

/// The UTC midnight starting `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> Result<i64, DateError> {
    let bad = || DateError(text.to_string());
    let mut parts = text.trim().splitn(3, '-');
    let mut num = |len: usize| -> Result<i64, DateError> {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        p.parse().map_err(|_| bad())
    };
    let (y, m, d) = (num(4)?, num(2)?, num(2)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return Err(bad()); // 2025-02-30
    }
    Ok(days * DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(parse_date("1970-01-01").unwrap(), 0);
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        let ts = parse_date("2024-02-29").unwrap();
        assert_eq!(format(ts + 3661), "2024-02-29T01:01:01Z");
        assert_eq!(format(day_start(ts + 3661) + DAY), "2024-03-01T00:00:00Z");
        assert_eq!(hour_start(ts + 3661), ts + 3600);
        assert!(parse_date("2025-02-29").is_err());
        assert!(parse_date("2025-1-01").is_err());
        assert!(parse_date("yesterday").is_err());
        assert_eq!(format(parse_date("2038-01-19").unwrap()), "2038-01-19T00:00:00Z");
    }
}
