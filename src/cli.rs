//! The command line: `serve`, `tenants …`, `keys …`, `usage` and `config check`. This file holds the parsing
//! (clap derive) and the settings each command loads; `commands` runs the non-server commands against the
//! database and `table` renders their plain-ASCII tables. `main.rs` only dispatches and prints.

pub mod commands;
pub mod pools;
pub mod table;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ENV_PREFIX, Settings, Sources};

/// imagegate: a self-hosted gateway for the OpenAI Images API.
///
/// `serve` runs the gateway. `tenants`, `keys` and `usage` manage the same database the gateway uses (found
/// through the same configuration: `--config FILE` or `--config-dir DIR`, then `IMAGEGATE__SECTION__KEY`
/// environment overrides), without a running gateway and without an upstream API key.
#[derive(Debug, Parser)]
#[command(name = "imagegate", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Create, inspect, change, suspend and resume tenants (the teams that call imagegate).
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Issue, list and revoke tenant API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Summarise recorded usage per tenant and model (requests, images, tokens, estimated cost).
    Usage(UsageArgs),
    /// List the model catalog (built in, plus the config's [models]) with each model's status today.
    Models(ModelsArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show each upstream pool deployment's state in a running gateway (through its admin API)
    ///
    /// Healthy, resting or unhealthy (and for how long), calls in flight, and the capacity left this minute, as
    /// this replica sees them. Reads `admin.token` from the configuration.
    Pools(PoolsArgs),
}

/// `imagegate pools`.
#[derive(Debug, clap::Args)]
pub struct PoolsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The gateway's base URL. Default: server.public_url, else http://<server.listen>.
    #[arg(long, value_name = "URL")]
    pub url: Option<url::Url>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where configuration comes from, shared by every command that reads it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Read this TOML file instead of `config/default.toml` (+ `config/$IMAGEGATE_ENV.toml`).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding `default.toml` and profile overlays.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub config_dir: Option<PathBuf>,
}

