//! The model catalog at the edge (issue 14): file types mended from their bytes, repeated identical fields
//! collapsed, aliases the upstream and the ledger see, and lifecycle headers and shutdowns for models the
//! operator declares in config only.

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::support::app::{TestApp, error_of, png};
use crate::support::fake_openai::FakeOpenAi;

fn typed(bytes: Vec<u8>, name: &str, mime: &str) -> Part {
    Part::bytes(bytes).file_name(name.to_owned()).mime_str(mime).unwrap()
}

/// A part with no `Content-Type` header at all, as the Rust `async-openai` crate sends files.
fn untyped(bytes: Vec<u8>) -> Part {
    Part::bytes(bytes).file_name("upload")
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(32, 32, image::Rgb([10, 200, 30])));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn content_types(fake: &FakeOpenAi) -> Vec<(String, Option<String>)> {
    let call = fake.last_call().expect("an upstream call");
    call.parts.iter().filter(|p| p.file_name.is_some()).map(|p| (p.name.clone(), p.content_type.clone())).collect()
}

fn pair(name: &str, mime: &str) -> (String, Option<String>) {
    (name.to_owned(), Some(mime.to_owned()))
}

fn models(toml_text: &str) -> imagegate::catalog::ModelsSettings {
    toml::from_str(toml_text).unwrap()
}

#[tokio::test]
async fn parts_without_a_type_or_declared_octet_stream_reach_the_upstream_typed_from_their_bytes() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let octet = "application/octet-stream";

    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "a hat")
        .part("image[]", typed(png(64, 64, false), "a.png", "image/png"))
        .part("image[]", untyped(encoded(image::ImageFormat::Jpeg)))
        .part("image[]", typed(encoded(image::ImageFormat::WebP), "c", octet))
        .part("mask", typed(png(64, 64, true), "mask", octet));
    let res = app.post_form("/images/edits", form).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    assert_eq!(
        content_types(&fake),
        [
            pair("image[]", "image/png"),
            pair("image[]", "image/jpeg"),
            pair("image[]", "image/webp"),
            pair("mask", "image/png")
        ]
    );

    // dall-e-2 variations too: the `openai` CLI and raw bytes in the Python SDK send octet-stream.
    let form = Form::new().text("model", "dall-e-2").part("image", typed(png(64, 64, true), "upload", octet));
    let res = app.post_form("/images/variations", form).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    assert_eq!(content_types(&fake), [pair("image", "image/png")]);
    assert_eq!(fake.call_count(), 2);
}

#[tokio::test]
async fn a_part_whose_declared_type_contradicts_its_bytes_is_refused_without_an_upstream_call() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    for (param, form) in [
        (
            "image",
            Form::new()
                .text("model", "gpt-image-1")
                .text("prompt", "x")
                .part("image", typed(png(64, 64, false), "a.jpg", "image/jpeg")),
        ),
        // Octet-stream whose bytes are no image stays refused by its bytes.
        (
            "image",
            Form::new()
                .text("model", "gpt-image-1")
                .text("prompt", "x")
                .part("image", typed(b"%PDF-1.7 not an image".to_vec(), "a", "application/octet-stream")),
        ),
    ] {
        let (status, error) = error_of(app.post_form("/images/edits", form).await).await;
        assert_eq!(
            (status, error["param"].as_str(), error["code"].as_str()),
            (400, Some(param), Some("invalid_image_format"))
        );
    }
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn with_mending_off_octet_stream_is_refused_and_untyped_parts_are_forwarded_as_sent() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.validation.mend_file_types = false).await;
    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "x")
        .part("image", typed(png(64, 64, false), "a", "application/octet-stream"));
    let (status, error) = error_of(app.post_form("/images/edits", form).await).await;
    assert_eq!(
        (status, error["param"].as_str(), error["code"].as_str()),
        (400, Some("image"), Some("unsupported_file_mimetype"))
    );
    assert_eq!(fake.call_count(), 0);

    // OpenAI accepts parts without a type (the async-openai maintainers report): forwarded untouched.
    let form = Form::new().text("model", "gpt-image-1").text("prompt", "x").part("image", untyped(png(64, 64, false)));
    let res = app.post_form("/images/edits", form).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    assert_eq!(content_types(&fake), [("image".to_owned(), None)]);
}

