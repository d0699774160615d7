//! A cached answer: what is kept of an upstream reply, what it weighs, and whether (for how long) it may be
//! stored at all.

use super::*;

/// Headers of the upstream call that made an answer; a hit made no upstream call, so it does not replay them.
pub const NOT_REPLAYED: &[&str] =
    &[headers::X_UPSTREAM_REQUEST_ID, headers::OPENAI_PROCESSING_MS, headers::X_IMAGEGATE_DEPLOYMENT];

/// A cached answer: status, the headers worth replaying, and the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Bytes,
    /// Images in the body (`data[]`), counted once when stored so hits need not parse it again.
    #[serde(default)]
    pub images: Option<u32>,
}

/// Bytes an entry costs besides its body and headers: the key and the entry as moka keeps them (its hash
/// table slot, its access-order and write-order queue nodes, its timer-wheel node, the `Arc`s around key and
/// value), the `Entry` and the allocator's rounding of the body. Measured, not guessed: `tests/cache_memory.rs`
/// (`calibrate`) grows a cache by 20,000 entries of ~1 KB and reads the process's RSS; without headers an
/// entry took 1,712 to 1,843 bytes (over several runs) for a 1,043-byte body.
pub const ENTRY_OVERHEAD: usize = 768;

/// Bytes each replayed header costs besides its name and value: its slot in the `Vec` and the two `String`s'
/// heap chunks. Measured the same way: four headers (133 bytes of names and values) added 440 to 520 bytes.
pub const HEADER_OVERHEAD: usize = 88;

impl Answer {
    /// A whole upstream reply (streams, and answers split for re-hosting, never reach the cache; their body reads
    /// as empty), with the images its body holds as the pipeline read them (`wire::AnswerFacts`).
    pub fn from_reply(reply: UpstreamReply, images: Option<u32>) -> Self {
        let headers = reply
            .headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect();
        // A copy of exactly the body's size: the reply's bytes may share a larger read buffer, which the
        // cache's byte bound would not see.
        let body = match reply.body {
            ReplyBody::Full(body) => Bytes::copy_from_slice(&body),
            ReplyBody::Stream(_) | ReplyBody::Split(_) => Bytes::new(),
        };
        Self { status: reply.status.as_u16(), headers, body, images }
    }

    /// Bytes it holds, as the byte bound counts them.
    pub fn weight(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD).sum();
        (self.body.len() + headers + ENTRY_OVERHEAD) as u64
    }

    /// The links (`data[].url`) in a JSON answer; `None` when the body is not a JSON object.
    pub fn links(&self) -> Option<Vec<String>> {
        crate::wire::AnswerFacts::read(&self.body)?.links
    }
}

/// Why an answer was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    /// Not a 2xx answer.
    Status,
    /// Not a JSON object: nothing to tell its links by.
    NotJson,
    /// A link that is not one of imagegate's own signed links (re-hosting is off, or a failed download passed
    /// the upstream's expiring URL on).
    ForeignLink,
    /// Its links expire too soon to keep the minimum remaining life a hit guarantees.
    ShortLivedLinks,
    /// Larger than `cache.max_entry_bytes`.
    TooLarge,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "error_status",
            Self::NotJson => "not_json",
            Self::ForeignLink => "foreign_link",
            Self::ShortLivedLinks => "short_lived_links",
            Self::TooLarge => "too_large",
        }
    }
}

/// How long `answer`, whose links are `links` (`wire::AnswerFacts::links`, `None` when the body is not a JSON
/// object with readable links), may be stored for `lookup`: its TTL, shortened so that the entry expires while every link
/// in it has at least `lookup.link_margin` left to live. `own_link_expiry` tells imagegate's own signed links
/// (returning their expiry, Unix seconds) from any other link (`None`); an answer with any other link is not
/// stored, since that link expires on the upstream's clock. Answers without links (base64) keep the full TTL.
pub fn storable_for(
    answer: &Answer,
    links: Option<&[String]>,
    lookup: &Lookup,
    now: SystemTime,
    own_link_expiry: impl Fn(&str) -> Option<i64>,
) -> Result<Duration, NotStored> {
    if !(200..300).contains(&answer.status) {
        return Err(NotStored::Status);
    }
    let now_ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut ttl = lookup.ttl;
    for link in links.ok_or(NotStored::NotJson)? {
        let expires_ms = own_link_expiry(link)
            .and_then(|s| u128::try_from(s).ok())
            .ok_or(NotStored::ForeignLink)?
            .saturating_mul(1000);
        let left = Duration::from_millis(u64::try_from(expires_ms.saturating_sub(now_ms)).unwrap_or(u64::MAX));
        ttl = ttl.min(left.saturating_sub(lookup.link_margin));
    }
    if ttl.is_zero() { Err(NotStored::ShortLivedLinks) } else { Ok(ttl) }
}
