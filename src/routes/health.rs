//! `/healthz` (the process is alive) and `/readyz` (it accepts work: database answering, not draining).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;

/// Always 200 while the process serves HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when ready; 503 once shutdown has begun (so load balancers stop sending traffic) or while the
/// database does not answer.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"})));
    }
    if !state.db.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "database unavailable"})));
    }
    (StatusCode::OK, Json(json!({"status": "ready", "upstream": state.images.upstream_name()})))
}
