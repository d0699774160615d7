//! The image request as the pipeline sees it: which endpoint, the body (a JSON body exactly as the caller sent
//! it, forwarded byte for byte while nothing is changed, so unknown parameters always reach the upstream; a
//! multipart form part by part), typed read access to the fields the gateway needs, and the body as it goes
//! upstream ([`Outgoing`], written once, when it is sent). `null` reads as absent, as OpenAI treats it.

mod data;
mod json;

use bytes::Bytes;

pub use data::Data;
use serde_json::Value;

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

/// The top-level fields of a JSON body, in the order sent. An `IndexMap` with foldhash rather than
/// `serde_json::Map` (SipHash): validation, the cache key and the usage row look fields up about forty times per
/// request, and SipHash was 5 % of a cache hit's instructions (docs/performance.md). foldhash is seeded per
/// process, so crafted key names cannot aim at collisions; the number of keys is bounded by the parser's budget.
pub type Fields = indexmap::IndexMap<String, Value, foldhash::fast::RandomState>;

/// The body: what the caller sent, parsed for reading. Changing a field changes only the parsed view; the
/// body the upstream receives is written from it once, when it is sent ([`ImageRequest::outgoing`]).
#[derive(Debug, Clone)]
pub enum RequestBody {
    /// `application/json`: generations, and the JSON form of edits. `raw` is the caller's body while it still
    /// says what `fields` says (forwarded byte for byte); `None` once a field was set or removed.
    Json { raw: Option<Bytes>, fields: Fields },
    /// `multipart/form-data`: edits and variations. Always written afresh for the upstream, under a boundary of
    /// imagegate's own, with each part's data forwarded as the chunks it was parsed into.
    Multipart { form: Form },
}

/// A request body as it goes upstream: its chunks in order (a form's part data are the chunks they were
/// parsed into, not copied into one buffer), their total length and the content type.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub content_type: String,
    pub chunks: Vec<Bytes>,
    pub len: u64,
}

impl Outgoing {
    fn whole(content_type: &str, body: Bytes) -> Self {
        Self { content_type: content_type.to_owned(), len: body.len() as u64, chunks: vec![body] }
    }

    /// The body in one buffer (a copy unless it is one chunk): for tests, fuzzing and fingerprints of small
    /// bodies, never for forwarding.
    pub fn to_bytes(&self) -> Bytes {
        match self.chunks.as_slice() {
            [one] => one.clone(),
            chunks => {
                let mut out = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
                for chunk in chunks {
                    out.extend_from_slice(chunk);
                }
                Bytes::from(out)
            }
        }
    }
}

/// A JSON object serialized with one field set: in its place if present, else last (as `Map::insert` would
/// leave it), without copying the map.
struct WithField<'a> {
    fields: &'a Fields,
    name: &'a str,
    value: &'a str,
}

