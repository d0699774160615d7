//! The image pipeline: validate → authorise model → cache → limit → upstream → re-host → usage. No axum or
//! routing here; replies are the upstream's status, headers and body.
//!
//! Handlers build an [`ImageRequest`] and call [`ImagesService::handle`]; everything a request goes through
//! after authentication happens here, in this order. Re-hosting (`crate::rehost`) plans the caller's format
//! before the cache lookup and rewrites the answer after the upstream call; the response cache (`crate::cache`)
//! answers hits before the images are reserved, so a hit spends a request but no images.

pub mod answer;
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
use crate::attribution::{Attributor, EndUser};
use crate::cache::key::KeyParts;
use crate::cache::{self, Answer, Directive, Fetched, Lookup, Outcome, ResponseCache, Scope, Uncached};
use crate::error::{ApiError, Failure};
use crate::ledger::Ledger;
use crate::limits::{Demand, Denied, Limiter, Permit, Refusal, Usage};
use crate::pricing::{Ask, Prices, Unpriced};
use crate::rehost::{Origin, Plan, Rehoster};
use crate::tenants::TenantContext;
use crate::upstream::{Attribution, ReplyBody, UpstreamReply, Upstreams};

/// The 429 (or, fail-closed, 503) for a request the limits did not let through.
fn denied_error(tenant: &str, denied: Denied) -> ApiError {
    match denied {
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

/// What the caller whose upstream call runs through the cache reserves when it turns out to lead: the images
/// and cost that only it spends, on its own permit.
struct Lead {
    n: u32,
    cost: f64,
    permit: Permit,
}

/// What the settlement of a finished request's reservation is, from its usage record: the images the
/// upstream returned (none for answers served by another request's call), the record's cost, and the request
/// given back when the upstream refused it (429).
fn usage_of(record: &UsageRecord) -> Usage {
    let images = if record.cache_hit { 0 } else { record.images_returned.unwrap_or(0) };
    Usage { images, usd: record.cost_usd, request_back: record.refused_by.is_some() }
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
    /// Every configured upstream; each tenant's requests go to the one it names.
    upstreams: Arc<Upstreams>,
    policy: ValidationPolicy,
    prices: Arc<Prices>,
    ledger: Ledger,
    limiter: Limiter,
    rehoster: Arc<Rehoster>,
    cache: ResponseCache,
    attributor: Attributor,
    end_user: EndUser,
}

impl ImagesService {
    pub fn new(
        upstreams: Arc<Upstreams>,
        policy: ValidationPolicy,
        prices: Arc<Prices>,
        ledger: Ledger,
        limiter: Limiter,
        rehoster: Arc<Rehoster>,
        cache: ResponseCache,
    ) -> Self {
        let attributor = Attributor::new(rehoster.links().derive(b"imagegate attribution"));
        Self { upstreams, policy, prices, ledger, limiter, rehoster, cache, attributor, end_user: EndUser::default() }
    }

    /// What the upstream receives as `user` for tenants that do not choose (`[attribution] end_user`).
    pub fn with_end_user(self, end_user: EndUser) -> Self {
        Self { end_user, ..self }
    }

    /// The request as the upstream gets it: with `user` derived from the tenant (and the caller's own `user`)
    /// unless the tenant's policy passes the caller's through. `None`: send `request` as it is.
    fn attributed(&self, ctx: &TenantContext, request: &ImageRequest) -> Option<ImageRequest> {
        if ctx.tenant.image_policy.end_user.unwrap_or(self.end_user) == EndUser::PassThrough {
            return None;
        }
        let id = self.attributor.end_user(&ctx.tenant.id, request.field_str("user").as_deref());
        Some(request.clone().with_field("user", Some(&id)))
    }

    /// The re-hoster, whose store also serves the links it hands out.
    pub fn rehoster(&self) -> &Arc<Rehoster> {
        &self.rehoster
    }

    /// Name of the default upstream (`openai` or `mock`).
    pub fn upstream_name(&self) -> &'static str {
        self.upstreams.default_upstream().name()
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
                return Err(self.unreserved(ctx, e).await);
            }
        };
        let span = tracing::Span::current();
        span.record("model", validated.model.as_str());
        span.record("n", validated.n);
        span.record("stream", validated.stream);
        let record = UsageRecord::start(ctx, &request, &meta.request_id, &validated.model);
        // 2. The tenant may use this model, and the budgets can count what it costs.
        let cost = self.authorise(ctx, &request, &validated);
        let cost = match cost {
            Ok(cost) => cost,
            Err(e) => {
                self.ledger.record(record.finish(e.status().as_u16(), started));
                return Err(self.unreserved(ctx, e).await);
            }
        };
        // The caller's format decides what goes upstream (GPT image models never see response_format) and is
        // part of the cache key.
        let (request, plan) = self.rehoster.plan(request, validated.family, &ctx.tenant);
        // 3. Cache: a hit is answered here, spending a request but no images.
        let lookup = self.cache_lookup(ctx, &request, &validated, plan.as_ref(), meta.cache);
        if let Some(lookup) = lookup.as_ref().filter(|l| l.directive == Directive::Normal)
            && let Some(answer) = self.cache.get(&lookup.key).await
        {
            span.record("cache", Outcome::Hit.as_str());
            let permit = self.acquire(ctx, Demand::request_only(), record.clone(), started).await?;
            self.cache.count_hit();
            let record = record.finish_cached(answer.status, answer.images, started);
            self.settle(record, &permit);
            return Ok(answer_reply(answer, &permit, Outcome::Hit));
        }
        let Some(lookup) = lookup else {
            // 4. Rate limits and quotas: reserve the request, its `n` images and its cost, all or nothing.
            let permit = self.acquire(ctx, Demand::whole(validated.n, cost), record.clone(), started).await?;
            // 5–6. Upstream and re-hosting, uncached; 7. usage (streams are metered as their events pass).
            span.record("cache", Outcome::Bypass.as_str());
            let fetched = self.fetch(ctx, &request, plan, &validated.model, &meta, record, started, &permit).await;
            let (mut reply, record) = fetched.map_err(|e| after_reservation(e, &permit, Outcome::Bypass))?;
            set_cache_header(&mut reply.headers, Outcome::Bypass);
            return Ok(self.meter(reply, record, permit, started));
        };
        // 4. Through the cache, only the request is reserved now: its images and cost are reserved by
        // whichever caller's upstream call runs (`lead`); the others are served by it and spend no images.
        let permit = self.acquire(ctx, Demand::request_only(), record.clone(), started).await?;
        // 5–6 through the cache: one upstream call for every concurrent identical miss, run in a task of its own
        // that reserves the images and cost, records the upstream's usage and stores the answer whatever happens
        // to this caller (the task holds a clone of the permit, so the concurrency slot is held until it ends).
        // The others are served by it and cost nothing.
        let lead = Lead { n: validated.n, cost, permit: permit.clone() };
        let fetch =
            self.cached_fetch(ctx, request, plan, &validated.model, &meta, &lookup, record.clone(), started, lead);
        let (served, role) = self.cache.get_or_fetch(&lookup, fetch).await;
        let outcome = role.outcome(&served);
        span.record("cache", outcome.as_str());
        let by_another = role.served_by_another();
        match served.map_err(Uncached::take) {
            Ok(answer) => {
                if by_another {
                    self.settle(record.finish_cached(answer.status, answer.images, started), &permit);
                }
                Ok(answer_reply(answer, &permit, outcome))
            }
            Err(Uncached::Answer(answer)) => Ok(self.shared_answer(answer, by_another, record, &permit, started)),
            // This caller led, and its own limits refused the images (recorded by `lead`).
            Err(Uncached::Refused(e)) => Err(after_reservation(e, &permit, Outcome::Miss)),
            Err(Uncached::Error(e)) => {
                if by_another {
                    self.settle_failed(record.finish(e.status().as_u16(), started), &e, &permit);
                }
                Err(after_reservation(e, &permit, outcome))
            }
        }
    }

    /// The reply for an answer that was not stored (an upstream error, or a 2xx answer that may not be
    /// stored). A caller served by another's call records it at no cost, and not as a cache hit; the images
    /// are the other call's (its row counts them), so this row counts none.
    fn shared_answer(
        &self,
        answer: Answer,
        by_another: bool,
        record: UsageRecord,
        permit: &Permit,
        started: Instant,
    ) -> UpstreamReply {
        if by_another {
            self.settle(record.finish(answer.status, started), permit);
        }
        answer_reply(answer, permit, Outcome::Miss)
    }

    /// Steps 5–6 for a request through the cache, as a task-ready future: the reservation of the images and
    /// cost, the upstream call, re-hosting, the usage record of the call, and whether (for how long) the
    /// answer may be stored.
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
        lead: Lead,
    ) -> impl Future<Output = Result<Fetched, Uncached>> + Send + 'static {
        let (this, ctx, model, meta, lookup) =
            (self.clone(), ctx.clone(), model.to_owned(), meta.clone(), lookup.clone());
        async move {
            let Lead { n, cost, permit } = lead;
            this.lead(&ctx, &permit, n, cost, record.clone(), started).await.map_err(Uncached::Refused)?;
            let (reply, record) = this
                .fetch(&ctx, &request, plan, &model, &meta, record, started, &permit)
                .await
                .map_err(Uncached::Error)?;
            this.settle(record.finish_reply(&reply, &this.prices, started), &permit);
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
        // The shared scope still separates what makes answers differ upstream: which upstream, and whose
        // organization and project (their own models, settings and moderation).
        let shared;
        let scope = match scope {
            Scope::Tenant => ctx.tenant.id.as_str(),
            Scope::Shared => {
                let t = &ctx.tenant;
                let part = |v: &Option<String>| v.clone().unwrap_or_default();
                shared = serde_json::json!(["shared", part(&t.upstream), part(&t.organization), part(&t.project)])
                    .to_string();
                shared.as_str()
            }
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

    /// Whether the tenant may use the model, and the most the request may cost (held against its USD budgets).
    /// A model without a price is refused when `pricing.unpriced = "reject"`, and for a tenant with a USD
    /// budget (which it would otherwise bypass at cost 0).
    fn authorise(
        &self,
        ctx: &TenantContext,
        request: &ImageRequest,
        validated: &validate::Validated,
    ) -> Result<f64, ApiError> {
        let model = validated.model.as_str();
        if !ctx.tenant.allows_model(model) {
            return Err(ApiError::PermissionDenied {
                message: format!("Tenant '{}' may not use model '{model}'.", ctx.tenant.name),
            });
        }
        let (size, quality, prompt) =
            (request.field_str("size"), request.field_str("quality"), request.field_str("prompt"));
        let input_images = match request.form() {
            Some(form) => form.images().count() + usize::from(form.mask().is_some()),
            None => {
                request.field("images").and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0)
                    + usize::from(request.field("mask").is_some_and(|m| !m.is_null()))
            }
        };
        let partial_images = request.field("partial_images").and_then(|v| v.as_u64()).unwrap_or(0);
        let ask = Ask {
            model,
            size: size.as_deref(),
            quality: quality.as_deref(),
            n: validated.n,
            prompt_bytes: prompt.map_or(0, |p| p.len()),
            input_images: u32::try_from(input_images).unwrap_or(u32::MAX),
            partial_images: u32::try_from(partial_images).unwrap_or(u32::MAX),
        };
        if let Some(cost) = self.prices.reservation(&ask) {
            return Ok(cost);
        }
        let limits = self.limiter.effective(&ctx.tenant.limits);
        let has_usd_budget = limits.usd_per_day.is_some() || limits.usd_per_month.is_some();
        if self.prices.unpriced == Unpriced::Reject || has_usd_budget {
            let why = if has_usd_budget {
                format!(
                    "tenant '{}' has a USD budget, which cannot count a model imagegate has no price for",
                    ctx.tenant.name
                )
            } else {
                "this gateway refuses models it has no price for".to_owned()
            };
            return Err(ApiError::invalid_code(
                format!(
                    "imagegate has no price for model '{model}' at this size and quality, and {why}. Use a \
                     priced model, or ask the administrator to price it (pricing.per_image / pricing.per_token, \
                     or pricing.unpriced = \"<model to bill it as>\")."
                ),
                Some("model"),
                "unpriced_model",
            ));
        }
        Ok(0.0)
    }

    /// Reserve `demand` from the tenant's limits; a refusal is recorded and returned.
    async fn acquire(
        &self,
        ctx: &TenantContext,
        demand: Demand,
        record: UsageRecord,
        started: Instant,
    ) -> Result<Permit, ApiError> {
        let acquired = self.limiter.acquire(&ctx.tenant.id, &ctx.tenant.limits, demand).await;
        acquired.map_err(|denied| self.refused(ctx, denied, record, started))
    }

    /// This caller's upstream call runs (it leads the identical requests waiting on it): reserve its images
    /// and cost now. A refusal is recorded, and gives the request back (a refused request spends nothing).
    async fn lead(
        &self,
        ctx: &TenantContext,
        permit: &Permit,
        images: u32,
        cost: f64,
        record: UsageRecord,
        started: Instant,
    ) -> Result<(), ApiError> {
        permit.extend(images, cost).await.map_err(|denied| self.refused(ctx, denied, record, started))
    }

    /// The error for a refusal by the limits, recorded in the ledger.
    fn refused(&self, ctx: &TenantContext, denied: Denied, record: UsageRecord, started: Instant) -> ApiError {
        let e = denied_error(&ctx.tenant.name, denied);
        self.ledger.record(record.finish_refused(e.status().as_u16(), started));
        e
    }

    /// An error answered before anything was reserved, with the tenant's buckets as they stand (a read that
    /// spends nothing), so every answer of the image routes carries the `x-ratelimit-*` headers.
    pub async fn unreserved(&self, ctx: &TenantContext, failure: impl Into<Failure>) -> Failure {
        let mut failure = failure.into();
        let mut headers = HeaderMap::new();
        crate::limits::headers::apply(&self.limiter.peek(&ctx.tenant.id, &ctx.tenant.limits).await, &mut headers);
        for (name, value) in headers {
            if let Some(name) = name
                && !failure.headers.contains_key(&name)
            {
                failure.headers.insert(name, value);
            }
        }
        failure
    }

    /// The rate limits (counters for the admin API, readiness, shutdown).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
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
        permit: &Permit,
    ) -> Result<(UpstreamReply, UsageRecord), ApiError> {
        let attribution = Attribution {
            organization: ctx.tenant.organization.clone(),
            project: ctx.tenant.project.clone(),
            // Scoped to the tenant: two tenants choosing the same key must not share the upstream's answer.
            idempotency_key: meta
                .idempotency_key
                .as_deref()
                .map(|k| self.attributor.idempotency_key(&ctx.tenant.id, k)),
        };
        let attributed = self.attributed(ctx, request);
        let request = attributed.as_ref().unwrap_or(request);
        let Some(upstream) = self.upstreams.get(ctx.tenant.upstream.as_deref()) else {
            let e = ApiError::Internal(anyhow::anyhow!(
                "tenant '{}' names upstream '{}', which is not configured on this gateway",
                ctx.tenant.name,
                ctx.tenant.upstream.as_deref().unwrap_or_default()
            ));
            self.ledger.record(record.finish(e.status().as_u16(), started));
            return Err(e);
        };
        let reply = match upstream.send(request, &attribution).await {
            Ok(reply) => answer_held_to_n(reply, request.n()),
            Err(e) => {
                let e = ApiError::from(e);
                self.settle_failed(record.finish(e.status().as_u16(), started), &e, permit);
                return Err(e);
            }
        };
        if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
            // The upstream's limit, not the tenant's: passed on as it is, told apart in the logs, the counters
            // and the ledger (`refused_by = upstream`), and the request is given back.
            self.limiter.count_upstream_rate_limited();
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
                    other => {
                        tracing::warn!(error = %other, "re-hosting failed");
                        ApiError::RehostFailed(other.public_reason())
                    }
                };
                let mut record = record.finish_reply(&reply, &self.prices, started);
                record.status = e.status().as_u16();
                self.settle(record, permit);
                Err(e)
            }
        }
    }

    /// The cache's counters (for the admin API) and its purge.
    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// Book a finished record: settle the reservation with what the request used (images returned, its cost;
    /// the request given back when the upstream refused it) and queue the record for the ledger.
    fn settle(&self, record: UsageRecord, permit: &Permit) {
        permit.finish(usage_of(&record));
        self.ledger.record(record);
    }

    /// Book a request that failed without an answer: nothing used; the request given back as well when the
    /// upstream never processed it (it could not be reached) or imagegate refused it.
    fn settle_failed(&self, mut record: UsageRecord, e: &ApiError, permit: &Permit) {
        let refused = matches!(e, ApiError::RateLimited { .. } | ApiError::LimitsUnavailable { .. });
        if refused {
            record.refused_by = Some(usage::REFUSED_BY_GATEWAY);
        }
        let never_processed = refused || matches!(e, ApiError::UpstreamUnavailable(_));
        permit.finish(if never_processed { Usage::REFUNDED } else { Usage::NOTHING });
        self.ledger.record(record);
    }

    /// Record a request refused before it reached the pipeline (unreadable body): it costs nothing.
    pub fn record_refusal(&self, ctx: &TenantContext, endpoint: Endpoint, request_id: &str, status: u16) {
        let mut record = UsageRecord::start(ctx, &ImageRequest::empty(endpoint), request_id, endpoint.default_model());
        record.model = "unknown".to_owned();
        self.ledger.record(record.finish(status, Instant::now()));
    }

    fn meter(&self, mut reply: UpstreamReply, record: UsageRecord, permit: Permit, started: Instant) -> UpstreamReply {
        crate::limits::headers::apply(&permit.report(), &mut reply.headers);
        let ledger = self.ledger.clone();
        let settled = permit.clone();
        let done = move |record: UsageRecord| {
            settled.finish(usage_of(&record));
            ledger.record(record);
        };
        match reply.body {
            ReplyBody::Stream(stream) if reply.status.is_success() => {
                // The upstream's request id is known from the headers, before any event.
                let mut record = record;
                record.note_upstream_request_id(&reply.headers);
                // The concurrency slot (and the reservation's lease) is held until the stream ends.
                let hold = Some(crate::limits::SlotGuard(permit));
                let body = usage::meter_stream(stream, record, self.prices.clone(), Box::new(done), hold, started);
                UpstreamReply { body: ReplyBody::Stream(body), ..reply }
            }
            _ => {
                done(record.finish_reply(&reply, &self.prices, started));
                reply
            }
        }
    }
}

