//! The Redis backend: limits shared by every replica, decided by atomic Lua scripts on Redis' clock.
//!
//! `reserve.lua` checks every bucket, the concurrency slots and the budgets of the tenant, and writes only if
//! all of them pass: the same arithmetic and order as `limits::local` (`gcra`), so a tenant gets exactly its
//! allowance across all replicas. What a reservation holds (its slot, its images and USD against the budgets)
//! is a *lease* (`lease.lua`), dropped by `finish.lua` when the request ends, renewed while a long request runs,
//! and lapsing on its own when its replica died. One `EVALSHA` per decision and one per settlement (EVAL when
//! Redis lost the script).
//!
//! Budget counters start from the usage ledger: the script reports a missing counter (first request of a
//! window, Redis restarted or evicted it), the backend seeds it with `SET NX` from
//! `ledger::report::spent_since` and runs the script again; in steady state there is no database query.
//!
//! Every Redis call is bounded by the configured timeout and fails as a [`BackendError`], which the limiter
//! turns into fail-open or fail-closed. A reservation whose answer was lost (a timeout) may still run in Redis
//! later: a compensating `cancel` drops its lease, or leaves a tombstone that stops it from taking anything.
//! The connection is made in the background: an unreachable Redis at startup is a backend error per request
//! (the policy applies), never a failed start or a hang.
//!
//! Keys, all of one tenant in one Redis Cluster hash slot (`{tenant}` is a hash tag): `{prefix}:{tenant}:rpm`
//! and `:ipm` (bucket TATs in ms), `:leases`, `:lease`, `:held` (reservations in flight), `:img:d:{day_start}`,
//! `:img:m:{month_start}`, `:usd:d:{day_start}`, `:usd:m:{month_start}` (spending counters).

use std::future::Future;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};

use super::gcra::Bucket;
use super::{Backend, BackendError, Demand, Grant, Held, Reason, Refusal, Usage};
use crate::db::Db;
use crate::domain::Limits;
use crate::domain::{BucketReport, Report};
use crate::ledger::Unwritten;
use crate::time::windows;

const DAY_MS: u64 = 86_400_000;

/// Database queries that seed budgets get at least this long (they run once per tenant and window).
const MIN_SEED_TIMEOUT: Duration = Duration::from_secs(2);

/// Backoff between connection attempts while Redis cannot be reached.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

const PRELUDE: &str = include_str!("lease.lua");

/// A reservation whose answer was lost: drop its lease, and leave a tombstone so that, should it still run,
/// it takes nothing. ARGV: 1 id, 2 lease (ms).
const CANCEL_LUA: &str = r"
undo(ARGV[1])
redis.call('HSET', DATA, ARGV[1], 'cancelled')
redis.call('ZADD', LEASES, int(now + tonumber(ARGV[2])), ARGV[1])
keep(tonumber(ARGV[2]))
return 1
";

/// Renew a running reservation's lease. ARGV: 1 id, 2 lease (ms).
const REFRESH_LUA: &str = r"
if redis.call('ZSCORE', LEASES, ARGV[1]) then
  redis.call('ZADD', LEASES, 'XX', int(now + tonumber(ARGV[2])), ARGV[1])
  keep(tonumber(ARGV[2]))
  return 1
end
return 0
";

/// Limits kept in Redis, shared by every replica that uses the same Redis and prefix.
pub struct RedisBackend {
    inner: Arc<Inner>,
    connector: tokio::task::AbortHandle,
}

struct Inner {
    /// Set once the first connection succeeded; the manager reconnects on its own after that.
    conn: OnceLock<ConnectionManager>,
    scripts: Scripts,
    prefix: String,
    timeout: Duration,
    lease: Duration,
    db: Db,
    /// This process's usage rows not written to `db` yet, added to what a seed reads from it.
    unwritten: OnceLock<Arc<Unwritten>>,
}

struct Scripts {
    reserve: Script,
    finish: Script,
    cancel: Script,
    refresh: Script,
}

/// The reserve script's answer, as numbers (see the table atop `reserve.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    /// 1 granted, 0 refused (or peeked), -1 a budget counter must be seeded, -3 cancelled.
    status: i64,
    reason: i64,
    /// -1 none, -2 never.
    retry_after_ms: i64,
    /// (remaining, reset ms) of the request bucket, -1 when absent.
    requests: (i64, i64),
    images: (i64, i64),
    /// Redis' clock when the script ran.
    now_ms: i64,
    slot: bool,
}

