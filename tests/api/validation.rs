//! Validation (`docs/validation.md`): a request that breaks its model's rules gets a `400` in OpenAI's shape
//! naming the parameter and a code, and never reaches the upstream; a valid request, however close to a limit,
//! reaches the upstream exactly as sent.
//!
//! Every table runs against one gateway and one fake; each table reports all of its mismatches at once.

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::app::{TestApp, error_of, png};
use crate::support::fake_openai::{FakeOpenAi, RecordedCall};

const GENERATIONS: &str = "/images/generations";
const EDITS: &str = "/images/edits";
const VARIATIONS: &str = "/images/variations";

const GPT: [&str; 4] = ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "chatgpt-image-latest"];
const GPT2: [&str; 2] = ["gpt-image-2", "gpt-image-2-2026-04-21"];
/// Not a model imagegate knows: with the default policy only the generic checks apply to it.
const UNKNOWN: &str = "my-local-model";

const MIB: usize = 1024 * 1024;
/// The longest `image_url` the JSON edit body takes.
const MAX_IMAGE_URL: usize = 20_971_520;

// --------------------------------------------------------------------------------------------- expectations

/// A JSON request expected to be refused with `400`, `invalid_request_error`, `param` and `code`.
struct JsonCase {
    path: &'static str,
    body: Value,
    param: &'static str,
    code: &'static str,
}

fn generation(body: Value, param: &'static str, code: &'static str) -> JsonCase {
    JsonCase { path: GENERATIONS, body, param, code }
}

fn json_edit(body: Value, param: &'static str, code: &'static str) -> JsonCase {
    JsonCase { path: EDITS, body, param, code }
}

/// A multipart request expected to be refused with `400`, `invalid_request_error`, `param` and `code`.
struct FormCase {
    label: String,
    path: &'static str,
    upload: Upload,
    param: String,
    code: &'static str,
}

fn refused(label: impl Into<String>, path: &'static str, upload: Upload, param: &str, code: &'static str) -> FormCase {
    FormCase { label: label.into(), path, upload, param: param.to_owned(), code }
}

/// `None` when `res` is the expected refusal, else what was wrong. Checks the OpenAI shape like `error_of`, but
/// does not panic, so a table reports every mismatch.
async fn mismatch(res: reqwest::Response, param: &str, code: &str) -> Option<String> {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    let error = serde_json::from_str::<Value>(&text).ok().and_then(|body| body.get("error").cloned());
    let Some(error) = error else {
        return Some(format!("expected 400 {param}/{code}, got {status} without an error object: {}", short(&text)));
    };
    let shaped = ["message", "type", "param", "code"].iter().all(|k| error.get(k).is_some())
        && error["message"].as_str().is_some_and(|m| !m.is_empty());
    let got = (status, error["type"].as_str(), error["param"].as_str(), error["code"].as_str());
    if shaped && got == (400, Some("invalid_request_error"), Some(param), Some(code)) {
        None
    } else {
        Some(format!("expected 400 invalid_request_error {param}/{code}, got {status} {error}"))
    }
}

async fn run_json_table(app: &TestApp, cases: Vec<JsonCase>) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let res = app.post_json(case.path, &case.body).await;
        if let Some(why) = mismatch(res, case.param, case.code).await {
            failures.push(format!("POST {} {}\n    {why}", case.path, short(&case.body.to_string())));
        }
    }
    failures
}

async fn run_form_table(app: &TestApp, cases: Vec<FormCase>) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let res = app.post_form(case.path, case.upload.form()).await;
        if let Some(why) = mismatch(res, &case.param, case.code).await {
            failures.push(format!("POST {} {} [{}]\n    {why}", case.path, case.label, case.upload.describe()));
        }
    }
    failures
}

#[track_caller]
fn assert_all_passed(total: usize, failures: &[String]) {
    assert!(failures.is_empty(), "{} of {total} cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// At most 160 characters of `text` (long prompts stay readable in failure lists).
fn short(text: &str) -> String {
    let count = text.chars().count();
    if count <= 160 {
        text.to_owned()
    } else {
        format!("{}… ({count} chars)", text.chars().take(160).collect::<String>())
    }
}

fn chars(c: char, count: usize) -> String {
    std::iter::repeat_n(c, count).collect()
}

/// `base` with `extra` merged in (later keys win).
fn with(base: &Value, extra: Value) -> Value {
    let mut out = base.clone();
    if let (Some(out), Value::Object(extra)) = (out.as_object_mut(), extra) {
        out.extend(extra);
    }
    out
}

// --------------------------------------------------------------------------------------------- multipart

#[derive(Clone)]
enum Field {
    Text(String),
    File { bytes: Vec<u8>, file_name: String, mime: Option<String> },
}

/// A multipart body under construction, kept as data so it can be sent and compared with what arrived.
#[derive(Clone, Default)]
struct Upload(Vec<(String, Field)>);

impl Upload {
    fn new() -> Self {
        Self::default()
    }

    fn text(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.push((name.to_owned(), Field::Text(value.into())));
        self
    }

    /// A file part declared as `mime`.
    fn file(mut self, name: &str, bytes: Vec<u8>, mime: &str) -> Self {
        let ext = mime.rsplit('/').next().unwrap_or("bin");
        let file_name = format!("{}.{ext}", name.replace(['[', ']'], "_"));
        self.0.push((name.to_owned(), Field::File { bytes, file_name, mime: Some(mime.to_owned()) }));
        self
    }

    /// A file part with no `Content-Type` at all.
    fn untyped_file(mut self, name: &str, bytes: Vec<u8>) -> Self {
        self.0.push((name.to_owned(), Field::File { bytes, file_name: "upload".to_owned(), mime: None }));
        self
    }

    fn png(self, name: &str, bytes: Vec<u8>) -> Self {
        self.file(name, bytes, "image/png")
    }

    fn form(&self) -> Form {
        self.0.iter().fold(Form::new(), |form, (name, field)| match field {
            Field::Text(value) => form.text(name.clone(), value.clone()),
            Field::File { bytes, file_name, mime } => {
                let part = Part::bytes(bytes.clone()).file_name(file_name.clone());
                let part = match mime {
                    Some(mime) => part.mime_str(mime).unwrap(),
                    None => part,
                };
                form.part(name.clone(), part)
            }
        })
    }

    /// `name=value` and `name=<file, type, bytes>`, for failure messages.
    fn describe(&self) -> String {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|(name, field)| match field {
                Field::Text(value) => format!("{name}={}", short(value)),
                Field::File { bytes, mime, .. } => {
                    format!("{name}=<{} {} B>", mime.as_deref().unwrap_or("no type"), bytes.len())
                }
            })
            .collect();
        fields.join(", ")
    }

    /// (name, file name, content type, SHA-256) of every part, in order, as the fake records them.
    fn expected_parts(&self) -> Vec<(String, Option<String>, Option<String>, String)> {
        self.0
            .iter()
            .map(|(name, field)| match field {
                Field::Text(value) => (name.clone(), None, None, sha(value.as_bytes())),
                Field::File { bytes, file_name, mime } => {
                    (name.clone(), Some(file_name.clone()), mime.clone(), sha(bytes))
                }
            })
            .collect()
    }
}

fn recorded_parts(call: &RecordedCall) -> Vec<(String, Option<String>, Option<String>, String)> {
    call.parts.iter().map(|p| (p.name.clone(), p.file_name.clone(), p.content_type.clone(), p.sha256.clone())).collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// --------------------------------------------------------------------------------------------- images

fn encode(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn rgb_png(w: u32, h: u32) -> Vec<u8> {
    png(w, h, false)
}

fn rgba_png(w: u32, h: u32) -> Vec<u8> {
    png(w, h, true)
}

/// Grayscale PNG (colour type `L`), which OpenAI accepts as transparent enough for DALL·E 2.
fn gray_png(w: u32, h: u32) -> Vec<u8> {
    encode(
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(w, h, image::Luma([128]))),
        image::ImageFormat::Png,
    )
}

/// Grayscale + alpha PNG (colour type `LA`).
fn gray_alpha_png(w: u32, h: u32) -> Vec<u8> {
    let pixels = image::ImageBuffer::from_pixel(w, h, image::LumaA([128u8, 0]));
    encode(image::DynamicImage::ImageLumaA8(pixels), image::ImageFormat::Png)
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    encode(
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb([90, 160, 30]))),
        image::ImageFormat::Jpeg,
    )
}

fn webp(w: u32, h: u32) -> Vec<u8> {
    encode(
        image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(w, h, image::Rgba([90, 160, 30, 255]))),
        image::ImageFormat::WebP,
    )
}

/// `data:{mime};base64,{bytes}`, as a browser writes it.
fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn junk(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(7919) % 251) as u8 ^ 0x5a).collect()
}

/// CRC-32 (ISO 3309) as PNG chunks use it.
fn crc32(parts: &[&[u8]]) -> u32 {
    let table: Vec<u32> =
        (0..256u32).map(|n| (0..8).fold(n, |c, _| if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 })).collect();
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &byte in *part {
            crc = table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    crc ^ 0xffff_ffff
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    out
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// About 1 KB of PNG whose IHDR claims `w`x`h` RGBA: signature, IHDR, 1000 bytes of IDAT that no decoder could
/// inflate into that many pixels, IEND. Only a reader that decodes the whole image would notice.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA, deflate, no filter, no interlace
    let mut out = PNG_SIGNATURE.to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(b"IDAT", &junk(1000)));
    out.extend(chunk(b"IEND", &[]));
    out
}

/// `bytes` without its last `n` bytes: the header intact, the end missing.
fn cut(mut bytes: Vec<u8>, n: usize) -> Vec<u8> {
    bytes.truncate(bytes.len() - n);
    bytes
}

/// `png` grown to exactly `total` bytes by a private ancillary chunk before IEND (still a valid PNG).
fn padded_png(png: Vec<u8>, total: usize) -> Vec<u8> {
    let iend = png.len() - 12;
    let filler = total - png.len() - 12;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&png[..iend]);
    out.extend(chunk(b"pdNg", &vec![0u8; filler]));
    out.extend_from_slice(&png[iend..]);
    assert_eq!(out.len(), total);
    out
}

// --------------------------------------------------------------------------------------------- refusals

