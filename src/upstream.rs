//! The seam between the gateway and whatever produces images: the [`Upstream`] trait, what goes in
//! ([`ImageRequest`] plus [`Attribution`]) and what comes out ([`UpstreamReply`]).
//!
//! [`Upstreams`] is the registry of every configured upstream: `[upstream]`, the default, and each named
//! `[upstreams.<name>]`, which tenants choose with their `upstream` setting.
//!
//! `openai` forwards over HTTP to OpenAI, Azure's v1 API or any OpenAI-compatible server; `mock` answers
//! offline with real generated images. Upstream answers, errors included, are passed on as they are; only a
//! failure to get an answer becomes an [`UpstreamError`].

pub mod mock;
pub mod openai;
pub mod render;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::{HeaderMap, StatusCode};

use crate::config::{Settings, UpstreamKind, UpstreamSettings};
use crate::error::ApiError;
use crate::images::request::ImageRequest;

/// Whose bill this request goes on upstream: sent as `OpenAI-Organization` / `OpenAI-Project`.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    pub organization: Option<String>,
    pub project: Option<String>,
    /// The caller's `Idempotency-Key`, forwarded unchanged.
    pub idempotency_key: Option<String>,
}

/// An upstream answer: status, the headers worth passing on, and the body.
pub struct UpstreamReply {
    pub status: StatusCode,
    /// Already filtered to `wire::headers::PASSED_THROUGH` plus `content-type`; the upstream's request id
    /// is under `wire::headers::X_UPSTREAM_REQUEST_ID`.
    pub headers: HeaderMap,
    pub body: ReplyBody,
}

/// A whole body, or an SSE stream passed on chunk by chunk.
pub enum ReplyBody {
    Full(Bytes),
    /// Chunks as they arrive. A failure mid-stream is turned into a final SSE `error` event by the upstream,
    /// so the stream itself never errors.
    Stream(BoxStream<'static, Bytes>),
}

impl std::fmt::Debug for UpstreamReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = match &self.body {
            ReplyBody::Full(b) => format!("{} bytes", b.len()),
            ReplyBody::Stream(_) => "stream".to_owned(),
        };
        f.debug_struct("UpstreamReply").field("status", &self.status).field("body", &body).finish()
    }
}

/// No answer could be had from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connect, TLS or connection-reset failures.
    #[error("cannot reach upstream: {0}")]
    Unavailable(String),
    /// No answer within the deadline.
    #[error("upstream timed out after {0:?}")]
    Timeout(Duration),
    /// An answer the gateway will not pass on: a redirect, or larger than the request's answer limit.
    #[error("unusable upstream answer: {0}")]
    BadAnswer(String),
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Unavailable(msg) => ApiError::UpstreamUnavailable(msg),
            UpstreamError::Timeout(d) => ApiError::UpstreamTimeout(d),
            UpstreamError::BadAnswer(detail) => ApiError::UpstreamBadAnswer(detail),
        }
    }
}

/// Something that answers OpenAI image requests.
pub trait Upstream: Send + Sync + 'static {
    /// Send one request. Must never retry anything that may already have been billed.
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        attribution: &'a Attribution,
    ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>>;

    /// `openai` or `mock`, for logs.
    fn name(&self) -> &'static str;
}

/// Frame an error as the final SSE event of a stream, in the shape every SDK version raises on.
pub fn sse_error_event(message: &str, kind: &str, code: Option<&str>) -> Bytes {
    let data = crate::error::error_json(message, kind, None, code);
    let mut out = Vec::with_capacity(data.len() + 32);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Every configured upstream, by name. Cheap to share behind `Arc`.
pub struct Upstreams {
    default: Arc<dyn Upstream>,
    named: BTreeMap<String, Arc<dyn Upstream>>,
}

impl Upstreams {
    pub fn new(default: Arc<dyn Upstream>, named: BTreeMap<String, Arc<dyn Upstream>>) -> Self {
        Self { default, named }
    }

    /// Build `[upstream]` and every `[upstreams.<name>]` from validated settings. Mock upstreams link their
    /// images to `public_url`.
    pub fn from_settings(
        settings: &Settings,
        public_url: &url::Url,
        mock_links: &mock::MockLinks,
    ) -> anyhow::Result<Self> {
        let default = build(&settings.upstream, public_url, mock_links)?;
        let mut named = BTreeMap::new();
        for (name, up) in &settings.upstreams {
            let upstream = build(up, public_url, mock_links).map_err(|e| anyhow::anyhow!("upstreams.{name}: {e}"))?;
            named.insert(name.clone(), upstream);
        }
        Ok(Self::new(default, named))
    }

    /// `[upstream]`.
    pub fn default_upstream(&self) -> &Arc<dyn Upstream> {
        &self.default
    }

    /// The upstream a tenant's `upstream` setting names (`None` = `[upstream]`); `None` when no upstream of
    /// that name is configured on this gateway.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<dyn Upstream>> {
        match name {
            None => Some(&self.default),
            Some(name) => self.named.get(name),
        }
    }
}

fn build(
    settings: &UpstreamSettings,
    public_url: &url::Url,
    mock_links: &mock::MockLinks,
) -> anyhow::Result<Arc<dyn Upstream>> {
    Ok(match settings.kind {
        UpstreamKind::Openai => Arc::new(openai::OpenAiUpstream::new(settings)?),
        UpstreamKind::Mock => Arc::new(mock::MockUpstream::new(public_url.clone(), mock_links.clone())),
    })
}

/// Headers every relayed SSE stream carries: `Cache-Control: no-cache` (no cache or proxy may store or replay
/// it) and `X-Accel-Buffering: no` (nginx and compatible proxies pass each event on at once instead of
/// buffering the stream).
pub fn mark_event_stream(headers: &mut HeaderMap) {
    headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    headers.insert(http::HeaderName::from_static("x-accel-buffering"), http::HeaderValue::from_static("no"));
}
