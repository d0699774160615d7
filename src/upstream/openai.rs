//! Forwarding over HTTP to OpenAI or any OpenAI-compatible API (Azure's v1 API with `auth = "api-key"`).
//!
//! The body goes out exactly as the caller sent it (a pool may have renamed `model`); only the credentials and
//! attribution headers are ours. Retries happen only when the connection could not be made, so a request is
//! never billed twice. Failures are told apart by what the upstream may have done: a failed connect
//! ([`UpstreamError::Unavailable`]) reached nothing; a deadline or a broken connection after the body went out
//! ([`UpstreamError::Timeout`], [`UpstreamError::Broken`]) may have generated, and billed, the images.

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderName};
use url::Url;

use super::{Attribution, ReplyBody, Upstream, UpstreamError, UpstreamReply, sse_error_event};
use crate::config::{Secret, UpstreamAuth, UpstreamRoute, UpstreamSettings};
use crate::images::request::{ImageRequest, Outgoing};
use crate::wire::headers;

/// The HTTP upstream.
pub struct OpenAiUpstream {
    client: reqwest::Client,
    base_url: Url,
    api_key: Secret,
    auth: UpstreamAuth,
    organization: Option<String>,
    project: Option<String>,
    query: Vec<(String, String)>,
    timeout: Duration,
    stream_idle_timeout: Duration,
    connect_retries: u32,
    route: UpstreamRoute,
}

