//! The Redis limits backend on its own, against misbehaving Redis servers (`support::redis_proxy`): an
//! unreachable or silent Redis fails every call at once or within the timeout and never blocks a start, a
//! Redis that comes up later is used, and a reservation whose answer was lost leaves nothing held.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use imagegate::config::{DatabaseSettings, Secret};
use imagegate::db::{Db, new_id};
use imagegate::domain::Limits;
use imagegate::limits::gcra::Bucket;
use imagegate::limits::redis::RedisBackend;
use imagegate::limits::{Backend as _, Demand, Held, Usage};

use crate::support::redis_proxy::{Proxy, silent_redis};

const REDIS: &str = "redis://127.0.0.1:6379";
const TIMEOUT: Duration = Duration::from_millis(300);
const LEASE: Duration = Duration::from_secs(60);

/// Delete every key under `prefix`.
fn delete_keys(prefix: &str) {
    let Ok(mut conn) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else { return };
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query(&mut conn).unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
    }
}

/// The SQLite ledger budgets are seeded from.
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

#[tokio::test]
async fn an_unreachable_redis_fails_calls_at_once_and_connects_when_it_comes() {
    let (db, _dir) = ledger().await;
    // A closed port, and a server that accepts connections and never answers: neither blocks the start.
    for url in ["redis://127.0.0.1:1".to_owned(), silent_redis().await] {
        let started = Instant::now();
        let backend = RedisBackend::start(&url, "x", TIMEOUT, LEASE, db.clone()).unwrap();
        let limits = Limits { requests_per_minute: Some(1), ..Limits::default() };
        let err = backend.reserve("t1", &limits, Demand::whole(1, 0.0), "a").await.unwrap_err();
        assert!(err.0.contains("not connected"), "{err}");
        assert!(backend.peek("t1", &limits).await.is_err());
        assert!(backend.ready().await.is_err());
        assert!(started.elapsed() < Duration::from_millis(100), "{url}: {:?}", started.elapsed());
        assert!(!backend.wait_connected(Duration::from_millis(500)).await);
    }

    // A Redis that comes up later (a proxy that refuses until it is switched on) is used once it answers.
    let (url, proxy) = Proxy::start().await;
    proxy.refuse.store(true, Ordering::SeqCst);
    let prefix = prefix();
    let backend = RedisBackend::start(&url, &prefix, TIMEOUT, LEASE, db).unwrap();
    assert!(!backend.wait_connected(Duration::from_millis(300)).await);
    proxy.refuse.store(false, Ordering::SeqCst);
    assert!(backend.wait_connected(Duration::from_secs(3)).await, "connected in the background");
    let limits = Limits { requests_per_minute: Some(1), ..Limits::default() };
    assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), "a").await.unwrap().is_ok());
    delete_keys(&prefix);
}

#[tokio::test]
async fn a_redis_that_stops_answering_fails_every_call_within_the_timeout() {
    let (db, _dir) = ledger().await;
    let (url, proxy) = Proxy::start().await;
    let prefix = prefix();
    let backend = connected(&url, &prefix, TIMEOUT, LEASE, db).await;
    let limits = Limits { requests_per_minute: Some(5), concurrent_requests: Some(1), ..Limits::default() };
    let id = new_id();
    assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &id).await.unwrap().is_ok());
    assert!(backend.ready().await.is_ok());

    proxy.hold(true);
    let bound = TIMEOUT + Duration::from_millis(200);
    let started = Instant::now();
    let err = backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap_err();
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert!(err.0.contains("timed out"), "{err}");
    let started = Instant::now();
    let backend = Arc::new(backend);
    assert!(backend.clone().finish(held(&id, &limits, Demand::whole(1, 0.0), true), Usage::NOTHING).await.is_err());
    assert!(backend.peek("t1", &limits).await.is_err());
    assert!(backend.ready().await.is_err());
    assert!(started.elapsed() < bound * 3, "{:?}", started.elapsed());
    proxy.hold(false);
    delete_keys(&prefix);
}

#[tokio::test]
async fn a_reservation_whose_answer_was_lost_leaves_no_slot_behind() {
    let (db, _dir) = ledger().await;
    let (url, proxy) = Proxy::start().await;
    let prefix = prefix();
    let backend = connected(&url, &prefix, TIMEOUT, LEASE, db.clone()).await;
    let limits = Limits { concurrent_requests: Some(1), images_per_day: Some(10), ..Limits::default() };

    // Redis stalls: the reservation times out here, but still runs in Redis when the stall ends.
    proxy.hold(true);
    let err = backend.reserve("t1", &limits, Demand::whole(4, 0.0), &new_id()).await.unwrap_err();
    assert!(err.0.contains("timed out"), "{err}");
    proxy.hold(false);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The compensating cancel ran after it: no slot and no image is held by it.
    let other = connected(REDIS, &prefix, Duration::from_secs(2), LEASE, db).await;
    let id = new_id();
    let grant = other.reserve("t1", &limits, Demand::whole(10, 0.0), &id).await.unwrap();
    assert!(grant.is_ok(), "the lost reservation holds nothing: {grant:?}");
    delete_keys(&prefix);
}

/// A budget counter seeded while this process still has usage rows queued for the ledger (its writer is
/// asynchronous) counts them: here 4 images spent and not written yet leave 1 of a budget of 5. Before, the
/// seed read only the ledger, found nothing, and granted 5 more: a tenant over its budget after every Redis
/// restart or eviction that came soon after spending. Once written, the rows are counted once, not twice.
#[tokio::test]
async fn a_budget_seeded_while_usage_rows_are_still_queued_counts_them() {
    use imagegate::config::UsageSettings;
    use imagegate::ledger::Ledger;
    let (db, _dir) = ledger().await;
    // A writer that holds its rows (a long flush interval, a large batch): they are queued, not written.
    let settings = UsageSettings { flush_interval: Duration::from_secs(3600), batch_size: 1000, ..Default::default() };
    let (usage, writer) = Ledger::start(db.clone(), &settings);
    let mut spent = crate::ledger::record(&new_id());
    spent.tenant_id = "t1".into();
    spent.images_returned = Some(4);
    usage.record(spent);

    let prefix = prefix();
    let backend = connected(REDIS, &prefix, TIMEOUT, LEASE, db.clone()).await.counting_unwritten(usage.unwritten());
    let limits = Limits { images_per_day: Some(5), ..Limits::default() };
    let over = backend.reserve("t1", &limits, Demand::whole(2, 0.0), &new_id()).await.unwrap();
    assert!(over.is_err(), "4 queued + 2 is over 5: {over:?}");
    let id = new_id();
    assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &id).await.unwrap().is_ok(), "4 + 1 = 5");
    let backend = Arc::new(backend);
    backend.clone().finish(held(&id, &limits, Demand::whole(1, 0.0), false), Usage::NOTHING).await.unwrap();

    // The rows are written (the writer drains when closed), then Redis forgets: the reseed counts them once.
    writer.close().await;
    assert_eq!(usage.unwritten().spent("t1"), (0, 0.0));
    delete_keys(&prefix);
    assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap().is_ok(), "4 + 1");
    assert!(backend.reserve("t1", &limits, Demand::whole(1, 0.0), &new_id()).await.unwrap().is_err(), "4 + 1 + 1");
    delete_keys(&prefix);
}
