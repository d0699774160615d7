//! Per-tenant limits on one replica (the in-process backend): refusals are whole, OpenAI-shaped 429s that
//! never reach the upstream; every answer carries the `x-ratelimit-*` headers; budgets tell SDKs not to retry;
//! what a request reserved and did not use (failures, fewer images, coalesced answers) is given back.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::{ADMIN_TOKEN, TestApp, error_of};
use crate::support::fake_openai::FakeOpenAi;

fn limits(v: Value) -> imagegate::domain::Limits {
    serde_json::from_value(v).unwrap()
}

/// A gateway whose first tenant has the limits `plan`.
async fn limited(fake: &FakeOpenAi, plan: Value) -> TestApp {
    TestApp::spawn_with(&fake.url, |s| s.tenants[0].limits = limits(plan)).await
}

fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

/// `x-ratelimit-remaining-requests` and `-images` of a response.
fn remaining(res: &reqwest::Response) -> (Option<u64>, Option<u64>) {
    let read = |name| header(res, name).map(|v| v.parse().unwrap());
    (read("x-ratelimit-remaining-requests"), read("x-ratelimit-remaining-images"))
}

/// The buckets as they stand, read from a request that spends nothing (a validation 400 carries them).
async fn buckets(app: &TestApp) -> (Option<u64>, Option<u64>) {
    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 0})).await;
    assert_eq!(res.status(), 400);
    remaining(&res)
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    let res = app.client.get(format!("{}/admin/v1{path}", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200, "{path}");
    res.json().await.unwrap()
}

/// Requests whose usage rows are written (the ledger writes off the request path).
async fn settled(app: &TestApp, rows: usize) -> Vec<Value> {
    let rows = app.usage_rows(rows).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    rows
}

#[tokio::test]
async fn a_tenant_gets_exactly_its_requests_per_minute_then_openai_shaped_429s() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"requests_per_minute": 3})).await;

    for (remaining, reset) in [("2", "20s"), ("1", "40s"), ("0", "1m0s")] {
        let res = app.post_json("/images/generations", &json!({"prompt": "x"})).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], remaining);
        let actual = header(&res, "x-ratelimit-reset-requests").unwrap();
        // Go durations at ms precision: a few ms may pass between requests.
        assert!(actual == reset || actual.ends_with('s'), "{actual} vs {reset}");
    }
    let res = app.post_json("/images/generations", &json!({"prompt": "x"})).await;
    assert_eq!(res.headers()["retry-after"], "20");
    assert!(res.headers()["retry-after-ms"].to_str().unwrap().parse::<u64>().unwrap() > 19_000);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
    assert!(res.headers().get("x-should-retry").is_none(), "a rate limit is worth retrying");
    let (status, error) = error_of(res).await;
    assert_eq!(status, 429);
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("requests"), Some("rate_limit_exceeded")));
    assert_eq!(fake.call_count(), 3, "the refused request never reached the upstream");

    // The other tenant has no limits and is not affected.
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("x-ratelimit-limit-requests").is_none());

    let rows = settled(&app, 5).await;
    let refused: Vec<_> = rows.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["refused_by"], "gateway", "the ledger says who refused");
    let stats = admin_get(&app, "/limits").await;
    assert_eq!(stats["refusals"]["requests_per_minute"], 1, "{stats}");
    assert_eq!((stats["backend"].as_str(), stats["upstream_rate_limited"].as_u64()), (Some("local"), Some(0)));
}

