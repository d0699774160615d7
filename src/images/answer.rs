//! What an upstream answer may be: a whole answer at most a size derived from `n` and the model (read no
//! further), with at most `n` images in `data[]` (extra ones are dropped before anything downloads or stores
//! them); a stream at most a size derived from `n`, `partial_images` and the model, ending after its `n`th
//! completed image.
//!
//! A broken or hostile upstream must not make the gateway buffer hundreds of megabytes or fetch and store
//! hundreds of images a caller never asked for. `docs/security.md` lists both guards.

pub mod split;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::models::{Catalog, Model};
use super::request::ImageRequest;

/// Room for the envelope (`created`, `usage`, `revised_prompt`s, an error body) beside the images.
const ENVELOPE: u64 = 1024 * 1024;
/// Pixels of the largest image an unknown model is assumed to make (4096 × 4096).
const UNKNOWN_MODEL_PIXELS: u64 = 4096 * 4096;

/// The largest whole answer accepted for `request`: for each of its `n` images, the base64 of an
/// uncompressed RGBA image of the model's largest size in the built-in catalog (PNG and WebP never exceed that
/// by more than their framing), plus [`ENVELOPE`]. For `gpt-image-1` and `n = 1`: about 9 MiB; `n = 10`: about
/// 84 MiB. Models the built-in catalog does not know are assumed to make 4096 × 4096 images.
pub fn max_answer_bytes(request: &ImageRequest) -> u64 {
    max_answer_bytes_for(request, request.n())
}

/// The largest event stream accepted for `request` (`stream: true`): every image may come as up to
/// `partial_images` (at most 3) partial images and one completed image, each at most what one image of a
/// whole answer may be, so `n × (1 + partial_images)` of them plus [`ENVELOPE`]. For `gpt-image-1`, `n = 1`
/// and no partial images: about 9 MiB.
pub fn max_stream_bytes(request: &ImageRequest) -> u64 {
    let partials = request.field("partial_images").and_then(|v| v.as_u64()).unwrap_or(0).min(3);
    let images = u64::from(request.n().max(1)).saturating_mul(1 + partials);
    let one = max_answer_bytes_for(request, 1).saturating_sub(ENVELOPE);
    images.saturating_mul(one).saturating_add(ENVELOPE)
}

/// [`max_answer_bytes`] as if `request` asked for `n` images.
fn max_answer_bytes_for(request: &ImageRequest, n: u32) -> u64 {
    let catalog = Catalog::builtin();
    let pixels = catalog.get(&request.model()).map_or(UNKNOWN_MODEL_PIXELS, |m| largest_pixels(m));
    // 4 bytes a pixel, a little framing (PNG chunks, filter bytes), then base64's 4/3.
    let per_image = (pixels * 4 + pixels / 64 + 64 * 1024) * 4 / 3;
    u64::from(n.max(1)).saturating_mul(per_image).saturating_add(ENVELOPE)
}

/// The most pixels an image of `model` has: its largest listed `WxH` size, or its free sizes' ceiling.
fn largest_pixels(model: &Model) -> u64 {
    let listed = model
        .sizes
        .iter()
        .filter_map(|size| size.split_once('x'))
        .filter_map(|(w, h)| Some(w.parse::<u64>().ok()? * h.parse::<u64>().ok()?))
        .max();
    let free = model.free_sizes.map(|f| f.max_pixels);
    match listed.max(free) {
        Some(pixels) if pixels > 0 => pixels,
        _ => UNKNOWN_MODEL_PIXELS,
    }
}

#[derive(Deserialize)]
struct Items {
    data: Vec<IgnoredAny>,
}

/// `body` with `data[]` cut to its first `n` items when the upstream answered more (`None`: nothing to cut,
/// or not an answer with `data[]`). Counting skips every value, so a normal answer costs no copies.
pub fn hold_to_n(body: &Bytes, n: u32) -> Option<(Bytes, usize)> {
    let n = usize::try_from(n.max(1)).unwrap_or(usize::MAX);
    let items = serde_json::from_slice::<Items>(body).ok()?.data.len();
    if items <= n {
        return None;
    }
    let mut answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    answer.get_mut("data")?.as_array_mut()?.truncate(n);
    Some((Bytes::from(serde_json::to_vec(&answer).ok()?), items))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::images::request::Endpoint;

    fn request(body: serde_json::Value) -> ImageRequest {
        ImageRequest::from_json(Endpoint::Generations, Bytes::from(body.to_string())).unwrap()
    }

    #[test]
    fn the_answer_limit_grows_with_n_and_the_model_and_stays_far_below_the_old_unbounded_read() {
        let one = max_answer_bytes(&request(json!({"model": "gpt-image-1", "prompt": "p"})));
        let ten = max_answer_bytes(&request(json!({"model": "gpt-image-1", "prompt": "p", "n": 10})));
        let dalle2 = max_answer_bytes(&request(json!({"model": "dall-e-2", "prompt": "p"})));
        let big = max_answer_bytes(&request(json!({"model": "gpt-image-2", "prompt": "p"})));
        assert!(one > 8 * 1024 * 1024 && one < 12 * 1024 * 1024, "{one}");
        assert!(ten > 9 * one && ten < 10 * one, "{ten}");
        assert!(dalle2 < one && big > one, "{dalle2} {big}");
    }

    #[test]
    fn the_stream_limit_counts_every_partial_image_and_caps_them_at_three() {
        let stream = |body: serde_json::Value| max_stream_bytes(&request(body));
        let plain = stream(json!({"model": "gpt-image-1", "prompt": "p", "stream": true}));
        let whole = max_answer_bytes(&request(json!({"model": "gpt-image-1", "prompt": "p"})));
        assert_eq!(plain, whole, "one completed image is what a whole answer of one image may be");
        let partial = stream(json!({"model": "gpt-image-1", "prompt": "p", "stream": true, "partial_images": 2}));
        let many = stream(json!({"model": "gpt-image-1", "prompt": "p", "stream": true, "partial_images": 99, "n": 2}));
        assert!(partial > 2 * plain && partial < 3 * plain, "{partial}");
        assert!(many > 7 * plain && many < 8 * plain, "{many}");
    }

    #[test]
    fn data_is_cut_to_n_and_the_rest_of_the_answer_is_kept() {
        let body = Bytes::from(json!({"created": 1, "data": [{"url": "a"}, {"url": "b"}, {"url": "c"}]}).to_string());
        let (held, items) = hold_to_n(&body, 1).unwrap();
        assert_eq!(items, 3);
        let held: serde_json::Value = serde_json::from_slice(&held).unwrap();
        assert_eq!(held, json!({"created": 1, "data": [{"url": "a"}]}));
        assert!(hold_to_n(&body, 3).is_none());
        assert!(hold_to_n(&Bytes::from_static(b"{\"error\":{}}"), 1).is_none());
    }
}
