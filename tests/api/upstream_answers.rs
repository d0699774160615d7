//! A broken or hostile upstream: redirects are never followed, whole answers are capped by a size derived from
//! `n` and the model, and `data[]` is held to `n`.

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::fake_openai::FakeOpenAi;

#[tokio::test]
async fn an_upstream_redirect_is_not_followed_and_the_origin_it_names_receives_nothing() {
    let fake = FakeOpenAi::start().await;
    let elsewhere = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let prompt = format!("a lighthouse #redirect={}/images/generations", elsewhere.url);

    let res = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": prompt})).await;

    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_bad_answer", "{body}");
    assert!(!body.to_string().contains("127.0.0.1"), "no upstream address for the caller: {body}");
    assert_eq!(fake.call_count(), 1);
    assert_eq!(elsewhere.call_count(), 0, "the body (and key) went to the redirect's origin");
}

#[tokio::test]
async fn an_answer_over_the_size_limit_is_refused_with_502_without_being_read_whole() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    // No length declared: read until the limit (about 6 MiB for dall-e-2, n = 1), then dropped.
    let res = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "p #huge=200"})).await;
    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_bad_answer", "{body}");
    let pulled = fake.huge_bytes_sent();
    assert!(pulled < 40 * 1024 * 1024, "the gateway read {pulled} bytes of a 200 MiB answer");

    // A declared length over the limit: refused before the body is read (only socket buffers fill).
    let before = fake.huge_bytes_sent();
    let res =
        app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "p #huge_declared=200"})).await;
    assert_eq!(res.status(), 502);
    let pulled = fake.huge_bytes_sent() - before;
    assert!(pulled < 40 * 1024 * 1024, "the gateway read {pulled} bytes of a declared 200 MiB answer");
}

#[tokio::test]
async fn an_answer_with_more_images_than_n_is_cut_to_n_before_anything_is_downloaded_or_charged() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "p #items=40"})).await;

    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(fake.file_fetch_count(), 1, "only the image asked for is downloaded and stored");
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["images_returned"], 1, "{rows:?}");
}
