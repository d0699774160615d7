//! The web console: pages served by the gateway itself at `console.path` (default `/console`) for the
//! platform team (signed in with the admin token: every tenant) and for each team (signed in with one of its
//! keys: its own tenant only). Server-rendered HTML (`maud`), charts as inline SVG drawn here, one small
//! stylesheet and script embedded in the binary; nothing is fetched from elsewhere.
//!
//! - `session`  sessions in the database behind signed cookies, CSRF tokens, sign-in back-off.
//! - `handlers` thin handlers: read the form or query, call the same service functions as the admin API
//!   (`tenants::admin_ops`, `tenants::repo`, `ledger::report`), or the console's reads (`ledger::browse`,
//!   `storage::gallery`), and render.
//! - `pages`    the HTML; `chart` the SVG charts.
//!
//! Every page answers with a strict Content-Security-Policy (scripts and styles from this console only),
//! `Cache-Control: no-store` and no framing. Docs: `docs/console.md`.

pub mod chart;
pub mod handlers;
pub mod pages;
pub mod session;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::middleware::map_response;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http::header::{CACHE_CONTROL, COOKIE, HeaderValue, SET_COOKIE};
use http::{HeaderMap, StatusCode};

use self::session::{Backoff, Holder, Sessions};
use crate::config::LimitsBackend;
use crate::domain::Tenant;
use crate::error::ApiError;
use crate::state::AppState;
use crate::tenants::store::Lookup;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "imagegate_console";
/// The sign-in form's token cookie (double-submitted with the form, before there is a session).
pub const SIGN_IN_COOKIE: &str = "imagegate_console_signin";
/// What cookie signatures are derived under, from the link-signing key.
const COOKIE_KEY_PURPOSE: &[u8] = b"imagegate console cookies";

/// What the console's handlers share besides [`AppState`].
#[derive(Debug)]
pub struct Console {
    /// Where it is mounted, e.g. `/console`.
    pub base: String,
    pub sessions: Sessions,
    pub backoff: Backoff,
    /// Cookies carry `Secure` (the public URL is HTTPS).
    pub secure: bool,
}

impl Console {
    /// A path inside the console.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A `Set-Cookie` value scoped to the console.
    pub fn cookie(&self, name: &str, value: &str, max_age: Option<Duration>) -> String {
        let mut cookie = cookie::Cookie::build((name.to_owned(), value.to_owned()))
            .path(self.base.clone())
            .http_only(true)
            .secure(self.secure)
            .same_site(cookie::SameSite::Strict);
        if let Some(age) = max_age {
            let secs = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
            cookie = cookie.max_age(cookie::time::Duration::seconds(secs));
        }
        cookie.build().to_string()
    }

    /// A `Set-Cookie` value that removes cookie `name`.
    pub fn clear_cookie(&self, name: &str) -> String {
        self.cookie(name, "", Some(Duration::ZERO))
    }
}

/// The console's routes, mounted at `console.path`, or `None` when the console is turned off.
pub fn router(state: &AppState) -> Option<Router<AppState>> {
    let settings = &state.settings.console;
    if !settings.enabled {
        return None;
    }
    let key = state.images.rehoster().links().derive(COOKIE_KEY_PURPOSE);
    // With the limits in Redis, every replica behind the balancer counts the same failed sign-ins.
    let limits = &state.settings.limits;
    let local = || Backoff::new(settings.max_failed_sign_ins, settings.lockout);
    let backoff = match (limits.backend, &limits.redis_url) {
        (LimitsBackend::Redis, Some(url)) => {
            local().shared(url.expose(), &limits.redis_prefix, limits.redis_timeout).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "console sign-in back-off stays per replica");
                local()
            })
        }
        _ => local(),
    };
    let console = Arc::new(Console {
        base: settings.path.clone(),
        sessions: Sessions::new(state.db.clone(), key, settings.session_ttl),
        backoff,
        secure: state.settings.server.public_url.as_ref().is_some_and(|u| u.scheme() == "https"),
    });
    let routes = Router::new()
        .route("/", get(handlers::home))
        .route("/sign-in", get(handlers::sign_in_page).post(handlers::sign_in))
        .route("/sign-out", post(handlers::sign_out))
        .route("/overview", get(handlers::overview))
        .route("/tenants", get(handlers::tenants).post(handlers::create_tenant))
        .route("/tenants/{name}", get(handlers::tenant).post(handlers::update_tenant))
        .route("/tenants/{name}/suspend", post(handlers::suspend_tenant))
        .route("/tenants/{name}/resume", post(handlers::resume_tenant))
        .route("/tenants/{name}/keys", post(handlers::issue_key))
        .route("/keys/{id}/revoke", post(handlers::revoke_key))
        .route("/usage", get(handlers::usage))
        .route("/usage.csv", get(handlers::usage_csv))
        .route("/gallery", get(handlers::gallery))
        .route("/gallery/{id}/thumb", get(handlers::thumbnail))
        .route("/gallery/{id}/delete", post(handlers::delete_image))
        .route("/assets/console.css", get(handlers::stylesheet))
        .route("/assets/console.js", get(handlers::script))
        .layer(map_response(secure_headers))
        .layer(axum::Extension(console));
    Some(routes)
}

