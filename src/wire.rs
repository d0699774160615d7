//! Names on the wire: header names, route paths and OpenAI's event and object spellings, each written once.
//!
//! Request and response bodies are deliberately *not* mirrored as closed structs: imagegate forwards fields it
//! does not know, so bodies travel as JSON maps or multipart parts (see `images::request`).

/// Lower-case hex of `bytes`, written in one pass: ids, digests and key hashes on the request path
/// (`hex::encode` builds its `String` a `char` at a time, about 25 instructions per byte).
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    // Cannot fail: the buffer is exactly twice the bytes, and hex digits are ASCII.
    let _ = ::hex::encode_to_slice(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Header names imagegate reads or writes.
pub mod headers {
    /// imagegate's own request id, on every response and in every log line of the request.
    pub const X_REQUEST_ID: &str = "x-request-id";
    /// The upstream's `x-request-id`, passed on so callers can quote it to OpenAI.
    pub const X_UPSTREAM_REQUEST_ID: &str = "x-upstream-request-id";
    /// OpenAI's processing time, passed through.
    pub const OPENAI_PROCESSING_MS: &str = "openai-processing-ms";
    /// OpenAI's API version, passed through.
    pub const OPENAI_VERSION: &str = "openai-version";
    /// Attribution headers, set from the tenant (or upstream) configuration.
    pub const OPENAI_ORGANIZATION: &str = "openai-organization";
    pub const OPENAI_PROJECT: &str = "openai-project";
    /// Tells OpenAI's SDKs whether to retry.
    pub const X_SHOULD_RETRY: &str = "x-should-retry";
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
    /// Azure's key header, used when `upstream.auth = "api-key"`.
    pub const API_KEY: &str = "api-key";
    /// How many times an OpenAI SDK has retried this request (absent or `0` on the first try).
    pub const X_STAINLESS_RETRY_COUNT: &str = "x-stainless-retry-count";
    /// Caller-supplied idempotency key, forwarded unchanged.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// `hit`, `miss` or `bypass`: how the response cache answered.
    pub const X_IMAGEGATE_CACHE: &str = "x-imagegate-cache";
    /// `true` on an answer an earlier identical request's call made (the replay window).
    pub const X_IMAGEGATE_REPLAYED: &str = "x-imagegate-replayed";
    /// The pool deployment (`[upstreams.<name>]`, or `upstream`) that answered.
    pub const X_IMAGEGATE_DEPLOYMENT: &str = "x-imagegate-deployment";

    /// Upstream response headers passed to the caller unchanged (besides `content-type`).
    /// `x-request-id` is renamed to [`X_UPSTREAM_REQUEST_ID`]. The upstream's `x-ratelimit-*` headers stay
    /// behind: they describe the deployment's shared OpenAI quota, not the caller's; imagegate sets its own
    /// from the tenant's limits. Cookies, server and hop-by-hop headers stay behind too.
    pub const PASSED_THROUGH: &[&str] =
        &[OPENAI_PROCESSING_MS, OPENAI_VERSION, "retry-after", RETRY_AFTER_MS, X_SHOULD_RETRY];
}

/// Route paths, relative to the `/v1` prefix where they sit under it.
pub mod paths {
    /// A link handed to callers: `path` (one of the paths below plus a file name) under the gateway's public
    /// base URL, which may itself carry a path prefix, with `query`.
    pub fn public_link(base: &url::Url, path: &str, query: &str) -> String {
        let mut url = base.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(Some(query));
        url.set_fragment(None);
        url.to_string()
    }

    pub const GENERATIONS: &str = "/images/generations";
    pub const EDITS: &str = "/images/edits";
    pub const VARIATIONS: &str = "/images/variations";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    /// Prometheus metrics (on `server.listen`, or on `metrics.listen` when set).
    pub const METRICS: &str = "/metrics";
    /// Where re-hosted images are served: `{IMAGE_FILES}/{id}.{ext}?expires=…&signature=…`.
    pub const IMAGE_FILES: &str = "/images/files";
    /// Where the built-in mock upstream serves the images behind its expiring DALL·E-style URLs.
    pub const MOCK_FILES: &str = "/_mock/files";
}

/// SSE event types of the streaming image endpoints.
pub mod events {
    pub const GENERATION_PARTIAL: &str = "image_generation.partial_image";
    pub const GENERATION_COMPLETED: &str = "image_generation.completed";
    pub const EDIT_PARTIAL: &str = "image_edit.partial_image";
    pub const EDIT_COMPLETED: &str = "image_edit.completed";
}

/// What the gateway reads of a whole images answer, in one pass over its body: how many images `data[]`
/// holds, its `usage`, and its links (`data[].url`). Every other value (a `b64_json`'s megabytes above all) is
/// skipped as it is read, never copied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerFacts {
    /// `data[]` items, whatever they are.
    pub images: u32,
    pub usage: Option<serde_json::Value>,
    /// `data[].url` strings in order; `None` when an item is not an object or its `url` not a string (or
    /// `null`): such an answer has no links a cache could tell.
    pub links: Option<Vec<String>>,
}

