//! imagegate: a self-hosted gateway for the OpenAI Images API.
//!
//! Modules, in the order a request meets them:
//! - `startup`   binds the listener and wires `AppState` from `config::Settings`.
//! - `server`    the global layer stack (panic → 500, request id, trace, error log, timeout) and shutdown.
//! - `routes`    the route table; `routes::images` are the three thin handlers, `routes::health` the probes.
//! - `tenants`   tenants and keys in the database, the cached key lookup, and the auth layer that puts a
//!   `TenantContext` on requests.
//! - `extract`   content-type dispatch, body limits, JSON/multipart parsing into `images::request`.
//! - `images`    the pipeline: validate → cache → limit → upstream → re-host → usage.
//! - `cache`     the response cache: canonical request keys, byte-bounded memory (+ Redis), coalesced misses.
//! - `upstream`  the `Upstream` trait; `openai` forwards over HTTP, `mock` answers offline.
//! - `admin`     the admin HTTP API under `/admin/v1` (tenants, keys, usage), behind `admin.token`.
//! - `limits`    per-tenant rate limits, concurrency and budgets (in-process or Redis).
//! - `rehost`    durable links instead of expiring ones: guarded downloads, signed links, answer rewriting.
//! - `storage`   stored images: bytes in an object store (local or S3) by SHA-256, metadata, the sweeper.
//! - `ledger`    the usage ledger: rows written off the request path; `ledger::report` reads them back.
//! - `db`        the SQLite/PostgreSQL pool and embedded migrations; `pricing` turns usage into USD.
//! - `error`     `ApiError`, the only type that becomes an error response (OpenAI's error shape).
//! - `wire`      header names, paths and event names, spelt once.
//! - `attribution` per-tenant idempotency keys and `user` ids sent upstream (abuse attribution).
//! - `config`, `telemetry`, `cli`: settings, logging, and the command line.

pub mod admin;
pub mod attribution;
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod images;
pub mod ledger;
pub mod limits;
pub mod pricing;
pub mod rehost;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tenants;
pub mod upstream;
pub mod wire;
