//! Hostile request bodies: JSON parsed within a memory budget proportional to the body (measured as the real
//! binary's peak RSS), JSON edits refused unread for tenants that may use no model taking them, and multipart
//! forms that a parser other than imagegate's would read differently.

use serde_json::json;

use crate::support::app::png;
use crate::support::app::{FAKE_IMAGE_HOSTS, GatewayProcess, TestApp, UPSTREAM_KEY};
use crate::support::fake_openai::{FakeOpenAi, FakeOptions};

/// Peak resident memory of process `pid` so far (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
async fn a_20_mib_json_array_of_zeros_raises_peak_memory_by_a_few_times_its_size_not_a_gigabyte() {
    const BODY: usize = 20 << 20;
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = imagegate::domain::keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"0s\"\n[upstream]\nbase_url = \"{}\"\n\
         api_key = \"{UPSTREAM_KEY}\"\n{FAKE_IMAGE_HOSTS}[[tenants]]\nname = \"ci\"\n\
         keys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        fake.url, key.id, key.sha256
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let gw = GatewayProcess::start(&["serve", "--config", path.to_str().unwrap()], dir.path());
    let client = reqwest::Client::new();
    let url = format!("{}/v1/images/edits", gw.root);
    // One ordinary request first, so the baseline includes a warmed-up gateway.
    let warm = client
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key.key)
        .json(&json!({"model": "dall-e-2", "prompt": "warm up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let before = peak_rss(gw.child.id());

    let mut zeros = Vec::with_capacity(BODY);
    zeros.push(b'[');
    while zeros.len() < BODY - 2 {
        zeros.extend_from_slice(b"0,");
    }
    zeros.extend_from_slice(b"0]");
    let res = client
        .post(&url)
        .bearer_auth(&key.key)
        .header("content-type", "application/json")
        .body(zeros)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("too many values"), "{body}");

    let grown = peak_rss(gw.child.id()).saturating_sub(before);
    eprintln!("peak RSS grew by {} MiB for a {} MiB body", grown >> 20, BODY >> 20);
    assert!(grown < 5 * BODY as u64, "peak RSS grew by {grown} bytes for a {BODY}-byte body");
    assert_eq!(fake.call_count(), 1, "only the warm-up reached the upstream");
}

#[tokio::test]
async fn a_json_edit_from_a_tenant_allowed_only_dall_e_2_is_refused_before_its_body_is_read() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].allowed_models = Some(vec!["dall-e-2".into()])).await;

    let res = app
        .post_json(
            "/images/edits",
            &json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": "https://example.com/a.png"}]}),
        )
        .await;

    assert_eq!(res.status(), 403);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON edits"), "{body}");
    assert_eq!(fake.call_count(), 0);
}

/// A form under boundary `A` (dall-e-2, n = 1) whose image hides a second form under boundary `B`
/// (gpt-image-1, n = 10, quality high): what a parser taking the last `boundary` parameter reads.
fn smuggling_form() -> Vec<u8> {
    let field = |b: &str, name: &str, value: &str| {
        format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").into_bytes()
    };
    let mut hidden = Vec::new();
    for (name, value) in [("model", "gpt-image-1"), ("prompt", "hidden"), ("n", "10"), ("quality", "high")] {
        hidden.extend(field("BBB", name, value));
    }
    hidden.extend_from_slice(b"--BBB--\r\n");
    let mut image = png(64, 64, true);
    image.extend_from_slice(b"\r\n");
    image.extend(hidden);
    let mut body = Vec::new();
    for (name, value) in [("model", "dall-e-2"), ("prompt", "visible"), ("n", "1")] {
        body.extend(field("AAA", name, value));
    }
    body.extend_from_slice(
        b"--AAA\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n",
    );
    body.extend(image);
    body.extend_from_slice(b"\r\n--AAA--\r\n");
    body
}

#[tokio::test]
async fn a_form_with_two_boundaries_is_refused_before_an_upstream_taking_the_last_one_sees_another_form() {
    let fake = FakeOpenAi::start_with(FakeOptions { last_boundary: true, ..Default::default() }).await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].allowed_models = Some(vec!["dall-e-2".into()])).await;

    let res = app
        .client
        .post(format!("{}/images/edits", app.base_url))
        .bearer_auth(&app.key)
        .header("content-type", "multipart/form-data; boundary=AAA; boundary=BBB")
        .body(smuggling_form())
        .send()
        .await
        .unwrap();

    let status = res.status();
    let body: serde_json::Value = res.json().await.unwrap();
    let reached: Vec<_> = fake.calls().iter().map(|c| (c.field("model"), c.field("n"))).collect();
    assert_eq!(status, 400, "{body}; the upstream read {reached:?}");
    assert!(body["error"]["message"].as_str().unwrap().contains("more than one boundary"), "{body}");
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn a_form_is_forwarded_under_one_boundary_of_the_gateways_own_so_any_parser_reads_what_was_validated() {
    let fake = FakeOpenAi::start_with(FakeOptions { last_boundary: true, ..Default::default() }).await;
    let app = TestApp::spawn(&fake.url).await;

    // One boundary, but the image's bytes contain another form and the caller's boundary text.
    let res = app
        .client
        .post(format!("{}/images/edits", app.base_url))
        .bearer_auth(&app.key)
        .header("content-type", "multipart/form-data; boundary=AAA")
        .body(smuggling_form())
        .send()
        .await
        .unwrap();

    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let call = fake.last_call().unwrap();
    let content_type = call.content_type.clone().unwrap();
    assert!(content_type.starts_with("multipart/form-data; boundary=imagegate-"), "{content_type}");
    assert_eq!(content_type.matches("boundary=").count(), 1);
    assert_eq!(call.field("model").as_deref(), Some("dall-e-2"));
    assert_eq!(call.field("n").as_deref(), Some("1"));
    assert_eq!(call.parts.len(), 4, "{:?}", call.parts);
}

#[tokio::test]
async fn a_file_part_named_like_a_text_field_is_refused() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let form = reqwest::multipart::Form::new()
        .text("model", "dall-e-2")
        .text("prompt", "x")
        .part(
            "image",
            reqwest::multipart::Part::bytes(png(64, 64, true)).file_name("a.png").mime_str("image/png").unwrap(),
        )
        .part("model", reqwest::multipart::Part::bytes(b"gpt-image-1".to_vec()).file_name("model.txt"));

    let res = app.post_form("/images/edits", form).await;

    assert_eq!(res.status(), 400);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert_eq!(fake.call_count(), 0);
}
