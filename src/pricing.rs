//! Prices and cost estimates: the configurable price tables (`[pricing]`) and the USD estimate for one request.
//!
//! Defaults are the prices of the model catalog (`config/models.toml`: the published prices of the reference,
//! §10, ⚠ third-party copies of OpenAI's pricing page); a model priced in the operator's `[models."name"]`
//! replaces its row (see [`Prices::with_catalog`]).
//! GPT image models are billed from the response's `usage` object; the per-image output-token table of §10.3
//! is only a fallback for answers that carry no `usage`. Before a request is sent, [`Prices::reservation`]
//! gives the most it may cost, which the USD budgets hold until the real cost is known. Models without a
//! price follow `pricing.unpriced`: cost 0, refused, or billed as another model.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::catalog::{Catalog, Price, Source};
pub use crate::catalog::{OutputTokens, TokenPrices};

/// The size billed when a request gives none or `auto`.
const DEFAULT_SIZE: &str = "1024x1024";

/// The sizes `size = "auto"` (or no size) may produce on GPT image models, for the reservation's bound.
const AUTO_SIZES: [&str; 3] = ["1024x1024", "1024x1536", "1536x1024"];

/// Image input tokens assumed per input image (and mask) in a reservation: above what one input image is
/// reported to cost even at `input_fidelity = "high"` (⚠ not published; the answer's `usage` settles it).
pub const INPUT_IMAGE_TOKENS_BOUND: u64 = 8_000;

/// Extra image output tokens per partial image of a stream (OpenAI's guide: 100 per partial image).
pub const PARTIAL_IMAGE_TOKENS: u64 = 100;

/// Prices, read from the `[pricing]` section of the config. `Default` is the published prices.
///
/// Model ids are exact (`"gpt-image-1.5"` must be quoted as a TOML key). Loaded through figment, a config
/// table merges into these defaults entry by entry; deserialized on its own, a field given replaces its default.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prices {
    /// Per-image prices for DALL·E-style models: model id → quality ("standard"/"hd"; dall-e-2 uses
    /// "standard") → size "WxH" → USD per image.
    pub per_image: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// Token prices for GPT image models: model id → USD per 1M tokens.
    pub per_token: BTreeMap<String, TokenPrices>,
    /// Models priced in neither table (an Azure deployment name, a model newer than the tables):
    /// `"zero"` (the default: cost 0, but refused for tenants with a USD budget, which it would bypass),
    /// `"reject"` (refused with 400 for everyone), or a priced model id to bill them as.
    pub unpriced: Unpriced,
}

/// What an unpriced model costs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(from = "String", into = "String")]
pub enum Unpriced {
    /// Cost 0; refused for tenants with a USD budget.
    #[default]
    Zero,
    /// Refused with 400 for every tenant.
    Reject,
    /// Billed (and reserved) at this priced model's prices.
    BillAs(String),
}

impl From<String> for Unpriced {
    fn from(s: String) -> Self {
        match s.as_str() {
            "zero" => Self::Zero,
            "reject" => Self::Reject,
            _ => Self::BillAs(s),
        }
    }
}

impl From<Unpriced> for String {
    fn from(u: Unpriced) -> Self {
        match u {
            Unpriced::Zero => "zero".to_owned(),
            Unpriced::Reject => "reject".to_owned(),
            Unpriced::BillAs(model) => model,
        }
    }
}

/// What a request asks for, before it is sent: enough to bound its cost.
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    pub model: &'a str,
    pub size: Option<&'a str>,
    pub quality: Option<&'a str>,
    pub n: u32,
    /// Bytes of the prompt (a token is at least one byte, so this bounds the text input tokens).
    pub prompt_bytes: usize,
    /// Input images and mask (edits).
    pub input_images: u32,
    /// `partial_images` of a stream.
    pub partial_images: u32,
}

/// What a finished request used.
#[derive(Debug, Clone, Default)]
pub struct Metered<'a> {
    pub model: &'a str,
    /// The size as requested; `None` or `"auto"` bills as 1024x1024.
    pub size: Option<&'a str>,
    /// The quality as requested; `None` (or `"auto"`) means the model's default.
    pub quality: Option<&'a str>,
    /// Images actually returned.
    pub images: u32,
    /// The upstream's `usage` object, if any.
    pub usage: Option<&'a Value>,
}

