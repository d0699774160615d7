//! The global middleware stack: one service around every route ([`apply`]), whose steps run in this order,
//! outermost first. `docs/architecture.md` mirrors this list.
//!
//! 1. Mark `authorization` and `api-key` sensitive so no later step can log them.
//! 2. Request id: a fresh `req_<32 hex>` of imagegate's own, on the request (extension), the span and the
//!    response's `x-request-id` — every response, a caught panic's and a timeout's included.
//! 3. Span: one per request (method, route template, request id; tenant filled in by auth), entered while the
//!    rest runs and while the response body is polled (a stream's last lines are written in it).
//! 4. Access: one access-log line and the request metrics per request, with the facts the inner steps and
//!    the pipeline noted (`server::access`); before the line, the `ApiError` stored in the response's
//!    extensions is logged once, at its level ([`log_error`]).
//! 5. Catch panics → 500 in OpenAI's shape, never a dropped connection; inside the steps above, so the 500
//!    carries the request id and its cause is logged in the request's span.
//! 6. Whole-request timeout up to the response headers → 504 `RequestTimeout` (streams then flow freely).
//!
//! They are written as one function ([`edge`]) rather than a tower layer each: per request that is one
//! boxed future instead of six nested ones (tower-http's trace, panic and sensitive-header layers, two
//! `from_fn` layers boxing theirs and cloning the rest of the stack, the timeout's error handler), which a
//! held request keeps for minutes (docs/performance.md).
//!
//! Inside the router: the image handlers authenticate the tenant first (`server::auth`); body limits are
//! applied per endpoint by `extract` so a 413 states the right limit.

use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::Route;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use http::HeaderValue;
use http::header::{AUTHORIZATION, Entry};
use tower::{Layer, Service};
use tracing::Instrument as _;

use super::access::Access;
use crate::error::{self, ApiError, LoggedError};
use crate::wire::headers;

/// imagegate's id for one request, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Wrap `router` in the global stack.
pub fn apply(router: Router, request_timeout: Duration, access: Access) -> Router {
    router.layer(EdgeLayer { access, request_timeout })
}

/// The global stack as one layer: each request gets one boxed future holding all six steps, instead of a
/// future (two of them boxed, with a clone of the rest of the stack) per step. The steps and their order are
/// the module's list; `tests` below and `tests/api.rs` hold them to it.
#[derive(Clone)]
struct EdgeLayer {
    access: Access,
    request_timeout: Duration,
}

impl Layer<Route> for EdgeLayer {
    type Service = Edge;

    fn layer(&self, inner: Route) -> Edge {
        Edge { inner, access: self.access.clone(), request_timeout: self.request_timeout }
    }
}

/// [`EdgeLayer`]'s service around one route.
#[derive(Clone)]
struct Edge {
    inner: Route,
    access: Access,
    request_timeout: Duration,
}

impl Service<Request> for Edge {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A `Route` is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        Box::pin(edge(&mut self.inner, request, &self.access, self.request_timeout).map(Ok))
    }
}

/// One request through the six steps of the module's list.
///
/// Not an `async fn`: the steps that need only the request run now, and the future returned holds what is
/// awaited and what the answer needs, not the request besides (a request waiting for its images keeps this
/// future for minutes, docs/performance.md). The route is called without `oneshot`, whose future keeps room
/// for the request: a `Route` is always ready (its `poll_ready` answers `Ready` at once).
fn edge(
    inner: &mut Route,
    mut request: Request,
    access: &Access,
    timeout: Duration,
) -> impl Future<Output = Response> + Send + 'static {
    // 1. Keys are sensitive: no later layer may log them.
    for name in [AUTHORIZATION, http::HeaderName::from_static(headers::API_KEY)] {
        if let Entry::Occupied(mut values) = request.headers_mut().entry(name) {
            values.iter_mut().for_each(|v| v.set_sensitive(true));
        }
    }
    // 2. The request id.
    let id = new_request_id();
    let id_value = HeaderValue::from_str(&id);
    request.extensions_mut().insert(RequestId(id));
    // 3. The span, around the rest and around the answer's body (a stream's last lines are written in it).
    let span = make_span(&request);
    // 4. Access line and metrics; 5. panics caught; 6. the timeout up to the response headers.
    let observed = super::access::observe(access, request, move |request| {
        AssertUnwindSafe(tokio::time::timeout(timeout, inner.call(request))).catch_unwind().map(
            move |done| match done {
                Ok(Ok(Ok(response))) => response,
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(_elapsed)) => ApiError::RequestTimeout(timeout).into_response(),
                Err(panic) => panic_response(panic),
            },
        )
    })
    .instrument(span.clone());
    // `map`, not an `async` block awaiting `observed`: its state would keep that future twice.
    observed.map(move |response| {
        let mut response = response.map(|body| Body::new(InSpan { body, span }));
        if let Ok(value) = id_value {
            response.headers_mut().insert(headers::X_REQUEST_ID, value);
        }
        response
    })
}

pin_project_lite::pin_project! {
    /// A response body polled inside the request's span.
    struct InSpan {
        #[pin]
        body: Body,
        span: tracing::Span,
    }
}

