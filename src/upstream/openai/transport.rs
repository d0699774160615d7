//! How a request reaches the upstream: hyper's client directly ([`Transport::Direct`]), or reqwest when the
//! environment names an egress proxy for the upstream's URL ([`Transport::Proxied`]). Chosen once, at startup.
//!
//! The direct client is set up as reqwest set up its own (reqwest is hyper's client plus a redirect layer, a
//! proxy matcher and a URL parsed twice per request, none of which the upstream needs): rustls with the
//! webpki roots and the ring provider (unless the process installed a default one), ALPN `h2` + `http/1.1`
//! (HTTP/2 when a TLS upstream offers it, HTTP/1.1 over plain http), one connect timeout over TCP and TLS
//! together, TCP_NODELAY, TCP keepalive 15 s × 3 and a 30 s TCP user timeout, idle connections kept 90 s.
//! Unlike reqwest alone, either way is several pooled clients ([`Spread`]): each takes
//! [`STREAMS_PER_CONNECTION`] requests in flight before the next one is used, so requests beyond one HTTP/2
//! connection's stream limit go out on further connections instead of waiting, unsent, for a stream to end.
//! Proxies (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, as curl reads them) are left to reqwest,
//! which speaks to them (absolute-form requests, `CONNECT` tunnels, credentials in the proxy URL).
//!
//! Errors come back classified ([`Failure`]) with a text that never holds the request's URL (its query may
//! carry a secret).

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Sent as `user-agent` on every upstream request (and, through a proxy, on its `CONNECT`).
pub(super) const USER_AGENT_VALUE: &str = concat!("imagegate/", env!("CARGO_PKG_VERSION"));

/// Idle upstream connections are closed after this long (reqwest's default, kept).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Requests in flight one client (over HTTP/2: one connection) is given before the next client takes them.
/// hyper's pooled client keeps a single HTTP/2 connection per host and, once the server's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` are all in use, queues further requests inside the gateway, unsent, until
/// a stream ends: with image generations that take minutes, a busy gateway would hold requests that never
/// reached the upstream. 100 is the smallest limit common front ends set (RFC 9113 recommends at least 100).
const STREAMS_PER_CONNECTION: usize = 100;

/// Clients (HTTP/2 connections) per upstream at most: 6,400 requests in flight at [`STREAMS_PER_CONNECTION`]
/// each; beyond that the least loaded takes the request.
const MAX_CLIENTS: usize = 64;

/// hyper's pooled client over rustls, as reqwest configured its own.
type DirectClient = Client<TimeoutConnector, ChunkedBody>;

/// The way to the upstream, fixed at startup.
pub(super) enum Transport {
    /// hyper's pooled clients over rustls.
    Direct(Spread<DirectClient>),
    /// reqwest's, which read the proxy variables themselves.
    Proxied(Spread<reqwest::Client>),
}

