#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]
//! Properties of `images::validate` (`docs/validation.md`), at the library level so thousands of requests run in
//! seconds:
//! - every request built only from values a model takes (random subsets, `null`s, unknown extra fields, any field
//!   order) is accepted, under both unknown-model policies;
//! - corrupting exactly one field of such a request is refused with `400` naming that field;
//! - images are judged by their headers: a PNG claiming W x H passes exactly when both are at most 16384;
//! - arbitrary JSON and arbitrary multipart fields never panic.

use bytes::Bytes;
use imagegate::config::UnknownModels;
use imagegate::error::ApiError;
use imagegate::images::request::{Endpoint, Form, ImageRequest, Part};
use imagegate::images::validate::{ValidationPolicy, validate};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};

// --------------------------------------------------------------------------------------------- the contract

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    DallE2,
    DallE3,
    Gpt,
    Gpt2,
}

const FAMILIES: [Family; 4] = [Family::DallE2, Family::DallE3, Family::Gpt, Family::Gpt2];

const KNOWN_MODELS: [&str; 8] = [
    "dall-e-2",
    "dall-e-3",
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-1.5",
    "chatgpt-image-latest",
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
];

/// Every size any model lists, plus a few that look like sizes.
const SIZE_POOL: [&str; 14] = [
    "256x256",
    "512x512",
    "1024x1024",
    "1792x1024",
    "1024x1792",
    "auto",
    "1536x1024",
    "1024x1536",
    "2048x2048",
    "1536x864",
    "3840x2160",
    "128x128",
    "1000x1000",
    "800x800",
];

const QUALITY_POOL: [&str; 9] = ["standard", "hd", "low", "medium", "high", "auto", "ultra", "HD", ""];

impl Family {
    fn models(self) -> &'static [&'static str] {
        match self {
            Family::DallE2 => &["dall-e-2"],
            Family::DallE3 => &["dall-e-3"],
            Family::Gpt => &["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "chatgpt-image-latest"],
            Family::Gpt2 => &["gpt-image-2", "gpt-image-2-2026-04-21"],
        }
    }

    fn prompt_limit(self) -> usize {
        match self {
            Family::DallE2 => 1000,
            Family::DallE3 => 4000,
            Family::Gpt | Family::Gpt2 => 32000,
        }
    }

    fn max_n(self) -> i64 {
        if self == Family::DallE3 { 1 } else { 10 }
    }

    fn listed_sizes(self) -> &'static [&'static str] {
        match self {
            Family::DallE2 => &["256x256", "512x512", "1024x1024"],
            Family::DallE3 => &["1024x1024", "1792x1024", "1024x1792"],
            Family::Gpt | Family::Gpt2 => &["auto", "1024x1024", "1536x1024", "1024x1536"],
        }
    }

    fn size_ok(self, size: &str) -> bool {
        self.listed_sizes().contains(&size) || (self == Family::Gpt2 && gpt2_wxh_ok(size))
    }

    fn qualities(self) -> &'static [&'static str] {
        match self {
            Family::DallE2 => &["standard"],
            Family::DallE3 => &["standard", "hd"],
            Family::Gpt | Family::Gpt2 => &["low", "medium", "high", "auto"],
        }
    }

    fn gpt(self) -> bool {
        matches!(self, Family::Gpt | Family::Gpt2)
    }
}

/// The `WxH` rule for GPT image 2: multiples of 16, at most 3:1, long edge at most 3840, 655,360 to 8,294,400
/// pixels. Only plain decimal digits count.
fn gpt2_wxh_ok(size: &str) -> bool {
    let Some((w, h)) = size.split_once('x') else { return false };
    let digits = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(h) {
        return false;
    }
    let (w, h): (u64, u64) = (w.parse().unwrap(), h.parse().unwrap());
    w > 0
        && h > 0
        && w % 16 == 0
        && h % 16 == 0
        && w.max(h) <= 3840
        && w.max(h) <= 3 * w.min(h)
        && (655_360..=8_294_400).contains(&(w * h))
}

