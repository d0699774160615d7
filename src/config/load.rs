//! Loading: `config/default.toml` (+ the `IMAGEGATE_ENV` profile) or `--config FILE`, then `IMAGEGATE__…`
//! environment variables, each setting traced to the file or variable it came from so every fault names it.

use super::*;

impl Settings {
    /// Load from files and the process environment, then validate.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(sources, &env)
    }

    /// Load with an explicit environment (tests pass their own instead of mutating the process's).
    ///
    /// Every setting of every source is a [`Leaf`]; a leaf that does not deserialize is reported (naming the
    /// file or the environment variable it came from) and left out, and loading goes on with the rest, so one
    /// run reports every fault: each unknown key, wrong type and bad value, then the semantic checks of
    /// [`Settings::validate`] on whatever did parse.
    pub fn load_from(sources: &Sources, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut faults = Vec::new();
        let mut leaves = Vec::new();
        let mut files_parse = true;
        for (file, exact) in config_files(sources, env)? {
            let data = if exact { Toml::file_exact(&file).data() } else { Toml::file(&file).data() };
            match data {
                Ok(profiles) => {
                    let origin = Origin::File(file.clone());
                    for dict in profiles.into_values() {
                        flatten(&origin, &mut Vec::new(), Value::from(dict), &mut leaves);
                    }
                }
                Err(e) => {
                    // A file that is not TOML at all: its other settings are unknown, so the semantic checks
                    // below would only report defaults the user never chose.
                    files_parse = false;
                    faults.extend(e.into_iter().map(|e| format!("{}: {}", file.display(), e.kind)));
                }
            }
        }
        leaves.extend(env_leaves(env));
        let Some(mut settings) = resolve(&mut leaves, &mut faults) else { return Err(ConfigError(faults)) };
        let ignored_openai_key = apply_openai_api_key(&mut settings, env);
        if files_parse && let Err(ConfigError(semantic)) = settings.validate() {
            faults.extend(semantic.into_iter().map(|f| match &ignored_openai_key {
                Some(note) if f.starts_with("upstream.api_key is not set") => format!("{f} ({note})"),
                _ => f,
            }));
        }
        if faults.is_empty() { Ok(settings) } else { Err(ConfigError(faults)) }
    }
}

/// The base URL `OPENAI_API_KEY` is meant for: OpenAI's own API.
fn is_openai(url: &Url) -> bool {
    url.scheme() == "https" && url.host_str() == Some("api.openai.com")
}

/// `OPENAI_API_KEY` fills `upstream.api_key` only when neither a file nor `IMAGEGATE__UPSTREAM__API_KEY` set
/// one, and only for OpenAI's own API: the variable holds a developer's real OpenAI key, which must never be
/// sent to a harness's fake, a proxy or another vendor's base URL (docs/decisions/0009). Returns why it was
/// ignored, when it was, for the fault message.
fn apply_openai_api_key(settings: &mut Settings, env: &[(String, String)]) -> Option<String> {
    let key = env.iter().rev().find(|(k, v)| k == ENV_OPENAI_API_KEY && !v.trim().is_empty()).map(|(_, v)| v)?;
    let up = &mut settings.upstream;
    if up.api_key.as_ref().is_some_and(|k| !k.expose().trim().is_empty()) {
        return None;
    }
    if is_openai(&up.base_url) {
        up.api_key = Some(Secret::new(key.clone()));
        return None;
    }
    Some(format!(
        "{ENV_OPENAI_API_KEY} is set but is only sent to https://api.openai.com, and upstream.base_url is {}: set \
         upstream.api_key or {ENV_PREFIX}UPSTREAM__API_KEY for that upstream",
        up.base_url
    ))
}

/// The files to read, in order, and whether each must exist (`--config FILE`) or may be absent.
fn config_files(sources: &Sources, env: &[(String, String)]) -> Result<Vec<(PathBuf, bool)>, ConfigError> {
    if let Some(file) = &sources.file {
        if !file.is_file() {
            return Err(ConfigError(vec![format!("config file {} does not exist", file.display())]));
        }
        return Ok(vec![(file.clone(), true)]);
    }
    let dir = sources.dir.clone().unwrap_or_else(|| PathBuf::from("config"));
    let mut files = vec![(dir.join("default.toml"), false)];
    if let Some((_, profile)) = env.iter().find(|(k, _)| k == ENV_PROFILE) {
        let overlay = dir.join(format!("{profile}.toml"));
        if !overlay.is_file() {
            return Err(ConfigError(vec![format!("{ENV_PROFILE}={profile} but {} does not exist", overlay.display())]));
        }
        files.push((overlay, false));
    }
    Ok(files)
}

/// Where one setting came from: a file, or an environment variable (by its real spelling).
#[derive(Debug, Clone)]
enum Origin {
    File(PathBuf),
    Env(String),
}

/// One setting as one source gave it: a path of keys and a value (a scalar, an array, or an empty table).
#[derive(Debug, Clone)]
struct Leaf {
    origin: Origin,
    path: Vec<String>,
    value: Value,
    /// An environment value exactly as written, tried as a string when its parsed form (a number, a boolean,
    /// an array…) does not fit the setting, so `IMAGEGATE__UPSTREAM__API_KEY=1234567890` is a string key.
    raw: Option<String>,
}

/// A file's tables, flattened into one leaf per setting.
fn flatten(origin: &Origin, path: &mut Vec<String>, value: Value, out: &mut Vec<Leaf>) {
    match value {
        Value::Dict(_, dict) if !dict.is_empty() => {
            for (key, value) in dict {
                path.push(key);
                flatten(origin, path, value, out);
                path.pop();
            }
        }
        // The root of an empty file has nothing to say.
        Value::Dict(..) if path.is_empty() => {}
        value => out.push(Leaf { origin: origin.clone(), path: path.clone(), value, raw: None }),
    }
}

