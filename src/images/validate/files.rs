//! File rules for edits and variations: count, declared type, real bytes (headers and the file's end only),
//! size, dimensions, dall-e-2's square-PNG-with-transparency rule, and the mask. The same rules hold for
//! multipart file parts and for the `data:` URLs of the JSON edit body (`images[i].image_url`,
//! `mask.image_url`), of which only the first and last bytes are decoded.
//!
//! Known models get every rule of `docs/validation.md`; models imagegate does not know (forwarded by policy)
//! get only the byte-level rules, which protect imagegate itself and hold for any upstream: each file is a
//! readable PNG, JPEG or WebP header, at most [`MAX_EDGE`] pixels a side, not cut short; one mask at most.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::Value;

use super::reader::{Reader, invalid_type, missing, unsupported};
use crate::error::ApiError;
use crate::images::imageinfo::{self, ColorKind, ImageFormat, ImageInfo};
use crate::images::models::Model;
use crate::images::request::{Endpoint, Part, is_image_field};

const MIB: usize = 1024 * 1024;
/// No side of an input image may exceed this; checked from the header, before anything is allocated.
pub const MAX_EDGE: u32 = 16384;
/// What clients declare when they do not know a file's type (raw bytes in the Python SDK, a bare stream in
/// Node).
const OCTET_STREAM: &str = "application/octet-stream";
/// The JSON edit body's schema: at most this many `images`.
const JSON_MAX_IMAGES: usize = 16;
const MASK_MAX_BYTES: u64 = 4 * MIB as u64;
const JSON_IMAGE_URL_MAX: usize = 20_971_520;
/// Base64 characters of a `data:` URL decoded for the header: 700,000 characters, 525,000 bytes, room for
/// the largest metadata segments a JPEG puts before its frame header.
const DATA_URL_HEAD_CHARS: usize = 700_000;
/// Base64 characters decoded from a `data:` URL's end for the end checks: 1,368 characters, 1,026 bytes.
const DATA_URL_TAIL_CHARS: usize = 4 * imageinfo::TAIL_WINDOW.div_ceil(3);

/// Lenient about padding and trailing bits, as the decoders upstream are; strict about the alphabet.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A file part to forward with another `Content-Type`: its index in the form and the type its bytes are.
pub type Mend = (usize, &'static str);

/// One uploaded file as the rules see it, wherever it came from.
struct Upload<'a> {
    /// Its index among the form's parts (`None` for a JSON `data:` URL, whose type is never mended).
    index: Option<usize>,
    /// How errors name it: `image`, `image[1]`, `mask`, `images[0].image_url`, …
    param: String,
    /// The declared media type: the part's `Content-Type`, or the `data:` URL's type.
    declared: Option<&'a str>,
    /// The file's first bytes (all of it, for multipart, read in the chunks it is held in).
    head: Head<'a>,
    /// Its last bytes, up to `imageinfo::TAIL_WINDOW`.
    tail: std::borrow::Cow<'a, [u8]>,
    /// Its length in bytes.
    len: u64,
}

impl<'a> Upload<'a> {
    fn from_part(part: &'a Part, index: usize, param: String) -> Self {
        let data = &part.data;
        let head = match data.contiguous() {
            Some(one) => Head::Bytes(one.into()),
            None => Head::Chunks(imageinfo::Chunked::new(data.chunks())),
        };
        Self {
            index: Some(index),
            param,
            declared: part.content_type.as_deref(),
            head,
            tail: data.tail(imageinfo::TAIL_WINDOW),
            len: data.len() as u64,
        }
    }
}

/// An upload's first bytes: one buffer (a part in one chunk, a decoded `data:` URL's head), or a part's
/// chunks read in place.
enum Head<'a> {
    Bytes(std::borrow::Cow<'a, [u8]>),
    Chunks(imageinfo::Chunked<'a>),
}

impl imageinfo::Source for Head<'_> {
    fn size(&self) -> usize {
        match self {
            Self::Bytes(bytes) => bytes.len(),
            Self::Chunks(chunks) => chunks.size(),
        }
    }

    fn read_at(&self, at: usize, out: &mut [u8]) -> bool {
        match self {
            Self::Bytes(bytes) => bytes.read_at(at, out),
            Self::Chunks(chunks) => chunks.read_at(at, out),
        }
    }
}