#[tokio::test]
async fn a_field_repeated_with_the_same_value_reaches_the_upstream_once_and_differing_repeats_are_refused() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let form = |second: &str| {
        Form::new()
            .text("model", "gpt-image-1")
            .text("prompt", "x")
            .text("output_format", "jpeg")
            .text("output_compression", "80")
            .part("image", typed(png(64, 64, false), "a.png", "image/png"))
            .text("output_compression", second.to_owned())
    };
    let res = app.post_form("/images/edits", form("80")).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    let call = fake.last_call().unwrap();
    assert_eq!(call.parts.iter().filter(|p| p.name == "output_compression").count(), 1);
    assert_eq!(call.field("output_compression").as_deref(), Some("80"));

    let (status, error) = error_of(app.post_form("/images/edits", form("60")).await).await;
    assert_eq!((status, error["param"].as_str()), (400, Some("output_compression")));
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn an_alias_moves_callers_to_another_model_which_the_upstream_sees_and_the_ledger_records_with_the_name_asked() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.models = models(
            r#"
            [aliases]
            "gpt-image-1" = "gpt-image-2"
            "#,
        );
    })
    .await;
    // gpt-image-2 takes free sizes; gpt-image-1 does not: the alias's rules are the ones checked.
    let res =
        app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x", "size": "1536x864"})).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    assert_eq!(fake.last_call().unwrap().field("model").as_deref(), Some("gpt-image-2"));

    let form = Form::new()
        .text("model", "gpt-image-1")
        .text("prompt", "x")
        .part("image", typed(png(64, 64, false), "a.png", "image/png"));
    let res = app.post_form("/images/edits", form).await;
    assert_eq!(res.status(), 200);
    assert_eq!(fake.last_call().unwrap().field("model").as_deref(), Some("gpt-image-2"));

    let rows = requested_models(&app, 2).await;
    assert_eq!(rows, vec![("gpt-image-2".to_owned(), Some("gpt-image-1".to_owned())); 2]);
}

/// `(model, requested_model)` of the ledger's rows, oldest first.
async fn requested_models(app: &TestApp, expected: usize) -> Vec<(String, Option<String>)> {
    use sqlx::Row;
    let ids: Vec<String> =
        app.usage_rows(expected).await.iter().map(|r| r["request_id"].as_str().unwrap().to_owned()).collect();
    let pool = app.pool().await;
    let mut out = Vec::new();
    for id in ids {
        let row = sqlx::query(&format!("SELECT model, requested_model FROM usage_events WHERE request_id = '{id}'"))
            .fetch_one(&pool)
            .await
            .unwrap();
        out.push((row.get::<String, _>(0), row.get::<Option<String>, _>(1)));
    }
    out
}

#[tokio::test]
async fn a_model_going_away_is_announced_on_every_answer_with_deprecation_sunset_and_link() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.models = models(
            r#"
            ["gpt-image-1.5"]
            deprecated_on = "2026-06-02"
            shutdown_on = "2099-12-01"
            replacement = "gpt-image-2"
            "#,
        );
    })
    .await;
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1.5", "prompt": "x"})).await;
    assert_eq!(res.status(), 200);
    let header = |name: &str| res.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("deprecation"), Some("@1780358400".to_owned()), "RFC 9745: @<unix seconds> of 2026-06-02");
    assert_eq!(header("sunset"), Some("Tue, 01 Dec 2099 00:00:00 GMT".to_owned()));
    let link = header("link").unwrap();
    assert!(link.contains("rel=\"successor-version\"") && link.contains("gpt-image-2"), "{link}");
    // Refusals carry it too: the caller learns before the model breaks them.
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1.5", "prompt": ""})).await;
    assert_eq!(res.status(), 400);
    assert!(res.headers().contains_key("sunset"));
    // A model without lifecycle dates carries none.
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-2", "prompt": "x"})).await;
    assert!(!res.headers().contains_key("deprecation") && !res.headers().contains_key("sunset"));
}

#[tokio::test]
async fn a_model_past_its_shutdown_is_not_found_like_at_openai_unless_an_alias_moves_its_callers() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.models = models(
            r#"
            [aliases]
            "acme-retired" = "gpt-image-2"
            ["acme-old"]
            extends = "gpt-image-2"
            shutdown_on = "2020-01-01"
            ["acme-retired"]
            extends = "gpt-image-2"
            shutdown_on = "2020-01-01"
            "#,
        );
    })
    .await;
    let res = app.post_json("/images/generations", &json!({"model": "acme-old", "prompt": "x"})).await;
    let (status, error) = error_of(res).await;
    assert_eq!(
        (status, error["type"].as_str(), error["code"].as_str()),
        (404, Some("invalid_request_error"), Some("model_not_found"))
    );
    assert!(error["message"].as_str().unwrap().contains("acme-old"));
    assert_eq!(fake.call_count(), 0);

    let res = app.post_json("/images/generations", &json!({"model": "acme-retired", "prompt": "x"})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(fake.last_call().unwrap().field("model").as_deref(), Some("gpt-image-2"));
}

#[tokio::test]
async fn the_builtin_lifecycle_applies_only_when_switched_on_or_talking_to_openai() {
    let fake = FakeOpenAi::start().await;
    // The fake is not api.openai.com: OpenAI's own dates for its models do not apply by default.
    let app = TestApp::spawn(&fake.url).await;
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x"})).await;
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("sunset"));

    let app = TestApp::spawn_with(&fake.url, |s| {
        s.validation.builtin_lifecycle = imagegate::config::BuiltinLifecycle::On;
    })
    .await;
    // gpt-image-1 was shut down on 2026-10-23: refused like OpenAI refuses it, without an upstream call.
    let before = fake.call_count();
    let (status, error) =
        error_of(app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "x"})).await).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("model_not_found")));
    assert_eq!(fake.call_count(), before);
    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-2", "prompt": "x"})).await;
    assert_eq!(res.status(), 200);
    let _: Value = res.json().await.unwrap();
}

