//! Per-tenant rate limits, concurrency and budgets: reserved before the upstream is called, reconciled after.
//!
//! A request demands one request (and, with a concurrency limit, a slot), `n` images and an estimate of its
//! cost in USD. The backend checks every limit the tenant has (requests and images per minute, concurrent
//! requests, images and USD per day and month) and reserves them all, or none: a refused request spends
//! nothing. When the outcome is known the reservation is *finished* with what the request really used
//! ([`Usage`]): images and USD are reconciled to the actual figures, and what was not used is given back
//! (bucket cells by moving the bucket's TAT back, never below now). `gcra` is the bucket arithmetic, `local`
//! the in-process backend (the embedded default), `redis` the shared one for several replicas (Lua scripts on
//! Redis' clock, same semantics). Refusals become OpenAI-shaped 429s; every answer carries `x-ratelimit-*`.

pub mod gcra;
pub mod local;
pub mod redis;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio_util::task::TaskTracker;

use self::gcra::Bucket;
use crate::domain::{Limits, OnBackendError, Report};
use crate::error::ApiError;

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

    fn index(self) -> usize {
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

/// Time as the limits see it: the wall clock names budget windows (UTC days and months, as the ledger's
/// timestamps do); the monotonic one drives buckets, so a wall-clock jump never blocks or frees a tenant.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn wall_ms(&self) -> u64;
    /// Milliseconds on a clock that never goes back.
    fn mono_ms(&self) -> u64;
}

/// A clock the backends share.
pub type SharedClock = Arc<dyn Clock>;

/// The system's clocks.
struct SystemClock {
    started: Instant,
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        u64::try_from(crate::time::now_ms()).unwrap_or(0)
    }

    fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The system clock.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock { started: Instant::now() })
}

/// Counters of what the limits did on this replica (`GET /admin/v1/limits`).
#[derive(Debug, Default)]
struct Counters {
    backend_errors: AtomicU64,
    passed_fail_open: AtomicU64,
    refused_fail_closed: AtomicU64,
    refusals: [AtomicU64; 7],
    upstream_rate_limited: AtomicU64,
    requests_given_back: AtomicU64,
}

/// A snapshot of the counters, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// `local` or `redis`.
    pub backend: &'static str,
    /// `open` or `closed`.
    pub on_backend_error: OnBackendError,
    /// Calls to the backend that failed or timed out (reservations, settlements, lease refreshes, peeks).
    pub backend_errors: u64,
    /// Requests let through unenforced because the backend could not answer (fail-open).
    pub passed_by_fail_open: u64,
    /// Requests refused with 503 because the backend could not answer (fail-closed).
    pub refused_by_fail_closed: u64,
    /// Requests refused with 429 by imagegate's limits, by the limit that refused them.
    pub refusals: BTreeMap<&'static str, u64>,
    /// The upstream's own 429s, passed through (not the tenant's limits).
    pub upstream_rate_limited: u64,
    /// Requests given back after the reservation (upstream 429s, connection failures).
    pub requests_given_back: u64,
    /// Reservations not finished yet (requests and streams in flight).
    pub in_flight: u64,
}

/// The pipeline's view of the limits: the backend, the deployment's default plan, the failure policy, and
/// the reservations in flight (finished with [`Usage::NOTHING`] at shutdown, so no slot outlives its replica).
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    backend: Arc<dyn Backend>,
    default_plan: Limits,
    on_error: OnBackendError,
    counters: Counters,
    /// Reservations not finished yet, by id.
    outstanding: Mutex<HashMap<String, Held>>,
    /// Settlements and lease refreshes running in the background.
    tasks: TaskTracker,
}

/// Why a request may not proceed.
#[derive(Debug)]
pub enum Denied {
    /// A limit refused it.
    Refused(Refusal),
    /// The backend could not answer and the policy is fail-closed; the buckets as far as known.
    Unavailable(BackendError, Report),
}

