//! Self-test of the fake OpenAI upstream (`tests/support/fake_openai.rs`): proves over real HTTP (reqwest) the
//! behaviours the gateway and SDK tests rely on: auth, per-model response shapes, expiring DALL·E URLs, error
//! triggers, multipart recording, SSE framing and pacing, and the `/_fake/*` control endpoints.
// Helpers outside `#[test]` functions are test code too (clippy's `allow-*-in-tests` does not see that).
#![allow(clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::fake_openai::{DEFAULT_KEY, FakeOpenAi, FakeOptions, INPUT_IMAGE_TOKENS, render_image};

const BOUNDARY: &str = "selftest-boundary-3f9a7c";
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("reqwest client")
}

async fn post_json(fake: &FakeOpenAi, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request =
        client().post(format!("{}{path}", fake.url)).header("content-type", "application/json").body(body.to_string());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("send JSON request to the fake")
}

async fn post_form(fake: &FakeOpenAi, path: &str, body: Vec<u8>) -> reqwest::Response {
    client()
        .post(format!("{}{path}", fake.url))
        .bearer_auth(DEFAULT_KEY)
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .expect("send multipart request to the fake")
}

async fn json_of(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.expect("response body");
    serde_json::from_slice(&bytes).expect("JSON response body")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).unwrap_or_else(|| panic!("missing header {name}")).to_str().expect("ASCII header")
}

fn decode_b64(value: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(value.as_str().expect("b64_json string")).expect("valid base64")
}

/// A hand-built multipart body, so the part order on the wire is exactly the order of the calls.
struct Form {
    body: Vec<u8>,
}

impl Form {
    fn new() -> Form {
        Form { body: Vec::new() }
    }

    fn text(mut self, name: &str, value: &str) -> Form {
        let part = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n");
        self.body.extend_from_slice(part.as_bytes());
        self
    }

    fn file(mut self, name: &str, file_name: &str, content_type: &str, bytes: &[u8]) -> Form {
        let head = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\n\
             Content-Type: {content_type}\r\n\r\n"
        );
        self.body.extend_from_slice(head.as_bytes());
        self.body.extend_from_slice(bytes);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        self.body
    }
}

/// Splits an SSE body into (event, raw data) pairs, checking the exact `event: X\ndata: Y\n\n` framing.
fn sse_events(text: &str) -> Vec<(String, String)> {
    assert!(text.ends_with("\n\n"), "stream must end with a blank line: {text:?}");
    text.split_terminator("\n\n")
        .map(|block| {
            let (event_line, data_line) = block.split_once('\n').expect("two lines per event");
            let event = event_line.strip_prefix("event: ").expect("event line");
            let data = data_line.strip_prefix("data: ").expect("data line");
            assert!(!data.contains('\n'), "one data line per event");
            (event.to_owned(), data.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn auth_failure_is_401_and_still_recorded() {
    let fake = FakeOpenAi::start().await;

    let response =
        post_json(&fake, "/images/generations", Some("sk-wrong-key-123456"), &json!({"prompt": "a cat"})).await;
    assert_eq!(response.status(), 401);
    assert!(header(&response, "x-request-id").starts_with("req_"));
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], Value::Null);
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("Incorrect API key provided: sk-"), "{message}");
    assert!(!message.contains("sk-wrong-key-123456"), "the key must be masked: {message}");

    let response = post_json(&fake, "/images/generations", None, &json!({"prompt": "a cat"})).await;
    assert_eq!(response.status(), 401);
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], Value::Null);
    assert!(body["error"]["message"].as_str().expect("message").starts_with("You didn't provide an API key"));

    let custom =
        FakeOpenAi::start_with(FakeOptions { expected_key: Some("sk-custom".to_owned()), ..FakeOptions::default() })
            .await;
    let body = json!({"prompt": "a cat"});
    assert_eq!(post_json(&custom, "/images/generations", Some(DEFAULT_KEY), &body).await.status(), 401);
    assert_eq!(post_json(&custom, "/images/generations", Some("sk-custom"), &body).await.status(), 200);

    assert_eq!(fake.call_count(), 2);
    let calls = fake.calls();
    assert_eq!(calls[0].path, "/v1/images/generations");
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].header("Authorization"), Some("Bearer sk-wrong-key-123456"));
    assert_eq!(calls[0].field("prompt").as_deref(), Some("a cat"));
    assert_eq!(calls[1].header("authorization"), None);
}

