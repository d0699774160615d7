//! Key → tenant lookup on the request path: the database behind a short-lived moka cache, so a request costs
//! no query in the common case while a revocation or suspension reaches every replica within
//! `auth.key_cache_ttl`. `last_used_at` is collected in memory and written in batches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::future::Cache;
use tokio::sync::Semaphore;

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

/// A found key and its tenant.
type FoundKey = (Arc<KeyRecord>, Arc<Tenant>);
/// A cached key and its tenant, or `None` for an id that matches no key.
type CachedKey = Option<FoundKey>;

/// How many ids just found unknown are remembered (each for `auth.key_cache_ttl`): a few MiB at most.
pub const NEGATIVE_CACHE_ENTRIES: u64 = 65_536;
/// How many ids ever found are remembered as real (their lookups never wait behind made-up ids).
const KNOWN_IDS: u64 = 100_000;

/// Why a database lookup produced no key (errors are not cached by moka, so neither is this).
#[derive(Debug, Clone)]
enum Miss {
    Unknown,
    Failed(String),
}

/// How many database lookups the key store has made, by result (`imagegate_key_lookups_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookupStats {
    pub found: u64,
    pub unknown: u64,
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    found: AtomicU64,
    unknown: AtomicU64,
    failed: AtomicU64,
}

/// Cached, database-backed key lookups.
///
/// A flood of made-up key ids (each new, so no cache can answer it) must not take the database from real
/// callers. Three things see to that:
/// - found keys are cached apart from ids found unknown, so a flood cannot evict a real key's entry;
/// - an id just found unknown is remembered (at most [`NEGATIVE_CACHE_ENTRIES`], each for the key cache's
///   TTL, forgotten at once on this replica when a key is created), and concurrent lookups of one id are one
///   query;
/// - lookups of ids never seen to exist take one of `auth.max_key_lookups` permits, so at most that many
///   database connections serve them however many arrive. Ids that were found before (a real key whose cache
///   entry expired) do not take a permit and never wait behind the flood; cached keys never touch any of it.
pub struct TenantStore {
    repo: TenantRepo,
    /// Key id → the key and its tenant, for `auth.key_cache_ttl`.
    cache: Cache<String, FoundKey>,
    /// Ids just found to match no key, for `auth.key_cache_ttl`.
    unknown: Cache<String, ()>,
    /// Ids found at least once: their lookups skip `lookups` (a flood of made-up ids cannot delay them).
    known: Cache<String, ()>,
    /// Permits for database lookups of ids not known to exist.
    lookups: Arc<Semaphore>,
    /// Bumped by [`Self::invalidate_all`]: a lookup that started before it does not record its id as unknown.
    generation: AtomicU64,
    counters: Arc<Counters>,
    last_used: Mutex<HashMap<String, i64>>,
}

impl TenantStore {
    /// A store trusting cached keys for `ttl`, with at most `max_lookups` concurrent database lookups of ids
    /// not known to exist.
    pub fn new(repo: TenantRepo, ttl: Duration, max_lookups: usize) -> Self {
        Self {
            repo,
            cache: Cache::builder().max_capacity(100_000).time_to_live(ttl).build(),
            unknown: Cache::builder().max_capacity(NEGATIVE_CACHE_ENTRIES).time_to_live(ttl).build(),
            known: Cache::builder().max_capacity(KNOWN_IDS).time_to_idle(Duration::from_secs(7 * 86_400)).build(),
            lookups: Arc::new(Semaphore::new(max_lookups.max(1))),
            generation: AtomicU64::new(0),
            counters: Arc::default(),
            last_used: Mutex::default(),
        }
    }

    pub fn repo(&self) -> &TenantRepo {
        &self.repo
    }