impl AnswerFacts {
    /// The facts of `body`; `None` when it is not a JSON object (or `data` / `usage` have the wrong type, or
    /// are given twice).
    pub fn read(body: &[u8]) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Body {
            #[serde(default)]
            data: Vec<Item>,
            #[serde(default)]
            usage: Option<serde_json::Value>,
        }
        let body = serde_json::from_slice::<Body>(body).ok()?;
        let links = body.data.iter().map(|item| item.0.clone()).collect::<Option<Vec<Option<String>>>>();
        Some(Self {
            images: u32::try_from(body.data.len()).unwrap_or(u32::MAX),
            usage: body.usage,
            links: links.map(|links| links.into_iter().flatten().collect()),
        })
    }
}

/// One `data[]` item as [`AnswerFacts`] reads it: `Some(url)` for an object (its `url`, if any), `None` for
/// an item whose links cannot be told (not an object, a `url` that is not a string or `null`, or two).
struct Item(Option<Option<String>>);

impl<'de> serde::Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> serde::de::Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an image item")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        use serde::de::IgnoredAny;
        let (mut url, mut seen, mut valid) = (None, false, true);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key != "url" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            valid &= !std::mem::replace(&mut seen, true);
            match map.next_value::<Url>()? {
                Url::Text(text) => url = Some(text),
                Url::Null => {}
                Url::Other => valid = false,
            }
        }
        Ok(Item(valid.then_some(url)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Item(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Item, E> {
        Ok(Item(None))
    }
    fn visit_unit<E>(self) -> Result<Item, E> {
        Ok(Item(None))
    }
}

/// An item's `url` value.
enum Url {
    Text(String),
    Null,
    Other,
}

impl<'de> serde::Deserialize<'de> for Url {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Url;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL")
            }
            fn visit_str<E>(self, v: &str) -> Result<Url, E> {
                Ok(Url::Text(v.to_owned()))
            }
            fn visit_unit<E>(self) -> Result<Url, E> {
                Ok(Url::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Url, E> {
                Ok(Url::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Url, E> {
                Ok(Url::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Url, E> {
                Ok(Url::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Url, E> {
                Ok(Url::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Url, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Url::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Url, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Url::Other)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::AnswerFacts;

    #[test]
    fn one_pass_reads_the_count_the_usage_and_the_links() {
        let facts = AnswerFacts::read(
            br#"{"created":1,"data":[{"url":"https://a/1.png","revised_prompt":"x"},{"b64_json":"QUJD"},{"url":null}],"usage":{"total_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(facts.images, 3);
        assert_eq!(facts.usage, Some(serde_json::json!({"total_tokens": 3})));
        assert_eq!(facts.links, Some(vec!["https://a/1.png".to_owned()]));
        // Items whose links cannot be told: still counted, but no links.
        for body in [&br#"{"data":[{"url":1}]}"#[..], br#"{"data":["x"]}"#, br#"{"data":[{"url":"a","url":"b"}]}"#] {
            let facts = AnswerFacts::read(body).unwrap();
            assert_eq!((facts.images, facts.links), (1, None), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(AnswerFacts::read(b"{}").unwrap(), AnswerFacts { links: Some(vec![]), ..AnswerFacts::default() });
        assert!(AnswerFacts::read(b"[1]").is_none());
        assert!(AnswerFacts::read(b"{\"data\":3}").is_none());
    }
}
