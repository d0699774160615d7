//! The image pipeline: validate → authorise model → cache → limit → upstream → re-host → usage. No axum or
//! routing here; replies are the upstream's status, headers and body.
//!
//! Handlers build an [`ImageRequest`] and call [`ImagesService::handle`]; everything a request goes through
//! after authentication happens here, in this order. Each request travels as one [`Call`] (who asks, when it
//! started, its usage record and its reservation), and every outcome is booked through [`book`], the one
//! place that settles a reservation and queues the usage row. Re-hosting (`crate::rehost`) plans the caller's
//! format before the cache lookup and rewrites the answer after the upstream call; the response cache
//! (`crate::cache`) answers hits before the images are reserved, so a hit spends a request but no images.

pub mod metering;
pub mod replay;

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Instrument as _;

use self::replay::ReplayWindow;
use crate::attribution::{Attributor, EndUser};
use crate::cache::key::KeyParts;
use crate::cache::{self, Answer, Directive, Fetched, Lookup, Outcome, ResponseCache, Uncached};
use crate::domain::{Scope, TenantContext};
use crate::error::{self, ApiError, Failure, ratelimit_headers};
use crate::images::answer;
use crate::images::request::{Endpoint, ImageRequest};
use crate::images::validate::{self, ValidationPolicy};
use crate::ledger::Ledger;
use crate::ledger::record::{self as usage, UsageRecord};
use crate::limits::{Demand, Limiter, Permit, Usage};
use crate::pricing::{Ask, Prices, Unpriced};
use crate::rehost::{Origin, Plan, Rehosted, Rehoster, Spill};
use crate::upstream::{Attribution, Reading, ReplyBody, Split, Upstream as _, UpstreamReply, Upstreams};
use crate::wire::{AnswerFacts, headers};

/// Per-request facts from the HTTP edge the pipeline needs.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// imagegate's `x-request-id`.
    pub request_id: String,
    /// The caller's `Idempotency-Key`, forwarded unchanged.
    pub idempotency_key: Option<String>,
    /// An OpenAI SDK's automatic retry (`x-stainless-retry-count` above 0).
    pub sdk_retry: bool,
    /// The caller's `Cache-Control` directive.
    pub cache: Directive,
}

/// One request on its way through the pipeline. Cheap to clone, so that an upstream call through the cache can
/// run in a task of its own with everything it needs.
#[derive(Clone)]
struct Call {
    ctx: TenantContext,
    meta: RequestMeta,
    started: Instant,
    /// The model as validated (the one the request names).
    model: String,
    /// The usage row of this request, unfinished: each outcome finishes a copy and books it.
    record: UsageRecord,
    /// What re-hosting does with the answer, decided before the cache lookup.
    plan: Option<Plan>,
    /// The reservation, once the limits granted one.
    permit: Option<Permit>,
}

impl Call {
    fn new(ctx: &TenantContext, request: &ImageRequest, meta: RequestMeta, started: Instant, model: String) -> Self {
        let record = UsageRecord::start(ctx, request, &meta.request_id, &model);
        Self { ctx: ctx.clone(), meta, started, model, record, plan: None, permit: None }
    }

    /// The record finished with `status` (no upstream answer to read).
    fn finished(&self, status: u16) -> UsageRecord {
        self.record.clone().finish(status, self.started)
    }

    /// The `x-ratelimit-*` headers this call's reservation earned (none before one was granted).
    fn limit_headers(&self, headers: &mut HeaderMap) {
        if let Some(permit) = &self.permit {
            ratelimit_headers::apply(&permit.report(), headers);
        }
    }

    /// An error after the reservation, with the headers that reservation earned and the cache decision.
    fn failure(&self, e: ApiError, outcome: Outcome) -> Failure {
        let mut headers = HeaderMap::new();
        self.limit_headers(&mut headers);
        set_cache_header(&mut headers, outcome);
        Failure::with_headers(e, headers)
    }

    /// A reply built from a cached (or coalesced) answer, with this request's own rate-limit headers. A hit
    /// made no upstream call: it does not replay the headers of the call that made the answer.
    fn answer_reply(&self, answer: Answer, outcome: Outcome) -> UpstreamReply {
        let mut headers = HeaderMap::new();
        for (name, value) in &answer.headers {
            if outcome == Outcome::Hit && cache::NOT_REPLAYED.contains(&name.as_str()) {
                continue;
            }
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
                headers.append(name, value);
            }
        }
        self.limit_headers(&mut headers);
        set_cache_header(&mut headers, outcome);
        let status = http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::OK);
        UpstreamReply { status, headers, body: ReplyBody::Full(answer.body) }
    }
}

/// Book a finished usage record: settle the reservation (if any) with what the request used, then queue the
/// record for the ledger. Every outcome of every request ends here, once.
fn book(ledger: &Ledger, permit: Option<&Permit>, record: UsageRecord, used: Usage) {
    if let Some(permit) = permit {
        permit.finish(used);
    }
    ledger.record(record);
}

