//! The admin API's handlers: read the path, query or JSON body, call `tenants::repo` or `ledger::report`,
//! answer JSON (or CSV). Every rejection is an [`ApiError`], so admin errors have OpenAI's shape too.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use http::request::Parts;
use http_body_util::LengthLimitError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::domain::keys;
use crate::domain::{Tenant, TenantStatus};
use crate::error::ApiError;
use crate::ledger::report::{self, SummaryQuery, UsageReport};
use crate::state::AppState;
use crate::tenants::repo::{KeyInfo, NewTenant, TenantPatch};
use crate::time::{RelativeError, now_ms};

/// The largest admin request body accepted (tenant specs are small; metadata is free-form but not bulk data).
pub const MAX_BODY: usize = 256 * 1024;

/// OpenAI's list envelope: `{"object": "list", "data": [...]}`.
#[derive(Debug, Serialize)]
pub struct List<T> {
    object: &'static str,
    data: Vec<T>,
}

impl<T> List<T> {
    pub fn of(data: Vec<T>) -> Json<Self> {
        Json(Self { object: "list", data })
    }
}

/// `GET /admin/v1/tenants`
pub async fn list_tenants(State(state): State<AppState>) -> Result<Json<List<Tenant>>, ApiError> {
    Ok(List::of(state.tenants.repo().list_tenants().await?))
}

/// `POST /admin/v1/tenants`
pub async fn create_tenant(
    State(state): State<AppState>,
    JsonBody(spec): JsonBody<NewTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    let tenant = state.tenants.repo().create_tenant(spec, "api").await?;
    state.tenants.invalidate_all();
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// `GET /admin/v1/tenants/{name}`
pub async fn get_tenant(State(state): State<AppState>, Segment(name): Segment) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(state.tenants.repo().get_tenant(&name).await?))
}

/// `PATCH /admin/v1/tenants/{name}`: absent fields stay, `null` clears a nullable field.
pub async fn update_tenant(
    State(state): State<AppState>,
    Segment(name): Segment,
    JsonBody(patch): JsonBody<TenantPatch>,
) -> Result<Json<Tenant>, ApiError> {
    let tenant = state.tenants.repo().update_tenant(&name, patch).await?;
    state.tenants.invalidate_all();
    Ok(Json(tenant))
}

/// `POST /admin/v1/tenants/{name}/suspend`
pub async fn suspend_tenant(State(state): State<AppState>, Segment(name): Segment) -> Result<Json<Tenant>, ApiError> {
    set_status(&state, &name, TenantStatus::Suspended).await
}

/// `POST /admin/v1/tenants/{name}/resume`
pub async fn resume_tenant(State(state): State<AppState>, Segment(name): Segment) -> Result<Json<Tenant>, ApiError> {
    set_status(&state, &name, TenantStatus::Active).await
}

async fn set_status(state: &AppState, name: &str, status: TenantStatus) -> Result<Json<Tenant>, ApiError> {
    let tenant = state.tenants.repo().set_status(name, status).await?;
    state.tenants.invalidate_all();
    Ok(Json(tenant))
}

/// `GET /admin/v1/tenants/{name}/keys`: ids and dates, never secrets.
pub async fn list_keys(State(state): State<AppState>, Segment(name): Segment) -> Result<Json<List<KeyInfo>>, ApiError> {
    Ok(List::of(state.tenants.repo().list_keys(&name).await?))
}

/// Body of `POST /admin/v1/tenants/{name}/keys`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    #[serde(default)]
    pub name: Option<String>,
    /// RFC 3339 time, a date (midnight UTC) or Unix milliseconds.
    #[serde(default)]
    pub expires_at: Option<serde_json::Value>,
    /// A duration from now, e.g. `30d`, `12h`.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// A new key: the secret (shown this once) and its listing.
#[derive(Debug, Serialize)]
pub struct CreatedKey {
    key: String,
    #[serde(flatten)]
    info: KeyInfo,
}

