//! Typed settings: loaded from TOML files plus `IMAGEGATE__SECTION__KEY` environment overrides, validated once
//! at startup with every fault reported together. Secrets are [`Secret`] and never print.
//!
//! Sources, later wins: built-in defaults (the `Default` impls below, mirrored in `config/default.toml`) →
//! either `--config FILE` or `config/default.toml` + `config/$IMAGEGATE_ENV.toml` → `IMAGEGATE__…` variables.
//! `OPENAI_API_KEY` is a fallback for `upstream.api_key` only, used when no source set one and the upstream is
//! OpenAI's own API. Every key is documented in `docs/configuration.md`.

mod load;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use figment::Figment;
use figment::Provider as _;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use serde::{Deserialize, Serialize};
use url::Url;

/// Environment prefix for overrides: `IMAGEGATE__UPSTREAM__BASE_URL=…`.
pub const ENV_PREFIX: &str = "IMAGEGATE__";
/// Chooses the `config/<name>.toml` overlay when no `--config` is given.
pub const ENV_PROFILE: &str = "IMAGEGATE_ENV";
/// OpenAI's usual variable, accepted for `upstream.api_key`.
pub const ENV_OPENAI_API_KEY: &str = "OPENAI_API_KEY";

/// The pool that, when configured, serves tenants that name no upstream (instead of `[upstream]`).
pub const DEFAULT_POOL: &str = "default";

/// The whole configuration tree.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub upstream: UpstreamSettings,
    /// Further upstreams, by name (`[upstreams.<name>]`, the same keys as `[upstream]`), for tenants whose
    /// `upstream` names one; `[upstream]` serves every other tenant.
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    /// Pools of deployments, by name (`[pools.<name>]`): ordered lists of `[upstreams.<name>]` tables used as
    /// one. Tenants name a pool as they name an upstream; `[pools.default]` serves tenants that name none.
    pub pools: BTreeMap<String, PoolSettings>,
    pub validation: ValidationSettings,
    pub database: DatabaseSettings,
    pub storage: StorageSettings,
    pub images: ImagesSettings,
    pub cache: CacheSettings,
    pub auth: AuthSettings,
    pub admin: AdminSettings,
    /// The web console (`console`).
    pub console: ConsoleSettings,
    pub usage: UsageSettings,
    /// The replay window: identical retries attach to an earlier call instead of paying again (docs/pools.md).
    pub replay: ReplaySettings,
    pub limits: LimitsSettings,
    /// Prometheus metrics at `/metrics`.
    pub metrics: MetricsSettings,
    /// OpenTelemetry traces over OTLP (off unless an endpoint is set).
    pub tracing: TracingSettings,
    /// Prices used for the usage ledger's cost estimates (defaults: the catalog's, OpenAI's published prices).
    pub pricing: crate::pricing::Prices,
    /// Models added to or changed in the built-in catalog (`[models."name"]`) and `[models.aliases]`.
    pub models: crate::catalog::ModelsSettings,
    /// Tenants declared in configuration, with the hashes of their keys.
    pub tenants: Vec<TenantSettings>,
    /// What the upstream learns about who asks (`user` for abuse monitoring); see `docs/security.md`.
    pub attribution: AttributionSettings,
}

/// Abuse attribution on the shared upstream account.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionSettings {
    /// `derived` (default): OpenAI's `user` is sent as an opaque id derived from the tenant and the caller's
    /// own `user`; `pass_through`: the caller's `user` as sent. Tenants may override it (`images.end_user`).
    pub end_user: crate::attribution::EndUser,
}

/// Admin tokens printed in imagegate's own documentation and templates: anyone can read them, so none of them
/// is accepted.
pub const DOCUMENTED_EXAMPLE_TOKENS: &[&str] = &["at-least-16-characters"];

/// The listening socket, public address, deadlines and body limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to bind; port 0 picks a free port (the chosen one is logged and printed).
    pub listen: SocketAddr,
    /// Base URL callers use to reach this gateway (used for links imagegate hands out). Defaults to
    /// `http://<bound address>`.
    pub public_url: Option<Url>,
    /// Whole-request deadline up to the response headers; must exceed `upstream.timeout` unless the replay
    /// window is on (then the upstream call outlives a caller the deadline sends away, and a retry collects it).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long SIGTERM/SIGINT waits, from the signal, for in-flight requests before exiting.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// After SIGTERM/SIGINT, how long the listener keeps accepting (and serving) while `/readyz` answers 503,
    /// so load balancers take the replica out before connections are refused. Part of `shutdown_timeout`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Largest JSON body (`/images/generations`, JSON `/images/edits`).
    #[serde(serialize_with = "exact_bytes")]
    pub max_json_body: ByteSize,
    /// Largest multipart body (`/images/edits`, `/images/variations`).
    #[serde(serialize_with = "exact_bytes")]
    pub max_multipart_body: ByteSize,
    /// Largest JSON `/images/edits` body (images inline as data URLs); parsed within a value budget
    /// proportional to it.
    #[serde(serialize_with = "exact_bytes")]
    pub max_json_edit_body: ByteSize,
    /// A request head must arrive whole within this time of the connection opening or of the previous answer
    /// ending; otherwise the connection is closed (slow-loris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1.1: at most
    /// `header_read_timeout`, which also times the wait for the next head).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections at most; a connection accepted beyond it is closed at once.
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            request_timeout: Duration::from_secs(660),
            shutdown_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_json_body: ByteSize::mib(1),
            max_multipart_body: ByteSize::mib(100),
            max_json_edit_body: ByteSize::mib(100),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Log format and filter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `imagegate=debug,hyper=info`. `RUST_LOG` wins.
    pub level: String,
    /// One access-log line per request (target `imagegate::access`).
    pub access: bool,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Human, level: "info".to_owned(), access: true }
    }
}

