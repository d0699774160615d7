//! A JSON answer as re-hosting reads and rewrites it: every field a parsed value, except the `url` and
//! `b64_json` strings of the `data[]` items, which stay borrowed from the body. A GPT answer is one base64
//! string of megabytes: parsed into a `serde_json::Value` it would be copied into a tree first, and decoded
//! from that copy; here it is decoded straight from the body the upstream sent.
//!
//! Written back ([`Answer::to_vec`]), an answer is what `serde_json::to_vec` of the parsed `Value` would
//! give after the same changes: the fields in their order, compact, duplicate keys resolved as a `Value`
//! resolves them (the last value, in the first one's place).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap as _, SerializeSeq as _, Serializer};
use serde_json::{Map, Value};

/// The answer: its top-level fields in order.
pub(super) struct Answer<'a> {
    fields: Vec<(String, Top<'a>)>,
}

/// A top-level field: `data` when it is an array, anything else as a value.
enum Top<'a> {
    Data(Vec<Item<'a>>),
    Other(Value),
}

/// One `data[]` item: an object's fields in order, or any other value.
pub(super) enum Item<'a> {
    Object(Vec<(String, Field<'a>)>),
    Other(Value),
}

/// An item's field: the string of `url` or `b64_json` (borrowed from the body unless it had escapes), or a
/// value.
pub(super) enum Field<'a> {
    Text(Cow<'a, str>),
    Other(Value),
}

impl<'a> Answer<'a> {
    /// Read `body`; `None` when it is not a JSON object.
    pub(super) fn parse(body: &'a [u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }

    /// The `data[]` items, when `data` is an array.
    pub(super) fn data_mut(&mut self) -> Option<&mut Vec<Item<'a>>> {
        self.fields.iter_mut().find_map(|(name, top)| match top {
            Top::Data(items) if name == "data" => Some(items),
            _ => None,
        })
    }

    /// The answer written back, compact.
    pub(super) fn to_vec(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// The answer with nothing borrowed from the body any more, so the body can be freed while the images
    /// are stored: a string still borrowed (one no job took) is copied.
    pub(super) fn into_owned(self) -> Answer<'static> {
        let fields = self
            .fields
            .into_iter()
            .map(|(name, top)| {
                let top = match top {
                    Top::Data(items) => Top::Data(items.into_iter().map(Item::into_owned).collect()),
                    Top::Other(value) => Top::Other(value),
                };
                (name, top)
            })
            .collect();
        Answer { fields }
    }
}

impl<'a> Item<'a> {
    fn into_owned(self) -> Item<'static> {
        match self {
            Self::Object(fields) => Item::Object(
                fields
                    .into_iter()
                    .map(|(name, field)| {
                        let field = match field {
                            Field::Text(text) => Field::Text(Cow::Owned(text.into_owned())),
                            Field::Other(value) => Field::Other(value),
                        };
                        (name, field)
                    })
                    .collect(),
            ),
            Self::Other(value) => Item::Other(value),
        }
    }

    /// Field `name`, if this item is an object that has it.
    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut Field<'a>> {
        match self {
            Self::Object(fields) => fields.iter_mut().find(|(n, _)| n == name).map(|(_, f)| f),
            Self::Other(_) => None,
        }
    }

    /// Drop `url` and `b64_json` and add `replacement`'s fields, as `Map::remove` (a swap-remove with
    /// `preserve_order`) and `Map::extend` would on the parsed `Value`.
    pub(super) fn replace_image(&mut self, replacement: Map<String, Value>) {
        let Self::Object(fields) = self else { return };
        for name in ["url", "b64_json"] {
            if let Some(i) = fields.iter().position(|(n, _)| n == name) {
                fields.swap_remove(i);
            }
        }
        for (name, value) in replacement {
            insert(fields, name, Field::Other(value));
        }
    }
}

/// Set `name` to `value`: in place when present (as a map keeps the first one's place), else last.
fn insert<T>(fields: &mut Vec<(String, T)>, name: String, value: T) {
    match fields.iter_mut().find(|(n, _)| *n == name) {
        Some((_, slot)) => *slot = value,
        None => fields.push((name, value)),
    }
}

impl<'de> Deserialize<'de> for Answer<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnswerVisitor;
        impl<'de> Visitor<'de> for AnswerVisitor {
            type Value = Answer<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Answer<'de>, A::Error> {
                let mut fields = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let top =
                        if name == "data" { map.next_value::<Top<'de>>()? } else { Top::Other(map.next_value()?) };
                    insert(&mut fields, name, top);
                }
                Ok(Answer { fields })
            }
        }
        deserializer.deserialize_map(AnswerVisitor)
    }
}