impl Transport {
    /// The transport for an upstream at `base`: reqwest when the environment names a proxy for it (logged),
    /// hyper's client otherwise. Either trusts the certificate authorities of `ca_file` (PEM) besides the
    /// webpki roots.
    pub(super) fn new(base: &Uri, connect_timeout: Duration, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let extra = match ca_file {
            Some(path) => extra_roots(path)?,
            None => Vec::new(),
        };
        // The same matcher reqwest consults (its `system-proxy` feature is off: the environment only).
        match proxy_for(&Matcher::from_system(), base) {
            Some(proxy) => {
                tracing::info!(
                    upstream = base.host().unwrap_or_default(),
                    proxy = %proxy,
                    "upstream requests go through the proxy named in the environment (HTTP_PROXY, HTTPS_PROXY, \
                     ALL_PROXY; NO_PROXY does not exempt this host), by reqwest"
                );
                // The first client is built now, so a configuration it refuses fails startup; the others
                // are built the same way when they are first needed (one that fails then uses the first).
                let first = proxied_client(connect_timeout, &extra, None)?;
                let fallback = first.clone();
                let make = move || {
                    proxied_client(connect_timeout, &extra, None).unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "could not build another upstream client; sharing the first");
                        fallback.clone()
                    })
                };
                Ok(Self::Proxied(Spread::new(first, make, STREAMS_PER_CONNECTION)))
            }
            None => {
                let mut roots = webpki_roots();
                for cert in extra {
                    roots.add(cert)?;
                }
                Ok(Self::Direct(direct(roots, connect_timeout, STREAMS_PER_CONNECTION)?))
            }
        }
    }

    /// Send one request; the answer's headers are in when this returns. `body` is turned into reqwest's body
    /// only on the proxied way.
    pub(super) async fn send(
        &self,
        request: http::Request<ChunkedBody>,
    ) -> Result<http::Response<ResponseBody>, SendError> {
        match self {
            Self::Direct(direct) => {
                let (client, slot) = direct.take_slot();
                match client.request(request).await {
                    // The slot is held until the answer's body is done with: its stream is in use until then.
                    Ok(response) => Ok(response.map(|body| ResponseBody::Direct(body, slot))),
                    Err(e) => Err(SendError::classify(e.is_connect(), is_timeout(&e), &e)),
                }
            }
            Self::Proxied(proxied) => {
                let request = match reqwest::Request::try_from(request.map(ChunkedBody::into_reqwest)) {
                    Ok(request) => request,
                    Err(e) => return Err(SendError::classify(false, false, &e.without_url())),
                };
                let (client, slot) = proxied.take_slot();
                match client.execute(request).await {
                    Ok(response) => {
                        Ok(http::Response::<reqwest::Body>::from(response)
                            .map(|body| ResponseBody::Proxied(body, slot)))
                    }
                    Err(e) => {
                        let mut error = SendError::classify(e.is_connect(), e.is_timeout(), &e.without_url());
                        // reqwest has already resent after an HTTP/2 refusal where it could.
                        if error.failure == Failure::Refused {
                            error.failure = Failure::Other;
                        }
                        Err(error)
                    }
                }
            }
        }
    }
}

/// Where requests to `base` must go instead, by the proxy variables `matcher` read: the proxy's scheme, host
/// and port (never its credentials), or `None` to go direct.
fn proxy_for(matcher: &Matcher, base: &Uri) -> Option<String> {
    let intercept = matcher.intercept(base)?;
    let proxy = intercept.uri();
    let scheme = proxy.scheme_str().unwrap_or("http");
    let host = proxy.host().unwrap_or_default();
    Some(match proxy.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    })
}

/// The certificates of the PEM file `path` (`upstream.ca_file`): at least one, or an error naming the file.
fn extra_roots(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        anyhow::anyhow!("upstream ca_file {}: not a readable PEM file of certificates ({e})", path.display())
    };
    let certs =
        CertificateDer::pem_file_iter(path).map_err(unreadable)?.collect::<Result<Vec<_>, _>>().map_err(unreadable)?;
    anyhow::ensure!(!certs.is_empty(), "upstream ca_file {}: holds no PEM certificate", path.display());
    Ok(certs)
}

