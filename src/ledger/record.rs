//! One usage record per request: who, what, how many images, tokens, estimated cost, status and latency.
//! Built by the pipeline from the request and the upstream's answer, persisted by the ledger, and also emitted
//! as a structured `imagegate::usage` log event.
//!
//! Never holds image data; prompt text only when the tenant opted in.

use std::time::Instant;

use crate::domain::TenantContext;
use crate::images::request::ImageRequest;
use crate::pricing::{Metered, Prices};
use crate::upstream::{ReplyBody, UpstreamReply};
use crate::wire::AnswerFacts;
use crate::wire::headers;

/// What one request used.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub request_id: String,
    pub created_at: i64,
    pub tenant_id: String,
    pub tenant: String,
    pub key_id: String,
    pub endpoint: &'static str,
    pub model: String,
    /// The model the caller named, when an alias moved the request to `model`.
    pub requested_model: Option<String>,
    pub images_requested: u32,
    /// Images in a successful answer; `None` when not known.
    pub images_returned: Option<u32>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Estimated USD; 0 for failed, refused and cached requests, and for unpriced models.
    pub cost_usd: f64,
    /// HTTP status returned to the caller.
    pub status: u16,
    pub latency_ms: u64,
    pub stream: bool,
    pub cache_hit: bool,
    /// Who refused the request: [`REFUSED_BY_GATEWAY`] (imagegate's limits: a 429, or the fail-closed 503)
    /// or [`REFUSED_BY_UPSTREAM`] (the upstream answered 429); `None` otherwise.
    pub refused_by: Option<&'static str>,
    pub upstream_request_id: Option<String>,
    /// The pool deployment the request went to (`x-imagegate-deployment`); `None` when none was reached.
    pub deployment: Option<String>,
    /// The request went upstream and no answer came (deadline, connection broken): the upstream may have
    /// generated and billed images this row cannot count.
    pub possibly_billed: bool,
    /// Only when the tenant opted into prompt logging.
    pub prompt: Option<String>,
}

/// `refused_by` of a request imagegate's own limits refused.
pub const REFUSED_BY_GATEWAY: &str = "gateway";
/// `refused_by` of a request the upstream refused with 429.
pub const REFUSED_BY_UPSTREAM: &str = "upstream";

impl UsageRecord {
    /// A record for `request` before its outcome is known.
    pub fn start(ctx: &TenantContext, request: &ImageRequest, request_id: &str, model: &str) -> Self {
        Self {
            request_id: request_id.to_owned(),
            created_at: 0,
            tenant_id: ctx.tenant.id.clone(),
            tenant: ctx.tenant.name.clone(),
            key_id: ctx.key_id.clone(),
            endpoint: request.endpoint.name(),
            model: model.to_owned(),
            requested_model: None,
            images_requested: request.n(),
            images_returned: None,
            size: request.field_str("size"),
            quality: request.field_str("quality"),
            input_tokens: None,
            output_tokens: None,
            cost_usd: 0.0,
            status: 0,
            latency_ms: 0,
            stream: request.stream(),
            cache_hit: false,
            refused_by: None,
            upstream_request_id: None,
            deployment: None,
            possibly_billed: false,
            prompt: ctx.tenant.log_prompts.then(|| request.field_str("prompt")).flatten(),
        }
    }

    /// Close the record with a status and no billable output (refusals, failures).
    pub fn finish(mut self, status: u16, started: Instant) -> Self {
        self.status = status;
        self.created_at = crate::time::now_ms();
        self.latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Close the record of a request imagegate's limits refused.
    pub fn finish_refused(mut self, status: u16, started: Instant) -> Self {
        self.refused_by = Some(REFUSED_BY_GATEWAY);
        self.finish(status, started)
    }

    /// Close the record from a whole upstream answer: images, tokens and cost from a 2xx body, as `facts`
    /// read it (the pipeline reads each answer once, [`AnswerFacts::read`]).
    pub fn finish_reply(
        mut self,
        reply: &UpstreamReply,
        facts: Option<&AnswerFacts>,
        prices: &Prices,
        started: Instant,
    ) -> Self {
        if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
            self.refused_by = Some(REFUSED_BY_UPSTREAM);
        }
        self.note_upstream_request_id(&reply.headers);
        let whole = matches!(reply.body, ReplyBody::Full(_) | ReplyBody::Split(_));
        if let (true, true, Some(facts)) = (reply.status.is_success(), whole, facts) {
            self.add_output(facts.images, facts.usage.as_ref(), prices);
        }
        self.finish(reply.status.as_u16(), started)
    }

