//! The cache key: SHA-256 over the scope (a tenant, or `shared`), the endpoint, the model, the format the caller
//! gets, the image retention (links in an answer live as long as it; see `cache::storable_for`), and the
//! request in canonical form. JSON bodies: top-level `null` fields dropped (OpenAI treats them as absent), the
//! model's defaults filled in, keys sorted recursively; nested values are otherwise hashed as sent (a nested
//! `null` counts). Multipart bodies: every text field's raw bytes, every occurrence of a repeated name in
//! order, fields sorted by name; only the integer fields the validator parses (`n`, `output_compression`,
//! `partial_images`) are normalised to their decimal value, and absent fields take the model's defaults;
//! every file part's bytes in order. Two requests that OpenAI would treat alike get one key; any other
//! difference (a parameter, a byte of a prompt or file, a field unknown to imagegate) gets another.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::domain::ResponseFormat;
use crate::images::request::{Fields, ImageRequest, RequestBody, is_image_field};

/// A cache key.
pub type Key = [u8; 32];

/// What the key covers besides the request body.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    /// The tenant id, or `shared` for the opt-in cross-tenant scope.
    pub scope: &'a str,
    pub model: &'a str,
    /// OpenAI's values for parameters left out, from the model's catalog entry (`None`: unknown model).
    pub defaults: Option<&'a Map<String, Value>>,
    /// The format the caller gets (re-hosting may turn base64 into links).
    pub want: Option<ResponseFormat>,
    /// How long the images re-hosted for this request are kept (`None`: re-hosting is off). Part of the key so
    /// that a hit's links live at least half of the reader's own retention, whoever stored the entry.
    pub retention: Option<Duration>,
}

/// The key of `request` (as it will be sent upstream).
pub fn key(parts: KeyParts<'_>, request: &ImageRequest) -> Key {
    let mut hasher = Sha256::new();
    let mut put = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    put(b"imagegate-cache-v2");
    put(parts.scope.as_bytes());
    put(request.endpoint.name().as_bytes());
    put(parts.model.as_bytes());
    put(match parts.want {
        Some(ResponseFormat::Url) => b"url",
        Some(ResponseFormat::B64Json) => b"b64_json",
        None => b"as-answered",
    });
    match parts.retention {
        Some(retention) => put(&retention.as_millis().to_be_bytes()),
        None => put(b"not-rehosted"),
    }
    match &request.body {
        RequestBody::Json { fields, .. } => {
            put(b"json");
            put(&canonical_fields(fields, parts.defaults));
        }
        RequestBody::Multipart { form, .. } => {
            put(b"multipart");
            let mut fields: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
            let mut files: Vec<(&str, [u8; 32])> = Vec::new();
            for part in &form.parts {
                if part.is_file() {
                    let name = if is_image_field(&part.name) { "image" } else { part.name.as_str() };
                    files.push((name, part.data.sha256()));
                } else {
                    fields.entry(part.name.as_str()).or_default().push(text_value(&part.name, &part.data.to_bytes()));
                }
            }
            fields.remove("model");
            for (name, value) in defaults(parts.defaults) {
                fields.entry(name).or_insert_with(|| vec![as_text(&value).into_bytes()]);
            }
            for (name, values) in fields {
                put(name.as_bytes());
                put(&(values.len() as u64).to_be_bytes());
                for value in values {
                    put(&value);
                }
            }
            put(b"files");
            for (name, digest) in files {
                put(name.as_bytes());
                put(&digest);
            }
        }
    }
    hasher.finalize().into()
}

/// A multipart text field as hashed: its raw bytes, or for an integer field the validator parses, its value.
fn text_value(name: &str, data: &[u8]) -> Vec<u8> {
    let integer =
        // The multipart integer fields the validator parses: `" 2"` and `"2"` mean the same.
        (name == "n" || crate::images::validate::INTEGER_FIELDS.contains(&name)).then(|| std::str::from_utf8(data).ok()?.trim().parse::<i64>().ok()).flatten();
    match integer {
        Some(i) => i.to_string().into_bytes(),
        None => data.to_vec(),
    }
}

