//! RFC 3339 times in UTC, as images, attestations and progress streams
//! write them (no time-zone database needed: always `Z`).

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// As [`rfc3339`] for Unix nanoseconds, with the fraction Go's time.Time
/// writes (trailing zeros dropped; none when whole).
pub fn rfc3339_nanos(ns: i64) -> String {
    let whole = rfc3339(ns.div_euclid(1_000_000_000));
    let nanos = ns.rem_euclid(1_000_000_000);
    if nanos == 0 {
        return whole;
    }
    let frac = format!(".{nanos:09}");
    format!(
        "{}{}Z",
        whole.trim_end_matches('Z'),
        frac.trim_end_matches('0')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339_nanos(1_700_000_000_123_000_000),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            rfc3339_nanos(1_700_000_000_000_000_000),
            "2023-11-14T22:13:20Z"
        );
    }
}