// --------------------------------------------------------------------------------------------- strategies

type Entry = Option<(String, Value)>;

fn strs(list: &'static [&'static str]) -> BoxedStrategy<Value> {
    select(list).prop_map(Value::from).boxed()
}

/// Absent, `null`, or a value from `value`.
fn opt(name: &'static str, value: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Entry> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some((name.to_owned(), Value::Null))),
        3 => value.prop_map(move |v| Some((name.to_owned(), v))),
    ]
    .boxed()
}

fn chars(c: char, count: usize) -> String {
    std::iter::repeat_n(c, count).collect()
}

/// Characters of 1, 2, 3 and 4 UTF-8 bytes.
const WIDE: [char; 4] = ['a', 'é', '猫', '😀'];

/// A non-empty prompt within `limit` characters: short ASCII, short Unicode, or right at the limit.
fn prompt(limit: usize) -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-zA-Z0-9][a-zA-Z0-9 ,.!?'-]{0,40}",
        2 => "[^\\s\\p{C}]\\PC{0,60}",
        1 => (select(WIDE.to_vec()), (limit - 3)..=limit).prop_map(|(c, n)| chars(c, n)),
    ]
    .boxed()
}

fn too_long_prompt(limit: usize) -> BoxedStrategy<String> {
    (select(WIDE.to_vec()), 1..=20usize).prop_map(move |(c, extra)| chars(c, limit + extra)).boxed()
}

/// A size gpt-image-2 takes beyond the listed ones.
fn gpt2_wxh() -> BoxedStrategy<String> {
    (30u32..=240)
        .prop_flat_map(|w| {
            let lo = 2560u32.div_ceil(w).max(w.div_ceil(3));
            let hi = (32_400 / w).min(240).min(3 * w);
            (Just(w), lo..=hi, any::<bool>())
        })
        .prop_map(|(w, h, swap)| if swap { format!("{}x{}", h * 16, w * 16) } else { format!("{}x{}", w * 16, h * 16) })
        .boxed()
}

fn size(f: Family) -> BoxedStrategy<Value> {
    if f == Family::Gpt2 {
        prop_oneof![strs(f.listed_sizes()), gpt2_wxh().prop_map(Value::from)].boxed()
    } else {
        strs(f.listed_sizes())
    }
}

