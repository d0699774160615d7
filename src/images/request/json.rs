//! Parsing a JSON request body into its top-level fields (`request::Fields`) while refusing objects that name a
//! key twice.
//!
//! `serde_json` keeps the last of two equal keys; other parsers keep the first. Since the body is forwarded
//! byte for byte, a duplicate would let what imagegate validated, priced and limited differ from what the
//! upstream executes, so a duplicate key at any depth is refused, naming its path (`n`, `images[0].image_url`).
//!
//! The tree is built within a memory budget proportional to the body: at most [`BASE_VALUES`] values plus one
//! per [`BYTES_PER_VALUE`] bytes of body. A tree node takes far more memory than the byte or two a value such
//! as `0,` takes in the body (a 20 MiB `[0,0,…]` became ~730 MiB of tree); with the budget the tree stays a
//! small fraction of the body, and depth is bounded by `serde_json`'s recursion limit (128). Real requests
//! have a few dozen values: images are strings (URLs, data URLs), at most 16 of them.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::Fields;

use crate::error::ApiError;

/// Values any body may have, however small.
pub const BASE_VALUES: usize = 4096;
/// Body bytes that earn one more value beyond [`BASE_VALUES`].
pub const BYTES_PER_VALUE: usize = 256;

/// What the walk found besides the tree: the first duplicate key, and the values it may still build.
struct Walk {
    duplicate: Option<String>,
    values_left: usize,
    over_budget: bool,
}

/// Parse a request body, refusing duplicate keys and more values than the body's budget: the top-level
/// object's fields straight into a [`Fields`] map, or `None` when the body is JSON but not an object.
pub fn parse_object(raw: &[u8]) -> Result<Option<Fields>, ApiError> {
    let mut walk = Walk::for_body(raw);
    let mut de = serde_json::Deserializer::from_slice(raw);
    let parsed = Top { walk: &mut walk }.deserialize(&mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    walk.finish(raw, parsed)
}

impl Walk {
    fn for_body(raw: &[u8]) -> Self {
        Self { duplicate: None, values_left: BASE_VALUES + raw.len() / BYTES_PER_VALUE, over_budget: false }
    }

    /// The walk's verdict on what it parsed: over budget, a duplicate key, unparseable, or the result.
    fn finish<T>(self, raw: &[u8], parsed: Result<T, serde_json::Error>) -> Result<T, ApiError> {
        if self.over_budget {
            let budget = BASE_VALUES + raw.len() / BYTES_PER_VALUE;
            return Err(ApiError::invalid(
                format!(
                    "The JSON body has too many values: at most {budget} for a body of {} bytes. Send images as \
                     strings (URLs or data URLs) and no more than the API takes.",
                    raw.len()
                ),
                None,
            ));
        }
        if let Some(param) = self.duplicate {
            return Err(ApiError::invalid(
                format!("Duplicate parameter '{param}': a JSON object may name each key only once."),
                Some(param),
            ));
        }
        parsed.map_err(|e| {
            ApiError::invalid(
                format!(
                    "We could not parse the JSON body of your request: {e}. (HINT: send a JSON object with \
                     Content-Type: application/json.)"
                ),
                None,
            )
        })
    }

    /// Spend one value of the budget before building it; past the budget, the walk stops.
    fn spend<E: de::Error>(&mut self) -> Result<(), E> {
        if self.values_left == 0 {
            self.over_budget = true;
            return Err(E::custom("too many values"));
        }
        self.values_left -= 1;
        Ok(())
    }

    /// An object's entries into `out` (a `serde_json::Map` below the top, [`Fields`] at it), each value a
    /// [`Node`] at `path`'s key; the first duplicate key is recorded (its path written out only now) and stops
    /// the walk: the request is refused whatever follows.
    fn object<'de, A: MapAccess<'de>, M: Object>(&mut self, path: Path<'_>, mut map: A) -> Result<M, A::Error> {
        let mut out = M::default();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Node { path: Path::Key(&path, &key), walk: &mut *self })?;
            if out.has(&key) {
                if self.duplicate.is_none() {
                    self.duplicate = Some(Path::Key(&path, &key).render());
                }
                return Err(de::Error::custom("duplicate key"));
            }
            out.put(key, value);
        }
        Ok(out)
    }
}

/// The two maps a JSON object is read into.
trait Object: Default {
    fn has(&self, key: &str) -> bool;
    fn put(&mut self, key: String, value: Value);
}

impl Object for Map<String, Value> {
    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn put(&mut self, key: String, value: Value) {
        self.insert(key, value);
    }
}