    /// Database lookups made so far, by result.
    pub fn lookup_stats(&self) -> LookupStats {
        LookupStats {
            found: self.counters.found.load(Ordering::Relaxed),
            unknown: self.counters.unknown.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    /// Check a presented key.
    pub async fn authenticate(&self, key: PresentedKey<'_>) -> Result<Lookup, RepoError> {
        let Some((record, tenant)) = self.cached(key.id).await? else { return Ok(Lookup::Unknown) };
        let now = now_ms();
        let active = record.revoked_at.is_none() && record.expires_at.is_none_or(|at| at > now);
        if !active || !record.secret_sha256.is_some_and(|stored| keys::matches(key.full, &stored)) {
            return Ok(Lookup::Unknown);
        }
        if tenant.status == TenantStatus::Suspended {
            return Ok(Lookup::Suspended(tenant.name.clone()));
        }
        if let Ok(mut used) = self.last_used.lock() {
            // A key already noted since the last flush is updated in place: no new id string per request.
            match used.get_mut(record.id.as_str()) {
                Some(at) => *at = now,
                None => {
                    used.insert(record.id.clone(), now);
                }
            }
        }
        Ok(Lookup::Found(TenantContext { tenant, key_id: record.id.clone() }))
    }

    /// The state of key `id` as the request path sees it (from the same cache, so a revocation or suspension
    /// shows within `auth.key_cache_ttl`), for a console session whose key was checked in full at sign-in.
    pub async fn check_key_id(&self, id: &str) -> Result<Lookup, RepoError> {
        let Some((record, tenant)) = self.cached(id).await? else { return Ok(Lookup::Unknown) };
        let active = record.revoked_at.is_none() && record.expires_at.is_none_or(|at| at > now_ms());
        if !active {
            return Ok(Lookup::Unknown);
        }
        if tenant.status == TenantStatus::Suspended {
            return Ok(Lookup::Suspended(tenant.name.clone()));
        }
        Ok(Lookup::Found(TenantContext { tenant, key_id: record.id.clone() }))
    }

    async fn cached(&self, id: &str) -> Result<CachedKey, RepoError> {
        if let Some(found) = self.cache.get(id).await {
            return Ok(Some(found));
        }
        if self.unknown.contains_key(id) {
            return Ok(None);
        }
        let generation = self.generation.load(Ordering::Acquire);
        // Known ids skip the permits: a real key whose entry expired never waits behind made-up ids.
        let permits = (!self.known.contains_key(id)).then(|| Arc::clone(&self.lookups));
        let (repo, key_id, counters) = (self.repo.clone(), id.to_owned(), Arc::clone(&self.counters));
        let looked_up = self
            .cache
            .try_get_with(id.to_owned(), async move {
                let _permit = match permits {
                    Some(permits) => Some(permits.acquire_owned().await.map_err(|e| Miss::Failed(e.to_string()))?),
                    None => None,
                };
                match repo.key_with_tenant(&key_id).await {
                    Ok(Some((k, t))) => {
                        counters.found.fetch_add(1, Ordering::Relaxed);
                        Ok((Arc::new(k), Arc::new(t)))
                    }
                    Ok(None) => {
                        counters.unknown.fetch_add(1, Ordering::Relaxed);
                        Err(Miss::Unknown)
                    }
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        Err(Miss::Failed(e.to_string()))
                    }
                }
            })
            .await;
        match looked_up {
            Ok(found) => {
                self.known.insert(id.to_owned(), ()).await;
                Ok(Some(found))
            }
            Err(miss) => match &*miss {
                Miss::Unknown => {
                    // A key created on this replica meanwhile bumped the generation: do not remember its id
                    // as unknown.
                    if self.generation.load(Ordering::Acquire) == generation {
                        self.unknown.insert(id.to_owned(), ()).await;
                    }
                    Ok(None)
                }
                Miss::Failed(e) => Err(RepoError::Internal(format!("key lookup failed: {e}"))),
            },
        }
    }

    /// Forget cached keys (and ids found unknown) at once on this replica, after an admin change or a new key;
    /// other replicas follow within the TTL.
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.unknown.invalidate_all();
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
