//! `GET /metrics`: this gateway's Prometheus metrics, never behind a tenant key; behind `metrics.token` when
//! one is set. The counters other modules keep (cache, limits, ledger) are read here and copied in.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use crate::metrics::Snapshot;
use crate::state::AppState;

/// The content type of the OpenMetrics text format, which Prometheus scrapes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.settings.metrics.token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(token.expose().as_bytes())) {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "metrics token required\n")
                .into_response();
        }
    }
    let text = state.metrics.render(&snapshot(&state).await);
    ([(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], text).into_response()
}

/// What the cache, the limits and the ledger count now.
async fn snapshot(state: &AppState) -> Snapshot {
    let cache = state.images.cache().stats().await;
    let limits = state.images.limiter().stats();
    let ledger = state.ledger.stats();
    let (queue_depth, queue_capacity) = state.ledger.queue();
    let keys = state.tenants.lookup_stats();
    let mut limit_refusals: Vec<(&'static str, u64)> = limits.refusals.into_iter().collect();
    limit_refusals.push(("fail_closed", limits.refused_by_fail_closed));
    Snapshot {
        cache_requests: vec![
            ("hit", cache.hits),
            ("miss", cache.misses),
            ("bypass", cache.bypasses),
            ("coalesced", cache.coalesced),
        ],
        cache_stores: cache.stores,
        cache_evictions: cache.evictions,
        cache_entries: cache.entries,
        cache_bytes: cache.bytes,
        cache_redis_errors: cache.shared_errors,
        limit_refusals,
        limit_fail_open: limits.passed_by_fail_open,
        limit_in_flight: limits.in_flight,
        limit_backend_errors: limits.backend_errors,
        limit_backend_is_redis: limits.backend == "redis",
        ledger_written: ledger.written,
        ledger_rejected: ledger.rejected,
        ledger_dropped: ledger.dropped,
        ledger_queue_depth: queue_depth,
        ledger_queue_capacity: queue_capacity,
        key_lookups: vec![("found", keys.found), ("unknown", keys.unknown), ("failed", keys.failed)],
    }
}
