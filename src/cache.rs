//! The response cache: identical requests answered once. An in-memory `moka` cache bounded in bytes, with a
//! TTL per entry, holding only successful whole answers whose links are imagegate's own (re-hosted, signed,
//! durable) or that carry base64, never an upstream link that expires; an entry expires while its links still
//! have at least half the image retention to live. Concurrent identical misses share one upstream call, which
//! runs in its own task so it completes, stores and records whatever happens to the callers waiting for it.
//! Optionally backed by Redis, so a miss on one replica fills the cache for all.
//!
//! Policy (on or off, TTL, scope) is a deployment default in `[cache]`, overridable per tenant; callers steer
//! single requests with `Cache-Control: no-cache` (fetch anew and store) or `no-store` (bypass).

mod answer;
mod coalesce;
mod directive;
pub mod key;
pub mod shared;
mod stats;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::Instrument as _;

pub use self::answer::{Answer, ENTRY_OVERHEAD, HEADER_OVERHEAD, NOT_REPLAYED, NotStored, storable_for};
pub use self::coalesce::{Fetched, Lookup, Role, Served, Uncached};
use self::coalesce::{Flight, Flights, Landing, flight, lock};
pub use self::directive::{Directive, Outcome};
use self::key::Key;
use self::shared::{SharedCache, SharedError};
use self::stats::Counters;
pub use self::stats::Stats;
use crate::config::CacheSettings;
use crate::domain::{Scope, Tenant};
use crate::error::ApiError;
use crate::upstream::{ReplyBody, UpstreamReply};
use crate::wire::headers;

struct Entry {
    answer: Answer,
    ttl: Duration,
}

/// Entries expire after their own TTL, counted from when they were last written: a `no-cache` refresh
/// replacing an entry starts a full new TTL (as Redis's `PX` does), it does not inherit the old deadline.
struct PerEntryTtl;

impl moka::Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _key: &Key, value: &Arc<Entry>, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &Key,
        value: &Arc<Entry>,
        _now: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct ResponseCache {
    local: moka::future::Cache<Key, Arc<Entry>>,
    shared: Option<SharedCache>,
    flights: Flights,
    next_flight: Arc<AtomicU64>,
    counters: Arc<Counters>,
    settings: Arc<CacheSettings>,
}

