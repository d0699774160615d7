#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "tests")]
//! Properties of `images::validate` (`docs/validation.md`), at the library level so thousands of requests run in
//! seconds:
//! - every request built only from values a model takes (random subsets, `null`s, unknown extra fields, any field
//!   order) is accepted, under both unknown-model policies: JSON generations, multipart edits, variations and
//!   JSON edits;
//! - corrupting exactly one field or file of such a request is refused with `400` naming that field or file, for
//!   each of the four kinds of request;
//! - sizes are judged by the published rule whatever their numbers (up to 40 digits, signs, leading zeros);
//! - images are judged by their headers: a PNG claiming W x H passes exactly when both are at most 16384;
//! - arbitrary JSON and arbitrary multipart fields never panic.
//!
//! And end to end, with fewer cases: valid requests of each kind sent through the real gateway reach the fake
//! upstream unchanged (`mod through_the_gateway`).

#[path = "support/mod.rs"]
mod support;

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
            // `auto` is the spec's default quality for every model (issue 14: Haystack sends it for dall-e-3).
            Family::DallE2 => &["standard", "auto"],
            Family::DallE3 => &["standard", "hd", "auto"],
            Family::Gpt | Family::Gpt2 => &["low", "medium", "high", "auto"],
        }
    }

    fn gpt(self) -> bool {
        matches!(self, Family::Gpt | Family::Gpt2)
    }
}

/// The `WxH` rule for GPT image 2: multiples of 16, at most 3:1, long edge at most 3840, 655,360 to 8,294,400
/// pixels. Only plain decimal digits count: no sign, no space, no leading zero. Computed on `u128` from edges of
/// any length, so it is an oracle for the gateway's own (bounded) arithmetic.
fn gpt2_wxh_ok(size: &str) -> bool {
    let Some((w, h)) = size.split_once('x') else { return false };
    let edge = |s: &str| -> Option<u128> {
        let plain = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
        // Beyond u128 is beyond any limit, like u128::MAX itself.
        plain.then(|| s.parse::<u128>().unwrap_or(u128::MAX))
    };
    let (Some(w), Some(h)) = (edge(w), edge(h)) else { return false };
    w > 0
        && h > 0
        && w % 16 == 0
        && h % 16 == 0
        // Both edges are at most 3840 past this point, so the products below cannot overflow.
        && w.max(h) <= 3840
        && w.max(h) <= 3 * w.min(h)
        && (655_360..=8_294_400).contains(&(w * h))
}

/// Any `WxH`-looking text: edges from plain sizes to 40-digit numbers, `u32`/`u64` extremes, signs, leading
/// zeros and spaces.
fn wild_size() -> BoxedStrategy<String> {
    let edge = prop_oneof![
        3 => (1u32..=4000).prop_map(|n| n.to_string()),
        2 => (1u32..=250).prop_map(|n| (n * 16).to_string()),
        1 => any::<u32>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => select(vec![u32::MAX as u64, u32::MAX as u64 + 1, u64::MAX, u64::MAX - 15]).prop_map(|n| n.to_string()),
        1 => "[0-9]{1,40}",
        1 => "[+-]?0{0,3}[0-9]{1,5}",
        1 => "[ +0-9]{1,8}",
    ]
    .boxed();
    (edge.clone(), edge).prop_map(|(w, h)| format!("{w}x{h}")).boxed()
}

fn family_of(model: &str) -> Family {
    FAMILIES.into_iter().find(|f| f.models().contains(&model)).unwrap()
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

/// Keeps the cross-field rules: transparent needs png or webp, compression below 100 needs jpeg or webp (png
/// takes only its own 100, as OpenAI's example sends it), and partial images are only sent with `stream: true`
/// (without it the contract is silent).
fn fix_cross_fields(mut map: Map<String, Value>) -> Map<String, Value> {
    if str_of(&map, "background") == Some("transparent") && str_of(&map, "output_format") == Some("jpeg") {
        map.insert("output_format".to_owned(), json!("png"));
    }
    let compressible = matches!(str_of(&map, "output_format"), Some("jpeg" | "webp"));
    if !compressible && map.get("output_compression").is_some_and(|v| !v.is_null()) {
        map.insert("output_compression".to_owned(), json!(100));
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
        wild_size()
            .prop_filter("a size the model takes", move |s| !f.size_ok(s))
            .prop_map(|s| set("size", Value::from(s)))
            .boxed(),
        select(QUALITY_POOL.to_vec())
            .prop_filter("a quality the model takes", move |q| !f.qualities().contains(q))
            .prop_map(|q| set("quality", Value::from(q)))
            .boxed(),
        not_a_boolean().prop_map(|v| set("stream", v).without(&["partial_images"])).boxed(),
    ];
    for field in ["size", "quality", "style", "response_format", "background", "moderation", "user", "input_fidelity"] {
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
            (0..100i64)
                .prop_map(|v| set("output_compression", Value::from(v)).with("output_format", json!("png")))
                .boxed(),
            not_an_integer().prop_map(|v| set("output_compression", v).with("output_format", json!("webp"))).boxed(),
            outside(0, 3).prop_map(|v| set("partial_images", v).with("stream", json!(true))).boxed(),
            not_an_integer().prop_map(|v| set("partial_images", v).with("stream", json!(true))).boxed(),
            strs(&["bogus", "HIGH", "medium", ""]).prop_map(|v| set("input_fidelity", v)).boxed(),
        ]);
    } else {
        let style: &'static [&'static str] =
            if f == Family::DallE3 { &["dramatic", "VIVID", "", "photo"] } else { &["vivid", "natural"] };
        // A GPT-only parameter on a request naming no model makes it a GPT image request (OpenAI's rule), so
        // these name their DALL·E model.
        let named = move |c: Corruption| c.with("model", json!(f.models()[0]));
        options.extend([
            strs(style).prop_map(|v| set("style", v)).boxed(),
            strs(&["png", "jpeg", "URL", "base64"]).prop_map(|v| set("response_format", v)).boxed(),
            strs(&["transparent", "opaque", "auto"]).prop_map(move |v| named(set("background", v))).boxed(),
            strs(&["low", "auto"]).prop_map(move |v| named(set("moderation", v))).boxed(),
            strs(&["png", "jpeg", "webp"]).prop_map(move |v| named(set("output_format", v))).boxed(),
            (0..=100i64).prop_map(move |v| named(set("output_compression", Value::from(v)))).boxed(),
            Just(named(set("stream", json!(true)))).boxed(),
            (0..=3i64).prop_map(move |v| named(set("partial_images", Value::from(v)))).boxed(),
            strs(&["high", "low"]).prop_map(move |v| named(set("input_fidelity", v))).boxed(),
        ]);
    }
    proptest::strategy::Union::new(options).boxed()
}

