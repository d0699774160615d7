//! The response cache: identical requests answered once. An in-memory `moka` cache bounded in bytes, with a
//! TTL per entry, holding only successful whole answers whose links are imagegate's own (re-hosted, signed,
//! durable) or that carry base64, never an upstream link that expires; an entry expires while its links still
//! have at least half the image retention to live. Concurrent identical misses share one upstream call, which
//! runs in its own task so it completes, stores and records whatever happens to the callers waiting for it.
//! Optionally backed by Redis, so a miss on one replica fills the cache for all.
//!
//! Policy (on or off, TTL, scope) is a deployment default in `[cache]`, overridable per tenant; callers steer
//! single requests with `Cache-Control: no-cache` (fetch anew and store) or `no-store` (bypass).

pub mod key;
pub mod shared;

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

use self::key::Key;
use self::shared::{SharedCache, SharedError};
use crate::config::CacheSettings;
use crate::error::ApiError;
use crate::tenants::Tenant;
use crate::upstream::{ReplyBody, UpstreamReply};
use crate::wire::headers;

/// Whose answers a cache entry may serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Only the tenant that caused it (the default).
    #[default]
    Tenant,
    /// Every tenant with the shared scope (explicit opt-in: they see each other's images for equal requests).
    Shared,
}

/// Per-tenant overrides of `[cache]`; `None` = the deployment's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachePolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How long an answer is reused, e.g. `"10m"`. Zero turns the tenant's cache off.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
}

/// How a caller asked this request to use the cache (`Cache-Control` request header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Directive {
    #[default]
    Normal,
    /// `no-cache` (or `max-age=0`): do not answer from the cache; fetch anew and store the answer.
    Revalidate,
    /// `no-store`: neither read nor write the cache.
    Bypass,
}

impl Directive {
    /// From every `Cache-Control` header value of a request, each a comma-separated list of directives, read
    /// case-insensitively; `no-store` wins over `no-cache`, and `max-age=0` means `no-cache`. Other
    /// directives (`max-age=N` with N > 0, `private`, …) leave the cache's normal behaviour.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut directive = Self::Normal;
        for token in values.into_iter().flat_map(|v| v.split(',')) {
            let (name, argument) = match token.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (token.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") {
                return Self::Bypass;
            }
            let revalidate = name.eq_ignore_ascii_case("no-cache")
                || (name.eq_ignore_ascii_case("max-age") && argument.and_then(|a| a.parse::<u64>().ok()) == Some(0));
            if revalidate {
                directive = Self::Revalidate;
            }
        }
        directive
    }
}

/// What the `x-imagegate-cache` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// Headers of the upstream call that made an answer; a hit made no upstream call, so it does not replay them.
pub const NOT_REPLAYED: &[&str] = &[headers::X_UPSTREAM_REQUEST_ID, headers::OPENAI_PROCESSING_MS];

/// A cached answer: status, the headers worth replaying, and the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Bytes,
    /// Images in the body (`data[]`), counted once when stored so hits need not parse it again.
    #[serde(default)]
    pub images: Option<u32>,
}

/// Bytes an entry costs besides its body and headers: the key and the entry as moka keeps them (its hash
/// table slot, its access-order and write-order queue nodes, its timer-wheel node, the `Arc`s around key and
/// value), the `Entry` and the allocator's rounding of the body. Measured, not guessed: `tests/cache_memory.rs`
/// (`calibrate`) grows a cache by 20,000 entries of ~1 KB and reads the process's RSS; without headers an
/// entry took 1,712 to 1,843 bytes (over several runs) for a 1,043-byte body.
pub const ENTRY_OVERHEAD: usize = 768;

/// Bytes each replayed header costs besides its name and value: its slot in the `Vec` and the two `String`s'
/// heap chunks. Measured the same way: four headers (133 bytes of names and values) added 440 to 520 bytes.
pub const HEADER_OVERHEAD: usize = 88;

impl Answer {
    /// A whole upstream reply (streams never reach the cache; their body reads as empty).
    pub fn from_reply(reply: UpstreamReply) -> Self {
        let headers = reply
            .headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect();
        // A copy of exactly the body's size: the reply's bytes may share a larger read buffer, which the
        // cache's byte bound would not see.
        let body = match reply.body {
            ReplyBody::Full(body) => Bytes::copy_from_slice(&body),
            ReplyBody::Stream(_) => Bytes::new(),
        };
        let images = crate::images::usage::count_images(&body);
        Self { status: reply.status.as_u16(), headers, body, images }
    }

