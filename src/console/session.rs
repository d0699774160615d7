//! Console sessions: who is signed in, kept in the database (so every replica sharing it knows the session)
//! under the SHA-256 of a random id. The cookie holds that id and an HMAC of it, no secret and no identity:
//! a forged or altered cookie fails the HMAC before any lookup, and a copy of the table signs nobody in.
//!
//! A tenant session is re-checked on every page through the same cached key lookup as API requests, so
//! revoking its key or suspending its tenant ends it within `auth.key_cache_ttl`. An admin session holds a
//! MAC of the admin token it was opened with; changing the token ends it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use subtle::ConstantTimeEq as _;

use crate::db::Db;
use crate::time::now_ms;

type HmacSha256 = Hmac<Sha256>;

/// Who a session belongs to, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The platform team (signed in with the admin token).
    Admin,
    /// A team, signed in with one of its keys.
    Tenant { tenant_id: String, key_id: String },
}

/// A live session row.
#[derive(Debug, Clone)]
pub struct Session {
    pub id_sha256: String,
    pub holder: Holder,
    /// MAC of the admin token (admin sessions); empty for tenant sessions.
    pub credential: String,
    /// The token every form of this session carries.
    pub csrf: String,
    pub expires_at: i64,
}

/// Signs cookie values and keeps sessions in the database.
#[derive(Clone)]
pub struct Sessions {
    db: Db,
    key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl Sessions {
    /// `key` signs cookies (derived from the link-signing key, so every replica agrees).
    pub fn new(db: Db, key: Vec<u8>, ttl: Duration) -> Self {
        Self { db, key, ttl }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn mac(&self, purpose: &[u8], value: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length, so this cannot fail; an empty MAC would never verify anyway.
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else { return Vec::new() };
        mac.update(purpose);
        mac.update(b"\n");
        mac.update(value);
        mac.finalize().into_bytes().to_vec()
    }

    /// `value.signature`, for a cookie.
    pub fn sign(&self, purpose: &[u8], value: &str) -> String {
        format!("{value}.{}", URL_SAFE_NO_PAD.encode(self.mac(purpose, value.as_bytes())))
    }

    /// The value of a cookie made by [`Sessions::sign`] for `purpose`, if its signature holds.
    pub fn verify<'a>(&self, purpose: &[u8], signed: &'a str) -> Option<&'a str> {
        let (value, signature) = signed.rsplit_once('.')?;
        let given = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let expected = self.mac(purpose, value.as_bytes());
        (!expected.is_empty() && bool::from(expected.ct_eq(&given))).then_some(value)
    }

    /// A MAC of the admin token, stored with admin sessions to notice a rotated token.
    pub fn credential_of(&self, admin_token: &str) -> String {
        hex::encode(self.mac(b"admin token", admin_token.as_bytes()))
    }

    /// Start a session; returns the signed cookie value and the session.
    pub async fn open(&self, holder: Holder, credential: String) -> Result<(String, Session), sqlx::Error> {
        let now = now_ms();
        // Sessions that ended on their own are removed as new ones begin.
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1").bind(now).execute(self.db.pool()).await?;
        let id = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let session = Session {
            id_sha256: sha256_hex(&id),
            holder,
            credential,
            csrf: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>()),
            expires_at: now.saturating_add(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)),
        };
        let (kind, tenant_id, key_id) = match &session.holder {
            Holder::Admin => ("admin", None, None),
            Holder::Tenant { tenant_id, key_id } => ("tenant", Some(tenant_id.clone()), Some(key_id.clone())),
        };
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, kind, tenant_id, key_id, credential, csrf, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(session.id_sha256.clone())
        .bind(kind)
        .bind(tenant_id)
        .bind(key_id)
        .bind(session.credential.clone())
        .bind(session.csrf.clone())
        .bind(now)
        .bind(session.expires_at)
        .execute(self.db.pool())
        .await?;
        Ok((self.sign(SESSION_PURPOSE, &id), session))
    }

    /// The live session a cookie value names, if its signature holds and it has not expired or ended.
    pub async fn find(&self, cookie: &str) -> Result<Option<Session>, sqlx::Error> {
        let Some(id) = self.verify(SESSION_PURPOSE, cookie) else { return Ok(None) };
        let row = sqlx::query(
            "SELECT id_sha256, kind, tenant_id, key_id, credential, csrf, expires_at FROM console_sessions \
             WHERE id_sha256 = $1 AND expires_at > $2",
        )
        .bind(sha256_hex(id))
        .bind(now_ms())
        .fetch_optional(self.db.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get("kind")?;
        let holder = match (kind.as_str(), row.try_get::<Option<String>, _>("tenant_id")?, row.try_get("key_id")?) {
            ("admin", _, _) => Holder::Admin,
            ("tenant", Some(tenant_id), Some(key_id)) => Holder::Tenant { tenant_id, key_id },
            _ => return Ok(None),
        };
        Ok(Some(Session {
            id_sha256: row.try_get("id_sha256")?,
            holder,
            credential: row.try_get("credential")?,
            csrf: row.try_get("csrf")?,
            expires_at: row.try_get("expires_at")?,
        }))
    }

    /// End a session (sign-out, or a session whose key or tenant no longer qualifies).
    pub async fn end(&self, id_sha256: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
            .bind(id_sha256.to_owned())
            .execute(self.db.pool())
            .await?;
        Ok(())
    }
}

