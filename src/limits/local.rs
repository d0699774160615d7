//! The in-process backend, the embedded default: every tenant's buckets, in-flight count and budget counters
//! live in one map under a mutex, and each decision is `gcra::check_all` plus the counters, all or nothing.
//! Exact on one replica; use the Redis backend to share limits between replicas.
//!
//! Budgets start from the usage ledger the first time a tenant is seen, so a restart does not reset them.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;

use super::gcra::{self, Bucket, Verdict};
use super::{Backend, BackendError, BucketReport, Clock, Demand, Grant, Reason, Refusal, Report, windows};
use crate::db::Db;
use crate::tenants::Limits;

/// In-memory limits.
pub struct LocalBackend {
    tenants: Mutex<HashMap<String, TenantState>>,
    clock: Clock,
    /// Seeds budgets from the ledger; `None` in unit tests.
    db: Option<Db>,
}

#[derive(Debug, Default)]
struct TenantState {
    requests_tat: u64,
    images_tat: u64,
    in_flight: u32,
    day: Window,
    month: Window,
}

/// Budget counters for one UTC day or month.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    start: u64,
    images: u64,
    usd: f64,
}

impl Window {
    /// Start a new window when `start` moved on.
    fn roll(&mut self, start: u64) {
        if self.start != start {
            *self = Window { start, images: 0, usd: 0.0 };
        }
    }
}

impl LocalBackend {
    pub fn new(clock: Clock, db: Option<Db>) -> Self {
        Self { tenants: Mutex::default(), clock, db }
    }

    /// Load the day's and month's spending from the ledger the first time a tenant with budgets is seen.
    async fn seed(&self, tenant_id: &str, limits: &Limits) -> Result<(), BackendError> {
        let has_budgets = limits.images_per_day.is_some()
            || limits.images_per_month.is_some()
            || limits.usd_per_day.is_some()
            || limits.usd_per_month.is_some();
        let known = self.tenants.lock().map_err(|_| poisoned())?.contains_key(tenant_id);
        let Some(db) = self.db.as_ref().filter(|_| has_budgets && !known) else { return Ok(()) };
        let (day_start, _, month_start, _) = windows((self.clock)());
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let report = |e: sqlx::Error| BackendError(format!("cannot read budgets from the ledger: {e}"));
        let (day_images, day_usd) =
            crate::ledger::report::spent_since(db, tenant_id, as_i64(day_start)).await.map_err(report)?;
        let (month_images, month_usd) =
            crate::ledger::report::spent_since(db, tenant_id, as_i64(month_start)).await.map_err(report)?;
        let mut tenants = self.tenants.lock().map_err(|_| poisoned())?;
        tenants.entry(tenant_id.to_owned()).or_insert_with(|| TenantState {
            day: Window { start: day_start, images: day_images, usd: day_usd },
            month: Window { start: month_start, images: month_images, usd: month_usd },
            ..TenantState::default()
        });
        Ok(())
    }

