//! Tenant authentication for the image routes: `Authorization: Bearer ig_…` → a
//! [`TenantContext`](crate::domain::TenantContext), or a 401 before anything else of the request runs. The image
//! handlers call it first, rather than a middleware layer around them: a layer costs every request a boxed
//! future and a clone of the route, which a held request keeps for minutes (docs/performance.md). The caller's
//! header never travels further: the upstream client builds its own headers from scratch.

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::AUTHORIZATION;

use crate::domain::keys;
use crate::error::{ApiError, AuthFailure};
use crate::state::AppState;
use crate::tenants::store::Lookup;

/// How much of an unauthenticated request's body is read (and dropped) after its 401 has been sent.
pub const UNAUTHENTICATED_LINGER_BYTES: u64 = 64 * 1024;
/// How long that background read may take.
pub const UNAUTHENTICATED_LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The request's tenant, recorded on the request span and its facts; or why there is none.
pub async fn tenant(state: &AppState, headers: &http::HeaderMap) -> Result<crate::domain::TenantContext, ApiError> {
    let span = tracing::debug_span!("authenticate");
    let ctx = tracing::Instrument::instrument(authenticate(state, headers), span).await?;
    tracing::Span::current().record("tenant", ctx.tenant.name.as_str());
    tracing::Span::current().record("key_id", ctx.key_id.as_str());
    crate::metrics::facts::note(|f| {
        f.tenant = Some(ctx.tenant.name.clone());
        f.key_id = Some(ctx.key_id.clone());
    });
    Ok(ctx)
}

/// The answer to a request without a tenant: at once, and close. A few KiB of what the client is still sending
/// are read in the background so a small request sees the 401 rather than a reset connection. An
/// unauthenticated caller never gets more of imagegate's time or memory than that.
pub fn refuse(e: ApiError, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let (cap, time) = (UNAUTHENTICATED_LINGER_BYTES, UNAUTHENTICATED_LINGER_TIME);
    crate::extract::refuse_unread_within(e, body, &parts.headers, cap, time).into_response()
}

async fn authenticate(state: &AppState, headers: &http::HeaderMap) -> Result<crate::domain::TenantContext, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(ApiError::Unauthenticated { reason: AuthFailure::Missing });
    };
    let malformed = ApiError::Unauthenticated { reason: AuthFailure::Malformed };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthenticated { reason: AuthFailure::Malformed })?;
    let presented = keys::parse(token).ok_or(malformed)?;
    match state.tenants.authenticate(presented).await.map_err(|e| ApiError::Internal(e.into()))? {
        Lookup::Found(ctx) => Ok(ctx),
        Lookup::Suspended(name) => Err(ApiError::PermissionDenied {
            message: format!("Tenant '{name}' is suspended. Ask your imagegate administrator to resume it."),
        }),
        Lookup::Unknown => Err(ApiError::Unauthenticated { reason: AuthFailure::Unknown }),
    }
}