/// `IMAGEGATE__UPSTREAM__BASE_URL=…` → `upstream.base_url`. Values parse as figment parses environment values
/// (numbers, booleans, `[arrays]`, `{inline = "tables"}`), strings otherwise; the raw text is kept to retry as
/// a string. Names are lowercased, so a key with a hyphen (Azure's `api-version`) is set through its table:
/// `IMAGEGATE__UPSTREAM__QUERY={api-version="2024-10-21"}`. Built from the environment we are handed rather than
/// figment's `Env`, which reads the process environment, so tests never depend on the developer's shell.
fn env_leaves(env: &[(String, String)]) -> Vec<Leaf> {
    env.iter()
        .filter_map(|(name, text)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            let path = rest.split("__").map(str::to_ascii_lowercase).collect();
            let value: Value = text.parse().unwrap_or_else(|_| Value::from(text.clone()));
            let raw = (!matches!(&value, Value::String(_, s) if s == text)).then(|| text.clone());
            Some(Leaf { origin: Origin::Env(name.clone()), path, value, raw })
        })
        .collect()
}

/// The leaves as one tree of tables, later leaves winning (tables merge, as figment merges them).
fn tree(leaves: &[Leaf]) -> Value {
    fn insert(dict: &mut figment::value::Dict, path: &[String], value: Value) {
        match path {
            [] => {}
            // A table (an inline table from the environment) merges into the one already there.
            [last] => match (dict.get_mut(last), value) {
                (Some(Value::Dict(_, existing)), Value::Dict(_, incoming)) => {
                    for (key, value) in incoming {
                        insert(existing, &[key], value);
                    }
                }
                (_, value) => {
                    dict.insert(last.clone(), value);
                }
            },
            [first, rest @ ..] => {
                let entry = dict.entry(first.clone()).or_insert_with(|| Value::from(figment::value::Dict::new()));
                if !matches!(entry, Value::Dict(..)) {
                    *entry = Value::from(figment::value::Dict::new());
                }
                if let Value::Dict(_, inner) = entry {
                    insert(inner, rest, value);
                }
            }
        }
    }
    let mut root = figment::value::Dict::new();
    for leaf in leaves {
        insert(&mut root, &leaf.path, leaf.value.clone());
    }
    Value::from(root)
}

/// Deserialize the defaults overlaid with `leaves`. serde stops at the first fault, so each fault is recorded
/// and the leaves it concerns are dropped (or, for an environment value, first retried as a string) until the
/// rest deserializes. Each round drops or reinterprets a leaf, so this ends.
fn resolve(leaves: &mut Vec<Leaf>, faults: &mut Vec<String>) -> Option<Settings> {
    for _ in 0..=2 * leaves.len() {
        let figment =
            Figment::from(Serialized::defaults(Settings::default())).merge(Serialized::defaults(tree(leaves)));
        let error = match figment.extract::<Settings>() {
            Ok(settings) => return Some(settings),
            Err(e) => e.into_iter().next()?,
        };
        let overlaps = |leaf: &Leaf| leaf.path.starts_with(&error.path) || error.path.starts_with(&leaf.path);
        let hits: Vec<usize> = leaves.iter().enumerate().filter(|(_, l)| overlaps(l)).map(|(i, _)| i).collect();
        // The fault is the last writer's: earlier leaves at the same path were overridden by it.
        let Some(&last) = hits.last() else {
            faults.push(describe(None, &error));
            return None;
        };
        if let Some(raw) = leaves[last].raw.take() {
            leaves[last].value = Value::from(raw);
            continue;
        }
        faults.push(describe(leaves.get(last), &error));
        for i in hits.into_iter().rev() {
            leaves.remove(i);
        }
    }
    None
}

/// Settings whose values must not appear in fault messages.
const SECRET_KEYS: &[&str] =
    &["api_key", "token", "signing_key", "access_key_id", "secret_access_key", "url", "redis_url"];

/// One fault, naming its source, its key and what is wrong, without echoing a secret's value.
fn describe(leaf: Option<&Leaf>, error: &figment::Error) -> String {
    use figment::error::{Actual, Kind};
    let key = error.path.join(".");
    let secret = error.path.last().is_some_and(|k| SECRET_KEYS.contains(&k.as_str()));
    let found = |actual: &Actual| {
        if !secret {
            return actual.to_string();
        }
        match actual {
            Actual::Str(_) => "a string".to_owned(),
            Actual::Unsigned(_) | Actual::Signed(_) | Actual::Float(_) => "a number".to_owned(),
            Actual::Bool(_) => "a boolean".to_owned(),
            other => other.to_string(),
        }
    };
    let what = match &error.kind {
        Kind::UnknownField(name, expected) => {
            format!("unknown key `{name}`; expected one of: {}", expected.join(", "))
        }
        Kind::UnknownVariant(value, expected) => {
            format!("unknown value `{value}`; expected one of: {}", expected.join(", "))
        }
        Kind::InvalidType(actual, expected) => format!("found {}, expected {expected}", found(actual)),
        Kind::InvalidValue(actual, expected) => format!("invalid value {}, expected {expected}", found(actual)),
        Kind::MissingField(name) => format!("missing key `{name}`"),
        other => other.to_string(),
    };
    match leaf.map(|l| &l.origin) {
        Some(Origin::Env(name)) => format!("{name} ({key}): {what}"),
        Some(Origin::File(file)) => format!("{key} in {}: {what}", file.display()),
        None => format!("{key}: {what}"),
    }
}
