//! The console's handlers: read the form or query, call the service functions the admin API uses
//! (`tenants::admin_ops` and `tenants::repo`) or the console's reads (`ledger::browse`, `storage::gallery`),
//! and render a page from `pages`. Every form is checked against the session's CSRF token first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, HOST, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::pages::{self, Frame, GalleryItem, Overview, UsageFilters};
use super::session::{Holder, SIGN_IN_PURPOSE};
use super::{ClientAddr, Console, ConsoleError, ConsoleRef, SESSION_COOKIE, SIGN_IN_COOKIE, Scope, Viewer};
use crate::domain::{Tenant, TenantStatus, keys};
use crate::error::ApiError;
use crate::ledger::browse::{self, DAY_MS, RowFilter, StatusFilter};
use crate::ledger::rollup;
use crate::state::AppState;
use crate::tenants::admin_ops::{self, KeyRequest};
use crate::tenants::repo::{NewTenant, TenantPatch};
use crate::tenants::store::Lookup;
use crate::time::now_ms;

/// Rows per page of the usage table.
pub const USAGE_PAGE: i64 = 50;
/// Tenants drawn in a colour of their own in the overview's charts (the rest are summed).
pub const MAX_SERIES: usize = 8;
/// Images per page of the gallery.
pub const GALLERY_PAGE: i64 = 24;

type Fields = Vec<(String, String)>;

/// The last value of form field `name`.
fn field<'a>(form: &'a Fields, name: &str) -> Option<&'a str> {
    form.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn frame<'a>(viewer: &'a Viewer, title: &'a str, current: &'a str) -> Frame<'a> {
    let who = match &viewer.scope {
        Scope::Admin => "platform team".to_owned(),
        Scope::Tenant(t) => t.name.clone(),
    };
    Frame { base: &viewer.console.base, title, who, admin: viewer.is_admin(), csrf: &viewer.csrf, current }
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

fn with_cookies(mut response: Response, cookies: &[String]) -> Response {
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(c) {
            response.headers_mut().append(SET_COOKIE, v);
        }
    }
    response
}

/// `GET {console}/`
pub async fn home(ConsoleRef(console): ConsoleRef) -> Response {
    see_other(&console.at("/overview"))
}

/// The sign-in form with a fresh token, also set as a signed cookie (double submit: a page elsewhere can
/// neither read the cookie nor set it, so it cannot sign someone in behind their back).
fn sign_in_form(console: &Console, status: StatusCode, message: Option<&str>) -> Response {
    let token = base64_token();
    let cookie = console.cookie(SIGN_IN_COOKIE, &console.sessions.sign(SIGN_IN_PURPOSE, &token), None);
    with_cookies(
        (status, Html(pages::sign_in(&console.base, &token, message).into_string())).into_response(),
        &[cookie],
    )
}

fn base64_token() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>())
}

/// `GET {console}/sign-in`
pub async fn sign_in_page(ConsoleRef(console): ConsoleRef) -> Response {
    sign_in_form(&console, StatusCode::OK, None)
}

