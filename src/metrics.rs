//! Prometheus metrics: every metric's name (spelt once, in [`names`]), its labels, and the per-gateway
//! registry that `/metrics` renders. `docs/observability.md` lists them all with their meaning. `facts` holds
//! what one request turned out to be, for its access-log line and its request metrics.
//!
//! A leaf: it imports nothing of the crate, so every layer can count into it.
//!
//! One [`Metrics`] per gateway (not a process-wide recorder), so several gateways in one process (the tests)
//! each count their own traffic.
//!
//! Label values are bounded: routes are templates, models are the known model ids or `other`, tenants are the
//! tenants an administrator created, statuses are classes, kinds and reasons are closed sets. Prompts, keys,
//! request ids and anything else a caller chooses freely never become a label value.
//!
//! Counters that modules already keep (the response cache, the limits, the usage ledger; the admin API shows
//! them) are not counted twice: at each scrape their snapshot ([`Snapshot`]) is copied into the exported
//! counters.

pub mod facts;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The exposed name of every metric. Counters end in `_total` as exposed (the registry adds the suffix).
pub mod names {
    /// Requests answered, by route template, method, status class, tenant and model.
    pub const HTTP_REQUESTS: &str = "imagegate_http_requests_total";
    /// Whole-request latency up to the response headers, by route, model and status class.
    pub const HTTP_REQUEST_DURATION: &str = "imagegate_http_request_duration_seconds";
    /// Requests being answered now.
    pub const HTTP_REQUESTS_IN_FLIGHT: &str = "imagegate_http_requests_in_flight";
    /// Images returned to callers, by tenant, model and source (`upstream` or `cache`).
    pub const IMAGES: &str = "imagegate_images_total";
    /// Tokens the upstream reported, by tenant, model and direction (`input` or `output`).
    pub const TOKENS: &str = "imagegate_tokens_total";
    /// Estimated cost in USD, by tenant and model.
    pub const COST_USD: &str = "imagegate_cost_usd_total";
    /// Upstream call latency up to the answer's headers, by upstream, endpoint and outcome.
    pub const UPSTREAM_REQUEST_DURATION: &str = "imagegate_upstream_request_duration_seconds";
    /// Upstream calls that failed, by upstream and kind.
    pub const UPSTREAM_ERRORS: &str = "imagegate_upstream_errors_total";
    /// Bytes of images stored by re-hosting.
    pub const REHOST_BYTES: &str = "imagegate_rehost_bytes_total";
    /// Images stored by re-hosting.
    pub const REHOST_IMAGES: &str = "imagegate_rehost_images_total";
    /// Time to re-host one answer (download or decode, then store), by outcome.
    pub const REHOST_DURATION: &str = "imagegate_rehost_duration_seconds";
    /// Response-cache outcomes, by outcome (`hit`, `miss`, `bypass`, `coalesced`).
    pub const CACHE_REQUESTS: &str = "imagegate_cache_requests_total";
    /// Answers stored in the response cache.
    pub const CACHE_STORES: &str = "imagegate_cache_stores_total";
    /// Entries dropped to keep the cache within `cache.max_bytes`.
    pub const CACHE_EVICTIONS: &str = "imagegate_cache_evictions_total";
    /// Entries and bytes held in this replica's memory.
    pub const CACHE_ENTRIES: &str = "imagegate_cache_entries";
    pub const CACHE_BYTES: &str = "imagegate_cache_bytes";
    /// Requests refused by a tenant's limits, by reason.
    pub const LIMIT_REFUSALS: &str = "imagegate_limit_refusals_total";
    /// Requests let through unenforced because the limits backend did not answer (fail-open).
    pub const LIMIT_FAIL_OPEN: &str = "imagegate_limit_passed_fail_open_total";
    /// Reservations not finished yet (requests and streams in flight).
    pub const LIMIT_IN_FLIGHT: &str = "imagegate_limit_reservations_in_flight";
    /// Failed or timed-out Redis calls, by component (`limits`, `cache`).
    pub const REDIS_ERRORS: &str = "imagegate_redis_errors_total";
    /// Failed database calls, by component (`ledger`, `limits`).
    pub const DATABASE_ERRORS: &str = "imagegate_database_errors_total";
    /// Usage rows waiting in the ledger's queue.
    pub const LEDGER_QUEUE_DEPTH: &str = "imagegate_ledger_queue_depth";
    /// The queue's capacity (`usage.queue_capacity`).
    pub const LEDGER_QUEUE_CAPACITY: &str = "imagegate_ledger_queue_capacity";
    /// Usage rows by outcome (`written`, `rejected`, `dropped`).
    pub const LEDGER_ROWS: &str = "imagegate_ledger_rows_total";
    /// Time to write one batch of usage rows.
    pub const LEDGER_BATCH_DURATION: &str = "imagegate_ledger_batch_duration_seconds";
    /// Database lookups of tenant keys not in the key cache, by result (`found`, `unknown`, `failed`).
    pub const KEY_LOOKUPS: &str = "imagegate_key_lookups_total";
    /// The running version (value 1).
    pub const BUILD_INFO: &str = "imagegate_build_info";
}

