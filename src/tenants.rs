//! Tenants and the identity a request carries: domain types only, no I/O and no HTTP.
//!
//! `keys` owns the key format and hashing, `policy` the rules every tenant setting must satisfy, `repo` the SQL for tenants and keys, `store` the cached key →
//! tenant lookup used on every request, `sync` applies configuration-declared tenants at startup, and `auth`
//! is the layer that turns a Bearer header into a [`TenantContext`] request extension.

pub mod admin_ops;
pub mod auth;
pub mod keys;
pub mod policy;
pub mod repo;
pub mod store;
pub mod sync;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Who is calling, as every later stage (limits, cache, usage, logs) reads it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TenantContext {
    pub tenant: Arc<Tenant>,
    /// The public id of the key used (never the secret).
    pub key_id: String,
}

/// A tenant: a team with its own keys, limits, models and upstream attribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub status: TenantStatus,
    /// Models the tenant may use; `None` = all.
    pub allowed_models: Option<Vec<String>>,
    pub limits: Limits,
    /// Response-cache overrides; `None` = the deployment default.
    pub cache_policy: Option<crate::cache::CachePolicy>,
    /// Re-hosting overrides (response format default, retention, download fallback).
    #[serde(default)]
    pub image_policy: crate::rehost::ImagePolicy,
    /// `OpenAI-Organization` for this tenant's upstream calls.
    pub organization: Option<String>,
    /// `OpenAI-Project` for this tenant's upstream calls.
    pub project: Option<String>,
    /// Which `[upstreams.<name>]` answers this tenant; `None` = `[upstream]`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Store prompt text in usage rows (explicit opt-in; off by default).
    pub log_prompts: bool,
    /// Free-form JSON object for the platform team.
    pub metadata: serde_json::Value,
    /// `config` (declared in the configuration file) or `api` (created through the admin API or CLI).
    pub source: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Tenant {
    /// Whether the tenant may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.as_ref().is_none_or(|list| list.iter().any(|m| m == model))
    }
}

/// Whether a tenant may make requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    Active,
    /// Requests are refused with 403; keys stay valid for when the tenant is resumed.
    Suspended,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            _ => None,
        }
    }
}

/// Per-tenant limits; `None` means unlimited. Enforced by the rate-limit stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    /// Weighted by `n`: an `n=4` request spends 4.
    pub images_per_minute: Option<u32>,
    /// Requests a quiet tenant may send at once (default: `requests_per_minute`).
    pub requests_burst: Option<u32>,
    /// Images a quiet tenant may ask for at once (default: `images_per_minute`).
    pub images_burst: Option<u32>,
    pub concurrent_requests: Option<u32>,
    pub images_per_day: Option<u64>,
    pub images_per_month: Option<u64>,
    pub usd_per_day: Option<f64>,
    pub usd_per_month: Option<f64>,
}