/// Prometheus metrics (`docs/observability.md`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Serve `/metrics`; when off, nothing answers there.
    pub enabled: bool,
    /// Serve `/metrics` on this address only, instead of on `server.listen` (e.g. a port reachable by
    /// Prometheus alone).
    pub listen: Option<SocketAddr>,
    /// When set, `/metrics` wants `Authorization: Bearer <token>`. Use IMAGEGATE__METRICS__TOKEN.
    pub token: Option<Secret>,
}

/// OpenTelemetry traces (`docs/observability.md#traces`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// The OTLP/HTTP (protobuf) URL spans are sent to, e.g. `http://collector:4318/v1/traces`. Tracing is off
    /// (no spans exported, no `traceparent` read or sent) while unset.
    pub otlp_endpoint: Option<Url>,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of traces started here that are recorded, 0 to 1; a caller's sampled trace is always followed.
    pub sample_ratio: f64,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self { otlp_endpoint: None, service_name: "imagegate".to_owned(), sample_ratio: 1.0 }
    }
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { enabled: true, listen: None, token: None }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Which upstream answers, and how to reach it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// `openai` (any OpenAI-compatible HTTP API, including Azure's v1 API) or `mock` (built-in, offline).
    pub kind: UpstreamKind,
    /// Base URL including the version prefix, e.g. `https://api.openai.com/v1`.
    pub base_url: Url,
    /// The upstream's key; callers never see it. Falls back to `OPENAI_API_KEY` for OpenAI's own API only.
    pub api_key: Option<Secret>,
    /// How the key is sent: `bearer` (`Authorization: Bearer`) or `api-key` (Azure's `api-key` header).
    pub auth: UpstreamAuth,
    /// Default `OpenAI-Organization` when the tenant sets none.
    pub organization: Option<String>,
    /// Default `OpenAI-Project` when the tenant sets none.
    pub project: Option<String>,
    /// Extra query parameters on every upstream call (Azure: `api-version`). Values are secrets: a proxy in
    /// front of the upstream may take its key in the query.
    pub query: BTreeMap<String, Secret>,
    /// TCP/TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for a non-streaming answer, and for the first byte of a streaming one. GPT image models at
    /// high quality take minutes.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest silence allowed between two chunks of a streaming answer.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Retries after a failed *connect* only: nothing reached the upstream, so nothing can be billed twice.
    pub connect_retries: u32,
    /// Hosts this upstream's image links point at, added to `images.download.allowed_hosts` (exact names or
    /// `*.suffix`). OpenAI's and Azure's (`*.blob.core.windows.net`) are there by default.
    pub image_hosts: Vec<String>,
    /// A PEM file of certificate authorities this upstream's TLS certificate may chain to, trusted besides the
    /// Mozilla roots built in: a private or corporate CA. Read at startup; unreadable or without a
    /// certificate, startup fails.
    pub ca_file: Option<std::path::PathBuf>,
    /// How the path is built: `openai` (`<base_url>/images/…`, model in the body: OpenAI, Azure's v1 API,
    /// compatible servers) or `azure-deployment` (`<base_url>/deployments/<served name>/images/…`, Azure's
    /// classic route; set `query.api-version`).
    pub route: UpstreamRoute,
    /// The models this deployment serves, each with the name it serves it as (`"gpt-image-1" = "img-east"`).
    /// Empty: every model, under its own name. The served name replaces `model` in JSON and multipart bodies.
    pub models: BTreeMap<String, String>,
    /// Share of its priority tier's traffic, relative to the other deployments of the tier (pools only).
    pub weight: u32,
    /// Tier: a pool uses the lowest tier that has a deployment able to take the request (pools only).
    pub priority: u32,
    /// This deployment's own quota: requests per minute (absent = no limit).
    pub requests_per_minute: Option<u32>,
    /// This deployment's own quota: images per minute, counting each request's `n` (absent = no limit).
    pub images_per_minute: Option<u32>,
    /// Calls in flight at once (absent = no limit).
    pub max_concurrent: Option<u32>,
    /// How long a deployment that answered 429 without `retry-after` rests before it is tried again.
    #[serde(with = "humantime_serde")]
    pub rest_after_429: Duration,
    /// How long a deployment stays out after a connect failure or a 5xx answer, before real traffic probes it.
    #[serde(with = "humantime_serde")]
    pub unhealthy_for: Duration,
    /// Consecutive connect failures or 5xx answers that take the deployment out.
    pub failures_to_trip: u32,
}

/// How an upstream's URL path is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamRoute {
    /// `<base_url>/images/generations`, the model in the body.
    #[default]
    Openai,
    /// `<base_url>/deployments/<deployment>/images/generations`: Azure OpenAI's deployment route.
    AzureDeployment,
}

/// A pool: deployments (`[upstreams.<name>]` tables) used as one, in order.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Names of `[upstreams.<name>]` tables, each at most once.
    pub deployments: Vec<String>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            kind: UpstreamKind::Openai,
            base_url: default_base_url(),
            api_key: None,
            auth: UpstreamAuth::Bearer,
            organization: None,
            project: None,
            query: BTreeMap::new(),
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(300),
            connect_retries: 2,
            image_hosts: Vec::new(),
            ca_file: None,
            route: UpstreamRoute::Openai,
            models: BTreeMap::new(),
            weight: 1,
            priority: 0,
            requests_per_minute: None,
            images_per_minute: None,
            max_concurrent: None,
            rest_after_429: Duration::from_secs(10),
            unhealthy_for: Duration::from_secs(30),
            failures_to_trip: 1,
        }
    }
}