#[tokio::test]
async fn gpt_image_models_return_b64_usage_and_openai_headers() {
    let fake = FakeOpenAi::start().await;
    let request = json!({"model": "gpt-image-1", "prompt": "a red fox", "n": 2, "size": "1536x1024", "quality": "low"});
    let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("application/json"));
    let request_id = header(&response, "x-request-id").to_owned();
    assert_eq!(request_id.len(), 36, "{request_id}");
    assert!(request_id.starts_with("req_") && request_id[4..].chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(header(&response, "openai-version"), "2020-10-01");
    header(&response, "openai-processing-ms").parse::<u64>().expect("integer ms");
    assert_eq!(header(&response, "x-ratelimit-limit-requests"), "500");
    assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "499");
    assert!(header(&response, "set-cookie").starts_with("__cf_bm=secret"));
    assert_eq!(header(&response, "openai-organization"), "org-upstream");

    let body = json_of(response).await;
    assert!(body["created"].as_u64().is_some());
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    for image in data {
        let keys: Vec<&String> = image.as_object().expect("image object").keys().collect();
        assert_eq!(keys, ["b64_json"]);
        let png = decode_b64(&image["b64_json"]);
        assert!(png.starts_with(PNG_MAGIC));
        let decoded = image::load_from_memory(&png).expect("decodable PNG");
        assert_eq!((decoded.width(), decoded.height()), (64, 64));
    }
    assert_ne!(data[0], data[1], "each of the n images differs");
    assert_eq!(body["size"], "1536x1024");
    assert_eq!(body["quality"], "low");
    assert_eq!(body["background"], "opaque");
    assert_eq!(body["output_format"], "png");
    let usage = &body["usage"];
    assert_eq!(usage["output_tokens"], 800, "2 images x 400 tokens (low, 1536x1024)");
    let input = usage["input_tokens"].as_u64().expect("input tokens");
    assert_eq!(usage["input_tokens_details"]["text_tokens"], input);
    assert_eq!(usage["input_tokens_details"]["image_tokens"], 0);
    assert_eq!(usage["total_tokens"], input + 800);

    let again = json_of(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await).await;
    assert_eq!(again["data"], body["data"], "images are deterministic from the prompt");

    let jpeg = json!({"model": "gpt-image-1.5", "prompt": "x", "output_format": "jpeg", "quality": "auto"});
    let body = json_of(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &jpeg).await).await;
    assert!(decode_b64(&body["data"][0]["b64_json"]).starts_with(b"\xff\xd8\xff"));
    assert_eq!(body["quality"], "high");
    assert_eq!(body["size"], "1024x1024");
    assert_eq!(body["usage"]["output_tokens"], 4160);

    assert_eq!(fake.calls()[0].request_id, request_id);
    assert_eq!(fake.calls()[0].json.as_ref().expect("json body")["n"], 2);
    assert_eq!(fake.calls()[0].field("n").as_deref(), Some("2"));
}

#[tokio::test]
async fn response_format_is_rejected_for_gpt_image_models() {
    let fake = FakeOpenAi::start().await;
    let request = json!({"model": "gpt-image-1.5", "prompt": "a cat", "response_format": "b64_json"});
    let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        json_of(response).await,
        json!({"error": {
            "message": "Unknown parameter: 'response_format'.",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "unknown_parameter",
        }})
    );

    let request = json!({"model": "chatgpt-image-latest", "prompt": "a cat", "response_format": "url"});
    assert_eq!(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await.status(), 400);

    let request = json!({"model": "gpt-image-1", "prompt": "a cat", "response_format": null, "brand_new_param": 1});
    let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    assert_eq!(response.status(), 200, "null means not given, and unknown parameters are accepted");
    assert_eq!(fake.call_count(), 3);
    assert_eq!(fake.last_call().expect("call").field("response_format").as_deref(), Some("null"));
}

