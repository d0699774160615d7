//! The response cache: identical requests reach the upstream once (also when they arrive together, and when
//! the first caller goes away), anything different misses, callers steer it with `Cache-Control`, hits cost
//! nothing and spend no images, only imagegate's own links are cached and a hit's links have at least half
//! the retention left, memory stays bounded, and replicas share it through Redis, which may be down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::app::{ADMIN_TOKEN, TestApp, png};
use crate::support::fake_openai::{FakeOpenAi, FakeOptions};

async fn cached_app(fake: &FakeOpenAi) -> TestApp {
    TestApp::spawn_with(&fake.url, |s| s.cache.enabled = true).await
}

async fn post(app: &TestApp, key: &str, body: &Value, cache_control: Option<&str>) -> (u16, String, Value) {
    let mut req = app.client.post(format!("{}/images/generations", app.base_url)).bearer_auth(key).json(body);
    if let Some(cc) = cache_control {
        req = req.header("cache-control", cc);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let outcome = res.headers().get("x-imagegate-cache").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, outcome, res.json().await.unwrap())
}

/// `x-imagegate-cache` of a response ("" when absent).
fn outcome_of(res: &reqwest::Response) -> String {
    res.headers().get("x-imagegate-cache").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// Seconds a link of ours has left to live (its signed `expires`, against the clock now).
fn life_left(link: &str) -> f64 {
    let url = url::Url::parse(link).unwrap();
    let expires: f64 = url.query_pairs().find(|(k, _)| k == "expires").unwrap().1.parse().unwrap();
    expires - SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

async fn stats(app: &TestApp) -> Value {
    let res = app.client.get(format!("{}/admin/v1/cache", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn the_same_request_twice_reaches_the_upstream_once_and_the_hit_costs_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    let body = json!({"model": "gpt-image-1", "prompt": "a fox", "quality": "low"});

    let send = |body: Value| {
        app.client.post(format!("{}/images/generations", app.base_url)).bearer_auth(&app.key).json(&body).send()
    };
    let miss = send(body.clone()).await.unwrap();
    // The same request spelt differently: other key order, a default spelt out, a null.
    let same = json!({"quality": "low", "prompt": "a fox", "model": "gpt-image-1", "n": 1, "user": null});
    let hit = send(same).await.unwrap();

    assert_eq!(
        (miss.status().as_u16(), outcome_of(&miss).as_str(), hit.status().as_u16(), outcome_of(&hit).as_str()),
        (200, "miss", 200, "hit")
    );
    assert!(miss.headers().contains_key("x-upstream-request-id"));
    for name in ["x-upstream-request-id", "openai-processing-ms"] {
        assert!(!hit.headers().contains_key(name), "a hit made no upstream call: no {name}");
    }
    assert_eq!(hit.headers()["openai-version"], "2020-10-01", "the answer's own headers are replayed");
    let (first, second): (Value, Value) = (miss.json().await.unwrap(), hit.json().await.unwrap());
    assert_eq!(first, second, "the body (its `created` too) is the stored one");
    assert_eq!(fake.call_count(), 1);
    let rows = app.usage_rows(2).await;
    assert_eq!((rows[0]["cache_hit"].as_i64(), rows[1]["cache_hit"].as_i64()), (Some(0), Some(1)));
    assert!(rows[0]["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(rows[1]["cost_usd"].as_f64(), Some(0.0));
    assert_eq!(rows[1]["images_returned"].as_i64(), Some(1));
    let s = stats(&app).await;
    assert_eq!((s["hits"].as_u64(), s["misses"].as_u64(), s["entries"].as_u64()), (Some(1), Some(1), Some(1)));
    assert!(s["bytes"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn fifty_concurrent_identical_misses_make_one_upstream_call() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    let body = json!({"model": "gpt-image-1", "prompt": "a crowd #sleep=400"});

    let answers = futures::future::join_all((0..50).map(|_| post(&app, &app.key, &body, None))).await;

    assert_eq!(fake.call_count(), 1);
    assert!(answers.iter().all(|(status, _, body)| *status == 200 && *body == answers[0].2));
    let misses = answers.iter().filter(|(_, o, _)| o == "miss").count();
    assert_eq!((misses, answers.len() - misses), (1, 49), "one caller fetched, the others were served by it");
    let rows = app.usage_rows(50).await;
    let billed: Vec<&Value> = rows.iter().filter(|r| r["cost_usd"].as_f64().unwrap() > 0.0).collect();
    assert_eq!(billed.len(), 1, "only the upstream call costs money");
    let s = stats(&app).await;
    let counted = ["misses", "hits", "coalesced", "stores"].map(|k| s[k].as_u64().unwrap());
    assert_eq!(counted, [1, 49, 49, 1], "{s}");
}

#[tokio::test]
async fn another_tenant_another_parameter_or_another_file_byte_misses() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    let body = json!({"model": "dall-e-2", "prompt": "a boat", "size": "256x256"});
    assert_eq!(post(&app, &app.key, &body, None).await.1, "miss");

    assert_eq!(post(&app, &app.other_key, &body, None).await.1, "miss", "scoped per tenant by default");
    let other = json!({"model": "dall-e-2", "prompt": "a boat", "size": "512x512"});
    assert_eq!(post(&app, &app.key, &other, None).await.1, "miss");
    let unknown = json!({"model": "dall-e-2", "prompt": "a boat", "size": "256x256", "brand_new": 1});
    assert_eq!(post(&app, &app.key, &unknown, None).await.1, "miss");
    assert_eq!(fake.call_count(), 4);

    let edit = |image: Vec<u8>| {
        let form = Form::new()
            .text("model", "gpt-image-1")
            .text("prompt", "add a hat")
            .part("image[]", Part::bytes(image).file_name("a.png").mime_str("image/png").unwrap());
        app.post_form("/images/edits", form)
    };
    let image = png(16, 16, false);
    let mut changed = image.clone();
    let last = changed.len() - 3; // inside the IEND chunk's CRC (the last 4 bytes): still a whole PNG
    changed[last] ^= 1;
    let outcome = |r: &reqwest::Response| r.headers()["x-imagegate-cache"].to_str().unwrap().to_owned();
    assert_eq!(outcome(&edit(image.clone()).await), "miss");
    assert_eq!(outcome(&edit(image).await), "hit");
    assert_eq!(outcome(&edit(changed).await), "miss", "one file byte differs");
    assert_eq!(fake.call_count(), 6);
}

#[tokio::test]
async fn no_store_bypasses_and_no_cache_fetches_anew_and_stores() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    let body = json!({"model": "gpt-image-1", "prompt": "a lamp"});

    assert_eq!(post(&app, &app.key, &body, Some("no-store")).await.1, "bypass");
    assert_eq!(post(&app, &app.key, &body, None).await.1, "miss", "no-store stored nothing");
    assert_eq!(post(&app, &app.key, &body, Some("no-store")).await.1, "bypass", "and reads nothing");
    assert_eq!(fake.call_count(), 3);

    let (_, outcome, fresh) = post(&app, &app.key, &body, Some("no-cache")).await;
    assert_eq!(outcome, "miss");
    assert_eq!(fake.call_count(), 4, "no-cache goes upstream although an entry exists");
    let (_, outcome, again) = post(&app, &app.key, &body, None).await;
    assert_eq!((outcome.as_str(), again), ("hit", fresh), "and its answer replaced the entry");

    // Every Cache-Control header counts, whatever its case; max-age=0 revalidates.
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("cache-control", "private")
        .header("cache-control", "No-Store")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(outcome_of(&res), "bypass");
    assert_eq!(post(&app, &app.key, &body, Some("max-age=0")).await.1, "miss");
    assert_eq!(fake.call_count(), 6);
}

#[tokio::test]
async fn a_no_cache_refresh_lives_a_whole_ttl_of_its_own() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.cache.ttl = Duration::from_millis(1500);
    })
    .await;
    let body = json!({"model": "gpt-image-1", "prompt": "a refreshed lamp"});
    assert_eq!(post(&app, &app.key, &body, None).await.1, "miss");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, outcome, refreshed) = post(&app, &app.key, &body, Some("no-cache")).await;
    assert_eq!(outcome, "miss");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // 1.8 s after the first answer was stored (its TTL is over), 0.8 s after the refresh.
    let (_, outcome, again) = post(&app, &app.key, &body, None).await;
    assert_eq!(outcome, "hit", "the refresh did not inherit the old deadline");
    assert!(again == refreshed, "and it serves the refreshed answer");
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn errors_streams_and_tenants_without_the_cache_are_never_served_from_it() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.tenants[1].cache = Some(imagegate::domain::CachePolicy { enabled: Some(false), ..Default::default() });
    })
    .await;

    let failing = json!({"model": "gpt-image-1", "prompt": "x #status=500"});
    assert_eq!(post(&app, &app.key, &failing, None).await.0, 500);
    assert_eq!(post(&app, &app.key, &failing, None).await.0, 500);
    assert_eq!(fake.call_count(), 2, "an upstream error is not cached");

    let stream = json!({"model": "gpt-image-1", "prompt": "s", "stream": true});
    for _ in 0..2 {
        let res = app.post_json("/images/generations", &stream).await;
        assert_eq!(res.headers()["x-imagegate-cache"], "bypass");
        res.bytes().await.unwrap();
    }
    assert_eq!(fake.call_count(), 4);

    let body = json!({"model": "gpt-image-1", "prompt": "off"});
    assert_eq!(post(&app, &app.other_key, &body, None).await.1, "bypass");
    assert_eq!(post(&app, &app.other_key, &body, None).await.1, "bypass");
    assert_eq!(fake.call_count(), 6);
}

