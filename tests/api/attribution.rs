//! Abuse attribution on the shared upstream account: OpenAI's `user` is an opaque id derived from the tenant
//! (and the caller's own `user`, within the tenant), and `Idempotency-Key` is scoped to the tenant.

use reqwest::multipart::{Form, Part};
use serde_json::json;

use crate::support::app::{TestApp, png};
use crate::support::fake_openai::FakeOpenAi;

async fn derived_gateway(fake: &FakeOpenAi) -> TestApp {
    TestApp::spawn_with(&fake.url, |s| s.attribution.end_user = imagegate::attribution::EndUser::Derived).await
}

async fn generate(app: &TestApp, key: &str, body: serde_json::Value) {
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(key)
        .header("idempotency-key", "same-key-everywhere")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

#[tokio::test]
async fn the_upstream_sees_a_stable_opaque_user_per_tenant_and_per_caller_user_never_a_name_or_key() {
    let fake = FakeOpenAi::start().await;
    let app = derived_gateway(&fake).await;
    let (a, b) = (app.key.clone(), app.other_key.clone());

    generate(&app, &a, json!({"model": "dall-e-2", "prompt": "one"})).await;
    generate(&app, &a, json!({"model": "dall-e-2", "prompt": "two"})).await;
    generate(&app, &b, json!({"model": "dall-e-2", "prompt": "three"})).await;
    generate(&app, &a, json!({"model": "dall-e-2", "prompt": "four", "user": "alice"})).await;
    generate(&app, &b, json!({"model": "dall-e-2", "prompt": "five", "user": "alice"})).await;

    let calls = fake.calls();
    let users: Vec<String> =
        calls.iter().map(|c| c.json.as_ref().unwrap()["user"].as_str().unwrap().to_owned()).collect();
    assert_eq!(users[0], users[1], "stable for a tenant");
    assert_ne!(users[0], users[2], "tenants are told apart");
    assert_ne!(users[3], users[0], "the caller's own user is told apart within the tenant");
    assert_ne!(users[3], users[4], "one tenant cannot speak as another's user");
    for (user, call) in users.iter().zip(&calls) {
        assert!(user.starts_with("ig-"), "{user}");
        for secret in ["team-a", "team-b", "alice", app.key.as_str(), app.other_key.as_str()] {
            assert!(!user.contains(secret), "{user} reveals {secret}");
            let body = call.json.as_ref().unwrap().to_string();
            assert!(!body.contains(&format!("\"{secret}\"")), "{body}");
        }
        // The same caller-chosen Idempotency-Key reaches the upstream as a different key per tenant.
        assert_ne!(call.header("idempotency-key"), Some("same-key-everywhere"));
    }
    assert_ne!(calls[0].header("idempotency-key"), calls[2].header("idempotency-key"));
    assert_eq!(calls[0].header("idempotency-key"), calls[1].header("idempotency-key"));
}

#[tokio::test]
async fn a_multipart_edit_carries_the_derived_user_and_a_pass_through_tenant_keeps_its_own() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.attribution.end_user = imagegate::attribution::EndUser::Derived;
        s.tenants[1].images.end_user = Some(imagegate::attribution::EndUser::PassThrough);
    })
    .await;
    let form = || {
        Form::new()
            .text("model", "dall-e-2")
            .text("prompt", "a hat")
            .text("user", "alice")
            .part("image", Part::bytes(png(64, 64, true)).file_name("a.png").mime_str("image/png").unwrap())
    };

    assert_eq!(app.post_form("/images/edits", form()).await.status(), 200);
    let res = app
        .client
        .post(format!("{}/images/edits", app.base_url))
        .bearer_auth(&app.other_key)
        .multipart(form())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let calls = fake.calls();
    let derived = calls[0].field("user").unwrap();
    assert!(derived.starts_with("ig-") && !derived.contains("alice"), "{derived}");
    assert_eq!(calls[0].parts.iter().filter(|p| p.name == "user").count(), 1);
    assert_eq!(calls[1].field("user").as_deref(), Some("alice"), "the pass-through tenant's own user");
}