#[tokio::test]
async fn dalle_urls_work_then_expire() {
    let fake =
        FakeOpenAi::start_with(FakeOptions { url_ttl: Some(Duration::from_secs(1)), ..FakeOptions::default() }).await;
    let request = json!({"model": "dall-e-3", "prompt": "a lighthouse"});
    let body = json_of(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await).await;
    assert!(body["created"].as_u64().is_some());
    assert!(body.get("usage").is_none() && body.get("size").is_none());
    let image = &body["data"][0];
    assert!(image.get("b64_json").is_none());
    assert!(image["revised_prompt"].as_str().expect("revised_prompt").contains("a lighthouse"));
    let url = image["url"].as_str().expect("url").to_owned();
    assert!(url.starts_with(&format!("{}/_fake/files/img-", fake.base)), "{url}");
    assert!(url.contains(".png?se="), "{url}");

    let response = client().get(&url).send().await.expect("fetch image");
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type"), "image/png");
    assert!(response.bytes().await.expect("image").starts_with(PNG_MAGIC));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let response = client().get(&url).send().await.expect("fetch expired image");
    assert_eq!(response.status(), 403);
    assert_eq!(header(&response, "content-type"), "application/xml");
    let text = response.text().await.expect("error body");
    assert!(text.contains("<Code>AuthenticationFailed</Code>"), "{text}");
    assert_eq!(fake.file_fetch_count(), 2);
    assert_eq!(fake.call_count(), 1, "file downloads are not image API calls");

    let tampered = url.replace("?se=", "?se=1");
    assert_eq!(client().get(&tampered).send().await.expect("fetch").status(), 403);

    let body =
        json_of(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &json!({"prompt": "x", "n": 3})).await)
            .await;
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 3, "dall-e-2 is the default model, url the default format");
    assert!(data.iter().all(|image| image["url"].is_string() && image.get("revised_prompt").is_none()));

    let request = json!({"model": "dall-e-2", "prompt": "x", "response_format": "b64_json"});
    let body = json_of(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await).await;
    assert!(body["data"][0].get("url").is_none());
    assert!(decode_b64(&body["data"][0]["b64_json"]).starts_with(PNG_MAGIC));
}

#[tokio::test]
async fn status_triggers_give_openai_shaped_errors() {
    let fake = FakeOpenAi::start().await;
    let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &json!({"prompt": "#status=429"})).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), "1");
    assert_eq!(header(&response, "retry-after-ms"), "1000");
    assert!(header(&response, "x-request-id").starts_with("req_"));
    let body = json_of(response).await;
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["param"], Value::Null);
    assert!(
        body["error"]["message"].as_str().expect("message").starts_with("Rate limit exceeded for images per minute")
    );

    let cases = [
        (500, "server_error", Value::Null),
        (400, "invalid_request_error", json!("content_policy_violation")),
        (403, "invalid_request_error", json!("organization_must_be_verified")),
        (404, "invalid_request_error", json!("model_not_found")),
    ];
    for (status, kind, code) in cases {
        let request = json!({"model": "gpt-image-1", "prompt": format!("please fail #status={status} now")});
        let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
        assert_eq!(response.status(), status);
        let body = json_of(response).await;
        assert_eq!(body["error"]["type"], kind, "{status}");
        assert_eq!(body["error"]["code"], code, "{status}");
        let keys: Vec<&String> = body["error"].as_object().expect("error").keys().collect();
        assert_eq!(keys, ["message", "type", "param", "code"]);
    }

    let form = Form::new()
        .file("image", "in.png", "image/png", &render_image("in", 0, false, "png"))
        .text("user", "#status=500")
        .finish();
    assert_eq!(post_form(&fake, "/images/variations", form).await.status(), 500);
    assert_eq!(fake.call_count(), 6);
}

#[tokio::test]
async fn sleep_delays_the_answer_but_the_call_is_recorded_on_arrival() {
    let fake = FakeOpenAi::start().await;
    let url = format!("{}/images/generations", fake.url);
    let started = Instant::now();
    let pending = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(DEFAULT_KEY)
            .header("content-type", "application/json")
            .body(json!({"prompt": "slow #sleep=2000"}).to_string())
            .send()
            .await
            .expect("send")
            .status()
    });
    // Polled rather than slept for, so a loaded machine cannot make the check early or late.
    while fake.call_count() == 0 && started.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.call_count(), 1, "recorded on arrival");
    assert!(!pending.is_finished(), "recorded before the answer");
    assert_eq!(pending.await.expect("task"), 200);
    assert!(started.elapsed() >= Duration::from_millis(2000));
}

