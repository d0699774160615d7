//! Validation of loaded settings: every fault at once, each naming its key, before any socket is bound.

use super::*;
use crate::domain::rules::{Fields, PolicyNames};

impl Settings {
    /// The request deadline an upstream's `timeout` must stay under, so an upstream timeout answers its own
    /// clear 504. With the replay window on, an upstream call outlives its caller (a retry collects it), so a
    /// shorter `server.request_timeout` is a choice of how long a caller waits, and no fault.
    fn caller_deadline(&self) -> Option<Duration> {
        (!self.replay.enabled).then_some(self.server.request_timeout)
    }

    /// Every fault at once, so a deployment is fixed in one round.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut faults = Vec::new();
        self.console.validate(&mut faults);
        // `[pools.default]` replaces `[upstream]`, which then goes unused and needs no key.
        if !self.pools.contains_key(DEFAULT_POOL) {
            validate_upstream("upstream", &self.upstream, self.caller_deadline(), &mut faults);
        }
        for (name, up) in &self.upstreams {
            if !valid_upstream_name(name) {
                faults.push(format!(
                    "upstreams.{name}: an upstream name is 1-64 lowercase letters, digits, '-' or '_' (it is also \
                     spelt in IMAGEGATE__UPSTREAMS__<NAME>__… variables)"
                ));
            }
            validate_upstream(&format!("upstreams.{name}"), up, self.caller_deadline(), &mut faults);
        }
        if self.server.request_timeout.is_zero() {
            faults.push("server.request_timeout must be greater than zero".to_owned());
        }
        if self.server.header_read_timeout.is_zero() || self.server.idle_timeout.is_zero() {
            faults.push("server.header_read_timeout and server.idle_timeout must be greater than zero".to_owned());
        }
        if self.server.max_connections == 0 {
            faults.push("server.max_connections must be at least 1".to_owned());
        }
        if self.server.shutdown_grace >= self.server.shutdown_timeout {
            faults.push(format!(
                "server.shutdown_grace ({:?}) must be shorter than server.shutdown_timeout ({:?}), which it is part of",
                self.server.shutdown_grace, self.server.shutdown_timeout
            ));
        }
        for (name, size) in [
            ("server.max_json_body", self.server.max_json_body),
            ("server.max_multipart_body", self.server.max_multipart_body),
            ("server.max_json_edit_body", self.server.max_json_edit_body),
        ] {
            if size.as_u64() == 0 {
                faults.push(format!("{name} must be greater than zero"));
            }
        }
        if let Some(url) = &self.server.public_url
            && !matches!(url.scheme(), "http" | "https")
        {
            faults.push(format!("server.public_url must be http or https, got {url}"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            faults.push(format!("log.level {:?} is not a valid filter: {e}", self.log.level));
        }
        validate_pools(self, &mut faults);
        validate_tenants(&self.tenants, &|name| self.routes_to(name), &mut faults);
        if self.database.max_connections == 0 {
            faults.push("database.max_connections must be at least 1".to_owned());
        }
        if self.auth.max_key_lookups == 0 {
            faults.push("auth.max_key_lookups must be at least 1".to_owned());
        }
        if let Some(url) = &self.database.url
            && !["sqlite:", "postgres:", "postgresql:"].iter().any(|p| url.expose().starts_with(p))
        {
            faults.push("database.url must start with sqlite:, postgres: or postgresql:".to_owned());
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            faults.push(format!("tracing.sample_ratio must be between 0 and 1, got {}", self.tracing.sample_ratio));
        }
        if let Some(url) = &self.tracing.otlp_endpoint
            && !matches!(url.scheme(), "http" | "https")
        {
            faults.push(format!("tracing.otlp_endpoint must be http or https, got {url}"));
        }
        if self.metrics.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            faults.push("metrics.token must be at least 16 characters".to_owned());
        }
        if self.metrics.listen.is_some_and(|m| m.port() != 0 && m == self.server.listen) {
            faults.push(
                "metrics.listen must differ from server.listen (leave it unset to serve /metrics there)".to_owned(),
            );
        }
        if self.admin.token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            faults.push("admin.token must be at least 16 characters".to_owned());
        }
        if self.admin.token.as_ref().is_some_and(|t| DOCUMENTED_EXAMPLE_TOKENS.contains(&t.expose().trim())) {
            faults.push(
                "admin.token is the example from the documentation: generate one (openssl rand -hex 32)".to_owned(),
            );
        }
        if self.usage.batch_size == 0 || self.usage.queue_capacity == 0 {
            faults.push("usage.batch_size and usage.queue_capacity must be at least 1".to_owned());
        }
        if self.replay.window.is_zero() {
            faults.push(
                "replay.window must be greater than zero (to turn replays off, set replay.enabled = false)".to_owned(),
            );
        }
        if self.usage.shutdown_flush_timeout.is_zero() {
            faults.push("usage.shutdown_flush_timeout must be greater than zero".to_owned());
        }
        if self.limits.backend == LimitsBackend::Redis && self.limits.redis_url.is_none() {
            faults.push("limits.redis_url is required when limits.backend = \"redis\"".to_owned());
        }
        if self.limits.redis_timeout.is_zero() {
            faults.push("limits.redis_timeout must be greater than zero".to_owned());
        }
        if self.limits.lease.is_some_and(|l| l < Duration::from_secs(1)) {
            faults.push("limits.lease must be at least 1s".to_owned());
        }
        self.validate_images(&mut faults);
        let cache = &self.cache;
        if cache.ttl.is_zero() || cache.redis_timeout.is_zero() || cache.redis_backoff.is_zero() {
            faults.push("cache.ttl, cache.redis_timeout and cache.redis_backoff must be greater than zero".to_owned());
        }
        if cache.max_bytes.as_u64() == 0 || cache.max_entry_bytes > cache.max_bytes {
            faults.push("cache.max_bytes must be greater than zero and at least cache.max_entry_bytes".to_owned());
        }
        if cache.backend == CacheBackend::Redis && cache.redis_url.is_none() {
            faults.push("cache.redis_url is required when cache.backend = \"redis\"".to_owned());
        }
        match self.catalog() {
            Ok(catalog) => {
                let prices = self.pricing.clone().with_catalog(&catalog);
                faults.extend(prices.validate().into_iter().map(|f| format!("pricing: {f}")));
            }
            Err(catalog_faults) => {
                faults.extend(catalog_faults);
                faults.extend(self.pricing.validate().into_iter().map(|f| format!("pricing: {f}")));
            }
        }
        if faults.is_empty() { Ok(()) } else { Err(ConfigError(faults)) }
    }
}

