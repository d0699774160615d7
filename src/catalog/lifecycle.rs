//! A model's lifecycle: its dates, its status on a given day, and the headers that warn its callers
//! (`Deprecation`, RFC 9745; `Sunset`, RFC 8594; `Link` to the replacement). No HTTP types: the edge turns
//! [`Lifecycle::headers`] into header values.

use std::time::UNIX_EPOCH;

use chrono::NaiveDate;
use serde::Serialize;

/// A calendar day (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(NaiveDate);

const SECONDS_PER_DAY: i64 = 86_400;

impl Date {
    /// `YYYY-MM-DD`, nothing else.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 10 {
            return None;
        }
        NaiveDate::parse_from_str(text, "%Y-%m-%d").ok().map(Self)
    }

    /// The day a Unix time in milliseconds falls on.
    pub fn from_unix_ms(ms: i64) -> Self {
        let days = ms.div_euclid(1000 * SECONDS_PER_DAY);
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        Self(epoch.checked_add_signed(chrono::Duration::days(days)).unwrap_or(epoch))
    }

    /// Today, by the system clock. Every request asks (lifecycle checks, deprecation notices): the day is
    /// computed once per day per thread, not once per call.
    pub fn today() -> Self {
        thread_local! {
            static TODAY: crate::time::PerDay<Date> = const { std::cell::Cell::new(None) };
        }
        let ms = crate::time::now_ms();
        let day = u64::try_from(ms.div_euclid(1000 * SECONDS_PER_DAY)).unwrap_or(0);
        crate::time::once_per_day(&TODAY, day, || Self::from_unix_ms(ms))
    }

    /// Seconds since the Unix epoch at the day's start.
    pub fn unix_seconds(self) -> i64 {
        self.0.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp()).unwrap_or(0)
    }

    /// The day's start as an HTTP date (`Tue, 01 Dec 2026 00:00:00 GMT`).
    pub fn http_date(self) -> String {
        let secs = u64::try_from(self.unix_seconds()).unwrap_or(0);
        httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}

impl Serialize for Date {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a model is in its life on a given day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    /// Deprecated, or its shutdown is announced: it still works, and callers are warned.
    Deprecated,
    /// Past its shutdown day: refused like an unknown model.
    ShutDown,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Deprecated => "deprecated",
            Self::ShutDown => "shut_down",
        }
    }

    /// `active`, `deprecated` or `shut_down` (also `shutdown`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "deprecated" => Some(Self::Deprecated),
            "shut_down" | "shutdown" | "shut-down" => Some(Self::ShutDown),
            _ => None,
        }
    }
}

/// A model's dates and successor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Lifecycle {
    pub deprecated_on: Option<Date>,
    pub shutdown_on: Option<Date>,
    pub replacement: Option<String>,
}

impl Lifecycle {
    /// The status on `today`: shut down from its shutdown day on; deprecated from its deprecation day, or as
    /// soon as a shutdown is announced.
    pub fn status(&self, today: Date) -> Status {
        match (self.deprecated_on, self.shutdown_on) {
            (_, Some(s)) if s <= today => Status::ShutDown,
            (_, Some(_)) => Status::Deprecated,
            (Some(d), None) if d <= today => Status::Deprecated,
            _ => Status::Active,
        }
    }

    /// The warning headers for a call on `today` (none for an active model): `Deprecation: @<unix seconds>`
    /// (RFC 9745) when a deprecation day is known, `Sunset: <HTTP date>` (RFC 8594) when a shutdown day is,
    /// and `Link: <…>; rel="successor-version"` naming the replacement.
    pub fn headers(&self, today: Date) -> Vec<(&'static str, String)> {
        if self.status(today) == Status::Active {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(d) = self.deprecated_on {
            out.push(("deprecation", format!("@{}", d.unix_seconds())));
        }
        if let Some(s) = self.shutdown_on {
            out.push(("sunset", s.http_date()));
        }
        if let Some(r) = &self.replacement {
            out.push((
                "link",
                format!("<https://platform.openai.com/docs/models/{r}>; rel=\"successor-version\"; title=\"{r}\""),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> Date {
        Date::parse(text).unwrap()
    }

    #[test]
    fn dates_parse_strictly_and_print_back() {
        assert_eq!(day("2026-12-01").to_string(), "2026-12-01");
        for bad in ["2026-12-1", "2026-13-01", "01-12-2026", "2026-12-01T00:00:00Z", "", "tomorrow"] {
            assert_eq!(Date::parse(bad), None, "{bad}");
        }
        assert_eq!(day("2026-12-01").http_date(), "Tue, 01 Dec 2026 00:00:00 GMT");
        assert_eq!(day("1970-01-02").unix_seconds(), 86_400);
        assert_eq!(Date::from_unix_ms(86_400_000 + 5), day("1970-01-02"));
    }

    #[test]
    fn a_model_is_deprecated_once_its_shutdown_is_announced_and_gone_on_the_day() {
        let l = Lifecycle { deprecated_on: None, shutdown_on: Some(day("2026-12-01")), replacement: None };
        assert_eq!(l.status(day("2026-06-01")), Status::Deprecated);
        assert_eq!(l.status(day("2026-11-30")), Status::Deprecated);
        assert_eq!(l.status(day("2026-12-01")), Status::ShutDown);
        let d = Lifecycle { deprecated_on: Some(day("2026-06-02")), ..Lifecycle::default() };
        assert_eq!(d.status(day("2026-06-01")), Status::Active);
        assert_eq!(d.status(day("2026-06-02")), Status::Deprecated);
        assert_eq!(Lifecycle::default().status(day("2099-01-01")), Status::Active);
    }

    #[test]
    fn warning_headers_follow_the_rfcs() {
        let l = Lifecycle {
            deprecated_on: Some(day("2026-06-02")),
            shutdown_on: Some(day("2026-12-01")),
            replacement: Some("gpt-image-2".into()),
        };
        let h = l.headers(day("2026-07-01"));
        assert_eq!(h[0], ("deprecation", format!("@{}", day("2026-06-02").unix_seconds())));
        assert_eq!(h[1], ("sunset", "Tue, 01 Dec 2026 00:00:00 GMT".to_owned()));
        assert!(h[2].1.contains("rel=\"successor-version\"") && h[2].1.contains("gpt-image-2"));
        // A future deprecation day is announced as such (RFC 9745 allows it); an active model carries nothing.
        assert_eq!(l.headers(day("2026-01-01")).len(), 3);
        assert!(Lifecycle::default().headers(day("2026-01-01")).is_empty());
    }
}