#[tokio::test]
async fn the_cache_is_off_unless_configured() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let body = json!({"model": "gpt-image-1", "prompt": "twice"});
    assert_eq!(post(&app, &app.key, &body, None).await.1, "bypass");
    assert_eq!(post(&app, &app.key, &body, None).await.1, "bypass");
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn waiters_sharing_an_upstream_error_are_misses_that_cost_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    let body = json!({"model": "gpt-image-1", "prompt": "x #sleep=400 #status=500"});

    let answers = futures::future::join_all((0..5).map(|_| post(&app, &app.key, &body, None))).await;

    assert_eq!(fake.call_count(), 1, "the waiters shared the call");
    for (status, outcome, _) in &answers {
        assert_eq!((*status, outcome.as_str()), (500, "miss"), "a shared error is not a cache hit");
    }
    let rows = app.usage_rows(5).await;
    assert_eq!(rows.len(), 5);
    for row in &rows {
        assert_eq!(
            (row["cache_hit"].as_i64(), row["cost_usd"].as_f64(), row["status"].as_i64()),
            (Some(0), Some(0.0), Some(500))
        );
    }
    let s = stats(&app).await;
    let counted = ["misses", "hits", "coalesced", "stores"].map(|k| s[k].as_u64().unwrap());
    assert_eq!(counted, [1, 0, 4, 0], "{s}");
}

