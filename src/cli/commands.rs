//! The non-server commands: `tenants …`, `keys …`, `usage`, `models` and `config check`. Each returns the text to print
//! (`main.rs` prints it, or the error as one `imagegate: …` line with exit code 1). The database commands
//! open the same database as `serve`, through the same configuration, but never need an upstream key.

use anyhow::{Context, anyhow, bail};

use super::{
    ConfigArgs, KeyCreateArgs, KeysCommand, ModelsArgs, ModelsFormat, TenantCreateArgs, TenantUpdateArgs,
    TenantsCommand, UsageArgs, UsageFormat, table,
};
use crate::catalog::Date;
use crate::config::Settings;
use crate::db::Db;
use crate::domain::{Limits, Tenant, TenantStatus, keys};
use crate::ledger::report::{self, SummaryQuery};
use crate::tenants::repo::{NewTenant, TenantPatch, TenantRepo};
use crate::time::{RelativeError, now_ms};

/// Open the database `config` points at, run `f`, and close the pool whatever `f` returned (so SQLite's
/// write-ahead log is checkpointed before the process exits).
async fn with_db<T>(
    config: &ConfigArgs,
    f: impl AsyncFnOnce(&Settings, &TenantRepo, &Db) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let settings = config.database_settings()?;
    let db = Db::connect(&settings.database, &settings.storage.data_dir).await?;
    let repo = TenantRepo::with_upstreams(db.clone(), settings.route_names());
    let result = f(&settings, &repo, &db).await;
    db.close().await;
    result
}

/// `imagegate pools`: ask the running gateway the configuration describes.
pub async fn pools(args: super::PoolsArgs) -> anyhow::Result<String> {
    let settings = args.config.database_settings()?;
    let token = settings.admin.token.as_ref().ok_or_else(|| {
        anyhow!("admin.token is not set: the pool state comes from the admin API (set IMAGEGATE__ADMIN__TOKEN)")
    })?;
    let url = super::pools::gateway_url(args.url, &settings)?;
    super::pools::status(&url, token.expose(), args.json).await
}

/// `imagegate tenants …`.
pub async fn tenants(command: TenantsCommand) -> anyhow::Result<String> {
    match command {
        TenantsCommand::List { config } => {
            with_db(&config, async |_, repo, _| {
                let list = repo.list_tenants().await?;
                if list.is_empty() {
                    return Ok("no tenants yet: create one with `imagegate tenants create NAME`\n".to_owned());
                }
                Ok(format!("{}\n", table::tenants(&list)))
            })
            .await
        }
        TenantsCommand::Show { name, config } => {
            with_db(&config, async |_, repo, _| Ok(format!("{}\n", table::tenant(&repo.get_tenant(&name).await?))))
                .await
        }
        TenantsCommand::Create(args) => create_tenant(args).await,
        TenantsCommand::Update(args) => update_tenant(args).await,
        TenantsCommand::Suspend { name, config } => set_status(&config, &name, TenantStatus::Suspended).await,
        TenantsCommand::Resume { name, config } => set_status(&config, &name, TenantStatus::Active).await,
    }
}

async fn create_tenant(args: TenantCreateArgs) -> anyhow::Result<String> {
    let spec = NewTenant {
        name: args.name.clone(),
        allowed_models: args
            .allowed_models
            .map(|m| models(m, "omit --allowed-models to allow every model"))
            .transpose()?,
        limits: args.limits.as_deref().map(limits).transpose()?.unwrap_or_default(),
        organization: args.org.map(|o| non_empty(o, "--org", "omit it to use upstream.organization")).transpose()?,
        project: args.project.map(|p| non_empty(p, "--project", "omit it to use upstream.project")).transpose()?,
        upstream: args.upstream.map(|u| non_empty(u, "--upstream", "omit it to use [upstream]")).transpose()?,
        log_prompts: args.log_prompts,
        image_policy: args.image_policy.as_deref().map(image_policy).transpose()?.unwrap_or_default(),
        cache_policy: args.cache_policy.as_deref().map(cache_policy).transpose()?.flatten(),
        metadata: args.metadata.as_deref().map(metadata).transpose()?,
    };
    with_db(&args.config, async |_, repo, _| {
        let tenant = repo.create_tenant(spec, "api").await?;
        Ok(format!(
            "created tenant '{name}'\n{table}\nnext: issue it a key with `imagegate keys create --tenant {name}`\n",
            name = tenant.name,
            table = table::tenant(&tenant)
        ))
    })
    .await
}