    /// Take the upstream's request id from its reply headers (whole answers and streams alike).
    pub fn note_upstream_request_id(&mut self, reply_headers: &http::HeaderMap) {
        self.upstream_request_id =
            reply_headers.get(headers::X_UPSTREAM_REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned);
    }

    /// Take the deployment that answered from the reply headers the pool set.
    pub fn note_deployment(&mut self, reply_headers: &http::HeaderMap) {
        if let Some(name) = reply_headers.get(headers::X_IMAGEGATE_DEPLOYMENT).and_then(|v| v.to_str().ok()) {
            self.deployment = Some(name.to_owned());
        }
    }

    /// A failure without an answer: where it happened, and whether the images may have been billed.
    pub fn note_upstream_failure(&mut self, e: &crate::upstream::UpstreamError) {
        if let Some(name) = e.deployment() {
            self.deployment = Some(name.to_owned());
        }
        self.possibly_billed = e.possibly_billed();
        if matches!(e, crate::upstream::UpstreamError::Busy { .. }) {
            // The pool's deployments are at their quotas (or answered 429): the upstream side refused.
            self.refused_by = Some(REFUSED_BY_UPSTREAM);
        }
    }

    /// Close the record of a request answered from the cache (or by a concurrent identical request's upstream
    /// call): its images, no tokens, cost 0.
    pub fn finish_cached(mut self, status: u16, images: Option<u32>, started: Instant) -> Self {
        if (200..300).contains(&status) {
            self.images_returned = images;
        }
        if status == 429 {
            self.refused_by = Some(REFUSED_BY_UPSTREAM);
        }
        self.cache_hit = true;
        self.finish(status, started)
    }

    pub(crate) fn add_output(&mut self, images: u32, usage: Option<&serde_json::Value>, prices: &Prices) {
        self.images_returned = Some(self.images_returned.unwrap_or(0) + images);
        if let Some(u) = usage {
            let get = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
            if let Some(i) = get("input_tokens") {
                self.input_tokens = Some(self.input_tokens.unwrap_or(0) + i);
            }
            if let Some(o) = get("output_tokens") {
                self.output_tokens = Some(self.output_tokens.unwrap_or(0) + o);
            }
        }
        let metered =
            Metered { model: &self.model, size: self.size.as_deref(), quality: self.quality.as_deref(), images, usage };
        match prices.estimate(&metered) {
            Some(cost) => self.cost_usd += cost,
            None if images > 0 => tracing::warn!(model = %self.model, "model has no price: usage cost recorded as 0"),
            None => {}
        }
    }

    /// Write the record as a structured event.
    pub fn emit(&self) {
        tracing::info!(
            target: "imagegate::usage",
            tenant = %self.tenant,
            key_id = %self.key_id,
            endpoint = self.endpoint,
            model = %self.model,
            images_requested = self.images_requested,
            images_returned = self.images_returned,
            input_tokens = self.input_tokens,
            output_tokens = self.output_tokens,
            cost_usd = self.cost_usd,
            status = self.status,
            latency_ms = self.latency_ms,
            stream = self.stream,
            cache_hit = self.cache_hit,
            refused_by = self.refused_by,
            upstream_request_id = self.upstream_request_id.as_deref(),
            deployment = self.deployment.as_deref(),
            possibly_billed = self.possibly_billed,
            "usage"
        );
    }
}
