//! The in-process backend, the embedded default: every tenant's buckets, in-flight holds and budget counters
//! live in one map under a mutex, and each decision is `gcra::check_all` plus the counters, all or nothing.
//! Exact on one replica; use the Redis backend to share limits between replicas.
//!
//! Buckets run on the monotonic clock; budget windows are UTC days and months on the wall clock, like the
//! ledger's timestamps. Spending is always counted, for every tenant, from the moment this backend starts
//! (`since`); what was spent earlier in a window is read from the usage ledger once, the first time a budget
//! of that window needs it (`[window start, since)`: rows this process wrote are already counted), so a
//! restart does not reset budgets, and a budget added to a tenant later starts from what it really spent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::gcra::{self, Bucket, Verdict};
use super::{Backend, BackendError, Demand, Grant, Held, Reason, Refusal, SharedClock, USD_EPSILON, Usage};
use crate::db::Db;
use crate::domain::Limits;
use crate::domain::{BucketReport, Report};
use crate::time::windows;

/// In-memory limits.
pub struct LocalBackend {
    tenants: Mutex<HashMap<String, TenantState>>,
    clock: SharedClock,
    /// Seeds budgets from the ledger; `None` in unit tests (nothing was spent before `since`).
    db: Option<Db>,
    /// Wall-clock ms when this backend started counting: spending before it comes from the ledger.
    since: u64,
}

#[derive(Debug, Default)]
struct TenantState {
    /// Bucket TATs on the monotonic clock.
    requests_tat: u64,
    images_tat: u64,
    /// Held by reservations in flight.
    in_flight: u32,
    held_images: u64,
    held_usd: f64,
    day: Window,
    month: Window,
}

/// Spending in one UTC day or month.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    start: u64,
    images: u64,
    usd: f64,
    /// The ledger's rows before `since` are included.
    seeded: bool,
}

impl Window {
    /// Start a new window when `start` moved on. A window that began after this backend started needs no
    /// ledger: everything in it was counted here.
    fn roll(&mut self, start: u64, since: u64) {
        if self.start != start {
            *self = Window { start, images: 0, usd: 0.0, seeded: start >= since };
        }
    }
}

/// Which windows need the ledger before a decision.
#[derive(Debug, Clone, Copy)]
struct SeedNeed {
    day: Option<u64>,
    month: Option<u64>,
}

impl LocalBackend {
    pub fn new(clock: SharedClock, db: Option<Db>) -> Self {
        let since = clock.wall_ms();
        Self { tenants: Mutex::default(), clock, db, since }
    }

    /// Read what the tenant spent before `since` in the windows its budgets need, once per window.
    async fn seed(&self, tenant_id: &str, limits: &Limits, demand: Demand) -> Result<(), BackendError> {
        let Some(db) = self.db.as_ref() else { return Ok(()) };
        let day_budget = budget_applies(limits.images_per_day.is_some(), limits.usd_per_day.is_some(), demand);
        let month_budget = budget_applies(limits.images_per_month.is_some(), limits.usd_per_month.is_some(), demand);
        if !day_budget && !month_budget {
            return Ok(()); // nothing to seed: no lock, no allocation on the request path
        }
        let need = {
            let mut tenants = self.tenants.lock().map_err(|_| poisoned())?;
            let state = tenants.entry(tenant_id.to_owned()).or_default();
            self.roll(state);
            SeedNeed {
                day: (day_budget && !state.day.seeded).then_some(state.day.start),
                month: (month_budget && !state.month.seeded).then_some(state.month.start),
            }
        };
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let read = |start: u64| async move {
            crate::ledger::report::spent_since(db, tenant_id, as_i64(start), Some(as_i64(self.since)))
                .await
                .map_err(|e| BackendError(format!("cannot read budgets from the ledger: {e}")))
        };
        let day = match need.day {
            Some(start) => Some((start, read(start).await?)),
            None => None,
        };
        let month = match need.month {
            Some(start) => Some((start, read(start).await?)),
            None => None,
        };
        if day.is_none() && month.is_none() {
            return Ok(()); // both windows already seeded
        }
        let mut tenants = self.tenants.lock().map_err(|_| poisoned())?;
        let state = tenants.entry(tenant_id.to_owned()).or_default();
        for (window, seed) in [(&mut state.day, day), (&mut state.month, month)] {
            // Another request may have seeded it meanwhile, or the window moved on: then this read is stale.
            if let Some((start, (images, usd))) = seed
                && window.start == start
                && !window.seeded
            {
                window.images += images;
                window.usd += usd;
                window.seeded = true;
                tracing::debug!(
                    tenant = tenant_id,
                    window_start = start,
                    images,
                    usd,
                    "budgets seeded from the ledger"
                );
            }
        }
        Ok(())
    }