impl Default for Prices {
    /// The built-in catalog's prices.
    fn default() -> Self {
        let mut prices = Self { per_image: BTreeMap::new(), per_token: BTreeMap::new(), unpriced: Unpriced::default() };
        prices.absorb(&Catalog::builtin(), |_| true);
        prices
    }
}

impl Prices {
    /// These prices with every model the operator priced in the catalog (`[models."name"].price`, also by
    /// inheritance) written over its row: the catalog entry is the newest word on a model's price.
    pub fn with_catalog(mut self, catalog: &Catalog) -> Self {
        self.absorb(catalog, |source| source == Source::Config);
        self
    }

    fn absorb(&mut self, catalog: &Catalog, take: impl Fn(Source) -> bool) {
        for m in catalog.models().filter(|m| take(m.source)) {
            match &m.price {
                Some(Price::PerToken(p)) => {
                    self.per_image.remove(&m.id);
                    self.per_token.insert(m.id.clone(), p.clone());
                }
                Some(Price::PerImage(table)) => {
                    self.per_token.remove(&m.id);
                    self.per_image.insert(m.id.clone(), table.clone());
                }
                None => {}
            }
        }
    }

    /// Estimated USD for one request, or `None` when the model or the needed price is unknown (the ledger then
    /// stores 0 and logs that the model is unpriced).
    ///
    /// GPT image models (`per_token`) bill from `usage` when it carries token counts: input text and image
    /// tokens from `input_tokens_details` (all `input_tokens` are text when the details are absent), with
    /// `input_tokens_details.cached_tokens` at the cached rates (split between text and image in proportion,
    /// as the API does not say which is which); output tokens split by `output_tokens_details`, or all image
    /// output when it is absent. A `usage` is billed even when no image came back: the upstream billed it.
    ///
    /// Without `usage`, each image costs the §10.3 output tokens × `image_output`. The quality defaults to
    /// **"medium"** when absent or `"auto"`; models whose price says `output_tokens = "formula"` use the
    /// community formula of §10.3 (any WxH), the others the gpt-image-1 table (1024x1024, 1024x1536, 1536x1024 only; ⚠ approximate for -mini).
    ///
    /// DALL·E models (`per_image`): `per_image[model][quality][size] × images`; quality defaults to "standard".
    ///
    /// A model in neither table is billed as `pricing.unpriced` names, if it names a model.
    pub fn estimate(&self, metered: &Metered<'_>) -> Option<f64> {
        let model = self.priced_as(metered.model)?;
        let size = match metered.size.map(str::trim) {
            None | Some("auto") | Some("") => DEFAULT_SIZE.to_owned(),
            Some(s) => s.to_ascii_lowercase(),
        };
        let quality = normal_quality(metered.quality);
        let images = f64::from(metered.images);
        if let Some(prices) = self.per_token.get(model) {
            if let Some(cost) = metered.usage.and_then(|u| usage_cost(prices, u)) {
                return Some(cost);
            }
            if metered.images == 0 {
                return Some(0.0);
            }
            let quality = quality.as_deref().unwrap_or("medium");
            let tokens = match prices.output_tokens {
                OutputTokens::Formula => gpt_image_2_output_tokens(quality, &size, &prices.quality_factors)?,
                OutputTokens::Table => gpt_image_1_output_tokens(quality, &size)?,
            };
            return Some(tokens as f64 * prices.image_output / 1e6 * images);
        }
        let by_quality = self.per_image.get(model)?;
        if metered.images == 0 {
            return Some(0.0);
        }
        let per_image = by_quality.get(quality.as_deref().unwrap_or("standard"))?.get(&size)?;
        Some(per_image * images)
    }

    /// The model whose prices `model` is billed at: itself when priced, else the one `pricing.unpriced`
    /// names; `None` when it has no price.
    pub fn priced_as<'a>(&'a self, model: &'a str) -> Option<&'a str> {
        if self.per_token.contains_key(model) || self.per_image.contains_key(model) {
            return Some(model);
        }
        match &self.unpriced {
            Unpriced::BillAs(other) => Some(other.as_str()),
            Unpriced::Zero | Unpriced::Reject => None,
        }
    }

