//! Pools of deployments: two or three fake upstreams behind `[pools.default]`, one failure mode per test, and
//! the calls each fake received counted, since every call may be a paid generation.

use std::time::Duration;

use futures::StreamExt as _;
use imagegate::config::{PoolSettings, Secret, Settings, UpstreamAuth, UpstreamRoute, UpstreamSettings};
use serde_json::{Value, json};
use url::Url;

use crate::support::app::{ADMIN_TOKEN, TestApp, UPSTREAM_KEY, error_of, png};
use crate::support::fake_openai::{AzureOptions, FakeOpenAi, FakeOptions};

/// A deployment table for `url` with short deadlines, no connect retries and a long breaker.
fn deployment(url: &str) -> UpstreamSettings {
    UpstreamSettings {
        base_url: Url::parse(url).unwrap(),
        api_key: Some(Secret::new(UPSTREAM_KEY)),
        connect_timeout: Duration::from_millis(300),
        timeout: Duration::from_secs(5),
        connect_retries: 0,
        unhealthy_for: Duration::from_secs(60),
        ..UpstreamSettings::default()
    }
}

/// A fake whose every call misbehaves as `triggers` say.
async fn fake_with(triggers: &str) -> FakeOpenAi {
    FakeOpenAi::start_with(FakeOptions { triggers: Some(triggers.to_owned()), ..FakeOptions::default() }).await
}

/// A gateway whose default pool is `deployments`, in order.
async fn gateway(deployments: Vec<(&str, UpstreamSettings)>) -> TestApp {
    gateway_with(deployments, |_| {}).await
}

async fn gateway_with(deployments: Vec<(&str, UpstreamSettings)>, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let first = deployments[0].1.base_url.to_string();
    TestApp::spawn_with(&first, move |s| {
        let names = deployments.iter().map(|(n, _)| (*n).to_owned()).collect();
        for (name, up) in deployments {
            s.upstreams.insert(name.to_owned(), up);
        }
        s.pools.insert("default".to_owned(), PoolSettings { deployments: names });
        tweak(s);
    })
    .await
}

/// A port nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/v1")
}

/// A listener that never accepts, its backlog already full: a new connect hangs until its timeout (the
/// SYN is dropped), as with a host that has vanished. Keep the returned values alive for the test.
fn blackhole_url() -> (String, tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => fillers.push(stream),
            Err(_) => break,
        }
    }
    (format!("http://{addr}/v1"), listener, fillers)
}

async fn generate(app: &TestApp, prompt: &str) -> reqwest::Response {
    app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": prompt, "response_format": "b64_json"}))
        .await
}

fn deployment_header(res: &reqwest::Response) -> String {
    res.headers().get("x-imagegate-deployment").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

async fn pools_status(app: &TestApp) -> Value {
    let res = app.client.get(format!("{}/admin/v1/pools", app.root)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

fn deployment_status<'a>(status: &'a Value, pool: &str, name: &str) -> &'a Value {
    let pool = status["pools"].as_array().unwrap().iter().find(|p| p["name"] == pool).unwrap();
    pool["deployments"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap()
}

#[tokio::test]
async fn a_closed_port_moves_the_request_to_the_next_deployment_and_the_ledger_names_it() {
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("down", deployment(&closed_port_url())), ("up", deployment(&good.url))]).await;

    let res = generate(&app, "a lighthouse").await;
    assert_eq!(res.status(), 200);
    assert_eq!(deployment_header(&res), "up");
    assert_eq!(good.call_count(), 1);
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["deployment"], "up");
    assert_eq!(rows[0]["possibly_billed"], 0);
    assert_eq!(rows[0]["images_returned"], 1);
}

#[tokio::test]
async fn a_connect_timeout_is_a_connect_failure_that_moves_on() {
    let (hole, _listener, _fillers) = blackhole_url();
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("vanished", deployment(&hole)), ("up", deployment(&good.url))]).await;

    let res = generate(&app, "a harbour").await;
    assert_eq!(res.status(), 200);
    assert_eq!(deployment_header(&res), "up");
    assert_eq!(good.call_count(), 1);
    assert_eq!(deployment_status(&pools_status(&app).await, "default", "vanished")["state"], "unhealthy");
}

