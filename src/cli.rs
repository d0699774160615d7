//! The command line: `serve`, `keys new`, `config check`. Parsing and the small non-server commands live
//! here; `main.rs` only dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{ENV_PREFIX, Settings, Sources};

/// imagegate: a self-hosted gateway for the OpenAI Images API.
#[derive(Debug, Parser)]
#[command(name = "imagegate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Manage tenant keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// Where configuration comes from, shared by every command that reads it.
#[derive(Debug, clap::Args)]
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

/// `imagegate keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a new tenant key and print the configuration snippet that admits it.
    New {
        /// Tenant name for the printed snippet.
        #[arg(long, default_value = "my-team")]
        tenant: String,
    },
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
}

/// The text printed by `imagegate keys new`.
pub fn new_key_text(tenant: &str) -> String {
    let key = crate::tenants::keys::generate();
    format!(
        "New key for tenant {tenant:?} (shown once; imagegate stores only its hash):\n\n  {key}\n\n\
         Admit it by adding this to your configuration:\n\n\
         [[tenants]]\nname = {tenant:?}\nkeys = [{{ id = \"{id}\", sha256 = \"{sha}\" }}]\n",
        key = key.key,
        id = key.id,
        sha = key.sha256
    )
}