fn default_base_url() -> Url {
    // A constant that parses; `Url::parse` is not const, and this cannot fail.
    Url::parse("https://api.openai.com/v1").unwrap_or_else(|_| unreachable_url())
}

#[expect(clippy::panic, reason = "called only if a literal URL fails to parse, which a unit test rules out")]
fn unreachable_url() -> Url {
    panic!("built-in default URL does not parse")
}

/// The upstream implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// Forward over HTTP to an OpenAI-compatible API.
    Openai,
    /// Answer offline with generated images; never chosen implicitly.
    Mock,
}

/// How the upstream key is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    Bearer,
    ApiKey,
}

/// What request validation refuses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSettings {
    /// Models imagegate has no rules for: `forward` them with generic checks, or `reject` them.
    pub unknown_models: UnknownModels,
    /// A file part declared with no type or `application/octet-stream` whose bytes are PNG, JPEG or WebP is
    /// forwarded with the type of its bytes instead of being refused.
    pub mend_file_types: bool,
    /// Whether the built-in catalog's lifecycle dates (OpenAI's) apply: `auto` (when the default upstream is
    /// OpenAI itself: kind `openai` at api.openai.com; not the mock), `on` or `off`. Dates declared under `[models."name"]` always apply.
    pub builtin_lifecycle: BuiltinLifecycle,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        Self {
            unknown_models: UnknownModels::default(),
            mend_file_types: true,
            builtin_lifecycle: BuiltinLifecycle::Auto,
        }
    }
}

/// See [`ValidationSettings::builtin_lifecycle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinLifecycle {
    #[default]
    Auto,
    On,
    Off,
}

impl Settings {
    /// The model catalog: the built-in one with `[models]` overlaid; every fault, if any.
    pub fn catalog(&self) -> Result<crate::catalog::Catalog, Vec<String>> {
        crate::catalog::Catalog::build(&self.models)
    }

    /// Whether the built-in catalog's lifecycle dates apply (see [`ValidationSettings::builtin_lifecycle`]).
    pub fn builtin_lifecycle(&self) -> bool {
        match self.validation.builtin_lifecycle {
            BuiltinLifecycle::On => true,
            BuiltinLifecycle::Off => false,
            BuiltinLifecycle::Auto => {
                self.upstream.kind == UpstreamKind::Openai
                    && self.upstream.base_url.host_str() == Some("api.openai.com")
            }
        }
    }
}

/// Policy for models missing from imagegate's rule table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModels {
    /// Forward with the generic checks only (OpenAI-compatible upstreams have their own model names).
    #[default]
    Forward,
    /// Refuse with 400 naming `model`.
    Reject,
}

/// Where tenants, keys and usage live.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db`. Default: SQLite at `<storage.data_dir>/imagegate.db`.
    pub url: Option<Secret>,
    pub max_connections: u32,
    /// Run the embedded migrations at startup (turn off to run them as a separate deploy step).
    pub migrate: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self { url: None, max_connections: 10, migrate: true }
    }
}

/// Local files, and where re-hosted images are kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Directory for the embedded SQLite database, the generated link-signing key and (with
    /// `backend = "local"`) stored images.
    pub data_dir: PathBuf,
    /// Where image bytes go: `local` (a directory) or `s3` (any S3-compatible store; for several replicas).
    pub backend: StorageBackend,
    /// Directory for `backend = "local"`; default `<data_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// The bucket for `backend = "s3"`.
    pub s3: S3Settings,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            backend: StorageBackend::Local,
            images_dir: None,
            s3: S3Settings::default(),
        }
    }
}

impl StorageSettings {
    /// The directory of locally stored images.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir.clone().unwrap_or_else(|| self.data_dir.join("images"))
    }
}

/// Image storage backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Local,
    S3,
}

/// An S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph…). Unset credentials come from the usual
/// `AWS_*` environment variables or the instance's role.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    pub bucket: Option<String>,
    pub region: String,
    /// Endpoint of a non-AWS store, e.g. `http://minio:9000`; requests are path-style.
    pub endpoint: Option<Url>,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    /// Key prefix inside the bucket, so one bucket can serve several deployments.
    pub prefix: String,
    /// Allow a plain-HTTP endpoint (in-cluster stores, tests).
    pub allow_http: bool,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            bucket: None,
            region: "us-east-1".to_owned(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            prefix: String::new(),
            allow_http: false,
        }
    }
}

/// Re-hosting: imagegate stores returned images and answers with its own durable, signed links.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesSettings {
    /// Store returned images and rewrite links. Off, answers pass through untouched (upstream links expire).
    pub rehost: bool,
    /// What callers get when they do not set `response_format`: `url` or `b64_json`; unset = the model's own
    /// default (links for DALL·E, base64 for GPT image models). Tenants may override it.
    pub response_format: Option<crate::domain::ResponseFormat>,
    /// How long stored images and their links live. Tenants may override it.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Key for the HMAC that signs links (at least 32 characters). Unset: generated once and kept in
    /// `<data_dir>/signing.key`. Required with `storage.backend = "s3"`, where every replica must share it.
    pub signing_key: Option<Secret>,
    /// When an upstream image cannot be downloaded: `fail` answers 502; `pass_through` hands on the upstream's
    /// own (expiring) URL. Tenants may override it.
    pub on_download_error: crate::domain::DownloadFallback,
    /// How often expired images are deleted.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Guards on downloading images from upstream URLs.
    pub download: DownloadSettings,
}