/// What the session cookie's signature is made for (other signed values cannot stand in for it).
pub const SESSION_PURPOSE: &[u8] = b"console session";
/// What the sign-in form's token cookie is signed for.
pub const SIGN_IN_PURPOSE: &[u8] = b"console sign-in form";

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Constant-time equality of two tokens.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Failed sign-ins per client address: after `max_failures` in a row, each further attempt must wait
/// `lockout`, doubling with every failure up to an hour; a success forgets the address.
///
/// Per replica, unless [`Backoff::shared`] gives it the limits' Redis: then every replica behind one balancer
/// counts the same failures and enforces the same wait (keys `{prefix}:console:signin:{address}:…`; the count
/// is forgotten a day after the last failure). When Redis does not answer within its timeout, this replica
/// counts on its own until it does.
#[derive(Debug)]
pub struct Backoff {
    max_failures: u32,
    lockout: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    shared: Option<SharedFailures>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    until: Option<Instant>,
}

/// The longest wait.
const MAX_LOCKOUT: Duration = Duration::from_secs(3600);
/// Addresses remembered before the oldest are forgotten.
const MAX_TRACKED: usize = 10_000;
/// How long Redis remembers an address's failures after the last one.
const SHARED_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// The wait `count` failures earn: none below `max_failures`, then `lockout` doubling per failure.
fn wait_for(count: u32, max_failures: u32, lockout: Duration) -> Option<Duration> {
    if count < max_failures {
        return None;
    }
    let doublings = (count - max_failures).min(16);
    Some(lockout.saturating_mul(1 << doublings).min(MAX_LOCKOUT))
}

/// Count one failure (`KEYS[1]`, remembered for `ARGV[2]` ms) and, once it earns a wait (`ARGV[1]`: the
/// wait in ms per count, computed here from the same rule as the local counter), set the lock key
/// (`KEYS[2]`) for that long. Returns the new count. One script, so concurrent failures on several replicas
/// each count.
const FAIL_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local waits = cjson.decode(ARGV[1])
local wait = waits[math.min(n, #waits)]
if wait > 0 then redis.call('SET', KEYS[2], '1', 'PX', wait) end
return n
";

/// The failure counter in Redis.
struct SharedFailures {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    prefix: String,
    timeout: Duration,
    script: redis::Script,
}

impl std::fmt::Debug for SharedFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFailures").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SharedFailures {
    fn keys(&self, addr: IpAddr) -> (String, String) {
        let base = format!("{}:console:signin:{addr}", self.prefix);
        (format!("{base}:failures"), format!("{base}:locked"))
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, String> {
        let connect = || async {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(self.timeout)
                .set_number_of_retries(1);
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await.map_err(|e| e.to_string())
        };
        let conn = tokio::time::timeout(self.timeout, self.conn.get_or_try_init(connect))
            .await
            .map_err(|_| "Redis did not answer in time".to_owned())??;
        Ok(conn.clone())
    }

    /// Run `call` on a connection within the timeout.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, String>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        match tokio::time::timeout(self.timeout, call(conn)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("Redis did not answer in time".to_owned()),
        }
    }
}