    /// Bytes it holds, as the byte bound counts them.
    pub fn weight(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD).sum();
        (self.body.len() + headers + ENTRY_OVERHEAD) as u64
    }

    /// The links (`data[].url`) in a JSON answer; `None` when the body is not a JSON object.
    fn links(&self) -> Option<Vec<String>> {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            data: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            #[serde(default)]
            url: Option<String>,
        }
        let body: Body = serde_json::from_slice(&self.body).ok()?;
        Some(body.data.into_iter().filter_map(|item| item.url).collect())
    }
}

/// Why an answer was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Not a 2xx answer.
    Status,
    /// Not a JSON object: nothing to tell its links by.
    NotJson,
    /// A link that is not one of imagegate's own signed links (re-hosting is off, or a failed download passed
    /// the upstream's expiring URL on).
    ForeignLink,
    /// Its links expire too soon to keep the minimum remaining life a hit guarantees.
    ShortLivedLinks,
    /// Larger than `cache.max_entry_bytes`.
    TooLarge,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "error_status",
            Self::NotJson => "not_json",
            Self::ForeignLink => "foreign_link",
            Self::ShortLivedLinks => "short_lived_links",
            Self::TooLarge => "too_large",
        }
    }
}

/// How long `answer` may be stored for `lookup`: its TTL, shortened so that the entry expires while every link
/// in it has at least `lookup.link_margin` left to live. `own_link_expiry` tells imagegate's own signed links
/// (returning their expiry, Unix seconds) from any other link (`None`); an answer with any other link is not
/// stored, since that link expires on the upstream's clock. Answers without links (base64) keep the full TTL.
pub fn storable_for(
    answer: &Answer,
    lookup: &Lookup,
    now: SystemTime,
    own_link_expiry: impl Fn(&str) -> Option<i64>,
) -> Result<Duration, NotStored> {
    if !(200..300).contains(&answer.status) {
        return Err(NotStored::Status);
    }
    let now_ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut ttl = lookup.ttl;
    for link in answer.links().ok_or(NotStored::NotJson)? {
        let expires_ms = own_link_expiry(&link)
            .and_then(|s| u128::try_from(s).ok())
            .ok_or(NotStored::ForeignLink)?
            .saturating_mul(1000);
        let left = Duration::from_millis(u64::try_from(expires_ms.saturating_sub(now_ms)).unwrap_or(u64::MAX));
        ttl = ttl.min(left.saturating_sub(lookup.link_margin));
    }
    if ttl.is_zero() { Err(NotStored::ShortLivedLinks) } else { Ok(ttl) }
}

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

/// Counters, for `GET /admin/v1/cache`.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    coalesced: AtomicU64,
    stores: AtomicU64,
    evictions: AtomicU64,
    shared_hits: AtomicU64,
    shared_errors: AtomicU64,
    shared_skipped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a Redis failure (`Unavailable`: not asked, the circuit is open).
    fn shared_failed(&self, error: &SharedError, doing: &'static str) {
        if matches!(error, SharedError::Unavailable) {
            Self::add(&self.shared_skipped);
        } else {
            Self::add(&self.shared_errors);
            tracing::warn!(error = %error, doing, "shared cache failed; going on without it");
        }
    }
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub enabled_by_default: bool,
    pub backend: &'static str,
    /// Requests answered from a stored entry (counted once the limits let them through).
    pub hits: u64,
    /// Requests whose own upstream call ran through the cache (`no-cache` refreshes included).
    pub misses: u64,
    pub bypasses: u64,
    /// Requests served by another identical request's upstream call, already in flight. Those given a stored
    /// answer also count in `hits`; those given an answer that was not stored (an error) count only here.
    pub coalesced: u64,
    pub stores: u64,
    /// Entries dropped to stay within `max_bytes` (expiries are not counted).
    pub evictions: u64,
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Answers found in Redis (and copied into this replica's memory).
    pub shared_hits: u64,
    /// Redis calls that failed or timed out.
    pub shared_errors: u64,
    /// Redis calls not made because Redis was down (the circuit was open).
    pub shared_skipped: u64,
    /// `up`, `connecting` or `down`; `null` without Redis.
    pub shared_state: Option<&'static str>,
}

/// What the cache stage decided for one request.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub key: Key,
    /// The tenant's TTL; an entry's own TTL may be shorter (see [`storable_for`]).
    pub ttl: Duration,
    /// The least life a hit's links must have left: half the image retention.
    pub link_margin: Duration,
    pub directive: Directive,
}

/// A finished upstream call with a 2xx answer, and whether (and for how long) it may be stored.
#[derive(Debug)]
pub struct Fetched {
    pub answer: Answer,
    pub store_for: Result<Duration, NotStored>,
}

