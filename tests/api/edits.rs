//! `/v1/images/edits` and `/v1/images/variations`: multipart forms reach the upstream part for part, in order,
//! whatever order the fields came in (re-encoded under imagegate's own boundary); the JSON edit body works too.

use reqwest::multipart::{Form, Part};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::support::app::{TestApp, error_of, png};
use crate::support::fake_openai::FakeOpenAi;

fn file(bytes: Vec<u8>, name: &str) -> Part {
    Part::bytes(bytes).file_name(name.to_owned()).mime_str("image/png").unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn several_images_and_a_mask_arrive_in_order_with_every_field() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let images: Vec<Vec<u8>> = (1..=3).map(|i| png(16 * i, 16 * i, false)).collect();
    let mask = png(16, 16, true);

    // Files before scalars, as the Node SDK often sends them.
    let form = Form::new()
        .part("image[]", file(images[0].clone(), "a.png"))
        .part("image[]", file(images[1].clone(), "b.png"))
        .part("mask", file(mask.clone(), "mask.png"))
        .part("image[]", file(images[2].clone(), "c.png"))
        .text("prompt", "add a hat")
        .text("model", "gpt-image-1")
        .text("brand_new_param", "kept");
    let res = app.post_form("/images/edits", form).await;

    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let call = &fake.calls()[0];
    assert_eq!(call.path, "/v1/images/edits");
    let files: Vec<(&str, &str)> =
        call.parts.iter().filter(|p| p.file_name.is_some()).map(|p| (p.name.as_str(), p.sha256.as_str())).collect();
    let expected = [
        ("image[]", sha(&images[0])),
        ("image[]", sha(&images[1])),
        ("mask", sha(&mask)),
        ("image[]", sha(&images[2])),
    ];
    assert_eq!(files, expected.iter().map(|(n, s)| (*n, s.as_str())).collect::<Vec<_>>());
    assert_eq!(call.field("brand_new_param").as_deref(), Some("kept"));
    assert_eq!(call.field("prompt").as_deref(), Some("add a hat"));
    assert!(call.header("content-type").unwrap().starts_with("multipart/form-data; boundary="));
}

#[tokio::test]
async fn a_gpt_edit_asking_for_a_link_reaches_the_upstream_without_response_format_and_otherwise_intact() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let images: Vec<Vec<u8>> = (1..=2).map(|i| png(16 * i, 16 * i, false)).collect();
    let mask = png(16, 16, true);
    let form = Form::new()
        .part("image[]", file(images[0].clone(), "a.png"))
        .text("response_format", "url")
        .part("mask", file(mask.clone(), "mask.png"))
        .part("image[]", file(images[1].clone(), "b.png"))
        .text("prompt", "add a hat")
        .text("model", "gpt-image-1")
        .text("brand_new_param", "kept");

    let res = app.post_form("/images/edits", form).await;

    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["data"][0]["url"].as_str().unwrap().starts_with(&format!("{}/images/files/", app.root)));
    let call = &fake.calls()[0];
    let parts: Vec<(&str, String)> =
        call.parts.iter().map(|p| (p.name.as_str(), p.text.clone().unwrap_or_else(|| p.sha256.clone()))).collect();
    let expected = [
        ("image[]", sha(&images[0])),
        ("mask", sha(&mask)),
        ("image[]", sha(&images[1])),
        ("prompt", "add a hat".to_owned()),
        ("model", "gpt-image-1".to_owned()),
        ("brand_new_param", "kept".to_owned()),
    ];
    assert_eq!(parts, expected.iter().map(|(n, v)| (*n, v.clone())).collect::<Vec<_>>());
    assert_eq!(call.part("image[]").unwrap().file_name.as_deref(), Some("a.png"));
}

#[tokio::test]
async fn a_single_image_edit_with_dall_e_2_returns_a_url() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let form = Form::new()
        .text("model", "dall-e-2")
        .text("prompt", "make it blue")
        .text("n", "2")
        .part("image", file(png(64, 64, true), "in.png"));

    let res = app.post_form("/images/edits", form).await;

    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert!(body["data"][0]["url"].is_string());
}

#[tokio::test]
async fn the_json_edit_body_is_forwarded_as_json() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    use base64::Engine as _;
    let data_url =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png(8, 8, false)));
    let sent = json!({
        "model": "gpt-image-1.5",
        "prompt": "watercolour",
        "images": [{"image_url": data_url}, {"file_id": "file-abc123"}],
        "mask": {"image_url": "https://example.com/mask.png"},
    });

    let res = app.post_json("/images/edits", &sent).await;

    assert_eq!(res.status(), 200);
    assert_eq!(fake.calls()[0].json.as_ref(), Some(&sent));
}

