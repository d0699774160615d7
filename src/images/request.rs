//! The image request as the pipeline sees it: which endpoint, the raw body exactly as the caller sent it
//! (forwarded byte for byte, so unknown parameters always reach the upstream), and typed read access to the
//! fields the gateway needs. `null` reads as absent, as OpenAI treats it.

mod json;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The three OpenAI image operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Generations,
    Edits,
    Variations,
}

impl Endpoint {
    /// Path below the upstream's base URL (which already ends in `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Self::Generations => crate::wire::paths::GENERATIONS,
            Self::Edits => crate::wire::paths::EDITS,
            Self::Variations => crate::wire::paths::VARIATIONS,
        }
    }

    /// Short name for logs and usage.
    pub fn name(self) -> &'static str {
        match self {
            Self::Generations => "generations",
            Self::Edits => "edits",
            Self::Variations => "variations",
        }
    }

    /// OpenAI's default model when the request names none (SPEC: edits default to gpt-image-1.5).
    pub fn default_model(self) -> &'static str {
        match self {
            Self::Generations | Self::Variations => "dall-e-2",
            Self::Edits => "gpt-image-1.5",
        }
    }
}

/// One request on its way through the pipeline.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub endpoint: Endpoint,
    pub body: RequestBody,
}

/// The body: raw bytes for forwarding plus a parsed view for reading.
#[derive(Debug, Clone)]
pub enum RequestBody {
    /// `application/json`: generations, and the JSON form of edits.
    Json { raw: Bytes, fields: Map<String, Value> },
    /// `multipart/form-data`: edits and variations. `content_type` carries the boundary.
    Multipart { raw: Bytes, content_type: String, form: Form },
}

/// A parsed multipart form, parts in the order they arrived.
#[derive(Debug, Clone, Default)]
pub struct Form {
    pub parts: Vec<Part>,
}

/// One multipart part. A part with a file name is a file; one without is a text field.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

impl Part {
    /// True for file parts (they carry a `filename` in their `Content-Disposition`).
    pub fn is_file(&self) -> bool {
        self.file_name.is_some()
    }
}

impl Form {
    /// The value of a text field, if present and not a file.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.parts.iter().find(|p| p.name == name && !p.is_file()).and_then(|p| std::str::from_utf8(&p.data).ok())
    }

    /// The input images in order: parts named `image`, `image[]` or `image[N]`.
    pub fn images(&self) -> impl Iterator<Item = &Part> {
        self.parts.iter().filter(|p| is_image_field(&p.name))
    }

    /// The mask part, if any.
    pub fn mask(&self) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == "mask")
    }
}

impl Form {
    /// Encode as `multipart/form-data` with a fresh boundary: (body, content type).
    pub fn encode(&self) -> (Bytes, String) {
        let boundary = format!("imagegate-{}", hex::encode(rand::random::<[u8; 12]>()));
        let size: usize = self.parts.iter().map(|p| p.data.len() + p.name.len() + 160).sum();
        let mut out = Vec::with_capacity(size + boundary.len() + 8);
        for part in &self.parts {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", quote(&part.name)).as_bytes(),
            );
            if let Some(file_name) = &part.file_name {
                out.extend_from_slice(format!("; filename=\"{}\"", quote(file_name)).as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            if let Some(ct) = &part.content_type {
                out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&part.data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (Bytes::from(out), format!("multipart/form-data; boundary={boundary}"))
    }
}

/// A name or file name inside a quoted `Content-Disposition` parameter (the HTML form encoding rules).
fn quote(value: &str) -> String {
    value.replace('"', "%22").replace('\r', "%0D").replace('\n', "%0A")
}

/// `image`, `image[]` and `image[N]` all carry input images.
pub fn is_image_field(name: &str) -> bool {
    name == "image"
        || name
            .strip_prefix("image[")
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|i| i.bytes().all(|b| b.is_ascii_digit()))
}

/// The integer a multipart text field spells, read the one way every stage reads it: the plain decimal form
/// (`0`, `2`, `-1`), with no `+`, no leading zeros, no whitespace. Digits beyond `i64` read as `i64::MAX`
/// (out of every range), like JSON integers beyond `i64`. `None` for anything else.
pub fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && !(negative && digits == "0");
    if !canonical {
        return None;
    }
    match text.parse::<i64>() {
        Ok(i) => Some(i),
        Err(_) if negative => Some(i64::MIN),
        Err(_) => Some(i64::MAX),
    }
}

/// A multipart text field as the JSON value it stands for: a plain decimal integer ([`parse_integer`]), `true`
/// or `false`, a JSON array or object; anything else is the string itself.
pub fn text_value(text: &str) -> Value {
    if let Some(i) = parse_integer(text) {
        return Value::from(i);
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => match serde_json::from_str::<Value>(text) {
            Ok(v @ (Value::Array(_) | Value::Object(_))) => v,
            _ => Value::String(text.to_owned()),
        },
    }
}

impl ImageRequest {
    /// Parse a JSON body. The top level must be an object, and no object in it may name a key twice (which
    /// of the two the upstream would act on is anyone's guess, so neither is guessed).
    pub fn from_json(endpoint: Endpoint, raw: Bytes) -> Result<Self, ApiError> {
        let value = json::parse(&raw)?;
        let Value::Object(fields) = value else {
            return Err(ApiError::invalid("The request body must be a JSON object.", None));
        };
        Ok(Self { endpoint, body: RequestBody::Json { raw, fields } })
    }

