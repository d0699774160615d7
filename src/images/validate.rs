//! Request validation: every rule of `docs/validation.md`, checked before anything is sent upstream.
//! Refuses with the parameter's name and OpenAI's error codes; never rewrites or clamps a value, and never
//! refuses a parameter it does not know.
//!
//! `reader` reads typed fields from JSON or multipart alike; `files` owns the upload rules.

mod files;
mod reader;

pub use self::files::MAX_EDGE;
use self::reader::{Reader, invalid_value, invalid_value_because, missing, out_of_range, unsupported};
use super::models::{self, Family, Model};
use super::request::{Endpoint, ImageRequest, RequestBody};
use crate::config::UnknownModels;
use crate::error::ApiError;

/// Deployment choices that change what is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValidationPolicy {
    pub unknown_models: UnknownModels,
    /// Re-hosting is on: GPT image models accept `response_format` (imagegate strips it before forwarding
    /// and answers with links or base64 itself). Off, they refuse it as OpenAI does.
    pub rehost: bool,
}

/// What validation learnt about a request that passed, for the later pipeline stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The model asked for, or the one OpenAI picks when none is named: the endpoint's default, or (a
    /// generation without a model that uses a GPT image parameter) [`IMPLIED_GPT_MODEL`]. The body still
    /// names no model.
    pub model: String,
    /// `None` for models imagegate does not know (forwarded with generic checks).
    pub family: Option<Family>,
    pub n: u32,
    pub stream: bool,
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
const GPT_ONLY: &[&str] = &["background", "moderation", "output_format", "output_compression", "partial_images"];

/// The model a generation naming none runs on when it uses a parameter only GPT image models take. OpenAI's
/// spec says only "a GPT image model"; its earlier wording named gpt-image-1 ("unless a gpt-image-1-specific
/// parameter is used"), whose rules (and price) are checked and recorded. The body is forwarded as sent.
pub const IMPLIED_GPT_MODEL: &str = "gpt-image-1";

/// Check `request` against the generic rules and, for known models, the model's rules.
#[tracing::instrument(name = "validate", level = "debug", skip_all)]
pub fn validate(request: &ImageRequest, policy: &ValidationPolicy) -> Result<Validated, ApiError> {
    let reader = Reader::new(request);
    let endpoint = request.endpoint;
    let model = match reader.string("model")? {
        Some(model) => model,
        None if endpoint == Endpoint::Generations && uses_gpt_only_parameter(&reader)? => IMPLIED_GPT_MODEL,
        None => endpoint.default_model(),
    }
    .to_owned();
    let known = models::lookup(&model);
    if known.is_none() && policy.unknown_models == UnknownModels::Reject {
        let ids: Vec<&str> = models::known_ids().collect();
        return Err(invalid_value("model", &model, &ids));
    }
    let json_edit = endpoint == Endpoint::Edits && matches!(request.body, RequestBody::Json { .. });
    if let Some(m) = known {
        check_endpoint(m, endpoint, json_edit)?;
    }
    let (n, stream) = generic(&reader, endpoint)?;
    if let Some(m) = known {
        per_model(&reader, m, policy)?;
    }
    let family = known.map(|m| m.family);
    if json_edit {
        files::check_json_refs(&reader, family)?;
    } else if endpoint != Endpoint::Generations {
        files::check_form(&reader, endpoint, family, &model)?;
    }
    Ok(Validated { model, family, n, stream })
}

/// OpenAI: generations default to dall-e-2 "unless a parameter specific to the GPT image models is used".
/// Those are the parameters only GPT image models take, given a value (`null` is not a value; nor is
/// `stream: false`, which every model takes).
fn uses_gpt_only_parameter(reader: &Reader<'_>) -> Result<bool, ApiError> {
    let gpt_only = GPT_ONLY.iter().chain(&["input_fidelity"]).any(|name| reader.present(name));
    Ok(gpt_only || reader.boolean("stream")? == Some(true))
}

fn check_endpoint(m: &Model, endpoint: Endpoint, json_edit: bool) -> Result<(), ApiError> {
    if !m.family.serves(endpoint) {
        return Err(invalid_value_because("model", m.id, &format!("this model does not support {}", endpoint.name())));
    }
    if json_edit && !m.family.is_gpt() {
        return Err(invalid_value_because(
            "model",
            m.id,
            "the JSON edit body is for GPT image models; send multipart/form-data instead",
        ));
    }
    Ok(())
}

