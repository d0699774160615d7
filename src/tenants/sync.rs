//! Tenants declared in the configuration file are applied to the database at startup, so small deployments
//! stay GitOps-friendly: the file is the truth for the tenants it declares and for the keys it lists.
//!
//! - A declared tenant is created when new and updated when it exists with `source = "config"`. Its
//!   organization, project, upstream, allowed models, limits, prompt logging and policies are re-applied
//!   every time; `metadata` and `status` only when the file sets them.
//! - A declared name that belongs to a tenant created through the admin API or the CLI stops the startup
//!   with a message saying so (docs/decisions/0008): the file never silently takes over an API tenant.
//! - Listed keys are inserted (their expiry kept as declared); configuration keys no longer listed are
//!   revoked, and configuration tenants no longer declared are suspended. Neither is undone by listing them
//!   again: revocation is final, and a suspended tenant is resumed explicitly.
//! - Several replicas may start at once: a tenant or key another replica inserted a moment earlier is taken
//!   as existing, never as an error.

use super::repo::{ConfigKey, NewTenant, RepoError, TenantPatch, TenantRepo};
use crate::config::TenantSettings;
use crate::domain::Tenant;
use crate::domain::TenantStatus;

/// Create or update each configured tenant and its keys, then revoke and suspend what the file dropped.
pub async fn apply(repo: &TenantRepo, tenants: &[TenantSettings]) -> Result<(), RepoError> {
    for t in tenants {
        let tenant = apply_tenant(repo, t).await?;
        for k in &t.keys {
            let expires_at = match k.expires_at.as_deref() {
                Some(text) => Some(crate::time::parse_time(text).ok_or_else(|| RepoError::Invalid {
                    message: format!("key {} expires_at {text:?} is not a time", k.id),
                    param: None,
                })?),
                None => None,
            };
            if repo.ensure_config_key(&tenant, &k.id, &k.sha256, expires_at).await? == ConfigKey::Revoked {
                tracing::warn!(
                    tenant = %t.name,
                    key_id = %k.id,
                    "a key listed in the configuration is revoked and stays revoked: issue a new one with `imagegate keys new`"
                );
            }
        }
    }
    let listed_keys: Vec<&str> = tenants.iter().flat_map(|t| t.keys.iter().map(|k| k.id.as_str())).collect();
    for (id, tenant) in repo.revoke_unlisted_config_keys(&listed_keys).await? {
        tracing::warn!(%tenant, key_id = %id, "revoked a key that is no longer listed in the configuration");
    }
    let listed_tenants: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
    for name in repo.suspend_unlisted_config_tenants(&listed_tenants).await? {
        tracing::warn!(
            tenant = %name,
            "suspended a tenant that is no longer declared in the configuration (its usage is kept; resume it \
             with `imagegate tenants resume`, or declare it again with status = \"active\")"
        );
    }
    Ok(())
}

async fn apply_tenant(repo: &TenantRepo, t: &TenantSettings) -> Result<Tenant, RepoError> {
    let existing = match repo.get_tenant(&t.name).await {
        Ok(existing) => existing,
        Err(RepoError::NotFound(_)) => {
            let spec = NewTenant {
                name: t.name.clone(),
                allowed_models: t.allowed_models.clone(),
                limits: t.limits.clone(),
                organization: t.organization.clone(),
                project: t.project.clone(),
                upstream: t.upstream.clone(),
                log_prompts: t.log_prompts,
                image_policy: t.images.clone(),
                cache_policy: t.cache.clone(),
                metadata: t.metadata.clone(),
            };
            let status = t.status.unwrap_or(TenantStatus::Active);
            match repo.create_with_status(spec, "config", status).await {
                Ok(created) => return Ok(created),
                // Another replica created it a moment ago: update it like any existing one.
                Err(RepoError::Conflict(_)) => repo.get_tenant(&t.name).await?,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    if existing.source != "config" {
        return Err(RepoError::Conflict(format!(
            "tenant '{}' is declared in the configuration, but a tenant of that name was created through the \
             admin API or the CLI; the configuration does not take over such tenants: rename or remove the \
             [[tenants]] entry (docs/decisions/0008)",
            t.name
        )));
    }
    let patch = TenantPatch {
        status: t.status,
        allowed_models: Some(t.allowed_models.clone()),
        limits: Some(t.limits.clone()),
        organization: Some(t.organization.clone()),
        project: Some(t.project.clone()),
        upstream: Some(t.upstream.clone()),
        log_prompts: Some(t.log_prompts),
        image_policy: Some(t.images.clone()),
        cache_policy: Some(t.cache.clone()),
        metadata: t.metadata.clone(),
    };
    let updated = repo.update_tenant(&t.name, patch).await?;
    if updated.status == TenantStatus::Suspended && t.status.is_none() {
        tracing::warn!(
            tenant = %t.name,
            "a tenant declared in the configuration is suspended and stays so: resume it with `imagegate tenants \
             resume`, or set status = \"active\" in the file"
        );
    }
    Ok(updated)
}