    fn decide(&self, tenant_id: &str, limits: &Limits, demand: Demand) -> Result<Result<Grant, Refusal>, BackendError> {
        let now = (self.clock)();
        let (day_start, _, month_start, _) = windows(now);
        let mut tenants = self.tenants.lock().map_err(|_| poisoned())?;
        let state = tenants.entry(tenant_id.to_owned()).or_default();
        state.day.roll(day_start);
        state.month.roll(month_start);
        let n = u64::from(demand.images);

        let requests =
            limits.requests_per_minute.map(|l| (Bucket::per_minute(l, limits.requests_burst), state.requests_tat, 1));
        let images =
            limits.images_per_minute.map(|l| (Bucket::per_minute(l, limits.images_burst), state.images_tat, n));
        let buckets: Vec<(Bucket, u64, u64)> = requests.into_iter().chain(images).collect();
        let (fits, verdicts) = gcra::check_all(&buckets, now);
        let verdict_of = |present: bool, index: usize| present.then(|| verdicts.get(index).copied()).flatten();
        let requests_verdict = verdict_of(requests.is_some(), 0);
        let images_verdict = verdict_of(images.is_some(), usize::from(requests.is_some()));
        let report = Report {
            requests: requests.zip(requests_verdict).map(|((b, ..), v)| bucket_report(b, v)),
            images: images.zip(images_verdict).map(|((b, ..), v)| bucket_report(b, v)),
        };

        let refused = |reason: Reason, retry_after_ms: Option<u64>| Ok(Err(Refusal { reason, retry_after_ms, report }));
        if let Some(v) = requests_verdict.filter(|v| v.retry_after_ms.is_some()) {
            return refused(Reason::RequestsPerMinute, v.retry_after_ms);
        }
        if let Some(v) = images_verdict.filter(|v| v.retry_after_ms.is_some()) {
            return refused(Reason::ImagesPerMinute, v.retry_after_ms);
        }
        if limits.concurrent_requests.is_some_and(|l| state.in_flight >= l) {
            return refused(Reason::Concurrency, Some(1000));
        }
        let budgets = [
            (limits.images_per_day.is_some_and(|l| state.day.images + n > l), Reason::ImagesPerDay),
            (limits.images_per_month.is_some_and(|l| state.month.images + n > l), Reason::ImagesPerMonth),
            (limits.usd_per_day.is_some_and(|l| state.day.usd >= l), Reason::UsdPerDay),
            (limits.usd_per_month.is_some_and(|l| state.month.usd >= l), Reason::UsdPerMonth),
        ];
        if let Some((_, reason)) = budgets.iter().find(|(over, _)| *over) {
            return refused(*reason, None);
        }
        debug_assert!(fits);
        // Everything fits: reserve it all.
        if let Some(v) = requests_verdict {
            state.requests_tat = v.new_tat;
        }
        if let Some(v) = images_verdict {
            state.images_tat = v.new_tat;
        }
        let holds_slot = limits.concurrent_requests.is_some();
        if holds_slot {
            state.in_flight += 1;
        }
        state.day.images += n;
        state.month.images += n;
        Ok(Ok(Grant { report, holds_slot }))
    }
}

fn bucket_report(bucket: Bucket, v: Verdict) -> BucketReport {
    BucketReport { limit: bucket.limit, remaining: v.remaining, reset_ms: v.reset_ms }
}

fn poisoned() -> BackendError {
    BackendError("rate-limit state lock poisoned".to_owned())
}

