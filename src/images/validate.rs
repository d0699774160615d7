//! Request validation: every rule of `docs/validation.md`, checked before anything is sent upstream.
//! Refuses with the parameter's name and OpenAI's error codes; never rewrites or clamps a value, and never
//! refuses a parameter it does not know.
//!
//! `reader` reads typed fields from JSON or multipart alike; `files` owns the upload rules.

mod files;
mod reader;

use std::sync::Arc;

pub use self::files::MAX_EDGE;
pub use self::files::Mend;
use self::reader::{Reader, invalid_value, invalid_value_because, missing, out_of_range, unsupported};
use super::models::{self, Catalog, Model, Param};
use super::request::{Endpoint, ImageRequest, RequestBody};
use crate::catalog::{Date, Source, Status};
use crate::config::UnknownModels;
use crate::error::ApiError;

/// Deployment choices that change what is refused.
#[derive(Debug, Clone)]
pub struct ValidationPolicy {
    pub unknown_models: UnknownModels,
    /// Re-hosting is on: models that answer base64 only accept `response_format` (imagegate strips it before
    /// forwarding and answers with links or base64 itself). Off, they refuse it as OpenAI does.
    pub rehost: bool,
    /// The models and their rules.
    pub catalog: Arc<Catalog>,
    /// A file part declared with no type or `application/octet-stream` whose bytes are PNG, JPEG or WebP is
    /// forwarded with the type of its bytes (`validation.mend_file_types`).
    pub mend_file_types: bool,
    /// The built-in catalog's lifecycle dates (OpenAI's) apply: warning headers, and 404 after shutdown.
    /// Dates the operator declares always apply.
    pub builtin_lifecycle: bool,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        Self {
            unknown_models: UnknownModels::default(),
            rehost: false,
            catalog: Catalog::builtin(),
            mend_file_types: true,
            builtin_lifecycle: false,
        }
    }
}

impl ValidationPolicy {
    /// Whether `m`'s lifecycle dates apply here.
    pub fn lifecycle_applies(&self, m: &Model) -> bool {
        m.lifecycle_source == Source::Config || self.builtin_lifecycle
    }

    /// The model a request of `tenant` runs on after aliases, and the catalog entry, without checking
    /// anything else.
    pub fn effective_model(&self, request: &ImageRequest, tenant: Option<&str>) -> Option<Arc<Model>> {
        let named = request.field_str("model")?;
        let id = self.catalog.alias_for(tenant, &named).unwrap_or(&named);
        self.catalog.get(id).cloned()
    }

    /// The warning headers (`Deprecation`, `Sunset`, `Link`) for a call of `request` by `tenant` on `today`.
    pub fn notice(&self, request: &ImageRequest, tenant: Option<&str>, today: Date) -> Vec<(&'static str, String)> {
        match self.effective_model(request, tenant) {
            Some(m) if self.lifecycle_applies(&m) => m.lifecycle.headers(today),
            _ => Vec::new(),
        }
    }
}

/// What validation learnt about a request that passed, for the later pipeline stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// The model asked for, or the one OpenAI picks when none is named: the endpoint's default, or (a
    /// generation without a model that uses a parameter its default model does not take) the catalog's
    /// `implied_by_parameters`. The body still names no model.
    pub model: String,
    /// The catalog's entry; `None` for models imagegate does not know (forwarded with generic checks).
    pub known: Option<Arc<Model>>,
    /// The model the caller named when an alias moved it to `model` (which is what the upstream sees).
    pub requested: Option<String>,
    pub n: u32,
    pub stream: bool,
    /// File parts forwarded with the type of their bytes.
    pub mend: Vec<Mend>,
}

/// The request to send upstream after validation: the model an alias names, file types mended from bytes.
/// Unchanged (the caller's bytes) when neither applies.
pub fn prepare(request: ImageRequest, validated: &Validated) -> ImageRequest {
    let request = match &validated.requested {
        Some(_) => request.with_field("model", Some(&validated.model)),
        None => request,
    };
    request.with_part_types(&validated.mend)
}

