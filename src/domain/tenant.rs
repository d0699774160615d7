//! Who calls: a tenant, its status, and the identity a request carries after authentication.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::limits::Limits;
use super::policy::{CachePolicy, ImagePolicy};

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
    pub cache_policy: Option<CachePolicy>,
    /// Re-hosting overrides (response format default, retention, download fallback).
    #[serde(default)]
    pub image_policy: ImagePolicy,
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