    /// An empty JSON request, standing in for a body that could not be read (usage records of refusals).
    pub fn empty(endpoint: Endpoint) -> Self {
        Self { endpoint, body: RequestBody::Json { raw: Bytes::new(), fields: Map::new() } }
    }

    /// A multipart request whose form is already parsed (see `images::multipart`).
    pub fn from_form(endpoint: Endpoint, raw: Bytes, content_type: String, form: Form) -> Self {
        Self { endpoint, body: RequestBody::Multipart { raw, content_type, form } }
    }

    /// A field as a string, whatever the body type (numbers and booleans as written). `null` is `None`.
    pub fn field_str(&self, name: &str) -> Option<String> {
        match &self.body {
            RequestBody::Json { fields, .. } => match fields.get(name)? {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            },
            RequestBody::Multipart { form, .. } => form.text(name).map(str::to_owned),
        }
    }

    /// The JSON value of a field (multipart text is parsed as JSON where it can be, else a string).
    pub fn field(&self, name: &str) -> Option<Value> {
        match &self.body {
            RequestBody::Json { fields, .. } => fields.get(name).filter(|v| !v.is_null()).cloned(),
            RequestBody::Multipart { form, .. } => form.text(name).map(text_value),
        }
    }

    /// The model asked for, or the endpoint's default.
    pub fn model(&self) -> String {
        self.field_str("model").unwrap_or_else(|| self.endpoint.default_model().to_owned())
    }

    /// `stream=true` in the body (SDKs decide on the body flag, not on `Accept`).
    pub fn stream(&self) -> bool {
        matches!(self.field("stream"), Some(Value::Bool(true)))
    }

    /// Number of images asked for (default 1), read as validation reads it (JSON integers, multipart text by
    /// [`parse_integer`]). Values validation refuses (not an integer, out of `u32`) read as 1.
    pub fn n(&self) -> u32 {
        self.field("n").and_then(|v| v.as_u64()).and_then(|n| u32::try_from(n).ok()).unwrap_or(1)
    }

    /// Raw body and its content type, for forwarding.
    pub fn raw(&self) -> (&Bytes, &str) {
        match &self.body {
            RequestBody::Json { raw, .. } => (raw, "application/json"),
            RequestBody::Multipart { raw, content_type, .. } => (raw, content_type.as_str()),
        }
    }

    /// This request with field `name` set to `value` (`None` removes it), its raw body re-encoded. JSON keeps
    /// every other key and their order; multipart keeps every other part, in order, byte for byte.
    /// The request with these file parts (by index in the form) declaring these types; the body is
    /// re-encoded only when a part changes. JSON bodies are unchanged.
    pub fn with_part_types(self, types: &[(usize, &str)]) -> Self {
        match self.body {
            RequestBody::Multipart { mut form, raw, content_type } => {
                let mut changed = false;
                for (index, mime) in types {
                    if let Some(part) = form.parts.get_mut(*index)
                        && part.content_type.as_deref() != Some(*mime)
                    {
                        part.content_type = Some((*mime).to_owned());
                        changed = true;
                    }
                }
                let (raw, content_type) = if changed { form.encode() } else { (raw, content_type) };
                Self { endpoint: self.endpoint, body: RequestBody::Multipart { raw, content_type, form } }
            }
            body => Self { endpoint: self.endpoint, body },
        }
    }

    pub fn with_field(self, name: &str, value: Option<&str>) -> Self {
        match self.body {
            RequestBody::Json { mut fields, raw } => {
                match value {
                    Some(v) => {
                        fields.insert(name.to_owned(), Value::String(v.to_owned()));
                    }
                    None => {
                        fields.shift_remove(name);
                    }
                }
                // Serializing a map of JSON values cannot fail; keep the original body if it somehow does.
                let raw = serde_json::to_vec(&fields).map(Bytes::from).unwrap_or(raw);
                Self { endpoint: self.endpoint, body: RequestBody::Json { raw, fields } }
            }
            RequestBody::Multipart { mut form, .. } => {
                form.parts.retain(|p| p.name != name || p.is_file());
                if let Some(v) = value {
                    form.parts.push(Part {
                        name: name.to_owned(),
                        file_name: None,
                        content_type: None,
                        data: Bytes::from(v.to_owned()),
                    });
                }
                let (raw, content_type) = form.encode();
                Self { endpoint: self.endpoint, body: RequestBody::Multipart { raw, content_type, form } }
            }
        }
    }

