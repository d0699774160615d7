//! What each known image model accepts: the per-model rule table of `docs/validation.md`, as data.

use super::request::Endpoint;

/// Model families that share one set of rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    DallE2,
    DallE3,
    /// gpt-image-1, -1-mini, -1.5 and chatgpt-image-latest.
    GptImage,
    /// gpt-image-2 and its snapshots: free `WxH` sizes.
    GptImage2,
}

/// One known model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    pub id: &'static str,
    pub family: Family,
    /// `input_fidelity` is accepted on edits.
    pub input_fidelity: bool,
}

const MODELS: &[Model] = &[
    Model { id: "dall-e-2", family: Family::DallE2, input_fidelity: false },
    Model { id: "dall-e-3", family: Family::DallE3, input_fidelity: false },
    Model { id: "gpt-image-1", family: Family::GptImage, input_fidelity: true },
    Model { id: "gpt-image-1-mini", family: Family::GptImage, input_fidelity: false },
    Model { id: "gpt-image-1.5", family: Family::GptImage, input_fidelity: true },
    Model { id: "chatgpt-image-latest", family: Family::GptImage, input_fidelity: true },
    Model { id: "gpt-image-2", family: Family::GptImage2, input_fidelity: false },
    Model { id: "gpt-image-2-2026-04-21", family: Family::GptImage2, input_fidelity: false },
];

/// The known model with this id.
pub fn lookup(id: &str) -> Option<&'static Model> {
    MODELS.iter().find(|m| m.id == id)
}

/// The `model` label of a metric: a known model's id, or `other` for any name a caller made up, so callers
/// cannot grow the number of series.
pub fn label(id: &str) -> &'static str {
    lookup(id).map_or(crate::metrics::OTHER, |m| m.id)
}

/// Every known model id, for error messages.
pub fn known_ids() -> impl Iterator<Item = &'static str> {
    MODELS.iter().map(|m| m.id)
}

const GPT_SIZES: &[&str] = &["auto", "1024x1024", "1536x1024", "1024x1536"];
const DALLE2_SIZES: &[&str] = &["256x256", "512x512", "1024x1024"];
const DALLE3_SIZES: &[&str] = &["1024x1024", "1792x1024", "1024x1792"];
const GPT_QUALITIES: &[&str] = &["low", "medium", "high", "auto"];

impl Family {
    /// GPT image models (the only ones that take `background`, `output_format`, `stream`, …).
    pub fn is_gpt(self) -> bool {
        matches!(self, Self::GptImage | Self::GptImage2)
    }

    /// Whether the family serves `endpoint` (JSON edits are checked separately: GPT image only).
    pub fn serves(self, endpoint: Endpoint) -> bool {
        match endpoint {
            Endpoint::Generations => true,
            Endpoint::Edits => self != Self::DallE3,
            Endpoint::Variations => self == Self::DallE2,
        }
    }

    /// Longest prompt, in characters.
    pub fn prompt_max(self) -> usize {
        match self {
            Self::DallE2 => 1000,
            Self::DallE3 => 4000,
            Self::GptImage | Self::GptImage2 => 32000,
        }
    }

    /// Largest `n`.
    pub fn n_max(self) -> i64 {
        match self {
            Self::DallE3 => 1,
            _ => 10,
        }
    }

    /// The listed sizes; GPT image 2 also takes free `WxH` sizes (see [`free_size_ok`]).
    pub fn sizes(self) -> &'static [&'static str] {
        match self {
            Self::DallE2 => DALLE2_SIZES,
            Self::DallE3 => DALLE3_SIZES,
            Self::GptImage | Self::GptImage2 => GPT_SIZES,
        }
    }

    pub fn qualities(self) -> &'static [&'static str] {
        match self {
            Self::DallE2 => &["standard"],
            Self::DallE3 => &["standard", "hd"],
            Self::GptImage | Self::GptImage2 => GPT_QUALITIES,
        }
    }
}

