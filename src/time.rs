//! Wall-clock time as the gateway stores and compares it: Unix milliseconds, UTC days and months, and the
//! time formats callers and operators type. The one place that reads the system clock for timestamps.

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// Milliseconds since the Unix epoch, the timestamp format of every table.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Seconds since the Unix epoch (signed links and the mock's links count in seconds).
pub fn now_secs() -> u64 {
    u64::try_from(Utc::now().timestamp()).unwrap_or(0)
}

/// Start of the UTC day and month containing `now_ms`, and their ends, as Unix milliseconds.
/// The month's bounds are calendar work (the limits ask twice per request): computed once per UTC day per thread.
pub fn windows(now_ms: u64) -> (u64, u64, u64, u64) {
    const DAY: u64 = 86_400_000;
    thread_local! {
        static MONTH: PerDay<(u64, u64)> = const { std::cell::Cell::new(None) };
    }
    let day_start = now_ms - now_ms % DAY;
    let (month_start, month_end) = once_per_day(&MONTH, now_ms / DAY, || {
        let start = month_start(i64::try_from(now_ms).unwrap_or(i64::MAX)).unwrap_or(0);
        let end = next_month_start(start).unwrap_or(i64::MAX);
        (u64::try_from(start).unwrap_or(0), u64::try_from(end).unwrap_or(0))
    });
    (day_start, day_start + DAY, month_start, month_end)
}

/// A thread's cache of something that changes only with the UTC day: the day's number and its value.
pub type PerDay<T> = std::cell::Cell<Option<(u64, T)>>;

/// `compute`'s value for UTC day number `day` (days since the epoch), computed once per day per thread.
pub fn once_per_day<T: Copy + 'static>(
    cache: &'static std::thread::LocalKey<PerDay<T>>,
    day: u64,
    compute: impl FnOnce() -> T,
) -> T {
    cache.with(|cached| match cached.get() {
        Some((d, value)) if d == day => value,
        _ => {
            let value = compute();
            cached.set(Some((day, value)));
            value
        }
    })
}

/// Midnight UTC on the first day of the month `ms` (Unix milliseconds) falls in.
pub fn month_start(ms: i64) -> Option<i64> {
    let t = Utc.timestamp_millis_opt(ms).single()?;
    let first = NaiveDate::from_ymd_opt(t.year(), t.month(), 1)?;
    Some(first.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// Midnight UTC on the first day of the month after the one `ms` falls in.
fn next_month_start(ms: i64) -> Option<i64> {
    let start = Utc.timestamp_millis_opt(month_start(ms)?).single()?;
    Some(start.checked_add_months(Months::new(1))?.timestamp_millis())
}

/// Why a relative expiry (`30d`) was refused; the admin API and the CLI each name their own parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelativeError {
    /// Not a duration humantime reads.
    #[error("{0} (examples: 30d, 12h, 1y)")]
    Unreadable(String),
    #[error("must be at least one second")]
    TooShort,
    #[error("is too far in the future")]
    TooFar,
}

/// `text` (a duration such as `30d`) after `now_ms`, in Unix milliseconds.
pub fn after(text: &str, now_ms: i64) -> Result<i64, RelativeError> {
    let duration = humantime::parse_duration(text).map_err(|e| RelativeError::Unreadable(e.to_string()))?;
    if duration < std::time::Duration::from_secs(1) {
        return Err(RelativeError::TooShort);
    }
    i64::try_from(duration.as_millis()).ok().and_then(|ms| now_ms.checked_add(ms)).ok_or(RelativeError::TooFar)
}

/// Parse a time-range bound or an expiry: an RFC 3339 time with any offset (`2026-11-01T09:00:00Z`,
/// `2026-11-01T10:00:00+01:00`; without an offset it is UTC), a date (`2026-11-01`, midnight UTC) or Unix
/// milliseconds. Times before 1970 are refused. A space before a trailing `hh:mm` offset is read as `+`:
/// that is what an unencoded `+` in a query string becomes.
pub fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    let ms = if let Ok(ms) = text.parse::<i64>() {
        ms
    } else if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis()
    } else if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        time.timestamp_millis()
    } else if let Some(time) = plus_offset(text).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()) {
        time.timestamp_millis()
    } else {
        let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok()?;
        naive.and_utc().timestamp_millis()
    };
    (ms >= 0).then_some(ms)
}

/// `2026-12-01T10:00:00 02:00` → `2026-12-01T10:00:00+02:00`.
fn plus_offset(text: &str) -> Option<String> {
    let split = text.len().checked_sub(6)?;
    let (time, offset) = (text.get(..split)?, text.get(split..)?);
    let offset = offset.strip_prefix(' ')?;
    (offset.len() == 5 && offset.as_bytes().get(2) == Some(&b':')).then(|| format!("{time}+{offset}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_month_starts_at_midnight_utc_on_the_first() {
        assert_eq!(month_start(1_794_923_100_000), Some(1_793_491_200_000));
    }

    #[test]
    fn day_and_month_windows_are_utc_calendar_boundaries() {
        // 2026-11-25T10:00:00Z
        let now = 1_795_600_800_000;
        let (d0, d1, m0, m1) = windows(now);
        assert_eq!(d0, 1_795_564_800_000); // 2026-11-25
        assert_eq!(d1 - d0, 86_400_000);
        assert_eq!(m0, 1_793_491_200_000); // 2026-11-01
        assert_eq!(m1, 1_796_083_200_000); // 2026-12-01
        // December rolls into the next year.
        let (_, _, m0, m1) = windows(1_798_000_000_000); // 2026-12-23
        assert_eq!((m0, m1), (1_796_083_200_000, 1_798_761_600_000));
    }

    #[test]
    fn time_bounds_parse_in_three_spellings() {
        assert_eq!(parse_time("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2026-11-01"), Some(1_793_491_200_000));
        assert_eq!(parse_time("2026-11-01T00:00:00Z"), Some(1_793_491_200_000));
        assert_eq!(parse_time("2026-11-01T00:00:00"), Some(1_793_491_200_000));
        assert_eq!(parse_time("2026-11-01T00:00:00.250Z"), Some(1_793_491_200_250));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn rfc3339_offsets_are_honoured() {
        let utc = parse_time("2026-12-01T08:00:00Z").unwrap();
        assert_eq!(parse_time("2026-12-01T10:00:00+02:00"), Some(utc));
        assert_eq!(parse_time("2026-12-01T03:00:00-05:00"), Some(utc));
        assert_eq!(parse_time("2026-12-01T10:00:00 02:00"), Some(utc), "an unencoded + in a query string");
        assert_eq!(parse_time("2026-12-01t08:00:00z"), Some(utc));
    }

    #[test]
    fn times_before_1970_are_refused() {
        assert_eq!(parse_time("-5"), None);
        assert_eq!(parse_time("1969-12-31"), None);
        assert_eq!(parse_time("0"), Some(0));
    }
}