/// `POST {console}/sign-in`: the admin token or a tenant key.
pub async fn sign_in(
    State(state): State<AppState>,
    ConsoleRef(console): ConsoleRef,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    if let Some(wait) = console.backoff.wait(addr).await {
        return Ok(too_many(&console, wait));
    }
    let cookie = super::cookie_value(&headers, SIGN_IN_COOKIE);
    let expected = cookie.as_deref().and_then(|c| console.sessions.verify(SIGN_IN_PURPOSE, c));
    match (expected, field(&form, "csrf")) {
        (Some(expected), Some(given)) if super::session::same_token(expected, given) => {}
        _ => {
            return Ok(sign_in_form(
                &console,
                StatusCode::FORBIDDEN,
                Some("The sign-in form expired: please try again."),
            ));
        }
    }
    let token = field(&form, "token").unwrap_or_default().trim();
    let outcome = if let Some(presented) = keys::parse(token) {
        match state.tenants.authenticate(presented).await? {
            Lookup::Found(ctx) => {
                Ok((Holder::Tenant { tenant_id: ctx.tenant.id.clone(), key_id: ctx.key_id }, String::new()))
            }
            Lookup::Suspended(name) => Err(format!("Tenant '{name}' is suspended: ask the platform team.")),
            Lookup::Unknown => Err("That key is not valid (unknown, revoked or expired).".to_owned()),
        }
    } else {
        match &state.settings.admin.token {
            Some(admin) if !token.is_empty() && digest_eq(token, admin.expose()) => {
                Ok((Holder::Admin, console.sessions.credential_of(admin.expose())))
            }
            _ => Err("That is neither the admin token nor a valid key.".to_owned()),
        }
    };
    match outcome {
        Ok((holder, credential)) => {
            console.backoff.succeed(addr).await;
            let (cookie, _) = console.sessions.open(holder, credential).await.map_err(internal)?;
            let cookies = [
                console.cookie(SESSION_COOKIE, &cookie, Some(console.sessions.ttl())),
                console.clear_cookie(SIGN_IN_COOKIE),
            ];
            Ok(with_cookies(see_other(&console.at("/overview")), &cookies))
        }
        Err(message) => {
            if let Some(wait) = console.backoff.fail(addr).await {
                tracing::warn!(client = %addr, wait_secs = wait.as_secs(), "console sign-ins failing; backing off");
                return Ok(too_many(&console, wait));
            }
            Ok(sign_in_form(&console, StatusCode::UNAUTHORIZED, Some(&message)))
        }
    }
}

fn digest_eq(a: &str, b: &str) -> bool {
    let (a, b): ([u8; 32], [u8; 32]) = (Sha256::digest(a.as_bytes()).into(), Sha256::digest(b.as_bytes()).into());
    a.ct_eq(&b).into()
}

fn too_many(console: &Console, wait: std::time::Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let message = format!("Too many failed sign-ins from your address: try again in {secs} s.");
    let mut response = sign_in_form(console, StatusCode::TOO_MANY_REQUESTS, Some(&message));
    response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    response
}

/// `POST {console}/sign-out`
pub async fn sign_out(viewer: Viewer, Form(form): Form<Fields>) -> Result<Response, ConsoleError> {
    viewer.check_csrf(field(&form, "csrf"))?;
    let console = &viewer.console;
    console.sessions.end(&viewer.session_id_sha256).await.map_err(internal)?;
    Ok(with_cookies(see_other(&console.at("/sign-in")), &[console.clear_cookie(SESSION_COOKIE)]))
}

fn internal(e: sqlx::Error) -> ConsoleError {
    ConsoleError::Api(ApiError::Internal(e.into()))
}

fn db_error(e: sqlx::Error) -> ConsoleError {
    internal(e)
}

/// The tenants a viewer may see: all for the platform team, its own for a team.
async fn visible_tenants(state: &AppState, viewer: &Viewer) -> Result<Vec<Tenant>, ConsoleError> {
    match &viewer.scope {
        Scope::Admin => Ok(state.tenants.repo().list_tenants().await?),
        Scope::Tenant(t) => Ok(vec![(**t).clone()]),
    }
}

/// The tenant id a query's `tenant` (a name) narrows to, within what the viewer may see.
async fn tenant_filter(state: &AppState, viewer: &Viewer, name: Option<&str>) -> Result<Option<Tenant>, ConsoleError> {
    match (&viewer.scope, name.filter(|n| !n.is_empty())) {
        (Scope::Tenant(t), _) => Ok(Some((**t).clone())),
        (Scope::Admin, Some(name)) => Ok(Some(state.tenants.repo().get_tenant(name).await?)),
        (Scope::Admin, None) => Ok(None),
    }
}

/// Midnight UTC of the day and of the month `now` falls in.
fn day_and_month_start(now: i64) -> (i64, i64) {
    let day = now - now.rem_euclid(DAY_MS);
    let month = crate::time::month_start(now).unwrap_or(day);
    (day, month)
}