    /// The most a request may cost, for the USD budgets to hold until its real cost is known; `None` when
    /// the model (or, for DALL·E, its size and quality) has no price.
    ///
    /// DALL·E models: exact, `per_image[model][quality][size] × n`. GPT image models: an upper bound, `n ×`
    /// the §10.3 output tokens of the size and quality asked for (quality `auto` or absent counts as `high`,
    /// size `auto` or absent as the largest of 1024x1024, 1024x1536 and 1536x1024; sizes outside the
    /// gpt-image-1 table use the gpt-image-2 formula) plus [`PARTIAL_IMAGE_TOKENS`] per partial image, at the
    /// image output price; plus the prompt's bytes at the text input price; plus
    /// [`INPUT_IMAGE_TOKENS_BOUND`] per input image at the image input price. Text output tokens are not
    /// bounded (GPT image answers rarely carry any); the settlement bills what the answer's `usage` says.
    pub fn reservation(&self, ask: &Ask<'_>) -> Option<f64> {
        let model = self.priced_as(ask.model)?;
        let n = f64::from(ask.n);
        let quality = normal_quality(ask.quality);
        let size = ask.size.map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty() && s != "auto");
        if let Some(prices) = self.per_token.get(model) {
            let quality = quality.as_deref().unwrap_or("high");
            let tokens = |size: &str| {
                let table = match prices.output_tokens {
                    OutputTokens::Formula => None,
                    OutputTokens::Table => gpt_image_1_output_tokens(quality, size),
                };
                table.or_else(|| gpt_image_2_output_tokens(quality, size, &prices.quality_factors))
            };
            let per_image = match size.as_deref() {
                Some(size) => tokens(size)?,
                None => AUTO_SIZES.iter().filter_map(|s| tokens(s)).max()?,
            };
            let output = (per_image + u64::from(ask.partial_images) * PARTIAL_IMAGE_TOKENS) as f64 * n;
            let text = ask.prompt_bytes as f64;
            let images = f64::from(ask.input_images) * INPUT_IMAGE_TOKENS_BOUND as f64;
            return Some((output * prices.image_output + text * prices.text_input + images * prices.image_input) / 1e6);
        }
        let by_quality = self.per_image.get(model)?;
        let size = size.unwrap_or_else(|| DEFAULT_SIZE.to_owned());
        let per_image = by_quality.get(quality.as_deref().unwrap_or("standard"))?.get(&size)?;
        Some(per_image * n)
    }

    /// Every fault in the prices (negative or non-finite numbers, sizes not written WxH, a model priced both per
    /// image and per token, an `unpriced` model that has no price itself), for startup validation. Empty when
    /// the prices are usable.
    pub fn validate(&self) -> Vec<String> {
        let mut faults = Vec::new();
        if let Unpriced::BillAs(model) = &self.unpriced
            && !self.per_token.contains_key(model)
            && !self.per_image.contains_key(model)
        {
            faults.push(format!(
                "unpriced = \"{model}\" must be \"zero\", \"reject\" or a model priced in per_image or per_token"
            ));
        }
        for (model, by_quality) in &self.per_image {
            if self.per_token.contains_key(model) {
                faults.push(format!("model \"{model}\" is priced both per_image and per_token"));
            }
            for (quality, by_size) in by_quality {
                for (size, price) in by_size {
                    let at = format!("per_image.\"{model}\".\"{quality}\".\"{size}\"");
                    if parse_size(size).is_none() {
                        faults.push(format!("{at}: size is not WxH"));
                    }
                    faults.extend(number_fault(&at, *price));
                }
            }
        }
        for (model, p) in &self.per_token {
            faults.extend(p.faults(&format!("per_token.\"{model}\"")));
        }
        faults
    }
}

/// A quality as the tables spell it, or `None` for absent and `auto`.
fn normal_quality(quality: Option<&str>) -> Option<String> {
    quality.map(|q| q.trim().to_ascii_lowercase()).filter(|q| !q.is_empty() && q != "auto")
}

use crate::catalog::number_fault;