const STRING_FIELDS: &[&str] = &[
    "size",
    "quality",
    "style",
    "response_format",
    "background",
    "moderation",
    "output_format",
    "input_fidelity",
    "user",
];
/// Integer fields besides `n` (which has rules of its own).
pub(crate) const INTEGER_FIELDS: &[&str] = &["output_compression", "partial_images"];
/// The order parameters are checked in (so that a request with several faults hears about the same one
/// every time); parameters of the catalog not listed here follow in alphabetical order.
const CHECK_ORDER: &[&str] = &[
    "quality",
    "style",
    "response_format",
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "partial_images",
    "stream",
    "input_fidelity",
];
/// The largest `n` any model is held to before its own rule: OpenAI's schema maximum.
const N_MAX: i64 = 10;

/// A rule between a parameter and others (or the model's defaults), checked with the parameter's own.
type RuleBetween = fn(&Reader<'_>, &Model) -> Result<(), ApiError>;

/// Check `request` against the generic rules and, for models of the catalog, the model's rules.
pub fn validate(request: &ImageRequest, policy: &ValidationPolicy) -> Result<Validated, ApiError> {
    validate_for(request, policy, None)
}

/// [`validate`] for a request of `tenant` (by name), whose own aliases (`[models.tenant_aliases]`) apply first.
#[tracing::instrument(name = "validate", level = "debug", skip_all)]
pub fn validate_for(
    request: &ImageRequest,
    policy: &ValidationPolicy,
    tenant: Option<&str>,
) -> Result<Validated, ApiError> {
    let reader = Reader::new(request);
    let endpoint = request.endpoint;
    let catalog = &policy.catalog;
    let (model, requested) = match reader.string("model")? {
        Some(named) => match catalog.alias_for(tenant, named) {
            Some(to) => (to.to_owned(), Some(named.to_owned())),
            None => (named.to_owned(), None),
        },
        None => (implied_model(&reader, endpoint, catalog)?, None),
    };
    let known = catalog.get(&model).cloned();
    if let Some(m) = &known
        && policy.lifecycle_applies(m)
        && m.lifecycle.status(Date::today()) == Status::ShutDown
    {
        return Err(ApiError::ModelNotFound { model });
    }
    if known.is_none() && policy.unknown_models == UnknownModels::Reject {
        let ids: Vec<&str> = catalog.ids().collect();
        return Err(invalid_value("model", &model, &ids));
    }
    let json_edit = endpoint == Endpoint::Edits && matches!(request.body, RequestBody::Json { .. });
    if let Some(m) = &known {
        check_endpoint(m, endpoint, json_edit)?;
    }
    let (n, stream) = generic(&reader, endpoint, known.as_deref())?;
    if let Some(m) = &known {
        per_model(&reader, m, policy)?;
    }
    let mut mend = Vec::new();
    if json_edit {
        files::check_json_refs(&reader, known.as_deref())?;
    } else if endpoint != Endpoint::Generations {
        mend = files::check_form(&reader, endpoint, known.as_deref(), &model, policy.mend_file_types)?;
    }
    Ok(Validated { model, known, requested, n, stream, mend })
}

/// The model a request naming none runs on. OpenAI: generations default to dall-e-2 "unless a parameter
/// specific to the GPT image models is used": a parameter the implied model takes and the default does not,
/// given a value (`null` is not a value; nor is `false`, as `stream: false`, which every model takes).
fn implied_model(reader: &Reader<'_>, endpoint: Endpoint, catalog: &Catalog) -> Result<String, ApiError> {
    let default = endpoint.default_model();
    if endpoint == Endpoint::Generations
        && let Some(implied) = catalog.implied_by_parameters()
    {
        let default_takes = |name: &str| catalog.get(default).is_some_and(|m| m.param(name).is_some());
        for name in implied.params.keys().filter(|n| implied.param(n).is_some() && !default_takes(n)) {
            if uses(reader, name)? {
                return Ok(implied.id.clone());
            }
        }
    }
    Ok(default.to_owned())
}

/// The field is given a value that asks for something: not `null`, not `false`.
fn uses(reader: &Reader<'_>, name: &str) -> Result<bool, ApiError> {
    if !reader.present(name) {
        return Ok(false);
    }
    Ok(reader.boolean(name).ok().flatten() != Some(false))
}

fn check_endpoint(m: &Model, endpoint: Endpoint, json_edit: bool) -> Result<(), ApiError> {
    if !models::serves(m, endpoint) && m.enforces("endpoints") {
        return Err(invalid_value_because("model", &m.id, &format!("this model does not support {}", endpoint.name())));
    }
    if json_edit && !m.json_edits && m.enforces("json_edits") {
        return Err(invalid_value_because(
            "model",
            &m.id,
            "the JSON edit body is for GPT image models; send multipart/form-data instead",
        ));
    }
    Ok(())
}

/// Checks that hold for every model, known or not. Returns `n` and `stream`.
fn generic(reader: &Reader<'_>, endpoint: Endpoint, known: Option<&Model>) -> Result<(u32, bool), ApiError> {
    if endpoint != Endpoint::Variations {
        match reader.string("prompt")? {
            None => return Err(missing("prompt")),
            Some("") => {
                return Err(ApiError::invalid_code(
                    "Invalid 'prompt': string too short. Expected a string with minimum length 1, but got an empty \
                     string instead.",
                    Some("prompt"),
                    "string_below_min_length",
                ));
            }
            Some(_) => {}
        }
    }
    let n = reader.integer("n")?.unwrap_or(1);
    if let Some(e) = out_of_range("n", n, 1, known.map_or(N_MAX, |m| m.n_max.max(N_MAX))) {
        return Err(e);
    }
    let stream = reader.boolean("stream")?.unwrap_or(false);
    for name in STRING_FIELDS {
        reader.string(name)?;
    }
    for name in INTEGER_FIELDS {
        reader.integer(name)?;
    }
    Ok((u32::try_from(n).unwrap_or(1), stream))
}

/// The model's rules from the catalog, each only as far as it is sure (see `catalog::Sure`).
fn per_model(reader: &Reader<'_>, m: &Model, policy: &ValidationPolicy) -> Result<(), ApiError> {
    if let Some(prompt) = reader.string("prompt")?
        && m.enforces("prompt_max")
    {
        let len = prompt.chars().count();
        if len > m.prompt_max {
            return Err(ApiError::invalid_code(
                format!(
                    "Invalid 'prompt': string too long. Expected a string with maximum length {}, but got a string \
                     with length {len} instead.",
                    m.prompt_max
                ),
                Some("prompt"),
                "string_above_max_length",
            ));
        }
    }
    if let Some(n) = reader.integer("n")?
        && m.enforces("n_max")
        && let Some(e) = out_of_range("n", n, 1, m.n_max)
    {
        return Err(e);
    }
    if let Some(size) = reader.string("size")? {
        check_size(m, size)?;
    }
    let rest = policy.catalog.params().filter(|n| !CHECK_ORDER.contains(n));
    for name in CHECK_ORDER.iter().copied().chain(rest) {
        if name == "response_format" && m.answers_base64_only() {
            response_format_of_base64_model(reader, policy.rehost)?;
            continue;
        }
        // A parameter the request leaves out (or sends as null) passes its own rule whatever the rule is, so
        // the rule is looked up only for the parameters sent: most requests send a few of the catalog's
        // fifteen or so. A rule between parameters runs either way: it reads the model's defaults.
        let present = reader.present(name);
        let between: Option<RuleBetween> = match name {
            "output_format" => Some(transparency_needs_alpha),
            "output_compression" => Some(png_is_lossless),
            _ => None,
        };
        if !(present || between.is_some()) || !m.enforces_param(name) {
            continue;
        }
        if present {
            match m.param(name) {
                Some(Param::Values(allowed)) => {
                    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
                    one_of(reader, name, &allowed)?;
                }
                Some(Param::Range { min, max }) => {
                    if let Some(v) = reader.integer(name)?
                        && let Some(e) = out_of_range(name, v, *min, *max)
                    {
                        return Err(e);
                    }
                }
                Some(Param::Taken(_)) => {}
                None if policy.catalog.knows_param(name) && uses(reader, name)? => {
                    return Err(unsupported(name, &m.id));
                }
                None => {}
            }
        }
        if let Some(rule) = between {
            rule(reader, m)?;
        }
    }
    Ok(())
}

fn check_size(m: &Model, size: &str) -> Result<(), ApiError> {
    if m.sizes.iter().any(|s| s == size) {
        return Ok(());
    }
    if let Some(free) = &m.free_sizes {
        if !m.enforces("free_sizes") {
            return Ok(());
        }
        return free.check(size).map_err(|reason| invalid_value_because("size", size, &reason));
    }
    if m.sizes.is_empty() || !m.enforces("sizes") {
        return Ok(());
    }
    let listed: Vec<&str> = m.sizes.iter().map(String::as_str).collect();
    Err(invalid_value("size", size, &listed))
}

/// `response_format` for a model that answers base64 only: imagegate's own formats when it re-hosts, else
/// what OpenAI itself answers.
fn response_format_of_base64_model(reader: &Reader<'_>, rehost: bool) -> Result<(), ApiError> {
    if rehost {
        one_of(reader, "response_format", &["url", "b64_json"])?;
        if reader.string("response_format")? == Some("url") && reader.boolean("stream")? == Some(true) {
            return Err(ApiError::invalid_code(
                "Invalid value for 'response_format': 'url' cannot be combined with stream=true; streamed events \
                 carry base64 image data. Leave response_format out or set it to 'b64_json'.",
                Some("response_format"),
                "invalid_value",
            ));
        }
    } else if reader.present("response_format") {
        return Err(ApiError::invalid_code(
            "Unknown parameter: 'response_format'.",
            Some("response_format"),
            "unknown_parameter",
        ));
    }
    Ok(())
}

/// The output format asked for, or the model's default (`png` when it has none).
fn output_format<'a>(reader: &Reader<'a>, m: &'a Model) -> Result<&'a str, ApiError> {
    let default = m.defaults.get("output_format").and_then(|v| v.as_str()).unwrap_or("png");
    Ok(reader.string("output_format")?.unwrap_or(default))
}

/// A transparent background needs a format with alpha (documented: `png` or `webp`).
fn transparency_needs_alpha(reader: &Reader<'_>, m: &Model) -> Result<(), ApiError> {
    if m.param("background").is_none() || !m.enforces("rules.transparent_needs_alpha") {
        return Ok(());
    }
    if reader.string("background")? == Some("transparent") && output_format(reader, m)? == "jpeg" {
        return Err(invalid_value_because("background", "transparent", "needs output_format 'png' or 'webp'"));
    }
    Ok(())
}

/// PNG is lossless: it is always written at 100, the default, which OpenAI's own example sends with
/// output_format 'png'. Anything less would be silently ignored, so it is refused.
fn png_is_lossless(reader: &Reader<'_>, m: &Model) -> Result<(), ApiError> {
    if m.param("output_compression").is_none() || !m.enforces("rules.png_is_lossless") {
        return Ok(());
    }
    if let Some(c) = reader.integer("output_compression")?
        && output_format(reader, m)? == "png"
        && c != 100
    {
        return Err(ApiError::invalid_code(
            format!(
                "Invalid value for 'output_compression': {c} is not supported with output_format 'png' (the \
                 output format when none is given), which is lossless and always 100. Use output_format \
                 'jpeg' or 'webp' to compress, or leave output_compression out."
            ),
            Some("output_compression"),
            "invalid_value",
        ));
    }
    Ok(())
}

fn one_of(reader: &Reader<'_>, name: &str, allowed: &[&str]) -> Result<(), ApiError> {
    match reader.string(name)? {
        Some(v) if !allowed.contains(&v) => Err(invalid_value(name, v, allowed)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;

    fn check(body: serde_json::Value) -> Result<Validated, ApiError> {
        let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_string())).unwrap();
        validate(&req, &ValidationPolicy::default())
    }

    fn param_of(body: serde_json::Value) -> (Option<String>, Option<&'static str>) {
        let e = check(body).unwrap_err();
        (e.param().map(str::to_owned), e.code())
    }

    #[test]
    fn defaults_and_nulls_pass() {
        let v = check(json!({"prompt": "x", "model": null, "n": null, "size": null, "quality": null})).unwrap();
        assert_eq!((v.model.as_str(), v.known.map(|m| m.id.clone()), v.n), ("dall-e-2", Some("dall-e-2".into()), 1));
    }

    #[test]
    fn per_model_rules_name_the_parameter() {
        let cases = [
            (json!({"prompt": "x", "model": "dall-e-3", "n": 2}), "n", "integer_above_max_value"),
            (json!({"prompt": "x", "model": "gpt-image-1", "size": "512x512"}), "size", "invalid_value"),
            (json!({"prompt": "x", "model": "gpt-image-1", "style": "vivid"}), "style", "unsupported_parameter"),
            (
                json!({"prompt": "x", "model": "gpt-image-1", "response_format": "url"}),
                "response_format",
                "unknown_parameter",
            ),
            (
                json!({"prompt": "x", "model": "dall-e-2", "background": "opaque"}),
                "background",
                "unsupported_parameter",
            ),
            (json!({"prompt": "x", "model": "dall-e-2", "stream": true}), "stream", "unsupported_parameter"),
            (
                json!({"prompt": "x", "model": "gpt-image-1", "output_compression": 50}),
                "output_compression",
                "invalid_value",
            ),
            (
                json!({"prompt": "x", "model": "gpt-image-1", "partial_images": 4}),
                "partial_images",
                "integer_above_max_value",
            ),
            (json!({"prompt": "x", "model": "gpt-image-2", "size": "1000x1000"}), "size", "invalid_value"),
            (json!({"prompt": "x", "n": "2"}), "n", "invalid_type"),
            (json!({"prompt": ""}), "prompt", "string_below_min_length"),
            (json!({"model": "dall-e-2"}), "prompt", "missing_required_parameter"),
            (json!({"prompt": "é".repeat(1001)}), "prompt", "string_above_max_length"),
        ];
        for (body, param, code) in cases {
            assert_eq!(param_of(body.clone()), (Some(param.to_owned()), Some(code)), "{body}");
        }
    }

    #[test]
    fn a_generation_without_a_model_using_a_gpt_parameter_gets_gpt_rules() {
        for body in [
            json!({"prompt": "x", "output_format": "webp"}),
            json!({"prompt": "x", "model": null, "background": "transparent"}),
            json!({"prompt": "x", "stream": true, "partial_images": 2}),
            json!({"prompt": "x", "moderation": "low", "size": "1536x1024", "quality": "high"}),
        ] {
            let v = check(body.clone()).unwrap_or_else(|e| panic!("{body}: {}", e.client_message()));
            assert_eq!(
                (v.model.as_str(), v.known.map(|m| m.id.clone())),
                ("gpt-image-1", Some("gpt-image-1".into())),
                "{body}"
            );
        }
        // Still dall-e-2 without one (stream: false and nulls are not GPT parameters).
        let v = check(json!({"prompt": "x", "stream": false, "output_format": null})).unwrap();
        assert_eq!(v.model, "dall-e-2");
        // The GPT rules apply: DALL·E-only values are refused.
        assert_eq!(
            param_of(json!({"prompt": "x", "output_format": "png", "style": "vivid"})),
            (Some("style".into()), Some("unsupported_parameter"))
        );
        assert_eq!(
            param_of(json!({"prompt": "x", "output_format": "png", "size": "256x256"})),
            (Some("size".into()), Some("invalid_value"))
        );
    }

    #[test]
    fn png_takes_only_the_default_compression() {
        assert!(
            check(json!({"prompt": "x", "model": "gpt-image-1", "output_format": "png", "output_compression": 100}))
                .is_ok()
        );
        assert!(check(json!({"prompt": "x", "model": "gpt-image-1", "output_compression": 100})).is_ok());
        assert_eq!(
            param_of(json!({"prompt": "x", "model": "gpt-image-1", "output_format": "png", "output_compression": 99})),
            (Some("output_compression".into()), Some("invalid_value"))
        );
    }

    #[test]
    fn input_fidelity_is_checked_on_every_endpoint() {
        assert_eq!(
            param_of(json!({"prompt": "x", "model": "gpt-image-1", "input_fidelity": "bogus"})),
            (Some("input_fidelity".into()), Some("invalid_value"))
        );
        assert_eq!(
            param_of(json!({"prompt": "x", "model": "gpt-image-2", "input_fidelity": "high"})),
            (Some("input_fidelity".into()), Some("unsupported_parameter"))
        );
        assert!(check(json!({"prompt": "x", "model": "gpt-image-1.5", "input_fidelity": "low"})).is_ok());
    }

    #[test]
    fn prompt_length_counts_characters_not_bytes() {
        assert!(check(json!({"prompt": "é".repeat(1000), "model": "dall-e-2"})).is_ok());
    }

    #[test]
    fn unknown_models_are_forwarded_or_rejected_by_policy() {
        let body = json!({"prompt": "x", "model": "flux-pro", "size": "999x999", "whatever": 1});
        assert!(check(body.clone()).is_ok());
        let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_string())).unwrap();
        let e =
            validate(&req, &ValidationPolicy { unknown_models: UnknownModels::Reject, ..ValidationPolicy::default() })
                .unwrap_err();
        assert_eq!((e.param(), e.code()), (Some("model"), Some("invalid_value")));
    }
}
