//! Tenants and the identity a request carries: domain types only, no I/O and no HTTP.
//!
//! `keys` owns the key format and hashing, `policy` the rules every tenant setting must satisfy, `repo` the SQL for tenants and keys, `store` the cached key →
//! tenant lookup used on every request, `sync` applies configuration-declared tenants at startup, and `auth`
//! is the layer that turns a Bearer header into a [`TenantContext`] request extension.

pub mod repo;
pub mod store;
pub mod sync;
