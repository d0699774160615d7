//! The access layer: for every request, one access-log line (target `imagegate::access`; a JSON object per
//! line with `log.format = "json"`) and the request metrics (`imagegate_http_*`).
//!
//! It opens the request's [`facts`] slot around the rest of the stack, so what authentication, the pipeline's
//! usage record and the upstream call learn (tenant, key id, model, images, cost, upstream, upstream latency)
//! reaches the line; the error's type, `code` and `param` come from the [`LoggedError`] on the response, the
//! cache outcome from `x-imagegate-cache`, the client library from the OpenAI SDKs' `x-stainless-*` headers or
//! `User-Agent`. Never logged: keys (the `Authorization` header is never read here), prompts, image bytes,
//! query strings (a signed link's signature).
//!
//! The line is written when the response headers are ready: for a stream, `images` is what was known then
//! (nothing); its usage line (`imagegate::usage`) follows when the stream ends.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use futures::FutureExt as _;

use super::layers::RequestId;
use crate::error::LoggedError;
use crate::metrics::facts::{self, Slot};
use crate::metrics::{Metrics, RequestSample};
use crate::wire::headers;

/// The longest client string (`User-Agent`, SDK version) logged; longer ones are cut.
const MAX_CLIENT_CHARS: usize = 128;

/// What the access layer needs.
#[derive(Clone)]
pub struct Access {
    pub metrics: Arc<Metrics>,
    /// Write the access-log line (`log.access`).
    pub log: bool,
}

/// The SDK that sent a request, from its headers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// `x-stainless-lang` (`python`, `js`, …).
    pub lang: Option<String>,
    /// `x-stainless-package-version`: the SDK's version.
    pub version: Option<String>,
    pub user_agent: Option<String>,
}

impl Client {
    pub fn from_headers(h: &http::HeaderMap) -> Self {
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(clean).filter(|s| !s.is_empty());
        Self {
            lang: get("x-stainless-lang"),
            version: get("x-stainless-package-version"),
            user_agent: get(http::header::USER_AGENT.as_str()),
        }
    }
}

/// Printable ASCII only, at most [`MAX_CLIENT_CHARS`].
fn clean(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(MAX_CLIENT_CHARS).collect()
}

/// What the access-log line takes from the request before it runs.
struct Line {
    request_id: String,
    path: String,
    client: Client,
}

/// Run `request` through `run` (the rest of the stack), then count and log it once its response is ready.
///
/// Not an `async fn`: what the line needs is taken from the request and `run` is called now, so the future
/// returned holds the running request once, not also the request it started from (docs/performance.md).
/// Everything after the response is ready runs in the poll that readies it, so in the caller's span.
pub fn observe<F>(
    access: &Access,
    request: Request,
    run: impl FnOnce(Request) -> F,
) -> impl Future<Output = Response> + Send + 'static
where
    F: Future<Output = Response> + Send + 'static,
{
    let started = Instant::now();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    // What only the line needs is gathered only when the line will be written (`log.access` on and
    // `imagegate::access` at INFO enabled): with `log.level = "warn"` a request skips the copies.
    let line = (access.log && tracing::enabled!(target: "imagegate::access", tracing::Level::INFO)).then(|| Line {
        request_id: request.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default(),
        path: request.uri().path().chars().take(256).collect::<String>(),
        client: Client::from_headers(request.headers()),
    });
    let metrics = access.metrics.clone();
    let in_flight = metrics.in_flight();
    let slot = Slot::default();
    // `map`, not an `async` block awaiting the running request: its state would keep that future twice.
    facts::scope(slot.clone(), run(request)).map(move |response| {
        let _in_flight = in_flight;
        super::layers::log_error(&response);
        let elapsed = started.elapsed();
        let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
        let f = facts::read(&slot);
        let status = response.status().as_u16();
        metrics.request_done(RequestSample {
            route,
            method: method.as_str(),
            status,
            tenant: f.tenant.as_deref().unwrap_or_default(),
            model: f.model.as_deref().unwrap_or_default(),
            elapsed,
        });
        if let Some(Line { request_id, path, client }) = line {
            let error = response.extensions().get::<LoggedError>();
            let cache = response.headers().get(headers::X_IMAGEGATE_CACHE).and_then(|v| v.to_str().ok());
            tracing::info!(
                target: "imagegate::access",
                request_id,
                method = %method,
                route,
                path,
                status,
                latency_ms = elapsed.as_millis() as u64,
                tenant = f.tenant,
                key_id = f.key_id,
                model = f.model,
                images = f.images,
                cost_usd = f.cost_usd,
                stream = f.stream,
                cache,
                upstream = f.upstream,
                upstream_latency_ms = f.upstream_ms,
                error_type = error.map(|e| e.error_type),
                error_code = error.and_then(|e| e.code),
                error_param = error.and_then(|e| e.param.as_deref()),
                client_lang = client.lang,
                client_version = client.version,
                user_agent = client.user_agent,
                "access"
            );
        }
        response
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_and_its_version_come_from_the_stainless_headers_cleaned_and_capped() {
        let mut h = http::HeaderMap::new();
        h.insert("x-stainless-lang", "python".parse().unwrap());
        h.insert("x-stainless-package-version", "1.99.9".parse().unwrap());
        h.insert(http::header::USER_AGENT, format!("OpenAI/Python 1.99.9\t{}", "x".repeat(500)).parse().unwrap());
        let c = Client::from_headers(&h);
        assert_eq!(c.lang.as_deref(), Some("python"));
        assert_eq!(c.version.as_deref(), Some("1.99.9"));
        let ua = c.user_agent.unwrap();
        assert!(ua.starts_with("OpenAI/Python 1.99.9x") && ua.len() == MAX_CLIENT_CHARS, "{ua}");
        assert_eq!(Client::from_headers(&http::HeaderMap::new()), Client::default());
    }
}