/// Cost from a `usage` object, or `None` when it carries neither `input_tokens` nor `output_tokens`.
fn usage_cost(p: &TokenPrices, usage: &Value) -> Option<f64> {
    let count = |v: Option<&Value>| v.and_then(Value::as_f64).filter(|n| n.is_finite() && *n >= 0.0);
    let input = count(usage.get("input_tokens"));
    let output = count(usage.get("output_tokens"));
    if input.is_none() && output.is_none() {
        return None;
    }
    let in_details = usage.get("input_tokens_details");
    let in_field = |k: &str| count(in_details.and_then(|d| d.get(k)));
    let (text, image) = split(input.unwrap_or(0.0), in_field("text_tokens"), in_field("image_tokens"));
    let all_input = text + image;
    let cached = in_field("cached_tokens").unwrap_or(0.0).min(all_input);
    let cached_text = if all_input > 0.0 { cached * text / all_input } else { 0.0 };
    let cached_image = cached - cached_text;
    let out_details = usage.get("output_tokens_details");
    let out_field = |k: &str| count(out_details.and_then(|d| d.get(k)));
    let (out_image, out_text) = split(output.unwrap_or(0.0), out_field("image_tokens"), out_field("text_tokens"));
    let usd = (text - cached_text) * p.text_input
        + cached_text * p.text_input_cached
        + (image - cached_image) * p.image_input
        + cached_image * p.image_input_cached
        + out_image * p.image_output
        + out_text * p.text_output;
    Some(usd / 1e6)
}

/// Split `total` into (first, second) from the detail counts given; with none, all of it is `first`.
fn split(total: f64, first: Option<f64>, second: Option<f64>) -> (f64, f64) {
    match (first, second) {
        (Some(a), Some(b)) => (a, b),
        (Some(a), None) => (a, (total - a).max(0.0)),
        (None, Some(b)) => ((total - b).max(0.0), b),
        (None, None) => (total, 0.0),
    }
}

/// §10.3 output tokens per image for the gpt-image-1 family.
fn gpt_image_1_output_tokens(quality: &str, size: &str) -> Option<u64> {
    let column = match size {
        "1024x1024" => 0,
        "1024x1536" => 1,
        "1536x1024" => 2,
        _ => return None,
    };
    let row: [u64; 3] = match quality {
        "low" => [272, 408, 400],
        "medium" => [1056, 1584, 1568],
        "high" => [4160, 6240, 6208],
        _ => return None,
    };
    row.get(column).copied()
}

/// §10.3 community formula for gpt-image-2: `q = {low:16, medium:48, high:96}`,
/// `s = floor((2·q·short + long) / (2·long))`, `tokens = ceil(q·s·(2,000,000 + W·H) / 4,000,000)`.
/// `extra` gives `q` for further quality tiers (a price's `quality_factors`).
fn gpt_image_2_output_tokens(quality: &str, size: &str, extra: &BTreeMap<String, u32>) -> Option<u64> {
    let q: u128 = match (extra.get(quality), quality) {
        (Some(q), _) => u128::from(*q),
        (None, "low") => 16,
        (None, "medium") => 48,
        (None, "high") => 96,
        _ => return None,
    };
    let (w, h) = parse_size(size)?;
    let (w, h) = (u128::from(w), u128::from(h));
    let (short, long) = (w.min(h), w.max(h));
    let s = (2 * q * short + long) / (2 * long);
    let numerator = q * s * (2_000_000 + w * h);
    u64::try_from(numerator.div_ceil(4_000_000)).ok()
}