/// The visitor methods for everything that is read as a plain `Value` (scalars, and objects or arrays
/// where nothing is borrowed), wrapped by `$wrap`.
macro_rules! as_value {
    ($wrap:path) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok($wrap(Value::Bool(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
    };
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            as_value!(Top::Other);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Top<'de>, E> {
                Ok(Top::Other(Value::String(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Top<'de>, A::Error> {
                Value::deserialize(de::value::MapAccessDeserializer::new(map)).map(Top::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Top<'de>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Item<'de>>()? {
                    items.push(item);
                }
                Ok(Top::Data(items))
            }
        }
        deserializer.deserialize_any(TopVisitor)
    }
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            as_value!(Item::Other);
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Item<'de>, E> {
                Ok(Item::Other(Value::String(v.to_owned())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item<'de>, A::Error> {
                Value::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Item::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item<'de>, A::Error> {
                let mut fields = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let field = if name == "url" || name == "b64_json" {
                        map.next_value::<Field<'de>>()?
                    } else {
                        Field::Other(map.next_value()?)
                    };
                    insert(&mut fields, name, field);
                }
                Ok(Item::Object(fields))
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            as_value!(Field::Other);
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
                Value::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
                Value::deserialize(de::value::MapAccessDeserializer::new(map)).map(Field::Other)
            }
        }
        deserializer.deserialize_any(FieldVisitor)
    }
}

impl Serialize for Answer<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len()))?;
        for (name, top) in &self.fields {
            match top {
                Top::Data(items) => map.serialize_entry(name, &Items(items))?,
                Top::Other(value) => map.serialize_entry(name, value)?,
            }
        }
        map.end()
    }
}

struct Items<'x, 'a>(&'x [Item<'a>]);

impl Serialize for Items<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for item in self.0 {
            seq.serialize_element(item)?;
        }
        seq.end()
    }
}

impl Serialize for Item<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Other(value) => value.serialize(serializer),
            Self::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (name, field) in fields {
                    match field {
                        Field::Text(text) => map.serialize_entry(name, text.as_ref())?,
                        Field::Other(value) => map.serialize_entry(name, value)?,
                    }
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `apply` did before: parse a `Value`, replace each item's image fields, write it back.
    fn with_value(body: &[u8], replace: &Map<String, Value>) -> Option<Vec<u8>> {
        let mut answer: Value = serde_json::from_slice(body).ok()?;
        let data = answer.get_mut("data")?.as_array_mut()?;
        for item in data.iter_mut() {
            if let Some(fields) = item.as_object_mut() {
                fields.remove("url");
                fields.remove("b64_json");
                fields.extend(replace.clone());
            }
        }
        serde_json::to_vec(&answer).ok()
    }

    fn borrowed(body: &[u8], replace: &Map<String, Value>) -> Option<Vec<u8>> {
        let mut answer = Answer::parse(body)?;
        for item in answer.data_mut()? {
            if matches!(item, Item::Object(_)) {
                item.replace_image(replace.clone());
            }
        }
        answer.to_vec().ok()
    }

    #[test]
    fn an_answer_is_written_back_as_a_parsed_value_would_be() {
        let replace = serde_json::json!({"url": "https://gw/x.png"}).as_object().unwrap().clone();
        for body in [
            &br#"{"created":1,"data":[{"b64_json":"QUJD","revised_prompt":"a \"q\" \u00e9"}],"usage":{"x":[1,2.5,null,true]}}"#[..],
            br#"{ "data" : [ {"revised_prompt":"r","url":"https:\/\/up\/1.png","n":-3}, 7, "s", [1], {"b64_json":null} ] }"#,
            br#"{"data":[{"url":"a","b64_json":"b","c":1,"d":2}],"data":[{"url":"later"}],"created":2,"created":3}"#,
            br#"{"data":{"not":"an array"},"x":1}"#,
            br#"{"created":1}"#,
            br#"[1,2]"#,
        ] {
            assert_eq!(borrowed(body, &replace), with_value(body, &replace), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn an_answer_made_owned_outlives_its_body_and_is_written_back_the_same() {
        let replace = serde_json::json!({"url": "https://gw/x.png"}).as_object().unwrap().clone();
        for body in [
            &br#"{"created":1,"data":[{"b64_json":"QUJD","revised_prompt":"r"},{"url":"https:\/\/up\/1.png"}]}"#[..],
            br#"{"data":[{"url":"a","b64_json":"b","c":1}],"created":2,"usage":{"x":[1,null]}}"#,
        ] {
            let owned = {
                let copy = body.to_vec();
                Answer::parse(&copy).unwrap().into_owned()
            };
            let mut owned = owned;
            for item in owned.data_mut().unwrap() {
                item.replace_image(replace.clone());
            }
            assert_eq!(owned.to_vec().ok(), borrowed(body, &replace), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn base64_without_escapes_is_borrowed_from_the_body() {
        let body = br#"{"data":[{"b64_json":"QUJD"},{"b64_json":"QU\/D"}]}"#;
        let mut answer = Answer::parse(body).unwrap();
        let data = answer.data_mut().unwrap();
        let Some(Field::Text(Cow::Borrowed(text))) = data[0].get_mut("b64_json") else { panic!("not borrowed") };
        assert_eq!(*text, "QUJD");
        let text_at = text.as_ptr() as usize - body.as_ptr() as usize;
        assert_eq!(&body[text_at..text_at + 4], b"QUJD", "a slice of the body itself");
        let Some(Field::Text(Cow::Owned(text))) = data[1].get_mut("b64_json") else { panic!("escaped: owned") };
        assert_eq!(text, "QU/D");
    }
}
