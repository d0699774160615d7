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

/// A client that closes its connection after each answer: the server then drops each response (and its span)
/// at once, rather than when an idle keep-alive connection ends.
fn unpooled() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// The finished spans once `requests` request spans have ended: background tasks a request spawned (its
/// limits settlement, for one) hold its spans open a little after the response.
async fn finished(exporter: &InMemorySpanExporter, provider: &SdkTracerProvider, requests: usize) -> Vec<SpanData> {
    for _ in 0..250 {
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        if spans.iter().filter(|s| s.name == "request").count() >= requests {
            return spans;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    exporter.get_finished_spans().unwrap()
}

fn by_name(spans: &[SpanData]) -> BTreeMap<&str, &SpanData> {
    spans.iter().map(|s| (s.name.as_ref(), s)).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn one_request_is_one_trace_with_a_span_per_stage_under_the_callers_traceparent_which_reaches_the_upstream() {
    let (exporter, provider, _guard) = recorder();
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let res = unpooled()
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "dall-e-3", "prompt": "a lighthouse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    // The request span ends with the response body, once it is read.
    res.bytes().await.unwrap();
    app.shutdown().await;
    let spans = finished(&exporter, &provider, 1).await;
    let trace = TraceId::from_hex(TRACE).unwrap();
    let ours: Vec<SpanData> = spans.into_iter().filter(|s| s.span_context.trace_id() == trace).collect();
    let named = by_name(&ours);
    let stage =
        |name: &str| *named.get(name).unwrap_or_else(|| panic!("no {name} span in the caller's trace: {named:?}"));
    let attribute =
        |s: &SpanData, key: &str| s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string());

    // Every stage is in the caller's trace: authentication directly under the request span, the pipeline's
    // stages under the pipeline span, which is under the request span too. (The request span itself ends when
    // the last handle on it goes, which may be a database worker's; the tree is read from its children.)
    let request_span = stage("authenticate").parent_span_id;
    assert_ne!(request_span, SpanId::INVALID);
    assert_ne!(request_span, SpanId::from_hex(CALLER_SPAN).unwrap(), "the request has a span of its own");
    let pipeline_span = stage("validate").parent_span_id;
    assert_ne!(pipeline_span, request_span);
    for name in ["limit", "upstream", "rehost", "ledger"] {
        assert_eq!(stage(name).parent_span_id, pipeline_span, "{name} is a stage of the pipeline");
    }
    if let Some(request) = named.get("request") {
        assert_eq!(request.span_context.span_id(), request_span);
        assert_eq!(request.parent_span_id, SpanId::from_hex(CALLER_SPAN).unwrap(), "a child of the caller's span");
        assert_eq!(attribute(request, "request_id").as_deref(), Some(request_id.as_str()));
        assert_eq!(attribute(request, "tenant").as_deref(), Some("team-a"));
    }
    if let Some(images) = named.get("images") {
        assert_eq!((images.span_context.span_id(), images.parent_span_id), (pipeline_span, request_span));
    }
    let upstream = stage("upstream");
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
        let mut req = unpooled().post(format!("{}/images/generations", app.base_url)).bearer_auth(&app.key);
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        let res = req.json(&json!({"model": "gpt-image-1", "prompt": "x"})).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap();
    }
    app.shutdown().await;
    let spans = finished(&exporter, &provider, 2).await;
    // Two requests, two traces of their own: their authentication spans are in two different fresh traces.
    let traces: Vec<TraceId> =
        spans.iter().filter(|s| s.name == "authenticate").map(|s| s.span_context.trace_id()).collect();
    assert_eq!(traces.len(), 2);
    assert_ne!(traces[0], traces[1]);
    assert!(traces.iter().all(|t| *t != TraceId::INVALID));
    for request in spans.iter().filter(|s| s.name == "request") {
        assert_eq!(request.parent_span_id, SpanId::INVALID, "a root");
    }
    let calls = fake.calls_to("/v1/images/generations");
    assert_eq!(calls.len(), 2);
    for (call, trace) in calls.iter().zip(&traces) {
        let sent = call.header("traceparent").expect("traceparent sent upstream");
        assert!(sent.starts_with(&format!("00-{trace}-")), "{sent} continues {trace}");
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