/// A default as multipart text: strings as they are, numbers and booleans as JSON spells them.
fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The JSON fields as hashed: every non-null top-level field but `model`, the defaults of fields left out
/// (the first default of a name wins), keys sorted at every depth, compact. Written straight from the request's
/// values into one buffer: no copy of the tree is built (the copy and its maps were most of the key's cost).
fn canonical_fields(fields: &Fields, model: Option<&Map<String, Value>>) -> Vec<u8> {
    let mut top: Vec<(&str, &Value)> = fields
        .iter()
        .filter(|(name, value)| !value.is_null() && *name != "model")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let shared = shared_defaults();
    let model = model.into_iter().flatten().map(|(k, v)| (k.as_str(), v));
    for (name, value) in shared.iter().map(|(k, v)| (*k, v)).chain(model) {
        if !top.iter().any(|(n, _)| *n == name) {
            top.push((name, value));
        }
    }
    let mut out = Vec::with_capacity(256);
    write_object(&mut out, top);
    out
}

/// An object's entries compact, keys sorted, values canonical.
fn write_object(out: &mut Vec<u8>, mut entries: Vec<(&str, &Value)>) {
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (name, value)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        write_canonical(out, value);
    }
    out.push(b'}');
}

/// `value` compact, with every object's keys sorted.
fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => write_object(out, map.iter().map(|(k, v)| (k.as_str(), v)).collect()),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        // Writing a scalar into a Vec cannot fail.
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