    /// The multipart form, if this is a multipart request.
    pub fn form(&self) -> Option<&Form> {
        match &self.body {
            RequestBody::Multipart { form, .. } => Some(form),
            RequestBody::Json { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_reads_as_absent_and_defaults_apply() {
        let req = ImageRequest::from_json(
            Endpoint::Generations,
            Bytes::from_static(br#"{"prompt":"cat","model":null,"n":null,"stream":true,"future_param":{"a":1}}"#),
        )
        .unwrap();
        assert_eq!(req.model(), "dall-e-2");
        assert_eq!(req.n(), 1);
        assert!(req.stream());
        assert_eq!(req.field("future_param"), Some(serde_json::json!({"a":1})));
    }

    #[test]
    fn non_object_json_is_refused() {
        let err = ImageRequest::from_json(Endpoint::Generations, Bytes::from_static(b"[1,2]")).unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        let err = ImageRequest::from_json(Endpoint::Generations, Bytes::from_static(b"{\"prompt\":")).unwrap_err();
        assert!(err.client_message().contains("could not parse the JSON body"));
    }

    #[test]
    fn with_field_rewrites_json_keeping_every_other_key_in_order() {
        let raw = br#"{"model":"gpt-image-1","response_format":"url","prompt":"a","future":{"x":[1,2]}}"#;
        let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from_static(raw)).unwrap();
        let stripped = req.clone().with_field("response_format", None);
        assert_eq!(stripped.raw().0.as_ref(), br#"{"model":"gpt-image-1","prompt":"a","future":{"x":[1,2]}}"#);
        let set = req.with_field("response_format", Some("b64_json"));
        assert_eq!(set.field_str("response_format").as_deref(), Some("b64_json"));
    }

    #[tokio::test]
    async fn with_field_reencodes_multipart_with_every_other_part_byte_for_byte() {
        let image = Bytes::from_static(b"\x89PNG\r\n\x1a\n binary \r\n--not-a-boundary\r\n");
        let form = Form {
            parts: vec![
                Part {
                    name: "model".into(),
                    file_name: None,
                    content_type: None,
                    data: Bytes::from_static(b"gpt-image-1"),
                },
                Part {
                    name: "image[]".into(),
                    file_name: Some("a \"b\".png".into()),
                    content_type: Some("image/png".into()),
                    data: image.clone(),
                },
                Part {
                    name: "response_format".into(),
                    file_name: None,
                    content_type: None,
                    data: Bytes::from_static(b"url"),
                },
                Part {
                    name: "image[]".into(),
                    file_name: Some("c.png".into()),
                    content_type: Some("image/png".into()),
                    data: image.clone(),
                },
            ],
        };
        let (raw, content_type) = form.encode();
        let req = ImageRequest::from_form(Endpoint::Edits, raw, content_type, form).with_field("response_format", None);
        let (raw, content_type) = req.raw();
        let parsed = crate::images::multipart::parse(content_type, raw.clone()).await.unwrap();
        let names: Vec<&str> = parsed.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["model", "image[]", "image[]"]);
        assert_eq!(parsed.parts[1].data, image);
        assert_eq!(parsed.parts[1].file_name.as_deref(), Some("a %22b%22.png"));
        assert_eq!(parsed.parts[2].content_type.as_deref(), Some("image/png"));
        assert_eq!(parsed.text("model"), Some("gpt-image-1"));
    }

    #[test]
    fn integers_in_text_have_one_plain_form() {
        for (text, n) in [("0", 0), ("2", 2), ("10", 10), ("-1", -1), ("99999999999999999999999", i64::MAX)] {
            assert_eq!(parse_integer(text), Some(n), "{text}");
        }
        for text in ["", "+2", " 2", "2 ", "02", "00", "-0", "-", "2.0", "1e3", "0x10", "２", "٢", "+-2", "2\n"] {
            assert_eq!(parse_integer(text), None, "{text:?}");
        }
        assert_eq!(text_value("+2"), Value::String("+2".into()));
        assert_eq!(text_value("true"), Value::Bool(true));
        assert_eq!(text_value("1.5"), Value::String("1.5".into()));
        assert_eq!(text_value("null"), Value::String("null".into()));
        assert_eq!(text_value("{\"a\": 1}"), serde_json::json!({"a": 1}));
    }

    #[test]
    fn n_reads_multipart_text_as_validation_does() {
        for (text, n) in [("2", 2), ("+2", 1), (" 2", 1), ("02", 1), ("-3", 1), ("10", 10)] {
            let form = Form {
                parts: vec![Part { name: "n".into(), file_name: None, content_type: None, data: Bytes::from(text) }],
            };
            let req = ImageRequest::from_form(Endpoint::Edits, Bytes::new(), String::new(), form);
            assert_eq!(req.n(), n, "{text:?}");
        }
    }

    #[test]
    fn image_field_names() {
        for ok in ["image", "image[]", "image[0]", "image[15]"] {
            assert!(is_image_field(ok), "{ok}");
        }
        for no in ["images", "image[x]", "mask", "image["] {
            assert!(!is_image_field(no), "{no}");
        }
    }
}