/// reqwest's built-in roots with its `rustls-tls` feature: Mozilla's, as the webpki-roots crate ships them.
fn webpki_roots() -> rustls::RootCertStore {
    rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

/// Up to [`MAX_CLIENTS`] pooled clients to one upstream, each with its own pool (over HTTP/2: its own
/// connection), built when first needed, and the requests each has in flight.
pub(super) struct Spread<C> {
    clients: Box<[OnceLock<C>]>,
    make: Box<dyn Fn() -> C + Send + Sync>,
    in_flight: Arc<[AtomicUsize]>,
    per_client: usize,
}

/// Direct clients trusting `roots`, each given `per_client` requests in flight before the next one is used.
fn direct(
    roots: rustls::RootCertStore,
    connect_timeout: Duration,
    per_client: usize,
) -> anyhow::Result<Spread<DirectClient>> {
    let connector = connector(roots, connect_timeout)?;
    let first = client(connector.clone());
    Ok(Spread::new(first, move || client(connector.clone()), per_client))
}

impl<C> Spread<C> {
    /// `first`, and up to [`MAX_CLIENTS`] − 1 more made by `make` when needed, each given `per_client`
    /// requests in flight before the next one is used.
    fn new(first: C, make: impl Fn() -> C + Send + Sync + 'static, per_client: usize) -> Self {
        let clients: Box<[OnceLock<C>]> = (0..MAX_CLIENTS).map(|_| OnceLock::new()).collect();
        let _ = clients[0].set(first);
        let in_flight = (0..MAX_CLIENTS).map(|_| AtomicUsize::new(0)).collect();
        Self { clients, make: Box::new(make), in_flight, per_client: per_client.max(1) }
    }

    /// The client for the next request, and its slot: the first client below its share, so a quiet gateway
    /// uses one connection; the least loaded when every client is at its share. A full client is passed over
    /// with a read (a busy gateway has many of them).
    fn take_slot(&self) -> (&C, Slot) {
        let mut least = (usize::MAX, 0);
        for (i, count) in self.in_flight.iter().enumerate() {
            match count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.per_client).then_some(n + 1)) {
                Ok(_) => return self.slot(i),
                Err(n) if n < least.0 => least = (n, i),
                Err(_) => {}
            }
        }
        self.in_flight[least.1].fetch_add(1, Ordering::AcqRel);
        self.slot(least.1)
    }

    /// Client `i` (made now if it is its first request) and the slot already counted for it.
    fn slot(&self, i: usize) -> (&C, Slot) {
        (self.clients[i].get_or_init(&self.make), Slot { in_flight: self.in_flight.clone(), index: i })
    }
}

/// One request in flight on one of a [`Spread`]'s clients, until dropped.
#[derive(Debug)]
pub(super) struct Slot {
    in_flight: Arc<[AtomicUsize]>,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight[self.index].fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connector as reqwest configured its own, trusting `roots`.
fn connector(roots: rustls::RootCertStore, connect_timeout: Duration) -> anyhow::Result<TimeoutConnector> {
    // A provider the process installed wins, as in reqwest; otherwise ring (reqwest's `rustls-tls`).
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    http.set_keepalive_retries(Some(3));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    http.set_tcp_user_timeout(Some(Duration::from_secs(30)));
    // ALPN `h2`, `http/1.1`; plain http for http URLs.
    let https =
        HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_all_versions().wrap_connector(http);
    Ok(TimeoutConnector { inner: https, timeout: connect_timeout })
}

/// hyper's pooled client as reqwest configured its own, over `connector`.
fn client(connector: TimeoutConnector) -> DirectClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    builder.pool_timer(TokioTimer::new());
    builder.pool_idle_timeout(POOL_IDLE_TIMEOUT);
    builder.build(connector)
}

/// reqwest as the gateway used it before it sent through hyper directly; it honours the proxy variables, or
/// goes through `proxy` when one is given.
fn proxied_client(
    connect_timeout: Duration,
    extra: &[CertificateDer<'static>],
    proxy: Option<reqwest::Proxy>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder();
    if let Some(proxy) = proxy {
        builder = builder.proxy(proxy);
    }
    for cert in extra {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(cert)?);
    }
    Ok(builder
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .user_agent(USER_AGENT_VALUE)
        // A redirect would resend the body and the key (Azure's `api-key` header survives reqwest's
        // cross-origin stripping) to whatever origin it names: never followed, answered 502.
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// The TLS (or plain) connector with one deadline over TCP connect and TLS handshake together, as reqwest's
/// `connect_timeout`. A connect that runs out of time is a connect error: nothing was sent.
#[derive(Clone)]
pub(super) struct TimeoutConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

type Connection = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl tower::Service<Uri> for TimeoutConnector {
    type Response = Connection;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Connection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(Box::new(ConnectTimedOut) as BoxError),
            }
        })
    }
}

