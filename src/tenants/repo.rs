//! SQL for tenants and keys, shared by the request path (key lookups), the admin API, the CLI and the
//! configuration sync. Portable between SQLite and PostgreSQL (see `db`).

use serde::{Deserialize, Deserializer, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::keys::{self, NewKey};
use super::{Limits, Tenant, TenantStatus};
use crate::cache::CachePolicy;
use crate::db::{Db, new_id, now_ms};
use crate::error::ApiError;
use crate::rehost::ImagePolicy;

/// What can go wrong in the repository, classified for callers.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound(message) => ApiError::NotFoundResource { message },
            RepoError::Conflict(message) => ApiError::Conflict { message },
            RepoError::Invalid(message) => ApiError::invalid(message, None),
            RepoError::Db(e) => ApiError::Internal(e.into()),
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
    #[serde(default)]
    pub log_prompts: bool,
    #[serde(default)]
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
    #[serde(default)]
    pub log_prompts: Option<bool>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// `absent` → `None`, `null` → `Some(None)`, a value → `Some(Some(v))`.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
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
    pub secret_sha256: String,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

const TENANT_COLUMNS: &str = "id, name, status, allowed_models, limits, cache_policy, organization, project, \
     log_prompts, metadata, source, created_at, updated_at, image_policy";

/// Tenants and keys in the database.
#[derive(Debug, Clone)]
pub struct TenantRepo {
    db: Db,
}

impl TenantRepo {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Create a tenant; its name must be new.
    pub async fn create_tenant(&self, spec: NewTenant, source: &str) -> Result<Tenant, RepoError> {
        check_name(&spec.name)?;
        let now = now_ms();
        let tenant = Tenant {
            id: new_id(),
            name: spec.name,
            status: TenantStatus::Active,
            allowed_models: spec.allowed_models,
            limits: spec.limits,
            cache_policy: spec.cache_policy,
            image_policy: spec.image_policy,
            organization: spec.organization,
            project: spec.project,
            log_prompts: spec.log_prompts,
            metadata: spec.metadata.unwrap_or_else(|| serde_json::json!({})),
            source: source.to_owned(),
            created_at: now,
            updated_at: now,
        };
        let result = sqlx::query(&format!(
            "INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
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

    /// Apply a partial update and return the tenant as stored.
    pub async fn update_tenant(&self, name: &str, patch: TenantPatch) -> Result<Tenant, RepoError> {
        let mut t = self.get_tenant(name).await?;
        if let Some(status) = patch.status {
            t.status = status;
        }
        if let Some(v) = patch.allowed_models {
            t.allowed_models = v;
        }
        if let Some(v) = patch.limits {
            t.limits = v;
        }
        if let Some(v) = patch.cache_policy {
            t.cache_policy = v;
        }
        if let Some(v) = patch.image_policy {
            t.image_policy = v;
        }
        if let Some(v) = patch.organization {
            t.organization = v;
        }
        if let Some(v) = patch.project {
            t.project = v;
        }
        if let Some(v) = patch.log_prompts {
            t.log_prompts = v;
        }
        if let Some(v) = patch.metadata {
            t.metadata = v;
        }
        t.updated_at = now_ms();
        sqlx::query(
            "UPDATE tenants SET status = $1, allowed_models = $2, limits = $3, cache_policy = $4, organization = $5, \
             project = $6, log_prompts = $7, metadata = $8, updated_at = $9, image_policy = $10 WHERE id = $11",
        )
        .bind(t.status.as_str())
        .bind(to_json_opt(&t.allowed_models))
        .bind(to_json(&t.limits))
        .bind(to_json_opt(&t.cache_policy))
        .bind(t.organization.clone())
        .bind(t.project.clone())
        .bind(i64::from(t.log_prompts))
        .bind(to_json(&t.metadata))
        .bind(t.updated_at)
        .bind(to_json(&t.image_policy))
        .bind(t.id.clone())
        .execute(self.db.pool())
        .await?;
        Ok(t)
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
        let info = self.insert_key(&t, &key.id, &key.sha256, name, expires_at).await?;
        Ok((key, info))
    }

    /// Store a key known only by its id and hash (configuration-declared keys). Idempotent.
    pub async fn ensure_key_hash(&self, tenant: &Tenant, id: &str, sha256: &str) -> Result<(), RepoError> {
        let existing = sqlx::query("SELECT tenant_id, secret_sha256 FROM api_keys WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(self.db.pool())
            .await?;
        match existing {
            None => self.insert_key(tenant, id, sha256, Some("config".to_owned()), None).await.map(|_| ()),
            Some(row) => {
                let (owner, hash): (String, String) = (row.try_get("tenant_id")?, row.try_get("secret_sha256")?);
                if owner != tenant.id || !hash.eq_ignore_ascii_case(sha256) {
                    return Err(RepoError::Conflict(format!("key id {id} already belongs to another key")));
                }
                Ok(())
            }
        }
    }

    async fn insert_key(
        &self,
        tenant: &Tenant,
        id: &str,
        sha256: &str,
        name: Option<String>,
        expires_at: Option<i64>,
    ) -> Result<KeyInfo, RepoError> {
        let created_at = now_ms();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, secret_sha256, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.to_owned())
        .bind(tenant.id.clone())
        .bind(name.clone())
        .bind(sha256.to_ascii_lowercase())
        .bind(created_at)
        .bind(expires_at)
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
            secret_sha256: row.try_get("secret_sha256")?,
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
        Err(RepoError::Invalid(format!("invalid tenant name '{name}': use 1-64 letters, digits, '-', '_' or '.'")))
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn to_json_opt<T: Serialize>(value: &Option<T>) -> Option<String> {
    value.as_ref().map(to_json)
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, column: &str) -> Result<T, RepoError> {
    serde_json::from_str(text).map_err(|e| RepoError::Invalid(format!("stored {column} is not valid: {e}")))
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
            .ok_or_else(|| RepoError::Invalid(format!("stored status '{status}' is unknown")))?,
        allowed_models: allowed.map(|a| from_json(&a, "allowed_models")).transpose()?,
        limits: from_json(&limits, "limits")?,
        cache_policy: cache.map(|c| from_json(&c, "cache_policy")).transpose()?,
        image_policy: from_json(&image_policy, "image_policy")?,
        organization: row.try_get("organization")?,
        project: row.try_get("project")?,
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