impl Default for ImagesSettings {
    fn default() -> Self {
        Self {
            rehost: true,
            response_format: None,
            retention: Duration::from_secs(30 * 24 * 3600),
            signing_key: None,
            on_download_error: crate::domain::DownloadFallback::Fail,
            sweep_interval: Duration::from_secs(600),
            download: DownloadSettings::default(),
        }
    }
}

/// The response cache: identical requests answered once (see docs/caching.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Cache answers for tenants that do not say otherwise. Off by default: generation is not deterministic,
    /// and a cached answer returns the same image again.
    pub enabled: bool,
    /// How long an answer is reused. Tenants may override it.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// `tenant` (entries serve only the tenant that caused them) or `shared` (every tenant with the shared
    /// scope; explicit opt-in). Tenants may override it.
    pub scope: crate::domain::Scope,
    /// Memory the in-process cache may hold (bodies and headers), not a number of entries.
    #[serde(serialize_with = "exact_bytes")]
    pub max_bytes: ByteSize,
    /// Larger answers (base64 of many images) are not cached.
    #[serde(serialize_with = "exact_bytes")]
    pub max_entry_bytes: ByteSize,
    /// `memory` (per replica) or `redis` (shared by every replica, in front of the memory cache).
    pub backend: CacheBackend,
    /// Redis for `backend = "redis"`; may be the rate limits' Redis.
    pub redis_url: Option<Secret>,
    /// Prefix of the cache's Redis keys.
    pub redis_prefix: String,
    /// Longest wait for Redis; then the request goes on as a miss.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// After repeated Redis failures, how long the cache goes on without Redis before reconnecting.
    #[serde(with = "humantime_serde")]
    pub redis_backoff: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: Duration::from_secs(3600),
            scope: crate::domain::Scope::Tenant,
            max_bytes: ByteSize::mib(256),
            max_entry_bytes: ByteSize::mib(8),
            backend: CacheBackend::Memory,
            redis_url: None,
            redis_prefix: "imagegate".to_owned(),
            redis_timeout: Duration::from_millis(250),
            redis_backoff: Duration::from_secs(5),
        }
    }
}

/// Where cached answers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    Memory,
    Redis,
}

/// What an upstream image URL must satisfy before imagegate fetches it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadSettings {
    /// Hosts images may be fetched from: exact names, or `*.suffix` for any subdomain. Every redirect hop is
    /// checked too. OpenAI and Azure serve images from `*.blob.core.windows.net`.
    pub allowed_hosts: Vec<String>,
    /// Hosts that may resolve to private, loopback or link-local addresses (in-cluster upstreams, tests).
    /// Every other host resolving to such an address is refused.
    pub private_hosts: Vec<String>,
    /// Allow `http://` image URLs (otherwise only `https://`).
    pub allow_http: bool,
    /// Largest image accepted; a longer body is cut off and refused.
    #[serde(serialize_with = "exact_bytes")]
    pub max_bytes: ByteSize,
    /// Deadline for one whole download.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Redirects followed at most.
    pub max_redirects: usize,
    /// Downloads of one answer run at most this many at once.
    pub concurrency: usize,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            allowed_hosts: vec!["*.blob.core.windows.net".to_owned()],
            private_hosts: Vec::new(),
            allow_http: false,
            max_bytes: ByteSize::mib(32),
            timeout: Duration::from_secs(60),
            max_redirects: 3,
            concurrency: 4,
        }
    }
}

/// Tenant-key checks on the request path.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// How long a validated key is trusted without asking the database: the longest a revocation or
    /// suspension made on another replica takes to apply here.
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    /// How often `last_used_at` is written (one batched write, never one per request).
    #[serde(with = "humantime_serde")]
    pub last_used_flush: Duration,
    /// How many database lookups of key ids not seen before may run at once (a flood of made-up keys queues
    /// for these; cached keys and keys found before never do).
    pub max_key_lookups: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self { key_cache_ttl: Duration::from_secs(5), last_used_flush: Duration::from_secs(30), max_key_lookups: 4 }
    }
}

/// The admin API.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Bearer token for `/admin/v1/*`; the admin API is off (404) when unset. Use IMAGEGATE__ADMIN__TOKEN.
    pub token: Option<Secret>,
}

/// The web console: pages for the platform team (admin token) and for each team (a tenant key).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Serve the console (`false`: its path answers the ordinary 404).
    pub enabled: bool,
    /// Where it is served: an absolute path without a trailing slash.
    pub path: String,
    /// How long a sign-in lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed sign-ins from one address before it must wait.
    pub max_failed_sign_ins: u32,
    /// The first wait after `max_failed_sign_ins` failures; it doubles with each further failure, up to an hour.
    #[serde(with = "humantime_serde")]
    pub lockout: Duration,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/console".to_owned(),
            session_ttl: Duration::from_secs(8 * 3600),
            max_failed_sign_ins: 5,
            lockout: Duration::from_secs(30),
        }
    }
}

/// The replay window (docs/pools.md#the-replay-window).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplaySettings {
    /// Attach identical retries from the same key to an earlier call or its result.
    pub enabled: bool,
    /// How long a finished call's result is kept for retries.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        Self { enabled: true, window: Duration::from_secs(600) }
    }
}