/// Buckets for image generation: 100 ms to 10 minutes.
pub const REQUEST_BUCKETS: [f64; 14] =
    [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0];
/// Buckets for re-hosting (downloads and object-store writes): 10 ms to 2 minutes.
pub const REHOST_BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 120.0];
/// Buckets for database batches: 1 ms to 10 s.
pub const BATCH_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The `model` label value for models the catalog does not know (see [`Metrics::model_label`]).
pub const OTHER: &str = "other";

/// `2xx`, `4xx`, `5xx` (and `1xx`/`3xx`).
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: &'static str,
    tenant: String,
    model: String,
}

/// The labels of [`RequestLabels`] and [`DurationLabels`] together, owned: the key of `request_handles`.
#[derive(Hash, PartialEq, Eq)]
struct RequestKey {
    route: String,
    method: String,
    status: &'static str,
    tenant: String,
    model: String,
}

/// The same labels borrowed from the request, to look the handles up without allocating. Its `Hash` is
/// [`RequestKey`]'s: the same fields in the same order, and `&str` hashes as `String` does.
#[derive(Hash)]
struct RequestKeyRef<'a> {
    route: &'a str,
    method: &'a str,
    status: &'static str,
    tenant: &'a str,
    model: &'a str,
}

impl RequestKeyRef<'_> {
    fn owned(&self) -> RequestKey {
        RequestKey {
            route: self.route.to_owned(),
            method: self.method.to_owned(),
            status: self.status,
            tenant: self.tenant.to_owned(),
            model: self.model.to_owned(),
        }
    }
}