/// A miss that did not produce a stored answer, shared with every coalesced waiter.
#[derive(Debug)]
pub enum Uncached {
    /// An answer that is not stored (an error status from the upstream, too large, foreign links, …).
    Answer(Answer),
    /// No answer: the gateway's own error (upstream unreachable, re-hosting failed, …).
    Error(ApiError),
    /// The leading caller's own limits refused the call before anything was sent. That answer is the
    /// leader's alone (it names the leader's tenant and limits): waiters try again, one of them leading.
    Refused(ApiError),
}

impl Uncached {
    /// One caller's own copy: the value itself when nobody else holds it (an internal error keeps its cause),
    /// else an equal one.
    pub fn take(shared: Arc<Self>) -> Self {
        Arc::try_unwrap(shared).unwrap_or_else(|shared| match shared.as_ref() {
            Self::Answer(answer) => Self::Answer(answer.clone()),
            Self::Error(e) => Self::Error(e.duplicate()),
            Self::Refused(e) => Self::Refused(e.duplicate()),
        })
    }
}

/// What an upstream call through the cache gave: the stored answer, or what was not stored.
pub type Served = Result<Answer, Arc<Uncached>>;

/// How a request that went through [`ResponseCache::get_or_fetch`] was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Its own upstream call ran: the miss that fills the entry (or a `no-cache` refresh).
    Fetched,
    /// Another identical request's upstream call, already in flight, answered it.
    Joined,
    /// An entry stored while it waited for the limits answered it.
    Found,
}

impl Role {
    /// The `x-imagegate-cache` of a request so answered: a hit only when the answer came from a stored entry.
    pub fn outcome(self, served: &Served) -> Outcome {
        match self {
            Self::Fetched => Outcome::Miss,
            Self::Found => Outcome::Hit,
            Self::Joined if served.is_ok() => Outcome::Hit,
            Self::Joined => Outcome::Miss,
        }
    }

    /// True when another request's upstream call (or entry) answered this one: it costs nothing.
    pub fn served_by_another(self) -> bool {
        self != Self::Fetched
    }
}

/// An upstream call in flight, awaited by its caller and by every identical request that joins it.
type Flight = Shared<BoxFuture<'static, Served>>;

/// A call about to be launched: what its callers await, and where its task sends the answer. A task that ends
/// without answering (a panic, the runtime shutting down) answers an internal error.
fn flight() -> (Flight, oneshot::Sender<Served>) {
    let (answer, answered) = oneshot::channel();
    let flight = async move {
        answered.await.unwrap_or_else(|_| {
            Err(Arc::new(Uncached::Error(ApiError::Internal(anyhow::anyhow!(
                "the upstream call's task ended without an answer"
            )))))
        })
    }
    .boxed()
    .shared();
    (flight, answer)
}

/// Calls in flight by key, with an id so that a finished call removes only itself.
type Flights = Arc<Mutex<HashMap<Key, (u64, Flight)>>>;

fn lock(flights: &Flights) -> MutexGuard<'_, HashMap<Key, (u64, Flight)>> {
    flights.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a call from the in-flight map when its task ends, however it ends (it is dropped on a panic or
/// when the runtime shuts down), so a key never stays stuck on a call that will not answer.
struct Landing {
    flights: Flights,
    key: Key,
    id: u64,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
        }
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
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let own = |link: &str| link.strip_prefix("https://gw/images/files/a.png?expires=").and_then(|e| e.parse().ok());
        let lookup = Lookup { ttl: Duration::from_secs(3600), link_margin: Duration::from_secs(10), ..lookup(1) };
        let b64 = json_answer(serde_json::json!({"data": [{"b64_json": "aGk="}]}));
        assert_eq!(storable_for(&b64, &lookup, now, own), Ok(Duration::from_secs(3600)), "base64 never expires");
        // A link living 20 s more: stored for 20 − 10 s, so a hit's link has at least 10 s left.
        let ours = json_answer(serde_json::json!({"data": [{"url": "https://gw/images/files/a.png?expires=1000020"}]}));
        assert_eq!(storable_for(&ours, &lookup, now, own), Ok(Duration::from_secs(10)));
        let short =
            json_answer(serde_json::json!({"data": [{"url": "https://gw/images/files/a.png?expires=1000009"}]}));
        assert_eq!(storable_for(&short, &lookup, now, own), Err(NotStored::ShortLivedLinks));
        let mixed = json_answer(serde_json::json!({"data": [
            {"url": "https://gw/images/files/a.png?expires=1000020"},
            {"url": "https://oaidalleapiprodscus.blob.core.windows.net/x.png?se=2026"},
        ]}));
        assert_eq!(storable_for(&mixed, &lookup, now, own), Err(NotStored::ForeignLink));
        let error = Answer { status: 500, ..b64.clone() };
        assert_eq!(storable_for(&error, &lookup, now, own), Err(NotStored::Status));
        assert_eq!(storable_for(&answer(3), &lookup, now, own), Err(NotStored::NotJson));
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