/// `GET {console}/overview?days=&tenant=`
pub async fn overview(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ConsoleError> {
    let days = q.get("days").and_then(|d| d.parse::<i64>().ok()).filter(|d| (1..=366).contains(d)).unwrap_or(30);
    let now = now_ms();
    let (today, month) = day_and_month_start(now);
    let from = today - (days - 1) * DAY_MS;
    let filter = tenant_filter(&state, &viewer, q.get("tenant").map(String::as_str)).await?;
    let tenants = visible_tenants(&state, &viewer).await?;
    let names: HashMap<&str, &str> = tenants.iter().map(|t| (t.id.as_str(), t.name.as_str())).collect();
    let first_day = from / DAY_MS;
    // One bar per day up to 90 days, one per week beyond: a year stays 53 bars, not 365.
    let bucket = if days > 90 { 7 } else { 1 };
    let tenant_id = filter.as_ref().map(|t| t.id.as_str());
    let totals = browse::slot_totals(&state.db, from, days, bucket, tenant_id).await.map_err(db_error)?;

    let width = usize::try_from((days + bucket - 1) / bucket).unwrap_or(0);
    let labels: Vec<String> = (0..width as i64)
        .map(|i| {
            chrono::DateTime::from_timestamp_millis((first_day + i * bucket) * DAY_MS)
                .map_or_else(String::new, |t| t.format("%Y-%m-%d").to_string())
        })
        .collect();
    // tenant name → (images, requests, usd) per bar
    let mut per_tenant: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    let mut models: HashMap<String, (i64, i64, f64)> = HashMap::new();
    let mut o = Overview { days, ..Overview::default() };
    for t in &totals {
        let name = names.get(t.tenant_id.as_str()).map_or_else(|| t.tenant_id.clone(), |n| (*n).to_owned());
        let series = per_tenant.entry(name).or_insert_with(|| [vec![0.0; width], vec![0.0; width], vec![0.0; width]]);
        if let Some(i) = usize::try_from(t.slot).ok().filter(|i| *i < width) {
            series[0][i] += t.images as f64;
            series[1][i] += t.requests as f64;
            series[2][i] += t.cost_usd;
        }
        let m = models.entry(t.model.clone()).or_default();
        m.0 += t.requests;
        m.1 += t.images;
        m.2 += t.cost_usd;
        o.total_requests += t.requests;
        o.total_images += t.images;
        o.total_usd += t.cost_usd;
        o.refused += t.refused;
        o.errors += t.errors;
        o.cache_hits += t.cache_hits;
    }
    // The tenants that cost most get a colour each; the rest share one.
    let mut ranked: Vec<(String, [Vec<f64>; 3])> = per_tenant.into_iter().collect();
    ranked.sort_by(|a, b| b.1[2].iter().sum::<f64>().total_cmp(&a.1[2].iter().sum::<f64>()).then(a.0.cmp(&b.0)));
    if ranked.len() > MAX_SERIES {
        let rest = ranked.split_off(MAX_SERIES - 1);
        let mut other = [vec![0.0; width], vec![0.0; width], vec![0.0; width]];
        for (_, series) in &rest {
            for (sum, part) in other.iter_mut().zip(series) {
                sum.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
        }
        ranked.push((format!("{} other tenants", rest.len()), other));
    }
    for (name, [images, requests, usd]) in ranked {
        o.images.push((name.clone(), images));
        o.requests.push((name.clone(), requests));
        o.usd.push((name, usd));
    }
    let mut top: Vec<(String, i64, i64, f64)> = models.into_iter().map(|(m, (r, i, u))| (m, r, i, u)).collect();
    top.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(&b.0)));
    top.truncate(8);
    o.top_models = top;
    o.labels = labels;
    o.tenant_filter = filter.as_ref().map(|t| t.name.clone());
    o.tenant_names = tenants.iter().map(|t| t.name.clone()).collect();
    // What every tenant spent today and this month, in one read of the per-day rollup.
    let spent = rollup::spent_by_tenant(&state.db, today, month).await.map_err(db_error)?;
    for t in tenants.iter().filter(|t| filter.as_ref().is_none_or(|f| f.id == t.id)) {
        let l = &t.limits;
        if l.images_per_day.is_none()
            && l.images_per_month.is_none()
            && l.usd_per_day.is_none()
            && l.usd_per_month.is_none()
        {
            continue;
        }
        let (day_images, day_usd, month_images, month_usd) = spent.get(&t.id).copied().unwrap_or_default();
        let mut bars = Vec::new();
        if let Some(limit) = l.images_per_day {
            bars.push(("Images today".to_owned(), day_images as f64, limit as f64, false));
        }
        if let Some(limit) = l.images_per_month {
            bars.push(("Images this month".to_owned(), month_images as f64, limit as f64, false));
        }
        if let Some(limit) = l.usd_per_day {
            bars.push(("USD today".to_owned(), day_usd, limit, true));
        }
        if let Some(limit) = l.usd_per_month {
            bars.push(("USD this month".to_owned(), month_usd, limit, true));
        }
        o.budgets.push((t.name.clone(), bars));
    }
    Ok(Html(pages::overview(&frame(&viewer, "Overview", "overview"), &o).into_string()).into_response())
}

