//! The route table: method + path → handler, and nothing else. Image routes are served under `/v1` and, for
//! SDKs configured with a base URL lacking `/v1`, at the root too.

pub mod files;
pub mod health;
pub mod images;
pub mod metrics;
pub mod mock_files;

use axum::Router;
use axum::extract::Request;
use axum::routing::{get, post};

use crate::admin;
use crate::config::UpstreamKind;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::paths;

/// All routes: tenant authentication on the image routes, the admin token on `/admin/v1` (mounted only when
/// `admin.token` is set).
pub fn router(state: AppState) -> Router {
    // The image routes with and without `/v1`, each spelt out rather than nested: a nested router rewrote
    // every request's URI (`StripPrefix`) and dispatched it a second time, 1.5 % of a cache hit.
    let images = |prefix: &str| {
        Router::new()
            .route(&format!("{prefix}{}", paths::GENERATIONS), post(images::create_image))
            .route(&format!("{prefix}{}", paths::EDITS), post(images::create_image_edit))
            .route(&format!("{prefix}{}", paths::VARIATIONS), post(images::create_image_variation))
    };
    let mut router = Router::new()
        .merge(images("/v1"))
        .merge(images(""))
        .route(paths::HEALTHZ, get(health::healthz))
        .route(paths::READYZ, get(health::readyz))
        // Signed links need no key, like OpenAI's own image links.
        .route(&format!("{}/{{name}}", paths::IMAGE_FILES), get(files::get_image_file));
    if state.settings.metrics.enabled && state.settings.metrics.listen.is_none() {
        router = router.route(paths::METRICS, get(metrics::metrics));
    }
    if let Some(token) = &state.settings.admin.token {
        router = router.nest(admin::PREFIX, admin::router(token));
    }
    if let Some(console) = crate::console::router(&state) {
        router = router.nest(&state.settings.console.path, console);
    }
    // The mock's links are served by the gateway itself, for the default upstream or any named one.
    let settings = &state.settings;
    if std::iter::once(&settings.upstream).chain(settings.upstreams.values()).any(|u| u.kind == UpstreamKind::Mock) {
        let links = crate::upstream::mock::MockLinks::new(state.images.rehoster().links().derive(MOCK_LINKS_KEY));
        router = router.route(
            &format!("{}/{{name}}", paths::MOCK_FILES),
            get(mock_files::get_mock_file).layer(axum::Extension(links)),
        );
    }
    router.fallback(not_found).method_not_allowed_fallback(method_not_allowed).with_state(state)
}

/// `/metrics` alone, for `metrics.listen` (a listener of its own).
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route(paths::METRICS, get(metrics::metrics)).with_state(state)
}

/// What the mock upstream's link key is derived under, from the link-signing key (so mock links survive a
/// restart and verify on every replica sharing that key).
pub const MOCK_LINKS_KEY: &[u8] = b"imagegate mock upstream links";

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound { method: request.method().to_string(), path: request.uri().path().to_owned() }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed { method: request.method().to_string(), path: request.uri().path().to_owned() }
}
