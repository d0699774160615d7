//! A tenant's limits as data: the limits it has, what happens when their backend cannot answer, and the state
//! of its buckets that the `x-ratelimit-*` headers report. The limiter that enforces them is `crate::limits`.

use serde::{Deserialize, Serialize};

/// Per-tenant limits; `None` means unlimited. Enforced by the rate-limit stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    /// Weighted by `n`: an `n=4` request spends 4.
    pub images_per_minute: Option<u32>,
    /// Requests a quiet tenant may send at once (default: `requests_per_minute`).
    pub requests_burst: Option<u32>,
    /// Images a quiet tenant may ask for at once (default: `images_per_minute`).
    pub images_burst: Option<u32>,
    pub concurrent_requests: Option<u32>,
    pub images_per_day: Option<u64>,
    pub images_per_month: Option<u64>,
    pub usd_per_day: Option<f64>,
    pub usd_per_month: Option<f64>,
}

/// What to do when the backend cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    /// Let the request through (logged and counted): availability over strictness.
    #[default]
    Open,
    /// Refuse with 503: strictness over availability.
    Closed,
}

/// The state of one per-minute bucket after a decision, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketReport {
    pub limit: u64,
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
}

/// Header material: the request and image buckets, when the tenant has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub requests: Option<BucketReport>,
    pub images: Option<BucketReport>,
}

impl Report {
    /// What to say when the backend could not be asked: the limits, with nothing counted against them
    /// (`remaining` = the limit, reset `0s`) when requests go through unenforced, or nothing left (`0`,
    /// reset `1s`, the `retry-after` of the 503) when they are refused.
    pub fn unknown(limits: &Limits, open: bool) -> Self {
        let bucket = |limit: Option<u32>| {
            limit.map(|l| BucketReport {
                limit: u64::from(l),
                remaining: if open { u64::from(l) } else { 0 },
                reset_ms: if open { 0 } else { 1000 },
            })
        };
        Self { requests: bucket(limits.requests_per_minute), images: bucket(limits.images_per_minute) }
    }
}

/// A duration in OpenAI's `x-ratelimit-reset-*` format, which is Go's `time.Duration` string at millisecond
/// precision: `0s`, `12ms`, `1s`, `1.5s`, `59.5s`, `6m0s`, `1h0m0s`.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, (ms / 60_000) % 60);
    let (s, frac) = ((ms / 1000) % 60, ms % 1000);
    let seconds = if frac == 0 {
        format!("{s}s")
    } else {
        let digits = format!("{frac:03}");
        format!("{s}.{}s", digits.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => seconds,
        (0, _) => format!("{m}m{seconds}"),
        _ => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_are_go_durations_like_openai_headers() {
        assert_eq!(go_duration(0), "0s", "Go prints a zero duration as 0s");
        assert_eq!(go_duration(12), "12ms");
        assert_eq!(go_duration(999), "999ms");
        assert_eq!(go_duration(1000), "1s");
        assert_eq!(go_duration(1001), "1.001s");
        assert_eq!(go_duration(1500), "1.5s");
        assert_eq!(go_duration(59_500), "59.5s", "no rounding up to a whole minute");
        assert_eq!(go_duration(60_000), "1m0s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(61_250), "1m1.25s");
        assert_eq!(go_duration(3_600_000), "1h0m0s");
        assert_eq!(go_duration(3_600_000 + 61_000), "1h1m1s");
    }
}
