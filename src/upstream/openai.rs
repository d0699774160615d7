//! Forwarding over HTTP to OpenAI or any OpenAI-compatible API (Azure's v1 API with `auth = "api-key"`).
//!
//! The body goes out exactly as the caller sent it (a pool may have renamed `model`); only the credentials and
//! attribution headers are ours. Retries happen only when the connection could not be made, so a request is
//! never billed twice. Failures are told apart by what the upstream may have done: a failed connect
//! ([`UpstreamError::Unavailable`]) reached nothing; a deadline or a broken connection after the body went out
//! ([`UpstreamError::Timeout`], [`UpstreamError::Broken`]) may have generated, and billed, the images.
//!
//! Requests go through hyper's client directly (`transport`); each endpoint's URI is built once, at startup
//! (Azure deployment routes once per model), not parsed again per request.

mod transport;

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use url::Url;

use self::transport::{ChunkedBody, Failure, ResponseBody, Transport, USER_AGENT_VALUE, error_chain};
use super::{Attribution, Reading, ReplyBody, Upstream, UpstreamError, UpstreamReply, sse_error_event};
use crate::config::{UpstreamAuth, UpstreamRoute, UpstreamSettings};
use crate::images::answer::split::Splitter;
use crate::images::request::{Endpoint, ImageRequest, Outgoing};
use crate::wire::headers;

/// Resends after an HTTP/2 refusal (`REFUSED_STREAM`, graceful `GOAWAY`), which proves nothing was processed;
/// reqwest's number, kept.
const REFUSAL_RETRIES: u32 = 2;

/// Azure deployment routes kept per endpoint (one per model name seen); past it, a route is built per request.
const MAX_CACHED_ROUTES: usize = 256;

/// The HTTP upstream.
pub struct OpenAiUpstream {
    transport: Transport,
    routes: Routes,
    /// `authorization: Bearer …` or `api-key: …`, marked sensitive.
    credential: (HeaderName, HeaderValue),
    /// `authorization: Basic …` from credentials in `base_url` (`https://user:pass@host/v1`), sent before the
    /// key as reqwest did.
    basic_auth: Option<HeaderValue>,
    organization: Option<String>,
    project: Option<String>,
    timeout: Duration,
    stream_idle_timeout: Duration,
    connect_retries: u32,
}

/// Where each endpoint's requests go, built at startup (the query, `[upstream.query]` included, is in each).
enum Routes {
    /// `<base_url>/images/…`, the same for every request.
    Openai { generations: Uri, edits: Uri, variations: Uri },
    /// `<base_url>/deployments/<model>/images/…`: built from the model on first sight, then kept.
    AzureDeployment { base: Url, query: Vec<(String, String)>, seen: [RwLock<HashMap<String, Uri>>; 3] },
}

impl OpenAiUpstream {
    /// Build the client from validated settings.
    pub fn new(settings: &UpstreamSettings) -> anyhow::Result<Self> {
        // Whether a proxy applies depends on the scheme and host only.
        let root = uri(&endpoint_url(&settings.base_url, UpstreamRoute::Openai, Endpoint::Generations, "", &[]))?;
        Self::with_transport(settings, Transport::new(&root, settings.connect_timeout, settings.ca_file.as_deref())?)
    }

