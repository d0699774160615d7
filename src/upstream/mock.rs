//! The built-in offline upstream: [`MockUpstream`] answers image requests the way OpenAI does (shapes, defaults,
//! `usage`, SSE streams, expiring DALL·E URLs) with real, deterministic images from `upstream::render`.
//!
//! It validates only what it needs to answer; the gateway validates requests on its own. Its DALL·E-style links
//! are signed ([`MockLinks`]), so only images it handed out are rendered, and the `n` images of an answer are
//! rendered in parallel.

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream, StreamExt as _};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use url::Url;

use super::render::{self, OutputFormat};
use super::{Attribution, Reading, ReplyBody, Upstream, UpstreamError, UpstreamReply, sse_error_event};
use crate::images::request::{Endpoint, ImageRequest};
use crate::signing::Signer;
use crate::wire::{events, headers, paths};

/// How long a DALL·E-style URL stays valid, in seconds (OpenAI: 60 minutes).
pub const URL_LIFETIME_SECS: u64 = 3600;

/// Most images one request may ask for (OpenAI's limit for `n`).
const MAX_N: u32 = 10;
/// Most partial images per streamed image.
const MAX_PARTIAL_IMAGES: u32 = 3;
/// Image input tokens billed per input image of an edit (a 1024×1024 tile estimate).
const IMAGE_TOKENS_PER_INPUT: u64 = 323;
/// Extra image output tokens per partial image of a stream (OpenAI guide: ~100).
const TOKENS_PER_PARTIAL: u64 = 100;

/// Signs and checks the mock's image links (HMAC-SHA256 over the file name and the expiry), the way Azure's
/// SAS signature protects OpenAI's real ones: the file route renders only what the mock handed out, not any
/// size anyone asks for.
#[derive(Debug, Clone)]
pub struct MockLinks {
    signer: Signer,
}

impl MockLinks {
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self { signer: Signer::new(key) }
    }

    /// The `sig` of file `name` expiring at `expires` (Unix seconds).
    pub fn signature(&self, name: &str, expires: u64) -> String {
        self.signer.sign(name, i64::try_from(expires).unwrap_or(i64::MAX))
    }

    /// Whether `sig` signs `name` and `expires` (in its canonical spelling), in constant time.
    pub fn verify(&self, name: &str, expires: &str, sig: &str) -> bool {
        self.signer.check(name, expires, sig).is_some_and(|at| at >= 0)
    }
}

/// The offline upstream. `public_url` is where callers reach this gateway; DALL·E URLs point below it at
/// `wire::paths::MOCK_FILES`.
#[derive(Debug, Clone)]
pub struct MockUpstream {
    public_url: Url,
    links: MockLinks,
}

impl MockUpstream {
    /// A mock whose DALL·E URLs start with `public_url` (e.g. `http://localhost:8080`), signed by `links`.
    pub fn new(public_url: Url, links: MockLinks) -> Self {
        Self { public_url, links }
    }

    /// The expiring, signed URL of a rendered file: `{public_url}/_mock/files/{name}?se={expires}&sig={…}`.
    pub fn file_url(&self, name: &str, expires: u64) -> String {
        let query = format!("se={expires}&sig={}", self.links.signature(name, expires));
        paths::public_link(&self.public_url, &format!("{}/{name}", paths::MOCK_FILES), &query)
    }

    async fn answer(&self, request: &ImageRequest) -> UpstreamReply {
        let started = Instant::now();
        let plan = match Plan::from_request(request) {
            Ok(plan) => plan,
            Err(e) => return e.into_reply(started),
        };
        if plan.stream {
            return plan.into_stream_reply(started);
        }
        let created = crate::time::now_secs();
        let body = match plan.family {
            Family::Gpt => {
                let b64 = match plan.render_all_b64().await {
                    Ok(images) => images,
                    Err(e) => return MockError::internal(&e).into_reply(started),
                };
                let data: Vec<Value> = b64.into_iter().map(|b| json!({ "b64_json": b })).collect();
                json!({
                    "created": created,
                    "data": data,
                    "background": plan.background_label(),
                    "output_format": plan.format.as_str(),
                    "size": plan.size_label(),
                    "quality": plan.quality.as_str(),
                    "usage": plan.usage(plan.n, 0),
                })
            }
            Family::DallE2 | Family::DallE3 => {
                let mut data: Vec<Value> = if plan.response_b64 {
                    match plan.render_all_b64().await {
                        Ok(images) => images.into_iter().map(|b| json!({ "b64_json": b })).collect(),
                        Err(e) => return MockError::internal(&e).into_reply(started),
                    }
                } else {
                    let expires = created + URL_LIFETIME_SECS;
                    (0..plan.n)
                        .map(|i| {
                            let name = file_name(plan.seed(i), plan.width, plan.height, OutputFormat::Png);
                            json!({ "url": self.file_url(&name, expires) })
                        })
                        .collect()
                };
                if plan.family == Family::DallE3 {
                    for obj in data.iter_mut().filter_map(Value::as_object_mut) {
                        obj.insert("revised_prompt".to_owned(), Value::String(revised_prompt(&plan.prompt)));
                    }
                }
                json!({ "created": created, "data": data })
            }
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        UpstreamReply {
            status: StatusCode::OK,
            headers: reply_headers("application/json", started),
            body: ReplyBody::Full(Bytes::from(bytes)),
        }
    }
}

impl Upstream for MockUpstream {
    fn send<'a>(
        &'a self,
        request: &'a ImageRequest,
        _attribution: &'a Attribution,
        // Offline answers are small and made here: always whole.
        _reading: Reading,
    ) -> BoxFuture<'a, Result<UpstreamReply, UpstreamError>> {
        Box::pin(async move { Ok(self.answer(request).await) })
    }

    fn name(&self) -> &'static str {
        "mock"
    }
}

