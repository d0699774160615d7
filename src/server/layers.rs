//! The global middleware stack, in one function, outermost first. `docs/architecture.md` mirrors this list.
//!
//! 1. Catch panics → 500 in OpenAI's shape, never a dropped connection.
//! 2. Mark `authorization` and `api-key` sensitive so no later layer can log them.
//! 3. Request id: a fresh `req_<32 hex>` of imagegate's own, on the request (extension), the span and the
//!    response's `x-request-id`.
//! 4. Trace: one span per request (method, route template, request id; tenant filled in by auth) and one
//!    line when the response is ready.
//! 5. Log errors once: the `ApiError` stored in response extensions, at its level.
//! 6. Whole-request timeout up to the response headers → 504 `RequestTimeout` (streams then flow freely).
//!
//! Inside the router: image routes get tenant authentication (`tenants::auth`) via `route_layer`; body limits
//! are applied per endpoint by `extract` so a 413 states the right limit.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use http::HeaderValue;
use http::header::AUTHORIZATION;
use tower::ServiceBuilder;
use tower::timeout::TimeoutLayer;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::error::{self, ApiError, LoggedError};
use crate::wire::headers;

/// imagegate's id for one request, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Wrap `router` in the global stack.
pub fn apply(router: Router, request_timeout: Duration) -> Router {
    let stack = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(|_| ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()))
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION, http::HeaderName::from_static(headers::API_KEY)]))
        .layer(from_fn(request_id))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span)
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(from_fn(log_errors))
        .layer(HandleErrorLayer::new(
            move |_: tower::BoxError| async move { ApiError::RequestTimeout(request_timeout) },
        ))
        .layer(TimeoutLayer::new(request_timeout));
    router.layer(stack)
}

async fn request_id(mut request: Request, next: Next) -> Response {
    let id = format!("req_{}", hex::encode(rand::random::<[u8; 16]>()));
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(headers::X_REQUEST_ID, value);
    }
    response
}

fn make_span(request: &Request<Body>) -> tracing::Span {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
    let id = request.extensions().get::<RequestId>().map_or("", |r| r.0.as_str());
    tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        request_id = id,
        tenant = tracing::field::Empty,
        key_id = tracing::field::Empty,
    )
}

async fn log_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(e) = response.extensions().get::<LoggedError>() {
        let (kind, status, detail) = (e.kind, e.status, e.detail.as_str());
        match e.level {
            error::Level::Debug => tracing::debug!(kind, status, error = detail, "request failed"),
            error::Level::Info => tracing::info!(kind, status, error = detail, "request failed"),
            error::Level::Warn => tracing::warn!(kind, status, error = detail, "request failed"),
            error::Level::Error => tracing::error!(kind, status, error = detail, "request failed"),
        }
    }
    response
}