impl serde::Serialize for WithField<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let present = self.fields.contains_key(self.name);
        let mut map = serializer.serialize_map(Some(self.fields.len() + usize::from(!present)))?;
        for (key, value) in self.fields {
            if key == self.name {
                map.serialize_entry(key, self.value)?;
            } else {
                map.serialize_entry(key, value)?;
            }
        }
        if !present {
            map.serialize_entry(self.name, self.value)?;
        }
        map.end()
    }
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
    /// The part's bytes as the parser yielded them (a file in many chunks stays in many chunks).
    pub data: Data,
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
        self.parts.iter().find(|p| p.name == name && !p.is_file()).and_then(|p| p.data.text())
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
    /// Encode as `multipart/form-data` with a fresh boundary, in one buffer: (body, content type). For tests
    /// and tools; requests go upstream as [`Form::outgoing`].
    pub fn encode(&self) -> (Bytes, String) {
        let outgoing = self.outgoing(None);
        (outgoing.to_bytes(), outgoing.content_type)
    }

    /// This form as the upstream receives it: under a fresh boundary of imagegate's own, one canonical header
    /// per part, each part's data the chunks it is held as (no copy), and with `set` (a text field's name and
    /// value) replacing any text part of that name, last. What the upstream parses is then exactly what was
    /// validated, whatever tricks the caller's encoding played (two `boundary` parameters, a form hidden
    /// inside a file).
    pub fn outgoing(&self, set: Option<(&str, &str)>) -> Outgoing {
        let boundary = format!("imagegate-{}", hex::encode(rand::random::<[u8; 12]>()));
        let mut chunks = Vec::with_capacity(self.parts.len() * 2 + 2);
        let mut head = Vec::new();
        let mut len = 0u64;
        let mut push = |chunks: &mut Vec<Bytes>, chunk: Bytes| {
            len += chunk.len() as u64;
            chunks.push(chunk);
        };
        let set_part = set.map(|(name, value)| Part {
            name: name.to_owned(),
            file_name: None,
            content_type: None,
            data: Data::from(Bytes::copy_from_slice(value.as_bytes())),
        });
        let kept = self.parts.iter().filter(|p| set.is_none_or(|(name, _)| p.name != name || p.is_file()));
        for part in kept.chain(set_part.as_ref()) {
            // Each part's header follows the previous part's data (and its CRLF) in one small buffer.
            head.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", quote(&part.name)).as_bytes(),
            );
            if let Some(file_name) = &part.file_name {
                head.extend_from_slice(format!("; filename=\"{}\"", quote(file_name)).as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            if let Some(ct) = &part.content_type {
                head.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            push(&mut chunks, Bytes::from(std::mem::take(&mut head)));
            for chunk in part.data.chunks() {
                push(&mut chunks, chunk.clone());
            }
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        push(&mut chunks, Bytes::from(head));
        Outgoing { content_type: format!("multipart/form-data; boundary={boundary}"), chunks, len }
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
        let Some(fields) = json::parse_object(&raw)? else {
            return Err(ApiError::invalid("The request body must be a JSON object.", None));
        };
        Ok(Self { endpoint, body: RequestBody::Json { raw: Some(raw), fields } })
    }

    /// An empty JSON request, standing in for a body that could not be read (usage records of refusals).
    pub fn empty(endpoint: Endpoint) -> Self {
        Self { endpoint, body: RequestBody::Json { raw: Some(Bytes::new()), fields: Fields::default() } }
    }

    /// A multipart request whose form is already parsed (see `images::multipart`).
    pub fn from_form(endpoint: Endpoint, form: Form) -> Self {
        Self { endpoint, body: RequestBody::Multipart { form } }
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
        match &self.body {
            RequestBody::Json { fields, .. } => matches!(fields.get("stream"), Some(Value::Bool(true))),
            RequestBody::Multipart { .. } => matches!(self.field("stream"), Some(Value::Bool(true))),
        }
    }

    /// Number of images asked for (default 1), read as validation reads it (JSON integers, multipart text by
    /// [`parse_integer`]). Values validation refuses (not an integer, out of `u32`) read as 1.
    pub fn n(&self) -> u32 {
        let n = match &self.body {
            RequestBody::Json { fields, .. } => fields.get("n").and_then(Value::as_u64),
            RequestBody::Multipart { .. } => self.field("n").and_then(|v| v.as_u64()),
        };
        n.and_then(|n| u32::try_from(n).ok()).unwrap_or(1)
    }

    /// The body as the upstream receives it, with `user` set to `user` when given: the one place a body is
    /// written. A JSON body nothing changed goes out as the caller's bytes; otherwise it is serialized from
    /// its fields (every other key kept, in order). A form is written part by part ([`Form::outgoing`]).
    pub fn outgoing(&self, user: Option<&str>) -> Outgoing {
        const JSON: &str = "application/json";
        match &self.body {
            RequestBody::Json { raw: Some(raw), .. } if user.is_none() => Outgoing::whole(JSON, raw.clone()),
            RequestBody::Json { fields, raw } => {
                let written = match user {
                    Some(value) => serde_json::to_vec(&WithField { fields, name: "user", value }),
                    None => serde_json::to_vec(fields),
                };
                // Serializing a map of JSON values cannot fail; keep the caller's body if it somehow does.
                let body = written.map(Bytes::from).unwrap_or_else(|_| raw.clone().unwrap_or_default());
                Outgoing::whole(JSON, body)
            }
            RequestBody::Multipart { form } => form.outgoing(user.map(|u| ("user", u))),
        }
    }

    /// The request with these file parts (by index in the form) declaring these types. JSON bodies are
    /// unchanged.
    pub fn with_part_types(self, types: &[(usize, &str)]) -> Self {
        match self.body {
            RequestBody::Multipart { mut form } => {
                for (index, mime) in types {
                    if let Some(part) = form.parts.get_mut(*index) {
                        part.content_type = Some((*mime).to_owned());
                    }
                }
                Self { endpoint: self.endpoint, body: RequestBody::Multipart { form } }
            }
            body => Self { endpoint: self.endpoint, body },
        }
    }

    /// This request with field `name` set to `value` (`None` removes it). JSON keeps every other key and
    /// their order; multipart keeps every other part, in order, and puts the field last. Nothing is encoded
    /// here: the upstream's body is written when it is sent.
    pub fn with_field(self, name: &str, value: Option<&str>) -> Self {
        match self.body {
            RequestBody::Json { mut fields, .. } => {
                match value {
                    Some(v) => {
                        fields.insert(name.to_owned(), Value::String(v.to_owned()));
                    }
                    None => {
                        fields.shift_remove(name);
                    }
                }
                Self { endpoint: self.endpoint, body: RequestBody::Json { raw: None, fields } }
            }
            RequestBody::Multipart { mut form } => {
                form.parts.retain(|p| p.name != name || p.is_file());
                if let Some(v) = value {
                    form.parts.push(Part {
                        name: name.to_owned(),
                        file_name: None,
                        content_type: None,
                        data: Data::from(v.to_owned()),
                    });
                }
                Self { endpoint: self.endpoint, body: RequestBody::Multipart { form } }
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
        assert_eq!(req.outgoing(None).to_bytes().as_ref(), raw, "unchanged: the caller's bytes");
        let stripped = req.clone().with_field("response_format", None);
        let expected = br#"{"model":"gpt-image-1","prompt":"a","future":{"x":[1,2]}}"#;
        assert_eq!(stripped.outgoing(None).to_bytes().as_ref(), expected);
        let set = req.with_field("response_format", Some("b64_json"));
        assert_eq!(set.field_str("response_format").as_deref(), Some("b64_json"));
    }

    #[test]
    fn user_is_set_where_with_field_would_set_it_without_copying_the_fields() {
        for raw in [
            &br#"{"model":"dall-e-2","user":"caller","prompt":"a"}"#[..],
            br#"{"model":"dall-e-2","user":null,"prompt":"a"}"#,
            br#"{"model":"dall-e-2","prompt":"a","future":[1,{"b":2}]}"#,
            br#"{}"#,
        ] {
            let req = ImageRequest::from_json(Endpoint::Generations, Bytes::from_static(raw)).unwrap();
            let by_field = req.clone().with_field("user", Some("u-1")).outgoing(None).to_bytes();
            assert_eq!(req.outgoing(Some("u-1")).to_bytes(), by_field, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[tokio::test]
    async fn a_form_goes_out_with_every_other_part_byte_for_byte_and_its_data_not_copied() {
        let image = Bytes::from_static(b"\x89PNG\r\n\x1a\n binary \r\n--not-a-boundary\r\n");
        let form = Form {
            parts: vec![
                Part {
                    name: "model".into(),
                    file_name: None,
                    content_type: None,
                    data: Bytes::from_static(b"gpt-image-1").into(),
                },
                Part {
                    name: "image[]".into(),
                    file_name: Some("a \"b\".png".into()),
                    content_type: Some("image/png".into()),
                    data: image.clone().into(),
                },
                Part {
                    name: "response_format".into(),
                    file_name: None,
                    content_type: None,
                    data: Bytes::from_static(b"url").into(),
                },
                Part {
                    name: "image[]".into(),
                    file_name: Some("c.png".into()),
                    content_type: Some("image/png".into()),
                    data: image.clone().into(),
                },
            ],
        };
        let req = ImageRequest::from_form(Endpoint::Edits, form).with_field("response_format", None);
        let outgoing = req.outgoing(Some("u-1"));
        // The files go out as the very buffers the form holds.
        let shared = outgoing.chunks.iter().filter(|c| c.as_ptr() == image.as_ptr()).count();
        assert_eq!(shared, 2, "each file's data is forwarded as the chunk it is held as");
        assert_eq!(outgoing.len, outgoing.chunks.iter().map(|c| c.len() as u64).sum::<u64>());
        let parsed = crate::images::multipart::parse(&outgoing.content_type, outgoing.to_bytes()).await.unwrap();
        let names: Vec<&str> = parsed.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["model", "image[]", "image[]", "user"]);
        assert_eq!(parsed.text("user"), Some("u-1"));
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
                parts: vec![Part {
                    name: "n".into(),
                    file_name: None,
                    content_type: None,
                    data: Bytes::from(text).into(),
                }],
            };
            let req = ImageRequest::from_form(Endpoint::Edits, form);
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