/// `GET {console}/tenants`
pub async fn tenants(State(state): State<AppState>, viewer: Viewer) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    tenants_page(&state, &viewer, StatusCode::OK, None).await
}

async fn tenants_page(
    state: &AppState,
    viewer: &Viewer,
    status: StatusCode,
    error: Option<(String, Option<String>)>,
) -> Result<Response, ConsoleError> {
    let list = state.tenants.repo().list_tenants().await?;
    let page = pages::tenants(&frame(viewer, "Tenants", "tenants"), &list, error.as_ref());
    Ok((status, Html(page.into_string())).into_response())
}

/// A refusal the form can show beside itself (validation, conflicts); anything else is an error page.
fn shown_on_form(e: ApiError) -> Result<(StatusCode, (String, Option<String>)), ConsoleError> {
    if e.status().is_client_error() {
        Ok((e.status(), (without_position(&e.client_message()), e.param().map(str::to_owned))))
    } else {
        Err(e.into())
    }
}

/// A JSON error's message without serde's ` at line 1 column 46`: the console built that JSON from the form,
/// so the position means nothing to the person who filled it in.
fn without_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => {
            let tail = message[at..].split(" column ").nth(1).unwrap_or_default();
            let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
            format!("{}{rest}", &message[..at])
        }
        _ => message.to_owned(),
    }
}

/// The form's values as the admin API's JSON body, so the same parsing and rules (and messages) apply.
fn tenant_json(form: &Fields, creating: bool) -> Result<Vec<u8>, ApiError> {
    let mut body = serde_json::Map::new();
    if creating {
        body.insert("name".into(), field(form, "name").unwrap_or_default().trim().into());
    }
    if let Some(models) = field(form, "allowed_models") {
        let list: Vec<serde_json::Value> =
            models.split([',', ' ', '\n', '\t']).map(str::trim).filter(|m| !m.is_empty()).map(Into::into).collect();
        if !list.is_empty() {
            body.insert("allowed_models".into(), list.into());
        } else if !creating {
            body.insert("allowed_models".into(), serde_json::Value::Null);
        }
    }
    for name in ["organization", "project", "upstream"] {
        if let Some(v) = field(form, name) {
            let v = v.trim();
            if !v.is_empty() {
                body.insert(name.into(), v.into());
            } else if !creating {
                body.insert(name.into(), serde_json::Value::Null);
            }
        }
    }
    body.insert("log_prompts".into(), (field(form, "log_prompts") == Some("true")).into());
    let mut limits = serde_json::Map::new();
    for (name, _) in pages::LIMIT_FIELDS {
        let Some(v) = field(form, &format!("limits.{name}")).map(str::trim).filter(|v| !v.is_empty()) else { continue };
        let value = if let Ok(n) = v.parse::<u64>() {
            n.into()
        } else if let Some(x) = v.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            serde_json::Value::Number(x)
        } else {
            v.into()
        };
        limits.insert(name.into(), value);
    }
    body.insert("limits".into(), limits.into());
    for name in ["cache_policy", "image_policy", "metadata"] {
        let Some(text) = field(form, name) else { continue };
        let value = if text.trim().is_empty() {
            if name == "cache_policy" { serde_json::Value::Null } else { serde_json::json!({}) }
        } else {
            serde_json::from_str(text)
                .map_err(|e| ApiError::invalid(format!("Invalid JSON in {name}: {e}."), Some(name.to_owned())))?
        };
        body.insert(name.into(), value);
    }
    serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.into()))
}

/// `POST {console}/tenants`
pub async fn create_tenant(
    State(state): State<AppState>,
    viewer: Viewer,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    viewer.check_csrf(field(&form, "csrf"))?;
    let created = async {
        let spec: NewTenant = admin_ops::parse_json(&tenant_json(&form, true)?)?;
        admin_ops::create_tenant(&state.tenants, spec).await
    }
    .await;
    match created {
        Ok(t) => Ok(see_other(&viewer.console.at(&format!("/tenants/{}", pages::urlencode(&t.name))))),
        Err(e) => {
            let (status, shown) = shown_on_form(e)?;
            tenants_page(&state, &viewer, status, Some(shown)).await
        }
    }
}