/// What the settlement of a finished request's reservation is, from its usage record: the images the
/// upstream returned (none for answers served by another request's call), the record's cost, and the request
/// given back when the upstream refused it (429).
fn usage_of(record: &UsageRecord) -> Usage {
    let images = if record.cache_hit { 0 } else { record.images_returned.unwrap_or(0) };
    Usage { images, usd: record.cost_usd, request_back: record.refused_by.is_some() }
}

/// Owns the pipeline's collaborators. Shared (`Arc`), so that an upstream call through the cache or the
/// replay window holds it by one pointer while it runs in a task of its own.
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
    /// Uncached whole answers run in tasks of their own, and identical retries attach to them.
    replay: Option<ReplayWindow<Replayed>>,
}

/// Where [`ImagesService::decide`] leaves a request: answered, or waiting in the future that will answer it.
enum Step<'a> {
    Done(UpstreamReply),
    Wait(futures::future::BoxFuture<'a, Result<UpstreamReply, Failure>>),
}

/// What an uncached call through the replay window came to, as every caller attached to it receives it.
#[derive(Clone)]
enum Replayed {
    /// The upstream's answer (re-hosted), with the headers of the call that made it.
    Answer(Arc<Kept>),
    /// A failure, with the headers its request earned.
    Failed(Arc<Failure>),
}

/// A whole answer as the replay window keeps it: the reply itself, its body shared (a `Bytes` handle, not a
/// copy) and its headers as they are, with the images its usage row counted.
struct Kept {
    status: http::StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
    images: Option<u32>,
}

impl Kept {
    /// Every caller's reply: the same headers and a handle on the same body.
    fn reply(&self) -> UpstreamReply {
        UpstreamReply { status: self.status, headers: self.headers.clone(), body: ReplyBody::Full(self.body.clone()) }
    }
}