    fn with_transport(settings: &UpstreamSettings, transport: Transport) -> anyhow::Result<Self> {
        let api_key = settings.api_key.clone().ok_or_else(|| anyhow::anyhow!("upstream.api_key is not set"))?;
        let query: Vec<(String, String)> =
            settings.query.iter().map(|(k, v)| (k.clone(), v.expose().to_owned())).collect();
        let base = &settings.base_url;
        let routes = match settings.route {
            UpstreamRoute::Openai => Routes::Openai {
                generations: uri(&endpoint_url(base, settings.route, Endpoint::Generations, "", &query))?,
                edits: uri(&endpoint_url(base, settings.route, Endpoint::Edits, "", &query))?,
                variations: uri(&endpoint_url(base, settings.route, Endpoint::Variations, "", &query))?,
            },
            UpstreamRoute::AzureDeployment => {
                Routes::AzureDeployment { base: base.clone(), query, seen: Default::default() }
            }
        };
        let unsendable = "upstream.api_key holds characters an HTTP header cannot carry";
        let mut credential = match settings.auth {
            UpstreamAuth::Bearer => {
                (AUTHORIZATION, HeaderValue::try_from(format!("Bearer {}", api_key.expose())).context(unsendable)?)
            }
            UpstreamAuth::ApiKey => (
                HeaderName::from_static(headers::API_KEY),
                HeaderValue::try_from(api_key.expose()).context(unsendable)?,
            ),
        };
        credential.1.set_sensitive(true);
        Ok(Self {
            transport,
            routes,
            credential,
            basic_auth: basic_auth(base)?,
            organization: settings.organization.clone(),
            project: settings.project.clone(),
            timeout: settings.timeout,
            stream_idle_timeout: settings.stream_idle_timeout,
            connect_retries: settings.connect_retries,
        })
    }

    /// The URI of this request: the endpoint's, or on Azure's deployment route the one for its model, where
    /// the pool has already put the deployment's name for the model in `model`.
    fn uri(&self, request: &ImageRequest) -> Result<Uri, String> {
        match &self.routes {
            Routes::Openai { generations, edits, variations } => Ok(match request.endpoint {
                Endpoint::Generations => generations.clone(),
                Endpoint::Edits => edits.clone(),
                Endpoint::Variations => variations.clone(),
            }),
            Routes::AzureDeployment { base, query, seen } => {
                let seen = &seen[request.endpoint as usize];
                let model = request.model();
                if let Some(uri) = seen.read().unwrap_or_else(PoisonError::into_inner).get(&model) {
                    return Ok(uri.clone());
                }
                let built = uri(&endpoint_url(base, UpstreamRoute::AzureDeployment, request.endpoint, &model, query))
                    .map_err(|e| format!("builder error: {e}"))?;
                let mut seen = seen.write().unwrap_or_else(PoisonError::into_inner);
                if seen.len() < MAX_CACHED_ROUTES {
                    seen.insert(model, built.clone());
                }
                Ok(built)
            }
        }
    }