/// A JSON string as `serde_json` writes it (its escapes).
fn write_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The defaults every model shares, before the model's own.
fn shared_defaults() -> [(&'static str, Value); 2] {
    [("n", Value::from(1)), ("stream", Value::Bool(false))]
}

/// OpenAI's defaults for the model: a request that spells one out means the same as one that leaves it out.
fn defaults(model: Option<&Map<String, Value>>) -> Vec<(&str, Value)> {
    let mut d = shared_defaults().to_vec();
    if let Some(model) = model {
        d.extend(model.iter().map(|(k, v)| (k.as_str(), v.clone())));
    }
    d
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::images::request::{Endpoint, Form, Part};

    fn json_key(scope: &str, body: &str) -> Key {
        let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_owned())).unwrap();
        let model = req.model();
        let catalog = crate::catalog::Catalog::builtin();
        let defaults = catalog.get(&model).map(|m| &m.defaults);
        key(KeyParts { scope, model: &model, defaults, want: None, retention: None }, &req)
    }

    /// The canonical JSON as keys were computed before `canonical_fields` (a sorted copy of the tree,
    /// serialized): keys must not change across versions, since replicas of two versions share one Redis cache
    /// during a rolling upgrade.
    fn tree_copy_canonical(fields: &Fields, model: Option<&Map<String, Value>>) -> Vec<u8> {
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
        let mut out: BTreeMap<String, Value> = BTreeMap::new();
        for (name, value) in fields {
            if !value.is_null() {
                out.insert(name.clone(), canonical(value));
            }
        }
        out.remove("model");
        for (name, value) in defaults(model) {
            out.entry(name.to_owned()).or_insert(value);
        }
        serde_json::to_vec(&out).unwrap()
    }

    #[test]
    fn canonical_json_is_byte_for_byte_what_the_tree_copy_wrote() {
        let catalog = crate::catalog::Catalog::builtin();
        let bodies = [
            r#"{"model":"dall-e-3","prompt":"a cat"}"#,
            r#"{"prompt":"a \"quoted\" cat\n\u00e9\ud83d\ude00 </script>","model":"gpt-image-1","n":2,"size":"1024x1024"}"#,
            r#"{"model":"gpt-image-1","prompt":"x","stream":true,"partial_images":2,"user":null,"quality":"high"}"#,
            r#"{"model":"gpt-image-1","prompt":"x","x":{"b":1,"a":[{"d":1.5,"c":-2e-7},null,true,"s"],"é":{}},"y":[]}"#,
            r#"{"prompt":"no model","n":1,"stream":false,"output_compression":100,"big":18446744073709551615}"#,
            r#"{"model":"unknown-model","prompt":"x","z":0,"a":-0.0,"m":1e300}"#,
        ];
        for body in bodies {
            let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_owned())).unwrap();
            let RequestBody::Json { fields, .. } = &req.body else { unreachable!() };
            let model = req.model();
            for defaults in [catalog.get(&model).map(|m| &m.defaults), None] {
                assert_eq!(
                    String::from_utf8(canonical_fields(fields, defaults)).unwrap(),
                    String::from_utf8(tree_copy_canonical(fields, defaults)).unwrap(),
                    "{body}"
                );
            }
        }
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
        let parts = KeyParts { scope: "t", model: "gpt-image-1", defaults: None, want: None, retention: None };
        let url = key(KeyParts { want: Some(ResponseFormat::Url), ..parts }, &req);
        let b64 = key(parts, &req);
        assert_ne!(url, b64, "links and base64 are different answers");
        let day = key(KeyParts { retention: Some(Duration::from_secs(86_400)), ..parts }, &req);
        let week = key(KeyParts { retention: Some(Duration::from_secs(7 * 86_400)), ..parts }, &req);
        assert_ne!(day, week, "links kept a day are not links kept a week");
        assert_ne!(day, b64);
    }

    fn form_key(parts: Vec<Part>) -> Key {
        let req = ImageRequest::from_form(Endpoint::Edits, Form { parts });
        let catalog = crate::catalog::Catalog::builtin();
        let defaults = catalog.get("gpt-image-1").map(|m| &m.defaults);
        let parts = KeyParts { scope: "t", model: "gpt-image-1", defaults, want: None, retention: None };
        key(parts, &req)
    }

    fn text(name: &str, value: &str) -> Part {
        Part { name: name.into(), file_name: None, content_type: None, data: Bytes::from(value.to_owned()).into() }
    }

    fn file(name: &str, bytes: &'static [u8]) -> Part {
        Part {
            name: name.into(),
            file_name: Some("f.png".into()),
            content_type: Some("image/png".into()),
            data: Bytes::from_static(bytes).into(),
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

    #[test]
    fn multipart_text_counts_byte_for_byte_and_every_repeated_part_counts() {
        let prompt = |p: &str| form_key(vec![text("prompt", p), file("image", b"one")]);
        // JSON-looking prompts are text: another spelling is another prompt.
        assert_ne!(prompt(r#"{"scene": "beach", "mood": "calm"}"#), prompt(r#"{"mood":"calm","scene":"beach"}"#));
        assert_ne!(prompt("1.0"), prompt("1.00"));
        assert_ne!(prompt("true"), prompt("True"));
        let tags = |values: &[&str]| {
            let mut parts: Vec<Part> = values.iter().map(|v| text("tags[]", v)).collect();
            parts.push(file("image", b"one"));
            form_key(parts)
        };
        assert_ne!(tags(&["a", "b"]), tags(&["a", "c"]), "the second occurrence counts");
        assert_ne!(tags(&["a", "b"]), tags(&["b", "a"]), "in order");
        assert_ne!(tags(&["a"]), tags(&["a", "a"]), "and how many there are");
        // The integer fields the validator parses, and defaults, are normalised.
        let n = |v: &str| form_key(vec![text("prompt", "hat"), text("n", v), file("image", b"one")]);
        assert_eq!(n(" 2"), n("2"));
        assert_ne!(n("2"), n("3"));
        assert_eq!(n("1"), prompt("hat"), "n = 1 is the default");
        let sized = form_key(vec![text("prompt", "hat"), text("size", "auto"), file("image", b"one")]);
        assert_eq!(sized, prompt("hat"), "size = auto is the default");
    }

    #[test]
    fn only_top_level_nulls_are_dropped_from_json() {
        let base = json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","x":{}}"#);
        assert_eq!(base, json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","x":{},"y":null}"#));
        assert_ne!(base, json_key("t1", r#"{"model":"dall-e-3","prompt":"a cat","x":{"a":null}}"#));
    }
}
