//! The Redis backend: limits shared by every replica, decided by one atomic Lua script per request.
//!
//! `reserve.lua` reads Redis' clock (`TIME`), checks every bucket, the concurrency slots and the budgets of
//! the tenant, and writes only if all of them pass: the same arithmetic and order as `limits::local`
//! (`gcra`), so a tenant gets exactly its allowance across all replicas. One `EVALSHA` per request (EVAL
//! when Redis lost the script). Budget counters start from the usage ledger: the script reports a missing
//! counter (first request of a window, Redis restarted or evicted it), the backend seeds it with
//! `SET NX` from `ledger::report::spent_since` and runs the script again; in steady state there is no
//! database query. Every Redis call is bounded by the configured timeout and fails as a [`BackendError`],
//! which the caller turns into fail-open or fail-closed.
//!
//! Keys, all of one tenant in one Redis Cluster hash slot (`{tenant}` is a hash tag):
//! `{prefix}:{tenant}:rpm` and `:ipm` (bucket TATs in ms), `:conc` (in-flight leases), `:img:d:{day_start}`,
//! `:img:m:{month_start}`, `:usd:d:{day_start}`, `:usd:m:{month_start}` (budget counters).

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};

use super::{Backend, BackendError, BucketReport, Demand, Grant, Reason, Refusal, Report, windows};
use crate::db::Db;
use crate::tenants::Limits;

const DAY_MS: u64 = 86_400_000;

/// How long a concurrency slot is held when nobody releases it (a replica died, a reply was lost to a
/// timeout): longer than the default `server.request_timeout` (11 min).
const DEFAULT_SLOT_LEASE: Duration = Duration::from_secs(15 * 60);

/// Database queries that seed budgets get at least this long (they run once per tenant and window).
const MIN_SEED_TIMEOUT: Duration = Duration::from_secs(2);

/// Gives a concurrency slot back: forget expired leases, then pop the oldest one (never below zero).
const RELEASE_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZPOPMIN', KEYS[1])
return redis.call('ZCARD', KEYS[1])
";

/// Adds spending to USD counters that exist; a missing one is seeded from the ledger by the next reserve.
const SPEND_LUA: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('INCRBYFLOAT', key, ARGV[1])
  end
end
return 0
";

/// Limits kept in Redis, shared by every replica that uses the same Redis and prefix.
pub struct RedisBackend {
    conn: ConnectionManager,
    reserve: Script,
    release: Script,
    spend: Script,
    prefix: String,
    timeout: Duration,
    slot_lease: Duration,
    db: Db,
}

/// The script's answer, as numbers (see the table atop `reserve.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    /// 1 granted, 0 refused, -1 a budget counter must be seeded.
    status: i64,
    reason: i64,
    /// -1 none, -2 never.
    retry_after_ms: i64,
    /// (remaining, reset ms) of the request bucket, -1 when absent.
    requests: (i64, i64),
    images: (i64, i64),
    /// Redis' clock when the script ran.
    now_ms: i64,
}

impl Outcome {
    fn parse(raw: &[i64]) -> Result<Self, BackendError> {
        match *raw {
            [status, reason, retry_after_ms, rr, rs, ir, is, now_ms] => {
                Ok(Self { status, reason, retry_after_ms, requests: (rr, rs), images: (ir, is), now_ms })
            }
            _ => Err(BackendError(format!("unexpected answer from the Redis limits script: {raw:?}"))),
        }
    }