/// Headers on every console response: no caching of pages, no framing, scripts and styles from here only.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let fixed = [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// What a signed-in viewer may see.
#[derive(Debug, Clone)]
pub enum Scope {
    /// The platform team: every tenant.
    Admin,
    /// One team: its own tenant only.
    Tenant(Arc<Tenant>),
}

/// The signed-in viewer of a page, from the session cookie; without a live session, pages redirect to the
/// sign-in page.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub scope: Scope,
    pub csrf: String,
    pub session_id_sha256: String,
    pub console: Arc<Console>,
}

impl Viewer {
    /// The tenant id this viewer is limited to (`None` for the platform team).
    pub fn tenant_id(&self) -> Option<&str> {
        match &self.scope {
            Scope::Admin => None,
            Scope::Tenant(t) => Some(&t.id),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self.scope, Scope::Admin)
    }

    /// Refuse a form whose CSRF token is missing or not this session's.
    pub fn check_csrf(&self, given: Option<&str>) -> Result<(), ConsoleError> {
        match given {
            Some(token) if session::same_token(token, &self.csrf) => Ok(()),
            _ => Err(ConsoleError::Forbidden(
                "This form has expired or did not come from the console: reload the page and try again.".into(),
            )),
        }
    }

    /// Continue only for the platform team.
    pub fn require_admin(&self) -> Result<(), ConsoleError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ConsoleError::Forbidden("Only the platform team can do that.".into()))
        }
    }
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ConsoleError> {
        let console = console_of(parts)?;
        let Some(cookie) = cookie_value(&parts.headers, SESSION_COOKIE) else {
            return Err(ConsoleError::SignIn(console));
        };
        let session = console.sessions.find(&cookie).await.map_err(internal)?;
        let Some(session) = session else { return Err(ConsoleError::SignIn(console)) };
        let scope = match &session.holder {
            Holder::Admin => {
                let current = state.settings.admin.token.as_ref().map(|t| console.sessions.credential_of(t.expose()));
                if !current.is_some_and(|c| session::same_token(&c, &session.credential)) {
                    console.sessions.end(&session.id_sha256).await.map_err(internal)?;
                    return Err(ConsoleError::SignIn(console));
                }
                Scope::Admin
            }
            Holder::Tenant { tenant_id, key_id } => match state.tenants.check_key_id(key_id).await? {
                Lookup::Found(ctx) if &ctx.tenant.id == tenant_id => Scope::Tenant(ctx.tenant),
                _ => {
                    // Revoked, expired or suspended: the session ends with its key.
                    console.sessions.end(&session.id_sha256).await.map_err(internal)?;
                    return Err(ConsoleError::SignIn(console));
                }
            },
        };
        Ok(Self { scope, csrf: session.csrf, session_id_sha256: session.id_sha256, console })
    }
}

fn console_of(parts: &Parts) -> Result<Arc<Console>, ConsoleError> {
    parts
        .extensions
        .get::<Arc<Console>>()
        .cloned()
        .ok_or_else(|| ConsoleError::Api(ApiError::Internal(anyhow::anyhow!("console state missing"))))
}

/// The console's shared state, for handlers that run before sign-in.
#[derive(Debug, Clone)]
pub struct ConsoleRef(pub Arc<Console>);

impl<S: Send + Sync> FromRequestParts<S> for ConsoleRef {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ConsoleError> {
        console_of(parts).map(Self)
    }
}

/// The client's address (the peer of the connection), for sign-in back-off.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ConsoleError> {
        let addr =
            parts.extensions.get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        Ok(Self(addr))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

fn internal(e: sqlx::Error) -> ConsoleError {
    ConsoleError::Api(ApiError::Internal(e.into()))
}

/// Why a console page is not shown.
#[derive(Debug)]
pub enum ConsoleError {
    /// No live session: go and sign in.
    SignIn(Arc<Console>),
    /// A missing or wrong CSRF token, or a page the viewer may not use.
    Forbidden(String),
    /// Anything the service functions refused (validation, not found, conflicts) or failed at.
    Api(ApiError),
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<crate::tenants::repo::RepoError> for ConsoleError {
    fn from(e: crate::tenants::repo::RepoError) -> Self {
        Self::Api(e.into())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match self {
            Self::SignIn(console) => {
                let clear = console.clear_cookie(SESSION_COOKIE);
                let mut response = Redirect::to(&console.at("/sign-in")).into_response();
                if let Ok(value) = HeaderValue::from_str(&clear) {
                    response.headers_mut().insert(SET_COOKIE, value);
                }
                response
            }
            Self::Forbidden(message) => (
                StatusCode::FORBIDDEN,
                axum::response::Html(pages::error_page(StatusCode::FORBIDDEN, &message, None).into_string()),
            )
                .into_response(),
            Self::Api(e) => {
                if e.status().is_server_error() {
                    tracing::error!(error = %e, "console page failed");
                }
                let message = e.client_message();
                (e.status(), axum::response::Html(pages::error_page(e.status(), &message, e.param()).into_string()))
                    .into_response()
            }
        }
    }
}
