//! Traces, with OpenTelemetry's in-memory exporter in place of an OTLP collector: one request is one trace,
//! with a child span per stage; a caller's `traceparent` makes it part of the caller's trace, and the upstream
//! receives the `traceparent` of the upstream call's span. Its own binary: it installs the W3C propagator and
//! turns propagation on for the whole process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests fail by panicking")]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use support::app::TestApp;
use support::fake_openai::FakeOpenAi;
use tracing_subscriber::layer::SubscriberExt as _;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Spans of one request, recorded on this thread (the test runtime is single-threaded, so the gateway's tasks
/// run here too).
fn recorder() -> (InMemorySpanExporter, SdkTracerProvider, tracing::subscriber::DefaultGuard) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    let subscriber = tracing_subscriber::registry().with(layer);
    let guard = tracing::subscriber::set_default(subscriber);
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    imagegate::traces::enable();
    (exporter, provider, guard)
}

/// The names of `span`'s ancestors in `spans`, nearest first.
fn ancestors<'a>(spans: &'a [SpanData], mut span: &'a SpanData) -> Vec<String> {
    let mut chain = Vec::new();
    while let Some(parent) = spans.iter().find(|p| p.span_context.span_id() == span.parent_span_id) {
        chain.push(parent.name.to_string());
        span = parent;
    }
    chain
}

fn by_name(spans: &[SpanData]) -> BTreeMap<&str, &SpanData> {
    spans.iter().map(|s| (s.name.as_ref(), s)).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn one_request_is_one_trace_with_a_span_per_stage_under_the_callers_traceparent_which_reaches_the_upstream() {
    let (exporter, provider, _guard) = recorder();
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "dall-e-3", "prompt": "a lighthouse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    app.shutdown().await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let trace = TraceId::from_hex(TRACE).unwrap();
    let ours: Vec<SpanData> = spans.into_iter().filter(|s| s.span_context.trace_id() == trace).collect();
    let named = by_name(&ours);

    let request = named.get("request").unwrap_or_else(|| panic!("no request span: {:?}", named.keys()));
    assert_eq!(request.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap(), "a child of the caller's span");
    let attribute =
        |s: &SpanData, key: &str| s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string());
    assert_eq!(attribute(request, "request_id").as_deref(), Some(request_id.as_str()));
    assert_eq!(attribute(request, "tenant").as_deref(), Some("team-a"));

    // Each stage is a span in the request's trace, under the request span.
    let ancestors = |s: &SpanData| ancestors(&ours, s);
    for stage in ["authenticate", "validate", "limit", "upstream", "rehost", "ledger"] {
        let span = named.get(stage).unwrap_or_else(|| panic!("no {stage} span: {:?}", named.keys()));
        assert!(
            ancestors(span).contains(&"request".to_owned()),
            "{stage} is not under the request: {:?}",
            ancestors(span)
        );
    }
    let upstream = named["upstream"];
    assert_eq!(attribute(upstream, "status").as_deref(), Some("200"));

    // The upstream saw the same trace, with the upstream call's span as its parent.
    let call = fake.calls_to("/v1/images/generations").pop().expect("the upstream was called");
    let sent = call.header("traceparent").expect("traceparent sent upstream").to_owned();
    let expected = format!("00-{TRACE}-{}-01", upstream.span_context.span_id());
    assert_eq!(sent, expected);
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_without_a_traceparent_starts_a_trace_of_its_own_and_a_malformed_one_is_ignored() {
    let (exporter, provider, _guard) = recorder();
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    for traceparent in [None, Some("00-not-a-trace-01")] {
        let mut req = app.client.post(format!("{}/images/generations", app.base_url)).bearer_auth(&app.key);
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        let res = req.json(&json!({"model": "gpt-image-1", "prompt": "x"})).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    app.shutdown().await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let requests: Vec<&SpanData> = spans.iter().filter(|s| s.name == "request").collect();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|s| s.parent_span_id == SpanId::INVALID), "roots of their own traces");
    assert_ne!(requests[0].span_context.trace_id(), requests[1].span_context.trace_id());
    for call in fake.calls_to("/v1/images/generations") {
        let sent = call.header("traceparent").expect("traceparent sent upstream");
        assert!(requests.iter().any(|r| sent.contains(&r.span_context.trace_id().to_string())), "{sent}");
    }
}

/// A stand-in OTLP/HTTP collector: the content type and size of every export it receives.
async fn collector() -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, usize)>>>) {
    use axum::routing::post;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: http::HeaderMap, body: bytes::Bytes| async move {
            let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            seen.lock().unwrap().push((kind, body.len()));
            ""
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_exports_its_spans_over_otlp_http_when_an_endpoint_is_set_and_sends_the_last_on_sigterm() {
    let (endpoint, received) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let key = imagegate::domain::keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"0s\"\n[tracing]\notlp_endpoint = \"{endpoint}\"\n\
         [[tenants]]\nname = \"ci\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        key.id, key.sha256
    );
    std::fs::write(dir.path().join("imagegate.toml"), config).unwrap();
    let mut gw = support::app::GatewayProcess::start(&["serve", "--mock", "--config", "imagegate.toml"], dir.path());
    let res = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key.key)
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "gpt-image-1", "prompt": "x", "size": "1024x1024"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    gw.terminate();
    assert!(gw.wait(std::time::Duration::from_secs(20)).success(), "{}", gw.printed());
    let exports = received.lock().unwrap().clone();
    assert!(!exports.is_empty(), "no export reached the collector: {}", gw.printed());
    assert!(exports.iter().all(|(kind, size)| kind == "application/x-protobuf" && *size > 0), "{exports:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_endpoint_the_binary_sends_no_traceparent_upstream() {
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = imagegate::domain::keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"0s\"\n[upstream]\nbase_url = \"{}\"\napi_key = \"{}\"\n\
         [[tenants]]\nname = \"ci\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        fake.url,
        support::app::UPSTREAM_KEY,
        key.id,
        key.sha256
    );
    std::fs::write(dir.path().join("imagegate.toml"), config).unwrap();
    let gw = support::app::GatewayProcess::start(&["serve", "--config", "imagegate.toml"], dir.path());
    let res = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key.key)
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "gpt-image-1", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let call = fake.last_call().expect("the upstream was called");
    assert_eq!(call.header("traceparent"), None, "tracing is off: nothing read, nothing sent");
}