impl OpenAiUpstream {
    /// Build the client from validated settings.
    pub fn new(settings: &UpstreamSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("imagegate/", env!("CARGO_PKG_VERSION")))
            // A redirect would resend the body and the key (Azure's `api-key` header survives reqwest's
            // cross-origin stripping) to whatever origin it names: never followed, answered 502.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let api_key = settings.api_key.clone().ok_or_else(|| anyhow::anyhow!("upstream.api_key is not set"))?;
        Ok(Self {
            client,
            base_url: settings.base_url.clone(),
            api_key,
            auth: settings.auth,
            organization: settings.organization.clone(),
            project: settings.project.clone(),
            query: settings.query.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect(),
            timeout: settings.timeout,
            stream_idle_timeout: settings.stream_idle_timeout,
            connect_retries: settings.connect_retries,
            route: settings.route,
        })
    }

    /// `<base_url>/images/…`, or on Azure's deployment route `<base_url>/deployments/<model>/images/…`, where
    /// the pool has already put the deployment's name for the model in `model`.
    fn url(&self, request: &ImageRequest) -> Url {
        let mut url = self.base_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{}", request.endpoint.path()));
        if self.route == UpstreamRoute::AzureDeployment {
            url.set_path(&base);
            let model = request.model();
            let tail = request.endpoint.path().trim_start_matches('/').split('/');
            // Pushing a segment percent-encodes it; `path_segments_mut` fails only for URLs that cannot be a
            // base (validated http(s) URLs always can).
            if let Ok(mut segments) = url.path_segments_mut() {
                segments.pop_if_empty().push("deployments").push(&model).extend(tail);
            }
        }
        url
    }

    fn build(&self, request: &ImageRequest, body: &Outgoing, attribution: &Attribution) -> reqwest::RequestBuilder {
        let mut builder = self
            .client
            .post(self.url(request))
            .header(CONTENT_TYPE, &body.content_type)
            .header(ACCEPT, "application/json")
            .body(ChunkedBody::of(body));
        if !self.query.is_empty() {
            builder = builder.query(&self.query);
        }
        builder = match self.auth {
            UpstreamAuth::Bearer => builder.bearer_auth(self.api_key.expose()),
            UpstreamAuth::ApiKey => builder.header(headers::API_KEY, self.api_key.expose()),
        };
        let org = attribution.organization.as_ref().or(self.organization.as_ref());
        let project = attribution.project.as_ref().or(self.project.as_ref());
        if let Some(org) = org {
            builder = builder.header(headers::OPENAI_ORGANIZATION, org);
        }
        if let Some(project) = project {
            builder = builder.header(headers::OPENAI_PROJECT, project);
        }
        if let Some(key) = &attribution.idempotency_key {
            builder = builder.header(headers::IDEMPOTENCY_KEY, key);
        }
        // With tracing on: `traceparent` of the upstream call's span, so the upstream's trace joins ours.
        builder.headers(crate::traces::outgoing())
    }

    async fn send_once(
        &self,
        request: &ImageRequest,
        body: &Outgoing,
        attribution: &Attribution,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.build(request, body, attribution).send().await
    }

    /// Send, retrying failed connects, until response headers arrive or `deadline` passes.
    async fn send_with_retries(
        &self,
        request: &ImageRequest,
        attribution: &Attribution,
        deadline: Instant,
    ) -> Result<reqwest::Response, UpstreamError> {
        // Written once for every attempt: the attempts share its chunks.
        let body = request.outgoing(attribution.user.as_deref());
        let mut attempt = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.send_once(request, &body, attribution)).await {
                // The body went out (connects fail within `connect_timeout`, shorter than the deadline) and no
                // answer came: the upstream may be generating.
                Err(_) => return Err(UpstreamError::Timeout { after: self.timeout, deployment: None }),
                Ok(Ok(response)) => return Ok(response),
                // A connect error (refused, timed out, TLS) means no byte of the request reached the upstream:
                // safe to try again, and nothing can have been billed.
                Ok(Err(e)) if e.is_connect() => {
                    if attempt >= self.connect_retries {
                        return Err(UpstreamError::Unavailable(error_chain(e)));
                    }
                    attempt += 1;
                    tracing::warn!(attempt, error = %error_chain(e), "upstream connect failed, retrying");
                    let pause = Duration::from_millis(100 * 2u64.pow(attempt));
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(pause)).await.is_err() {
                        return Err(UpstreamError::Unavailable("connect retries ran out of time".to_owned()));
                    }
                }
                Ok(Err(e)) if e.is_timeout() => {
                    return Err(UpstreamError::Timeout { after: self.timeout, deployment: None });
                }
                // Connected, and then the exchange broke: the request may have been received.
                Ok(Err(e)) => return Err(UpstreamError::Broken { detail: error_chain(e), deployment: None }),
            }
        }
    }

    /// Read the answer: a stream is handed on at once (then the idle deadline applies between chunks); a whole
    /// body must be complete by `deadline`, the same one the headers had.
    async fn read_reply(
        &self,
        response: reqwest::Response,
        stream: bool,
        deadline: Instant,
        limit: u64,
    ) -> Result<UpstreamReply, UpstreamError> {
        let status = response.status();
        if status.is_redirection() {
            return Err(UpstreamError::BadAnswer(format!("the upstream answered {status}, a redirect (not followed)")));
        }
        let mut headers = pass_through_headers(response.headers());
        let is_sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if stream && status.is_success() && is_sse {
            super::mark_event_stream(&mut headers);
            let body = sse_stream(response, self.stream_idle_timeout);
            return Ok(UpstreamReply { status, headers, body: ReplyBody::Stream(body) });
        }
        let body = match tokio::time::timeout_at(deadline, read_capped(response, limit)).await {
            Err(_) => return Err(UpstreamError::Timeout { after: self.timeout, deployment: None }),
            Ok(Err(Capped::Http(e))) if e.is_timeout() => {
                return Err(UpstreamError::Timeout { after: self.timeout, deployment: None });
            }
            // The answer started and broke off (reset mid-answer): whatever it was, it may have been billed.
            Ok(Err(Capped::Http(e))) => return Err(UpstreamError::Broken { detail: error_chain(e), deployment: None }),
            Ok(Err(Capped::Over(declared))) => {
                return Err(UpstreamError::BadAnswer(format!(
                    "the answer is larger ({}) than this request's limit of {limit} bytes (images::answer)",
                    declared.map_or_else(|| "read past the limit".to_owned(), |n| format!("{n} bytes declared"))
                )));
            }
            Ok(Ok(body)) => body,
        };
        Ok(UpstreamReply { status, headers, body: ReplyBody::Full(body) })
    }
}

impl Upstream for OpenAiUpstream {
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        attribution: &'a Attribution,
    ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>> {
        Box::pin(async move {
            // One deadline for the whole answer (`upstream.timeout`), headers and body together.
            let deadline = Instant::now() + self.timeout;
            let response = self.send_with_retries(request, attribution, deadline).await?;
            let limit = crate::images::answer::max_answer_bytes(request);
            self.read_reply(response, request.stream(), deadline, limit).await
        })
    }