/// `POST /admin/v1/tenants/{name}/keys`
pub async fn create_key(
    State(state): State<AppState>,
    Segment(tenant): Segment,
    JsonBody(spec): JsonBody<KeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let expires_at = expiry(&spec, now_ms())?;
    let label = spec.name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    let (key, info) = state.tenants.repo().issue_key(&tenant, label, expires_at).await?;
    state.tenants.invalidate_all();
    Ok((StatusCode::CREATED, Json(CreatedKey { key: key.key, info })))
}

/// `DELETE /admin/v1/keys/{id}`: revoke; revoking twice keeps the first time.
pub async fn revoke_key(State(state): State<AppState>, Segment(id): Segment) -> Result<Json<KeyInfo>, ApiError> {
    if keys::parse(&id).is_some() {
        let message = "Pass the key's id (the 8 characters after `ig_`), not the whole key.";
        return Err(ApiError::invalid(message, Some("id".to_owned())));
    }
    let info = state.tenants.repo().revoke_key(&id).await?;
    state.tenants.invalidate_all();
    Ok(Json(info))
}

/// `GET /admin/v1/cache`: this replica's response-cache counters (hits, misses, evictions, bytes held).
pub async fn cache_stats(State(state): State<AppState>) -> Json<crate::cache::Stats> {
    Json(state.images.cache().stats().await)
}

/// `GET /admin/v1/limits`: this replica's rate-limit counters (backend errors, fail-open passes, refusals by
/// limit, upstream 429s passed through).
pub async fn limits_stats(State(state): State<AppState>) -> Json<crate::limits::Stats> {
    Json(state.images.limiter().stats())
}

/// `GET /admin/v1/pools`: every pool (the default first, then named upstreams and pools) with each
/// deployment's state on this replica: healthy, resting or unhealthy (and for how long), calls in flight, and
/// the capacity left this minute.
pub async fn pools(State(state): State<AppState>) -> Json<serde_json::Value> {
    let pools: Vec<serde_json::Value> = state
        .images
        .upstreams()
        .pools()
        .map(|pool| serde_json::json!({"name": pool.name(), "deployments": pool.status()}))
        .collect();
    Json(serde_json::json!({ "pools": pools }))
}

/// `DELETE /admin/v1/cache`: drop every answer this replica holds in memory.
pub async fn clear_cache(State(state): State<AppState>) -> Json<crate::cache::Stats> {
    state.images.cache().clear();
    Json(state.images.cache().stats().await)
}

/// `GET /admin/v1/usage?from=&to=&tenant=&format=json|csv`
pub async fn usage(State(state): State<AppState>, RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    let p = UsageParams::parse(query.as_deref(), now_ms())?;
    if let Some(name) = &p.tenant {
        state.tenants.repo().get_tenant(name).await?;
    }
    let q = SummaryQuery { from_ms: p.from, to_ms: p.to, tenant: p.tenant };
    let rows = report::summary(&state.db, &q).await.map_err(|e| ApiError::Internal(e.into()))?;
    if p.csv {
        let headers = [
            (CONTENT_TYPE, "text/csv; charset=utf-8"),
            (CONTENT_DISPOSITION, "attachment; filename=\"imagegate-usage.csv\""),
        ];
        return Ok((headers, report::to_csv(&rows)?).into_response());
    }
    Ok(Json(UsageReport::new(p.from, p.to, rows)).into_response())
}

/// The usage query, checked.
#[derive(Debug, PartialEq)]
struct UsageParams {
    from: i64,
    to: i64,
    tenant: Option<String>,
    csv: bool,
}

impl UsageParams {
    fn parse(query: Option<&str>, now: i64) -> Result<Self, ApiError> {
        let (mut from, mut to, mut tenant, mut csv) = (None, None, None, false);
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match name.as_ref() {
                "from" => from = Some(time_param(&value, "from")?),
                "to" => to = Some(time_param(&value, "to")?),
                "tenant" => tenant = Some(value.into_owned()).filter(|t| !t.is_empty()),
                "format" => csv = format_param(&value)?,
                other => {
                    let message = format!("Unknown query parameter '{other}': use from, to, tenant or format.");
                    return Err(ApiError::invalid(message, Some(other.to_owned())));
                }
            }
        }
        let from_given = from.is_some();
        let from = match from {
            Some(ms) => ms,
            None => crate::time::month_start(now)
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no month start for {now}")))?,
        };
        let to_given = to.is_some();
        let to = to.unwrap_or(now);
        if from >= to {
            // Name the bound the caller wrote: with only `to` given, `to` is what is wrong.
            let param = if to_given && !from_given { "to" } else { "from" };
            return Err(ApiError::invalid(format!("'from' ({from}) must be before 'to' ({to})."), Some(param.into())));
        }
        Ok(Self { from, to, tenant, csv })
    }
}