/// The usage ledger writer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageSettings {
    /// Rows are written in one transaction at most this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// …or as soon as this many are waiting.
    pub batch_size: usize,
    /// Rows waiting in memory before new ones are dropped (and counted in the log) rather than slowing requests.
    pub queue_capacity: usize,
    /// At shutdown, how long the writer keeps retrying rows the database will not take yet.
    #[serde(with = "humantime_serde")]
    pub shutdown_flush_timeout: Duration,
}

impl Default for UsageSettings {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(500),
            batch_size: 500,
            queue_capacity: 100_000,
            shutdown_flush_timeout: Duration::from_secs(10),
        }
    }
}

/// Where rate limits are kept, and the default plan.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// `local` (in-process, exact on one replica) or `redis` (shared by every replica).
    pub backend: LimitsBackend,
    /// Redis for `backend = "redis"`, e.g. `redis://127.0.0.1:6379`.
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key imagegate writes.
    pub redis_prefix: String,
    /// Longest wait for Redis before the failure policy applies.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// When the backend cannot answer: `open` lets requests through, `closed` refuses them with 503.
    pub on_backend_error: crate::domain::OnBackendError,
    /// Redis: how long what a request holds (its concurrency slot, its images and USD against the budgets)
    /// lives without renewal. Running requests renew it every third of it, so it only matters when a replica
    /// dies holding some. Default: `server.request_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub lease: Option<Duration>,
    /// Limits for tenants that set none of their own (field by field).
    pub default: crate::domain::Limits,
}

impl LimitsSettings {
    /// The lease, or its default.
    pub fn lease_or(&self, request_timeout: Duration) -> Duration {
        self.lease.unwrap_or(request_timeout)
    }
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            backend: LimitsBackend::Local,
            redis_url: None,
            redis_prefix: "imagegate".to_owned(),
            redis_timeout: Duration::from_millis(250),
            on_backend_error: crate::domain::OnBackendError::Open,
            lease: None,
            default: crate::domain::Limits::default(),
        }
    }
}

/// Rate-limit backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    Local,
    Redis,
}

/// A tenant declared in configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Unique, human-readable name; appears in logs and usage.
    pub name: String,
    /// `OpenAI-Organization` sent upstream for this tenant's requests.
    #[serde(default)]
    pub organization: Option<String>,
    /// `OpenAI-Project` sent upstream for this tenant's requests.
    #[serde(default)]
    pub project: Option<String>,
    /// Models the tenant may use; absent = all.
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// Rate limits and budgets.
    #[serde(default)]
    pub limits: crate::domain::Limits,
    /// Store prompt text in usage rows (explicit opt-in).
    #[serde(default)]
    pub log_prompts: bool,
    /// Re-hosting overrides: `response_format`, `retention`, `on_download_error`.
    #[serde(default)]
    pub images: crate::domain::ImagePolicy,
    /// Response-cache overrides: `enabled`, `ttl`, `scope`.
    #[serde(default)]
    pub cache: Option<crate::domain::CachePolicy>,
    /// The name of an `[upstreams.<name>]` table this tenant's requests go to; absent = `[upstream]`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Free-form table for the platform team; applied when present, left as it is when absent.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// `active` or `suspended`; applied when present, left as it is when absent (new tenants start active).
    #[serde(default)]
    pub status: Option<crate::domain::TenantStatus>,
    /// The tenant's keys, as printed by `imagegate keys new`.
    #[serde(default)]
    pub keys: Vec<KeySettings>,
}

/// One tenant key: its public id and the SHA-256 of the whole key. The key itself is never stored.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    pub id: String,
    pub sha256: String,
    /// When the key stops working: an RFC 3339 time (any offset), a date (midnight UTC) or Unix ms.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// Sizes are written out as a number of bytes: the built-in defaults pass through figment as serialized
/// values, and bytesize's own text form ("1.0 MiB") rounds, so a default of 1 MiB would read back as
/// 1,048,600 bytes. Reading accepts both forms.
fn exact_bytes<S: serde::Serializer>(size: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(size.as_u64())
}

/// A string that never appears in Debug, Display or serialized output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is sent, never where it could be logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Configuration could not be loaded or is invalid; lists every fault found.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// Where to read configuration from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config FILE`: read this file instead of `config/default.toml` + profile.
    pub file: Option<PathBuf>,
    /// Directory holding `default.toml` and profile overlays.
    pub dir: Option<PathBuf>,
}

impl Settings {
    /// Whether a tenant's `upstream` setting may name `name`: an `[upstreams.<name>]` table or a pool.
    pub fn routes_to(&self, name: &str) -> bool {
        self.upstreams.contains_key(name) || self.pools.contains_key(name)
    }

    /// Every name a tenant's `upstream` setting may hold: the named upstreams and the pools.
    pub fn route_names(&self) -> Vec<String> {
        self.upstreams.keys().chain(self.pools.keys()).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn load(dir: &Path, body: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let file = dir.join(format!("t{}.toml", rand::random::<u32>()));
        std::fs::write(&file, body).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::load_from(&Sources { file: Some(file), dir: None }, &env)
    }

    #[test]
    fn default_base_url_parses() {
        assert_eq!(default_base_url().as_str(), "https://api.openai.com/v1");
    }

    #[test]
    fn openai_upstream_without_key_fails_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let text = load(dir.path(), "[upstream]\nkind = \"openai\"\n", &[]).unwrap_err().to_string();
        assert!(text.contains("upstream.api_key is not set") && text.contains("OPENAI_API_KEY"), "{text}");
    }

