//! The image pipeline: validate → authorise model → cache → limit → upstream → re-host → usage. No axum or
//! routing here; replies are the upstream's status, headers and body.
//!
//! Handlers build an [`ImageRequest`] and call [`ImagesService::handle`]; everything a request goes through
//! after authentication happens here, in this order. Re-hosting (`crate::rehost`) plans the caller's format
//! before the cache lookup and rewrites the answer after the upstream call; the response cache (`crate::cache`)
//! answers hits before the images are reserved, so a hit spends a request but no images.

pub mod imageinfo;
pub mod models;
pub mod multipart;
pub mod request;
pub mod usage;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};

use self::request::{Endpoint, ImageRequest};
use self::usage::UsageRecord;
use self::validate::ValidationPolicy;
use crate::cache::key::KeyParts;
use crate::cache::{self, Answer, Directive, Fetched, Lookup, Outcome, ResponseCache, Scope, Uncached};
use crate::error::{ApiError, Failure};
use crate::ledger::Ledger;
use crate::limits::{Demand, Denied, Limiter, Permit, Refusal};
use crate::pricing::Prices;
use crate::rehost::{Origin, Plan, Rehoster};
use crate::tenants::TenantContext;
use crate::upstream::{Attribution, ReplyBody, Upstream, UpstreamReply};

