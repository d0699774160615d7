//! The platform team's operations on tenants and keys, shared by the admin API and the web console: each
//! checks its input with the admin API's rules and messages, writes through `repo`, and empties this
//! replica's key cache so the change applies here at once (other replicas follow within
//! `auth.key_cache_ttl`). Results are [`ApiError`]s so both front ends show the same messages.

use serde::{Deserialize, Serialize};

use super::repo::{KeyInfo, NewTenant, TenantPatch};
use super::store::TenantStore;
use crate::domain::keys;
use crate::domain::{Tenant, TenantStatus};
use crate::error::ApiError;
use crate::time::RelativeError;

/// Create a tenant (source `api`).
pub async fn create_tenant(store: &TenantStore, spec: NewTenant) -> Result<Tenant, ApiError> {
    let tenant = store.repo().create_tenant(spec, "api").await?;
    store.invalidate_all();
    Ok(tenant)
}

/// Apply a partial update: absent fields stay, `null` clears a nullable field.
pub async fn update_tenant(store: &TenantStore, name: &str, patch: TenantPatch) -> Result<Tenant, ApiError> {
    let tenant = store.repo().update_tenant(name, patch).await?;
    store.invalidate_all();
    Ok(tenant)
}

/// Suspend or resume a tenant.
pub async fn set_status(store: &TenantStore, name: &str, status: TenantStatus) -> Result<Tenant, ApiError> {
    let tenant = store.repo().set_status(name, status).await?;
    store.invalidate_all();
    Ok(tenant)
}

/// What a new key is asked for with; every field is optional.
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
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// Issue a key for `tenant`, valid until the requested expiry (if any), at `now` (Unix milliseconds).
pub async fn issue_key(store: &TenantStore, tenant: &str, spec: KeyRequest, now: i64) -> Result<CreatedKey, ApiError> {
    let expires_at = expiry(&spec, now)?;
    let label = spec.name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    let (key, info) = store.repo().issue_key(tenant, label, expires_at).await?;
    store.invalidate_all();
    Ok(CreatedKey { key: key.key, info })
}

/// Revoke key `id`; revoking twice keeps the first time.
pub async fn revoke_key(store: &TenantStore, id: &str) -> Result<KeyInfo, ApiError> {
    if keys::parse(id).is_some() {
        let message = "Pass the key's id (the 8 characters after `ig_`), not the whole key.";
        return Err(ApiError::invalid(message, Some("id".to_owned())));
    }
    let info = store.repo().revoke_key(id).await?;
    store.invalidate_all();
    Ok(info)
}

/// The key's expiry in Unix milliseconds, from `expires_at` or `expires_in` (not both); it must be in the future.
pub fn expiry(spec: &KeyRequest, now: i64) -> Result<Option<i64>, ApiError> {
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

/// Parse a JSON body with serde (an empty body reads as `{}`), with errors naming the problem the way the
/// admin API words them. The console builds the same JSON from its forms and parses it here.
pub fn parse_json<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
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