#[tokio::test]
async fn generic_checks_refuse_missing_prompts_wrong_types_and_out_of_range_n_for_every_model() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let mut cases = Vec::new();
    for model in ["dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-2", UNKNOWN] {
        let base = json!({"model": model, "prompt": "a red fox"});
        cases.extend([
            generation(json!({"model": model}), "prompt", "missing_required_parameter"),
            generation(json!({"model": model, "prompt": null}), "prompt", "missing_required_parameter"),
            generation(with(&base, json!({"prompt": ""})), "prompt", "string_below_min_length"),
            generation(with(&base, json!({"prompt": 42})), "prompt", "invalid_type"),
            generation(with(&base, json!({"prompt": ["a", "b"]})), "prompt", "invalid_type"),
            generation(with(&base, json!({"n": 0})), "n", "integer_below_min_value"),
            generation(with(&base, json!({"n": -3})), "n", "integer_below_min_value"),
            generation(with(&base, json!({"n": 11})), "n", "integer_above_max_value"),
            generation(with(&base, json!({"n": "2"})), "n", "invalid_type"),
            generation(with(&base, json!({"n": 1.5})), "n", "invalid_type"),
            generation(with(&base, json!({"n": true})), "n", "invalid_type"),
            generation(with(&base, json!({"size": 1024})), "size", "invalid_type"),
            generation(with(&base, json!({"user": 12345})), "user", "invalid_type"),
        ]);
        if !model.starts_with("dall-e") {
            cases.extend([
                generation(with(&base, json!({"stream": "true"})), "stream", "invalid_type"),
                generation(with(&base, json!({"stream": 1})), "stream", "invalid_type"),
            ]);
        }
    }
    for model in [json!(5), json!(true), json!(["gpt-image-1"]), json!({"id": "gpt-image-1"})] {
        cases.push(generation(json!({"model": model, "prompt": "a red fox"}), "model", "invalid_type"));
    }
    // String parameters, on a model that takes them (or an unknown one, where only these checks apply).
    let typed: [(&str, &str, Value); 13] = [
        ("dall-e-3", "quality", json!(1)),
        ("dall-e-3", "style", json!(true)),
        ("dall-e-2", "response_format", json!(["url"])),
        ("gpt-image-1", "background", json!({})),
        ("gpt-image-1", "moderation", json!(0)),
        ("gpt-image-1", "output_format", json!(false)),
        ("gpt-image-1", "quality", json!(["high"])),
        (UNKNOWN, "size", json!([1024, 1024])),
        (UNKNOWN, "quality", json!(2)),
        (UNKNOWN, "style", json!(1)),
        (UNKNOWN, "response_format", json!(1)),
        (UNKNOWN, "input_fidelity", json!(5)),
        (UNKNOWN, "background", json!(true)),
    ];
    for (model, param, value) in typed {
        let mut body = json!({"model": model, "prompt": "a red fox"});
        body[param] = value;
        cases.push(generation(body, param, "invalid_type"));
    }
    // Integer parameters.
    let jpeg = json!({"model": "gpt-image-1", "prompt": "a red fox", "output_format": "jpeg"});
    let streamed = json!({"model": "gpt-image-1", "prompt": "a red fox", "stream": true});
    cases.extend([
        generation(with(&jpeg, json!({"output_compression": "50"})), "output_compression", "invalid_type"),
        generation(with(&jpeg, json!({"output_compression": 50.5})), "output_compression", "invalid_type"),
        generation(with(&streamed, json!({"partial_images": "2"})), "partial_images", "invalid_type"),
        generation(with(&streamed, json!({"partial_images": 1.5})), "partial_images", "invalid_type"),
        generation(
            json!({"model": UNKNOWN, "prompt": "x", "output_compression": "high"}),
            "output_compression",
            "invalid_type",
        ),
        generation(json!({"model": UNKNOWN, "prompt": "x", "partial_images": true}), "partial_images", "invalid_type"),
    ]);
    let mut failures = Vec::new();
    let total = cases.len();
    failures.extend(run_json_table(&app, cases).await);

    // The same checks on multipart edits, where text fields are read as their JSON type.
    let image = || Upload::new().png("image", rgb_png(64, 64));
    let form_cases = vec![
        refused(
            "unknown model, no prompt",
            EDITS,
            image().text("model", UNKNOWN),
            "prompt",
            "missing_required_parameter",
        ),
        refused("no prompt", EDITS, image().text("model", "gpt-image-1"), "prompt", "missing_required_parameter"),
        refused(
            "empty prompt",
            EDITS,
            image().text("model", UNKNOWN).text("prompt", ""),
            "prompt",
            "string_below_min_length",
        ),
        refused(
            "n=abc",
            EDITS,
            image().text("model", UNKNOWN).text("prompt", "x").text("n", "abc"),
            "n",
            "invalid_type",
        ),
        refused(
            "n=1.5",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("n", "1.5"),
            "n",
            "invalid_type",
        ),
        refused(
            "n=11",
            EDITS,
            image().text("model", UNKNOWN).text("prompt", "x").text("n", "11"),
            "n",
            "integer_above_max_value",
        ),
        refused(
            "n=0",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("n", "0"),
            "n",
            "integer_below_min_value",
        ),
        refused(
            "stream=yes",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("stream", "yes"),
            "stream",
            "invalid_type",
        ),
        refused(
            "output_compression=abc",
            EDITS,
            image()
                .text("model", "gpt-image-1")
                .text("prompt", "x")
                .text("output_format", "jpeg")
                .text("output_compression", "abc"),
            "output_compression",
            "invalid_type",
        ),
        // Integers in text have one form: plain decimal digits (what validation reads is what the upstream reads).
        refused(
            "n=+2",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("n", "+2"),
            "n",
            "invalid_type",
        ),
        refused(
            "n=' 2'",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("n", " 2"),
            "n",
            "invalid_type",
        ),
        refused(
            "n='2 '",
            EDITS,
            image().text("model", UNKNOWN).text("prompt", "x").text("n", "2 "),
            "n",
            "invalid_type",
        ),
        refused(
            "n=02",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("n", "02"),
            "n",
            "invalid_type",
        ),
        refused(
            "n=2.0",
            EDITS,
            image().text("model", "gpt-image-1").text("prompt", "x").text("n", "2.0"),
            "n",
            "invalid_type",
        ),
        refused(
            "output_compression=+50",
            EDITS,
            image()
                .text("model", "gpt-image-1")
                .text("prompt", "x")
                .text("output_format", "webp")
                .text("output_compression", "+50"),
            "output_compression",
            "invalid_type",
        ),
        refused(
            "partial_images=03",
            EDITS,
            image()
                .text("model", "gpt-image-1")
                .text("prompt", "x")
                .text("stream", "true")
                .text("partial_images", "03"),
            "partial_images",
            "invalid_type",
        ),
        refused(
            "variation n=+1",
            VARIATIONS,
            Upload::new().png("image", rgba_png(64, 64)).text("n", "+1"),
            "n",
            "invalid_type",
        ),
        refused(
            "variation n=11",
            VARIATIONS,
            Upload::new().png("image", rgba_png(64, 64)).text("n", "11"),
            "n",
            "integer_above_max_value",
        ),
        refused(
            "variation n=two",
            VARIATIONS,
            Upload::new().png("image", rgba_png(64, 64)).text("n", "two"),
            "n",
            "invalid_type",
        ),
    ];
    let total = total + form_cases.len();
    failures.extend(run_form_table(&app, form_cases).await);

    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn per_model_generation_rules_refuse_what_the_model_does_not_take() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let d2 = json!({"model": "dall-e-2", "prompt": "a red fox"});
    let mut cases = vec![
        generation(with(&d2, json!({"prompt": chars('a', 1001)})), "prompt", "string_above_max_length"),
        generation(with(&d2, json!({"prompt": chars('é', 1001)})), "prompt", "string_above_max_length"),
        // No model: generations default to dall-e-2 and its rules.
        generation(json!({"prompt": chars('a', 1001)}), "prompt", "string_above_max_length"),
        generation(json!({"prompt": "x", "size": "1536x1024"}), "size", "invalid_value"),
        generation(json!({"prompt": "x", "style": "natural"}), "style", "unsupported_parameter"),
        // No model but a parameter only GPT image models take: OpenAI runs a GPT image model, so its rules apply.
        generation(json!({"prompt": "x", "output_format": "webp", "style": "vivid"}), "style", "unsupported_parameter"),
        generation(
            json!({"prompt": "x", "model": null, "background": "transparent", "output_format": "jpeg"}),
            "background",
            "invalid_value",
        ),
        generation(json!({"prompt": "x", "stream": true, "size": "256x256"}), "size", "invalid_value"),
        generation(json!({"prompt": "x", "moderation": "low", "quality": "standard"}), "quality", "invalid_value"),
        generation(
            json!({"prompt": "x", "partial_images": 4, "stream": true}),
            "partial_images",
            "integer_above_max_value",
        ),
        generation(
            json!({"prompt": "x", "output_format": "png", "output_compression": 50}),
            "output_compression",
            "invalid_value",
        ),
        generation(json!({"prompt": chars('a', 32001), "output_format": "png"}), "prompt", "string_above_max_length"),
        generation(with(&d2, json!({"size": "1792x1024"})), "size", "invalid_value"),
        generation(with(&d2, json!({"size": "1024x1536"})), "size", "invalid_value"),
        generation(with(&d2, json!({"size": "auto"})), "size", "invalid_value"),
        generation(with(&d2, json!({"size": "128x128"})), "size", "invalid_value"),
        generation(with(&d2, json!({"quality": "hd"})), "quality", "invalid_value"),
        generation(with(&d2, json!({"quality": "low"})), "quality", "invalid_value"),
        generation(with(&d2, json!({"style": "vivid"})), "style", "unsupported_parameter"),
        generation(with(&d2, json!({"response_format": "png"})), "response_format", "invalid_value"),
        generation(with(&d2, json!({"background": "opaque"})), "background", "unsupported_parameter"),
        generation(with(&d2, json!({"moderation": "auto"})), "moderation", "unsupported_parameter"),
        generation(with(&d2, json!({"output_format": "png"})), "output_format", "unsupported_parameter"),
        generation(with(&d2, json!({"output_compression": 50})), "output_compression", "unsupported_parameter"),
        generation(with(&d2, json!({"stream": true})), "stream", "unsupported_parameter"),
        // 0 is a value, not "not given".
        generation(with(&d2, json!({"partial_images": 0})), "partial_images", "unsupported_parameter"),
    ];

    let d3 = json!({"model": "dall-e-3", "prompt": "a red fox"});
    cases.extend([
        generation(with(&d3, json!({"n": 2})), "n", "integer_above_max_value"),
        generation(with(&d3, json!({"n": 10})), "n", "integer_above_max_value"),
        generation(with(&d3, json!({"prompt": chars('a', 4001)})), "prompt", "string_above_max_length"),
        generation(with(&d3, json!({"prompt": chars('猫', 4001)})), "prompt", "string_above_max_length"),
        generation(with(&d3, json!({"size": "512x512"})), "size", "invalid_value"),
        generation(with(&d3, json!({"size": "256x256"})), "size", "invalid_value"),
        generation(with(&d3, json!({"size": "1536x1024"})), "size", "invalid_value"),
        generation(with(&d3, json!({"size": "auto"})), "size", "invalid_value"),
        generation(with(&d3, json!({"quality": "low"})), "quality", "invalid_value"),
        generation(with(&d3, json!({"style": "dramatic"})), "style", "invalid_value"),
        generation(with(&d3, json!({"response_format": "webp"})), "response_format", "invalid_value"),
        generation(with(&d3, json!({"background": "transparent"})), "background", "unsupported_parameter"),
        generation(with(&d3, json!({"moderation": "low"})), "moderation", "unsupported_parameter"),
        generation(with(&d3, json!({"output_format": "jpeg"})), "output_format", "unsupported_parameter"),
        generation(with(&d3, json!({"output_compression": 10})), "output_compression", "unsupported_parameter"),
        generation(with(&d3, json!({"stream": true})), "stream", "unsupported_parameter"),
        generation(with(&d3, json!({"partial_images": 1})), "partial_images", "unsupported_parameter"),
    ]);

    for model in GPT.iter().chain(GPT2.iter()) {
        let gpt = json!({"model": model, "prompt": "a red fox"});
        cases.extend([
            generation(with(&gpt, json!({"prompt": chars('a', 32001)})), "prompt", "string_above_max_length"),
            generation(with(&gpt, json!({"quality": "standard"})), "quality", "invalid_value"),
            generation(with(&gpt, json!({"quality": "hd"})), "quality", "invalid_value"),
            generation(with(&gpt, json!({"style": "vivid"})), "style", "unsupported_parameter"),
            // With re-hosting on (the default) GPT image models take url and b64_json; see tests/api/rehost.rs.
            generation(with(&gpt, json!({"response_format": "png"})), "response_format", "invalid_value"),
            generation(
                with(&gpt, json!({"response_format": "url", "stream": true})),
                "response_format",
                "invalid_value",
            ),
            generation(with(&gpt, json!({"background": "clear"})), "background", "invalid_value"),
            generation(
                with(&gpt, json!({"background": "transparent", "output_format": "jpeg"})),
                "background",
                "invalid_value",
            ),
            generation(with(&gpt, json!({"moderation": "high"})), "moderation", "invalid_value"),
            generation(with(&gpt, json!({"output_format": "jpg"})), "output_format", "invalid_value"),
            generation(with(&gpt, json!({"output_format": "gif"})), "output_format", "invalid_value"),
            generation(
                with(&gpt, json!({"output_format": "jpeg", "output_compression": 101})),
                "output_compression",
                "integer_above_max_value",
            ),
            generation(
                with(&gpt, json!({"output_format": "webp", "output_compression": -1})),
                "output_compression",
                "integer_below_min_value",
            ),
            // The default output format is png, lossless: only its own 100 is taken (OpenAI's example sends it).
            generation(with(&gpt, json!({"output_compression": 50})), "output_compression", "invalid_value"),
            generation(
                with(&gpt, json!({"output_format": "png", "output_compression": 99})),
                "output_compression",
                "invalid_value",
            ),
            generation(
                with(&gpt, json!({"output_format": "png", "output_compression": 0})),
                "output_compression",
                "invalid_value",
            ),
            generation(
                with(&gpt, json!({"stream": true, "partial_images": 4})),
                "partial_images",
                "integer_above_max_value",
            ),
            generation(
                with(&gpt, json!({"stream": true, "partial_images": -1})),
                "partial_images",
                "integer_below_min_value",
            ),
        ]);
    }
    for model in GPT {
        let gpt = json!({"model": model, "prompt": "a red fox"});
        for size in ["512x512", "256x256", "1792x1024", "1024x1792", "1536x864", "2048x2048", "3840x2160"] {
            cases.push(generation(with(&gpt, json!({"size": size})), "size", "invalid_value"));
        }
    }
    // input_fidelity is an edit parameter; a generation may carry it, but only with a value and model it can mean.
    for model in ["gpt-image-1", "gpt-image-1.5", "chatgpt-image-latest"] {
        for value in ["bogus", "HIGH", "medium", ""] {
            cases.push(generation(
                json!({"model": model, "prompt": "x", "input_fidelity": value}),
                "input_fidelity",
                "invalid_value",
            ));
        }
    }
    // input_fidelity: not for gpt-image-1-mini nor gpt-image-2 (which always works at high fidelity).
    for model in ["gpt-image-1-mini", "gpt-image-2", "gpt-image-2-2026-04-21"] {
        cases.push(generation(
            json!({"model": model, "prompt": "x", "input_fidelity": "high"}),
            "input_fidelity",
            "unsupported_parameter",
        ));
    }
    for model in ["dall-e-2", "dall-e-3"] {
        cases.push(generation(
            json!({"model": model, "prompt": "x", "input_fidelity": "low"}),
            "input_fidelity",
            "unsupported_parameter",
        ));
    }

    let total = cases.len();
    let failures = run_json_table(&app, cases).await;
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn gpt_image_2_sizes_outside_the_wxh_rules_are_refused() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let sizes = [
        // Each breaks exactly one rule.
        "1000x1000", // not multiples of 16
        "1024x1000",
        "1000x1024",
        "3856x1296", // long edge over 3840
        "1296x3856",
        "3072x1008", // wider than 3:1
        "1008x3072",
        "1024x624", // 638,976 pixels: under 655,360
        "800x800",
        "512x512",
        "256x256",
        "2896x2896", // 8,386,816 pixels: over 8,294,400
        "3840x2176",
        // Not WxH at all.
        "",
        "1024",
        "1024x",
        "x1024",
        "1024X1024",
        "1024*1024",
        "1024x1024x16",
        " 1024x1024",
        "1024x1024 ",
        "1024 x 1024",
        "0x0",
        "0x1024",
        "-1024x1024",
        "1024x-1024",
        "1024.0x1024",
        "99999999999999999999999x1024",
        "AUTO",
        "auto ",
        // Huge numbers: refused with a reason, never an overflow (this one once panicked the gateway).
        "18446744073709551600x18446744073709551600",
        "18446744073709551616x16",
        "4294967296x16",
        "65536x65536",
        "99999x99999",
        // Only plain digits: no signs, no leading zeros.
        "+1024x+1024",
        "+1536x864",
        "01024x1024",
        "1024x01024",
        "01536x0864",
    ];
    let mut cases = Vec::new();
    for model in GPT2 {
        for size in sizes {
            cases.push(generation(
                json!({"model": model, "prompt": "a red fox", "size": size}),
                "size",
                "invalid_value",
            ));
        }
    }

    let total = cases.len();
    let failures = run_json_table(&app, cases).await;
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn edit_rules_refuse_bad_fields_and_models_that_do_not_edit() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let gpt =
        |model: &str| Upload::new().text("model", model).text("prompt", "add a hat").png("image", rgb_png(64, 64));
    let d2 = || Upload::new().text("model", "dall-e-2").text("prompt", "add a hat").png("image", rgba_png(64, 64));

    let mut cases = vec![
        refused("dall-e-3 does not edit", EDITS, gpt("dall-e-3"), "model", "invalid_value"),
        refused(
            "empty prompt",
            EDITS,
            Upload::new().text("model", "gpt-image-1").text("prompt", "").png("image", rgb_png(64, 64)),
            "prompt",
            "string_below_min_length",
        ),
        refused(
            "default model gpt-image-1.5 without a prompt",
            EDITS,
            Upload::new().png("image", rgb_png(64, 64)),
            "prompt",
            "missing_required_parameter",
        ),
        refused(
            "dall-e-2 prompt of 1001 characters",
            EDITS,
            Upload::new().text("model", "dall-e-2").text("prompt", chars('é', 1001)).png("image", rgba_png(64, 64)),
            "prompt",
            "string_above_max_length",
        ),
        refused(
            "gpt-image-1 prompt of 32001 characters",
            EDITS,
            Upload::new().text("model", "gpt-image-1").text("prompt", chars('a', 32001)).png("image", rgb_png(64, 64)),
            "prompt",
            "string_above_max_length",
        ),
        refused("dall-e-2 size", EDITS, d2().text("size", "1536x1024"), "size", "invalid_value"),
        refused("dall-e-2 size auto", EDITS, d2().text("size", "auto"), "size", "invalid_value"),
        refused("dall-e-2 quality", EDITS, d2().text("quality", "hd"), "quality", "invalid_value"),
        refused(
            "dall-e-2 response_format",
            EDITS,
            d2().text("response_format", "png"),
            "response_format",
            "invalid_value",
        ),
        refused("dall-e-2 style", EDITS, d2().text("style", "vivid"), "style", "unsupported_parameter"),
        refused(
            "dall-e-2 background",
            EDITS,
            d2().text("background", "transparent"),
            "background",
            "unsupported_parameter",
        ),
        refused(
            "dall-e-2 output_format",
            EDITS,
            d2().text("output_format", "png"),
            "output_format",
            "unsupported_parameter",
        ),
        refused(
            "dall-e-2 output_compression",
            EDITS,
            d2().text("output_compression", "50"),
            "output_compression",
            "unsupported_parameter",
        ),
        refused("dall-e-2 stream", EDITS, d2().text("stream", "true"), "stream", "unsupported_parameter"),
        refused(
            "dall-e-2 partial_images",
            EDITS,
            d2().text("partial_images", "1"),
            "partial_images",
            "unsupported_parameter",
        ),
        refused(
            "dall-e-2 input_fidelity",
            EDITS,
            d2().text("input_fidelity", "high"),
            "input_fidelity",
            "unsupported_parameter",
        ),
        refused(
            "gpt-image-1-mini takes no input_fidelity",
            EDITS,
            gpt("gpt-image-1-mini").text("input_fidelity", "high"),
            "input_fidelity",
            "unsupported_parameter",
        ),
        refused(
            "gpt-image-1 input_fidelity",
            EDITS,
            gpt("gpt-image-1").text("input_fidelity", "medium"),
            "input_fidelity",
            "invalid_value",
        ),
        refused(
            "gpt-image-1.5 input_fidelity bogus",
            EDITS,
            gpt("gpt-image-1.5").text("input_fidelity", "bogus"),
            "input_fidelity",
            "invalid_value",
        ),
        refused(
            "png with compression 99",
            EDITS,
            gpt("gpt-image-1").text("output_format", "png").text("output_compression", "99"),
            "output_compression",
            "invalid_value",
        ),
        refused(
            "gpt-image-1 response_format",
            EDITS,
            gpt("gpt-image-1").text("response_format", "base64"),
            "response_format",
            "invalid_value",
        ),
        refused(
            "gpt-image-1 style",
            EDITS,
            gpt("gpt-image-1").text("style", "natural"),
            "style",
            "unsupported_parameter",
        ),
        refused(
            "transparent background as jpeg",
            EDITS,
            gpt("gpt-image-1").text("background", "transparent").text("output_format", "jpeg"),
            "background",
            "invalid_value",
        ),
        refused(
            "compression with the default png",
            EDITS,
            gpt("gpt-image-1").text("output_compression", "50"),
            "output_compression",
            "invalid_value",
        ),
        refused(
            "compression over 100",
            EDITS,
            gpt("gpt-image-1").text("output_format", "jpeg").text("output_compression", "101"),
            "output_compression",
            "integer_above_max_value",
        ),
        refused(
            "partial_images=4",
            EDITS,
            gpt("gpt-image-1").text("stream", "true").text("partial_images", "4"),
            "partial_images",
            "integer_above_max_value",
        ),
        refused("gpt-image-1 n=11", EDITS, gpt("gpt-image-1").text("n", "11"), "n", "integer_above_max_value"),
    ];
    for model in GPT {
        for (param, value) in
            [("size", "256x256"), ("size", "1792x1024"), ("size", "1536x864"), ("quality", "standard")]
        {
            cases.push(refused(
                format!("{model} {param}={value}"),
                EDITS,
                gpt(model).text(param, value),
                param,
                "invalid_value",
            ));
        }
    }
    for model in GPT2 {
        cases.extend([
            refused(format!("{model} size"), EDITS, gpt(model).text("size", "1000x1000"), "size", "invalid_value"),
            refused(format!("{model} size"), EDITS, gpt(model).text("size", "2896x2896"), "size", "invalid_value"),
            refused(
                format!("{model} takes no input_fidelity"),
                EDITS,
                gpt(model).text("input_fidelity", "low"),
                "input_fidelity",
                "unsupported_parameter",
            ),
        ]);
    }

    let total = cases.len();
    let failures = run_form_table(&app, cases).await;
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn variation_rules_refuse_other_models_bad_fields_and_bad_images() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let square = || Upload::new().png("image", rgba_png(64, 64));

    let mut cases = Vec::new();
    for model in ["gpt-image-1", "gpt-image-1.5", "gpt-image-2", "chatgpt-image-latest", "dall-e-3"] {
        cases.push(refused(
            format!("{model} has no variations"),
            VARIATIONS,
            square().text("model", model),
            "model",
            "invalid_value",
        ));
    }
    cases.extend([
        refused("no image", VARIATIONS, Upload::new().text("model", "dall-e-2"), "image", "missing_required_parameter"),
        refused("image as text", VARIATIONS, Upload::new().text("image", "cat.png"), "image", "invalid_type"),
        refused("size 1024x1536", VARIATIONS, square().text("size", "1024x1536"), "size", "invalid_value"),
        refused("size auto", VARIATIONS, square().text("size", "auto"), "size", "invalid_value"),
        refused("size 1792x1024", VARIATIONS, square().text("size", "1792x1024"), "size", "invalid_value"),
        refused("n=0", VARIATIONS, square().text("n", "0"), "n", "integer_below_min_value"),
        refused(
            "response_format",
            VARIATIONS,
            square().text("response_format", "png"),
            "response_format",
            "invalid_value",
        ),
        refused("style", VARIATIONS, square().text("style", "vivid"), "style", "unsupported_parameter"),
        refused(
            "output_format",
            VARIATIONS,
            square().text("output_format", "png"),
            "output_format",
            "unsupported_parameter",
        ),
        refused("stream", VARIATIONS, square().text("stream", "true"), "stream", "unsupported_parameter"),
        refused("a mask", VARIATIONS, square().png("mask", rgba_png(64, 64)), "mask", "unsupported_parameter"),
        refused(
            "not square",
            VARIATIONS,
            Upload::new().png("image", rgba_png(64, 32)),
            "image",
            "invalid_image_format",
        ),
        refused(
            "a JPEG",
            VARIATIONS,
            Upload::new().file("image", jpeg(64, 64), "image/jpeg"),
            "image",
            "unsupported_file_mimetype",
        ),
        refused(
            "a WebP",
            VARIATIONS,
            Upload::new().file("image", webp(64, 64), "image/webp"),
            "image",
            "unsupported_file_mimetype",
        ),
        refused("random bytes", VARIATIONS, Upload::new().png("image", junk(2048)), "image", "invalid_image_format"),
        refused(
            "two images",
            VARIATIONS,
            Upload::new().png("image[]", rgba_png(64, 64)).png("image[]", rgba_png(64, 64)),
            "image",
            "too_many_images",
        ),
        refused(
            "4 MiB + 1 byte",
            VARIATIONS,
            Upload::new().png("image", padded_png(rgba_png(64, 64), 4 * MIB + 1)),
            "image",
            "image_too_large",
        ),
    ]);

    let total = cases.len();
    let failures = run_form_table(&app, cases).await;
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn files_are_checked_by_their_bytes_and_headers() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let gpt = || Upload::new().text("model", "gpt-image-1").text("prompt", "add a hat");
    let d2 = || Upload::new().text("model", "dall-e-2").text("prompt", "add a hat");
    let image = "image";

    let mut cases = vec![
        // Presence and declared types.
        refused("no image", EDITS, gpt(), image, "missing_required_parameter"),
        refused(
            "default model, no image",
            EDITS,
            Upload::new().text("prompt", "x"),
            image,
            "missing_required_parameter",
        ),
        refused("only a mask", EDITS, gpt().png("mask", rgba_png(64, 64)), image, "missing_required_parameter"),
        refused(
            "a text field named image",
            EDITS,
            gpt().text("image", "https://example.com/cat.png"),
            image,
            "invalid_type",
        ),
        // A part declared with no type or application/octet-stream is mended from its bytes (issue 14):
        // tests/api/models.rs.
        refused(
            "declared text/plain",
            EDITS,
            gpt().file("image", rgb_png(64, 64), "text/plain"),
            image,
            "unsupported_file_mimetype",
        ),
        refused(
            "declared image/gif",
            EDITS,
            gpt().file("image", rgb_png(64, 64), "image/gif"),
            image,
            "unsupported_file_mimetype",
        ),
        // OpenAI lists exactly image/jpeg, image/png and image/webp; image/jpg is not among them.
        refused(
            "declared image/jpg",
            EDITS,
            gpt().file("image", jpeg(64, 64), "image/jpg"),
            image,
            "unsupported_file_mimetype",
        ),
        refused(
            "second image declared image/jpg",
            EDITS,
            gpt().png("image[]", rgb_png(64, 64)).file("image[]", jpeg(64, 64), "image/jpg"),
            "image[1]",
            "unsupported_file_mimetype",
        ),
        // Bytes.
        refused(
            "PNG bytes declared image/jpeg",
            EDITS,
            gpt().file("image", rgb_png(64, 64), "image/jpeg"),
            image,
            "invalid_image_format",
        ),
        refused(
            "JPEG bytes declared image/png",
            EDITS,
            gpt().png("image", jpeg(64, 64)),
            image,
            "invalid_image_format",
        ),
        refused(
            "WebP bytes declared image/jpeg",
            EDITS,
            gpt().file("image", webp(64, 64), "image/jpeg"),
            image,
            "invalid_image_format",
        ),
        refused(
            "PNG bytes declared image/webp",
            EDITS,
            gpt().file("image", rgba_png(64, 64), "image/webp"),
            image,
            "invalid_image_format",
        ),
        refused(
            "random bytes declared image/png",
            EDITS,
            gpt().png("image", junk(4096)),
            image,
            "invalid_image_format",
        ),
        refused("an empty file", EDITS, gpt().png("image", Vec::new()), image, "invalid_image_format"),
        refused(
            "a truncated PNG",
            EDITS,
            gpt().png("image", rgb_png(64, 64)[..16].to_vec()),
            image,
            "invalid_image_format",
        ),
        refused(
            "only the PNG signature",
            EDITS,
            gpt().png("image", PNG_SIGNATURE.to_vec()),
            image,
            "invalid_image_format",
        ),
        refused(
            "a truncated JPEG",
            EDITS,
            gpt().file("image", jpeg(64, 64)[..4].to_vec(), "image/jpeg"),
            image,
            "invalid_image_format",
        ),
        // Cut short after an intact header: the file's end is checked too, without decoding anything.
        refused(
            "the first 40 bytes of a valid PNG",
            EDITS,
            gpt().png("image", rgb_png(64, 64)[..40].to_vec()),
            image,
            "invalid_image_format",
        ),
        refused(
            "a PNG missing its last byte",
            EDITS,
            gpt().png("image", cut(rgb_png(64, 64), 1)),
            image,
            "invalid_image_format",
        ),
        refused(
            "second image a JPEG without its end marker",
            EDITS,
            gpt().png("image[]", rgb_png(64, 64)).file("image[]", cut(jpeg(64, 64), 2), "image/jpeg"),
            "image[1]",
            "invalid_image_format",
        ),
        refused(
            "a WebP shorter than its RIFF size",
            EDITS,
            gpt().file("image", cut(webp(64, 64), 4), "image/webp"),
            image,
            "invalid_image_format",
        ),
        refused(
            "dall-e-2 a truncated PNG",
            EDITS,
            d2().png("image", cut(rgba_png(64, 64), 12)),
            image,
            "invalid_image_format",
        ),
        refused(
            "variation: a truncated PNG",
            VARIATIONS,
            Upload::new().png("image", rgba_png(64, 64)[..60].to_vec()),
            image,
            "invalid_image_format",
        ),
        refused(
            "unknown model: a truncated PNG",
            EDITS,
            Upload::new().text("model", UNKNOWN).text("prompt", "x").png("image", cut(rgb_png(64, 64), 12)),
            image,
            "invalid_image_format",
        ),
        // Dimensions, from the header alone.
        refused(
            "1 KB claiming 100000x100000",
            EDITS,
            gpt().png("image", png_claiming(100_000, 100_000)),
            image,
            "invalid_image_dimensions",
        ),
        refused(
            "claiming 16385x16",
            EDITS,
            gpt().png("image", png_claiming(16_385, 16)),
            image,
            "invalid_image_dimensions",
        ),
        refused(
            "claiming 16x16385",
            EDITS,
            gpt().png("image", png_claiming(16, 16_385)),
            image,
            "invalid_image_dimensions",
        ),
        // dall-e-2: exactly one square PNG under 4 MiB, with transparency unless there is a mask.
        refused("dall-e-2 not square", EDITS, d2().png("image", rgba_png(64, 32)), image, "invalid_image_format"),
        refused(
            "dall-e-2 a JPEG",
            EDITS,
            d2().file("image", jpeg(64, 64), "image/jpeg"),
            image,
            "unsupported_file_mimetype",
        ),
        refused(
            "dall-e-2 a WebP",
            EDITS,
            d2().file("image", webp(64, 64), "image/webp"),
            image,
            "unsupported_file_mimetype",
        ),
        refused(
            "dall-e-2 two images",
            EDITS,
            d2().png("image[]", rgba_png(64, 64)).png("image[]", rgba_png(64, 64)),
            image,
            "too_many_images",
        ),
        refused(
            "dall-e-2 RGB without a mask",
            EDITS,
            d2().png("image", rgb_png(64, 64)),
            image,
            "invalid_image_format",
        ),
        refused(
            "dall-e-2 4 MiB + 1 byte",
            EDITS,
            d2().png("image", padded_png(rgba_png(64, 64), 4 * MIB + 1)),
            image,
            "image_too_large",
        ),
        // GPT image: at most 16 images, each under 50 MiB; errors name the image by arrival index.
        refused(
            "17 images",
            EDITS,
            (0..17).fold(gpt(), |u, i| u.png("image[]", rgb_png(16 + i, 16))),
            image,
            "too_many_images",
        ),
        refused(
            "second image is random bytes",
            EDITS,
            gpt().png("image[]", rgb_png(64, 64)).png("image[]", junk(512)),
            "image[1]",
            "invalid_image_format",
        ),
        refused(
            "second image is a PNG declared image/jpeg",
            EDITS,
            gpt().file("image[]", jpeg(64, 64), "image/jpeg").file("image[]", rgb_png(64, 64), "image/jpeg"),
            "image[1]",
            "invalid_image_format",
        ),
        refused(
            "second image claims 100000x100000",
            EDITS,
            gpt().png("image[]", rgb_png(64, 64)).png("image[]", png_claiming(100_000, 100_000)),
            "image[1]",
            "invalid_image_dimensions",
        ),
        refused(
            "indexes count arrival order, not the names",
            EDITS,
            gpt().png("image[1]", rgb_png(64, 64)).png("image[0]", junk(512)),
            "image[1]",
            "invalid_image_format",
        ),
        refused(
            "second image of 50 MiB + 1 KiB",
            EDITS,
            gpt().png("image[]", rgb_png(64, 64)).png("image[]", padded_png(rgb_png(64, 64), 50 * MIB + 1024)),
            "image[1]",
            "image_too_large",
        ),
        // The mask: a PNG with alpha, under 4 MiB, the first image's size.
        refused(
            "an RGB mask",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", rgb_png(64, 64)),
            "mask",
            "invalid_image_format",
        ),
        refused(
            "a grayscale mask",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", gray_png(64, 64)),
            "mask",
            "invalid_image_format",
        ),
        refused(
            "a JPEG mask",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", jpeg(64, 64)),
            "mask",
            "invalid_image_format",
        ),
        refused(
            "a random-bytes mask",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", junk(256)),
            "mask",
            "invalid_image_format",
        ),
        refused(
            "a mask smaller than the image",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", rgba_png(32, 32)),
            "mask",
            "invalid_image_dimensions",
        ),
        refused(
            "a mask the size of the second image, not the first",
            EDITS,
            gpt().png("image[]", rgb_png(64, 64)).png("image[]", rgb_png(32, 32)).png("mask", rgba_png(32, 32)),
            "mask",
            "invalid_image_dimensions",
        ),
        refused(
            "a mask of the same area, transposed",
            EDITS,
            gpt().png("image", rgb_png(64, 32)).png("mask", rgba_png(32, 64)),
            "mask",
            "invalid_image_dimensions",
        ),
        refused(
            "dall-e-2 mask of another size",
            EDITS,
            d2().png("image", rgba_png(64, 64)).png("mask", rgba_png(128, 128)),
            "mask",
            "invalid_image_dimensions",
        ),
        refused(
            "a mask of 4 MiB + 1 byte",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", padded_png(rgba_png(64, 64), 4 * MIB + 1)),
            "mask",
            "image_too_large",
        ),
        // The mask's declared type is checked and matched to its bytes, as the images' are.
        refused(
            "a PNG mask declared image/jpeg",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).file("mask", rgba_png(64, 64), "image/jpeg"),
            "mask",
            "unsupported_file_mimetype",
        ),
        refused(
            "a WebP mask declared image/png",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", webp(64, 64)),
            "mask",
            "invalid_image_format",
        ),
        refused(
            "a mask claiming 100000x100000",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", png_claiming(100_000, 100_000)),
            "mask",
            "invalid_image_dimensions",
        ),
        refused(
            "a truncated mask",
            EDITS,
            gpt().png("image", rgb_png(64, 64)).png("mask", cut(rgba_png(64, 64), 12)),
            "mask",
            "invalid_image_format",
        ),
        refused(
            "dall-e-2 mask declared image/webp",
            EDITS,
            d2().png("image", rgb_png(64, 64)).file("mask", rgba_png(64, 64), "image/webp"),
            "mask",
            "unsupported_file_mimetype",
        ),
        refused(
            "unknown model: a mask claiming 100000x100000",
            EDITS,
            Upload::new()
                .text("model", UNKNOWN)
                .text("prompt", "x")
                .png("image", rgb_png(64, 64))
                .png("mask", png_claiming(100_000, 100_000)),
            "mask",
            "invalid_image_dimensions",
        ),
    ];
    // Every GPT image model gets the byte checks.
    for model in GPT.iter().chain(GPT2.iter()) {
        let upload = Upload::new().text("model", *model).text("prompt", "x");
        cases.push(refused(
            format!("{model}: random bytes"),
            EDITS,
            upload.clone().png("image", junk(300)),
            image,
            "invalid_image_format",
        ));
        cases.push(refused(
            format!("{model}: claiming 100000x100000"),
            EDITS,
            upload.png("image", png_claiming(100_000, 100_000)),
            image,
            "invalid_image_dimensions",
        ));
    }

    let total = cases.len();
    let failures = run_form_table(&app, cases).await;
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn a_png_claiming_100000x100000_is_refused_from_its_header_without_an_upstream_call() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let bomb = png_claiming(100_000, 100_000);
    assert!(bomb.len() < 1100, "{}", bomb.len());

    let started = std::time::Instant::now();
    let upload = Upload::new().text("model", "gpt-image-1").text("prompt", "x").png("image", bomb);
    let res = app.post_form(EDITS, upload.form()).await;

    assert_eq!(mismatch(res, "image", "invalid_image_dimensions").await, None);
    // Decoding 10^10 pixels would take far longer (or run out of memory).
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn the_json_edit_body_rules_refuse_bad_image_references() {
    let fake = FakeOpenAi::start().await;
    // Room for an `image_url` over the 20,971,520-character limit.
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_json_body = bytesize::ByteSize::mib(32)).await;
    let url = json!({"image_url": "https://example.com/cat.png"});
    let base = json!({"model": "gpt-image-1", "prompt": "add a hat", "images": [url]});
    let too_long = format!("data:image/png;base64,{}", chars('A', MAX_IMAGE_URL + 1 - "data:image/png;base64,".len()));

    let cases = vec![
        json_edit(json!({"model": "gpt-image-1", "prompt": "x"}), "images", "missing_required_parameter"),
        json_edit(with(&base, json!({"images": null})), "images", "missing_required_parameter"),
        json_edit(with(&base, json!({"images": []})), "images", "missing_required_parameter"),
        json_edit(with(&base, json!({"images": "https://example.com/cat.png"})), "images", "invalid_type"),
        json_edit(with(&base, json!({"images": url})), "images", "invalid_type"),
        json_edit(with(&base, json!({"images": vec![url.clone(); 17]})), "images", "too_many_images"),
        json_edit(with(&base, json!({"images": [5]})), "images[0]", "invalid_type"),
        json_edit(with(&base, json!({"images": ["https://example.com/cat.png"]})), "images[0]", "invalid_type"),
        json_edit(with(&base, json!({"images": [{}]})), "images[0]", "invalid_value"),
        json_edit(
            with(&base, json!({"images": [{"image_url": "https://example.com/a.png", "file_id": "file-abc"}]})),
            "images[0]",
            "invalid_value",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": "ftp://example.com/a.png"}]})),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": "example.com/a.png"}]})),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(with(&base, json!({"images": [{"image_url": ""}]})), "images[0].image_url", "invalid_value"),
        json_edit(
            with(&base, json!({"images": [{"image_url": "data:text/plain;base64,aGk="}]})),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": "data:image/png,rawbytes"}]})),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(with(&base, json!({"images": [{"image_url": 7}]})), "images[0].image_url", "invalid_type"),
        json_edit(with(&base, json!({"images": [{"file_id": 7}]})), "images[0].file_id", "invalid_type"),
        json_edit(
            with(&base, json!({"images": [url, {"image_url": "ftp://example.com/b.png"}]})),
            "images[1].image_url",
            "invalid_value",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": too_long}]})),
            "images[0].image_url",
            "string_above_max_length",
        ),
        json_edit(with(&base, json!({"mask": "https://example.com/mask.png"})), "mask", "invalid_type"),
        json_edit(with(&base, json!({"mask": {}})), "mask", "invalid_value"),
        json_edit(
            with(&base, json!({"mask": {"image_url": "ftp://example.com/m.png"}})),
            "mask.image_url",
            "invalid_value",
        ),
        json_edit(with(&base, json!({"model": "dall-e-2"})), "model", "invalid_value"),
        json_edit(with(&base, json!({"model": "dall-e-3"})), "model", "invalid_value"),
        json_edit(json!({"model": "gpt-image-1", "images": [url]}), "prompt", "missing_required_parameter"),
        json_edit(with(&base, json!({"prompt": ""})), "prompt", "string_below_min_length"),
        json_edit(with(&base, json!({"prompt": chars('a', 32001)})), "prompt", "string_above_max_length"),
        json_edit(with(&base, json!({"size": "256x256"})), "size", "invalid_value"),
        json_edit(with(&base, json!({"model": "gpt-image-2", "size": "1000x1000"})), "size", "invalid_value"),
        json_edit(with(&base, json!({"quality": "standard"})), "quality", "invalid_value"),
        json_edit(with(&base, json!({"response_format": "png"})), "response_format", "invalid_value"),
        json_edit(with(&base, json!({"style": "vivid"})), "style", "unsupported_parameter"),
        json_edit(
            with(&base, json!({"model": "gpt-image-1-mini", "input_fidelity": "high"})),
            "input_fidelity",
            "unsupported_parameter",
        ),
        json_edit(with(&base, json!({"moderation": "high"})), "moderation", "invalid_value"),
        json_edit(with(&base, json!({"n": 11})), "n", "integer_above_max_value"),
        json_edit(
            with(&base, json!({"stream": true, "partial_images": 4})),
            "partial_images",
            "integer_above_max_value",
        ),
        json_edit(
            with(&base, json!({"background": "transparent", "output_format": "jpeg"})),
            "background",
            "invalid_value",
        ),
        // The default model (gpt-image-1.5) follows the same rules.
        json_edit(
            json!({"prompt": "x", "images": [{"image_url": "ftp://x/y.png"}]}),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(with(&base, json!({"input_fidelity": "bogus"})), "input_fidelity", "invalid_value"),
        json_edit(
            with(&base, json!({"output_format": "png", "output_compression": 80})),
            "output_compression",
            "invalid_value",
        ),
        // data: URLs are files: checked by their bytes (only the first and last bytes are decoded).
        json_edit(
            with(&base, json!({"images": [{"image_url": data_url("image/png", b"not an image at all")}]})),
            "images[0].image_url",
            "invalid_image_format",
        ),
        json_edit(
            with(
                &base,
                json!({"images": [url, {"image_url": data_url("image/png", &png_claiming(100_000, 100_000))}]}),
            ),
            "images[1].image_url",
            "invalid_image_dimensions",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": data_url("image/jpeg", &rgb_png(64, 64))}]})),
            "images[0].image_url",
            "invalid_image_format",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": data_url("image/gif", &rgb_png(64, 64))}]})),
            "images[0].image_url",
            "unsupported_file_mimetype",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": data_url("image/jpg", &jpeg(64, 64))}]})),
            "images[0].image_url",
            "unsupported_file_mimetype",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": data_url("image/png", &rgb_png(64, 64)[..40])}]})),
            "images[0].image_url",
            "invalid_image_format",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": "data:image/png;base64,iVBO*w0KGgo="}]})),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(
            with(&base, json!({"images": [{"image_url": "data:image/png;base64,iVBORw0KGgo===="}]})),
            "images[0].image_url",
            "invalid_value",
        ),
        json_edit(
            with(&base, json!({"mask": {"image_url": data_url("image/png", &rgb_png(64, 64))}})),
            "mask.image_url",
            "invalid_image_format",
        ),
        json_edit(
            with(
                &base,
                json!({
                    "images": [{"image_url": data_url("image/png", &rgb_png(64, 64))}],
                    "mask": {"image_url": data_url("image/png", &rgba_png(32, 32))},
                }),
            ),
            "mask.image_url",
            "invalid_image_dimensions",
        ),
        json_edit(
            with(&base, json!({"mask": {"image_url": data_url("image/webp", &webp(64, 64))}})),
            "mask.image_url",
            "unsupported_file_mimetype",
        ),
        json_edit(
            with(
                &base,
                json!({"mask": {"image_url": data_url("image/png", &padded_png(rgba_png(64, 64), 4 * MIB + 1))}}),
            ),
            "mask.image_url",
            "image_too_large",
        ),
        json_edit(
            json!({"model": UNKNOWN, "prompt": "x", "images": [{"image_url": data_url("image/png", b"GIF89a....")}]}),
            "images[0].image_url",
            "invalid_image_format",
        ),
    ];

    let total = cases.len();
    let failures = run_json_table(&app, cases).await;
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

#[tokio::test]
async fn unknown_models_are_refused_when_the_policy_says_reject() {
    let fake = FakeOpenAi::start().await;
    let app =
        TestApp::spawn_with(&fake.url, |s| s.validation.unknown_models = imagegate::config::UnknownModels::Reject)
            .await;

    let mut cases = Vec::new();
    for model in [UNKNOWN, "gpt-image-3", "dall-e-4", "", "GPT-IMAGE-1", "Dall-E-2", "gpt-image-1 ", "gpt-image"] {
        cases.push(generation(json!({"model": model, "prompt": "a red fox"}), "model", "invalid_value"));
    }
    cases.extend([
        generation(json!({"model": 5, "prompt": "a red fox"}), "model", "invalid_type"),
        json_edit(
            json!({"model": UNKNOWN, "prompt": "x", "images": [{"image_url": "https://example.com/a.png"}]}),
            "model",
            "invalid_value",
        ),
    ]);
    let mut failures = Vec::new();
    let mut total = cases.len();
    failures.extend(run_json_table(&app, cases).await);
    let form_cases = vec![
        refused(
            "edit with an unknown model",
            EDITS,
            Upload::new().text("model", UNKNOWN).text("prompt", "x").png("image", rgb_png(64, 64)),
            "model",
            "invalid_value",
        ),
        refused(
            "variation with an unknown model",
            VARIATIONS,
            Upload::new().text("model", UNKNOWN).png("image", rgba_png(64, 64)),
            "model",
            "invalid_value",
        ),
    ];
    total += form_cases.len();
    failures.extend(run_form_table(&app, form_cases).await);
    assert_all_passed(total, &failures);
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");

    // Known models, and requests naming none, still go through.
    for body in [
        json!({"model": "gpt-image-1", "prompt": "a red fox"}),
        json!({"model": "gpt-image-2-2026-04-21", "prompt": "a red fox", "size": "1536x864"}),
        json!({"prompt": "a red fox"}),
    ] {
        let res = app.post_json(GENERATIONS, &body).await;
        assert_eq!(res.status(), 200, "{body}: {}", res.text().await.unwrap());
        assert_eq!(fake.last_call().unwrap().json, Some(body));
    }
    let edit = Upload::new().text("prompt", "x").png("image", rgb_png(64, 64));
    assert_eq!(app.post_form(EDITS, edit.form()).await.status(), 200);
    let variation = Upload::new().png("image", rgba_png(64, 64));
    assert_eq!(app.post_form(VARIATIONS, variation.form()).await.status(), 200);
    assert_eq!(fake.call_count(), 5);
}

#[tokio::test]
async fn an_invalid_value_error_lists_what_is_allowed_and_a_long_prompt_error_states_the_limit() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.post_json(GENERATIONS, &json!({"model": "gpt-image-1", "prompt": "x", "size": "512x512"})).await;
    let (status, error) = error_of(res).await;
    assert_eq!((status, &error["param"], &error["code"]), (400, &json!("size"), &json!("invalid_value")));
    let message = error["message"].as_str().unwrap();
    for needle in ["512x512", "auto", "1024x1024", "1536x1024", "1024x1536"] {
        assert!(message.contains(needle), "{needle} missing from {message}");
    }

    let res = app.post_json(GENERATIONS, &json!({"model": "dall-e-2", "prompt": chars('é', 1001)})).await;
    let (status, error) = error_of(res).await;
    assert_eq!((status, &error["param"], &error["code"]), (400, &json!("prompt"), &json!("string_above_max_length")));
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("1000") && message.contains("1001"), "{message}");

    let res = app.post_json(GENERATIONS, &json!({"model": "gpt-image-1", "prompt": "x", "style": "vivid"})).await;
    let (status, error) = error_of(res).await;
    assert_eq!((status, &error["param"], &error["code"]), (400, &json!("style"), &json!("unsupported_parameter")));
    assert!(error["message"].as_str().unwrap().contains("gpt-image-1"), "{error}");
    assert_eq!(fake.call_count(), 0);
}

// --------------------------------------------------------------------------------------------- acceptance

/// Sends each body; every one must answer 200 and reach the upstream exactly as sent.
async fn assert_json_forwarded_unchanged(app: &TestApp, fake: &FakeOpenAi, path: &str, bodies: Vec<Value>) {
    let mut failures = Vec::new();
    let total = bodies.len();
    for body in bodies {
        let before = fake.call_count();
        let res = app.post_json(path, &body).await;
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let label = short(&body.to_string());
        if status != 200 {
            failures.push(format!("POST {path} {label}\n    expected 200, got {status}: {}", short(&text)));
        } else if fake.call_count() != before + 1 {
            failures.push(format!("POST {path} {label}\n    expected one upstream call"));
        } else if fake.last_call().and_then(|c| c.json) != Some(body) {
            failures.push(format!("POST {path} {label}\n    the upstream received a different body"));
        }
    }
    assert_all_passed(total, &failures);
}

/// Sends each form; every one must answer 200 and reach the upstream part for part.
async fn assert_forms_forwarded_unchanged(app: &TestApp, fake: &FakeOpenAi, cases: Vec<(&str, &'static str, Upload)>) {
    let mut failures = Vec::new();
    let total = cases.len();
    for (label, path, upload) in cases {
        let before = fake.call_count();
        let res = app.post_form(path, upload.form()).await;
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let label = format!("POST {path} {label} [{}]", upload.describe());
        if status != 200 {
            failures.push(format!("{label}\n    expected 200, got {status}: {}", short(&text)));
        } else if fake.call_count() != before + 1 {
            failures.push(format!("{label}\n    expected one upstream call"));
        } else if fake.last_call().map(|c| recorded_parts(&c)) != Some(upload.expected_parts()) {
            failures.push(format!("{label}\n    the upstream received different parts"));
        }
    }
    assert_all_passed(total, &failures);
}

#[tokio::test]
async fn valid_generations_at_every_boundary_reach_the_upstream_unchanged() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let mut bodies = vec![
        // Prompt lengths count characters, not bytes.
        json!({"model": "dall-e-2", "prompt": chars('a', 1000)}),
        json!({"model": "dall-e-2", "prompt": chars('é', 1000)}),
        json!({"model": "dall-e-2", "prompt": chars('😀', 1000)}),
        json!({"prompt": chars('猫', 1000)}),
        json!({"model": "dall-e-3", "prompt": chars('é', 4000)}),
        json!({"model": "gpt-image-1", "prompt": chars('a', 32000)}),
        json!({"model": "gpt-image-2", "prompt": chars('猫', 32000)}),
        json!({"model": "dall-e-2", "prompt": "x"}),
        // n.
        json!({"model": "dall-e-2", "prompt": "x", "n": 10}),
        json!({"model": "dall-e-2", "prompt": "x", "n": 1}),
        json!({"model": "dall-e-3", "prompt": "x", "n": 1}),
        json!({"model": "gpt-image-1", "prompt": "x", "n": 10}),
        // Every DALL·E value.
        json!({"model": "dall-e-2", "prompt": "x", "size": "256x256", "quality": "standard", "response_format": "url"}),
        json!({"model": "dall-e-2", "prompt": "x", "size": "512x512", "response_format": "b64_json", "stream": false}),
        json!({"model": "dall-e-2", "prompt": "x", "size": "1024x1024", "user": "user-1234"}),
        json!({"model": "dall-e-3", "prompt": "x", "size": "1024x1024", "quality": "standard", "style": "vivid"}),
        json!({"model": "dall-e-3", "prompt": "x", "size": "1792x1024", "quality": "hd", "style": "natural", "response_format": "b64_json"}),
        json!({"model": "dall-e-3", "prompt": "x", "size": "1024x1792", "response_format": "url", "stream": false}),
        // `auto` is the spec's default quality for every model; Haystack sends it for dall-e-3 (issue 14).
        json!({"model": "dall-e-3", "prompt": "x", "quality": "auto"}),
        json!({"model": "dall-e-2", "prompt": "x", "quality": "auto"}),
        // gpt-image-2 sizes at every limit.
        json!({"model": "gpt-image-2", "prompt": "x", "size": "1536x864"}),
        json!({"model": "gpt-image-2", "prompt": "x", "size": "3840x2160"}),
        json!({"model": "gpt-image-2", "prompt": "x", "size": "2160x3840"}),
        json!({"model": "gpt-image-2", "prompt": "x", "size": "2880x2880"}), // exactly 8,294,400 pixels
        json!({"model": "gpt-image-2", "prompt": "x", "size": "1024x640"}),  // exactly 655,360 pixels
        json!({"model": "gpt-image-2", "prompt": "x", "size": "3072x1024"}), // exactly 3:1
        json!({"model": "gpt-image-2", "prompt": "x", "size": "1024x3072"}),
        json!({"model": "gpt-image-2", "prompt": "x", "size": "3840x1280"}), // 3:1 on the longest edge
        json!({"model": "gpt-image-2", "prompt": "x", "size": "1792x1024"}), // a dall-e-3 size that fits the rules
        json!({"model": "gpt-image-2", "prompt": "x", "size": "auto"}),
        json!({"model": "gpt-image-2-2026-04-21", "prompt": "x", "size": "3840x2160", "n": 10}),
        // Output options.
        json!({"model": "gpt-image-1", "prompt": "x", "output_format": "jpeg", "output_compression": 0}),
        json!({"model": "gpt-image-1", "prompt": "x", "output_format": "jpeg", "output_compression": 100}),
        json!({"model": "gpt-image-1.5", "prompt": "x", "output_format": "webp", "output_compression": 50}),
        json!({"model": "gpt-image-1", "prompt": "x", "background": "transparent"}),
        json!({"model": "gpt-image-1", "prompt": "x", "background": "transparent", "output_format": "png"}),
        json!({"model": "gpt-image-1-mini", "prompt": "x", "background": "transparent", "output_format": "webp"}),
        json!({"model": "gpt-image-1", "prompt": "x", "background": "opaque", "output_format": "jpeg"}),
        json!({"model": "gpt-image-1", "prompt": "x", "background": "auto", "moderation": "low"}),
        json!({"model": "gpt-image-1", "prompt": "x", "moderation": "auto", "output_format": "png"}),
        // PNG's own compression, the default 100, as OpenAI's example sends it.
        json!({"model": "gpt-image-1", "prompt": "x", "output_format": "png", "output_compression": 100}),
        json!({"model": "gpt-image-2", "prompt": "x", "output_compression": 100}),
        // input_fidelity on a generation, for a model that takes it, is forwarded.
        json!({"model": "gpt-image-1", "prompt": "x", "input_fidelity": "high"}),
        // No model, but a parameter only GPT image models take: OpenAI picks a GPT image model.
        json!({"prompt": "x", "output_format": "webp"}),
        json!({"prompt": chars('a', 32000), "model": null, "background": "transparent", "size": "1536x1024", "quality": "high"}),
        json!({"prompt": "x", "moderation": "low", "n": 10}),
        // Streaming.
        json!({"model": "gpt-image-1", "prompt": "x", "stream": true, "partial_images": 3}),
        json!({"model": "gpt-image-2", "prompt": "x", "stream": true, "partial_images": 0}),
        json!({"model": "gpt-image-1", "prompt": "x", "stream": false}),
        // Unknown parameters are never refused.
        json!({"model": "gpt-image-1", "prompt": "x", "brand_new_param": {"x": 1}}),
        json!({"model": "dall-e-2", "prompt": "x", "brand_new_param": {"x": 1}, "seed": 42, "extra": [null, true]}),
        // null is "not given", for every optional parameter, whatever the model takes.
        json!({
            "prompt": "x", "model": null, "n": null, "size": null, "quality": null, "style": null,
            "response_format": null, "background": null, "moderation": null, "output_format": null,
            "output_compression": null, "stream": null, "partial_images": null, "input_fidelity": null, "user": null,
        }),
        json!({
            "prompt": "x", "model": "gpt-image-1", "n": null, "size": null, "quality": null, "style": null,
            "response_format": null, "background": null, "moderation": null, "output_format": null,
            "output_compression": null, "stream": null, "partial_images": null, "input_fidelity": null, "user": null,
        }),
        json!({"prompt": "x", "model": "dall-e-3", "n": null, "background": null, "output_format": null, "stream": null}),
    ];
    for model in GPT.iter().chain(GPT2.iter()) {
        for size in ["auto", "1024x1024", "1536x1024", "1024x1536"] {
            bodies.push(json!({"model": model, "prompt": "x", "size": size}));
        }
        for quality in ["low", "medium", "high", "auto"] {
            bodies.push(json!({"model": model, "prompt": "x", "quality": quality}));
        }
    }

    assert_json_forwarded_unchanged(&app, &fake, GENERATIONS, bodies).await;
}

#[tokio::test]
async fn valid_multipart_edits_at_every_boundary_reach_the_upstream_unchanged() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let gpt = |model: &str| Upload::new().text("model", model).text("prompt", "add a hat");
    let d2 = || Upload::new().text("model", "dall-e-2").text("prompt", "add a hat");

    let mut cases = vec![
        // dall-e-2: square PNGs with transparency, or any square PNG with a mask.
        ("dall-e-2 RGBA", EDITS, d2().png("image", rgba_png(64, 64))),
        ("dall-e-2 grayscale (L)", EDITS, d2().png("image", gray_png(64, 64))),
        ("dall-e-2 grayscale + alpha (LA)", EDITS, d2().png("image", gray_alpha_png(64, 64))),
        ("dall-e-2 RGB with a mask", EDITS, d2().png("image", rgb_png(64, 64)).png("mask", rgba_png(64, 64))),
        ("dall-e-2 4 MiB - 1 byte", EDITS, d2().png("image", padded_png(rgba_png(64, 64), 4 * MIB - 1))),
        (
            "dall-e-2 with every field it takes",
            EDITS,
            Upload::new()
                .png("image", rgba_png(256, 256))
                .text("model", "dall-e-2")
                .text("prompt", chars('é', 1000))
                .text("n", "10")
                .text("size", "512x512")
                .text("quality", "standard")
                .text("response_format", "b64_json")
                .text("user", "user-1"),
        ),
        // GPT image: PNG, JPEG, WebP, up to 16 of them, any size up to 16384.
        ("a JPEG", EDITS, gpt("gpt-image-1").file("image", jpeg(64, 48), "image/jpeg")),
        ("a WebP", EDITS, gpt("gpt-image-1").file("image", webp(48, 64), "image/webp")),
        ("an RGB PNG", EDITS, gpt("gpt-image-1").png("image", rgb_png(100, 30))),
        ("a grayscale PNG", EDITS, gpt("gpt-image-1-mini").png("image", gray_png(30, 100))),
        (
            "16 images of mixed types",
            EDITS,
            (0..16).fold(gpt("gpt-image-1.5"), |u, i| match i % 3 {
                0 => u.png("image[]", rgb_png(16 + i, 16)),
                1 => u.file("image[]", jpeg(16, 16 + i), "image/jpeg"),
                _ => u.file("image[]", webp(16 + i, 16 + i), "image/webp"),
            }),
        ),
        ("indexed names", EDITS, gpt("gpt-image-1").png("image[0]", rgb_png(32, 32)).png("image[1]", rgb_png(48, 48))),
        ("a header claiming 16384x16384", EDITS, gpt("gpt-image-1").png("image", png_claiming(16_384, 16_384))),
        ("a header claiming 16384x1", EDITS, gpt("gpt-image-2").png("image", png_claiming(16_384, 1))),
        // Masks belong to the first image, wherever they arrive.
        ("an RGBA mask", EDITS, gpt("gpt-image-1").png("image", rgb_png(64, 32)).png("mask", rgba_png(64, 32))),
        ("an LA mask", EDITS, gpt("gpt-image-1").png("image", rgb_png(64, 64)).png("mask", gray_alpha_png(64, 64))),
        (
            "a mask sent first, sized like the first image",
            EDITS,
            gpt("gpt-image-1").png("mask", rgba_png(64, 64)).png("image[]", rgb_png(64, 64)).file(
                "image[]",
                jpeg(32, 32),
                "image/jpeg",
            ),
        ),
        (
            "a mask of 4 MiB - 1 byte",
            EDITS,
            gpt("gpt-image-1").png("image", rgb_png(64, 64)).png("mask", padded_png(rgba_png(64, 64), 4 * MIB - 1)),
        ),
        // Fields: multipart text read as JSON types for numbers and booleans, strings stay strings.
        (
            "every GPT field",
            EDITS,
            gpt("gpt-image-1")
                .png("image", rgb_png(64, 64))
                .text("n", "10")
                .text("size", "1536x1024")
                .text("quality", "high")
                .text("background", "transparent")
                .text("output_format", "webp")
                .text("output_compression", "0")
                .text("input_fidelity", "high")
                .text("user", "12345"),
        ),
        (
            "png with its own compression, 100",
            EDITS,
            gpt("gpt-image-1")
                .png("image", rgb_png(64, 64))
                .text("output_format", "png")
                .text("output_compression", "100"),
        ),
        (
            "a mask declared image/png for a WebP image",
            EDITS,
            gpt("gpt-image-1").file("image", webp(64, 64), "image/webp").png("mask", rgba_png(64, 64)),
        ),
        (
            "trailing bytes after the end of each file, as decoders allow",
            EDITS,
            gpt("gpt-image-1")
                .png("image[]", [rgb_png(64, 64), vec![0; 100]].concat())
                .file("image[]", [jpeg(64, 64), vec![0; 100]].concat(), "image/jpeg")
                .file("image[]", [webp(64, 64), vec![0; 100]].concat(), "image/webp"),
        ),
        (
            "stream with 3 partial images",
            EDITS,
            gpt("gpt-image-1").png("image", rgb_png(64, 64)).text("stream", "true").text("partial_images", "3"),
        ),
        ("a numeric prompt", EDITS, Upload::new().text("prompt", "2024").png("image", rgb_png(64, 64))),
        ("a prompt that is JSON", EDITS, Upload::new().text("prompt", "{\"a\": 1}").png("image", rgb_png(64, 64))),
        (
            "a prompt of 32000 characters",
            EDITS,
            Upload::new().text("prompt", chars('猫', 32000)).png("image", rgb_png(64, 64)),
        ),
        ("gpt-image-2 3840x2160", EDITS, gpt("gpt-image-2").png("image", rgb_png(64, 64)).text("size", "3840x2160")),
        (
            "gpt-image-2 1536x864",
            EDITS,
            gpt("gpt-image-2-2026-04-21").png("image", rgb_png(64, 64)).text("size", "1536x864"),
        ),
        (
            "input_fidelity low on gpt-image-1.5",
            EDITS,
            gpt("gpt-image-1.5").png("image", rgb_png(64, 64)).text("input_fidelity", "low"),
        ),
        (
            "unknown fields",
            EDITS,
            gpt("gpt-image-1").png("image", rgb_png(64, 64)).text("brand_new_param", "{\"x\": 1}").text("seed", "42"),
        ),
    ];
    for model in GPT {
        cases.push(("each GPT image model", EDITS, gpt(model).png("image", rgb_png(40, 40)).text("size", "auto")));
    }

    assert_forms_forwarded_unchanged(&app, &fake, cases).await;
}