impl Denied {
    /// The 429 (or, fail-closed, 503) for a request of `tenant` the limits did not let through, in words that
    /// say which limit and when it renews.
    pub fn into_error(self, tenant: &str) -> ApiError {
        match self {
            Denied::Unavailable(e, report) => ApiError::LimitsUnavailable { detail: e.0, report },
            Denied::Refused(Refusal { reason, retry_after_ms, never, report }) => {
                let message = if reason.is_budget() {
                    format!(
                        "Tenant '{tenant}' has spent its {} budget. It renews at the start of the next UTC {}.",
                        reason.describe(),
                        if reason.is_daily() { "day" } else { "month" }
                    )
                } else if let Some((asked, burst)) = never {
                    format!(
                        "Rate limit reached for {} for tenant '{tenant}': this request needs {asked} at once, and \
                         at most {burst} can ever be spent at once. Ask for fewer (a smaller n).",
                        reason.describe()
                    )
                } else {
                    let wait = retry_after_ms
                        .map_or(String::new(), |ms| format!(" Please try again in {:.1}s.", ms as f64 / 1000.0));
                    format!("Rate limit reached for {} for tenant '{tenant}'.{wait}", reason.describe())
                };
                ApiError::RateLimited { message, budget: reason.is_budget(), retry_after_ms, report }
            }
        }
    }
}