/// The file name behind a mock DALL·E URL: `{seed:016x}-{w}x{h}.{ext}`; everything needed to re-render.
pub fn file_name(seed: u64, width: u32, height: u32, format: OutputFormat) -> String {
    format!("{seed:016x}-{width}x{height}.{}", format.extension())
}

/// Inverse of [`file_name`]. `None` for anything else, including sizes beyond `render::MAX_EDGE`.
pub fn parse_file_name(name: &str) -> Option<(u64, u32, u32, OutputFormat)> {
    let (stem, ext) = name.rsplit_once('.')?;
    let format = OutputFormat::parse(ext)?;
    let (seed, size) = stem.split_once('-')?;
    if seed.len() != 16 || !seed.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let seed = u64::from_str_radix(seed, 16).ok()?;
    let (width, height) = render::parse_size(size)?;
    Some((seed, width, height, format))
}

/// The `revised_prompt` dall-e-3 answers with.
fn revised_prompt(prompt: &str) -> String {
    format!("A detailed, vivid illustration of the following: {prompt}")
}

fn reply_headers(content_type: &'static str, started: Instant) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    let id = format!("mock_{:032x}", rand::random::<u128>());
    if let Ok(v) = HeaderValue::from_str(&id) {
        map.insert(headers::X_UPSTREAM_REQUEST_ID, v);
    }
    map.insert(headers::OPENAI_PROCESSING_MS, HeaderValue::from(started.elapsed().as_millis() as u64));
    map.insert(headers::OPENAI_VERSION, HeaderValue::from_static("2020-10-01"));
    map
}