    fn roll(&self, state: &mut TenantState) {
        let (day_start, _, month_start, _) = windows(self.clock.wall_ms());
        state.day.roll(day_start, self.since);
        state.month.roll(month_start, self.since);
    }

    fn decide(&self, tenant_id: &str, limits: &Limits, demand: Demand) -> Result<Result<Grant, Refusal>, BackendError> {
        let now = self.clock.mono_ms();
        let mut tenants = self.tenants.lock().map_err(|_| poisoned())?;
        let state = tenants.entry(tenant_id.to_owned()).or_default();
        self.roll(state);
        let n = u64::from(demand.images);

        let requests = limits
            .requests_per_minute
            .map(|l| (Bucket::per_minute(l, limits.requests_burst), state.requests_tat, u64::from(demand.request)));
        let images =
            limits.images_per_minute.map(|l| (Bucket::per_minute(l, limits.images_burst), state.images_tat, n));
        let buckets: Vec<(Bucket, u64, u64)> = requests.into_iter().chain(images).collect();
        let (_, verdicts) = gcra::check_all(&buckets, now);
        let verdict_of = |present: bool, index: usize| present.then(|| verdicts.get(index).copied()).flatten();
        let requests_verdict = verdict_of(requests.is_some(), 0);
        let images_verdict = verdict_of(images.is_some(), usize::from(requests.is_some()));
        let report = Report {
            requests: requests.zip(requests_verdict).map(|((b, ..), v)| bucket_report(b, v)),
            images: images.zip(images_verdict).map(|((b, ..), v)| bucket_report(b, v)),
        };

        let refused = |reason: Reason, verdict: Option<Verdict>, bucket: Option<(Bucket, u64, u64)>| {
            let never =
                verdict.filter(|v| v.retry_after_ms == Some(u64::MAX)).and(bucket).map(|(b, _, u)| (u, b.burst));
            let retry_after_ms = verdict.and_then(|v| v.retry_after_ms).filter(|ms| *ms != u64::MAX);
            Ok(Err(Refusal { reason, retry_after_ms, never, report }))
        };
        if let Some(v) = requests_verdict.filter(|v| v.retry_after_ms.is_some()) {
            return refused(Reason::RequestsPerMinute, Some(v), requests);
        }
        if let Some(v) = images_verdict.filter(|v| v.retry_after_ms.is_some()) {
            return refused(Reason::ImagesPerMinute, Some(v), images);
        }
        let takes_slot = demand.request && limits.concurrent_requests.is_some();
        if takes_slot && limits.concurrent_requests.is_some_and(|l| state.in_flight >= l) {
            let wait = Verdict { new_tat: 0, remaining: 0, reset_ms: 0, retry_after_ms: Some(1000) };
            return refused(Reason::Concurrency, Some(wait), None);
        }
        let images_over = |limit: Option<u64>, spent: u64| {
            n > 0 && limit.is_some_and(|l| spent.saturating_add(state.held_images).saturating_add(n) > l)
        };
        let usd_over = |limit: Option<f64>, spent: f64| {
            demand.usd > 0.0 && limit.is_some_and(|l| spent + state.held_usd + demand.usd > l + USD_EPSILON)
        };
        let budgets = [
            (images_over(limits.images_per_day, state.day.images), Reason::ImagesPerDay),
            (images_over(limits.images_per_month, state.month.images), Reason::ImagesPerMonth),
            (usd_over(limits.usd_per_day, state.day.usd), Reason::UsdPerDay),
            (usd_over(limits.usd_per_month, state.month.usd), Reason::UsdPerMonth),
        ];
        if let Some((_, reason)) = budgets.iter().find(|(over, _)| *over) {
            return refused(*reason, None, None);
        }
        // Everything fits: reserve it all.
        if let Some(v) = requests_verdict {
            state.requests_tat = v.new_tat;
        }
        if let Some(v) = images_verdict {
            state.images_tat = v.new_tat;
        }
        if takes_slot {
            state.in_flight += 1;
        }
        state.held_images += n;
        state.held_usd += demand.usd;
        Ok(Ok(Grant { report, holds_slot: takes_slot }))
    }

