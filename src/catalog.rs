//! The model catalog: what each image model accepts, what it costs and when it goes away, as data.
//!
//! The built-in catalog is `config/models.toml`, embedded at build time; operators add or override models in
//! their config (`[models."name"]`, the same keys) and move callers with `[models.aliases]`. [`Catalog::build`]
//! resolves inheritance (`extends`), overlays the operator's tables and lists every fault at once. Nothing here
//! knows a model by name: the validation rules, the prices and the lifecycle headers all read a [`Model`].
//!
//! `lifecycle` turns dates into a status and the `Deprecation` / `Sunset` / `Link` headers; `sizes` checks
//! free `WxH` sizes against a model's bounds; `listing` lists the catalog with each model's status.

mod lifecycle;
mod listing;
mod sizes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use self::lifecycle::{Date, Lifecycle, Status};
pub use self::listing::Listing;
pub use self::sizes::FreeSizes;

/// The built-in catalog's source.
pub const BUILTIN: &str = include_str!("../config/models.toml");

/// The endpoints a catalog entry may name.
pub const ENDPOINTS: [&str; 3] = ["generations", "edits", "variations"];

/// Keys a model never inherits through `extends`: a snapshot has its own lifecycle.
const NOT_INHERITED: [&str; 4] = ["extends", "deprecated_on", "shutdown_on", "replacement"];
/// Keys replaced whole rather than merged key by key.
const REPLACED_WHOLE: [&str; 1] = ["price"];

/// How sure a rule is. Only rules OpenAI is known to enforce refuse a request; the others are forwarded for
/// the upstream to judge (a refusal upstream is free, a wrong refusal here breaks a working client).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sure {
    /// OpenAI's spec or documentation says so.
    #[default]
    Documented,
    /// What the API was seen to answer.
    Observed,
    /// Third-party sources.
    Reported,
    /// imagegate's own guess.
    Assumed,
}

impl Sure {
    /// Whether a rule this sure refuses requests.
    pub fn refuses(self) -> bool {
        matches!(self, Self::Documented | Self::Observed)
    }
}

/// What a model answers with natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answers {
    /// Links (and base64 on request): the model takes `response_format`.
    Url,
    /// Base64 only: the model refuses `response_format` (imagegate serves it itself when re-hosting).
    B64Json,
}

/// What one parameter of a model accepts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Param {
    /// One of these strings.
    Values(Vec<String>),
    /// An integer in this range, both ends included.
    Range { min: i64, max: i64 },
    /// `true`: any value (the upstream judges it); `false`: not taken (undoes an inherited parameter).
    Taken(bool),
}

/// Upload rules for edits and variations.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileRules {
    /// Formats the images may be: `png`, `jpeg`, `webp`.
    pub formats: Vec<String>,
    /// Each image must be smaller than this many bytes.
    pub max_bytes: Option<u64>,
    /// Most images per request.
    pub max_images: Option<usize>,
    /// The image must be square.
    pub square: bool,
    /// An edit without a mask needs an image with transparency.
    pub transparent_without_mask: bool,
}

impl Default for FileRules {
    fn default() -> Self {
        Self {
            formats: vec!["png".into(), "jpeg".into(), "webp".into()],
            max_bytes: None,
            max_images: None,
            square: false,
            transparent_without_mask: false,
        }
    }
}

/// How output tokens are counted when an answer carries no `usage` (reference §10.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputTokens {
    /// The published table: 1024x1024, 1024x1536 and 1536x1024 at low, medium and high.
    #[default]
    Table,
    /// The community formula for any `WxH` (gpt-image-2 and later).
    Formula,
}

/// USD per 1M tokens for one model billed by tokens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenPrices {
    pub text_input: f64,
    pub text_input_cached: f64,
    pub image_input: f64,
    pub image_input_cached: f64,
    pub image_output: f64,
    pub text_output: f64,
    /// How output tokens are estimated without `usage`.
    #[serde(default)]
    pub output_tokens: OutputTokens,
    /// The formula's factor `q` for quality tiers beyond `low` (16), `medium` (48) and `high` (96), such as
    /// `{ xhigh = 192 }`: without one, a request for an unknown tier has no price (and no reservation).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quality_factors: BTreeMap<String, u32>,
}

