//! The optional shared cache in Redis: a miss on one replica fills it, a later identical request on any
//! replica hits it. Entries are small once images are re-hosted (links, not bytes); answers carrying base64
//! are as large as the images, so `cache.max_entry_bytes` bounds what goes there too.
//!
//! Stored value: a 4-byte big-endian length, the answer's status and headers as JSON, then the body. Redis
//! expires it (`PX`) after the entry's TTL. Every call has a deadline; a failure reads as a miss.
//!
//! Redis being down never fails a request and costs it next to nothing: startup does not wait for the
//! connection (it is made in the background), writes run in tasks of their own (see `ResponseCache::store`),
//! and a circuit breaker opens after [`TRIP_AFTER`] consecutive failures (at once when the connection itself
//! is lost): calls are then skipped ([`SharedError::Unavailable`]) while a background task reconnects every
//! `cache.redis_backoff`, closing the circuit once Redis answers a `PING` again.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands as _;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use super::Answer;
use super::key::Key;

/// Consecutive failed calls (errors or timeouts) that open the circuit.
pub const TRIP_AFTER: u32 = 3;

/// The Redis side of the cache. Cheap to clone.
#[derive(Clone)]
pub struct SharedCache {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    backoff: Duration,
    link: Mutex<Link>,
}

/// The circuit: closed (`Up`), probing (`Connecting`) or open (`Down`, waiting to reconnect).
enum Link {
    Up { conn: MultiplexedConnection, failures: u32 },
    Connecting,
    Down,
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
    /// Not asked: Redis is down (the circuit is open) or not connected yet.
    #[error("redis is unavailable; not asked")]
    Unavailable,
}

impl SharedCache {
    /// A shared cache on `url`, connecting in the background. Fails only on a URL that is not a Redis URL.
    pub fn new(url: &str, prefix: &str, timeout: Duration, backoff: Duration) -> Result<Self, SharedError> {
        let client = redis::Client::open(url)?;
        let inner = Inner { client, prefix: prefix.to_owned(), timeout, backoff, link: Mutex::new(Link::Connecting) };
        let cache = Self { inner: Arc::new(inner) };
        connect_after(Arc::downgrade(&cache.inner), Duration::ZERO);
        Ok(cache)
    }

    /// `up`, `connecting` or `down`.
    pub fn state(&self) -> &'static str {
        match &*self.inner.lock() {
            Link::Up { .. } => "up",
            Link::Connecting => "connecting",
            Link::Down => "down",
        }
    }

    fn redis_key(&self, key: &Key) -> String {
        format!("{}:cache:{}", self.inner.prefix, crate::wire::hex(key))
    }

    /// The connection, unless the circuit is open.
    fn conn(&self) -> Result<MultiplexedConnection, SharedError> {
        match &*self.inner.lock() {
            Link::Up { conn, .. } => Ok(conn.clone()),
            Link::Connecting | Link::Down => Err(SharedError::Unavailable),
        }
    }

    /// Run one call under the deadline and feed its result to the circuit breaker.
    async fn call<T>(&self, call: impl Future<Output = Result<T, redis::RedisError>>) -> Result<T, SharedError> {
        let timeout = self.inner.timeout;
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(SharedError::Redis(e)),
            Err(_) => Err(SharedError::Timeout(timeout)),
        };
        self.record(result.as_ref().err());
        result
    }

    /// A call succeeded (`None`) or failed: count consecutive failures, open the circuit when they are too many
    /// or the connection is lost, and schedule the reconnection.
    fn record(&self, failure: Option<&SharedError>) {
        let mut link = self.inner.lock();
        let Link::Up { failures, .. } = &mut *link else { return };
        let Some(error) = failure else {
            *failures = 0;
            return;
        };
        *failures += 1;
        let lost = matches!(error, SharedError::Redis(e) if e.is_unrecoverable_error() || e.is_connection_dropped());
        if lost || *failures >= TRIP_AFTER {
            let failures = *failures;
            *link = Link::Down;
            drop(link);
            let retry_in = if lost { Duration::ZERO } else { self.inner.backoff };
            tracing::warn!(error = %error, failures, retry_in_ms = retry_in.as_millis() as u64,
                "the response cache's Redis is failing; going on without it");
            connect_after(Arc::downgrade(&self.inner), retry_in);
        }
    }

    /// The answer stored under `key` and its remaining lifetime.
    pub async fn get(&self, key: &Key) -> Result<Option<(Answer, Duration)>, SharedError> {
        let mut conn = self.conn()?;
        let redis_key = self.redis_key(key);
        let (value, ttl_ms): (Option<Vec<u8>>, i64) =
            self.call(redis::pipe().get(&redis_key).pttl(&redis_key).query_async(&mut conn)).await?;
        let Some(value) = value else { return Ok(None) };
        let ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
        if ttl.is_zero() {
            return Ok(None);
        }
        decode(value).map(|answer| Some((answer, ttl)))
    }

    /// Remove the answer stored under `key`.
    pub async fn delete(&self, key: &Key) -> Result<(), SharedError> {
        let mut conn = self.conn()?;
        self.call(conn.del::<_, ()>(self.redis_key(key))).await
    }

    /// Store `answer` under `key` for `ttl`.
    pub async fn put(&self, key: &Key, answer: &Answer, ttl: Duration) -> Result<(), SharedError> {
        let mut conn = self.conn()?;
        let value = encode(answer);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.call(conn.pset_ex::<_, _, ()>(self.redis_key(key), value, ttl_ms)).await
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection that has answered a `PING`.
    async fn connect(&self) -> Result<MultiplexedConnection, SharedError> {
        let deadline = self.timeout * 8;
        let config = AsyncConnectionConfig::new().set_connection_timeout(deadline).set_response_timeout(self.timeout);
        let attempt = async {
            let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, SharedError>(conn)
        };
        tokio::time::timeout(deadline, attempt).await.map_err(|_| SharedError::Timeout(deadline))?
    }
}

/// After `delay`, try to connect in the background: success closes the circuit, failure tries again after the
/// backoff. Stops when the cache is gone.
fn connect_after(inner: Weak<Inner>, delay: Duration) {
    tokio::spawn(async move {
        let mut delay = delay;
        loop {
            tokio::time::sleep(delay).await;
            let Some(inner) = inner.upgrade() else { return };
            *inner.lock() = Link::Connecting;
            match inner.connect().await {
                Ok(conn) => {
                    tracing::info!("the response cache's Redis is reachable");
                    *inner.lock() = Link::Up { conn, failures: 0 };
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = inner.backoff.as_millis() as u64,
                        "cannot reach Redis for the response cache; going on without it");
                    *inner.lock() = Link::Down;
                    delay = inner.backoff;
                }
            }
        }
    });
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

    #[tokio::test]
    async fn an_unreachable_redis_is_skipped_without_waiting() {
        // Nothing listens on port 1: every connection attempt is refused.
        let shared =
            SharedCache::new("redis://127.0.0.1:1", "igtest", Duration::from_millis(100), Duration::from_secs(60))
                .unwrap();
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(matches!(shared.get(&[0; 32]).await, Err(SharedError::Unavailable)));
        }
        assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(shared.state(), "down");
    }
}