#[tokio::test]
async fn gateway_errors_after_the_cache_decision_say_what_it_was() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    // Re-hosting fails (the image link serves a web page): 502 for the caller and for those sharing its call.
    let failing = json!({"model": "dall-e-2", "prompt": "x #sleep=400 #image_url=/_fake/html", "size": "256x256"});
    let answers = futures::future::join_all((0..3).map(|_| app.post_json("/images/generations", &failing))).await;
    assert_eq!(fake.call_count(), 1);
    for res in &answers {
        assert_eq!((res.status().as_u16(), outcome_of(res).as_str()), (502, "miss"));
    }
    let rows = app.usage_rows(3).await;
    let billed = rows.iter().filter(|r| r["cost_usd"].as_f64().unwrap() > 0.0).count();
    assert_eq!(billed, 1, "the upstream billed one call; the waiters cost nothing: {rows:?}");
    assert!(rows.iter().all(|r| r["cache_hit"].as_i64() == Some(0) && r["status"].as_i64() == Some(502)));

    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("cache-control", "no-store")
        .json(&failing)
        .send()
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), outcome_of(&res).as_str()), (502, "bypass"));

    // Errors before the decision (validation here) carry no cache header.
    let invalid = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "x", "n": 0})).await;
    assert_eq!((invalid.status().as_u16(), outcome_of(&invalid).as_str()), (400, ""));

    // An upstream nobody answers on.
    let unreachable = TestApp::spawn_with("http://127.0.0.1:1/v1", |s| s.cache.enabled = true).await;
    let res = unreachable.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x"})).await;
    assert_eq!((res.status().as_u16(), outcome_of(&res).as_str()), (502, "miss"));
}