impl Backend for LocalBackend {
    fn reserve<'a>(
        &'a self,
        tenant_id: &'a str,
        limits: &'a Limits,
        demand: Demand,
    ) -> BoxFuture<'a, Result<Result<Grant, Refusal>, BackendError>> {
        Box::pin(async move {
            self.seed(tenant_id, limits).await?;
            self.decide(tenant_id, limits, demand)
        })
    }

    fn release<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, ()> {
        if let Ok(mut tenants) = self.tenants.lock()
            && let Some(state) = tenants.get_mut(tenant_id)
        {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        Box::pin(async {})
    }

    fn spend<'a>(&'a self, tenant_id: &'a str, usd: f64) -> BoxFuture<'a, ()> {
        let (day_start, _, month_start, _) = windows((self.clock)());
        if let Ok(mut tenants) = self.tenants.lock() {
            let state = tenants.entry(tenant_id.to_owned()).or_default();
            state.day.roll(day_start);
            state.month.roll(month_start);
            state.day.usd += usd;
            state.month.usd += usd;
        }
        Box::pin(async {})
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A clock the test moves by hand.
    fn fake_clock(start: u64) -> (Arc<AtomicU64>, Clock) {
        let now = Arc::new(AtomicU64::new(start));
        let reader = now.clone();
        (now, Arc::new(move || reader.load(Ordering::SeqCst)))
    }

    const NOON: u64 = 1_795_608_000_000; // 2026-11-25T12:00:00Z

    async fn reserve(b: &LocalBackend, limits: &Limits, n: u32) -> Result<Grant, Refusal> {
        b.reserve("t", limits, Demand { images: n }).await.unwrap()
    }

    #[tokio::test]
    async fn requests_per_minute_allow_exactly_the_limit_then_refill() {
        let (now, clock) = fake_clock(NOON);
        let b = LocalBackend::new(clock, None);
        let limits = Limits { requests_per_minute: Some(3), ..Limits::default() };
        for remaining in [2, 1, 0] {
            let grant = reserve(&b, &limits, 1).await.unwrap();
            assert_eq!(grant.report.requests.unwrap().remaining, remaining);
        }
        let refused = reserve(&b, &limits, 1).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::RequestsPerMinute, Some(20_000)));
        now.fetch_add(19_999, Ordering::SeqCst);
        assert!(reserve(&b, &limits, 1).await.is_err());
        now.fetch_add(1, Ordering::SeqCst);
        assert!(reserve(&b, &limits, 1).await.is_ok());
        assert!(reserve(&b, &limits, 1).await.is_err());
    }

    #[tokio::test]
    async fn images_are_weighted_by_n_and_a_refusal_spends_nothing_elsewhere() {
        let (_, clock) = fake_clock(NOON);
        let b = LocalBackend::new(clock, None);
        let limits = Limits { requests_per_minute: Some(10), images_per_minute: Some(8), ..Limits::default() };
        assert_eq!(reserve(&b, &limits, 4).await.unwrap().report.images.unwrap().remaining, 4);
        assert_eq!(reserve(&b, &limits, 4).await.unwrap().report.images.unwrap().remaining, 0);
        let refused = reserve(&b, &limits, 1).await.unwrap_err();
        assert_eq!(refused.reason, Reason::ImagesPerMinute);
        assert_eq!(refused.report.requests.unwrap().remaining, 8, "the refused request spent no request");
        let grant = b.reserve("t", &limits, Demand { images: 0 }).await.unwrap().unwrap();
        assert_eq!(grant.report.requests.unwrap().remaining, 7, "a cached answer spends a request, no image");
    }

    #[tokio::test]
    async fn a_burst_smaller_than_the_rate_spaces_requests_out() {
        let (now, clock) = fake_clock(NOON);
        let b = LocalBackend::new(clock, None);
        let limits = Limits { requests_per_minute: Some(60), requests_burst: Some(1), ..Limits::default() };
        assert!(reserve(&b, &limits, 1).await.is_ok());
        assert_eq!(reserve(&b, &limits, 1).await.unwrap_err().retry_after_ms, Some(1000));
        now.fetch_add(1000, Ordering::SeqCst);
        assert!(reserve(&b, &limits, 1).await.is_ok());
    }

    #[tokio::test]
    async fn concurrency_slots_are_held_until_released() {
        let (_, clock) = fake_clock(NOON);
        let b = LocalBackend::new(clock, None);
        let limits = Limits { concurrent_requests: Some(2), ..Limits::default() };
        assert!(reserve(&b, &limits, 1).await.unwrap().holds_slot);
        assert!(reserve(&b, &limits, 1).await.is_ok());
        assert_eq!(reserve(&b, &limits, 1).await.unwrap_err().reason, Reason::Concurrency);
        b.release("t").await;
        assert!(reserve(&b, &limits, 1).await.is_ok());
    }

    #[tokio::test]
    async fn budgets_refuse_whole_requests_and_reset_with_the_utc_day() {
        let (now, clock) = fake_clock(NOON);
        let b = LocalBackend::new(clock, None);
        let limits = Limits { images_per_day: Some(5), usd_per_month: Some(1.0), ..Limits::default() };
        assert!(reserve(&b, &limits, 3).await.is_ok());
        let refused = reserve(&b, &limits, 3).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::ImagesPerDay, None));
        assert!(reserve(&b, &limits, 2).await.is_ok(), "exactly the budget fits");
        now.fetch_add(12 * 3_600_000, Ordering::SeqCst); // next UTC day
        b.spend("t", 1.0).await;
        assert_eq!(reserve(&b, &limits, 1).await.unwrap_err().reason, Reason::UsdPerMonth);
    }

    #[tokio::test]
    async fn tenants_without_limits_are_never_refused() {
        let (_, clock) = fake_clock(NOON);
        let b = LocalBackend::new(clock, None);
        for _ in 0..1000 {
            let grant = reserve(&b, &Limits::default(), 10).await.unwrap();
            assert_eq!(grant.report, Report::default());
        }
    }
}