fn time_param(value: &str, param: &str) -> Result<i64, ApiError> {
    crate::time::parse_time(value).ok_or_else(|| {
        let message = format!(
            "Invalid '{param}' value '{value}': use a date (2026-11-01), an RFC 3339 time (2026-11-01T09:00:00Z, \
             2026-11-01T10:00:00+01:00) or Unix milliseconds, from 1970 on."
        );
        ApiError::invalid(message, Some(param.to_owned()))
    })
}

fn format_param(value: &str) -> Result<bool, ApiError> {
    match value {
        "json" | "" => Ok(false),
        "csv" => Ok(true),
        other => Err(ApiError::invalid(
            format!("Invalid 'format' value '{other}': use json or csv."),
            Some("format".to_owned()),
        )),
    }
}

/// The key's expiry in Unix milliseconds, from `expires_at` or `expires_in` (not both); it must be in the future.
fn expiry(spec: &KeyRequest, now: i64) -> Result<Option<i64>, ApiError> {
    let at = match (&spec.expires_at, spec.expires_in.as_deref()) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            let message = "Pass either expires_at or expires_in, not both.";
            return Err(ApiError::invalid(message, Some("expires_in".to_owned())));
        }
        (Some(at), None) => absolute_expiry(at)?,
        (None, Some(text)) => relative_expiry(text, now)?,
    };
    if at <= now {
        return Err(ApiError::invalid("expires_at must be in the future.", Some("expires_at".to_owned())));
    }
    Ok(Some(at))
}

fn absolute_expiry(value: &serde_json::Value) -> Result<i64, ApiError> {
    let parsed = match value {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => crate::time::parse_time(s),
        _ => None,
    };
    parsed.ok_or_else(|| {
        let message = format!(
            "Invalid expires_at {value}: use an RFC 3339 time (2026-11-01T09:00:00Z, 2026-11-01T10:00:00+01:00), \
             a date (2026-11-01) or Unix milliseconds."
        );
        ApiError::invalid(message, Some("expires_at".to_owned()))
    })
}

fn relative_expiry(text: &str, now: i64) -> Result<i64, ApiError> {
    crate::time::after(text, now).map_err(|e| {
        let message = match e {
            RelativeError::Unreadable(_) => format!("Invalid expires_in '{text}': {e}."),
            RelativeError::TooShort => format!("expires_in {e}."),
            RelativeError::TooFar => format!("expires_in '{text}' {e}."),
        };
        ApiError::invalid(message, Some("expires_in".to_owned()))
    })
}

/// A path segment (`{name}`, `{id}`), with a rejection in OpenAI's shape.
#[derive(Debug)]
pub struct Segment(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(e.body_text(), None))?;
        Ok(Self(value))
    }
}

/// A JSON request body parsed with serde (whatever the content type; an empty body reads as `{}`), with
/// errors in OpenAI's shape naming the problem.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let raw = axum::body::to_bytes(request.into_body(), MAX_BODY).await.map_err(body_error)?;
        parse_json(&raw).map(Self)
    }
}

