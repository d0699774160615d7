//! `POST /v1/images/generations`: forwarding, key injection, attribution, pass-through of answers.

use serde_json::json;

use crate::support::app::{TestApp, UPSTREAM_KEY, error_of};
use crate::support::fake_openai::FakeOpenAi;

#[tokio::test]
async fn gpt_image_generation_returns_the_upstream_answer_with_our_request_id() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "a red fox"})).await;

    assert_eq!(res.status(), 200);
    let ours = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(ours.starts_with("req_") && ours.len() == 36, "{ours}");
    let upstream_id = res.headers()["x-upstream-request-id"].to_str().unwrap().to_owned();
    assert_ne!(ours, upstream_id);
    assert!(res.headers().contains_key("openai-processing-ms"));
    assert!(res.headers().get("set-cookie").is_none(), "upstream cookies must stay behind the gateway");
    assert!(res.headers().get("openai-organization").is_none(), "upstream org must not leak");
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["created"].as_i64().unwrap() > 0);
    assert!(body["data"][0]["b64_json"].as_str().unwrap().len() > 10);
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn upstream_receives_its_own_key_and_never_the_tenant_key() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "x"})).await;
    assert_eq!(res.status(), 200);

    let call = &fake.calls()[0];
    assert_eq!(call.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()));
    for (name, value) in &call.headers {
        assert!(!value.contains(&app.key), "tenant key leaked upstream in {name}");
    }
}

#[tokio::test]
async fn unknown_and_null_fields_reach_the_upstream_unchanged() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let sent = json!({
        "model": "gpt-image-1",
        "prompt": "a lighthouse",
        "n": 2,
        "quality": null,
        "brand_new_param": {"nested": [1, 2, 3]},
        "seed": 42,
    });

    let res = app.post_json("/images/generations", &sent).await;

    assert_eq!(res.status(), 200);
    assert_eq!(fake.calls()[0].json.as_ref(), Some(&sent));
}

#[tokio::test]
async fn tenant_attribution_replaces_whatever_the_caller_sent() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("OpenAI-Organization", "org-someone-else")
        .header("Idempotency-Key", "idem-123")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let call = &fake.calls()[0];
    assert_eq!(call.header("openai-organization"), Some("org-team-a"));
    assert_eq!(call.header("openai-project"), Some("proj_team_a"));
    // The caller's key is forwarded scoped to its tenant (an opaque derivation), never as sent.
    let forwarded = call.header("idempotency-key").unwrap();
    assert!(forwarded.starts_with("ig-") && !forwarded.contains("idem-123"), "{forwarded}");
}

#[tokio::test]
async fn a_tenant_without_attribution_sends_none() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();

    assert_eq!(res.status(), 200);
    assert_eq!(fake.calls()[0].header("openai-organization"), None);
}

#[tokio::test]
async fn dall_e_answers_keep_their_revised_prompt_and_get_gateway_links() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "a boat"})).await;

    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/images/files/", app.root)), "re-hosted, not the upstream's: {url}");
    assert!(body["data"][0]["revised_prompt"].is_string());
}

#[tokio::test]
async fn the_sdk_base_url_without_v1_works_too() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app
        .client
        .post(format!("{}/images/generations", app.root))
        .bearer_auth(&app.key)
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();

    assert_eq!(res.status(), 200);
    assert_eq!(fake.calls()[0].path, "/v1/images/generations");
}

#[tokio::test]
async fn upstream_errors_pass_through_with_their_status_body_and_retry_headers() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.post_json("/images/generations", &json!({"prompt": "x #status=429"})).await;
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["retry-after-ms"], "1000");
    let (status, error) = error_of(res).await;
    assert_eq!(status, 429);
    assert_eq!(error["code"], "rate_limit_exceeded");

    let (status, error) =
        error_of(app.post_json("/images/generations", &json!({"prompt": "x #status=400"})).await).await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "content_policy_violation");

    let (status, error) =
        error_of(app.post_json("/images/generations", &json!({"prompt": "x #status=500"})).await).await;
    assert_eq!(status, 500);
    assert_eq!(error["type"], "server_error");
    assert_eq!(fake.call_count(), 3, "errors are passed on, never retried by the gateway");
}

#[tokio::test]
async fn an_unreachable_upstream_answers_502_in_openai_shape() {
    // Bind and drop a listener to get a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app = TestApp::spawn_with(&format!("http://127.0.0.1:{port}/v1"), |s| s.upstream.connect_retries = 1).await;

    let (status, error) = error_of(app.post_json("/images/generations", &json!({"prompt": "x"})).await).await;

    assert_eq!(status, 502);
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "upstream_unavailable");
}

#[tokio::test]
async fn a_slow_upstream_answers_504_after_the_configured_timeout() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.upstream.timeout = std::time::Duration::from_millis(300);
        s.server.request_timeout = std::time::Duration::from_secs(5);
    })
    .await;

    let (status, error) =
        error_of(app.post_json("/images/generations", &json!({"prompt": "x #sleep=3000"})).await).await;

    assert_eq!(status, 504);
    assert_eq!(error["code"], "timeout");
    assert_eq!(fake.call_count(), 1, "a timed-out request is never retried: it may have been billed");
}

#[tokio::test]
async fn the_upstream_timeout_covers_headers_and_body_together_and_asks_sdks_not_to_retry() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.upstream.timeout = std::time::Duration::from_millis(800);
        s.server.request_timeout = std::time::Duration::from_secs(10);
    })
    .await;

    // Headers after 500 ms, the body 500 ms later: each part within the timeout, the whole not.
    let started = std::time::Instant::now();
    let res = app.post_json("/images/generations", &json!({"prompt": "x #sleep=500 #body_delay=500"})).await;
    let elapsed = started.elapsed();

    assert_eq!(res.headers()["x-should-retry"], "false", "a retry could pay for the images again");
    let (status, error) = error_of(res).await;
    assert_eq!((status, error["code"].as_str()), (504, Some("timeout")));
    assert!(elapsed < std::time::Duration::from_millis(1000), "answered when the one deadline passed: {elapsed:?}");
    assert_eq!(fake.call_count(), 1);
    // Within the deadline, the same answer passes.
    let res = app.post_json("/images/generations", &json!({"prompt": "x #sleep=200 #body_delay=200"})).await;
    assert_eq!(res.status(), 200);
}
