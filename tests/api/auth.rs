//! Tenant authentication: every failure is a 401 in OpenAI's shape and never reaches the upstream.

use serde_json::json;

use crate::support::app::{TestApp, error_of};
use crate::support::fake_openai::FakeOpenAi;

async fn post_with(app: &TestApp, auth: Option<&str>) -> reqwest::Response {
    let mut req = app.client.post(format!("{}/images/generations", app.base_url)).json(&json!({"prompt": "x"}));
    if let Some(value) = auth {
        req = req.header("authorization", value);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_get_401_and_no_upstream_call() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let forged = format!("{}{}", &app.key[..12], "Z".repeat(32));

    for auth in [
        None,
        Some("Basic dXNlcjpwYXNz".to_owned()),
        Some("Bearer sk-a-real-openai-key".to_owned()),
        Some("Bearer ig_zzzzzzzz_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_owned()),
        Some(format!("Bearer {forged}")),
    ] {
        let res = post_with(&app, auth.as_deref()).await;
        assert!(res.headers().contains_key("x-request-id"));
        let (status, error) = error_of(res).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], "invalid_api_key");
    }
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn a_valid_key_for_either_tenant_is_accepted() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    assert_eq!(post_with(&app, Some(&format!("Bearer {}", app.key))).await.status(), 200);
    assert_eq!(post_with(&app, Some(&format!("Bearer {}", app.other_key))).await.status(), 200);
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn health_probes_need_no_key() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.client.get(format!("{}/healthz", app.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(format!("{}/readyz", app.root)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ready");
}
