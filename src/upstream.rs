//! The seam between the gateway and whatever produces images: the [`Upstream`] trait, what goes in
//! ([`ImageRequest`] plus [`Attribution`]) and what comes out ([`UpstreamReply`]).
//!
//! [`Upstreams`] is the registry of every configured upstream and pool: `[upstream]` (or `[pools.default]`),
//! each named `[upstreams.<name>]` and each `[pools.<name>]`, which tenants choose with their `upstream`
//! setting. `pool` spreads requests over deployments and moves a request on only when the deployment it tried
//! provably generated nothing.
//!
//! `openai` forwards over HTTP to OpenAI, Azure's v1 API or any OpenAI-compatible server; `mock` answers
//! offline with real generated images. Upstream answers, errors included, are passed on as they are; only a
//! failure to get an answer becomes an [`UpstreamError`].

pub mod mock;
pub mod observed;
pub mod openai;
pub mod pool;
pub mod render;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::{HeaderMap, StatusCode};

use self::pool::{Deployment, Pool};
use crate::config::{Settings, UpstreamKind, UpstreamSettings};
use crate::error::ApiError;
pub use crate::images::answer::split::Split;
use crate::images::request::ImageRequest;

/// Whose bill this request goes on upstream: sent as `OpenAI-Organization` / `OpenAI-Project`, and who asked.
#[derive(Debug, Clone, Default)]
pub struct Attribution {
    pub organization: Option<String>,
    pub project: Option<String>,
    /// The caller's `Idempotency-Key`, forwarded unchanged.
    pub idempotency_key: Option<String>,
    /// The body's `user` as the upstream receives it (`crate::attribution`), set where the body is written
    /// ([`ImageRequest::outgoing`]); `None`: the caller's own `user`, if any, goes on as sent.
    pub user: Option<String>,
}

/// An upstream answer: status, the headers worth passing on, and the body.
pub struct UpstreamReply {
    pub status: StatusCode,
    /// Already filtered to `wire::headers::PASSED_THROUGH` plus `content-type`; the upstream's request id
    /// is under `wire::headers::X_UPSTREAM_REQUEST_ID`.
    pub headers: HeaderMap,
    pub body: ReplyBody,
}

/// How a successful whole answer is wanted.
#[derive(Clone)]
pub enum Reading {
    /// As it came.
    Whole,
    /// With the base64 of its `data[].b64_json` images decoded as it arrives, not held
    /// ([`ReplyBody::Split`]): re-hosting wants the images as links. With a sink, each image goes to it block
    /// by block as it is decoded ([`Image::Spilled`](crate::images::answer::split::Image)) and is never whole
    /// in memory; without, each is decoded into memory.
    DecodingImages(Option<Arc<dyn ImageSink>>),
}

impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Whole => f.write_str("Whole"),
            Self::DecodingImages(sink) => write!(f, "DecodingImages(sink: {})", sink.is_some()),
        }
    }
}

/// Where the images of an answer read with [`Reading::DecodingImages`] go as they are decoded: re-hosting's
/// staging files on disk. Implemented above this layer; the upstream only hands the blocks on.
pub trait ImageSink: Send + Sync {
    /// The next decoded bytes of the image in `slot` (the splitter's numbering). A failure is the sink's to
    /// keep and report when the image is finished; the answer is read on regardless (it is paid for).
    fn write(&self, slot: usize, block: Bytes) -> BoxFuture<'_, ()>;
}

/// A whole body, or an SSE stream passed on chunk by chunk.
pub enum ReplyBody {
    Full(Bytes),
    /// A whole answer read with [`Reading::DecodingImages`] that had images: the answer with their base64
    /// left out, and the images. Only re-hosting reads it; it becomes `Full` before anything is sent on.
    Split(Split),
    /// Chunks as they arrive. A failure mid-stream is turned into a final SSE `error` event by the upstream,
    /// so the stream itself never errors.
    Stream(BoxStream<'static, Bytes>),
}

impl std::fmt::Debug for UpstreamReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body = match &self.body {
            ReplyBody::Full(b) => format!("{} bytes", b.len()),
            ReplyBody::Split(s) => format!("{} bytes and {} images", s.skeleton.len(), s.images.len()),
            ReplyBody::Stream(_) => "stream".to_owned(),
        };
        f.debug_struct("UpstreamReply").field("status", &self.status).field("body", &body).finish()
    }
}

/// No answer could be had from the upstream. The variants are told apart by what the upstream may have done,
/// because that decides whether the request may go elsewhere and whether it may have been billed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing reached the upstream: connect refused or timed out, TLS failure. Nothing generated or billed.
    #[error("cannot reach upstream: {0}")]
    Unavailable(String),
    /// The request went out and no answer came within the deadline: the upstream may have generated (and
    /// billed) the images. Never retried or moved elsewhere.
    #[error("upstream timed out after {after:?}")]
    Timeout { after: Duration, deployment: Option<String> },
    /// The request went out and the connection broke before a whole answer (reset mid-answer): as ambiguous
    /// as a timeout.
    #[error("upstream connection broke after the request was sent: {detail}")]
    Broken { detail: String, deployment: Option<String> },
    /// Every deployment of the pool that serves the model is resting after a 429, out of capacity or
    /// unhealthy; `retry_after_ms` is when the soonest comes back.
    #[error("every deployment is busy")]
    Busy { retry_after_ms: u64 },
    /// No deployment of the pool serves this model.
    #[error("no deployment serves model {model}")]
    ModelNotServed { model: String },
    /// An answer the gateway will not pass on: a redirect, or larger than the request's answer limit. The
    /// upstream answered, so it may have billed: never retried or moved elsewhere.
    #[error("unusable upstream answer: {0}")]
    BadAnswer(String),
}