    fn decision(&self, limits: &Limits) -> Result<Result<Grant, Refusal>, BackendError> {
        let bucket = |limit: Option<u32>, (remaining, reset): (i64, i64)| {
            limit.map(|l| BucketReport {
                limit: u64::from(l),
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset_ms: u64::try_from(reset).unwrap_or(0),
            })
        };
        let report = Report {
            requests: bucket(limits.requests_per_minute, self.requests),
            images: bucket(limits.images_per_minute, self.images),
        };
        match self.status {
            1 => Ok(Ok(Grant { report, holds_slot: limits.concurrent_requests.is_some() })),
            0 => {
                let reason = match self.reason {
                    1 => Reason::RequestsPerMinute,
                    2 => Reason::ImagesPerMinute,
                    3 => Reason::Concurrency,
                    4 => Reason::ImagesPerDay,
                    5 => Reason::ImagesPerMonth,
                    6 => Reason::UsdPerDay,
                    7 => Reason::UsdPerMonth,
                    other => return Err(BackendError(format!("unknown refusal code {other} from Redis"))),
                };
                let retry_after_ms = match self.retry_after_ms {
                    -2 => Some(u64::MAX),
                    ms => u64::try_from(ms).ok(),
                };
                Ok(Err(Refusal { reason, retry_after_ms, report }))
            }
            other => Err(BackendError(format!("unexpected status {other} from the Redis limits script"))),
        }
    }
}

/// The seven keys of one decision, in the order of `reserve.lua`'s KEYS.
struct Keys {
    requests: String,
    images: String,
    slots: String,
    images_day: String,
    images_month: String,
    usd_day: String,
    usd_month: String,
}

/// The UTC day and month a decision falls in: (start, end) of each, Unix ms.
#[derive(Debug, Clone, Copy)]
struct Windows {
    day: (u64, u64),
    month: (u64, u64),
}

impl Windows {
    /// From the local clock: bucket timing uses Redis' clock inside the script, but the budget windows only
    /// name keys, and their edges at midnight UTC tolerate the small skew between replicas and Redis.
    fn now() -> Self {
        let (day_start, day_end, month_start, month_end) = windows(local_now());
        Self { day: (day_start, day_end), month: (month_start, month_end) }
    }
}

fn local_now() -> u64 {
    u64::try_from(crate::db::now_ms()).unwrap_or(0)
}

