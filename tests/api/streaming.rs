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

#[tokio::test]
async fn streams_are_metered_whatever_valid_sse_framing_the_upstream_uses() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let framings = ["lf", "crlf", "cr", "nospace"];
    for framing in framings {
        let res = app
            .post_json(
                "/images/generations",
                &json!({"model": "gpt-image-1", "prompt": format!("k #framing={framing}"), "stream": true, "n": 2}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let body = res.bytes().await.unwrap();
        if framing == "crlf" {
            assert!(body.windows(4).any(|w| w == b"\r\n\r\n"), "relayed byte for byte");
        }
    }

    let rows = app.usage_rows(framings.len()).await;
    assert_eq!(rows.len(), framings.len());
    let lf = &rows[0];
    assert_eq!(lf["images_returned"], 2);
    assert!(lf["output_tokens"].as_i64().unwrap() > 0 && lf["cost_usd"].as_f64().unwrap() > 0.0, "{lf}");
    for (framing, row) in framings.iter().zip(&rows).skip(1) {
        for column in ["images_returned", "output_tokens"] {
            assert_eq!(row[column], lf[column], "{framing}: {column} in {row}");
        }
        // The prompts differ in length, so their text tokens do too.
        assert!(row["input_tokens"].as_i64().unwrap() > 0 && row["cost_usd"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[tokio::test]
async fn streams_tell_caches_and_proxies_not_to_hold_them() {
    let fake = FakeOpenAi::start().await;
    let gateways = [
        TestApp::spawn(&fake.url).await,
        TestApp::spawn_with(&fake.url, |s| s.upstream.kind = imagegate::config::UpstreamKind::Mock).await,
    ];
    for app in &gateways {
        let res =
            app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "p", "stream": true})).await;
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        assert_eq!(res.headers()["cache-control"], "no-cache");
        assert_eq!(res.headers()["x-accel-buffering"], "no");
        assert!(!events(res).await.is_empty());
    }
}

#[tokio::test]
async fn streams_carry_base64_even_when_links_are_the_default_but_an_explicit_url_is_refused() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.tenants[0].images.response_format = Some(imagegate::domain::ResponseFormat::Url);
    })
    .await;

    // An explicit url with stream=true cannot be honoured: refused before anything is sent.
    let res = app
        .post_json(
            "/images/generations",
            &json!({"model": "gpt-image-1", "prompt": "p", "stream": true, "response_format": "url"}),
        )
        .await;
    let (status, error) = crate::support::app::error_of(res).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("response_format")));
    assert_eq!(fake.call_count(), 0);

    // The tenant's default of url does not apply to streams: the events pass as they come, with base64.
    let res =
        app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "p", "stream": true})).await;
    let events = events(res).await;
    assert!(events.last().unwrap().1["b64_json"].as_str().unwrap().len() > 100);
    assert!(fake.calls()[0].field("response_format").is_none());
    // Not a file anywhere under the image directory (its staging directory is made empty at startup).
    fn files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| if e.path().is_dir() { files(&e.path()) } else { 1 }).sum()
    }
    assert_eq!(files(&app.data_dir.path().join("images")), 0, "nothing stored");
}

/// A stream larger than its request may carry (`n` × (1 + `partial_images`) images of the model's largest size)
/// is cut where it passes that size with an error event, and the rest is never pulled from the upstream.
/// Before, a stream was relayed whatever its size: here 200 MiB of partial images for `n=1`.
#[tokio::test]
async fn a_stream_larger_than_its_request_allows_is_cut_with_an_error_event() {
    const MIB: u64 = 200;
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let body = json!({"model": "gpt-image-1", "prompt": format!("x #huge={MIB}"), "stream": true});
    let res = app.post_json("/images/generations", &body).await;
    assert_eq!(res.status(), 200);

    // Read what the caller gets, giving up past 64 MiB (the old gateway relayed all 200).
    let mut stream = res.bytes_stream();
    let (mut received, mut text_tail) = (0usize, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        received += chunk.len();
        assert!(received < 64 << 20, "the stream was relayed past 64 MiB");
        text_tail.extend_from_slice(&chunk);
        let keep = text_tail.len().saturating_sub(4096);
        text_tail.drain(..keep);
    }
    let tail = String::from_utf8_lossy(&text_tail);
    assert!(tail.contains("event: error") && tail.contains("larger than this request allows"), "{tail}");
    eprintln!("the caller received {} MiB; the upstream sent {} MiB", received >> 20, fake.huge_bytes_sent() >> 20);
    assert!(fake.huge_bytes_sent() < 32 << 20, "{} bytes pulled from the upstream", fake.huge_bytes_sent());
    // No image completed: nothing is charged.
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["images_returned"].as_u64().unwrap_or(0), 0, "{rows:?}");
}

/// A stream with more completed images than `n` ends after the `n`th: the caller gets (and is charged for)
/// the images it asked for. Before, all five were relayed and the ledger counted five images for `n=1`.
#[tokio::test]
async fn a_stream_with_more_completed_images_than_n_ends_after_the_nth() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let body = json!({"model": "gpt-image-1", "prompt": "x #items=5", "stream": true, "partial_images": 1});
    let res = app.post_json("/images/generations", &body).await;
    assert_eq!(res.status(), 200);
    let events = events(res).await;
    let names: Vec<&str> = events.iter().map(|(_, _, name)| name.as_str()).collect();
    assert_eq!(names, ["image_generation.partial_image", "image_generation.completed"]);
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["images_returned"], 1, "{rows:?}");
    assert_eq!(fake.call_count(), 1);
}