async fn update_tenant(args: TenantUpdateArgs) -> anyhow::Result<String> {
    let mut patch = TenantPatch::default();
    if let Some(org) = args.org {
        patch.organization = Some(Some(non_empty(org, "--org", "use --clear-org to remove it")?));
    } else if args.clear_org {
        patch.organization = Some(None);
    }
    if let Some(project) = args.project {
        patch.project = Some(Some(non_empty(project, "--project", "use --clear-project to remove it")?));
    } else if args.clear_project {
        patch.project = Some(None);
    }
    if let Some(upstream) = args.upstream {
        patch.upstream = Some(Some(non_empty(upstream, "--upstream", "use --default-upstream for [upstream]")?));
    } else if args.default_upstream {
        patch.upstream = Some(None);
    }
    if let Some(json) = args.metadata.as_deref() {
        patch.metadata = Some(metadata(json)?);
    }
    if let Some(list) = args.allowed_models {
        patch.allowed_models = Some(Some(models(list, "use --all-models to allow every model")?));
    } else if args.all_models {
        patch.allowed_models = Some(None);
    }
    if let Some(json) = args.limits.as_deref() {
        patch.limits = Some(limits(json)?);
    }
    if args.log_prompts || args.no_log_prompts {
        patch.log_prompts = Some(args.log_prompts);
    }
    if let Some(json) = args.image_policy.as_deref() {
        patch.image_policy = Some(image_policy(json)?);
    }
    if let Some(json) = args.cache_policy.as_deref() {
        patch.cache_policy = Some(cache_policy(json)?);
    }
    if patch.is_empty() {
        bail!(
            "nothing to change: pass at least one of --org, --clear-org, --project, --clear-project, --upstream, \
             --default-upstream, --allowed-models, --all-models, --limits, --metadata, --log-prompts, \
             --no-log-prompts, --image-policy, --cache-policy"
        );
    }
    with_db(&args.config, async |_, repo, _| {
        let tenant = repo.update_tenant(&args.name, patch).await?;
        let mut out = format!("updated tenant '{}'\n{}\n", tenant.name, table::tenant(&tenant));
        if tenant.source == "config" {
            out.push_str(&format!(
                "note: '{}' is declared in the configuration file, and `imagegate serve` re-applies its \
                 organization, project, upstream, allowed models, limits, log_prompts, image and cache policies (and \
                 metadata, if the file sets it) from there at startup: make the same change in the file to keep it\n",
                tenant.name
            ));
        }
        Ok(out)
    })
    .await
}

async fn set_status(config: &ConfigArgs, name: &str, status: TenantStatus) -> anyhow::Result<String> {
    with_db(config, async |settings, repo, _| {
        let tenant = repo.get_tenant(name).await?;
        if tenant.status == status {
            return Ok(format!("tenant '{name}' is already {}\n", status.as_str()));
        }
        let tenant: Tenant = repo.set_status(name, status).await?;
        let ttl = humantime::format_duration(settings.auth.key_cache_ttl);
        Ok(match status {
            TenantStatus::Suspended => format!(
                "suspended tenant '{}': its requests are now refused with 403 (running gateways apply this within \
                 {ttl}); its keys are kept for `imagegate tenants resume {}`\n",
                tenant.name, tenant.name
            ),
            TenantStatus::Active => format!(
                "resumed tenant '{}': it can make requests again with its existing keys (running gateways apply \
                 this within {ttl})\n",
                tenant.name
            ),
        })
    })
    .await
}

/// `imagegate keys …`.
pub async fn keys(command: KeysCommand) -> anyhow::Result<String> {
    match command {
        KeysCommand::New { tenant } => Ok(super::new_key_text(&tenant)),
        KeysCommand::Create(args) => create_key(args).await,
        KeysCommand::List { tenant, config } => {
            with_db(&config, async |_, repo, _| {
                let list = repo.list_keys(&tenant).await?;
                if list.is_empty() {
                    return Ok(format!(
                        "tenant '{tenant}' has no keys yet: issue one with `imagegate keys create --tenant {tenant}`\n"
                    ));
                }
                Ok(format!("{}\n", table::keys(&list)))
            })
            .await
        }
        KeysCommand::Revoke { id, config } => {
            if keys::parse(&id).is_some() {
                bail!("pass the key's id (the 8 characters after `ig_`), not the whole key");
            }
            with_db(&config, async |settings, repo, _| {
                let before = now_ms();
                let info = repo.revoke_key(&id).await?;
                match info.revoked_at {
                    Some(at) if at < before => {
                        Ok(format!("key {id} of tenant '{}' was already revoked at {}\n", info.tenant, table::time(at)))
                    }
                    _ => Ok(format!(
                        "revoked key {id} of tenant '{}': running gateways refuse it within {}\n",
                        info.tenant,
                        humantime::format_duration(settings.auth.key_cache_ttl)
                    )),
                }
            })
            .await
        }
    }
}