    #[test]
    fn openai_api_key_from_environment_is_used_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(dir.path(), "", &[(ENV_OPENAI_API_KEY, "sk-test-123")]).unwrap();
        assert_eq!(s.upstream.api_key.as_ref().map(Secret::expose), Some("sk-test-123"));
        assert!(!format!("{s:?}").contains("sk-test-123"));
        assert!(!serde_json::to_string(&s).unwrap().contains("sk-test-123"));
    }

    #[test]
    fn every_fault_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let body = r#"
[server]
request_timeout = "10s"
max_json_body = 0
[log]
level = "=bad=filter=["
[upstream]
kind = "openai"
timeout = "20s"
[replay]
enabled = false
[[tenants]]
name = "a"
keys = [{ id = "NOT-AN-ID", sha256 = "xyz" }]
[[tenants]]
name = "a"
"#;
        let faults = load(dir.path(), body, &[]).unwrap_err().0;
        for needle in
            ["api_key", "request_timeout", "max_json_body", "log.level", "keys[0].id", "sha256", "declared twice"]
        {
            assert!(faults.iter().any(|f| f.contains(needle)), "no fault mentions {needle}: {faults:?}");
        }
    }

    #[test]
    fn environment_overrides_files() {
        let dir = tempfile::tempdir().unwrap();
        let body = "[upstream]\nkind = \"mock\"\n[server]\nlisten = \"127.0.0.1:9000\"\n";
        let s = load(
            dir.path(),
            body,
            &[("IMAGEGATE__SERVER__LISTEN", "127.0.0.1:0"), ("IMAGEGATE__UPSTREAM__CONNECT_RETRIES", "5")],
        )
        .unwrap();
        assert_eq!(s.server.listen.port(), 0);
        assert_eq!(s.upstream.connect_retries, 5);
    }

    #[test]
    fn s3_storage_needs_a_bucket_and_a_shared_signing_key() {
        let dir = tempfile::tempdir().unwrap();
        let body = "[upstream]\nkind = \"mock\"\n[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"http://s3:9000\"\n\
                    [images]\nretention = \"0s\"\n[images.download]\nallowed_hosts = [\"https://x.com/\"]\n";
        let text = load(dir.path(), body, &[]).unwrap_err().to_string();
        for needle in
            ["storage.s3.bucket", "images.signing_key is required", "allow_http", "images.retention", "https://x.com/"]
        {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        let ok = "[upstream]\nkind = \"mock\"\n[storage]\nbackend = \"s3\"\n[storage.s3]\nbucket = \"b\"\n";
        let env = [("IMAGEGATE__IMAGES__SIGNING_KEY", "k-0123456789-0123456789-0123456789")];
        assert_eq!(load(dir.path(), ok, &env).unwrap().storage.s3.bucket.as_deref(), Some("b"));
    }

    #[test]
    fn size_defaults_survive_loading_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(dir.path(), "[upstream]\nkind = \"mock\"\n", &[]).unwrap();
        assert_eq!(s.server.max_json_body.as_u64(), 1024 * 1024);
        assert_eq!(s.server.max_multipart_body.as_u64(), 100 * 1024 * 1024);
        assert_eq!(s.cache.max_bytes.as_u64(), 256 * 1024 * 1024);
        assert_eq!(s.images.download.max_bytes.as_u64(), 32 * 1024 * 1024);
        let s = load(dir.path(), "[upstream]\nkind = \"mock\"\n[server]\nmax_json_body = \"2 MiB\"\n", &[]).unwrap();
        assert_eq!(s.server.max_json_body.as_u64(), 2 * 1024 * 1024);
    }

    #[test]
    fn named_upstreams_are_checked_like_the_default_and_tenants_may_only_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let body = r#"
[upstream]
kind = "mock"
[upstreams.azure]
base_url = "https://example.openai.azure.com/openai/v1"
auth = "api-key"
image_hosts = ["https://images.example.com/"]
[upstreams.Bad-Name]
kind = "mock"
[[tenants]]
name = "a"
upstream = "azure"
[[tenants]]
name = "b"
upstream = "nowhere"
"#;
        let faults = load(dir.path(), body, &[]).unwrap_err().0;
        for needle in [
            "upstreams.azure.api_key is not set: set IMAGEGATE__UPSTREAMS__AZURE__API_KEY",
            "upstreams.Bad-Name: an upstream name is",
            "upstreams.azure.image_hosts entry \"https://images.example.com/\" must be a host name",
            "tenants[1] (\"b\"): upstream 'nowhere' is not a configured upstream",
        ] {
            assert!(faults.iter().any(|f| f.contains(needle)), "no fault mentions {needle}: {faults:#?}");
        }
        assert!(!faults.iter().any(|f| f.contains("tenants[0]")), "{faults:#?}");
        let env =
            [("IMAGEGATE__UPSTREAMS__AZURE__API_KEY", "sk-azure"), ("IMAGEGATE__UPSTREAMS__BAD-NAME__KIND", "mock")];
        let ok = body
            .replace("[upstreams.Bad-Name]\nkind = \"mock\"\n", "")
            .replace("\"nowhere\"", "\"azure\"")
            .replace("https://images.example.com/", "images.example.com");
        let s = load(dir.path(), &ok, &env[..1]).unwrap();
        let azure = &s.upstreams["azure"];
        assert_eq!(azure.api_key.as_ref().map(Secret::expose), Some("sk-azure"));
        assert_eq!((azure.auth, azure.timeout), (UpstreamAuth::ApiKey, Duration::from_secs(600)));
        assert_eq!(azure.image_hosts, ["images.example.com"]);
    }

    #[test]
    fn pools_list_every_fault_at_once_and_a_default_pool_replaces_the_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let body = r#"