/// A number for a script argument; absent limits are the empty string.
fn opt<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl RedisBackend {
    /// Connect to `url` (within `timeout`) and load the scripts. Keys start with `prefix`; `db` is the usage
    /// ledger budgets are seeded from.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration, db: Db) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_factor(50)
            .set_max_delay(500);
        let conn = match tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => anyhow::bail!("cannot connect to Redis: {e}"),
            Err(_) => anyhow::bail!("Redis did not answer within {timeout:?}"),
        };
        let backend = Self {
            conn,
            reserve: Script::new(include_str!("reserve.lua")),
            release: Script::new(RELEASE_LUA),
            spend: Script::new(SPEND_LUA),
            prefix: prefix.to_owned(),
            timeout,
            slot_lease: DEFAULT_SLOT_LEASE,
            db,
        };
        // Loading now fails early on a Redis without scripting, and saves the first request a round trip.
        for script in [&backend.reserve, &backend.release, &backend.spend] {
            let mut conn = backend.conn.clone();
            backend.bounded("SCRIPT LOAD", script.load_async(&mut conn)).await?;
        }
        Ok(backend)
    }

    /// How long an unreleased concurrency slot lives (default 15 min); keep it above the longest request.
    pub fn with_slot_lease(mut self, lease: Duration) -> Self {
        self.slot_lease = lease.max(Duration::from_secs(1));
        self
    }

    /// Whether Redis answers within the timeout (for readiness probes).
    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        self.bounded("PING", redis::cmd("PING").query_async::<String>(&mut conn)).await.map(|_| ())
    }

    /// Run one Redis call within the timeout.
    async fn bounded<T>(&self, what: &str, call: impl Future<Output = RedisResult<T>>) -> Result<T, BackendError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(BackendError(format!("Redis {what} failed: {e}"))),
            Err(_) => Err(BackendError(format!("Redis {what} timed out after {:?}", self.timeout))),
        }
    }

    /// `{prefix}:{tenant}` with the tenant as a hash tag.
    fn base(&self, tenant_id: &str) -> String {
        format!("{}:{{{tenant_id}}}", self.prefix)
    }

    fn keys(&self, tenant_id: &str, w: Windows) -> Keys {
        let base = self.base(tenant_id);
        Keys {
            requests: format!("{base}:rpm"),
            images: format!("{base}:ipm"),
            slots: format!("{base}:conc"),
            images_day: format!("{base}:img:d:{}", w.day.0),
            images_month: format!("{base}:img:m:{}", w.month.0),
            usd_day: format!("{base}:usd:d:{}", w.day.0),
            usd_month: format!("{base}:usd:m:{}", w.month.0),
        }
    }

    /// Check and reserve, seeding budget counters from the ledger when the script asks for it.
    async fn decide(&self, tenant_id: &str, limits: &Limits, demand: Demand) -> Result<Outcome, BackendError> {
        let w = Windows::now();
        let keys = self.keys(tenant_id, w);
        let outcome = self.run(&keys, limits, demand, w, false).await?;
        if outcome.status != -1 {
            return Ok(outcome);
        }
        self.seed(tenant_id, limits, &keys, w).await?;
        self.run(&keys, limits, demand, w, true).await
    }

    /// One `EVALSHA` of `reserve.lua`.
    async fn run(
        &self,
        keys: &Keys,
        limits: &Limits,
        demand: Demand,
        w: Windows,
        allow_missing: bool,
    ) -> Result<Outcome, BackendError> {
        let mut call = self.reserve.prepare_invoke();
        call.key(&keys.requests)
            .key(&keys.images)
            .key(&keys.slots)
            .key(&keys.images_day)
            .key(&keys.images_month)
            .key(&keys.usd_day)
            .key(&keys.usd_month)
            .arg(opt(limits.requests_per_minute))
            .arg(opt(limits.requests_burst.or(limits.requests_per_minute)))
            .arg(opt(limits.images_per_minute))
            .arg(opt(limits.images_burst.or(limits.images_per_minute)))
            .arg(opt(limits.concurrent_requests))
            .arg(opt(limits.images_per_day))
            .arg(opt(limits.images_per_month))
            .arg(opt(limits.usd_per_day))
            .arg(opt(limits.usd_per_month))
            .arg(demand.images)
            // Budget counters outlive their window by a day (late spending still lands in the right key).
            .arg(w.day.1 + DAY_MS)
            .arg(w.month.1 + DAY_MS)
            .arg(u64::try_from(self.slot_lease.as_millis()).unwrap_or(u64::MAX))
            .arg(if allow_missing { "1" } else { "0" })
            .arg(hex::encode(rand::random::<[u8; 8]>()));
        let mut conn = self.conn.clone();
        let raw: Vec<i64> = self.bounded("limits script", call.invoke_async(&mut conn)).await?;
        Outcome::parse(&raw)
    }

    /// Create the tenant's budget counters that do not exist yet from the ledger (`SET NX`: a counter another
    /// replica created meanwhile wins).
    async fn seed(&self, tenant_id: &str, limits: &Limits, keys: &Keys, w: Windows) -> Result<(), BackendError> {
        let now = local_now();
        let mut pipe = redis::pipe();
        let windows = [
            (w.day, limits.images_per_day.is_some(), limits.usd_per_day.is_some(), &keys.images_day, &keys.usd_day),
            (
                w.month,
                limits.images_per_month.is_some(),
                limits.usd_per_month.is_some(),
                &keys.images_month,
                &keys.usd_month,
            ),
        ];
        for ((start, end), images_budget, usd_budget, images_key, usd_key) in windows {
            if !images_budget && !usd_budget {
                continue;
            }
            let (images, usd) = self.spent_since(tenant_id, start).await?;
            let ttl = (end + DAY_MS).saturating_sub(now).max(1);
            if images_budget {
                pipe.cmd("SET").arg(images_key).arg(images).arg("NX").arg("PX").arg(ttl).ignore();
            }
            if usd_budget {
                pipe.cmd("SET").arg(usd_key).arg(usd.to_string()).arg("NX").arg("PX").arg(ttl).ignore();
            }
            tracing::debug!(
                tenant = tenant_id,
                window_start = start,
                images,
                usd,
                "seeding Redis budgets from the ledger"
            );
        }
        let mut conn = self.conn.clone();
        self.bounded("budget seeding", pipe.query_async::<()>(&mut conn)).await
    }

    async fn spent_since(&self, tenant_id: &str, from_ms: u64) -> Result<(u64, f64), BackendError> {
        let limit = self.timeout.max(MIN_SEED_TIMEOUT);
        match tokio::time::timeout(limit, crate::ledger::report::spent_since(&self.db, tenant_id, to_i64(from_ms)))
            .await
        {
            Ok(Ok(spent)) => Ok(spent),
            Ok(Err(e)) => Err(BackendError(format!("cannot read budgets from the ledger: {e}"))),
            Err(_) => Err(BackendError(format!("reading budgets from the ledger took over {limit:?}"))),
        }
    }
}

