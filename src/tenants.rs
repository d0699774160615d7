//! Tenants and the identity a request carries: domain types only, no I/O and no HTTP.
//!
//! `keys` owns the key format and hashing, `store` looks keys up, `auth` is the layer that turns a Bearer
//! header into a [`TenantContext`] request extension.

pub mod auth;
pub mod keys;
pub mod store;

use std::sync::Arc;

/// Who is calling, as every later stage (limits, cache, usage, logs) reads it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TenantContext {
    pub tenant: Arc<Tenant>,
    /// The public id of the key used (never the secret).
    pub key_id: String,
}

/// A tenant and what it carries upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// `OpenAI-Organization` for this tenant's upstream calls.
    pub organization: Option<String>,
    /// `OpenAI-Project` for this tenant's upstream calls.
    pub project: Option<String>,
}