/// The 429 (or, fail-closed, 503) for a request the limits did not let through.
fn denied_error(tenant: &str, denied: Denied) -> ApiError {
    match denied {
        Denied::Unavailable(e) => ApiError::LimitsUnavailable(e.0),
        Denied::Refused(Refusal { reason, retry_after_ms, report }) => {
            let message = if reason.is_budget() {
                format!(
                    "Tenant '{tenant}' has spent its {} budget. It renews at the start of the next UTC {}.",
                    reason.describe(),
                    if matches!(reason, crate::limits::Reason::ImagesPerDay | crate::limits::Reason::UsdPerDay) {
                        "day"
                    } else {
                        "month"
                    }
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

/// Per-request facts from the HTTP edge the pipeline needs.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// imagegate's `x-request-id`.
    pub request_id: String,
    /// The caller's `Idempotency-Key`, forwarded unchanged.
    pub idempotency_key: Option<String>,
    /// The caller's `Cache-Control` directive.
    pub cache: Directive,
}

/// Owns the pipeline's collaborators. Cheap to clone (every collaborator is shared), so that an upstream call
/// through the cache can run in a task of its own.
#[derive(Clone)]
pub struct ImagesService {
    upstream: Arc<dyn Upstream>,
    policy: ValidationPolicy,
    prices: Arc<Prices>,
    ledger: Ledger,
    limiter: Limiter,
    rehoster: Arc<Rehoster>,
    cache: ResponseCache,
}

impl ImagesService {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        policy: ValidationPolicy,
        prices: Arc<Prices>,
        ledger: Ledger,
        limiter: Limiter,
        rehoster: Arc<Rehoster>,
        cache: ResponseCache,
    ) -> Self {
        Self { upstream, policy, prices, ledger, limiter, rehoster, cache }
    }

    /// The re-hoster, whose store also serves the links it hands out.
    pub fn rehoster(&self) -> &Arc<Rehoster> {
        &self.rehoster
    }

    /// Name of the configured upstream (`openai` or `mock`).
    pub fn upstream_name(&self) -> &'static str {
        self.upstream.name()
    }

    /// Run one request through the pipeline. Every outcome, refusals included, leaves one usage record.
    #[tracing::instrument(name = "images", skip_all, fields(endpoint = request.endpoint.name(), model, n, stream, cache))]
    pub async fn handle(
        &self,
        ctx: &TenantContext,
        request: ImageRequest,
        meta: RequestMeta,
    ) -> Result<UpstreamReply, Failure> {
        let started = Instant::now();
        // 1. Validate against the model's rules (structural checks happened while parsing).
        let validated = match validate::validate(&request, &self.policy) {
            Ok(v) => v,
            Err(e) => {
                let record = UsageRecord::start(ctx, &request, &meta.request_id, &request.model());
                self.ledger.record(record.finish(e.status().as_u16(), started));
                return Err(e.into());
            }
        };
        let span = tracing::Span::current();
        span.record("model", validated.model.as_str());
        span.record("n", validated.n);
        span.record("stream", validated.stream);
        let record = UsageRecord::start(ctx, &request, &meta.request_id, &validated.model);
        // 2. The tenant may use this model.
        if !ctx.tenant.allows_model(&validated.model) {
            let e = ApiError::PermissionDenied {
                message: format!("Tenant '{}' may not use model '{}'.", ctx.tenant.name, validated.model),
            };
            self.ledger.record(record.finish(e.status().as_u16(), started));
            return Err(e.into());
        }
        // The caller's format decides what goes upstream (GPT image models never see response_format) and is
        // part of the cache key.
        let (request, plan) = self.rehoster.plan(request, validated.family, &ctx.tenant);
        // 3. Cache: a hit is answered here, spending a request but no images.
        let lookup = self.cache_lookup(ctx, &request, &validated, plan.as_ref(), meta.cache);
        if let Some(lookup) = lookup.as_ref().filter(|l| l.directive == Directive::Normal)
            && let Some(answer) = self.cache.get(&lookup.key).await
        {
            span.record("cache", Outcome::Hit.as_str());
            let permit = self.acquire(ctx, Demand { images: 0 }, record.clone(), started).await?;
            self.cache.count_hit();
            let record = record.finish_cached(answer.status, answer.images, started);
            self.settle(record, ctx);
            return Ok(answer_reply(answer, &permit, Outcome::Hit));
        }
        // 4. Rate limits and quotas: reserve the request and its `n` images, all or nothing.
        let permit = self.acquire(ctx, Demand { images: validated.n }, record.clone(), started).await?;
        let Some(lookup) = lookup else {
            // 5–6. Upstream and re-hosting, uncached; 7. usage (streams are metered as their events pass).
            span.record("cache", Outcome::Bypass.as_str());
            let (mut reply, record) = self
                .fetch(ctx, &request, plan, &validated.model, &meta, record, started)
                .await
                .map_err(|e| with_outcome(e, Outcome::Bypass))?;
            set_cache_header(&mut reply.headers, Outcome::Bypass);
            return Ok(self.meter(reply, record, ctx, permit, started));
        };
        // 5–6 through the cache: one upstream call for every concurrent identical miss, run in a task of its own
        // that records the upstream's usage and stores the answer whatever happens to this caller. The others
        // are served by it and cost nothing.
        let fetch = self.cached_fetch(ctx, request, plan, &validated.model, &meta, &lookup, record.clone(), started);
        let (served, role) = self.cache.get_or_fetch(&lookup, fetch).await;
        let outcome = role.outcome(&served);
        span.record("cache", outcome.as_str());
        let by_another = role.served_by_another();
        match served.map_err(Uncached::take) {
            Ok(answer) => {
                if by_another {
                    self.settle(record.finish_cached(answer.status, answer.images, started), ctx);
                }
                Ok(answer_reply(answer, &permit, outcome))
            }
            Err(Uncached::Answer(answer)) => Ok(self.shared_answer(answer, by_another, record, ctx, &permit, started)),
            Err(Uncached::Error(e)) => {
                if by_another {
                    self.settle(record.finish(e.status().as_u16(), started), ctx);
                }
                Err(with_outcome(e, outcome))
            }
        }
    }

    /// The reply for an answer that was not stored (an upstream error, or a 2xx answer that may not be
    /// stored). A caller served by another's call records it at no cost, and not as a cache hit.
    fn shared_answer(
        &self,
        answer: Answer,
        by_another: bool,
        record: UsageRecord,
        ctx: &TenantContext,
        permit: &Permit,
        started: Instant,
    ) -> UpstreamReply {
        if by_another {
            let mut record = record.finish(answer.status, started);
            if (200..300).contains(&answer.status) {
                record.images_returned = answer.images;
            }
            self.settle(record, ctx);
        }
        answer_reply(answer, permit, Outcome::Miss)
    }

    /// Steps 5–6 for a request through the cache, as a task-ready future: the upstream call, re-hosting, the
    /// usage record of the call, and whether (for how long) the answer may be stored.
    #[expect(clippy::too_many_arguments, reason = "the pipeline's per-request state, passed explicitly")]
    fn cached_fetch(
        &self,
        ctx: &TenantContext,
        request: ImageRequest,
        plan: Option<Plan>,
        model: &str,
        meta: &RequestMeta,
        lookup: &Lookup,
        record: UsageRecord,
        started: Instant,
    ) -> impl Future<Output = Result<Fetched, Uncached>> + Send + 'static {
        let (this, ctx, model, meta, lookup) =
            (self.clone(), ctx.clone(), model.to_owned(), meta.clone(), lookup.clone());
        async move {
            let (reply, record) =
                this.fetch(&ctx, &request, plan, &model, &meta, record, started).await.map_err(Uncached::Error)?;
            this.settle(record.finish_reply(&reply, &this.prices, started), &ctx);
            let answer = Answer::from_reply(reply);
            if !(200..300).contains(&answer.status) {
                return Err(Uncached::Answer(answer));
            }
            let store_for = cache::storable_for(&answer, &lookup, std::time::SystemTime::now(), |link| {
                this.rehoster.own_link_expiry(link)
            });
            Ok(Fetched { answer, store_for })
        }
    }

    /// Which cache entry this request may use, or `None` when it bypasses the cache (streams, `no-store`,
    /// or a tenant whose cache is off).
    fn cache_lookup(
        &self,
        ctx: &TenantContext,
        request: &ImageRequest,
        validated: &validate::Validated,
        plan: Option<&Plan>,
        directive: Directive,
    ) -> Option<Lookup> {
        let policy = self.cache.policy_for(&ctx.tenant);
        let Some((ttl, scope)) = policy.filter(|_| !validated.stream && directive != Directive::Bypass) else {
            self.cache.count_bypass();
            return None;
        };
        let scope = match scope {
            Scope::Tenant => ctx.tenant.id.as_str(),
            Scope::Shared => "shared",
        };
        let retention = plan.map(|p| p.retention);
        let parts = KeyParts {
            scope,
            model: &validated.model,
            family: validated.family,
            want: plan.and_then(|p| p.want),
            retention,
        };
        // A hit's links have at least half the retention left: entries expire that long before their links.
        let link_margin = retention.unwrap_or_default() / 2;
        Some(Lookup { key: cache::key::key(parts, request), ttl, link_margin, directive })
    }

    /// Reserve `demand` from the tenant's limits; a refusal is recorded and returned.
    async fn acquire(
        &self,
        ctx: &TenantContext,
        demand: Demand,
        record: UsageRecord,
        started: Instant,
    ) -> Result<Permit, ApiError> {
        match self.limiter.acquire(&ctx.tenant.id, &ctx.tenant.limits, demand).await {
            Ok(permit) => Ok(permit),
            Err(denied) => {
                let e = denied_error(&ctx.tenant.name, denied);
                self.ledger.record(record.finish(e.status().as_u16(), started));
                Err(e)
            }
        }
    }

    /// Steps 5 and 6: the upstream call, then re-hosting of a successful whole answer. Failures are recorded
    /// here (a failed re-host keeps the images' cost: the upstream billed them); on success the record is
    /// handed back unfinished, to be metered with the reply.
    #[expect(clippy::too_many_arguments, reason = "the pipeline's per-request state, passed explicitly")]
    async fn fetch(
        &self,
        ctx: &TenantContext,
        request: &ImageRequest,
        plan: Option<Plan>,
        model: &str,
        meta: &RequestMeta,
        record: UsageRecord,
        started: Instant,
    ) -> Result<(UpstreamReply, UsageRecord), ApiError> {
        let attribution = Attribution {
            organization: ctx.tenant.organization.clone(),
            project: ctx.tenant.project.clone(),
            idempotency_key: meta.idempotency_key.clone(),
        };
        let reply = match self.upstream.send(request, &attribution).await {
            Ok(reply) => reply,
            Err(e) => {
                let e = ApiError::from(e);
                self.ledger.record(record.finish(e.status().as_u16(), started));
                return Err(e);
            }
        };
        if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
            // The upstream's limit, not the tenant's: passed on as it is, and told apart in the logs.
            tracing::warn!(kind = "upstream.rate_limited", "the upstream answered 429");
        }
        let (Some(plan), UpstreamReply { status, headers, body: ReplyBody::Full(body) }) = (plan, &reply) else {
            return Ok((reply, record));
        };
        if !status.is_success() {
            return Ok((reply, record));
        }
        let origin = Origin { tenant_id: &ctx.tenant.id, model, request_id: &meta.request_id };
        match self.rehoster.apply(&plan, body, origin).await {
            Ok(None) => Ok((reply, record)),
            Ok(Some(rewritten)) => {
                let reply =
                    UpstreamReply { status: *status, headers: headers.clone(), body: ReplyBody::Full(rewritten) };
                Ok((reply, record))
            }
            Err(e) => {
                let e = match e {
                    crate::rehost::RehostError::Store(inner) => {
                        ApiError::Internal(anyhow::anyhow!("storing a re-hosted image failed: {inner}"))
                    }
                    other => ApiError::RehostFailed(other.to_string()),
                };
                let mut record = record.finish_reply(&reply, &self.prices, started);
                record.status = e.status().as_u16();
                self.settle(record, ctx);
                Err(e)
            }
        }
    }

    /// The cache's counters (for the admin API) and its purge.
    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// Book a finished record: spend its cost from the tenant's budgets and queue it for the ledger.
    fn settle(&self, record: UsageRecord, ctx: &TenantContext) {
        self.limiter.spend(&ctx.tenant.id, &ctx.tenant.limits, record.cost_usd);
        self.ledger.record(record);
    }

    /// Record a request refused before it reached the pipeline (unreadable body): it costs nothing.
    pub fn record_refusal(&self, ctx: &TenantContext, endpoint: Endpoint, request_id: &str, status: u16) {
        let mut record = UsageRecord::start(ctx, &ImageRequest::empty(endpoint), request_id, endpoint.default_model());
        record.model = "unknown".to_owned();
        self.ledger.record(record.finish(status, Instant::now()));
    }

    fn meter(
        &self,
        mut reply: UpstreamReply,
        record: UsageRecord,
        ctx: &TenantContext,
        permit: Permit,
        started: Instant,
    ) -> UpstreamReply {
        crate::limits::headers::apply(&permit.report, &mut reply.headers);
        let (ledger, limiter, tenant) = (self.ledger.clone(), self.limiter.clone(), ctx.tenant.clone());
        let done = move |record: UsageRecord| {
            limiter.spend(&tenant.id, &tenant.limits, record.cost_usd);
            ledger.record(record);
        };
        match reply.body {
            ReplyBody::Stream(stream) if reply.status.is_success() => {
                // The concurrency slot is held until the stream ends.
                let body =
                    usage::meter_stream(stream, record, self.prices.clone(), Box::new(done), permit.slot, started);
                UpstreamReply { body: ReplyBody::Stream(body), ..reply }
            }
            _ => {
                done(record.finish_reply(&reply, &self.prices, started));
                reply
            }
        }
    }
}

/// A reply built from a cached (or coalesced) answer, with this request's own rate-limit headers. A hit made
/// no upstream call: it does not replay the headers of the call that made the answer.
fn answer_reply(answer: Answer, permit: &Permit, outcome: Outcome) -> UpstreamReply {
    let mut headers = HeaderMap::new();
    for (name, value) in &answer.headers {
        if outcome == Outcome::Hit && cache::NOT_REPLAYED.contains(&name.as_str()) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
    crate::limits::headers::apply(&permit.report, &mut headers);
    set_cache_header(&mut headers, outcome);
    let status = http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::OK);
    UpstreamReply { status, headers, body: ReplyBody::Full(answer.body) }
}

fn set_cache_header(headers: &mut HeaderMap, outcome: Outcome) {
    headers.insert(crate::wire::headers::X_IMAGEGATE_CACHE, HeaderValue::from_static(outcome.as_str()));
}

/// A gateway error raised after the cache decision, carrying that decision.
fn with_outcome(error: ApiError, outcome: Outcome) -> Failure {
    let mut headers = HeaderMap::new();
    set_cache_header(&mut headers, outcome);
    Failure::with_headers(error, headers)
}