/// `GET {console}/tenants/{name}`
pub async fn tenant(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    tenant_page(&state, &viewer, &name, StatusCode::OK, None).await
}

async fn tenant_page(
    state: &AppState,
    viewer: &Viewer,
    name: &str,
    status: StatusCode,
    error: Option<(String, Option<String>)>,
) -> Result<Response, ConsoleError> {
    let t = state.tenants.repo().get_tenant(name).await?;
    let keys = state.tenants.repo().list_keys(name).await?;
    let title = format!("Tenant {}", t.name);
    let page = pages::tenant(&frame(viewer, &title, "tenants"), &t, &keys, error.as_ref());
    Ok((status, Html(page.into_string())).into_response())
}

/// `POST {console}/tenants/{name}`: save the settings form.
pub async fn update_tenant(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(name): Path<String>,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    viewer.check_csrf(field(&form, "csrf"))?;
    let updated = async {
        let patch: TenantPatch = admin_ops::parse_json(&tenant_json(&form, false)?)?;
        admin_ops::update_tenant(&state.tenants, &name, patch).await
    }
    .await;
    match updated {
        Ok(t) => Ok(see_other(&viewer.console.at(&format!("/tenants/{}", pages::urlencode(&t.name))))),
        Err(e) => {
            let (status, shown) = shown_on_form(e)?;
            tenant_page(&state, &viewer, &name, status, Some(shown)).await
        }
    }
}

async fn set_status(
    state: &AppState,
    viewer: &Viewer,
    name: &str,
    form: &Fields,
    status: TenantStatus,
) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    viewer.check_csrf(field(form, "csrf"))?;
    let t = admin_ops::set_status(&state.tenants, name, status).await?;
    Ok(see_other(&viewer.console.at(&format!("/tenants/{}", pages::urlencode(&t.name)))))
}

/// `POST {console}/tenants/{name}/suspend`
pub async fn suspend_tenant(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(name): Path<String>,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    set_status(&state, &viewer, &name, &form, TenantStatus::Suspended).await
}

/// `POST {console}/tenants/{name}/resume`
pub async fn resume_tenant(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(name): Path<String>,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    set_status(&state, &viewer, &name, &form, TenantStatus::Active).await
}

/// The gateway's public `/v1` URL: `server.public_url`, or the host this page was asked on.
fn public_v1(state: &AppState, headers: &HeaderMap) -> String {
    match &state.settings.server.public_url {
        Some(url) => format!("{}/v1", url.as_str().trim_end_matches('/')),
        None => {
            let host = headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            format!("http://{host}/v1")
        }
    }
}

/// `POST {console}/tenants/{name}/keys`: issue a key and show it once.
pub async fn issue_key(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    viewer.check_csrf(field(&form, "csrf"))?;
    let spec = KeyRequest {
        name: field(&form, "name").map(str::to_owned),
        expires_at: None,
        expires_in: field(&form, "expires_in").map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned),
    };
    match admin_ops::issue_key(&state.tenants, &name, spec, now_ms()).await {
        Ok(created) => {
            let title = format!("New key for {name}");
            let page = pages::key_issued(
                &frame(&viewer, &title, "tenants"),
                &name,
                &created.key,
                &public_v1(&state, &headers),
            );
            Ok(Html(page.into_string()).into_response())
        }
        Err(e) => {
            let (status, shown) = shown_on_form(e)?;
            tenant_page(&state, &viewer, &name, status, Some(shown)).await
        }
    }
}

/// `POST {console}/keys/{id}/revoke`
pub async fn revoke_key(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    viewer.require_admin()?;
    viewer.check_csrf(field(&form, "csrf"))?;
    let info = admin_ops::revoke_key(&state.tenants, &id).await?;
    Ok(see_other(&viewer.console.at(&format!("/tenants/{}", pages::urlencode(&info.tenant)))))
}