#[tokio::test]
async fn the_admin_api_lists_the_catalog_with_each_models_status_and_aliases() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.models = models(
            r#"
            [aliases]
            "house" = "house-model"
            ["house-model"]
            extends = "gpt-image-2"
            deprecated_on = "2026-01-01"
            shutdown_on = "2099-01-01"
            replacement = "gpt-image-2"
            "#,
        );
    })
    .await;
    let res = app
        .client
        .get(format!("{}/admin/v1/models", app.root))
        .bearer_auth(crate::support::app::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let models = body["data"].as_array().unwrap();
    let house = models.iter().find(|m| m["id"] == "house-model").unwrap();
    assert_eq!(house["status"], "deprecated");
    assert_eq!(house["lifecycle_enforced"], true);
    assert_eq!(house["aliases"], json!(["house"]));
    assert_eq!((house["source"].as_str(), house["price"].as_str()), (Some("config"), Some("per_token")));
    assert_eq!(house["shutdown_on"], "2099-01-01");
    let builtin = models.iter().find(|m| m["id"] == "gpt-image-1").unwrap();
    assert_eq!((builtin["status"].as_str(), builtin["lifecycle_enforced"].as_bool()), (Some("shut_down"), Some(false)));
    // Behind the admin token like every admin route.
    let res = app.client.get(format!("{}/admin/v1/models", app.root)).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

/// A generation answered with an imagegate link, for the tenant of `key`.
async fn generated_link(app: &TestApp, key: &str) -> String {
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-image-1", "prompt": "a red kite", "response_format": "url"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let link = body["data"][0]["url"].as_str().unwrap().to_owned();
    assert!(link.starts_with(&app.root), "{link}");
    link
}

#[tokio::test]
async fn a_chained_edit_sends_the_upstream_the_bytes_behind_an_imagegate_link_never_the_link() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let link = generated_link(&app, &app.key).await;
    let stored = app.client.get(&link).send().await.unwrap().bytes().await.unwrap();

    // The JSON edit body: images[].image_url.
    let edit = json!({"model": "gpt-image-1", "prompt": "add a tail", "images": [{"image_url": link}]});
    let res = app.post_json("/images/edits", &edit).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    let call = fake.last_call().unwrap();
    let sent = call.json.as_ref().unwrap()["images"][0]["image_url"].as_str().unwrap().to_owned();
    let b64 = sent.strip_prefix("data:image/png;base64,").expect("a data: URL of the image");
    use base64::Engine as _;
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap(), stored);
    assert!(!serde_json::to_string(&call.json).unwrap().contains(&app.root), "the upstream never sees the link");

    // A multipart part carrying the link becomes a file part with the image.
    let form = Form::new().text("model", "gpt-image-1").text("prompt", "x").text("image", link.clone());
    let res = app.post_form("/images/edits", form).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap_or_default());
    let call = fake.last_call().unwrap();
    let part = call.part("image").unwrap();
    assert_eq!((part.content_type.as_deref(), part.len), (Some("image/png"), stored.len()));
    assert!(part.text.is_none());
}

#[tokio::test]
async fn a_chained_edit_refuses_another_tenants_link_a_forged_one_and_never_calls_the_upstream() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    let theirs = generated_link(&app, &app.other_key).await;
    let calls = fake.call_count();
    let forged = format!("{}AAAA", theirs.trim_end_matches(|c: char| c != '='));
    let mine = generated_link(&app, &app.key).await;
    let tampered = mine.replacen("expires=", "expires=1", 1);
    for (label, link) in [("another tenant's", theirs), ("a forged", forged), ("a tampered", tampered)] {
        let edit = json!({"model": "gpt-image-1", "prompt": "x", "images": [{"image_url": link}]});
        let (status, error) = error_of(app.post_json("/images/edits", &edit).await).await;
        assert_eq!(
            (status, error["param"].as_str(), error["code"].as_str()),
            (400, Some("images[0].image_url"), Some("invalid_image_url")),
            "{label} link: {error}"
        );
    }
    assert_eq!(fake.call_count(), calls + 1, "only the second generation reached the upstream");
}

#[tokio::test]
async fn a_tenants_own_alias_moves_only_that_tenants_callers() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.models = models(
            r#"
            [tenant_aliases."team-a"]
            "gpt-image-1" = "gpt-image-2"
            "#,
        );
    })
    .await;
    let body = json!({"model": "gpt-image-1", "prompt": "x"});
    let res = app.post_json("/images/generations", &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(fake.last_call().unwrap().field("model").as_deref(), Some("gpt-image-2"), "team-a is moved");
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(fake.last_call().unwrap().field("model").as_deref(), Some("gpt-image-1"), "team-b is not");
}