#[tokio::test]
async fn images_per_minute_are_weighted_by_n_and_a_refusal_spends_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"requests_per_minute": 10, "images_per_minute": 5})).await;

    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 4})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-images"], "1");
    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 2})).await;
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "9", "the refused request spent no request");
    assert_eq!(error_of(res).await.0, 429);
    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 1})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "8");
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn a_request_larger_than_the_burst_is_told_it_can_never_fit() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"images_per_minute": 10, "images_burst": 3})).await;
    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 4})).await;
    assert_eq!(res.headers()["x-should-retry"], "false", "retrying can never help");
    assert!(res.headers().get("retry-after").is_none());
    let (status, error) = error_of(res).await;
    assert_eq!(status, 429);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("needs 4 at once") && message.contains("at most 3"), "{message}");
    assert!(!message.contains("18446744073709552"), "{message}");
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn concurrent_requests_beyond_the_limit_are_refused_while_others_run() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"concurrent_requests": 2})).await;
    let url = format!("{}/images/generations", app.base_url);
    let slow = |client: reqwest::Client, url: String, key: String| async move {
        client.post(url).bearer_auth(key).json(&json!({"prompt": "x #sleep=800"})).send().await.unwrap().status()
    };
    let a = tokio::spawn(slow(app.client.clone(), url.clone(), app.key.clone()));
    let b = tokio::spawn(slow(app.client.clone(), url.clone(), app.key.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let res = app.post_json("/images/generations", &json!({"prompt": "x"})).await;
    assert_eq!(res.headers()["retry-after"], "1");
    let (status, error) = error_of(res).await;
    assert_eq!(status, 429);
    assert!(error["message"].as_str().unwrap().contains("concurrent requests"));
    assert_eq!((a.await.unwrap(), b.await.unwrap()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 200, "slots are released");
}

#[tokio::test]
async fn a_spent_budget_answers_429_that_sdks_must_not_retry() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"images_per_day": 3})).await;

    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x", "n": 2})).await.status(), 200);
    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 2})).await;
    assert_eq!(res.headers()["x-should-retry"], "false");
    assert!(res.headers().get("retry-after").is_none());
    let (status, error) = error_of(res).await;
    assert_eq!(status, 429);
    assert_eq!(error["code"], "insufficient_quota");
    assert!(error["message"].as_str().unwrap().contains("images per day"));
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x", "n": 1})).await.status(), 200);
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn a_usd_budget_reserves_the_cost_before_the_call_and_counts_the_real_cost_after() {
    let fake = FakeOpenAi::start().await;
    // dall-e-3 standard 1024x1024 costs $0.04: two fit $0.10, a third does not (0.12 > 0.10).
    let app = limited(&fake, json!({"usd_per_month": 0.10})).await;
    let body = |i: u32| json!({"model": "dall-e-3", "prompt": format!("x {i}")});

    assert_eq!(app.post_json("/images/generations", &body(1)).await.status(), 200);
    assert_eq!(app.post_json("/images/generations", &body(2)).await.status(), 200);
    let res = app.post_json("/images/generations", &body(3)).await;
    assert_eq!(res.headers()["x-should-retry"], "false");
    let (status, error) = error_of(res).await;
    assert_eq!((status, error["code"].as_str()), (429, Some("insufficient_quota")));
    assert!(error["message"].as_str().unwrap().contains("USD per month"));
    // $0.02 left: nothing priced above it passes, and the upstream never saw the refusals.
    let big = json!({"model": "dall-e-3", "prompt": "x", "n": 1, "quality": "hd"});
    assert_eq!(error_of(app.post_json("/images/generations", &big).await).await.0, 429);
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn concurrent_requests_cannot_overspend_a_usd_budget() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"usd_per_day": 0.05})).await;
    let url = format!("{}/images/generations", app.base_url);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let request = app
            .client
            .post(&url)
            .bearer_auth(&app.key)
            .json(&json!({"model": "dall-e-3", "prompt": format!("x {i} #sleep=300")}));
        tasks.push(tokio::spawn(async move { request.send().await.unwrap().status().as_u16() }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429, 429, 429, 429, 429, 429, 429, 429, 429], "exactly one $0.04 image fits $0.05");
    assert_eq!(fake.call_count(), 1);

    // One request for ten images is refused whole, before the upstream is called.
    let res = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "y", "n": 10})).await;
    let (status, error) = error_of(res).await;
    assert_eq!((status, error["code"].as_str()), (429, Some("insufficient_quota")));
    assert_eq!(fake.call_count(), 1);
    let rows = settled(&app, 11).await;
    let spent: f64 = rows.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((spent - 0.04).abs() < 1e-9, "{spent}");
}

#[tokio::test]
async fn the_default_plan_applies_to_tenants_without_limits_of_their_own() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.limits.default = limits(json!({"requests_per_minute": 1}));
        s.tenants[0].limits = limits(json!({"requests_per_minute": 5}));
    })
    .await;
    let other = |app: &TestApp| {
        app.client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(&app.other_key)
            .json(&json!({"prompt": "x"}))
            .send()
    };

    assert_eq!(other(&app).await.unwrap().status(), 200);
    assert_eq!(other(&app).await.unwrap().status(), 429, "team-b falls back to the default plan");
    for _ in 0..5 {
        assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 200);
    }
}

