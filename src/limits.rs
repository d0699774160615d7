//! Per-tenant rate limits, concurrency and budgets, checked and reserved before the upstream is called.
//!
//! A request demands 1 request and `n` images. The backend checks every limit the tenant has (requests and
//! images per minute, concurrent requests, images and USD per day and month) and reserves them all, or none:
//! a refused request spends nothing. `gcra` is the bucket arithmetic, `local` the in-process backend (the
//! embedded default), `redis` the shared one for several replicas (one Lua script per request, on Redis'
//! clock, same semantics). Refusals become OpenAI-shaped 429s; every answer carries `x-ratelimit-*` headers.

pub mod gcra;
pub mod headers;
pub mod local;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::tenants::Limits;

/// What one request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// Images (`n`); 0 for an answer served from the cache.
    pub images: u32,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RequestsPerMinute,
    ImagesPerMinute,
    Concurrency,
    ImagesPerDay,
    ImagesPerMonth,
    UsdPerDay,
    UsdPerMonth,
}

impl Reason {
    /// Budgets do not come back within a retry's patience: SDKs are told not to retry.
    pub fn is_budget(self) -> bool {
        matches!(self, Self::ImagesPerDay | Self::ImagesPerMonth | Self::UsdPerDay | Self::UsdPerMonth)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests per minute",
            Self::ImagesPerMinute => "images per minute",
            Self::Concurrency => "concurrent requests",
            Self::ImagesPerDay => "images per day",
            Self::ImagesPerMonth => "images per month",
            Self::UsdPerDay => "USD per day",
            Self::UsdPerMonth => "USD per month",
        }
    }
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

/// A granted reservation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    pub report: Report,
    /// A concurrency slot was taken and must be released.
    pub holds_slot: bool,
}

/// A refusal: which limit, when to come back, and the buckets as they stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// `None` for budgets (no useful retry time) and when unknown.
    pub retry_after_ms: Option<u64>,
    pub report: Report,
}

/// The backend could not decide (Redis unreachable, timeout).
#[derive(Debug, thiserror::Error)]
#[error("rate-limit backend unavailable: {0}")]
pub struct BackendError(pub String);

/// Where limits are kept.
pub trait Backend: Send + Sync + 'static {
    /// Check every limit in `limits` for `demand`; reserve all of them or none.
    fn reserve<'a>(
        &'a self,
        tenant_id: &'a str,
        limits: &'a Limits,
        demand: Demand,
    ) -> BoxFuture<'a, Result<Result<Grant, Refusal>, BackendError>>;

    /// Give back the concurrency slot of a finished request.
    fn release<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, ()>;

    /// Add the estimated cost of a finished request to the tenant's USD budgets.
    fn spend<'a>(&'a self, tenant_id: &'a str, usd: f64) -> BoxFuture<'a, ()>;

    /// `local` or `redis`, for logs.
    fn name(&self) -> &'static str;
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

/// Milliseconds since the Unix epoch, for budget windows.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| u64::try_from(crate::db::now_ms()).unwrap_or(0))
}

/// Start of the UTC day and month containing `now_ms`, and their ends, as Unix milliseconds.
pub fn windows(now_ms: u64) -> (u64, u64, u64, u64) {
    const DAY: u64 = 86_400_000;
    let day_start = now_ms - now_ms % DAY;
    let days = i64::try_from(day_start / DAY).unwrap_or(0);
    let (y, m, _) = civil_from_days(days);
    let month_start = u64::try_from(days_from_civil(y, m, 1)).unwrap_or(0) * DAY;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let month_end = u64::try_from(days_from_civil(ny, nm, 1)).unwrap_or(0) * DAY;
    (day_start, day_start + DAY, month_start, month_end)
}

/// Howard Hinnant's days-from-civil: days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

