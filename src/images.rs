//! The image pipeline, free of HTTP types: validate → authorise model → limit → cache → upstream → re-host →
//! usage.
//!
//! Handlers build an [`ImageRequest`] and call [`ImagesService::handle`]; everything a request goes through
//! after authentication happens here, in this order. The response cache plugs in at step 4; re-hosting
//! (`crate::rehost`) plans the caller's format before the upstream call and rewrites the answer after it.

pub mod imageinfo;
pub mod models;
pub mod multipart;
pub mod request;
pub mod usage;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use self::request::{Endpoint, ImageRequest};
use self::usage::UsageRecord;
use self::validate::ValidationPolicy;
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::limits::{Demand, Denied, Limiter, Permit, Refusal};
use crate::pricing::Prices;
use crate::rehost::{Origin, Rehoster};
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
}

/// Owns the pipeline's collaborators. Cheap to share behind `Arc`.
pub struct ImagesService {
    upstream: Arc<dyn Upstream>,
    policy: ValidationPolicy,
    prices: Arc<Prices>,
    ledger: Ledger,
    limiter: Limiter,
    rehoster: Arc<Rehoster>,
}

impl ImagesService {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        policy: ValidationPolicy,
        prices: Arc<Prices>,
        ledger: Ledger,
        limiter: Limiter,
        rehoster: Arc<Rehoster>,
    ) -> Self {
        Self { upstream, policy, prices, ledger, limiter, rehoster }
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
    #[tracing::instrument(name = "images", skip_all, fields(endpoint = request.endpoint.name(), model, n, stream))]
    pub async fn handle(
        &self,
        ctx: &TenantContext,
        request: ImageRequest,
        meta: RequestMeta,
    ) -> Result<UpstreamReply, ApiError> {
        let started = Instant::now();
        // 1. Validate against the model's rules (structural checks happened while parsing).
        let validated = match validate::validate(&request, &self.policy) {
            Ok(v) => v,
            Err(e) => {
                let record = UsageRecord::start(ctx, &request, &meta.request_id, &request.model());
                self.ledger.record(record.finish(e.status().as_u16(), started));
                return Err(e);
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
            return Err(e);
        }
        // 3. Rate limits and quotas: reserve the request and its `n` images, all or nothing.
        let demand = Demand { images: validated.n };
        let permit = match self.limiter.acquire(&ctx.tenant.id, &ctx.tenant.limits, demand).await {
            Ok(permit) => permit,
            Err(denied) => {
                let e = denied_error(&ctx.tenant.name, denied);
                self.ledger.record(record.finish(e.status().as_u16(), started));
                return Err(e);
            }
        };
        // 4. Cache: streaming requests bypass it; identical requests are answered once.
        // 5. Upstream, asked for what the caller's format needs (GPT image models never see response_format).
        let (request, plan) = self.rehoster.plan(request, validated.family, &ctx.tenant);
        let attribution = Attribution {
            organization: ctx.tenant.organization.clone(),
            project: ctx.tenant.project.clone(),
            idempotency_key: meta.idempotency_key,
        };
        let reply = match self.upstream.send(&request, &attribution).await {
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
        // 6. Re-host returned images (durable links instead of expiring ones, links instead of base64).
        let reply = match (plan, reply) {
            (Some(plan), UpstreamReply { status, headers, body: ReplyBody::Full(body) }) if status.is_success() => {
                let origin =
                    Origin { tenant_id: &ctx.tenant.id, model: &validated.model, request_id: &meta.request_id };
                match self.rehoster.apply(&plan, &body, origin).await {
                    Ok(rewritten) => {
                        UpstreamReply { status, headers, body: ReplyBody::Full(rewritten.unwrap_or(body)) }
                    }
                    Err(e) => {
                        // The upstream has billed for these images: the usage row keeps their cost.
                        let reply = UpstreamReply { status, headers, body: ReplyBody::Full(body) };
                        let e = match e {
                            crate::rehost::RehostError::Store(inner) => {
                                ApiError::Internal(anyhow::anyhow!("storing a re-hosted image failed: {inner}"))
                            }
                            other => ApiError::RehostFailed(other.to_string()),
                        };
                        let mut record = record.finish_reply(&reply, &self.prices, started);
                        record.status = e.status().as_u16();
                        self.settle(record, ctx);
                        return Err(e);
                    }
                }
            }
            (_, reply) => reply,
        };
        // 7. Usage: whole answers are metered now, streams as their events pass.
        Ok(self.meter(reply, record, ctx, permit, started))
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