#[tokio::test]
async fn a_connect_timeout_alone_is_reported_as_unreachable_not_as_a_slow_generation() {
    let (hole, _listener, _fillers) = blackhole_url();
    let app = TestApp::spawn_with(&hole, |s| {
        s.upstream.connect_timeout = Duration::from_millis(200);
        s.upstream.connect_retries = 1;
    })
    .await;

    let res = generate(&app, "a quay").await;
    assert_eq!(res.headers().get("x-should-retry").map(|v| v.to_str().unwrap()), None, "nothing was billed");
    let (status, error) = error_of(res).await;
    assert_eq!(status, 502);
    assert_eq!(error["code"], "upstream_unavailable");
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["possibly_billed"], 0);
}

#[tokio::test]
async fn a_500_moves_on_and_takes_the_deployment_out_of_rotation() {
    let broken = fake_with("#status=500").await;
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("broken", deployment(&broken.url)), ("good", deployment(&good.url))]).await;

    for i in 0..4 {
        let res = generate(&app, &format!("a pier {i}")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(deployment_header(&res), "good");
    }
    assert_eq!(broken.call_count(), 1, "out after its first 500");
    assert_eq!(good.call_count(), 4);
    let status = pools_status(&app).await;
    assert_eq!(deployment_status(&status, "default", "broken")["state"], "unhealthy");
    assert_eq!(deployment_status(&status, "default", "good")["state"], "healthy");
}

#[tokio::test]
async fn a_429_rests_the_deployment_for_its_retry_after_and_the_request_moves_on() {
    let limited = fake_with("#status=429").await;
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("limited", deployment(&limited.url)), ("good", deployment(&good.url))]).await;

    for i in 0..3 {
        let res = generate(&app, &format!("a buoy {i}")).await;
        assert_eq!(res.status(), 200);
        assert_eq!(deployment_header(&res), "good");
    }
    assert_eq!(limited.call_count(), 1, "resting after its 429");
    let status = pools_status(&app).await;
    let limited_status = deployment_status(&status, "default", "limited");
    assert_eq!(limited_status["state"], "resting");
    // The fake's retry-after is 1 s, not the 10 s default back-off.
    assert!(limited_status["resting_for_ms"].as_u64().unwrap() <= 1000, "{limited_status}");

    // `imagegate pools` shows the same, as a table.
    let table = imagegate::cli::pools::status(&Url::parse(&app.root).unwrap(), ADMIN_TOKEN, false).await.unwrap();
    let row = table.lines().find(|l| l.contains("limited")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("resting") && row.contains("default"), "{table}");
    assert!(table.lines().any(|l| l.contains("| good") && l.contains("healthy")), "{table}");
}

#[tokio::test]
async fn when_every_deployment_is_resting_the_caller_gets_429_with_the_soonest_retry_after() {
    let a = fake_with("#status=429").await;
    let b = fake_with("#status=429").await;
    let app = gateway(vec![("a", deployment(&a.url)), ("b", deployment(&b.url))]).await;

    for prompt in ["a gull", "a tern"] {
        let res = generate(&app, prompt).await;
        assert_eq!(res.headers()["retry-after"], "1");
        let (status, error) = error_of(res).await;
        assert_eq!(status, 429);
        assert_eq!(error["code"], "rate_limit_exceeded");
    }
    assert_eq!((a.call_count(), b.call_count()), (1, 1), "the second request went nowhere");
    let rows = app.usage_rows(2).await;
    assert!(rows.iter().all(|r| r["images_returned"].is_null() && r["cost_usd"] == 0.0), "{rows:?}");
    assert!(rows.iter().all(|r| r["refused_by"] == "upstream"), "{rows:?}");
}

#[tokio::test]
async fn a_deployment_slower_than_its_timeout_is_not_retried_elsewhere_and_may_have_billed() {
    let slow = fake_with("#sleep=3000").await;
    let good = FakeOpenAi::start().await;
    let mut slow_deployment = deployment(&slow.url);
    slow_deployment.timeout = Duration::from_millis(300);
    let app = gateway(vec![("slow", slow_deployment), ("good", deployment(&good.url))]).await;

    let res = generate(&app, "a trawler").await;
    assert_eq!(res.headers()["x-should-retry"], "false");
    let (status, error) = error_of(res).await;
    assert_eq!(status, 504);
    assert_eq!(error["code"], "timeout");
    assert_eq!(slow.call_count() + good.call_count(), 1, "one upstream call in total");
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["deployment"], "slow");
    assert_eq!(rows[0]["possibly_billed"], 1);
}