/// Any JSON value, nested a little.
fn arb_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        select(INTERESTING.to_vec()).prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((field_name(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
    .boxed()
}

const INTERESTING: [&str; 24] = [
    "dall-e-2",
    "dall-e-3",
    "gpt-image-1",
    "gpt-image-1-mini",
    "gpt-image-2",
    "chatgpt-image-latest",
    "auto",
    "1024x1024",
    "3840x2160",
    "4294967296x16",
    "18446744073709551616x18446744073709551616",
    "0x0",
    "x",
    "",
    "transparent",
    "jpeg",
    "url",
    "hd",
    "https://example.com/a.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/",
    "file-abc",
    "true",
    "10",
];

const FIELD_NAMES: [&str; 22] = [
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "style",
    "response_format",
    "background",
    "moderation",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    "input_fidelity",
    "user",
    "images",
    "image_url",
    "file_id",
    "mask",
    "image",
    "image[]",
    "image[0]",
];

fn field_name() -> BoxedStrategy<String> {
    prop_oneof![3 => select(FIELD_NAMES.to_vec()).prop_map(str::to_owned), 1 => "[a-z_\\[\\]0-9]{1,10}"].boxed()
}

/// Unknown parameters: never refused.
fn extras() -> BoxedStrategy<Vec<(String, Value)>> {
    proptest::collection::vec(("x_[a-z_]{1,10}", arb_json()), 0..4).boxed()
}

/// The fields of a valid generation request for `f`, before the cross-field fixes.
fn generation_fields(f: Family) -> Vec<BoxedStrategy<Entry>> {
    let model: BoxedStrategy<Entry> = if f == Family::DallE2 {
        // No model, or null, means dall-e-2.
        prop_oneof![
            Just(None),
            Just(Some(("model".to_owned(), Value::Null))),
            Just(Some(("model".to_owned(), json!("dall-e-2")))),
        ]
        .boxed()
    } else {
        select(f.models()).prop_map(|m| Some(("model".to_owned(), Value::from(m)))).boxed()
    };
    let mut fields = vec![
        model,
        prompt(f.prompt_limit()).prop_map(|p| Some(("prompt".to_owned(), Value::from(p)))).boxed(),
        opt("n", (1..=f.max_n()).prop_map(Value::from)),
        opt("size", size(f)),
        opt("quality", strs(f.qualities())),
        opt("user", "\\PC{0,24}".prop_map(Value::from)),
    ];
    if f.gpt() {
        fields.extend([
            opt("background", strs(&["transparent", "opaque", "auto"])),
            opt("moderation", strs(&["low", "auto"])),
            opt("output_format", strs(&["png", "jpeg", "webp"])),
            opt("output_compression", (0..=100i64).prop_map(Value::from)),
            opt("stream", any::<bool>().prop_map(Value::from)),
            opt("partial_images", (0..=3i64).prop_map(Value::from)),
        ]);
    } else {
        fields.extend([opt("response_format", strs(&["url", "b64_json"])), opt("stream", Just(json!(false)))]);
        // Parameters a DALL·E model does not take may still be sent as null.
        for name in ["background", "moderation", "output_format", "output_compression", "partial_images"] {
            fields.push(prop_oneof![Just(None), Just(Some((name.to_owned(), Value::Null)))].boxed());
        }
    }
    if f == Family::DallE3 {
        fields.push(opt("style", strs(&["vivid", "natural"])));
    } else {
        fields.push(prop_oneof![Just(None), Just(Some(("style".to_owned(), Value::Null)))].boxed());
    }
    fields
}

fn str_of<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

/// Keeps the cross-field rules: transparent needs png or webp, compression needs jpeg or webp, and partial images
/// are only sent with `stream: true` (without it the contract is silent).
fn fix_cross_fields(mut map: Map<String, Value>) -> Map<String, Value> {
    if str_of(&map, "background") == Some("transparent") && str_of(&map, "output_format") == Some("jpeg") {
        map.insert("output_format".to_owned(), json!("png"));
    }
    let compressible = matches!(str_of(&map, "output_format"), Some("jpeg" | "webp"));
    if !compressible && map.get("output_compression").is_some_and(|v| !v.is_null()) {
        map.remove("output_compression");
    }
    if map.get("stream") != Some(&Value::Bool(true)) && map.get("partial_images").is_some_and(|v| !v.is_null()) {
        map.remove("partial_images");
    }
    map
}

fn assemble(fields: Vec<Entry>, extras: Vec<(String, Value)>) -> Map<String, Value> {
    let mut map: Map<String, Value> = fields.into_iter().flatten().collect();
    map.extend(extras);
    fix_cross_fields(map)
}

fn valid_generation(f: Family) -> BoxedStrategy<Map<String, Value>> {
    (generation_fields(f).prop_shuffle(), extras()).prop_map(|(fields, extras)| assemble(fields, extras)).boxed()
}

fn any_family() -> BoxedStrategy<Family> {
    select(FAMILIES.to_vec()).boxed()
}

/// One field made invalid: `field` gets `value` (`None` removes it), after `also` (valid values another rule needs)
/// and `remove` (fields whose rules depend on `field`) are applied.
#[derive(Clone, Debug)]
struct Corruption {
    field: &'static str,
    value: Option<Value>,
    also: Vec<(&'static str, Value)>,
    remove: Vec<&'static str>,
}

fn set(field: &'static str, value: Value) -> Corruption {
    Corruption { field, value: Some(value), also: Vec::new(), remove: Vec::new() }
}

impl Corruption {
    fn with(mut self, field: &'static str, value: Value) -> Self {
        self.also.push((field, value));
        self
    }

    fn without(mut self, fields: &[&'static str]) -> Self {
        self.remove.extend_from_slice(fields);
        self
    }

    fn apply(&self, mut map: Map<String, Value>) -> Map<String, Value> {
        for name in &self.remove {
            map.remove(*name);
        }
        for (name, value) in &self.also {
            map.insert((*name).to_owned(), value.clone());
        }
        match &self.value {
            Some(value) => map.insert(self.field.to_owned(), value.clone()),
            None => map.remove(self.field),
        };
        map
    }
}

fn not_a_string() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        Just(json!([])),
        Just(json!(["auto"])),
        Just(json!({"value": "auto"})),
    ]
    .boxed()
}

fn not_an_integer() -> BoxedStrategy<Value> {
    prop_oneof![
        "[0-9]{1,3}".prop_map(Value::from),
        any::<i32>().prop_map(|i| Value::from(f64::from(i) + 0.5)),
        any::<bool>().prop_map(Value::from),
        Just(json!([1])),
        Just(json!({"n": 1})),
    ]
    .boxed()
}

fn not_a_boolean() -> BoxedStrategy<Value> {
    prop_oneof![
        select(["true", "false", "yes", "1"].to_vec()).prop_map(Value::from),
        (0..=1i64).prop_map(Value::from),
        Just(json!([true])),
    ]
    .boxed()
}

fn outside(lo: i64, hi: i64) -> BoxedStrategy<Value> {
    let mut options = vec![(i64::MIN..lo).prop_map(Value::from).boxed()];
    if hi < i64::MAX {
        options.push(((hi + 1)..=i64::MAX).prop_map(Value::from).boxed());
    }
    options.push((i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::from).boxed());
    proptest::strategy::Union::new(options).boxed()
}

fn corruption(f: Family) -> BoxedStrategy<Corruption> {
    let limit = f.prompt_limit();
    let mut options: Vec<BoxedStrategy<Corruption>> = vec![
        Just(Corruption { field: "prompt", value: None, also: Vec::new(), remove: Vec::new() }).boxed(),
        Just(set("prompt", json!(""))).boxed(),
        too_long_prompt(limit).prop_map(|p| set("prompt", Value::from(p))).boxed(),
        not_a_string().prop_map(|v| set("prompt", v)).boxed(),
        not_a_string().prop_map(|v| set("model", v)).boxed(),
        outside(1, f.max_n()).prop_map(|v| set("n", v)).boxed(),
        not_an_integer().prop_map(|v| set("n", v)).boxed(),
        select(SIZE_POOL.to_vec())
            .prop_filter("a size the model takes", move |s| !f.size_ok(s))
            .prop_map(|s| set("size", Value::from(s)))
            .boxed(),
        "[0-9x ]{0,12}"
            .prop_filter("a size the model takes", move |s| !f.size_ok(s))
            .prop_map(|s| set("size", Value::from(s)))
            .boxed(),
        select(QUALITY_POOL.to_vec())
            .prop_filter("a quality the model takes", move |q| !f.qualities().contains(q))
            .prop_map(|q| set("quality", Value::from(q)))
            .boxed(),
        not_a_boolean().prop_map(|v| set("stream", v).without(&["partial_images"])).boxed(),
    ];
    for field in ["size", "quality", "style", "response_format", "background", "moderation", "user"] {
        options.push(not_a_string().prop_map(move |v| set(field, v)).boxed());
    }
    options.push(
        not_a_string().prop_map(|v| set("output_format", v).without(&["output_compression", "background"])).boxed(),
    );
    if f.gpt() {
        options.extend([
            strs(&["vivid", "natural"]).prop_map(|v| set("style", v)).boxed(),
            strs(&["url", "b64_json"]).prop_map(|v| set("response_format", v)).boxed(),
            strs(&["clear", "none", "Transparent", ""]).prop_map(|v| set("background", v)).boxed(),
            strs(&["high", "strict", "none", ""]).prop_map(|v| set("moderation", v)).boxed(),
            strs(&["jpg", "gif", "PNG", "bmp", ""])
                .prop_map(|v| set("output_format", v).without(&["output_compression", "background"]))
                .boxed(),
            outside(0, 100).prop_map(|v| set("output_compression", v).with("output_format", json!("webp"))).boxed(),
            not_an_integer().prop_map(|v| set("output_compression", v).with("output_format", json!("webp"))).boxed(),
            outside(0, 3).prop_map(|v| set("partial_images", v).with("stream", json!(true))).boxed(),
            not_an_integer().prop_map(|v| set("partial_images", v).with("stream", json!(true))).boxed(),
        ]);
    } else {
        let style: &'static [&'static str] =
            if f == Family::DallE3 { &["dramatic", "VIVID", "", "photo"] } else { &["vivid", "natural"] };
        options.extend([
            strs(style).prop_map(|v| set("style", v)).boxed(),
            strs(&["png", "jpeg", "URL", "base64"]).prop_map(|v| set("response_format", v)).boxed(),
            strs(&["transparent", "opaque", "auto"]).prop_map(|v| set("background", v)).boxed(),
            strs(&["low", "auto"]).prop_map(|v| set("moderation", v)).boxed(),
            strs(&["png", "jpeg", "webp"]).prop_map(|v| set("output_format", v)).boxed(),
            (0..=100i64).prop_map(|v| set("output_compression", Value::from(v))).boxed(),
            Just(set("stream", json!(true))).boxed(),
            (0..=3i64).prop_map(|v| set("partial_images", Value::from(v))).boxed(),
        ]);
    }
    proptest::strategy::Union::new(options).boxed()
}

// --------------------------------------------------------------------------------------------- helpers

fn json_request(endpoint: Endpoint, map: &Map<String, Value>) -> ImageRequest {
    ImageRequest::from_json(endpoint, Bytes::from(serde_json::to_vec(map).unwrap())).unwrap()
}

fn reject() -> ValidationPolicy {
    ValidationPolicy { unknown_models: UnknownModels::Reject, rehost: false }
}

fn explain(error: &ApiError) -> String {
    format!("{} param={:?} code={:?}: {}", error.status(), error.param(), error.code(), error.client_message())
}

fn shown(map: &Map<String, Value>) -> String {
    let text = serde_json::to_string(map).unwrap();
    if text.chars().count() > 400 {
        format!("{}… ({} chars)", text.chars().take(400).collect::<String>(), text.len())
    } else {
        text
    }
}

fn text_part(name: &str, value: &str) -> Part {
    Part { name: name.to_owned(), file_name: None, content_type: None, data: Bytes::from(value.to_owned()) }
}

fn file_part(name: &str, data: Vec<u8>, mime: &str) -> Part {
    Part {
        name: name.to_owned(),
        file_name: Some(format!("upload.{}", mime.rsplit('/').next().unwrap_or("bin"))),
        content_type: Some(mime.to_owned()),
        data: Bytes::from(data),
    }
}

fn form_request(endpoint: Endpoint, parts: Vec<Part>) -> ImageRequest {
    ImageRequest::from_form(endpoint, Bytes::new(), "multipart/form-data; boundary=x".to_owned(), Form { parts })
}

/// Multipart text as the SDKs send it: strings as they are, numbers and booleans as JSON; `null` is left out.
fn as_text_parts(map: &Map<String, Value>) -> Vec<Part> {
    map.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::String(s) => text_part(k, s),
            other => text_part(k, &other.to_string()),
        })
        .collect()
}

