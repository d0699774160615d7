//! Logging and tracing: a `tracing` subscriber writing human or JSON lines, filtered by `log.level` or
//! `RUST_LOG`, and, when `tracing.otlp_endpoint` is set, an OpenTelemetry layer exporting the same spans over
//! OTLP/HTTP (batched, off the request path) with W3C trace-context propagation (`crate::traces`).
//!
//! What must never be logged (keys, base64, image bytes) is kept out at the source: headers are marked
//! sensitive, bodies are never logged, and errors carry fixed messages. Spans carry the same fields as log
//! lines, so the same holds for traces.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, TracingSettings};

/// How long one OTLP export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Install the global subscriber (logs only). Safe to call once; later calls are ignored (tests build many apps).
pub fn init(settings: &LogSettings) {
    let _ = install(settings, None);
}

/// Install the global subscriber with OTLP traces when `tracing.otlp_endpoint` is set. Keep the returned
/// [`Traces`] until exit and call [`Traces::shutdown`] to send the last spans.
pub fn init_with_traces(log: &LogSettings, tracing: &TracingSettings) -> anyhow::Result<Option<Traces>> {
    let Some(endpoint) = &tracing.otlp_endpoint else {
        init(log);
        return Ok(None);
    };
    let provider = provider(endpoint.as_str(), tracing)?;
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("imagegate"));
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    if install(log, Some(layer.boxed())) {
        crate::traces::enable();
    }
    Ok(Some(Traces(provider)))
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Install logs (and `traces`) as the global subscriber; false when one was installed already.
fn install(settings: &LogSettings, traces: Option<BoxedLayer>) -> bool {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let logs: BoxedLayer = match settings.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_target(true)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Human => tracing_subscriber::fmt::layer().with_target(true).boxed(),
    };
    // Traces get imagegate's spans down to DEBUG (the stage spans: authenticate, validate, limit, cache,
    // upstream, rehost, ledger) whatever the log level; with tracing off no layer wants DEBUG spans, so the
    // stage spans are never built.
    let traces = traces.map(|t| t.with_filter(Targets::new().with_target("imagegate", Level::DEBUG)).boxed());
    let layers: Vec<BoxedLayer> = std::iter::once(logs.with_filter(filter).boxed()).chain(traces).collect();
    tracing_subscriber::registry().with(layers).try_init().is_ok()
}

/// The tracer provider exporting to `endpoint` in batches from a tokio task.
fn provider(endpoint: &str, settings: &TracingSettings) -> anyhow::Result<SdkTracerProvider> {
    let client = reqwest::Client::builder().timeout(EXPORT_TIMEOUT).build()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(OtlpClient(client))
        .build()
        .map_err(|e| anyhow::anyhow!("tracing.otlp_endpoint: {e}"))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(settings.service_name.clone()).build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

/// The OTLP exporter's HTTP client: the reqwest the gateway already uses (no second HTTP stack).
#[derive(Debug)]
struct OtlpClient(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let response =
            self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
        let (status, headers) = (response.status(), response.headers().clone());
        let mut out = http::Response::new(response.bytes().await?);
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

/// The running trace exporter.
pub struct Traces(SdkTracerProvider);

impl Traces {
    /// Send the spans still queued and stop exporting.
    pub fn shutdown(self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "could not send the last spans");
        }
    }
}