#[tokio::test]
async fn a_connection_reset_mid_answer_is_not_retried_elsewhere() {
    let cut = fake_with("#reset_body").await;
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("cut", deployment(&cut.url)), ("good", deployment(&good.url))]).await;

    let res = generate(&app, "a ferry").await;
    assert_eq!(res.headers()["x-should-retry"], "false");
    let (status, error) = error_of(res).await;
    assert_eq!(status, 502);
    assert_eq!(error["code"], "upstream_connection_broken");
    assert_eq!((cut.call_count(), good.call_count()), (1, 0));
    let rows = app.usage_rows(1).await;
    assert_eq!(rows[0]["deployment"], "cut");
    assert_eq!(rows[0]["possibly_billed"], 1);
}

/// The SSE events of a streamed answer: (event name, data).
async fn sse_events(res: reqwest::Response) -> Vec<(String, Value)> {
    let mut stream = res.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    buffer
        .split("\n\n")
        .filter_map(|event| {
            let name = event.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("").to_owned();
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name, serde_json::from_str(data).unwrap()))
        })
        .collect()
}

fn stream_request(prompt: &str) -> Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "stream": true, "partial_images": 1})
}

#[tokio::test]
async fn a_stream_that_opens_with_an_error_event_moves_on() {
    let failing = fake_with("#sse_error_first").await;
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("failing", deployment(&failing.url)), ("good", deployment(&good.url))]).await;

    let res = app.post_json("/images/generations", &stream_request("a regatta")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(deployment_header(&res), "good");
    let names: Vec<String> = sse_events(res).await.into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["image_generation.partial_image", "image_generation.completed"]);
    assert_eq!((failing.call_count(), good.call_count()), (1, 1));
}

#[tokio::test]
async fn a_stream_error_after_the_first_partial_image_is_passed_on_and_not_retried() {
    let failing = fake_with("#sse_error").await;
    let good = FakeOpenAi::start().await;
    let app = gateway(vec![("failing", deployment(&failing.url)), ("good", deployment(&good.url))]).await;

    let res = app.post_json("/images/generations", &stream_request("a schooner")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(deployment_header(&res), "failing");
    let names: Vec<String> = sse_events(res).await.into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["image_generation.partial_image", "error"]);
    assert_eq!((failing.call_count(), good.call_count()), (1, 0));
}

#[tokio::test]
async fn weights_split_a_thousand_requests_three_to_one() {
    let heavy = FakeOpenAi::start().await;
    let light = FakeOpenAi::start().await;
    let mut heavy_deployment = deployment(&heavy.url);
    heavy_deployment.weight = 3;
    let app = gateway(vec![("heavy", heavy_deployment), ("light", deployment(&light.url))]).await;

    let results = futures::stream::iter(0..1000)
        .map(|i| {
            let app = &app;
            async move { generate(app, &format!("a sail {i}")).await.status().as_u16() }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    assert!(results.iter().all(|s| *s == 200));
    let (h, l) = (heavy.call_count(), light.call_count());
    assert_eq!(h + l, 1000);
    assert!((730..=770).contains(&h), "heavy got {h}, light {l}: not within a few percent of 3:1");
}

#[tokio::test]
async fn a_deployments_images_per_minute_are_respected_and_the_next_tier_takes_the_rest() {
    let small = FakeOpenAi::start().await;
    let spare = FakeOpenAi::start().await;
    let mut small_deployment = deployment(&small.url);
    small_deployment.images_per_minute = Some(3);
    let mut spare_deployment = deployment(&spare.url);
    spare_deployment.priority = 1;
    let app = gateway(vec![("small", small_deployment), ("spare", spare_deployment)]).await;

    let mut served = Vec::new();
    for (i, n) in [2, 1, 1, 2].into_iter().enumerate() {
        let res = app
            .post_json(
                "/images/generations",
                &json!({"model": "dall-e-2", "prompt": format!("a mast {i}"), "n": n, "response_format": "b64_json"}),
            )
            .await;
        assert_eq!(res.status(), 200);
        served.push(deployment_header(&res));
    }
    assert_eq!(served, ["small", "small", "spare", "spare"]);
    let images_at_small: u64 = small.calls().iter().map(|c| c.field("n").unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(images_at_small, 3);
    assert_eq!(deployment_status(&pools_status(&app).await, "default", "small")["images_left"], 0);
}

const API_VERSION: &str = "2025-04-01-preview";

async fn azure_fake() -> FakeOpenAi {
    FakeOpenAi::start_with(FakeOptions {
        azure: Some(AzureOptions {
            api_version: API_VERSION.to_owned(),
            deployments: vec![("img-east".to_owned(), "gpt-image-1".to_owned())],
        }),
        ..FakeOptions::default()
    })
    .await
}

#[tokio::test]
async fn an_azure_deployment_route_gets_its_path_api_version_and_api_key() {
    let azure = azure_fake().await;
    let mut up = deployment(&format!("{}/openai", azure.base));
    up.auth = UpstreamAuth::ApiKey;
    up.route = UpstreamRoute::AzureDeployment;
    up.query.insert("api-version".to_owned(), Secret::new(API_VERSION));
    up.models.insert("gpt-image-1".to_owned(), "img-east".to_owned());
    let app = gateway(vec![("east", up)]).await;

    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "a canal"})).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let call = azure.last_call().unwrap();
    assert_eq!(call.path, "/openai/deployments/img-east/images/generations");
    assert_eq!(call.query.as_deref(), Some("api-version=2025-04-01-preview"));
    assert_eq!(call.header("api-key"), Some(UPSTREAM_KEY));
    assert_eq!(call.header("authorization"), None);
    assert_eq!(azure.call_count(), 1);
}

