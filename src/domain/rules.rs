//! The rules a tenant's settings must satisfy, wherever they come from: the admin API, the CLI and the
//! configuration's `[[tenants]]` all go through [`check`], so a value refused in one place is refused in
//! every place, with the same words. Each fault names its field (`limits.requests_per_minute`).

use serde_json::Value;

use super::MAX_MODEL_CHARS;
use super::limits::Limits;
use super::policy::{CachePolicy, ImagePolicy};

/// The longest organization or project id accepted (they are sent as HTTP headers).
const MAX_ATTRIBUTION_CHARS: usize = 256;

/// One refused value: which field, and why (a phrase that reads after the field name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct Invalid {
    /// Dotted path of the field, e.g. `limits.requests_burst`.
    pub field: String,
    /// e.g. `must be at least 1`.
    pub reason: String,
}

impl Invalid {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

/// The settings to check; `None` = not being set (absent from a patch).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields<'a> {
    pub allowed_models: Option<&'a [String]>,
    pub limits: Option<&'a Limits>,
    pub cache_policy: Option<&'a CachePolicy>,
    pub image_policy: Option<&'a ImagePolicy>,
    pub organization: Option<&'a str>,
    pub project: Option<&'a str>,
    pub metadata: Option<&'a Value>,
    pub upstream: Option<&'a str>,
    /// What the policies are called where these fields come from: `cache_policy` / `image_policy` in the
    /// admin API and CLI, `cache` / `images` in `[[tenants]]`.
    pub names: PolicyNames,
}

/// The field names of the two policies.
#[derive(Debug, Clone, Copy)]
pub struct PolicyNames {
    pub cache: &'static str,
    pub images: &'static str,
}

impl Default for PolicyNames {
    fn default() -> Self {
        Self { cache: "cache_policy", images: "image_policy" }
    }
}

/// Every fault in `fields`, in field order; empty when all is well. `upstream_exists` says whether an
/// `[upstreams.<name>]` table of that name is configured.
pub fn check(fields: &Fields<'_>, upstream_exists: &dyn Fn(&str) -> bool) -> Vec<Invalid> {
    let mut faults = Vec::new();
    if let Some(models) = fields.allowed_models {
        check_models(models, &mut faults);
    }
    if let Some(limits) = fields.limits {
        check_limits(limits, &mut faults);
    }
    if let Some(policy) = fields.cache_policy
        && policy.ttl.is_some_and(|ttl| ttl.is_zero())
    {
        faults.push(Invalid::new(
            format!("{}.ttl", fields.names.cache),
            "must be greater than zero (to stop caching, set enabled = false)",
        ));
    }
    if let Some(policy) = fields.image_policy
        && policy.retention.is_some_and(|r| r.is_zero())
    {
        faults.push(Invalid::new(
            format!("{}.retention", fields.names.images),
            "must be greater than zero (links would expire as they are made)",
        ));
    }
    for (field, value) in [("organization", fields.organization), ("project", fields.project)] {
        if let Some(value) = value {
            check_attribution(field, value, &mut faults);
        }
    }
    if let Some(metadata) = fields.metadata
        && !metadata.is_object()
    {
        faults.push(Invalid::new("metadata", "must be a JSON object (use {} for none)"));
    }
    if let Some(name) = fields.upstream
        && !upstream_exists(name)
    {
        faults.push(Invalid::new(
            "upstream",
            format!("'{name}' is not a configured upstream: name an [upstreams.<name>] table or a [pools.<name>] pool, or leave it out for the default"),
        ));
    }
    faults
}

fn check_models(models: &[String], faults: &mut Vec<Invalid>) {
    for (i, model) in models.iter().enumerate() {
        if model.trim().is_empty() {
            faults.push(Invalid::new(format!("allowed_models[{i}]"), "must not be empty"));
        } else if model.chars().any(char::is_control) || model.chars().count() > MAX_MODEL_CHARS {
            faults.push(Invalid::new(
                format!("allowed_models[{i}]"),
                format!("must be a model id of at most {MAX_MODEL_CHARS} characters, without control characters"),
            ));
        }
    }
}

