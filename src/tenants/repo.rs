//! SQL for tenants and keys, shared by the request path (key lookups), the admin API, the CLI and the
//! configuration sync. Portable between SQLite and PostgreSQL (see `db`).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::{Db, new_id};
use crate::domain::CachePolicy;
use crate::domain::ImagePolicy;
use crate::domain::keys::{self, NewKey};
use crate::domain::{Limits, Tenant, TenantStatus, rules as policy};
use crate::error::ApiError;
use crate::time::now_ms;

/// What can go wrong in the repository, classified for callers.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A value the rules of `tenants::policy` refuse; `param` names the field.
    #[error("{message}")]
    Invalid { message: String, param: Option<String> },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Something below the repository failed (a cached lookup, a stored value that no longer parses).
    #[error("{0}")]
    Internal(String),
}

impl RepoError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::Invalid { message: message.into(), param: param.map(str::to_owned) }
    }
}

impl From<policy::Invalid> for RepoError {
    fn from(e: policy::Invalid) -> Self {
        let message = format!("Invalid value: {e}.");
        Self::Invalid { message, param: Some(e.field) }
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound(message) => ApiError::NotFoundResource { message },
            RepoError::Conflict(message) => ApiError::Conflict { message },
            RepoError::Invalid { message, param } => ApiError::invalid(message, param),
            RepoError::Db(e) => ApiError::Internal(e.into()),
            RepoError::Internal(e) => ApiError::Internal(anyhow::anyhow!(e)),
        }
    }
}

/// A tenant to create. Everything but the name has a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub name: String,
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub cache_policy: Option<CachePolicy>,
    #[serde(default)]
    pub image_policy: ImagePolicy,
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub project: Option<String>,
    /// The name of an `[upstreams.<name>]` table; `None` = `[upstream]`.
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub log_prompts: bool,
    /// A JSON object; absent = `{}`. `null` is refused like any other non-object.
    #[serde(default, deserialize_with = "present")]
    pub metadata: Option<serde_json::Value>,
}

/// A partial update: absent fields stay as they are; `null` clears a nullable field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    #[serde(default)]
    pub status: Option<TenantStatus>,
    #[serde(default, deserialize_with = "nullable")]
    pub allowed_models: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default, deserialize_with = "nullable")]
    pub cache_policy: Option<Option<CachePolicy>>,
    /// Replaces the whole re-hosting policy (`{}` = the deployment defaults).
    #[serde(default)]
    pub image_policy: Option<ImagePolicy>,
    #[serde(default, deserialize_with = "nullable")]
    pub organization: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub project: Option<Option<String>>,
    /// `null` sends the tenant's requests to `[upstream]` again.
    #[serde(default, deserialize_with = "nullable")]
    pub upstream: Option<Option<String>>,
    #[serde(default)]
    pub log_prompts: Option<bool>,
    /// Replaces the metadata as a whole; must be an object (`null` is refused: `{}` empties it).
    #[serde(default, deserialize_with = "present")]
    pub metadata: Option<serde_json::Value>,
}

impl TenantPatch {
    /// True when the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.allowed_models.is_none()
            && self.limits.is_none()
            && self.cache_policy.is_none()
            && self.image_policy.is_none()
            && self.organization.is_none()
            && self.project.is_none()
            && self.upstream.is_none()
            && self.log_prompts.is_none()
            && self.metadata.is_none()
    }
}

/// `absent` → `None`, `null` → `Some(None)`, a value → `Some(Some(v))`.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `absent` → `None`, anything present (`null` included) → `Some(value)`, so `null` can be refused by name.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// What became of a key declared in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKey {
    Inserted,
    Unchanged,
    /// Its expiry changed.
    Updated,
    /// It is listed but was revoked (through the admin API, the CLI, or by an earlier removal from the
    /// file); revocation is never undone, so it stays revoked.
    Revoked,
}

/// A key as listed: never the secret, never the hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
    pub name: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

/// What authentication needs about a key.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: String,
    /// The SHA-256 of the whole key, decoded from the stored hex once, when the key is loaded; `None` if the
    /// stored value is not a hash (no key then matches).
    pub secret_sha256: Option<[u8; 32]>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

const TENANT_COLUMNS: &str = "id, name, status, allowed_models, limits, cache_policy, organization, project, \
     log_prompts, metadata, source, created_at, updated_at, image_policy, upstream";