/// What the rules for a request's files depend on: the model's `files` rules from the catalog.
#[derive(Clone, Copy)]
struct Rules<'a> {
    /// `None` for models imagegate does not know: byte-level rules only.
    model: Option<&'a Model>,
    /// A part declared with no type or `application/octet-stream` is forwarded with the type of its bytes.
    mend: bool,
}

impl Rules<'_> {
    fn known(self) -> bool {
        self.model.is_some_and(|m| m.enforces("files"))
    }

    fn image_formats(self) -> Vec<ImageFormat> {
        let all = vec![ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp];
        match self.model {
            Some(m) => all
                .into_iter()
                .filter(|f| m.files.formats.iter().any(|n| Some(n.as_str()) == f.mime().strip_prefix("image/")))
                .collect(),
            None => all,
        }
    }

    fn image_max_bytes(self) -> Option<u64> {
        self.model?.files.max_bytes
    }

    fn max_images(self) -> usize {
        self.model.filter(|_| self.known()).and_then(|m| m.files.max_images).unwrap_or(usize::MAX)
    }

    fn square(self) -> bool {
        self.known() && self.model.is_some_and(|m| m.files.square)
    }

    fn transparent_without_mask(self) -> bool {
        self.known() && self.model.is_some_and(|m| m.files.transparent_without_mask)
    }
}

/// Check the file parts of a multipart edit or variation. `known` is `None` for unknown models, which get
/// only the byte-level checks. Returns the parts whose declared type is to be mended from their bytes.
pub fn check_form(
    reader: &Reader<'_>,
    endpoint: Endpoint,
    known: Option<&Model>,
    model: &str,
    mend: bool,
) -> Result<Vec<Mend>, ApiError> {
    let Some(form) = reader.form() else { return Ok(Vec::new()) };
    let rules = Rules { model: known, mend };
    let mut mends = Vec::new();
    if form.parts.iter().any(|p| is_image_field(&p.name) && !p.is_file()) {
        return Err(ApiError::invalid_code(
            "Invalid type for 'image': expected one of an array of files or file, but got a string instead.",
            Some("image"),
            "invalid_type",
        ));
    }
    let images: Vec<(usize, &Part)> =
        form.parts.iter().enumerate().filter(|(_, p)| is_image_field(&p.name) && p.is_file()).collect();
    if images.is_empty() {
        return Err(missing("image"));
    }
    let single = images.len() == 1 && images[0].1.name == "image";
    let param = |i: usize| if single { "image".to_owned() } else { format!("image[{i}]") };
    if images.len() > rules.max_images() {
        return Err(too_many(&format!("'{model}' accepts at most {}", rules.max_images()), images.len(), "image"));
    }
    let masks: Vec<(usize, &Part)> = form.parts.iter().enumerate().filter(|(_, p)| p.name == "mask").collect();
    if masks.len() > 1 {
        return Err(ApiError::invalid(
            format!("Duplicate parameter 'mask': send one mask, not {}; it applies to the first image.", masks.len()),
            Some("mask".to_owned()),
        ));
    }
    let mut first: Option<ImageInfo> = None;
    for (i, (index, part)) in images.iter().enumerate() {
        let info = check_image(&Upload::from_part(part, *index, param(i)), rules, &mut mends)?;
        first.get_or_insert(info);
    }
    let mask = masks.first().copied();
    if let Some(info) = first {
        shape_rules(&info, rules, endpoint, mask.is_some(), &param(0))?;
    }
    if let Some((index, mask)) = mask {
        if endpoint != Endpoint::Edits {
            return Err(unsupported("mask", model));
        }
        if !mask.is_file() {
            return Err(ApiError::invalid_code(
                "Invalid type for 'mask': expected a file, but got a string instead.",
                Some("mask"),
                "invalid_type",
            ));
        }
        check_mask(&Upload::from_part(mask, index, "mask".to_owned()), first, rules, &mut mends)?;
    }
    Ok(mends)
}