#[tokio::test]
async fn valid_variations_reach_the_upstream_unchanged() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let cases = vec![
        ("an RGB square (no transparency needed)", VARIATIONS, Upload::new().png("image", rgb_png(64, 64))),
        ("an RGBA square", VARIATIONS, Upload::new().png("image", rgba_png(64, 64))),
        ("4 MiB - 1 byte", VARIATIONS, Upload::new().png("image", padded_png(rgba_png(64, 64), 4 * MIB - 1))),
        (
            "every field",
            VARIATIONS,
            Upload::new()
                .text("model", "dall-e-2")
                .png("image", rgba_png(64, 64))
                .text("n", "10")
                .text("size", "1024x1024")
                .text("response_format", "b64_json")
                .text("user", "user-1")
                .text("brand_new_param", "kept"),
        ),
        (
            "n=1 and 256x256",
            VARIATIONS,
            Upload::new().png("image", rgb_png(32, 32)).text("n", "1").text("size", "256x256"),
        ),
        (
            "512x512 and url",
            VARIATIONS,
            Upload::new().png("image", rgb_png(32, 32)).text("size", "512x512").text("response_format", "url"),
        ),
    ];

    assert_forms_forwarded_unchanged(&app, &fake, cases).await;
}

#[tokio::test]
async fn valid_json_edit_bodies_reach_the_upstream_unchanged() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_json_body = bytesize::ByteSize::mib(32)).await;
    // A real PNG whose unpadded base64 makes the data URL exactly 20,971,520 characters long.
    let prefix = "data:image/png;base64,";
    let longest = {
        use base64::Engine as _;
        let png = padded_png(rgba_png(64, 64), 15_728_623);
        format!("{prefix}{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(png))
    };
    assert_eq!(longest.len(), MAX_IMAGE_URL);
    let url = json!({"image_url": "https://example.com/cat.png"});

    let bodies = vec![
        // OpenAI's own examples of the JSON edit body (openapi.yaml, `/images/edits`): a URL, and file ids
        // with a mask, output_format png and output_compression 100.
        json!({
            "model": "gpt-image-1.5", "prompt": "Add a watercolor effect to this image",
            "images": [{"image_url": "https://example.com/source-image.png"}], "size": "1024x1024", "quality": "high",
        }),
        json!({
            "model": "gpt-image-1.5", "prompt": "Replace the background with a snowy mountain scene",
            "images": [{"file_id": "file-abc123"}], "mask": {"file_id": "file-mask123"},
            "output_format": "png", "output_compression": 100,
        }),
        json!({"prompt": "snow", "images": [{"file_id": "file-abc123"}], "mask": {"file_id": "file-mask123"}, "output_format": "png", "output_compression": 100}),
        json!({"prompt": "x", "images": [url]}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": "http://example.com/cat.png"}]}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"file_id": "file-abc123"}]}),
        // data: URLs holding real images, checked by their bytes.
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": data_url("image/png", &rgb_png(64, 64))}]}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": data_url("image/webp", &webp(48, 64))}]}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": data_url("image/jpeg", &jpeg(64, 48))}]}),
        json!({
            "model": "gpt-image-1", "prompt": "x",
            "images": [{"image_url": data_url("image/png", &rgb_png(64, 32))}, url, {"file_id": "file-2"}],
            "mask": {"image_url": data_url("image/png", &rgba_png(64, 32))},
        }),
        // A mask for an image imagegate cannot see: only the mask's own rules apply.
        json!({"model": "gpt-image-1", "prompt": "x", "images": [url], "mask": {"image_url": data_url("image/png", &rgba_png(16, 16))}}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": data_url("image/png", &png_claiming(16_384, 16_384))}]}),
        json!({"model": "gpt-image-1.5", "prompt": "x", "images": vec![url.clone(); 16]}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": longest}]}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [url], "mask": {"file_id": "file-mask"}}),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [url], "mask": {"image_url": "https://example.com/m.png"}}),
        json!({"model": "gpt-image-2", "prompt": "x", "images": [url], "size": "3840x2160", "quality": "high"}),
        json!({"model": "gpt-image-1", "prompt": chars('é', 32000), "images": [url], "input_fidelity": "high", "moderation": "low"}),
        json!({
            "model": "gpt-image-1", "prompt": "x", "images": [url], "n": 10, "size": "1024x1536",
            "background": "transparent", "output_format": "webp", "output_compression": 80, "user": "u-1",
        }),
        json!({"model": "chatgpt-image-latest", "prompt": "x", "images": [url], "stream": true, "partial_images": 3}),
        json!({
            "model": null, "prompt": "x", "images": [url], "mask": null, "n": null, "size": null, "quality": null,
            "input_fidelity": null, "output_format": null, "output_compression": null, "moderation": null,
            "background": null, "stream": null, "partial_images": null, "user": null, "style": null, "response_format": null,
        }),
        json!({"model": "gpt-image-1", "prompt": "x", "images": [url], "brand_new_param": {"x": 1}}),
    ];

    assert_json_forwarded_unchanged(&app, &fake, EDITS, bodies).await;
}