#[tokio::test]
async fn variations_are_forwarded_as_multipart() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let image = png(32, 32, false);
    let form = Form::new().part("image", file(image.clone(), "v.png")).text("n", "2").text("size", "256x256");

    let res = app.post_form("/images/variations", form).await;

    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let call = &fake.calls()[0];
    assert_eq!(call.path, "/v1/images/variations");
    assert_eq!(call.parts.iter().find(|p| p.name == "image").unwrap().sha256, sha(&image));
}

#[tokio::test]
async fn malformed_multipart_and_duplicate_fields_get_400_without_an_upstream_call() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let url = format!("{}/images/edits", app.base_url);

    let res = app
        .client
        .post(&url)
        .bearer_auth(&app.key)
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nunterminated")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(res).await;
    assert_eq!((status, &error["param"], &error["code"]), (400, &json!(null), &json!(null)));
    assert!(error["message"].as_str().unwrap().contains("multipart"), "{error}");

    let res = app
        .client
        .post(&url)
        .bearer_auth(&app.key)
        .header("content-type", "multipart/form-data")
        .body("no boundary")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(res).await;
    assert_eq!((status, &error["param"], &error["code"]), (400, &json!(null), &json!(null)));
    assert!(error["message"].as_str().unwrap().contains("boundary"), "{error}");

    let form = Form::new().text("prompt", "one").text("prompt", "two").part("image", file(png(8, 8, false), "x.png"));
    let (status, error) = error_of(app.post_form("/images/edits", form).await).await;
    assert_eq!((status, &error["param"], &error["code"]), (400, &json!("prompt"), &json!(null)));

    assert_eq!(fake.call_count(), 0);
}

/// A form sent in small chunks without a `Content-Length` is parsed as it arrives: what reaches the upstream
/// is the form sent, its file byte for byte; past the multipart limit, or malformed before its end, it is
/// refused (413 stating the limit, 400) and nothing goes upstream.
#[tokio::test]
async fn a_form_streamed_without_a_length_is_forwarded_intact_and_refused_past_the_limit() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_multipart_body = bytesize::ByteSize::kib(256)).await;
    let boundary = "streamed-form-boundary";
    let form = |image: &[u8], tail: &[u8]| {
        let mut body = Vec::new();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nadd a hat\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
                 Content-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(image);
        body.extend_from_slice(tail);
        body
    };
    let send = |body: Vec<u8>, size: usize| {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(size).map(|c| Ok(c.to_vec())).collect();
        app.client
            .post(format!("{}/images/edits", app.base_url))
            .bearer_auth(&app.key)
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
    };
    let image = png(300, 300, false);
    let end = format!("\r\n--{boundary}--\r\n");

    let res = send(form(&image, end.as_bytes()), 7).await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let call = &fake.calls()[0];
    let files: Vec<(&str, &str)> =
        call.parts.iter().filter(|p| p.file_name.is_some()).map(|p| (p.name.as_str(), p.sha256.as_str())).collect();
    assert_eq!(files, [("image", sha(&image).as_str())]);
    assert_eq!(call.field("prompt").as_deref(), Some("add a hat"));

    let (status, error) = error_of(send(form(&vec![0u8; 300 * 1024], end.as_bytes()), 4096).await.unwrap()).await;
    assert_eq!((status, &error["code"]), (413, &json!("request_too_large")));
    assert!(error["message"].as_str().unwrap().contains("262144"), "{error}");
    // The limit counts what follows the form's end too.
    let mut body = form(&image, end.as_bytes());
    body.extend(std::iter::repeat_n(b'z', 300 * 1024));
    let (status, error) = error_of(send(body, 4096).await.unwrap()).await;
    assert_eq!((status, &error["code"]), (413, &json!("request_too_large")));

    // Malformed before its end (a part with no name), the rest of the body following.
    let broken = format!("\r\n--{boundary}\r\nContent-Disposition: form-data\r\n\r\nx\r\n--{boundary}--\r\n");
    let mut body = form(&image, broken.as_bytes());
    body.extend(std::iter::repeat_n(b'z', 64 * 1024));
    let (status, error) = error_of(send(body, 1024).await.unwrap()).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(fake.call_count(), 1, "refused forms never reach the upstream");
}

#[tokio::test]
async fn an_oversized_upload_gets_413_stating_the_multipart_limit() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.server.max_multipart_body = bytesize::ByteSize::kib(256)).await;
    let form = Form::new().text("prompt", "x").part("image", file(vec![0u8; 400 * 1024], "big.png"));

    let (status, error) = error_of(app.post_form("/images/edits", form).await).await;

    assert_eq!((status, &error["param"], &error["code"]), (413, &json!(null), &json!("request_too_large")));
    assert!(error["message"].as_str().unwrap().contains("262144"), "{error}");
    assert_eq!(fake.call_count(), 0);
}