#[tokio::test]
async fn an_azure_v1_route_gets_the_deployment_name_as_the_model() {
    let azure = azure_fake().await;
    let mut up = deployment(&format!("{}/openai/v1", azure.base));
    up.auth = UpstreamAuth::ApiKey;
    up.models.insert("gpt-image-1".to_owned(), "img-east".to_owned());
    let app = gateway(vec![("east", up)]).await;

    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "a lock"})).await;
    assert_eq!(res.status(), 200);
    let call = azure.last_call().unwrap();
    assert_eq!(call.path, "/openai/v1/images/generations");
    assert_eq!(call.field("model").as_deref(), Some("img-east"));
    assert_eq!(call.header("api-key"), Some(UPSTREAM_KEY));
}

#[tokio::test]
async fn models_are_renamed_in_json_and_multipart_bodies_and_only_serving_deployments_are_used() {
    let a = FakeOpenAi::start().await;
    let b = FakeOpenAi::start().await;
    let mut renaming = deployment(&a.url);
    renaming.models.insert("gpt-image-1".to_owned(), "gpt-image-1.5".to_owned());
    let mut other = deployment(&b.url);
    other.models.insert("dall-e-3".to_owned(), "dall-e-3".to_owned());
    let app = gateway(vec![("renaming", renaming), ("other", other)]).await;

    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "a quay"})).await;
    assert_eq!(res.status(), 200);
    assert_eq!(a.last_call().unwrap().field("model").as_deref(), Some("gpt-image-1.5"));
    assert_eq!(a.last_call().unwrap().field("prompt").as_deref(), Some("a quay"));

    let image = png(32, 32, true);
    let form = reqwest::multipart::Form::new().text("model", "gpt-image-1").text("prompt", "add a boat").part(
        "image",
        reqwest::multipart::Part::bytes(image.clone()).file_name("in.png").mime_str("image/png").unwrap(),
    );
    let res = app.post_form("/images/edits", form).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let call = a.last_call().unwrap();
    assert_eq!(call.field("model").as_deref(), Some("gpt-image-1.5"));
    assert_eq!(call.field("prompt").as_deref(), Some("add a boat"));
    let sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&image))
    };
    assert_eq!(call.part("image").unwrap().sha256, sha, "the image went through byte for byte");
    assert_eq!((a.call_count(), b.call_count()), (2, 0), "the other deployment does not serve gpt-image-1");

    let (status, error) =
        error_of(app.post_json("/images/generations", &json!({"model": "dall-e-2", "prompt": "a mooring"})).await)
            .await;
    assert_eq!((status, error["param"].as_str()), (400, Some("model")));
    assert_eq!((a.call_count(), b.call_count()), (2, 0));
}

