//! Parsing a JSON request body into a `serde_json::Value` while refusing objects that name a key twice.
//!
//! `serde_json` keeps the last of two equal keys; other parsers keep the first. Since the body is forwarded
//! byte for byte, a duplicate would let what imagegate validated, priced and limited differ from what the
//! upstream executes, so a duplicate key at any depth is refused, naming its path (`n`, `images[0].image_url`).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::ApiError;

/// Parse `raw` as JSON, refusing duplicate keys.
pub fn parse(raw: &[u8]) -> Result<Value, ApiError> {
    let mut duplicate: Option<String> = None;
    let mut de = serde_json::Deserializer::from_slice(raw);
    let parsed = Node { path: Path::Root, duplicate: &mut duplicate }.deserialize(&mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    if let Some(param) = duplicate {
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

/// Where a value sits, to name a duplicate key the way parameters are named elsewhere.
#[derive(Clone)]
enum Path {
    Root,
    Key(String),
}

impl Path {
    fn key(&self, key: &str) -> String {
        match self {
            Self::Root => key.to_owned(),
            Self::Key(parent) => format!("{parent}.{key}"),
        }
    }

    fn index(&self, i: usize) -> Path {
        match self {
            Self::Root => Self::Key(format!("[{i}]")),
            Self::Key(parent) => Self::Key(format!("{parent}[{i}]")),
        }
    }
}

/// Deserializes one value like `serde_json::Value` does, recording the first duplicate key it meets.
struct Node<'a> {
    path: Path,
    duplicate: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
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
            seq.next_element_seed(Node { path: self.path.index(items.len()), duplicate: &mut *self.duplicate })?
        {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = Path::Key(self.path.key(&key));
            let value = map.next_value_seed(Node { path, duplicate: &mut *self.duplicate })?;
            if out.contains_key(&key) {
                if self.duplicate.is_none() {
                    *self.duplicate = Some(self.path.key(&key));
                }
                // Stop at the first duplicate: the request is refused whatever follows.
                return Err(de::Error::custom("duplicate key"));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn malformed_json_is_refused_without_a_param() {
        for raw in ["{\"prompt\":", "{} {}", "", "{\"a\":1,}", "[1e999]"] {
            let e = parse(raw.as_bytes()).unwrap_err();
            assert_eq!(e.param(), None, "{raw}");
            assert!(e.client_message().contains("could not parse the JSON body"), "{raw}");
        }
    }
}