    /// The request as it goes out (built again for each attempt; the body's chunks are shared).
    fn build(
        &self,
        uri: Uri,
        body: &Outgoing,
        attribution: &Attribution,
    ) -> Result<http::Request<ChunkedBody>, http::header::InvalidHeaderValue> {
        let org = attribution.organization.as_ref().or(self.organization.as_ref());
        let project = attribution.project.as_ref().or(self.project.as_ref());
        // Room for the headers it will hold, no more: hyper keeps the map until the answer's headers arrive
        // (it reuses it for them), so a request waiting for its images holds it (`with_capacity(12)` was 1.2 KiB).
        let optional =
            [self.basic_auth.is_some(), org.is_some(), project.is_some(), attribution.idempotency_key.is_some()];
        let mut headers = HeaderMap::with_capacity(4 + optional.iter().filter(|&&set| set).count());
        headers.insert(CONTENT_TYPE, HeaderValue::from_str(&body.content_type)?);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(basic) = &self.basic_auth {
            headers.append(AUTHORIZATION, basic.clone());
        }
        headers.append(self.credential.0.clone(), self.credential.1.clone());
        if let Some(org) = org {
            headers.append(headers::OPENAI_ORGANIZATION, HeaderValue::from_str(org)?);
        }
        if let Some(project) = project {
            headers.append(headers::OPENAI_PROJECT, HeaderValue::from_str(project)?);
        }
        if let Some(key) = &attribution.idempotency_key {
            headers.append(headers::IDEMPOTENCY_KEY, HeaderValue::from_str(key)?);
        }
        // With tracing on: `traceparent` of the upstream call's span, so the upstream's trace joins ours.
        let mut last = None;
        for (name, value) in crate::traces::outgoing() {
            match name {
                Some(name) => {
                    headers.insert(name.clone(), value);
                    last = Some(name);
                }
                None => {
                    if let Some(name) = &last {
                        headers.append(name.clone(), value);
                    }
                }
            }
        }
        let mut request = http::Request::new(ChunkedBody::of(&body.chunks, body.len));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// Send, retrying failed connects, until response headers arrive or `deadline` passes.
    async fn send_with_retries(
        &self,
        request: &ImageRequest,
        attribution: &Attribution,
        deadline: Instant,
    ) -> Result<http::Response<ResponseBody>, UpstreamError> {
        // A request that cannot be put together fails as reqwest's builder errors did.
        let broken = |detail: String| UpstreamError::Broken { detail, deployment: None };
        let uri = self.uri(request).map_err(broken)?;
        // Written once for every attempt: the attempts share its chunks.
        let body = request.outgoing(attribution.user.as_deref());
        let mut attempt = 0;
        let mut refusals = 0;
        loop {
            let outgoing =
                self.build(uri.clone(), &body, attribution).map_err(|e| broken(format!("builder error: {e}")))?;
            let e = match tokio::time::timeout_at(deadline, self.transport.send(outgoing)).await {
                // The body went out (connects fail within `connect_timeout`, shorter than the deadline) and no
                // answer came: the upstream may be generating.
                Err(_) => return Err(UpstreamError::Timeout { after: self.timeout, deployment: None }),
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) => e,
            };
            match e.failure {
                // A connect error (refused, timed out, TLS) means no byte of the request reached the upstream:
                // safe to try again, and nothing can have been billed.
                Failure::Connect => {
                    if attempt >= self.connect_retries {
                        return Err(UpstreamError::Unavailable(e.detail));
                    }
                    attempt += 1;
                    tracing::warn!(attempt, error = %e.detail, "upstream connect failed, retrying");
                    let pause = Duration::from_millis(100 * 2u64.pow(attempt));
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(pause)).await.is_err() {
                        return Err(UpstreamError::Unavailable("connect retries ran out of time".to_owned()));
                    }
                }
                Failure::Timeout => return Err(UpstreamError::Timeout { after: self.timeout, deployment: None }),
                // Refused by HTTP/2 before any processing: resent at once, on another stream or connection.
                Failure::Refused if refusals < REFUSAL_RETRIES => {
                    refusals += 1;
                    tracing::debug!(error = %e.detail, "upstream refused the stream, resending");
                }
                // Connected, and then the exchange broke: the request may have been received.
                Failure::Refused | Failure::Other => return Err(broken(e.detail)),
            }
        }
    }

    /// Read the answer: a stream is handed on at once (then the idle deadline applies between chunks); a whole
    /// body must be complete by `deadline`, the same one the headers had. A successful one is read as
    /// `reading` asks; errors always whole.
    async fn read_reply(
        &self,
        response: http::Response<ResponseBody>,
        stream: bool,
        reading: Reading,
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
        let body = response.into_body();
        if stream && status.is_success() && is_sse {
            super::mark_event_stream(&mut headers);
            let body = sse_stream(body, self.stream_idle_timeout);
            return Ok(UpstreamReply { status, headers, body: ReplyBody::Stream(body) });
        }
        let reading = if status.is_success() { reading } else { Reading::Whole };
        let body = match tokio::time::timeout_at(deadline, read_capped(body, limit, reading)).await {
            Err(_) => return Err(UpstreamError::Timeout { after: self.timeout, deployment: None }),
            Ok(Err(Capped::Http(e))) if transport::is_timeout(&*e) => {
                return Err(UpstreamError::Timeout { after: self.timeout, deployment: None });
            }
            // The answer started and broke off (reset mid-answer): whatever it was, it may have been billed.
            Ok(Err(Capped::Http(e))) => {
                return Err(UpstreamError::Broken { detail: body_error(&*e), deployment: None });
            }
            Ok(Err(Capped::Over(declared))) => {
                return Err(UpstreamError::BadAnswer(format!(
                    "the answer is larger ({}) than this request's limit of {limit} bytes (images::answer)",
                    declared.map_or_else(|| "read past the limit".to_owned(), |n| format!("{n} bytes declared"))
                )));
            }
            Ok(Ok(body)) => body,
        };
        Ok(UpstreamReply { status, headers, body })
    }
}