/// Longest edge of a GPT image 2 free size, in pixels.
pub const FREE_MAX_EDGE: u32 = 3840;
const FREE_MIN_PIXELS: u64 = 655_360;
const FREE_MAX_PIXELS: u64 = 8_294_400;
/// An edge written with more digits than this is over [`FREE_MAX_EDGE`] whatever the digits are.
const EDGE_MAX_DIGITS: usize = 5;

/// One edge of a `WxH` size: plain ASCII digits, no sign, no whitespace, no leading zero. `Err` says why not;
/// `Ok(None)` is an edge too long to be allowed (more than [`EDGE_MAX_DIGITS`] digits), never parsed.
fn edge(text: &str) -> Result<Option<u32>, &'static str> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("sizes are written WIDTHxHEIGHT in plain decimal digits, such as '1536x864'");
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err("sizes are written without leading zeros, such as '1536x864'");
    }
    if text.len() > EDGE_MAX_DIGITS {
        return Ok(None);
    }
    // At most five ASCII digits: always fits.
    Ok(text.parse::<u32>().ok())
}

/// GPT image 2's free sizes: multiples of 16, ratio at most 3:1, long edge ≤ 3840, 655,360–8,294,400 pixels.
/// Returns the reason when the size is refused. The arithmetic is on `u64` from edges of at most five digits,
/// so no input can overflow it.
pub fn free_size_ok(size: &str) -> Result<(), &'static str> {
    let Some((w, h)) = size.split_once('x') else {
        return Err("sizes are written WIDTHxHEIGHT in plain decimal digits, such as '1536x864'");
    };
    let (w, h) = (edge(w)?, edge(h)?);
    let (Some(w), Some(h)) = (w, h) else { return Err("the longest edge may be at most 3840 pixels") };
    if w == 0 || h == 0 || w % 16 != 0 || h % 16 != 0 {
        return Err("width and height must both be multiples of 16");
    }
    let (long, short) = (u64::from(w.max(h)), u64::from(w.min(h)));
    if long > short.saturating_mul(3) {
        return Err("the aspect ratio must be between 1:3 and 3:1");
    }
    if long > u64::from(FREE_MAX_EDGE) {
        return Err("the longest edge may be at most 3840 pixels");
    }
    let pixels = u64::from(w).saturating_mul(u64::from(h));
    if !(FREE_MIN_PIXELS..=FREE_MAX_PIXELS).contains(&pixels) {
        return Err("the image must have between 655,360 and 8,294,400 pixels");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_sizes_follow_the_published_limits() {
        for ok in ["1536x864", "3840x2160", "2160x3840", "1024x1024", "1024x640", "2048x2048"] {
            assert_eq!(free_size_ok(ok), Ok(()), "{ok}");
        }
        for bad in ["1000x1000", "4096x1024", "3856x2160", "512x512", "3840x2176", "0x16", "axb", "1024", "16x4800"] {
            assert!(free_size_ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn free_sizes_are_parsed_strictly_and_huge_numbers_never_overflow() {
        let huge = "18446744073709551600x18446744073709551600";
        assert_eq!(free_size_ok(huge), Err("the longest edge may be at most 3840 pixels"));
        for bad in [
            "+1024x+1024",
            "01024x1024",
            "1024x01024",
            "00x1024",
            " 1024x1024",
            "1024x1024 ",
            "1024 x1024",
            "１０２４x1024", // full-width digits
            "-1024x1024",
            "1024x",
            "x1024",
            "1024x1024x16",
            "4294967296x16",
            "99999x99999",
            "65536x65536",
            "4294967295x4294967295",
        ] {
            assert!(free_size_ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn made_up_models_share_one_metric_label_so_callers_cannot_grow_the_series() {
        assert_eq!(label("gpt-image-1"), "gpt-image-1");
        assert_eq!(label("dall-e-3"), "dall-e-3");
        assert_eq!(label("my-own-model-123"), "other");
        assert_eq!(label("ig_secret_key_pasted_as_model"), "other");
    }

    #[test]
    fn every_known_model_resolves() {
        for id in known_ids() {
            assert_eq!(lookup(id).map(|m| m.id), Some(id));
        }
        assert!(lookup("dall-e-4").is_none());
    }
}
