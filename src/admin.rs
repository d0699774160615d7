//! The admin HTTP API under `/admin/v1`: tenants, keys and usage reports for the platform team.
//!
//! Guarded by `admin.token` (a Bearer token distinct from tenant keys, compared in constant time) and mounted
//! only when that token is configured; otherwise `/admin/...` answers the ordinary 404. Handlers are in
//! `handlers`; the SQL is `tenants::repo` and `ledger::report`, shared with the CLI. Every change to a
//! tenant or key empties this replica's key cache, so it applies here on the next request; other replicas
//! follow within `auth.key_cache_ttl`.

pub mod handlers;
pub mod models;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::error::{ApiError, AuthFailure};
use crate::state::AppState;

/// Where the admin API is mounted.
pub const PREFIX: &str = "/admin/v1";

/// The admin routes (relative to [`PREFIX`]), every one behind the admin token.
pub fn router(token: &Secret) -> Router<AppState> {
    let guard = AdminGuard { digest: Arc::new(Sha256::digest(token.expose().as_bytes()).into()) };
    Router::new()
        .route("/tenants", get(handlers::list_tenants).post(handlers::create_tenant))
        .route("/tenants/{name}", get(handlers::get_tenant).patch(handlers::update_tenant))
        .route("/tenants/{name}/suspend", post(handlers::suspend_tenant))
        .route("/tenants/{name}/resume", post(handlers::resume_tenant))
        .route("/tenants/{name}/keys", get(handlers::list_keys).post(handlers::create_key))
        .route("/keys/{id}", delete(handlers::revoke_key))
        .route("/usage", get(handlers::usage))
        .route("/cache", get(handlers::cache_stats).delete(handlers::clear_cache))
        .route("/limits", get(handlers::limits_stats))
        .route("/pools", get(handlers::pools))
        .route("/models", get(models::list_models))
        // route_layer: unknown admin paths still answer 404 rather than 401.
        .route_layer(from_fn_with_state(guard, require_admin))
}

/// The SHA-256 of the configured admin token; only digests are compared, so timing reveals nothing about
/// the token's length or content.
#[derive(Clone)]
struct AdminGuard {
    digest: Arc<[u8; 32]>,
}

/// Middleware: continue only with `Authorization: Bearer <admin.token>`; anything else (including a tenant
/// key) is a 401.
async fn require_admin(State(guard): State<AdminGuard>, request: Request, next: Next) -> Response {
    match check(&guard, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

fn check(guard: &AdminGuard, headers: &http::HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::Unauthenticated { reason: AuthFailure::Missing });
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(ApiError::Unauthenticated { reason: AuthFailure::Malformed })?;
    let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if bool::from(presented.ct_eq(guard.digest.as_ref())) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated { reason: AuthFailure::Unknown })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        if let Some(v) = value {
            map.insert(AUTHORIZATION, http::HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn only_the_exact_token_passes() {
        let token = "admin-token-0123456789";
        let guard = AdminGuard { digest: Arc::new(Sha256::digest(token.as_bytes()).into()) };
        assert!(check(&guard, &headers(Some(&format!("Bearer {token}")))).is_ok());
        assert!(check(&guard, &headers(Some(&format!("bearer {token}")))).is_ok());
        for bad in [None, Some("Basic abc"), Some("Bearer admin-token-012345678"), Some("Bearer "), Some(token)] {
            assert!(
                matches!(check(&guard, &headers(bad)), Err(ApiError::Unauthenticated { .. })),
                "{bad:?} must be refused"
            );
        }
    }
}