/// The usage table's query, checked, and the ledger filter it means for this viewer.
async fn usage_query(
    state: &AppState,
    viewer: &Viewer,
    q: &HashMap<String, String>,
) -> Result<(UsageFilters, RowFilter), ConsoleError> {
    let get = |k: &str| q.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let status = StatusFilter::parse(&get("status")).ok_or_else(|| {
        ApiError::invalid(
            format!("Invalid status '{}': use ok, refused, failed or an HTTP status.", get("status")),
            Some("status".to_owned()),
        )
    })?;
    let page = match get("page").as_str() {
        "" => 1,
        p => p
            .parse::<i64>()
            .ok()
            .filter(|p| (1..=100_000).contains(p))
            .ok_or_else(|| ApiError::invalid("page must be a number from 1.", Some("page".to_owned())))?,
    };
    let time = |name: &str| -> Result<Option<i64>, ApiError> {
        let v = get(name);
        if v.is_empty() {
            return Ok(None);
        }
        crate::time::parse_time(&v).map(Some).ok_or_else(|| {
            ApiError::invalid(format!("Invalid '{name}' value '{v}': use a date (2026-11-01)."), Some(name.to_owned()))
        })
    };
    let now = now_ms();
    let from = time("from")?.unwrap_or(now - 30 * DAY_MS);
    // A date in `to` means through the end of that day.
    let to = time("to")?.map_or(now + 1, |t| if get("to").len() == 10 { t + DAY_MS } else { t });
    let tenant = tenant_filter(state, viewer, q.get("tenant").map(String::as_str)).await?;
    let filters = UsageFilters {
        tenant: if viewer.is_admin() {
            tenant.as_ref().map(|t| t.name.clone()).unwrap_or_default()
        } else {
            String::new()
        },
        key: get("key"),
        model: get("model"),
        status,
        from: get("from"),
        to: get("to"),
        page,
    };
    let filter = RowFilter {
        from_ms: from,
        to_ms: to,
        tenant_id: tenant.map(|t| t.id),
        key_id: Some(filters.key.clone()).filter(|k| !k.is_empty()),
        model: Some(filters.model.clone()).filter(|m| !m.is_empty()),
        status,
    };
    Ok((filters, filter))
}