impl Replayed {
    /// Whether later identical requests get this result instead of a call of their own.
    fn kept(&self) -> replay::Kept {
        match self {
            Self::Answer(answer) if answer.status.is_success() && answer.images.unwrap_or(0) > 0 => {
                replay::Kept::Images
            }
            Self::Answer(_) => replay::Kept::Nothing,
            // The request went out and no answer came, or the images could not be stored: they may have been
            // generated and billed, so a new call could pay twice.
            Self::Failed(f) => match f.error {
                ApiError::UpstreamTimeout(_) | ApiError::UpstreamBroken(_) | ApiError::RehostFailed(_) => {
                    replay::Kept::PossiblyBilled
                }
                _ => replay::Kept::Nothing,
            },
        }
    }
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
        Self {
            upstreams,
            policy,
            prices,
            ledger,
            limiter,
            rehoster,
            cache,
            attributor,
            end_user: EndUser::default(),
            replay: None,
        }
    }

    /// Run uncached whole answers through a replay window (`replay.enabled`), keeping results for `window`.
    #[must_use]
    pub fn with_replay(mut self, window: Option<std::time::Duration>) -> Self {
        self.replay = window.map(ReplayWindow::new);
        self
    }

    /// What the upstream receives as `user` for tenants that do not choose (`[attribution] end_user`).
    pub fn with_end_user(self, end_user: EndUser) -> Self {
        Self { end_user, ..self }
    }

    /// The `user` the upstream gets: derived from the tenant (and the caller's own `user`) unless the tenant's
    /// policy passes the caller's through (`None`: the body's `user`, if any, goes on as sent). Set where the
    /// body is written for the upstream, so the request is not copied for it.
    fn end_user_of(&self, ctx: &TenantContext, request: &ImageRequest) -> Option<String> {
        if ctx.tenant.image_policy.end_user.unwrap_or(self.end_user) == EndUser::PassThrough {
            return None;
        }
        Some(self.attributor.end_user(&ctx.tenant.id, request.field_str("user").as_deref()))
    }

    /// The re-hoster, whose store also serves the links it hands out.
    pub fn rehoster(&self) -> &Arc<Rehoster> {
        &self.rehoster
    }

    /// The validation policy: the model catalog and what it refuses.
    pub fn policy(&self) -> &ValidationPolicy {
        &self.policy
    }

    /// Name of the default upstream (`openai` or `mock`).
    pub fn upstream_name(&self) -> &'static str {
        self.upstreams.default_pool().kind()
    }

    /// Every upstream and pool (the admin API shows their deployments' state).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The rate limits (counters for the admin API, readiness, shutdown).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The cache's counters (for the admin API) and its purge.
    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// Run one request through the pipeline, in its span (`images`). Every outcome, refusals included, leaves
    /// one usage record.
    ///
    /// `admitted` is the reservation [`Self::admit`] took before the body was read (tenants with a concurrency
    /// limit): the request and its slot, to which the images and cost are added once they are known.
    ///
    /// Not an `async fn`: the steps up to the upstream call ([`Self::decide`]) run in a box freed when they end,
    /// and what a request then waits in (the upstream call, the replay window or the cache) in a box sized for
    /// it alone. An `async fn` would keep room for every step's locals for as long as the request waits
    /// (docs/performance.md).
    pub fn handle<'a>(
        self: &'a Arc<Self>,
        ctx: &'a TenantContext,
        request: ImageRequest,
        meta: RequestMeta,
        admitted: Option<Permit>,
    ) -> impl Future<Output = Result<UpstreamReply, Failure>> + Send + 'a {
        let span = tracing::info_span!(
            "images",
            endpoint = request.endpoint.name(),
            model = tracing::field::Empty,
            n = tracing::field::Empty,
            stream = tracing::field::Empty,
            cache = tracing::field::Empty,
        );
        let decided = Box::pin(self.decide(ctx, request, meta, admitted));
        async move {
            // Not `match decided.await? { … => waiting.await }`: the matched value would stay in this future's
            // state while it waits.
            let waiting = match decided.await? {
                Step::Done(reply) => return Ok(reply),
                Step::Wait(waiting) => waiting,
            };
            waiting.await
        }
        .instrument(span)
    }

    /// The pipeline up to what the request waits in: its reply, or the future that waits for it.
    async fn decide<'a>(
        self: &'a Arc<Self>,
        ctx: &'a TenantContext,
        request: ImageRequest,
        meta: RequestMeta,
        admitted: Option<Permit>,
    ) -> Result<Step<'a>, Failure> {
        let started = Instant::now();
        let new_call = |request: &ImageRequest, meta: RequestMeta, model: String| {
            let mut call = Call::new(ctx, request, meta, started, model);
            call.permit.clone_from(&admitted);
            call
        };
        // 0. Chained edits: inputs that are imagegate's own links become their bytes (the upstream cannot reach
        // them), after their signature, expiry and tenant are checked.
        let request = match self.rehoster.resolve_own_links(&request, &ctx.tenant).await {
            Ok(Some(resolved)) => resolved,
            Ok(None) => request,
            Err(e) => {
                let call = new_call(&request, meta, request.model());
                // Boxed, here and for every refusal below: a path few requests take stays out of the size of
                // `decide`'s future, which every request allocates and moves into its box.
                return Err(Box::pin(self.refuse_unreserved(&call, e)).await);
            }
        };
        // 1. Validate against the model's rules (structural checks happened while parsing).
        let validated = match validate::validate_for(&request, &self.policy, Some(&ctx.tenant.name)) {
            Ok(v) => v,
            Err(e) => {
                let call = new_call(&request, meta, request.model());
                return Err(Box::pin(self.refuse_unreserved(&call, e)).await);
            }
        };
        let span = tracing::Span::current();
        span.record("model", validated.model.as_str());
        span.record("n", validated.n);
        span.record("stream", validated.stream);
        let mut call = new_call(&request, meta, validated.model.clone());
        call.record.requested_model.clone_from(&validated.requested);
        // The model an alias names and file types mended from their bytes are what the upstream sees.
        let request = validate::prepare(request, &validated);
        // 2. The tenant may use this model, and the budgets can count what it costs.
        let cost = match self.authorise(ctx, &request, &validated) {
            Ok(cost) => cost,
            Err(e) => return Err(Box::pin(self.refuse_unreserved(&call, e)).await),
        };
        // The caller's format decides what goes upstream (GPT image models never see response_format) and is
        // part of the cache key.
        let (request, plan) = self.rehoster.plan(request, validated.known.as_deref(), &ctx.tenant);
        call.plan = plan;
        // 3. Cache: a hit is answered here, spending a request but no images.
        let lookup = self.cache_lookup(ctx, &request, &validated, call.plan.as_ref(), call.meta.cache);
        if let Some(lookup) = lookup.as_ref().filter(|l| l.directive == Directive::Normal)
            && let Some(answer) = Box::pin(self.cache.get(&lookup.key)).await
            && self.still_linkable(&answer, lookup).await
        {
            span.record("cache", Outcome::Hit.as_str());
            self.acquire(&mut call, Demand::request_only()).await?;
            self.cache.count_hit();
            self.settle(&call, call.record.clone().finish_cached(answer.status, answer.images, started));
            return Ok(Step::Done(call.answer_reply(answer, Outcome::Hit)));
        }
        let Some(lookup) = lookup else {
            span.record("cache", Outcome::Bypass.as_str());
            if let Some(window) = self.replay.as_ref().filter(|_| !validated.stream) {
                return Ok(Step::Wait(Box::pin(self.replayed(window, call, request, validated.n, cost))));
            }
            // 4. Rate limits and quotas: reserve the request, its `n` images and its cost, all or nothing.
            self.acquire(&mut call, Demand::whole(validated.n, cost)).await?;
            // 5–6. Upstream and re-hosting, uncached; 7. usage (streams are metered as their events pass).
            return Ok(Step::Wait(Box::pin(async move {
                let (mut reply, record, facts) =
                    self.fetch(&call, &request).await.map_err(|e| call.failure(e, Outcome::Bypass))?;
                set_cache_header(&mut reply.headers, Outcome::Bypass);
                Ok(self.meter(reply, record, facts.as_ref(), &call))
            })));
        };
        // 4. Through the cache, only the request is reserved now: its images and cost are reserved by
        // whichever caller's upstream call runs (`lead`); the others are served by it and spend no images.
        self.acquire(&mut call, Demand::request_only()).await?;
        // 5–6 through the cache: one upstream call for every concurrent identical miss, run in a task of its own
        // that reserves the images and cost, records the upstream's usage and stores the answer whatever happens
        // to this caller (the task holds a clone of the call and so of its permit: the concurrency slot is held
        // until it ends). The others are served by it and cost nothing.
        // Boxed: the call is kilobytes, and the future that waits for it would otherwise carry (and move, memcpy
        // by memcpy) its full size (docs/performance.md).
        let fetch = Box::pin(self.cached_fetch(call.clone(), request, lookup.clone(), validated.n, cost));
        Ok(Step::Wait(Box::pin(async move {
            let (served, role) = self.cache.get_or_fetch(&lookup, fetch).await;
            let outcome = role.outcome(&served);
            span.record("cache", outcome.as_str());
            let by_another = role.served_by_another();
            match served.map_err(Uncached::take) {
                Ok(answer) => {
                    if by_another {
                        self.settle(&call, call.record.clone().finish_cached(answer.status, answer.images, started));
                    }
                    Ok(call.answer_reply(answer, outcome))
                }
                // An answer that was not stored (an upstream error, or a 2xx answer that may not be stored). A
                // caller served by another's call records it at no cost, and not as a cache hit; the images are
                // the other call's (its row counts them), so this row counts none.
                Err(Uncached::Answer(answer)) => {
                    if by_another {
                        self.settle(&call, call.finished(answer.status));
                    }
                    Ok(call.answer_reply(answer, Outcome::Miss))
                }
                // This caller led, and its own limits refused the images (recorded by `lead`).
                Err(Uncached::Refused(e)) => Err(call.failure(e, Outcome::Miss)),
                Err(Uncached::Error(e)) => {
                    if by_another {
                        self.settle_failed(&call, call.finished(e.status().as_u16()), &e);
                    }
                    Err(call.failure(e, outcome))
                }
            }
        })))
    }

    /// Steps 4–7 for an uncached whole answer, through the replay window: the reservation, the upstream call,
    /// re-hosting and the booking of usage run in a task of their own, so a caller that hangs up (or whose
    /// request the gateway times out) does not cancel a generation already paid for. An identical request from
    /// the same key that retries it, or that follows it before anyone got its images, attaches to that call or
    /// its result: one upstream call, one charge. An attached caller's own row costs nothing.
    ///
    /// Not an `async fn`: one would keep `call` and `request` twice in its state (as arguments and as locals)
    /// while the caller waits. The call is launched now; the future returned holds only what the answer needs.
    fn replayed<'a>(
        self: &'a Arc<Self>,
        window: &'a ReplayWindow<Replayed>,
        call: Call,
        request: ImageRequest,
        images: u32,
        cost: f64,
    ) -> impl Future<Output = Result<UpstreamReply, Failure>> + Send + 'a {
        let key = replay::key(
            &call.ctx.tenant.id,
            &call.ctx.key_id,
            request.endpoint.name(),
            &replay::fingerprint(&request),
            call.meta.idempotency_key.as_deref(),
        );
        let keyed = call.meta.idempotency_key.is_some();
        let says_retry = call.meta.sdk_retry || keyed;
        // In a block: the task is moved into its own tokio task at once, and nothing of it stays in this
        // future while the caller waits.
        let waiting = {
            let (this, mut own) = (self.clone(), call.clone());
            let task = async move {
                // Boxed: the reservation's future is no part of what the call holds while the upstream works.
                if let Err(e) = Box::pin(this.acquire(&mut own, Demand::whole(images, cost))).await {
                    return Replayed::Failed(Arc::new(own.failure(e, Outcome::Bypass)));
                }
                match this.fetch(&own, &request).await {
                    Ok((reply, record, facts)) => {
                        let mut reply = this.meter(reply, record, facts.as_ref(), &own);
                        let images = facts.map(|f| f.images);
                        set_cache_header(&mut reply.headers, Outcome::Bypass);
                        let UpstreamReply { status, headers, body } = reply;
                        // Streams never come this way (`replayed` takes whole answers only).
                        let body = match body {
                            ReplyBody::Full(body) => body,
                            // Re-hosting made every split answer whole (`fetch`).
                            ReplyBody::Stream(_) | ReplyBody::Split(_) => bytes::Bytes::new(),
                        };
                        Replayed::Answer(Arc::new(Kept { status, headers, body, images }))
                    }
                    Err(e) => Replayed::Failed(Arc::new(own.failure(e, Outcome::Bypass))),
                }
            };
            window.run(key, says_retry, keyed, task, Replayed::kept)
        };
        async move {
            let (result, role) = waiting.await;
            let result = result.unwrap_or_else(|| {
                let e = ApiError::Internal(anyhow::anyhow!("the upstream call's task ended without an answer"));
                Replayed::Failed(Arc::new(Failure::from(e)))
            });
            let attached = role == replay::Role::Attached;
            if attached {
                tracing::info!(kind = "replay.attached", "an identical request's call answered this one");
                // The call that answered it paid; what this request reserved when it was admitted goes back.
                if let Some(permit) = &call.permit {
                    permit.finish(Usage::REFUNDED);
                }
            }
            match result {
                Replayed::Answer(answer) => {
                    if attached {
                        book(&self.ledger, None, call.finished(answer.status.as_u16()), Usage::NOTHING);
                    }
                    let mut reply = answer.reply();
                    if attached {
                        reply.headers.insert(headers::X_IMAGEGATE_REPLAYED, HeaderValue::from_static("true"));
                    }
                    Ok(reply)
                }
                Replayed::Failed(failure) => {
                    if attached {
                        book(&self.ledger, None, call.finished(failure.error.status().as_u16()), Usage::NOTHING);
                    }
                    let mut headers = failure.headers.clone();
                    if attached {
                        headers.insert(headers::X_IMAGEGATE_REPLAYED, HeaderValue::from_static("true"));
                    }
                    Err(Failure::with_headers(failure.error.duplicate(), headers))
                }
            }
        }
    }

    /// Steps 5–6 for a request through the cache, as a task-ready future: the reservation of the images and
    /// cost, the upstream call, re-hosting, the usage record of the call, and whether (for how long) the
    /// answer may be stored.
    fn cached_fetch(
        self: &Arc<Self>,
        call: Call,
        request: ImageRequest,
        lookup: Lookup,
        images: u32,
        cost: f64,
    ) -> impl Future<Output = Result<Fetched, Uncached>> + Send + 'static {
        let this = self.clone();
        async move {
            this.lead(&call, images, cost).await.map_err(Uncached::Refused)?;
            let (reply, record, facts) = this.fetch(&call, &request).await.map_err(Uncached::Error)?;
            // The answer was read once (`fetch`): its usage, its images and its links all come from there.
            this.settle(&call, record.finish_reply(&reply, facts.as_ref(), &this.prices, call.started));
            let (images, links) = facts.map_or((None, None), |f| (Some(f.images), f.links));
            let answer = Answer::from_reply(reply, images);
            if !(200..300).contains(&answer.status) {
                return Err(Uncached::Answer(answer));
            }
            let now = std::time::SystemTime::now();
            let store_for = cache::storable_for(&answer, links.as_deref(), &lookup, now, |link| {
                this.rehoster.own_link_expiry(link)
            });
            Ok(Fetched { answer, store_for })
        }
    }

    /// Whether a cached answer may be handed out again: every image it links to still exists. An image deleted
    /// from the console (on any replica) makes its link dead, and an answer carrying a dead link is forgotten
    /// here and in the shared cache, so the request is answered anew instead. When the database cannot say,
    /// the hit is served: a new answer would cost an upstream call, and could not be re-hosted either.
    async fn still_linkable(&self, answer: &Answer, lookup: &Lookup) -> bool {
        // Only an answer naming a `url` can link to a stored image. A cached answer with links holds imagegate's
        // own links only (others are never stored), written by re-hosting as a plain `"url"` key, so a byte
        // search spares every hit on a cached base64 answer a scan through its megabytes.
        static URL_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(br#""url""#));
        if answer.images == Some(0) || URL_KEY.find(&answer.body).is_none() {
            return true;
        }
        let links = answer.links().unwrap_or_default();
        // Boxed, as the forgetting below: this future is part of every request's, and most never come here.
        let live = match Box::pin(self.rehoster.own_links_live(&links)).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a cached answer's links; serving it");
                true
            }
        };
        if !live {
            tracing::info!(kind = "cache.dead_link", "a cached answer links to a deleted image; answering anew");
            Box::pin(self.cache.forget(&lookup.key)).await;
        }
        live
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
            defaults: validated.known.as_deref().map(|m| &m.defaults),
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
                     priced model, or ask the administrator to price it in the model catalog: \
                     [models.\"{model}\"] price = {{ per_token = {{ … }} }} or price.per_image, or extends = \
                     \"<a priced model>\" (docs/models.md)."
                ),
                Some("model"),
                "unpriced_model",
            ));
        }
        Ok(0.0)
    }

    /// Before the body is read: a tenant with a concurrency limit takes its slot (and its request) now, so no
    /// more of its bodies are buffered at once than it may have requests running, and one over the limit is
    /// refused (429) before a byte of its body is read. `None` for tenants without that limit (their request
    /// is reserved once the body is parsed, as before). A refusal is booked.
    pub async fn admit(
        &self,
        ctx: &TenantContext,
        endpoint: Endpoint,
        request_id: &str,
    ) -> Result<Option<Permit>, ApiError> {
        let tenant = &ctx.tenant;
        if self.limiter.effective(&tenant.limits).concurrent_requests.is_none() {
            return Ok(None);
        }
        match self.limiter.acquire(&tenant.id, &tenant.limits, Demand::request_only()).await {
            Ok(permit) => Ok(Some(permit)),
            Err(denied) => {
                let e = denied.into_error(&tenant.name);
                // Refused by the gateway's limits, like any other limit refusal.
                let record =
                    unread_record(ctx, endpoint, request_id).finish_refused(e.status().as_u16(), Instant::now());
                book(&self.ledger, None, record, Usage::NOTHING);
                Err(e)
            }
        }
    }

    /// Reserve `demand` from the tenant's limits and keep the permit on the call; a refusal is booked and
    /// returned.
    async fn acquire(&self, call: &mut Call, demand: Demand) -> Result<(), ApiError> {
        // Admitted before its body was read: the request (and slot) is held; add the images and cost.
        if let Some(permit) = &call.permit {
            if demand.images == 0 && demand.usd <= 0.0 {
                return Ok(());
            }
            let extended = permit.extend(demand.images, demand.usd).await;
            return extended.map_err(|denied| self.refused(call, denied.into_error(&call.ctx.tenant.name)));
        }
        let tenant = &call.ctx.tenant;
        match self.limiter.acquire(&tenant.id, &tenant.limits, demand).await {
            Ok(permit) => {
                call.permit = Some(permit);
                Ok(())
            }
            Err(denied) => Err(self.refused(call, denied.into_error(&tenant.name))),
        }
    }

    /// This caller's upstream call runs (it leads the identical requests waiting on it): reserve its images
    /// and cost now. A refusal is booked, and gives the request back (a refused request spends nothing).
    async fn lead(&self, call: &Call, images: u32, cost: f64) -> Result<(), ApiError> {
        let Some(permit) = &call.permit else { return Ok(()) };
        let extended = permit.extend(images, cost).await;
        extended.map_err(|denied| self.refused(call, denied.into_error(&call.ctx.tenant.name)))
    }

    /// A refusal by the limits, booked in the ledger (the limits already settled what they refused).
    fn refused(&self, call: &Call, e: ApiError) -> ApiError {
        let record = call.record.clone().finish_refused(e.status().as_u16(), call.started);
        book(&self.ledger, None, record, Usage::NOTHING);
        e
    }

    /// An error answered before anything was reserved: booked at no cost, with the tenant's buckets as they
    /// stand (a read that spends nothing), so every answer of the image routes carries the `x-ratelimit-*`
    /// headers.
    async fn refuse_unreserved(&self, call: &Call, e: ApiError) -> Failure {
        book(&self.ledger, None, call.finished(e.status().as_u16()), Usage::NOTHING);
        // A request admitted before its body was read gets its request and slot back: refused, it spent nothing.
        if let Some(permit) = &call.permit {
            permit.finish(Usage::REFUNDED);
        }
        self.unreserved(&call.ctx, e).await
    }

    /// `failure` with the tenant's buckets as they stand (a read that spends nothing) added to its headers.
    pub async fn unreserved(&self, ctx: &TenantContext, failure: impl Into<Failure>) -> Failure {
        let mut failure = failure.into();
        let mut headers = HeaderMap::new();
        ratelimit_headers::apply(&self.limiter.peek(&ctx.tenant.id, &ctx.tenant.limits).await, &mut headers);
        error::add_missing(&mut failure.headers, &headers);
        failure
    }

    /// Steps 5 and 6: the upstream call, then re-hosting of a successful whole answer. Failures are booked
    /// here (a failed re-host keeps the images' cost: the upstream billed them); on success the record is
    /// handed back unfinished, to be metered with the reply, with what the answer holds, read once
    /// ([`AnswerFacts`]: its images, usage and links; `None` for streams, errors and bodies that are not an
    /// answer).
    async fn fetch(
        &self,
        call: &Call,
        request: &ImageRequest,
    ) -> Result<(UpstreamReply, UsageRecord, Option<AnswerFacts>), ApiError> {
        let tenant = &call.ctx.tenant;
        let Some(upstream) = self.upstreams.get(tenant.upstream.as_deref()) else {
            let e = ApiError::Internal(anyhow::anyhow!(
                "tenant '{}' names upstream '{}', which is not configured on this gateway",
                tenant.name,
                tenant.upstream.as_deref().unwrap_or_default()
            ));
            book(&self.ledger, None, call.finished(e.status().as_u16()), Usage::NOTHING);
            return Err(e);
        };
        // An answer whose images become links is read with its base64 decoded as it arrives, not held.
        // Where the local disk stores them, each image goes to a staging file as it is decoded (`spill`).
        let (reading, spill) = call.plan.as_ref().map_or((Reading::Whole, None), |plan| self.rehoster.reading(plan));
        // In a block: what is read from the answer is moved into the re-hosting, and a local borrowed before
        // an `await` keeps its room in the future's state, which a request holds while the upstream works.
        let rehosting = {
            let attribution = Attribution {
                organization: tenant.organization.clone(),
                project: tenant.project.clone(),
                // Scoped to the tenant: two tenants choosing the same key must not share the upstream's answer.
                idempotency_key: call
                    .meta
                    .idempotency_key
                    .as_deref()
                    .map(|k| self.attributor.idempotency_key(&tenant.id, k)),
                user: self.end_user_of(&call.ctx, request),
            };
            let (reply, facts) = match upstream.send(request, &attribution, reading).await {
                Ok(reply) => {
                    let mut facts = facts_of(&reply);
                    let reply = held_to_request(reply, request, &mut facts);
                    (reply, facts)
                }
                Err(e) => {
                    let mut record = call.record.clone();
                    record.note_upstream_failure(&e);
                    let e = ApiError::from(e);
                    self.settle_failed(call, record.finish(e.status().as_u16(), call.started), &e);
                    return Err(e);
                }
            };
            if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
                // The upstream's limit, not the tenant's: passed on as it is, told apart in the logs, the
                // counters and the ledger (`refused_by = upstream`), and the request is given back.
                self.limiter.count_upstream_rate_limited();
                tracing::warn!(kind = "upstream.rate_limited", "the upstream answered 429");
            }
            let mut record = call.record.clone();
            record.note_deployment(&reply.headers);
            let Some(plan) = &call.plan else { return Ok((reply, record, facts)) };
            if !reply.status.is_success() {
                return Ok((reply, record, facts));
            }
            // Boxed: its state (the re-hosting of the answer) is no part of the future a request holds while it
            // waits on the upstream.
            Box::pin(self.rehost(call, plan, reply, spill.as_deref(), record, facts))
        };
        rehosting.await
    }

    /// Step 6: re-host a successful answer according to `plan`; a failure is booked here.
    async fn rehost(
        &self,
        call: &Call,
        plan: &Plan,
        reply: UpstreamReply,
        spill: Option<&Spill>,
        record: UsageRecord,
        facts: Option<AnswerFacts>,
    ) -> Result<(UpstreamReply, UsageRecord, Option<AnswerFacts>), ApiError> {
        let tenant = &call.ctx.tenant;
        let UpstreamReply { status, headers, body } = reply;
        let answer = match body {
            ReplyBody::Full(body) => Split::whole(body),
            ReplyBody::Split(split) => split,
            body @ ReplyBody::Stream(_) => return Ok((UpstreamReply { status, headers, body }, record, facts)),
        };
        let origin = Origin { tenant_id: &tenant.id, model: &call.model, request_id: &call.meta.request_id };
        // The body goes to re-hosting, which frees it once its images are decoded.
        match self.rehoster.apply(plan, answer, spill, origin).await {
            Ok(Rehosted::Unchanged(body)) => {
                Ok((UpstreamReply { status, headers, body: ReplyBody::Full(body) }, record, facts))
            }
            Ok(Rehosted::Rewritten(rewritten)) => {
                // The rewritten answer is links where base64 was: small, and read again for its new links.
                let facts = AnswerFacts::read(&rewritten);
                Ok((UpstreamReply { status, headers, body: ReplyBody::Full(rewritten) }, record, facts))
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
                // The images are booked as the upstream answered them (it billed them); the body is not needed.
                let reply = UpstreamReply { status, headers, body: ReplyBody::Full(bytes::Bytes::new()) };
                let mut record = record.finish_reply(&reply, facts.as_ref(), &self.prices, call.started);
                record.status = e.status().as_u16();
                self.settle(call, record);
                Err(e)
            }
        }
    }

    /// Book a finished record against the call's reservation: what the request used (images returned, its
    /// cost; the request given back when the upstream refused it).
    fn settle(&self, call: &Call, record: UsageRecord) {
        let used = usage_of(&record);
        book(&self.ledger, call.permit.as_ref(), record, used);
    }

    /// Book a request that failed without an answer: nothing used; the request given back as well when the
    /// upstream never processed it (it could not be reached) or imagegate refused it.
    fn settle_failed(&self, call: &Call, mut record: UsageRecord, e: &ApiError) {
        let refused = matches!(e, ApiError::RateLimited { .. } | ApiError::LimitsUnavailable { .. });
        if refused {
            record.refused_by = Some(usage::REFUSED_BY_GATEWAY);
        }
        let never_processed = refused || matches!(e, ApiError::UpstreamUnavailable(_) | ApiError::UpstreamBusy { .. });
        book(
            &self.ledger,
            call.permit.as_ref(),
            record,
            if never_processed { Usage::REFUNDED } else { Usage::NOTHING },
        );
    }

    /// Record a request refused before it reached the pipeline (unreadable body): it costs nothing.
    pub fn record_refusal(&self, ctx: &TenantContext, endpoint: Endpoint, request_id: &str, status: u16) {
        let record = unread_record(ctx, endpoint, request_id).finish(status, Instant::now());
        book(&self.ledger, None, record, Usage::NOTHING);
    }

    /// The reply of an uncached call, with its rate-limit headers; its usage is booked now, or, for a stream,
    /// as its events pass and when it ends (the stream holds the reservation until then).
    fn meter(
        &self,
        mut reply: UpstreamReply,
        record: UsageRecord,
        facts: Option<&AnswerFacts>,
        call: &Call,
    ) -> UpstreamReply {
        call.limit_headers(&mut reply.headers);
        let Some(permit) = call.permit.clone() else {
            book(&self.ledger, None, record.finish_reply(&reply, facts, &self.prices, call.started), Usage::NOTHING);
            return reply;
        };
        match reply.body {
            ReplyBody::Stream(stream) if reply.status.is_success() => {
                // The upstream's request id is known from the headers, before any event.
                let mut record = record;
                record.note_upstream_request_id(&reply.headers);
                let (ledger, settled) = (self.ledger.clone(), permit.clone());
                let done = move |record: UsageRecord| {
                    let used = usage_of(&record);
                    book(&ledger, Some(&settled), record, used);
                };
                // The concurrency slot (and the reservation's lease) is held until the stream ends.
                let hold = Some(crate::limits::SlotGuard(permit));
                let body =
                    metering::meter_stream(stream, record, self.prices.clone(), Box::new(done), hold, call.started);
                UpstreamReply { body: ReplyBody::Stream(body), ..reply }
            }
            _ => {
                self.settle(call, record.finish_reply(&reply, facts, &self.prices, call.started));
                reply
            }
        }
    }
}