#[tokio::test]
async fn the_first_callers_upstream_call_completes_stores_and_is_recorded_when_it_disconnects() {
    let fake = FakeOpenAi::start().await;
    let app = cached_app(&fake).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let give_up = |body: Value| {
        let request = impatient.post(format!("{}/images/generations", app.base_url)).bearer_auth(&app.key).json(&body);
        async move { assert!(request.send().await.is_err(), "the caller gave up before the answer") }
    };

    // Nobody else asks: the call still completes, is recorded with its cost, and its answer is stored.
    let alone = json!({"model": "gpt-image-1", "prompt": "a patient fox #sleep=600"});
    give_up(alone.clone()).await;
    let rows = app.usage_rows(1).await;
    assert_eq!(rows.len(), 1, "the abandoned call is recorded");
    assert_eq!((rows[0]["status"].as_i64(), rows[0]["cache_hit"].as_i64()), (Some(200), Some(0)));
    assert!(rows[0]["cost_usd"].as_f64().unwrap() > 0.0, "{}", rows[0]);
    assert_eq!(post(&app, &app.key, &alone, None).await.1, "hit");
    assert_eq!(fake.call_count(), 1);

    // An identical request arriving while the abandoned call runs joins it instead of calling again.
    let joined = json!({"model": "gpt-image-1", "prompt": "a joined fox #sleep=800"});
    give_up(joined.clone()).await;
    let (status, outcome, first) = post(&app, &app.key, &joined, None).await;
    assert_eq!((status, outcome.as_str()), (200, "hit"));
    let (_, outcome, later) = post(&app, &app.key, &joined, None).await;
    assert_eq!((outcome.as_str(), &later), ("hit", &first));
    assert_eq!(fake.call_count(), 2, "one upstream call per request, although their callers went away");
    let rows = app.usage_rows(5).await;
    let billed = rows.iter().filter(|r| r["cost_usd"].as_f64().unwrap() > 0.0).count();
    assert_eq!((rows.len(), billed), (5, 2), "{rows:?}");
}

#[tokio::test]
async fn an_answer_holding_an_upstream_link_is_never_stored() {
    let fake = FakeOpenAi::start().await;
    // Re-hosting off: DALL·E answers carry the upstream's expiring links and are not cached; base64 is.
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.images.rehost = false;
    })
    .await;
    let dalle = json!({"model": "dall-e-2", "prompt": "a harbour", "size": "256x256"});
    let (_, first, answer) = post(&app, &app.key, &dalle, None).await;
    assert!(answer["data"][0]["url"].as_str().unwrap().starts_with(&fake.base), "{answer}");
    assert_eq!((first.as_str(), post(&app, &app.key, &dalle, None).await.1.as_str()), ("miss", "miss"));
    assert_eq!(fake.call_count(), 2);
    let gpt = json!({"model": "gpt-image-1", "prompt": "a harbour"});
    assert_eq!(post(&app, &app.key, &gpt, None).await.1, "miss");
    assert_eq!(post(&app, &app.key, &gpt, None).await.1, "hit", "base64 does not expire");
    assert_eq!(stats(&app).await["stores"].as_u64(), Some(1));

    // A download that fails with the tenant's pass-through fallback hands on the upstream's link: not stored.
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.images.on_download_error = imagegate::domain::DownloadFallback::PassThrough;
    })
    .await;
    let passed = json!({"model": "dall-e-2", "prompt": "y #image_url=/_fake/html", "size": "256x256"});
    let (status, first, answer) = post(&app, &app.key, &passed, None).await;
    assert_eq!(
        (status, answer["data"][0]["url"].as_str().unwrap()),
        (200, format!("{}/_fake/html", fake.base).as_str())
    );
    assert_eq!((first.as_str(), post(&app, &app.key, &passed, None).await.1.as_str()), ("miss", "miss"));
    assert_eq!(stats(&app).await["stores"].as_u64(), Some(0));
}