impl TokenPrices {
    /// Every price that is not a finite, non-negative number, each named `{at}.{field}`.
    pub fn faults(&self, at: &str) -> Vec<String> {
        [
            ("text_input", self.text_input),
            ("text_input_cached", self.text_input_cached),
            ("image_input", self.image_input),
            ("image_input_cached", self.image_input_cached),
            ("image_output", self.image_output),
            ("text_output", self.text_output),
        ]
        .into_iter()
        .filter_map(|(field, value)| number_fault(&format!("{at}.{field}"), value))
        .collect()
    }
}

/// Per-image prices: quality → size `WxH` → USD.
pub type ImagePrices = BTreeMap<String, BTreeMap<String, f64>>;

/// A model's price.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Price {
    PerToken(TokenPrices),
    PerImage(ImagePrices),
}

/// One model's table after inheritance and the operator's overlay, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    endpoints: Vec<String>,
    #[serde(default)]
    json_edits: bool,
    answers: Answers,
    prompt_max: usize,
    n_max: i64,
    #[serde(default)]
    sizes: Vec<String>,
    #[serde(default)]
    free_sizes: Option<FreeSizes>,
    #[serde(default)]
    params: BTreeMap<String, Param>,
    #[serde(default)]
    files: FileRules,
    #[serde(default)]
    defaults: Map<String, Value>,
    #[serde(default)]
    price: Option<Price>,
    #[serde(default)]
    deprecated_on: Option<String>,
    #[serde(default)]
    shutdown_on: Option<String>,
    #[serde(default)]
    replacement: Option<String>,
    #[serde(default)]
    sure: BTreeMap<String, Sure>,
}

/// Where a model's entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The built-in catalog only.
    Builtin,
    /// Declared or changed in the operator's config.
    Config,
}

/// One model, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: String,
    /// Endpoint names it serves (`generations`, `edits`, `variations`).
    pub endpoints: Vec<String>,
    /// It takes the JSON edit body.
    pub json_edits: bool,
    pub answers: Answers,
    pub prompt_max: usize,
    pub n_max: i64,
    pub sizes: Vec<String>,
    pub free_sizes: Option<FreeSizes>,
    /// The parameters it takes; a `Taken(false)` entry has been removed.
    pub params: BTreeMap<String, Param>,
    pub files: FileRules,
    /// OpenAI's values for parameters left out.
    pub defaults: Map<String, Value>,
    pub price: Option<Price>,
    pub lifecycle: Lifecycle,
    /// How sure each rule is (absent: documented).
    pub sure: BTreeMap<String, Sure>,
    pub source: Source,
    /// Who set the lifecycle dates: `Config` when the operator declared the model or any of its dates.
    pub lifecycle_source: Source,
}

impl Model {
    /// Whether it serves the endpoint of this name.
    pub fn serves(&self, endpoint: &str) -> bool {
        self.endpoints.iter().any(|e| e == endpoint)
    }

    /// What it accepts for `name`, if it takes it.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.get(name).filter(|p| !matches!(p, Param::Taken(false)))
    }

    /// How sure the rule of this name is (`prompt_max`, `sizes`, `params.quality`, …).
    pub fn sure(&self, rule: &str) -> Sure {
        self.sure.get(rule).copied().unwrap_or_default()
    }

    /// Whether the rule of this name refuses requests (see [`Sure::refuses`]).
    pub fn enforces(&self, rule: &str) -> bool {
        self.sure(rule).refuses()
    }

    /// Whether the rule `params.<name>` refuses requests: [`Self::enforces`] without building the rule's name on
    /// the heap (validation asks it for every known parameter of every request).
    pub fn enforces_param(&self, name: &str) -> bool {
        let mut buf = [0u8; 64];
        let Some(rule) = buf.get_mut(..7 + name.len()) else { return self.enforces(&format!("params.{name}")) };
        rule[..7].copy_from_slice(b"params.");
        rule[7..].copy_from_slice(name.as_bytes());
        std::str::from_utf8(rule).is_ok_and(|rule| self.enforces(rule))
    }

    /// It answers base64 only (and refuses `response_format` upstream).
    pub fn answers_base64_only(&self) -> bool {
        self.answers == Answers::B64Json
    }
}