impl Outcome {
    fn parse(raw: &[i64]) -> Result<Self, BackendError> {
        match *raw {
            [status, reason, retry_after_ms, rr, rs, ir, is, now_ms, slot] => Ok(Self {
                status,
                reason,
                retry_after_ms,
                requests: (rr, rs),
                images: (ir, is),
                now_ms,
                slot: slot == 1,
            }),
            _ => Err(BackendError(format!("unexpected answer from the Redis limits script: {raw:?}"))),
        }
    }

    fn report(&self, limits: &Limits) -> Report {
        let bucket = |limit: Option<u32>, (remaining, reset): (i64, i64)| {
            limit.map(|l| BucketReport {
                limit: u64::from(l),
                remaining: u64::try_from(remaining).unwrap_or(0),
                reset_ms: u64::try_from(reset).unwrap_or(0),
            })
        };
        Report {
            requests: bucket(limits.requests_per_minute, self.requests),
            images: bucket(limits.images_per_minute, self.images),
        }
    }

    fn decision(&self, limits: &Limits, demand: Demand) -> Result<Result<Grant, Refusal>, BackendError> {
        let report = self.report(limits);
        match self.status {
            1 => Ok(Ok(Grant { report, holds_slot: self.slot })),
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
                let never = (self.retry_after_ms == -2).then(|| match reason {
                    Reason::RequestsPerMinute => {
                        (1, u64::from(limits.requests_burst.or(limits.requests_per_minute).unwrap_or(0)))
                    }
                    _ => (
                        u64::from(demand.images),
                        u64::from(limits.images_burst.or(limits.images_per_minute).unwrap_or(0)),
                    ),
                });
                let retry_after_ms = u64::try_from(self.retry_after_ms).ok();
                Ok(Err(Refusal { reason, retry_after_ms, never, report }))
            }
            -3 => Err(BackendError("the reservation was cancelled after a lost answer".to_owned())),
            other => Err(BackendError(format!("unexpected status {other} from the Redis limits script"))),
        }
    }
}

/// The nine keys of every script, in the order of `lease.lua`'s KEYS.
struct Keys([String; 9]);

/// The UTC day and month a decision falls in: (start, end) of each, Unix ms.
#[derive(Debug, Clone, Copy)]
struct Windows {
    day: (u64, u64),
    month: (u64, u64),
}

impl Windows {
    /// From the local clock: bucket timing uses Redis' clock inside the scripts, but the budget windows only
    /// name keys, and their edges at midnight UTC follow the ledger's timestamps, which use the same clock.
    fn now() -> Self {
        let (day_start, day_end, month_start, month_end) = windows(local_now());
        Self { day: (day_start, day_end), month: (month_start, month_end) }
    }
}

fn local_now() -> u64 {
    u64::try_from(crate::time::now_ms()).unwrap_or(0)
}

/// A number for a script argument; absent limits are the empty string.
fn opt<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisBackend {
    /// Start connecting to `url` in the background (only an unparsable URL fails here). Keys start with
    /// `prefix`; every call waits at most `timeout`; an unfinished reservation's holds lapse after `lease`
    /// unless renewed; `db` is the usage ledger budgets are seeded from.
    pub fn start(url: &str, prefix: &str, timeout: Duration, lease: Duration, db: Db) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid Redis URL: {e}"))?;
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        let inner = Arc::new(Inner {
            conn: OnceLock::new(),
            scripts: Scripts {
                reserve: script(include_str!("reserve.lua")),
                finish: script(include_str!("finish.lua")),
                cancel: script(CANCEL_LUA),
                refresh: script(REFRESH_LUA),
            },
            prefix: prefix.to_owned(),
            timeout,
            lease: lease.max(Duration::from_secs(1)),
            db,
            unwritten: OnceLock::new(),
        });
        let connector = tokio::spawn(connect_until_connected(Arc::downgrade(&inner), client)).abort_handle();
        Ok(Self { inner, connector })
    }

    /// Seed budget counters from the ledger *plus* this process's rows still queued for it (`ledger`'s
    /// writer is asynchronous: without them a counter seeded right after a burst of spending would miss it).
    #[must_use]
    pub fn counting_unwritten(self, unwritten: Arc<Unwritten>) -> Self {
        let _ = self.inner.unwritten.set(unwritten);
        self
    }

    /// Wait up to `within` for the first connection; whether there is one.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.inner.conn.get().is_none() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self.connector.abort();
    }
}