#[tokio::test]
async fn multipart_parts_are_recorded_in_arrival_order() {
    let fake = FakeOpenAi::start().await;
    let first = render_image("first", 0, false, "png");
    let second = render_image("second", 0, false, "png");
    let mask = render_image("mask", 0, true, "png");
    let form = Form::new()
        .file("image[]", "a.png", "image/png", &first)
        .file("image[]", "b.png", "image/png", &second)
        .file("mask", "mask.png", "image/png", &mask)
        .text("prompt", "blend them")
        .text("model", "gpt-image-1")
        .text("input_fidelity", "high")
        .text("brand_new_param", "kept")
        .finish();
    let body_len = form.len();
    let response = post_form(&fake, "/images/edits", form).await;
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    assert!(decode_b64(&body["data"][0]["b64_json"]).starts_with(PNG_MAGIC));
    assert_eq!(body["usage"]["input_tokens_details"]["image_tokens"], 2 * INPUT_IMAGE_TOKENS);

    let call = fake.last_call().expect("recorded call");
    assert_eq!(call.path, "/v1/images/edits");
    assert!(call.content_type.as_deref().expect("content type").starts_with("multipart/form-data; boundary="));
    assert!(call.json.is_none());
    assert_eq!(call.body_len, body_len);
    assert_eq!(
        call.part_names(),
        ["image[]", "image[]", "mask", "prompt", "model", "input_fidelity", "brand_new_param"]
    );
    let image = &call.parts[1];
    assert_eq!(image.file_name.as_deref(), Some("b.png"));
    assert_eq!(image.content_type.as_deref(), Some("image/png"));
    assert_eq!(image.len, second.len());
    assert_eq!(image.sha256, hex::encode(Sha256::digest(&second)));
    assert_eq!(image.text, None);
    assert_eq!(call.parts[3].text.as_deref(), Some("blend them"));
    assert_eq!(call.parts[3].file_name, None);
    assert_eq!(call.field("prompt").as_deref(), Some("blend them"));
    assert_eq!(call.field("brand_new_param").as_deref(), Some("kept"));
    assert_eq!(call.field("mask"), None, "file parts have no text");
    assert_eq!(call.part("mask").expect("mask part").sha256, hex::encode(Sha256::digest(&mask)));

    let form = Form::new().text("prompt", "default model").file("image", "x.png", "image/png", &first).finish();
    let body = json_of(post_form(&fake, "/images/edits", form).await).await;
    assert!(body["usage"].is_object(), "edits default to gpt-image-1.5");

    let form = Form::new().file("image", "x.png", "image/png", &first).text("n", "2").finish();
    let body = json_of(post_form(&fake, "/images/variations", form).await).await;
    assert_eq!(body["data"].as_array().expect("data").len(), 2);
    assert!(body["data"][0]["url"].is_string(), "variations default to dall-e-2 URLs");
}

#[tokio::test]
async fn sse_streams_use_exact_framing() {
    let fake = FakeOpenAi::start().await;
    let request = json!({"model": "gpt-image-1", "prompt": "a stream", "stream": true, "partial_images": 2});
    let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    assert_eq!(response.status(), 200);
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    assert!(header(&response, "x-request-id").starts_with("req_"));
    let events = sse_events(&response.text().await.expect("stream body"));
    let names: Vec<&str> = events.iter().map(|(event, _)| event.as_str()).collect();
    assert_eq!(
        names,
        ["image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"]
    );
    for (index, (event, raw)) in events.iter().enumerate() {
        let data: Value = serde_json::from_str(raw).expect("JSON data");
        assert_eq!(&serde_json::to_string(&data).expect("json"), raw, "compact JSON");
        assert_eq!(data["type"], event.as_str());
        assert!(decode_b64(&data["b64_json"]).starts_with(PNG_MAGIC));
        let keys: Vec<&str> = data.as_object().expect("object").keys().map(String::as_str).collect();
        if index < 2 {
            let expected = [
                "type",
                "b64_json",
                "created_at",
                "size",
                "quality",
                "background",
                "output_format",
                "partial_image_index",
            ];
            assert_eq!(keys, expected);
            assert_eq!(data["partial_image_index"], index);
        } else {
            let expected =
                ["type", "b64_json", "created_at", "size", "quality", "background", "output_format", "usage"];
            assert_eq!(keys, expected);
            assert_eq!(data["usage"]["output_tokens"], 4160 + 200);
            assert!(data["usage"].get("output_tokens_details").is_none());
        }
    }

    let form = Form::new()
        .file("image", "x.png", "image/png", &render_image("x", 0, false, "png"))
        .text("prompt", "edit stream")
        .text("stream", "true")
        .text("partial_images", "1")
        .finish();
    let response = post_form(&fake, "/images/edits", form).await;
    assert!(header(&response, "content-type").starts_with("text/event-stream"));
    let events = sse_events(&response.text().await.expect("stream body"));
    let names: Vec<&str> = events.iter().map(|(event, _)| event.as_str()).collect();
    assert_eq!(names, ["image_edit.partial_image", "image_edit.completed"]);

    let request = json!({"model": "dall-e-2", "prompt": "no streams", "stream": true});
    assert_eq!(post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await.status(), 400);
}

