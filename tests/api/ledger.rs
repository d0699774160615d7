//! The usage ledger and the tenant database: rows match what the upstream produced, on SQLite and on
//! PostgreSQL; refusals cost nothing; nothing survives in the database that could authenticate; restarts
//! keep everything; SIGTERM under load loses no row.

use std::time::Duration;

use serde_json::json;

use crate::support::app::{FAKE_IMAGE_HOSTS, GatewayProcess, TestApp, TestDb, UPSTREAM_KEY};
use crate::support::fake_openai::FakeOpenAi;

async fn rows_match_the_upstream(db: TestDb) {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_on(db, &fake.url, |_| {}).await;

    let res = app.post_json("/images/generations", &json!({"model": "gpt-image-1", "prompt": "p", "n": 2})).await;
    let gpt_request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: serde_json::Value = res.json().await.unwrap();
    let res = app
        .post_json(
            "/images/generations",
            &json!({"model": "dall-e-3", "prompt": "p", "quality": "hd", "size": "1792x1024"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.post_json("/images/generations", &json!({"model": "dall-e-3", "prompt": "p", "n": 3})).await.status(),
        400
    );
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "p #status=500"})).await.status(), 500);
    let stream = app
        .post_json(
            "/images/generations",
            &json!({"model": "gpt-image-1", "prompt": "s", "stream": true, "partial_images": 1}),
        )
        .await;
    let _ = stream.bytes().await.unwrap();

    let rows = app.usage_rows(5).await;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    let gpt = rows.iter().find(|r| r["request_id"] == gpt_request_id.as_str()).unwrap();
    assert_eq!(gpt["tenant"], "team-a");
    assert_eq!((gpt["images_requested"].as_i64(), gpt["images_returned"].as_i64()), (Some(2), Some(2)));
    assert_eq!(gpt["input_tokens"].as_u64(), body["usage"]["input_tokens"].as_u64());
    assert_eq!(gpt["output_tokens"].as_u64(), body["usage"]["output_tokens"].as_u64());
    assert!(gpt["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(gpt["status"], 200);
    assert!(gpt["upstream_request_id"].as_str().unwrap().starts_with("req_"));
    assert!(gpt["prompt"].is_null(), "prompts are not stored without the tenant's opt-in");

    let dalle = rows.iter().find(|r| r["model"] == "dall-e-3" && r["status"] == 200).unwrap();
    assert!((dalle["cost_usd"].as_f64().unwrap() - 0.12).abs() < 1e-9, "dall-e-3 hd 1792x1024 is $0.12: {dalle}");
    let refused = rows.iter().find(|r| r["status"] == 400).unwrap();
    assert_eq!(refused["cost_usd"].as_f64(), Some(0.0));
    let failed = rows.iter().find(|r| r["status"] == 500).unwrap();
    assert_eq!(failed["cost_usd"].as_f64(), Some(0.0));
    let streamed = rows.iter().find(|r| r["stream"] == 1).unwrap();
    assert_eq!(streamed["images_returned"].as_i64(), Some(1));
    assert!(streamed["output_tokens"].as_i64().unwrap() > 0);
    assert!(streamed["cost_usd"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn usage_rows_match_what_the_upstream_produced_on_sqlite() {
    rows_match_the_upstream(TestDb::Sqlite).await;
}

#[tokio::test]
async fn usage_rows_match_what_the_upstream_produced_on_postgres() {
    rows_match_the_upstream(TestDb::Postgres).await;
}

#[tokio::test]
async fn prompts_are_stored_only_for_tenants_that_opt_in() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn_with(&fake.url, |s| s.tenants[0].log_prompts = true).await;

    app.post_json("/images/generations", &json!({"prompt": "a logged prompt"})).await;
    let res = app
        .client
        .post(format!("{}/images/generations", app.base_url))
        .bearer_auth(&app.other_key)
        .json(&json!({"prompt": "a private prompt"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let rows = app.usage_rows(2).await;
    let prompts: Vec<(&str, Option<&str>)> =
        rows.iter().map(|r| (r["tenant"].as_str().unwrap(), r["prompt"].as_str())).collect();
    assert!(prompts.contains(&("team-a", Some("a logged prompt"))), "{prompts:?}");
    assert!(prompts.contains(&("team-b", None)), "{prompts:?}");
}

#[tokio::test]
async fn the_database_file_never_contains_a_key_secret() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    for key in [&app.key, &app.other_key] {
        let res = app
            .client
            .post(format!("{}/images/generations", app.base_url))
            .bearer_auth(key)
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    app.usage_rows(2).await;

    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(app.data_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("imagegate.db") {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(bytes.len() > 4096, "the database file was not found");
    for key in [&app.key, &app.other_key] {
        let secret = &key.as_bytes()[12..];
        assert!(!bytes.windows(secret.len()).any(|w| w == secret), "a key secret is stored in the database");
    }
}

#[tokio::test]
async fn a_restart_keeps_tenants_keys_and_usage() {
    let fake = FakeOpenAi::start().await;
    let app = TestApp::spawn(&fake.url).await;
    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "before"})).await.status(), 200);

    let app = app.restart().await;

    assert_eq!(app.post_json("/images/generations", &json!({"prompt": "after"})).await.status(), 200);
    let rows = app.usage_rows(2).await;
    assert_eq!(rows.len(), 2, "usage from before the restart is kept: {rows:#?}");
}

#[tokio::test]
async fn sigterm_under_load_loses_no_usage_row() {
    let fake = FakeOpenAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = imagegate::tenants::keys::generate();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"20s\"\n[storage]\ndata_dir = \"{}\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"\n[usage]\nflush_interval = \"5s\"\n{FAKE_IMAGE_HOSTS}\
         [[tenants]]\nname = \"load\"\nkeys = [{{ id = \"{}\", sha256 = \"{}\" }}]\n",
        dir.path().display(),
        fake.url,
        key.id,
        key.sha256
    );
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, config).unwrap();
    let mut gw = GatewayProcess::start(&["serve", "--config", path.to_str().unwrap()], dir.path());

    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (client, url, key) = (client.clone(), format!("{}/v1/images/generations", gw.root), key.key.clone());
        tasks.push(tokio::spawn(async move {
            let prompt = format!("load {i} #sleep={}", 200 + (i % 5) * 150);
            client.post(url).bearer_auth(key).json(&json!({"prompt": prompt})).send().await.map(|r| r.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.terminate();
    let mut answered = 0;
    for t in tasks {
        if let Ok(Ok(_status)) = t.await {
            answered += 1;
        }
    }
    assert!(gw.wait(Duration::from_secs(30)).success(), "{}", gw.printed());
    assert!(answered > 0, "no request was in flight when SIGTERM arrived");

    // The flush interval (5 s) is longer than the drain: only the shutdown flush can have written the rows.
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", dir.path().join("imagegate.db").display());
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM usage_events").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, answered, "every answered request has its usage row");
}