impl ResponseCache {
    pub fn new(settings: &CacheSettings, shared: Option<SharedCache>) -> Self {
        let counters = Arc::new(Counters::default());
        let evictions = counters.clone();
        let local = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes.as_u64())
            .weigher(|_key: &Key, entry: &Arc<Entry>| u32::try_from(entry.answer.weight()).unwrap_or(u32::MAX))
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    Counters::add(&evictions.evictions);
                }
            })
            .build();
        Self {
            local,
            shared,
            flights: Arc::default(),
            next_flight: Arc::default(),
            counters,
            settings: Arc::new(settings.clone()),
        }
    }

    /// The TTL and scope for `tenant`'s requests, or `None` when its cache is off (or its TTL is zero, which
    /// could store nothing).
    pub fn policy_for(&self, tenant: &Tenant) -> Option<(Duration, Scope)> {
        let policy = tenant.cache_policy.clone().unwrap_or_default();
        if !policy.enabled.unwrap_or(self.settings.enabled) {
            return None;
        }
        let ttl = policy.ttl.unwrap_or(self.settings.ttl);
        (!ttl.is_zero()).then(|| (ttl, policy.scope.unwrap_or(self.settings.scope)))
    }

    /// Count a request that bypassed the cache.
    pub fn count_bypass(&self) {
        Counters::add(&self.counters.bypasses);
    }

    /// Count a request answered by [`ResponseCache::get`], once the limits let it through.
    pub fn count_hit(&self) {
        Counters::add(&self.counters.hits);
    }

    /// A stored answer for `key`, from memory or (when configured) Redis. Not counted: the caller counts the
    /// hit with [`ResponseCache::count_hit`] once it is let through.
    #[tracing::instrument(name = "cache", level = "debug", skip_all)]
    pub async fn get(&self, key: &Key) -> Option<Answer> {
        if let Some(entry) = self.local.get(key).await {
            return Some(entry.answer.clone());
        }
        let shared = self.shared.as_ref()?;
        match shared.get(key).await {
            Ok(Some((answer, ttl))) => {
                Counters::add(&self.counters.shared_hits);
                self.local.insert(*key, Arc::new(Entry { answer: answer.clone(), ttl })).await;
                Some(answer)
            }
            Ok(None) => None,
            Err(e) => {
                self.counters.shared_failed(&e, "read");
                None
            }
        }
    }

    /// Answer `lookup` with one upstream call for every concurrent identical caller. The first caller's
    /// `fetch` runs in a task of its own (it completes, stores and records even if that caller goes away);
    /// identical callers arriving meanwhile wait for it; a caller finding an entry stored meanwhile takes it.
    /// `Revalidate` runs its own call and replaces the entry. Returns what was served and how.
    #[tracing::instrument(name = "cache", level = "debug", skip_all)]
    pub async fn get_or_fetch<F>(&self, lookup: &Lookup, fetch: F) -> (Served, Role)
    where
        F: Future<Output = Result<Fetched, Uncached>> + Send + 'static,
    {
        if lookup.directive == Directive::Revalidate {
            let (flight, answer) = flight();
            self.launch(lookup.key, None, answer, fetch);
            let served = flight.await;
            self.count_miss(&served);
            return (served, Role::Fetched);
        }
        enum Step<F> {
            Join(Flight),
            Look,
            Lead { flight: Flight, answer: oneshot::Sender<Served>, landing: Landing, fetch: F },
        }
        let mut fetch = Some(fetch);
        loop {
            let step = {
                let mut flights = lock(&self.flights);
                if let Some((_, flight)) = flights.get(&lookup.key) {
                    Step::Join(flight.clone())
                } else if self.local.contains_key(&lookup.key) {
                    Step::Look
                } else if let Some(fetch) = fetch.take() {
                    let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                    let (flight, answer) = flight();
                    flights.insert(lookup.key, (id, flight.clone()));
                    let landing = Landing { flights: self.flights.clone(), key: lookup.key, id };
                    Step::Lead { flight, answer, landing, fetch }
                } else {
                    // `fetch` is taken only on the way out: the loop never comes back here without it.
                    Step::Look
                }
            };
            match step {
                Step::Lead { flight, answer, landing, fetch } => {
                    // Spawned outside the lock: a task that cannot start is dropped at once, and its landing
                    // takes the lock.
                    self.launch(lookup.key, Some(landing), answer, fetch);
                    let served = flight.await;
                    self.count_miss(&served);
                    return (served, Role::Fetched);
                }
                Step::Join(flight) => {
                    let served = flight.await;
                    if matches!(&served, Err(uncached) if matches!(uncached.as_ref(), Uncached::Refused(_))) {
                        // The leader was refused by its own limits: nothing was fetched; go round again.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Counters::add(&self.counters.coalesced);
                    if served.is_ok() {
                        Counters::add(&self.counters.hits);
                    }
                    return (served, Role::Joined);
                }
                Step::Look => {
                    if let Some(entry) = self.local.get(&lookup.key).await {
                        Counters::add(&self.counters.hits);
                        return (Ok(entry.answer.clone()), Role::Found);
                    }
                    if fetch.is_none() {
                        return (
                            Err(Arc::new(Uncached::Error(ApiError::Internal(anyhow::anyhow!(
                                "the response cache lost its upstream call"
                            ))))),
                            Role::Fetched,
                        );
                    }
                    // Evicted between the check and the read: go round again.
                }
            }
        }
    }

    /// A miss is a request whose own upstream call ran: one its limits refused before the call is none.
    fn count_miss(&self, served: &Served) {
        if !matches!(served, Err(uncached) if matches!(uncached.as_ref(), Uncached::Refused(_))) {
            Counters::add(&self.counters.misses);
        }
    }

    /// Run `fetch` in a task of its own (with the caller's span), store what it gives and send it on `answer`.
    /// `landing` takes the call out of the in-flight map once it is stored.
    fn launch<F>(&self, key: Key, landing: Option<Landing>, answer: oneshot::Sender<Served>, fetch: F)
    where
        F: Future<Output = Result<Fetched, Uncached>> + Send + 'static,
    {
        let cache = self.clone();
        // `carry`: what the call learns (upstream, images) still reaches the leading request's access-log line.
        tokio::spawn(crate::metrics::facts::carry(
            async move {
                let served = match fetch.await {
                    Ok(fetched) => cache.store(key, fetched).await,
                    Err(uncached) => Err(Arc::new(uncached)),
                };
                // Out of the in-flight map before anyone is told, so a waiter going round again (its leader was
                // refused) finds no finished call to join.
                drop(landing);
                // Nobody may be waiting any more (every caller went away): the answer is stored all the same.
                let _ = answer.send(served);
            }
            .instrument(tracing::Span::current()),
        ));
    }

    /// Store a fetched answer if it may be stored (in memory now, in Redis from a task of its own).
    async fn store(&self, key: Key, fetched: Fetched) -> Served {
        let Fetched { answer, store_for } = fetched;
        let ttl = store_for.and_then(|ttl| {
            if answer.weight() > self.settings.max_entry_bytes.as_u64() { Err(NotStored::TooLarge) } else { Ok(ttl) }
        });
        let ttl = match ttl {
            Ok(ttl) => ttl,
            Err(reason) => {
                tracing::debug!(reason = reason.as_str(), "answer not cached");
                return Err(Arc::new(Uncached::Answer(answer)));
            }
        };
        let entry = Arc::new(Entry { answer, ttl });
        self.local.insert(key, entry.clone()).await;
        Counters::add(&self.counters.stores);
        if let Some(shared) = &self.shared {
            let (shared, counters, stored) = (shared.clone(), self.counters.clone(), entry.clone());
            tokio::spawn(
                async move {
                    if let Err(e) = shared.put(&key, &stored.answer, ttl).await {
                        counters.shared_failed(&e, "write");
                    }
                }
                .in_current_span(),
            );
        }
        Ok(entry.answer.clone())
    }

    /// Drop the entry of `key`, here and in the shared cache: its answer may not be handed out again (an image
    /// it links to was deleted).
    pub async fn forget(&self, key: &Key) {
        self.local.invalidate(key).await;
        if let Some(shared) = &self.shared
            && let Err(e) = shared.delete(key).await
        {
            self.counters.shared_failed(&e, "delete");
        }
    }

    /// Drop every entry held in memory (the shared cache expires on its own).
    pub fn clear(&self) {
        self.local.invalidate_all();
    }

    pub async fn stats(&self) -> Stats {
        self.local.run_pending_tasks().await;
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            enabled_by_default: self.settings.enabled,
            backend: if self.shared.is_some() { "memory+redis" } else { "memory" },
            hits: get(&c.hits),
            misses: get(&c.misses),
            bypasses: get(&c.bypasses),
            coalesced: get(&c.coalesced),
            stores: get(&c.stores),
            evictions: get(&c.evictions),
            entries: self.local.entry_count(),
            bytes: self.local.weighted_size(),
            max_bytes: self.settings.max_bytes.as_u64(),
            shared_hits: get(&c.shared_hits),
            shared_errors: get(&c.shared_errors),
            shared_skipped: get(&c.shared_skipped),
            shared_state: self.shared.as_ref().map(SharedCache::state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_bytes: u64) -> ResponseCache {
        let settings = CacheSettings {
            enabled: true,
            max_bytes: bytesize::ByteSize(max_bytes),
            max_entry_bytes: bytesize::ByteSize(max_bytes),
            ..CacheSettings::default()
        };
        ResponseCache::new(&settings, None)
    }

    fn answer(len: usize) -> Answer {
        Answer { status: 200, headers: vec![], body: Bytes::from(vec![b'x'; len]), images: None }
    }

    fn json_answer(body: serde_json::Value) -> Answer {
        Answer { status: 200, headers: vec![], body: Bytes::from(body.to_string()), images: Some(1) }
    }

    fn lookup(i: u8) -> Lookup {
        Lookup { key: [i; 32], ttl: Duration::from_secs(60), link_margin: Duration::ZERO, directive: Directive::Normal }
    }

    async fn stored(answer: Answer, ttl: Duration) -> Result<Fetched, Uncached> {
        Ok(Fetched { answer, store_for: Ok(ttl) })
    }

    #[test]
    fn cache_control_directives() {
        let d = |values: &[&str]| Directive::from_headers(values.iter().copied());
        assert_eq!(d(&[]), Directive::Normal);
        assert_eq!(d(&["No-Cache"]), Directive::Revalidate);
        assert_eq!(d(&["max-age=0"]), Directive::Revalidate);
        assert_eq!(d(&["MAX-AGE = \"0\""]), Directive::Revalidate);
        assert_eq!(d(&["max-age=60"]), Directive::Normal);
        assert_eq!(d(&["no-cache, no-store"]), Directive::Bypass);
        assert_eq!(d(&["no-store", "no-cache"]), Directive::Bypass, "no-store wins, in any header");
        assert_eq!(d(&["private", " NO-CACHE "]), Directive::Revalidate, "every header is read");
        assert_eq!(d(&["private"]), Directive::Normal);
    }

    #[test]
    fn only_answers_with_imagegates_own_links_or_base64_are_storable_and_never_past_the_links_margin() {
        let links = |answer: &Answer| crate::wire::AnswerFacts::read(&answer.body).and_then(|f| f.links);
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let own = |link: &str| link.strip_prefix("https://gw/images/files/a.png?expires=").and_then(|e| e.parse().ok());
        let lookup = Lookup { ttl: Duration::from_secs(3600), link_margin: Duration::from_secs(10), ..lookup(1) };
        let b64 = json_answer(serde_json::json!({"data": [{"b64_json": "aGk="}]}));
        assert_eq!(
            storable_for(&b64, links(&b64).as_deref(), &lookup, now, own),
            Ok(Duration::from_secs(3600)),
            "base64 never expires"
        );
        // A link living 20 s more: stored for 20 − 10 s, so a hit's link has at least 10 s left.
        let ours = json_answer(serde_json::json!({"data": [{"url": "https://gw/images/files/a.png?expires=1000020"}]}));
        assert_eq!(storable_for(&ours, links(&ours).as_deref(), &lookup, now, own), Ok(Duration::from_secs(10)));
        let short =
            json_answer(serde_json::json!({"data": [{"url": "https://gw/images/files/a.png?expires=1000009"}]}));
        assert_eq!(storable_for(&short, links(&short).as_deref(), &lookup, now, own), Err(NotStored::ShortLivedLinks));
        let mixed = json_answer(serde_json::json!({"data": [
            {"url": "https://gw/images/files/a.png?expires=1000020"},
            {"url": "https://oaidalleapiprodscus.blob.core.windows.net/x.png?se=2026"},
        ]}));
        assert_eq!(storable_for(&mixed, links(&mixed).as_deref(), &lookup, now, own), Err(NotStored::ForeignLink));
        let error = Answer { status: 500, ..b64.clone() };
        assert_eq!(storable_for(&error, links(&error).as_deref(), &lookup, now, own), Err(NotStored::Status));
        assert_eq!(storable_for(&answer(3), links(&answer(3)).as_deref(), &lookup, now, own), Err(NotStored::NotJson));
    }

    #[tokio::test]
    async fn memory_stays_within_the_byte_bound_when_filled_past_it() {
        let cache = cache(1_000_000);
        for i in 0..=255u8 {
            let (served, role) = cache.get_or_fetch(&lookup(i), stored(answer(10_000), Duration::from_secs(60))).await;
            assert!(served.is_ok() && role == Role::Fetched);
        }
        let stats = cache.stats().await;
        assert!(stats.bytes <= 1_000_000, "{stats:?}");
        assert!(stats.entries < 256 && stats.entries > 50, "{stats:?}");
        assert!(stats.evictions > 0, "{stats:?}");
    }

    #[tokio::test]
    async fn errors_are_shared_but_never_stored() {
        let cache = cache(1_000_000);
        let failing = async { Err(Uncached::Answer(Answer { status: 500, ..answer(3) })) };
        let (served, role) = cache.get_or_fetch(&lookup(1), failing).await;
        assert!(served.is_err() && role == Role::Fetched);
        assert!(cache.get(&[1; 32]).await.is_none());
        let (served, role) = cache.get_or_fetch(&lookup(1), stored(answer(3), Duration::from_secs(60))).await;
        assert_eq!(role, Role::Fetched, "the next request fetched anew");
        assert_eq!(served.unwrap().body.len(), 3);
        assert_eq!(cache.get(&[1; 32]).await.unwrap().body.len(), 3);
        let stats = cache.stats().await;
        assert_eq!((stats.misses, stats.hits, stats.stores), (2, 0, 1), "{stats:?}");
    }

    #[tokio::test]
    async fn waiters_share_the_call_and_only_a_stored_answer_is_a_hit_for_them() {
        let cache = cache(1_000_000);
        let slow = |answer: Answer, store: bool| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if store {
                Ok(Fetched { answer, store_for: Ok(Duration::from_secs(60)) })
            } else {
                Err(Uncached::Answer(answer))
            }
        };
        let one = lookup(1);
        let callers = (0..5).map(|_| cache.get_or_fetch(&one, slow(answer(3), true)));
        let roles: Vec<Role> = futures::future::join_all(callers).await.into_iter().map(|(_, role)| role).collect();
        assert_eq!(roles.iter().filter(|r| **r == Role::Fetched).count(), 1, "{roles:?}");
        let stats = cache.stats().await;
        assert_eq!((stats.misses, stats.hits, stats.coalesced), (1, 4, 4), "{stats:?}");

        let failing = Answer { status: 500, ..answer(3) };
        let two = lookup(2);
        let callers = (0..5).map(|_| cache.get_or_fetch(&two, slow(failing.clone(), false)));
        let served = futures::future::join_all(callers).await;
        let outcomes: Vec<Outcome> = served.iter().map(|(s, role)| role.outcome(s)).collect();
        assert!(outcomes.iter().all(|o| *o == Outcome::Miss), "a shared error is no hit: {outcomes:?}");
        let stats = cache.stats().await;
        assert_eq!((stats.misses, stats.hits, stats.coalesced), (2, 4, 8), "{stats:?}");
    }

    #[tokio::test]
    async fn waiters_of_a_leader_its_limits_refused_make_their_own_call() {
        let cache = cache(1_000_000);
        let refused = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(Uncached::Refused(ApiError::PermissionDenied { message: "tenant A's limits".into() }))
        };
        let one = lookup(1);
        let leader = cache.get_or_fetch(&one, refused);
        let waiter = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            cache.get_or_fetch(&one, stored(answer(3), Duration::from_secs(60))).await
        };
        let ((led, led_role), (waited, waiter_role)) = tokio::join!(leader, waiter);
        assert!(matches!(led.as_ref().map_err(|e| e.as_ref()), Err(Uncached::Refused(_))) && led_role == Role::Fetched);
        assert_eq!(
            (waiter_role, waited.map(|a| a.body.len()).ok()),
            (Role::Fetched, Some(3)),
            "the waiter never sees another caller's refusal: it made its own call"
        );
        let stats = cache.stats().await;
        assert_eq!((stats.misses, stats.hits, stats.coalesced), (1, 0, 0), "a refused leader is no miss: {stats:?}");
    }

    #[tokio::test]
    async fn the_first_callers_call_completes_and_stores_when_it_goes_away() {
        let cache = cache(1_000_000);
        let calls = Arc::new(AtomicU64::new(0));
        let fetch = |calls: Arc<AtomicU64>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Fetched { answer: answer(3), store_for: Ok(Duration::from_secs(60)) })
        };
        let one = lookup(1);
        let first = cache.get_or_fetch(&one, fetch(calls.clone()));
        assert!(tokio::time::timeout(Duration::from_millis(50), first).await.is_err(), "the first caller gave up");
        let (served, role) = cache.get_or_fetch(&one, fetch(calls.clone())).await;
        assert_eq!((role, served.is_ok()), (Role::Joined, true), "the second joined the call still running");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.get(&[1; 32]).await.is_some());
    }

    #[tokio::test]
    async fn a_refresh_lives_its_own_ttl_not_the_rest_of_the_entry_it_replaced() {
        let cache = cache(1_000_000);
        let ttl = Duration::from_millis(800);
        cache.get_or_fetch(&lookup(1), stored(answer(1), ttl)).await.0.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let refresh = Lookup { directive: Directive::Revalidate, ..lookup(1) };
        cache.get_or_fetch(&refresh, stored(answer(2), ttl)).await.0.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // 1 s after the first store, 0.5 s after the refresh: the first entry's deadline has passed.
        assert_eq!(cache.get(&[1; 32]).await.map(|a| a.body.len()), Some(2), "the refresh got a full TTL");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(cache.get(&[1; 32]).await.is_none(), "and expired after it");
    }
}
