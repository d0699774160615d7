//! File rules for edits and variations: count, declared type, real bytes (headers only), size, dimensions,
//! dall-e-2's square-PNG-with-transparency rule, and the mask. Also the `images`/`mask` references of the
//! JSON edit body.

use serde_json::Value;

use super::reader::{Reader, invalid_type, missing, unsupported};
use crate::error::ApiError;
use crate::images::imageinfo::{self, ColorKind, ImageFormat, ImageInfo};
use crate::images::models::Family;
use crate::images::request::{Endpoint, Part, is_image_field};

const MIB: usize = 1024 * 1024;
/// No side of an input image may exceed this; checked from the header, before anything is allocated.
pub const MAX_EDGE: u32 = 16384;
const DALLE2_MAX_BYTES: usize = 4 * MIB;
const GPT_MAX_BYTES: usize = 50 * MIB;
const GPT_MAX_IMAGES: usize = 16;
const MASK_MAX_BYTES: usize = 4 * MIB;
const JSON_IMAGE_URL_MAX: usize = 20_971_520;

/// Check the file parts of a multipart edit or variation. `family` is `None` for unknown models, which get
/// only the byte-level checks.
pub fn check_form(
    reader: &Reader<'_>,
    endpoint: Endpoint,
    family: Option<Family>,
    model: &str,
) -> Result<(), ApiError> {
    let Some(form) = reader.form() else { return Ok(()) };
    if form.parts.iter().any(|p| is_image_field(&p.name) && !p.is_file()) {
        return Err(ApiError::invalid_code(
            "Invalid type for 'image': expected one of an array of files or file, but got a string instead.",
            Some("image"),
            "invalid_type",
        ));
    }
    let images: Vec<&Part> = form.images().collect();
    if images.is_empty() {
        return Err(missing("image"));
    }
    let single = images.len() == 1 && images[0].name == "image";
    let param = |i: usize| if single { "image".to_owned() } else { format!("image[{i}]") };
    let max_images = match family {
        Some(Family::DallE2) => 1,
        Some(_) => GPT_MAX_IMAGES,
        None => usize::MAX,
    };
    if images.len() > max_images {
        return Err(ApiError::invalid_code(
            format!("Too many images: '{model}' accepts at most {max_images}, but got {}.", images.len()),
            Some("image"),
            "too_many_images",
        ));
    }
    let mut first: Option<ImageInfo> = None;
    for (i, part) in images.iter().enumerate() {
        let info = check_image(part, &param(i), family)?;
        first.get_or_insert(info);
    }
    let mask = form.mask();
    if let (Some(Family::DallE2), Some(info)) = (family, first) {
        dalle2_rules(&info, endpoint, mask.is_some(), &param(0))?;
    }
    if let Some(mask) = mask {
        if endpoint != Endpoint::Edits {
            return Err(unsupported("mask", model));
        }
        check_mask(mask, first)?;
    }
    Ok(())
}

fn check_image(part: &Part, param: &str, family: Option<Family>) -> Result<ImageInfo, ApiError> {
    let allowed: &[ImageFormat] = match family {
        Some(Family::DallE2) => &[ImageFormat::Png],
        _ => &[ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp],
    };
    if family.is_some() {
        check_declared_type(part, param, allowed)?;
    }
    let info = inspect(part, param)?;
    if family.is_some()
        && let Some(declared) = part.content_type.as_deref().and_then(ImageFormat::from_mime)
        && declared != info.format
    {
        return Err(bad_image(
            param,
            &format!("declared as '{}' but the bytes are a {} image", declared.mime(), info.format.name()),
        ));
    }
    let max_bytes = match family {
        Some(Family::DallE2) => Some(DALLE2_MAX_BYTES),
        Some(_) => Some(GPT_MAX_BYTES),
        None => None,
    };
    if let Some(max) = max_bytes
        && part.data.len() >= max
    {
        return Err(too_large(param, max));
    }
    if family.is_some() && !allowed.contains(&info.format) {
        return Err(bad_image(param, &format!("must be a PNG image, got {}", info.format.name())));
    }
    Ok(info)
}

fn check_declared_type(part: &Part, param: &str, allowed: &[ImageFormat]) -> Result<(), ApiError> {
    let supported = allowed.iter().map(|f| f.mime()).collect::<Vec<_>>();
    match part.content_type.as_deref() {
        None => Err(ApiError::invalid_code(
            format!(
                "Invalid file '{param}': failed to determine mimetype. Ensure you are providing the file's mimetype \
                 as part of the 'Content-Type' header."
            ),
            Some(param),
            "missing_file_mimetype",
        )),
        Some(ct) if ImageFormat::from_mime(ct).is_some_and(|f| allowed.contains(&f)) => Ok(()),
        Some(ct) => Err(ApiError::invalid_code(
            format!(
                "Invalid file '{param}': unsupported mimetype ('{ct}'). Supported file formats are {}.",
                super::reader::list(&supported)
            ),
            Some(param),
            "unsupported_file_mimetype",
        )),
    }
}

