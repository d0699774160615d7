//! `ApiError`: the one type that becomes an error response, and the only place that spells OpenAI's error body.
//!
//! Modules keep their own small error enums and convert into `ApiError` at their boundary; handlers and
//! extractors return nothing else. `IntoResponse` has no side effects: it stores the error in the response
//! extensions and `server::layers::log_error` (called by the access layer) logs it once, inside the request span.

pub mod ratelimit_headers;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::wire::headers;

/// Everything a request can fail with, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a model rule. 400, names the offending parameter.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String>, code: Option<&'static str> },
    /// No key, an unknown key or a malformed key. 401.
    #[error("invalid or missing API key")]
    Unauthenticated { reason: AuthFailure },
    /// The tenant may not do this (suspended, model not allowed). 403.
    #[error("{message}")]
    PermissionDenied { message: String },
    /// No such route. 404.
    #[error("unknown route {method} {path}")]
    NotFound { method: String, path: String },
    /// A model past its shutdown day: 404 `model_not_found`, as OpenAI answers for a model it does not serve.
    #[error("model {model} does not exist")]
    ModelNotFound { model: String },
    /// An admin resource (tenant, key) that does not exist. 404.
    #[error("{message}")]
    NotFoundResource { message: String },
    /// The resource already exists (admin API). 409.
    #[error("{message}")]
    Conflict { message: String },
    /// The route exists but not for this method. 405.
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The body is larger than the route allows. 413, states the limit.
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// The gateway's own whole-request deadline passed. 504.
    #[error("request timed out after {0:?}")]
    RequestTimeout(Duration),
    /// The upstream could not be reached (connect/TLS/reset). 502.
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    /// The upstream answered something the gateway will not pass on (a redirect, an answer over its size
    /// limit). 502; the detail is logged, never returned.
    #[error("unusable upstream answer: {0}")]
    UpstreamBadAnswer(String),
    /// The upstream did not answer within the configured timeout. 504, `x-should-retry: false` (the images
    /// may have been generated and billed).
    #[error("upstream timed out after {0:?}")]
    UpstreamTimeout(Duration),
    /// The upstream's connection broke after the request was sent. 502, `x-should-retry: false` (as for a
    /// timeout, the images may have been generated and billed).
    #[error("upstream connection broke: {0}")]
    UpstreamBroken(String),
    /// Every deployment of the pool is resting after a 429, at capacity or unhealthy. 429 with the soonest
    /// `retry-after`.
    #[error("every upstream deployment is busy")]
    UpstreamBusy { retry_after_ms: u64 },
    /// A tenant limit refused the request. 429 with `retry-after` (rates) or `x-should-retry: false`
    /// (budgets, which do not come back within a retry's patience, and demands larger than a burst, which
    /// never fit).
    #[error("{message}")]
    RateLimited {
        message: String,
        budget: bool,
        /// `None` for budgets and for demands that can never fit (see `limits::Refusal`).
        retry_after_ms: Option<u64>,
        report: crate::domain::Report,
    },
    /// The rate-limit backend did not answer and the policy is fail-closed. 503 with `retry-after: 1`.
    #[error("rate limits unavailable: {detail}")]
    LimitsUnavailable { detail: String, report: crate::domain::Report },
    /// The upstream answered, but its images could not be downloaded or stored. 502; the reason (never
    /// the upstream URL) is in the message.
    #[error("re-hosting failed: {0}")]
    RehostFailed(String),
    /// A `Range` header no byte of the stored image satisfies. 416.
    #[error("range not satisfiable for {length} bytes")]
    RangeNotSatisfiable { length: u64 },
    /// The gateway is shutting down and refuses new work. 503.
    #[error("shutting down")]
    ShuttingDown,
    /// A bug or an unexpected failure on our side. 500; the cause is logged, never returned.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Why authentication failed; only logged, the caller always sees the same 401 text for a given header shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header at all.
    Missing,
    /// A header that is not `Bearer <token>` or a token not in imagegate's format.
    Malformed,
    /// A well-formed key that matches no active key.
    Unknown,
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`, all four keys always present.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetails<'a>,
}

/// The inner object of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorDetails<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// Serialize OpenAI's error body. Used by `ApiError` and by the SSE error event, so the shape is spelt once.
pub fn error_json(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Vec<u8> {
    let body = ErrorBody { error: ErrorDetails { message, kind, param, code } };
    // Serializing a struct of strings cannot fail; fall back to a fixed body rather than panic.
    serde_json::to_vec(&body).unwrap_or_else(|_| {
        br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_vec()
    })
}

/// How loudly an error is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Self::InvalidRequest { message: message.into(), param: param.into(), code: None }
    }

    /// A 400 naming `param` with an OpenAI error `code` such as `invalid_value`.
    pub fn invalid_code(message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        Self::InvalidRequest { message: message.into(), param: param.map(str::to_owned), code: Some(code) }
    }

    /// An equal error for another caller (coalesced cache waiters share one upstream call's failure).
    /// Internal errors keep their message; their cause chain stays with the first caller's log line.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::InvalidRequest { message, param, code } => {
                Self::InvalidRequest { message: message.clone(), param: param.clone(), code: *code }
            }
            Self::Unauthenticated { reason } => Self::Unauthenticated { reason: *reason },
            Self::PermissionDenied { message } => Self::PermissionDenied { message: message.clone() },
            Self::NotFound { method, path } => Self::NotFound { method: method.clone(), path: path.clone() },
            Self::NotFoundResource { message } => Self::NotFoundResource { message: message.clone() },
            Self::ModelNotFound { model } => Self::ModelNotFound { model: model.clone() },
            Self::Conflict { message } => Self::Conflict { message: message.clone() },
            Self::MethodNotAllowed { method, path } => {
                Self::MethodNotAllowed { method: method.clone(), path: path.clone() }
            }
            Self::PayloadTooLarge { limit } => Self::PayloadTooLarge { limit: *limit },
            Self::RequestTimeout(d) => Self::RequestTimeout(*d),
            Self::UpstreamUnavailable(m) => Self::UpstreamUnavailable(m.clone()),
            Self::UpstreamBadAnswer(m) => Self::UpstreamBadAnswer(m.clone()),
            Self::UpstreamTimeout(d) => Self::UpstreamTimeout(*d),
            Self::UpstreamBroken(m) => Self::UpstreamBroken(m.clone()),
            Self::UpstreamBusy { retry_after_ms } => Self::UpstreamBusy { retry_after_ms: *retry_after_ms },
            Self::RateLimited { message, budget, retry_after_ms, report } => Self::RateLimited {
                message: message.clone(),
                budget: *budget,
                retry_after_ms: *retry_after_ms,
                report: *report,
            },
            Self::LimitsUnavailable { detail, report } => {
                Self::LimitsUnavailable { detail: detail.clone(), report: *report }
            }
            Self::RehostFailed(m) => Self::RehostFailed(m.clone()),
            Self::RangeNotSatisfiable { length } => Self::RangeNotSatisfiable { length: *length },
            Self::ShuttingDown => Self::ShuttingDown,
            Self::Internal(e) => Self::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    /// The HTTP status clients act on (the SDKs pick their exception class from it).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied { .. } => StatusCode::FORBIDDEN,
            Self::NotFound { .. } | Self::NotFoundResource { .. } | Self::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) | Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable(_)
            | Self::UpstreamBroken(_)
            | Self::UpstreamBadAnswer(_)
            | Self::RehostFailed(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ShuttingDown | Self::LimitsUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::Unauthenticated { .. }
            | Self::NotFound { .. }
            | Self::NotFoundResource { .. }
            | Self::ModelNotFound { .. }
            | Self::Conflict { .. }
            | Self::MethodNotAllowed { .. }
            | Self::RangeNotSatisfiable { .. }
            | Self::PayloadTooLarge { .. } => "invalid_request_error",
            Self::PermissionDenied { .. } => "permission_error",
            Self::RateLimited { budget: true, .. } => "insufficient_quota",
            Self::RateLimited { budget: false, .. } | Self::UpstreamBusy { .. } => "requests",
            Self::RequestTimeout(_)
            | Self::UpstreamUnavailable(_)
            | Self::UpstreamBadAnswer(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamBroken(_)
            | Self::RehostFailed(_)
            | Self::ShuttingDown
            | Self::LimitsUnavailable { .. }
            | Self::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `error.code`.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { code, .. } => *code,
            Self::Unauthenticated { .. } => Some("invalid_api_key"),
            Self::NotFound { .. } => Some("unknown_url"),
            Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::PayloadTooLarge { .. } => Some("request_too_large"),
            Self::RequestTimeout(_) | Self::UpstreamTimeout(_) => Some("timeout"),
            Self::UpstreamUnavailable(_) => Some("upstream_unavailable"),
            Self::UpstreamBadAnswer(_) => Some("upstream_bad_answer"),
            Self::UpstreamBroken(_) => Some("upstream_connection_broken"),
            Self::UpstreamBusy { .. } => Some("rate_limit_exceeded"),
            Self::RehostFailed(_) => Some("image_rehost_failed"),
            Self::RangeNotSatisfiable { .. } => Some("range_not_satisfiable"),
            Self::RateLimited { budget: true, .. } => Some("insufficient_quota"),
            Self::RateLimited { budget: false, .. } => Some("rate_limit_exceeded"),
            _ => None,
        }
    }

    /// OpenAI's `error.param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// The text the caller sees. 5xx texts are fixed: causes stay in the log.
    pub fn client_message(&self) -> String {
        match self {
            Self::InvalidRequest { message, .. }
            | Self::PermissionDenied { message }
            | Self::NotFoundResource { message }
            | Self::Conflict { message }
            | Self::RateLimited { message, .. } => message.clone(),
            Self::LimitsUnavailable { .. } => "Rate limits cannot be checked right now; retry shortly.".to_owned(),
            Self::Unauthenticated { reason: AuthFailure::Missing } => "You didn't provide an API key. You need to \
                provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer \
                YOUR_KEY)."
                .to_owned(),
            Self::Unauthenticated { .. } => "Incorrect API key provided. Ask your imagegate administrator for a \
                valid key."
                .to_owned(),
            Self::NotFound { method, path } => format!("Invalid URL ({method} {path})"),
            Self::ModelNotFound { model } => {
                format!("The model `{model}` does not exist or you do not have access to it.")
            }
            Self::MethodNotAllowed { method, path } => format!("Method {method} is not allowed on {path}."),
            Self::PayloadTooLarge { limit } => format!(
                "Request body too large: the limit for this endpoint is {limit} bytes ({}).",
                bytesize::ByteSize(*limit).to_string_as(true)
            ),
            Self::RequestTimeout(d) => format!("The request did not complete within {}s.", d.as_secs()),
            Self::UpstreamUnavailable(_) => "The upstream image API could not be reached.".to_owned(),
            Self::UpstreamBadAnswer(_) => {
                "The upstream image API gave an answer imagegate does not pass on; quote the x-request-id when \
                 reporting it."
                    .to_owned()
            }
            Self::UpstreamBroken(_) => "The connection to the upstream image API broke after the request was sent; \
                the images may have been generated and billed, so this request is not retried."
                .to_owned(),
            Self::UpstreamBusy { retry_after_ms } => format!(
                "Every upstream deployment serving this model is at its rate limit or unavailable. Please try again \
                 in {:.1}s.",
                *retry_after_ms as f64 / 1000.0
            ),
            Self::RehostFailed(reason) => format!(
                "The upstream generated the images, but imagegate could not store them to give you durable links: \
                 {reason}."
            ),
            Self::RangeNotSatisfiable { length } => {
                format!("The requested range is not satisfiable: the image is {length} bytes long.")
            }
            Self::UpstreamTimeout(d) => format!(
                "The upstream image API did not answer within {}s; the images may have been generated and billed, \
                 so this request is not retried.",
                d.as_secs()
            ),
            Self::ShuttingDown => "The gateway is shutting down; retry shortly.".to_owned(),
            Self::Internal(_) => {
                "The gateway hit an internal error; quote the x-request-id when reporting it.".to_owned()
            }
        }
    }

    /// How loudly to log it.
    pub fn level(&self) -> Level {
        match self {
            Self::InvalidRequest { .. }
            | Self::NotFound { .. }
            | Self::NotFoundResource { .. }
            | Self::ModelNotFound { .. }
            | Self::Conflict { .. }
            | Self::MethodNotAllowed { .. }
            | Self::RangeNotSatisfiable { .. }
            | Self::PayloadTooLarge { .. } => Level::Debug,
            Self::Unauthenticated { .. }
            | Self::PermissionDenied { .. }
            | Self::ShuttingDown
            | Self::RateLimited { .. }
            | Self::UpstreamBusy { .. } => Level::Info,
            Self::LimitsUnavailable { .. } => Level::Error,
            Self::RequestTimeout(_)
            | Self::UpstreamUnavailable(_)
            | Self::UpstreamBadAnswer(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamBroken(_)
            | Self::RehostFailed(_) => Level::Warn,
            Self::Internal(_) => Level::Error,
        }
    }

    /// A low-cardinality name for logs and metrics; the prefix says whose fault it is.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "client.invalid_request",
            Self::Unauthenticated { .. } => "client.unauthenticated",
            Self::PermissionDenied { .. } => "client.permission_denied",
            Self::NotFound { .. } => "client.not_found",
            Self::NotFoundResource { .. } => "client.no_such_resource",
            Self::ModelNotFound { .. } => "client.model_not_found",
            Self::Conflict { .. } => "client.conflict",
            Self::MethodNotAllowed { .. } => "client.method_not_allowed",
            Self::PayloadTooLarge { .. } => "client.payload_too_large",
            Self::RequestTimeout(_) => "internal.request_timeout",
            Self::UpstreamUnavailable(_) => "upstream.unavailable",
            Self::UpstreamTimeout(_) => "upstream.timeout",
            Self::UpstreamBadAnswer(_) => "upstream.bad_answer",
            Self::UpstreamBroken(_) => "upstream.broken",
            Self::UpstreamBusy { .. } => "upstream.busy",
            Self::RehostFailed(_) => "upstream.rehost_failed",
            Self::RangeNotSatisfiable { .. } => "client.range_not_satisfiable",
            Self::ShuttingDown => "internal.shutting_down",
            Self::RateLimited { budget: true, .. } => "client.budget_spent",
            Self::RateLimited { budget: false, .. } => "client.rate_limited",
            Self::LimitsUnavailable { .. } => "internal.limits_unavailable",
            Self::Internal(_) => "internal.error",
        }
    }

    /// The JSON body, as bytes.
    pub fn body(&self) -> Vec<u8> {
        error_json(&self.client_message(), self.error_type(), self.param(), self.code())
    }

    fn extra_headers(&self, headers: &mut HeaderMap) {
        // OpenAI's SDKs retry 5xx on their own; a shutting-down replica asks them to come back.
        if let Self::ShuttingDown = self {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // A timeout after the request went upstream may still have generated (and billed) the images: an SDK's
        // automatic retry would pay for them again.
        if let Self::InvalidRequest { .. }
        | Self::PayloadTooLarge { .. }
        | Self::Unauthenticated { .. }
        | Self::UpstreamTimeout(_)
        | Self::UpstreamBadAnswer(_)
        | Self::UpstreamBroken(_)
        | Self::RequestTimeout(_) = self
        {
            headers.insert(headers::X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        if let Self::RangeNotSatisfiable { length } = self
            && let Ok(value) = HeaderValue::from_str(&format!("bytes */{length}"))
        {
            headers.insert(http::header::CONTENT_RANGE, value);
        }
        if let Self::RateLimited { budget, retry_after_ms, report, .. } = self {
            crate::error::ratelimit_headers::apply(report, headers);
            match retry_after_ms {
                Some(ms) if !*budget => crate::error::ratelimit_headers::retry(*ms, headers),
                _ => {
                    headers.insert(headers::X_SHOULD_RETRY, HeaderValue::from_static("false"));
                }
            }
        }
        if let Self::UpstreamBusy { retry_after_ms } = self {
            crate::error::ratelimit_headers::retry(*retry_after_ms, headers);
        }
        if let Self::LimitsUnavailable { report, .. } = self {
            crate::error::ratelimit_headers::apply(report, headers);
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
    }
}

/// An [`ApiError`] with the headers the request earned before it failed (its rate-limit report, its cache
/// outcome), which its response carries as a success would. The pipeline returns this; `?` on an `ApiError`
/// makes one with no extra headers.
#[derive(Debug)]
pub struct Failure {
    pub error: ApiError,
    pub headers: HeaderMap,
}

impl Failure {
    /// The error with `headers` to add to its response.
    pub fn with_headers(error: ApiError, headers: HeaderMap) -> Self {
        Self { error, headers }
    }
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self { error, headers: HeaderMap::new() }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = self.error.into_response();
        // The error's own headers (a refusal's rate-limit report, say) are the more specific: keep them.
        add_missing(response.headers_mut(), &self.headers);
        response
    }
}

/// Add each header of `extra` that `target` does not have yet (those it has are the more specific).
pub fn add_missing(target: &mut HeaderMap, extra: &HeaderMap) {
    for (name, value) in extra {
        if !target.contains_key(name) {
            target.insert(name.clone(), value.clone());
        }
    }
}

/// The error as stored in response extensions for the logging layer (the response itself carries only bytes).
#[derive(Debug, Clone)]
pub struct LoggedError {
    pub kind: &'static str,
    /// The wire `type`, `code` and `param` the caller was given.
    pub error_type: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub level: Level,
    pub status: u16,
    pub detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status(), [(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], self.body())
                .into_response();
        self.extra_headers(response.headers_mut());
        // `{:#}` on anyhow prints the whole cause chain; it goes to the log only.
        let detail = match &self {
            Self::Internal(e) => format!("{e:#}"),
            other => other.to_string(),
        };
        response.extensions_mut().insert(LoggedError {
            kind: self.kind(),
            error_type: self.error_type(),
            code: self.code(),
            param: self.param().map(str::to_owned),
            level: self.level(),
            status: self.status().as_u16(),
            detail,
        });
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(e: &ApiError) -> serde_json::Value {
        serde_json::from_slice(&e.body()).unwrap_or_default()
    }

    #[test]
    fn every_variant_renders_openai_shape_with_status_type_and_code() {
        let cases: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
            (ApiError::invalid("bad n", Some("n".to_owned())), 400, "invalid_request_error", None),
            (
                ApiError::Unauthenticated { reason: AuthFailure::Unknown },
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (ApiError::PermissionDenied { message: "no".into() }, 403, "permission_error", None),
            (
                ApiError::NotFound { method: "GET".into(), path: "/x".into() },
                404,
                "invalid_request_error",
                Some("unknown_url"),
            ),
            (ApiError::PayloadTooLarge { limit: 1024 }, 413, "invalid_request_error", Some("request_too_large")),
            (ApiError::UpstreamUnavailable("refused".into()), 502, "server_error", Some("upstream_unavailable")),
            (ApiError::UpstreamTimeout(Duration::from_secs(5)), 504, "server_error", Some("timeout")),
            (ApiError::ShuttingDown, 503, "server_error", None),
            (
                ApiError::RehostFailed("host 'x' is not allowed".into()),
                502,
                "server_error",
                Some("image_rehost_failed"),
            ),
            (ApiError::RangeNotSatisfiable { length: 10 }, 416, "invalid_request_error", Some("range_not_satisfiable")),
            (ApiError::Internal(anyhow::anyhow!("secret detail")), 500, "server_error", None),
        ];
        for (err, status, kind, code) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let body = parse(&err);
            let e = &body["error"];
            assert_eq!(e["type"], kind, "{err:?}");
            assert_eq!(e["code"].as_str(), code, "{err:?}");
            for key in ["message", "type", "param", "code"] {
                assert!(e.get(key).is_some(), "{key} missing for {err:?}");
            }
            let twin = err.duplicate();
            assert_eq!(
                (twin.status(), twin.body()),
                (err.status(), err.body()),
                "coalesced waiters see the same error"
            );
        }
    }

    #[test]
    fn a_failure_adds_its_headers_but_keeps_the_errors_own() {
        let mut earned = HeaderMap::new();
        earned.insert("x-imagegate-cache", HeaderValue::from_static("miss"));
        earned.insert(headers::X_SHOULD_RETRY, HeaderValue::from_static("true"));
        let response = Failure::with_headers(ApiError::invalid("bad n", Some("n".to_owned())), earned).into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()["x-imagegate-cache"], "miss");
        assert_eq!(response.headers()[headers::X_SHOULD_RETRY], "false", "the error's own header wins");
    }

    #[test]
    fn internal_errors_never_leak_their_cause() {
        let err = ApiError::Internal(anyhow::anyhow!("database password is hunter2"));
        let body = String::from_utf8(err.body()).unwrap_or_default();
        assert!(!body.contains("hunter2"));
    }

    #[test]
    fn payload_too_large_states_the_limit() {
        let body = parse(&ApiError::PayloadTooLarge { limit: 1_048_576 });
        let msg = body["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("1048576") && msg.contains("1.0 MiB"), "{msg}");
    }
}