// --------------------------------------------------------------------------------------------- helpers

fn json_request(endpoint: Endpoint, map: &Map<String, Value>) -> ImageRequest {
    ImageRequest::from_json(endpoint, Bytes::from(serde_json::to_vec(map).unwrap())).unwrap()
}

fn reject() -> ValidationPolicy {
    ValidationPolicy { unknown_models: UnknownModels::Reject, ..ValidationPolicy::default() }
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
    Part { name: name.to_owned(), file_name: None, content_type: None, data: Bytes::from(value.to_owned()).into() }
}

fn file_part(name: &str, data: Vec<u8>, mime: &str) -> Part {
    Part {
        name: name.to_owned(),
        file_name: Some(format!("upload.{}", mime.rsplit('/').next().unwrap_or("bin"))),
        content_type: Some(mime.to_owned()),
        data: Bytes::from(data).into(),
    }
}

fn form_request(endpoint: Endpoint, parts: Vec<Part>) -> ImageRequest {
    ImageRequest::from_form(endpoint, Form { parts })
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
    fn every_valid_multipart_edit_is_accepted(case in valid_edit()) {
        let parts = case.parts();
        let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
        let request = form_request(Endpoint::Edits, parts);
        if let Err(error) = validate(&request, &ValidationPolicy::default()) {
            prop_assert!(false, "{:?}: refused {} with parts {names:?}\n  {}", case.family, shown(&case.fields), explain(&error));
        }
    }

    #[test]
    fn spoiling_one_field_or_file_of_a_valid_multipart_edit_is_refused_naming_it(
        (case, spoil) in valid_edit().prop_flat_map(|case| { let spoils = edit_spoil(&case); (Just(case), spoils) })
    ) {
        let (parts, param) = spoil.apply_to_edit(&case);
        let request = form_request(Endpoint::Edits, parts);
        match validate(&request, &ValidationPolicy::default()) {
            Ok(_) => prop_assert!(false, "{:?} {spoil:?}: accepted {}", case.family, shown(&case.fields)),
            Err(error) => {
                prop_assert_eq!(error.status().as_u16(), 400, "{}", explain(&error));
                prop_assert_eq!(error.param(), Some(param.as_str()), "{:?} {:?}\n  {}", case.family, spoil, explain(&error));
            }
        }
    }

    #[test]
    fn every_valid_variation_is_accepted(case in valid_variation()) {
        let request = form_request(Endpoint::Variations, case.parts());
        if let Err(error) = validate(&request, &ValidationPolicy::default()) {
            prop_assert!(false, "refused {} ({}x{})\n  {}", shown(&case.fields), case.side, case.side, explain(&error));
        }
    }

    #[test]
    fn spoiling_one_field_or_file_of_a_valid_variation_is_refused_naming_it(
        case in valid_variation(),
        spoil in variation_spoil(),
    ) {
        let (parts, param) = spoil.apply_to_variation(&case);
        let request = form_request(Endpoint::Variations, parts);
        match validate(&request, &ValidationPolicy::default()) {
            Ok(_) => prop_assert!(false, "{spoil:?}: accepted {}", shown(&case.fields)),
            Err(error) => {
                prop_assert_eq!(error.status().as_u16(), 400, "{}", explain(&error));
                prop_assert_eq!(error.param(), Some(param.as_str()), "{:?}\n  {}", spoil, explain(&error));
            }
        }
    }

    #[test]
    fn every_valid_json_edit_is_accepted(case in valid_json_edit()) {
        let map = case.body();
        let request = json_request(Endpoint::Edits, &map);
        if let Err(error) = validate(&request, &ValidationPolicy::default()) {
            prop_assert!(false, "{:?}: refused {}\n  {}", case.family, shown(&map), explain(&error));
        }
    }

    #[test]
    fn spoiling_one_field_or_reference_of_a_valid_json_edit_is_refused_naming_it(
        (case, spoil) in valid_json_edit().prop_flat_map(|case| { let spoils = json_edit_spoil(&case); (Just(case), spoils) })
    ) {
        let (map, param) = spoil.apply(&case);
        let request = json_request(Endpoint::Edits, &map);
        match validate(&request, &ValidationPolicy::default()) {
            Ok(_) => prop_assert!(false, "{:?} {spoil:?}: accepted {}", case.family, shown(&map)),
            Err(error) => {
                prop_assert_eq!(error.status().as_u16(), 400, "{}", explain(&error));
                prop_assert_eq!(error.param(), Some(param.as_str()), "{:?} {:?}: {}\n  {}", case.family, spoil, shown(&map), explain(&error));
            }
        }
    }

    #[test]
    fn sizes_are_judged_by_the_published_rule_whatever_their_numbers(
        size in prop_oneof![wild_size(), select(SIZE_POOL.to_vec()).prop_map(str::to_owned), gpt2_wxh()],
        model in select(KNOWN_MODELS.to_vec()),
    ) {
        let mut map = Map::new();
        map.insert("model".to_owned(), json!(model));
        map.insert("prompt".to_owned(), json!("a red fox"));
        map.insert("size".to_owned(), json!(size));
        let result = validate(&json_request(Endpoint::Generations, &map), &ValidationPolicy::default());
        if family_of(model).size_ok(&size) {
            prop_assert!(result.is_ok(), "{model} {size:?}: {}", result.err().map(|e| explain(&e)).unwrap_or_default());
        } else {
            let error = result.err();
            prop_assert!(error.is_some(), "{model} accepted {size:?}");
            let error = error.unwrap();
            prop_assert_eq!((error.param(), error.code()), (Some("size"), Some("invalid_value")), "{}", explain(&error));
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

// --------------------------------------------------------------------------------------------- multipart cases

/// `bytes` without its last bytes, the header intact: 12 for a PNG (its IEND), 2 for a JPEG (its end marker),
/// 4 for a WebP (inside its RIFF size).
fn truncated(mut bytes: Vec<u8>) -> Vec<u8> {
    let cut = match bytes.first() {
        Some(0x89) => 12,
        Some(0xFF) => 2,
        _ => 4,
    };
    bytes.truncate(bytes.len() - cut);
    bytes
}

fn junk(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(7919) % 251) as u8 ^ 0x5a).collect()
}

/// A valid multipart edit: text fields, the images (width, height, kind of [`picture`]), and the mask's place.
#[derive(Clone, Debug)]
struct EditCase {
    family: Family,
    fields: Map<String, Value>,
    images: Vec<(u32, u32, u8)>,
    masked: bool,
    mask_at: prop::sample::Index,
    indexed: bool,
}

fn valid_edit() -> BoxedStrategy<EditCase> {
    (
        select([Family::DallE2, Family::Gpt, Family::Gpt2].to_vec()).prop_flat_map(|f| (Just(f), valid_generation(f))),
        prop::option::of(select(["high", "low"].to_vec())),
        proptest::collection::vec((1u32..=48, 1u32..=48, 0u8..4), 1..=16),
        any::<bool>(),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|((family, mut fields), fidelity, images, masked, mask_at, indexed)| {
            let model = str_of(&fields, "model").unwrap_or("dall-e-2").to_owned();
            if let Some(fidelity) = fidelity.filter(|_| family == Family::Gpt && model != "gpt-image-1-mini") {
                fields.insert("input_fidelity".to_owned(), json!(fidelity));
            }
            // Edits default to gpt-image-1.5, so dall-e-2 must be named.
            if family == Family::DallE2 {
                fields.insert("model".to_owned(), json!("dall-e-2"));
            }
            EditCase { family, fields, images, masked, mask_at, indexed }
        })
        .boxed()
}

impl EditCase {
    /// dall-e-2 takes one image; GPT image models all of them.
    fn count(&self) -> usize {
        if self.family == Family::DallE2 { 1 } else { self.images.len() }
    }

    fn image_name(&self, i: usize) -> String {
        match (self.count() > 1, self.indexed) {
            (false, _) => "image".to_owned(),
            (true, false) => "image[]".to_owned(),
            (true, true) => format!("image[{i}]"),
        }
    }

    /// How errors name image `i`.
    fn param(&self, i: usize) -> String {
        if self.count() == 1 { "image".to_owned() } else { format!("image[{i}]") }
    }

    fn first_size(&self) -> (u32, u32) {
        let (w, h, _) = self.images[0];
        if self.family == Family::DallE2 { (w, w) } else { (w, h) }
    }

    fn image(&self, i: usize) -> (Vec<u8>, &'static str) {
        let (w, h, kind) = self.images[i];
        // dall-e-2: one square PNG, RGBA, or RGB with a mask.
        if self.family == Family::DallE2 { picture(w, w, u8::from(!self.masked)) } else { picture(w, h, kind) }
    }

    fn parts_with(&self, fields: &Map<String, Value>, mask: bool) -> Vec<Part> {
        let mut parts = as_text_parts(fields);
        for i in 0..self.count() {
            let (bytes, mime) = self.image(i);
            parts.push(file_part(&self.image_name(i), bytes, mime));
        }
        if mask {
            let (w, h) = self.first_size();
            let (bytes, mime) = picture(w, h, 1);
            parts.insert(self.mask_at.index(parts.len() + 1), file_part("mask", bytes, mime));
        }
        parts
    }

    fn parts(&self) -> Vec<Part> {
        self.parts_with(&self.fields, self.masked)
    }
}

/// A valid variation: dall-e-2's fields and one square PNG.
#[derive(Clone, Debug)]
struct VariationCase {
    fields: Map<String, Value>,
    side: u32,
    alpha: bool,
}

fn valid_variation() -> BoxedStrategy<VariationCase> {
    let fields = vec![
        prop_oneof![
            Just(None),
            Just(Some(("model".to_owned(), Value::Null))),
            Just(Some(("model".to_owned(), json!("dall-e-2")))),
        ]
        .boxed(),
        opt("n", (1..=10i64).prop_map(Value::from)),
        opt("size", strs(Family::DallE2.listed_sizes())),
        opt("response_format", strs(&["url", "b64_json"])),
        opt("user", "\\PC{0,24}".prop_map(Value::from)),
    ];
    (fields.prop_shuffle(), extras(), 1u32..=64, any::<bool>())
        .prop_map(|(fields, extras, side, alpha)| {
            let mut map: Map<String, Value> = fields.into_iter().flatten().collect();
            map.extend(extras);
            VariationCase { fields: map, side, alpha }
        })
        .boxed()
}

impl VariationCase {
    fn parts_with(&self, fields: &Map<String, Value>) -> Vec<Part> {
        let mut parts = as_text_parts(fields);
        let (bytes, mime) = picture(self.side, self.side, u8::from(self.alpha));
        parts.push(file_part("image", bytes, mime));
        parts
    }

    fn parts(&self) -> Vec<Part> {
        self.parts_with(&self.fields)
    }
}

/// One text field set (`None`: removed), after `also` is set and `remove` removed, as multipart text.
#[derive(Clone, Debug)]
struct TextSpoil {
    field: &'static str,
    value: Option<String>,
    also: Vec<(&'static str, String)>,
    remove: Vec<&'static str>,
}

impl TextSpoil {
    fn apply(&self, fields: &Map<String, Value>) -> Map<String, Value> {
        let mut map = fields.clone();
        for name in &self.remove {
            map.remove(*name);
        }
        for (name, value) in &self.also {
            map.insert((*name).to_owned(), json!(value));
        }
        match &self.value {
            Some(value) => map.insert(self.field.to_owned(), json!(value)),
            None => map.remove(self.field),
        };
        map
    }
}

fn text(field: &'static str, values: &'static [&'static str]) -> BoxedStrategy<TextSpoil> {
    select(values)
        .prop_map(move |v| TextSpoil { field, value: Some(v.to_owned()), also: Vec::new(), remove: Vec::new() })
        .boxed()
}

fn text_with(
    field: &'static str,
    values: &'static [&'static str],
    also: &'static [(&'static str, &'static str)],
    remove: &'static [&'static str],
) -> BoxedStrategy<TextSpoil> {
    select(values)
        .prop_map(move |v| TextSpoil {
            field,
            value: Some(v.to_owned()),
            also: also.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            remove: remove.to_vec(),
        })
        .boxed()
}

/// Integers as text in every form but the plain one, and plain ones out of every range.
const BAD_INTEGER_TEXT: &[&str] = &["+2", " 2", "2 ", "02", "00", "-0", "2.0", "1e1", "two", "", "0x2", "２"];

/// Text-field spoils for a multipart request of `family` on `endpoint`.
fn text_spoils(family: Family, model: &str, endpoint: Endpoint) -> Vec<BoxedStrategy<TextSpoil>> {
    let limit = family.prompt_limit();
    let mut out = vec![
        text("n", BAD_INTEGER_TEXT),
        text("n", &["0", "11", "-1", "99999999999999999999"]),
        select(SIZE_POOL.to_vec())
            .prop_filter("a size the model takes", move |s| !family.size_ok(s))
            .prop_map(|s| TextSpoil { field: "size", value: Some(s.to_owned()), also: Vec::new(), remove: Vec::new() })
            .boxed(),
        wild_size()
            .prop_filter("a size the model takes", move |s| !family.size_ok(s))
            .prop_map(|s| TextSpoil { field: "size", value: Some(s), also: Vec::new(), remove: Vec::new() })
            .boxed(),
        select(QUALITY_POOL.to_vec())
            .prop_filter("a quality the model takes", move |q| !family.qualities().contains(q))
            .prop_map(|q| TextSpoil {
                field: "quality",
                value: Some(q.to_owned()),
                also: Vec::new(),
                remove: Vec::new(),
            })
            .boxed(),
        text("style", &["vivid", "natural"]),
        too_long_prompt(limit)
            .prop_map(|p| TextSpoil { field: "prompt", value: Some(p), also: Vec::new(), remove: Vec::new() })
            .boxed(),
    ];
    if endpoint == Endpoint::Edits {
        out.extend([
            Just(TextSpoil { field: "prompt", value: None, also: Vec::new(), remove: Vec::new() }).boxed(),
            text("prompt", &[""]),
        ]);
    }
    if family.gpt() {
        let takes_fidelity = !matches!(model, "gpt-image-1-mini" | "gpt-image-2" | "gpt-image-2-2026-04-21");
        out.extend([
            text_with("stream", &["yes", "1", "True", "TRUE", ""], &[], &["partial_images"]),
            text("response_format", &["url", "b64_json"]),
            text("background", &["clear", "none", "Transparent", ""]),
            text("moderation", &["high", "strict"]),
            text_with("output_format", &["jpg", "gif", "PNG", ""], &[], &["output_compression", "background"]),
            text_with("output_compression", &["101", "-1", "+5", "050", "abc"], &[("output_format", "webp")], &[]),
            text_with("output_compression", &["0", "50", "99"], &[("output_format", "png")], &[]),
            text_with("partial_images", &["4", "-1", "03", "+1"], &[("stream", "true")], &[]),
            text("input_fidelity", if takes_fidelity { &["bogus", "HIGH", "medium", ""] } else { &["high", "low"] }),
        ]);
    } else {
        out.extend([
            text("response_format", &["png", "URL", "base64", ""]),
            text("background", &["opaque"]),
            text("moderation", &["low"]),
            text("output_format", &["png"]),
            text("output_compression", &["50"]),
            text("partial_images", &["1"]),
            text("input_fidelity", &["high"]),
            text_with("stream", &["true"], &[], &["partial_images"]),
        ]);
    }
    out
}

/// What goes wrong with an image file.
#[derive(Clone, Copy, Debug)]
enum FileSpoil {
    /// Bytes that are no image, declared as the original was.
    Junk,
    /// The header intact, the end cut off.
    Truncated,
    /// A 1 KB PNG claiming 100000x100000.
    Bomb,
    /// Declared `application/octet-stream`, bytes that are no image. (An octet-stream or untyped part whose
    /// bytes are an image is mended from its bytes, issue 14: not a spoil.)
    OctetStreamJunk,
    /// No `Content-Type` at all, bytes that are no image.
    UntypedJunk,
    /// Declared `image/jpg`, which OpenAI does not list.
    Jpg,
    /// A PNG declared `image/jpeg`.
    Mislabelled,
}

const FILE_SPOILS: [FileSpoil; 7] = [
    FileSpoil::Junk,
    FileSpoil::Truncated,
    FileSpoil::Bomb,
    FileSpoil::OctetStreamJunk,
    FileSpoil::UntypedJunk,
    FileSpoil::Jpg,
    FileSpoil::Mislabelled,
];

impl FileSpoil {
    fn apply(self, part: &mut Part) {
        match self {
            Self::Junk => part.data = Bytes::from(junk(300)).into(),
            Self::Truncated => part.data = Bytes::from(truncated(part.data.to_bytes().to_vec())).into(),
            Self::Bomb => {
                part.data = Bytes::from(png_claiming(100_000, 100_000)).into();
                part.content_type = Some("image/png".to_owned());
            }
            Self::OctetStreamJunk => {
                part.data = Bytes::from(junk(300)).into();
                part.content_type = Some("application/octet-stream".to_owned());
            }
            Self::UntypedJunk => {
                part.data = Bytes::from(junk(300)).into();
                part.content_type = None;
            }
            Self::Jpg => part.content_type = Some("image/jpg".to_owned()),
            Self::Mislabelled => {
                part.data = Bytes::from(picture(16, 16, 1).0).into();
                part.content_type = Some("image/jpeg".to_owned());
            }
        }
    }
}

/// What goes wrong with the mask of an edit.
#[derive(Clone, Copy, Debug)]
enum MaskSpoil {
    /// An RGB PNG: no alpha channel.
    NoAlpha,
    /// One pixel wider than the first image.
    OtherSize,
    /// A PNG declared `image/jpeg`.
    DeclaredJpeg,
    Junk,
    Truncated,
    Bomb,
    /// Two masks.
    Twice,
}

const MASK_SPOILS: [MaskSpoil; 7] = [
    MaskSpoil::NoAlpha,
    MaskSpoil::OtherSize,
    MaskSpoil::DeclaredJpeg,
    MaskSpoil::Junk,
    MaskSpoil::Truncated,
    MaskSpoil::Bomb,
    MaskSpoil::Twice,
];

impl MaskSpoil {
    /// The mask parts (one, or two for `Twice`) for a first image of `w`x`h`.
    fn masks(self, (w, h): (u32, u32)) -> Vec<Part> {
        let good = || picture(w, h, 1).0;
        let (bytes, mime) = match self {
            Self::NoAlpha => (picture(w, h, 0).0, "image/png"),
            Self::OtherSize => (picture(w + 1, h, 1).0, "image/png"),
            Self::DeclaredJpeg => (good(), "image/jpeg"),
            Self::Junk => (junk(200), "image/png"),
            Self::Truncated => (truncated(good()), "image/png"),
            Self::Bomb => (png_claiming(100_000, 100_000), "image/png"),
            Self::Twice => return vec![file_part("mask", good(), "image/png"), file_part("mask", good(), "image/png")],
        };
        vec![file_part("mask", bytes, mime)]
    }
}

/// One thing wrong with a multipart request.
#[derive(Clone, Debug)]
enum FormSpoil {
    Text(TextSpoil),
    Image(prop::sample::Index, FileSpoil),
    Mask(MaskSpoil),
    /// dall-e-2: the (only) image is not square.
    NotSquare,
    /// Variations: a model other than dall-e-2.
    Model(&'static str),
}

fn edit_spoil(case: &EditCase) -> BoxedStrategy<FormSpoil> {
    let model = str_of(&case.fields, "model").unwrap_or("gpt-image-1.5").to_owned();
    let mut options: Vec<BoxedStrategy<FormSpoil>> = text_spoils(case.family, &model, Endpoint::Edits)
        .into_iter()
        .map(|s| s.prop_map(FormSpoil::Text).boxed())
        .collect();
    options.push(
        (any::<prop::sample::Index>(), select(FILE_SPOILS.to_vec())).prop_map(|(i, f)| FormSpoil::Image(i, f)).boxed(),
    );
    options.push(select(MASK_SPOILS.to_vec()).prop_map(FormSpoil::Mask).boxed());
    if case.family == Family::DallE2 {
        options.push(Just(FormSpoil::NotSquare).boxed());
    }
    proptest::strategy::Union::new(options).boxed()
}

fn variation_spoil() -> BoxedStrategy<FormSpoil> {
    let mut options: Vec<BoxedStrategy<FormSpoil>> = text_spoils(Family::DallE2, "dall-e-2", Endpoint::Variations)
        .into_iter()
        .map(|s| s.prop_map(FormSpoil::Text).boxed())
        .collect();
    options.extend([
        (any::<prop::sample::Index>(), select(FILE_SPOILS.to_vec())).prop_map(|(i, f)| FormSpoil::Image(i, f)).boxed(),
        Just(FormSpoil::Mask(MaskSpoil::NoAlpha)).boxed(),
        Just(FormSpoil::NotSquare).boxed(),
        select(["gpt-image-1", "gpt-image-1.5", "gpt-image-2", "dall-e-3", "chatgpt-image-latest"].to_vec())
            .prop_map(FormSpoil::Model)
            .boxed(),
    ]);
    proptest::strategy::Union::new(options).boxed()
}

/// The `index`-th image part of `parts`.
fn image_part(parts: &mut [Part], index: usize) -> &mut Part {
    parts.iter_mut().filter(|p| imagegate::images::request::is_image_field(&p.name)).nth(index).unwrap()
}

impl FormSpoil {
    /// The spoiled parts of `case` and the parameter the refusal must name.
    fn apply_to_edit(&self, case: &EditCase) -> (Vec<Part>, String) {
        match self {
            Self::Text(t) => {
                let fields = t.apply(&case.fields);
                (case.parts_with(&fields, case.masked), t.field.to_owned())
            }
            Self::Image(index, spoil) => {
                let i = index.index(case.count());
                let mut parts = case.parts();
                spoil.apply(image_part(&mut parts, i));
                (parts, case.param(i))
            }
            Self::Mask(spoil) => {
                let mut parts = case.parts_with(&case.fields, false);
                let at = case.mask_at.index(parts.len() + 1);
                for (k, mask) in spoil.masks(case.first_size()).into_iter().enumerate() {
                    parts.insert(at + k, mask);
                }
                (parts, "mask".to_owned())
            }
            Self::NotSquare => {
                let mut parts = case.parts();
                let (w, _, _) = case.images[0];
                image_part(&mut parts, 0).data = Bytes::from(picture(w, w + 1, 1).0).into();
                (parts, "image".to_owned())
            }
            Self::Model(_) => panic!("edit_spoil never spoils an edit's model"),
        }
    }

    fn apply_to_variation(&self, case: &VariationCase) -> (Vec<Part>, String) {
        match self {
            Self::Text(t) => (case.parts_with(&t.apply(&case.fields)), t.field.to_owned()),
            Self::Image(_, spoil) => {
                let mut parts = case.parts();
                spoil.apply(image_part(&mut parts, 0));
                (parts, "image".to_owned())
            }
            Self::Mask(_) => {
                let mut parts = case.parts();
                parts.push(file_part("mask", picture(case.side, case.side, 1).0, "image/png"));
                (parts, "mask".to_owned())
            }
            Self::NotSquare => {
                let mut parts = case.parts();
                image_part(&mut parts, 0).data = Bytes::from(picture(case.side, case.side + 1, 1).0).into();
                (parts, "image".to_owned())
            }
            Self::Model(model) => {
                let mut fields = case.fields.clone();
                fields.insert("model".to_owned(), json!(model));
                (case.parts_with(&fields), "model".to_owned())
            }
        }
    }
}

// --------------------------------------------------------------------------------------------- JSON edit cases

/// One `ImageRefParam` of a valid JSON edit.
#[derive(Clone, Debug)]
enum Ref {
    Url(String),
    FileId(String),
    /// A `data:` URL holding a real image of [`picture`].
    Data(u32, u32, u8),
}

fn image_ref() -> BoxedStrategy<Ref> {
    prop_oneof![
        "https://[a-z]{1,12}\\.example\\.com/[a-z0-9/]{0,20}\\.png".prop_map(Ref::Url),
        "http://[a-z]{1,12}\\.example/[a-z0-9]{1,8}".prop_map(Ref::Url),
        (1u32..=32, 1u32..=32, 0u8..4).prop_map(|(w, h, k)| Ref::Data(w, h, k)),
        "file-[A-Za-z0-9]{1,24}".prop_map(Ref::FileId),
    ]
    .boxed()
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

impl Ref {
    fn value(&self) -> Value {
        match self {
            Self::Url(u) => json!({"image_url": u}),
            Self::FileId(id) => json!({"file_id": id}),
            Self::Data(w, h, kind) => {
                let (bytes, mime) = picture(*w, *h, *kind);
                json!({"image_url": data_url(mime, &bytes)})
            }
        }
    }
}

/// A valid JSON edit: GPT image fields, 1–16 references, and maybe a mask (a PNG with alpha of the first
/// image's size when the first image is a `data:` URL).
#[derive(Clone, Debug)]
struct JsonEditCase {
    family: Family,
    fields: Map<String, Value>,
    images: Vec<Ref>,
    mask: Option<Ref>,
}

fn valid_json_edit() -> BoxedStrategy<JsonEditCase> {
    (
        select([Family::Gpt, Family::Gpt2].to_vec()).prop_flat_map(|f| (Just(f), valid_generation(f))),
        proptest::collection::vec(image_ref(), 1..=16),
        prop::option::of(image_ref()),
    )
        .prop_map(|((family, fields), images, mask)| {
            let mask = mask.map(|m| match (m, &images[0]) {
                (Ref::Data(..), Ref::Data(w, h, _)) => Ref::Data(*w, *h, 1),
                (Ref::Data(w, h, _), _) => Ref::Data(w, h, 1),
                (other, _) => other,
            });
            JsonEditCase { family, fields, images, mask }
        })
        .boxed()
}

impl JsonEditCase {
    fn body(&self) -> Map<String, Value> {
        let mut map = self.fields.clone();
        map.insert("images".to_owned(), Value::Array(self.images.iter().map(Ref::value).collect()));
        if let Some(mask) = &self.mask {
            map.insert("mask".to_owned(), mask.value());
        }
        map
    }
}

/// One thing wrong with a JSON edit.
#[derive(Clone, Debug)]
enum JsonEditSpoil {
    /// A field, as for generations.
    Field(Corruption),
    /// `images[i]` replaced by `value`; the error names `images[i]` + `suffix`.
    Image(prop::sample::Index, Value, &'static str),
    /// `mask` replaced by `value`; the error names `mask` + `suffix`.
    Mask(Value, &'static str),
    /// `images` replaced by `value` (empty, too long, not an array).
    Images(Value),
}

/// Broken references: (value, suffix of the param the error names).
fn bad_refs() -> Vec<(Value, &'static str)> {
    vec![
        (json!(5), ""),
        (json!("https://example.com/a.png"), ""),
        (json!({}), ""),
        (json!({"image_url": "https://example.com/a.png", "file_id": "file-a"}), ""),
        (json!({"image_url": "ftp://example.com/a.png"}), ".image_url"),
        (json!({"image_url": 7}), ".image_url"),
        (json!({"file_id": ["file-a"]}), ".file_id"),
        (json!({"image_url": data_url("image/png", &junk(100))}), ".image_url"),
        (json!({"image_url": data_url("image/png", &png_claiming(100_000, 100_000))}), ".image_url"),
        (json!({"image_url": data_url("image/png", &truncated(picture(16, 16, 1).0))}), ".image_url"),
        (json!({"image_url": data_url("image/jpeg", &picture(16, 16, 1).0)}), ".image_url"),
        (json!({"image_url": data_url("image/gif", &picture(16, 16, 1).0)}), ".image_url"),
        (json!({"image_url": "data:image/png;base64,iVBO*Rw0KGgo"}), ".image_url"),
    ]
}

fn json_edit_spoil(case: &JsonEditCase) -> BoxedStrategy<JsonEditSpoil> {
    let mut masks = bad_refs();
    // A mask must also be a PNG with alpha: an RGB PNG or a WebP are refused as masks only.
    masks.push((json!({"image_url": data_url("image/png", &picture(16, 16, 0).0)}), ".image_url"));
    masks.push((json!({"image_url": data_url("image/webp", &picture(16, 16, 3).0)}), ".image_url"));
    if let Ref::Data(w, h, _) = case.images[0] {
        masks.push((json!({"image_url": data_url("image/png", &picture(w + 1, h, 1).0)}), ".image_url"));
    }
    let url = json!({"image_url": "https://example.com/a.png"});
    proptest::strategy::Union::new([
        corruption(case.family).prop_map(JsonEditSpoil::Field).boxed(),
        (any::<prop::sample::Index>(), select(bad_refs()))
            .prop_map(|(i, (v, s))| JsonEditSpoil::Image(i, v, s))
            .boxed(),
        select(masks).prop_map(|(v, s)| JsonEditSpoil::Mask(v, s)).boxed(),
        select(vec![json!([]), json!(null), Value::Array(vec![url.clone(); 17]), url, json!("file-a")])
            .prop_map(JsonEditSpoil::Images)
            .boxed(),
    ])
    .boxed()
}

impl JsonEditSpoil {
    /// The spoiled body and the parameter the refusal must name.
    fn apply(&self, case: &JsonEditCase) -> (Map<String, Value>, String) {
        let mut map = case.body();
        let param = match self {
            Self::Field(c) => {
                map = c.apply(map);
                c.field.to_owned()
            }
            Self::Image(index, value, suffix) => {
                let i = index.index(case.images.len());
                map["images"][i] = value.clone();
                format!("images[{i}]{suffix}")
            }
            Self::Mask(value, suffix) => {
                map.insert("mask".to_owned(), value.clone());
                format!("mask{suffix}")
            }
            Self::Images(value) => {
                map.insert("images".to_owned(), value.clone());
                "images".to_owned()
            }
        };
        (map, param)
    }
}

// --------------------------------------------------------------------------------------------- end to end

/// Valid requests of each kind, sent through the real gateway (default settings: re-hosting on, cache off)
/// to the fake upstream, arrive there unchanged: JSON byte for byte with the same `Content-Type`; multipart
/// forms part for part (names, file names, types and bytes, in order), re-encoded under imagegate's own
/// boundary so the upstream parses exactly the form that was validated. Fewer cases than the library
/// properties, since each is a real HTTP round trip.
mod through_the_gateway {
    use std::sync::OnceLock;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::support::app::TestApp;
    use crate::support::fake_openai::FakeOpenAi;

    /// One gateway and fake per property (cases of a property run one after another).
    struct Gateway {
        runtime: tokio::runtime::Runtime,
        app: TestApp,
        fake: FakeOpenAi,
    }

    fn start() -> Gateway {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (app, fake) = runtime.block_on(async {
            let fake = FakeOpenAi::start().await;
            let app = TestApp::spawn(&fake.url).await;
            (app, fake)
        });
        Gateway { runtime, app, fake }
    }

    impl Gateway {
        /// POST `body` as `content_type`; the fake must have received exactly it, once.
        fn forwards_unchanged(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<(), TestCaseError> {
            let before = self.fake.call_count();
            let sent = hex::encode(Sha256::digest(&body));
            let len = body.len();
            let status = self.runtime.block_on(async {
                let res = self
                    .app
                    .client
                    .post(format!("{}{path}", self.app.base_url))
                    .bearer_auth(&self.app.key)
                    .header("content-type", content_type)
                    .header("cache-control", "no-store")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                let text = res.text().await.unwrap_or_default();
                (status, text)
            });
            let calls = self.fake.calls();
            prop_assert_eq!(calls.len(), before + 1, "not forwarded once: {} {}", status.0, status.1);
            let call = calls.last().unwrap();
            prop_assert_eq!(
                &call.body_sha256,
                &sent,
                "the upstream received another body ({} bytes sent, {} received)",
                len,
                call.body_len
            );
            prop_assert_eq!(call.content_type.as_deref(), Some(content_type));
            Ok(())
        }
    }

    impl Gateway {
        /// POST `parts` as a multipart form under `boundary`; the fake must have received the same parts, once,
        /// under a boundary of imagegate's own.
        fn forwards_same_form(&self, path: &str, parts: &[Part], boundary: &str) -> Result<(), TestCaseError> {
            let before = self.fake.call_count();
            let content_type = format!("multipart/form-data; boundary={boundary}");
            let body = encode(parts, boundary);
            let status = self.runtime.block_on(async {
                let res = self
                    .app
                    .client
                    .post(format!("{}{path}", self.app.base_url))
                    .bearer_auth(&self.app.key)
                    .header("content-type", content_type)
                    .header("cache-control", "no-store")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = res.status().as_u16();
                let text = res.text().await.unwrap_or_default();
                (status, text)
            });
            let calls = self.fake.calls();
            prop_assert_eq!(calls.len(), before + 1, "not forwarded once: {} {}", status.0, status.1);
            let call = calls.last().unwrap();
            let received: Vec<_> = call
                .parts
                .iter()
                .map(|p| (p.name.clone(), p.file_name.clone(), p.content_type.clone(), p.sha256.clone()))
                .collect();
            let sent: Vec<_> = parts
                .iter()
                .map(|p| {
                    let sha = hex::encode(p.data.sha256());
                    (p.name.clone(), p.file_name.clone(), p.content_type.clone(), sha)
                })
                .collect();
            prop_assert_eq!(received, sent);
            let forwarded = call.content_type.as_deref().unwrap_or_default();
            prop_assert!(forwarded.starts_with("multipart/form-data; boundary=imagegate-"), "{}", forwarded);
            Ok(())
        }
    }

    /// A multipart body as an SDK writes it, with `boundary`.
    fn encode(parts: &[Part], boundary: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"", part.name).as_bytes(),
            );
            if let Some(file) = &part.file_name {
                out.extend_from_slice(format!("; filename=\"{file}\"").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            if let Some(ct) = &part.content_type {
                out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&part.data.to_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        out
    }

    /// Boundaries of the Python SDK (httpx), the Node SDK (undici) and browsers.
    fn boundary() -> BoxedStrategy<String> {
        prop_oneof!["[0-9a-f]{32}", "----formdata-undici-0[0-9]{11}", "----WebKitFormBoundary[A-Za-z0-9]{16}",].boxed()
    }

    static GENERATIONS: OnceLock<Gateway> = OnceLock::new();
    static EDITS: OnceLock<Gateway> = OnceLock::new();
    static VARIATIONS: OnceLock<Gateway> = OnceLock::new();
    static JSON_EDITS: OnceLock<Gateway> = OnceLock::new();

    proptest! {
        #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

        #[test]
        fn valid_generations_reach_the_upstream_byte_for_byte(
            map in any_family().prop_flat_map(valid_generation)
        ) {
            let body = serde_json::to_vec(&map).unwrap();
            GENERATIONS.get_or_init(start).forwards_unchanged("/images/generations", "application/json", body)?;
        }

        #[test]
        fn valid_multipart_edits_reach_the_upstream_part_for_part(case in valid_edit(), boundary in boundary()) {
            EDITS.get_or_init(start).forwards_same_form("/images/edits", &case.parts(), &boundary)?;
        }

        #[test]
        fn valid_variations_reach_the_upstream_part_for_part(case in valid_variation(), boundary in boundary()) {
            VARIATIONS.get_or_init(start).forwards_same_form("/images/variations", &case.parts(), &boundary)?;
        }

        #[test]
        fn valid_json_edits_reach_the_upstream_byte_for_byte(case in valid_json_edit()) {
            let body = serde_json::to_vec(&case.body()).unwrap();
            JSON_EDITS.get_or_init(start).forwards_unchanged("/images/edits", "application/json", body)?;
        }
    }
}