impl indexmap::Equivalent<RequestKey> for RequestKeyRef<'_> {
    fn equivalent(&self, key: &RequestKey) -> bool {
        self.route == key.route
            && self.method == key.method
            && self.status == key.status
            && self.tenant == key.tenant
            && self.model == key.model
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    route: String,
    model: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabels {
    tenant: String,
    model: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    tenant: String,
    model: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantModel {
    tenant: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamCall {
    upstream: String,
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamError {
    upstream: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabel {
    component: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatCounter = Counter<f64, AtomicU64>;

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

fn rehost_histogram() -> Histogram {
    Histogram::new(REHOST_BUCKETS)
}

/// What one finished request cost, as the usage ledger records it.
#[derive(Debug, Clone, Copy)]
pub struct UsageSample<'a> {
    pub tenant: &'a str,
    /// The model as recorded (bounded by [`Metrics::model_label`]).
    pub model: &'a str,
    pub images: u32,
    /// Served from the response cache (or another request's upstream call): no images were generated for it.
    pub cached: bool,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cost_usd: f64,
}

/// One answered request, as the access layer sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestSample<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub tenant: &'a str,
    /// The model as recorded (bounded by [`Metrics::model_label`]), empty when the request named none.
    pub model: &'a str,
    pub elapsed: Duration,
}

/// What the counters kept by other modules say now, copied into the exported metrics at each scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `(outcome, count)`: `hit`, `miss`, `bypass`, `coalesced`.
    pub cache_requests: Vec<(&'static str, u64)>,
    pub cache_stores: u64,
    pub cache_evictions: u64,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub cache_redis_errors: u64,
    /// `(reason, count)`, every reason the limits know.
    pub limit_refusals: Vec<(&'static str, u64)>,
    pub limit_fail_open: u64,
    pub limit_in_flight: u64,
    /// Limits backend errors, under `redis` or `database` by the backend in use.
    pub limit_backend_errors: u64,
    pub limit_backend_is_redis: bool,
    pub ledger_written: u64,
    pub ledger_rejected: u64,
    pub ledger_dropped: u64,
    pub ledger_queue_depth: u64,
    pub ledger_queue_capacity: u64,
    /// `(result, count)`: database lookups of tenant keys, `found`, `unknown`, `failed`.
    pub key_lookups: Vec<(&'static str, u64)>,
}

/// Every metric of one gateway.
pub struct Metrics {
    registry: Registry,
    /// The model ids that are label values as they are (the catalog's); any other is [`OTHER`].
    models: std::collections::HashSet<String>,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: Histograms<DurationLabels>,
    /// The two series above per label set, found by borrowed labels (see [`RequestKey`]).
    request_handles:
        std::sync::RwLock<indexmap::IndexMap<RequestKey, (Counter, Histogram), foldhash::fast::RandomState>>,
    in_flight: Gauge,
    images: Family<ImageLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<TenantModel, FloatCounter>,
    upstream_duration: Histograms<UpstreamCall>,
    upstream_errors: Family<UpstreamError, Counter>,
    rehost_bytes: Counter,
    rehost_images: Counter,
    rehost_duration: Histograms<OutcomeLabel>,
    cache_requests: Family<OutcomeLabel, Counter>,
    cache_stores: Counter,
    cache_evictions: Counter,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    limit_refusals: Family<ReasonLabel, Counter>,
    limit_fail_open: Counter,
    limit_in_flight: Gauge,
    redis_errors: Family<ComponentLabel, Counter>,
    database_errors: Family<ComponentLabel, Counter>,
    /// Database errors counted here directly (the ledger's failed writes); the limits' come from snapshots.
    ledger_db_errors: AtomicU64,
    ledger_queue_depth: Gauge,
    ledger_queue_capacity: Gauge,
    ledger_rows: Family<OutcomeLabel, Counter>,
    ledger_batch: Histogram,
    key_lookups: Family<ResultLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(std::iter::empty::<String>())
    }
}

/// Register `metric` under its exposed `name` (the registry adds `_total` to counters itself).
fn register(registry: &mut Registry, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    let name = name.strip_suffix("_total").unwrap_or(name);
    registry.register(name, help, metric);
}

impl Metrics {
    /// Metrics whose `model` label takes the values `models` (the catalog's ids; a deployment's own models
    /// are configured by its operator, so they are few) and [`OTHER`] for anything else a caller sends.
    pub fn new<S: Into<String>>(models: impl IntoIterator<Item = S>) -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Registry::default(),
            models: models.into_iter().map(Into::into).collect(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(request_histogram),
            request_handles: std::sync::RwLock::default(),
            in_flight: Gauge::default(),
            images: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            upstream_duration: Family::new_with_constructor(request_histogram),
            upstream_errors: Family::default(),
            rehost_bytes: Counter::default(),
            rehost_images: Counter::default(),
            rehost_duration: Family::new_with_constructor(rehost_histogram),
            cache_requests: Family::default(),
            cache_stores: Counter::default(),
            cache_evictions: Counter::default(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            limit_refusals: Family::default(),
            limit_fail_open: Counter::default(),
            limit_in_flight: Gauge::default(),
            redis_errors: Family::default(),
            database_errors: Family::default(),
            ledger_db_errors: AtomicU64::new(0),
            ledger_queue_depth: Gauge::default(),
            ledger_queue_capacity: Gauge::default(),
            ledger_rows: Family::default(),
            ledger_batch: Histogram::new(BATCH_BUCKETS),
            key_lookups: Family::default(),
        };
        use names as n;
        register(&mut r, n::HTTP_REQUESTS, "Requests answered", m.http_requests.clone());
        register(
            &mut r,
            n::HTTP_REQUEST_DURATION,
            "Whole-request latency up to the response headers",
            m.http_duration.clone(),
        );
        register(&mut r, n::HTTP_REQUESTS_IN_FLIGHT, "Requests being answered now", m.in_flight.clone());
        register(&mut r, n::IMAGES, "Images returned to callers", m.images.clone());
        register(&mut r, n::TOKENS, "Tokens reported by the upstream", m.tokens.clone());
        register(&mut r, n::COST_USD, "Estimated cost in USD", m.cost.clone());
        register(
            &mut r,
            n::UPSTREAM_REQUEST_DURATION,
            "Upstream call latency up to its headers",
            m.upstream_duration.clone(),
        );
        register(&mut r, n::UPSTREAM_ERRORS, "Upstream calls that failed", m.upstream_errors.clone());
        register(&mut r, n::REHOST_BYTES, "Bytes of images stored by re-hosting", m.rehost_bytes.clone());
        register(&mut r, n::REHOST_IMAGES, "Images stored by re-hosting", m.rehost_images.clone());
        register(&mut r, n::REHOST_DURATION, "Time to re-host one answer", m.rehost_duration.clone());
        register(&mut r, n::CACHE_REQUESTS, "Response-cache outcomes", m.cache_requests.clone());
        register(&mut r, n::CACHE_STORES, "Answers stored in the response cache", m.cache_stores.clone());
        register(
            &mut r,
            n::CACHE_EVICTIONS,
            "Cache entries evicted to stay within max_bytes",
            m.cache_evictions.clone(),
        );
        register(&mut r, n::CACHE_ENTRIES, "Cache entries held in memory", m.cache_entries.clone());
        register(&mut r, n::CACHE_BYTES, "Bytes held by the response cache in memory", m.cache_bytes.clone());
        register(&mut r, n::LIMIT_REFUSALS, "Requests refused by a tenant's limits", m.limit_refusals.clone());
        register(
            &mut r,
            n::LIMIT_FAIL_OPEN,
            "Requests let through because the limits backend failed",
            m.limit_fail_open.clone(),
        );
        register(&mut r, n::LIMIT_IN_FLIGHT, "Limit reservations not finished yet", m.limit_in_flight.clone());
        register(&mut r, n::REDIS_ERRORS, "Failed or timed-out Redis calls", m.redis_errors.clone());
        register(&mut r, n::DATABASE_ERRORS, "Failed database calls", m.database_errors.clone());
        register(&mut r, n::LEDGER_QUEUE_DEPTH, "Usage rows waiting to be written", m.ledger_queue_depth.clone());
        register(
            &mut r,
            n::LEDGER_QUEUE_CAPACITY,
            "Usage rows the queue holds at most",
            m.ledger_queue_capacity.clone(),
        );
        register(&mut r, n::LEDGER_ROWS, "Usage rows by outcome", m.ledger_rows.clone());
        register(&mut r, n::LEDGER_BATCH_DURATION, "Time to write one batch of usage rows", m.ledger_batch.clone());
        register(&mut r, n::KEY_LOOKUPS, "Database lookups of tenant keys not in the key cache", m.key_lookups.clone());
        // A gauge of 1 rather than OpenMetrics' `info` type, which the classic text format does not know.
        let info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))]).set(1);
        register(&mut r, n::BUILD_INFO, "The running version (always 1)", info);
        Self { registry: r, ..m }
    }

    /// The `model` label of `model`: itself when the catalog knows it, else [`OTHER`]; empty stays empty.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if model.is_empty() || self.models.contains(model) { model } else { OTHER }
    }

    /// A request has started: counted in flight until the guard is dropped (answered, or the caller left).
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// A request has been answered (its response headers are ready).
    pub fn request_done(&self, s: RequestSample<'_>) {
        let status = status_class(s.status);
        let model = self.model_label(s.model);
        let key = RequestKeyRef { route: s.route, method: s.method, status, tenant: s.tenant, model };
        let seconds = s.elapsed.as_secs_f64();
        if let Ok(handles) = self.request_handles.read()
            && let Some((count, duration)) = handles.get(&key)
        {
            count.inc();
            duration.observe(seconds);
            return;
        }
        // A label set seen for the first time: its series are made (or found) in the families, and their
        // handles kept (they share the families' values), so later requests allocate no label strings.
        let count = self
            .http_requests
            .get_or_create(&RequestLabels {
                route: s.route.to_owned(),
                method: s.method.to_owned(),
                status,
                tenant: s.tenant.to_owned(),
                model: model.to_owned(),
            })
            .clone();
        let duration = self
            .http_duration
            .get_or_create(&DurationLabels { route: s.route.to_owned(), model: model.to_owned(), status })
            .clone();
        count.inc();
        duration.observe(seconds);
        if let Ok(mut handles) = self.request_handles.write() {
            handles.insert(key.owned(), (count, duration));
        }
    }

    /// One usage record: images, tokens and cost by tenant and model.
    pub fn usage(&self, u: UsageSample<'_>) {
        let (tenant, model) = (u.tenant.to_owned(), self.model_label(u.model).to_owned());
        if u.images > 0 {
            let source = if u.cached { "cache" } else { "upstream" };
            let labels = ImageLabels { tenant: tenant.clone(), model: model.clone(), source };
            self.images.get_or_create(&labels).inc_by(u64::from(u.images));
        }
        for (direction, tokens) in [("input", u.input_tokens), ("output", u.output_tokens)] {
            if let Some(t) = tokens.filter(|t| *t > 0) {
                let labels = TokenLabels { tenant: tenant.clone(), model: model.clone(), direction };
                self.tokens.get_or_create(&labels).inc_by(t);
            }
        }
        if u.cost_usd > 0.0 && u.cost_usd.is_finite() {
            self.cost.get_or_create(&TenantModel { tenant, model }).inc_by(u.cost_usd);
        }
    }

    /// One upstream call: its latency by outcome, and its failure by kind. `outcome` is a status class, or the
    /// error kind when no answer came.
    pub fn upstream_call(&self, upstream: &str, endpoint: &'static str, outcome: UpstreamOutcome, elapsed: Duration) {
        let upstream = upstream.to_owned();
        self.upstream_duration
            .get_or_create(&UpstreamCall { upstream: upstream.clone(), endpoint, outcome: outcome.as_str() })
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = outcome.error_kind() {
            self.upstream_errors.get_or_create(&UpstreamError { upstream, kind }).inc();
        }
    }

    /// One answer re-hosted (or not, on error): how long it took, how many images and bytes were stored.
    pub fn rehosted(&self, ok: bool, images: u64, bytes: u64, elapsed: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.rehost_duration.get_or_create(&OutcomeLabel { outcome }).observe(elapsed.as_secs_f64());
        self.rehost_images.inc_by(images);
        self.rehost_bytes.inc_by(bytes);
    }

    /// One batch of usage rows written (or given up on) in `elapsed`.
    pub fn ledger_batch(&self, elapsed: Duration) {
        self.ledger_batch.observe(elapsed.as_secs_f64());
    }

    /// The ledger's database refused or failed a write.
    pub fn ledger_database_error(&self) {
        self.ledger_db_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Render every metric in the OpenMetrics text format (which Prometheus reads), after copying `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        self.copy(snapshot);
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        out
    }

    fn copy(&self, s: &Snapshot) {
        let set = |c: &Counter, v: u64| c.inner().store(v, Ordering::Relaxed);
        for (outcome, v) in &s.cache_requests {
            set(&self.cache_requests.get_or_create(&OutcomeLabel { outcome }), *v);
        }
        set(&self.cache_stores, s.cache_stores);
        set(&self.cache_evictions, s.cache_evictions);
        self.cache_entries.set(clamp(s.cache_entries));
        self.cache_bytes.set(clamp(s.cache_bytes));
        for (reason, v) in &s.limit_refusals {
            set(&self.limit_refusals.get_or_create(&ReasonLabel { reason }), *v);
        }
        set(&self.limit_fail_open, s.limit_fail_open);
        self.limit_in_flight.set(clamp(s.limit_in_flight));
        let (limits_redis, limits_db) =
            if s.limit_backend_is_redis { (s.limit_backend_errors, 0) } else { (0, s.limit_backend_errors) };
        set(&self.redis_errors.get_or_create(&ComponentLabel { component: "limits" }), limits_redis);
        set(&self.redis_errors.get_or_create(&ComponentLabel { component: "cache" }), s.cache_redis_errors);
        set(&self.database_errors.get_or_create(&ComponentLabel { component: "limits" }), limits_db);
        let ledger_db = self.ledger_db_errors.load(Ordering::Relaxed);
        set(&self.database_errors.get_or_create(&ComponentLabel { component: "ledger" }), ledger_db);
        for (outcome, v) in
            [("written", s.ledger_written), ("rejected", s.ledger_rejected), ("dropped", s.ledger_dropped)]
        {
            set(&self.ledger_rows.get_or_create(&OutcomeLabel { outcome }), v);
        }
        self.ledger_queue_depth.set(clamp(s.ledger_queue_depth));
        self.ledger_queue_capacity.set(clamp(s.ledger_queue_capacity));
        for (result, v) in &s.key_lookups {
            set(&self.key_lookups.get_or_create(&ResultLabel { result }), *v);
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A request counted in [`names::HTTP_REQUESTS_IN_FLIGHT`] until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How an upstream call ended, for [`Metrics::upstream_call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// An answer with this status.
    Status(u16),
    /// No answer: connect, TLS or reset failures.
    Unavailable,
    /// No answer within the deadline.
    Timeout,
}

impl UpstreamOutcome {
    /// The `outcome` label: a status class, `unavailable` or `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status(s) => status_class(s),
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
        }
    }

    /// The `kind` of [`names::UPSTREAM_ERRORS`], for calls that failed: `rate_limited` (429),
    /// `server_error` (5xx), `refused` (other 4xx, e.g. a content-policy refusal), `unavailable`, `timeout`.
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            Self::Status(429) => Some("rate_limited"),
            Self::Status(s) if s >= 500 => Some("server_error"),
            Self::Status(s) if s >= 400 => Some("refused"),
            Self::Status(_) => None,
            Self::Unavailable => Some("unavailable"),
            Self::Timeout => Some("timeout"),
        }
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        prometheus_parse::Scrape::parse(lines).unwrap()
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => Some(v),
                prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    #[test]
    fn models_the_catalog_does_not_know_share_one_label_value_so_callers_cannot_grow_the_series() {
        let m = Metrics::new(["gpt-image-1", "dall-e-3"]);
        assert_eq!(m.model_label("gpt-image-1"), "gpt-image-1");
        assert_eq!(m.model_label("dall-e-3"), "dall-e-3");
        assert_eq!(m.model_label("my-own-model-123"), OTHER);
        assert_eq!(m.model_label("ig_secret_key_pasted_as_model"), OTHER);
        assert_eq!(m.model_label(""), "");
    }

    #[test]
    fn requests_count_into_their_own_label_set_however_often_the_set_repeats() {
        let m = Metrics::new(["gpt-image-1"]);
        let sample = RequestSample {
            route: "/v1/images/generations",
            method: "POST",
            status: 200,
            tenant: "team-a",
            model: "gpt-image-1",
            elapsed: Duration::from_millis(20),
        };
        for _ in 0..3 {
            m.request_done(sample);
        }
        m.request_done(RequestSample { tenant: "team-b", ..sample });
        m.request_done(RequestSample { status: 429, ..sample });
        m.request_done(RequestSample { model: "someone-elses-model", ..sample });
        let s = parse(&m.render(&Snapshot::default()));
        let count = |tenant: &str, status: &str, model: &str| {
            let labels =
                [("tenant", tenant), ("status", status), ("model", model), ("route", "/v1/images/generations")];
            value(&s, names::HTTP_REQUESTS, &labels)
        };
        assert_eq!(count("team-a", "2xx", "gpt-image-1"), Some(3.0));
        assert_eq!(count("team-b", "2xx", "gpt-image-1"), Some(1.0));
        assert_eq!(count("team-a", "4xx", "gpt-image-1"), Some(1.0));
        assert_eq!(count("team-a", "2xx", OTHER), Some(1.0));
        let seconds = s.samples.iter().filter(|x| x.metric == names::HTTP_REQUEST_DURATION).count();
        assert_eq!(seconds, 3, "one latency series per route, model and status class");
    }

    #[test]
    fn usage_counts_images_by_source_tokens_by_direction_and_cost_by_tenant_and_model() {
        let m = Metrics::new(["gpt-image-1"]);
        let base = UsageSample {
            tenant: "team-a",
            model: "gpt-image-1",
            images: 2,
            cached: false,
            input_tokens: Some(10),
            output_tokens: Some(4160),
            cost_usd: 0.5,
        };
        m.usage(base);
        m.usage(UsageSample {
            images: 1,
            cached: true,
            input_tokens: None,
            output_tokens: None,
            cost_usd: 0.0,
            ..base
        });
        let s = parse(&m.render(&Snapshot::default()));
        let images = |source| value(&s, names::IMAGES, &[("tenant", "team-a"), ("source", source)]);
        assert_eq!(images("upstream"), Some(2.0));
        assert_eq!(images("cache"), Some(1.0));
        assert_eq!(value(&s, names::TOKENS, &[("direction", "output")]), Some(4160.0));
        assert_eq!(value(&s, names::COST_USD, &[("tenant", "team-a"), ("model", "gpt-image-1")]), Some(0.5));
    }

    #[test]
    fn snapshots_replace_rather_than_add_so_scraping_twice_counts_nothing_twice() {
        let m = Metrics::default();
        let snap = Snapshot {
            cache_requests: vec![("hit", 3), ("miss", 1)],
            limit_refusals: vec![("requests_per_minute", 2)],
            ledger_written: 7,
            ..Snapshot::default()
        };
        m.render(&snap);
        let s = parse(&m.render(&snap));
        assert_eq!(value(&s, names::CACHE_REQUESTS, &[("outcome", "hit")]), Some(3.0));
        assert_eq!(value(&s, names::LIMIT_REFUSALS, &[("reason", "requests_per_minute")]), Some(2.0));
        assert_eq!(value(&s, names::LEDGER_ROWS, &[("outcome", "written")]), Some(7.0));
    }

    #[test]
    fn upstream_failures_are_counted_by_kind_and_successes_are_not() {
        let m = Metrics::default();
        let took = Duration::from_millis(1500);
        m.upstream_call("default", "generations", UpstreamOutcome::Status(200), took);
        m.upstream_call("default", "generations", UpstreamOutcome::Status(429), took);
        m.upstream_call("default", "generations", UpstreamOutcome::Status(429), took);
        m.upstream_call("azure", "edits", UpstreamOutcome::Timeout, took);
        let s = parse(&m.render(&Snapshot::default()));
        assert_eq!(value(&s, names::UPSTREAM_ERRORS, &[("upstream", "default"), ("kind", "rate_limited")]), Some(2.0));
        assert_eq!(value(&s, names::UPSTREAM_ERRORS, &[("upstream", "azure"), ("kind", "timeout")]), Some(1.0));
        assert_eq!(value(&s, names::UPSTREAM_ERRORS, &[("kind", "server_error")]), None);
    }
}