/// Try to connect (and load the scripts) until it works, backing off between attempts.
async fn connect_until_connected(inner: Weak<Inner>, client: redis::Client) {
    let mut delay = FIRST_RETRY;
    let mut failures = 0_u32;
    loop {
        let Some(this) = inner.upgrade() else { return };
        match this.connect(&client).await {
            Ok(conn) => {
                let _ = this.conn.set(conn);
                if failures > 0 {
                    tracing::info!(
                        kind = "limits.backend_connected",
                        attempts = failures + 1,
                        "connected to Redis for rate limits"
                    );
                }
                return;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(kind = "limits.backend_unavailable", error = %e, "cannot reach Redis for rate limits yet; retrying in the background (on_backend_error applies meanwhile)");
                } else {
                    tracing::debug!(error = %e, attempt = failures + 1, "Redis for rate limits still unreachable");
                }
                failures += 1;
            }
        }
        drop(this);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RETRY);
    }
}

impl Inner {
    async fn connect(&self, client: &redis::Client) -> Result<ConnectionManager, BackendError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_factor(50)
            .set_max_delay(500);
        let mut conn = match tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(BackendError(format!("cannot connect to Redis: {e}"))),
            Err(_) => return Err(BackendError(format!("Redis did not answer within {:?}", self.timeout))),
        };
        // Loading now fails early on a Redis without scripting, and saves the first request a round trip.
        let s = &self.scripts;
        for script in [&s.reserve, &s.finish, &s.cancel, &s.refresh] {
            self.bounded("SCRIPT LOAD", script.load_async(&mut conn)).await?;
        }
        Ok(conn)
    }

    fn conn(&self) -> Result<ConnectionManager, BackendError> {
        self.conn.get().cloned().ok_or_else(|| BackendError("not connected to Redis (yet)".to_owned()))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn()?;
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
        Keys([
            format!("{base}:rpm"),
            format!("{base}:ipm"),
            format!("{base}:leases"),
            format!("{base}:lease"),
            format!("{base}:held"),
            format!("{base}:img:d:{}", w.day.0),
            format!("{base}:img:m:{}", w.month.0),
            format!("{base}:usd:d:{}", w.day.0),
            format!("{base}:usd:m:{}", w.month.0),
        ])
    }

    fn invocation<'s>(&self, script: &'s Script, keys: &Keys) -> redis::ScriptInvocation<'s> {
        let mut call = script.prepare_invoke();
        for key in &keys.0 {
            call.key(key);
        }
        call
    }

    /// Check and reserve, seeding budget counters from the ledger when the script asks for it. A call whose
    /// answer was lost is cancelled in the background.
    async fn decide(
        self: &Arc<Self>,
        tenant_id: &str,
        limits: &Limits,
        demand: Demand,
        id: &str,
    ) -> Result<Outcome, BackendError> {
        let w = Windows::now();
        let keys = self.keys(tenant_id, w);
        let outcome = self.run_reserve(&keys, limits, demand, id, false, "reserve").await;
        let outcome = match outcome {
            Ok(o) if o.status == -1 => {
                self.seed(tenant_id, limits, demand, &keys, w).await?;
                self.run_reserve(&keys, limits, demand, id, true, "reserve").await
            }
            other => other,
        };
        if outcome.is_err() && self.conn.get().is_some() {
            let this = self.clone();
            let (tenant_id, id) = (tenant_id.to_owned(), id.to_owned());
            tokio::spawn(async move { this.cancel(&tenant_id, &id).await });
        }
        outcome
    }

    /// One `EVALSHA` of `reserve.lua`.
    async fn run_reserve(
        &self,
        keys: &Keys,
        limits: &Limits,
        demand: Demand,
        id: &str,
        allow_missing: bool,
        mode: &str,
    ) -> Result<Outcome, BackendError> {
        let mut conn = self.conn()?;
        let mut call = self.invocation(&self.scripts.reserve, keys);
        call.arg(opt(limits.requests_per_minute))
            .arg(opt(limits.requests_burst.or(limits.requests_per_minute)))
            .arg(opt(limits.images_per_minute))
            .arg(opt(limits.images_burst.or(limits.images_per_minute)))
            .arg(opt(limits.concurrent_requests))
            .arg(opt(limits.images_per_day))
            .arg(opt(limits.images_per_month))
            .arg(opt(limits.usd_per_day))
            .arg(opt(limits.usd_per_month))
            .arg(u8::from(demand.request))
            .arg(demand.images)
            .arg(format!("{:.17}", demand.usd.max(0.0)))
            .arg(millis(self.lease))
            .arg(id)
            .arg(if allow_missing { "1" } else { "0" })
            .arg(mode);
        let raw: Vec<i64> = self.bounded("limits script", call.invoke_async(&mut conn)).await?;
        Outcome::parse(&raw)
    }

    /// Create the tenant's spending counters that do not exist yet from the ledger (`SET NX`: a counter another
    /// replica created meanwhile wins).
    async fn seed(
        &self,
        tenant_id: &str,
        limits: &Limits,
        demand: Demand,
        keys: &Keys,
        w: Windows,
    ) -> Result<(), BackendError> {
        let now = local_now();
        let mut pipe = redis::pipe();
        let [.., images_day, images_month, usd_day, usd_month] = &keys.0;
        let windows = [
            (w.day, limits.images_per_day.is_some(), limits.usd_per_day.is_some(), images_day, usd_day),
            (w.month, limits.images_per_month.is_some(), limits.usd_per_month.is_some(), images_month, usd_month),
        ];
        for ((start, end), images_budget, usd_budget, images_key, usd_key) in windows {
            if !((images_budget && demand.images > 0) || (usd_budget && demand.usd > 0.0)) {
                continue;
            }
            // What this process queued but has not written yet, read *before* the ledger: a row written in
            // between is then counted twice (an over-count, refusing a little early), never not at all.
            let (queued_images, queued_usd) = self.unwritten.get().map_or((0, 0.0), |u| u.spent(tenant_id));
            let (images, usd) = self.spent_since(tenant_id, start).await?;
            let (images, usd) = (images + queued_images, usd + queued_usd);
            // Counters outlive their window by a day (late settlements still land in the right key).
            let ttl = (end + DAY_MS).saturating_sub(now).max(1);
            if images_budget {
                pipe.cmd("SET").arg(images_key).arg(images).arg("NX").arg("PX").arg(ttl).ignore();
            }
            if usd_budget {
                pipe.cmd("SET").arg(usd_key).arg(format!("{usd:.17}")).arg("NX").arg("PX").arg(ttl).ignore();
            }
            tracing::debug!(
                tenant = tenant_id,
                window_start = start,
                images,
                usd,
                "seeding Redis budgets from the ledger"
            );
        }
        let mut conn = self.conn()?;
        self.bounded("budget seeding", pipe.query_async::<()>(&mut conn)).await
    }

    async fn spent_since(&self, tenant_id: &str, from_ms: u64) -> Result<(u64, f64), BackendError> {
        let limit = self.timeout.max(MIN_SEED_TIMEOUT);
        let read = crate::ledger::report::spent_since(&self.db, tenant_id, to_i64(from_ms), None);
        match tokio::time::timeout(limit, read).await {
            Ok(Ok(spent)) => Ok(spent),
            Ok(Err(e)) => Err(BackendError(format!("cannot read budgets from the ledger: {e}"))),
            Err(_) => Err(BackendError(format!("reading budgets from the ledger took over {limit:?}"))),
        }
    }

    async fn finish(&self, held: &Held, usage: Usage) -> Result<(), BackendError> {
        let keys = self.keys(&held.tenant_id, Windows::now());
        let interval = |b: Option<Bucket>| b.map_or(1, |b| b.interval());
        let request_back = u8::from(held.request && usage.request_back && held.requests_bucket.is_some());
        let images_back = if held.images_bucket.is_some() { held.images.saturating_sub(usage.images) } else { 0 };
        let mut call = self.invocation(&self.scripts.finish, &keys);
        call.arg(&held.id)
            .arg(request_back)
            .arg(interval(held.requests_bucket))
            .arg(images_back)
            .arg(interval(held.images_bucket))
            .arg(usage.images)
            .arg(format!("{:.17}", usage.usd.max(0.0)));
        let mut conn = self.conn()?;
        self.bounded("settlement", call.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn cancel(&self, tenant_id: &str, id: &str) {
        let keys = self.keys(tenant_id, Windows::now());
        let mut call = self.invocation(&self.scripts.cancel, &keys);
        call.arg(id).arg(millis(self.lease));
        let outcome = match self.conn() {
            Ok(mut conn) => self.bounded("cancel", call.invoke_async::<i64>(&mut conn)).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            tracing::warn!(tenant = tenant_id, error = %e, "a lost reservation was not cancelled; its lease lapses on its own");
        }
    }

    async fn refresh(&self, held: &Held) -> Result<(), BackendError> {
        let keys = self.keys(&held.tenant_id, Windows::now());
        let mut call = self.invocation(&self.scripts.refresh, &keys);
        call.arg(&held.id).arg(millis(self.lease));
        let mut conn = self.conn()?;
        self.bounded("lease refresh", call.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn peek(&self, tenant_id: &str, limits: &Limits) -> Result<Report, BackendError> {
        let keys = self.keys(tenant_id, Windows::now());
        let outcome = self.run_reserve(&keys, limits, Demand::more(0, 0.0), "", true, "peek").await?;
        Ok(outcome.report(limits))
    }
}

impl Backend for RedisBackend {
    fn reserve<'a>(
        &'a self,
        tenant_id: &'a str,
        limits: &'a Limits,
        demand: Demand,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Result<Grant, Refusal>, BackendError>> {
        Box::pin(async move { self.inner.decide(tenant_id, limits, demand, id).await?.decision(limits, demand) })
    }

    fn finish(self: Arc<Self>, held: Held, usage: Usage) -> BoxFuture<'static, Result<(), BackendError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.finish(&held, usage).await })
    }

    fn refresh<'a>(&'a self, held: &'a Held) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.inner.refresh(held))
    }

    fn peek<'a>(&'a self, tenant_id: &'a str, limits: &'a Limits) -> BoxFuture<'a, Result<Report, BackendError>> {
        Box::pin(self.inner.peek(tenant_id, limits))
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.inner.ping())
    }

    fn lease(&self) -> Option<Duration> {
        Some(self.inner.lease)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatabaseSettings, Secret};
    use crate::limits::gcra;

    const REDIS: &str = "redis://127.0.0.1:6379";
    const LEASE: Duration = Duration::from_secs(60);

    /// A backend on the real Redis with a prefix of its own (its keys deleted when the fixture goes), and the
    /// SQLite ledger budgets are seeded from.
    struct Fixture {
        backend: Arc<RedisBackend>,
        db: Db,
        prefix: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            delete_keys(&self.prefix);
        }
    }

    /// Delete every key under `prefix` (a blocking connection: this runs in `Drop`).
    fn delete_keys(prefix: &str) {
        let Ok(mut conn) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else { return };
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query(&mut conn).unwrap_or_default();
        if !keys.is_empty() {
            let _: RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }

    async fn ledger() -> (Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let settings = DatabaseSettings { url: Some(Secret::new(url)), ..Default::default() };
        let db = Db::connect(&settings, dir.path()).await.unwrap();
        (db, dir)
    }

    fn prefix() -> String {
        format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()))
    }

    async fn connected(url: &str, prefix: &str, timeout: Duration, lease: Duration, db: Db) -> RedisBackend {
        let backend = RedisBackend::start(url, prefix, timeout, lease, db).unwrap();
        assert!(backend.wait_connected(Duration::from_secs(3)).await, "Redis must run on 127.0.0.1:6379");
        backend
    }

    async fn fixture() -> Fixture {
        let (db, dir) = ledger().await;
        let prefix = prefix();
        let backend = Arc::new(connected(REDIS, &prefix, Duration::from_secs(2), LEASE, db.clone()).await);
        Fixture { backend, db, prefix, _dir: dir }
    }

    fn held(id: &str, limits: &Limits, demand: Demand, slot: bool) -> Held {
        Held {
            tenant_id: "t1".into(),
            id: id.into(),
            request: demand.request,
            slot,
            images: demand.images,
            usd: demand.usd,
            requests_bucket: limits.requests_per_minute.map(|l| Bucket::per_minute(l, limits.requests_burst)),
            images_bucket: limits.images_per_minute.map(|l| Bucket::per_minute(l, limits.images_burst)),
        }
    }

    impl Fixture {
        async fn grant(&self, limits: &Limits, n: u32) -> Result<Grant, Refusal> {
            self.backend.reserve("t1", limits, Demand::whole(n, 0.0), &new_id()).await.unwrap()
        }

        /// Reserve and return what the reservation holds.
        async fn hold(&self, limits: &Limits, demand: Demand) -> Result<Held, Refusal> {
            let id = new_id();
            let grant = self.backend.reserve("t1", limits, demand, &id).await.unwrap()?;
            Ok(held(&id, limits, demand, grant.holds_slot))
        }

        async fn finish(&self, held: Held, usage: Usage) {
            self.backend.clone().finish(held, usage).await.unwrap();
        }

        /// A second replica: another connection on the same Redis, prefix and ledger.
        async fn replica(&self) -> RedisBackend {
            connected(REDIS, &self.prefix, Duration::from_secs(2), LEASE, self.db.clone()).await
        }
    }

    fn new_id() -> String {
        hex::encode(rand::random::<[u8; 8]>())
    }

    #[tokio::test]
    async fn requests_per_minute_grant_exactly_the_limit_then_refuse_with_retry_after() {
        let f = fixture().await;
        let limits = Limits { requests_per_minute: Some(5), ..Limits::default() };
        for remaining in [4, 3, 2, 1, 0] {
            let grant = f.grant(&limits, 1).await.unwrap();
            let report = grant.report.requests.unwrap();
            assert_eq!((report.limit, report.remaining), (5, remaining));
            assert!(!grant.holds_slot);
            assert_eq!(grant.report.images, None);
        }
        let refused = f.grant(&limits, 1).await.unwrap_err();
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
        assert_eq!(f.grant(&limits, 4).await.unwrap().report.images.unwrap().remaining, 6);
        let second = f.grant(&limits, 4).await.unwrap().report;
        assert_eq!((second.images.unwrap().remaining, second.requests.unwrap().remaining), (2, 8));
        let refused = f.grant(&limits, 4).await.unwrap_err();
        assert_eq!(refused.reason, Reason::ImagesPerMinute);
        assert!((10_000..=12_000).contains(&refused.retry_after_ms.unwrap()), "{refused:?}");
        assert_eq!(refused.report.requests.unwrap().remaining, 8, "the refused request spent no request");
        assert_eq!(refused.report.images.unwrap().remaining, 2);
        let never = f.grant(&limits, 11).await.unwrap_err();
        assert_eq!((never.reason, never.retry_after_ms, never.never), (Reason::ImagesPerMinute, None, Some((11, 10))));
        let cached = f.backend.reserve("t1", &limits, Demand::request_only(), &new_id()).await.unwrap().unwrap();
        assert_eq!(cached.report.requests.unwrap().remaining, 7, "a cached answer spends a request, no image");
        assert_eq!(cached.report.images.unwrap().remaining, 2);
        let peeked = f.backend.peek("t1", &limits).await.unwrap();
        assert_eq!(
            (peeked.requests.unwrap().remaining, peeked.images.unwrap().remaining),
            (7, 2),
            "peeking spends nothing"
        );
    }

    #[tokio::test]
    async fn finishing_gives_back_what_was_not_used() {
        let f = fixture().await;
        let limits = Limits { requests_per_minute: Some(10), images_per_minute: Some(10), ..Limits::default() };
        let h = f.hold(&limits, Demand::whole(4, 0.0)).await.unwrap();
        f.finish(h, Usage { images: 1, usd: 0.0, request_back: false }).await;
        let report = f.backend.peek("t1", &limits).await.unwrap();
        assert_eq!((report.requests.unwrap().remaining, report.images.unwrap().remaining), (9, 9));
        let h = f.hold(&limits, Demand::whole(4, 0.0)).await.unwrap();
        f.finish(h, Usage::REFUNDED).await;
        let report = f.backend.peek("t1", &limits).await.unwrap();
        assert_eq!((report.requests.unwrap().remaining, report.images.unwrap().remaining), (9, 9), "an upstream 429");
    }

    #[tokio::test]
    async fn concurrency_slots_are_held_until_finished_by_id() {
        let f = fixture().await;
        let limits = Limits { concurrent_requests: Some(2), ..Limits::default() };
        let first = f.hold(&limits, Demand::whole(1, 0.0)).await.unwrap();
        assert!(first.slot);
        let second = f.hold(&limits, Demand::whole(1, 0.0)).await.unwrap();
        let refused = f.hold(&limits, Demand::whole(1, 0.0)).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::Concurrency, Some(1000)));
        // Finishing the second releases the second's own slot, not the oldest one.
        f.finish(second.clone(), Usage::NOTHING).await;
        f.finish(second, Usage::NOTHING).await; // twice: nothing more is released
        let third = f.hold(&limits, Demand::whole(1, 0.0)).await.unwrap();
        assert!(f.hold(&limits, Demand::whole(1, 0.0)).await.is_err());
        f.finish(first, Usage::NOTHING).await;
        f.finish(third, Usage::NOTHING).await;
        assert!(f.hold(&limits, Demand::whole(1, 0.0)).await.is_ok());
    }

    #[tokio::test]
    async fn unfinished_leases_lapse_and_running_ones_are_renewed() {
        let f = fixture().await;
        let (db, _dir) = ledger().await;
        let backend = connected(REDIS, &f.prefix, Duration::from_secs(2), Duration::from_secs(1), db).await;
        let limits = Limits { concurrent_requests: Some(1), ..Limits::default() };
        let id = new_id();
        assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &id).await.unwrap().is_ok());
        assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap().is_err());
        let running = held(&id, &limits, Demand::whole(1, 0.0), true);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            backend.refresh(&running).await.unwrap();
        }
        assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap().is_err(), "renewed");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap().is_ok(), "lapsed");
    }

    #[tokio::test]
    async fn image_budgets_hold_in_flight_images_and_count_what_came_back() {
        let f = fixture().await;
        let limits = Limits { images_per_day: Some(5), images_per_month: Some(100), ..Limits::default() };
        let first = f.hold(&limits, Demand::whole(3, 0.0)).await.unwrap();
        let refused = f.hold(&limits, Demand::whole(3, 0.0)).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::ImagesPerDay, None));
        let second = f.hold(&limits, Demand::whole(2, 0.0)).await.unwrap();
        assert_eq!(f.hold(&limits, Demand::whole(1, 0.0)).await.unwrap_err().reason, Reason::ImagesPerDay);
        f.finish(first, Usage { images: 2, usd: 0.0, request_back: false }).await;
        f.finish(second, Usage::NOTHING).await;
        assert!(f.hold(&limits, Demand::whole(3, 0.0)).await.is_ok(), "2 spent + 3");
        assert!(f.hold(&limits, Demand::request_only()).await.is_ok(), "a cache hit passes a full budget");
        let month = Limits { images_per_month: Some(6), ..Limits::default() };
        assert_eq!(
            f.hold(&month, Demand::whole(2, 0.0)).await.unwrap_err().reason,
            Reason::ImagesPerMonth,
            "2 + 3 held"
        );
    }

    #[tokio::test]
    async fn usd_budgets_reserve_estimates_and_reconcile_to_costs() {
        let f = fixture().await;
        let limits = Limits { usd_per_day: Some(0.12), ..Limits::default() };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(f.hold(&limits, Demand::whole(1, 0.04)).await.unwrap());
        }
        let refused = f.hold(&limits, Demand::whole(1, 0.04)).await.unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_ms), (Reason::UsdPerDay, None));
        let mut held = held.into_iter();
        f.finish(held.next().unwrap(), Usage { images: 1, usd: 0.01, request_back: false }).await;
        f.finish(held.next().unwrap(), Usage::NOTHING).await;
        f.finish(held.next().unwrap(), Usage { images: 1, usd: 0.04, request_back: false }).await;
        assert!(f.hold(&limits, Demand::whole(1, 0.07)).await.is_ok(), "0.05 spent + 0.07 = 0.12");
        assert_eq!(f.hold(&limits, Demand::whole(1, 0.01)).await.unwrap_err().reason, Reason::UsdPerDay);
        assert!(f.hold(&limits, Demand::request_only()).await.is_ok(), "a cost-0 hit passes a spent budget");
        let monthly = Limits { usd_per_month: Some(1.5), ..Limits::default() };
        assert!(f.hold(&monthly, Demand::whole(1, 0.5)).await.is_ok(), "the month counter was seeded separately");
    }

    #[tokio::test]
    async fn budgets_start_from_the_ledger_and_are_reseeded_when_redis_loses_them() {
        let f = fixture().await;
        let now = crate::time::now_ms();
        // Two upstream answers, a cache hit of 4 images (not spent), a failure with no images.
        let rows = [(2_i64, 0.25_f64, 0_i64), (1, 0.5, 0), (4, 0.0, 1), (0, 0.0, 0)];
        for (i, (images, usd, hit)) in rows.into_iter().enumerate() {
            sqlx::query(
                "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
                 images_requested, images_returned, cost_usd, status, latency_ms, stream, cache_hit) \
                 VALUES ($1, $2, 't1', 'k', 'generations', 'gpt-image-1', $3, $3, $4, 200, 5, 0, $5)",
            )
            .bind(format!("r{i}"))
            .bind(now)
            .bind(images)
            .bind(usd)
            .bind(hit)
            .execute(f.db.pool())
            .await
            .unwrap();
        }
        let limits = Limits { images_per_day: Some(5), usd_per_day: Some(1.0), ..Limits::default() };
        let h = f.hold(&limits, Demand::whole(2, 0.0)).await.unwrap();
        assert!(f.hold(&limits, Demand::whole(1, 0.0)).await.is_err(), "3 from the ledger + 2 held = 5");
        f.finish(h, Usage { images: 2, usd: 0.2, request_back: false }).await;

        // Redis forgets (restart, eviction): the ledger is read again instead of starting from zero. The ledger
        // now has the settled request too (as the usage writer would have written it).
        sqlx::query(
            "INSERT INTO usage_events (request_id, created_at, tenant_id, key_id, endpoint, model, \
             images_requested, images_returned, cost_usd, status, latency_ms, stream, cache_hit) \
             VALUES ('r9', $1, 't1', 'k', 'generations', 'gpt-image-1', 2, 2, 0.2, 200, 5, 0, 0)",
        )
        .bind(now)
        .execute(f.db.pool())
        .await
        .unwrap();
        let keys = f.backend.inner.keys("t1", Windows::now());
        let mut conn = f.backend.inner.conn().unwrap();
        let spent = |conn: &mut ConnectionManager, i: usize| {
            let key = keys.0[i].clone();
            let mut conn = conn.clone();
            async move { redis::cmd("GET").arg(key).query_async::<Option<String>>(&mut conn).await.unwrap() }
        };
        let before = (spent(&mut conn, 5).await, spent(&mut conn, 7).await);
        redis::cmd("DEL").arg(&keys.0[5]).arg(&keys.0[7]).query_async::<()>(&mut conn).await.unwrap();
        assert_eq!(f.hold(&limits, Demand::whole(1, 0.01)).await.unwrap_err().reason, Reason::ImagesPerDay, "5 of 5");
        assert!(f.hold(&limits, Demand::more(0, 0.05)).await.is_ok(), "0.95 + 0.05");
        let after = (spent(&mut conn, 5).await, spent(&mut conn, 7).await);
        let parse = |v: &Option<String>| v.as_deref().unwrap().parse::<f64>().unwrap();
        assert_eq!(parse(&before.0), parse(&after.0), "images: the same spend before and after the reseed");
        assert!((parse(&before.1) - parse(&after.1)).abs() < 1e-9, "USD: {before:?} vs {after:?}");
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
            let outcome = f.backend.inner.decide("t1", &limits, Demand::whole(n, 0.0), &new_id()).await.unwrap();
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
        // Giving back agrees too: the images of the last grant, all but one.
        let h = held("x", &limits, Demand::whole(9, 0.0), false);
        f.finish(h, Usage { images: 1, usd: 0.0, request_back: false }).await;
        let settled = f.backend.inner.decide("t1", &limits, Demand::more(0, 0.0), &new_id()).await.unwrap();
        let at = u64::try_from(settled.now_ms).unwrap();
        let expected = gcra::check(ipm, gcra::give_back(ipm, images_tat, at, 8), at, 0);
        let as_i64 = |x: u64| i64::try_from(x).unwrap();
        assert_eq!(settled.images, (as_i64(expected.remaining), as_i64(expected.reset_ms)), "give back");
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
                backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap().is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 20);
    }
}
