//! Limits shared by several replicas through Redis (127.0.0.1:6379): two gateway processes on one Redis and
//! one PostgreSQL database, hit concurrently, grant each limit exactly once in total; an unreachable or stalled
//! Redis meets the configured policy at startup and at run time, never a hang; lost counters are reseeded from
//! the ledger; no concurrency slot outlives its request (shutdown, long streams). Every test deletes its keys.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::app::{
    ADMIN_TOKEN, FAKE_IMAGE_HOSTS, GatewayProcess, TestApp, UPSTREAM_KEY, error_of, fresh_postgres,
};
use crate::support::fake_openai::FakeOpenAi;
use crate::support::redis_proxy::{Proxy, silent_redis};

const REDIS: &str = "redis://127.0.0.1:6379";

fn limits(v: Value) -> imagegate::domain::Limits {
    serde_json::from_value(v).unwrap()
}

/// A key prefix of one test; its keys are deleted when it goes, passed or failed.
struct Prefix(String);

impl Prefix {
    fn new() -> Self {
        Self(format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>())))
    }

    /// Keys under this prefix whose name contains `part`.
    fn keys(&self, part: &str) -> Vec<String> {
        let mut conn = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", self.0)).query(&mut conn).unwrap();
        keys.into_iter().filter(|k| k.contains(part)).collect()
    }

    fn delete(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let mut conn = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("DEL").arg(keys).query(&mut conn).unwrap();
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else { return };
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", self.0)).query(&mut conn).unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

/// One tenant of the two-process test: its name, limits (TOML) and key.
struct Team {
    name: &'static str,
    limits: &'static str,
    key: imagegate::domain::keys::NewKey,
}

/// Fire `count` requests, alternating between the two gateways, all at once; statuses sorted.
async fn burst(roots: [&str; 2], key: &str, count: usize, body: impl Fn(usize) -> Value) -> Vec<u16> {
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..count {
        let request = client.post(format!("{}/v1/images/generations", roots[i % 2])).bearer_auth(key).json(&body(i));
        tasks.push(tokio::spawn(async move { request.send().await.unwrap().status().as_u16() }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses.sort_unstable();
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

#[tokio::test]
async fn two_replicas_sharing_redis_grant_every_limit_once_in_total() {
    let fake = FakeOpenAi::start().await;
    let database_url = fresh_postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = Prefix::new();
    let teams = [
        Team { name: "rate", limits: "{ requests_per_minute = 20 }", key: imagegate::domain::keys::generate() },
        Team { name: "slots", limits: "{ concurrent_requests = 3 }", key: imagegate::domain::keys::generate() },
        Team { name: "images", limits: "{ images_per_day = 5 }", key: imagegate::domain::keys::generate() },
        Team { name: "money", limits: "{ usd_per_day = 0.12 }", key: imagegate::domain::keys::generate() },
    ];
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n[database]\nurl = \"{database_url}\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"\n\
         [limits]\nbackend = \"redis\"\nredis_url = \"{REDIS}\"\nredis_prefix = \"{}\"\n\
         on_backend_error = \"closed\"\n{FAKE_IMAGE_HOSTS}",
        dir.path().display(),
        fake.url,
        prefix.0,
    );
    for team in &teams {
        config.push_str(&format!(
            "[[tenants]]\nname = \"{}\"\nlimits = {}\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
            team.name, team.limits, team.key.id, team.key.sha256
        ));
    }
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    // One after the other: the second finds the migrations and the configured tenants already in place.
    let first = GatewayProcess::start(&["serve", "--config", path], dir.path());
    let second = GatewayProcess::start(&["serve", "--config", path], dir.path());
    let roots = [first.root.as_str(), second.root.as_str()];
    let printed = || format!("{}\n{}", first.printed(), second.printed());

    // Requests per minute: 20 of 60.
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let request = client
            .post(format!("{}/v1/images/generations", roots[i % 2]))
            .bearer_auth(&teams[0].key.key)
            .json(&json!({"prompt": format!("shared {i}")}));
        tasks.push(tokio::spawn(async move {
            let res = request.send().await.unwrap();
            let retry_after = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let limit = res.headers().get("x-ratelimit-limit-requests").map(|v| v.to_str().unwrap().to_owned());
            (res.status().as_u16(), retry_after, limit)
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    // One request earns back every 3 s: the burst must be decided before the first refill.
    assert!(started.elapsed() < Duration::from_secs(3), "too slow to be exact: {:?}", started.elapsed());
    let ok = answers.iter().filter(|(status, ..)| *status == 200).count();
    let limited: Vec<_> = answers.iter().filter(|(status, ..)| *status == 429).collect();
    assert_eq!(ok, 20, "{answers:?}\n{}", printed());
    assert_eq!(limited.len(), 40, "{answers:?}");
    for (_, retry_after, limit) in &limited {
        let secs: u64 = retry_after.as_deref().expect("429 without retry-after").parse().unwrap();
        assert!((1..=3).contains(&secs), "retry-after {secs}");
        assert_eq!(limit.as_deref(), Some("20"));
    }
    assert_eq!(fake.call_count(), 20, "refused requests never reached the upstream");

    // Concurrency: 3 slots across both, for 10 slow requests at once; then all of them are free again.
    let slow = |i: usize| json!({"prompt": format!("slow {i} #sleep=800")});
    let statuses = burst(roots, &teams[1].key.key, 10, slow).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (3, 7), "{statuses:?}\n{}", printed());
    let statuses = burst(roots, &teams[1].key.key, 3, slow).await;
    assert_eq!(statuses, [200, 200, 200], "every slot was released");

    // An image budget: 5 images a day, 12 requests at once.
    let statuses = burst(roots, &teams[2].key.key, 12, |i| json!({"prompt": format!("img {i} #sleep=200")})).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (5, 7), "{statuses:?}");

    // A USD budget: $0.12 a day, dall-e-3 at $0.04, 10 requests at once.
    let dalle = |i: usize| json!({"model": "dall-e-3", "prompt": format!("usd {i} #sleep=200")});
    let statuses = burst(roots, &teams[3].key.key, 10, dalle).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (3, 7), "{statuses:?}");
    assert_eq!(fake.call_count(), 20 + 3 + 3 + 5 + 3);
}

async fn gateway(
    fake: &FakeOpenAi,
    url: &str,
    prefix: &Prefix,
    policy: imagegate::domain::OnBackendError,
    team: Value,
) -> TestApp {
    let url = url.to_owned();
    let prefix = prefix.0.clone();
    TestApp::spawn_with(&fake.url, move |s| {
        s.limits.backend = imagegate::config::LimitsBackend::Redis;
        s.limits.redis_url = Some(imagegate::config::Secret::new(url));
        s.limits.redis_prefix = prefix;
        s.limits.on_backend_error = policy;
        s.tenants[0].limits = limits(team);
    })
    .await
}

/// A second replica beside `app`: the same database (so the same tenants) and Redis, another policy.
async fn beside(app: &TestApp, policy: imagegate::domain::OnBackendError) -> TestApp {
    let mut settings = app.settings.clone();
    settings.limits.on_backend_error = policy;
    app.replica(settings, app.data_dir.clone()).await
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let res = app.client.get(format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    res.json().await.unwrap()
}

async fn ready(app: &TestApp) -> u16 {
    app.client.get(format!("{}/readyz", app.root)).send().await.unwrap().status().as_u16()
}

async fn readiness(app: &TestApp) -> Value {
    app.client.get(format!("{}/readyz", app.root)).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn with_redis_down_at_startup_fail_open_serves_and_fail_closed_refuses_without_hanging() {
    use imagegate::domain::OnBackendError::{Closed, Open};
    let fake = FakeOpenAi::start().await;
    let prefix = Prefix::new();
    // A closed port, and a port that accepts and never answers.
    let silent_url = silent_redis().await;
    let team = json!({"requests_per_minute": 2});
    for url in ["redis://127.0.0.1:1".to_owned(), silent_url] {
        let started = Instant::now();
        let open = gateway(&fake, &url, &prefix, Open, team.clone()).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{url}: the start waited {:?}", started.elapsed());
        for _ in 0..3 {
            let started = Instant::now();
            let res = open.post_json("/images/generations", &json!({"prompt": "x"})).await;
            assert!(started.elapsed() < Duration::from_secs(2), "{url}: {:?}", started.elapsed());
            assert_eq!(res.status(), 200, "{url}: fail-open lets it through, unlimited");
            assert_eq!(res.headers()["x-ratelimit-limit-requests"], "2");
            assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "2", "nothing is counted");
        }
        assert_eq!(ready(&open).await, 200, "fail-open stays ready");
        assert_eq!(readiness(&open).await["limits"], "unavailable (fail-open)");
        let stats = admin_get(&open, "/limits").await;
        assert_eq!((stats["passed_by_fail_open"].as_u64(), stats["backend"].as_str()), (Some(3), Some("redis")));
        assert!(stats["backend_errors"].as_u64().unwrap() >= 3, "{stats}");

        let closed = gateway(&fake, &url, &prefix, Closed, team.clone()).await;
        let started = Instant::now();
        let res = closed.post_json("/images/generations", &json!({"prompt": "x"})).await;
        assert!(started.elapsed() < Duration::from_secs(2), "{url}: {:?}", started.elapsed());
        assert_eq!(res.headers()["retry-after"], "1");
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
        let (status, error) = error_of(res).await;
        assert_eq!((status, error["type"].as_str()), (503, Some("server_error")));
        assert_eq!(ready(&closed).await, 503, "fail-closed is not ready while every request would be refused");
        assert_eq!(admin_get(&closed, "/limits").await["refused_by_fail_closed"], 1);
    }
    assert_eq!(fake.call_count(), 6, "only fail-open requests reached the upstream");
}

#[tokio::test]
async fn a_redis_that_comes_up_late_or_stalls_at_run_time_meets_the_policy_within_the_timeout() {
    use imagegate::domain::OnBackendError::{Closed, Open};
    let fake = FakeOpenAi::start().await;
    let prefix = Prefix::new();
    let (url, proxy) = Proxy::start().await;
    proxy.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    let team = json!({"requests_per_minute": 2});
    let open = gateway(&fake, &url, &prefix, Open, team).await;
    let closed = beside(&open, Closed).await;
    assert_eq!(open.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 200);
    assert_eq!(closed.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 503);

    // Redis comes up: both replicas connect in the background and share the limit.
    proxy.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(&closed).await != 200 {
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while readiness(&open).await["limits"] != "ok" {
        assert!(Instant::now() < deadline, "the fail-open replica never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let res = open.post_json("/images/generations", &json!({"prompt": "x"})).await;
    assert_eq!((res.status().as_u16(), res.headers()["x-ratelimit-remaining-requests"].to_str().unwrap()), (200, "1"));
    let res = closed.post_json("/images/generations", &json!({"prompt": "x"})).await;
    assert_eq!(
        (res.status().as_u16(), res.headers()["x-ratelimit-remaining-requests"].to_str().unwrap()),
        (200, "0"),
        "shared"
    );
    assert_eq!(error_of(open.post_json("/images/generations", &json!({"prompt": "x"})).await).await.0, 429);

    // Redis stalls: every request meets the policy within the timeout (250 ms), nothing hangs.
    proxy.hold(true);
    let started = Instant::now();
    assert_eq!(open.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 200);
    assert_eq!(closed.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(ready(&closed).await, 503);
    proxy.hold(false);
}

#[tokio::test]
async fn lost_redis_counters_are_reseeded_from_the_ledger_with_the_same_spend() {
    let fake = FakeOpenAi::start().await;
    let prefix = Prefix::new();
    let app = gateway(
        &fake,
        REDIS,
        &prefix,
        imagegate::domain::OnBackendError::Closed,
        json!({"images_per_day": 5, "usd_per_day": 0.2}),
    )
    .await;
    // 3 images and $0.12 spent: dall-e-3 × 3 ($0.04 each); a failure and a hit spend nothing.
    for body in [
        json!({"model": "dall-e-3", "prompt": "a"}),
        json!({"model": "dall-e-3", "prompt": "b #status=500"}),
        json!({"model": "dall-e-3", "prompt": "c", "n": 1}),
        json!({"model": "dall-e-3", "prompt": "d"}),
    ] {
        app.post_json("/images/generations", &body).await;
    }
    app.usage_rows(4).await;
    // Probes that spend nothing (they fail upstream): what fits tells the spend.
    let probe = |app: &TestApp| {
        let app_url = format!("{}/images/generations", app.base_url);
        let (client, key) = (app.client.clone(), app.key.clone());
        async move {
            let mut out = Vec::new();
            for body in [
                json!({"model": "dall-e-2", "prompt": "p #status=500", "n": 3}), // 6 > 5 images
                json!({"model": "dall-e-2", "prompt": "p #status=500", "n": 2}), // 5 images, $0.16
                json!({"model": "dall-e-3", "prompt": "p #status=500", "quality": "hd"}), // $0.20
                json!({"model": "dall-e-3", "prompt": "p #status=500", "quality": "hd", "size": "1792x1024"}),
            ] {
                out.push(client.post(&app_url).bearer_auth(&key).json(&body).send().await.unwrap().status().as_u16());
            }
            out
        }
    };
    let before = probe(&app).await;
    assert_eq!(before, [429, 500, 500, 429], "3 of 5 images and $0.12 of $0.20 spent");
    // Redis loses the spending counters (a restart, an eviction).
    let lost = [prefix.keys(":img:"), prefix.keys(":usd:")].concat();
    assert_eq!(lost.len(), 2, "today's images and USD: {lost:?}");
    prefix.delete(&lost);
    assert_eq!(probe(&app).await, before, "the same spend, read back from the ledger");
}

#[tokio::test]
async fn slots_of_requests_in_flight_at_shutdown_are_released() {
    let fake = FakeOpenAi::start().await;
    let prefix = Prefix::new();
    let team = json!({"concurrent_requests": 1});
    let url = REDIS.to_owned();
    let p = prefix.0.clone();
    let plan = team.clone();
    let app = TestApp::spawn_with(&fake.url, move |s| {
        s.limits.backend = imagegate::config::LimitsBackend::Redis;
        s.limits.redis_url = Some(imagegate::config::Secret::new(url));
        s.limits.redis_prefix = p;
        s.server.shutdown_timeout = Duration::from_millis(500);
        s.tenants[0].limits = limits(plan);
    })
    .await;
    let request = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .json(&json!({"prompt": "x #sleep=4000"}));
    let in_flight = tokio::spawn(async move { request.send().await.map(|r| r.status()) });
    // Polled, not slept for: on a loaded machine the request may take a while to reach the limits.
    let deadline = Instant::now() + Duration::from_secs(3);
    while prefix.keys(":leases").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(prefix.keys(":leases").len(), 1, "the slot is held");
    let other = beside(&app, imagegate::domain::OnBackendError::Closed).await;
    let (status, _) = error_of(other.post_json("/images/generations", &json!({"prompt": "y"})).await).await;
    assert_eq!(status, 429, "the other replica sees the slot taken");
    app.shutdown().await; // the drain deadline passes with the request still running

    let res = other.post_json("/images/generations", &json!({"prompt": "y"})).await;
    assert_eq!(res.status(), 200, "the slot of the replica that stopped was released");
    in_flight.abort();
}

#[tokio::test]
async fn a_stream_longer_than_the_lease_keeps_its_slot() {
    let fake = FakeOpenAi::start().await;
    let prefix = Prefix::new();
    let url = REDIS.to_owned();
    let p = prefix.0.clone();
    let app = TestApp::spawn_with(&fake.url, move |s| {
        s.limits.backend = imagegate::config::LimitsBackend::Redis;
        s.limits.redis_url = Some(imagegate::config::Secret::new(url));
        s.limits.redis_prefix = p;
        s.limits.lease = Some(Duration::from_secs(1));
        s.tenants[0].limits = limits(json!({"concurrent_requests": 1}));
    })
    .await;
    // A stream of about 2.4 s: three partial images and the final image, 800 ms apart.
    let body = json!({"model": "gpt-image-1", "prompt": "a kite #gap=800", "stream": true, "partial_images": 3});
    let mut stream = app.post_json("/images/generations", &body).await;
    assert_eq!(stream.status(), 200);
    let reader = tokio::spawn(async move {
        let mut bytes = 0;
        while let Some(chunk) = stream.chunk().await.unwrap() {
            bytes += chunk.len();
        }
        bytes
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, error) = error_of(app.post_json("/images/generations", &json!({"prompt": "y"})).await).await;
    assert_eq!(status, 429, "past its 1 s lease, the stream still holds its slot: it was renewed");
    assert!(error["message"].as_str().unwrap().contains("concurrent requests"));
    assert!(reader.await.unwrap() > 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        app.post_json("/images/generations", &json!({"prompt": "y"})).await.status(),
        200,
        "released at the end"
    );
}