/// A value for a dynamically built statement.
enum Param {
    Text(Option<String>),
    Int(i64),
}

/// Tenants and keys in the database.
#[derive(Debug, Clone)]
pub struct TenantRepo {
    db: Db,
    /// The `[upstreams.<name>]` tables a tenant may name.
    upstreams: Arc<BTreeSet<String>>,
}

impl TenantRepo {
    /// A repository whose tenants may only use `[upstream]`.
    pub fn new(db: Db) -> Self {
        Self::with_upstreams(db, std::iter::empty::<String>())
    }

    /// A repository whose tenants may name any of `upstreams` (the configuration's `[upstreams.<name>]`).
    pub fn with_upstreams(db: Db, upstreams: impl IntoIterator<Item = String>) -> Self {
        Self { db, upstreams: Arc::new(upstreams.into_iter().collect()) }
    }

    fn check(&self, fields: &policy::Fields<'_>) -> Result<(), RepoError> {
        let known = |name: &str| self.upstreams.contains(name);
        match policy::check(fields, &known).into_iter().next() {
            Some(invalid) => Err(invalid.into()),
            None => Ok(()),
        }
    }

    /// Create a tenant; its name must be new.
    pub async fn create_tenant(&self, spec: NewTenant, source: &str) -> Result<Tenant, RepoError> {
        self.create_with_status(spec, source, TenantStatus::Active).await
    }

