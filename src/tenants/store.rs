//! Key → tenant lookup on the request path: the database behind a short-lived moka cache, so a request costs
//! no query in the common case while a revocation or suspension reaches every replica within
//! `auth.key_cache_ttl`. `last_used_at` is collected in memory and written in batches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::future::Cache;

use super::repo::{KeyRecord, RepoError, TenantRepo};
use crate::domain::keys::{self, PresentedKey};
use crate::domain::{Tenant, TenantContext, TenantStatus};
use crate::time::now_ms;

/// Outcome of a key lookup.
#[derive(Debug)]
pub enum Lookup {
    Found(TenantContext),
    /// The key is valid but its tenant is suspended (403).
    Suspended(String),
    /// No active key with that id and hash: unknown, wrong secret, revoked or expired (401).
    Unknown,
}

/// A cached key and its tenant, or `None` for an id that matches no key.
type CachedKey = Option<(Arc<KeyRecord>, Arc<Tenant>)>;

/// Cached, database-backed key lookups.
pub struct TenantStore {
    repo: TenantRepo,
    /// Key id → the key and its tenant (or `None`: no such key), for `auth.key_cache_ttl`.
    cache: Cache<String, CachedKey>,
    last_used: Mutex<HashMap<String, i64>>,
}

impl TenantStore {
    pub fn new(repo: TenantRepo, ttl: Duration) -> Self {
        Self {
            repo,
            cache: Cache::builder().max_capacity(100_000).time_to_live(ttl).build(),
            last_used: Mutex::default(),
        }
    }

    pub fn repo(&self) -> &TenantRepo {
        &self.repo
    }

    /// Check a presented key.
    pub async fn authenticate(&self, key: PresentedKey<'_>) -> Result<Lookup, RepoError> {
        let id = key.id.to_owned();
        let repo = self.repo.clone();
        let entry = self
            .cache
            .try_get_with(id.clone(), async move {
                repo.key_with_tenant(&id).await.map(|found| found.map(|(k, t)| (Arc::new(k), Arc::new(t))))
            })
            .await
            .map_err(|e| RepoError::Internal(format!("key lookup failed: {e}")))?;
        let Some((record, tenant)) = entry else { return Ok(Lookup::Unknown) };
        let now = now_ms();
        let active = record.revoked_at.is_none() && record.expires_at.is_none_or(|at| at > now);
        if !active || !keys::matches(key.full, &record.secret_sha256) {
            return Ok(Lookup::Unknown);
        }
        if tenant.status == TenantStatus::Suspended {
            return Ok(Lookup::Suspended(tenant.name.clone()));
        }
        if let Ok(mut used) = self.last_used.lock() {
            used.insert(record.id.clone(), now);
        }
        Ok(Lookup::Found(TenantContext { tenant, key_id: record.id.clone() }))
    }

    /// Forget cached keys at once on this replica (after an admin change); other replicas follow within the TTL.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    /// Write the collected `last_used_at` times.
    pub async fn flush_last_used(&self) -> Result<(), RepoError> {
        let batch: Vec<(String, i64)> = match self.last_used.lock() {
            Ok(mut used) => used.drain().collect(),
            Err(_) => return Ok(()),
        };
        if batch.is_empty() {
            return Ok(());
        }
        self.repo.touch_keys(&batch).await
    }
}
