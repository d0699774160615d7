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

// ------------------------------------------- the concurrency slot is taken before a body is buffered

/// The head of a multipart edit declaring a body of `length` bytes, and the start of that body.
fn upload_head(host: &str, key: &str, length: usize) -> Vec<u8> {
    format!(
        "POST /v1/images/edits HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n\
         content-type: multipart/form-data; boundary=XBOUNDARYX\r\ncontent-length: {length}\r\n\r\n\
         --XBOUNDARYX\r\ncontent-disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
         content-type: image/png\r\n\r\n"
    )
    .into_bytes()
}

/// Read from `stream` until the end of an answer's head (or the connection closes), within 10 s.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read).await.expect("no answer within 10 s");
    String::from_utf8_lossy(&got).into_owned()
}

/// With a concurrency limit of 1 and one upload being read, a second upload of the same tenant is refused
/// (429 in OpenAI's shape, with the rate-limit headers) while it is still sending, before its body is read:
/// it never holds a buffer. Before, the slot was taken only after the whole body was buffered, so the second
/// upload was read in full (here: it got no answer while its body was incomplete, and the 10 s wait failed).
#[tokio::test]
async fn a_second_upload_over_the_concurrency_limit_is_refused_while_it_is_still_sending() {
    use tokio::io::AsyncWriteExt as _;
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.tenants[0].limits.concurrent_requests = Some(1);
        s.tenants[0].limits.requests_per_minute = Some(100);
    })
    .await;
    let addr = app.root.trim_start_matches("http://").to_owned();
    const DECLARED: usize = 50 << 20;

    // Upload 1 holds the slot: its head and some of its body are sent, the rest never is (yet).
    let mut first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    first.write_all(&upload_head(&addr, &app.key, DECLARED)).await.unwrap();
    first.write_all(&vec![0u8; 64 << 10]).await.unwrap();
    // Wait until the gateway admitted it (its reservation shows in the limits' in-flight count), at most 10 s:
    // a gateway that takes no reservation before the body (as before) goes on to fail below.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let limits: serde_json::Value = app
            .client
            .get(format!("{}/admin/v1/limits", app.root))
            .bearer_auth(crate::support::app::ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if limits["in_flight"] == 1 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Upload 2, same tenant: its head and the first bytes of its body, then it waits for an answer.
    let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    second.write_all(&upload_head(&addr, &app.key, DECLARED)).await.unwrap();
    second.write_all(&vec![0u8; 64 << 10]).await.unwrap();
    let head = read_head(&mut second).await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-ratelimit-limit-requests: 100"), "{head}");
    assert!(lower.contains("connection: close"), "the rest of the body is not read: {head}");

    // The first upload ends (its client gave up): the slot comes back, and a request gets through.
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let res = app.post_json("/images/generations", &json!({"prompt": "x"})).await;
        if res.status() == 200 {
            break;
        }
        assert_eq!(res.status(), 429);
        assert!(std::time::Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(fake.call_count(), 1, "neither upload reached the upstream");
    // Each refusal is in the ledger as the gateway's, at no cost.
    let rows = app.usage_rows(3).await;
    let refused: Vec<_> = rows.iter().filter(|r| r["status"] == 429).collect();
    assert!(!refused.is_empty(), "{rows:?}");
    assert!(refused.iter().all(|r| r["refused_by"] == "gateway" && r["cost_usd"] == 0.0), "{refused:?}");
}

/// Memory for bodies in flight is bounded by the tenant's slots, not by how many uploads it opens: with a
/// concurrency limit of 1, eight 24 MiB uploads sent at once raise the real binary's peak RSS by about one
/// body and its copies (76 MiB measured), not eight (before: every body was buffered at once, 340 MiB).
#[tokio::test]
async fn concurrent_uploads_beyond_the_tenant_slots_are_not_buffered() {
    use tokio::io::AsyncWriteExt as _;
    const UPLOADS: usize = 8;
    const SENT: usize = 24 << 20;
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = imagegate::domain::keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"0s\"\n[upstream]\nbase_url = \"{}\"\n\
         api_key = \"{UPSTREAM_KEY}\"\n{FAKE_IMAGE_HOSTS}[[tenants]]\nname = \"ci\"\n\
         limits = {{ concurrent_requests = 1 }}\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        fake.url, key.id, key.sha256
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let gw = GatewayProcess::start(&["serve", "--config", path.to_str().unwrap()], dir.path());
    let warm = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key.key)
        .json(&json!({"model": "dall-e-2", "prompt": "warm up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let before = peak_rss(gw.child.id());

    let addr = gw.root.trim_start_matches("http://").to_owned();
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..UPLOADS {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(&upload_head(&addr, &key.key, SENT + (1 << 20))).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        // Send the body (all but its last MiB, so none completes); a refused upload's socket is closed
        // under it, which ends its writes.
        senders.push(tokio::spawn(async move {
            let chunk = vec![0u8; 256 << 10];
            let mut sent = 0;
            while sent < SENT {
                if writer.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            (writer, sent)
        }));
        streams.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), reader.read_to_end(&mut got)).await;
            (reader, String::from_utf8_lossy(&got).into_owned())
        }));
    }
    let mut writers = Vec::new();
    let mut complete = 0;
    for sender in senders {
        let (writer, sent) = sender.await.unwrap();
        complete += usize::from(sent >= SENT);
        writers.push(writer);
    }
    // Let the gateway read what the admitted upload sent.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let grown = peak_rss(gw.child.id()).saturating_sub(before);
    eprintln!(
        "peak RSS grew by {} MiB for {UPLOADS} uploads of {} MiB ({complete} sent in full)",
        grown >> 20,
        SENT >> 20
    );
    assert!(grown < 4 * SENT as u64, "peak RSS grew by {grown} bytes for {UPLOADS} uploads of {SENT} bytes");
    drop(writers);
    let mut refused = 0;
    for stream in streams {
        let (_, answer) = stream.await.unwrap();
        refused += usize::from(answer.starts_with("HTTP/1.1 429"));
    }
    assert!(refused >= UPLOADS - 1, "every upload beyond the one slot was refused: {refused}");
    assert_eq!(fake.call_count(), 1, "only the warm-up reached the upstream");
}