/// The connect deadline passed.
#[derive(Debug)]
struct ConnectTimedOut;

impl std::fmt::Display for ConnectTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connect timed out")
    }
}

impl StdError for ConnectTimedOut {}

/// What a failure means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// No connection was made (refused, unresolvable, TLS refused, connect deadline): nothing was sent.
    Connect,
    /// A deadline passed after the connection was made.
    Timeout,
    /// An HTTP/2 upstream refused the stream (`REFUSED_STREAM`) or was closing gracefully (`GOAWAY` with
    /// `NO_ERROR`): by the protocol, the request was not processed. reqwest retried these twice, at once.
    Refused,
    /// Anything else: the connection broke after (part of) the request went out.
    Other,
}

/// A failed send: what it means, and the error and its causes as text (no URL in it).
#[derive(Debug)]
pub(super) struct SendError {
    pub(super) failure: Failure,
    pub(super) detail: String,
}

impl SendError {
    /// `connect`: no connection was made; `timeout`: a deadline passed (each transport knows its own).
    fn classify(connect: bool, timeout: bool, e: &(dyn StdError + 'static)) -> Self {
        let failure = if connect {
            Failure::Connect
        } else if timeout {
            Failure::Timeout
        } else if is_refused(e) {
            Failure::Refused
        } else {
            Failure::Other
        };
        Self { failure, detail: error_chain(e) }
    }
}

/// A deadline somewhere in the chain: the connect deadline, hyper's own timeouts, or the kernel's
/// (`ETIMEDOUT`: keepalive or TCP user timeout). The same test as reqwest's `is_timeout`.
pub(super) fn is_timeout(e: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<ConnectTimedOut>()
            || err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout)
            || err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// An HTTP/2 refusal that proves the request was not processed (RFC 9113 §8.7).
fn is_refused(e: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        current = err.source();
    }
    false
}

/// The error and its causes, `: `-separated.
pub(super) fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut current = e.source();
    while let Some(err) = current {
        out.push_str(": ");
        out.push_str(&err.to_string());
        current = err.source();
    }
    out
}

/// A request body sent as the chunks it is held in, with its exact length (so it goes with a
/// `Content-Length`, as one buffer would): a form's file data is not copied into one buffer to be sent.
pub(super) enum ChunkedBody {
    One(Option<Bytes>),
    Many { chunks: VecDeque<Bytes>, left: u64 },
}

impl ChunkedBody {
    pub(super) fn of(chunks: &[Bytes], len: u64) -> Self {
        match chunks {
            [one] => Self::One(Some(one.clone())),
            chunks => Self::Many { chunks: chunks.iter().cloned().collect(), left: len },
        }
    }

