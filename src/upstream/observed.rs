//! An [`Upstream`] wrapper that times every call and counts its failures in the metrics
//! (`imagegate_upstream_*`), and notes the upstream's name and latency on the request's access-log line.
//!
//! Each call runs in an `upstream` span (DEBUG: built only when traces are exported), whose context
//! `openai` sends on as `traceparent`. The time is up to the answer's headers: a stream's events come later, and a whole body is read by then.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use super::{Attribution, Reading, Upstream, UpstreamError, UpstreamReply};
use crate::images::request::ImageRequest;
use crate::metrics::facts;
use crate::metrics::{Metrics, UpstreamOutcome};

/// `inner`, observed under `name` (`default`, or the `[upstreams.<name>]` key).
pub struct Observed {
    inner: Arc<dyn Upstream>,
    name: String,
    metrics: Arc<Metrics>,
}

impl Observed {
    pub fn new(inner: Arc<dyn Upstream>, name: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        Self { inner, name: name.into(), metrics }
    }
}

impl Upstream for Observed {
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        attribution: &'a Attribution,
        reading: Reading,
    ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>> {
        let span = tracing::debug_span!(
            "upstream",
            upstream = %self.name,
            endpoint = request.endpoint.name(),
            status = tracing::field::Empty,
        );
        Box::pin(tracing::Instrument::instrument(
            async move {
                let started = Instant::now();
                let result = self.inner.send(request, attribution, reading).await;
                let elapsed = started.elapsed();
                let outcome = match &result {
                    Ok(reply) => {
                        tracing::Span::current().record("status", reply.status.as_u16());
                        UpstreamOutcome::Status(reply.status.as_u16())
                    }
                    Err(UpstreamError::Timeout { .. }) => UpstreamOutcome::Timeout,
                    // Unreachable, broken mid-answer, or every deployment resting: no answer came.
                    Err(_) => UpstreamOutcome::Unavailable,
                };
                self.metrics.upstream_call(&self.name, request.endpoint.name(), outcome, elapsed);
                facts::note(|f| {
                    f.upstream = Some(self.name.clone());
                    f.upstream_ms = Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                });
                result
            },
            span,
        ))
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
