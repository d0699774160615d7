//! The optional shared cache in Redis: a miss on one replica fills it, a later identical request on any
//! replica hits it. Entries are small once images are re-hosted (links, not bytes); answers carrying base64
//! are as large as the images, so `cache.max_entry_bytes` bounds what goes there too.
//!
//! Stored value: a 4-byte big-endian length, the answer's status and headers as JSON, then the body. Redis
//! expires it (`PX`) after the entry's TTL. Every call has a deadline; a failure reads as a miss.

use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

use super::Answer;
use super::key::Key;

/// The Redis side of the cache. Cheap to clone.
#[derive(Clone)]
pub struct SharedCache {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

/// A Redis failure or a corrupt entry.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("stored entry is corrupt")]
    Corrupt,
}

impl SharedCache {
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SharedError> {
        let client = redis::Client::open(url)?;
        let conn = tokio::time::timeout(timeout * 8, ConnectionManager::new(client))
            .await
            .map_err(|_| SharedError::Timeout(timeout * 8))??;
        Ok(Self { conn, prefix: prefix.to_owned(), timeout })
    }

    fn redis_key(&self, key: &Key) -> String {
        format!("{}:cache:{}", self.prefix, hex::encode(key))
    }

    /// The answer stored under `key` and its remaining lifetime.
    pub async fn get(&self, key: &Key) -> Result<Option<(Answer, Duration)>, SharedError> {
        let mut conn = self.conn.clone();
        let redis_key = self.redis_key(key);
        let fetch = async {
            let (value, ttl_ms): (Option<Vec<u8>>, i64) =
                redis::pipe().get(&redis_key).pttl(&redis_key).query_async(&mut conn).await?;
            Ok::<_, SharedError>(value.map(|v| (v, ttl_ms)))
        };
        let found =
            tokio::time::timeout(self.timeout, fetch).await.map_err(|_| SharedError::Timeout(self.timeout))??;
        let Some((value, ttl_ms)) = found else { return Ok(None) };
        let ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
        if ttl.is_zero() {
            return Ok(None);
        }
        decode(value).map(|answer| Some((answer, ttl)))
    }

    /// Store `answer` under `key` for `ttl`.
    pub async fn put(&self, key: &Key, answer: &Answer, ttl: Duration) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        let value = encode(answer);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let set = conn.pset_ex::<_, _, ()>(self.redis_key(key), value, ttl_ms);
        tokio::time::timeout(self.timeout, set).await.map_err(|_| SharedError::Timeout(self.timeout))??;
        Ok(())
    }
}

fn encode(answer: &Answer) -> Vec<u8> {
    let head = serde_json::to_vec(answer).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + head.len() + answer.body.len());
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&answer.body);
    out
}

fn decode(value: Vec<u8>) -> Result<Answer, SharedError> {
    let len = value.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()).ok_or(SharedError::Corrupt)?;
    let len = usize::try_from(u32::from_be_bytes(len)).map_err(|_| SharedError::Corrupt)?;
    let head = value.get(4..4 + len).ok_or(SharedError::Corrupt)?;
    let mut answer: Answer = serde_json::from_slice(head).map_err(|_| SharedError::Corrupt)?;
    answer.body = Bytes::from(value).slice(4 + len..);
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_corruption_is_detected() {
        let answer = Answer {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"{\"data\":[]}"),
            images: Some(0),
        };
        assert_eq!(decode(encode(&answer)).unwrap(), answer);
        assert!(matches!(decode(vec![0, 0, 0, 99, b'{']), Err(SharedError::Corrupt)));
        assert!(matches!(decode(vec![1]), Err(SharedError::Corrupt)));
    }
}