/// A duration in OpenAI's `x-ratelimit-reset-*` format: Go-style `1s`, `6m0s`, `12ms`.
pub fn go_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// How long a refused caller should wait, never less than one second in `retry-after`.
pub fn retry_after(refusal: &Refusal) -> Option<Duration> {
    refusal.retry_after_ms.filter(|ms| *ms != u64::MAX).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reset_durations_read_like_openai_headers() {
        assert_eq!(go_duration(12), "12ms");
        assert_eq!(go_duration(1000), "1s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(59_500), "1m0s");
        assert_eq!(go_duration(3_600_000 + 61_000), "1h1m1s");
    }
}

/// The pipeline's view of the limits: the backend, the deployment's default plan, and the failure policy.
#[derive(Clone)]
pub struct Limiter {
    backend: Arc<dyn Backend>,
    default_plan: Limits,
    on_error: OnBackendError,
}

/// A granted request: header material, and the concurrency slot it holds (released on drop).
pub struct Permit {
    pub report: Report,
    pub slot: Option<SlotGuard>,
}

/// Gives the concurrency slot back when dropped (the response or the stream is finished).
pub struct SlotGuard {
    backend: Arc<dyn Backend>,
    tenant_id: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let backend = self.backend.clone();
        let tenant_id = std::mem::take(&mut self.tenant_id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { backend.release(&tenant_id).await });
        }
    }
}

/// Why a request may not proceed.
#[derive(Debug)]
pub enum Denied {
    /// A limit refused it.
    Refused(Refusal),
    /// The backend could not answer and the policy is fail-closed.
    Unavailable(BackendError),
}

impl Limiter {
    pub fn new(backend: Arc<dyn Backend>, default_plan: Limits, on_error: OnBackendError) -> Self {
        Self { backend, default_plan, on_error }
    }

    /// The tenant's limits, each unset one taken from the default plan.
    pub fn effective(&self, tenant: &Limits) -> Limits {
        let d = &self.default_plan;
        Limits {
            requests_per_minute: tenant.requests_per_minute.or(d.requests_per_minute),
            images_per_minute: tenant.images_per_minute.or(d.images_per_minute),
            requests_burst: tenant.requests_burst.or(d.requests_burst),
            images_burst: tenant.images_burst.or(d.images_burst),
            concurrent_requests: tenant.concurrent_requests.or(d.concurrent_requests),
            images_per_day: tenant.images_per_day.or(d.images_per_day),
            images_per_month: tenant.images_per_month.or(d.images_per_month),
            usd_per_day: tenant.usd_per_day.or(d.usd_per_day),
            usd_per_month: tenant.usd_per_month.or(d.usd_per_month),
        }
    }

    /// Check and reserve `demand` for the tenant.
    pub async fn acquire(&self, tenant_id: &str, limits: &Limits, demand: Demand) -> Result<Permit, Denied> {
        let limits = self.effective(limits);
        match self.backend.reserve(tenant_id, &limits, demand).await {
            Ok(Ok(grant)) => Ok(Permit {
                report: grant.report,
                slot: grant
                    .holds_slot
                    .then(|| SlotGuard { backend: self.backend.clone(), tenant_id: tenant_id.to_owned() }),
            }),
            Ok(Err(refusal)) => Err(Denied::Refused(refusal)),
            Err(e) => match self.on_error {
                OnBackendError::Open => {
                    tracing::warn!(kind = "limits.backend_unavailable", backend = self.backend.name(), error = %e, "rate limits not enforced for this request (fail-open)");
                    Ok(Permit { report: Report::default(), slot: None })
                }
                OnBackendError::Closed => {
                    tracing::error!(kind = "limits.backend_unavailable", backend = self.backend.name(), error = %e, "request refused (fail-closed)");
                    Err(Denied::Unavailable(e))
                }
            },
        }
    }

    /// Count a finished request's cost against the tenant's USD budgets (off the request path).
    pub fn spend(&self, tenant_id: &str, limits: &Limits, usd: f64) {
        let limits = self.effective(limits);
        if usd <= 0.0 || (limits.usd_per_day.is_none() && limits.usd_per_month.is_none()) {
            return;
        }
        let backend = self.backend.clone();
        let tenant_id = tenant_id.to_owned();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { backend.spend(&tenant_id, usd).await });
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
}