/// A successful whole answer with more images than asked for keeps the first `n` (`images::answer`): the
/// caller asked for and is charged `n`, and no extra image is downloaded, stored or cached.
fn answer_held_to_n(reply: UpstreamReply, n: u32) -> UpstreamReply {
    let (true, ReplyBody::Full(body)) = (reply.status.is_success(), &reply.body) else { return reply };
    match answer::hold_to_n(body, n) {
        Some((held, items)) => {
            tracing::warn!(kind = "upstream.too_many_images", asked = n, answered = items, "kept the first n images");
            UpstreamReply { body: ReplyBody::Full(held), ..reply }
        }
        None => reply,
    }
}

/// An error after the reservation, with the headers that reservation earned and the cache decision.
fn after_reservation(e: ApiError, permit: &Permit, outcome: Outcome) -> Failure {
    let mut headers = HeaderMap::new();
    crate::limits::headers::apply(&permit.report(), &mut headers);
    set_cache_header(&mut headers, outcome);
    Failure::with_headers(e, headers)
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
    crate::limits::headers::apply(&permit.report(), &mut headers);
    set_cache_header(&mut headers, outcome);
    let status = http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::OK);
    UpstreamReply { status, headers, body: ReplyBody::Full(answer.body) }
}

fn set_cache_header(headers: &mut HeaderMap, outcome: Outcome) {
    headers.insert(crate::wire::headers::X_IMAGEGATE_CACHE, HeaderValue::from_static(outcome.as_str()));
}
