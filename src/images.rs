//! The image pipeline, free of HTTP types: validate → authorise model → limit → cache → upstream → re-host →
//! usage.
//!
//! Handlers build an [`ImageRequest`] and call [`ImagesService::handle`]; everything a request goes through
//! after authentication happens here, in this order. Rate limits and quotas (step 3), the response cache
//! (step 4) and re-hosting of returned images (step 6) plug in at the marked steps.

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
use crate::pricing::Prices;
use crate::tenants::TenantContext;
use crate::upstream::{Attribution, ReplyBody, Upstream, UpstreamReply};

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
}

impl ImagesService {
    pub fn new(upstream: Arc<dyn Upstream>, policy: ValidationPolicy, prices: Arc<Prices>, ledger: Ledger) -> Self {
        Self { upstream, policy, prices, ledger }
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
        // 3. Rate limits and quotas: reserve requests and `n` images for the tenant.
        // 4. Cache: streaming requests bypass it; identical requests are answered once.
        // 5. Upstream.
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
        // 6. Re-host returned images (durable links instead of expiring ones).
        // 7. Usage: whole answers are metered now, streams as their events pass.
        Ok(self.meter(reply, record, started))
    }

    /// Record a request refused before it reached the pipeline (unreadable body): it costs nothing.
    pub fn record_refusal(&self, ctx: &TenantContext, endpoint: Endpoint, request_id: &str, status: u16) {
        let mut record = UsageRecord::start(ctx, &ImageRequest::empty(endpoint), request_id, endpoint.default_model());
        record.model = "unknown".to_owned();
        self.ledger.record(record.finish(status, Instant::now()));
    }

    fn meter(&self, reply: UpstreamReply, record: UsageRecord, started: Instant) -> UpstreamReply {
        match reply.body {
            ReplyBody::Stream(stream) if reply.status.is_success() => {
                let body = usage::meter_stream(stream, record, self.prices.clone(), self.ledger.clone(), started);
                UpstreamReply { body: ReplyBody::Stream(body), ..reply }
            }
            _ => {
                self.ledger.record(record.finish_reply(&reply, &self.prices, started));
                reply
            }
        }
    }
}