#[tokio::test]
async fn a_hit_hands_out_links_with_at_least_half_the_retention_left() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.images.retention = Duration::from_secs(4);
    })
    .await;
    let body = json!({"model": "dall-e-2", "prompt": "a short-lived pier", "size": "256x256"});
    let started = Instant::now();
    let mut outcomes = Vec::new();
    while started.elapsed() < Duration::from_millis(3500) {
        let (status, outcome, answer) = post(&app, &app.key, &body, None).await;
        assert_eq!(status, 200);
        let left = life_left(answer["data"][0]["url"].as_str().unwrap());
        assert!(left >= 1.9, "a {outcome} handed out a link with {left:.2} s left of a 4 s retention");
        outcomes.push(outcome);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let misses = outcomes.iter().filter(|o| *o == "miss").count();
    assert!(misses >= 2 && outcomes.iter().any(|o| o == "hit"), "entries expired before their links: {outcomes:?}");
    assert_eq!(fake.call_count(), misses);
}

#[tokio::test]
async fn a_shared_entry_never_gives_a_tenant_links_shorter_than_its_own_retention() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.cache.scope = imagegate::domain::Scope::Shared;
        s.images.retention = Duration::from_secs(60);
        s.tenants[1].images.retention = Some(Duration::from_secs(3600));
    })
    .await;
    let body = json!({"model": "dall-e-3", "prompt": "one view, two retentions"});
    assert_eq!(post(&app, &app.key, &body, None).await.1, "miss");
    let (_, outcome, answer) = post(&app, &app.other_key, &body, None).await;
    assert_eq!(outcome, "miss", "a tenant keeping images an hour does not get links kept a minute");
    assert!(life_left(answer["data"][0]["url"].as_str().unwrap()) > 3500.0);
    assert_eq!(post(&app, &app.other_key, &body, None).await.1, "hit");
    assert_eq!(post(&app, &app.key, &body, None).await.1, "hit");
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn a_shared_scope_serves_every_tenant_that_opted_in() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.cache.scope = imagegate::domain::Scope::Shared;
    })
    .await;
    let body = json!({"model": "dall-e-3", "prompt": "a shared view"});
    let (_, first, a) = post(&app, &app.key, &body, None).await;
    let (_, second, b) = post(&app, &app.other_key, &body, None).await;
    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(a, b);
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn a_hit_spends_a_request_but_no_images() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.tenants[0].limits.images_per_minute = Some(2);
        s.tenants[0].limits.requests_per_minute = Some(4);
    })
    .await;
    let body = json!({"model": "dall-e-2", "prompt": "two", "n": 2, "size": "256x256"});

    assert_eq!(post(&app, &app.key, &body, None).await.0, 200);
    let (status, outcome, _) = post(&app, &app.key, &body, None).await;
    assert_eq!((status, outcome.as_str()), (200, "hit"), "the images budget is spent, yet the hit is served");
    let one_more = json!({"model": "dall-e-2", "prompt": "one more", "size": "256x256"});
    assert_eq!(post(&app, &app.key, &one_more, None).await.0, 429, "a miss needs images (a refusal spends nothing)");
    assert_eq!(post(&app, &app.key, &body, None).await.0, 200);
    assert_eq!(post(&app, &app.key, &body, None).await.0, 200, "the 4th request of the minute");
    assert_eq!(post(&app, &app.key, &body, None).await.0, 429, "every hit spends a request");
    let s = stats(&app).await;
    assert_eq!(
        (s["hits"].as_u64(), s["misses"].as_u64()),
        (Some(3), Some(1)),
        "refused requests count in neither: {s}"
    );
}

#[tokio::test]
async fn a_cached_link_still_serves_after_the_upstream_link_expired() {
    let fake =
        FakeOpenAi::start_with(FakeOptions { url_ttl: Some(Duration::from_secs(1)), ..Default::default() }).await;
    let app = cached_app(&fake).await;
    let body = json!({"model": "dall-e-2", "prompt": "a pier", "size": "256x256"});
    let (_, _, first) = post(&app, &app.key, &body, None).await;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, outcome, second) = post(&app, &app.key, &body, None).await;

    assert_eq!((outcome.as_str(), &second), ("hit", &first));
    let link = second["data"][0]["url"].as_str().unwrap();
    assert!(link.starts_with(&app.root), "the cache holds imagegate's link, not the upstream's: {link}");
    assert_eq!(app.client.get(link).send().await.unwrap().status(), 200);
    assert_eq!(fake.file_fetch_count(), 1);
}

