//! W3C trace context at the edges: a caller's `traceparent` (and `tracestate`) makes the request's span a child
//! of the caller's trace, and the current span's context goes to the upstream in the same headers.
//!
//! Off until [`enable`] (called by `telemetry::init_traces` when `tracing.otlp_endpoint` is set): then nothing
//! is read or written, and no OpenTelemetry context is built. A leaf: it imports nothing of the crate.

use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header naming the trace and the caller's span.
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turn trace propagation on (once the W3C propagator and an OpenTelemetry layer are installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// Make `span` a child of the caller's trace when tracing is on and `headers` carry a `traceparent`; a
/// malformed one is ignored (the request starts a trace of its own).
pub fn adopt_caller(span: &tracing::Span, headers: &HeaderMap) {
    if !enabled() || !headers.contains_key(TRACEPARENT) {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(headers)));
    let _ = span.set_parent(parent);
}

/// The headers carrying the current span's trace onward (`traceparent`, `tracestate`); empty when off.
pub fn outgoing() -> HeaderMap {
    let mut headers = HeaderMap::new();
    if enabled() {
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Inject(&mut headers)));
    }
    headers
}