impl Settings {
    fn validate_images(&self, faults: &mut Vec<String>) {
        let (storage, images) = (&self.storage, &self.images);
        if storage.backend == StorageBackend::S3 {
            if storage.s3.bucket.as_deref().is_none_or(|b| b.trim().is_empty()) {
                faults.push("storage.s3.bucket is required when storage.backend = \"s3\"".to_owned());
            }
            if images.signing_key.is_none() {
                faults.push(
                    "images.signing_key is required when storage.backend = \"s3\": every replica must sign and \
                     check links with the same key (set IMAGEGATE__IMAGES__SIGNING_KEY)"
                        .to_owned(),
                );
            }
            if let Some(endpoint) = &storage.s3.endpoint
                && endpoint.scheme() == "http"
                && !storage.s3.allow_http
            {
                faults.push(format!("storage.s3.endpoint {endpoint} is plain HTTP: set storage.s3.allow_http = true"));
            }
        }
        if images.signing_key.as_ref().is_some_and(|k| k.expose().len() < 32) {
            faults.push("images.signing_key must be at least 32 characters".to_owned());
        }
        for (name, d) in [
            ("images.retention", images.retention),
            ("images.sweep_interval", images.sweep_interval),
            ("images.download.timeout", images.download.timeout),
        ] {
            if d.is_zero() {
                faults.push(format!("{name} must be greater than zero"));
            }
        }
        if images.download.max_bytes.as_u64() == 0 || images.download.concurrency == 0 {
            faults
                .push("images.download.max_bytes and images.download.concurrency must be greater than zero".to_owned());
        }
        for host in images.download.allowed_hosts.iter().chain(&images.download.private_hosts) {
            if !valid_host_pattern(host) {
                faults.push(format!(
                    "images.download host {host:?} must be a host name (`example.com`, `*.example.com`) or an IP \
                     address, without scheme, port or path"
                ));
            }
        }
    }
}

