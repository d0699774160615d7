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

mod backend;
mod clock;
pub mod gcra;
pub mod local;
mod permit;
pub mod redis;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::Serialize;
use tokio_util::task::TaskTracker;

pub use self::backend::{Backend, BackendError, Demand, Grant, Held, Reason, Refusal, USD_EPSILON, Usage};
pub use self::clock::{Clock, SharedClock, system_clock};
use self::gcra::Bucket;
pub use self::permit::{Permit, SlotGuard};
use self::permit::{PermitInner, PermitState};
use crate::domain::{Limits, OnBackendError, Report};
use crate::error::ApiError;

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
    #[tracing::instrument(name = "limit", level = "debug", skip_all)]
    pub async fn acquire(&self, tenant_id: &str, limits: &Limits, demand: Demand) -> Result<Permit, Denied> {
        let limits = self.effective(limits);
        let id = crate::wire::hex(&rand::random::<[u8; 12]>());
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
        let mut settled = self.inner.backend.clone().finish(held, usage);
        // Outside a runtime nothing more can run (the local backend's work is done already).
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        // The local backend is done before its future is polled: one poll here saves a task per request.
        // A backend still waiting (Redis) goes on in a task of its own.
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        if let std::task::Poll::Ready(result) = futures::FutureExt::poll_unpin(&mut settled, &mut cx) {
            if let Err(e) = result {
                report_unsettled(Some(&self.inner), &tenant, &e);
            }
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let work = async move {
            if let Err(e) = settled.await {
                report_unsettled(inner.upgrade().as_deref(), &tenant, &e);
            }
        };
        handle.spawn(self.inner.tasks.track_future(work));
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
