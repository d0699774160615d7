//! Hostile request bodies: JSON parsed within a memory budget proportional to the body (measured as the real
//! binary's peak RSS), JSON edits refused unread for tenants that may use no model taking them.

use serde_json::json;

use crate::support::app::{FAKE_IMAGE_HOSTS, GatewayProcess, TestApp, UPSTREAM_KEY};
use crate::support::fake_openai::FakeOpenAi;

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
    let key = imagegate::tenants::keys::generate();
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