#[tokio::test]
async fn gap_spaces_sse_events_one_at_a_time() {
    let fake = FakeOpenAi::start().await;
    let request = json!({"model": "gpt-image-1", "prompt": "slow #gap=300", "stream": true, "partial_images": 2});
    let mut response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    let started = Instant::now();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        while arrivals.len() < text.matches("\n\n").count() {
            arrivals.push(started.elapsed());
        }
    }
    assert_eq!(sse_events(&text).len(), 3);
    assert_eq!(arrivals.len(), 3);
    assert!(arrivals[0] < Duration::from_millis(250), "first event is not held back: {arrivals:?}");
    for pair in arrivals.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(250), "events are spaced: {arrivals:?}");
    }
}

#[tokio::test]
async fn drop_aborts_the_stream_and_sse_error_reports_one() {
    let fake = FakeOpenAi::start().await;
    let request = json!({"model": "gpt-image-1", "prompt": "#drop", "stream": true, "partial_images": 2});
    let mut response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let aborted = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).expect("UTF-8")),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(aborted, "the body must end with an error, got {text:?}");
    let events = sse_events(&text);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "image_generation.partial_image");

    let request = json!({"model": "gpt-image-1", "prompt": "#sse_error", "stream": true});
    let response = post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &request).await;
    let events = sse_events(&response.text().await.expect("clean end"));
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].0, "error");
    let error: Value = serde_json::from_str(&events[1].1).expect("JSON");
    assert_eq!(error["error"]["type"], "server_error");
}

#[tokio::test]
async fn control_endpoints_expose_and_reset_calls() {
    let fake = FakeOpenAi::start().await;
    post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &json!({"prompt": "over http"})).await;
    let form = Form::new().file("image", "v.png", "image/png", &render_image("v", 0, false, "png")).finish();
    post_form(&fake, "/images/variations", form).await;
    let unknown = client().get(format!("{}/models", fake.url)).bearer_auth(DEFAULT_KEY).send().await.expect("send");
    assert_eq!(unknown.status(), 404);

    let calls = json_of(client().get(format!("{}/_fake/calls", fake.base)).send().await.expect("calls")).await;
    let calls = calls.as_array().expect("array of calls");
    assert_eq!(calls.len(), 2, "only /v1/images/* calls are recorded");
    assert_eq!(calls[0]["path"], "/v1/images/generations");
    assert_eq!(calls[0]["json"]["prompt"], "over http");
    assert!(calls[0]["request_id"].as_str().expect("request id").starts_with("req_"));
    let headers = calls[0]["headers"].as_array().expect("headers");
    assert!(headers.contains(&json!(["authorization", format!("Bearer {DEFAULT_KEY}")])));
    assert_eq!(calls[1]["path"], "/v1/images/variations");
    assert_eq!(calls[1]["parts"][0]["name"], "image");
    assert_eq!(calls[1]["parts"][0]["file_name"], "v.png");
    assert_eq!(calls[1]["parts"][0]["sha256"].as_str().expect("sha").len(), 64);
    assert_eq!(calls[1]["parts"][0]["text"], Value::Null);

    let reset = client().post(format!("{}/_fake/reset", fake.base)).send().await.expect("reset");
    assert_eq!(reset.status(), 200);
    assert_eq!(fake.call_count(), 0);
    let calls = json_of(client().get(format!("{}/_fake/calls", fake.base)).send().await.expect("calls")).await;
    assert_eq!(calls, json!([]));

    post_json(&fake, "/images/generations", Some(DEFAULT_KEY), &json!({"prompt": "again"})).await;
    assert_eq!(fake.calls_to("/v1/images/generations").len(), 1);
    fake.reset();
    assert_eq!(fake.call_count(), 0);

    let base = fake.base.clone();
    drop(fake);
    let after = client().get(format!("{base}/_fake/calls")).send().await;
    assert!(after.is_err(), "dropping the fake closes its port");
}
