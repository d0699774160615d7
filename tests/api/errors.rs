//! Bad input: clear OpenAI-shaped errors with the right status, `param` and `code`, and no upstream call.
//! Bodies over the limit are answered at once, without reading them, and unauthenticated bodies are not read
//! for long.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::app::{TestApp, error_of, png};
use crate::support::fake_openai::FakeOpenAi;

/// `--B` multipart parts from raw (headers, body) pairs, so broken bodies can be written exactly.
fn raw_form(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (headers, body) in parts {
        out.extend_from_slice(b"--B\r\n");
        out.extend_from_slice(headers.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--B--\r\n");
    out
}

fn text_part(name: &str) -> String {
    format!("Content-Disposition: form-data; name=\"{name}\"")
}

fn file_part(name: &str) -> String {
    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\nContent-Type: image/png")
}

/// A PNG of about 1 KB whose header claims 100000x100000.
fn header_bomb() -> Vec<u8> {
    let mut bytes = png(8, 8, true);
    bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    bytes
}

/// (route, content type, body, status, param, code, a word the message must contain)
type BodyCase = (&'static str, Option<&'static str>, Vec<u8>, u16, Value, Value, &'static str);

#[tokio::test]
async fn body_level_refusals_name_their_status_code_and_param() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_json_body = bytesize::ByteSize::kib(64)).await;
    let image = png(16, 16, true);
    let form = "multipart/form-data; boundary=B";
    // (route, content type, body, status, param, code, a word the message must contain)
    let cases: Vec<BodyCase> = vec![
        ("generations", Some("application/json"), b"{\"prompt\": ".to_vec(), 400, json!(null), json!(null), "parse"),
        ("generations", Some("application/json"), b"[1, 2]".to_vec(), 400, json!(null), json!(null), "object"),
        (
            "generations",
            Some("application/json"),
            b"{\"prompt\":\"x\"} {}".to_vec(),
            400,
            json!(null),
            json!(null),
            "parse",
        ),
        (
            "generations",
            Some("text/plain"),
            b"{\"prompt\":\"x\"}".to_vec(),
            400,
            json!(null),
            json!(null),
            "Content-Type",
        ),
        ("generations", Some(form), raw_form(&[]), 400, json!(null), json!(null), "Content-Type"),
        // JSON is not a variation body (OpenAI's variations are multipart only).
        (
            "variations",
            Some("application/json"),
            b"{\"model\":\"dall-e-2\"}".to_vec(),
            400,
            json!(null),
            json!(null),
            "multipart/form-data",
        ),
        ("variations", None, b"{}".to_vec(), 400, json!(null), json!(null), "Content-Type"),
        ("edits", Some("multipart/form-data"), b"no boundary".to_vec(), 400, json!(null), json!(null), "boundary"),
        (
            "edits",
            Some(form),
            b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nunterminated".to_vec(),
            400,
            json!(null),
            json!(null),
            "multipart",
        ),
        (
            "edits",
            Some(form),
            raw_form(&[("Content-Disposition: form-data", b"x")]),
            400,
            json!(null),
            json!(null),
            "name",
        ),
        // Duplicates: which value would the upstream act on? Refused, naming the parameter.
        (
            "generations",
            Some("application/json"),
            br#"{"model":"dall-e-3","prompt":"x","n":5,"n":1}"#.to_vec(),
            400,
            json!("n"),
            json!(null),
            "Duplicate",
        ),
        (
            "edits",
            Some("application/json"),
            br#"{"prompt":"x","images":[{"file_id":"file-a","file_id":"file-b"}]}"#.to_vec(),
            400,
            json!("images[0].file_id"),
            json!(null),
            "Duplicate",
        ),
        (
            "edits",
            Some(form),
            raw_form(&[(&text_part("prompt"), b"a"), (&file_part("image"), &image), (&text_part("prompt"), b"b")]),
            400,
            json!("prompt"),
            json!(null),
            "Duplicate",
        ),
        // A second mask is refused before either is looked at (it could carry anything, a header bomb here).
        (
            "edits",
            Some(form),
            raw_form(&[
                (&text_part("prompt"), b"x"),
                (&file_part("image"), &image),
                (&file_part("mask"), &image),
                (&file_part("mask"), &header_bomb()),
            ]),
            400,
            json!("mask"),
            json!(null),
            "mask",
        ),
        // Text fields must be UTF-8.
        (
            "edits",
            Some(form),
            raw_form(&[(&text_part("prompt"), b"caf\xe9"), (&file_part("image"), &image)]),
            400,
            json!("prompt"),
            json!(null),
            "UTF-8",
        ),
        (
            "variations",
            Some(form),
            raw_form(&[(&file_part("image"), &image), (&text_part("user"), b"\xff\xfe")]),
            400,
            json!("user"),
            json!(null),
            "UTF-8",
        ),
        // Over the route's limit: 413 stating it.
        (
            "generations",
            Some("application/json"),
            json!({"prompt": "x".repeat(70 * 1024)}).to_string().into_bytes(),
            413,
            json!(null),
            json!("request_too_large"),
            "65536",
        ),
    ];
    let mut failures = Vec::new();
    let total = cases.len();
    for (route, content_type, body, status, param, code, needle) in cases {
        let mut req = app.client.post(format!("{}/images/{route}", app.base_url)).bearer_auth(&app.key).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let (got, error) = error_of(req.send().await.unwrap()).await;
        let message = error["message"].as_str().unwrap_or_default();
        if (got, &error["type"], &error["param"], &error["code"])
            != (status, &json!("invalid_request_error"), &param, &code)
            || !message.contains(needle)
        {
            failures.push(format!(
                "{route} {content_type:?}: expected {status} {param}/{code} mentioning {needle:?}, got {got} {error}"
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {total} failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(fake.call_count(), 0, "refused requests must never reach the upstream");
}

/// A raw HTTP/1.1 connection to the gateway, for what clients cannot be made to do otherwise.
async fn connect(app: &TestApp) -> tokio::net::TcpStream {
    let addr = app.root.trim_start_matches("http://");
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

/// Everything the server sends until it closes the connection or `limit` passes: (text, closed, when the
/// first byte came).
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> (String, bool, Option<Instant>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first = None;
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true, first),
            Ok(Ok(n)) => {
                first.get_or_insert_with(Instant::now);
                out.extend_from_slice(&buf[..n]);
            }
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false, first),
        }
    }
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_answered_at_once_without_reading_the_body() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut stream = connect(&app).await;

    // 5,000,000 bytes announced on generations (limit 1 MiB), 10 sent, and the client then waits.
    let started = Instant::now();
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: imagegate\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n{{\"prompt\":",
        app.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (answer, _, first_byte) = read_until_closed(&mut stream, Duration::from_secs(3)).await;

    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let waited = first_byte.unwrap().duration_since(started);
    assert!(waited < Duration::from_secs(1), "answered after {waited:?}");
    assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.contains("\"code\":\"request_too_large\""), "{answer}");
    assert!(answer.contains("1048576"), "{answer}");
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn expect_100_continue_over_the_limit_gets_413_and_never_100_continue() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut stream = connect(&app).await;

    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nHost: imagegate\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 500000000\r\n\
         Expect: 100-continue\r\n\r\n",
        app.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (answer, closed, _) = read_until_closed(&mut stream, Duration::from_secs(3)).await;

    assert!(answer.starts_with("HTTP/1.1 413"), "the client was invited to upload: {answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(closed, "the connection stays open: {answer}");
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn within_the_limit_expect_100_continue_still_gets_its_100_continue() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let mut stream = connect(&app).await;
    let body = br#"{"prompt":"a red fox"}"#;

    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: imagegate\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        app.key,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    stream.write_all(body).await.unwrap();
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn an_unauthenticated_upload_gets_its_401_at_once_and_is_not_read_for_long() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let stream = connect(&app).await;
    let (mut reader, mut writer) = stream.into_split();

    // 50 MB announced with a wrong key; the client keeps sending as fast as the server takes it.
    let started = Instant::now();
    writer
        .write_all(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: imagegate\r\nAuthorization: Bearer ig_nope\r\n\
              Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 50000000\r\n\r\n",
        )
        .await
        .unwrap();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 50_000_000 {
            match tokio::time::timeout(Duration::from_secs(10), writer.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        sent
    });
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), reader.read(&mut head)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");

    // The server stops taking the upload after a few KiB (plus what the sockets buffer), within seconds.
    let sent = upload.await.unwrap();
    assert!(sent < 40_000_000, "the server read {sent} bytes of an unauthenticated upload");
    assert!(started.elapsed() < Duration::from_secs(12), "{:?}", started.elapsed());
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn an_oversized_json_body_gets_413_stating_the_limit() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_json_body = bytesize::ByteSize::kib(64)).await;

    let big = "x".repeat(100 * 1024);
    let (status, error) = error_of(app.post_json("/images/generations", &json!({"prompt": big})).await).await;

    assert_eq!(status, 413);
    assert_eq!((&error["param"], &error["code"]), (&json!(null), &json!("request_too_large")));
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

    let (status, error) = error_of(res).await;
    assert_eq!((status, &error["code"]), (413, &json!("request_too_large")));
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
        assert_eq!(
            (&error["type"], &error["param"], &error["code"]),
            (&json!("invalid_request_error"), &json!(null), &json!(null))
        );
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