    fn settle(&self, held: &Held, usage: Usage) -> Result<(), BackendError> {
        let now = self.clock.mono_ms();
        let mut tenants = self.tenants.lock().map_err(|_| poisoned())?;
        let state = tenants.entry(held.tenant_id.clone()).or_default();
        if held.slot {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        state.held_images = state.held_images.saturating_sub(u64::from(held.images));
        state.held_usd = (state.held_usd - held.usd).max(0.0);
        if state.held_usd < USD_EPSILON {
            state.held_usd = 0.0;
        }
        if let Some(b) = held.requests_bucket.filter(|_| held.request && usage.request_back) {
            state.requests_tat = gcra::give_back(b, state.requests_tat, now, 1);
        }
        let unused = held.images.saturating_sub(usage.images);
        if let Some(b) = held.images_bucket.filter(|_| unused > 0) {
            state.images_tat = gcra::give_back(b, state.images_tat, now, u64::from(unused));
        }
        self.roll(state);
        for window in [&mut state.day, &mut state.month] {
            window.images += u64::from(usage.images);
            window.usd += usage.usd.max(0.0);
        }
        Ok(())
    }

    fn report(&self, tenant_id: &str, limits: &Limits) -> Result<Report, BackendError> {
        let now = self.clock.mono_ms();
        let tenants = self.tenants.lock().map_err(|_| poisoned())?;
        let (requests_tat, images_tat) = tenants.get(tenant_id).map_or((0, 0), |s| (s.requests_tat, s.images_tat));
        let peek = |limit: Option<u32>, burst: Option<u32>, tat: u64| {
            limit.map(|l| {
                let b = Bucket::per_minute(l, burst);
                bucket_report(b, gcra::check(b, tat, now, 0))
            })
        };
        Ok(Report {
            requests: peek(limits.requests_per_minute, limits.requests_burst, requests_tat),
            images: peek(limits.images_per_minute, limits.images_burst, images_tat),
        })
    }
}

/// Whether a demand is checked against a window's budgets (a demand with no images and no cost never is).
fn budget_applies(images_budget: bool, usd_budget: bool, demand: Demand) -> bool {
    (images_budget && demand.images > 0) || (usd_budget && demand.usd > 0.0)
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
        _id: &'a str,
    ) -> BoxFuture<'a, Result<Result<Grant, Refusal>, BackendError>> {
        Box::pin(async move {
            self.seed(tenant_id, limits, demand).await?;
            self.decide(tenant_id, limits, demand)
        })
    }

    fn finish(self: Arc<Self>, held: Held, usage: Usage) -> BoxFuture<'static, Result<(), BackendError>> {
        // Done now, not when the future is polled: the next decision must see it.
        let done = self.settle(&held, usage);
        Box::pin(async move { done })
    }

    fn peek<'a>(&'a self, tenant_id: &'a str, limits: &'a Limits) -> BoxFuture<'a, Result<Report, BackendError>> {
        let report = self.report(tenant_id, limits);
        Box::pin(async move { report })
    }

    fn name(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::limits::Clock;

    /// Clocks the test moves by hand: wall (budgets) and monotonic (buckets) separately.
    #[derive(Default)]
    struct FakeClock {
        wall: AtomicU64,
        mono: AtomicU64,
    }

    impl Clock for FakeClock {
        fn wall_ms(&self) -> u64 {
            self.wall.load(Ordering::SeqCst)
        }
        fn mono_ms(&self) -> u64 {
            self.mono.load(Ordering::SeqCst)
        }
    }

    impl FakeClock {
        /// Both clocks move on by `ms`.
        fn advance(&self, ms: u64) {
            self.wall.fetch_add(ms, Ordering::SeqCst);
            self.mono.fetch_add(ms, Ordering::SeqCst);
        }
    }

    const NOON: u64 = 1_795_608_000_000; // 2026-11-25T12:00:00Z

    fn backend() -> (Arc<FakeClock>, Arc<LocalBackend>) {
        let clock = Arc::new(FakeClock { wall: AtomicU64::new(NOON), mono: AtomicU64::new(5_000) });
        (clock.clone(), Arc::new(LocalBackend::new(clock, None)))
    }

    /// A reservation and what it holds, as the limiter would keep it.
    async fn reserve(b: &LocalBackend, limits: &Limits, demand: Demand) -> Result<Held, Refusal> {
        let id = hex::encode(rand::random::<[u8; 6]>());
        let grant = b.reserve("t", limits, demand, &id).await.unwrap()?;
        Ok(Held {
            tenant_id: "t".into(),
            id,
            request: demand.request,
            slot: grant.holds_slot,
            images: demand.images,
            usd: demand.usd,
            requests_bucket: limits.requests_per_minute.map(|l| Bucket::per_minute(l, limits.requests_burst)),
            images_bucket: limits.images_per_minute.map(|l| Bucket::per_minute(l, limits.images_burst)),
        })
    }

    async fn grant(b: &LocalBackend, limits: &Limits, n: u32) -> Result<Grant, Refusal> {
        b.reserve("t", limits, Demand::whole(n, 0.0), "x").await.unwrap()
    }

    async fn finish(b: &Arc<LocalBackend>, held: Held, usage: Usage) {
        b.clone().finish(held, usage).await.unwrap();
    }

    fn peek(b: &LocalBackend, limits: &Limits) -> Report {
        b.report("t", limits).unwrap()
    }

    #[tokio::test]
    async fn requests_per_minute_allow_exactly_the_limit_per_window_then_refill() {
        let (clock, b) = backend();
        let limits = Limits { requests_per_minute: Some(3), ..Limits::default() };
        for remaining in [2, 1, 0] {
            let g = grant(&b, &limits, 1).await.unwrap();
            assert_eq!(
                g.report.requests.unwrap(),
                BucketReport { limit: 3, remaining, reset_ms: (3 - remaining) * 20_000 }
            );
        }
        let refused = grant(&b, &limits, 1).await.unwrap_err();
        assert_eq!(
            (refused.reason, refused.retry_after_ms, refused.never),
            (Reason::RequestsPerMinute, Some(20_000), None)
        );
        clock.advance(19_999);
        assert!(grant(&b, &limits, 1).await.is_err());
        clock.advance(1);
        assert!(grant(&b, &limits, 1).await.is_ok());
        assert!(grant(&b, &limits, 1).await.is_err());
        // Over a long run, exactly 3 per minute.
        let mut granted = 0;
        for _ in 0..600 {
            clock.advance(1000);
            granted += usize::from(grant(&b, &limits, 1).await.is_ok());
        }
        assert_eq!(granted, 30, "10 minutes at 3 per minute");
    }

    #[tokio::test]
    async fn images_are_weighted_by_n_and_a_refusal_spends_nothing_elsewhere() {
        let (clock, b) = backend();
        let limits = Limits { requests_per_minute: Some(10), images_per_minute: Some(8), ..Limits::default() };
        assert_eq!(grant(&b, &limits, 4).await.unwrap().report.images.unwrap().remaining, 4);
        assert_eq!(grant(&b, &limits, 4).await.unwrap().report.images.unwrap().remaining, 0);
        let refused = grant(&b, &limits, 1).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::ImagesPerMinute, Some(7_500)));
        assert_eq!(refused.report.requests.unwrap().remaining, 8, "the refused request spent no request");
        let cached = b.reserve("t", &limits, Demand::request_only(), "x").await.unwrap().unwrap();
        assert_eq!(cached.report.requests.unwrap().remaining, 7, "a cached answer spends a request, no image");
        assert_eq!(cached.report.images.unwrap().remaining, 0);
        // Images per minute over a long run: exactly 8 per minute, whatever the weights.
        let mut images = 0;
        for i in 0..120_u32 {
            clock.advance(1000);
            let n = 1 + i % 3;
            if b.reserve("t", &limits, Demand::more(n, 0.0), "x").await.unwrap().is_ok() {
                images += n;
            }
        }
        // The bucket was empty: two minutes earn 16 images; 15 fit the demands as they came, one waits.
        assert_eq!(images, 15, "two minutes at 8 images per minute, weighted by n");
    }

    #[tokio::test]
    async fn a_demand_larger_than_the_burst_never_fits_and_says_so() {
        let (_, b) = backend();
        let limits = Limits { images_per_minute: Some(10), images_burst: Some(5), ..Limits::default() };
        let refused = grant(&b, &limits, 6).await.unwrap_err();
        assert_eq!(
            (refused.reason, refused.retry_after_ms, refused.never),
            (Reason::ImagesPerMinute, None, Some((6, 5)))
        );
        assert!(grant(&b, &limits, 5).await.is_ok());
    }

    #[tokio::test]
    async fn a_burst_smaller_than_the_rate_spaces_requests_out() {
        let (clock, b) = backend();
        let limits = Limits { requests_per_minute: Some(60), requests_burst: Some(1), ..Limits::default() };
        assert!(grant(&b, &limits, 1).await.is_ok());
        assert_eq!(grant(&b, &limits, 1).await.unwrap_err().retry_after_ms, Some(1000));
        clock.advance(1000);
        assert!(grant(&b, &limits, 1).await.is_ok());
    }

    #[tokio::test]
    async fn concurrency_slots_are_held_until_finished() {
        let (_, b) = backend();
        let limits = Limits { concurrent_requests: Some(2), ..Limits::default() };
        let first = reserve(&b, &limits, Demand::whole(1, 0.0)).await.unwrap();
        assert!(first.slot);
        let _second = reserve(&b, &limits, Demand::whole(1, 0.0)).await.unwrap();
        let refused = reserve(&b, &limits, Demand::whole(1, 0.0)).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::Concurrency, Some(1000)));
        let extension = reserve(&b, &limits, Demand::more(1, 0.0)).await.unwrap();
        assert!(!extension.slot, "adding images to a reservation takes no second slot");
        finish(&b, first, Usage::NOTHING).await;
        assert!(reserve(&b, &limits, Demand::whole(1, 0.0)).await.is_ok());
    }

    #[tokio::test]
    async fn refunds_give_back_unused_images_and_refused_requests() {
        let (_, b) = backend();
        let limits = Limits { requests_per_minute: Some(10), images_per_minute: Some(10), ..Limits::default() };
        let held = reserve(&b, &limits, Demand::whole(4, 0.0)).await.unwrap();
        let report = peek(&b, &limits);
        assert_eq!((report.requests.unwrap().remaining, report.images.unwrap().remaining), (9, 6));
        // The upstream returned 1 image of 4: three come back, the request stays spent.
        finish(&b, held, Usage { images: 1, usd: 0.0, request_back: false }).await;
        let report = peek(&b, &limits);
        assert_eq!((report.requests.unwrap().remaining, report.images.unwrap().remaining), (9, 9));
        assert_eq!(report.images.unwrap().reset_ms, 6_000);
        // An upstream 429: everything comes back, the request too.
        let held = reserve(&b, &limits, Demand::whole(4, 0.0)).await.unwrap();
        finish(&b, held, Usage::REFUNDED).await;
        let report = peek(&b, &limits);
        assert_eq!((report.requests.unwrap().remaining, report.images.unwrap().remaining), (9, 9));
        // Finishing twice is not possible through the limiter; a bucket never exceeds its burst either way.
        let held = reserve(&b, &limits, Demand::whole(1, 0.0)).await.unwrap();
        finish(&b, held.clone(), Usage::REFUNDED).await;
        finish(&b, held, Usage::REFUNDED).await;
        assert_eq!(peek(&b, &limits).requests.unwrap().remaining, 10);
    }

    #[tokio::test]
    async fn image_budgets_count_what_came_back_and_hold_what_is_in_flight() {
        let (clock, b) = backend();
        let limits = Limits { images_per_day: Some(5), ..Limits::default() };
        let first = reserve(&b, &limits, Demand::whole(3, 0.0)).await.unwrap();
        let refused = reserve(&b, &limits, Demand::whole(3, 0.0)).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::ImagesPerDay, None), "3 held + 3 > 5");
        let second = reserve(&b, &limits, Demand::whole(2, 0.0)).await.unwrap();
        assert!(reserve(&b, &limits, Demand::whole(1, 0.0)).await.is_err(), "exactly the budget is held");
        // The first came back with 2 images, the second failed upstream: 2 of 5 spent.
        finish(&b, first, Usage { images: 2, usd: 0.0, request_back: false }).await;
        finish(&b, second, Usage::NOTHING).await;
        let third = reserve(&b, &limits, Demand::whole(3, 0.0)).await.unwrap();
        finish(&b, third, Usage { images: 3, usd: 0.0, request_back: false }).await;
        assert_eq!(reserve(&b, &limits, Demand::whole(1, 0.0)).await.unwrap_err().reason, Reason::ImagesPerDay);
        assert!(reserve(&b, &limits, Demand::request_only()).await.is_ok(), "a cache hit passes a spent budget");
        clock.advance(12 * 3_600_000); // the next UTC day
        assert!(reserve(&b, &limits, Demand::whole(5, 0.0)).await.is_ok());
    }

    #[tokio::test]
    async fn monthly_budgets_outlive_the_day_and_renew_with_the_month() {
        let (clock, b) = backend();
        let limits = Limits { images_per_month: Some(4), usd_per_month: Some(0.1), ..Limits::default() };
        for _ in 0..3 {
            let h = reserve(&b, &limits, Demand::whole(1, 0.03)).await.unwrap();
            finish(&b, h, Usage { images: 1, usd: 0.03, request_back: false }).await;
            clock.advance(86_400_000); // a day later: the month goes on
        }
        assert_eq!(reserve(&b, &limits, Demand::whole(1, 0.03)).await.unwrap_err().reason, Reason::UsdPerMonth);
        assert_eq!(reserve(&b, &limits, Demand::whole(2, 0.0)).await.unwrap_err().reason, Reason::ImagesPerMonth);
        assert!(reserve(&b, &limits, Demand::whole(1, 0.01)).await.is_ok(), "exactly 4 images and $0.10");
        clock.advance(10 * 86_400_000); // 2026-12-08: a new month
        assert!(reserve(&b, &limits, Demand::whole(3, 0.09)).await.is_ok());
    }

    #[tokio::test]
    async fn usd_budgets_reserve_the_estimate_and_reconcile_to_the_cost() {
        let (_, b) = backend();
        let limits = Limits { usd_per_day: Some(0.12), usd_per_month: Some(1.0), ..Limits::default() };
        // Three $0.04 requests fit $0.12 exactly (binary floats notwithstanding); a fourth does not.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(reserve(&b, &limits, Demand::whole(1, 0.04)).await.unwrap());
        }
        assert_eq!(reserve(&b, &limits, Demand::whole(1, 0.04)).await.unwrap_err().reason, Reason::UsdPerDay);
        assert!(reserve(&b, &limits, Demand::whole(1, 0.0)).await.is_ok(), "no cost, no USD check");
        // One cost less than estimated, one failed, one as estimated: $0.05 spent.
        let mut held = held.into_iter();
        finish(&b, held.next().unwrap(), Usage { images: 1, usd: 0.01, request_back: false }).await;
        finish(&b, held.next().unwrap(), Usage::NOTHING).await;
        finish(&b, held.next().unwrap(), Usage { images: 1, usd: 0.04, request_back: false }).await;
        let ok = reserve(&b, &limits, Demand::whole(1, 0.07)).await.unwrap();
        assert_eq!(reserve(&b, &limits, Demand::whole(1, 0.01)).await.unwrap_err().reason, Reason::UsdPerDay);
        finish(&b, ok, Usage { images: 1, usd: 0.07, request_back: false }).await;
        assert!(reserve(&b, &limits, Demand::request_only()).await.is_ok(), "a cost-0 hit passes a spent budget");
    }

    #[tokio::test]
    async fn a_backwards_wall_clock_jump_neither_blocks_nor_frees_a_tenant() {
        let (clock, b) = backend();
        let limits = Limits { requests_per_minute: Some(1), ..Limits::default() };
        assert!(grant(&b, &limits, 1).await.is_ok());
        clock.wall.fetch_sub(3_600_000, Ordering::SeqCst); // NTP steps the wall clock back an hour
        assert!(grant(&b, &limits, 1).await.is_err(), "the bucket did not refill");
        clock.mono.fetch_add(60_000, Ordering::SeqCst);
        assert!(grant(&b, &limits, 1).await.is_ok(), "a minute later it did, whatever the wall clock says");
    }

    #[tokio::test]
    async fn peeking_spends_nothing_and_reports_a_fresh_bucket_as_full() {
        let (_, b) = backend();
        let limits = Limits { requests_per_minute: Some(4), images_per_minute: Some(6), ..Limits::default() };
        let fresh = peek(&b, &limits);
        assert_eq!(fresh.requests.unwrap(), BucketReport { limit: 4, remaining: 4, reset_ms: 0 });
        assert_eq!(peek(&b, &limits), fresh);
        grant(&b, &limits, 2).await.unwrap();
        let after = peek(&b, &limits);
        assert_eq!((after.requests.unwrap().remaining, after.images.unwrap().remaining), (3, 4));
        assert_eq!(after.images.unwrap().reset_ms, 20_000);
    }

    #[tokio::test]
    async fn tenants_without_limits_are_never_refused() {
        let (_, b) = backend();
        for _ in 0..1000 {
            let g = grant(&b, &Limits::default(), 10).await.unwrap();
            assert_eq!(g.report, Report::default());
        }
    }
}