/// Checks that hold for every model, known or not. Returns `n` and `stream`.
fn generic(reader: &Reader<'_>, endpoint: Endpoint) -> Result<(u32, bool), ApiError> {
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
    if let Some(e) = out_of_range("n", n, 1, 10) {
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

/// The per-model table of `docs/validation.md`.
fn per_model(reader: &Reader<'_>, m: &Model, policy: &ValidationPolicy) -> Result<(), ApiError> {
    let family = m.family;
    if let Some(prompt) = reader.string("prompt")? {
        let len = prompt.chars().count();
        if len > family.prompt_max() {
            return Err(ApiError::invalid_code(
                format!(
                    "Invalid 'prompt': string too long. Expected a string with maximum length {}, but got a string \
                     with length {len} instead.",
                    family.prompt_max()
                ),
                Some("prompt"),
                "string_above_max_length",
            ));
        }
    }
    if let Some(n) = reader.integer("n")?
        && let Some(e) = out_of_range("n", n, 1, family.n_max())
    {
        return Err(e);
    }
    if let Some(size) = reader.string("size")? {
        check_size(family, size)?;
    }
    one_of(reader, "quality", family.qualities())?;
    match family {
        Family::DallE3 => one_of(reader, "style", &["vivid", "natural"])?,
        _ if reader.present("style") => return Err(unsupported("style", m.id)),
        _ => {}
    }
    if family.is_gpt() { gpt_rules(reader, m, policy.rehost) } else { dalle_rules(reader, m) }
}

fn check_size(family: Family, size: &str) -> Result<(), ApiError> {
    if family.sizes().contains(&size) {
        return Ok(());
    }
    if family == Family::GptImage2 {
        return models::free_size_ok(size).map_err(|reason| invalid_value_because("size", size, reason));
    }
    Err(invalid_value("size", size, family.sizes()))
}

fn dalle_rules(reader: &Reader<'_>, m: &Model) -> Result<(), ApiError> {
    one_of(reader, "response_format", &["url", "b64_json"])?;
    if let Some(name) = GPT_ONLY.iter().find(|name| reader.present(name)) {
        return Err(unsupported(name, m.id));
    }
    if reader.boolean("stream")? == Some(true) {
        return Err(unsupported("stream", m.id));
    }
    if reader.present("input_fidelity") {
        return Err(unsupported("input_fidelity", m.id));
    }
    Ok(())
}

fn gpt_rules(reader: &Reader<'_>, m: &Model, rehost: bool) -> Result<(), ApiError> {
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
        // What OpenAI itself answers for GPT image models.
        return Err(ApiError::invalid_code(
            "Unknown parameter: 'response_format'.",
            Some("response_format"),
            "unknown_parameter",
        ));
    }
    one_of(reader, "background", &["transparent", "opaque", "auto"])?;
    one_of(reader, "moderation", &["low", "auto"])?;
    one_of(reader, "output_format", &["png", "jpeg", "webp"])?;
    let format = reader.string("output_format")?.unwrap_or("png");
    if reader.string("background")? == Some("transparent") && format == "jpeg" {
        return Err(invalid_value_because("background", "transparent", "needs output_format 'png' or 'webp'"));
    }
    if let Some(c) = reader.integer("output_compression")? {
        if let Some(e) = out_of_range("output_compression", c, 0, 100) {
            return Err(e);
        }
        // PNG is lossless: it is always written at 100, the default, which OpenAI's own example sends with
        // output_format 'png'. Anything less would be silently ignored, so it is refused.
        if format == "png" && c != 100 {
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
    }
    if let Some(p) = reader.integer("partial_images")?
        && let Some(e) = out_of_range("partial_images", p, 0, 3)
    {
        return Err(e);
    }
    // On every endpoint: OpenAI documents it for edits, and a generation carrying it is forwarded (unknown
    // to the generation schema, it is the upstream's to judge) but only with a value and model it can mean.
    if reader.present("input_fidelity") {
        if !m.input_fidelity {
            return Err(unsupported("input_fidelity", m.id));
        }
        one_of(reader, "input_fidelity", &["high", "low"])?;
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
        assert_eq!((v.model.as_str(), v.family, v.n), ("dall-e-2", Some(Family::DallE2), 1));
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
            assert_eq!((v.model.as_str(), v.family), (IMPLIED_GPT_MODEL, Some(Family::GptImage)), "{body}");
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
        let e = validate(&req, &ValidationPolicy { unknown_models: UnknownModels::Reject, rehost: false }).unwrap_err();
        assert_eq!((e.param(), e.code()), (Some("model"), Some("invalid_value")));
    }
}