    /// Create a tenant with a given status (configuration tenants may be declared suspended).
    pub async fn create_with_status(
        &self,
        spec: NewTenant,
        source: &str,
        status: TenantStatus,
    ) -> Result<Tenant, RepoError> {
        check_name(&spec.name)?;
        self.check(&policy::Fields {
            allowed_models: spec.allowed_models.as_deref(),
            limits: Some(&spec.limits),
            cache_policy: spec.cache_policy.as_ref(),
            image_policy: Some(&spec.image_policy),
            organization: spec.organization.as_deref(),
            project: spec.project.as_deref(),
            metadata: spec.metadata.as_ref(),
            upstream: spec.upstream.as_deref(),
            ..policy::Fields::default()
        })?;
        let now = now_ms();
        let tenant = Tenant {
            id: new_id(),
            name: spec.name,
            status,
            allowed_models: spec.allowed_models.map(trimmed_models),
            limits: spec.limits,
            cache_policy: spec.cache_policy,
            image_policy: spec.image_policy,
            organization: spec.organization.map(|o| o.trim().to_owned()),
            project: spec.project.map(|p| p.trim().to_owned()),
            upstream: spec.upstream,
            log_prompts: spec.log_prompts,
            metadata: spec.metadata.unwrap_or_else(|| serde_json::json!({})),
            source: source.to_owned(),
            created_at: now,
            updated_at: now,
        };
        let result = sqlx::query(&format!(
            "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(tenant.id.clone())
        .bind(tenant.name.clone())
        .bind(tenant.status.as_str())
        .bind(to_json_opt(&tenant.allowed_models))
        .bind(to_json(&tenant.limits))
        .bind(to_json_opt(&tenant.cache_policy))
        .bind(tenant.organization.clone())
        .bind(tenant.project.clone())
        .bind(i64::from(tenant.log_prompts))
        .bind(to_json(&tenant.metadata))
        .bind(tenant.source.clone())
        .bind(tenant.created_at)
        .bind(tenant.updated_at)
        .bind(to_json(&tenant.image_policy))
        .bind(tenant.upstream.clone())
        .execute(self.db.pool())
        .await;
        match result {
            Ok(_) => Ok(tenant),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(RepoError::Conflict(format!("a tenant named '{}' already exists", tenant.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_tenant(&self, name: &str) -> Result<Tenant, RepoError> {
        let row = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"))
            .bind(name.to_owned())
            .fetch_optional(self.db.pool())
            .await?;
        row.map(|r| tenant_from_row(&r))
            .transpose()?
            .ok_or_else(|| RepoError::NotFound(format!("no tenant named '{name}'")))
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, RepoError> {
        let rows = sqlx::query(&format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY name"))
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// Apply a partial update and return the tenant as stored. Only the columns the patch sets are written,
    /// in one statement, so concurrent updates of different fields (a suspension and a metadata change, say)
    /// never undo each other.
    pub async fn update_tenant(&self, name: &str, patch: TenantPatch) -> Result<Tenant, RepoError> {
        self.check(&policy::Fields {
            allowed_models: patch.allowed_models.as_ref().and_then(|m| m.as_deref()),
            limits: patch.limits.as_ref(),
            cache_policy: patch.cache_policy.as_ref().and_then(Option::as_ref),
            image_policy: patch.image_policy.as_ref(),
            organization: patch.organization.as_ref().and_then(|o| o.as_deref()),
            project: patch.project.as_ref().and_then(|p| p.as_deref()),
            metadata: patch.metadata.as_ref(),
            upstream: patch.upstream.as_ref().and_then(|u| u.as_deref()),
            ..policy::Fields::default()
        })?;
        let mut sets: Vec<(&'static str, Param)> = Vec::new();
        if let Some(status) = patch.status {
            sets.push(("status", Param::Text(Some(status.as_str().to_owned()))));
        }
        if let Some(v) = patch.allowed_models {
            sets.push(("allowed_models", Param::Text(to_json_opt(&v.map(trimmed_models)))));
        }
        if let Some(v) = patch.limits {
            sets.push(("limits", Param::Text(Some(to_json(&v)))));
        }
        if let Some(v) = patch.cache_policy {
            sets.push(("cache_policy", Param::Text(to_json_opt(&v))));
        }
        if let Some(v) = patch.image_policy {
            sets.push(("image_policy", Param::Text(Some(to_json(&v)))));
        }
        if let Some(v) = patch.organization {
            sets.push(("organization", Param::Text(v.map(|o| o.trim().to_owned()))));
        }
        if let Some(v) = patch.project {
            sets.push(("project", Param::Text(v.map(|p| p.trim().to_owned()))));
        }
        if let Some(v) = patch.upstream {
            sets.push(("upstream", Param::Text(v)));
        }
        if let Some(v) = patch.log_prompts {
            sets.push(("log_prompts", Param::Int(i64::from(v))));
        }
        if let Some(v) = patch.metadata {
            sets.push(("metadata", Param::Text(Some(to_json(&v)))));
        }
        if sets.is_empty() {
            return self.get_tenant(name).await;
        }
        sets.push(("updated_at", Param::Int(now_ms())));
        let assignments: Vec<String> =
            sets.iter().enumerate().map(|(i, (column, _))| format!("{column} = ${}", i + 1)).collect();
        let sql = format!("UPDATE tenants SET {} WHERE name = ${}", assignments.join(", "), sets.len() + 1);
        let mut query = sqlx::query(&sql);
        for (_, value) in sets {
            query = match value {
                Param::Text(text) => query.bind(text),
                Param::Int(n) => query.bind(n),
            };
        }
        let done = query.bind(name.to_owned()).execute(self.db.pool()).await?;
        if done.rows_affected() == 0 {
            return Err(RepoError::NotFound(format!("no tenant named '{name}'")));
        }
        self.get_tenant(name).await
    }

    /// Suspend or resume a tenant: one statement touching only `status`.
    pub async fn set_status(&self, name: &str, status: TenantStatus) -> Result<Tenant, RepoError> {
        self.update_tenant(name, TenantPatch { status: Some(status), ..TenantPatch::default() }).await
    }

    /// Generate a key for `tenant`; the returned [`NewKey`] is the only time the secret exists.
    pub async fn issue_key(
        &self,
        tenant: &str,
        name: Option<String>,
        expires_at: Option<i64>,
    ) -> Result<(NewKey, KeyInfo), RepoError> {
        let t = self.get_tenant(tenant).await?;
        let key = keys::generate();
        let info = self.insert_key(&t, &key.id, &key.sha256, name, expires_at, "api").await?;
        Ok((key, info))
    }

    /// Store a key declared in the configuration, known only by its id and hash, and keep its expiry as
    /// declared. Idempotent, and safe when several replicas start at once (a concurrent insert of the same
    /// key is taken as done).
    pub async fn ensure_config_key(
        &self,
        tenant: &Tenant,
        id: &str,
        sha256: &str,
        expires_at: Option<i64>,
    ) -> Result<ConfigKey, RepoError> {
        for _ in 0..2 {
            let existing = sqlx::query(
                "SELECT tenant_id, secret_sha256, source, expires_at, revoked_at FROM api_keys WHERE id = $1",
            )
            .bind(id.to_owned())
            .fetch_optional(self.db.pool())
            .await?;
            let Some(row) = existing else {
                match self.insert_key(tenant, id, sha256, Some("config".to_owned()), expires_at, "config").await {
                    Ok(_) => return Ok(ConfigKey::Inserted),
                    Err(RepoError::Db(sqlx::Error::Database(e))) if e.is_unique_violation() => continue,
                    Err(e) => return Err(e),
                }
            };
            let (owner, hash, source): (String, String, String) =
                (row.try_get("tenant_id")?, row.try_get("secret_sha256")?, row.try_get("source")?);
            if owner != tenant.id || !hash.eq_ignore_ascii_case(sha256) {
                return Err(RepoError::Conflict(format!("key id {id} already belongs to another key")));
            }
            if source != "config" {
                return Err(RepoError::Conflict(format!(
                    "key {id} was issued through the admin API or the CLI; it cannot also be declared in the \
                     configuration"
                )));
            }
            let revoked_at: Option<i64> = row.try_get("revoked_at")?;
            if revoked_at.is_some() {
                return Ok(ConfigKey::Revoked);
            }
            let stored: Option<i64> = row.try_get("expires_at")?;
            if stored == expires_at {
                return Ok(ConfigKey::Unchanged);
            }
            sqlx::query("UPDATE api_keys SET expires_at = $1 WHERE id = $2")
                .bind(expires_at)
                .bind(id.to_owned())
                .execute(self.db.pool())
                .await?;
            return Ok(ConfigKey::Updated);
        }
        Err(RepoError::Conflict(format!("key {id} is being changed concurrently; start again")))
    }

    /// Revoke every configuration key that is not in `listed` (removed from the file); returns the revoked
    /// keys as (id, tenant name).
    pub async fn revoke_unlisted_config_keys(&self, listed: &[&str]) -> Result<Vec<(String, String)>, RepoError> {
        let rows = sqlx::query(
            "SELECT k.id AS id, t.name AS tenant FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.source = 'config' AND k.revoked_at IS NULL ORDER BY k.id",
        )
        .fetch_all(self.db.pool())
        .await?;
        let mut revoked = Vec::new();
        for row in rows {
            let (id, tenant): (String, String) = (row.try_get("id")?, row.try_get("tenant")?);
            if listed.contains(&id.as_str()) {
                continue;
            }
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id.clone())
                .execute(self.db.pool())
                .await?;
            revoked.push((id, tenant));
        }
        Ok(revoked)
    }

    /// Suspend every active configuration tenant not in `listed` (removed from the file); returns their names.
    pub async fn suspend_unlisted_config_tenants(&self, listed: &[&str]) -> Result<Vec<String>, RepoError> {
        let rows = sqlx::query("SELECT name FROM tenants WHERE source = 'config' AND status = 'active' ORDER BY name")
            .fetch_all(self.db.pool())
            .await?;
        let mut suspended = Vec::new();
        for row in rows {
            let name: String = row.try_get("name")?;
            if !listed.contains(&name.as_str()) {
                self.set_status(&name, TenantStatus::Suspended).await?;
                suspended.push(name);
            }
        }
        Ok(suspended)
    }

    async fn insert_key(
        &self,
        tenant: &Tenant,
        id: &str,
        sha256: &str,
        name: Option<String>,
        expires_at: Option<i64>,
        source: &str,
    ) -> Result<KeyInfo, RepoError> {
        let created_at = now_ms();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, secret_sha256, created_at, expires_at, source) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.to_owned())
        .bind(tenant.id.clone())
        .bind(name.clone())
        .bind(sha256.to_ascii_lowercase())
        .bind(created_at)
        .bind(expires_at)
        .bind(source.to_owned())
        .execute(self.db.pool())
        .await?;
        Ok(KeyInfo {
            id: id.to_owned(),
            tenant: tenant.name.clone(),
            name,
            created_at,
            expires_at,
            revoked_at: None,
            last_used_at: None,
        })
    }

    /// Keys of one tenant, newest first.
    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, RepoError> {
        let t = self.get_tenant(tenant).await?;
        let rows = sqlx::query(
            "SELECT id, name, created_at, expires_at, revoked_at, last_used_at FROM api_keys \
             WHERE tenant_id = $1 ORDER BY created_at DESC, id",
        )
        .bind(t.id.clone())
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(|r| key_info_from_row(r, &t.name)).collect()
    }

    /// Revoke a key; revoking twice keeps the first time.
    pub async fn revoke_key(&self, id: &str) -> Result<KeyInfo, RepoError> {
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id.to_owned())
            .execute(self.db.pool())
            .await?;
        let row = sqlx::query(
            "SELECT k.id, k.name, k.created_at, k.expires_at, k.revoked_at, k.last_used_at, t.name AS tenant \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1",
        )
        .bind(id.to_owned())
        .fetch_optional(self.db.pool())
        .await?
        .ok_or_else(|| RepoError::NotFound(format!("no key with id '{id}'")))?;
        let tenant: String = row.try_get("tenant")?;
        key_info_from_row(&row, &tenant)
    }

    /// The key with this public id and its tenant, whatever their state.
    pub async fn key_with_tenant(&self, id: &str) -> Result<Option<(KeyRecord, Tenant)>, RepoError> {
        let row = sqlx::query(&format!(
            "SELECT k.secret_sha256, k.expires_at, k.revoked_at, {} FROM api_keys k JOIN tenants t \
             ON t.id = k.tenant_id WHERE k.id = $1",
            TENANT_COLUMNS.split(", ").map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .bind(id.to_owned())
        .fetch_optional(self.db.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let key = KeyRecord {
            id: id.to_owned(),
            secret_sha256: keys::stored_hash(&row.try_get::<String, _>("secret_sha256")?),
            expires_at: row.try_get("expires_at")?,
            revoked_at: row.try_get("revoked_at")?,
        };
        Ok(Some((key, tenant_from_row(&row)?)))
    }

    /// Record when keys were last used (batched by the store; never one write per request).
    pub async fn touch_keys(&self, used: &[(String, i64)]) -> Result<(), RepoError> {
        let mut tx = self.db.pool().begin().await?;
        for (id, at) in used {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(*at)
            .bind(id.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), RepoError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(RepoError::invalid(
            format!("invalid tenant name '{name}': use 1-64 letters, digits, '-', '_' or '.'"),
            Some("name"),
        ))
    }
}

/// Model names as stored: trimmed, each once, in the order given.
pub(crate) fn trimmed_models(list: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for model in list {
        let model = model.trim().to_owned();
        if !out.contains(&model) {
            out.push(model);
        }
    }
    out
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn to_json_opt<T: Serialize>(value: &Option<T>) -> Option<String> {
    value.as_ref().map(to_json)
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, column: &str) -> Result<T, RepoError> {
    serde_json::from_str(text).map_err(|e| RepoError::Internal(format!("stored {column} is not valid: {e}")))
}

fn tenant_from_row(row: &AnyRow) -> Result<Tenant, RepoError> {
    let status: String = row.try_get("status")?;
    let allowed: Option<String> = row.try_get("allowed_models")?;
    let limits: String = row.try_get("limits")?;
    let cache: Option<String> = row.try_get("cache_policy")?;
    let image_policy: String = row.try_get("image_policy")?;
    let metadata: String = row.try_get("metadata")?;
    let log_prompts: i64 = row.try_get("log_prompts")?;
    Ok(Tenant {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        status: TenantStatus::parse(&status)
            .ok_or_else(|| RepoError::Internal(format!("stored status '{status}' is unknown")))?,
        allowed_models: allowed.map(|a| from_json(&a, "allowed_models")).transpose()?,
        limits: from_json(&limits, "limits")?,
        cache_policy: cache.map(|c| from_json(&c, "cache_policy")).transpose()?,
        image_policy: from_json(&image_policy, "image_policy")?,
        organization: row.try_get("organization")?,
        project: row.try_get("project")?,
        upstream: row.try_get("upstream")?,
        log_prompts: log_prompts != 0,
        metadata: from_json(&metadata, "metadata")?,
        source: row.try_get("source")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn key_info_from_row(row: &AnyRow, tenant: &str) -> Result<KeyInfo, RepoError> {
    Ok(KeyInfo {
        id: row.try_get("id")?,
        tenant: tenant.to_owned(),
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}