#[tokio::test]
async fn memory_stays_within_the_configured_bound_when_filled_past_it() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.cache.max_bytes = bytesize::ByteSize::kib(64);
        s.cache.max_entry_bytes = bytesize::ByteSize::kib(64);
    })
    .await;
    for i in 0..40 {
        let body = json!({"model": "gpt-image-1", "prompt": format!("image {i}")});
        assert_eq!(post(&app, &app.key, &body, None).await.0, 200);
    }
    let s = stats(&app).await;
    assert!(s["bytes"].as_u64().unwrap() <= 64 * 1024, "{s}");
    assert!(s["evictions"].as_u64().unwrap() > 0, "{s}");
    assert!(s["entries"].as_u64().unwrap() < 40, "{s}");

    let res = app.client.delete(format!("{}/admin/v1/cache", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let after: Value = res.json().await.unwrap();
    assert_eq!(after["entries"].as_u64(), Some(0), "{after}");
}

const REDIS: &str = "redis://127.0.0.1:6379";

/// A fresh key prefix for one test's Redis entries.
fn redis_prefix() -> String {
    format!("igtest-{}", hex::encode(rand::random::<[u8; 6]>()))
}

/// Cache settings for a replica sharing `redis_url` under `prefix`.
fn on_redis(s: &mut imagegate::config::Settings, redis_url: &str, prefix: &str) {
    s.cache.enabled = true;
    s.cache.ttl = Duration::from_secs(60);
    s.cache.backend = imagegate::config::CacheBackend::Redis;
    s.cache.redis_url = Some(imagegate::config::Secret::new(redis_url));
    s.cache.redis_prefix = prefix.to_owned();
}

/// A second replica: same database and Redis, its own data directory and memory.
async fn second_replica(a: &TestApp, tweak: impl FnOnce(&mut imagegate::config::Settings)) -> TestApp {
    let mut settings = a.settings.clone();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    settings.storage.data_dir = dir.path().to_path_buf();
    tweak(&mut settings);
    a.replica(settings, dir).await
}

/// Delete every Redis key under `prefix` (the test's entries).
async fn delete_redis_keys(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL").arg(&keys).query_async::<()>(&mut conn).await.unwrap();
    }
}

/// A TCP proxy to the test Redis that can be switched into a black hole: connections stay open, but nothing
/// gets through in either direction (a network partition, or a Redis that hangs).
struct Proxy {
    url: String,
    blackhole: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(blackhole: bool) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let hole = Arc::new(AtomicBool::new(blackhole));
        let switch = hole.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:6379").await else { continue };
                let (from_client, to_client) = client.into_split();
                let (from_server, to_server) = server.into_split();
                tokio::spawn(Self::pump(from_client, to_server, hole.clone()));
                tokio::spawn(Self::pump(from_server, to_client, hole.clone()));
            }
        });
        Proxy { url, blackhole: switch }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        hole: Arc<AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if !hole.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