/// `imagegate serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Use the built-in offline upstream instead of OpenAI (same as upstream.kind = "mock").
    #[arg(long)]
    pub mock: bool,
    /// Override server.listen, e.g. 0.0.0.0:8080 or 127.0.0.1:0.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `imagegate tenants …`.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// List every tenant: name, status, allowed models, organization, project, upstream, where it was defined.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Show every setting of one tenant, including its limits as JSON.
    Show {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Create a tenant (active, no keys yet: issue one with `imagegate keys create --tenant NAME`).
    Create(TenantCreateArgs),
    /// Change some settings of a tenant; settings not mentioned stay as they are.
    Update(TenantUpdateArgs),
    /// Refuse a tenant's requests with 403 until `imagegate tenants resume`; its keys are kept.
    ///
    /// Running gateways apply this within `auth.key_cache_ttl` (5 seconds by default).
    Suspend {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Let a suspended tenant make requests again, with the keys it had.
    Resume {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// `imagegate tenants create`.
#[derive(Debug, clap::Args)]
pub struct TenantCreateArgs {
    /// Unique name: 1-64 letters, digits, '-', '_' or '.'. Appears in logs, usage reports and the admin API.
    pub name: String,
    /// `OpenAI-Organization` sent upstream for this tenant's requests (default: upstream.organization).
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,
    /// `OpenAI-Project` sent upstream for this tenant's requests (default: upstream.project).
    #[arg(long, value_name = "PROJECT")]
    pub project: Option<String>,
    /// Send this tenant's requests to the upstream configured as [upstreams.NAME]. Default: [upstream].
    #[arg(long, value_name = "NAME")]
    pub upstream: Option<String>,
    /// Only these models may be used, comma-separated (e.g. gpt-image-1,dall-e-3). Default: every model.
    #[arg(long, value_name = "MODELS", value_delimiter = ',')]
    pub allowed_models: Option<Vec<String>>,
    /// Rate limits and budgets as a JSON object, e.g. '{"requests_per_minute":60,"usd_per_month":500}'.
    /// Keys: requests_per_minute, requests_burst, images_per_minute, images_burst, concurrent_requests,
    /// images_per_day, images_per_month, usd_per_day, usd_per_month. Default: unlimited.
    #[arg(long, value_name = "JSON")]
    pub limits: Option<String>,
    /// Free-form JSON object for your own bookkeeping, e.g. '{"cost_center":"4711"}'. Default: {}.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// Store the prompt text of this tenant's requests in usage rows (off by default).
    #[arg(long)]
    pub log_prompts: bool,
    /// Re-hosting policy as a JSON object, e.g. '{"response_format":"url","retention":"7d"}'. Keys:
    /// response_format (url|b64_json), retention, on_download_error (fail|pass_through). Default: [images].
    #[arg(long, value_name = "JSON")]
    pub image_policy: Option<String>,
    /// Response-cache policy as a JSON object, e.g. '{"enabled":true,"ttl":"10m"}'. Keys: enabled, ttl,
    /// scope (tenant|shared). Default: [cache].
    #[arg(long, value_name = "JSON")]
    pub cache_policy: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `imagegate tenants update`.
#[derive(Debug, clap::Args)]
pub struct TenantUpdateArgs {
    /// The tenant's name.
    pub name: String,
    /// Set the `OpenAI-Organization` sent upstream for this tenant.
    #[arg(long, value_name = "ORG", conflicts_with = "clear_org")]
    pub org: Option<String>,
    /// Send no tenant-specific organization (upstream.organization applies, if set).
    #[arg(long)]
    pub clear_org: bool,
    /// Set the `OpenAI-Project` sent upstream for this tenant.
    #[arg(long, value_name = "PROJECT", conflicts_with = "clear_project")]
    pub project: Option<String>,
    /// Send no tenant-specific project (upstream.project applies, if set).
    #[arg(long)]
    pub clear_project: bool,
    /// Send this tenant's requests to the upstream configured as [upstreams.NAME].
    #[arg(long, value_name = "NAME", conflicts_with = "default_upstream")]
    pub upstream: Option<String>,
    /// Send this tenant's requests to [upstream] again.
    #[arg(long)]
    pub default_upstream: bool,
    /// Allow only these models, comma-separated (replaces the current list).
    #[arg(long, value_name = "MODELS", value_delimiter = ',', conflicts_with = "all_models")]
    pub allowed_models: Option<Vec<String>>,
    /// Allow every model.
    #[arg(long)]
    pub all_models: bool,
    /// Replace all limits with this JSON object, e.g. '{"images_per_day":1000}'. Keys left out become
    /// unlimited; '{}' removes every limit. Keys: requests_per_minute, requests_burst, images_per_minute,
    /// images_burst, concurrent_requests, images_per_day, images_per_month, usd_per_day, usd_per_month.
    #[arg(long, value_name = "JSON")]
    pub limits: Option<String>,
    /// Replace the metadata with this JSON object; '{}' empties it.
    #[arg(long, value_name = "JSON")]
    pub metadata: Option<String>,
    /// Start storing prompt text in this tenant's usage rows.
    #[arg(long, conflicts_with = "no_log_prompts")]
    pub log_prompts: bool,
    /// Stop storing prompt text in this tenant's usage rows.
    #[arg(long)]
    pub no_log_prompts: bool,
    /// Replace the re-hosting policy with this JSON object; '{}' returns to the [images] defaults.
    #[arg(long, value_name = "JSON")]
    pub image_policy: Option<String>,
    /// Replace the response-cache policy with this JSON object; 'null' returns to the [cache] defaults.
    #[arg(long, value_name = "JSON")]
    pub cache_policy: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `imagegate keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Issue a key for a tenant in the database. The key is printed once; only its hash is stored.
    Create(KeyCreateArgs),
    /// List a tenant's keys (ids and dates; never secrets).
    List {
        /// The tenant whose keys to list.
        #[arg(long, value_name = "NAME")]
        tenant: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Revoke a key by its id (the 8 characters after `ig_`). Revoking cannot be undone.
    ///
    /// Running gateways refuse the key within `auth.key_cache_ttl` (5 seconds by default).
    Revoke {
        /// The key's public id, as shown by `imagegate keys list`.
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Generate a key without touching the database, and print the `[[tenants]]` configuration snippet
    /// that admits it (for tenants declared in the configuration file).
    New {
        /// Tenant name for the printed snippet.
        #[arg(long, default_value = "my-team")]
        tenant: String,
    },
}

/// `imagegate keys create`.
#[derive(Debug, clap::Args)]
pub struct KeyCreateArgs {
    /// The tenant the key belongs to.
    #[arg(long, value_name = "NAME")]
    pub tenant: String,
    /// A label to tell keys apart, e.g. "ci" or "staging".
    #[arg(long, value_name = "LABEL")]
    pub name: Option<String>,
    /// Make the key stop working after this long, e.g. 30d, 12h, 1y. Default: never expires.
    #[arg(long, value_name = "DURATION", conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Make the key stop working at this time: an RFC 3339 time (2027-01-01T09:00:00Z,
    /// 2027-01-01T10:00:00+01:00), a date (2027-01-01, midnight UTC) or Unix milliseconds.
    #[arg(long, value_name = "TIME")]
    pub expires_at: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `imagegate usage`.
#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Start of the range (inclusive): a date (2026-11-01, midnight UTC), an RFC 3339 time with any offset
    /// (2026-11-01T09:00:00Z, 2026-11-01T10:00:00+01:00) or Unix milliseconds. Default: the start of the
    /// current month (UTC).
    #[arg(long, value_name = "DATE")]
    pub from: Option<String>,
    /// End of the range (exclusive), same formats. Default: now. `--from 2026-11-01 --to 2026-12-01` is
    /// November.
    #[arg(long, value_name = "DATE")]
    pub to: Option<String>,
    /// Only this tenant.
    #[arg(long, value_name = "NAME")]
    pub tenant: Option<String>,
    /// Only models with this status in the catalog today (`deprecated`: still working, going away), to see
    /// which tenants still call what is going away.
    #[arg(long, value_enum, value_name = "STATUS")]
    pub model_status: Option<ModelStatus>,
    /// Output format: a table for people, CSV for spreadsheets, JSON for scripts (the admin API's shape:
    /// {"object":"list","from":MS,"to":MS,"data":[...]}).
    #[arg(long, value_enum, default_value_t = UsageFormat::Table)]
    pub format: UsageFormat,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// A model's status in the catalog, for `--model-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelStatus {
    Active,
    Deprecated,
    ShutDown,
}

impl From<ModelStatus> for crate::catalog::Status {
    fn from(s: ModelStatus) -> Self {
        match s {
            ModelStatus::Active => Self::Active,
            ModelStatus::Deprecated => Self::Deprecated,
            ModelStatus::ShutDown => Self::ShutDown,
        }
    }
}

/// `imagegate models`.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// Only models with this status today.
    #[arg(long, value_enum, value_name = "STATUS")]
    pub status: Option<ModelStatus>,
    /// A table for people, or JSON for scripts (the admin API's `GET /admin/v1/models` shape).
    #[arg(long, value_enum, default_value_t = ModelsFormat::Table)]
    pub format: ModelsFormat,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// How `imagegate models` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelsFormat {
    Table,
    Json,
}

/// How `imagegate usage` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageFormat {
    Table,
    Csv,
    Json,
}

/// `imagegate config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate the configuration, then print it with secrets redacted.
    Check(ConfigArgs),
}

impl ServeArgs {
    /// Settings with the command-line overrides applied on top of files and environment. Flags are passed as
    /// `IMAGEGATE__…` entries after the real environment, so they win and are validated like everything else.
    pub fn settings(&self) -> Result<Settings, crate::config::ConfigError> {
        let mut env: Vec<(String, String)> = std::env::vars().collect();
        if self.mock {
            env.push((format!("{ENV_PREFIX}UPSTREAM__KIND"), "mock".to_owned()));
        }
        if let Some(listen) = self.listen {
            env.push((format!("{ENV_PREFIX}SERVER__LISTEN"), listen.to_string()));
        }
        Settings::load_from(&self.config.sources(), &env)
    }
}

impl ConfigArgs {
    pub fn sources(&self) -> Sources {
        Sources { file: self.config.clone(), dir: self.config_dir.clone() }
    }

    /// Settings for the database commands (`tenants`, `keys`, `usage`): the same files and environment as
    /// `serve`, with the upstream forced to `mock` so no upstream key is needed to manage the database.
    pub fn database_settings(&self) -> Result<Settings, crate::config::ConfigError> {
        let mut env: Vec<(String, String)> = std::env::vars().collect();
        env.push((format!("{ENV_PREFIX}UPSTREAM__KIND"), "mock".to_owned()));
        Settings::load_from(&self.sources(), &env)
    }
}

/// The text printed by `imagegate keys new`.
pub fn new_key_text(tenant: &str) -> String {
    let key = crate::domain::keys::generate();
    format!(
        "New key for tenant {tenant:?} (shown once; imagegate stores only its hash):\n\n  {key}\n\n\
         Admit it by adding this to your configuration:\n\n\
         [[tenants]]\nname = {tenant:?}\nkeys = [{{ id = \"{id}\", sha256 = \"{sha}\" }}]\n",
        key = key.key,
        id = key.id,
        sha = key.sha256
    )
}
