//! Tenants declared in the configuration file are applied to the database at startup: created when new,
//! updated when changed, and their key hashes inserted. Small deployments stay GitOps-friendly; tenants
//! created through the admin API are left alone.

use super::repo::{NewTenant, RepoError, TenantPatch, TenantRepo};
use crate::config::TenantSettings;

/// Create or update each configured tenant and its keys.
pub async fn apply(repo: &TenantRepo, tenants: &[TenantSettings]) -> Result<(), RepoError> {
    for t in tenants {
        let tenant = match repo.get_tenant(&t.name).await {
            Ok(_) => {
                let patch = TenantPatch {
                    allowed_models: Some(t.allowed_models.clone()),
                    limits: Some(t.limits.clone()),
                    organization: Some(t.organization.clone()),
                    project: Some(t.project.clone()),
                    log_prompts: Some(t.log_prompts),
                    image_policy: Some(t.images.clone()),
                    cache_policy: Some(t.cache.clone()),
                    ..TenantPatch::default()
                };
                repo.update_tenant(&t.name, patch).await?
            }
            Err(RepoError::NotFound(_)) => {
                let spec = NewTenant {
                    name: t.name.clone(),
                    allowed_models: t.allowed_models.clone(),
                    limits: t.limits.clone(),
                    organization: t.organization.clone(),
                    project: t.project.clone(),
                    log_prompts: t.log_prompts,
                    image_policy: t.images.clone(),
                    cache_policy: t.cache.clone(),
                    ..NewTenant::default()
                };
                repo.create_tenant(spec, "config").await?
            }
            Err(e) => return Err(e),
        };
        for k in &t.keys {
            repo.ensure_key_hash(&tenant, &k.id, &k.sha256).await?;
        }
    }
    Ok(())
}