impl Backoff {
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        Self { max_failures, lockout, failures: Mutex::default(), shared: None }
    }

    /// Count failures in the Redis at `url` (keys under `prefix`), shared by every replica using it.
    pub fn shared(self, url: &str, prefix: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}"))?;
        let shared = SharedFailures {
            client,
            conn: tokio::sync::OnceCell::new(),
            prefix: prefix.to_owned(),
            timeout,
            script: redis::Script::new(FAIL_SCRIPT),
        };
        Ok(Self { shared: Some(shared), ..self })
    }

    /// How long `addr` must still wait before trying again, if at all.
    pub async fn wait(&self, addr: IpAddr) -> Option<Duration> {
        if let Some(shared) = &self.shared {
            let (_, locked) = shared.keys(addr);
            match shared
                .run(|mut c| async move { redis::cmd("PTTL").arg(locked).query_async::<i64>(&mut c).await })
                .await
            {
                Ok(ms) if ms > 0 => return Some(Duration::from_millis(ms.unsigned_abs())),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "console sign-in back-off: Redis failed; counting on this replica")
                }
            }
        }
        let failures = self.failures.lock().ok()?;
        let until = failures.get(&addr)?.until?;
        until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    /// Count a failed sign-in from `addr`; returns the wait it now faces, if any.
    pub async fn fail(&self, addr: IpAddr) -> Option<Duration> {
        if let Some(shared) = &self.shared {
            // The wait each count earns, up to the count where it stops growing.
            let waits: Vec<u64> = (1..=self.max_failures.saturating_add(17))
                .map(|n| wait_for(n, self.max_failures, self.lockout).map_or(0, |w| w.as_millis() as u64))
                .collect();
            let waits = serde_json::to_string(&waits).unwrap_or_default();
            let (failures, locked) = shared.keys(addr);
            let memory = SHARED_MEMORY.as_millis() as u64;
            let script = &shared.script;
            let counted = shared
                .run(|mut c| async move {
                    script.key(failures).key(locked).arg(waits).arg(memory).invoke_async::<u32>(&mut c).await
                })
                .await;
            match counted {
                Ok(count) => return wait_for(count, self.max_failures, self.lockout),
                Err(e) => {
                    tracing::warn!(error = %e, "console sign-in back-off: Redis failed; counting on this replica")
                }
            }
        }
        let mut failures = self.failures.lock().ok()?;
        if failures.len() >= MAX_TRACKED {
            let now = Instant::now();
            failures.retain(|_, f| f.until.is_some_and(|u| u > now));
            if failures.len() >= MAX_TRACKED {
                failures.clear();
            }
        }
        let entry = failures.entry(addr).or_insert(Failures { count: 0, until: None });
        entry.count = entry.count.saturating_add(1);
        let wait = wait_for(entry.count, self.max_failures, self.lockout)?;
        entry.until = Some(Instant::now() + wait);
        Some(wait)
    }

    /// Forget `addr`'s failures after a successful sign-in.
    pub async fn succeed(&self, addr: IpAddr) {
        if let Some(shared) = &self.shared {
            let (failures, locked) = shared.keys(addr);
            let forgot = shared.run(|mut c| async move {
                redis::cmd("DEL").arg(failures).arg(locked).query_async::<()>(&mut c).await
            });
            if let Err(e) = forgot.await {
                tracing::warn!(error = %e, "console sign-in back-off: Redis failed");
            }
        }
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseSettings;

    async fn sessions() -> (Sessions, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseSettings::default(), dir.path()).await.unwrap();
        (Sessions::new(db, b"0123456789abcdef0123456789abcdef".to_vec(), Duration::from_secs(60)), dir)
    }

    #[tokio::test]
    async fn a_cookie_finds_its_session_and_an_altered_one_finds_nothing() {
        let (s, _dir) = sessions().await;
        let holder = Holder::Tenant { tenant_id: "t1".into(), key_id: "abcd1234".into() };
        let (cookie, opened) = s.open(holder.clone(), String::new()).await.unwrap();
        let found = s.find(&cookie).await.unwrap().unwrap();
        assert_eq!((found.holder, found.csrf), (holder, opened.csrf));
        let (id, sig) = cookie.rsplit_once('.').unwrap();
        let mut other_id = id.to_owned();
        other_id.replace_range(0..1, if id.starts_with('A') { "B" } else { "A" });
        for forged in [format!("{other_id}.{sig}"), id.to_owned(), format!("{id}.{}", &sig[1..]), String::new()] {
            assert!(s.find(&forged).await.unwrap().is_none(), "{forged}");
        }
        let other_key = Sessions::new(s.db.clone(), b"another key of thirty-two bytes!".to_vec(), s.ttl);
        assert!(other_key.find(&cookie).await.unwrap().is_none(), "signed with another key");
        s.end(&found.id_sha256).await.unwrap();
        assert!(s.find(&cookie).await.unwrap().is_none(), "signed out");
    }

    #[tokio::test]
    async fn an_expired_session_is_not_found() {
        let (mut s, _dir) = sessions().await;
        s.ttl = Duration::from_millis(1);
        let (cookie, _) = s.open(Holder::Admin, "c".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(s.find(&cookie).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn failed_sign_ins_back_off_doubling_and_a_success_forgets_them() {
        let b = Backoff::new(3, Duration::from_secs(10));
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(b.fail(addr).await, None);
        assert_eq!(b.fail(addr).await, None);
        assert!(b.wait(addr).await.is_none());
        assert_eq!(b.fail(addr).await, Some(Duration::from_secs(10)));
        assert!(b.wait(addr).await.is_some());
        assert_eq!(b.fail(addr).await, Some(Duration::from_secs(20)));
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(b.wait(other).await.is_none(), "per address");
        b.succeed(addr).await;
        assert!(b.wait(addr).await.is_none());
        for _ in 0..40 {
            b.fail(addr).await;
        }
        assert_eq!(b.wait(addr).await.map(|d| d <= MAX_LOCKOUT), Some(true));
    }
}