#[tokio::test]
async fn the_python_sdk_with_default_retries_succeeds_through_a_pool_with_a_failing_deployment() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("tests/sdk/python/.venv/bin/python");
    if !python.exists() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing: run `bash .ci/run`", python.display());
        eprintln!("skipping: {} is missing (run `bash .ci/run` to install the SDKs)", python.display());
        return;
    }
    let failing = fake_with("#status=500").await;
    let good = FakeOpenAi::start().await;
    let mut failing_deployment = deployment(&failing.url);
    // Out only briefly, so half-open probes by the SDK's real calls meet the failure again.
    failing_deployment.unhealthy_for = Duration::from_millis(50);
    let app = gateway(vec![("failing", failing_deployment), ("good", deployment(&good.url))]).await;

    let output = tokio::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk/python/test_pools_sdk.py"])
        .current_dir(&root)
        .env("IMAGEGATE_POOL_BASE_URL", &app.base_url)
        .env("IMAGEGATE_POOL_KEY", &app.key)
        .env("IMAGEGATE_POOL_FAILING", &failing.base)
        .env("IMAGEGATE_POOL_GOOD", &good.base)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && text.contains("2 passed"), "{text}");
    assert_eq!(good.call_count(), 9, "one generation per call");
    let rows = app.usage_rows(9).await;
    let generated: Vec<&Value> = rows.iter().filter(|r| r["images_returned"].as_i64() == Some(1)).collect();
    assert_eq!(generated.len(), 9, "{rows:?}");
    assert!(generated.iter().all(|r| r["deployment"] == "good" && r["status"] == 200), "{rows:?}");
}

#[tokio::test]
async fn a_caller_that_hangs_up_does_not_cancel_the_generation_and_its_sdk_retry_gets_the_images_without_a_second_call()
{
    let fake = fake_with("#sleep=700").await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.tenants[0].limits.images_per_day = Some(1);
    })
    .await;
    let body = json!({"model": "gpt-image-1", "prompt": "a lighthouse keeper"});
    let send = |retry: Option<&str>, timeout: Duration| {
        let mut request = app
            .client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(&app.key)
            .timeout(timeout)
            .json(&body);
        if let Some(count) = retry {
            request = request.header("x-stainless-retry-count", count);
        }
        request.send()
    };

    // The caller gives up once the upstream has the call (an SDK timeout, a closed tab).
    let first = send(None, Duration::from_millis(300)).await;
    assert!(first.is_err_and(|e| e.is_timeout()));
    assert_eq!(fake.call_count(), 1);
    // The call ran to its end anyway: the image budget is spent and the ledger has the row.
    let rows = app.usage_rows(1).await;
    assert_eq!((rows[0]["status"].as_i64(), rows[0]["images_returned"].as_i64()), (Some(200), Some(1)), "{rows:?}");
    assert!(rows[0]["cost_usd"].as_f64().unwrap() > 0.0);

    // The SDK's automatic retry gets those images, without a second upstream call.
    let retry = send(Some("1"), Duration::from_secs(10)).await.unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-imagegate-replayed"], "true");
    let answer: Value = retry.json().await.unwrap();
    assert!(answer["data"][0]["b64_json"].as_str().is_some_and(|b| !b.is_empty()));
    assert_eq!(fake.call_count(), 1);
    let rows = app.usage_rows(2).await;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1]["images_returned"].as_i64(), rows[1]["cost_usd"].as_f64()), (None, Some(0.0)), "{rows:?}");

    // A new request finds the day's one image spent (by the call whose caller hung up).
    let other =
        app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "a keeper's cat"})).await;
    let (status, error) = error_of(other).await;
    assert_eq!((status, error["code"].as_str()), (429, Some("insufficient_quota")));
    assert_eq!(fake.call_count(), 1);
}

#[tokio::test]
async fn a_client_that_retries_a_gateway_504_regardless_causes_one_generation_and_gets_the_images() {
    let fake = fake_with("#sleep=1500").await;
    let app = TestApp::spawn_with(&fake.url, |s| {
        s.server.request_timeout = Duration::from_secs(1);
        s.upstream.timeout = Duration::from_secs(10);
    })
    .await;
    let body = json!({"model": "gpt-image-1", "prompt": "a fog horn"});

    // Like the Vercel AI SDK or async-openai: no x-stainless-retry-count, and a 504 is retried regardless.
    let mut statuses = Vec::new();
    let mut images = None;
    for _ in 0..4 {
        let res = app.post_json("/images/generations", &body).await;
        statuses.push(res.status().as_u16());
        if res.status() == 200 {
            images = Some(res.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(res.headers()["x-should-retry"], "false");
    }
    assert_eq!(statuses.first(), Some(&504), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(images.unwrap()["data"][0]["b64_json"].as_str().is_some_and(|b| !b.is_empty()));
    assert_eq!(fake.call_count(), 1, "one generation in total");

    // Once the images were delivered, the same request again is a deliberate new generation, as at OpenAI.
    let again = app.post_json("/images/generations", &body).await;
    assert_eq!(again.status(), 504);
    assert_eq!(fake.call_count(), 2);
}