fn encode(image: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// (bytes, declared type) of a `w`x`h` image: 0 = RGB PNG, 1 = RGBA PNG, 2 = JPEG, 3 = WebP.
fn picture(w: u32, h: u32, kind: u8) -> (Vec<u8>, &'static str) {
    let rgb = image::RgbImage::from_pixel(w, h, image::Rgb([12, 200, 99]));
    let rgba = image::RgbaImage::from_pixel(w, h, image::Rgba([12, 200, 99, 0]));
    match kind {
        0 => (encode(image::DynamicImage::ImageRgb8(rgb), image::ImageFormat::Png), "image/png"),
        1 => (encode(image::DynamicImage::ImageRgba8(rgba), image::ImageFormat::Png), "image/png"),
        2 => (encode(image::DynamicImage::ImageRgb8(rgb), image::ImageFormat::Jpeg), "image/jpeg"),
        _ => (encode(image::DynamicImage::ImageRgba8(rgba), image::ImageFormat::WebP), "image/webp"),
    }
}

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &byte in *part {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { 0xedb8_8320 ^ (crc >> 1) } else { crc >> 1 };
            }
        }
    }
    crc ^ 0xffff_ffff
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(data.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
    out
}

/// A PNG whose IHDR claims `w`x`h` (RGBA), followed by a small IDAT no decoder could inflate to that size.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]));
    out.extend(chunk(b"IEND", &[]));
    out
}

