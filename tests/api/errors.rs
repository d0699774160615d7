//! Bad input: clear OpenAI-shaped errors with the right status, and no upstream call.

use serde_json::json;

use crate::support::app::{TestApp, error_of};
use crate::support::fake_openai::FakeOpenAi;

#[tokio::test]
async fn an_oversized_json_body_gets_413_stating_the_limit() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_json_body = bytesize::ByteSize::kib(64)).await;

    let big = "x".repeat(100 * 1024);
    let (status, error) = error_of(app.post_json("/images/generations", &json!({"prompt": big})).await).await;

    assert_eq!(status, 413);
    assert!(error["message"].as_str().unwrap().contains("65536"), "{error}");
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_without_content_length() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_json_body = bytesize::ByteSize::kib(8)).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..20).map(|_| Ok(vec![b' '; 1024])).collect();

    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();

    assert_eq!(error_of(res).await.0, 413);
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn malformed_json_and_wrong_content_types_get_400() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let url = format!("{}/images/generations", app.base_url);

    let cases: Vec<(&str, &str, &str)> = vec![
        ("application/json", "{\"prompt\": ", "could not parse the JSON body"),
        ("application/json", "[\"not\", \"an object\"]", "must be a JSON object"),
        ("text/plain", "{\"prompt\": \"x\"}", "Content-Type"),
        ("multipart/form-data; boundary=x", "--x--", "Content-Type"),
    ];
    for (ct, body, needle) in cases {
        let res =
            app.client.post(&url).bearer_auth(&app.key).header("content-type", ct).body(body).send().await.unwrap();
        let (status, error) = error_of(res).await;
        assert_eq!(status, 400, "{ct} {body}");
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["message"].as_str().unwrap().contains(needle), "{error}");
    }
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_openai_shape() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.client.post(format!("{}/images/upscale", app.base_url)).bearer_auth(&app.key).send().await.unwrap();
    let (status, error) = error_of(res).await;
    assert_eq!(status, 404);
    assert!(error["message"].as_str().unwrap().contains("/v1/images/upscale"));

    let res =
        app.client.get(format!("{}/images/generations", app.base_url)).bearer_auth(&app.key).send().await.unwrap();
    assert_eq!(error_of(res).await.0, 405);
    assert_eq!(fake.call_count(), 0);
}