/// `<base_url>/images/…`, or on Azure's deployment route `<base_url>/deployments/<model>/images/…`, with
/// `query` appended to any query `base_url` has, without the credentials or fragment `base_url` may hold: the
/// URL reqwest sent.
fn endpoint_url(base: &Url, route: UpstreamRoute, endpoint: Endpoint, model: &str, query: &[(String, String)]) -> Url {
    let mut url = base.clone();
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{path}{}", endpoint.path()));
    if route == UpstreamRoute::AzureDeployment {
        url.set_path(&path);
        let tail = endpoint.path().trim_start_matches('/').split('/');
        // Pushing a segment percent-encodes it; `path_segments_mut` fails only for URLs that cannot be a
        // base (validated http(s) URLs always can).
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push("deployments").push(model).extend(tail);
        }
    }
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    // Neither fails on an http(s) URL; the credentials go as `authorization: Basic` ([`basic_auth`]).
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_fragment(None);
    url
}

/// The URL as a request URI. The error does not name it: its query may hold `[upstream.query]` secrets.
fn uri(url: &Url) -> anyhow::Result<Uri> {
    Uri::try_from(url.as_str())
        .map_err(|e| anyhow::anyhow!("upstream.base_url cannot be sent as an HTTP request URI ({e})"))
}