[upstreams.east]
base_url = "https://east.openai.azure.com/openai"
api_key = "k1"
auth = "api-key"
route = "azure-deployment"
weight = 0
images_per_minute = 0
[upstreams.west]
base_url = "https://west.openai.azure.com/openai/v1"
api_key = "k2"
models = { "gpt-image-1" = "img/west" }
[pools.default]
deployments = ["east", "west", "east", "north"]
[pools.west]
deployments = []
[[tenants]]
name = "a"
upstream = "default"
"#;
        let faults = load(dir.path(), body, &[]).unwrap_err().0;
        for needle in [
            "upstreams.east.weight must be at least 1",
            "upstreams.east.images_per_minute must be at least 1",
            "upstreams.east.route = \"azure-deployment\" needs upstreams.east.models",
            "upstreams.east.route = \"azure-deployment\" needs upstreams.east.query.api-version",
            "upstreams.west.models: \"gpt-image-1\" = \"img/west\"",
            "pools.default.deployments[2]: 'east' is listed twice",
            "pools.default.deployments[3]: 'north' is not an [upstreams.<name>] table",
            "pools.west: [upstreams.west] has the same name",
            "pools.west.deployments must name at least one",
        ] {
            assert!(faults.iter().any(|f| f.contains(needle)), "no fault mentions {needle}: {faults:#?}");
        }
        assert!(!faults.iter().any(|f| f.starts_with("upstream.api_key")), "[upstream] is unused: {faults:#?}");
        assert!(!faults.iter().any(|f| f.contains("tenants[0]")), "a tenant may name a pool: {faults:#?}");
        let ok = r#"
[upstreams.east]
base_url = "https://east.openai.azure.com/openai"
api_key = "k1"
auth = "api-key"
route = "azure-deployment"
query = { "api-version" = "2025-04-01-preview" }
models = { "gpt-image-1" = "img-east" }
weight = 3
priority = 0
images_per_minute = 10
requests_per_minute = 60
max_concurrent = 4
rest_after_429 = "5s"
[upstreams.openai]
api_key = "sk-openai"
priority = 1
[pools.default]
deployments = ["east", "openai"]
"#;
        let s = load(dir.path(), ok, &[]).unwrap();
        let east = &s.upstreams["east"];
        assert_eq!((east.route, east.weight, east.images_per_minute), (UpstreamRoute::AzureDeployment, 3, Some(10)));
        assert_eq!(east.models["gpt-image-1"], "img-east");
        assert_eq!(s.pools["default"].deployments, ["east", "openai"]);
        assert!(s.routes_to("default") && s.routes_to("east") && !s.routes_to("north"));
    }

    #[test]
    fn tenant_policy_and_key_expiry_faults_name_the_tenant_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let body = r#"
