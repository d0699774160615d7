//! `stream=true`: SSE is relayed event by event as the upstream produces it, never buffered whole.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::support::app::TestApp;
use crate::support::fake_openai::FakeOpenAi;

/// Read the SSE body, noting when each `data:` line arrived.
async fn events(res: reqwest::Response) -> Vec<(Duration, serde_json::Value, String)> {
    let start = Instant::now();
    let mut stream = res.bytes_stream();
    let mut buffer = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let name = event.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("").to_owned();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                out.push((start.elapsed(), serde_json::from_str(data).unwrap(), name));
            }
        }
    }
    out
}

#[tokio::test]
async fn stream_events_arrive_one_by_one_as_the_upstream_sends_them() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app
        .post_json(
            "/images/generations",
            &json!({"model": "gpt-image-1", "prompt": "a kite #gap=400", "stream": true, "partial_images": 2}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = events(res).await;

    let types: Vec<&str> = events.iter().map(|(_, e, _)| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    assert_eq!(events[2].2, "image_generation.completed");
    assert!(events[2].1["usage"]["total_tokens"].as_u64().unwrap() > 0);
    // With 400 ms between upstream events, a buffering gateway would deliver all three at once.
    let spread = events[2].0 - events[0].0;
    assert!(
        spread >= Duration::from_millis(600),
        "events were buffered: first at {:?}, last at {:?}",
        events[0].0,
        events[2].0
    );
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_ends_with_an_error_event() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;

    let res = app
        .post_json(
            "/images/generations",
            &json!({"model": "gpt-image-1", "prompt": "x #drop", "stream": true, "partial_images": 3}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let events = events(res).await;

    let (_, last, name) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(last["error"]["type"], "server_error");
    assert!(last["error"]["message"].as_str().unwrap().contains("interrupted"));
}

#[tokio::test]
async fn streaming_edits_relay_edit_events() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let form = reqwest::multipart::Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "edit me")
        .text("stream", "true")
        .text("partial_images", "1")
        .part(
            "image",
            reqwest::multipart::Part::bytes(crate::support::app::png(8, 8, false))
                .file_name("a.png")
                .mime_str("image/png")
                .unwrap(),
        );

    let events = events(app.post_form("/images/edits", form).await).await;

    let types: Vec<&str> = events.iter().map(|(_, e, _)| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["image_edit.partial_image", "image_edit.completed"]);
}