fn body_error(e: axum::Error) -> ApiError {
    let inner = e.into_inner();
    let first: &(dyn std::error::Error + 'static) = inner.as_ref();
    let too_large = std::iter::successors(Some(first), |e| (*e).source()).any(|e| e.is::<LengthLimitError>());
    if too_large {
        ApiError::PayloadTooLarge { limit: MAX_BODY as u64 }
    } else {
        ApiError::invalid(format!("Could not read the request body: {inner}"), None)
    }
}

fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    let raw = if raw.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { raw };
    serde_json::from_slice(raw).map_err(|e| {
        let message = e.to_string();
        let param = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        ApiError::invalid(format!("Invalid JSON body: {message}."), param)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_794_923_100_000; // 2026-11-18T…Z

    fn param_of(e: ApiError) -> Option<String> {
        e.param().map(str::to_owned)
    }

    #[test]
    fn usage_defaults_to_this_month_until_now() {
        let p = UsageParams::parse(None, NOW).unwrap();
        assert_eq!(p, UsageParams { from: 1_793_491_200_000, to: NOW, tenant: None, csv: false });
        let p = UsageParams::parse(Some("from=2026-11-01T10:00:00%2B02:00&to=2026-11-01T10:00:00+02:00"), NOW);
        assert_eq!(p.unwrap_err().param(), Some("from"), "equal bounds: from must be before to");
        let p = UsageParams::parse(Some("from=2026-11-01T02:00:00%2B02:00"), NOW).unwrap();
        assert_eq!(p.from, 1_793_491_200_000);
        let p = UsageParams::parse(Some("from=2026-10-01&to=2026-11-01&tenant=a%20b&format=csv"), NOW).unwrap();
        assert_eq!(
            (p.from, p.to, p.tenant.as_deref(), p.csv),
            (1_790_812_800_000, 1_793_491_200_000, Some("a b"), true)
        );
    }

    #[test]
    fn bad_usage_params_name_themselves() {
        for (query, param) in [
            ("from=yesterday", "from"),
            ("to=soon", "to"),
            ("format=xml", "format"),
            ("colour=red", "colour"),
            ("from=2026-11-02&to=2026-11-01", "from"),
            ("to=-5", "to"),
            ("to=2000-01-01", "to"),
            ("from=-1", "from"),
        ] {
            let e = UsageParams::parse(Some(query), NOW).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(param_of(e).as_deref(), Some(param), "{query}");
        }
    }

    #[test]
    fn expiry_takes_one_form_and_must_be_in_the_future() {
        let spec = |at: Option<serde_json::Value>, inn: Option<&str>| KeyRequest {
            name: None,
            expires_at: at,
            expires_in: inn.map(str::to_owned),
        };
        assert_eq!(expiry(&spec(None, None), NOW).unwrap(), None);
        assert_eq!(expiry(&spec(None, Some("1s")), NOW).unwrap(), Some(NOW + 1000));
        assert_eq!(expiry(&spec(None, Some("30d")), NOW).unwrap(), Some(NOW + 30 * 86_400_000));
        assert_eq!(expiry(&spec(Some(serde_json::json!(NOW + 5)), None), NOW).unwrap(), Some(NOW + 5));
        assert_eq!(expiry(&spec(Some(serde_json::json!("2027-01-01")), None), NOW).unwrap(), Some(1_798_761_600_000));
        let offset = spec(Some(serde_json::json!("2027-01-01T02:00:00+02:00")), None);
        assert_eq!(expiry(&offset, NOW).unwrap(), Some(1_798_761_600_000));
        let both = spec(Some(serde_json::json!("2027-01-01")), Some("1d"));
        assert_eq!(param_of(expiry(&both, NOW).unwrap_err()).as_deref(), Some("expires_in"));
        for bad in [spec(Some(serde_json::json!("2020-01-01")), None), spec(Some(serde_json::json!(true)), None)] {
            assert_eq!(param_of(expiry(&bad, NOW).unwrap_err()).as_deref(), Some("expires_at"));
        }
        for bad in ["soon", "10ms"] {
            assert_eq!(param_of(expiry(&spec(None, Some(bad)), NOW).unwrap_err()).as_deref(), Some("expires_in"));
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<NewTenant>(br#"{"name":"a","colour":"red"}"#).unwrap_err();
        assert_eq!(param_of(e).as_deref(), Some("colour"));
        let e = parse_json::<NewTenant>(b"").unwrap_err();
        assert_eq!(param_of(e).as_deref(), Some("name"));
        let e = parse_json::<NewTenant>(b"{not json").unwrap_err();
        assert!(e.to_string().starts_with("Invalid JSON body"), "{e}");
        assert!(parse_json::<KeyRequest>(b"  ").is_ok());
    }
}