#[tokio::test]
async fn upstream_429s_pass_through_and_are_not_counted_against_the_tenant() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"requests_per_minute": 10, "images_per_minute": 10, "images_per_day": 2})).await;

    for _ in 0..3 {
        let res = app.post_json("/images/generations", &json!({"prompt": "x #status=429", "n": 2})).await;
        assert_eq!(res.headers()["retry-after"], "1", "the upstream's own retry-after");
        let (status, error) = error_of(res).await;
        assert_eq!((status, error["code"].as_str()), (429, Some("rate_limit_exceeded")));
        assert!(
            error["message"].as_str().unwrap().contains("images per minute in organization"),
            "the upstream's own message"
        );
    }
    assert_eq!(fake.call_count(), 3, "the budget of 2 images did not refuse the retries");
    // Nothing was spent: the request, the images and the budget all came back.
    assert_eq!(buckets(&app).await, (Some(10), Some(10)));
    let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 2})).await;
    assert_eq!(res.status(), 200, "the daily budget is intact");
    assert_eq!(remaining(&res), (Some(9), Some(8)));

    let rows = settled(&app, 5).await;
    let upstream: Vec<_> = rows.iter().filter(|r| r["refused_by"] == "upstream").collect();
    assert_eq!(upstream.len(), 3, "{rows:?}");
    assert!(upstream.iter().all(|r| r["status"] == 429 && r["cost_usd"].as_f64() == Some(0.0)));
    let stats = admin_get(&app, "/limits").await;
    assert_eq!(stats["upstream_rate_limited"], 3, "{stats}");
    assert_eq!(stats["requests_given_back"], 3, "{stats}");
    let usage = admin_get(&app, "/usage?tenant=team-a").await;
    let row = &usage["data"][0];
    assert_eq!((row["upstream_rate_limited"].as_i64(), row["refused"].as_i64()), (Some(3), Some(0)), "{usage}");
}

#[tokio::test]
async fn upstream_failures_give_the_images_back_but_keep_the_request() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"requests_per_minute": 10, "images_per_minute": 10, "images_per_day": 4})).await;
    for (i, status) in [500, 502, 400].into_iter().enumerate() {
        let res = app.post_json("/images/generations", &json!({"prompt": format!("x #status={status}"), "n": 4})).await;
        assert_eq!(res.status(), status);
        assert_eq!(remaining(&res), (Some(9 - i as u64), Some(6)), "headers describe this request's reservation");
        let after = buckets(&app).await;
        assert_eq!(
            after,
            (Some(9 - i as u64), Some(10)),
            "after a {status}: the images came back, the request did not"
        );
    }
    // The daily budget of 4 images is untouched: four images still fit.
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x", "n": 4})).await.status(), 200);
    let rows = settled(&app, 7).await;
    assert!(rows.iter().filter(|r| r["status"] != 200).all(|r| r["cost_usd"].as_f64() == Some(0.0)));
}

#[tokio::test]
async fn fewer_images_than_asked_give_the_rest_back() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"images_per_minute": 10, "images_per_day": 5})).await;
    let res =
        app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x #count=1", "n": 4})).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(buckets(&app).await.1, Some(9), "three of four images came back");
    // 1 of 5 spent today: four more fit, five do not.
    let over = app.post_json("/images/generations", &json!({"prompt": "y", "n": 5})).await;
    assert_eq!(error_of(over).await.1["code"], "insufficient_quota");
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "y", "n": 4})).await.status(), 200);
}

#[tokio::test]
async fn an_unreachable_upstream_gives_everything_back_and_keeps_the_headers() {
    // Nothing listens on this port: every call fails to connect.
    let app = TestApp::spawn_with("http://127.0.0.1:9/v1", |s| {
        s.upstream.connect_retries = 0;
        s.tenants[0].limits = limits(json!({"requests_per_minute": 3, "images_per_minute": 4, "images_per_day": 2}))
    })
    .await;
    for _ in 0..5 {
        let res = app.post_json("/images/generations", &json!({"prompt": "x", "n": 2})).await;
        assert_eq!(remaining(&res), (Some(2), Some(2)), "a 502 carries its reservation's headers");
        let (status, error) = error_of(res).await;
        assert_eq!((status, error["code"].as_str()), (502, Some("upstream_unavailable")));
    }
    assert_eq!(buckets(&app).await, (Some(3), Some(4)), "five requests, none spent: the upstream never saw them");
}