    /// reqwest's body: one buffer stays one buffer (reqwest may then resend it after an HTTP/2 refusal).
    fn into_reqwest(self) -> reqwest::Body {
        match self {
            Self::One(Some(one)) => reqwest::Body::from(one),
            Self::One(None) => reqwest::Body::from(Bytes::new()),
            many @ Self::Many { .. } => reqwest::Body::wrap(many),
        }
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = match self.get_mut() {
            Self::One(one) => one.take(),
            Self::Many { chunks, left } => chunks.pop_front().inspect(|chunk| {
                *left = left.saturating_sub(chunk.len() as u64);
            }),
        };
        Poll::Ready(next.map(|chunk| Ok(http_body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::One(one) => one.is_none(),
            Self::Many { chunks, .. } => chunks.is_empty(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(match self {
            Self::One(one) => one.as_ref().map_or(0, |b| b.len() as u64),
            Self::Many { left, .. } => *left,
        })
    }
}

/// The answer's body, from either transport.
#[derive(Debug)]
pub(super) enum ResponseBody {
    /// The body, and the slot its stream holds until the body is dropped.
    Direct(hyper::body::Incoming, #[allow(dead_code, reason = "held for its Drop")] Slot),
    Proxied(reqwest::Body, #[allow(dead_code, reason = "held for its Drop")] Slot),
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Direct(body, _) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Proxied(body, _) => Pin::new(body).poll_frame(cx).map_err(|e| e.without_url().into()),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(body, _) => body.is_end_stream(),
            Self::Proxied(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Direct(body, _) => body.size_hint(),
            Self::Proxied(body, _) => body.size_hint(),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::net::SocketAddr;

    use http_body_util::BodyExt as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;

    /// A file of `tests/fixtures/tls/`: a test CA (`ca.pem`) and a certificate it signed for `localhost` and
    /// 127.0.0.1 (`server.pem`, `server.key`), valid for 100 years (made with `openssl req -x509 … -newkey ec`);
    /// trusted by nothing but these tests. Read when a test runs rather than embedded with `include_str!`, so
    /// the build (and the Dockerfile's build stage, which copies only what the build embeds) never needs them.
    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    fn test_roots() -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(fixture("ca.pem").as_bytes()).unwrap()).unwrap();
        roots
    }

    /// The direct transport, trusting the test CA only.
    pub(in crate::upstream::openai) fn trusting_test_ca(connect_timeout: Duration) -> Transport {
        Transport::Direct(direct(test_roots(), connect_timeout, STREAMS_PER_CONNECTION).unwrap())
    }

    /// TLS with the test CA's `localhost` certificate, offering `alpn`.
    pub(in crate::upstream::openai) fn test_acceptor(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let (cert, key) = (fixture("server.pem"), fixture("server.key"));
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A TLS server on 127.0.0.1 offering ALPN `h2` and `http/1.1` (as OpenAI's and Azure's front ends do); it
    /// answers each request with the HTTP version it came over, its `content-length` and the bytes received.
    async fn tls_upstream() -> SocketAddr {
        let acceptor = test_acceptor(&[b"h2", b"http/1.1"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service =
                        hyper::service::service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                            let version = request.version();
                            let declared = request.headers().get(http::header::CONTENT_LENGTH).cloned();
                            let received = request.into_body().collect().await?.to_bytes().len();
                            let answer = format!("{version:?} content-length={declared:?} received={received}");
                            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(Bytes::from(answer))))
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        addr
    }

    fn post(uri: Uri, chunks: &[&'static str]) -> http::Request<ChunkedBody> {
        let chunks: Vec<Bytes> = chunks.iter().map(|c| Bytes::from_static(c.as_bytes())).collect();
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        let mut request = http::Request::new(ChunkedBody::of(&chunks, len));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        request
    }

    #[tokio::test]
    async fn a_tls_upstream_offering_http2_is_spoken_to_over_http2_with_the_bodys_exact_length() {
        let addr = tls_upstream().await;
        let transport = trusting_test_ca(Duration::from_secs(5));

        let url = uri(&format!("https://localhost:{}/v1/images/edits", addr.port()));
        let response = transport.send(post(url, &["--form\r\n", "image bytes", "\r\n--form--"])).await.unwrap();

        assert_eq!(response.version(), http::Version::HTTP_2);
        let answer = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(answer, "HTTP/2.0 content-length=Some(\"29\") received=29");
    }

    /// A TLS fake allowing 2 streams per HTTP/2 connection; each request is held until 6 have arrived (or 5 s
    /// pass). It counts the most it held at once and the connections it accepted. `/warm` answers at once.
    async fn two_streams_per_connection() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let acceptor = test_acceptor(&[b"h2"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held, peak, connections) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let all_in = Arc::new(tokio::sync::Notify::new());
        let fake = (held, peak.clone(), connections.clone(), all_in);
        tokio::spawn(async move {
            let (held, peak, connections, all_in) = fake;
            while let Ok((tcp, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (acceptor, held, peak, all_in) = (acceptor.clone(), held.clone(), peak.clone(), all_in.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (held, peak, all_in) = (held.clone(), peak.clone(), all_in.clone());
                        async move {
                            if request.uri().path().ends_with("/warm") {
                                return Ok(http::Response::new(http_body_util::Full::new(Bytes::from("{}"))));
                            }
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            if now == 6 {
                                all_in.notify_waiters();
                            } else {
                                let _ = tokio::time::timeout(Duration::from_secs(5), all_in.notified()).await;
                            }
                            held.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(Bytes::from("{}"))))
                        }
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(2);
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        (addr, peak, connections)
    }

    /// One request first (so the first connection is up and known to speak HTTP/2: connections opened together
    /// before that are a pool's own race, not what the tests are about), then six at once over `transport`.
    async fn send_six(transport: &Arc<Transport>, addr: SocketAddr) {
        let warm = uri(&format!("https://localhost:{}/v1/warm", addr.port()));
        transport.send(post(warm, &["{}"])).await.unwrap().into_body().collect().await.unwrap();
        let url = uri(&format!("https://localhost:{}/v1/images/generations", addr.port()));
        let sends = (0..6).map(|_| {
            let (transport, url) = (transport.clone(), url.clone());
            tokio::spawn(async move {
                let response = transport.send(post(url, &["{}"])).await.unwrap();
                assert_eq!(response.version(), http::Version::HTTP_2);
                response.into_body().collect().await.unwrap().to_bytes()
            })
        });
        for send in futures::future::join_all(sends).await {
            assert_eq!(send.unwrap(), "{}");
        }
    }

    fn in_flight(transport: &Transport) -> usize {
        let in_flight = match transport {
            Transport::Direct(spread) => &spread.in_flight,
            Transport::Proxied(spread) => &spread.in_flight,
        };
        in_flight.iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    /// More requests than one HTTP/2 connection may carry at once are spread over more connections, not
    /// queued unsent inside the gateway until a stream ends.
    #[tokio::test]
    async fn requests_beyond_an_http2_connections_stream_limit_go_out_on_further_connections() {
        let (addr, peak, connections) = two_streams_per_connection().await;
        let transport = Arc::new(Transport::Direct(direct(test_roots(), Duration::from_secs(5), 2).unwrap()));

        send_six(&transport, addr).await;

        assert_eq!(peak.load(Ordering::SeqCst), 6, "all six reached the upstream at once");
        assert!(connections.load(Ordering::SeqCst) >= 3, "two streams at most on each connection");
        assert_eq!(in_flight(&transport), 0, "every slot given back");
    }

    /// A request's head read off `tcp`, up to and including its blank line (`None`: the peer went away first).
    /// Read a byte at a time, so nothing after the head is taken from the socket.
    pub(in crate::upstream::openai) async fn read_head(tcp: &mut tokio::net::TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt as _;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// An HTTP proxy on 127.0.0.1 that opens `CONNECT` tunnels; counts the tunnels it opened.
    async fn connect_proxy() -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let counted = tunnels.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let tunnels = counted.clone();
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut client).await else { return };
                    let Some(target) = head.strip_prefix("CONNECT ").and_then(|rest| rest.split(' ').next()) else {
                        return;
                    };
                    let target = target.replace("localhost", "127.0.0.1");
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                    tunnels.fetch_add(1, Ordering::SeqCst);
                    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (addr, tunnels)
    }

    /// Through an egress proxy too: reqwest keeps one HTTP/2 connection per host and queues what its stream
    /// limit leaves over, so the proxied way is several reqwest clients, spread the same way.
    #[tokio::test]
    async fn through_a_proxy_requests_beyond_a_connections_stream_limit_go_out_on_further_tunnels() {
        let (addr, peak, connections) = two_streams_per_connection().await;
        let (proxy, tunnels) = connect_proxy().await;
        let ca = vec![CertificateDer::from_pem_slice(fixture("ca.pem").as_bytes()).unwrap()];
        let make = move || {
            let proxy = reqwest::Proxy::all(format!("http://{proxy}")).unwrap();
            proxied_client(Duration::from_secs(5), &ca, Some(proxy)).unwrap()
        };
        let transport = Arc::new(Transport::Proxied(Spread::new(make(), make, 2)));

        send_six(&transport, addr).await;

        assert_eq!(peak.load(Ordering::SeqCst), 6, "all six reached the upstream at once");
        assert!(tunnels.load(Ordering::SeqCst) >= 3, "through the proxy, two streams at most on each tunnel");
        assert_eq!(connections.load(Ordering::SeqCst), tunnels.load(Ordering::SeqCst), "every connection tunnelled");
        assert_eq!(in_flight(&transport), 0, "every slot given back");
    }

    #[tokio::test]
    async fn an_upstream_certificate_outside_the_webpki_roots_is_a_connect_failure() {
        let addr = tls_upstream().await;
        let transport =
            Transport::Direct(direct(webpki_roots(), Duration::from_secs(5), STREAMS_PER_CONNECTION).unwrap());

        let url = uri(&format!("https://localhost:{}/v1/images/generations", addr.port()));
        let e = transport.send(post(url, &["{}"])).await.unwrap_err();

        assert_eq!(e.failure, Failure::Connect, "retried as a failed connect: {}", e.detail);
        assert!(e.detail.contains("certificate"), "{}", e.detail);
    }

    #[tokio::test]
    async fn an_upstream_ca_file_is_trusted_besides_the_webpki_roots_and_a_bad_one_fails_at_startup() {
        let addr = tls_upstream().await;
        let base = uri(&format!("https://localhost:{}/v1", addr.port()));
        let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem");
        let transport = Transport::new(&base, Duration::from_secs(5), Some(&ca)).unwrap();
        assert!(matches!(transport, Transport::Direct(_)), "no proxy in the test's environment");

        let url = uri(&format!("https://localhost:{}/v1/images/generations", addr.port()));
        let response = transport.send(post(url, &["{}"])).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);

        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for bad in [empty, dir.path().join("missing.pem")] {
            let e = Transport::new(&base, Duration::from_secs(5), Some(&bad)).err().unwrap().to_string();
            assert!(e.contains("upstream ca_file") && e.contains(&bad.display().to_string()), "{e}");
        }
    }

    #[tokio::test]
    async fn the_connect_timeout_covers_a_tls_handshake_that_never_completes() {
        // Accepts TCP connections and never says a word of TLS.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                open.push(tcp);
            }
        });
        let transport = trusting_test_ca(Duration::from_millis(200));

        let url = uri(&format!("https://localhost:{}/v1/images/generations", addr.port()));
        let e = transport.send(post(url, &["{}"])).await.unwrap_err();

        assert_eq!(e.failure, Failure::Connect, "{}", e.detail);
        assert!(e.detail.contains("connect timed out"), "{}", e.detail);
        held.abort();
    }

    #[test]
    fn a_proxy_is_used_only_where_the_environment_names_one_for_the_upstreams_scheme_and_host() {
        let http_only = Matcher::builder().http("http://user:pw@proxy.internal:3128").build();
        assert_eq!(
            proxy_for(&http_only, &uri("http://upstream.example/v1")).as_deref(),
            Some("http://proxy.internal:3128"),
            "the proxy's credentials are not in what is logged"
        );
        assert_eq!(proxy_for(&http_only, &uri("https://api.openai.com/v1")), None, "HTTP_PROXY is for http URLs");

        let all = Matcher::builder().all("http://proxy.internal:3128").no("api.openai.com,.corp.example").build();
        assert_eq!(proxy_for(&all, &uri("https://api.openai.com/v1")), None, "NO_PROXY exempts the host");
        assert_eq!(proxy_for(&all, &uri("https://img.corp.example/v1")), None, "NO_PROXY's domain suffix");
        assert!(proxy_for(&all, &uri("https://example.openai.azure.com/openai/v1")).is_some());

        let none = Matcher::builder().build();
        assert_eq!(proxy_for(&none, &uri("https://api.openai.com/v1")), None, "no variables: direct");
    }
}
