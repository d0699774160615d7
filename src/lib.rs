//! imagegate: a self-hosted gateway for the OpenAI Images API.
//!
//! # Layers
//! Each top-level module imports only modules of its own layer or of the layers below it, and no two modules
//! import each other (`tests/layers.rs` reads this list and checks the first; `.ci/run` runs
//! `../shared/tools/module-cycles` for the second). Lowest first:
//!
//! 0. `wire`, `time`, `signing`, `catalog`, `pricing`: leaves: names on the wire, clocks and calendars, the link
//!    HMAC, the model catalog as data (`config/models.toml` + `[models]`: rules, prices, lifecycle, aliases),
//!    prices and cost estimates.
//! 1. `domain`: tenants, the identity a request carries, limits and policies as data, the key format, the rules
//!    every tenant setting satisfies. No I/O, no HTTP.
//! 2. `error`: `ApiError`, the only type that becomes an error response (OpenAI's error shape and headers).
//! 3. `config`: the settings tree, its loading (files + `IMAGEGATE__` environment) and validation.
//! 4. `images`: the request model: parsed requests, multipart forms, models and their rules, image sniffing.
//! 5. `db`, `upstream`: the SQLite/PostgreSQL pool and migrations; the `Upstream` trait (`openai` over HTTP,
//!    `mock` offline).
//! 6. `cache`, `ledger`, `storage`, `tenants`: the response cache; the usage ledger (records, writer,
//!    reports); stored images (object store + metadata); tenants and keys in the database and their cached
//!    lookup.
//! 7. `limits`, `rehost`: per-tenant rate limits, concurrency and budgets (in-process or Redis); durable links
//!    instead of expiring ones (guarded downloads, signed links, answer rewriting).
//! 8. `pipeline`: one request as a `Call`: validate → authorise → cache → limit → upstream → re-host → usage.
//! 9. `state`: `AppState`, what every handler and layer shares.
//! 10. `extract`, `server`, `routes`, `admin`: HTTP: body extraction, the layer stack and tenant auth layer,
//!     the route table and handlers, the admin API.
//! 11. `startup`, `cli`, `telemetry`: wiring `AppState` from `config::Settings` and binding the listener; the
//!     command line; logging.

pub(crate) mod admin;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub(crate) mod extract;
pub mod images;
pub mod ledger;
pub mod limits;
pub(crate) mod pipeline;
pub mod pricing;
pub mod rehost;
pub(crate) mod routes;
pub mod server;
pub(crate) mod signing;
pub mod startup;
pub(crate) mod state;
pub mod storage;
pub mod telemetry;
pub mod tenants;
pub mod time;
pub(crate) mod upstream;
pub mod wire;