/// `"WxH"` with positive decimal W and H (lowercase `x`), as sizes are written in the API.
fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.split_once('x')?;
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(h) {
        return None;
    }
    let (w, h): (u32, u32) = (w.parse().ok()?, h.parse().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn est(model: &str, size: Option<&str>, quality: Option<&str>, images: u32) -> Option<f64> {
        Prices::default().estimate(&Metered { model, size, quality, images, usage: None })
    }

    fn with_usage(model: &str, usage: &Value, images: u32) -> Option<f64> {
        Prices::default().estimate(&Metered { model, images, usage: Some(usage), ..Metered::default() })
    }

    fn close(actual: Option<f64>, expected: f64, tolerance: f64) {
        let actual = actual.unwrap();
        assert!((actual - expected).abs() <= tolerance, "got {actual}, expected {expected} ± {tolerance}");
    }

    #[test]
    fn gpt_image_1_table_reproduces_published_prices() {
        close(est("gpt-image-1", Some("1024x1024"), Some("high"), 1), 0.1664, 1e-9);
        close(est("gpt-image-1", Some("1536x1024"), Some("high"), 1), 0.25, 0.002);
        close(est("gpt-image-1", Some("1024x1024"), Some("low"), 1), 0.011, 0.0005);
        close(est("gpt-image-1.5", Some("1024x1024"), Some("medium"), 1), 0.0338, 0.0001);
        close(est("chatgpt-image-latest", Some("1024x1024"), Some("medium"), 1), 0.033792, 1e-9);
    }

    #[test]
    fn gpt_default_quality_is_medium_and_size_square() {
        let medium = est("gpt-image-1", Some("1024x1024"), Some("medium"), 3);
        close(medium, 3.0 * 1056.0 * 40.0 / 1e6, 1e-12);
        assert_eq!(est("gpt-image-1", None, None, 3), medium);
        assert_eq!(est("gpt-image-1", Some("auto"), Some("auto"), 3), medium);
    }

    #[test]
    fn gpt_image_2_formula_reproduces_published_prices() {
        assert_eq!(gpt_image_2_output_tokens("high", "1024x1024", &BTreeMap::new()), Some(7024));
        close(est("gpt-image-2", None, Some("low"), 1), 0.006, 0.001);
        close(est("gpt-image-2", None, Some("medium"), 1), 0.053, 0.001);
        close(est("gpt-image-2", None, Some("high"), 1), 0.211, 0.001);
        assert_eq!(est("gpt-image-2-2026-04-21", None, Some("high"), 1), est("gpt-image-2", None, Some("high"), 1));
        assert!(est("gpt-image-2", Some("1536x2048"), Some("medium"), 1).unwrap() > 0.053);
    }

    #[test]
    fn usage_bills_text_and_image_input_and_output() {
        let usage = json!({"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}});
        close(with_usage("gpt-image-1", &usage, 1), (10.0 * 5.0 + 40.0 * 10.0 + 4160.0 * 40.0) / 1e6, 1e-12);
        // Usage wins over the table, whatever size and quality say.
        let m = Metered {
            model: "gpt-image-1",
            size: Some("2048x2048"),
            quality: Some("low"),
            images: 1,
            usage: Some(&usage),
        };
        close(Prices::default().estimate(&m), 0.16685, 1e-9);
    }

    #[test]
    fn usage_cached_tokens_bill_at_cached_rate() {
        let usage = json!({"input_tokens": 100, "output_tokens": 0,
            "input_tokens_details": {"text_tokens": 50, "image_tokens": 50, "cached_tokens": 40}});
        let expected = (30.0 * 5.0 + 20.0 * 1.25 + 30.0 * 10.0 + 20.0 * 2.5) / 1e6;
        close(with_usage("gpt-image-1", &usage, 1), expected, 1e-12);
    }

    #[test]
    fn usage_output_split_by_details_else_all_image() {
        let split = json!({"input_tokens": 0, "output_tokens": 1100,
            "output_tokens_details": {"image_tokens": 1000, "text_tokens": 100}});
        close(with_usage("gpt-image-1.5", &split, 1), (1000.0 * 32.0 + 100.0 * 10.0) / 1e6, 1e-12);
        let plain = json!({"input_tokens": 20, "output_tokens": 1100});
        close(with_usage("gpt-image-1.5", &plain, 1), (20.0 * 5.0 + 1100.0 * 32.0) / 1e6, 1e-12);
    }

    #[test]
    fn usage_without_counts_falls_back_to_table() {
        let empty = json!({});
        assert_eq!(with_usage("gpt-image-1", &empty, 1), est("gpt-image-1", None, None, 1));
        assert_eq!(with_usage("gpt-image-1", &Value::Null, 1), est("gpt-image-1", None, None, 1));
    }

    #[test]
    fn dall_e_prices_per_image() {
        close(est("dall-e-3", Some("1792x1024"), Some("hd"), 2), 0.24, 1e-12);
        close(est("dall-e-3", None, None, 1), 0.04, 1e-12);
        close(est("dall-e-2", Some("512x512"), None, 1), 0.018, 1e-12);
        close(est("dall-e-2", Some("256x256"), Some("standard"), 4), 0.064, 1e-12);
    }

    #[test]
    fn unknown_model_or_price_is_none() {
        assert_eq!(est("dall-e-4", None, None, 1), None);
        assert_eq!(est("", None, None, 0), None);
        assert_eq!(est("dall-e-3", Some("512x512"), None, 1), None);
        assert_eq!(est("gpt-image-1", Some("2048x2048"), None, 1), None);
        assert_eq!(est("gpt-image-1", None, Some("hd"), 1), None);
    }

    fn ask<'a>(model: &'a str, size: Option<&'a str>, quality: Option<&'a str>, n: u32) -> Ask<'a> {
        Ask { model, size, quality, n, ..Ask::default() }
    }

    #[test]
    fn dall_e_reservations_are_exact() {
        let p = Prices::default();
        close(p.reservation(&ask("dall-e-3", None, None, 1)), 0.04, 1e-12);
        close(p.reservation(&ask("dall-e-3", Some("1792x1024"), Some("hd"), 10)), 1.2, 1e-12);
        close(p.reservation(&ask("dall-e-2", Some("256x256"), None, 3)), 0.048, 1e-12);
        assert_eq!(p.reservation(&ask("dall-e-3", Some("512x512"), None, 1)), None, "no such price");
        // The reservation equals what a full answer is billed.
        let billed =
            p.estimate(&Metered { model: "dall-e-3", size: None, quality: Some("hd"), images: 2, usage: None });
        assert_eq!(p.reservation(&ask("dall-e-3", None, Some("hd"), 2)), billed);
    }

    #[test]
    fn gpt_reservations_bound_the_table_cost() {
        let p = Prices::default();
        // Asked exactly: the §10.3 tokens × the output price.
        close(p.reservation(&ask("gpt-image-1", Some("1024x1024"), Some("low"), 2)), 2.0 * 272.0 * 40.0 / 1e6, 1e-12);
        // Quality auto counts as high, size auto as the largest size.
        close(p.reservation(&ask("gpt-image-1", None, None, 1)), 6240.0 * 40.0 / 1e6, 1e-12);
        close(p.reservation(&ask("gpt-image-1.5", Some("auto"), Some("auto"), 1)), 6240.0 * 32.0 / 1e6, 1e-12);
        close(p.reservation(&ask("gpt-image-2", None, None, 1)), 7024.0 * 30.0 / 1e6, 1e-12);
        // The bound is at least every table price of the model.
        for q in ["low", "medium", "high"] {
            for size in AUTO_SIZES {
                let billed = est("gpt-image-1", Some(size), Some(q), 3).unwrap();
                assert!(p.reservation(&ask("gpt-image-1", None, None, 3)).unwrap() >= billed, "{q} {size}");
            }
        }
        // Prompt bytes, input images and partial images add to it.
        let full = Ask {
            model: "gpt-image-1",
            size: Some("1024x1024"),
            quality: Some("high"),
            n: 1,
            prompt_bytes: 1000,
            input_images: 2,
            partial_images: 3,
        };
        let expected = ((4160.0 + 300.0) * 40.0 + 1000.0 * 5.0 + 16_000.0 * 10.0) / 1e6;
        close(p.reservation(&full), expected, 1e-12);
    }

    #[test]
    fn unpriced_models_follow_the_setting() {
        let mut p = Prices::default();
        assert_eq!(p.priced_as("my-azure-deployment"), None);
        assert_eq!(p.reservation(&ask("my-azure-deployment", None, None, 1)), None);
        p.unpriced = Unpriced::BillAs("dall-e-3".into());
        assert_eq!(p.priced_as("my-azure-deployment"), Some("dall-e-3"));
        close(p.reservation(&ask("my-azure-deployment", None, None, 2)), 0.08, 1e-12);
        close(p.estimate(&Metered { model: "my-azure-deployment", images: 2, ..Metered::default() }), 0.08, 1e-12);
        assert!(p.validate().is_empty());
        p.unpriced = Unpriced::BillAs("dall-e-9".into());
        assert!(p.validate().iter().any(|f| f.contains("dall-e-9")), "{:?}", p.validate());
        for (text, value) in [
            ("zero", Unpriced::Zero),
            ("reject", Unpriced::Reject),
            ("gpt-image-1", Unpriced::BillAs("gpt-image-1".into())),
        ] {
            assert_eq!(Unpriced::from(text.to_owned()), value);
            assert_eq!(String::from(value), text);
        }
    }

    #[test]
    fn a_quality_tier_beyond_high_is_priced_only_by_its_declared_factor() {
        let mut p = Prices::default();
        let ask = |q| Ask { model: "gpt-image-2", size: Some("1024x1024"), quality: Some(q), n: 1, ..Ask::default() };
        assert_eq!(p.reservation(&ask("xhigh")), None, "an unknown tier has no price");
        if let Some(prices) = p.per_token.get_mut("gpt-image-2") {
            prices.quality_factors.insert("xhigh".into(), 192);
        }
        let high = p.reservation(&ask("high")).unwrap();
        let xhigh = p.reservation(&ask("xhigh")).unwrap();
        assert!(xhigh > 1.9 * high, "{xhigh} vs {high}");
        let m = Metered { model: "gpt-image-2", quality: Some("xhigh"), images: 1, ..Metered::default() };
        assert!(p.estimate(&m).is_some_and(|c| c > 0.0));
    }

    #[test]
    fn zero_images_cost_nothing() {
        assert_eq!(est("dall-e-3", Some("1792x1024"), Some("hd"), 0), Some(0.0));
        assert_eq!(est("gpt-image-1", None, Some("high"), 0), Some(0.0));
        assert_eq!(est("gpt-image-2", None, None, 0), Some(0.0));
    }

    #[test]
    fn validate_accepts_defaults_and_catches_faults() {
        assert_eq!(Prices::default().validate(), Vec::<String>::new());
        let mut prices = Prices::default();
        let mut set = |model: &str, quality: &str, size: &str, price: f64| {
            prices
                .per_image
                .entry(model.into())
                .or_default()
                .entry(quality.into())
                .or_default()
                .insert(size.into(), price)
        };
        set("dall-e-3", "hd", "1024x1024", -0.1);
        set("dall-e-2", "standard", "1024*1024", 0.1);
        if let Some(p) = prices.per_token.get_mut("gpt-image-1") {
            p.image_output = f64::NAN;
        }
        let faults = prices.validate();
        assert_eq!(faults.len(), 3, "{faults:?}");
        assert!(faults.iter().any(|f| f.contains("\"hd\".\"1024x1024\"") && f.contains("negative")));
        assert!(faults.iter().any(|f| f.contains("1024*1024") && f.contains("not WxH")));
        assert!(faults.iter().any(|f| f.contains("image_output") && f.contains("finite")));
    }

    #[test]
    fn round_trips_through_json_and_toml() {
        let prices = Prices::default();
        let json = serde_json::to_string(&prices).unwrap();
        assert_eq!(serde_json::from_str::<Prices>(&json).unwrap(), prices);
        let figment = figment::Figment::from(figment::providers::Serialized::defaults(&prices));
        assert_eq!(figment.extract::<Prices>().unwrap(), prices);
        assert!(serde_json::from_str::<Prices>(r#"{"per_tokens": {}}"#).is_err());
    }

    #[test]
    fn toml_config_overrides_merge_into_defaults() {
        use figment::providers::{Format, Serialized, Toml};
        let toml = r#"
            [per_image."dall-e-3".hd]
            "1024x1024" = 1
            [per_token."gpt-image-1.5"]
            image_output = 16.5
        "#;
        let prices: Prices = figment::Figment::from(Serialized::defaults(Prices::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        assert_eq!(prices.per_image["dall-e-3"]["hd"]["1024x1024"], 1.0);
        assert_eq!(prices.per_image["dall-e-3"]["hd"]["1792x1024"], 0.120);
        assert_eq!(prices.per_token["gpt-image-1.5"].image_output, 16.5);
        assert_eq!(prices.per_token["gpt-image-1.5"].text_input, 5.0);
        assert_eq!(prices.per_token["gpt-image-1"], Prices::default().per_token["gpt-image-1"]);
        let alone: Prices = figment::Figment::from(Toml::string("[per_token]")).extract().unwrap();
        assert!(alone.per_token.is_empty() && alone.per_image == Prices::default().per_image);
    }
}