#[tokio::test]
async fn identical_requests_served_by_one_upstream_call_spend_one_request_each_and_no_images() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.tenants[0].limits = limits(json!({"requests_per_minute": 20, "images_per_minute": 3}))
    })
    .await;
    let url = format!("{}/images/generations", app.base_url);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let body = json!({"prompt": "same #sleep=300", "response_format": "b64_json"});
        let request = app.client.post(&url).bearer_auth(&app.key).json(&body);
        tasks.push(tokio::spawn(async move {
            let res = request.send().await.unwrap();
            (res.status().as_u16(), header(&res, "x-imagegate-cache").map(str::to_owned))
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    assert_eq!(fake.call_count(), 1);
    assert_eq!(buckets(&app).await, (Some(14), Some(2)), "six requests spent, one image");
    // A later hit spends a request, no image, and passes even with the image bucket empty.
    for i in 0..2 {
        assert_eq!(app.post_json("/images/generations", &json!({"prompt": format!("x{i}")})).await.status(), 200);
    }
    assert_eq!(buckets(&app).await.1, Some(0));
    let hit = app
        .post_json("/images/generations", &json!({"prompt": "same #sleep=300", "response_format": "b64_json"}))
        .await;
    assert_eq!((hit.status().as_u16(), header(&hit, "x-imagegate-cache")), (200, Some("hit")));
}

#[tokio::test]
async fn a_cached_answer_passes_a_spent_usd_budget() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.tenants[0].limits = limits(json!({"usd_per_day": 0.04}))
    })
    .await;
    let body = json!({"model": "dall-e-3", "prompt": "x", "response_format": "b64_json"});
    assert_eq!(app.post_json("/images/generations", &body).await.status(), 200);
    let other = json!({"model": "dall-e-3", "prompt": "y"});
    assert_eq!(error_of(app.post_json("/images/generations", &other).await).await.0, 429, "the budget is spent");
    let hit = app.post_json("/images/generations", &body).await;
    assert_eq!((hit.status().as_u16(), header(&hit, "x-imagegate-cache")), (200, Some("hit")), "a hit costs nothing");
}

#[tokio::test]
async fn every_answer_of_the_image_routes_carries_the_rate_limit_headers() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.upstream.timeout = Duration::from_secs(1);
        s.tenants[0].limits = limits(json!({"requests_per_minute": 5, "images_per_minute": 8}));
        s.tenants[0].allowed_models = Some(vec!["gpt-image-1".into()]);
    })
    .await;
    let cases = [
        (json!({"model": "gpt-image-1", "prompt": "x", "n": 99}), 400),
        (json!({"model": "dall-e-3", "prompt": "x"}), 403),
        (json!({"model": "gpt-image-1", "prompt": "x #status=500"}), 500),
        (json!({"model": "gpt-image-1", "prompt": "x #sleep=3000"}), 504),
        (json!({"model": "gpt-image-1", "prompt": "x"}), 200),
    ];
    for (body, status) in cases {
        let res = app.post_json("/images/generations", &body).await;
        assert_eq!(res.status(), status, "{body}");
        for name in ["limit", "remaining", "reset"] {
            for unit in ["requests", "images"] {
                assert!(header(&res, &format!("x-ratelimit-{name}-{unit}")).is_some(), "{status}: no {name}-{unit}");
            }
        }
    }
    // The ones before the reservation spent nothing.
    assert_eq!(buckets(&app).await.0, Some(2));
    // A body that cannot be read is refused before the pipeline, with the headers too.
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), Some("2"));
}

#[tokio::test]
async fn unpriced_models_cannot_bypass_a_usd_budget() {
    let fake = FakeOpenAi::start().await;
    let app = limited(&fake, json!({"usd_per_day": 5.0})).await;
    let body = json!({"model": "my-azure-deployment", "prompt": "x"});
    let (status, error) = error_of(app.post_json("/images/generations", &body).await).await;
    assert_eq!((status, error["param"].as_str(), error["code"].as_str()), (400, Some("model"), Some("unpriced_model")));
    assert!(error["message"].as_str().unwrap().contains("my-azure-deployment"));
    assert_eq!(fake.call_count(), 0);
    // A tenant without a USD budget may use it (at cost 0: the default `pricing.unpriced = "zero"`).
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn unpriced_models_can_be_refused_or_billed_as_a_priced_model() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.pricing.unpriced = imagegate::pricing::Unpriced::Reject).await;
    let body = json!({"model": "my-azure-deployment", "prompt": "x"});
    let (status, error) = error_of(app.post_json("/images/generations", &body).await).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("model")));
    assert_eq!(fake.call_count(), 0);

    let app = TestApp::spawn_with(&fake.url, |s| {
        s.pricing.unpriced = imagegate::pricing::Unpriced::BillAs("dall-e-3".into());
        s.tenants[0].limits = limits(json!({"usd_per_day": 0.05}));
    })
    .await;
    assert_eq!(app.post_json("/images/generations", &body).await.status(), 200);
    let (status, error) = error_of(app.post_json("/images/generations", &body).await).await;
    assert_eq!((status, error["code"].as_str()), (429, Some("insufficient_quota")), "billed $0.04 like dall-e-3");
    let rows = settled(&app, 2).await;
    assert!((rows[0]["cost_usd"].as_f64().unwrap() - 0.04).abs() < 1e-12, "{rows:?}");
}