impl UpstreamError {
    /// The deployment the request went to, when the failure came after it was sent.
    pub fn deployment(&self) -> Option<&str> {
        match self {
            Self::Timeout { deployment, .. } | Self::Broken { deployment, .. } => deployment.as_deref(),
            _ => None,
        }
    }

    /// Whether the upstream may have generated (and billed) images: the request went out and no answer came.
    pub fn possibly_billed(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Broken { .. } | Self::BadAnswer(_))
    }

    /// The same failure, naming the deployment it happened at.
    pub fn at(self, name: &str) -> Self {
        match self {
            Self::Timeout { after, .. } => Self::Timeout { after, deployment: Some(name.to_owned()) },
            Self::Broken { detail, .. } => Self::Broken { detail, deployment: Some(name.to_owned()) },
            other => other,
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Unavailable(msg) => ApiError::UpstreamUnavailable(msg),
            UpstreamError::Timeout { after, .. } => ApiError::UpstreamTimeout(after),
            UpstreamError::Broken { detail, .. } => ApiError::UpstreamBroken(detail),
            UpstreamError::BadAnswer(detail) => ApiError::UpstreamBadAnswer(detail),
            UpstreamError::Busy { retry_after_ms } => ApiError::UpstreamBusy { retry_after_ms },
            UpstreamError::ModelNotServed { model } => ApiError::invalid_code(
                format!("The model '{model}' is not served by any deployment of this gateway's upstream pool."),
                Some("model"),
                "model_not_found",
            ),
        }
    }
}

/// Something that answers OpenAI image requests.
pub trait Upstream: Send + Sync + 'static {
    /// Send one request. Must never retry anything that may already have been billed. `reading` says how a
    /// successful whole answer is wanted; an upstream may always answer [`ReplyBody::Full`].
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        attribution: &'a Attribution,
        reading: Reading,
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

/// The name `[upstream]` goes by in metrics and logs.
pub const DEFAULT_NAME: &str = "default";

/// Every configured upstream and pool, by name. Cheap to share behind `Arc`. Every entry is a [`Pool`]: a
/// named upstream is a pool of one deployment, so a tenant's `upstream` setting names either.
pub struct Upstreams {
    default: Arc<Pool>,
    named: BTreeMap<String, Arc<Pool>>,
}

impl Upstreams {
    pub fn new(default: Arc<Pool>, named: BTreeMap<String, Arc<Pool>>) -> Self {
        Self { default, named }
    }

    /// Build `[upstream]`, every `[upstreams.<name>]` and every `[pools.<name>]` from validated settings. A
    /// deployment in several pools is one object, so its capacity and health are shared. Mock upstreams link
    /// their images to `public_url`.
    pub fn from_settings(
        settings: &Settings,
        public_url: &url::Url,
        mock_links: &mock::MockLinks,
    ) -> anyhow::Result<Self> {
        Self::from_settings_observed(settings, public_url, mock_links, None)
    }

    /// [`Upstreams::from_settings`], every deployment wrapped in [`observed::Observed`] when `metrics` is
    /// given: timed and counted under its name (`default` for `[upstream]`).
    pub fn from_settings_observed(
        settings: &Settings,
        public_url: &url::Url,
        mock_links: &mock::MockLinks,
        metrics: Option<&Arc<crate::metrics::Metrics>>,
    ) -> anyhow::Result<Self> {
        let observe = |name: &str, up: Arc<dyn Upstream>| -> Arc<dyn Upstream> {
            match metrics {
                Some(m) => Arc::new(observed::Observed::new(up, name, m.clone())),
                None => up,
            }
        };
        let mut deployments = BTreeMap::new();
        for (name, up) in &settings.upstreams {
            let upstream = build(up, public_url, mock_links).map_err(|e| anyhow::anyhow!("upstreams.{name}: {e}"))?;
            let upstream = observe(name, upstream);
            deployments.insert(name.clone(), Arc::new(Deployment::new(name, up, upstream)));
        }
        let mut named = BTreeMap::new();
        for (name, deployment) in &deployments {
            named.insert(name.clone(), Arc::new(Pool::new(name, vec![deployment.clone()])));
        }
        for (name, pool) in &settings.pools {
            let members = pool
                .deployments
                .iter()
                .map(|d| deployments.get(d).cloned().ok_or_else(|| anyhow::anyhow!("pools.{name}: no upstream {d}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            named.insert(name.clone(), Arc::new(Pool::new(name, members)));
        }
        let default = match named.get(crate::config::DEFAULT_POOL).filter(|_| settings.pools.contains_key("default")) {
            Some(pool) => pool.clone(),
            None => {
                let upstream = observe(DEFAULT_NAME, build(&settings.upstream, public_url, mock_links)?);
                let deployment = Arc::new(Deployment::new("upstream", &settings.upstream, upstream));
                Arc::new(Pool::new("upstream", vec![deployment]))
            }
        };
        Ok(Self::new(default, named))
    }

    /// The default pool: `[pools.default]` when configured, else `[upstream]` alone.
    pub fn default_pool(&self) -> &Arc<Pool> {
        &self.default
    }

    /// The pool a tenant's `upstream` setting names (`None` = the default); `None` when nothing of that name
    /// is configured on this gateway.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<Pool>> {
        match name {
            None => Some(&self.default),
            Some(name) => self.named.get(name),
        }
    }

    /// Every pool with its name, the default first (for the admin API).
    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        std::iter::once(&self.default).chain(self.named.values().filter(|p| !Arc::ptr_eq(p, &self.default)))
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
