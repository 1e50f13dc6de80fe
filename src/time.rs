//! Time on the wire: RFC 3339 timestamps for envelopes and dead letters, `Retry-After` values, and
//! the periods people write in configurations and flags (`30s`, `7d`).
//! Pure: the current time is always passed in.

use std::time::UNIX_EPOCH;

/// Formats Unix milliseconds as RFC 3339 UTC with a `Z`, to whole seconds like the documentation's sample.
pub fn rfc3339_utc(unix_millis: u64) -> String {
    let secs = unix_millis / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    // Digit by digit rather than `format!`: this runs once per event.
    let mut out = String::with_capacity(20);
    if !(0..=9999).contains(&year) {
        return format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        );
    }
    push_digits(&mut out, year as u64, 4);
    for (sep, n) in [
        ('-', u64::from(month)),
        ('-', u64::from(day)),
        ('T', rem / 3600),
        (':', (rem % 3600) / 60),
        (':', rem % 60),
    ] {
        out.push(sep);
        push_digits(&mut out, n, 2);
    }
    out.push('Z');
    out
}

/// Appends the last `width` decimal digits of `n`, zero-padded.
fn push_digits(out: &mut String, n: u64, width: u32) {
    for i in (0..width).rev() {
        let digit = (n / 10u64.pow(i)) % 10;
        out.push(char::from(b'0' + digit as u8));
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01; the inverse of [`civil_from_days`].
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A period as people write it: a whole number followed by `ms`, `s`, `m`, `h` (and `d` with
/// `days`), in milliseconds; more than 0 and at most `max_ms`, which `max` names in the error.
pub fn parse_period_ms(text: &str, days: bool, max_ms: u64, max: &str) -> Result<u64, String> {
    let units = if days {
        "ms, s, m, h or d"
    } else {
        "ms, s, m or h"
    };
    let shape = || format!("{text:?} must be a whole number followed by {units}");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" if days => 86_400_000,
        _ => return Err(shape()),
    };
    let value: u64 = number.parse().map_err(|_| shape())?;
    match value.checked_mul(scale) {
        Some(ms) if ms > 0 && ms <= max_ms => Ok(ms),
        _ => Err(format!("{text:?} must be more than 0 and at most {max}")),
    }
}

/// A `Retry-After` header value (RFC 9110 §10.2.3) as a delay in milliseconds from `now_ms`:
/// delay-seconds, or an HTTP-date in any of the three forms a recipient must accept (§5.6.7):
/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and
/// asctime (`Sun Nov  6 08:49:37 1994`). A date in the past is a delay of 0. The value comes
/// from a peer as bytes: anything that is not one of these forms (not UTF-8, a day the month does
/// not have, a weekday that does not match the date) is `None`.
pub fn parse_retry_after(value: &[u8], now_ms: u64) -> Option<u64> {
    let value = std::str::from_utf8(value).ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse::<u64>().ok()?.saturating_mul(1000));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = u64::try_from(at.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()?;
    Some(at_ms.saturating_sub(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_728_086_400_000), "2024-10-05T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400_999), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(4_102_444_799_000), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(253_402_300_799_000), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(253_402_300_800_000), "10000-01-01T00:00:00Z");
    }

    #[test]
    fn civil_days_round_trip() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    /// RFC 9110's own example instant, 1994-11-06 08:49:37 UTC.
    const AT: u64 = 784_111_777_000;

    #[test]
    fn retry_after_delay_seconds() {
        assert_eq!(parse_retry_after(b"120", 0), Some(120_000));
        assert_eq!(parse_retry_after(b" 3 ", 0), Some(3_000));
        assert_eq!(parse_retry_after(b"0", 5), Some(0));
        assert_eq!(
            parse_retry_after(b"99999999999999999999", 0),
            None,
            "does not fit u64"
        );
    }

    #[test]
    fn retry_after_imf_fixdate() {
        let date = b"Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(parse_retry_after(date, AT - 5_000), Some(5_000));
        assert_eq!(parse_retry_after(date, AT + 5_000), Some(0));
    }

    #[test]
    fn retry_after_rfc850() {
        let date = b"Sunday, 06-Nov-94 08:49:37 GMT";
        assert_eq!(parse_retry_after(date, AT - 7_000), Some(7_000));
    }

    #[test]
    fn retry_after_asctime() {
        let date = b"Sun Nov  6 08:49:37 1994";
        assert_eq!(parse_retry_after(date, AT - 9_000), Some(9_000));
    }

    #[test]
    fn retry_after_refuses_what_is_not_a_date() {
        for bad in [
            &b""[..],
            b"-1",
            b"1.5",
            b"soon",
            b"Sun, 06 Nov 1994 08:49:37 PST",
            b"Sun, 32 Nov 1994 08:49:37 GMT",
            // Days the month does not have.
            b"Thu, 31 Nov 1994 08:49:37 GMT",
            b"Tue, 29 Feb 2022 08:49:37 GMT",
            b"Thursday, 31-Nov-94 08:49:37 GMT",
            b"Thu Nov 31 08:49:37 1994",
            // The weekday does not match the date.
            b"Mon, 06 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 24:00:00 GMT",
            // Not UTF-8, and a non-ASCII look-alike.
            b"Sun, 06 Nov 1994 08:49:37 GM\xff",
            "Sun, 06 Nov 1994 08:49:37 GMＴ".as_bytes(),
        ] {
            assert_eq!(
                parse_retry_after(bad, 0),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A leap day that exists.
        assert!(parse_retry_after(b"Thu, 29 Feb 2024 00:00:00 GMT", 0).is_some());
    }
}