/// The `[models]` section of the config: models by name, plus `[models.aliases]` and
/// `[models.tenant_aliases."<tenant>"]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ModelsSettings {
    /// Requested model → model actually used (and sent upstream).
    pub aliases: BTreeMap<String, String>,
    /// Per tenant (by name): requested model → model used, before the deployment-wide `aliases`.
    pub tenant_aliases: BTreeMap<String, BTreeMap<String, String>>,
    /// Models added or overridden, by id: the keys of `config/models.toml`.
    #[serde(flatten)]
    pub entries: BTreeMap<String, Value>,
}

/// Every model, resolved, and the aliases.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, Arc<Model>>,
    aliases: BTreeMap<String, String>,
    tenant_aliases: BTreeMap<String, BTreeMap<String, String>>,
    implied_by_parameters: Option<String>,
    /// Every parameter some model takes: one a model does not take among these is refused as unsupported.
    known_params: BTreeSet<String>,
}

static BUILTIN_CATALOG: LazyLock<Arc<Catalog>> =
    LazyLock::new(|| Arc::new(Catalog::build(&ModelsSettings::default()).unwrap_or_default()));

impl Catalog {
    /// The built-in catalog alone (its faults are caught by a unit test; it is never empty in a build that
    /// passed them).
    pub fn builtin() -> Arc<Catalog> {
        BUILTIN_CATALOG.clone()
    }

    /// The built-in catalog overlaid with the operator's `[models]`; every fault, if any.
    pub fn build(operator: &ModelsSettings) -> Result<Catalog, Vec<String>> {
        let mut faults = Vec::new();
        let builtin: Value = match toml::from_str(BUILTIN) {
            Ok(v) => v,
            Err(e) => return Err(vec![format!("config/models.toml (built in): {e}")]),
        };
        let implied_by_parameters = builtin.get("implied_by_parameters").and_then(Value::as_str).map(str::to_owned);
        let mut tables: BTreeMap<String, (Map<String, Value>, Source)> = BTreeMap::new();
        let mut operator_dates = BTreeSet::new();
        if let Some(Value::Object(models)) = builtin.get("models") {
            for (id, table) in models {
                match table {
                    Value::Object(t) => {
                        tables.insert(id.clone(), (t.clone(), Source::Builtin));
                    }
                    _ => faults.push(format!("config/models.toml: models.\"{id}\" must be a table")),
                }
            }
        }
        for (id, table) in &operator.entries {
            let Value::Object(t) = table else {
                faults.push(format!("models.\"{id}\" must be a table of model keys (see docs/models.md)"));
                continue;
            };
            if NOT_INHERITED[1..].iter().any(|k| t.contains_key(*k)) {
                operator_dates.insert(id.clone());
            }
            match tables.get_mut(id) {
                Some((existing, source)) => {
                    merge_into(existing, t, true);
                    *source = Source::Config;
                }
                None => {
                    tables.insert(id.clone(), (t.clone(), Source::Config));
                }
            }
        }
        let mut models = BTreeMap::new();
        for (id, (_, source)) in &tables {
            let merged = match inherit(id, &tables, &mut Vec::new()) {
                Ok(m) => m,
                Err(fault) => {
                    faults.push(fault);
                    continue;
                }
            };
            match serde_json::from_value::<Spec>(Value::Object(merged)) {
                Ok(spec) => match resolve(id, spec, *source) {
                    Ok(mut model) => {
                        if operator_dates.contains(id) {
                            model.lifecycle_source = Source::Config;
                        }
                        models.insert(id.clone(), Arc::new(model));
                    }
                    Err(more) => faults.extend(more),
                },
                Err(e) => faults.push(format!("models.\"{id}\": {e}")),
            }
        }
        let known_params = models.values().flat_map(|m| m.params.keys().cloned()).collect();
        let catalog = Catalog {
            models,
            aliases: operator.aliases.clone(),
            tenant_aliases: operator.tenant_aliases.clone(),
            implied_by_parameters,
            known_params,
        };
        faults.extend(catalog.cross_faults());
        if faults.is_empty() { Ok(catalog) } else { Err(faults) }
    }