fn inspect(part: &Part, param: &str) -> Result<ImageInfo, ApiError> {
    let info = imageinfo::inspect(&part.data).map_err(|e| bad_image(param, &e.to_string()))?;
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

fn dalle2_rules(info: &ImageInfo, endpoint: Endpoint, has_mask: bool, param: &str) -> Result<(), ApiError> {
    if info.width != info.height {
        return Err(bad_image(
            param,
            &format!("expected an image with equal width and height, got {}x{}", info.width, info.height),
        ));
    }
    let transparent_ok = matches!(info.color, ColorKind::Rgba | ColorKind::GrayAlpha | ColorKind::Gray);
    if endpoint == Endpoint::Edits && !has_mask && !transparent_ok {
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

fn check_mask(mask: &Part, first: Option<ImageInfo>) -> Result<(), ApiError> {
    if !mask.is_file() {
        return Err(ApiError::invalid_code(
            "Invalid type for 'mask': expected a file, but got a string instead.",
            Some("mask"),
            "invalid_type",
        ));
    }
    let info = inspect(mask, "mask")?;
    if info.format != ImageFormat::Png {
        return Err(bad_image("mask", &format!("the mask must be a PNG image, got {}", info.format.name())));
    }
    if !info.has_alpha {
        return Err(bad_image(
            "mask",
            "the mask must have an alpha channel (transparent pixels mark the area to edit)",
        ));
    }
    if mask.data.len() >= MASK_MAX_BYTES {
        return Err(too_large("mask", MASK_MAX_BYTES));
    }
    if let Some(first) = first
        && (first.width, first.height) != (info.width, info.height)
    {
        return Err(ApiError::invalid_code(
            format!(
                "Invalid file 'mask': the mask is {}x{} but the first image is {}x{}; they must match.",
                info.width, info.height, first.width, first.height
            ),
            Some("mask"),
            "invalid_image_dimensions",
        ));
    }
    Ok(())
}

/// The `images` array and `mask` of the JSON edit body.
pub fn check_json_refs(reader: &Reader<'_>) -> Result<(), ApiError> {
    let Some(images) = reader.json("images") else { return Err(missing("images")) };
    let Value::Array(items) = images else { return Err(invalid_type("images", "an array", images)) };
    if items.is_empty() {
        return Err(missing("images"));
    }
    if items.len() > GPT_MAX_IMAGES {
        return Err(ApiError::invalid_code(
            format!("Too many images: at most {GPT_MAX_IMAGES} are accepted, but got {}.", items.len()),
            Some("images"),
            "too_many_images",
        ));
    }
    for (i, item) in items.iter().enumerate() {
        check_ref(item, &format!("images[{i}]"))?;
    }
    if let Some(mask) = reader.json("mask") {
        check_ref(mask, "mask")?;
    }
    Ok(())
}

fn check_ref(value: &Value, param: &str) -> Result<(), ApiError> {
    let Value::Object(obj) = value else { return Err(invalid_type(param, "an object", value)) };
    let url = obj.get("image_url").filter(|v| !v.is_null());
    let file = obj.get("file_id").filter(|v| !v.is_null());
    match (url, file) {
        (Some(Value::String(url)), None) => {
            let data_url = url.strip_prefix("data:image/").is_some_and(|rest| rest.contains(";base64,"));
            let ok_scheme = url.starts_with("https://") || url.starts_with("http://") || data_url;
            if !ok_scheme {
                return Err(ApiError::invalid_code(
                    format!("Invalid '{param}.image_url': expected an http(s) URL or a data:image/… base64 URL."),
                    Some(&format!("{param}.image_url")),
                    "invalid_value",
                ));
            }
            if url.len() > JSON_IMAGE_URL_MAX {
                return Err(ApiError::invalid_code(
                    format!(
                        "Invalid '{param}.image_url': string too long. Expected a string with maximum length \
                         {JSON_IMAGE_URL_MAX}, but got a string with length {} instead.",
                        url.len()
                    ),
                    Some(&format!("{param}.image_url")),
                    "string_above_max_length",
                ));
            }
            Ok(())
        }
        (None, Some(Value::String(_))) => Ok(()),
        (Some(v), None) => Err(invalid_type(&format!("{param}.image_url"), "a string", v)),
        (None, Some(v)) => Err(invalid_type(&format!("{param}.file_id"), "a string", v)),
        _ => Err(ApiError::invalid_code(
            format!("Invalid '{param}': provide exactly one of 'image_url' or 'file_id'."),
            Some(param),
            "invalid_value",
        )),
    }
}

fn bad_image(param: &str, reason: &str) -> ApiError {
    ApiError::invalid_code(format!("Invalid file '{param}': {reason}."), Some(param), "invalid_image_format")
}

fn too_large(param: &str, max: usize) -> ApiError {
    ApiError::invalid_code(
        format!("Invalid file '{param}': the file must be smaller than {} MB.", max / MIB),
        Some(param),
        "image_too_large",
    )
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