impl Limiter {
    pub fn new(backend: Arc<dyn Backend>, default_plan: Limits, on_error: OnBackendError) -> Self {
        Self {
            inner: Arc::new(LimiterInner {
                backend,
                default_plan,
                on_error,
                counters: Counters::default(),
                outstanding: Mutex::default(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// The tenant's limits, each unset one taken from the default plan.
    pub fn effective(&self, tenant: &Limits) -> Limits {
        let d = &self.inner.default_plan;
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
        let id = hex::encode(rand::random::<[u8; 12]>());
        let mut held = Held {
            tenant_id: tenant_id.to_owned(),
            id,
            request: false,
            slot: false,
            images: 0,
            usd: 0.0,
            requests_bucket: limits.requests_per_minute.map(|l| Bucket::per_minute(l, limits.requests_burst)),
            images_bucket: limits.images_per_minute.map(|l| Bucket::per_minute(l, limits.images_burst)),
        };
        let report = match self.inner.backend.reserve(tenant_id, &limits, demand, &held.id).await {
            Ok(Ok(grant)) => {
                held.record(demand, grant.holds_slot);
                grant.report
            }
            Ok(Err(refusal)) => {
                self.count_refusal(refusal.reason);
                return Err(Denied::Refused(refusal));
            }
            Err(e) => self.backend_failed(&e, &limits).map_err(|report| Denied::Unavailable(e, report))?,
        };
        Ok(self.permit(held, limits, report))
    }

    /// The tenant's request and image buckets as they stand, spending nothing (for answers refused before
    /// anything was reserved). Never fails: an unreachable backend yields [`Report::unknown`].
    pub async fn peek(&self, tenant_id: &str, limits: &Limits) -> Report {
        let limits = self.effective(limits);
        if limits.requests_per_minute.is_none() && limits.images_per_minute.is_none() {
            return Report::default();
        }
        match self.inner.backend.peek(tenant_id, &limits).await {
            Ok(report) => report,
            Err(e) => {
                self.inner.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(kind = "limits.backend_unavailable", error = %e, "cannot read the buckets for headers");
                Report::unknown(&limits, self.inner.on_error == OnBackendError::Open)
            }
        }
    }

    /// Whether the backend answers (readiness): always true for `local`.
    pub async fn ready(&self) -> Result<(), BackendError> {
        self.inner.backend.ready().await
    }

    pub fn policy(&self) -> OnBackendError {
        self.inner.on_error
    }

    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// Count an upstream 429 passed through to the caller.
    pub fn count_upstream_rate_limited(&self) {
        self.inner.counters.upstream_rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of this replica.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let in_flight = self.inner.outstanding.lock().map_or(0, |o| o.len());
        Stats {
            backend: self.backend_name(),
            on_backend_error: self.inner.on_error,
            backend_errors: get(&c.backend_errors),
            passed_by_fail_open: get(&c.passed_fail_open),
            refused_by_fail_closed: get(&c.refused_fail_closed),
            refusals: Reason::ALL.iter().map(|r| (r.as_str(), get(&c.refusals[r.index()]))).collect(),
            upstream_rate_limited: get(&c.upstream_rate_limited),
            requests_given_back: get(&c.requests_given_back),
            in_flight: u64::try_from(in_flight).unwrap_or(u64::MAX),
        }
    }

    /// Finish every reservation still in flight (with [`Usage::NOTHING`]: their slots and holds are released,
    /// their requests stay spent) and wait for background settlements, for at most `deadline`. Call when the
    /// server stopped serving, before the process exits.
    pub async fn shutdown(&self, deadline: Duration) {
        let outstanding: Vec<Held> =
            self.inner.outstanding.lock().map(|mut o| o.drain().map(|(_, h)| h).collect()).unwrap_or_default();
        let released = outstanding.len();
        let work = async {
            for held in &outstanding {
                self.settle_now(held, Usage::NOTHING).await;
            }
            self.inner.tasks.close();
            self.inner.tasks.wait().await;
        };
        if tokio::time::timeout(deadline, work).await.is_err() {
            tracing::warn!(released, "rate-limit settlements did not finish before shutdown");
        } else if released > 0 {
            tracing::info!(released, "released the rate-limit holds of requests still in flight");
        }
    }

    fn count_refusal(&self, reason: Reason) {
        if let Some(c) = self.inner.counters.refusals.get(reason.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Apply the failure policy: `Ok` with header material to let the request through (fail-open), `Err`
    /// with header material to refuse it (fail-closed).
    fn backend_failed(&self, e: &BackendError, limits: &Limits) -> Result<Report, Report> {
        let c = &self.inner.counters;
        c.backend_errors.fetch_add(1, Ordering::Relaxed);
        let name = self.backend_name();
        match self.inner.on_error {
            OnBackendError::Open => {
                c.passed_fail_open.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(kind = "limits.backend_unavailable", backend = name, error = %e, "rate limits not enforced for this request (fail-open)");
                Ok(Report::unknown(limits, true))
            }
            OnBackendError::Closed => {
                c.refused_fail_closed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(kind = "limits.backend_unavailable", backend = name, error = %e, "request refused (fail-closed)");
                Err(Report::unknown(limits, false))
            }
        }
    }

    fn permit(&self, held: Held, limits: Limits, report: Report) -> Permit {
        if let Ok(mut outstanding) = self.inner.outstanding.lock() {
            outstanding.insert(held.id.clone(), held.clone());
        }
        let inner = Arc::new(PermitInner {
            limiter: self.clone(),
            limits,
            state: Mutex::new(PermitState { held: Some(held), report, refresher: None }),
        });
        let permit = Permit(inner);
        permit.start_refresher();
        permit
    }

    /// Settle in the background; the local backend does its work before the future is first polled.
    fn settle(&self, held: Held, usage: Usage) {
        // Not outstanding any more: shutdown settled it already.
        let outstanding = self.inner.outstanding.lock().map(|mut o| o.remove(&held.id).is_some());
        if outstanding.is_ok_and(|was| !was) {
            return;
        }
        if usage.request_back && held.request {
            self.inner.counters.requests_given_back.fetch_add(1, Ordering::Relaxed);
        }
        let tenant = held.tenant_id.clone();
        let settled = self.inner.backend.clone().finish(held, usage);
        let inner = Arc::downgrade(&self.inner);
        let work = async move {
            if let Err(e) = settled.await {
                report_unsettled(inner.upgrade().as_deref(), &tenant, &e);
            }
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(self.inner.tasks.track_future(work));
        }
    }

    async fn settle_now(&self, held: &Held, usage: Usage) {
        if let Err(e) = self.inner.backend.clone().finish(held.clone(), usage).await {
            report_unsettled(Some(&self.inner), &held.tenant_id, &e);
        }
    }
}

fn report_unsettled(inner: Option<&LimiterInner>, tenant: &str, e: &BackendError) {
    if let Some(inner) = inner {
        inner.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
    }
    tracing::warn!(kind = "limits.backend_unavailable", tenant, error = %e, "a reservation was not settled; its hold expires with its lease");
}

impl Held {
    fn record(&mut self, demand: Demand, slot: bool) {
        self.request |= demand.request;
        self.slot |= slot;
        self.images += demand.images;
        self.usd += demand.usd;
    }
}

/// A granted request: header material and what it holds, finished once ([`Permit::finish`]) or, if it never
/// is (the request was dropped: a timeout, a disconnected caller), with [`Usage::NOTHING`] when the last
/// clone goes. Clones share one reservation (a stream and its metering hold one each).
#[derive(Clone)]
pub struct Permit(Arc<PermitInner>);

struct PermitInner {
    limiter: Limiter,
    limits: Limits,
    state: Mutex<PermitState>,
}

struct PermitState {
    /// `None` once finished.
    held: Option<Held>,
    report: Report,
    refresher: Option<tokio::task::AbortHandle>,
}

impl Permit {
    /// The buckets after this request's reservation, for its headers.
    pub fn report(&self) -> Report {
        self.0.state.lock().map(|s| s.report).unwrap_or_default()
    }

    /// Reserve `images` and `usd` more on this reservation (a cached request that turned out to lead the
    /// upstream call). A refusal (or fail-closed) finishes the permit with the request given back: a refused
    /// request spends nothing.
    pub async fn extend(&self, images: u32, usd: f64) -> Result<(), Denied> {
        let limiter = &self.0.limiter;
        let Some((tenant_id, id)) = self.with_held(|h| (h.tenant_id.clone(), h.id.clone())) else {
            return Ok(());
        };
        let demand = Demand::more(images, usd);
        let outcome = limiter.inner.backend.reserve(&tenant_id, &self.0.limits, demand, &id).await;
        let current = self.report();
        let denied = match outcome {
            Ok(Ok(grant)) => {
                self.with_held(|h| h.record(demand, false));
                if let Ok(mut outstanding) = limiter.inner.outstanding.lock()
                    && let Some(h) = outstanding.get_mut(&id)
                {
                    h.record(demand, false);
                }
                if let Ok(mut state) = self.0.state.lock() {
                    state.report.images = grant.report.images.or(state.report.images);
                }
                self.start_refresher();
                return Ok(());
            }
            Ok(Err(mut refusal)) => {
                limiter.count_refusal(refusal.reason);
                refusal.report.requests = current.requests;
                Denied::Refused(refusal)
            }
            Err(e) => match limiter.backend_failed(&e, &self.0.limits) {
                Ok(_) => return Ok(()),
                Err(_) => Denied::Unavailable(e, current),
            },
        };
        self.finish(Usage::REFUNDED);
        Err(denied)
    }

    /// Settle the reservation with what the request used. Only the first call counts.
    pub fn finish(&self, usage: Usage) {
        let taken = self.0.state.lock().ok().and_then(|mut s| {
            if let Some(r) = s.refresher.take() {
                r.abort();
            }
            s.held.take()
        });
        if let Some(held) = taken {
            self.0.limiter.settle(held, usage);
        }
    }

    fn with_held<T>(&self, f: impl FnOnce(&mut Held) -> T) -> Option<T> {
        self.0.state.lock().ok().and_then(|mut s| s.held.as_mut().map(f))
    }

    /// Keep the reservation's lease alive while it lasts (backends whose holds expire).
    fn start_refresher(&self) {
        let backend = self.0.limiter.inner.backend.clone();
        let Some(lease) = backend.lease() else { return };
        let Ok(mut state) = self.0.state.lock() else { return };
        let Some(held) = state.held.clone().filter(|h| h.slot || h.images > 0 || h.usd > 0.0) else { return };
        if let Some(old) = state.refresher.take() {
            old.abort();
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let counters = Arc::downgrade(&self.0.limiter.inner);
        let every = (lease / 3).max(Duration::from_millis(100));
        let task = handle.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = backend.refresh(&held).await {
                    if let Some(inner) = counters.upgrade() {
                        inner.counters.backend_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(kind = "limits.backend_unavailable", error = %e, "a reservation's lease was not refreshed");
                }
            }
        });
        state.refresher = Some(task.abort_handle());
    }
}

impl Drop for PermitInner {
    fn drop(&mut self) {
        let Ok(state) = self.state.get_mut() else { return };
        if let Some(r) = state.refresher.take() {
            r.abort();
        }
        if let Some(held) = state.held.take() {
            self.limiter.settle(held, Usage::NOTHING);
        }
    }
}

/// Holds a stream's reservation until the stream ends (the metered stream drops it last).
pub struct SlotGuard(pub Permit);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::BucketReport;

    fn local_limiter() -> Limiter {
        Limiter::new(Arc::new(local::LocalBackend::new(system_clock(), None)), Limits::default(), OnBackendError::Open)
    }

    async fn remaining(limiter: &Limiter, limits: &Limits) -> (u64, u64) {
        let report = limiter.peek("t", limits).await;
        (report.requests.map_or(0, |r| r.remaining), report.images.map_or(0, |r| r.remaining))
    }

    #[tokio::test]
    async fn a_permit_is_settled_once_and_a_dropped_one_keeps_only_its_request() {
        let limiter = local_limiter();
        let limits = Limits {
            requests_per_minute: Some(10),
            images_per_minute: Some(10),
            concurrent_requests: Some(1),
            ..Limits::default()
        };
        let permit = limiter.acquire("t", &limits, Demand::whole(4, 0.0)).await.unwrap();
        assert_eq!(limiter.stats().in_flight, 1);
        assert!(matches!(limiter.acquire("t", &limits, Demand::whole(1, 0.0)).await, Err(Denied::Refused(_))));
        let stream = SlotGuard(permit.clone());
        permit.finish(Usage { images: 2, usd: 0.0, request_back: false });
        permit.finish(Usage::REFUNDED); // only the first settlement counts
        drop((permit, stream));
        assert_eq!(remaining(&limiter, &limits).await, (9, 8));
        assert_eq!(limiter.stats().in_flight, 0);

        // Dropped without a settlement (a timeout, a caller gone): the slot and images come back.
        let permit = limiter.acquire("t", &limits, Demand::whole(3, 0.0)).await.unwrap();
        drop(permit);
        assert_eq!(remaining(&limiter, &limits).await, (8, 8));
        assert!(limiter.acquire("t", &limits, Demand::whole(1, 0.0)).await.is_ok(), "the slot was released");
    }

    #[tokio::test]
    async fn a_refused_extension_gives_the_request_back() {
        let limiter = local_limiter();
        let limits = Limits { requests_per_minute: Some(10), images_per_day: Some(2), ..Limits::default() };
        let permit = limiter.acquire("t", &limits, Demand::request_only()).await.unwrap();
        assert_eq!(remaining(&limiter, &limits).await.0, 9);
        let Err(Denied::Refused(refusal)) = permit.extend(3, 0.0).await else { panic!("3 images > 2") };
        assert_eq!((refusal.reason, refusal.report.requests.map(|r| r.remaining)), (Reason::ImagesPerDay, Some(9)));
        assert_eq!(remaining(&limiter, &limits).await.0, 10, "a refused request spends nothing");
        let stats = limiter.stats();
        assert_eq!((stats.refusals["images_per_day"], stats.requests_given_back, stats.in_flight), (1, 1, 0));
        let permit = limiter.acquire("t", &limits, Demand::request_only()).await.unwrap();
        assert!(permit.extend(2, 0.0).await.is_ok());
    }

    #[tokio::test]
    async fn shutdown_settles_what_is_still_in_flight() {
        let limiter = local_limiter();
        let limits = Limits { concurrent_requests: Some(1), ..Limits::default() };
        let running = limiter.acquire("t", &limits, Demand::whole(1, 0.0)).await.unwrap();
        limiter.shutdown(Duration::from_secs(1)).await;
        assert_eq!(limiter.stats().in_flight, 0);
        let next = limiter.acquire("t", &limits, Demand::whole(1, 0.0)).await.unwrap();
        drop(running); // settled already: it must not release the slot `next` holds now
        assert!(limiter.acquire("t", &limits, Demand::whole(1, 0.0)).await.is_err());
        drop(next);
    }

    #[test]
    fn an_unknown_report_says_nothing_is_counted_or_nothing_is_left() {
        let limits = Limits { requests_per_minute: Some(5), ..Limits::default() };
        let open = Report::unknown(&limits, true);
        assert_eq!(open.requests, Some(BucketReport { limit: 5, remaining: 5, reset_ms: 0 }));
        assert_eq!(open.images, None);
        let closed = Report::unknown(&limits, false);
        assert_eq!(closed.requests, Some(BucketReport { limit: 5, remaining: 0, reset_ms: 1000 }));
    }
}