impl http_body::Body for InSpan {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let _entered = this.span.enter();
        this.body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The 500 for a panic in a handler; its message goes to the log (through `log_error`), never to the caller.
fn panic_response(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    ApiError::Internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
}

/// `req_` and 32 hex digits: the time in milliseconds (12 digits), then 80 random bits. Ids made later sort
/// later, so the usage ledger, whose primary key they are, appends to its index instead of writing into
/// random pages of it (each batch then touches a few index pages instead of one per row).
pub fn new_request_id() -> String {
    let ms = u64::try_from(crate::time::now_ms()).unwrap_or(0);
    let mut raw = [0u8; 16];
    raw[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    raw[6..].copy_from_slice(&rand::random::<[u8; 10]>());
    let mut text = [0u8; 36];
    text[..4].copy_from_slice(b"req_");
    // Cannot fail: the buffer is exactly twice the bytes.
    let _ = hex::encode_to_slice(raw, &mut text[4..]);
    String::from_utf8_lossy(&text).into_owned()
}

fn make_span(request: &Request<Body>) -> tracing::Span {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
    let id = request.extensions().get::<RequestId>().map_or("", |r| r.0.as_str());
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        request_id = id,
        tenant = tracing::field::Empty,
        key_id = tracing::field::Empty,
    );
    // With tracing on, a caller's `traceparent` makes this span part of the caller's trace.
    crate::traces::adopt_caller(&span, request.headers());
    span
}

/// Log the response's error once, at its level (called by the access layer, inside the request's span; a layer
/// of its own cost a boxed future and two service clones per request).
pub(super) fn log_error(response: &Response) {
    if let Some(e) = response.extensions().get::<LoggedError>() {
        let (kind, status, detail) = (e.kind, e.status, e.detail.as_str());
        match e.level {
            error::Level::Debug => tracing::debug!(kind, status, error = detail, "request failed"),
            error::Level::Info => tracing::info!(kind, status, error = detail, "request failed"),
            error::Level::Warn => tracing::warn!(kind, status, error = detail, "request failed"),
            error::Level::Error => tracing::error!(kind, status, error = detail, "request failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use tracing::Level;

    use super::*;

    /// Log lines written while a test runs, shared with the subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn quiet() -> Access {
        Access { metrics: std::sync::Arc::new(crate::metrics::Metrics::default()), log: false }
    }

    fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
        let logs = Captured::default();
        let subscriber =
            tracing_subscriber::fmt().with_writer(logs.clone()).with_max_level(Level::DEBUG).with_ansi(false).finish();
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    async fn call(app: Router, path: &str) -> (http::StatusCode, http::HeaderMap, serde_json::Value) {
        let request = http::Request::get(path).body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&body).unwrap_or_default())
    }

    /// A request waiting minutes for its images keeps the edge's future: it holds the running request once,
    /// not the request it started from besides (docs/performance.md, "Eleventh round"). It was 1,904 bytes;
    /// the size is the compiler's, whatever the machine.
    #[test]
    fn the_edges_future_stays_small() {
        fn size<F: Future>(_: impl FnOnce() -> F) -> usize {
            std::mem::size_of::<F>()
        }
        fn unreachable_route() -> &'static mut Route {
            unreachable!("the closure below only names the future's type")
        }
        let access = quiet();
        let edge = size(|| edge(unreachable_route(), Request::default(), &access, Duration::from_secs(1)));
        assert!(edge <= 1024, "the edge's future is {edge} bytes");
    }

    #[test]
    fn request_ids_are_unique_and_sort_by_time() {
        let first = new_request_id();
        std::thread::sleep(Duration::from_millis(2));
        let ids: Vec<String> = (0..1000).map(|_| new_request_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 36, "{id}");
            assert!(id.starts_with("req_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            assert!(*id > first, "{id} sorts after {first}");
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[tokio::test]
    #[allow(clippy::panic, reason = "the handler under test panics on purpose")]
    async fn a_panic_answers_500_with_a_request_id_and_is_logged_once_in_its_span() {
        let (logs, _guard) = capture();
        async fn boom() -> &'static str {
            panic!("the database exploded")
        }
        let router = Router::new().route("/boom", get(boom));
        let (status, headers, body) = call(apply(router, Duration::from_secs(5), quiet()), "/boom").await;

        assert_eq!(status, http::StatusCode::INTERNAL_SERVER_ERROR);
        let id = headers.get(headers::X_REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(id.starts_with("req_"), "the 500 carries imagegate's request id: {headers:?}");
        assert_eq!(body["error"]["type"], "server_error");
        assert!(!body.to_string().contains("exploded"), "the cause stays in the log: {body}");
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let failed: Vec<&str> = text.lines().filter(|l| l.contains("request failed")).collect();
        assert_eq!(failed.len(), 1, "logged exactly once: {text}");
        assert!(failed[0].contains("ERROR") && failed[0].contains("the database exploded"), "{text}");
        assert!(failed[0].contains(&id), "the log line is in the request's span: {text}");
    }

    #[tokio::test]
    async fn a_5xx_is_logged_once_and_a_passed_on_upstream_5xx_not_as_an_error() {
        let (logs, _guard) = capture();
        let router = Router::new()
            .route("/ours", get(|| async { ApiError::UpstreamUnavailable("connection refused".into()) }))
            .route("/theirs", get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "{\"error\":{}}") }));
        let app = apply(router, Duration::from_secs(5), quiet());
        assert_eq!(call(app.clone(), "/ours").await.0, http::StatusCode::BAD_GATEWAY);
        assert_eq!(call(app, "/theirs").await.0, http::StatusCode::SERVICE_UNAVAILABLE);

        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().filter(|l| l.contains("request failed")).count(), 1, "{text}");
        assert_eq!(text.lines().filter(|l| l.contains("ERROR")).count(), 0, "no failure lines but ours: {text}");
    }
}