impl Backend for RedisBackend {
    fn reserve<'a>(
        &'a self,
        tenant_id: &'a str,
        limits: &'a Limits,
        demand: Demand,
    ) -> BoxFuture<'a, Result<Result<Grant, Refusal>, BackendError>> {
        Box::pin(async move { self.decide(tenant_id, limits, demand).await?.decision(limits) })
    }

    fn release<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let key = format!("{}:conc", self.base(tenant_id));
            let mut call = self.release.prepare_invoke();
            call.key(&key);
            let mut conn = self.conn.clone();
            if let Err(e) = self.bounded("release", call.invoke_async::<i64>(&mut conn)).await {
                tracing::warn!(tenant = tenant_id, error = %e, "concurrency slot not released; its lease will expire");
            }
        })
    }

    fn spend<'a>(&'a self, tenant_id: &'a str, usd: f64) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if !usd.is_finite() || usd <= 0.0 {
                return;
            }
            let keys = self.keys(tenant_id, Windows::now());
            let mut call = self.spend.prepare_invoke();
            call.key(&keys.usd_day).key(&keys.usd_month).arg(usd.to_string());
            let mut conn = self.conn.clone();
            if let Err(e) = self.bounded("spend", call.invoke_async::<i64>(&mut conn)).await {
                tracing::warn!(tenant = tenant_id, usd, error = %e, "spending not added to the Redis USD budgets");
            }
        })
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::config::{DatabaseSettings, Secret};
    use crate::limits::gcra::{self, Bucket};

    const REDIS: &str = "redis://127.0.0.1:6379";
    const TIMEOUT: Duration = Duration::from_millis(300);

    /// A backend on the real Redis with a prefix of its own, and the SQLite ledger budgets are seeded from.
    struct Fixture {
        backend: RedisBackend,
        db: Db,
        prefix: String,
        _dir: tempfile::TempDir,
    }

    async fn ledger() -> (Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let settings = DatabaseSettings { url: Some(Secret::new(url)), ..Default::default() };
        let db = Db::connect(&settings, dir.path()).await.unwrap();
        (db, dir)
    }

    async fn fixture() -> Fixture {
        let (db, dir) = ledger().await;
        let prefix = format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()));
        let backend = RedisBackend::connect(REDIS, &prefix, Duration::from_secs(2), db.clone())
            .await
            .expect("Redis must run on 127.0.0.1:6379 for these tests");
        Fixture { backend, db, prefix, _dir: dir }
    }

    impl Fixture {
        async fn reserve(&self, limits: &Limits, n: u32) -> Result<Grant, Refusal> {
            self.backend.reserve("t1", limits, Demand { images: n }).await.unwrap()
        }

        /// A second replica: another connection on the same Redis, prefix and ledger.
        async fn replica(&self) -> RedisBackend {
            RedisBackend::connect(REDIS, &self.prefix, Duration::from_secs(2), self.db.clone()).await.unwrap()
        }
    }

    #[tokio::test]
    async fn requests_per_minute_grant_exactly_the_limit_then_refuse_with_retry_after() {
        let f = fixture().await;
        let limits = Limits { requests_per_minute: Some(5), ..Limits::default() };
        for remaining in [4, 3, 2, 1, 0] {
            let grant = f.reserve(&limits, 1).await.unwrap();
            let report = grant.report.requests.unwrap();
            assert_eq!((report.limit, report.remaining), (5, remaining));
            assert!(!grant.holds_slot);
            assert_eq!(grant.report.images, None);
        }
        let refused = f.reserve(&limits, 1).await.unwrap_err();
        assert_eq!(refused.reason, Reason::RequestsPerMinute);
        let retry = refused.retry_after_ms.unwrap();
        assert!((10_000..=12_000).contains(&retry), "one request every 12 s: {retry}");
        let report = refused.report.requests.unwrap();
        assert_eq!(report.remaining, 0);
        assert!((58_000..=60_000).contains(&report.reset_ms), "{report:?}");
    }

    #[tokio::test]
    async fn images_are_weighted_and_a_refusal_spends_nothing_elsewhere() {
        let f = fixture().await;
        let limits = Limits { requests_per_minute: Some(10), images_per_minute: Some(10), ..Limits::default() };
        assert_eq!(f.reserve(&limits, 4).await.unwrap().report.images.unwrap().remaining, 6);
        let second = f.reserve(&limits, 4).await.unwrap().report;
        assert_eq!((second.images.unwrap().remaining, second.requests.unwrap().remaining), (2, 8));
        let refused = f.reserve(&limits, 4).await.unwrap_err();
        assert_eq!(refused.reason, Reason::ImagesPerMinute);
        assert!((10_000..=12_000).contains(&refused.retry_after_ms.unwrap()), "{refused:?}");
        assert_eq!(refused.report.requests.unwrap().remaining, 8, "the refused request spent no request");
        assert_eq!(refused.report.images.unwrap().remaining, 2);
        let never = f.reserve(&limits, 11).await.unwrap_err();
        assert_eq!((never.reason, never.retry_after_ms), (Reason::ImagesPerMinute, Some(u64::MAX)));
        let cached = f.reserve(&limits, 0).await.unwrap().report;
        assert_eq!(cached.requests.unwrap().remaining, 7, "a cached answer spends a request, no image");
        assert_eq!(cached.images.unwrap().remaining, 2);
    }

    #[tokio::test]
    async fn concurrency_slots_are_held_until_released_and_never_go_below_zero() {
        let f = fixture().await;
        let limits = Limits { concurrent_requests: Some(2), ..Limits::default() };
        f.backend.release("t1").await; // nothing held: a no-op, not -1
        assert!(f.reserve(&limits, 1).await.unwrap().holds_slot);
        assert!(f.reserve(&limits, 1).await.unwrap().holds_slot);
        let refused = f.reserve(&limits, 1).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::Concurrency, Some(1000)));
        f.backend.release("t1").await;
        assert!(f.reserve(&limits, 1).await.is_ok());
        assert!(f.reserve(&limits, 1).await.is_err());
    }

    #[tokio::test]
    async fn unreleased_slots_expire_with_their_lease() {
        let f = fixture().await;
        let backend = f.replica().await.with_slot_lease(Duration::from_secs(1));
        let limits = Limits { concurrent_requests: Some(1), ..Limits::default() };
        assert!(backend.reserve("t1", &limits, Demand { images: 1 }).await.unwrap().is_ok());
        assert!(backend.reserve("t1", &limits, Demand { images: 1 }).await.unwrap().is_err());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(backend.reserve("t1", &limits, Demand { images: 1 }).await.unwrap().is_ok(), "the lease lapsed");
    }

    #[tokio::test]
    async fn daily_image_budget_refuses_whole_requests() {
        let f = fixture().await;
        let limits = Limits { images_per_day: Some(5), images_per_month: Some(100), ..Limits::default() };
        assert!(f.reserve(&limits, 3).await.is_ok());
        let refused = f.reserve(&limits, 3).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::ImagesPerDay, None));
        assert!(f.reserve(&limits, 2).await.is_ok(), "exactly the budget fits");
        assert_eq!(f.reserve(&limits, 1).await.unwrap_err().reason, Reason::ImagesPerDay);
        let month = Limits { images_per_month: Some(6), ..Limits::default() };
        assert_eq!(f.reserve(&month, 2).await.unwrap_err().reason, Reason::ImagesPerMonth, "5 of 6 spent");
    }

    #[tokio::test]
    async fn usd_budget_refuses_once_spent() {
        let f = fixture().await;
        let limits = Limits { usd_per_day: Some(1.0), ..Limits::default() };
        assert!(f.reserve(&limits, 1).await.is_ok());
        f.backend.spend("t1", 0.6).await;
        assert!(f.reserve(&limits, 1).await.is_ok(), "0.6 of 1.0 spent");
        f.backend.spend("t1", 0.4).await;
        let refused = f.reserve(&limits, 1).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::UsdPerDay, None));
        let monthly = Limits { usd_per_month: Some(1.5), ..Limits::default() };
        assert!(f.reserve(&monthly, 1).await.is_ok(), "the month counter was seeded separately");
    }

    #[tokio::test]
    async fn budgets_start_from_the_ledger_and_are_reseeded_when_redis_loses_them() {
        let f = fixture().await;
        let now = crate::db::now_ms();
        for (i, (images, usd)) in [(2_i64, 0.25_f64), (1, 0.5)].into_iter().enumerate() {
            sqlx::query(
                "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
                 images_requested, images_returned, cost_usd, status, latency_ms, stream, cache_hit) \
                 VALUES ($1, $2, 't1', 'k', 'generations', 'gpt-image-1', $3, $3, $4, 200, 5, 0, 0)",
            )
            .bind(format!("r{i}"))
            .bind(now)
            .bind(images)
            .bind(usd)
            .execute(f.db.pool())
            .await
            .unwrap();
        }
        let limits = Limits { images_per_day: Some(5), usd_per_day: Some(1.0), ..Limits::default() };
        assert!(f.reserve(&limits, 2).await.is_ok(), "3 from the ledger + 2 = 5");
        assert_eq!(f.reserve(&limits, 1).await.unwrap_err().reason, Reason::ImagesPerDay);

        // Redis forgets (restart, eviction): the ledger is read again instead of starting from zero.
        let keys = f.backend.keys("t1", Windows::now());
        let mut conn = f.backend.conn.clone();
        redis::cmd("DEL").arg(&keys.images_day).query_async::<()>(&mut conn).await.unwrap();
        assert_eq!(f.reserve(&limits, 3).await.unwrap_err().reason, Reason::ImagesPerDay, "3 + 3 > 5");
        assert!(f.reserve(&limits, 2).await.is_ok());
        f.backend.spend("t1", 0.25).await;
        assert_eq!(f.reserve(&limits, 0).await.unwrap_err().reason, Reason::UsdPerDay, "0.75 + 0.25 spent");
    }

    #[tokio::test]
    async fn the_script_agrees_with_gcra_check() {
        let f = fixture().await;
        let (rpm, ipm) = (Bucket::per_minute(7, Some(3)), Bucket::per_minute(13, None));
        let limits = Limits {
            requests_per_minute: Some(7),
            requests_burst: Some(3),
            images_per_minute: Some(13),
            ..Limits::default()
        };
        let (mut requests_tat, mut images_tat) = (0, 0);
        let (mut granted, mut reasons) = (0, std::collections::BTreeSet::new());
        for i in 0..40_u32 {
            let n = (i * 7 + 3) % 16; // 0..=15: some demands exceed the burst of 13
            let outcome = f.backend.decide("t1", &limits, Demand { images: n }).await.unwrap();
            let now = u64::try_from(outcome.now_ms).unwrap();
            let (fits, v) = gcra::check_all(&[(rpm, requests_tat, 1), (ipm, images_tat, u64::from(n))], now);
            let as_i64 = |x: u64| i64::try_from(x).unwrap();
            assert_eq!(outcome.status, i64::from(fits), "demand {i} (n={n})");
            assert_eq!(outcome.requests, (as_i64(v[0].remaining), as_i64(v[0].reset_ms)), "demand {i}");
            assert_eq!(outcome.images, (as_i64(v[1].remaining), as_i64(v[1].reset_ms)), "demand {i}");
            let retry = v.iter().find_map(|v| v.retry_after_ms);
            let expected = match retry {
                None => -1,
                Some(u64::MAX) => -2,
                Some(ms) => as_i64(ms),
            };
            assert_eq!(outcome.retry_after_ms, expected, "demand {i}");
            let reason = v.iter().position(|v| v.retry_after_ms.is_some()).map_or(0, |p| p + 1);
            assert_eq!(outcome.reason, i64::try_from(reason).unwrap(), "demand {i}");
            reasons.insert(outcome.reason);
            if fits {
                granted += 1;
                (requests_tat, images_tat) = (v[0].new_tat, v[1].new_tat);
            }
        }
        assert!(granted >= 3, "{granted} granted");
        assert_eq!(reasons, std::collections::BTreeSet::from([0, 1, 2]), "grants and refusals by both buckets");
    }

    #[tokio::test]
    async fn two_replicas_share_one_allowance() {
        let f = fixture().await;
        let other = Arc::new(f.replica().await);
        let this = Arc::new(f.replica().await);
        let limits = Arc::new(Limits { requests_per_minute: Some(20), ..Limits::default() });
        let mut tasks = Vec::new();
        for i in 0..60 {
            let backend = if i % 2 == 0 { this.clone() } else { other.clone() };
            let limits = limits.clone();
            tasks.push(tokio::spawn(async move {
                backend.reserve("t1", &limits, Demand { images: 1 }).await.unwrap().is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 20);
    }

    #[tokio::test]
    async fn unreachable_redis_fails_within_the_timeout() {
        let (db, _dir) = ledger().await;
        let started = Instant::now();
        assert!(RedisBackend::connect("redis://127.0.0.1:1", "x", TIMEOUT, db.clone()).await.is_err());
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(200), "{:?}", started.elapsed());

        // A server that accepts connections and never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", silent.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let started = Instant::now();
        assert!(RedisBackend::connect(&url, "x", TIMEOUT, db).await.is_err());
        assert!(started.elapsed() < TIMEOUT + Duration::from_millis(200), "{:?}", started.elapsed());
    }

    /// A TCP proxy to the real Redis that can be told to swallow everything from then on.
    async fn freezable_proxy() -> (String, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                tokio::spawn(async move {
                    let server = TcpStream::connect("127.0.0.1:6379").await.unwrap();
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
                    let mut buf = vec![0_u8; 16 * 1024];
                    while let Ok(read @ 1..) = from_client.read(&mut buf).await {
                        if !flag.load(Ordering::SeqCst) && to_server.write_all(&buf[..read]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, frozen)
    }

    #[tokio::test]
    async fn a_redis_that_stops_answering_fails_every_call_within_the_timeout() {
        let (db, _dir) = ledger().await;
        let (url, frozen) = freezable_proxy().await;
        let prefix = format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()));
        let backend = RedisBackend::connect(&url, &prefix, TIMEOUT, db).await.unwrap();
        let limits = Limits { requests_per_minute: Some(5), concurrent_requests: Some(1), ..Limits::default() };
        assert!(backend.reserve("t1", &limits, Demand { images: 1 }).await.unwrap().is_ok());
        assert!(backend.ping().await.is_ok());

        frozen.store(true, Ordering::SeqCst);
        let bound = TIMEOUT + Duration::from_millis(200);
        let started = Instant::now();
        let err = backend.reserve("t1", &limits, Demand { images: 1 }).await.unwrap_err();
        assert!(started.elapsed() < bound, "{:?}", started.elapsed());
        assert!(err.0.contains("timed out"), "{err}");
        let started = Instant::now();
        backend.release("t1").await;
        backend.spend("t1", 1.0).await;
        assert!(backend.ping().await.is_err());
        assert!(started.elapsed() < bound * 3, "{:?}", started.elapsed());
    }
}
