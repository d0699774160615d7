//! Key → tenant lookup behind the [`TenantStore`] trait. The configuration-backed store lives here; the
//! database store (issue: tenants in a real database) implements the same trait.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::keys;
use super::{Tenant, TenantContext};
use crate::config::TenantSettings;

/// Outcome of a key lookup.
#[derive(Debug)]
pub enum Lookup {
    Found(TenantContext),
    /// No active key with that id and hash.
    Unknown,
}

/// Resolves presented keys to tenants.
pub trait TenantStore: Send + Sync + 'static {
    /// Look up a well-formed key.
    fn authenticate<'a>(&'a self, key: keys::PresentedKey<'a>) -> BoxFuture<'a, anyhow::Result<Lookup>>;
    /// Number of tenants known, for the startup log.
    fn tenant_count(&self) -> usize;
}

/// Tenants declared in the configuration file.
#[derive(Debug, Default)]
pub struct ConfigTenantStore {
    by_key_id: HashMap<String, (Arc<Tenant>, String)>,
    tenants: usize,
}

impl ConfigTenantStore {
    pub fn new(settings: &[TenantSettings]) -> Self {
        let mut by_key_id = HashMap::new();
        for t in settings {
            let tenant = Arc::new(Tenant {
                name: t.name.clone(),
                organization: t.organization.clone(),
                project: t.project.clone(),
            });
            for k in &t.keys {
                by_key_id.insert(k.id.clone(), (tenant.clone(), k.sha256.to_ascii_lowercase()));
            }
        }
        Self { by_key_id, tenants: settings.len() }
    }
}

impl TenantStore for ConfigTenantStore {
    fn authenticate<'a>(&'a self, key: keys::PresentedKey<'a>) -> BoxFuture<'a, anyhow::Result<Lookup>> {
        let found = match self.by_key_id.get(key.id) {
            Some((tenant, sha)) if keys::matches(key.full, sha) => {
                Lookup::Found(TenantContext { tenant: tenant.clone(), key_id: key.id.to_owned() })
            }
            _ => Lookup::Unknown,
        };
        Box::pin(async move { Ok(found) })
    }

    fn tenant_count(&self) -> usize {
        self.tenants
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySettings;

    #[tokio::test]
    async fn config_store_finds_the_tenant_by_key_and_refuses_a_wrong_secret() {
        let good = keys::generate();
        let store = ConfigTenantStore::new(&[TenantSettings {
            name: "team-a".into(),
            organization: Some("org-a".into()),
            project: None,
            keys: vec![KeySettings { id: good.id.clone(), sha256: good.sha256.clone() }],
        }]);
        let Lookup::Found(ctx) = store.authenticate(keys::parse(&good.key).unwrap()).await.unwrap() else {
            panic!("key not found")
        };
        assert_eq!(ctx.tenant.name, "team-a");
        assert_eq!(ctx.key_id, good.id);

        // Same id, different secret.
        let forged = format!("{}{}", &good.key[..12], "A".repeat(32));
        let res = store.authenticate(keys::parse(&forged).unwrap()).await.unwrap();
        assert!(matches!(res, Lookup::Unknown));
    }
}