// --------------------------------------------------------------------------------------------- properties

proptest! {
    #[test]
    fn every_valid_generation_request_is_accepted(
        (family, map) in any_family().prop_flat_map(|f| (Just(f), valid_generation(f)))
    ) {
        let request = json_request(Endpoint::Generations, &map);
        for policy in [ValidationPolicy::default(), reject()] {
            if let Err(error) = validate(&request, &policy) {
                prop_assert!(false, "{family:?} {policy:?}: refused {}\n  {}", shown(&map), explain(&error));
            }
        }
    }

    #[test]
    fn corrupting_one_field_of_a_valid_generation_is_refused_naming_that_field(
        (family, map, corruption) in any_family()
            .prop_flat_map(|f| (Just(f), valid_generation(f), corruption(f)))
    ) {
        let corrupted = corruption.apply(map);
        let request = json_request(Endpoint::Generations, &corrupted);
        for policy in [ValidationPolicy::default(), reject()] {
            match validate(&request, &policy) {
                Ok(_) => prop_assert!(false, "{family:?}: accepted {}", shown(&corrupted)),
                Err(error) => {
                    prop_assert_eq!(error.status().as_u16(), 400, "{}", explain(&error));
                    prop_assert_eq!(
                        error.param(),
                        Some(corruption.field),
                        "{:?}: {}\n  {}",
                        family,
                        shown(&corrupted),
                        explain(&error)
                    );
                    prop_assert!(error.code().is_some(), "{}", explain(&error));
                }
            }
        }
    }

    #[test]
    fn unknown_models_pass_the_default_policy_and_are_refused_by_reject(
        model in "[a-zA-Z0-9._-]{0,24}".prop_filter("a known model", |m| !KNOWN_MODELS.contains(&m.as_str())),
        prompt in "[a-z]{1,20}",
        extra in extras(),
    ) {
        let mut map = Map::new();
        map.insert("model".to_owned(), Value::from(model.clone()));
        map.insert("prompt".to_owned(), Value::from(prompt));
        // Values no known model takes: only the generic checks apply to unknown models.
        map.insert("size".to_owned(), json!("999x333"));
        map.insert("quality".to_owned(), json!("ultra"));
        map.extend(extra);
        let request = json_request(Endpoint::Generations, &map);
        if let Err(error) = validate(&request, &ValidationPolicy::default()) {
            prop_assert!(false, "refused {}\n  {}", shown(&map), explain(&error));
        }
        let error = validate(&request, &reject()).err();
        prop_assert!(error.is_some(), "reject accepted {model:?}");
        let error = error.unwrap();
        prop_assert_eq!(
            (error.status().as_u16(), error.param(), error.code()),
            (400, Some("model"), Some("invalid_value"))
        );
    }

    #[test]
    fn every_valid_multipart_edit_is_accepted(
        (family, map) in select([Family::DallE2, Family::Gpt, Family::Gpt2].to_vec())
            .prop_flat_map(|f| (Just(f), valid_generation(f))),
        fidelity in prop::option::of(select(["high", "low"].to_vec())),
        images in proptest::collection::vec((1u32..=48, 1u32..=48, 0u8..4), 1..=16),
        masked in any::<bool>(),
        mask_at in any::<prop::sample::Index>(),
        indexed in any::<bool>(),
    ) {
        let mut map = map;
        let model = str_of(&map, "model").unwrap_or("dall-e-2").to_owned();
        if let Some(fidelity) = fidelity.filter(|_| family == Family::Gpt && model != "gpt-image-1-mini") {
            map.insert("input_fidelity".to_owned(), json!(fidelity));
        }
        // Edits default to gpt-image-1.5, so dall-e-2 must be named.
        if family == Family::DallE2 {
            map.insert("model".to_owned(), json!("dall-e-2"));
        }
        let mut parts = as_text_parts(&map);
        let first = images[0];
        if family == Family::DallE2 {
            // One square PNG: RGBA, or RGB with a mask.
            let (bytes, mime) = picture(first.0, first.0, u8::from(!masked));
            parts.push(file_part("image", bytes, mime));
        } else {
            let many = images.len() > 1;
            for (i, (w, h, kind)) in images.iter().enumerate() {
                let name = match (many, indexed) {
                    (false, _) => "image".to_owned(),
                    (true, false) => "image[]".to_owned(),
                    (true, true) => format!("image[{i}]"),
                };
                let (bytes, mime) = picture(*w, *h, *kind);
                parts.push(file_part(&name, bytes, mime));
            }
        }
        if masked {
            let (w, h) = if family == Family::DallE2 { (first.0, first.0) } else { (first.0, first.1) };
            let (bytes, mime) = picture(w, h, 1);
            parts.insert(mask_at.index(parts.len() + 1), file_part("mask", bytes, mime));
        }
        let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
        let request = form_request(Endpoint::Edits, parts);
        if let Err(error) = validate(&request, &ValidationPolicy::default()) {
            prop_assert!(false, "{family:?}: refused {} with parts {names:?}\n  {}", shown(&map), explain(&error));
        }
    }

    #[test]
    fn every_valid_json_edit_is_accepted(
        (family, map) in select([Family::Gpt, Family::Gpt2].to_vec()).prop_flat_map(|f| (Just(f), valid_generation(f))),
        images in proptest::collection::vec(image_ref(), 1..=16),
        mask in prop::option::of(image_ref()),
    ) {
        let mut map = map;
        map.insert("images".to_owned(), Value::Array(images));
        if let Some(mask) = mask {
            map.insert("mask".to_owned(), mask);
        }
        let request = json_request(Endpoint::Edits, &map);
        if let Err(error) = validate(&request, &ValidationPolicy::default()) {
            prop_assert!(false, "{family:?}: refused {}\n  {}", shown(&map), explain(&error));
        }
    }

    #[test]
    fn image_dimensions_come_from_the_header_and_pass_up_to_16384(
        w in prop_oneof![1u32..=20_000, 16_380u32..=16_390, Just(u32::MAX >> 1)],
        h in prop_oneof![1u32..=20_000, 16_380u32..=16_390, Just(u32::MAX >> 1)],
    ) {
        let parts = vec![
            text_part("model", "gpt-image-1"),
            text_part("prompt", "x"),
            file_part("image", png_claiming(w, h), "image/png"),
        ];
        let result = validate(&form_request(Endpoint::Edits, parts), &ValidationPolicy::default());
        if w <= 16_384 && h <= 16_384 {
            prop_assert!(result.is_ok(), "{w}x{h}: {}", result.err().map(|e| explain(&e)).unwrap_or_default());
        } else {
            let error = result.err();
            prop_assert!(error.is_some(), "{w}x{h} accepted");
            let error = error.unwrap();
            prop_assert_eq!(
                (error.status().as_u16(), error.param(), error.code()),
                (400, Some("image"), Some("invalid_image_dimensions"))
            );
        }
    }

    #[test]
    fn arbitrary_json_objects_never_panic(
        fields in proptest::collection::vec((field_name(), arb_json()), 0..12),
        model in prop::option::of(select(KNOWN_MODELS.to_vec())),
    ) {
        let mut map: Map<String, Value> = fields.into_iter().collect();
        if let Some(model) = model {
            map.insert("model".to_owned(), json!(model));
        }
        for endpoint in [Endpoint::Generations, Endpoint::Edits, Endpoint::Variations] {
            let request = json_request(endpoint, &map);
            for policy in [ValidationPolicy::default(), reject()] {
                if let Err(error) = validate(&request, &policy) {
                    prop_assert!(error.status().is_client_error(), "{}", explain(&error));
                }
            }
        }
    }

    #[test]
    fn arbitrary_json_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(request) = ImageRequest::from_json(Endpoint::Generations, Bytes::from(raw)) {
            let _ = validate(&request, &ValidationPolicy::default());
        }
    }

    #[test]
    fn arbitrary_multipart_fields_and_files_never_panic(
        texts in proptest::collection::vec((field_name(), "\\PC{0,24}"), 0..10),
        files in proptest::collection::vec(
            (field_name(), proptest::collection::vec(any::<u8>(), 0..64), select(MIMES.to_vec()), any::<bool>()),
            0..5,
        ),
        model in prop::option::of(select(KNOWN_MODELS.to_vec())),
    ) {
        let mut parts: Vec<Part> = texts.iter().map(|(name, value)| text_part(name, value)).collect();
        if let Some(model) = model {
            parts.push(text_part("model", model));
        }
        for (name, bytes, mime, with_header) in files {
            // Half the files start with a real PNG header, so the header readers see more than junk.
            let data = if with_header { [png_claiming(64, 64), bytes].concat() } else { bytes };
            parts.push(file_part(&name, data, mime));
        }
        for endpoint in [Endpoint::Edits, Endpoint::Variations] {
            let request = form_request(endpoint, parts.clone());
            for policy in [ValidationPolicy::default(), reject()] {
                if let Err(error) = validate(&request, &policy) {
                    prop_assert!(error.status().is_client_error(), "{}", explain(&error));
                }
            }
        }
    }

    #[test]
    fn random_bytes_are_never_taken_for_an_image(
        bytes in proptest::collection::vec(any::<u8>(), 0..512)
            .prop_filter("starts like an image", |b| !(b.starts_with(b"\x89P") || b.starts_with(&[0xff, 0xd8]) || b.starts_with(b"RI"))),
        mime in select(["image/png", "image/jpeg", "image/webp"].to_vec()),
    ) {
        let parts = vec![text_part("model", "gpt-image-1"), text_part("prompt", "x"), file_part("image", bytes, mime)];
        let error = validate(&form_request(Endpoint::Edits, parts), &ValidationPolicy::default()).err();
        prop_assert!(error.is_some());
        let error = error.unwrap();
        prop_assert_eq!((error.param(), error.code()), (Some("image"), Some("invalid_image_format")));
    }
}

const MIMES: [&str; 6] = ["image/png", "image/jpeg", "image/webp", "application/octet-stream", "text/plain", ""];

/// One valid `ImageRefParam`: an http(s) URL, a base64 image data URL, or a file id.
fn image_ref() -> BoxedStrategy<Value> {
    prop_oneof![
        "https://[a-z]{1,12}\\.example\\.com/[a-z0-9/]{0,20}\\.png".prop_map(|u| json!({"image_url": u})),
        "http://[a-z]{1,12}\\.example/[a-z0-9]{1,8}".prop_map(|u| json!({"image_url": u})),
        (select(["png", "jpeg", "webp"].to_vec()), "[A-Za-z0-9+/]{4,64}")
            .prop_map(|(t, b)| json!({"image_url": format!("data:image/{t};base64,{b}")})),
        "file-[A-Za-z0-9]{1,24}".prop_map(|id| json!({"file_id": id})),
    ]
    .boxed()
}