/// The rules every image file meets, by its declared type and its bytes. Returns what its header says.
fn check_image(upload: &Upload<'_>, rules: Rules<'_>, mends: &mut Vec<Mend>) -> Result<ImageInfo, ApiError> {
    let allowed = rules.image_formats();
    let mend = rules.known() && check_declared_type(upload, &allowed, rules.mend)?;
    let info = inspect(upload)?;
    if rules.known() {
        check_label_matches(upload, &info)?;
        if let Some(max) = rules.image_max_bytes()
            && upload.len >= max
        {
            return Err(too_large(&upload.param, max));
        }
        if !allowed.contains(&info.format) {
            let names: Vec<&str> = allowed.iter().map(|f| f.name()).collect();
            return Err(bad_image(
                &upload.param,
                &format!("must be a {} image, got {}", names.join(" or "), info.format.name()),
            ));
        }
    }
    check_complete(upload, &info)?;
    if mend && let Some(index) = upload.index {
        mends.push((index, info.format.mime()));
    }
    Ok(info)
}

/// The mask: for known models a PNG (declared and real) with an alpha channel, under 4 MiB, the size of the
/// first image (when that is known); for unknown models the byte-level rules of any image.
fn check_mask(
    upload: &Upload<'_>,
    first: Option<ImageInfo>,
    rules: Rules<'_>,
    mends: &mut Vec<Mend>,
) -> Result<(), ApiError> {
    if !rules.known() {
        check_image(upload, rules, mends)?;
        return Ok(());
    }
    let mend = check_declared_type(upload, &[ImageFormat::Png], rules.mend)?;
    let info = inspect(upload)?;
    check_label_matches(upload, &info)?;
    if info.format != ImageFormat::Png {
        return Err(bad_image(&upload.param, &format!("the mask must be a PNG image, got {}", info.format.name())));
    }
    if !info.has_alpha {
        return Err(bad_image(
            &upload.param,
            "the mask must have an alpha channel (transparent pixels mark the area to edit)",
        ));
    }
    if upload.len >= MASK_MAX_BYTES {
        return Err(too_large(&upload.param, MASK_MAX_BYTES));
    }
    check_complete(upload, &info)?;
    if let Some(first) = first
        && (first.width, first.height) != (info.width, info.height)
    {
        return Err(ApiError::invalid_code(
            format!(
                "Invalid file '{}': the mask is {}x{} but the first image is {}x{}; they must match.",
                upload.param, info.width, info.height, first.width, first.height
            ),
            Some(&upload.param),
            "invalid_image_dimensions",
        ));
    }
    if mend && let Some(index) = upload.index {
        mends.push((index, info.format.mime()));
    }
    Ok(())
}

/// The declared type is one the model takes. A part declaring no type is accepted (OpenAI accepts them, as
/// the `async-openai` maintainers report; its bytes are checked below); so is `application/octet-stream`
/// when `mend` is on. `Ok(true)`: forward the part with the type of its bytes (`mend` on only).
fn check_declared_type(upload: &Upload<'_>, allowed: &[ImageFormat], mend: bool) -> Result<bool, ApiError> {
    let param = upload.param.as_str();
    let supported = allowed.iter().map(|f| f.mime()).collect::<Vec<_>>();
    match upload.declared {
        None => Ok(mend),
        Some(ct) if mend && ct.split(';').next().is_some_and(|e| e.trim().eq_ignore_ascii_case(OCTET_STREAM)) => {
            Ok(true)
        }
        Some(ct) if ImageFormat::from_declared(ct).is_some_and(|f| allowed.contains(&f)) => Ok(false),
        Some(ct) => Err(ApiError::invalid_code(
            format!(
                "Invalid file '{param}': unsupported mimetype ('{}'). Supported file formats are {}.",
                clip(ct),
                super::reader::list(&supported)
            ),
            Some(param),
            "unsupported_file_mimetype",
        )),
    }
}

/// No PNG labelled `image/jpeg`: the declared type names the format the bytes are.
fn check_label_matches(upload: &Upload<'_>, info: &ImageInfo) -> Result<(), ApiError> {
    match upload.declared.and_then(ImageFormat::from_declared) {
        Some(declared) if declared != info.format => Err(bad_image(
            &upload.param,
            &format!("declared as '{}' but the bytes are a {} image", declared.mime(), info.format.name()),
        )),
        _ => Ok(()),
    }
}

