//! The compiled binary, run as users run it: `imagegate serve --config FILE`. Covers startup validation,
//! the offline mock upstream, graceful shutdown on SIGTERM and what reaches the logs.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use imagegate::domain::keys;
use serde_json::json;

use crate::support::app::{FAKE_IMAGE_HOSTS, GatewayProcess, UPSTREAM_KEY};
use crate::support::fake_openai::FakeOpenAi;

/// A config file for the binary; returns (dir, path, tenant key).
fn config(upstream: &str, extra: &str) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = keys::generate();
    // No load balancer waits on these gateways: no grace period unless a test asks for one.
    let grace = if extra.contains("shutdown_grace") { "" } else { "shutdown_grace = \"0s\"\n" };
    let body = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"10s\"\n{grace}{extra}\n{upstream}\n{FAKE_IMAGE_HOSTS}\
         [[tenants]]\nname = \"ci\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        key.id, key.sha256
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, body).unwrap();
    (dir, path.to_string_lossy().into_owned(), key.key)
}

/// Run `imagegate serve --config PATH` in `dir` with `env` applied to its environment, expecting it to refuse
/// to start; what it wrote to stderr.
fn serve_refused(dir: &tempfile::TempDir, path: &str, env: impl FnOnce(&mut Command) -> &mut Command) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_imagegate"));
    command.args(["serve", "--config", path]).current_dir(dir.path());
    let out = env(&mut command).output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn serve_without_an_upstream_key_fails_at_startup_and_says_how_to_fix_it() {
    let (dir, path, _) = config("[upstream]\nkind = \"openai\"", "");

    let stderr = serve_refused(&dir, &path, |c| c.env_remove("OPENAI_API_KEY"));

    assert!(
        stderr.contains("upstream.api_key") && stderr.contains("OPENAI_API_KEY") && stderr.contains("--mock"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_upstream_ca_file_that_holds_no_certificate_fails_at_startup_naming_the_file() {
    let scratch = tempfile::tempdir().unwrap();
    let not_pem = scratch.path().join("corp-ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let upstream = format!(
        "[upstream]\nkind = \"openai\"\nbase_url = \"https://llm.internal.example/v1\"\napi_key = \"sk-x\"\nca_file = '{}'",
        not_pem.display()
    );
    let (dir, path, _) = config(&upstream, "");

    let stderr = serve_refused(&dir, &path, |c| c);

    assert!(stderr.contains("upstream ca_file") && stderr.contains("corp-ca.pem"), "{stderr}");
}

#[tokio::test]
async fn the_mock_upstream_serves_real_images_of_the_requested_size_and_format() {
    let (dir, path, key) = config("", "");
    let gw = GatewayProcess::start(&["serve", "--mock", "--config", &path], dir.path());
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        client.post(format!("{}/v1/images/generations", gw.root)).bearer_auth(&key).json(&body).send()
    };

    let res =
        post(json!({"model": "gpt-image-1", "prompt": "a tree", "size": "1024x1536", "output_format": "jpeg", "n": 2}))
            .await
            .unwrap();
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert!(body["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(body["data"][0]["b64_json"].as_str().unwrap()).unwrap();
    assert_eq!(image::guess_format(&bytes).unwrap(), image::ImageFormat::Jpeg);
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (1024, 1536));

    // DALL·E answers with a URL that serves a real PNG.
    let body: serde_json::Value =
        post(json!({"model": "dall-e-2", "prompt": "a tree", "size": "256x256"})).await.unwrap().json().await.unwrap();
    let url = body["data"][0]["url"].as_str().unwrap().to_owned();
    let png = client.get(&url).send().await.unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    let decoded = image::load_from_memory(&png.bytes().await.unwrap()).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (256, 256));

    // The mock's own links (behind that one) are signed: a file it never handed out is refused, not rendered.
    let forged = format!("{}/_mock/files/0000000000000001-4096x4096.png?se=9999999999&sig=AAAA", gw.root);
    let res = client.get(&forged).send().await.unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.text().await.unwrap().contains("Signature did not match"));

    // Deterministic from the prompt.
    let again: serde_json::Value =
        post(json!({"model": "dall-e-2", "prompt": "a tree", "size": "256x256"})).await.unwrap().json().await.unwrap();
    let png2 = client.get(again["data"][0]["url"].as_str().unwrap()).send().await.unwrap().bytes().await.unwrap();
    let png1 = client.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(png1, png2);

    // GPT image models answer with imagegate's own link when asked for one.
    let body: serde_json::Value =
        post(json!({"model": "gpt-image-1", "prompt": "x", "size": "1024x1024", "response_format": "url"}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let url = body["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}/images/files/", gw.root)), "{url}");
    let png = client.get(url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 1024);
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let fake = FakeOpenAi::start().await;
    let upstream = format!("[upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"", fake.url);
    let (dir, path, key) = config(&upstream, "");
    let mut gw = GatewayProcess::start(&["serve", "--config", &path], dir.path());

    let url = format!("{}/v1/images/generations", gw.root);
    let slow = tokio::spawn(async move {
        reqwest::Client::new().post(url).bearer_auth(key).json(&json!({"prompt": "x #sleep=1500"})).send().await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(fake.call_count(), 1, "the slow request is in flight");
    gw.terminate();

    let res = slow.await.unwrap().unwrap();
    assert_eq!(res.status(), 200, "in-flight request completed during the drain");
    let status = gw.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}: {}", gw.printed());
    assert!(gw.printed().contains("drained"), "{}", gw.printed());
}

#[tokio::test]
async fn logs_carry_request_ids_but_never_keys_prompts_or_image_data() {
    let fake = FakeOpenAi::start().await;
    let upstream = format!("[upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"", fake.url);
    let (dir, path, key) = config(&upstream, "[log]\nformat = \"json\"\nlevel = \"debug\"");
    let mut gw = GatewayProcess::start(&["serve", "--config", &path], dir.path());
    let client = reqwest::Client::new();

    let res = client
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-image-1", "prompt": "secret-prompt-text"}))
        .send()
        .await
        .unwrap();
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: serde_json::Value = res.json().await.unwrap();
    let b64 = body["data"][0]["b64_json"].as_str().unwrap().to_owned();
    let image = crate::support::app::png(32, 32, false);
    let form = reqwest::multipart::Form::new().text("prompt", "x").part(
        "image",
        reqwest::multipart::Part::bytes(image.clone()).file_name("a.png").mime_str("image/png").unwrap(),
    );
    let res =
        client.post(format!("{}/v1/images/edits", gw.root)).bearer_auth(&key).multipart(form).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth("ig_badbadba_nope")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    gw.terminate();
    gw.wait(Duration::from_secs(10));

    let logs = gw.printed();
    assert!(logs.contains(&request_id), "request id missing from logs");
    assert!(logs.contains("\"target\":\"imagegate::usage\""), "no usage event: {logs}");
    for (what, secret) in [
        ("tenant key", key.as_str()),
        ("tenant key secret", &key[12..]),
        ("upstream key", UPSTREAM_KEY),
        ("prompt", "secret-prompt-text"),
        ("base64 image", &b64[..40.min(b64.len())]),
        ("bad key", "ig_badbadba_nope"),
    ] {
        assert!(!logs.contains(secret), "{what} leaked into the logs");
    }
    let image_b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    assert!(!logs.contains(&image_b64[..32]));
}

/// A fresh client per request: no pooled connection survives into the next check.
async fn get_status(url: &str) -> Result<u16, reqwest::Error> {
    reqwest::Client::builder().pool_max_idle_per_host(0).build()?.get(url).send().await.map(|r| r.status().as_u16())
}

#[tokio::test]
async fn after_sigterm_readyz_answers_503_while_requests_are_still_served_for_the_grace_period() {
    let fake = FakeOpenAi::start().await;
    let upstream = format!("[upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"", fake.url);
    let (dir, path, key) = config(&upstream, "shutdown_grace = \"1500ms\"");
    let mut gw = GatewayProcess::start(&["serve", "--config", &path], dir.path());
    let readyz = format!("{}/readyz", gw.root);
    assert_eq!(get_status(&readyz).await.unwrap(), 200);

    let signalled = std::time::Instant::now();
    gw.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let res = reqwest::get(&readyz).await.unwrap();
    assert_eq!(res.status(), 503, "load balancers see the replica going");
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["status"], "draining");
    let res = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key)
        .json(&json!({"prompt": "during the grace period"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "traffic still arriving is served, not refused");
    assert!(signalled.elapsed() < Duration::from_millis(1500), "checked within the grace period");

    let status = gw.wait(Duration::from_secs(10));
    assert!(status.success(), "{}", gw.printed());
    assert!(signalled.elapsed() >= Duration::from_millis(1500), "the listener stayed open for the grace period");
    assert!(get_status(&readyz).await.is_err(), "closed afterwards");
}

#[tokio::test]
async fn a_second_signal_ends_the_grace_period_at_once() {
    let (dir, path, _) = config("", "shutdown_grace = \"8s\"");
    let mut gw = GatewayProcess::start(&["serve", "--mock", "--config", &path], dir.path());
    let signalled = std::time::Instant::now();
    gw.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = get_status(&format!("{}/readyz", gw.root)).await;
    assert!(matches!(ready, Ok(503)), "{ready:?}: {}", gw.printed());
    gw.terminate();
    assert!(gw.wait(Duration::from_secs(5)).success(), "{}", gw.printed());
    assert!(signalled.elapsed() < Duration::from_secs(4), "did not wait out the 8 s grace");
}

#[tokio::test]
async fn openai_api_key_in_the_environment_never_replaces_the_files_key_or_reaches_its_base_url() {
    let fake = FakeOpenAi::start().await;
    let real = "sk-proj-the-developers-real-openai-key";
    let upstream = format!("[upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"", fake.url);
    let (dir, path, key) = config(&upstream, "");
    let mut gw = GatewayProcess::start_with_env(&["serve", "--config", &path], dir.path(), &[("OPENAI_API_KEY", real)]);

    let res = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key)
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let call = fake.last_call().unwrap();
    assert_eq!(call.header("authorization"), Some(format!("Bearer {UPSTREAM_KEY}").as_str()), "the file's key");
    gw.terminate();
    gw.wait(Duration::from_secs(10));

    // A file pointing at the fake without a key of its own: refused at startup, never sent the user's key.
    let (dir, path, _) = config(&format!("[upstream]\nbase_url = \"{}\"", fake.url), "");
    let stderr = serve_refused(&dir, &path, |c| c.env("OPENAI_API_KEY", real));
    assert!(stderr.contains("only sent to https://api.openai.com"), "{stderr}");
    assert!(!stderr.contains(real), "{stderr}");
    assert!(fake.calls().iter().all(|c| c.headers.iter().all(|(_, v)| !v.contains(real))), "never sent upstream");
}

#[tokio::test]
async fn upstream_and_download_failures_never_log_query_secrets_or_signed_urls() {
    let fake = FakeOpenAi::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let gateways = [
        // The upstream cannot be reached: reqwest's error names the URL, query and all.
        format!(
            "[upstream]\nbase_url = \"http://127.0.0.1:{closed}/v1\"\napi_key = \"{UPSTREAM_KEY}\"\nconnect_retries = 0\n\
             [upstream.query]\nkey = \"QUERYSECRET0123\""
        ),
        // The upstream answers, but its image link (signed, as Azure's are) cannot be fetched.
        format!("[upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"", fake.url),
    ];
    let prompt = format!("x #image_url=http://127.0.0.1:{closed}/img.png?se=1&sig=SIGSECRET0123");
    for upstream in gateways {
        let (dir, path, key) = config(&upstream, "[log]\nformat = \"json\"\nlevel = \"debug\"");
        let mut gw = GatewayProcess::start(&["serve", "--config", &path], dir.path());
        let res = reqwest::Client::new()
            .post(format!("{}/v1/images/generations", gw.root))
            .bearer_auth(&key)
            .json(&json!({"model": "dall-e-2", "prompt": prompt}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502);
        let body = res.text().await.unwrap();
        gw.terminate();
        gw.wait(Duration::from_secs(10));
        let logs = gw.printed();
        assert!(logs.contains("request failed"), "the failure is logged: {logs}");
        for secret in ["QUERYSECRET0123", "SIGSECRET0123", "img.png?"] {
            assert!(!logs.contains(secret), "{secret} leaked into the logs: {logs}");
            assert!(!body.contains(secret), "{secret} leaked into the answer: {body}");
        }
    }
}

#[tokio::test]
async fn an_egress_proxy_named_in_the_environment_carries_the_upstream_requests() {
    // The fake stands in for an HTTP proxy: a proxied request arrives as `POST http://upstream.invalid/v1/…`
    // (absolute form), which it routes by its path like any other. `upstream.invalid` resolves nowhere, so
    // an answer proves the request went through the proxy.
    let fake = FakeOpenAi::start().await;
    let upstream = format!(
        "[upstream]\nbase_url = \"http://upstream.invalid/v1\"\napi_key = \"{UPSTREAM_KEY}\"\nconnect_retries = 0"
    );
    let (dir, path, key) = config(&upstream, "[log]\nlevel = \"info\"");
    let proxy = fake.base.as_str();
    let env = [("HTTP_PROXY", proxy), ("http_proxy", proxy), ("NO_PROXY", ""), ("no_proxy", "")];
    let mut gw = GatewayProcess::start_with_env(&["serve", "--config", &path], dir.path(), &env);

    let res = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", gw.root))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-image-1", "prompt": "a tree"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    gw.terminate();
    gw.wait(Duration::from_secs(10));

    let calls = fake.calls_to("/v1/images/generations");
    assert_eq!(calls.len(), 1);
    let host = calls[0].headers.iter().find(|(name, _)| name == "host").map(|(_, v)| v.as_str());
    assert_eq!(host, Some("upstream.invalid"), "sent to the proxy for the upstream's host");
    assert!(calls[0].headers.iter().any(|(n, v)| n == "authorization" && v.ends_with(UPSTREAM_KEY)));
    let logs = gw.printed();
    assert!(logs.contains("through the proxy named in the environment"), "the choice is logged: {logs}");
}