async fn create_key(args: KeyCreateArgs) -> anyhow::Result<String> {
    let expires_at = match (args.expires_in.as_deref(), args.expires_at.as_deref()) {
        (Some(text), _) => Some(expiry(text)?),
        (None, Some(text)) => Some(expiry_at(text, now_ms())?),
        (None, None) => None,
    };
    let label = args.name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    with_db(&args.config, async |_, repo, _| {
        let (key, info) = repo.issue_key(&args.tenant, label, expires_at).await?;
        let mut about = Vec::new();
        if let Some(name) = &info.name {
            about.push(format!("name '{name}'"));
        }
        about.push(match info.expires_at {
            Some(at) => format!("expires {}", table::time(at)),
            None => "never expires".to_owned(),
        });
        Ok(format!(
            "created key {id} for tenant '{tenant}' ({about})\n\n  {key}\n\n\
             Store it now: it cannot be shown again (imagegate keeps only its SHA-256 hash).\n\
             Callers send it as `Authorization: Bearer <key>`; revoke it with `imagegate keys revoke {id}`.\n",
            id = info.id,
            tenant = info.tenant,
            about = about.join(", "),
            key = key.key,
        ))
    })
    .await
}

/// `imagegate usage`.
pub async fn usage(args: UsageArgs) -> anyhow::Result<String> {
    let now = now_ms();
    let from = match args.from.as_deref() {
        Some(text) => bound(text, "--from")?,
        None => crate::time::month_start(now).ok_or_else(|| anyhow!("no month start for {now}"))?,
    };
    let to = match args.to.as_deref() {
        Some(text) => bound(text, "--to")?,
        None => now,
    };
    if from >= to {
        bail!("--from ({}) must be before --to ({})", table::time(from), table::time(to));
    }
    with_db(&args.config, async |settings, repo, db| {
        if let Some(name) = &args.tenant {
            repo.get_tenant(name).await?;
        }
        let query = SummaryQuery { from_ms: from, to_ms: to, tenant: args.tenant.clone() };
        let mut rows = report::summary(db, &query).await.context("cannot read the usage ledger")?;
        if let Some(status) = args.model_status {
            let catalog = settings.catalog().map_err(crate::config::ConfigError)?;
            let today = Date::today();
            rows.retain(|r| catalog.status_of(&r.model, today) == Some(status.into()));
        }
        Ok(match args.format {
            UsageFormat::Table => {
                let scope = args.tenant.as_ref().map_or_else(String::new, |t| format!(", tenant '{t}'"));
                format!(
                    "usage from {} to {} (UTC){scope}\n{}\n",
                    table::time(from),
                    table::time(to),
                    table::usage(&rows)
                )
            }
            UsageFormat::Csv => report::to_csv(&rows)?,
            UsageFormat::Json => {
                format!("{}\n", serde_json::to_string_pretty(&report::UsageReport::new(from, to, rows))?)
            }
        })
    })
    .await
}

/// `imagegate models`.
pub fn models_list(args: &ModelsArgs) -> anyhow::Result<String> {
    let settings = args.config.database_settings()?;
    let catalog = settings.catalog().map_err(crate::config::ConfigError)?;
    let today = Date::today();
    let mut list = catalog.listing(today, settings.builtin_lifecycle());
    if let Some(status) = args.status {
        list.retain(|m| m.status == status.into());
    }
    Ok(match args.format {
        ModelsFormat::Table => format!("models on {today} (UTC)\n{}\n", table::models_catalog(&list)),
        ModelsFormat::Json => {
            format!("{}\n", serde_json::to_string_pretty(&serde_json::json!({"object": "list", "data": list}))?)
        }
    })
}

/// `imagegate config check`.
pub fn config_check(args: &ConfigArgs) -> anyhow::Result<String> {
    let settings = Settings::load(&args.sources())?;
    Ok(format!("configuration is valid:\n{settings:#?}\n"))
}

/// A `--from`/`--to` value as Unix milliseconds.
fn bound(text: &str, flag: &str) -> anyhow::Result<i64> {
    crate::time::parse_time(text).ok_or_else(|| {
        anyhow!(
            "invalid {flag} '{text}': use a date (2026-11-01), an RFC 3339 time (2026-11-01T09:00:00Z, \
             2026-11-01T10:00:00+01:00) or Unix milliseconds, from 1970 on"
        )
    })
}

