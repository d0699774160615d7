//! Per-tenant limits on one replica (the in-process backend): refusals are whole, OpenAI-shaped 429s that
//! never reach the upstream; every answer carries the `x-ratelimit-*` headers; budgets tell SDKs not to retry.

use serde_json::json;

use crate::support::app::{TestApp, error_of};
use crate::support::fake_openai::FakeOpenAi;

fn limits(v: serde_json::Value) -> imagegate::tenants::Limits {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn a_tenant_gets_exactly_its_requests_per_minute_then_openai_shaped_429s() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].limits = limits(json!({"requests_per_minute": 3}))).await;

    for remaining in ["2", "1", "0"] {
        let res = app.post_json("/images/generations", &json!({"prompt": "x"})).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], remaining);
        assert!(res.headers()["x-ratelimit-reset-requests"].to_str().unwrap().ends_with('s'));
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
}

#[tokio::test]
async fn images_per_minute_are_weighted_by_n_and_a_refusal_spends_nothing() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.tenants[0].limits = limits(json!({"requests_per_minute": 10, "images_per_minute": 5}))
    })
    .await;

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
async fn concurrent_requests_beyond_the_limit_are_refused_while_others_run() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].limits = limits(json!({"concurrent_requests": 2}))).await;
    let url = format!("{}/images/generations", app.base_url);
    let slow = |client: reqwest::Client, url: String, key: String| async move {
        client.post(url).bearer_auth(key).json(&json!({"prompt": "x #sleep=800"})).send().await.unwrap().status()
    };
    let a = tokio::spawn(slow(app.client.clone(), url.clone(), app.key.clone()));
    let b = tokio::spawn(slow(app.client.clone(), url.clone(), app.key.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let (status, _) = error_of(app.post_json("/images/generations", &json!({"prompt": "x"})).await).await;
    assert_eq!(status, 429);
    assert_eq!((a.await.unwrap(), b.await.unwrap()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "x"})).await.status(), 200, "slots are released");
}

#[tokio::test]
async fn a_spent_budget_answers_429_that_sdks_must_not_retry() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].limits = limits(json!({"images_per_day": 3}))).await;

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
async fn a_usd_budget_counts_the_estimated_cost_of_finished_requests() {
    let fake = FakeOpenAi::start().await;
    // dall-e-3 standard 1024x1024 costs $0.04: the third request finds $0.08 spent of $0.06.
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].limits = limits(json!({"usd_per_month": 0.06}))).await;
    let body = json!({"model": "dall-e-3", "prompt": "x"});

    assert_eq!(app.post_json("/images/generations", &body).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(app.post_json("/images/generations", &body).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, error) = error_of(app.post_json("/images/generations", &body).await).await;
    assert_eq!((status, error["code"].as_str()), (429, Some("insufficient_quota")));
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
    let app =
        TestApp::spawn_with(&fake.url, |s| s.tenants[0].limits = limits(json!({"requests_per_minute": 10}))).await;

    let res = app.post_json("/images/generations", &json!({"prompt": "x #status=429"})).await;
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "9", "our headers describe the tenant's bucket");
    let (status, error) = error_of(res).await;
    assert_eq!((status, error["code"].as_str()), (429, Some("rate_limit_exceeded")));
    assert!(
        error["message"].as_str().unwrap().contains("images per minute in organization"),
        "the upstream's own message"
    );
}
