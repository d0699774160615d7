//! The cache key: SHA-256 over the scope (a tenant, or `shared`), the endpoint, the model, the format the caller
//! gets, and the request in canonical form: JSON fields with `null` dropped, the model's defaults filled in and
//! keys sorted (recursively); multipart text fields the same way, and every file part's bytes in order. Two
//! requests that OpenAI would treat alike get one key; any other difference (a parameter, a file byte, a
//! field unknown to imagegate) gets another.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::images::models::Family;
use crate::images::request::{ImageRequest, RequestBody, is_image_field};
use crate::rehost::ResponseFormat;

/// A cache key.
pub type Key = [u8; 32];

/// What the key covers besides the request body.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// The tenant id, or `shared` for the opt-in cross-tenant scope.
    pub scope: &'a str,
    pub model: &'a str,
    pub family: Option<Family>,
    /// The format the caller gets (re-hosting may turn base64 into links).
    pub want: Option<ResponseFormat>,
}

/// The key of `request` (as it will be sent upstream).
pub fn key(parts: KeyParts<'_>, request: &ImageRequest) -> Key {
    let mut hasher = Sha256::new();
    let mut put = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    put(b"imagegate-cache-v1");
    put(parts.scope.as_bytes());
    put(request.endpoint.name().as_bytes());
    put(parts.model.as_bytes());
    put(match parts.want {
        Some(ResponseFormat::Url) => b"url",
        Some(ResponseFormat::B64Json) => b"b64_json",
        None => b"as-answered",
    });
    let mut fields: BTreeMap<String, Value> = BTreeMap::new();
    let mut files: Vec<(&str, [u8; 32])> = Vec::new();
    match &request.body {
        RequestBody::Json { fields: json, .. } => {
            for (name, value) in json {
                if !value.is_null() {
                    fields.insert(name.clone(), canonical(value));
                }
            }
        }
        RequestBody::Multipart { form, .. } => {
            for part in &form.parts {
                if part.is_file() {
                    let name = if is_image_field(&part.name) { "image" } else { part.name.as_str() };
                    files.push((name, Sha256::digest(&part.data).into()));
                } else if let Some(value) = request.field(&part.name) {
                    fields.insert(part.name.clone(), canonical(&value));
                }
            }
        }
    }
    fields.remove("model");
    for (name, value) in defaults(parts.family) {
        fields.entry(name.to_owned()).or_insert(value);
    }
    // A BTreeMap of canonical values serializes with sorted keys all the way down.
    put(&serde_json::to_vec(&fields).unwrap_or_default());
    for (name, digest) in files {
        put(name.as_bytes());
        put(&digest);
    }
    hasher.finalize().into()
}

/// `value` with every object's keys sorted.
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, Value> = map.iter().map(|(k, v)| (k, canonical(v))).collect();
            json!(sorted)
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// OpenAI's defaults, per model family: a request that spells one out means the same as one that leaves it out.
fn defaults(family: Option<Family>) -> Vec<(&'static str, Value)> {
    let mut d = vec![("n", json!(1)), ("stream", json!(false))];
    match family {
        Some(Family::DallE2) => d.extend([("size", json!("1024x1024")), ("response_format", json!("url"))]),
        Some(Family::DallE3) => d.extend([
            ("size", json!("1024x1024")),
            ("quality", json!("standard")),
            ("style", json!("vivid")),
            ("response_format", json!("url")),
        ]),
        Some(Family::GptImage | Family::GptImage2) => d.extend([
            ("size", json!("auto")),
            ("quality", json!("auto")),
            ("background", json!("auto")),
            ("moderation", json!("auto")),
            ("output_format", json!("png")),
        ]),
        None => {}
    }
    d
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::images::request::{Endpoint, Form, Part};

    fn json_key(scope: &str, body: &str) -> Key {
        let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_owned())).unwrap();
        let model = req.model();
        let family = crate::images::models::lookup(&model).map(|m| m.family);
        key(KeyParts { scope, model: &model, family, want: None }, &req)
    }

    #[test]
    fn key_order_nulls_and_spelt_out_defaults_do_not_matter() {
        let base = json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat"}"#);
        assert_eq!(base, json_key("t1", r#"{"prompt":"a cat","model":"dall-e-3"}"#));
        assert_eq!(base, json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","user":null,"n":1}"#));
        assert_eq!(
            base,
            json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","quality":"standard","style":"vivid"}"#)
        );
        let nested_a = json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","x":{"b":1,"a":[{"d":1,"c":2}]}}"#);
        let nested_b = json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","x":{"a":[{"c":2,"d":1}],"b":1}}"#);
        assert_eq!(nested_a, nested_b);
    }

    #[test]
    fn any_real_difference_changes_the_key() {
        let base = json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat"}"#);
        for other in [
            json_key("t2", r#"{"model":"dall-e-3","prompt":"a cat"}"#),
            json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat "}"#),
            json_key("t1", r#"{"model":"dall-e-2","prompt":"a cat"}"#),
            json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","quality":"hd"}"#),
            json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","brand_new":true}"#),
            json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","user":"u1"}"#),
        ] {
            assert_ne!(base, other);
        }
        let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from_static(br#"{"prompt":"x"}"#)).unwrap();
        let url =
            key(KeyParts { scope: "t", model: "gpt-image-1", family: None, want: Some(ResponseFormat::Url) }, &req);
        let b64 = key(KeyParts { scope: "t", model: "gpt-image-1", family: None, want: None }, &req);
        assert_ne!(url, b64, "links and base64 are different answers");
    }

    fn form_key(parts: Vec<Part>) -> Key {
        let form = Form { parts };
        let (raw, content_type) = form.encode();
        let req = ImageRequest::from_form(Endpoint::Edits, raw, content_type, form);
        key(KeyParts { scope: "t", model: "gpt-image-1", family: Some(Family::GptImage), want: None }, &req)
    }

    fn text(name: &str, value: &str) -> Part {
        Part { name: name.into(), file_name: None, content_type: None, data: Bytes::from(value.to_owned()) }
    }

    fn file(name: &str, bytes: &'static [u8]) -> Part {
        Part {
            name: name.into(),
            file_name: Some("f.png".into()),
            content_type: Some("image/png".into()),
            data: Bytes::from_static(bytes),
        }
    }

    #[test]
    fn multipart_fields_are_order_free_but_files_count_byte_for_byte_in_order() {
        let base =
            form_key(vec![text("prompt", "hat"), file("image[]", b"one"), file("image[]", b"two"), text("n", "1")]);
        assert_eq!(base, form_key(vec![file("image[]", b"one"), text("prompt", "hat"), file("image[]", b"two")]));
        assert_eq!(base, form_key(vec![text("prompt", "hat"), file("image", b"one"), file("image", b"two")]));
        assert_ne!(base, form_key(vec![text("prompt", "hat"), file("image[]", b"two"), file("image[]", b"one")]));
        assert_ne!(base, form_key(vec![text("prompt", "hat"), file("image[]", b"one"), file("image[]", b"twO")]));
        assert_ne!(base, form_key(vec![text("prompt", "hat"), file("image[]", b"one"), file("mask", b"two")]));
    }
}
