//! One usage record per request: who, what, how many images, tokens, status and latency. Emitted as a
//! structured `tracing` event on the `imagegate::usage` target; the database ledger reads the same record.
//!
//! Never holds prompt text or image data: counts are read from the response without keeping it.

use std::time::Instant;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::request::ImageRequest;
use crate::tenants::TenantContext;
use crate::upstream::{ReplyBody, UpstreamError, UpstreamReply};
use crate::wire::headers;

/// What one request used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub tenant: String,
    pub key_id: String,
    pub endpoint: &'static str,
    pub model: String,
    pub images_requested: u32,
    /// Images in a successful non-streaming answer; `None` when not known (streams, failures).
    pub images_returned: Option<u32>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Upstream HTTP status, or the gateway's status when no answer came.
    pub status: u16,
    pub latency_ms: u64,
    pub stream: bool,
    pub upstream_request_id: Option<String>,
}

#[derive(Deserialize)]
struct ResponseCounts {
    #[serde(default)]
    data: Vec<IgnoredAny>,
    #[serde(default)]
    usage: Option<Tokens>,
}

#[derive(Deserialize)]
struct Tokens {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl UsageRecord {
    /// Build the record from the request and whatever the upstream answered.
    pub fn new(
        ctx: &TenantContext,
        request: &ImageRequest,
        model: &str,
        started: Instant,
        outcome: &Result<UpstreamReply, UpstreamError>,
    ) -> Self {
        let mut record = Self {
            tenant: ctx.tenant.name.clone(),
            key_id: ctx.key_id.clone(),
            endpoint: request.endpoint.name(),
            model: model.to_owned(),
            images_requested: request.n(),
            images_returned: None,
            input_tokens: None,
            output_tokens: None,
            status: 0,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            stream: request.stream(),
            upstream_request_id: None,
        };
        match outcome {
            Ok(reply) => {
                record.status = reply.status.as_u16();
                record.upstream_request_id =
                    reply.headers.get(headers::X_UPSTREAM_REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned);
                if let (true, ReplyBody::Full(body)) = (reply.status.is_success(), &reply.body)
                    && let Ok(counts) = serde_json::from_slice::<ResponseCounts>(body)
                {
                    record.images_returned = u32::try_from(counts.data.len()).ok();
                    record.input_tokens = counts.usage.as_ref().and_then(|u| u.input_tokens);
                    record.output_tokens = counts.usage.as_ref().and_then(|u| u.output_tokens);
                }
            }
            Err(UpstreamError::Unavailable(_)) => record.status = 502,
            Err(UpstreamError::Timeout(_)) => record.status = 504,
        }
        record
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
            status = self.status,
            latency_ms = self.latency_ms,
            stream = self.stream,
            upstream_request_id = self.upstream_request_id.as_deref(),
            "usage"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, StatusCode};

    use super::*;
    use crate::images::request::Endpoint;
    use crate::tenants::Tenant;

    #[test]
    fn counts_images_and_tokens_without_keeping_the_body() {
        let ctx = TenantContext {
            tenant: Arc::new(Tenant { name: "t".into(), organization: None, project: None }),
            key_id: "abcd1234".into(),
        };
        let req = ImageRequest::from_json(
            Endpoint::Generations,
            Bytes::from_static(br#"{"prompt":"p","n":2,"model":"gpt-image-1"}"#),
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(headers::X_UPSTREAM_REQUEST_ID, HeaderValue::from_static("req_1"));
        let body = br#"{"created":1,"data":[{"b64_json":"AAAA"},{"b64_json":"BBBB"}],"usage":{"input_tokens":7,"output_tokens":2112,"total_tokens":2119}}"#;
        let outcome =
            Ok(UpstreamReply { status: StatusCode::OK, headers, body: ReplyBody::Full(Bytes::from_static(body)) });
        let r = UsageRecord::new(&ctx, &req, "gpt-image-1", Instant::now(), &outcome);
        assert_eq!((r.images_requested, r.images_returned), (2, Some(2)));
        assert_eq!((r.input_tokens, r.output_tokens), (Some(7), Some(2112)));
        assert_eq!(r.upstream_request_id.as_deref(), Some("req_1"));
        assert!(!format!("{r:?}").contains("AAAA"));
    }
}