/// `authorization: Basic` for credentials written into `base_url`, percent-decoded, as reqwest sent them.
fn basic_auth(base: &Url) -> anyhow::Result<Option<HeaderValue>> {
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().map(|s| s.into_owned());
    let Ok(username) = decode(base.username()) else { return Ok(None) };
    let password = base.password().and_then(|p| decode(p).ok());
    if username.is_empty() && password.is_none() {
        return Ok(None);
    }
    let pair = format!("{username}:{}", password.unwrap_or_default());
    let mut value = HeaderValue::try_from(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// A broken answer body's error, as reqwest worded it (reqwest's own errors already are).
fn body_error(e: &(dyn std::error::Error + 'static)) -> String {
    if e.is::<reqwest::Error>() {
        return error_chain(e);
    }
    format!("request or response body error: {}", error_chain(e))
}

impl Upstream for OpenAiUpstream {
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        attribution: &'a Attribution,
        reading: Reading,
    ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>> {
        Box::pin(async move {
            // One deadline for the whole answer (`upstream.timeout`), headers and body together.
            let deadline = Instant::now() + self.timeout;
            let response = self.send_with_retries(request, attribution, deadline).await?;
            let limit = crate::images::answer::max_answer_bytes(request);
            // Boxed: reading the answer is no part of what a request holds while the upstream works.
            Box::pin(self.read_reply(response, request.stream(), reading, deadline, limit)).await
        })
    }

    fn name(&self) -> &'static str {
        "openai"
    }
}

enum Capped {
    Http(Box<dyn std::error::Error + Send + Sync>),
    /// Over the limit: the declared length, if one was declared.
    Over(Option<u64>),
}

/// The whole body, refused as soon as it is known to exceed `limit`: from its declared length before a byte
/// is read, otherwise once the bytes read pass it. Never more than `limit` bytes are held. With
/// [`Reading::DecodingImages`], each chunk goes through a [`Splitter`] instead, which keeps the images decoded
/// and not their base64 (an answer without images comes back whole).
async fn read_capped(mut body: ResponseBody, limit: u64, reading: Reading) -> Result<ReplyBody, Capped> {
    let declared = body.size_hint().exact();
    if let Some(declared) = declared
        && declared > limit
    {
        return Err(Capped::Over(Some(declared)));
    }
    // The declared length (within the limit) is reserved at once: the answer is copied once, not again each
    // time a growing buffer doubles.
    let declared = declared.map(|n| usize::try_from(n).unwrap_or(0));
    let (mut out, sink) = match reading {
        Reading::Whole => (Collected::Whole(bytes::BytesMut::with_capacity(declared.unwrap_or(0))), None),
        Reading::DecodingImages(None) => (Collected::Split(Box::new(Splitter::new(declared))), None),
        Reading::DecodingImages(Some(sink)) => (Collected::Split(Box::new(Splitter::spilling(declared))), Some(sink)),
    };
    let mut read = 0u64;
    while let Some(frame) = body.frame().await {
        // Trailers, if any, are not part of the answer.
        let Ok(chunk) = frame.map_err(Capped::Http)?.into_data() else { continue };
        read += chunk.len() as u64;
        if read > limit {
            return Err(Capped::Over(None));
        }
        match &mut out {
            Collected::Whole(whole) => whole.extend_from_slice(&chunk),
            // Decoded here, chunk by chunk as it arrives: tens of microseconds a chunk, where the whole
            // answer's decode at once was milliseconds, and an answer holds its image only.
            Collected::Split(splitter) => {
                splitter.feed(&chunk);
                // Spilling: the decoded blocks go on to the sink (a staging file) as they are decoded. Its
                // writer keeps up or, a megabyte behind, makes this wait: the answer is then read more slowly,
                // not held.
                if let Some(sink) = &sink {
                    for (slot, block) in splitter.take_spilled() {
                        sink.write(slot, block).await;
                    }
                }
            }
        }
    }
    Ok(match out {
        Collected::Whole(whole) => ReplyBody::Full(whole.freeze()),
        Collected::Split(splitter) => {
            let split = splitter.finish();
            if split.images.is_empty() { ReplyBody::Full(split.skeleton) } else { ReplyBody::Split(split) }
        }
    })
}

/// What [`read_capped`] keeps of the chunks it reads. The splitter is boxed: its state would otherwise be part of
/// the future every request waiting on the upstream holds.
enum Collected {
    Whole(bytes::BytesMut),
    Split(Box<Splitter>),
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
fn sse_stream(body: ResponseBody, idle: Duration) -> futures::stream::BoxStream<'static, Bytes> {
    let chunks = http_body_util::BodyDataStream::new(body);
    futures::stream::unfold(Some(chunks), move |state| async move {
        let mut chunks = state?;
        match tokio::time::timeout(idle, chunks.next()).await {
            Ok(Some(Ok(bytes))) => Some((bytes, Some(chunks))),
            Ok(None) => None,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %body_error(&*e), "upstream stream broke");
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Secret;
    use crate::images::answer::split::Image;

    /// An HTTP/2-only TLS upstream that refuses the first `refusals` streams with `REFUSED_STREAM` and
    /// answers the others 200 with an empty image list; counts the streams opened.
    async fn refusing_upstream(refusals: usize) -> (u16, Arc<AtomicUsize>) {
        let acceptor = transport::tests::test_acceptor(&[b"h2"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams = Arc::new(AtomicUsize::new(0));
        let counted = streams.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, streams) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let Ok(mut connection) = h2::server::handshake(tls).await else { return };
                    while let Some(Ok((request, mut respond))) = connection.accept().await {
                        if streams.fetch_add(1, Ordering::SeqCst) < refusals {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let mut body = request.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let head = http::Response::builder()
                            .status(200)
                            .header(CONTENT_TYPE, "application/json")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(head, false).unwrap();
                        let _ = send.send_data(Bytes::from_static(br#"{"created":1,"data":[]}"#), true);
                    }
                });
            }
        });
        (port, streams)
    }

    fn upstream_at(port: u16) -> OpenAiUpstream {
        let settings = UpstreamSettings {
            base_url: Url::parse(&format!("https://localhost:{port}/v1")).unwrap(),
            api_key: Some(Secret::new("sk-test")),
            connect_retries: 0,
            ..UpstreamSettings::default()
        };
        OpenAiUpstream::with_transport(&settings, transport::tests::trusting_test_ca(Duration::from_secs(5))).unwrap()
    }

    fn generation() -> ImageRequest {
        ImageRequest::from_json(Endpoint::Generations, Bytes::from_static(br#"{"model":"dall-e-2","prompt":"x"}"#))
            .unwrap()
    }

    /// An HTTP/1.1 upstream that answers every request 200 with `answer`, in pieces of 1,000 bytes.
    async fn answering_upstream(answer: Vec<u8>) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    // Each request on the connection: its head, its body (by its length), then the answer.
                    while let Some(request) = transport::tests::read_head(&mut tcp).await {
                        let length = request
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:")?.trim().parse().ok())
                            .unwrap_or(0usize);
                        let mut body = vec![0u8; length];
                        if tcp.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            answer.len()
                        );
                        let _ = tcp.write_all(head.as_bytes()).await;
                        for piece in answer.chunks(1000) {
                            let _ = tcp.write_all(piece).await;
                            let _ = tcp.flush().await;
                        }
                    }
                });
            }
        });
        port
    }

    /// Read for re-hosting, a GPT answer's base64 is decoded as it arrives and not kept: what the reply holds
    /// is the answer without it, and the image.
    #[tokio::test]
    async fn an_answer_read_decoding_images_holds_the_images_not_their_base64() {
        let image: Vec<u8> = (0..150_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let text = base64::engine::general_purpose::STANDARD.encode(&image);
        let answer = format!(r#"{{"created":1,"data":[{{"b64_json":"{text}"}}],"usage":{{"total_tokens":9}}}}"#);
        let port = answering_upstream(answer.clone().into_bytes()).await;
        let settings = UpstreamSettings {
            base_url: Url::parse(&format!("http://127.0.0.1:{port}/v1")).unwrap(),
            api_key: Some(Secret::new("sk-test")),
            ..UpstreamSettings::default()
        };
        let upstream = OpenAiUpstream::new(&settings).unwrap();

        let reply = upstream.send(&generation(), &Attribution::default(), Reading::DecodingImages(None)).await.unwrap();
        let ReplyBody::Split(split) = reply.body else { panic!("an answer with images is split: {reply:?}") };
        assert_eq!(split.skeleton, &br#"{"created":1,"data":[{"b64_json":""}],"usage":{"total_tokens":9}}"#[..]);
        let [(0, Some(Image::Decoded(decoded)))] = split.images.as_slice() else {
            panic!("one image: {:?}", split.images)
        };
        assert_eq!(decoded.bytes, image);

        // Read whole, the same answer is the bytes that came.
        let reply = upstream.send(&generation(), &Attribution::default(), Reading::Whole).await.unwrap();
        let ReplyBody::Full(body) = reply.body else { panic!("a whole answer") };
        assert_eq!(body, answer.as_bytes());
    }

    /// Collects what it is handed, by slot.
    #[derive(Default)]
    struct Collecting(std::sync::Mutex<Vec<(usize, Bytes)>>);

    impl crate::upstream::ImageSink for Collecting {
        fn write(&self, slot: usize, block: Bytes) -> BoxFuture<'_, ()> {
            self.0.lock().unwrap().push((slot, block));
            Box::pin(async {})
        }
    }

    /// With a sink, the images go to it as they are decoded and the answer holds none of them.
    #[tokio::test]
    async fn an_answer_read_into_a_sink_hands_each_image_on_in_blocks_and_keeps_none() {
        let images: [Vec<u8>; 2] = [0, 1].map(|n| (0..700_000u32).map(|i| (i * 7 % 251) as u8 ^ n).collect());
        let [one, two] = images.each_ref().map(|i| base64::engine::general_purpose::STANDARD.encode(i));
        let answer = format!(r#"{{"created":1,"data":[{{"b64_json":"{one}"}},{{"b64_json":"{two}"}}]}}"#);
        let port = answering_upstream(answer.into_bytes()).await;
        let settings = UpstreamSettings {
            base_url: Url::parse(&format!("http://127.0.0.1:{port}/v1")).unwrap(),
            api_key: Some(Secret::new("sk-test")),
            ..UpstreamSettings::default()
        };
        let upstream = OpenAiUpstream::new(&settings).unwrap();
        let sink = Arc::new(Collecting::default());

        let reading = Reading::DecodingImages(Some(sink.clone()));
        let reply = upstream.send(&generation(), &Attribution::default(), reading).await.unwrap();
        let ReplyBody::Split(split) = reply.body else { panic!("an answer with images is split: {reply:?}") };
        let sha = |i: &Vec<u8>| -> [u8; 32] { <sha2::Sha256 as sha2::Digest>::digest(i).into() };
        let expected = [0, 1].map(|slot| (slot, Some(Image::Spilled { slot, sha256: sha(&images[slot]) })));
        assert_eq!(split.images, expected);
        let blocks = std::mem::take(&mut *sink.0.lock().unwrap());
        assert!(blocks.len() >= 8, "700 KB images come in blocks, not whole: {} blocks", blocks.len());
        for (slot, image) in images.iter().enumerate() {
            let got: Vec<u8> = blocks.iter().filter(|(s, _)| *s == slot).flat_map(|(_, b)| b.to_vec()).collect();
            assert!(got == *image, "image {slot}: {} bytes handed on", got.len());
        }
    }

    #[tokio::test]
    async fn a_stream_refused_by_an_http2_upstream_is_sent_again_twice_at_most() {
        let (port, streams) = refusing_upstream(2).await;
        let reply = upstream_at(port).send(&generation(), &Attribution::default(), Reading::Whole).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(streams.load(Ordering::SeqCst), 3, "refused twice, answered the third time");

        let (port, streams) = refusing_upstream(usize::MAX).await;
        let e = upstream_at(port).send(&generation(), &Attribution::default(), Reading::Whole).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Broken { .. }), "{e:?}");
        assert_eq!(streams.load(Ordering::SeqCst), 3, "the original and two resends");
    }

    fn query() -> Vec<(String, String)> {
        vec![("api-version".to_owned(), "2025-04-01-preview".to_owned()), ("key".to_owned(), "a b&c".to_owned())]
    }

    #[test]
    fn endpoint_uris_keep_the_base_query_append_the_configured_one_and_drop_credentials_and_fragment() {
        let base = Url::parse("https://user:p%40ss@example.openai.azure.com/openai/?keep=1#frag").unwrap();

        let url = endpoint_url(&base, UpstreamRoute::Openai, Endpoint::Edits, "", &query());
        assert_eq!(
            uri(&url).unwrap(),
            "https://example.openai.azure.com/openai/images/edits?keep=1&api-version=2025-04-01-preview&key=a+b%26c"
        );

        let url = endpoint_url(&base, UpstreamRoute::AzureDeployment, Endpoint::Generations, "east 1/x", &[]);
        assert_eq!(
            uri(&url).unwrap(),
            "https://example.openai.azure.com/openai/deployments/east%201%2Fx/images/generations?keep=1",
            "the deployment is one path segment, percent-encoded"
        );
    }

    #[test]
    fn credentials_in_the_base_url_go_as_basic_auth_decoded() {
        let with = Url::parse("https://user:p%40ss@proxy.example/v1").unwrap();
        let value = basic_auth(&with).unwrap().unwrap();
        assert_eq!(value, "Basic dXNlcjpwQHNz");
        assert!(value.is_sensitive());
        assert_eq!(basic_auth(&Url::parse("https://proxy.example/v1").unwrap()).unwrap(), None);
    }
}