/// `GET {console}/usage?tenant=&key=&model=&status=&from=&to=&page=`
pub async fn usage(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ConsoleError> {
    let (filters, filter) = usage_query(&state, &viewer, &q).await?;
    let mut rows =
        browse::rows(&state.db, &filter, USAGE_PAGE + 1, (filters.page - 1) * USAGE_PAGE).await.map_err(db_error)?;
    let more = rows.len() > USAGE_PAGE as usize;
    rows.truncate(USAGE_PAGE as usize);
    let names: Vec<String> = if viewer.is_admin() {
        visible_tenants(&state, &viewer).await?.into_iter().map(|t| t.name).collect()
    } else {
        Vec::new()
    };
    let page = pages::usage(&frame(&viewer, "Usage", "usage"), &filters, &names, &rows, more);
    Ok(Html(page.into_string()).into_response())
}

/// `GET {console}/usage.csv?…`: the rows of the same page as CSV.
pub async fn usage_csv(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ConsoleError> {
    let (filters, filter) = usage_query(&state, &viewer, &q).await?;
    let rows = browse::rows(&state.db, &filter, USAGE_PAGE, (filters.page - 1) * USAGE_PAGE).await.map_err(db_error)?;
    let csv = browse::rows_to_csv(&rows).map_err(|e| ConsoleError::Api(ApiError::Internal(e)))?;
    let headers = [
        (CONTENT_TYPE, "text/csv; charset=utf-8"),
        (CONTENT_DISPOSITION, "attachment; filename=\"imagegate-usage.csv\""),
    ];
    Ok((headers, csv).into_response())
}

/// `GET {console}/gallery?tenant=&page=`
pub async fn gallery(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ConsoleError> {
    let page = q.get("page").and_then(|p| p.parse::<i64>().ok()).filter(|p| (1..=100_000).contains(p)).unwrap_or(1);
    let filter = tenant_filter(&state, &viewer, q.get("tenant").map(String::as_str)).await?;
    let tenants = visible_tenants(&state, &viewer).await?;
    let by_id: HashMap<&str, &Tenant> = tenants.iter().map(|t| (t.id.as_str(), t)).collect();
    let store = state.images.rehoster().store();
    let mut images = store
        .list_recent(filter.as_ref().map(|t| t.id.as_str()), GALLERY_PAGE + 1, (page - 1) * GALLERY_PAGE)
        .await
        .map_err(|e| ConsoleError::Api(ApiError::Internal(e.into())))?;
    let more = images.len() > GALLERY_PAGE as usize;
    images.truncate(GALLERY_PAGE as usize);
    let request_ids: Vec<String> = images.iter().map(|i| i.request_id.clone()).collect();
    let facts = browse::requests(&state.db, &request_ids).await.map_err(db_error)?;
    let links = state.images.rehoster().links();
    let items: Vec<GalleryItem> = images
        .iter()
        .map(|image| {
            let tenant = by_id.get(image.tenant_id.as_str());
            let fact = facts.get(&image.request_id);
            let opted_in = tenant.is_some_and(|t| t.log_prompts);
            GalleryItem {
                id: image.id.clone(),
                tenant: tenant.map_or_else(|| image.tenant_id.clone(), |t| t.name.clone()),
                link: links.url(&format!("{}.{}", image.id, image.extension()), image.expires_at / 1000),
                model: image.model.clone(),
                size: match (image.width, image.height) {
                    (Some(w), Some(h)) => format!("{w}×{h}"),
                    _ => fact.and_then(|f| f.size.clone()).unwrap_or_default(),
                },
                time: pages::time(Some(image.created_at)),
                cost_usd: fact.map(|f| f.cost_usd / f.images.max(1) as f64),
                prompt: if opted_in { fact.and_then(|f| f.prompt.clone()) } else { None },
            }
        })
        .collect();
    let names: Vec<String> = tenants.iter().map(|t| t.name.clone()).collect();
    let shown_tenant = filter.map(|t| t.name).filter(|_| viewer.is_admin()).unwrap_or_default();
    let page = pages::gallery(&frame(&viewer, "Gallery", "gallery"), &shown_tenant, &names, &items, page, more);
    Ok(Html(page.into_string()).into_response())
}

/// The stored image `id`, if the viewer may see it.
async fn visible_image(
    state: &AppState,
    viewer: &Viewer,
    id: &str,
) -> Result<Arc<crate::storage::StoredImage>, ConsoleError> {
    let store = state.images.rehoster().store();
    let image = store.find(id).await.map_err(|e| ConsoleError::Api(ApiError::Internal(e.into())))?;
    match image {
        Some(image) if viewer.tenant_id().is_none_or(|t| t == image.tenant_id) => Ok(image),
        _ => Err(ApiError::NotFoundResource { message: format!("no image '{id}'") }.into()),
    }
}

/// `GET {console}/gallery/{id}/thumb`
pub async fn thumbnail(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let image = visible_image(&state, &viewer, &id).await?;
    let bytes = state
        .images
        .rehoster()
        .store()
        .thumbnail(&image)
        .await
        .map_err(|e| ConsoleError::Api(ApiError::Internal(e.into())))?;
    Ok(([(CONTENT_TYPE, "image/jpeg"), (CACHE_CONTROL, "private, max-age=86400")], bytes).into_response())
}

/// `POST {console}/gallery/{id}/delete`
pub async fn delete_image(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    Form(form): Form<Fields>,
) -> Result<Response, ConsoleError> {
    viewer.check_csrf(field(&form, "csrf"))?;
    let image = visible_image(&state, &viewer, &id).await?;
    state
        .images
        .rehoster()
        .store()
        .delete_image(&image.id)
        .await
        .map_err(|e| ConsoleError::Api(ApiError::Internal(e.into())))?;
    tracing::info!(image = %image.id, "image deleted from the console");
    Ok(see_other(&viewer.console.at("/gallery")))
}

/// `GET {console}/assets/console.css`
pub async fn stylesheet() -> Response {
    (
        [(CONTENT_TYPE, "text/css; charset=utf-8"), (CACHE_CONTROL, "public, max-age=3600")],
        include_str!("assets/console.css"),
    )
        .into_response()
}

/// `GET {console}/assets/console.js`
pub async fn script() -> Response {
    (
        [(CONTENT_TYPE, "text/javascript; charset=utf-8"), (CACHE_CONTROL, "public, max-age=3600")],
        include_str!("assets/console.js"),
    )
        .into_response()
}