/// An error answered as OpenAI would, as a JSON body.
#[derive(Debug)]
struct MockError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl MockError {
    fn invalid(message: String, param: &'static str, code: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: Some(param),
            code: Some(code),
        }
    }

    fn internal(e: &anyhow::Error) -> Self {
        tracing::error!(error = %format!("{e:#}"), "mock upstream failed to render");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request. Sorry about that!".to_owned(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    fn into_reply(self, started: Instant) -> UpstreamReply {
        let body = crate::error::error_json(&self.message, self.kind, self.param, self.code);
        UpstreamReply {
            status: self.status,
            headers: reply_headers("application/json", started),
            body: ReplyBody::Full(Bytes::from(body)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Gpt,
    DallE2,
    DallE3,
}

impl Family {
    fn of(model: &str) -> Self {
        if model.starts_with("dall-e-3") {
            Self::DallE3
        } else if model.starts_with("dall-e") {
            Self::DallE2
        } else {
            // gpt-image-*, chatgpt-image-latest and anything unknown.
            Self::Gpt
        }
    }

    fn supported_sizes(self) -> &'static str {
        match self {
            Self::Gpt => "'1024x1024', '1024x1536', '1536x1024', and 'auto'",
            Self::DallE2 => "'256x256', '512x512', and '1024x1024'",
            Self::DallE3 => "'1024x1024', '1792x1024', and '1024x1792'",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quality {
    Low,
    Medium,
    High,
}

impl Quality {
    fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }

    /// Output tokens per image (reference §10.3); other sizes scale the square figure by area.
    fn output_tokens(self, width: u32, height: u32) -> u64 {
        let [square, portrait, landscape] = match self {
            Self::Low => [272u64, 408, 400],
            Self::Medium => [1056, 1584, 1568],
            Self::High => [4160, 6240, 6208],
        };
        match (width, height) {
            (1024, 1024) => square,
            (1024, 1536) => portrait,
            (1536, 1024) => landscape,
            (w, h) => (square * u64::from(w) * u64::from(h)).div_ceil(1024 * 1024).max(1),
        }
    }
}

/// A request resolved to what will be rendered and reported.
#[derive(Debug, Clone)]
struct Plan {
    endpoint: Endpoint,
    family: Family,
    /// The prompt, for `revised_prompt` and text tokens (empty for variations).
    prompt: String,
    /// What seeds derive from: the prompt, or the hash of the first input image for variations.
    seed_source: String,
    n: u32,
    width: u32,
    height: u32,
    quality: Quality,
    transparent: bool,
    format: OutputFormat,
    /// DALL·E only: `b64_json` instead of URLs.
    response_b64: bool,
    stream: bool,
    partial_images: u32,
    input_images: u64,
}

/// `n`, refused outside 1..=10 as OpenAI does.
fn count(req: &ImageRequest) -> Result<u32, MockError> {
    match req.field("n").and_then(|v| v.as_i64()) {
        Some(n) if n < 1 => Err(MockError::invalid(
            format!("Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead."),
            "n",
            "integer_below_min_value",
        )),
        Some(n) if n > i64::from(MAX_N) => Err(MockError::invalid(
            format!("Invalid 'n': integer above maximum value. Expected a value <= {MAX_N}, but got {n} instead."),
            "n",
            "integer_above_max_value",
        )),
        _ => Ok(req.n().clamp(1, MAX_N)),
    }
}

/// The rendered size (`auto` and no size: 1024×1024).
fn size(req: &ImageRequest, family: Family) -> Result<(u32, u32), MockError> {
    match req.field_str("size").as_deref() {
        None | Some("auto") => Ok((1024, 1024)),
        Some(s) => render::parse_size(s).ok_or_else(|| {
            MockError::invalid(
                format!("Invalid value: '{s}'. Supported values are: {}.", family.supported_sizes()),
                "size",
                "invalid_value",
            )
        }),
    }
}

/// Whether a DALL·E caller asked for `b64_json`; GPT image models refuse `response_format` as OpenAI does.
fn wants_b64(req: &ImageRequest, family: Family) -> Result<bool, MockError> {
    match (family, req.field_str("response_format").as_deref()) {
        (_, None) | (Family::DallE2 | Family::DallE3, Some("url")) => Ok(false),
        (Family::Gpt, Some(_)) => Err(MockError::invalid(
            "Unknown parameter: 'response_format'.".to_owned(),
            "response_format",
            "unknown_parameter",
        )),
        (_, Some("b64_json")) => Ok(true),
        (_, Some(other)) => Err(MockError::invalid(
            format!("Invalid value: '{other}'. Supported values are: 'url' and 'b64_json'."),
            "response_format",
            "invalid_value",
        )),
    }
}

/// The image format: GPT image models take `output_format`, DALL·E answers PNG.
fn output_format(req: &ImageRequest, family: Family) -> Result<OutputFormat, MockError> {
    match family {
        Family::Gpt => match req.field_str("output_format").as_deref() {
            None => Ok(OutputFormat::Png),
            Some(s) => OutputFormat::parse(s).ok_or_else(|| {
                MockError::invalid(
                    format!("Invalid value: '{s}'. Supported values are: 'png', 'jpeg', and 'webp'."),
                    "output_format",
                    "invalid_value",
                )
            }),
        },
        Family::DallE2 | Family::DallE3 => Ok(OutputFormat::Png),
    }
}

/// What the images' seeds derive from, and how many input images an edit had: the prompt for generations;
/// the prompt and the input images (or, for JSON edits, their references) for edits, since the same prompt on
/// other images is another edit; the first image's hash for variations.
fn seed_source(req: &ImageRequest, prompt: &str) -> (String, u64) {
    match req.endpoint {
        Endpoint::Generations => (prompt.to_owned(), 0),
        Endpoint::Edits => {
            let mut inputs = Sha256::new();
            let count = match req.form() {
                Some(form) => {
                    for part in form.images().chain(form.mask()) {
                        inputs.update(part.data.sha256());
                    }
                    form.images().count() as u64
                }
                None => {
                    for name in ["images", "mask"] {
                        inputs.update(req.field(name).map(|v| v.to_string()).unwrap_or_default().as_bytes());
                        inputs.update([0u8]);
                    }
                    req.field("images").and_then(|v| v.as_array().map(|a| a.len() as u64)).unwrap_or(0)
                }
            };
            (format!("{prompt}\0{}", hex::encode(inputs.finalize())), count)
        }
        Endpoint::Variations => {
            let first = req.form().and_then(|f| f.images().next()).map(|p| p.data.clone()).unwrap_or_default();
            (hex::encode(first.sha256()), 1)
        }
    }
}

impl Plan {
    fn from_request(req: &ImageRequest) -> Result<Self, MockError> {
        let family = Family::of(&req.model());
        let (width, height) = size(req, family)?;
        let prompt = req.field_str("prompt").unwrap_or_default();
        let (seed_source, input_images) = seed_source(req, &prompt);
        Ok(Self {
            endpoint: req.endpoint,
            family,
            seed_source,
            prompt,
            n: count(req)?,
            width,
            height,
            quality: match req.field_str("quality").as_deref() {
                Some("low") => Quality::Low,
                Some("high") => Quality::High,
                _ => Quality::Medium,
            },
            transparent: family == Family::Gpt && req.field_str("background").as_deref() == Some("transparent"),
            format: output_format(req, family)?,
            response_b64: wants_b64(req, family)?,
            stream: family == Family::Gpt && req.endpoint != Endpoint::Variations && req.stream(),
            partial_images: req
                .field("partial_images")
                .and_then(|v| v.as_u64())
                .map_or(0, |p| p.min(u64::from(MAX_PARTIAL_IMAGES)) as u32),
            input_images,
        })
    }

    fn seed(&self, index: u32) -> u64 {
        render::seed_for(&self.seed_source, index)
    }

    fn size_label(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }

    fn background_label(&self) -> &'static str {
        if self.transparent { "transparent" } else { "opaque" }
    }

    /// `usage` for `images` images (+ `partials` partial images), with all input tokens counted.
    fn usage(&self, images: u32, partials: u32) -> Value {
        let output = self.quality.output_tokens(self.width, self.height) * u64::from(images)
            + TOKENS_PER_PARTIAL * u64::from(partials);
        self.usage_with(output, true)
    }

    fn usage_with(&self, output_tokens: u64, with_input: bool) -> Value {
        let (text, image) = if with_input {
            (self.prompt.chars().count().div_ceil(4) as u64, self.input_images * IMAGE_TOKENS_PER_INPUT)
        } else {
            (0, 0)
        };
        let input = text + image;
        json!({
            "input_tokens": input,
            "input_tokens_details": { "image_tokens": image, "text_tokens": text },
            "output_tokens": output_tokens,
            "total_tokens": input + output_tokens,
        })
    }

    /// Render image `seed` off the async threads and base64 it.
    async fn render_b64(&self, seed: u64) -> anyhow::Result<String> {
        let (w, h, format, transparent) = (self.width, self.height, self.format, self.transparent);
        tokio::task::spawn_blocking(move || {
            render::render_with_background(seed, w, h, format, transparent).map(|b| BASE64.encode(&b))
        })
        .await
        .map_err(|e| anyhow::anyhow!("render task failed: {e}"))?
    }

    /// Every image of the answer, each rendered on its own blocking thread, so `n` images take about as long as
    /// one on a machine with `n` cores.
    async fn render_all_b64(&self) -> anyhow::Result<Vec<String>> {
        futures::future::try_join_all((0..self.n).map(|i| self.render_b64(self.seed(i)))).await
    }

    fn into_stream_reply(self, started: Instant) -> UpstreamReply {
        let steps: Vec<Step> = (0..self.n)
            .flat_map(|image| {
                (0..self.partial_images)
                    .map(move |index| Step::Partial { image, index })
                    .chain(std::iter::once(Step::Completed { image }))
            })
            .collect();
        let events = sse_events(self, steps);
        let mut headers = reply_headers("text/event-stream", started);
        super::mark_event_stream(&mut headers);
        UpstreamReply { status: StatusCode::OK, headers, body: ReplyBody::Stream(events) }
    }

    /// One SSE event, rendered and framed.
    async fn event(&self, step: Step) -> anyhow::Result<Bytes> {
        let (partial_type, completed_type) = match self.endpoint {
            Endpoint::Edits => (events::EDIT_PARTIAL, events::EDIT_COMPLETED),
            Endpoint::Generations | Endpoint::Variations => (events::GENERATION_PARTIAL, events::GENERATION_COMPLETED),
        };
        let (kind, data) = match step {
            Step::Partial { image, index } => {
                let b64 = self.render_b64(partial_seed(self.seed(image), index)).await?;
                let data = json!({
                    "type": partial_type,
                    "b64_json": b64,
                    "created_at": crate::time::now_secs(),
                    "size": self.size_label(),
                    "quality": self.quality.as_str(),
                    "background": self.background_label(),
                    "output_format": self.format.as_str(),
                    "partial_image_index": index,
                });
                (partial_type, data)
            }
            Step::Completed { image } => {
                let b64 = self.render_b64(self.seed(image)).await?;
                // Each completed event bills its own image (and partials); input tokens go on the first, so
                // the events of a stream add up to the usage of the same request unstreamed.
                let output = self.quality.output_tokens(self.width, self.height)
                    + TOKENS_PER_PARTIAL * u64::from(self.partial_images);
                let data = json!({
                    "type": completed_type,
                    "b64_json": b64,
                    "created_at": crate::time::now_secs(),
                    "size": self.size_label(),
                    "quality": self.quality.as_str(),
                    "background": self.background_label(),
                    "output_format": self.format.as_str(),
                    "usage": self.usage_with(output, image == 0),
                });
                (completed_type, data)
            }
        };
        Ok(sse_frame(kind, &data))
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Partial { image: u32, index: u32 },
    Completed { image: u32 },
}

/// A partial image differs from the final one but stays deterministic.
fn partial_seed(seed: u64, index: u32) -> u64 {
    seed.rotate_left(17) ^ (u64::from(index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `event: <type>\ndata: <compact json>\n\n`.
fn sse_frame(kind: &str, data: &Value) -> Bytes {
    let json = serde_json::to_vec(data).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + kind.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The events, produced lazily one at a time; a render failure becomes a final `error` event.
fn sse_events(plan: Plan, steps: Vec<Step>) -> BoxStream<'static, Bytes> {
    let state = (plan, steps.into_iter(), false);
    stream::unfold(state, |(plan, mut steps, failed)| async move {
        if failed {
            return None;
        }
        let step = steps.next()?;
        match plan.event(step).await {
            Ok(frame) => Some((frame, (plan, steps, false))),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "mock upstream failed to render a streamed image");
                let frame = sse_error_event(
                    "The server had an error while processing your request. Sorry about that!",
                    "server_error",
                    None,
                );
                Some((frame, (plan, steps, true)))
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::request::{Form, Part};

    fn mock() -> MockUpstream {
        MockUpstream::new(Url::parse("http://gw.example:8080/").unwrap(), links())
    }

    fn links() -> MockLinks {
        MockLinks::new(b"a key for the tests".to_vec())
    }

    fn json_req(endpoint: Endpoint, body: Value) -> ImageRequest {
        ImageRequest::from_json(endpoint, Bytes::from(serde_json::to_vec(&body).unwrap())).unwrap()
    }

    fn png_part(name: &str, seed: u64) -> Part {
        Part {
            name: name.to_owned(),
            file_name: Some("in.png".to_owned()),
            content_type: Some("image/png".to_owned()),
            data: render::render(seed, 16, 16, OutputFormat::Png).unwrap().into(),
        }
    }

    fn text_part(name: &str, value: &str) -> Part {
        Part { name: name.to_owned(), file_name: None, content_type: None, data: Bytes::from(value.to_owned()).into() }
    }

    fn form_req(endpoint: Endpoint, parts: Vec<Part>) -> ImageRequest {
        ImageRequest::from_form(endpoint, Form { parts })
    }

    async fn send(req: &ImageRequest) -> UpstreamReply {
        mock().send(req, &Attribution::default(), Reading::Whole).await.unwrap()
    }

    async fn send_json(req: &ImageRequest) -> (StatusCode, HeaderMap, Value) {
        let reply = send(req).await;
        let ReplyBody::Full(body) = reply.body else { panic!("expected a full body") };
        (reply.status, reply.headers, serde_json::from_slice(&body).unwrap())
    }

    async fn collect_stream(reply: UpstreamReply) -> Vec<Bytes> {
        let ReplyBody::Stream(s) = reply.body else { panic!("expected a stream") };
        s.collect().await
    }

    fn decode_b64(b64: &Value) -> image::DynamicImage {
        let bytes = BASE64.decode(b64.as_str().unwrap()).unwrap();
        image::load_from_memory(&bytes).unwrap()
    }

    #[tokio::test]
    async fn gpt_generation_has_openai_shape_and_usage() {
        let req = json_req(
            Endpoint::Generations,
            json!({"model":"gpt-image-1","prompt":"a red fox in snow","n":2,"quality":"high","size":"1536x1024"}),
        );
        let (status, headers, body) = send_json(&req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
        assert!(headers[headers::X_UPSTREAM_REQUEST_ID].to_str().unwrap().starts_with("mock_"));
        assert!(headers.contains_key(headers::OPENAI_PROCESSING_MS));
        assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(body["background"], "opaque");
        assert_eq!(body["output_format"], "png");
        assert_eq!(body["size"], "1536x1024");
        assert_eq!(body["quality"], "high");
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        for image in data {
            assert!(image.get("url").is_none() && image.get("revised_prompt").is_none());
            let img = decode_b64(&image["b64_json"]);
            assert_eq!((img.width(), img.height()), (1536, 1024));
        }
        assert_ne!(data[0]["b64_json"], data[1]["b64_json"]);
        let usage = &body["usage"];
        assert_eq!(usage["output_tokens"], 2 * 6208);
        assert_eq!(usage["input_tokens_details"]["text_tokens"], 5); // 17 chars
        assert_eq!(usage["input_tokens_details"]["image_tokens"], 0);
        assert_eq!(usage["input_tokens"], 5);
        assert_eq!(usage["total_tokens"], 5 + 2 * 6208);
    }

    #[tokio::test]
    async fn gpt_defaults_resolve_auto_values() {
        let req = json_req(
            Endpoint::Generations,
            json!({"model":"gpt-image-1.5","prompt":"x","size":"auto","quality":"auto","background":"auto"}),
        );
        let (_, _, body) = send_json(&req).await;
        assert_eq!(body["size"], "1024x1024");
        assert_eq!(body["quality"], "medium");
        assert_eq!(body["background"], "opaque");
        assert_eq!(body["usage"]["output_tokens"], 1056);

        let req = json_req(
            Endpoint::Generations,
            json!({"model":"chatgpt-image-latest","prompt":"x","background":"transparent","output_format":"webp","quality":"low","size":"1024x1536"}),
        );
        let (_, _, body) = send_json(&req).await;
        assert_eq!(body["background"], "transparent");
        assert_eq!(body["output_format"], "webp");
        assert_eq!(body["usage"]["output_tokens"], 408);
        let bytes = BASE64.decode(body["data"][0]["b64_json"].as_str().unwrap()).unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::WebP);
    }

    #[tokio::test]
    async fn same_request_gives_same_images() {
        let req = json_req(Endpoint::Generations, json!({"model":"gpt-image-1","prompt":"same","size":"256x256"}));
        let (_, _, a) = send_json(&req).await;
        let (_, _, b) = send_json(&req).await;
        assert_eq!(a["data"], b["data"]);
    }

    #[tokio::test]
    async fn response_format_is_rejected_for_gpt_models_like_openai() {
        for model in ["gpt-image-1", "gpt-image-2", "chatgpt-image-latest", "some-new-model"] {
            let req = json_req(Endpoint::Generations, json!({"model":model,"prompt":"x","response_format":"b64_json"}));
            let (status, _, body) = send_json(&req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(
                body,
                json!({"error":{"message":"Unknown parameter: 'response_format'.","type":"invalid_request_error","param":"response_format","code":"unknown_parameter"}})
            );
        }
        // null reads as absent.
        let req = json_req(Endpoint::Generations, json!({"model":"gpt-image-1","prompt":"x","response_format":null}));
        assert_eq!(send_json(&req).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn unparseable_size_is_invalid_value() {
        for size in ["big", "0x0", "100000x100000"] {
            let req = json_req(Endpoint::Generations, json!({"model":"dall-e-3","prompt":"x","size":size}));
            let (status, _, body) = send_json(&req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["param"], "size");
            assert_eq!(body["error"]["code"], "invalid_value");
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
    }

    #[tokio::test]
    async fn dalle_urls_point_at_the_mock_file_route_and_expire_in_an_hour() {
        let req = json_req(Endpoint::Generations, json!({"model":"dall-e-2","prompt":"a boat","n":3,"size":"512x512"}));
        let (status, _, body) = send_json(&req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.get("usage").is_none() && body.get("size").is_none());
        let created = body["created"].as_u64().unwrap();
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, image) in data.iter().enumerate() {
            assert!(image.get("b64_json").is_none() && image.get("revised_prompt").is_none());
            let url = Url::parse(image["url"].as_str().unwrap()).unwrap();
            assert_eq!(url.host_str(), Some("gw.example"));
            assert_eq!(url.port(), Some(8080));
            let name = url.path().strip_prefix("/_mock/files/").unwrap();
            let (seed, w, h, format) = parse_file_name(name).unwrap();
            assert_eq!((seed, w, h, format), (render::seed_for("a boat", i as u32), 512, 512, OutputFormat::Png));
            let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
            let se: u64 = q["se"].parse().unwrap();
            assert_eq!(se, created + URL_LIFETIME_SECS);
            assert!(links().verify(name, &q["se"], &q["sig"]), "signed");
        }
    }

    #[tokio::test]
    async fn dalle3_adds_revised_prompt_and_honours_b64_json() {
        let req = json_req(
            Endpoint::Generations,
            json!({"model":"dall-e-3","prompt":"a lighthouse","response_format":"b64_json","size":"1792x1024"}),
        );
        let (status, _, body) = send_json(&req).await;
        assert_eq!(status, StatusCode::OK);
        let image = &body["data"][0];
        assert!(image["revised_prompt"].as_str().unwrap().contains("a lighthouse"));
        assert!(image.get("url").is_none());
        let img = decode_b64(&image["b64_json"]);
        assert_eq!((img.width(), img.height()), (1792, 1024));

        let req = json_req(Endpoint::Generations, json!({"model":"dall-e-3","prompt":"x","response_format":"gif"}));
        let (status, _, body) = send_json(&req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "response_format");
    }

    #[tokio::test]
    async fn default_generation_model_is_dalle2_with_urls() {
        let req = json_req(Endpoint::Generations, json!({"prompt":"x"}));
        let (_, _, body) = send_json(&req).await;
        assert!(body["data"][0]["url"].as_str().unwrap().contains("-1024x1024.png?se="));
    }

    #[test]
    fn public_url_with_a_path_prefix_is_kept() {
        let sig = links().signature("abc.png", 5);
        let m = MockUpstream::new(Url::parse("https://example.com/gw/").unwrap(), links());
        assert_eq!(m.file_url("abc.png", 5), format!("https://example.com/gw/_mock/files/abc.png?se=5&sig={sig}"));
        let m = MockUpstream::new(Url::parse("http://localhost:8080").unwrap(), links());
        assert_eq!(m.file_url("abc.png", 5), format!("http://localhost:8080/_mock/files/abc.png?se=5&sig={sig}"));
    }

    #[test]
    fn links_verify_only_as_signed() {
        let l = links();
        let sig = l.signature("abc.png", 2_000);
        assert!(l.verify("abc.png", "2000", &sig));
        for (name, se, sig) in [
            ("abd.png", "2000", sig.as_str()),
            ("abc.png", "2001", &sig),
            ("abc.png", "02000", &sig),
            ("abc.png", "+2000", &sig),
            ("abc.png", "2000", "AAAA"),
            ("abc.png", "2000", ""),
        ] {
            assert!(!l.verify(name, se, sig), "{name} {se} {sig}");
        }
        assert!(!MockLinks::new(b"another key".to_vec()).verify("abc.png", "2000", &sig));
    }

    #[test]
    fn file_names_round_trip_and_garbage_is_refused() {
        let name = file_name(0xDEAD_BEEF, 256, 512, OutputFormat::Png);
        assert_eq!(name, "00000000deadbeef-256x512.png");
        assert_eq!(parse_file_name(&name), Some((0xDEAD_BEEF, 256, 512, OutputFormat::Png)));
        for bad in [
            "",
            ".png",
            "00000000deadbeef-256x512",
            "00000000deadbeef-256x512.gif",
            "deadbeef-256x512.png",
            "00000000deadbeeg-256x512.png",
            "00000000deadbeef-99999x512.png",
            "00000000deadbeef-0x512.png",
            "00000000deadbeef_256x512.png",
            "../../etc/passwd",
            "00000000deadbeef-256x512.png.png",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn edits_count_input_images_and_use_the_prompt() {
        let req = form_req(
            Endpoint::Edits,
            vec![
                text_part("prompt", "add a hat"),
                text_part("model", "gpt-image-1"),
                png_part("image[]", 1),
                png_part("image[]", 2),
            ],
        );
        let (status, _, body) = send_json(&req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["usage"]["input_tokens_details"]["image_tokens"], 2 * IMAGE_TOKENS_PER_INPUT);
        assert_eq!(body["usage"]["input_tokens_details"]["text_tokens"], 3);
        let decoded = decode_b64(&body["data"][0]["b64_json"]);
        assert_eq!((decoded.width(), decoded.height()), (1024, 1024));
        // Deterministic from the prompt *and* the images: other images (or another order) give another edit.
        let (_, _, again) = send_json(&req).await;
        assert_eq!(again["data"], body["data"]);
        let other = |parts| async move { send_json(&form_req(Endpoint::Edits, parts)).await.2["data"].clone() };
        let base = || vec![text_part("prompt", "add a hat"), text_part("model", "gpt-image-1")];
        let swapped = other([base(), vec![png_part("image[]", 2), png_part("image[]", 1)]].concat()).await;
        let masked =
            other([base(), vec![png_part("image[]", 1), png_part("image[]", 2), png_part("mask", 9)]].concat());
        let third = other([base(), vec![png_part("image[]", 1), png_part("image[]", 3)]].concat()).await;
        for different in [swapped, masked.await, third] {
            assert_ne!(different[0]["b64_json"], body["data"][0]["b64_json"]);
        }
    }

    #[tokio::test]
    async fn variations_seed_from_the_input_image() {
        let a = form_req(Endpoint::Variations, vec![png_part("image", 1), text_part("size", "256x256")]);
        let b = form_req(Endpoint::Variations, vec![png_part("image", 2), text_part("size", "256x256")]);
        let (sa, _, ba) = send_json(&a).await;
        let (_, _, ba2) = send_json(&a).await;
        let (_, _, bb) = send_json(&b).await;
        assert_eq!(sa, StatusCode::OK);
        let url = |v: &Value| v["data"][0]["url"].as_str().unwrap().split('?').next().unwrap().to_owned();
        assert_eq!(url(&ba), url(&ba2));
        assert_ne!(url(&ba), url(&bb));
    }

    fn parse_frames(chunks: &[Bytes]) -> Vec<(String, Value)> {
        chunks
            .iter()
            .map(|chunk| {
                let text = std::str::from_utf8(chunk).unwrap();
                assert!(text.ends_with("\n\n"), "frame must end with a blank line: {text:?}");
                let mut lines = text.trim_end_matches('\n').split('\n');
                let event = lines.next().unwrap().strip_prefix("event: ").unwrap().to_owned();
                let data = lines.next().unwrap().strip_prefix("data: ").unwrap();
                assert!(lines.next().is_none());
                let value: Value = serde_json::from_str(data).unwrap();
                assert_eq!(serde_json::to_string(&value).unwrap(), data, "data must be compact JSON");
                (event, value)
            })
            .collect()
    }

    #[tokio::test]
    async fn streaming_generation_frames_partials_then_completed() {
        let req = json_req(
            Endpoint::Generations,
            json!({"model":"gpt-image-1","prompt":"stream me","stream":true,"partial_images":2,"n":1,"size":"256x256","quality":"low"}),
        );
        let reply = send(&req).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers[http::header::CONTENT_TYPE], "text/event-stream");
        let chunks = collect_stream(reply).await;
        assert_eq!(chunks.len(), 3);
        assert!(chunks[0].starts_with(b"event: image_generation.partial_image\ndata: {\"type\":"));
        let frames = parse_frames(&chunks);
        let kinds: Vec<&str> = frames.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(
            kinds,
            ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
        );
        for (i, (event, data)) in frames.iter().enumerate() {
            assert_eq!(data["type"], *event);
            assert_eq!(data["size"], "256x256");
            assert_eq!(data["quality"], "low");
            assert_eq!(data["background"], "opaque");
            assert_eq!(data["output_format"], "png");
            assert!(data["created_at"].as_u64().unwrap() > 1_700_000_000);
            let img = decode_b64(&data["b64_json"]);
            assert_eq!((img.width(), img.height()), (256, 256));
            if i < 2 {
                assert_eq!(data["partial_image_index"], i);
                assert!(data.get("usage").is_none());
            }
        }
        let usage = &frames[2].1["usage"];
        let out = usage["output_tokens"].as_u64().unwrap();
        assert_eq!(out, (272u64 * 256 * 256).div_ceil(1024 * 1024) + 2 * TOKENS_PER_PARTIAL);
        assert_eq!(usage["total_tokens"].as_u64().unwrap(), out + usage["input_tokens"].as_u64().unwrap());
        assert_eq!(frames[2].1.get("partial_image_index"), None);
    }

    #[tokio::test]
    async fn streaming_edit_uses_edit_events_and_n_images() {
        let req = form_req(
            Endpoint::Edits,
            vec![
                text_part("prompt", "edit"),
                text_part("stream", "true"),
                text_part("n", "2"),
                text_part("size", "64x64"),
                png_part("image", 3),
            ],
        );
        let chunks = collect_stream(send(&req).await).await;
        let frames = parse_frames(&chunks);
        let kinds: Vec<&str> = frames.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(kinds, ["image_edit.completed", "image_edit.completed"]);
        // Input tokens are billed once, on the first completed event.
        assert_eq!(frames[0].1["usage"]["input_tokens_details"]["image_tokens"], IMAGE_TOKENS_PER_INPUT);
        assert_eq!(frames[1].1["usage"]["input_tokens"], 0);
    }

    #[tokio::test]
    async fn stream_is_ignored_for_dalle() {
        let req = json_req(Endpoint::Generations, json!({"model":"dall-e-2","prompt":"x","stream":true}));
        let reply = send(&req).await;
        assert!(matches!(reply.body, ReplyBody::Full(_)));
    }

    #[test]
    fn output_tokens_follow_the_reference_table() {
        assert_eq!(Quality::Low.output_tokens(1024, 1024), 272);
        assert_eq!(Quality::Medium.output_tokens(1024, 1536), 1584);
        assert_eq!(Quality::High.output_tokens(1536, 1024), 6208);
        assert_eq!(Quality::Medium.output_tokens(2048, 2048), 4 * 1056);
        assert_eq!(Quality::Low.output_tokens(1, 1), 1);
    }

    #[test]
    fn name_is_mock() {
        assert_eq!(mock().name(), "mock");
    }
}