[upstream]
kind = "mock"
[[tenants]]
name = "a"
organization = ""
limits = { requests_per_minute = 0, usd_per_month = -5.0 }
images = { retention = "0s" }
cache = { ttl = "0s" }
metadata = { owner = "ops" }
status = "suspended"
keys = [{ id = "abcd1234", sha256 = "0000000000000000000000000000000000000000000000000000000000000000", expires_at = "soon" }]
"#;
        let faults = load(dir.path(), body, &[]).unwrap_err().0;
        for needle in [
            "tenants[0] (\"a\"): organization must not be empty",
            "limits.requests_per_minute must be at least 1",
            "limits.usd_per_month must be a number",
            "images.retention must be greater than zero",
            "cache.ttl must be greater than zero",
            "keys[0].expires_at \"soon\" is not a time",
        ] {
            assert!(faults.iter().any(|f| f.contains(needle)), "no fault mentions {needle}: {faults:#?}");
        }
        let fixed = body
            .replace("organization = \"\"\n", "")
            .replace("requests_per_minute = 0, usd_per_month = -5.0", "requests_per_minute = 60")
            .replace("\"0s\"", "\"1h\"")
            .replace("\"soon\"", "\"2027-01-01T10:00:00+01:00\"");
        let s = load(dir.path(), &fixed, &[]).unwrap();
        assert_eq!(s.tenants[0].status, Some(crate::domain::TenantStatus::Suspended));
        assert_eq!(s.tenants[0].metadata, Some(serde_json::json!({"owner": "ops"})));
    }

    #[test]
    fn four_faults_in_one_file_are_four_lines() {
        let dir = tempfile::tempdir().unwrap();
        // An unknown key, a wrong type, a bad enum value (each stops serde on its own) and a semantic fault.
        let body = "[server]\nlistn = \"127.0.0.1:1\"\nrequest_timeout = \"10s\"\n[log]\nformat = \"xml\"\n\
                    [upstream]\nkind = \"mock\"\nconnect_retries = \"many\"\n[replay]\nenabled = false\n";
        let error = load(dir.path(), body, &[]).unwrap_err();
        let text = error.to_string();
        assert_eq!(error.0.len(), 4, "{text}");
        assert_eq!(text.lines().count(), 5, "a header and one line per fault: {text}");
        for needle in
            ["server.listn", "log.format", "`xml`", "upstream.connect_retries", "must exceed upstream.timeout"]
        {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        assert!(error.0.iter().take(3).all(|f| f.contains(".toml: ")), "parse faults name the file: {text}");
    }

    #[test]
    fn environment_faults_name_the_variable_and_do_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let env = [
            ("IMAGEGATE__SERVER__LISTN", "127.0.0.1:1"),
            ("IMAGEGATE__UPSTREAM__TIMEOUT", "soon"),
            ("IMAGEGATE__SERVER__MAX_JSON_BODY", "0"),
        ];
        let faults = load(dir.path(), "[upstream]\nkind = \"mock\"\n", &env).unwrap_err().0;
        assert_eq!(faults.len(), 3, "{faults:?}");
        assert!(faults[0].starts_with("IMAGEGATE__SERVER__LISTN (server.listn): unknown key `listn`"), "{faults:?}");
        assert!(faults[1].starts_with("IMAGEGATE__UPSTREAM__TIMEOUT (upstream.timeout)"), "{faults:?}");
        assert!(faults[2].contains("server.max_json_body must be greater than zero"), "{faults:?}");
        assert!(faults.iter().all(|f| !f.contains("config.rs")), "{faults:?}");
    }

    #[test]
    fn string_settings_take_numeric_looking_environment_values() {
        let dir = tempfile::tempdir().unwrap();
        let env = [
            ("IMAGEGATE__UPSTREAM__API_KEY", "1234567890"),
            ("IMAGEGATE__UPSTREAM__ORGANIZATION", "true"),
            ("IMAGEGATE__ADMIN__TOKEN", "[not-an-array-0123456789"),
            ("IMAGEGATE__UPSTREAM__CONNECT_RETRIES", "7"),
            ("IMAGEGATE__IMAGES__REHOST", "false"),
            ("IMAGEGATE__IMAGES__DOWNLOAD__ALLOWED_HOSTS", "[\"a.example\", \"*.b.example\"]"),
        ];
        let s = load(dir.path(), "", &env).unwrap();
        assert_eq!(s.upstream.api_key.as_ref().map(Secret::expose), Some("1234567890"));
        assert_eq!(s.upstream.organization.as_deref(), Some("true"));
        assert_eq!(s.admin.token.as_ref().map(Secret::expose), Some("[not-an-array-0123456789"));
        assert_eq!(s.upstream.connect_retries, 7);
        assert!(!s.images.rehost);
        assert_eq!(s.images.download.allowed_hosts, ["a.example", "*.b.example"]);
    }

    #[test]
    fn hyphenated_keys_are_set_from_the_environment_through_their_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = "[upstream]\nkind = \"mock\"\n[upstream.query]\ndeployment = \"d1\"\n";
        let env = [("IMAGEGATE__UPSTREAM__QUERY", "{api-version=\"2024-10-21\"}")];
        let s = load(dir.path(), file, &env).unwrap();
        assert_eq!(s.upstream.query.get("api-version").map(Secret::expose), Some("2024-10-21"));
        assert_eq!(s.upstream.query.get("deployment").map(Secret::expose), Some("d1"), "tables merge");
        assert!(!format!("{s:?}").contains("2024-10-21"), "query values are redacted");
    }

    #[test]
    fn openai_api_key_is_a_fallback_for_openai_only() {
        let dir = tempfile::tempdir().unwrap();
        let user_key = [(ENV_OPENAI_API_KEY, "sk-users-real-key")];
        // A file's own key wins, and is what goes to the file's base_url.
        let file = "[upstream]\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key = \"sk-fake\"\n";
        let s = load(dir.path(), file, &user_key).unwrap();
        assert_eq!(s.upstream.api_key.as_ref().map(Secret::expose), Some("sk-fake"));
        // So does IMAGEGATE__UPSTREAM__API_KEY.
        let env = [(ENV_OPENAI_API_KEY, "sk-users-real-key"), ("IMAGEGATE__UPSTREAM__API_KEY", "sk-mine")];
        let s = load(dir.path(), "", &env).unwrap();
        assert_eq!(s.upstream.api_key.as_ref().map(Secret::expose), Some("sk-mine"));
        // Without either, the user's OpenAI key is never sent to another base URL.
        let file = "[upstream]\nbase_url = \"http://127.0.0.1:9/v1\"\n";
        let text = load(dir.path(), file, &user_key).unwrap_err().to_string();
        assert!(text.contains("upstream.api_key is not set") && text.contains("only sent to https://api.openai.com"));
        assert!(!text.contains("sk-users-real-key"), "{text}");
    }

    #[test]
    fn faults_never_echo_secret_values() {
        let dir = tempfile::tempdir().unwrap();
        let text = load(dir.path(), "[upstream]\napi_key = 987654321\n", &[]).unwrap_err().to_string();
        assert!(text.contains("upstream.api_key") && text.contains("a number"), "{text}");
        assert!(!text.contains("987654321"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_toml_is_reported_without_guessing_at_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let faults = load(dir.path(), "[server\nlisten = ", &[]).unwrap_err().0;
        assert_eq!(faults.len(), 1, "no semantic faults about defaults the user never chose: {faults:?}");
        assert!(faults[0].contains(".toml"), "{faults:?}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            load(dir.path(), "[upstream]\nkind = \"mock\"\nbase_ulr = \"http://x\"\n", &[]).unwrap_err().to_string();
        assert!(text.contains("base_ulr"), "{text}");
    }

    #[test]
    fn the_documented_example_admin_token_is_refused() {
        let mut s = Settings::default();
        s.upstream.kind = UpstreamKind::Mock;
        s.admin.token = Some(Secret::new("at-least-16-characters"));
        let faults = s.validate().unwrap_err().to_string();
        assert!(faults.contains("example from the documentation"), "{faults}");
        s.admin.token = Some(Secret::new("a-real-generated-token-4f9c2a"));
        assert!(s.validate().is_ok());
    }
}