fn check_limits(l: &Limits, faults: &mut Vec<Invalid>) {
    for (name, value) in [
        ("requests_per_minute", l.requests_per_minute),
        ("images_per_minute", l.images_per_minute),
        ("requests_burst", l.requests_burst),
        ("images_burst", l.images_burst),
        ("concurrent_requests", l.concurrent_requests),
    ] {
        if value == Some(0) {
            faults.push(Invalid::new(
                format!("limits.{name}"),
                "must be at least 1 (leave it out for no limit; to stop a tenant, suspend it)",
            ));
        }
    }
    for (burst, rate, b, r) in [
        ("requests_burst", "requests_per_minute", l.requests_burst, l.requests_per_minute),
        ("images_burst", "images_per_minute", l.images_burst, l.images_per_minute),
    ] {
        if let (Some(b), Some(r)) = (b, r)
            && b > r
        {
            faults.push(Invalid::new(format!("limits.{burst}"), format!("({b}) must not exceed limits.{rate} ({r})")));
        }
    }
    for (name, value) in [("usd_per_day", l.usd_per_day), ("usd_per_month", l.usd_per_month)] {
        if let Some(usd) = value
            && !(usd.is_finite() && usd >= 0.0)
        {
            faults.push(Invalid::new(format!("limits.{name}"), "must be a number of US dollars, zero or more"));
        }
    }
}

fn check_attribution(field: &str, value: &str, faults: &mut Vec<Invalid>) {
    if value.trim().is_empty() {
        faults.push(Invalid::new(field, "must not be empty (leave it out, or null, to send none)"));
    } else if value.chars().any(char::is_control) || value.chars().count() > MAX_ATTRIBUTION_CHARS {
        faults.push(Invalid::new(
            field,
            format!("must be at most {MAX_ATTRIBUTION_CHARS} characters, without control characters"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn faults(fields: &Fields<'_>) -> Vec<String> {
        check(fields, &|name| name == "azure").into_iter().map(|i| i.to_string()).collect()
    }

    #[test]
    fn sound_values_pass() {
        let limits = Limits {
            requests_per_minute: Some(60),
            requests_burst: Some(60),
            images_per_minute: Some(10),
            images_burst: Some(4),
            usd_per_day: Some(0.0),
            usd_per_month: Some(500.0),
            ..Limits::default()
        };
        let metadata = serde_json::json!({"owner": "design"});
        let models = ["gpt-image-1".to_owned()];
        let fields = Fields {
            allowed_models: Some(&models),
            limits: Some(&limits),
            organization: Some("org-1"),
            metadata: Some(&metadata),
            upstream: Some("azure"),
            ..Fields::default()
        };
        assert_eq!(faults(&fields), Vec::<String>::new());
    }

    #[test]
    fn each_bad_value_is_named() {
        let limits = Limits {
            requests_per_minute: Some(0),
            images_per_minute: Some(5),
            images_burst: Some(6),
            usd_per_day: Some(-1.0),
            usd_per_month: Some(f64::NAN),
            ..Limits::default()
        };
        let images = ImagePolicy { retention: Some(Duration::ZERO), ..ImagePolicy::default() };
        let cache = CachePolicy { ttl: Some(Duration::ZERO), ..CachePolicy::default() };
        let metadata = serde_json::json!(["not", "an", "object"]);
        let models = ["gpt-image-1".to_owned(), " ".to_owned()];
        let fields = Fields {
            allowed_models: Some(&models),
            limits: Some(&limits),
            cache_policy: Some(&cache),
            image_policy: Some(&images),
            organization: Some(""),
            project: Some("p\nX-Injected: 1"),
            metadata: Some(&metadata),
            upstream: Some("nowhere"),
            names: PolicyNames::default(),
        };
        let found = faults(&fields);
        for field in [
            "allowed_models[1] ",
            "limits.requests_per_minute ",
            "limits.images_burst (6) must not exceed limits.images_per_minute (5)",
            "limits.usd_per_day ",
            "limits.usd_per_month ",
            "cache_policy.ttl ",
            "image_policy.retention ",
            "organization ",
            "project ",
            "metadata ",
            "upstream 'nowhere'",
        ] {
            assert!(found.iter().any(|f| f.starts_with(field)), "nothing starts with {field:?}: {found:#?}");
        }
        assert_eq!(found.len(), 11, "{found:#?}");
    }
}