/// `--expires-in 30d` as an absolute expiry time in Unix milliseconds.
fn expiry(text: &str) -> anyhow::Result<i64> {
    crate::time::after(text, now_ms()).map_err(|e| match e {
        RelativeError::Unreadable(_) => anyhow!("invalid --expires-in '{text}': {e}"),
        RelativeError::TooShort => anyhow!("--expires-in {e}"),
        RelativeError::TooFar => anyhow!("--expires-in '{text}' {e}"),
    })
}

/// `--expires-at TIME` in Unix milliseconds; it must be in the future.
fn expiry_at(text: &str, now: i64) -> anyhow::Result<i64> {
    let at = crate::time::parse_time(text).ok_or_else(|| {
        anyhow!(
            "invalid --expires-at '{text}': use an RFC 3339 time (2027-01-01T09:00:00Z, 2027-01-01T10:00:00+01:00), \
             a date (2027-01-01) or Unix milliseconds"
        )
    })?;
    if at <= now {
        bail!("--expires-at must be in the future, got {}", table::time(at));
    }
    Ok(at)
}

/// Parse `--metadata` JSON (an object; `tenants::policy` refuses anything else).
fn metadata(json: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(json).map_err(|e| anyhow!("invalid --metadata: {e} (example: '{{\"cost_center\":\"4711\"}}')"))
}

/// Parse `--image-policy` JSON, naming the flag and an example on failure.
fn image_policy(json: &str) -> anyhow::Result<crate::domain::ImagePolicy> {
    serde_json::from_str(json).map_err(|e| {
        anyhow!("invalid --image-policy: {e} (example: '{{\"response_format\":\"url\",\"retention\":\"7d\"}}')")
    })
}

/// Parse `--cache-policy` JSON (`null` = the deployment defaults), naming the flag and an example on failure.
fn cache_policy(json: &str) -> anyhow::Result<Option<crate::domain::CachePolicy>> {
    serde_json::from_str(json).map_err(|e| {
        anyhow!("invalid --cache-policy: {e} (example: '{{\"enabled\":true,\"ttl\":\"10m\",\"scope\":\"tenant\"}}')")
    })
}

/// Parse `--limits` JSON into [`Limits`], naming the flag and the valid keys on failure.
fn limits(json: &str) -> anyhow::Result<Limits> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| anyhow!("invalid --limits: {e}"))?;
    if !value.is_object() {
        bail!("invalid --limits: expected a JSON object such as '{{\"requests_per_minute\":60}}'");
    }
    serde_json::from_value(value)
        .map_err(|e| anyhow!("invalid --limits: {e} (example: '{{\"requests_per_minute\":60,\"usd_per_month\":500}}')"))
}

/// A cleaned `--allowed-models` list; empty names are refused.
fn models(list: Vec<String>, hint: &str) -> anyhow::Result<Vec<String>> {
    if list.iter().any(|m| m.trim().is_empty()) {
        bail!("--allowed-models has an empty model name ({hint})");
    }
    Ok(crate::tenants::repo::trimmed_models(list))
}

fn non_empty(value: String, flag: &str, hint: &str) -> anyhow::Result<String> {
    let value = value.trim().to_owned();
    if value.is_empty() {
        bail!("{flag} must not be empty ({hint})");
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_flags_are_named_in_the_error() {
        assert!(limits(r#"{"rpm": 1}"#).unwrap_err().to_string().contains("--limits"));
        assert!(limits("[1]").is_err());
        assert_eq!(limits(r#"{"requests_per_minute": 60}"#).unwrap().requests_per_minute, Some(60));
        assert!(expiry("soon").unwrap_err().to_string().contains("--expires-in"));
        assert!(expiry("30d").unwrap() > now_ms());
        assert!(bound("yesterday", "--from").unwrap_err().to_string().contains("--from"));
        assert!(bound("-5", "--to").unwrap_err().to_string().contains("--to"));
        assert_eq!(
            bound("2026-12-01T10:00:00+02:00", "--from").unwrap(),
            bound("2026-12-01T08:00:00Z", "--from").unwrap()
        );
        assert!(expiry_at("2001-01-01", now_ms()).unwrap_err().to_string().contains("future"));
        assert!(expiry_at("soon", now_ms()).unwrap_err().to_string().contains("--expires-at"));
        assert!(expiry_at("2099-01-01T10:00:00+02:00", now_ms()).is_ok());
        assert!(metadata("{not json").unwrap_err().to_string().contains("--metadata"));
        assert_eq!(models(vec![" a ".into(), "b".into(), "a".into()], "").unwrap(), ["a", "b"]);
        assert!(models(vec![String::new()], "").is_err());
    }
}