fn inspect(upload: &Upload<'_>) -> Result<ImageInfo, ApiError> {
    let param = upload.param.as_str();
    let info = imageinfo::inspect_source(&upload.head).map_err(|e| bad_image(param, &e.to_string()))?;
    if info.width > MAX_EDGE || info.height > MAX_EDGE {
        return Err(ApiError::invalid_code(
            format!(
                "Invalid file '{param}': {}x{} pixels exceeds the maximum of {MAX_EDGE} pixels per side.",
                info.width, info.height
            ),
            Some(param),
            "invalid_image_dimensions",
        ));
    }
    Ok(info)
}

/// The file is not cut short: it ends the way a whole file of its format ends (nothing is decoded).
fn check_complete(upload: &Upload<'_>, info: &ImageInfo) -> Result<(), ApiError> {
    imageinfo::check_end(&upload.head, &upload.tail, upload.len, info.format)
        .map_err(|e| bad_image(&upload.param, &e.to_string()))
}

/// The first image's shape: square, and with transparency when an edit has no mask, for models whose file
/// rules say so.
fn shape_rules(
    info: &ImageInfo,
    rules: Rules<'_>,
    endpoint: Endpoint,
    has_mask: bool,
    param: &str,
) -> Result<(), ApiError> {
    if rules.square() && info.width != info.height {
        return Err(bad_image(
            param,
            &format!("expected an image with equal width and height, got {}x{}", info.width, info.height),
        ));
    }
    let transparent_ok = matches!(info.color, ColorKind::Rgba | ColorKind::GrayAlpha | ColorKind::Gray);
    if rules.transparent_without_mask() && endpoint == Endpoint::Edits && !has_mask && !transparent_ok {
        return Err(bad_image(
            param,
            &format!(
                "without a mask the image must carry transparency: format must be in ['RGBA', 'LA', 'L'], got {}",
                color_name(info.color)
            ),
        ));
    }
    Ok(())
}

/// The `images` array and `mask` of the JSON edit body. References by `file_id` and remote `http(s)` URLs
/// are forwarded unchecked (imagegate does not fetch them); `data:` URLs get the file rules by their bytes.
pub fn check_json_refs(reader: &Reader<'_>, known: Option<&Model>) -> Result<(), ApiError> {
    let rules = Rules { model: known, mend: false };
    let mut mends = Vec::new();
    let Some(images) = reader.json("images") else { return Err(missing("images")) };
    let Value::Array(items) = images else { return Err(invalid_type("images", "an array", images)) };
    if items.is_empty() {
        return Err(missing("images"));
    }
    let max = rules.max_images().min(JSON_MAX_IMAGES);
    if items.len() > max {
        return Err(too_many(&format!("at most {max} are accepted"), items.len(), "images"));
    }
    let mut first: Option<Option<ImageInfo>> = None;
    for (i, item) in items.iter().enumerate() {
        let param = format!("images[{i}]");
        let info = match check_ref(item, &param)? {
            Some(data) => Some(check_image(&data.upload(format!("{param}.image_url"))?, rules, &mut mends)?),
            None => None,
        };
        first.get_or_insert(info);
    }
    if let Some(mask) = reader.json("mask")
        && let Some(data) = check_ref(mask, "mask")?
    {
        check_mask(&data.upload("mask.image_url".to_owned())?, first.flatten(), rules, &mut mends)?;
    }
    Ok(())
}

/// The shape of one `ImageRefParam`: exactly one of `image_url` (http(s) or a base64 image `data:` URL) or
/// `file_id`. Returns the `data:` URL, if that is what it is.
fn check_ref<'a>(value: &'a Value, param: &str) -> Result<Option<DataUrl<'a>>, ApiError> {
    let Value::Object(obj) = value else { return Err(invalid_type(param, "an object", value)) };
    let url = obj.get("image_url").filter(|v| !v.is_null());
    let file = obj.get("file_id").filter(|v| !v.is_null());
    match (url, file) {
        (Some(Value::String(url)), None) => {
            let url_param = format!("{param}.image_url");
            let data = DataUrl::parse(url);
            let remote = url.starts_with("https://") || url.starts_with("http://");
            if data.is_none() && !remote {
                return Err(ApiError::invalid_code(
                    format!("Invalid '{url_param}': expected an http(s) URL or a data:image/…;base64, URL."),
                    Some(&url_param),
                    "invalid_value",
                ));
            }
            if url.len() > JSON_IMAGE_URL_MAX {
                return Err(ApiError::invalid_code(
                    format!(
                        "Invalid '{url_param}': string too long. Expected a string with maximum length \
                         {JSON_IMAGE_URL_MAX}, but got a string with length {} instead.",
                        url.len()
                    ),
                    Some(&url_param),
                    "string_above_max_length",
                ));
            }
            Ok(data)
        }
        (None, Some(Value::String(_))) => Ok(None),
        (Some(v), None) => Err(invalid_type(&format!("{param}.image_url"), "a string", v)),
        (None, Some(v)) => Err(invalid_type(&format!("{param}.file_id"), "a string", v)),
        _ => Err(ApiError::invalid_code(
            format!("Invalid '{param}': provide exactly one of 'image_url' or 'file_id'."),
            Some(param),
            "invalid_value",
        )),
    }
}

