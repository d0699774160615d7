//! Prices and cost estimates: the configurable price tables (`[pricing]`) and the USD estimate for one request.
//!
//! Defaults are the published prices of the reference (§10, ⚠ third-party copies of OpenAI's pricing page).
//! GPT image models are billed from the response's `usage` object; the per-image output-token table of §10.3
//! is only a fallback for answers that carry no `usage`.

use std::collections::BTreeMap;

use serde_json::Value;

/// The size billed when a request gives none or `auto`.
const DEFAULT_SIZE: &str = "1024x1024";

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
}

/// USD per 1M tokens for one GPT image model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrices {
    pub text_input: f64,
    pub text_input_cached: f64,
    pub image_input: f64,
    pub image_input_cached: f64,
    pub image_output: f64,
    pub text_output: f64,
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
    fn default() -> Self {
        let sizes = |list: &[(&str, f64)]| list.iter().map(|(s, p)| ((*s).to_owned(), *p)).collect();
        let mut per_image = BTreeMap::new();
        per_image.insert(
            "dall-e-3".to_owned(),
            BTreeMap::from([
                ("standard".to_owned(), sizes(&[("1024x1024", 0.040), ("1024x1792", 0.080), ("1792x1024", 0.080)])),
                ("hd".to_owned(), sizes(&[("1024x1024", 0.080), ("1024x1792", 0.120), ("1792x1024", 0.120)])),
            ]),
        );
        per_image.insert(
            "dall-e-2".to_owned(),
            BTreeMap::from([(
                "standard".to_owned(),
                sizes(&[("1024x1024", 0.020), ("512x512", 0.018), ("256x256", 0.016)]),
            )]),
        );
        let tokens = |text_input, text_input_cached, image_input, image_input_cached, image_output, text_output| {
            TokenPrices { text_input, text_input_cached, image_input, image_input_cached, image_output, text_output }
        };
        let gpt_image_1_5 = tokens(5.00, 1.25, 8.00, 2.00, 32.00, 10.00);
        // gpt-image-2's text output price is not published (§10.2 ⚠): 10.00 as for gpt-image-1.5. The text
        // output of gpt-image-1 and -mini is not published either (§10.2 "–"); the same 10.00 stands in.
        let gpt_image_2 = tokens(5.00, 1.25, 8.00, 2.00, 30.00, 10.00);
        let per_token = BTreeMap::from([
            ("gpt-image-1".to_owned(), tokens(5.00, 1.25, 10.00, 2.50, 40.00, 10.00)),
            ("gpt-image-1-mini".to_owned(), tokens(2.00, 0.20, 2.50, 0.25, 8.00, 10.00)),
            ("gpt-image-1.5".to_owned(), gpt_image_1_5),
            ("chatgpt-image-latest".to_owned(), gpt_image_1_5),
            ("gpt-image-2".to_owned(), gpt_image_2),
            ("gpt-image-2-2026-04-21".to_owned(), gpt_image_2),
        ]);
        Self { per_image, per_token }
    }
}

impl Prices {
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
    /// **"medium"** when absent or `"auto"`; gpt-image-2 models use the community formula of §10.3 (any WxH),
    /// every other GPT model the gpt-image-1 table (1024x1024, 1024x1536, 1536x1024 only; ⚠ approximate for -mini).
    ///
    /// DALL·E models (`per_image`): `per_image[model][quality][size] × images`; quality defaults to "standard".
    pub fn estimate(&self, metered: &Metered<'_>) -> Option<f64> {
        let size = match metered.size.map(str::trim) {
            None | Some("auto") | Some("") => DEFAULT_SIZE.to_owned(),
            Some(s) => s.to_ascii_lowercase(),
        };
        let quality = metered.quality.map(|q| q.trim().to_ascii_lowercase()).filter(|q| !q.is_empty() && q != "auto");
        let images = f64::from(metered.images);
        if let Some(prices) = self.per_token.get(metered.model) {
            if let Some(cost) = metered.usage.and_then(|u| usage_cost(prices, u)) {
                return Some(cost);
            }
            if metered.images == 0 {
                return Some(0.0);
            }
            let quality = quality.as_deref().unwrap_or("medium");
            let tokens = if metered.model.starts_with("gpt-image-2") {
                gpt_image_2_output_tokens(quality, &size)?
            } else {
                gpt_image_1_output_tokens(quality, &size)?
            };
            return Some(tokens as f64 * prices.image_output / 1e6 * images);
        }
        let by_quality = self.per_image.get(metered.model)?;
        if metered.images == 0 {
            return Some(0.0);
        }
        let per_image = by_quality.get(quality.as_deref().unwrap_or("standard"))?.get(&size)?;
        Some(per_image * images)
    }

    /// Every fault in the prices (negative or non-finite numbers, sizes not written WxH, a model priced both per
    /// image and per token), for startup validation. Empty when the prices are usable.
    pub fn validate(&self) -> Vec<String> {
        let mut faults = Vec::new();
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
            let fields = [
                ("text_input", p.text_input),
                ("text_input_cached", p.text_input_cached),
                ("image_input", p.image_input),
                ("image_input_cached", p.image_input_cached),
                ("image_output", p.image_output),
                ("text_output", p.text_output),
            ];
            for (field, value) in fields {
                faults.extend(number_fault(&format!("per_token.\"{model}\".{field}"), value));
            }
        }
        faults
    }
}

/// Why a price is unusable, if it is.
fn number_fault(at: &str, value: f64) -> Option<String> {
    if !value.is_finite() {
        Some(format!("{at}: {value} is not a finite number"))
    } else if value < 0.0 {
        Some(format!("{at}: {value} is negative"))
    } else {
        None
    }
}

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
fn gpt_image_2_output_tokens(quality: &str, size: &str) -> Option<u64> {
    let q: u128 = match quality {
        "low" => 16,
        "medium" => 48,
        "high" => 96,
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
        assert_eq!(gpt_image_2_output_tokens("high", "1024x1024"), Some(7024));
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
