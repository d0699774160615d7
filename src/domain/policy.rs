//! Per-tenant policies a tenant record and the configuration both carry: how its answers are cached and how
//! its images are re-hosted. Plain data; the cache and the re-hoster apply them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whose answers a cache entry may serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Only the tenant that caused it (the default).
    #[default]
    Tenant,
    /// Every tenant with the shared scope (explicit opt-in: they see each other's images for equal requests).
    Shared,
}

/// Per-tenant overrides of `[cache]`; `None` = the deployment's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachePolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How long an answer is reused, e.g. `"10m"`. Zero turns the tenant's cache off.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
}

/// How images reach the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// A link (imagegate's own, signed, durable).
    Url,
    /// The image inline as base64.
    B64Json,
}

impl ResponseFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "url" => Some(Self::Url),
            "b64_json" => Some(Self::B64Json),
            _ => None,
        }
    }
}

/// What happens when an upstream image cannot be downloaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadFallback {
    /// Answer 502: the caller never gets a link that will break in an hour without knowing it.
    #[default]
    Fail,
    /// Hand on the upstream's own URL (it expires), logged as a warning.
    PassThrough,
}

/// Per-tenant overrides of the `[images]` settings; `None` = the deployment's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagePolicy {
    /// What the tenant's callers get when they do not set `response_format`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// How long the tenant's images are kept, e.g. `"7d"`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub retention: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_download_error: Option<DownloadFallback>,
}