/// A `data:image/…;base64,…` URL, split but not decoded.
struct DataUrl<'a> {
    /// The declared media type, such as `image/png`.
    mime: &'a str,
    /// The base64 payload without its `=` padding.
    payload: &'a str,
    /// How many `=` the payload ended with.
    padding: usize,
}

impl<'a> DataUrl<'a> {
    /// `data:` + `image/…` type + optional parameters + `;base64` + `,` + payload.
    fn parse(url: &'a str) -> Option<Self> {
        let rest = url.strip_prefix("data:")?;
        let (meta, payload) = rest.split_once(',')?;
        let meta = meta.strip_suffix(";base64")?;
        let mime = meta.split(';').next()?;
        if !mime.starts_with("image/") {
            return None;
        }
        let unpadded = payload.trim_end_matches('=');
        Some(Self { mime, payload: unpadded, padding: payload.len() - unpadded.len() })
    }

    /// The upload the file rules check: the decoded head and tail of the payload and its decoded length.
    /// Refuses a payload that is not base64.
    fn upload(&self, param: String) -> Result<Upload<'a>, ApiError> {
        let n = self.payload.len();
        let base64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
        // A valid payload: the base64 alphabet, at most two `=` of padding, no dangling sixth of a byte.
        if self.padding > 2 || n % 4 == 1 || !self.payload.bytes().all(base64) {
            return Err(ApiError::invalid_code(
                format!("Invalid '{param}': the data URL's payload is not valid base64."),
                Some(&param),
                "invalid_value",
            ));
        }
        let len = (n / 4 * 3 + (n % 4).saturating_sub(1)) as u64;
        // Both slices start a multiple of four characters into the payload, so they decode on their own.
        let head = &self.payload[..n.min(DATA_URL_HEAD_CHARS)];
        let tail_start = n.saturating_sub(DATA_URL_TAIL_CHARS) / 4 * 4;
        let decode = |chars: &str| {
            BASE64.decode(chars).map_err(|_| {
                ApiError::invalid_code(
                    format!("Invalid '{param}': the data URL's payload is not valid base64."),
                    Some(&param),
                    "invalid_value",
                )
            })
        };
        let head = decode(head)?;
        let tail = decode(&self.payload[tail_start..])?;
        Ok(Upload {
            index: None,
            declared: Some(self.mime),
            head: Head::Bytes(head.into()),
            tail: tail.into(),
            len,
            param,
        })
    }
}

fn too_many(limit: &str, got: usize, param: &str) -> ApiError {
    ApiError::invalid_code(format!("Too many images: {limit}, but got {got}."), Some(param), "too_many_images")
}

fn bad_image(param: &str, reason: &str) -> ApiError {
    ApiError::invalid_code(format!("Invalid file '{param}': {reason}."), Some(param), "invalid_image_format")
}

fn too_large(param: &str, max: u64) -> ApiError {
    ApiError::invalid_code(
        format!("Invalid file '{param}': the file must be smaller than {} MB.", max / MIB as u64),
        Some(param),
        "image_too_large",
    )
}

/// A caller's declared type, at most 64 characters of it, for a message.
fn clip(value: &str) -> String {
    value.chars().take(64).collect()
}

fn color_name(color: ColorKind) -> &'static str {
    match color {
        ColorKind::Gray => "L",
        ColorKind::GrayAlpha => "LA",
        ColorKind::Rgb => "RGB",
        ColorKind::Rgba => "RGBA",
        ColorKind::Palette => "P",
        ColorKind::Other => "other",
    }
}
