//! The `x-ratelimit-*` and `retry-after` headers, in OpenAI's formats: counts as integers, resets as Go-style
//! durations (`1s`, `6m0s`), `retry-after` in whole seconds (at least 1) and `retry-after-ms` in milliseconds.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::domain::limits::go_duration;
use crate::domain::{BucketReport, Report};

/// Add the bucket headers for the limits the tenant has.
pub fn apply(report: &Report, headers: &mut HeaderMap) {
    if let Some(b) = report.requests {
        bucket(b, "requests", headers);
    }
    if let Some(b) = report.images {
        bucket(b, "images", headers);
    }
}

fn bucket(b: BucketReport, unit: &str, headers: &mut HeaderMap) {
    for (kind, value) in
        [("limit", b.limit.to_string()), ("remaining", b.remaining.to_string()), ("reset", go_duration(b.reset_ms))]
    {
        if let (Ok(name), Ok(value)) =
            (HeaderName::try_from(format!("x-ratelimit-{kind}-{unit}")), HeaderValue::try_from(value))
        {
            headers.insert(name, value);
        }
    }
}

/// `retry-after` and `retry-after-ms` for a refusal that names a wait.
pub fn retry(retry_after_ms: u64, headers: &mut HeaderMap) {
    let secs = retry_after_ms.div_ceil(1000).max(1);
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    headers.insert(HeaderName::from_static(crate::wire::headers::RETRY_AFTER_MS), HeaderValue::from(retry_after_ms));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_openai_formats() {
        let mut h = HeaderMap::new();
        let report = Report {
            requests: Some(BucketReport { limit: 60, remaining: 59, reset_ms: 1000 }),
            images: Some(BucketReport { limit: 10, remaining: 6, reset_ms: 24_000 }),
        };
        apply(&report, &mut h);
        retry(1500, &mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "60");
        assert_eq!(h["x-ratelimit-remaining-requests"], "59");
        assert_eq!(h["x-ratelimit-reset-requests"], "1s");
        assert_eq!(h["x-ratelimit-remaining-images"], "6");
        assert_eq!(h["x-ratelimit-reset-images"], "24s");
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["retry-after-ms"], "1500");
    }
}