#[tokio::test]
async fn unknown_models_are_forwarded_with_only_the_generic_checks_by_default() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    // Values no known model takes: an OpenAI-compatible upstream may take them.
    let bodies = vec![
        json!({"model": UNKNOWN, "prompt": chars('a', 40_000)}),
        json!({"model": UNKNOWN, "prompt": "x", "n": 10, "size": "999x333", "quality": "ultra", "style": "ink"}),
        json!({"model": UNKNOWN, "prompt": "x", "response_format": "url", "background": "transparent", "output_format": "jpeg"}),
        json!({"model": UNKNOWN, "prompt": "x", "output_compression": 500, "partial_images": 9, "moderation": "none"}),
        json!({"model": "gpt-image-3", "prompt": "x", "size": "1000x1000", "brand_new_param": {"x": 1}}),
        json!({"model": "GPT-IMAGE-1", "prompt": "x"}),
    ];
    assert_json_forwarded_unchanged(&app, &fake, GENERATIONS, bodies).await;

    let cases = vec![
        (
            "an unknown model with fields no known model takes",
            EDITS,
            Upload::new()
                .text("model", UNKNOWN)
                .text("prompt", "x")
                .png("image", rgb_png(64, 64))
                .text("size", "999x333")
                .text("quality", "ultra"),
        ),
        (
            "a variation with an unknown model",
            VARIATIONS,
            Upload::new().text("model", UNKNOWN).png("image", rgba_png(64, 64)),
        ),
        // Files for unknown models: only the byte-level rules (a readable, complete PNG/JPEG/WebP of at most
        // 16384 pixels a side, one mask at most). No count, declared-type, size or mask-shape rules.
        (
            "an unknown model with 17 images, odd declared types and a mask of another size and kind",
            EDITS,
            (0..17)
                .fold(Upload::new().text("model", UNKNOWN).text("prompt", "x"), |u, i| {
                    u.png("image[]", rgb_png(16 + i, 16))
                })
                .file("image[]", rgb_png(64, 64), "application/octet-stream")
                .untyped_file("image[]", webp(32, 32))
                .png("image[]", jpeg(32, 32))
                .file("mask", jpeg(20, 10), "image/jpeg"),
        ),
        (
            "an unknown model with a 4 MiB + 1 byte variation image that is not square",
            VARIATIONS,
            Upload::new().text("model", UNKNOWN).png("image", padded_png(rgb_png(64, 32), 4 * MIB + 1)),
        ),
    ];
    assert_forms_forwarded_unchanged(&app, &fake, cases).await;
}

#[tokio::test]
async fn a_generation_naming_no_model_but_a_gpt_parameter_is_checked_and_recorded_as_gpt_image_1() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    // Sent as is: no model is added to the body; the upstream picks its GPT image model.
    let body = json!({"prompt": "a red fox", "output_format": "webp", "quality": "high"});
    let res = app.post_json(GENERATIONS, &body).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    assert_eq!(fake.last_call().unwrap().json, Some(body));
    let rows = app.usage_rows(1).await;
    assert_eq!(rows.last().unwrap()["model"], "gpt-image-1", "{rows:?}");

    // A tenant that may use only dall-e-2 cannot reach a GPT image model by leaving the model out.
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].allowed_models = Some(vec!["dall-e-2".into()])).await;
    let before = fake.call_count();
    let res = app.post_json(GENERATIONS, &json!({"prompt": "a red fox", "background": "opaque"})).await;
    let (status, error) = error_of(res).await;
    assert_eq!(status, 403, "{error}");
    assert!(error["message"].as_str().unwrap().contains("gpt-image-1"), "{error}");
    assert_eq!(app.post_json(GENERATIONS, &json!({"prompt": "a red fox"})).await.status(), 200);
    assert_eq!(fake.call_count(), before + 1);
}