/// Checks shared by `[upstream]` and every `[upstreams.<name>]`.
fn validate_upstream(at: &str, up: &UpstreamSettings, request_timeout: Option<Duration>, faults: &mut Vec<String>) {
    if up.kind == UpstreamKind::Openai {
        if up.api_key.as_ref().is_none_or(|k| k.expose().trim().is_empty()) {
            if at == "upstream" {
                faults.push(format!(
                    "upstream.api_key is not set: set it in the file or export {ENV_PREFIX}UPSTREAM__API_KEY \
                     ({ENV_OPENAI_API_KEY} also works for https://api.openai.com), or run the offline mock upstream \
                     explicitly with `imagegate serve --mock` / upstream.kind = \"mock\""
                ));
            } else {
                let env = at.replace('.', "__").to_ascii_uppercase();
                faults.push(format!("{at}.api_key is not set: set {ENV_PREFIX}{env}__API_KEY, or kind = \"mock\""));
            }
        }
        if !matches!(up.base_url.scheme(), "http" | "https") {
            faults.push(format!("{at}.base_url must be http or https, got {}", up.base_url));
        }
    }
    for host in &up.image_hosts {
        if !valid_host_pattern(host) {
            faults.push(format!(
                "{at}.image_hosts entry {host:?} must be a host name (`example.com`, `*.example.com`) or an IP \
                 address, without scheme, port or path"
            ));
        }
    }
    for (name, d) in [
        ("connect_timeout", up.connect_timeout),
        ("timeout", up.timeout),
        ("stream_idle_timeout", up.stream_idle_timeout),
    ] {
        if d.is_zero() {
            faults.push(format!("{at}.{name} must be greater than zero"));
        }
    }
    validate_deployment(at, up, faults);
    if let Some(request_timeout) = request_timeout
        && request_timeout <= up.timeout
    {
        faults.push(format!(
            "server.request_timeout ({}s) must exceed {at}.timeout ({}s) so upstream timeouts answer 504 with a \
             clear message",
            request_timeout.as_secs(),
            up.timeout.as_secs()
        ));
    }
}

/// Pools name existing `[upstreams.<name>]` tables, each once, and do not share a name with one (a tenant's
/// `upstream` setting names either).
fn validate_pools(settings: &Settings, faults: &mut Vec<String>) {
    for (name, pool) in &settings.pools {
        if !valid_upstream_name(name) {
            faults.push(format!("pools.{name}: a pool name is 1-64 lowercase letters, digits, '-' or '_'"));
        }
        if settings.upstreams.contains_key(name) {
            faults.push(format!(
                "pools.{name}: [upstreams.{name}] has the same name; a tenant's `upstream` names either, so rename one"
            ));
        }
        if pool.deployments.is_empty() {
            faults.push(format!("pools.{name}.deployments must name at least one [upstreams.<name>] table"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, deployment) in pool.deployments.iter().enumerate() {
            if !settings.upstreams.contains_key(deployment) {
                faults
                    .push(format!("pools.{name}.deployments[{i}]: '{deployment}' is not an [upstreams.<name>] table"));
            } else if !seen.insert(deployment.as_str()) {
                faults.push(format!("pools.{name}.deployments[{i}]: '{deployment}' is listed twice"));
            }
        }
    }
}

/// The pool-member settings of an upstream: weight, capacity, the models it serves, its route.
fn validate_deployment(at: &str, up: &UpstreamSettings, faults: &mut Vec<String>) {
    if up.weight == 0 {
        faults.push(format!("{at}.weight must be at least 1 (leave the deployment out of the pool to stop using it)"));
    }
    for (name, value) in [
        ("requests_per_minute", up.requests_per_minute),
        ("images_per_minute", up.images_per_minute),
        ("max_concurrent", up.max_concurrent),
    ] {
        if value == Some(0) {
            faults.push(format!("{at}.{name} must be at least 1 (leave it out for no limit)"));
        }
    }
    if up.failures_to_trip == 0 {
        faults.push(format!("{at}.failures_to_trip must be at least 1"));
    }
    for (name, d) in [("rest_after_429", up.rest_after_429), ("unhealthy_for", up.unhealthy_for)] {
        if d.is_zero() {
            faults.push(format!("{at}.{name} must be greater than zero"));
        }
    }
    for (model, served) in &up.models {
        if model.trim().is_empty() || served.trim().is_empty() || served.contains(['/', '?', '#']) {
            faults.push(format!(
                "{at}.models: {model:?} = {served:?}: both names must be non-empty, and the served name has no '/', \
                 '?' or '#' (it may be a path segment)"
            ));
        }
    }
    if up.route == UpstreamRoute::AzureDeployment {
        if up.models.is_empty() {
            faults.push(format!(
                "{at}.route = \"azure-deployment\" needs {at}.models: each model with the Azure deployment that \
                 serves it (\"gpt-image-1\" = \"my-deployment\")"
            ));
        }
        if !up.query.contains_key("api-version") {
            faults.push(format!(
                "{at}.route = \"azure-deployment\" needs {at}.query.api-version (e.g. \"2025-04-01-preview\")"
            ));
        }
    }
}

/// A host name, `*.suffix` or IP address, without scheme, port or path.
fn valid_host_pattern(host: &str) -> bool {
    !(host.trim().is_empty() || host.contains('/') || host.contains(':') && !host.starts_with('['))
}

/// Names of `[upstreams.<name>]` tables: also path segments of environment variables, which are lowercased.
fn valid_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

fn validate_tenants(tenants: &[TenantSettings], routes_to: &dyn Fn(&str) -> bool, faults: &mut Vec<String>) {
    let mut names = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for (i, t) in tenants.iter().enumerate() {
        if t.name.trim().is_empty() {
            faults.push(format!("tenants[{i}].name must not be empty"));
        } else if !names.insert(t.name.as_str()) {
            faults.push(format!("tenants[{i}].name {:?} is declared twice", t.name));
        }
        let fields = tenant_fields(t);
        for invalid in crate::domain::rules::check(&fields, routes_to) {
            faults.push(format!("tenants[{i}] ({:?}): {invalid}", t.name));
        }
        for (j, k) in t.keys.iter().enumerate() {
            if !crate::domain::keys::is_valid_key_id(&k.id) {
                faults.push(format!(
                    "tenants[{i}].keys[{j}].id {:?} is not a key id (8 lowercase letters or digits)",
                    k.id
                ));
            } else if !ids.insert(k.id.as_str()) {
                faults.push(format!("tenants[{i}].keys[{j}].id {:?} is used twice", k.id));
            }
            if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                faults.push(format!("tenants[{i}].keys[{j}].sha256 must be 64 hex digits"));
            }
            if let Some(at) = &k.expires_at
                && crate::time::parse_time(at).is_none()
            {
                faults.push(format!(
                    "tenants[{i}].keys[{j}].expires_at {at:?} is not a time: use an RFC 3339 time \
                     (2026-11-01T09:00:00Z, 2026-11-01T10:00:00+01:00), a date (2026-11-01) or Unix milliseconds"
                ));
            }
        }
    }
}

/// The fields of a `[[tenants]]` entry, for the rules every tenant setting must satisfy.
fn tenant_fields(t: &TenantSettings) -> Fields<'_> {
    Fields {
        allowed_models: t.allowed_models.as_deref(),
        limits: Some(&t.limits),
        cache_policy: t.cache.as_ref(),
        image_policy: Some(&t.images),
        organization: t.organization.as_deref(),
        project: t.project.as_deref(),
        metadata: t.metadata.as_ref(),
        upstream: t.upstream.as_deref(),
        names: PolicyNames { cache: "cache", images: "images" },
    }
}