    fn name(&self) -> &'static str {
        "openai"
    }
}

enum Capped {
    Http(reqwest::Error),
    /// Over the limit: the declared length, if one was declared.
    Over(Option<u64>),
}

/// The whole body, refused as soon as it is known to exceed `limit`: from its declared length before a byte
/// is read, otherwise once the bytes read pass it. Never more than `limit` bytes are held.
async fn read_capped(mut response: reqwest::Response, limit: u64) -> Result<Bytes, Capped> {
    if let Some(declared) = response.content_length()
        && declared > limit
    {
        return Err(Capped::Over(Some(declared)));
    }
    // The declared length (within the limit) is reserved at once: the answer is copied once, not again each
    // time a growing buffer doubles.
    let declared = response.content_length().map_or(0, |n| usize::try_from(n).unwrap_or(0));
    let mut body = bytes::BytesMut::with_capacity(declared);
    while let Some(chunk) = response.chunk().await.map_err(Capped::Http)? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(Capped::Over(None));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A request body sent as the chunks it is held in ([`Outgoing`]), with its exact length (so it goes with a
/// `Content-Length`, as one buffer would): a form's file data is not copied into one buffer to be sent.
struct ChunkedBody {
    chunks: std::collections::VecDeque<Bytes>,
    left: u64,
}

impl ChunkedBody {
    fn of(body: &Outgoing) -> reqwest::Body {
        match body.chunks.as_slice() {
            [one] => reqwest::Body::from(one.clone()),
            chunks => reqwest::Body::wrap(Self { chunks: chunks.iter().cloned().collect(), left: body.len }),
        }
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.chunks.pop_front().map(|chunk| {
            self.left = self.left.saturating_sub(chunk.len() as u64);
            Ok(http_body::Frame::data(chunk))
        });
        std::task::Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// The error and its causes, without the URL: reqwest's message names it, query included, and the query may
/// carry a secret (`[upstream.query]`, e.g. a key for a proxy in front of the upstream).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut current = std::error::Error::source(&e);
    while let Some(err) = current {
        out.push_str(": ");
        out.push_str(&err.to_string());
        current = err.source();
    }
    out
}

/// Keep only the headers worth passing on; rename the upstream's request id.
pub fn pass_through_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(ct) = upstream.get(CONTENT_TYPE) {
        out.insert(CONTENT_TYPE, ct.clone());
    }
    for name in headers::PASSED_THROUGH {
        if let Some(v) = upstream.get(*name) {
            out.insert(HeaderName::from_static(name), v.clone());
        }
    }
    if let Some(id) = upstream.get(headers::X_REQUEST_ID) {
        out.insert(HeaderName::from_static(headers::X_UPSTREAM_REQUEST_ID), id.clone());
    }
    out
}

/// The upstream's SSE body, chunk by chunk, with an idle deadline between chunks. A failure mid-stream ends
/// the stream with an SSE `error` event so every SDK raises instead of hanging or seeing a silent cut.
fn sse_stream(response: reqwest::Response, idle: Duration) -> futures::stream::BoxStream<'static, Bytes> {
    let chunks = response.bytes_stream();
    futures::stream::unfold(Some(chunks), move |state| async move {
        let mut chunks = state?;
        match tokio::time::timeout(idle, chunks.next()).await {
            Ok(Some(Ok(bytes))) => Some((bytes, Some(chunks))),
            Ok(None) => None,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %error_chain(e), "upstream stream broke");
                Some((interrupted("The upstream stream was interrupted."), None))
            }
            Err(_) => {
                tracing::warn!(idle_secs = idle.as_secs(), "upstream stream went silent");
                Some((interrupted("The upstream stream stalled and was closed by the gateway."), None))
            }
        }
    })
    .boxed()
}

fn interrupted(message: &str) -> Bytes {
    // Leading line breaks end any half-sent event before ours (extra blank lines are ignored by SSE parsers).
    let event = sse_error_event(message, "server_error", Some("upstream_stream_interrupted"));
    let mut out = Vec::with_capacity(event.len() + 2);
    out.extend_from_slice(b"\n\n");
    out.extend_from_slice(&event);
    Bytes::from(out)
}