impl Object for Fields {
    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn put(&mut self, key: String, value: Value) {
        self.insert(key, value);
    }
}

/// Where a value sits, to name a duplicate key the way parameters are named elsewhere (`n`,
/// `images[0].image_url`). A chain of borrows: written out only for a duplicate, not for every value.
#[derive(Clone, Copy)]
enum Path<'p> {
    Root,
    Key(&'p Path<'p>, &'p str),
    Index(&'p Path<'p>, usize),
}

impl Path<'_> {
    fn render(self) -> String {
        match self {
            Self::Root => String::new(),
            Self::Key(Self::Root, key) => key.to_owned(),
            Self::Key(parent, key) => format!("{}.{key}", parent.render()),
            Self::Index(parent, i) => format!("{}[{i}]", parent.render()),
        }
    }
}

/// Deserializes one value like `serde_json::Value` does, recording the first duplicate key it meets.
struct Node<'a, 'p> {
    path: Path<'p>,
    walk: &'a mut Walk,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        // Every value spends one from the budget before it is built; the walk stops at the first overspend.
        self.walk.spend()?;
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v).map(Value::Number).ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) =
            seq.next_element_seed(Node { path: Path::Index(&self.path, items.len()), walk: &mut *self.walk })?
        {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        self.walk.object(self.path, map).map(Value::Object)
    }
}

/// The top level of a request body: an object's fields into [`Fields`] (each value a [`Node`]); any other
/// JSON value is read past and answered `None` (the caller says the body must be an object).
struct Top<'a> {
    walk: &'a mut Walk,
}

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = Option<Fields>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.walk.spend()?;
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = Option<Fields>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Node { path: Path::Root, walk: self.walk }.visit_f64(v).map(|_| None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        // Read as any array is (its values count against the budget, its numbers are checked), then dropped.
        Node { path: Path::Root, walk: self.walk }.visit_seq(seq).map(|_| None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.walk.object(Path::Root, map).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body as a `Value`, to compare with `serde_json`'s reading (`null` for a body that is not an object).
    fn parse(raw: &[u8]) -> Result<Value, ApiError> {
        parse_object(raw).map(|fields| fields.map_or(Value::Null, |f| Value::Object(f.into_iter().collect())))
    }

    fn duplicate_of(raw: &str) -> Option<String> {
        parse(raw.as_bytes()).err().and_then(|e| e.param().map(str::to_owned))
    }

    #[test]
    fn values_parse_as_serde_json_parses_them() {
        let raw = r#"{"a":[1,-2,3.5,"x",null,true,{"b":{}}],"c":18446744073709551615,"é":"\u00e9"}"#;
        assert_eq!(parse(raw.as_bytes()).unwrap(), serde_json::from_str::<Value>(raw).unwrap());
    }

    #[test]
    fn duplicate_keys_are_refused_naming_their_path() {
        assert_eq!(duplicate_of(r#"{"model":"dall-e-3","prompt":"x","n":5,"n":1}"#).as_deref(), Some("n"));
        assert_eq!(
            duplicate_of(r#"{"images":[{"file_id":"a"},{"image_url":"x","image_url":"y"}]}"#).as_deref(),
            Some("images[1].image_url")
        );
        assert_eq!(duplicate_of(r#"{"mask":{"file_id":"a","file_id":"b"}}"#).as_deref(), Some("mask.file_id"));
        // Equal keys in different objects are fine.
        assert!(parse(br#"{"a":{"k":1},"b":{"k":2},"k":3}"#).is_ok());
    }

    #[test]
    fn a_body_with_more_values_than_its_budget_is_refused_before_the_tree_outgrows_it() {
        let within = format!("{{\"a\":[{}0]}}", "0,".repeat(BASE_VALUES - 3));
        assert!(parse(within.as_bytes()).is_ok());
        let zeros = format!("[{}0]", "0,".repeat(1_000_000));
        let e = parse(zeros.as_bytes()).unwrap_err();
        assert!(e.client_message().contains("too many values"), "{}", e.client_message());
        // Long strings cost one value each, whatever their length.
        let long = format!("{{\"images\":[{{\"image_url\":\"data:image/png;base64,{}\"}}]}}", "A".repeat(1 << 20));
        assert!(parse(long.as_bytes()).is_ok());
    }

    #[test]
    fn malformed_json_is_refused_without_a_param() {
        for raw in ["{\"prompt\":", "{} {}", "", "{\"a\":1,}", "[1e999]"] {
            let e = parse(raw.as_bytes()).unwrap_err();
            assert_eq!(e.param(), None, "{raw}");
            assert!(e.client_message().contains("could not parse the JSON body"), "{raw}");
        }
    }
}