    /// Faults between entries: replacements, aliases and the implied model must name models.
    fn cross_faults(&self) -> Vec<String> {
        let mut faults = Vec::new();
        for m in self.models.values() {
            if let Some(r) = &m.lifecycle.replacement
                && !self.models.contains_key(r)
            {
                faults.push(format!("models.\"{}\".replacement = \"{r}\" is not a model in the catalog", m.id));
            }
        }
        let tenants = self.tenant_aliases.iter().map(|(t, a)| (format!("models.tenant_aliases.\"{t}\""), a));
        for (at, aliases) in std::iter::once(("models.aliases".to_owned(), &self.aliases)).chain(tenants) {
            for (from, to) in aliases {
                if from == to {
                    faults.push(format!("{at}.\"{from}\" names itself"));
                } else if !self.models.contains_key(to) {
                    faults.push(format!(
                        "{at}.\"{from}\" = \"{to}\": \"{to}\" is not a model in the catalog (declare it under \
                         [models.\"{to}\"])"
                    ));
                } else if aliases.contains_key(to) || self.aliases.contains_key(to) {
                    faults.push(format!("{at}.\"{from}\" = \"{to}\": \"{to}\" is itself an alias"));
                }
            }
        }
        if let Some(id) = &self.implied_by_parameters
            && !self.models.contains_key(id)
        {
            faults.push(format!("implied_by_parameters = \"{id}\" is not a model in the catalog"));
        }
        faults
    }

    /// The model of this id (aliases are not followed: see [`Catalog::alias`]).
    pub fn get(&self, id: &str) -> Option<&Arc<Model>> {
        self.models.get(id)
    }

    /// Every model, by id.
    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values()
    }

    /// Every model id, for error messages.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The model an alias moves `id` to, if it is an alias.
    pub fn alias(&self, id: &str) -> Option<&str> {
        self.aliases.get(id).map(String::as_str)
    }

    /// The model `id` is moved to for `tenant`: its own alias first, then the deployment's.
    pub fn alias_for(&self, tenant: Option<&str>, id: &str) -> Option<&str> {
        let own = tenant.and_then(|t| self.tenant_aliases.get(t)).and_then(|a| a.get(id));
        own.map(String::as_str).or_else(|| self.alias(id))
    }

    /// Every alias.
    pub fn aliases(&self) -> &BTreeMap<String, String> {
        &self.aliases
    }

    /// The model a generation naming none runs on when it uses a parameter its default model does not take.
    pub fn implied_by_parameters(&self) -> Option<&Arc<Model>> {
        self.implied_by_parameters.as_deref().and_then(|id| self.models.get(id))
    }

    /// Every parameter some model takes, in alphabetical order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.known_params.iter().map(String::as_str)
    }

    /// Whether some model in the catalog takes this parameter.
    pub fn knows_param(&self, name: &str) -> bool {
        self.known_params.contains(name)
    }
}

/// `id`'s table with its `extends` chain applied (parents first); names the cycle or missing parent.
fn inherit(
    id: &str,
    tables: &BTreeMap<String, (Map<String, Value>, Source)>,
    seen: &mut Vec<String>,
) -> Result<Map<String, Value>, String> {
    if seen.iter().any(|s| s == id) {
        seen.push(id.to_owned());
        return Err(format!("models.\"{}\": extends forms a cycle ({})", seen[0], seen.join(" → ")));
    }
    seen.push(id.to_owned());
    let Some((own, _)) = tables.get(id) else {
        return Err(format!("models.\"{}\": extends \"{id}\", which is not a model in the catalog", seen[0]));
    };
    let Some(parent) = own.get("extends") else { return Ok(own.clone()) };
    let Some(parent) = parent.as_str() else {
        return Err(format!("models.\"{id}\".extends must be a model id"));
    };
    let mut merged = inherit(parent, tables, seen)?;
    merged.retain(|k, _| !NOT_INHERITED.contains(&k.as_str()));
    merge_into(&mut merged, own, false);
    merged.remove("extends");
    Ok(merged)
}

