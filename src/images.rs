//! The image pipeline, free of HTTP types: validate → limit → cache → upstream → re-host → usage.
//!
//! Handlers build an [`ImageRequest`] and call [`ImagesService::handle`]; everything a request goes through
//! after authentication happens here, in this order. Later stages plug in at the marked steps:
//! rate limits and quotas (step 2), the response cache (step 3), re-hosting of returned images (step 5) and
//! the usage ledger (step 6, today a structured `usage` log event).

pub mod imageinfo;
pub mod models;
pub mod multipart;
pub mod request;
pub mod usage;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use self::request::ImageRequest;
use self::validate::ValidationPolicy;
use crate::error::ApiError;
use crate::tenants::TenantContext;
use crate::upstream::{Attribution, Upstream, UpstreamReply};

/// Owns the pipeline's collaborators. Cheap to share behind `Arc`.
pub struct ImagesService {
    upstream: Arc<dyn Upstream>,
    policy: ValidationPolicy,
}

impl ImagesService {
    pub fn new(upstream: Arc<dyn Upstream>, policy: ValidationPolicy) -> Self {
        Self { upstream, policy }
    }

    /// Name of the configured upstream (`openai` or `mock`).
    pub fn upstream_name(&self) -> &'static str {
        self.upstream.name()
    }

    /// Run one request through the pipeline.
    #[tracing::instrument(name = "images", skip_all, fields(endpoint = request.endpoint.name(), model, n, stream))]
    pub async fn handle(
        &self,
        ctx: &TenantContext,
        request: ImageRequest,
        idempotency_key: Option<String>,
    ) -> Result<UpstreamReply, ApiError> {
        let started = Instant::now();
        // 1. Validate against the model's rules (structural checks happened while parsing).
        let validated = validate::validate(&request, &self.policy)?;
        let span = tracing::Span::current();
        span.record("model", validated.model.as_str());
        span.record("n", validated.n);
        span.record("stream", validated.stream);
        let model = validated.model;
        // 2. Rate limits and quotas: reserve requests and `n` images for the tenant.
        // 3. Cache: streaming requests bypass it; identical requests are answered once.
        // 4. Upstream.
        let attribution = Attribution {
            organization: ctx.tenant.organization.clone(),
            project: ctx.tenant.project.clone(),
            idempotency_key,
        };
        let outcome = self.upstream.send(&request, &attribution).await;
        // 5. Re-host returned images (durable links instead of expiring ones).
        // 6. Usage: one record per request, off the response path.
        let record = usage::UsageRecord::new(ctx, &request, &model, started, &outcome);
        record.emit();
        Ok(outcome?)
    }
}