#[tokio::test]
async fn budgets_survive_a_restart_with_the_same_spend() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.cache.enabled = true;
        s.tenants[0].limits = limits(json!({"images_per_day": 5}));
        s.tenants[1].limits = limits(json!({"usd_per_day": 0.12}));
    })
    .await;
    let b = |app: &TestApp, body: Value| {
        app.client.post(format!("{}/images/generations", app.base_url)).bearer_auth(&app.other_key).json(&body).send()
    };
    // team-a: 2 images, a failure, a cache hit of the same 2 images, 1 image: 3 spent.
    let a_ok = json!({"prompt": "kept", "n": 2, "response_format": "b64_json"});
    assert_eq!(app.post_json("/images/generations", &a_ok).await.status(), 200);
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x #status=500", "n": 2})).await.status(), 500);
    assert_eq!(app.post_json("/images/generations", &a_ok).await.headers()["x-imagegate-cache"], "hit");
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "one"})).await.status(), 200);
    // team-b: $0.04 twice, a failure, a hit: $0.08 spent.
    let b_ok = json!({"model": "dall-e-3", "prompt": "kept", "response_format": "b64_json"});
    assert_eq!(b(&app, b_ok.clone()).await.unwrap().status(), 200);
    assert_eq!(b(&app, json!({"model": "dall-e-3", "prompt": "x #status=500"})).await.unwrap().status(), 500);
    assert_eq!(b(&app, b_ok.clone()).await.unwrap().headers()["x-imagegate-cache"], "hit");
    assert_eq!(b(&app, json!({"model": "dall-e-3", "prompt": "two"})).await.unwrap().status(), 200);

    // Probes that spend nothing (they fail upstream, which gives everything back): what fits tells the spend.
    async fn probe_images(app: &TestApp) -> (u16, u16) {
        let mut out = Vec::new();
        for n in [3, 2] {
            let body = json!({"prompt": "probe #status=500", "n": n});
            out.push(app.post_json("/images/generations", &body).await.status().as_u16());
        }
        (out[0], out[1])
    }
    async fn probe_usd(app: &TestApp) -> (u16, u16) {
        let mut out = Vec::new();
        for quality in ["hd", "standard"] {
            let body = json!({"model": "dall-e-3", "prompt": "probe #status=500", "quality": quality});
            let res = app
                .client
                .post(format!("{}/images/generations", app.base_url))
                .bearer_auth(&app.other_key)
                .json(&body)
                .send()
                .await
                .unwrap();
            out.push(res.status().as_u16());
        }
        (out[0], out[1])
    }
    let before = (probe_images(&app).await, probe_usd(&app).await);
    assert_eq!(before, ((429, 500), (429, 500)), "3 of 5 images and $0.08 of $0.12 spent");
    settled(&app, 12).await;

    let app = app.restart().await;
    let after = (probe_images(&app).await, probe_usd(&app).await);
    assert_eq!(after, before, "the same spend after the restart, read back from the ledger");
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "last", "n": 2})).await.status(), 200);
    assert_eq!(error_of(app.post_json("/images/generations", &json!({"prompt": "more"})).await).await.0, 429);
}

#[tokio::test]
async fn a_budget_added_after_the_tenant_was_seen_starts_from_what_it_spent() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    // Spent before any budget existed: 3 images and $0.08 (dall-e-3 twice, then n=1 gpt-image-1).
    for body in [
        json!({"model": "dall-e-3", "prompt": "a"}),
        json!({"model": "dall-e-3", "prompt": "b"}),
        json!({"model": "gpt-image-1", "prompt": "c", "quality": "low"}),
    ] {
        assert_eq!(app.post_json("/images/generations", &body).await.status(), 200);
    }
    settled(&app, 3).await;
    let res = app
        .client
        .patch(format!("{}/admin/v1/tenants/team-a", app.root))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"limits": {"images_per_day": 4, "usd_per_day": 0.15}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let over = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "d", "n": 2})).await;
    assert_eq!(error_of(over).await.1["message"].as_str().map(|m| m.contains("images per day")), Some(true));
    let over =
        app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "e", "quality": "hd"})).await;
    let message = error_of(over).await.1["message"].as_str().unwrap().to_owned();
    assert!(message.contains("USD per day"), "$0.08 + ~$0.011 + $0.08 (hd) > $0.15: {message}");
    assert_eq!(app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "f"})).await.status(), 200);
}