/// Overlay `top` onto `base`: tables merge key by key, anything else (and `price`) is replaced.
fn merge_into(base: &mut Map<String, Value>, top: &Map<String, Value>, keep_extends: bool) {
    for (key, value) in top {
        if key == "extends" && !keep_extends {
            continue;
        }
        match (base.get_mut(key), value) {
            (Some(Value::Object(b)), Value::Object(t)) if !REPLACED_WHOLE.contains(&key.as_str()) => {
                merge_into(b, t, true);
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// A spec as a model, with its semantic faults.
fn resolve(id: &str, spec: Spec, source: Source) -> Result<Model, Vec<String>> {
    let mut faults = Vec::new();
    let at = |key: &str| format!("models.\"{id}\".{key}");
    for e in &spec.endpoints {
        if !ENDPOINTS.contains(&e.as_str()) {
            faults.push(format!("{}: \"{e}\" is not one of {}", at("endpoints"), ENDPOINTS.join(", ")));
        }
    }
    if spec.prompt_max == 0 {
        faults.push(format!("{} must be at least 1", at("prompt_max")));
    }
    if !(1..=10_000).contains(&spec.n_max) {
        faults.push(format!("{} must be between 1 and 10000, got {}", at("n_max"), spec.n_max));
    }
    for size in &spec.sizes {
        if size != "auto" && sizes::parse(size).is_none() {
            faults.push(format!("{}: \"{size}\" is not WIDTHxHEIGHT or auto", at("sizes")));
        }
    }
    if let Some(free) = &spec.free_sizes {
        faults.extend(free.faults().into_iter().map(|f| format!("{}: {f}", at("free_sizes"))));
    }
    for (name, param) in &spec.params {
        match param {
            Param::Range { min, max } if min > max => {
                faults.push(format!("{}: min {min} is above max {max}", at(&format!("params.{name}"))));
            }
            Param::Values(values) if values.is_empty() => {
                faults.push(format!(
                    "{}: an empty list allows nothing; write false to drop it",
                    at(&format!("params.{name}"))
                ));
            }
            _ => {}
        }
    }
    for format in &spec.files.formats {
        if !["png", "jpeg", "webp"].contains(&format.as_str()) {
            faults.push(format!("{}: \"{format}\" is not png, jpeg or webp", at("files.formats")));
        }
    }
    match &spec.price {
        Some(Price::PerToken(p)) => faults.extend(p.faults(&at("price.per_token"))),
        Some(Price::PerImage(by_quality)) => {
            for (quality, by_size) in by_quality {
                for (size, usd) in by_size {
                    let key = at(&format!("price.per_image.{quality}.\"{size}\""));
                    if sizes::parse(size).is_none() {
                        faults.push(format!("{key}: size is not WxH"));
                    }
                    faults.extend(number_fault(&key, *usd));
                }
            }
        }
        None => {}
    }
    let date = |key: &str, value: &Option<String>, faults: &mut Vec<String>| match value.as_deref() {
        None | Some("") => None,
        Some(text) => Date::parse(text).or_else(|| {
            faults.push(format!("{}: \"{text}\" is not a date written YYYY-MM-DD", at(key)));
            None
        }),
    };
    let deprecated_on = date("deprecated_on", &spec.deprecated_on, &mut faults);
    let shutdown_on = date("shutdown_on", &spec.shutdown_on, &mut faults);
    if let (Some(d), Some(s)) = (deprecated_on, shutdown_on)
        && d > s
    {
        faults.push(format!("{}: the model is deprecated after it shuts down", at("deprecated_on")));
    }
    if !faults.is_empty() {
        return Err(faults);
    }
    Ok(Model {
        id: id.to_owned(),
        endpoints: spec.endpoints,
        json_edits: spec.json_edits,
        answers: spec.answers,
        prompt_max: spec.prompt_max,
        n_max: spec.n_max,
        sizes: spec.sizes,
        free_sizes: spec.free_sizes,
        params: spec.params,
        files: spec.files,
        defaults: spec.defaults,
        price: spec.price,
        lifecycle: Lifecycle { deprecated_on, shutdown_on, replacement: spec.replacement.filter(|r| !r.is_empty()) },
        sure: spec.sure,
        source,
        lifecycle_source: Source::Builtin,
    })
}

/// Why a price is unusable, if it is.
pub fn number_fault(at: &str, value: f64) -> Option<String> {
    if !value.is_finite() {
        Some(format!("{at}: {value} is not a finite number"))
    } else if value < 0.0 {
        Some(format!("{at}: {value} is negative"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