/// The usage row of a request whose body was not read (or could not be): its model is not known.
fn unread_record(ctx: &TenantContext, endpoint: Endpoint, request_id: &str) -> UsageRecord {
    let mut record = UsageRecord::start(ctx, &ImageRequest::empty(endpoint), request_id, endpoint.default_model());
    record.model = "unknown".to_owned();
    record
}

fn set_cache_header(headers: &mut HeaderMap, outcome: Outcome) {
    headers.insert(crate::wire::headers::X_IMAGEGATE_CACHE, HeaderValue::from_static(outcome.as_str()));
}

/// A successful answer held to what `request` asked for (`images::answer`): a whole answer with more images
/// than asked for keeps the first `n`; a stream is capped in size and ends after its `n`th completed image.
/// The caller asked for and is charged `n`, and no extra image is downloaded, stored, cached or forwarded.
/// `facts` are the whole answer's (read once, [`facts_of`]) and are read again when it is cut.
fn held_to_request(reply: UpstreamReply, request: &ImageRequest, facts: &mut Option<AnswerFacts>) -> UpstreamReply {
    let n = request.n();
    if !reply.status.is_success() {
        return reply;
    }
    let body = match reply.body {
        ReplyBody::Stream(stream) => {
            ReplyBody::Stream(metering::held_to_request(stream, answer::max_stream_bytes(request), n))
        }
        // The facts counted no more than `n` images: nothing to cut, and no second read. (An answer the facts
        // could not read is still held to `n` if it has `data[]`: `hold_to_n` reads it.)
        body if facts.as_ref().is_some_and(|f| f.images <= n.max(1)) => body,
        // An answer whose images were decoded as it arrived: its skeleton is cut, and the cut items' images go.
        ReplyBody::Split(mut split) => {
            if let Some(held) = cut_to_n(&split.skeleton, n, facts) {
                let kept = usize::try_from(n.max(1)).unwrap_or(usize::MAX);
                split.images.retain(|(index, _)| *index < kept);
                split.skeleton = held;
            }
            ReplyBody::Split(split)
        }
        ReplyBody::Full(body) => match cut_to_n(&body, n, facts) {
            Some(held) => ReplyBody::Full(held),
            None => ReplyBody::Full(body),
        },
    };
    UpstreamReply { body, ..reply }
}

/// `body` with `data[]` cut to its first `n` items, warned about, and `facts` read again; `None` when it had no
/// more than `n`.
fn cut_to_n(body: &bytes::Bytes, n: u32, facts: &mut Option<AnswerFacts>) -> Option<bytes::Bytes> {
    let (held, items) = answer::hold_to_n(body, n)?;
    tracing::warn!(kind = "upstream.too_many_images", asked = n, answered = items, "kept the first n images");
    *facts = AnswerFacts::read(&held);
    Some(held)
}

/// What a successful whole answer holds, read once ([`AnswerFacts`]); `None` for errors and streams.
fn facts_of(reply: &UpstreamReply) -> Option<AnswerFacts> {
    match (&reply.body, reply.status.is_success()) {
        (ReplyBody::Full(body), true) => AnswerFacts::read(body),
        // Its images' base64 is left out, which the facts do not read anyway.
        (ReplyBody::Split(split), true) => AnswerFacts::read(&split.skeleton),
        _ => None,
    }
}