/// Wait (at most 3 s) until Redis holds `count` cache entries under `prefix`: writes run in tasks of their own.
async fn wait_for_redis_entries(prefix: &str, count: usize) {
    let mut conn = redis::Client::open(REDIS).unwrap().get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}:cache:*")).query_async(&mut conn).await.unwrap();
        if keys.len() >= count || Instant::now() > deadline {
            assert_eq!(keys.len(), count, "{keys:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll `app`'s cache counters until `check` holds (at most `within`).
async fn wait_for_stats(app: &TestApp, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = stats(app).await;
        if check(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn replicas_sharing_redis_serve_each_others_answers() {
    let fake = FakeOpenAi::start().await;
    let prefix = redis_prefix();
    let a = TestApp::spawn_with(&fake.url, |s| on_redis(s, REDIS, &prefix)).await;
    let b = second_replica(&a, |_| {}).await;
    for app in [&a, &b] {
        let s = wait_for_stats(app, Duration::from_secs(5), |s| s["shared_state"] == "up").await;
        assert_eq!(s["shared_state"], "up", "{s}");
    }

    let body = json!({"model": "gpt-image-1", "prompt": "one replica fetches"});
    let (_, first, answer_a) = post(&a, &a.key, &body, None).await;
    wait_for_redis_entries(&prefix, 1).await;
    let (_, second, answer_b) = post(&b, &b.key, &body, None).await;

    assert_eq!((first.as_str(), second.as_str()), ("miss", "hit"));
    assert_eq!(answer_a, answer_b);
    assert_eq!(fake.call_count(), 1);
    assert_eq!(stats(&b).await["shared_hits"].as_u64(), Some(1));
    delete_redis_keys(&prefix).await;
}

#[tokio::test]
async fn a_replica_starts_and_answers_at_full_speed_while_its_redis_hangs() {
    let fake = FakeOpenAi::start().await;
    let proxy = Proxy::start(true).await;
    let prefix = redis_prefix();
    let app = TestApp::spawn_with(&fake.url, |s| {
        on_redis(s, &proxy.url, &prefix);
        s.cache.redis_timeout = Duration::from_millis(300);
        s.cache.redis_backoff = Duration::from_secs(60);
    })
    .await;

    let started = Instant::now();
    for i in 0..10 {
        let (status, outcome, _) =
            post(&app, &app.key, &json!({"model": "gpt-image-1", "prompt": format!("hang {i}")}), None).await;
        assert_eq!((status, outcome.as_str()), (200, "miss"));
    }
    let elapsed = started.elapsed();
    // Waiting for Redis would cost each miss a read and a write deadline: 10 × 0.6 s.
    assert!(elapsed < Duration::from_millis(2500), "10 misses took {elapsed:?}");
    let s = stats(&app).await;
    assert!(s["shared_skipped"].as_u64().unwrap() >= 10, "{s}");
    assert_ne!(s["shared_state"], "up", "{s}");
}

#[tokio::test]
async fn a_failing_redis_is_skipped_after_a_few_failures_and_used_again_once_back() {
    let fake = FakeOpenAi::start().await;
    let proxy = Proxy::start(false).await;
    let prefix = redis_prefix();
    let a = TestApp::spawn_with(&fake.url, |s| {
        on_redis(s, &proxy.url, &prefix);
        s.cache.redis_timeout = Duration::from_millis(300);
        s.cache.redis_backoff = Duration::from_millis(500);
    })
    .await;
    let b = second_replica(&a, |s| s.cache.redis_url = Some(imagegate::config::Secret::new(REDIS))).await;
    for app in [&a, &b] {
        let s = wait_for_stats(app, Duration::from_secs(5), |s| s["shared_state"] == "up").await;
        assert_eq!(s["shared_state"], "up", "{s}");
    }

    // Redis hangs: the first calls wait out their deadline, then the circuit opens and misses stop waiting.
    proxy.set_blackhole(true);
    let mut took = Vec::new();
    for i in 0..8 {
        let started = Instant::now();
        let (status, _, _) =
            post(&a, &a.key, &json!({"model": "gpt-image-1", "prompt": format!("partition {i}")}), None).await;
        assert_eq!(status, 200);
        took.push(started.elapsed());
    }
    let s = stats(&a).await;
    assert!(s["shared_errors"].as_u64().unwrap() >= 3, "{s}");
    assert!(s["shared_skipped"].as_u64().unwrap() >= 1, "{s}");
    let total: Duration = took.iter().sum();
    assert!(total < Duration::from_millis(2000), "8 misses against a hung Redis took {took:?}");
    assert!(took[5..].iter().all(|t| *t < Duration::from_millis(300)), "the open circuit waits for nothing: {took:?}");

    // Redis is back: within the backoff the replica reconnects and shares its answers again.
    proxy.set_blackhole(false);
    let s = wait_for_stats(&a, Duration::from_secs(5), |s| s["shared_state"] == "up").await;
    assert_eq!(s["shared_state"], "up", "{s}");
    let body = json!({"model": "gpt-image-1", "prompt": "after the partition"});
    let (_, outcome, answer_a) = post(&a, &a.key, &body, None).await;
    assert_eq!(outcome, "miss");
    wait_for_redis_entries(&prefix, 1).await;
    let (_, outcome, answer_b) = post(&b, &b.key, &body, None).await;
    assert_eq!(answer_a, answer_b);
    assert_eq!(outcome, "hit", "replica B found A's answer in Redis");
    delete_redis_keys(&prefix).await;
}
