//! `/healthz` (the process is alive) and `/readyz` (it accepts work: database answering, not draining, and
//! under `limits.on_backend_error = "closed"` the rate-limit backend answering).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;

/// Always 200 while the process serves HTTP.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when ready; 503 once shutdown has begun (so load balancers stop sending traffic), while the
/// database does not answer, or while the rate-limit backend does not answer and the policy is fail-closed
/// (every image request would be refused). Fail-open, an unreachable backend is reported but still ready.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"})));
    }
    if !state.db.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "database unavailable"})));
    }
    let limiter = state.images.limiter();
    let limits = match limiter.ready().await {
        Ok(()) => "ok",
        Err(_) if limiter.policy() == crate::domain::OnBackendError::Closed => {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "rate-limit backend unavailable"})));
        }
        Err(_) => "unavailable (fail-open)",
    };
    (StatusCode::OK, Json(json!({"status": "ready", "upstream": state.images.upstream_name(), "limits": limits})))
}