impl ConsoleSettings {
    fn validate(&self, faults: &mut Vec<String>) {
        let path = self.path.as_str();
        let well_formed = path.len() > 1
            && path.starts_with('/')
            && !path.ends_with('/')
            && path.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
            && !path.contains("//");
        if !well_formed {
            faults.push(format!(
                "console.path {path:?} must be an absolute path of letters, digits, '-', '_', '.' and '/', without                  a trailing slash (e.g. \"/console\")"
            ));
        }
        let first = path.split('/').nth(1).unwrap_or_default();
        if ["v1", "admin", "images", "healthz", "readyz", "_mock"].contains(&first) {
            faults.push(format!("console.path {path:?} is taken by the gateway's own routes (/{first})"));
        }
        if self.session_ttl.is_zero() || self.lockout.is_zero() || self.max_failed_sign_ins == 0 {
            faults.push(
                "console.session_ttl, console.lockout and console.max_failed_sign_ins must be greater than zero"
                    .to_owned(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_tenants_name_their_policies_as_the_file_does() {
        let t = TenantSettings {
            images: crate::domain::ImagePolicy {
                retention: Some(Duration::ZERO),
                ..crate::domain::ImagePolicy::default()
            },
            cache: Some(crate::domain::CachePolicy {
                ttl: Some(Duration::ZERO),
                ..crate::domain::CachePolicy::default()
            }),
            ..TenantSettings::default()
        };
        let found: Vec<String> =
            crate::domain::rules::check(&tenant_fields(&t), &|_| true).into_iter().map(|i| i.to_string()).collect();
        assert!(found[0].starts_with("cache.ttl") && found[1].starts_with("images.retention"), "{found:?}");
    }
}
