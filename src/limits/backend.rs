//! What a limits backend is asked and answers: a demand, a grant or a refusal, a held reservation, the usage
//! it is finished with, and the `Backend` trait the in-process and Redis backends implement.

use super::*;

/// Budgets in USD are compared with this tolerance, so $0.04 × 3 fits a $0.12 budget despite binary floats.
pub const USD_EPSILON: f64 = 1e-9;

/// What one reservation asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// One request from the request bucket, and a concurrency slot when the tenant has that limit.
    pub request: bool,
    /// Images (`n`) from the image bucket and the image budgets.
    pub images: u32,
    /// The most this request may cost, held against the USD budgets until its real cost is known.
    pub usd: f64,
}

impl Demand {
    /// A request that will call the upstream: the request, its images and their estimated cost.
    pub fn whole(images: u32, usd: f64) -> Self {
        Self { request: true, images, usd }
    }

    /// Only the request (a cache hit, or a cached request before it knows whether it leads the upstream call).
    pub fn request_only() -> Self {
        Self { request: true, images: 0, usd: 0.0 }
    }

    /// Images and cost added to a reservation that already holds its request.
    pub fn more(images: u32, usd: f64) -> Self {
        Self { request: false, images, usd }
    }
}

/// What a finished request really used; everything else it reserved is given back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Images the upstream returned (0 for failures and for answers served by another request's call).
    pub images: u32,
    /// The request's cost from the usage record.
    pub usd: f64,
    /// Give the request back too: the upstream never processed it (connection failure) or refused it (429),
    /// or imagegate refused it after the request was reserved.
    pub request_back: bool,
}

impl Usage {
    /// Nothing used, the request kept: failures, timeouts, and requests dropped before their outcome was known.
    pub const NOTHING: Usage = Usage { images: 0, usd: 0.0, request_back: false };
    /// Nothing used, and the request given back as well.
    pub const REFUNDED: Usage = Usage { images: 0, usd: 0.0, request_back: true };
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
    pub const ALL: [Reason; 7] = [
        Self::RequestsPerMinute,
        Self::ImagesPerMinute,
        Self::Concurrency,
        Self::ImagesPerDay,
        Self::ImagesPerMonth,
        Self::UsdPerDay,
        Self::UsdPerMonth,
    ];

    /// Budgets do not come back within a retry's patience: SDKs are told not to retry.
    pub fn is_budget(self) -> bool {
        matches!(self, Self::ImagesPerDay | Self::ImagesPerMonth | Self::UsdPerDay | Self::UsdPerMonth)
    }

    /// Whether the budget renews with the UTC day (else the month); meaningless for rates.
    pub fn is_daily(self) -> bool {
        matches!(self, Self::ImagesPerDay | Self::UsdPerDay)
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

    /// The snake_case name, as in the admin counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::ImagesPerMinute => "images_per_minute",
            Self::Concurrency => "concurrent_requests",
            Self::ImagesPerDay => "images_per_day",
            Self::ImagesPerMonth => "images_per_month",
            Self::UsdPerDay => "usd_per_day",
            Self::UsdPerMonth => "usd_per_month",
        }
    }

    pub(super) fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A granted reservation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    pub report: Report,
    /// A concurrency slot was taken and is released when the reservation is finished.
    pub holds_slot: bool,
}

/// A refusal: which limit, when to come back, and the buckets as they stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// `None` for budgets (no useful retry time) and for demands that can never fit.
    pub retry_after_ms: Option<u64>,
    /// `Some((asked, burst))` when the demand is larger than the bucket's burst: it never fits.
    pub never: Option<(u64, u64)>,
    pub report: Report,
}

/// The backend could not decide (Redis unreachable, timeout).
#[derive(Debug, thiserror::Error)]
#[error("rate-limit backend unavailable: {0}")]
pub struct BackendError(pub String);

/// What a reservation holds, as the backend needs it to finish it.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub tenant_id: String,
    /// Unique per reservation: the Redis lease's member.
    pub id: String,
    /// One request cell was taken from the request bucket.
    pub request: bool,
    pub slot: bool,
    pub images: u32,
    pub usd: f64,
    /// The buckets the cells came from (for giving them back at the same rate).
    pub requests_bucket: Option<Bucket>,
    pub images_bucket: Option<Bucket>,
}

/// Where limits are kept. Every method is bounded in time; none panics.
pub trait Backend: Send + Sync + 'static {
    /// Check every limit in `limits` for `demand` and reserve all of them or none, under the reservation `id`
    /// (a second call with the same id adds to that reservation).
    fn reserve<'a>(
        &'a self,
        tenant_id: &'a str,
        limits: &'a Limits,
        demand: Demand,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Result<Grant, Refusal>, BackendError>>;

    /// Settle a reservation: release its slot and held amounts, give back what `usage` did not use, and add
    /// what it did use to the tenant's spending. A backend that keeps its state in memory does all of it
    /// before returning the future, so the next decision sees it.
    fn finish(self: Arc<Self>, held: Held, usage: Usage) -> BoxFuture<'static, Result<(), BackendError>>;

    /// Keep a long-running reservation's lease alive (backends whose holds expire).
    fn refresh<'a>(&'a self, _held: &'a Held) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }

    /// The request and image buckets as they stand, spending nothing (headers of early errors).
    fn peek<'a>(&'a self, tenant_id: &'a str, limits: &'a Limits) -> BoxFuture<'a, Result<Report, BackendError>>;

    /// Whether the backend answers now (readiness).
    fn ready(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }

    /// How long an unrefreshed hold lives, for backends whose holds expire; `None` when they never need to.
    fn lease(&self) -> Option<Duration> {
        None
    }

    /// `local` or `redis`, for logs.
    fn name(&self) -> &'static str;
}

impl Held {
    pub(super) fn record(&mut self, demand: Demand, slot: bool) {
        self.request |= demand.request;
        self.slot |= slot;
        self.images += demand.images;
        self.usd += demand.usd;
    }
}
